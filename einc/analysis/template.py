"""One derivation for a whole family of structures: the index-class template.

A *template* is a structure in which every index stands for an index class (the set of
tensors it joins) and every class is present. Each structure of a search space is the
template with some classes switched off: a class with exponent 0 has size 1 and is left
out, and a factor left with no index is left out with it. All those structures share one
symbolic derivation here, in which each class's size is a free symbol ``n_c`` and its
presence a 0/1 symbol ``p_c``:

- parameters: ``sum_f P_f * prod_{c in f} n_c`` with ``P_f = 1 - prod_{c in f} (1 - p_c)``
  (a factor is stored only when one of its classes is present);
- forward FLOPs of a chain order: ``sum_k P_(f_k) * (1 + Q_k) * prod_{c in union_k} n_c``
  with ``Q_k = 1 - prod_{c contracted at step k} (1 - p_c)`` (two FLOPs per multiply-add
  when a present index is summed, one otherwise, as :meth:`einc.analysis.path.Step.flops`);
- the separating cut sets of the min-cut model of :mod:`einc.analysis.rank`, enumerated
  once: for every set R of factors on the input side, the classes touching both sides.

Each expression is lambdified once, so a lattice of millions of points is evaluated with
numpy (floats, for ranking) or with Python integers (exact, for reports), never with sympy
per point. :func:`einc.analyze` remains the reference; the tests check that both agree.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import sympy

from ..ir import INPUT, OUTPUT, Index, Operand, Structure
from ..sizes import Size, ceil_int
from . import path as _path
from .concrete import DEFAULT_TOLERANCE, closest

#: ``concretize`` tries every rounding of at most this many free sizes, else rounds all up.
_MAX_FREE = 14


@dataclass(frozen=True)
class SideRounding:
    """The roundings of one side (input or output) of a point that concretize may choose.

    ``choices`` are the roundings with the least padding on this side, in the order
    :func:`~einc.analysis.concrete.concretize` tries them; ``drifts`` their terms
    ``|log(size / real size)|`` over the sizes that had a choice. Which one concretize takes
    depends on both sides together (see :func:`combine`).
    """

    choices: tuple[tuple[int, ...], ...]
    drifts: tuple[tuple[float, ...], ...]
    rounded_up: tuple[int, ...]  # every size rounded up (used when too many sizes are free)
    free: int                   # number of sizes with a choice between floor and ceiling

    @property
    def padded(self) -> int:
        return math.prod(self.choices[0])


def combine(rx: SideRounding, ry: SideRounding) -> list[tuple[int, int]]:
    """The pairs of side choices concretize may take (when at most 14 sizes are free): the
    least total drift, with every pair as close as that (see
    :func:`~einc.analysis.concrete.closest`), in concretize's order. The caller tells them
    apart by rank bound, then cost, as concretize does.

    The drift is a float sum in index order (input side first), so near-ties are decided
    exactly as there.
    """
    if len(rx.choices) == 1 and len(ry.choices) == 1:
        return [(0, 0)]
    pairs = [(sum(dx + dy), i, j) for i, dx in enumerate(rx.drifts)
             for j, dy in enumerate(ry.drifts)]
    ties = closest(pairs, lambda p: p[0])
    return [(i, j) for _, i, j in sorted(ties, key=lambda p: p[0])]


class Template:
    """Shared derivation of every sub-structure of ``structure`` (see the module docstring)."""

    def __init__(self, structure: Structure):
        s = structure
        self.structure = s
        self.classes: tuple[str, ...] = s.index_names
        self.factor_names = tuple(f.name for f in s.factors)
        self.side = {c: ("x" if c in s.input.indices else "y" if c in s.output.indices
                         else "r") for c in self.classes}
        self.membership = {c: s.index_class(c) for c in self.classes}
        self.factor_classes = tuple(tuple(f.indices) for f in s.factors)
        self.orders = _path.orders(s)
        self.steps = {o: _path.chain(s, o) for o in self.orders}
        self.cut_sets = _cut_sets(s)

        n = {c: sympy.Symbol(f"n_{c}", positive=True, integer=True) for c in self.classes}
        p = {c: sympy.Symbol(f"p_{c}", nonnegative=True, integer=True) for c in self.classes}
        self._n, self._p = n, p
        absent = lambda cs: sympy.Mul(*[1 - p[c] for c in cs])
        present_f = [1 - absent(f) for f in self.factor_classes]
        self.params_expr = sympy.Add(*[pf * sympy.Mul(*[n[c] for c in f])
                                       for pf, f in zip(present_f, self.factor_classes)])
        self.flops_exprs = {}
        for o, steps in self.steps.items():
            self.flops_exprs[o] = sympy.Add(*[
                present_f[st.factor] * (2 - absent(st.contracted))
                * sympy.Mul(*[n[c] for c in st.union]) for st in steps])
        args = [n[c] for c in self.classes] + [p[c] for c in self.classes]
        lam = lambda e, mod: sympy.lambdify(args, e, modules=mod)
        self._params_np = lam(self.params_expr, "numpy")
        self._params_int = lam(self.params_expr, "math")
        self._flops_np = {o: lam(e, "numpy") for o, e in self.flops_exprs.items()}
        self._flops_int = {o: lam(e, "math") for o, e in self.flops_exprs.items()}

    # -- points ------------------------------------------------------------------
    def structure_at(self, exponents: dict, source: str = "") -> Structure:
        """The template with the classes of exponent 0 (and factors left empty) removed.

        ``exponents`` maps class -> exponent of d_in (input classes), d_out (output classes)
        or d_min (the others).
        """
        keep = {c for c in self.classes if exponents.get(c, 0) > 0}
        s = self.structure
        op = lambda o: Operand(o.name, tuple(i for i in o.indices if i in keep))
        factors = tuple(f for f in map(op, s.factors) if f.indices)
        indices = tuple(Index(c, self.size_of(c, exponents[c])) for c in self.classes
                        if c in keep)
        return Structure(op(s.input), factors, op(s.output), indices, source=source,
                         origin="template")

    def size_of(self, c: str, exponent) -> Size:
        width = {"x": "d_in", "y": "d_out", "r": "d_min"}[self.side[c]]
        return Size.symbol(width) ** Fraction(exponent)

    # -- exact counts at concrete sizes -------------------------------------------
    def _args(self, sizes, present):
        return ([sizes[c] for c in self.classes] + [present[c] for c in self.classes])

    def params(self, sizes: dict, present: dict):
        """Parameters; ``sizes`` and ``present`` map class -> value (or numpy array).

        With numpy float arrays the result is a float array (exact below 2^53); with Python
        integers it is an exact integer.
        """
        fn = self._params_np if _is_array(sizes) else self._params_int
        return fn(*self._args(sizes, present))

    def flops_by_order(self, sizes: dict, present: dict) -> dict:
        fns = self._flops_np if _is_array(sizes) else self._flops_int
        args = self._args(sizes, present)
        return {o: fn(*args) for o, fn in fns.items()}

    def flops(self, sizes: dict, present: dict):
        """Forward FLOPs per vector of the cheapest chain (as :func:`einc.analysis.plan`)."""
        return functools.reduce(_min, self.flops_by_order(sizes, present).values())

    def rank_bound(self, sizes: dict, d_in: int, d_out: int):
        """Smallest product of sizes over the separating cut sets (absent classes: size 1),
        capped by the layer's widths (the padding is cropped, which can only lower the rank)."""
        cut = functools.reduce(_min, [_prod([sizes[c] for c in cut]) for cut in self.cut_sets])
        return _min(cut, min(d_in, d_out))

    # -- exponents (d_in = d_out = d -> infinity) ---------------------------------
    def exponents(self, exps: dict) -> tuple:
        """(omega, psi, nu) from the class exponents.

        Works on Fractions (one point) or on integer numpy arrays (exponents in units of
        1/k, results in the same units; then psi is capped at ``exps['__one__']``).
        """
        one = exps.get("__one__", Fraction(1))
        present = {c: exps[c] > 0 for c in self.classes}
        f_present = [_any([present[c] for c in f]) for f in self.factor_classes]
        lead_params = functools.reduce(_max, [
            _where(fp, _sum([exps[c] for c in f]), 0)
            for fp, f in zip(f_present, self.factor_classes)])
        lead_flops = None
        for o, steps in self.steps.items():
            lead = functools.reduce(_max, [
                _where(f_present[st.factor], _sum([exps[c] for c in st.union]), -(10 ** 6))
                for st in steps])
            lead_flops = lead if lead_flops is None else _min(lead_flops, lead)
        psi = functools.reduce(_min, [_sum([exps[c] for c in cut]) for cut in self.cut_sets])
        psi = _min(psi, one)
        return lead_flops - lead_params, psi, lead_flops - one

    # -- concrete sizes -------------------------------------------------------------
    def side_classes(self, side: str) -> tuple[str, ...]:
        return tuple(c for c in self.classes if self.side[c] == side)

    def round_side(self, side: str, exponents: tuple, d_in: int, d_out: int) -> SideRounding:
        """Round one side as :func:`~einc.analysis.concrete.concretize` would.

        Each side pattern is rounded once (cached); :func:`combine` then picks the pair.
        """
        return _round_side(self, side, tuple(Fraction(e) for e in exponents), d_in, d_out)

    def rank_size(self, exponent, d_in: int, d_out: int) -> int:
        """The size of an internal class, as concretize rounds it (to the nearest integer)."""
        if exponent == 0:
            return 1
        v = Size.symbol("d_min") ** Fraction(exponent)
        return max(1, math.floor(v.evaluate({"d_min": min(d_in, d_out)}) + 0.5))

    def concrete_sizes(self, exps: dict, d_in: int, d_out: int,
                       tolerance: float = DEFAULT_TOLERANCE):
        """Class sizes of one point (absent classes: 1) and the padded widths, or None when
        the padding exceeds the tolerance."""
        rx = self.round_side("x", tuple(exps[c] for c in self.side_classes("x")), d_in, d_out)
        ry = self.round_side("y", tuple(exps[c] for c in self.side_classes("y")), d_in, d_out)
        ranks = {c: self.rank_size(exps[c], d_in, d_out) for c in self.side_classes("r")}
        present = {c: int(exps[c] > 0) for c in self.classes}

        def at(cx, cy):
            return {**dict(zip(self.side_classes("x"), cx)),
                    **dict(zip(self.side_classes("y"), cy)), **ranks}

        if rx.free + ry.free > _MAX_FREE:
            sizes = at(rx.rounded_up, ry.rounded_up)
        else:  # the highest rank bound, then the cheapest (FLOPs, parameters), as concretize
            options = [at(rx.choices[i], ry.choices[j]) for i, j in combine(rx, ry)]
            sizes = min(options, key=lambda z: (-self.rank_bound(z, d_in, d_out),
                                                self.flops(z, present), self.params(z, present)))
        pin = _prod([sizes[c] for c in self.side_classes("x")])
        pout = _prod([sizes[c] for c in self.side_classes("y")])
        if pin > d_in * (1 + tolerance) + 1e-9 or pout > d_out * (1 + tolerance) + 1e-9:
            return None
        return {c: sizes[c] for c in self.classes}, pin, pout


@functools.lru_cache(maxsize=65536)
def _round_side(t: Template, side: str, exps: tuple, d_in: int, d_out: int) -> SideRounding:
    """concretize's search restricted to one side: floor or ceiling for every size that is
    not an integer, keeping the roundings of least padding that cover the width."""
    names = t.side_classes(side)
    width = d_in if side == "x" else d_out
    env = {"d_in": d_in, "d_out": d_out, "d_min": min(d_in, d_out)}
    fixed, free = {}, []
    for c, e in zip(names, exps):
        if e == 0:
            fixed[c] = 1
            continue
        v = t.size_of(c, e).evaluate(env)
        lo, hi = max(1, math.floor(v + 1e-9)), max(1, ceil_int(v))
        if lo == hi:
            fixed[c] = lo
        else:
            free.append((c, lo, hi, v))
    up = dict(fixed, **{c: hi for c, _, hi, _ in free})
    best, choices, drifts = None, [], []
    for choice in itertools.product(*[(lo, hi) for _, lo, hi, _ in free]):
        sizes = dict(fixed, **{c: x for (c, *_), x in zip(free, choice)})
        padded = math.prod(sizes.values())
        if padded < width or (best is not None and padded > best):
            continue
        if best is None or padded < best:
            best, choices, drifts = padded, [], []
        choices.append(tuple(sizes[c] for c in names))
        drifts.append(tuple(abs(math.log(x / v)) for (_, _, _, v), x in zip(free, choice)))
    return SideRounding(tuple(choices), tuple(drifts), tuple(up[c] for c in names), len(free))


def _cut_sets(s: Structure) -> tuple[tuple[str, ...], ...]:
    """Minimal sets of indices separating the input from the output.

    Cutting a set of indices leaves some set R of factors reachable from the input; the
    indices that must then be cut are those touching both sides (the input or a factor in R
    on one side, the output or a factor outside R on the other). Every separating set
    contains the set of its R, so the minimum over R is the minimum over all cuts.
    """
    names = [f.name for f in s.factors]
    cuts = set()
    for r in range(len(names) + 1):
        for inside in itertools.combinations(names, r):
            inside = set(inside)
            cut = []
            for c in s.index_names:
                cls = s.index_class(c)
                facs = cls - {INPUT, OUTPUT}
                src = INPUT in cls or bool(facs & inside)
                snk = OUTPUT in cls or bool(facs - inside)
                if src and snk:
                    cut.append(c)
            cuts.add(tuple(cut))
    minimal = [c for c in cuts if not any(set(o) < set(c) for o in cuts)]
    return tuple(sorted(minimal, key=lambda c: (len(c), c)))


# -- helpers that work on scalars and on numpy arrays alike ------------------------------
def _is_array(d: dict) -> bool:
    return any(isinstance(v, np.ndarray) for v in d.values())


def _min(a, b):
    return np.minimum(a, b) if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) else min(a, b)


def _max(a, b):
    return np.maximum(a, b) if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) else max(a, b)


def _where(cond, a, b):
    if isinstance(cond, np.ndarray):
        return np.where(cond, a, b)
    return a if cond else b


def _any(values):
    return functools.reduce(lambda a, b: a | b, values, False)


def _sum(values):
    return functools.reduce(lambda a, b: a + b, values, 0)


def _prod(values):
    return functools.reduce(lambda a, b: a * b, values, 1)


__all__ = ["Template", "SideRounding", "combine"]
