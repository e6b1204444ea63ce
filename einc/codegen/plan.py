"""Lowering: the analysis stage's chain -> batched matrix multiplies with planned layouts.

Each step ``C = L * F`` sorts its indices into batch (B: in L, F and C), contracted (K: in L
and F only), left (M: in L and C; the token index is always here) and right (N: in F and C),
and runs as one ``bmm(L[B, M, K], F[B, K, N]) -> C[B, M, N]``.

A bmm reads a strided operand without copying when every group is one run of adjacent axes
(in the same index order as in the other operands) and the innermost run is a matrix
dimension, not the batch. Each step writes a fresh contiguous result, [B][M][N] or, computed
as the transposed product, [B][N][M]; the planner picks that choice and the order of the
right group so that the next step reads the result as such an operand, over every chain of
least FLOPs, and stores each factor as [B][K][N]. Where no order serves both neighbours it
records a relayout (one copy of the operand before the bmm). Results are never written into
strided views (``bmm(out=...)``): on the CPU many such views leave the BLAS fast path.

Pure Python over index names and sizes; no torch.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

from ..ir import Structure


#: a product with fewer output columns than this counts as skinny (see as_operand)
SKINNY = 32


@dataclass(frozen=True)
class StepPlan:
    factor: int                  # position in structure.factors
    batch: tuple[str, ...]       # B, in run order
    left: tuple[str, ...]        # M, in run order (the token index included)
    contracted: tuple[str, ...]  # K, in run order
    right: tuple[str, ...]       # N, in run order
    in_order: tuple[str, ...]    # memory order of L as this step reads it
    relayout: bool               # L arrives in another order and is copied into in_order
    out_order: tuple[str, ...]   # memory order this step writes C in

    @property
    def factor_order(self) -> tuple[str, ...]:
        """Storage order of the factor."""
        return self.batch + self.contracted + self.right


@dataclass(frozen=True)
class Plan:
    structure: Structure
    sizes: dict                  # index -> size (the token index excluded)
    token: str
    input_order: tuple[str, ...]   # (token, *input indices)
    output_order: tuple[str, ...]  # (token, *output indices)
    steps: tuple[StepPlan, ...]
    output_copy: bool            # the last result is written elsewhere and copied into y

    @property
    def copies(self) -> int:
        return sum(st.relayout for st in self.steps) + self.output_copy


def token_name(s: Structure) -> str:
    name = "n"
    while name in s.index_names:
        name += "_"
    return name


# ---------------------------------------------------------------------------- operand checks
def as_operand(order, groups: dict[str, tuple], matrix: str,
               unit=frozenset(), skinny: bool = False) -> dict[str, tuple] | None:
    """If memory ``order`` is a copy-free bmm operand with these groups (each a set of
    indices), return each group's index order; ``matrix`` names the two matrix groups.

    Each group must be one run and the innermost run a matrix group (the second one when
    the batch run is not outermost). Empty groups are free.
    """
    role = {i: g for g, idx in groups.items() for i in idx}
    seen, out, prev = [], {}, None
    for i in order:
        if i in unit:  # a size-1 axis has no stride to respect: it goes anywhere
            out.setdefault(role[i], ())
            out[role[i]] += (i,)
            continue
        g = role[i]
        if g != prev:
            if g in seen:
                return None
            seen.append(g)
            out.setdefault(g, ())
            prev = g
        out[g] += (i,)
    if seen and seen[-1] not in matrix:
        return None
    # With the batch run inside the matrix (batch-middle), column-major reads of skinny
    # products (few output columns) leave the fast BLAS path on the CPU: measured up to 8x
    # slower than copying first. Wider products read them at about the speed of a copy.
    if skinny and "B" in seen and seen[0] != "B" and seen[-1] != matrix[-1]:
        return None
    for g in groups:
        out.setdefault(g, ())
    return out


def _step_groups(st, left_indices):
    batch = {i for i in st.left if i in st.right and i in st.out}
    contracted = {i for i in st.left if i in st.right and i not in st.out}
    left = {i for i in left_indices if i not in st.right}
    right = {i for i in st.right if i not in st.left}
    return batch, left, contracted, right


# ---------------------------------------------------------------------------- search
def plan(s: Structure, sizes: dict, chains) -> Plan:
    """Layouts for the cheapest of ``chains`` (equal-FLOP chains from einc.analysis)."""
    tok = token_name(s)
    weights = dict(sizes, **{tok: 1 << 16})  # many tokens: weigh copies of activations
    best = None
    for steps in chains:
        cand = _plan_chain(s, weights, steps, tok)
        if best is None or cand[0] < best[0]:
            best = cand
    return Plan(s, dict(sizes), tok, (tok, *s.input.indices), (tok, *s.output.indices),
                best[1], best[2])


def _plan_chain(s, sizes, steps, tok):
    """The cheapest memory order of each intermediate; cost = elements copied.

    What is left to choose after step k depends only on the order step k reads, so each
    (step, order) is solved once (the choices multiply along the chain). Among equal
    costs the first option wins, in the order :func:`_result_orders` yields them."""
    final = (tok, *s.output.indices)
    numel = lambda idx: math.prod(sizes[i] for i in idx)
    unit = frozenset(i for i, v in sizes.items() if v == 1)

    @functools.lru_cache(maxsize=None)
    def rest(k, order):
        """(cost, steps k.., output copied) of the cheapest finish from step k."""
        st = steps[k]
        b, m, c, r = _step_groups(st, order)
        groups = as_operand(order, {"B": b, "M": m, "K": c}, "MK", unit,
                            skinny=numel(r) < SKINNY)
        relayout, cost = groups is None, 0
        if relayout:  # copy L into [B][M][K]
            groups = {"B": _keep(order, b), "M": _keep(order, m), "K": _keep(order, c)}
            order = groups["B"] + groups["M"] + groups["K"]
            cost = numel(order)
        last = k == len(steps) - 1
        best = None
        for out_order, right in _result_orders(groups, r, final if last else None,
                                                wide=len(steps) <= 3):
            step = StepPlan(st.factor, groups["B"], groups["M"], groups["K"], right,
                            tuple(order), relayout, out_order)
            if last:
                copy = out_order != final
                cand = (cost + (numel(out_order) if copy else 0), (step,), copy)
            else:  # an order the next step cannot read costs a relayout there
                after = rest(k + 1, out_order)
                cand = (cost + after[0], (step,) + after[1], after[2])
            if best is None or cand[0] < best[0]:
                best = cand
        return best

    return rest(0, (tok, *s.input.indices))


def _keep(order, group) -> tuple:
    return tuple(i for i in order if i in group)


def _result_orders(groups, right, final, wide=True):
    """Memory orders for C: a fresh contiguous [B][M][N], or [B][N][M] computed as the
    transposed product. (Writing into strided views with bmm(out=) would allow more orders,
    but CPU bmm falls back to a loop orders of magnitude slower for many such views.)"""
    b, m = groups["B"], groups["M"]
    r_perms = (list(itertools.permutations(sorted(right))) if len(right) <= 4 and wide
               else [tuple(sorted(right))])
    if final is not None:  # the result is y itself when [B][M][N] is y's order
        for rp in r_perms:
            if b + m + rp == final:
                yield final, rp
                return
    for rp in r_perms:
        yield b + m + rp, rp
        yield b + rp + m, rp
