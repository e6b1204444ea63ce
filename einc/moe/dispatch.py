"""Token routing and expert dispatch for BTT mixtures of experts.

A two-core BTT written as the einsum ``ga,gafr,fgre->fe`` has a rank index
``r``.  Reading each rank slice as an expert gives ``E`` rank-1 BTTs::

    y_r[f, e] = sum_{g, a} x[g, a] * A[g, a, f, r] * B[f, g, r, e]

A router picks ``k`` experts per token and mixes them with softmax weights::

    y = sum_{r in topk} w_r * y_r

Shapes used throughout this module:

* ``x``: ``(N, g, a)``, one row per token (the row-major ``(g, a)`` view of a
  length ``g * a`` input vector);
* ``A``: ``(g, a, f, E)``;  ``B``: ``(f, g, E, e)``;
* ``expert_idx``: ``(N, k)`` long, ``gate``: ``(N, k)``;
* result: ``(N, f, e)``.

Three ways to evaluate it are provided:

* :func:`btt_dense` -- a plain BTT over the full rank with good batched
  matmuls, optionally scaling the rank slices of the intermediate by a dense
  ``(N, E)`` matrix.  With a rank-``k`` BTT this is the cost floor of perfect
  dispatch.
* :func:`btt_moe_masked` -- the reference: every expert for every token, then
  a dense gate matrix that is zero off the top-k.  Costs ``E / k`` times the
  useful work.
* :func:`btt_moe_sparse` -- real sparse compute: the ``N * k`` (token, expert)
  slots are sorted by expert, token rows are gathered once, both cores run as
  grouped matmuls whose groups are (batch index, expert) pairs, and the gated
  results are scattered back to their tokens.
"""

from __future__ import annotations

import functools
import numbers
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import CompileError, EincError
from ..runtime.fused import autocasting, batched, check_flag, dual, exporting, fake, tracing

__all__ = [
    "route",
    "dense_gates",
    "check_experts",
    "btt_dense",
    "btt_moe_masked",
    "btt_moe_sparse",
    "grouped_mm_available",
    "measure_backends",
]


# --------------------------------------------------------------------------
# routing
# --------------------------------------------------------------------------


def route(logits: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Top-``k`` routing.

    Returns ``(expert_idx, gate)``, both ``(N, k)``: the selected experts in
    decreasing order of logit, and the softmax over the ``k`` selected logits.
    Ties are broken deterministically towards the lower expert index (a stable
    descending sort), so zero-initialised routers pick experts ``0..k-1``.
    Gradients flow from ``gate`` into ``logits``.
    """
    if logits.dim() != 2:
        raise CompileError(f"logits must be (N, E), got shape {tuple(logits.shape)}")
    E = logits.shape[1]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= E:
        raise CompileError(f"k must be an integer in [1, {E}], got {k!r}")
    k = int(k)
    values, order = torch.sort(logits, dim=1, descending=True, stable=True)
    expert_idx = order[:, :k]
    gate = torch.softmax(values[:, :k], dim=1)
    return expert_idx, gate


def dense_gates(expert_idx: Tensor, gate: Tensor, experts: int) -> Tensor:
    """The ``(N, E)`` gate matrix: ``gate`` at the selected experts, zero elsewhere; an
    expert named twice for a token gets the sum of its gates, as the sparse routes
    compute it (:func:`route` never names one twice)."""
    N = expert_idx.shape[0]
    return gate.new_zeros(N, experts).scatter_add(1, expert_idx, gate)


_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_experts(expert_idx: Tensor, experts: int) -> None:
    """``expert_idx`` must hold integers in ``[0, experts)``: an index out of range would
    read outside the cores (or, in grouped_mm, leave rows unwritten). The range is read
    where the values are concrete (one host sync on a GPU; not while a CUDA graph is
    captured); :class:`BTTMoE` routes with :func:`route` and skips this."""
    if not isinstance(expert_idx, Tensor) or expert_idx.dtype not in _INDEX_DTYPES:
        got = expert_idx.dtype if isinstance(expert_idx, Tensor) else type(expert_idx).__name__
        raise CompileError(f"expert_idx must be an integer tensor (e.g. torch.int64), got {got}")
    if expert_idx.dim() != 2:
        raise CompileError(f"expert_idx must be (N, k), got shape {tuple(expert_idx.shape)}")
    if (expert_idx.numel() == 0 or expert_idx.device.type == "meta" or tracing()
            or exporting() or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or (expert_idx.is_cuda and torch.cuda.is_current_stream_capturing())):
        return
    low, high = (int(v) for v in torch.aminmax(expert_idx))
    if low < 0 or high >= experts:
        raise CompileError(f"expert_idx must lie in [0, {experts - 1}] (experts = {experts}), "
                           f"got values from {low} to {high}")


# --------------------------------------------------------------------------
# dense / masked evaluation
# --------------------------------------------------------------------------


def _check_shapes(x: Tensor, A: Tensor, B: Tensor) -> Tuple[int, int, int, int, int]:
    if x.dim() != 3:
        raise CompileError(f"x must be (N, g, a), got shape {tuple(x.shape)}")
    if A.dim() != 4 or B.dim() != 4:
        raise CompileError("A must be (g, a, f, E) and B must be (f, g, E, e)")
    g, a, f, E = A.shape
    fb, gb, Eb, e = B.shape
    if x.shape[1:] != (g, a) or (fb, gb, Eb) != (f, g, E):
        raise CompileError(
            f"inconsistent shapes: x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
    return g, a, f, E, e


def _check_operands(x: Tensor, A: Tensor, B: Tensor, bias: Optional[Tensor], f: int,
                    e: int) -> None:
    """``bias`` an ``(f, e)`` tensor or None, and one dtype for x, A, B and bias (the
    backends would otherwise fail inside torch or give a dtype that depends on the
    backend); under autocast they run in its dtype, unless one is float64, which autocast
    leaves (:func:`_autocast_operands`)."""
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (f, e)):
        got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise CompileError(f"bias must be None or an (f, e) = ({f}, {e}) tensor, got {got}")
    named = [("x", x), ("A", A), ("B", B)] + ([("bias", bias)] if bias is not None else [])
    dtypes = {t.dtype for _, t in named}
    if len(dtypes) == 1 or (autocasting(x.device) and torch.float64 not in dtypes):
        return
    got = ", ".join(f"{name} {t.dtype}" for name, t in named)
    raise CompileError(f"x, A, B and bias must share one dtype (outside autocast, or with "
                       f"a float64 operand under it), got {got}")


_MOE_INSTEAD = "backend='chunked' (CPU) and backend='padded' (any device) have them"


def _first_order_only(what: str, grad: Tensor, instead: str = _MOE_INSTEAD) -> None:
    """Raise in a backward asked for a graph (create_graph=True): these backwards read
    intermediates that forward kept without one, so second derivatives would silently
    miss terms; and for a batch of gradients (:func:`~einc.runtime.fused.batched`), which
    their out= products cannot take."""
    if torch.is_grad_enabled():
        raise EincError(f"{what} has no second derivatives (backward with "
                        f"create_graph=True); {instead}")
    if batched(grad):
        raise EincError(f"{what} takes no batch of gradients (autograd.grad with "
                        f"is_grads_batched=True, jacobian or hessian with vectorize=True); "
                        f"{instead}")


class _StridedBTT(torch.autograd.Function):
    """Plain two-core BTT with strided matmuls and no transpose copies.

    The intermediate is stored ``(f, g, R, N)``: core A writes each
    ``(g, r)`` slice as an ``(f, N)`` row-major block, and core B reads, for
    each ``f``, a ``(g * R, N)`` block as the transposed ``(N, g * R)``
    operand and writes its ``(N, e)`` result straight into the token-major
    output.  One ``mm`` per ``(g, r)`` and per ``f``.
    """

    @staticmethod
    def forward(ctx, x, A, B):
        N, g, a = x.shape
        _, _, f, R = A.shape
        e = B.shape[3]
        AgT = A.permute(0, 3, 2, 1).contiguous()  # (g, R, f, a)
        Bf = B.reshape(f, g * R, e)
        z = x.new_empty(f, g, R, N)
        for i in range(g):
            xT = x[:, i, :].t()  # (a, N)
            for r in range(R):
                torch.mm(AgT[i, r], xT, out=z[:, i, r, :])
        y = x.new_empty(N, f, e)
        for j in range(f):
            torch.mm(z[j].view(g * R, N).t(), Bf[j], out=y[:, j, :])
        ctx.save_for_backward(x, AgT, Bf, z)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        _first_order_only("btt_dense(method='strided')", grad_out, "method='bmm' has them")
        x, AgT, Bf, z = ctx.saved_tensors
        f, g, R, N = z.shape
        a = x.shape[2]
        e = Bf.shape[2]
        gy = grad_out.contiguous()
        grad_z = gy.new_empty(f, g, R, N)
        gB = gy.new_empty(f, g * R, e)
        for j in range(f):
            torch.mm(Bf[j], gy[:, j, :].t(), out=grad_z[j].view(g * R, N))
            torch.mm(z[j].view(g * R, N), gy[:, j, :], out=gB[j])
        grad_x = gy.new_empty(N, g, a)
        gA = gy.new_empty(g, R, a, f)
        for i in range(g):
            xT = x[:, i, :].t()
            gx = grad_x[:, i, :]
            for r in range(R):
                gzT = grad_z[:, i, r, :].t()  # (N, f)
                if r == 0:
                    torch.mm(gzT, AgT[i, r], out=gx)
                else:
                    gx.addmm_(gzT, AgT[i, r])
                torch.mm(xT, gzT, out=gA[i, r])
        return grad_x, gA.permute(0, 2, 3, 1), gB.view(f, g, R, e)


def btt_dense(
    x: Tensor, A: Tensor, B: Tensor, scale: Optional[Tensor] = None, method: str = "bmm"
) -> Tensor:
    """Plain two-core BTT ``ga,gafr,fgre->fe`` for a batch ``x`` of shape ``(N, g, a)``.

    ``scale`` (optional, ``(N, E)``) multiplies the rank slices of the
    intermediate ``Z[n, g, f, r]`` before the second core.

    ``method="bmm"``: two batched matmuls (batch ``g`` contracting ``a``,
    then batch ``f`` contracting ``(g, r)``) with a transpose of the
    intermediate in between.  ``method="strided"`` (no ``scale``): strided
    ``mm`` calls that never materialise a transpose (see ``_StridedBTT``).
    """
    g, a, f, E, e = _check_shapes(x, A, B)
    N = x.shape[0]
    if method == "strided":
        if scale is not None:
            raise CompileError("method='strided' does not take a scale")
        return _StridedBTT.apply(x, A, B)
    if method != "bmm":
        raise CompileError(f"unknown method {method!r}")
    # step 1: (g, N, a) @ (g, a, f*E) -> (g, N, f*E)
    z = torch.bmm(x.transpose(0, 1), A.reshape(g, a, f * E))
    z = z.view(g, N, f, E)
    if scale is not None:
        z = z * scale.view(1, N, 1, E)
    # step 2: (f, N, g*E) @ (f, g*E, e) -> (f, N, e)
    zt = z.permute(2, 1, 0, 3).reshape(f, N, g * E)
    y = torch.bmm(zt, B.reshape(f, g * E, e))
    return y.transpose(0, 1)


def btt_moe_masked(x: Tensor, A: Tensor, B: Tensor, expert_idx: Tensor, gate: Tensor,
                   validate: bool = True) -> Tensor:
    """Reference BTT-MoE: compute every expert for every token, then mask. ``x`` is
    (N, g, a) or the same rows flattened, (N, g * a), as for :func:`btt_moe_sparse`.

    The rank slices of the intermediate are weighted by the dense ``(N, E)``
    gate matrix (zero off the top-k).  Returns ``(N, f, e)``.
    """
    return _masked(x, A, B, expert_idx, gate, routed=not validate)


def _unflatten(x: Tensor, A: Tensor) -> Tensor:
    """(N, g * a) rows as (N, g, a) when A is a (g, a, f, E) core; anything else as it is,
    for :func:`_check_shapes` to judge."""
    if x.dim() == 2 and A.dim() == 4 and x.shape[1] == A.shape[0] * A.shape[1]:
        return x.reshape(x.shape[0], A.shape[0], A.shape[1])
    return x


def _masked(x: Tensor, A: Tensor, B: Tensor, expert_idx: Tensor, gate: Tensor,
            routed: bool) -> Tensor:
    """:func:`btt_moe_masked`; ``routed``: expert_idx came from :func:`route`."""
    x = _unflatten(x, A)
    _check_shapes(x, A, B)
    E = A.shape[3]
    if not routed:
        check_experts(expert_idx, E)
    expert_idx = expert_idx.long()  # every accepted integer dtype, as the backends index
    if (not isinstance(gate, Tensor) or gate.shape != expert_idx.shape
            or gate.shape[0] != x.shape[0]):
        raise CompileError("expert_idx and gate must both be (N, k) with N = x.shape[0]")
    return btt_dense(x, A, B, scale=dense_gates(expert_idx, gate.to(x.dtype), E))


# --------------------------------------------------------------------------
# grouped matmul kernels
# --------------------------------------------------------------------------
#
# ``gmm(a, b, offs)`` computes, for a 2-D ``a`` of shape (M, K) whose rows are
# cut into G consecutive groups ending at ``offs`` (int32, offs[-1] == M) and
# ``b`` of shape (G, K, N), the (M, N) result whose rows of group i are
# ``a[rows_i] @ b[i]``.


_GMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: groups per grouped_mm call (CUDA's grouped_mm refuses 1024 and more)
GMM_MAX_GROUPS = 512


@torch.compiler.disable  # a probe with real tensors, also when called while tracing
@functools.lru_cache(maxsize=None)
def _grouped_mm_works(device_type: str, device_index: Optional[int], dtype: torch.dtype) -> bool:
    """Probe once whether ``grouped_mm`` runs (forward and both backward forms) here."""
    fn = getattr(F, "grouped_mm", None)
    if fn is None or dtype not in _GMM_DTYPES:
        return False
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    try:
        K = N = 16
        a = torch.randn(24, K, device=device).to(dtype)
        b = torch.randn(3, K, N, device=device).to(dtype)
        offs = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)
        out = fn(a, b, offs=offs)
        ga = fn(out, b.transpose(1, 2), offs=offs)
        gb = fn(a.t(), out, offs=offs)
        ref = torch.cat([a[:8].float() @ b[0].float(), a[8:].float() @ b[2].float()])
        tol = 1e-3 if dtype == torch.float32 else 1e-1
        ok = (
            out.shape == (24, N)
            and ga.shape == (24, K)
            and gb.shape == (3, K, N)
            and torch.allclose(out.float(), ref, rtol=tol, atol=tol * 16)
            and bool((gb[1] == 0).all())
        )
        return bool(ok)
    except Exception:  # unsupported device / dtype / build
        return False


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` supports this device and dtype."""
    device = torch.device(device)
    return _grouped_mm_works(device.type, device.index, dtype)


def _gmm_usable(x: Tensor, g: int, a: int, f: int, e: int, E: int) -> bool:
    """grouped_mm runs here: device and dtype supported, 16-byte aligned strides, and one
    call's groups (one core index times the experts) within its limit."""
    return E <= GMM_MAX_GROUPS and _aligned(x.dtype, g, a, f, e) and \
        grouped_mm_available(x.device, x.dtype)


def _aligned(dtype: torch.dtype, *sizes: int) -> bool:
    # grouped_mm needs every non-unit stride to be a multiple of 16 bytes
    elem = torch.empty((), dtype=dtype).element_size()
    return all((s * elem) % 16 == 0 for s in sizes)


class _GroupedMM(torch.autograd.Function):
    """Differentiable ``grouped_mm(a, b, offs)`` whose backward is grouped as well."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
        ctx.save_for_backward(a, b, offs)
        return F.grouped_mm(a, b, offs=offs)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        _first_order_only("the grouped_mm BTT-MoE backend", grad_out)
        a, b, offs = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            # (M, N) x (G, N, K) -> (M, K)
            grad_a = F.grouped_mm(grad_out, b.transpose(1, 2), offs=offs)
        if ctx.needs_input_grad[1]:
            # (K, M) x (M, N) with jagged M -> (G, K, N); empty groups give zeros
            grad_b = F.grouped_mm(a.t(), grad_out, offs=offs)
        return grad_a, grad_b, None


def _gmm_grouped(a: Tensor, b: Tensor, offs: Tensor, counts: Tensor) -> Tensor:
    return _GroupedMM.apply(a, b, offs)


# --------------------------------------------------------------------------
# token dispatch (gather) and combine (scatter)
# --------------------------------------------------------------------------


class _Dispatch(torch.autograd.Function):
    """Gather token rows into expert-sorted slots along ``dim``.

    Forward: ``x.index_select(dim, token_sorted)``.  Each token occupies
    exactly ``k`` slots, so the backward sums, in a fixed order, the ``k``
    slot gradients of each token found through the inverse permutation
    (no atomics, bitwise reproducible).
    """

    @staticmethod
    def forward(ctx, x: Tensor, token_sorted: Tensor, inverse: Tensor, k: int, dim: int) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.k, ctx.dim, ctx.n = k, dim, x.shape[dim]
        return x.index_select(dim, token_sorted)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        g = grad.index_select(ctx.dim, inverse)
        g = g.unflatten(ctx.dim, (ctx.n, ctx.k)).sum(ctx.dim + 1)
        return g, None, None, None, None


class _Unsort(torch.autograd.Function):
    """Apply the permutation ``inverse`` along ``dim``; backward applies ``order``.

    Both directions are gathers, so no scatter (and no atomics) is involved.
    """

    @staticmethod
    def forward(ctx, y: Tensor, inverse: Tensor, order: Tensor, dim: int) -> Tensor:
        ctx.save_for_backward(order)
        ctx.dim = dim
        return y.index_select(dim, inverse)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (order,) = ctx.saved_tensors
        return grad.index_select(ctx.dim, order), None, None, None


# --------------------------------------------------------------------------
# sparse BTT-MoE
# --------------------------------------------------------------------------


def _sort_slots(expert_idx: Tensor, E: int):
    """Sort the ``N * k`` slots by expert (stable, so ties keep token order)."""
    N, k = expert_idx.shape
    flat = expert_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)  # slot ids, grouped by expert
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    token_sorted = torch.div(order, k, rounding_mode="floor")
    # Per-expert slot counts from the sorted experts, with a static shape (E,). bincount's
    # output size depends on the data: a host sync on CUDA and a graph break under
    # torch.compile.
    bounds = torch.arange(1, E + 1, device=flat.device, dtype=flat.dtype)
    ends = torch.searchsorted(flat.index_select(0, order), bounds)  # slots with expert < r + 1
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    return order, inverse, token_sorted, counts


def _sparse_grouped(x, A, B, expert_idx, gate, deterministic):
    """Grouped-matmul formulation (``torch.nn.functional.grouped_mm``, no host sync).

    Rows are laid out ``(g, S)`` for core A (groups ``(g, expert)``) and
    ``(f, S)`` for core B (groups ``(f, expert)``), with one transpose of the
    intermediate in between.
    """
    g, a, f, E, e = _check_shapes(x, A, B)
    N, k = expert_idx.shape
    S = N * k
    order, inverse, token_sorted, counts = _sort_slots(expert_idx, E)
    ends = torch.cumsum(counts, 0)

    def batched(rows: Tensor, mats: Tensor, batch: int) -> Tensor:
        """(batch * S, K) rows against (batch * E, K, N) matrices, groups (batch, expert);
        split into calls of at most GMM_MAX_GROUPS groups (grouped_mm's limit)."""
        per_call = max(1, GMM_MAX_GROUPS // E)
        base = torch.arange(min(batch, per_call), device=x.device, dtype=ends.dtype) * S
        offs = (base[:, None] + ends[None, :]).reshape(-1).to(torch.int32)
        parts = []
        for b0 in range(0, batch, per_call):
            nb = min(per_call, batch - b0)
            parts.append(_GroupedMM.apply(rows[b0 * S:(b0 + nb) * S], mats[b0 * E:(b0 + nb) * E],
                                          offs[:nb * E]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    # core A: gather tokens straight into (g, S, a); groups (g, r)
    xs = _Dispatch.apply(x.transpose(0, 1), token_sorted, inverse, k, 1)
    A_g = A.permute(0, 3, 1, 2).reshape(g * E, a, f)
    z = batched(xs.reshape(g * S, a), A_g, g)  # (g*S, f)
    # core B: (f, S, g); groups (f, r)
    zt = z.view(g, S, f).permute(2, 1, 0).reshape(f * S, g)
    B_f = B.permute(0, 2, 1, 3).reshape(f * E, g, e)
    y = batched(zt, B_f, f).view(f, S, e)
    # gate and combine the k slots of every token
    if deterministic:
        y = _Unsort.apply(y, inverse, order, 1).view(f, N, k, e)
        return (y * gate.view(1, N, k, 1)).sum(2).transpose(0, 1)
    gate_sorted = gate.reshape(-1).index_select(0, order)
    y = y * gate_sorted.view(1, S, 1)
    return y.new_zeros(f, N, e).index_add(1, token_sorted, y).transpose(0, 1)


BACKENDS = ("auto", "chunked", "grouped_mm", "strided", "padded", "triton")


def check_backend(backend) -> None:
    """A sparse backend's name: one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise CompileError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")


#: the padded capacity is rounded up to a multiple of this (aligned matmul blocks)
CAPACITY_MULTIPLE = 8


def _padded_plan(expert_idx: Tensor, E: int):
    """Slot placement for the padded layout: expert ``r`` owns rows ``[r*C, (r+1)*C)``.

    Returns ``(C, slot_row, row_slot)``: the capacity ``C`` (largest expert
    load; one host sync), the padded row of every slot in ``(token, choice)``
    order, and the slot of every padded row (-1 for padding rows).
    """
    from ..kernels.slot_rows import place_slots

    N, k = expert_idx.shape
    S = N * k
    flat = expert_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    C = int(counts.max()) if S else 0  # host sync
    C = -(-C // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE  # aligned row blocks
    slot_row, row_slot = place_slots(flat, order, counts, C)
    return C, slot_row, row_slot


def _row_tokens(row_slot: Tensor, k: int) -> Tensor:
    """The token of every padded row; padding rows point at token 0 (their values never
    reach the output and their gradients are zero)."""
    return torch.div(row_slot.clamp(min=0), k, rounding_mode="floor")


#: storage order of the (f, g, P) intermediate of the strided kernels: "fgP" or "gfP"
Z_LAYOUT = "gfP"


def _new_z(t: Tensor, f: int, g: int, P: int) -> Tensor:
    if Z_LAYOUT == "fgP":
        return t.new_empty(f, g, P)
    return t.new_empty(g, f, P).transpose(0, 1)


def _z_of_f(z: Tensor, j: int) -> Tensor:  # (g, P) slice
    return z[j]


def _z_of_g(z: Tensor, i: int) -> Tensor:  # (f, P) slice
    return z[:, i]


class _StridedMoE(torch.autograd.Function):
    """Padded-layout BTT-MoE with strided batched matmuls (one ``bmm`` per core slice).

    Layouts (``P = E * C`` padded rows, expert-major):

    * ``xs`` ``(P, g, a)``: gathered token rows;
    * ``z``  ``(f, g, P)``: intermediate, written by core A as ``(E, f, C)``
      row-major slices and read by core B as ``(E, C, g)`` column-major slices,
      so no transpose copy is ever made;
    * ``u``  ``(P, f, e)``: expert outputs, token-major.

    Core A runs as ``g`` batched matmuls over experts, core B as ``f``; the
    backward uses the same slices.  The ``k`` slots of each token are combined
    by a gather and a fixed-order gated sum over the ``k`` choices.
    """

    @staticmethod
    def forward(ctx, x, A, B, gate, C, slot_row, row_token, deterministic):
        N, g, a = x.shape
        _, _, f, E = A.shape
        e = B.shape[3]
        k = gate.shape[1]
        P = E * C
        Ag = A.permute(0, 3, 1, 2).contiguous()  # (g, E, a, f); free if stored so
        Bf = B.permute(0, 2, 1, 3).contiguous()  # (f, E, g, e)
        xs = x.reshape(N, g * a).index_select(0, row_token).view(P, g, a)
        z = _new_z(x, f, g, P)
        for i in range(g):
            # z^T slice (E, f, C) = A_i^T (E, f, a) @ xs_i^T (E, a, C)
            torch.bmm(
                Ag[i].transpose(1, 2),
                xs[:, i, :].view(E, C, a).transpose(1, 2),
                out=_z_of_g(z, i).view(f, E, C).transpose(0, 1),
            )
        u = x.new_empty(P, f, e)
        for j in range(f):
            # (E, C, g) @ (E, g, e) -> (E, C, e)
            torch.bmm(_z_of_f(z, j).view(g, E, C).permute(1, 2, 0), Bf[j], out=u[:, j, :].view(E, C, e))
        v = u.view(P, f * e).index_select(0, slot_row).view(N, k, f * e)
        # fixed-order sum over the k choices (a tiny-matrix bmm is far slower on CPU)
        out = v[:, 0] * gate[:, :1]
        for j in range(1, k):
            out.addcmul_(v[:, j], gate[:, j : j + 1])
        out = out.view(N, f, e)
        ctx.save_for_backward(xs, z, v, gate, Ag, Bf, slot_row, row_token)
        ctx.dims = (N, g, a, f, E, e, k, C)
        ctx.deterministic = deterministic
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _first_order_only("the strided BTT-MoE backend", grad_out)
        xs, z, v, gate, Ag, Bf, slot_row, row_token = ctx.saved_tensors
        N, g, a, f, E, e, k, C = ctx.dims
        P = E * C
        need_x, need_A, need_B, need_gate = ctx.needs_input_grad[:4]
        go = grad_out.reshape(N, f * e).contiguous()
        grad_x = grad_A = grad_B = grad_gate = None
        if need_gate:
            grad_gate = torch.bmm(v, go.unsqueeze(2)).view(N, k)
        # gradient of every padded row of u: gate * grad_out[token]; zero on padding
        gate_row = gate.new_zeros(P)
        gate_row[slot_row] = gate.reshape(-1)
        gu = go.index_select(0, row_token).mul_(gate_row.unsqueeze(1)).view(P, f, e)
        grad_z = _new_z(gu, f, g, P) if (need_x or need_A) else None
        gB = gu.new_empty(f, E, g, e) if need_B else None
        for j in range(f):
            gu_j = gu[:, j, :].view(E, C, e)
            zj = _z_of_f(z, j).view(g, E, C).transpose(0, 1)  # (E, g, C)
            if grad_z is not None:
                # (E, g, e) @ (E, e, C) -> (E, g, C)
                torch.bmm(Bf[j], gu_j.transpose(1, 2), out=_z_of_f(grad_z, j).view(g, E, C).transpose(0, 1))
            if gB is not None:
                torch.bmm(zj, gu_j, out=gB[j])  # (E, g, C) @ (E, C, e)
        if grad_z is not None:
            grad_xs = gu.new_empty(P, g, a) if need_x else None
            gA = gu.new_empty(g, E, a, f) if need_A else None
            for i in range(g):
                gz_i = _z_of_g(grad_z, i).view(f, E, C).permute(1, 2, 0)  # (E, C, f)
                if grad_xs is not None:
                    torch.bmm(gz_i, Ag[i].transpose(1, 2), out=grad_xs[:, i, :].view(E, C, a))
                if gA is not None:
                    torch.bmm(xs[:, i, :].view(E, C, a).transpose(1, 2), gz_i, out=gA[i])
            if need_x:
                flat = grad_xs.view(P, g * a)
                if ctx.deterministic:
                    grad_x = flat.index_select(0, slot_row).view(N, k, g * a).sum(1)
                else:
                    grad_x = flat.new_zeros(N, g * a).index_add_(0, row_token, flat)
                grad_x = grad_x.view(N, g, a)
            if need_A:
                grad_A = gA.permute(0, 2, 3, 1)
        if need_B:
            grad_B = gB.permute(0, 2, 1, 3)
        return grad_x, grad_A, grad_B, grad_gate, None, None, None, None


def _sparse_strided(x, A, B, expert_idx, gate, deterministic, plan=None):
    E = A.shape[3]
    C, slot_row, row_slot = plan if plan is not None else _padded_plan(expert_idx, E)
    row_token = _row_tokens(row_slot, expert_idx.shape[1])
    return _StridedMoE.apply(x, A, B, gate, C, slot_row, row_token, deterministic)


def _sparse_padded(x, A, B, expert_idx, gate):
    """Expert-major padded dispatch with one plain bmm per core (autograd does backward).

    Slots are sorted by expert and laid out as (expert, capacity) rows, capacity = the
    largest expert load (one host sync). The token rows are gathered straight into the
    (g, expert, capacity, a) layout core A reads with ``A`` viewed as (g*E, a, f); core B
    reads the intermediate as (f*E, capacity, g) against ``B`` viewed as (f*E, g, e); each
    token then gathers its k gated rows back (a gather and a fixed-order sum:
    deterministic). Padding rows read a zero row and are never gathered back.
    """
    g, a, f, E, e = _check_shapes(x, A, B)
    N, k = expert_idx.shape
    S = N * k
    flat = expert_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.long, device=x.device).index_add_(
        0, flat, torch.ones_like(flat))
    C = max(1, int(counts.max()))  # one host sync: the capacity
    starts = torch.cumsum(counts, 0) - counts
    sorted_e = flat[order]
    row = sorted_e * C + (torch.arange(S, device=x.device) - starts[sorted_e])
    token_of_row = torch.full((E * C,), N, dtype=torch.long, device=x.device)
    token_of_row[row] = torch.div(order, k, rounding_mode="floor")
    slot_row = torch.empty_like(row)
    slot_row[order] = row  # padded row of each (token, j) slot
    xz = torch.cat([x, x.new_zeros(1, g, a)]).transpose(0, 1)  # (g, N+1, a)
    xp = xz.index_select(1, token_of_row)  # (g, E*C, a): gathered in core A's layout
    Ag = A.permute(0, 3, 1, 2).reshape(g * E, a, f)
    z = torch.bmm(xp.reshape(g * E, C, a), Ag)  # (g*E, C, f) = [g][E][C][f]
    zf = z.view(g, E, C, f).permute(3, 1, 2, 0).reshape(f * E, C, g)  # one relayout
    Bf = B.permute(0, 2, 1, 3).reshape(f * E, g, e)
    out = torch.bmm(zf, Bf).view(f, E * C, e)  # [f][E*C][e]
    picked = out.index_select(1, slot_row).view(f, N, k, e)  # each token's k rows
    y = (picked * gate.view(1, N, k, 1)).sum(2)  # (f, N, e)
    return y.permute(1, 0, 2).contiguous()


def _sparse_triton(x, A, B, expert_idx, gate, kernel="auto"):
    """Padded expert-major dispatch on the strided kernel (:mod:`einc.kernels`).

    Rows ``(E, C)`` (capacity ``C`` = the largest expert load, one host sync). Core A runs
    as one strided product with batch ``(g, expert)`` and writes the intermediate as
    ``[g][E][f][C]``, rows innermost, which core B (batch ``(f, expert)``) reads in place:
    both products move whole rows of slots, and no copy sits between the cores. Each token
    then gathers its ``k`` rows and sums them with its gates. The row moves in and out of
    the padded layout are one kernel each way (:mod:`einc.kernels.slot_rows`). Without
    triton (or off CUDA) the strided products and the moves run as torch operations over
    the same views (``kernel="torch"`` forces that).
    """
    from ..kernels import StridedBmmSpec, strided_bmm
    from ..kernels.slot_rows import combine_slots, dispatch_slots

    g, a, f, E, e = _check_shapes(x, A, B)
    N, k = expert_idx.shape
    C, slot_row, row_slot = _padded_plan(expert_idx, E)
    Cs = max(C, 1)  # strides stay valid for an empty batch
    slot_row = slot_row.view(N, k)
    # gathered rows, zero on padding; backward sums each token's k rows in a fixed order
    # (padding rows, which no slot names, get no gradient: their outputs are dropped)
    xs = dispatch_slots(x.reshape(N, g * a), slot_row, row_slot, kernel,  # (E*C, g*a)
                        validate=False)  # the plan is _padded_plan's
    xv = xs.view(E, C, g, a).permute(2, 0, 1, 3)  # batch (g, E), m C, k a
    Av = A.permute(0, 3, 1, 2)  # (g, E, a, f)
    spec = StridedBmmSpec.from_views(xv, Av, batch_ndim=2, k_ndim=1,
                                     c_strides=(E * f * Cs, f * Cs, 1, Cs))  # stored [g][E][f][C]
    z = strided_bmm(xv, Av, spec, backend=kernel)
    zv = z.permute(3, 1, 2, 0)  # (f, E, C, g): batch (f, E), m C, k g
    Bv = B.permute(0, 2, 1, 3)  # (f, E, g, e)
    spec = StridedBmmSpec.from_views(zv, Bv, batch_ndim=2, k_ndim=1,
                                     c_strides=(e, Cs * f * e, f * e, 1))  # stored [E][C][f][e]
    u = strided_bmm(zv, Bv, spec, backend=kernel)
    rows = u.permute(1, 2, 0, 3).reshape(E * C, f * e)  # a view: u is stored [E][C][f][e]
    return combine_slots(rows, slot_row, row_slot, gate, kernel, validate=False).view(N, f, e)


#: tokens the measurement of the GPU backends runs at most (the call's power-of-two bucket)
MEASURE_TOKENS = 8192
_AUTO: dict = {}  # (sizes, dtype, device, token bucket, training) -> measured backend


#: the masked computation joins the measured candidates while it does at most this many
#: times the useful work (``E / k``): where a fast device waits on the host, its three
#: launches can beat a dispatch's thirty (an H200 at d = 1024, E = 8, k = 2: 1.53 against
#: 2.39 ms per step), and its memory stays within this factor of a dispatch's
MASKED_MAX_WORK = 4


def _gpu_candidates(x: Tensor, g: int, a: int, f: int, e: int, E: int, k: int) -> list:
    """Backends worth timing for ``x`` off the CPU, in order of preference: the sparse
    ones, then (while ``E <= MASKED_MAX_WORK * k``) ``"masked"``, every expert on every
    token."""
    from ..kernels import triton_available

    names = []
    if x.is_cuda and triton_available():
        names.append("triton")
    if _gmm_usable(x, g, a, f, e, E):
        names.append("grouped_mm")
    names.append("padded")
    return names + (["masked"] if E <= MASKED_MAX_WORK * k else [])


def _auto_backend(x: Tensor, A: Tensor, B: Tensor, k: int, deterministic: bool = False) -> str:
    """The fastest backend for this layer shape off the CPU, measured once per
    (sizes, dtype, device, token bucket, training) and cached. Which one wins depends on
    the width and on how fast the host launches work (on an H200: the strided-kernel
    backend from d = 4096 up by 2-3x, the others at d = 1024, where the host is the limit
    and the masked computation, a candidate for few experts, can be the fastest).
    With ``deterministic`` nothing is timed: the first candidate runs, so the same inputs
    give the same bits in every process."""
    g, a, f, E, e = _check_shapes(x, A, B)
    N = x.shape[0]
    bucket = 1 << max(0, (N - 1).bit_length())
    train = torch.is_grad_enabled() and any(t.requires_grad for t in (x, A, B))
    # the cores' layout too: what a backend copies depends on it (BTTMoE stores them
    # expert-major, which the sparse backends read in place and masked copies)
    key = (g, a, f, e, E, k, x.dtype, x.device, bucket, train, deterministic,
           A.stride(), B.stride())
    if key not in _AUTO:
        names = _gpu_candidates(x, g, a, f, e, E, k)
        _AUTO[key] = names[0] if len(names) == 1 or deterministic else \
            measure_backends(names, (g, a, f, e, E, k), x.dtype, x.device,
                             min(bucket, MEASURE_TOKENS), train, like=(A, B))
    return _AUTO[key]


def measure_backends(names, sizes, dtype, device, tokens: int, train: bool, reps: int = 3,
                     like: Optional[Tuple[Tensor, Tensor]] = None) -> str:
    """Time each backend named (sparse ones, and ``"masked"``: every expert on every token)
    on random inputs of these sizes (forward and backward when ``train``; best of ``reps``
    after one warm-up, taken round-robin) and return the fastest. ``like``: the cores
    ``(A, B)`` whose memory layout the random ones take (default: contiguous). The
    caller's tensors, gradients and random stream are untouched."""
    import time

    g, a, f, e, E, k = sizes
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda *_: None)
    # identity saved-tensor hooks: under activation checkpointing the caller's hooks would
    # otherwise see the measurement's tensors as part of the checkpointed forward
    with torch.random.fork_rng(devices=[device] if cuda else []), torch.autocast(device.type, enabled=False), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), torch.set_grad_enabled(train):
        x = torch.randn(tokens, g, a, device=device, dtype=dtype, requires_grad=train)
        if like is None:
            A = torch.empty(g, a, f, E, device=device, dtype=dtype)
            B = torch.empty(f, g, E, e, device=device, dtype=dtype)
        else:  # empty_like keeps a dense layout's strides
            A, B = (torch.empty_like(t, dtype=dtype, device=device) for t in like)
        A = A.normal_(0, a ** -0.5).requires_grad_(train)
        B = B.normal_(0, g ** -0.5).requires_grad_(train)
        logits = torch.randn(tokens, E, device=device, dtype=torch.float32, requires_grad=train)
        dy = torch.randn(tokens, f, e, device=device, dtype=dtype) if train else None

        def run(name):
            idx, gate = route(logits, k)
            y = _masked(x, A, B, idx, gate, routed=True) if name == "masked" else \
                btt_moe_sparse(x, A, B, idx, gate, backend=name)
            if train:
                torch.autograd.backward(y, dy, inputs=[x, A, B, logits])

        best, failures = {}, []
        for name in list(names):
            try:
                run(name)  # compiles kernels, fills caches
            except Exception as exc:  # a backend this device or build cannot run: skip it
                failures.append(exc)
                names = [n for n in names if n != name]
        if not names:
            raise failures[0]
        for _ in range(reps):
            for name in names:
                sync(device)
                start = time.perf_counter()
                run(name)
                sync(device)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return min(names, key=best.get)


@torch.compiler.disable
def _sparse_eager(x, A, B, expert_idx, gate, deterministic, bias, backend="auto"):
    """A backend outside the compiled graph: the chunked and triton ones write into
    preallocated buffers and grouped_mm has no usable fake kernel on every device, which
    torch.compile cannot trace; all run eagerly alike. It goes straight to :func:`_run`,
    since where disable() does not apply (non-strict torch.export) the tracing checks would
    send it back here."""
    return _run(x, A, B, expert_idx, gate, deterministic, backend, bias)


def btt_moe_sparse(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    expert_idx: Tensor,
    gate: Tensor,
    deterministic: bool = False,
    backend: str = "auto",
    bias: Optional[Tensor] = None,
    validate: bool = True,
) -> Tensor:
    """BTT-MoE where each token only runs its ``k`` selected experts; ``x`` is (N, g, a) or
    the same rows flattened, (N, g * a).

    The ``S = N * k`` (token, expert) slots are sorted by expert (stable
    sort), token rows are gathered once, each core runs as batched/grouped
    matmuls whose groups are (core batch index, expert) pairs -- core A as
    ``(g, expert)`` with ``A`` viewed as ``(g, E, a, f)``, core B as
    ``(f, expert)`` with ``B`` viewed as ``(f, E, g, e)`` -- and the gated slot
    results are added back to their tokens.  No Python loop over experts.

    Backends:

    * ``"chunked"`` (CPU): the sorted slots in cache-sized chunks, each within
      one expert's run and computed as one rank-1 BTT on its gathered rows
      (:mod:`einc.moe.chunked`); one host sync for the per-expert counts;
      deterministic (chunks run in a fixed order, CPU ``index_add_`` adds
      serially).
    * ``"strided"``: padded expert-major layout (capacity = largest expert
      load, one host sync) and ``bmm`` calls on strided slices, arranged so
      that no transpose of the intermediate is ever materialised; works for
      every dtype.  Costs ``E * C / (N * k)`` times the useful work when the
      load is unbalanced.
    * ``"grouped_mm"``: ``torch.nn.functional.grouped_mm`` with jagged
      offsets (no padding, no host sync); needs a device/dtype it supports and
      sizes giving 16-byte aligned strides.
    * ``"padded"``: (expert, capacity) rows, one plain ``bmm`` per core and autograd for
      the backward; simple, every dtype, one host sync; deterministic.
    * ``"triton"``: (expert, capacity) rows and one strided product per core on
      :func:`einc.kernels.strided_bmm` (the Triton kernel on CUDA, torch matmuls
      elsewhere), the intermediate written in the layout the second core reads; one host
      sync; token gradients summed in a fixed order.
    * ``"auto"``: chunked on the CPU; elsewhere the fastest of triton, grouped_mm (where
      it supports the device, dtype and sizes), padded and, while ``E <= 4 * k``, the
      masked computation (every expert on every token: on a fast GPU whose step waits on
      the host, its few launches can win), measured once per layer shape, dtype, device
      and token bucket (:func:`measure_backends`).

    ``deterministic=True`` (implied by ``torch.use_deterministic_algorithms(True)``)
    makes every reduction of the grouped_mm and strided backends a gather followed by a
    fixed-order sum (no ``index_add_``) and ``"auto"`` take its first candidate untimed,
    so results are bitwise reproducible on every device.  Gradients flow to ``x``,
    ``A``, ``B``, ``gate`` and ``bias`` (an optional ``(f, e)`` tensor added to
    every token's result; the chunked backend starts from it instead of zeros).
    ``x``, ``A``, ``B`` and ``bias`` share one dtype (under autocast they all run in its
    dtype unless one is float64); ``gate`` is converted to it. ``expert_idx`` is checked:
    integers in ``[0, E)`` (:func:`check_experts`, a host sync on a GPU);
    ``validate=False`` skips reading the range, for indices from :func:`route` (as
    :class:`BTTMoE` does). Returns ``(N, f, e)``.
    """
    return _sparse(x, A, B, expert_idx, gate, deterministic, backend, bias,
                   routed=not validate)


def _sparse(x, A, B, expert_idx, gate, deterministic, backend, bias, routed: bool):
    """:func:`btt_moe_sparse`; ``routed``: expert_idx came from :func:`route`."""
    rows = x  # (N, g * a) rows go to the chunked backend as they are (see ChunkedMoE)
    x = _unflatten(x, A)
    g, a, f, E, e = _check_shapes(x, A, B)
    if not routed:
        check_experts(expert_idx, E)
    expert_idx = expert_idx.long()  # every accepted integer dtype, as the backends index
    N, k = expert_idx.shape
    if not isinstance(gate, Tensor) or gate.shape != (N, k) or x.shape[0] != N:
        raise CompileError("expert_idx and gate must both be (N, k) with N = x.shape[0]")
    check_backend(backend)
    _check_operands(x, A, B, bias, f, e)
    deterministic = check_flag("deterministic", deterministic)
    # torch.use_deterministic_algorithms(True) asks the same of every operation
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    if N == 0:
        if autocasting(x.device):  # the dtype a non-empty batch gets
            x, A, B, bias = _autocast_operands(x, A, B, bias)
        # every operand in the graph: each gets its (empty or zero) gradient, as masked's
        y = x.new_zeros(0, f, e) + 0 * (x.sum() + A.sum() + B.sum() + gate.sum()).to(x.dtype)
        return y if bias is None else y + bias
    if torch.jit.is_tracing() or exporting() or x.device.type == "meta":
        # every expert, then the gates: a trace would freeze a dispatch's routing-dependent
        # sizes (wrong for other inputs), an export cannot hold them (data-dependent
        # shapes), and meta tensors have no loads to size one by
        y = _masked(x, A, B, expert_idx, gate, routed=True)
        return y if bias is None else y + bias
    if torch.compiler.is_compiling():  # run eagerly, between two graphs
        return _sparse_eager(rows, A, B, expert_idx, gate, deterministic, bias, backend)
    if tracing() or dual(x, A, B, gate, bias):
        # torch.func, or forward-mode AD tangents: plain torch ops with autograd (the other
        # backends' autograd functions support neither), whatever backend was named
        backend = "padded"
    return _run(rows, A, B, expert_idx, gate, deterministic, backend, bias)


def _run(rows, A, B, expert_idx, gate, deterministic, backend, bias):
    """:func:`btt_moe_sparse` on checked inputs, without the tracing checks. Under autocast
    the experts run in autocast's dtype (float64 operands excepted, as autocast leaves
    them), with autocast off: its float32 rule for sum on CUDA turned the padded backend's
    float16 output into float32."""
    if fake(rows, A, B):  # a non-strict export on torch < 2.5: no loads to dispatch by
        y = _masked(_unflatten(rows, A), A, B, expert_idx, gate, routed=True)
        return y if bias is None else y + bias
    if not autocasting(rows.device):
        return _run_backend(rows, A, B, expert_idx, gate, deterministic, backend, bias)
    rows, A, B, bias = _autocast_operands(rows, A, B, bias)
    with torch.autocast(rows.device.type, enabled=False):
        try:
            return _run_backend(rows, A, B, expert_idx, gate, deterministic, backend, bias)
        except CompileError as e:  # e.g. sizes grouped_mm takes in float32 but not here
            raise CompileError(f"{e} (under autocast the experts run in {rows.dtype})") from None


def _autocast_operands(rows, A, B, bias):
    """The operands in autocast's dtype, unless one is float64 (which autocast leaves)."""
    if torch.float64 in (rows.dtype, A.dtype, B.dtype):
        return rows, A, B, bias
    dt = torch.get_autocast_dtype(rows.device.type)
    # .to keeps A's and B's strides
    return rows.to(dt), A.to(dt), B.to(dt), None if bias is None else bias.to(dt)


def _run_backend(rows, A, B, expert_idx, gate, deterministic, backend, bias):
    x = rows if rows.dim() == 3 else rows.reshape(rows.shape[0], A.shape[0], A.shape[1])
    g, a, f, E, e = _check_shapes(x, A, B)
    k = expert_idx.shape[1]
    if backend == "chunked" or (backend == "auto" and x.device.type == "cpu"):
        from .chunked import btt_moe_chunked
        return btt_moe_chunked(rows, A, B, expert_idx, gate, bias=bias)
    if backend == "auto":
        backend = _auto_backend(x, A, B, k, deterministic)
    if backend == "masked":  # measured faster than every dispatch for this shape
        y = _masked(x, A, B, expert_idx, gate, routed=True)
        return y if bias is None else y + bias
    if bias is not None:
        return _run_backend(x, A, B, expert_idx, gate, deterministic, backend, None) + bias
    if backend == "padded":  # measured slower than grouped_mm on the 2-core CPU
        return _sparse_padded(x, A, B, expert_idx, gate.to(x.dtype))
    if backend == "triton":
        return _sparse_triton(x, A, B, expert_idx, gate.to(x.dtype))
    gate = gate.to(x.dtype)
    gmm_ok = backend != "strided" and _gmm_usable(x, g, a, f, e, E)
    if backend == "grouped_mm":
        if not gmm_ok:
            why = (f"{x.dtype} on {x.device} is not supported by this torch build" if not
                   grouped_mm_available(x.device, x.dtype) else
                   f"more than {GMM_MAX_GROUPS} experts" if E > GMM_MAX_GROUPS else
                   "the sizes give strides that are not multiples of 16 bytes")
            raise CompileError(
                f"grouped_mm cannot run this layer (device={x.device}, dtype={x.dtype}, "
                f"sizes g={g}, a={a}, f={f}, e={e}, experts={E}): {why}; it needs a "
                f"supported device and dtype, 16-byte aligned strides and at most "
                f"{GMM_MAX_GROUPS} experts"
            )
        return _sparse_grouped(x, A, B, expert_idx, gate, deterministic)
    if backend == "auto" and gmm_ok:
        return _sparse_grouped(x, A, B, expert_idx, gate, deterministic)
    return _sparse_strided(x, A, B, expert_idx, gate, deterministic)
