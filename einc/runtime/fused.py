"""The planned chain as one autograd Function: every bmm reads strided views of the previous
result in the layout the plan chose for it, in forward and in backward, so the only copies
are the relayouts the plan could not avoid.
"""
from __future__ import annotations

import math

import torch

from ..codegen.plan import Plan


def _strides(order, sizes) -> dict:
    out, acc = {}, 1
    for i in reversed(order):
        out[i] = acc
        acc *= sizes[i]
    return out


def view3(t: torch.Tensor, order, sizes, groups) -> torch.Tensor:
    """A 3-D view of ``t`` (contiguous in index ``order``) with each group (one run in memory,
    listed in run order) merged into one dimension."""
    st = _strides(order, sizes)
    shape = tuple(math.prod(sizes[i] for i in g) for g in groups)
    # a group's stride is its innermost axis's; size-1 axes have none to respect
    inner = [[i for i in g if sizes[i] != 1] for g in groups]
    stride = tuple(st[g[-1]] if g else 1 for g in inner)
    return t.as_strided(shape, stride, t.storage_offset())


def relayout(t: torch.Tensor, src, dst) -> torch.Tensor:
    """Copy ``t`` (contiguous in order ``src``) into a contiguous tensor in order ``dst``."""
    return t.permute([src.index(i) for i in dst]).contiguous()


def bmm_fresh(a: torch.Tensor, b: torch.Tensor, transposed: bool) -> torch.Tensor:
    """a @ b per batch into a new contiguous tensor: [B][M][N], or [B][N][M] when
    ``transposed`` (computed as b^T a^T). Never bmm(out=strided view): on CPU many such
    views fall back to a loop orders of magnitude slower."""
    if transposed:
        return torch.bmm(b.transpose(1, 2), a.transpose(1, 2))
    return torch.bmm(a, b)


def _factor_grad(left, dc, st, sizes) -> torch.Tensor:
    """dF = L^T dC. When L is read batch-middle, L^T would be a column-major batch-middle
    operand (a slow CPU path), so compute (dC^T L) and transpose the small result instead."""
    order = st.factor_order
    if left.stride(0) >= max(left.stride(1), left.stride(2)) or left.shape[0] == 1:
        return bmm_fresh(left.transpose(1, 2), dc, False).view([sizes[i] for i in order])
    g = bmm_fresh(dc.transpose(1, 2), left, False)  # [B][N][K]
    return g.transpose(1, 2).contiguous().view([sizes[i] for i in order])


def _same(a, b, sizes) -> bool:
    """Equal memory orders once size-1 axes (which have no stride to respect) are dropped."""
    drop = lambda o: tuple(i for i in o if sizes[i] != 1)
    return drop(a) == drop(b)


class ChainFunction(torch.autograd.Function):
    """y = chain(x, *factors); x contiguous in plan.input_order (token first), each factor
    contiguous in its step's storage order. Returns y contiguous in plan.output_order."""

    @staticmethod
    def forward(ctx, plan: Plan, tokens: int, x, *factors):
        sizes = dict(plan.sizes, **{plan.token: tokens})
        cur, order = x, plan.input_order
        saved = []
        for st in plan.steps:
            if st.relayout:
                cur, order = relayout(cur, order, st.in_order), st.in_order
            f = factors[st.factor]
            out = bmm_fresh(view3(cur, order, sizes, (st.batch, st.left, st.contracted)),
                            view3(f, st.factor_order, sizes, (st.batch, st.contracted, st.right)),
                            st.out_order != st.batch + st.left + st.right)
            out = out.view([sizes[i] for i in st.out_order])
            saved.append(cur)
            cur, order = out, st.out_order
        cur = relayout(cur, order, plan.output_order) if plan.output_copy else \
            cur.view([sizes[i] for i in plan.output_order])  # equal up to size-1 axes
        ctx.plan, ctx.sizes = plan, sizes
        ctx.save_for_backward(*saved, *factors)
        return cur

    @staticmethod
    def backward(ctx, dy):
        plan, sizes = ctx.plan, ctx.sizes
        n = len(plan.steps)
        saved, factors = ctx.saved_tensors[:n], ctx.saved_tensors[n:]
        need_x = ctx.needs_input_grad[2]
        grads = [None] * len(factors)
        d = dy.contiguous()
        last = plan.steps[-1]
        d = relayout(d, plan.output_order, last.out_order) if plan.output_copy else \
            d.view([sizes[i] for i in last.out_order])
        for k in range(n - 1, -1, -1):
            st = plan.steps[k]
            dc = view3(d, st.out_order, sizes, (st.batch, st.left, st.right))
            left = view3(saved[k], st.in_order, sizes, (st.batch, st.left, st.contracted))
            f = factors[st.factor]
            if ctx.needs_input_grad[3 + st.factor]:  # in the factor's storage order [B][K][N]
                grads[st.factor] = _factor_grad(left, dc, st, sizes)
            if k == 0 and not need_x:
                break
            # dL in [B][M][K] or [B][K][M], whichever is the order the previous step wrote
            # (then no copy); else [B][M][K] and one relayout.
            prev = plan.steps[k - 1].out_order if k else plan.input_order
            b_, m_, k_ = st.batch, st.left, st.contracted
            transposed = _same(b_ + k_ + m_, prev, sizes) and not _same(b_ + m_ + k_, prev, sizes)
            rv = view3(f, st.factor_order, sizes, (b_, k_, st.right))
            dl = bmm_fresh(dc, rv.transpose(1, 2), transposed)
            got = b_ + k_ + m_ if transposed else b_ + m_ + k_
            dl = dl.view([sizes[i] for i in got])
            if _same(got, prev, sizes):
                d = dl.view([sizes[i] for i in prev])
            elif k == 0:  # dx may stay a strided view: whoever consumes it decides on a copy
                d = dl.permute([got.index(i) for i in prev])
            else:
                d = relayout(dl, got, prev)
        dx = d if need_x else None
        return (None, None, dx, *grads)
