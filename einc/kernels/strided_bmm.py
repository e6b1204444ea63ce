"""Strided batched matmul: one GEMM kernel for every pairwise contraction.

A structured linear layer is a chain of pairwise contractions. Written with
``torch.einsum`` each step usually permutes its operands into a ``bmm``-able
layout and permutes the result back, and on a GPU those copies cost more than
the matmuls. This module instead computes

    C[b, m, n] = alpha * sum_k A[b, m, k] * B[b, k, n]   (+ C[b, m, n])

where each logical index ``b, m, n, k`` is a *group* of axes (row-major within
the group) and every operand addresses every axis through its own stride. A
contraction can therefore read its inputs in whatever layout the previous one
wrote and write its output in the layout the next one reads.

Addressing convention: the strides of a :class:`StridedBmmSpec` are element
strides counted from ``tensor.data_ptr()`` of the tensor passed for that
operand. The tensor's own shape is only used to check that the addressed
elements lie inside its storage, so a logical view (``x.permute(...)``), a flat
buffer or a slice of a bigger buffer are all valid operands.

Triton is optional: it is imported on first use and everything falls back to
:func:`strided_bmm_reference` (``torch.as_strided`` + ``matmul``) without it.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "MAX_GROUP_AXES",
    "StridedBmmFunction",
    "StridedBmmSpec",
    "contiguous_strides",
    "strided_bmm",
    "strided_bmm_reference",
    "TUNING_MODES",
    "set_tuning",
    "triton_available",
    "tuning",
]

#: Axes per group the kernel decomposes an index into (after merging).
MAX_GROUP_AXES = 3

_BACKENDS = ("auto", "triton", "torch")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------
# Problem description
# ---------------------------------------------------------------------------


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major element strides of ``shape``."""
    strides, acc = [], 1
    for size in reversed(tuple(shape)):
        strides.append(acc)
        acc *= max(int(size), 1)
    return tuple(reversed(strides))


def _int_tuple(values: Sequence[int], what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except TypeError as exc:
        raise TypeError(f"{what} must be a sequence of ints, got {values!r}") from exc


@dataclass(frozen=True)
class StridedBmmSpec:
    """Axis sizes of the four index groups plus the strides of each operand.

    ``a_strides`` lists A's strides over ``batch_sizes + m_sizes + k_sizes``,
    ``b_strides`` B's over ``batch_sizes + k_sizes + n_sizes`` and
    ``c_strides`` C's over ``batch_sizes + m_sizes + n_sizes`` (``None`` means
    a row-major C). A stride of 0 on an input broadcasts it along that axis.
    """

    batch_sizes: tuple[int, ...]
    m_sizes: tuple[int, ...]
    n_sizes: tuple[int, ...]
    k_sizes: tuple[int, ...]
    a_strides: tuple[int, ...]
    b_strides: tuple[int, ...]
    c_strides: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("batch_sizes", "m_sizes", "n_sizes", "k_sizes", "a_strides", "b_strides"):
            object.__setattr__(self, name, _int_tuple(getattr(self, name), name))
        if self.c_strides is None:
            object.__setattr__(self, "c_strides", contiguous_strides(self.c_shape))
        else:
            object.__setattr__(self, "c_strides", _int_tuple(self.c_strides, "c_strides"))
        for name in ("batch_sizes", "m_sizes", "n_sizes", "k_sizes"):
            if any(s < 0 for s in getattr(self, name)):
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        for op, shape, strides in self._operands():
            if len(strides) != len(shape):
                raise ValueError(
                    f"{op}_strides has {len(strides)} entries but operand {op.upper()} has "
                    f"{len(shape)} axes (shape {shape})"
                )
            if any(s < 0 for s in strides):
                raise ValueError(f"negative strides are not supported: {op}_strides={strides}")

    # Logical shapes of the operands (group order: batch, rows, cols).
    @property
    def a_shape(self) -> tuple[int, ...]:
        return self.batch_sizes + self.m_sizes + self.k_sizes

    @property
    def b_shape(self) -> tuple[int, ...]:
        return self.batch_sizes + self.k_sizes + self.n_sizes

    @property
    def c_shape(self) -> tuple[int, ...]:
        return self.batch_sizes + self.m_sizes + self.n_sizes

    @property
    def batch(self) -> int:
        return math.prod(self.batch_sizes)

    @property
    def m(self) -> int:
        return math.prod(self.m_sizes)

    @property
    def n(self) -> int:
        return math.prod(self.n_sizes)

    @property
    def k(self) -> int:
        return math.prod(self.k_sizes)

    def _operands(self):
        return (
            ("a", self.a_shape, self.a_strides),
            ("b", self.b_shape, self.b_strides),
            ("c", self.c_shape, self.c_strides),
        )

    @classmethod
    def from_views(
        cls,
        a: torch.Tensor,
        b: torch.Tensor,
        *,
        batch_ndim: int,
        k_ndim: int,
        c_strides: Sequence[int] | None = None,
    ) -> StridedBmmSpec:
        """Spec for logical views ``a: (batch, m, k)`` and ``b: (batch, k, n)``.

        The views carry the layout (``permute``/``expand`` are free), so pass
        the same views to :func:`strided_bmm`.
        """
        m_ndim = a.dim() - batch_ndim - k_ndim
        n_ndim = b.dim() - batch_ndim - k_ndim
        if m_ndim < 0 or n_ndim < 0:
            raise ValueError("batch_ndim + k_ndim exceeds the rank of an operand")
        batch = tuple(a.shape[:batch_ndim])
        k_a = tuple(a.shape[batch_ndim + m_ndim :])
        if tuple(b.shape[:batch_ndim]) != batch or tuple(b.shape[batch_ndim : batch_ndim + k_ndim]) != k_a:
            raise ValueError(f"incompatible views: a{tuple(a.shape)} b{tuple(b.shape)}")
        return cls(
            batch_sizes=batch,
            m_sizes=tuple(a.shape[batch_ndim : batch_ndim + m_ndim]),
            n_sizes=tuple(b.shape[batch_ndim + k_ndim :]),
            k_sizes=k_a,
            a_strides=tuple(a.stride()),
            b_strides=tuple(b.stride()),
            c_strides=None if c_strides is None else tuple(c_strides),
        )


def _span(shape: Sequence[int], strides: Sequence[int]) -> int:
    """Number of elements from the first to one past the last addressed one."""
    if any(s == 0 for s in shape):
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(shape, strides))


def _is_non_overlapping(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """True when distinct indices map to distinct addresses (sufficient test).

    Axes sorted by stride must each step over everything the smaller ones
    reach; this accepts every permuted or padded dense layout.
    """
    axes = sorted((st, sz) for sz, st in zip(shape, strides) if sz > 1)
    reach = 0  # largest offset reachable with the axes seen so far
    for stride, size in axes:
        if stride <= reach:
            return False
        reach += (size - 1) * stride
    return True


def _available_elements(t: torch.Tensor) -> int:
    """Elements of ``t``'s storage from ``t.data_ptr()`` onwards."""
    return t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()


def _check_operand(name: str, t: torch.Tensor, shape, strides) -> None:
    span = _span(shape, strides)
    if span > _available_elements(t):
        raise ValueError(
            f"operand {name}: spec addresses {span} elements from data_ptr but its storage "
            f"holds only {_available_elements(t)}"
        )


def _byte_range(t: torch.Tensor, shape, strides) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + _span(shape, strides) * t.element_size()


def _check_inputs(a, b, out, spec: StridedBmmSpec) -> None:
    if a.dtype != b.dtype or (out is not None and out.dtype != a.dtype):
        dtypes = [a.dtype, b.dtype] + ([out.dtype] if out is not None else [])
        raise TypeError(f"operands must share one dtype, got {dtypes}")
    if a.device != b.device or (out is not None and out.device != a.device):
        raise ValueError("operands must live on the same device")
    _check_operand("A", a, spec.a_shape, spec.a_strides)
    _check_operand("B", b, spec.b_shape, spec.b_strides)
    # Several writes to one address would race (and are not a matmul anyway).
    for size, stride in zip(spec.c_shape, spec.c_strides):
        if size > 1 and stride == 0:
            raise ValueError(f"C cannot broadcast (stride 0 on an axis of size {size})")
    if not _is_non_overlapping(spec.c_shape, spec.c_strides):
        raise ValueError(f"C strides {spec.c_strides} overlap for shape {spec.c_shape}")
    if out is not None:
        _check_operand("C", out, spec.c_shape, spec.c_strides)
        c_lo, c_hi = _byte_range(out, spec.c_shape, spec.c_strides)
        inputs = (("A", a, spec.a_shape, spec.a_strides), ("B", b, spec.b_shape, spec.b_strides))
        for name, t, shape, strides in inputs:
            lo, hi = _byte_range(t, shape, strides)
            if lo < hi and c_lo < c_hi and lo < c_hi and c_lo < hi:
                raise ValueError(f"out overlaps operand {name}; in-place strided_bmm is not supported")


def _strided_view(t: torch.Tensor, shape, strides) -> torch.Tensor:
    """The view of ``t``'s memory that a spec describes (strides from data_ptr)."""
    return torch.as_strided(t, tuple(shape), tuple(strides), t.storage_offset())


def _alloc_out(spec: StridedBmmSpec, like: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(spec.c_shape, spec.c_strides, dtype=like.dtype, device=like.device)


# ---------------------------------------------------------------------------
# Reference implementation
# ---------------------------------------------------------------------------


def strided_bmm_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    spec: StridedBmmSpec,
    out: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
    accumulate: bool = False,
) -> torch.Tensor:
    """Pure-torch strided_bmm (any device/dtype, differentiable when ``out`` is None)."""
    _check_inputs(a, b, out, spec)
    if accumulate and out is None:
        raise ValueError("accumulate=True needs an out tensor")
    av = _strided_view(a, spec.a_shape, spec.a_strides).reshape(spec.batch, spec.m, spec.k)
    bv = _strided_view(b, spec.b_shape, spec.b_strides).reshape(spec.batch, spec.k, spec.n)
    prod = torch.matmul(av, bv).reshape(spec.c_shape)
    if alpha != 1.0:
        prod = prod * alpha
    if out is None:
        return _alloc_out(spec, a).copy_(prod)
    cv = _strided_view(out, spec.c_shape, spec.c_strides)
    with torch.no_grad():
        if accumulate:
            cv.add_(prod)
        else:
            cv.copy_(prod)
    return cv


# ---------------------------------------------------------------------------
# Canonical GEMM problem: what the kernel actually launches
# ---------------------------------------------------------------------------

# Every axis of a contraction is read by some of the three operands (X, Y and
# the output). Its role follows from who reads it:
#   batch: X, Y and out;  m: X and out;  n: Y and out;  k (reduced): not out.
# Forward is (X, Y, out) = (A, B, C); the backward passes reuse the same axes
# with the operands swapped, which is why no data has to be permuted.

_ROLES = ("batch", "m", "n", "k")


@dataclass(frozen=True)
class _Axis:
    size: int
    members: frozenset  # subset of {"a", "b", "c"}
    strides: dict  # operand name -> stride


def _spec_axes(spec: StridedBmmSpec, grad_c_strides: Sequence[int] | None = None) -> list[_Axis]:
    """All axes of the spec with the strides each operand uses for them."""
    c_strides = tuple(grad_c_strides) if grad_c_strides is not None else spec.c_strides
    nb, nm, nk = len(spec.batch_sizes), len(spec.m_sizes), len(spec.k_sizes)
    a_str = dict(zip(("batch", "m", "k"), _split(spec.a_strides, (nb, nm, nk))))
    b_str = dict(zip(("batch", "k", "n"), _split(spec.b_strides, (nb, nk, len(spec.n_sizes)))))
    c_str = dict(zip(("batch", "m", "n"), _split(c_strides, (nb, nm, len(spec.n_sizes)))))
    groups = {"batch": spec.batch_sizes, "m": spec.m_sizes, "n": spec.n_sizes, "k": spec.k_sizes}
    members = {"batch": "abc", "m": "ac", "n": "bc", "k": "ab"}
    axes = []
    for group, sizes in groups.items():
        for i, size in enumerate(sizes):
            strides = {}
            for op, table in (("a", a_str), ("b", b_str), ("c", c_str)):
                if op in members[group]:
                    strides[op] = table[group][i]
            axes.append(_Axis(size, frozenset(members[group]), strides))
    return axes


def _split(values: tuple[int, ...], lengths: Sequence[int]) -> list[tuple[int, ...]]:
    parts, start = [], 0
    for n in lengths:
        parts.append(tuple(values[start : start + n]))
        start += n
    return parts


@dataclass(frozen=True)
class _Problem:
    """Per role, the axes as ``(size, x_stride, y_stride, out_stride)`` tuples.

    ``launches`` memoises, per launch setting, what _launch derives from the problem (its
    key, tile, arguments and compiled kernels): a chain launches the same problems every
    step, and the host time of a launch is what small structured layers are bound by."""

    groups: dict
    launches: dict = field(default_factory=dict, compare=False, repr=False)
    extents: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for role, axes in self.groups.items():
            self.extents[role] = math.prod(ax[0] for ax in axes)

    def size(self, role: str) -> int:
        return self.extents[role]

    def out_axes(self) -> list[tuple[int, int]]:
        return [(ax[0], ax[3]) for role in ("batch", "m", "n") for ax in self.groups[role]]


def _make_problem(axes: list[_Axis], x: str, y: str, out: str) -> _Problem:
    """Assign each axis a GEMM role for operands (x, y, out) and merge groups."""
    groups = {role: [] for role in _ROLES}
    for ax in axes:
        if ax.size == 1:
            continue
        sx, sy, so = (ax.strides.get(op, 0) for op in (x, y, out))
        if so == 0:
            # The output does not move along this axis: it is summed over.
            # (An out stride of 0 arises for gradients of broadcast inputs.)
            role = "k"
        elif x in ax.members and y in ax.members:
            role = "batch"
        elif y in ax.members:
            role, sx = "n", 0
        else:
            role, sy = "m", 0
        groups[role].append((ax.size, sx, sy, so))
    return _Problem({role: _merge_axes(_canonical_order(role, group)) for role, group in groups.items()})


@functools.lru_cache(maxsize=4096)
def _problem_of(spec: StridedBmmSpec, grad_c_strides: tuple | None, x: str, y: str,
                out: str) -> _Problem:
    """:func:`_make_problem` over the spec's axes, memoised: a layer's steps launch the same
    few specs (BTT-MoE: one per capacity), and this Python is host time of every launch."""
    return _make_problem(_spec_axes(spec, grad_c_strides), x, y, out)


def _canonical_order(role: str, axes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Order a group's axes by decreasing stride.

    The order in which the kernel enumerates a group is free (the result is
    the same), so sort it: axes that are nested in memory become neighbours
    and merge, and the innermost axis is the one contiguous in the output
    (or, for the reduction, in X), which keeps memory accesses coalesced.
    """
    if role == "k":
        return sorted(axes, key=lambda ax: (ax[1], ax[2]), reverse=True)
    return sorted(axes, key=lambda ax: (ax[3], ax[1], ax[2]), reverse=True)


def _merge_axes(axes: list[tuple[int, ...]]) -> tuple[tuple[int, ...], ...]:
    """Drop size-1 axes and fuse neighbours that are contiguous for every operand.

    Fewer axes means cheaper index decomposition and lets groups with more
    than MAX_GROUP_AXES logical axes still fit the kernel.
    """
    merged: list[tuple[int, ...]] = []
    for size, *strides in axes:
        if size == 1:
            continue
        if merged:
            psize, *pstrides = merged[-1]
            if all(ps == s * size for ps, s in zip(pstrides, strides)):
                merged[-1] = (psize * size, *strides)
                continue
        merged.append((size, *strides))
    return tuple(merged)


def _fits_kernel(problem: _Problem) -> bool:
    return all(len(g) <= MAX_GROUP_AXES for g in problem.groups.values())


def _padded(group: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    """Exactly MAX_GROUP_AXES axes; padding axes (size 1, stride 0) go outermost."""
    pad = ((1, 0, 0, 0),) * (MAX_GROUP_AXES - len(group))
    return pad + tuple(group)


# ---------------------------------------------------------------------------
# Triton kernel (built on first use so that importing einc never needs triton)
# ---------------------------------------------------------------------------

_triton = None  # the triton module once imported
tl = None  # triton.language, looked up by the kernel source at compile time
_unravel3 = None  # jitted helper, called by name from the kernel
_KERNELS: dict = {}  # tuning mode -> decorated kernel


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _import_triton():
    global _triton
    if _triton is None:
        try:
            import triton
        except ImportError:
            return None
        _triton = triton
    return _triton


def triton_available() -> bool:
    """True when triton imports and can run here (a CUDA device or TRITON_INTERPRET=1)."""
    if _import_triton() is None:
        return False
    return _interpreting() or torch.cuda.is_available()


def _unravel3_fn(idx, s1, s2):
    # Row-major decomposition of a flat group index into (i0, i1, i2) for
    # axis sizes (s0, s1, s2); s0 is implied. Sizes are constexpr, so the
    # div/mod become multiplies and shifts.
    i2 = idx % s2
    rest = idx // s2
    return rest // s1, rest % s1, i2


def _strided_bmm_kernel_fn(
    x_ptr, y_ptr, out_ptr, bias_ptr, ws_ptr, alpha, ROW, BIAS_N, K_CHUNK, WS_STRIDE,
    M, N, K,
    # Strides; axis order within a group is outer -> inner.
    x_sb0, x_sb1, x_sb2, x_sm0, x_sm1, x_sm2, x_sk0, x_sk1, x_sk2,
    y_sb0, y_sb1, y_sb2, y_sk0, y_sk1, y_sk2, y_sn0, y_sn1, y_sn2,
    o_sb0, o_sb1, o_sb2, o_sm0, o_sm1, o_sm2, o_sn0, o_sn1, o_sn2,
    # Inner axis sizes of each group (the outer one is implied by M, N, K).
    B1: tl.constexpr, B2: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr,
    N1: tl.constexpr, N2: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr, INDEX_64: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):  # fmt: skip
    # One program per (batch, m-tile, n-tile), flattened into a 1-D grid so the
    # batch can exceed the 65535 limit of the other grid axes. With SPLIT_K > 1 each tile's
    # reduction is cut into SPLIT_K chunks of K_CHUNK, one program each, whose partial sums
    # go to the float workspace ws[split][batch][M][N] (summed after the launch): for
    # products with few tiles and a long reduction (weight gradients over all tokens).
    pid = tl.program_id(0)
    pid_s = pid % SPLIT_K
    pid = pid // SPLIT_K
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_b = pid // (tiles_m * tiles_n)
    tile = pid % (tiles_m * tiles_n)
    # Grouped tile order: GROUP_M m-tiles share the same B tiles in L2.
    width = GROUP_M * tiles_n
    first_m = (tile // width) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (tile % width) % rows
    pid_n = (tile % width) // rows

    # Batch offsets are scalars: move the base pointers once.
    b0, b1, b2 = _unravel3(pid_b.to(tl.int64), B1, B2)
    x_ptr += b0 * x_sb0 + b1 * x_sb1 + b2 * x_sb2
    y_ptr += b0 * y_sb0 + b1 * y_sb1 + b2 * y_sb2
    out_ptr += b0 * o_sb0 + b1 * o_sb1 + b2 * o_sb2

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if INDEX_64:
        rm = rm.to(tl.int64)
        rn = rn.to(tl.int64)
    m0, m1, m2 = _unravel3(rm, M1, M2)
    n0, n1, n2 = _unravel3(rn, N1, N2)
    x_m = m0 * x_sm0 + m1 * x_sm1 + m2 * x_sm2
    o_m = m0 * o_sm0 + m1 * o_sm1 + m2 * o_sm2
    y_n = n0 * y_sn0 + n1 * y_sn1 + n2 * y_sn2
    o_n = n0 * o_sn0 + n1 * o_sn1 + n2 * o_sn2
    mask_m = rm < M
    mask_n = rn < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    k_lo = pid_s * K_CHUNK
    k_hi = tl.minimum(K, k_lo + K_CHUNK)
    for k_start in range(k_lo, k_hi, BLOCK_K):
        rk = k_start + tl.arange(0, BLOCK_K)
        if INDEX_64:
            rk = rk.to(tl.int64)
        k0, k1, k2 = _unravel3(rk, K1, K2)
        x_k = k0 * x_sk0 + k1 * x_sk1 + k2 * x_sk2
        y_k = k0 * y_sk0 + k1 * y_sk1 + k2 * y_sk2
        mask_k = rk < k_hi
        x = tl.load(x_ptr + x_m[:, None] + x_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        y = tl.load(y_ptr + y_k[:, None] + y_n[None, :], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST_DOT:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, y, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    acc = acc * alpha
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K > 1:
        ws = ws_ptr + (pid_s * WS_STRIDE + pid_b.to(tl.int64) * M * N) + rm[:, None] * N + rn[None, :]
        tl.store(ws, acc, mask=mask)
        return
    o = o_m[:, None] + o_n[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptr + o, mask=mask, other=0.0).to(ACC_DTYPE)
    if HAS_BIAS:  # out is [rows][ROW]: the column is the offset within its row
        col = (o + (b0 * o_sb0 + b1 * o_sb1 + b2 * o_sb2)) % ROW
        acc += tl.load(bias_ptr + col, mask=mask & (col < BIAS_N), other=0.0).to(ACC_DTYPE)
    tl.store(out_ptr + o, acc.to(out_ptr.dtype.element_ty), mask=mask)


# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps). Hopper-oriented: big tiles for big GEMMs,
# small ones because structured layers are often many small blocks (Monarch blocks of 32-64).
_CANDIDATES = (
    (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 32, 4, 4),
    (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 32, 32, 3, 4), (64, 64, 64, 4, 4),
    (64, 64, 32, 5, 2),
    (32, 64, 64, 4, 4), (64, 32, 64, 4, 4), (32, 32, 64, 3, 2), (16, 64, 64, 3, 2),
    (64, 16, 64, 3, 2), (32, 32, 32, 3, 2), (16, 64, 32, 3, 2), (64, 16, 32, 3, 2),
    (16, 32, 16, 2, 1),
)
#: the interpreter runs programs one after another in numpy: one medium tile keeps the
#: launch count (and test time) low
_INTERPRETER_TILE = (32, 32, 32, 1, 4)


def _autotune_configs(triton):
    def cfg(bm, bn, bk, stages, warps):
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
        return triton.Config(meta, num_stages=stages, num_warps=warps)

    if _interpreting():
        return [cfg(*_INTERPRETER_TILE)]
    return [cfg(*c) for c in _CANDIDATES]


def _block_cap(extent: int) -> int:
    return max(16, 1 << max(int(extent) - 1, 0).bit_length())


_SHARED_MEMORY_BUDGET = 200 * 1024  # bytes; an H100 SM has 228 KiB


def _config_fits(c, M: int, N: int, K: int, itemsize: int) -> bool:
    """Tile no larger than the problem (rounded up to a power of two) and operand buffers
    that fit in shared memory."""
    bm, bn, bk, stages = c[:4]
    smem = stages * (bm + bn) * bk * itemsize  # one A and one B tile per stage
    return bm <= _block_cap(M) and bn <= _block_cap(N) and bk <= _block_cap(K) and \
        smem <= _SHARED_MEMORY_BUDGET


def _prune_configs(configs, named_args, **kwargs):
    """Skip tiles much larger than the problem (wasted work, wasted tuning)
    and pipelines whose operand buffers would not fit in shared memory."""
    itemsize = named_args["x_ptr"].element_size()
    dims = [named_args[d] for d in ("M", "N", "K")]

    def key(c):
        return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages)

    kept = [c for c in configs if _config_fits(key(c), *dims, itemsize)]
    if kept:
        return kept
    return [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


#: Tile choice: "heuristic" compiles one configuration per problem shape, picked from its
#: sizes (no timing; the default, since timing every candidate costs seconds per new
#: shape and a structured layer launches many shapes); "full" lets Triton's autotuner
#: time every fitting candidate on first use of a shape. Environment: EINC_TRITON_TUNE.
TUNING_MODES = ("heuristic", "full")
_tuning = None  # set_tuning() or the environment; read at the first launch


def set_tuning(mode: str) -> None:
    """Choose how the kernel picks its tiles: one of :data:`TUNING_MODES`."""
    global _tuning
    if mode not in TUNING_MODES:
        raise ValueError(f"tuning must be one of {TUNING_MODES}, got {mode!r}")
    _tuning = mode


def tuning() -> str:
    """The tuning mode in force (``set_tuning``, else ``EINC_TRITON_TUNE``, else heuristic)."""
    if _tuning is not None:
        return _tuning
    mode = os.environ.get("EINC_TRITON_TUNE", "heuristic").strip().lower() or "heuristic"
    if mode not in TUNING_MODES:
        raise ValueError(f"EINC_TRITON_TUNE must be one of {TUNING_MODES}, got {mode!r}")
    return mode


def _heuristic_config(M: int, N: int, K: int, itemsize: int) -> dict:
    """One tile for a problem: the largest candidate that fits it and shared memory
    (largest BLOCK_M x BLOCK_N, then BLOCK_K), as the pruning rule of "full" would keep."""
    cands = [c for c in _CANDIDATES if _config_fits(c, M, N, K, itemsize)]
    if not cands:
        cands = [min(_CANDIDATES, key=lambda c: c[0] * c[1] * c[2])]
    bm, bn, bk, stages, warps = max(cands, key=lambda c: (c[0] * c[1], c[2], -c[4]))
    # Structured layers often contract 32-64 long axes: one or two K steps leave nothing to
    # pipeline, and fewer buffers let more programs share a multiprocessor.
    stages = min(stages, max(1, _cdiv(K, bk)))
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
            "num_stages": stages, "num_warps": warps}


def _get_kernel(mode: str = "full"):
    """Decorate the kernel on first use (the interpreter choice is made here): the plain
    jitted kernel for "heuristic", wrapped in Triton's autotuner for "full"."""
    global tl, _unravel3
    if mode not in _KERNELS:
        triton = _import_triton()
        if triton is None:
            raise RuntimeError("triton is not installed")
        from triton import language

        tl = language
        _unravel3 = triton.jit(_unravel3_fn)
        if "heuristic" not in _KERNELS:
            _KERNELS["heuristic"] = triton.jit(_strided_bmm_kernel_fn)
        if mode == "full":
            _KERNELS["full"] = triton.autotune(
                configs=_autotune_configs(triton),
                key=["M", "N", "K", "ACCUMULATE"],
                prune_configs_by={"early_config_prune": _prune_configs},
                # Tuning launches the kernel repeatedly: keep C intact for accumulate.
                restore_value=["out_ptr"],
            )(_KERNELS["heuristic"])
    return _KERNELS[mode]


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _problem_key(problem: _Problem) -> tuple:
    return tuple(problem.groups[role] for role in _ROLES)


def _launch_plan(key: tuple, dtype: torch.dtype, accumulate: bool, has_bias: bool, mode: str,
                 precision: str, processors: int):
    """Everything about a launch but the pointers and alpha, computed once per problem:
    (kernel name, size and stride arguments, constexprs, grid, output span, K splits)."""
    problem = _Problem(dict(zip(_ROLES, key)))
    groups = {role: _padded(problem.groups[role]) for role in _ROLES}
    M, N, K = problem.size("m"), problem.size("n"), problem.size("k")
    n_batch = problem.size("batch")

    def strides(role, col):
        return [ax[col] for ax in groups[role]]

    x_args = strides("batch", 1) + strides("m", 1) + strides("k", 1)
    y_args = strides("batch", 2) + strides("k", 2) + strides("n", 2)
    o_args = strides("batch", 3) + strides("m", 3) + strides("n", 3)
    consts = {}
    for role, name in (("batch", "B"), ("m", "M"), ("n", "N"), ("k", "K")):
        consts[f"{name}1"], consts[f"{name}2"] = groups[role][1][0], groups[role][2][0]

    # int32 offsets overflow past 2**31 elements; masked tail lanes may also step one tile
    # beyond the span, hence the margin. Only a tile's own offsets count: the batch moves the
    # base pointers by int64 scalars (a large batch alone kept int64 index math on)
    tile_roles = [r for r in _ROLES if r != "batch"]
    span = max(sum(ax[0] * ax[col] for role in tile_roles for ax in groups[role])
               for col in (1, 2, 3))
    reach = span + 256 * max([1] + [abs(ax[col]) for role in tile_roles for ax in groups[role]
                                    for col in (1, 2, 3)])
    itemsize = torch.empty((), dtype=dtype).element_size()
    interpreting = _interpreting()
    consts.update(
        ACCUMULATE=bool(accumulate),
        HAS_BIAS=bool(has_bias),
        INDEX_64=reach >= 2**31 or max(M, N, K) >= 2**31 - 256,
        ACC_DTYPE=_triton.language.float64 if dtype == torch.float64 else _triton.language.float32,
        INPUT_PRECISION=precision,
        # The interpreter multiplies bf16 as raw integer bits; fp32 is exact.
        UPCAST_DOT=interpreting and dtype == torch.bfloat16,
    )
    split, chunk = 1, K
    if mode == "full":
        tile, name = {}, "full"

        def grid(meta):
            return (n_batch * _cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"]),)
    else:
        tile, name = _heuristic_config(M, N, K, itemsize), "heuristic"
        tiles = n_batch * _cdiv(M, tile["BLOCK_M"]) * _cdiv(N, tile["BLOCK_N"])
        if not has_bias:
            traffic = n_batch * K * (M + N) * itemsize  # bytes of the two operands
            split, chunk = _split_k(tiles, K, tile["BLOCK_K"], processors, traffic)
        grid = (split * tiles,)
    consts.update(tile, SPLIT_K=split)
    args = (chunk, n_batch * M * N, M, N, K, *x_args, *y_args, *o_args)
    return name, args, consts, grid, _problem_out_span(problem), split


#: the least operand traffic (bytes) worth a split reduction: below it the product takes
#: a few microseconds anyway, less than the summing of the parts costs the host
SPLIT_MIN_BYTES = 64 << 20


def _split_k(tiles: int, K: int, block_k: int, processors: int, traffic: int) -> tuple[int, int]:
    """(splits, K per split) for a product of ``tiles`` output tiles: split the reduction
    when there are fewer tiles than two per multiprocessor, the operands are large and each
    part keeps at least four K steps (the partial sums cost a write and a read of the result
    per split, and two more operations on the host)."""
    steps = _cdiv(K, block_k)
    if tiles >= 2 * processors or steps < 8 or traffic < SPLIT_MIN_BYTES:
        return 1, K
    split = min(_cdiv(2 * processors, tiles), steps // 4, 64)
    chunk = _cdiv(steps, split) * block_k
    return _cdiv(K, chunk), chunk


_PROCESSORS: dict = {}


def _processors(t: torch.Tensor) -> int:
    """Multiprocessors of ``t``'s GPU (4 under the interpreter, so that tests split)."""
    if not t.is_cuda:
        return 4
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if index not in _PROCESSORS:
        _PROCESSORS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _PROCESSORS[index]


#: Launch compiled kernels directly after their first launch (see _DirectLauncher); set
#: EINC_TRITON_DIRECT_LAUNCH=0 to always go through Triton's JIT dispatch.
DIRECT_LAUNCH = os.environ.get("EINC_TRITON_DIRECT_LAUNCH", "1") != "0"


_SHARED_LAUNCHES: dict = {}  # problem key -> the memo of _Problem.launches


def _launch_hooks():
    try:
        from triton import knobs

        return knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    except ImportError:  # before Triton 3.4 the hooks sat on CompiledKernel
        from triton.compiler import CompiledKernel

        return CompiledKernel.launch_enter_hook, CompiledKernel.launch_exit_hook


class _DirectLauncher:
    """Runs an already compiled kernel with Triton's own launcher, skipping JITFunction.run
    (argument binding, specialisation, cache lookup: most of a launch's host time on a slow
    host, and a structured layer launches six or more small kernels per step).

    ``args`` is the argument list in signature order, constexprs included, as
    JITFunction.run passes it; the ``slots`` (pointers, alpha) are filled in per call."""

    def __init__(self, compiled, args: list, slots: dict):
        from triton.runtime import driver

        args = list(args)
        for pos in slots.values():  # hold no tensor of the first launch
            args[pos] = None
        self.compiled, self.args, self.slots = compiled, args, slots
        self.driver = driver
        #: set after the first call went through: from then on an error is not a sign of
        #: another Triton, and the launch may already have been queued
        self.proven = False

    def __call__(self, grid, values: dict) -> None:
        args = self.args.copy()
        for name, pos in self.slots.items():
            args[pos] = values[name]
        c = self.compiled
        active = self.driver.active
        stream = active.get_current_stream(active.get_current_device())
        meta = c.launch_metadata(grid, stream, *args)
        g = tuple(grid) + (1, 1)
        c.run(g[0], g[1], g[2], stream, c.function, c.packed_metadata, meta, *_launch_hooks(),
              *args)
        self.proven = True


_PLAIN_LAUNCHES: dict = {}  # (kernel, arguments' key) -> _DirectLauncher


def _int_key(v: int) -> tuple:
    """What Triton specialises an int argument on: 1, divisibility by 16, 32 or 64 bits."""
    return v == 1, v % 16 == 0, -(1 << 31) <= v < (1 << 31)


def launch_kernel(kernel, grid: tuple, args: tuple, constexprs: dict, varying=()) -> None:
    """``kernel[grid](*args, **constexprs)`` for a small kernel launched many times with
    the same kinds of arguments: after the first launch through Triton's dispatch, the
    compiled kernel runs directly (:class:`_DirectLauncher`, which skips the argument
    binding and cache lookup; on an H200's host a launch through the dispatch cost 70-90 us,
    and a direct one about 80 us in a slower run, so the gain there is still unmeasured).
    ``args`` are the positional arguments in signature
    order, tensors on the current CUDA device and ints; an int is part of the launch's key
    with its value, except the positions in ``varying`` (sizes that change per call), keyed
    by what Triton specialises them on."""
    global DIRECT_LAUNCH
    direct = DIRECT_LAUNCH and not _interpreting()
    if direct:
        key = [id(kernel), tuple(sorted(constexprs.items())), torch.cuda.current_device()]
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                key.append((a.dtype, a.data_ptr() % 16 == 0, a.device.index))
            else:
                key.append(_int_key(a) if i in varying else a)
        key = tuple(key)
        launcher = _PLAIN_LAUNCHES.get(key)
        if launcher is not None:
            values = {n: args[i] for n, i in launcher.positions.items()}
            if launcher.proven:
                launcher(grid, values)
                return
            try:
                launcher(grid, values)
                return
            except (AttributeError, TypeError, KeyError):  # another Triton: its dispatch
                DIRECT_LAUNCH = direct = False
    compiled = kernel[grid](*args, **constexprs)
    if direct and all(hasattr(compiled, a) for a in
                      ("run", "function", "packed_metadata", "launch_metadata")):
        names = list(kernel.arg_names)
        values = dict(zip(names, args), **constexprs)
        positions = {names[i]: i for i, a in enumerate(args)
                     if isinstance(a, torch.Tensor) or i in varying}
        try:
            launcher = _DirectLauncher(compiled, [values[n] for n in names],
                                       {n: names.index(n) for n in positions})
        except (KeyError, ImportError, AttributeError):
            DIRECT_LAUNCH = False
            return
        launcher.positions = positions  # argument name -> its index in args
        if len(_PLAIN_LAUNCHES) >= 4096:
            _PLAIN_LAUNCHES.clear()
        _PLAIN_LAUNCHES[key] = launcher


def _launch(problem: _Problem, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, alpha: float,
            accumulate: bool, bias: torch.Tensor | None = None, row: int = 1):
    """Run the Triton kernel on a canonical problem; pointers are the data_ptrs.

    ``bias`` (contiguous, length <= ``row``): added to every result whose offset from
    ``out``'s data_ptr is ``r * row + c`` with ``c < len(bias)``, i.e. per column of an
    output that is a row-major ``[rows][row]`` matrix."""
    global DIRECT_LAUNCH
    interpreting = _interpreting()
    mode = tuning()
    setting = (x.dtype, bool(accumulate), bias is not None, mode, _input_precision(x.dtype),
               _processors(x))
    launches = problem.launches
    if not launches:  # problems built per call (strided_bmm) share one memo per key
        if len(_SHARED_LAUNCHES) >= 4096:
            _SHARED_LAUNCHES.clear()
        launches = _SHARED_LAUNCHES.setdefault(_problem_key(problem), launches)
        object.__setattr__(problem, "launches", launches)
    plan = launches.get(setting)
    if plan is None:
        plan = launches[setting] = _launch_plan(_problem_key(problem), *setting)
    name, args, consts, grid, out_span, split = plan
    ws = out
    if split > 1:  # partial sums of the split reduction, in the accumulator's precision
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        ws = torch.empty(split * args[1], dtype=acc, device=out.device)
    head = (out if bias is None else bias, ws, float(alpha), int(row), 0 if bias is None else bias.numel())
    switch = x.is_cuda and x.device.index != torch.cuda.current_device()
    direct = DIRECT_LAUNCH and name != "full" and not interpreting and not switch
    launched = False
    if direct:
        # Triton specialises pointers on 16-byte alignment: part of the compiled kernel's key
        # (and on every pointer's dtype; x's is in the setting)
        key = (setting, x.device.index, row, head[4], y.dtype, out.dtype, head[0].dtype,
               *(t.data_ptr() % 16 == 0 for t in (x, y, out, head[0], ws)))
        launcher = launches.get(key)
        if launcher is not None:
            values = {"x_ptr": x, "y_ptr": y, "out_ptr": out, "bias_ptr": head[0], "ws_ptr": ws,
                      "alpha": head[2]}
            if launcher.proven:
                launcher(grid, values)
                launched = True
            else:
                try:
                    launcher(grid, values)
                    launched = True
                except (AttributeError, TypeError, KeyError):  # another Triton: its dispatch
                    DIRECT_LAUNCH = False
    if not launched:
        _get_kernel(mode)
        kernel = _KERNELS[name]
        target = out
        if name == "full":
            # A flat view of the output's footprint, so that the autotuner's restore_value
            # saves and restores exactly those elements.
            target = torch.as_strided(out, (out_span,), (1,), out.storage_offset())
        if switch:
            with torch.cuda.device(x.device):  # Triton launches on the current CUDA device
                kernel[grid](x, y, target, *head, *args, **consts)
        else:
            compiled = kernel[grid](x, y, target, *head, *args, **consts)
            if direct and all(hasattr(compiled, a) for a in
                              ("run", "function", "packed_metadata", "launch_metadata")):
                names = list(kernel.arg_names)
                values = dict(zip(names, (x, y, out, *head, *args)), **consts)
                slots = {n: names.index(n) for n in ("x_ptr", "y_ptr", "out_ptr", "bias_ptr", "ws_ptr", "alpha")}
                try:
                    launches[key] = _DirectLauncher(compiled, [values[n] for n in names], slots)
                except (KeyError, ImportError, AttributeError):
                    DIRECT_LAUNCH = False
    if split > 1:
        _reduce_splits(problem, ws, split, out, accumulate)


def _reduce_splits(problem: _Problem, ws: torch.Tensor, split: int, out: torch.Tensor,
                   accumulate: bool) -> None:
    """Sum the ``split`` partial results (a fixed order: deterministic) into ``out``."""
    axes = problem.out_axes()
    view = _strided_view(out, [s for s, _ in axes], [st for _, st in axes])
    total = ws.view(split, -1).sum(0).view([s for s, _ in axes])
    if accumulate:
        view.add_(total)
    else:
        view.copy_(total)


def _problem_out_span(problem: _Problem) -> int:
    axes = problem.out_axes()
    return _span([s for s, _ in axes], [st for _, st in axes])


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _triton_usable(t: torch.Tensor) -> bool:
    return triton_available() and t.dtype in _KERNEL_DTYPES and (
        t.is_cuda or (_interpreting() and t.device.type == "cpu"))  # not meta, say


def _run(problem, x, y, out, alpha, accumulate, bias=None, row=1) -> None:
    """Kernel launch with the degenerate sizes handled on the host (see _launch for bias)."""
    if problem.size("batch") * problem.size("m") * problem.size("n") == 0:
        return
    if problem.size("k") == 0 and bias is None:
        if not accumulate:
            axes = problem.out_axes()
            _strided_view(out, [s for s, _ in axes], [st for _, st in axes]).zero_()
        return
    _launch(problem, x, y, out, alpha, accumulate, bias, row)


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------


def _select_backend(backend: str, a: torch.Tensor, problem: _Problem) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    usable = _triton_usable(a) and _fits_kernel(problem)
    if backend == "triton" and not usable:
        if not _triton_usable(a):
            raise RuntimeError(
                f"triton backend unavailable for a {a.dtype} tensor on {a.device} "
                "(needs triton and a CUDA device, or TRITON_INTERPRET=1)"
            )
        raise ValueError(
            f"a group has more than {MAX_GROUP_AXES} axes that cannot be merged: "
            f"{ {r: len(g) for r, g in problem.groups.items()} }"
        )
    return "triton" if usable else "torch"


def _strided_bmm_impl(a, b, spec, out, alpha, accumulate, backend) -> torch.Tensor:
    _check_inputs(a, b, out, spec)
    if accumulate and out is None:
        raise ValueError("accumulate=True needs an out tensor")
    problem = _problem_of(spec, None, "a", "b", "c")
    if _select_backend(backend, a, problem) == "torch":
        return strided_bmm_reference(a, b, spec, out, alpha=alpha, accumulate=accumulate)
    if out is None:
        out = _alloc_out(spec, a)
    _run(problem, a, b, out, alpha, accumulate)
    return _strided_view(out, spec.c_shape, spec.c_strides)


def strided_bmm(
    a: torch.Tensor,
    b: torch.Tensor,
    spec: StridedBmmSpec,
    out: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
    accumulate: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """``C = alpha * A @ B`` (or ``C += ...``) with every operand addressed by ``spec``.

    Returns the logical view of C (shape ``spec.c_shape``, strides
    ``spec.c_strides``); when ``out`` is given C is written into its memory
    from ``out.data_ptr()``. ``backend`` is ``"auto"`` (Triton when usable,
    else torch), ``"triton"`` or ``"torch"``. Differentiable through
    :class:`StridedBmmFunction` when ``out`` is None and not accumulating.
    """
    needs_grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    if needs_grad:
        if out is not None or accumulate:
            raise ValueError("out= and accumulate=True are not differentiable")
        for name, t, shape, strides in (("A", a, spec.a_shape, spec.a_strides),
                                        ("B", b, spec.b_shape, spec.b_strides)):
            if t.requires_grad and _span(shape, strides) > _span(t.shape, t.stride()):
                # a gradient has the tensor's elements only: those addresses would get none
                raise ValueError(
                    f"the spec reads {name} past the last element of the tensor passed "
                    f"({_span(shape, strides)} elements from its start, the tensor spans "
                    f"{_span(t.shape, t.stride())}), so their gradient would be lost: pass "
                    "the tensor that holds every address read (the whole buffer)")
        return StridedBmmFunction.apply(a, b, spec, alpha, backend)
    return _strided_bmm_impl(a, b, spec, out, alpha, accumulate, backend)


# ---------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------


def _covers_exactly(t: torch.Tensor, shape, strides) -> tuple[bool, bool]:
    """(addresses stay inside ``t``'s elements, and hit each element once).

    Gradients are written through ``t``'s own layout, so the kernel may only
    be used when the spec's addresses are elements of ``t``.
    """
    live = [(sz, st) for sz, st in zip(shape, strides) if st != 0 and sz > 1]
    sizes, strs = [s for s, _ in live], [st for _, st in live]
    if not _is_non_overlapping(sizes, strs):
        return False, False
    if tuple(t.shape) == tuple(shape) and tuple(t.stride()) == tuple(strides):
        inside = True
    else:
        # A dense ``t`` owns every address in [0, numel) from its data_ptr.
        dense = _is_non_overlapping(t.shape, t.stride()) and _span(t.shape, t.stride()) == t.numel()
        inside = dense and _span(sizes, strs) <= t.numel()
    return inside, inside and math.prod(sizes) == t.numel()


def _grad_buffer(t: torch.Tensor, zero: bool) -> torch.Tensor:
    make = torch.zeros if zero else torch.empty
    buf = make(max(_span(t.shape, t.stride()), 1), dtype=t.dtype, device=t.device)
    return torch.as_strided(buf, t.shape, t.stride())


def _reference_grads(a, b, spec, alpha, grad_c, need_a, need_b):
    """Gradients via torch autograd on the reference (layouts the kernel cannot write)."""
    with torch.enable_grad():
        a_ = a.detach().requires_grad_(need_a)
        b_ = b.detach().requires_grad_(need_b)
        c = strided_bmm_reference(a_, b_, spec, alpha=alpha)
        inputs = [t for t, need in ((a_, need_a), (b_, need_b)) if need]
        grads = iter(torch.autograd.grad(c, inputs, grad_c, allow_unused=True))
    return (next(grads) if need_a else None), (next(grads) if need_b else None)


class StridedBmmFunction(torch.autograd.Function):
    """Differentiable strided_bmm; backward is two more strided_bmm launches.

    dA = dC @ B^T and dB = A^T @ dC are the same contraction with the roles
    of the operands swapped: the kernel reads dC through its own strides and
    writes each gradient in its input's layout, so nothing is permuted.
    Axes along which an input is broadcast (stride 0) become reduced axes of
    its gradient.
    """

    @staticmethod
    def forward(ctx, a, b, spec: StridedBmmSpec, alpha: float = 1.0, backend: str = "auto"):
        ctx.spec, ctx.alpha, ctx.backend = spec, alpha, backend
        ctx.save_for_backward(a, b)
        return _strided_bmm_impl(a, b, spec, None, alpha, False, backend)

    @staticmethod
    def backward(ctx, grad_c):
        a, b = ctx.saved_tensors
        spec, alpha, backend = ctx.spec, ctx.alpha, ctx.backend
        from ..runtime.fused import batched, regrad
        if torch.is_grad_enabled() or batched(grad_c):  # create_graph=True or a batch of dC:
            # differentiate the torch reference
            ga, gb = regrad(lambda a, b: strided_bmm_reference(a, b, spec, alpha=alpha),
                            [a, b], ctx.needs_input_grad[:2], grad_c.to(a.dtype))
            return ga, gb, None, None, None
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_c = grad_c.to(a.dtype)
        dc = tuple(grad_c.stride())  # dC is read through its own strides
        grad_a = grad_b = None
        if need_a:  # dA[b, m, k] = sum_n dC[b, m, n] B[b, k, n]
            grad_a = _kernel_grad(_problem_of(spec, dc, "c", "b", "a"), grad_c, b, a, spec.a_shape, spec.a_strides,
                                  alpha, backend)  # fmt: skip
        if need_b:  # dB[b, k, n] = sum_m A[b, m, k] dC[b, m, n]
            grad_b = _kernel_grad(_problem_of(spec, dc, "a", "c", "b"), a, grad_c, b, spec.b_shape, spec.b_strides,
                                  alpha, backend)  # fmt: skip
        miss_a, miss_b = need_a and grad_a is None, need_b and grad_b is None
        if miss_a or miss_b:
            ref_a, ref_b = _reference_grads(a, b, spec, alpha, grad_c, miss_a, miss_b)
            grad_a = ref_a if miss_a else grad_a
            grad_b = ref_b if miss_b else grad_b
        return grad_a, grad_b, None, None, None


def _kernel_grad(problem, x, y, target, shape, strides, alpha, backend):
    """Gradient for ``target`` written by the kernel in its layout, or None if it cannot be."""
    if backend == "torch" or not (_triton_usable(target) and _fits_kernel(problem)):
        return None
    if any(st == 0 and sz > 1 for sz, st in zip(target.shape, target.stride())):
        # an expanded view: autograd wants one gradient per element of the view (its own
        # backward then sums them), not the sum the kernel would write through stride 0
        return None
    inside, exact = _covers_exactly(target, shape, strides)
    if not inside:
        return None
    buf = _grad_buffer(target, zero=not exact)  # untouched elements get zero gradient
    _run(problem, x, y, buf, alpha, accumulate=False)
    return buf
