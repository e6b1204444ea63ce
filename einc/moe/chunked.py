"""CPU sparse BTT-MoE: expert-sorted slots in cache-sized chunks.

The ``S = N * k`` (token, expert) slots are sorted by expert and cut into chunks of about
``C`` slots (3/4 to 3/2 of it) that each lie within one expert's run. A chunk is an ordinary
rank-1 BTT on its ``n`` gathered token rows, so it runs the same way as the fused dense route
(:mod:`einc.runtime.fused`): gather the rows, one ``bmm`` per core with the expert's slice
of the cores (strided views, no copies), scale by the gates and add the rows into ``y``,
all while the chunk's intermediates are in cache. The number of chunks follows the work
(about ``S / C + E``: each expert's run in equal parts), and the large tensors come from
the recycled pool, so the memory traffic is close to a dense rank-k BTT's. Spent scratch
buffers take the next temporaries (the gathered rows take the gated output, the dy rows
dx's), so a chunk's backward works in three scratch buffers instead of six.

Backward reuses the saved intermediate ``h`` of every chunk; the gate gradient is
``<h, dY B^T>`` per slot (no saved output), and core gradients accumulate per expert in
contiguous buffers that are permuted into the cores' layouts once.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import CompileError
from ..runtime import buffers
from ..runtime.fused import Scratch, batched, cache_fit, regrad


def chunk_slots(d_max: int, itemsize: int) -> int:
    """Target slots per chunk: as many as keep the widest intermediate (``d_max`` values
    per slot) within the fused route's cache budget."""
    return cache_fit(d_max * itemsize)


def _chunks(counts: list[int], size: int) -> list[tuple[int, int, int]]:
    """(expert, first slot, end slot) of every chunk of the expert-sorted slots: each
    expert's run in the whole number of equal chunks (+-1) nearest to ``size`` slots each,
    so between 3/4 and 3/2 of ``size`` (fewer when the run is shorter). No chunk is a small,
    inefficient tail, and a run just over ``size`` is not cut in two: every chunk costs
    about 17 operations, each with its own overhead."""
    out, start = [], 0
    for r, c in enumerate(counts):
        parts = max(1, (2 * c + size) // (2 * size))
        bounds = [start + c * i // parts for i in range(parts + 1)]
        out += [(r, s0, s1) for s0, s1 in zip(bounds, bounds[1:]) if s1 > s0]
        start += c
    return out


def _expert_major(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Views (E, g, a, f) of A and (E, f, g, e) of B whose per-expert matrices BLAS reads
    in place (one unit stride each; BTTMoE stores them so); otherwise contiguous copies,
    as bmm would copy every matrix of every chunk instead."""
    As, Bs = A.permute(3, 0, 1, 2), B.permute(2, 0, 1, 3)
    if 1 not in (As.stride(2), As.stride(3)):
        As = As.contiguous()
    if 1 not in (Bs.stride(2), Bs.stride(3)):
        Bs = Bs.contiguous()
    return As, Bs


def _half(t: Tensor) -> bool:
    return t.dtype in (torch.float16, torch.bfloat16)


def _accumulate(acc: Tensor, a: Tensor, b: Tensor, scratch: Scratch) -> None:
    """acc += a @ b per batch; a half-precision product goes through scratch into a float32
    ``acc``."""
    if acc.dtype == a.dtype:
        acc.baddbmm_(a, b)
    else:
        acc.add_(torch.bmm(a, b, out=scratch.get("acc", (a.shape[0], a.shape[1], b.shape[2]))))


def _zeros(shape, like: Tensor) -> Tensor:
    return buffers.empty(shape, like.dtype, like.device).zero_()


class ChunkedMoE(torch.autograd.Function):
    """y[t] = bias + sum over t's k slots of gate * BTT_r(x[t]); x (N, g, a) or its rows
    flattened (N, g * a), dx then shaped alike (a view of a reshape is a gradient autograd
    cannot sum into in place: flat rows avoid that reshape), A (g, a, f, E),
    B (f, g, E, e), expert_idx and gate (N, k), bias (f, e) or None. Returns (N, f, e)."""

    @staticmethod
    def forward(ctx, x_in, A, B, expert_idx, gate, bias, chunk: int, keep: bool = True):
        N, (g, a, f, E), e = x_in.shape[0], A.shape, B.shape[3]
        x = x_in.view(N, g, a)
        k = expert_idx.shape[1]
        flat = expert_idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // k                      # token of each sorted slot
        gates = gate.reshape(-1).index_select(0, order)
        counts = torch.bincount(flat, minlength=E).tolist()
        chunks = _chunks(counts, chunk)
        As, Bs = _expert_major(A, B)
        y = buffers.empty([N, f, e], x.dtype, x.device)
        y.copy_(bias.expand(N, f, e)) if bias is not None else y.zero_()
        scratch, saved = Scratch(x), []
        # keep: a backward will run (without one, h is a chunk's scratch, not saved)
        for r, s0, s1 in chunks:
            n, tok = s1 - s0, token[s0:s1]
            xc = torch.index_select(x, 0, tok, out=scratch.get("x", (n, g, a)))
            # h = [g][f][n]: the transposed product, read by core B as (f, n, g) unchanged
            h = buffers.empty((g, f, n), x.dtype, x.device) if keep else \
                scratch.get("h", (g, f, n))
            torch.bmm(As[r].transpose(1, 2), xc.permute(1, 2, 0), out=h)
            out = torch.bmm(h.permute(1, 2, 0), Bs[r], out=scratch.get("y", (f, n, e)))
            # gate while moving to token-major rows (index_add_ from a strided source was
            # measured 7x slower than this copy + add), into xc's spent buffer
            rows = torch.mul(out.transpose(0, 1), gates[s0:s1].view(n, 1, 1),
                             out=scratch.get("x", (n, f, e)))
            y.index_add_(0, tok, rows)
            if keep:
                saved.append(h)
        ctx.chunks, ctx.k, ctx.shape = chunks, k, (N, g, a, f, E, e)
        # expert_idx, gate and bias (inputs, no copies) only for a differentiable backward
        ctx.save_for_backward(x_in, A, B, expert_idx, gate, bias, order, token, gates, *saved)
        return y

    @staticmethod
    def backward(ctx, dy):
        x_in, A, B, expert_idx, gate, bias, order, token, gates, *saved = ctx.saved_tensors
        N, g, a, f, E, e = ctx.shape
        if torch.is_grad_enabled() or batched(dy):  # create_graph=True, or a batch of dy:
            # differentiate plain torch ops
            from .dispatch import _sparse_padded
            plain = lambda x, A, B, gate, bias: _sparse_padded(
                x.view(N, g, a), A, B, expert_idx, gate) + (0 if bias is None else bias)
            need = [ctx.needs_input_grad[i] for i in (0, 1, 2, 4, 5)]
            dx, dA, dB, dgate, dbias = regrad(plain, [x_in, A, B, gate, bias], need, dy)
            return dx, dA, dB, None, dgate, dbias, None, None
        x = x_in.view(N, g, a)
        need_x, need_a, need_b, _, need_gate, need_bias = ctx.needs_input_grad[:6]
        As, Bs = _expert_major(A, B)
        if not dy.is_contiguous():  # gathering rows of a strided tensor copies per row
            dy = buffers.empty(dy.shape, dy.dtype, dy.device).copy_(dy)
        dy2 = dy.view(N, f * e)
        dx_in = _zeros(list(x_in.shape), x) if need_x else None  # returned: not a view
        dx = None if dx_in is None else dx_in.view(N, g, a)
        # core gradients sum over chunks: in float32 for half-precision inputs
        acc = torch.empty(0, dtype=torch.float32 if _half(x) else x.dtype, device=x.device)
        dA = _zeros([E, g, f, a], acc) if need_a else None  # held transposed: [g][f][a]
        dB = _zeros([E, f, g, e], acc) if need_b else None
        dgate = x.new_empty(order.shape[0]) if need_gate else None
        scratch = Scratch(x)
        for (r, s0, s1), h in zip(ctx.chunks, saved):
            n, tok, gc = s1 - s0, token[s0:s1], gates[s0:s1]
            rows = torch.index_select(dy2, 0, tok, out=scratch.get("rows", (n, f * e)))
            dyc = rows.view(n, f, e).transpose(0, 1)  # (f, n, e), read in place
            # dh before the gate, [f][g][n], read as [g][f][n] in place
            dhu = torch.bmm(Bs[r], dyc.transpose(1, 2), out=scratch.get("dhu", (f, g, n)))
            dh = dhu.transpose(0, 1)
            if dgate is not None:
                dgate[s0:s1] = torch.mul(h, dh, out=scratch.get("x", (g, f, n))).sum((0, 1))
            if dB is not None:
                rows.mul_(gc.view(n, 1))
                _accumulate(dB[r], h.transpose(0, 1), dyc, scratch)  # (f, g, n) @ (f, n, e)
            if dA is None and dx is None:
                continue
            dhu.mul_(gc.view(1, 1, n))
            if dA is not None:
                xc = torch.index_select(x, 0, tok, out=scratch.get("x", (n, g, a)))
                _accumulate(dA[r], dh, xc.transpose(0, 1), scratch)  # (g, f, n) @ (g, n, a)
            if dx is not None:
                dxc = torch.bmm(dh.transpose(1, 2), As[r].transpose(1, 2),
                                out=scratch.get("x", (g, n, a)))
                # the dy rows are spent: their buffer takes dx's token-major rows
                dx.index_add_(0, tok, scratch.get("rows", (n, g, a)).copy_(dxc.transpose(0, 1)))
        grads = [None] * 8
        if need_bias:
            grads[5] = dy.sum(0)
        if dx is not None:
            grads[0] = dx_in
        if dA is not None:
            grads[1] = dA.permute(1, 3, 2, 0).to(A.dtype)  # (E, g, f, a) -> (g, a, f, E)
        if dB is not None:
            grads[2] = dB.permute(1, 2, 0, 3).to(B.dtype)  # (E, f, g, e) -> (f, g, E, e)
        if dgate is not None:
            flat = torch.empty_like(dgate).index_copy_(0, order, dgate)
            grads[4] = flat.view(N, ctx.k)
        return tuple(grads)


def btt_moe_chunked(x: Tensor, A: Tensor, B: Tensor, expert_idx: Tensor, gate: Tensor,
                    chunk: int | None = None, bias: Tensor | None = None) -> Tensor:
    """Sparse BTT-MoE on the CPU (see the module docstring); x (N, g, a) or (N, g * a);
    returns (N, f, e), plus ``bias`` (shaped (f, e)) when given: y starts from it instead
    of zeros."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise CompileError(f"chunk must be a positive integer (target slots per chunk), "
                           f"got {chunk!r}")
    x = x.contiguous()
    if chunk is None:
        g, a, f, _ = A.shape
        chunk = chunk_slots(max(g * a, g * f, f * B.shape[3]), x.element_size())
    gate = gate.to(x.dtype)
    # needs_input_grad inside forward follows requires_grad, also under no_grad
    keep = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, A, B, gate, bias))
    return ChunkedMoE.apply(x, A, B, expert_idx, gate, bias, chunk, keep)
