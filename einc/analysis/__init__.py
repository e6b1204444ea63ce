"""Stage 2: exact analysis of a structure (parameters, FLOPs, rank, taxonomy)."""
from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

from ..errors import SizeError
from ..ir import Structure
from ..sizes import Size
from . import path as path_mod
from .concrete import DEFAULT_TOLERANCE, Concrete, concretize, resolve_dims
from .rank import numerical_rank, rank_bound
from .report import Report
from .taxonomy import closed_forms, theta_of

__all__ = ["analyze", "Report", "concretize", "resolve_dims", "closed_forms", "theta_of",
           "numerical_rank", "plan", "DEFAULT_TOLERANCE"]


def _structure(spec) -> Structure:
    from ..syntax import as_structure  # a hand-built Structure is checked like parsed text
    return as_structure(spec)


def plan(s: Structure, sizes: dict):
    """The chain einc executes at concrete sizes."""
    from .symbolic import symbolic

    sym = symbolic(s)
    args = [sizes[i] for i in sym.index_names]
    order = min(sym.flops_fns, key=lambda o: (sym.flops_fns[o](*args), o != sym.order))
    return path_mod.chain(s, order)


def analyze(spec, d=None, *, d_in=None, d_out=None,
            tolerance: float = DEFAULT_TOLERANCE) -> Report:
    """Analyse a spec (text or IR) at a layer width: ``analyze("btt", d=1024)``."""
    from .symbolic import symbolic, to_text

    s = _structure(spec)
    din, dout = resolve_dims(s, d, d_in, d_out)
    conc = concretize(s, din, dout, tolerance)
    sizes = conc.sizes
    sym = symbolic(s)
    steps = plan(s, sizes)
    flops = sum(st.flops(sizes) for st in steps)
    params = int(sym.params_fn(*[sizes[i] for i in sym.index_names]))
    bound, cut = rank_bound(s, sizes)
    # The layer is the padded matrix with its padding cropped: a (d_out, d_in) block.
    bound = min(bound, din, dout)
    theta = s.theta if s.theta is not None else theta_of(s)
    redundant = degenerate = None
    if theta is not None:
        a, b, g, dl, e, f, r = theta
        redundant = min(a, e) < min(b, dl)
        degenerate = r > min(a, e)
    largest = max(_numel(st.out, sizes) for st in steps[:-1]) if len(steps) > 1 else 0
    moe = _moe_info(s, sizes, din, params) if s.moe else None
    return Report(
        spec=s.source or s.spec_text(), d_in=din, d_out=dout,
        padded_in=conc.padded_in, padded_out=conc.padded_out, sizes=dict(sizes),
        input=list(s.input.indices), output=list(s.output.indices),
        factors={f.name: list(f.indices) for f in s.factors},
        params=params, flops=flops, flops_backward=2 * flops,
        omega=sym.omega, psi=sym.psi, nu=sym.nu, rank_bound=bound, rank_cut=list(cut),
        path=path_mod.describe(steps, s), largest_intermediate=largest,
        equation=s.equation, params_formula=to_text(sym.params_d),
        flops_formula=to_text(sym.flops_d), redundant=redundant, degenerate=degenerate,
        theta=theta, moe=moe)


def _numel(indices, sizes) -> int:
    out = 1
    for i in indices:
        out *= sizes[i]
    return out


def _moe_info(s: Structure, sizes: dict, d_in: int, params: int) -> dict:
    """Per-token costs count only the k routed experts, plus the router (d_in -> E)."""
    e, k = sizes[s.moe.expert_index], s.moe.k
    if k > e:  # the preset checks k <= experts, but `with` may resize the expert index
        where = next((ix.pos for ix in s.indices if ix.name == s.moe.expert_index), None)
        raise SizeError(f"top-{k} routing needs at least {k} experts, but the expert index "
                        f"{s.moe.expert_index!r} has size {e}", s.source or None, where)
    active = dict(sizes, **{s.moe.expert_index: k})
    # the layer runs its cores in spec order whatever is cheapest on paper (they differ
    # where every size is 1, at d = 1)
    steps = path_mod.chain(s, tuple(range(len(s.factors))))
    from .symbolic import symbolic
    sym = symbolic(s)
    active_params = int(sym.params_fn(*[active[i] for i in sym.index_names]))
    router_params = d_in * e + e
    return {"experts": e, "k": k, "expert_index": s.moe.expert_index,
            "router_params": router_params, "total_params": params + router_params,
            "active_params": active_params + router_params,
            "active_flops": sum(st.flops(active) for st in steps) + 2 * d_in * e}
