"""Row moves between tokens and the padded expert-major slots of a sparse BTT-MoE.

A padded dispatch lays the ``S = N * k`` (token, choice) slots out as ``E * C`` rows,
expert ``r`` owning rows ``[r * C, (r + 1) * C)``; ``slot_row`` (N, k) names the row of
every slot and ``row_slot`` (E * C) the slot of every row (-1 for padding). Two moves
connect that layout with the tokens, each the other's transpose:

* ``gather``: ``out[p] = scale[s] * src[s // k]`` with ``s = row_slot[p]`` (zeros for a
  padding row), optionally with ``dot[s] = <other[p], src[s // k]>``;
* ``sum``: ``out[t] = sum_j scale[t, j] * src[slot_row[t, j]]``, the k terms in a fixed
  order.

Dispatching tokens is a gather (backward a sum); combining the gated expert outputs is a
sum (backward a gather with the gate gradient as its dot). Every output element is written
by one program, so both are deterministic without atomics. With Triton (a CUDA device, or
``TRITON_INTERPRET=1``) each move is one kernel that reads every slot row once (a token
row once per slot), accumulating in
float32 (float64 for float64); elsewhere the same moves run as torch gathers, products and
sums, summed alike. The kernels replace about ten launches and passes over the slot rows
per training step.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .strided_bmm import (_import_triton, _interpreting, _triton_usable, launch_kernel,
                          triton_available)

__all__ = ["combine_slots", "dispatch_slots", "place_slots"]

_KERNELS: dict = {}
tl = None  # triton.language, bound when the kernels are decorated

#: columns a program moves per step
BLOCK = 1024


# ---------------------------------------------------------------------------
# kernels (decorated on first use: triton is optional)
# ---------------------------------------------------------------------------


def _gather_fn(src_ptr, row_slot_ptr, scale_ptr, other_ptr, out_ptr, dot_ptr, W, K,
               BLOCK: tl.constexpr, SCALE: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    s = tl.load(row_slot_ptr + p)
    s0 = tl.maximum(s, 0)
    t = s0 // K
    used = s >= 0  # padding rows: zeros (read nothing), no dot
    used_v = (tl.zeros([BLOCK], dtype=s.dtype) + s) >= 0  # a vector mask (the interpreter's)
    if SCALE:  # zero on padding rows, whatever scale[0] holds (0 * inf is nan)
        w = tl.where(used, tl.load(scale_ptr + s0).to(ACC), 0.0)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for c0 in range(0, W, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        inside = cols < W
        v = tl.load(src_ptr + t * W + cols, mask=inside & used_v, other=0.0).to(ACC)
        if DOT:
            acc += tl.load(other_ptr + p * W + cols, mask=inside & used_v, other=0.0).to(ACC) * v
        if SCALE:
            v = v * w
        tl.store(out_ptr + p * W + cols, v.to(out_ptr.dtype.element_ty), mask=inside)
    if DOT:
        if used:
            tl.store(dot_ptr + s, tl.sum(acc, axis=0).to(dot_ptr.dtype.element_ty))


def _sum_fn(src_ptr, slot_row_ptr, scale_ptr, out_ptr, W, K: tl.constexpr,
            BLOCK: tl.constexpr, SCALE: tl.constexpr, ACC: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < W
    acc = tl.zeros([BLOCK], dtype=ACC)
    for j in tl.static_range(K):
        r = tl.load(slot_row_ptr + t * K + j)
        v = tl.load(src_ptr + r * W + cols, mask=inside, other=0.0).to(ACC)
        if SCALE:
            v = v * tl.load(scale_ptr + t * K + j).to(ACC)
        acc += v
    tl.store(out_ptr + t * W + cols, acc.to(out_ptr.dtype.element_ty), mask=inside)


def _place_fn(flat_ptr, order_ptr, counts_ptr, ends_ptr, slot_row_ptr, row_slot_ptr, S, C,
              BLOCK: tl.constexpr):
    # sorted position i holds slot order[i] of expert e; its row is e * C + (i - start(e)),
    # start(e) = ends[e] - counts[e], the slots of the experts before e
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < S
    slot = tl.load(order_ptr + i, mask=inside, other=0)
    e = tl.load(flat_ptr + slot, mask=inside, other=0).to(tl.int64)
    start = tl.load(ends_ptr + e, mask=inside, other=0) - \
        tl.load(counts_ptr + e, mask=inside, other=0)
    row = e * C + (i - start)
    tl.store(slot_row_ptr + slot, row, mask=inside)
    tl.store(row_slot_ptr + row, slot, mask=inside)


def _kernels():
    global tl
    if not _KERNELS:
        triton = _import_triton()
        from triton import language

        tl = language
        _KERNELS["gather"] = triton.jit(_gather_fn)
        _KERNELS["sum"] = triton.jit(_sum_fn)
        _KERNELS["place"] = triton.jit(_place_fn)
    return _KERNELS


def _block(W: int) -> int:
    return min(BLOCK, max(16, 1 << max(0, (W - 1).bit_length())))


def _acc(t: Tensor):
    """Accumulator type: float32, float64 for float64 operands."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


KERNELS = ("auto", "triton", "torch")


def _use_kernel(t: Tensor, kernel: str, indices: bool = False) -> bool:
    """Whether the moves run as Triton kernels: "auto" where they can, "torch" never,
    "triton" always (an error where they cannot). ``indices``: ``t`` holds integer indices
    (the placement kernel), so only its device counts."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    usable = (triton_available() and (t.is_cuda or (_interpreting() and t.device.type == "cpu"))
              if indices else _triton_usable(t))
    if kernel == "triton" and not usable:
        raise RuntimeError(f"the triton slot moves are unavailable for a {t.dtype} tensor on "
                           f"{t.device} (needs triton and a CUDA device, or TRITON_INTERPRET=1)")
    return kernel != "torch" and usable


def _on_device(t: Tensor):
    """Triton launches on the current CUDA device: make it t's."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------
# the two moves, on contiguous 2-d operands
# ---------------------------------------------------------------------------


def _gather(src: Tensor, slot_row: Tensor, row_slot: Tensor, scale: Optional[Tensor] = None,
            other: Optional[Tensor] = None, kernel: str = "auto"):
    """(out, dot) of the gather move (module docstring); ``dot`` (one per slot) only with
    ``other``. ``scale`` is per slot, flat."""
    P, W, k = row_slot.shape[0], src.shape[1], slot_row.shape[1]
    if _use_kernel(src, kernel) and P * W > 0:
        out = src.new_empty(P, W)
        dot = None if other is None else src.new_empty(slot_row.numel())  # one row per slot
        with _on_device(src):  # out stands in for the pointers a flag leaves unread
            launch_kernel(_kernels()["gather"], (P,), (
                src, row_slot, out if scale is None else scale, out if other is None else other,
                out, out if dot is None else dot, W, k), dict(
                BLOCK=_block(W), SCALE=scale is not None, DOT=other is not None, ACC=_acc(src)))
        return out, dot
    valid = (row_slot >= 0).unsqueeze(1)
    rows = torch.where(valid, src.index_select(0, row_slot.clamp(min=0) // k), 0)
    dot = None
    if other is not None:  # per row (zero on padding), then per slot through slot_row
        acc = torch.promote_types(src.dtype, torch.float32)
        per_row = (other.to(acc) * rows.to(acc)).sum(1)
        dot = per_row.index_select(0, slot_row.reshape(-1)).to(src.dtype)
    if scale is not None:
        per_row = scale.index_select(0, row_slot.clamp(min=0)).unsqueeze(1)
        rows = rows * torch.where(valid, per_row, 0)
    return rows, dot


def _sum(src: Tensor, slot_row: Tensor, scale: Optional[Tensor] = None,
         kernel: str = "auto") -> Tensor:
    N, k = slot_row.shape
    W = src.shape[1]
    if _use_kernel(src, kernel) and N * W > 0:
        out = src.new_empty(N, W)
        block = _block(W)
        with _on_device(src):
            launch_kernel(_kernels()["sum"], (N, -(-W // block)), (
                src, slot_row, out if scale is None else scale, out, W), dict(
                K=k, BLOCK=block, SCALE=scale is not None, ACC=_acc(src)))
        return out
    acc = torch.promote_types(src.dtype, torch.float32)  # summed as the kernel sums
    picked = src.index_select(0, slot_row.reshape(-1)).view(N, k, W).to(acc)
    if scale is not None:
        picked = picked * scale.view(N, k, 1).to(acc)
    out = picked[:, 0].clone()
    for j in range(1, k):  # a fixed order
        out += picked[:, j]
    return out.to(src.dtype)


#: sorted slots a placement program places
PLACE_BLOCK = 1024


def place_slots(flat: Tensor, order: Tensor, counts: Tensor, C: int, kernel: str = "auto"):
    """Rows of the padded layout for slots sorted by expert: ``flat`` (S,) the expert of
    every slot, ``order`` (S,) the slots sorted by expert (stable), ``counts`` (E,) the slots
    per expert, ``C`` the capacity. Returns ``(slot_row, row_slot)``: the row of every slot
    (the i-th slot of expert r in sorted order gets row ``r * C + i``) and the slot of every
    row, -1 for padding. Two launches where Triton runs, a cumulative sum and the kernel
    (the torch form takes about ten operations, each a launch and host time on a GPU)."""
    S, E = flat.shape[0], counts.shape[0]
    row_slot = torch.full((E * C,), -1, dtype=torch.long, device=flat.device)
    if _use_kernel(flat, kernel, indices=True) and S > 0:
        # the kernel reads by flat offset: an expanded or sliced index view would be misread
        flat, order, counts = flat.contiguous(), order.contiguous(), counts.contiguous()
        # each slot reads its expert's start (ends - counts): O(S) work for any E (a sum
        # over a (block, E) tile per program was O(S * E))
        ends = torch.cumsum(counts, 0)
        slot_row = torch.empty(S, dtype=torch.long, device=flat.device)
        with _on_device(flat):
            launch_kernel(_kernels()["place"], (-(-S // PLACE_BLOCK),), (
                flat, order, counts, ends, slot_row, row_slot, S, C), dict(
                BLOCK=PLACE_BLOCK), varying=(6, 7))
        return slot_row, row_slot
    starts = torch.cumsum(counts, 0) - counts
    e_sorted = flat.index_select(0, order)
    row_sorted = e_sorted * C + (torch.arange(S, device=flat.device) - starts.index_select(0, e_sorted))
    slot_row = torch.empty_like(order)
    slot_row[order] = row_sorted
    row_slot[row_sorted] = order
    return slot_row, row_slot


# ---------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------


def _first_order_only(grad: torch.Tensor, kernel: str) -> None:
    from ..errors import EincError
    from ..runtime.fused import batched

    instead = "backend='chunked' (CPU) and backend='padded' (any device) have them"
    if torch.is_grad_enabled():
        raise EincError("the triton BTT-MoE backend has no second derivatives (backward "
                        f"with create_graph=True) in its slot moves; {instead}")
    if batched(grad) and _use_kernel(grad, kernel):  # the torch operations take one
        raise EincError("the triton BTT-MoE backend's kernels take no batch of gradients "
                        "(autograd.grad with is_grads_batched=True, jacobian or hessian "
                        f"with vectorize=True); {instead}")


class _DispatchSlots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, slot_row, row_slot, kernel):
        ctx.save_for_backward(slot_row)
        ctx.kernel = kernel
        return _gather(x, slot_row, row_slot, kernel=kernel)[0]

    @staticmethod
    def backward(ctx, grad):
        _first_order_only(grad, ctx.kernel)
        (slot_row,) = ctx.saved_tensors
        return _sum(grad.contiguous(), slot_row, kernel=ctx.kernel), None, None, None


class _CombineSlots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, slot_row, row_slot, gate, kernel):
        # the rows only for the gate's gradient: a frozen router's layer need not keep them
        ctx.save_for_backward(rows if ctx.needs_input_grad[3] else None, slot_row, row_slot, gate)
        ctx.kernel = kernel
        return _sum(rows, slot_row, gate, kernel=kernel)

    @staticmethod
    def backward(ctx, dy):
        _first_order_only(dy, ctx.kernel)
        rows, slot_row, row_slot, gate = ctx.saved_tensors
        need_rows, need_gate = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        if not (need_rows or need_gate):
            return None, None, None, None, None
        d_rows, d_gate = _gather(dy.contiguous(), slot_row, row_slot, gate.reshape(-1),
                                 rows if need_gate else None, kernel=ctx.kernel)
        d_gate = None if d_gate is None else d_gate.view(gate.shape)
        return d_rows if need_rows else None, None, None, d_gate, None


def _indices(slot_row: Tensor, row_slot: Tensor):
    """Contiguous int64 indices: the kernels read them by flat offset and form 64-bit row
    offsets from them."""
    return slot_row.long().contiguous(), row_slot.long().contiguous()


def _check_plan(what: str, src: Tensor, slot_row: Tensor, row_slot: Tensor, validate: bool,
                gate: Optional[Tensor] = None) -> None:
    """Shapes, dtypes and devices of a move's operands (the kernels read by offset, unmasked:
    a wrong shape or index would read out of bounds): token rows ``src`` for a dispatch,
    slot rows and their ``gate`` for a combine; with ``validate`` also the index ranges,
    one host sync on a GPU."""
    from ..errors import CompileError

    def bad(message):
        raise CompileError(f"{what}: {message}")

    for name, t in (("slot_row", slot_row), ("row_slot", row_slot)):
        if not isinstance(t, Tensor) or t.dtype.is_floating_point or t.dtype.is_complex \
                or t.dtype == torch.bool:
            bad(f"{name} must be an integer tensor")
        if t.device != src.device:
            bad(f"{name} is on {t.device}, the rows on {src.device}")
    if gate is not None and (not isinstance(gate, Tensor) or gate.shape != slot_row.shape):
        bad(f"gate must have slot_row's shape {tuple(slot_row.shape)}, got "
            f"{tuple(gate.shape) if isinstance(gate, Tensor) else gate!r}")
    if src.dim() != 2:
        bad(f"the rows must be 2-d (rows, width), got shape {tuple(src.shape)}")
    if slot_row.dim() != 2 or slot_row.shape[1] < 1 or row_slot.dim() != 1:
        bad(f"slot_row must be (N, k) with k >= 1 and row_slot 1-d, got "
            f"{tuple(slot_row.shape)} and {tuple(row_slot.shape)}")
    if gate is None and slot_row.shape[0] != src.shape[0]:  # a dispatch: one row per token
        bad(f"slot_row has {slot_row.shape[0]} tokens, expected {src.shape[0]}")
    if gate is not None and src.shape[0] != row_slot.shape[0]:  # a combine: one per padded row
        bad(f"{src.shape[0]} rows for {row_slot.shape[0]} padded rows in row_slot")
    # ranges are read where the values are concrete: not on the meta device, not while
    # torch.compile traces (a data-dependent guard), as for check_experts
    if validate and slot_row.numel() and src.device.type != "meta" \
            and not torch.compiler.is_compiling():
        P, S = row_slot.shape[0], slot_row.numel()
        if int(slot_row.min()) < 0 or int(slot_row.max()) >= P:
            bad(f"slot_row entries must be padded rows in [0, {P})")
        if P and (int(row_slot.min()) < -1 or int(row_slot.max()) >= S):
            bad(f"row_slot entries must be slots in [0, {S}) or -1 (padding)")


def dispatch_slots(x: Tensor, slot_row: Tensor, row_slot: Tensor, kernel: str = "auto",
                   validate: bool = True) -> Tensor:
    """Token rows ``x`` (N, W) gathered into the padded slot rows (``row_slot``'s length, W),
    padding rows zero; backward sums each token's ``k`` slot gradients in a fixed order.
    ``kernel="torch"`` keeps to torch operations, ``"triton"`` insists on the kernels.
    ``validate=False`` skips reading the index ranges (a host sync on a GPU), for plans
    from :func:`einc.moe.dispatch._padded_plan`."""
    _use_kernel(x, kernel)
    _check_plan("dispatch_slots", x, slot_row, row_slot, validate)
    return _DispatchSlots.apply(x.contiguous(), *_indices(slot_row, row_slot), kernel)


def combine_slots(rows: Tensor, slot_row: Tensor, row_slot: Tensor, gate: Tensor,
                  kernel: str = "auto", validate: bool = True) -> Tensor:
    """``y[t] = sum_j gate[t, j] * rows[slot_row[t, j]]`` for padded slot rows (P, W) and
    gates (N, k), taken in the rows' dtype; gradients for ``rows`` (zero on padding) and
    ``gate``. ``validate`` as for :func:`dispatch_slots`."""
    _use_kernel(rows, kernel)
    _check_plan("combine_slots", rows, slot_row, row_slot, validate, gate)
    return _CombineSlots.apply(rows.contiguous(), *_indices(slot_row, row_slot),
                               gate.to(rows.dtype).contiguous(), kernel)
