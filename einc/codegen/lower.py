"""Structure + widths -> everything a module needs: sizes, padding, the analysed counts and
the layout plan. Cached: equal structures at equal sizes share one lowering."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ..analysis import DEFAULT_TOLERANCE, concretize, resolve_dims
from ..analysis import path as _path
from ..ir import Structure
from ..syntax import as_structure
from .plan import Plan, plan


@dataclass(frozen=True)
class Lowered:
    structure: Structure
    d_in: int
    d_out: int
    padded_in: int
    padded_out: int
    sizes: dict
    plan: Plan
    params: int
    flops: int

    @property
    def key(self) -> tuple:
        """Hashable identity (the dataclass holds dicts)."""
        return (self.structure, self.d_in, self.d_out, tuple(self.sizes.items()))

    @property
    def input_sizes(self) -> tuple[int, ...]:
        return tuple(self.sizes[i] for i in self.structure.input.indices)

    @property
    def output_sizes(self) -> tuple[int, ...]:
        return tuple(self.sizes[i] for i in self.structure.output.indices)

    def factor_shape(self, k: int) -> tuple[int, ...]:
        return tuple(self.sizes[i] for i in self.structure.factors[k].indices)


def lower(spec, d_in=None, d_out=None, tolerance: float = DEFAULT_TOLERANCE) -> Lowered:
    s = as_structure(spec)
    d_in, d_out = resolve_dims(s, None, d_in, d_out)
    return _lower(s, d_in, d_out, tolerance)


@functools.lru_cache(maxsize=1024)
def _lower(s: Structure, d_in: int, d_out: int, tolerance: float) -> Lowered:
    conc = concretize(s, d_in, d_out, tolerance)
    chains = cheapest_chains(s, conc.sizes)
    p = plan(s, conc.sizes, chains)
    params = sum(math.prod(conc.sizes[i] for i in f.indices) for f in s.factors)
    flops = sum(st.flops(conc.sizes) for st in chains[0])
    return Lowered(s, d_in, d_out, conc.padded_in, conc.padded_out, dict(conc.sizes), p,
                   params, flops)


def cheapest_chains(s: Structure, sizes: dict):
    """Every absorption order of least FLOPs at these sizes (the planner then picks the one
    with the fewest copies). Integer arithmetic only: compiling needs no sympy."""
    chains = [_path.chain(s, o) for o in _path.orders(s)]
    costs = [sum(st.flops(sizes) for st in c) for c in chains]
    least = min(costs)
    return [c for c, cost in zip(chains, costs) if cost == least]
