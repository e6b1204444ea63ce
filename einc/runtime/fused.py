"""The planned chain as one autograd Function: every bmm reads strided views of the previous
result and writes straight into the layout the next step reads (``out=`` a strided view),
in forward and in backward, so the only copies are the relayouts the plan could not avoid.
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
    stride = tuple(st[g[-1]] if g else 1 for g in groups)
    return t.as_strided(shape, stride, t.storage_offset())


def relayout(t: torch.Tensor, src, dst) -> torch.Tensor:
    """Copy ``t`` (contiguous in order ``src``) into a contiguous tensor in order ``dst``."""
    return t.permute([src.index(i) for i in dst]).contiguous()


def bmm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out = a @ b per batch. CPU bmm writes row-major results in place with any batch
    stride but falls back to a slow loop for column-major ones, so those are computed as
    the transposed product (b^T a^T) into the transposed (row-major) view."""
    if out.stride(2) == 1 or out.shape[2] == 1:
        torch.bmm(a, b, out=out)
    else:
        torch.bmm(b.transpose(1, 2), a.transpose(1, 2), out=out.transpose(1, 2))


def _empty(order, sizes, like: torch.Tensor) -> torch.Tensor:
    return torch.empty([sizes[i] for i in order], dtype=like.dtype, device=like.device)


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
            out = _empty(st.out_order, sizes, x)
            bmm_into(view3(cur, order, sizes, (st.batch, st.left, st.contracted)),
                     view3(f, st.factor_order, sizes, (st.batch, st.contracted, st.right)),
                     view3(out, st.out_order, sizes, (st.batch, st.left, st.right)))
            saved.append(cur)
            cur, order = out, st.out_order
        if plan.output_copy:
            cur = relayout(cur, order, plan.output_order)
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
        if plan.output_copy:
            d = relayout(d, plan.output_order, last.out_order)
        for k in range(n - 1, -1, -1):
            st = plan.steps[k]
            dc = view3(d, st.out_order, sizes, (st.batch, st.left, st.right))
            left = view3(saved[k], st.in_order, sizes, (st.batch, st.left, st.contracted))
            f = factors[st.factor]
            if ctx.needs_input_grad[3 + st.factor]:
                g = _empty(st.factor_order, sizes, dy)
                bmm_into(left.transpose(1, 2), dc,
                         view3(g, st.factor_order, sizes, (st.batch, st.contracted, st.right)))
                grads[st.factor] = g
            if k == 0 and not need_x:
                break
            dl = _empty(st.in_order, sizes, dy)
            rv = view3(f, st.factor_order, sizes, (st.batch, st.contracted, st.right))
            bmm_into(dc, rv.transpose(1, 2),
                     view3(dl, st.in_order, sizes, (st.batch, st.left, st.contracted)))
            prev = plan.steps[k - 1].out_order if k else plan.input_order
            d = relayout(dl, st.in_order, prev) if st.relayout else dl
        dx = d if need_x else None
        return (None, None, dx, *grads)
