"""The contraction order einc executes: a chain that starts at the input and absorbs one
weight factor per step, so every step is a batched matrix multiply over the tokens.

Weight factors are never contracted with each other: that would trade a per-token cost for
a materialised (and usually larger) matrix.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from ..ir import Structure


@dataclass(frozen=True)
class Step:
    """One pairwise contraction ``out = left * factor`` (the token index is implied on left/out)."""

    factor: int
    left: tuple[str, ...]
    right: tuple[str, ...]
    out: tuple[str, ...]

    @property
    def contracted(self) -> tuple[str, ...]:
        return tuple(i for i in self.left if i in self.right and i not in self.out)

    @property
    def batch(self) -> tuple[str, ...]:
        return tuple(i for i in self.left if i in self.right and i in self.out)

    @property
    def union(self) -> tuple[str, ...]:
        return self.left + tuple(i for i in self.right if i not in self.left)

    def flops(self, sizes) -> int:
        """Forward FLOPs per token: 2 per multiply-add, 1 per multiply when nothing is summed."""
        return (2 if self.contracted else 1) * math.prod(sizes[i] for i in self.union)


def chain(s: Structure, order) -> tuple[Step, ...]:
    steps, current = [], tuple(s.input.indices)
    for k, f in enumerate(order):
        later = set(s.output.indices)
        for g in order[k + 1:]:
            later.update(s.factors[g].indices)
        right = s.factors[f].indices
        union = current + tuple(i for i in right if i not in current)
        out = tuple(i for i in union if i in later)
        steps.append(Step(f, current, right, out))
        current = out
    return tuple(steps)


def orders(s: Structure):
    """Candidate absorption orders: all of them up to 6 factors, spec order beyond."""
    n = len(s.factors)
    if n <= 6:
        return list(itertools.permutations(range(n)))
    return [tuple(range(n))]


def best_chain(s: Structure, sizes) -> tuple[Step, ...]:
    """The cheapest chain at concrete sizes (ties keep the spec order)."""
    best, best_cost = None, None
    for order in orders(s):
        steps = chain(s, order)
        cost = sum(st.flops(sizes) for st in steps)
        if best_cost is None or cost < best_cost:
            best, best_cost = steps, cost
    return best


def describe(steps, s: Structure) -> list[str]:
    names = ["x"] + [f"Z{k}" for k in range(1, len(steps))]
    out = []
    for k, st in enumerate(steps):
        res = s.output.name if k == len(steps) - 1 else f"Z{k + 1}"
        out.append(f"{res}[{' '.join(st.out)}] = {names[k]}[{' '.join(st.left)}] * "
                   f"{s.factors[st.factor].name}[{' '.join(st.right)}]")
    return out
