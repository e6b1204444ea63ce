"""The planned chain as one autograd Function: every bmm reads strided views of the previous
result in the layout the plan chose for it, in forward and in backward, so the only copies
are the relayouts the plan could not avoid.

On the CPU the tokens run in chunks (:func:`chunk_tokens`): each chunk's intermediates stay
in cache between the steps, so the bmm calls run near the speed of one large GEMM and the
relayouts become cache-to-cache copies. Every chunk writes its rows of ``y`` (bias
included) and of ``dx`` in place, and factor gradients accumulate over the chunks.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
import warnings

import numpy as np
import torch
import torch.autograd.forward_ad as _forward_ad

from ..codegen.plan import Plan
from ..errors import CompileError
from . import buffers

#: CPU cache bytes a chunk's widest intermediate may fill (about one core's L2)
CHUNK_BYTES = 2 << 20
#: fewest tokens per chunk: below this the per-call overhead of small bmm calls dominates
MIN_CHUNK = 128


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


def relayout(t: torch.Tensor, src, dst, out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy ``t`` (contiguous in order ``src``) into a contiguous tensor in order ``dst``
    (``out`` when given: a contiguous buffer of the right shape)."""
    moved = t.permute([src.index(i) for i in dst])
    return moved.contiguous() if out is None else out.copy_(moved)


def bmm_into(a: torch.Tensor, b: torch.Tensor, transposed: bool, out: torch.Tensor):
    """a @ b per batch into the contiguous ``out``: [B][M][N], or [B][N][M] when
    ``transposed`` (computed as b^T a^T). Never bmm(out=strided view): on CPU many such
    views fall back to a loop orders of magnitude slower."""
    if transposed:
        a, b = b.transpose(1, 2), a.transpose(1, 2)
    return torch.bmm(a, b, out=out)


def _same(a, b, sizes) -> bool:
    """Equal memory orders once size-1 axes (which have no stride to respect) are dropped."""
    drop = lambda o: tuple(i for i in o if sizes[i] != 1)
    return drop(a) == drop(b)


def _transposed_result(direct, transposed, want, sizes) -> bool:
    """Whether to form a result in its ``transposed`` order rather than ``direct`` when it
    is wanted in order ``want``: where it is that order (no copy), else where it shares the
    innermost axis with ``want`` (the copy then moves whole rows instead of transposing,
    several times faster on the CPU)."""
    if _same(direct, want, sizes) or _same(transposed, want, sizes):
        return not _same(direct, want, sizes)
    inner = lambda o: next((i for i in reversed(o) if sizes[i] != 1), None)
    return inner(transposed) == inner(want) != inner(direct)


class Scratch:
    """Contiguous buffers, one per key, for the temporaries of a chunk loop: each chunk
    overwrites the previous chunk's. Backed by :mod:`einc.runtime.buffers`, so they are
    recycled across calls too."""

    def __init__(self, like: torch.Tensor):
        self.like, self.bufs = like, {}

    def get(self, key, shape) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self.bufs[key] = _empty([n], self.like)
        return buf[:n].view(shape)


def _empty(shape, like: torch.Tensor) -> torch.Tensor:
    return buffers.empty(shape, like.dtype, like.device)


def chunk_tokens(plan: Plan, tokens: int, device: torch.device, itemsize: int) -> int:
    """Tokens per chunk. Off the CPU, and for one-step chains, all of them (a GPU wants
    large launches; one bmm has no intermediate to keep in cache). Otherwise as many as
    keep the widest intermediate within CHUNK_BYTES (:func:`cache_fit`), but no fewer than
    make re-reading the factors (once per chunk) cost less than the activations."""
    if device.type != "cpu" or len(plan.steps) == 1:
        return max(tokens, 1)
    per_token = lambda o: math.prod(plan.sizes[i] for i in o if i != plan.token)
    acts = [per_token(o) for o in [plan.input_order, plan.output_order] +
            [st.out_order for st in plan.steps]]
    weights = sum(math.prod(plan.sizes[i] for i in st.factor_order) for st in plan.steps)
    amortised = 1 << (-(-weights // sum(acts)) - 1).bit_length()  # a power of two, up
    return min(max(tokens, 1), max(cache_fit(max(acts) * itemsize), amortised))


def tracing() -> bool:
    """Whether torch.compile or torch.jit.trace is tracing or a torch.func transform (grad,
    vmap, ...) is active. The custom autograd Functions here write into preallocated
    buffers and use the old ``forward(ctx, ...)`` form, which none of them supports;
    ``auto`` routes then take plain torch ops instead."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or transforming()


def transforming() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is active, outside
    torch.compile and torch.jit.trace."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active and active())


def dual(*tensors) -> bool:
    """Whether any of ``tensors`` carries a forward-mode AD tangent
    (``torch.autograd.forward_ad``): the custom autograd Functions here have no ``jvp``,
    so such inputs take plain torch ops. Free outside a ``dual_level``."""
    if getattr(_forward_ad, "_current_level", -1) < 0:
        return False
    return any(t is not None and _forward_ad.unpack_dual(t).tangent is not None
               for t in tensors)


def batched(grad) -> bool:
    """Whether ``grad`` is a batch of gradients that autograd passes through one backward
    (``autograd.grad(..., is_grads_batched=True)``, ``jacobian``/``hessian`` with
    ``vectorize=True``): a tensor under autograd's own vmap, which supports neither the
    ``out=`` operations nor the copies into preallocated buffers of the custom backwards
    here, so they differentiate plain torch ops instead."""
    check = getattr(getattr(torch._C, "_functorch", None), "is_legacy_batchedtensor", None)
    return isinstance(grad, torch.Tensor) and check is not None and bool(check(grad))


def vmapping() -> bool:
    """Whether a torch.func.vmap is active (at any depth of nested transforms); not asked
    while compiling or tracing, which cannot follow the interpreter stack."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or not tracing():
        return False
    try:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:  # pragma: no cover - older torch: assume the worst
        return True
    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def exporting() -> bool:
    """Whether torch.export is tracing (which also counts as compiling). The flag export
    sets is read where torch has it: torch 2.11's dynamo answers is_exporting() with True
    under every torch.compile too."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if isinstance(flag, bool):
        return flag
    check = getattr(torch.compiler, "is_exporting", None)
    return bool(check and check())


def fake(*tensors) -> bool:
    """Whether these tensors hold no values: fake tensors, as a non-strict torch.export
    traces with, which torch before 2.5 does not report through is_exporting. Only for code
    that runs eagerly: dynamo cannot trace the check. Plain tensors answer at once."""
    if all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors):
        return False
    return torch._guards.detect_fake_mode(tensors) is not None


def autocasting(device: torch.device) -> bool:
    """Whether autocast is on for this device (False for devices without autocast, such
    as meta, where torch.is_autocast_enabled raises)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return False


def fixed_sizes(fn):
    """For checks of sizes that a torch.jit.trace records as fixed (the input width, the
    factors' shapes): its warning that a size became a Python bool is expected there, since
    a trace is for those sizes anyway, and would only hide warnings that matter. Only
    warnings raised in einc's own code are silenced: code run for the user (a core's
    parametrisation, a hook) keeps its warnings."""
    @functools.wraps(fn)
    def checked(*args, **kwargs):
        if not torch.jit.is_tracing():
            return fn(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"einc\.")
            return fn(*args, **kwargs)
    return checked


@fixed_sizes
def check_input(x, in_features: int, device: torch.device | None = None) -> None:
    """A layer's input must be a dense floating-point tensor whose last dimension is
    ``in_features``, on the layer's ``device`` when given; anything else is named here,
    not by an error deep inside."""
    if not isinstance(x, torch.Tensor):
        raise CompileError(f"expected a tensor input, got {type(x).__name__}")
    if x.is_nested:  # its sizes cannot be read: torch's own error says to file an issue
        raise CompileError("nested tensors are not supported: pad them into one tensor "
                           "(x.to_padded_tensor(0.0)) or pass their rows concatenated")
    if x.layout != torch.strided:  # sparse (or mkldnn) tensors cannot be reshaped
        raise CompileError(f"input layout {x.layout} is not supported, only torch.strided: "
                           "convert it, e.g. x.to_dense()")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise CompileError(f"expected input with last dimension {in_features}, got shape "
                           f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise CompileError(f"expected a floating-point input, got {x.dtype}: convert it, "
                           f"e.g. x.float()")
    # a comparison of device objects: no host sync, and a constant to torch.compile
    if device is not None and x.device != device:
        # a meta layer has no values to copy: it moves with to_empty (then is initialised)
        move = "to_empty(device=" if device.type == "meta" else "to("
        raise CompileError(f"input on device {x.device} differs from the layer's {device}: "
                           f"move one of them (x.to('{device}') or module.{move}'{x.device}'))")


def check_module(name: str, model) -> None:
    """The model a model-wide function (``name``) walks must be an nn.Module."""
    if not isinstance(model, torch.nn.Module):
        raise CompileError(f"{name} takes a torch.nn.Module, got {type(model).__name__}")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_room(numel: int, dtype, device) -> None:
    """Refuse parameters larger than the device's whole memory before allocating them (on
    the CPU an allocation past the RAM may succeed and the process be killed when the
    values are drawn)."""
    dtype = dtype or torch.get_default_dtype()
    dev = torch.device(device) if device is not None else torch.get_default_device()
    need, total = numel * dtype.itemsize, None
    if dev.type == "cpu":
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not every platform reports it
            pass
    elif dev.type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(dev).total_memory
    if total is not None and 0 < total < need:  # sysconf reports -1 when it cannot tell
        raise CompileError(f"the layer's parameters need {_gib(need)} ({numel:,} values of "
                           f"{dtype}), more than this machine's {dev.type} memory "
                           f"({_gib(total)}): choose smaller sizes")


@contextlib.contextmanager
def allocating(numel: int, dtype, device):
    """Around the allocation of a layer's ``numel`` parameters: :func:`check_room` first,
    and a failed allocation becomes a CompileError."""
    check_room(numel, dtype, device)
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not (isinstance(e, MemoryError) or "alloc" in str(e).lower()
                or "out of memory" in str(e)):
            raise
        dtype = dtype or torch.get_default_dtype()
        raise CompileError(f"cannot allocate the layer's parameters: {numel:,} values of "
                           f"{dtype} ({_gib(numel * dtype.itemsize)}); choose smaller "
                           "sizes") from None


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_flag(name: str, value) -> bool:
    """A True/False argument (``bias``, ``deterministic``) as a bool: Python and numpy
    bools and the integers 0 and 1 (which nn.Linear takes too); anything else, such as
    None or "yes", is refused instead of being read by its truth."""
    if isinstance(value, (bool, np.bool_)) or (
            isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise CompileError(f"{name} must be True or False, got {value!r}")


def available_devices() -> list[str]:
    """The devices this torch build and machine can hold a layer on, for messages: cpu,
    meta and the accelerator (cuda, mps, ...) if one is present, with its indices."""
    found = ["cpu", "meta"]
    acc = getattr(torch, "accelerator", None)  # torch >= 2.6
    if acc is not None and acc.is_available():
        kind, count = acc.current_accelerator().type, acc.device_count()
    elif torch.cuda.is_available():
        kind, count = "cuda", torch.cuda.device_count()
    elif torch.backends.mps.is_available():
        kind, count = "mps", 1
    else:
        return found
    return found + [kind, f"{kind}:0" if count == 1 else f"{kind}:0 to {kind}:{count - 1}"]


def check_device(device) -> torch.device | None:
    """A layer's ``device`` argument as a torch.device: None (torch's default) or what
    torch.device takes (a string, a torch.device, an accelerator index) naming a device
    this build and machine can allocate on. Refused here instead of by torch's parse error
    or its 'Torch not compiled with CUDA enabled' from inside the allocation."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
        # an empty tensor allocates nothing; every backend that cannot serve the device
        # refuses in its own way (RuntimeError, AssertionError, NotImplementedError,
        # ModuleNotFoundError), hence the broad except
        torch.empty(0, device=dev)
    except Exception:
        raise CompileError(f"device must be None or one of {', '.join(available_devices())} "
                           f"(those this torch build and machine can use), got {device!r}"
                           ) from None
    return dev


def check_dtype(dtype) -> None:
    """A layer's ``dtype`` argument: None (torch's default) or a floating-point dtype."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        allowed = ", ".join(str(t) for t in FLOAT_DTYPES)
        raise CompileError(f"dtype must be None or one of {allowed}; got {dtype!r}")


def dtype_mismatch(got: torch.dtype, want: torch.dtype):
    if want not in FLOAT_DTYPES:  # parameters moved to a complex dtype by module.to()
        return CompileError(f"the layer's parameters are {want}; einc layers compute in "
                            f"floating point: module.to(torch.float32) or another float dtype")
    return CompileError(f"input dtype {got} differs from the layer's {want}: convert one of "
                        f"them (x.to({want}) or module.to({got}))")


def cache_fit(row_bytes: int) -> int:
    """The largest power of two of rows of ``row_bytes`` within CHUNK_BYTES, at least
    MIN_CHUNK."""
    return max(MIN_CHUNK, 1 << (max(1, CHUNK_BYTES // max(1, row_bytes)).bit_length() - 1))


def _size(sizes, group) -> int:
    return math.prod(sizes[i] for i in group)


def _forward_steps(plan: Plan, sizes: dict, x, factors, scratch: Scratch, rows,
                   keep: bool = True):
    """The chain on one chunk, its result written into ``rows`` (this chunk's rows of y,
    in plan.output_order). Returns each step's input (kept for backward; with ``keep``
    False nothing is kept and the intermediates are scratch). The last result goes to
    scratch and is copied into ``rows`` unless its order is already theirs."""
    cur, order = x, plan.input_order
    saved = []
    steps = plan.steps
    for k, st in enumerate(steps):
        if st.relayout:
            shape = [sizes[i] for i in st.in_order]
            buf = _empty(shape, x) if keep else scratch.get(("in", k), shape)
            cur, order = relayout(cur, order, st.in_order, buf), st.in_order
        direct = st.out_order == st.batch + st.left + st.right
        shape = tuple(_size(sizes, g) for g in
                      ((st.batch, st.left, st.right) if direct else (st.batch, st.right, st.left)))
        if k == len(steps) - 1:
            out = rows.view(shape) if not plan.output_copy else scratch.get("out", shape)
        elif steps[k + 1].relayout or not keep:  # only its relayout is kept, or nothing
            out = scratch.get(("out", k), shape)
        else:
            out = _empty(shape, x)
        bmm_into(view3(cur, order, sizes, (st.batch, st.left, st.contracted)),
                 view3(factors[st.factor], st.factor_order, sizes,
                       (st.batch, st.contracted, st.right)), not direct, out)
        if keep:
            saved.append(cur)
        cur, order = out.view([sizes[i] for i in st.out_order]), st.out_order
    if plan.output_copy:
        rows.copy_(cur.permute([order.index(i) for i in plan.output_order]))
    return saved


def _backward_steps(plan: Plan, sizes: dict, dy, saved, factors, need_f, grads,
                    scratch: Scratch, dx_rows):
    """Gradients of one chunk: factor gradients added into ``grads``; dx written into
    ``dx_rows`` (in plan.input_order) unless it is None."""
    last = plan.steps[-1]
    if plan.output_copy or not dy.is_contiguous():
        buf = scratch.get("dy", [sizes[i] for i in last.out_order])
        d = relayout(dy, plan.output_order, last.out_order, buf)
    else:
        d = dy.view([sizes[i] for i in last.out_order])
    for k in range(len(plan.steps) - 1, -1, -1):
        st = plan.steps[k]
        dc = view3(d, st.out_order, sizes, (st.batch, st.left, st.right))
        left = view3(saved[k], st.in_order, sizes, (st.batch, st.left, st.contracted))
        f = factors[st.factor]
        if need_f[st.factor]:
            grads[st.factor] = _factor_grad(left, dc, grads[st.factor], scratch)
        if k == 0 and dx_rows is None:
            return
        # dL in [B][M][K] or [B][K][M], whichever is the order the previous step wrote
        # (then no copy); else the one a copy into that order moves rows for.
        prev = plan.steps[k - 1].out_order if k else plan.input_order
        b_, m_, k_ = st.batch, st.left, st.contracted
        transposed = _transposed_result(b_ + m_ + k_, b_ + k_ + m_, prev, sizes)
        groups = (b_, k_, m_) if transposed else (b_, m_, k_)
        got = groups[0] + groups[1] + groups[2]
        shape = [_size(sizes, g) for g in groups]
        fits = _same(got, prev, sizes)
        if k == 0:
            out = dx_rows.view(shape) if fits else scratch.get("dx", shape)
        else:
            out = scratch.get(("dl", k), shape)
        rv = view3(f, st.factor_order, sizes, (b_, k_, st.right))
        bmm_into(dc, rv.transpose(1, 2), transposed, out)
        dl = out.view([sizes[i] for i in got])
        if k == 0:
            if not fits:
                dx_rows.copy_(dl.permute([got.index(i) for i in prev]))
        elif fits:
            d = dl.view([sizes[i] for i in prev])
        else:
            d = relayout(dl, got, prev, scratch.get(("dr", k), [sizes[i] for i in prev]))


def _factor_grad(left, dc, acc=None, scratch: Scratch | None = None):
    """dF = L^T dC per batch, added into ``acc`` (a previous result of this function) when
    given. Returns (the 3-D sum, whether it is held transposed as [B][N][K]). The form
    (L^T dC, or dC^T L transposed once after the last chunk) is the one with more row-major
    operands; on a tie dC^T L where L is read batch-middle (L^T would be a column-major
    batch-middle operand, a slow CPU path). Half-precision products are summed over the
    chunks in float32, as one large product would accumulate them."""
    if acc is None:
        # row-major operands per form: both transposed measured 2x slower for skinny results
        rows = lambda t: t.stride(2) == 1 or t.shape[2] == 1
        direct = rows(left.transpose(1, 2)) + rows(dc)
        flipped = rows(dc.transpose(1, 2)) + rows(left)
        if direct != flipped:
            held = flipped > direct
        else:
            held = not (left.stride(0) >= max(left.stride(1), left.stride(2))
                        or left.shape[0] == 1)
    else:
        g, held = acc
    a, b = (dc.transpose(1, 2), left) if held else (left.transpose(1, 2), dc)
    shape = (a.shape[0], a.shape[1], b.shape[2])
    if acc is None:
        g = torch.bmm(a, b, out=_empty(shape, dc))
        return (g.float() if _half(g) else g), held
    if g.dtype == a.dtype:
        g.baddbmm_(a, b)
    else:
        g.add_(torch.bmm(a, b, out=scratch.get("dF", shape)))
    return acc


def _half(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float16, torch.bfloat16)


def _factor_result(acc, like: torch.Tensor) -> torch.Tensor:
    """The accumulated factor gradient in the factor's storage order [B][K][N], dtype."""
    g, held = acc
    g = g.transpose(1, 2).contiguous() if held else g
    return g.to(like.dtype).view(like.shape)


def chain_plain(plan: Plan, x, bias, *factors) -> torch.Tensor:
    """ChainFunction's result from plain, differentiable torch ops (no buffers, no out=):
    the computation that a backward with ``create_graph=True`` differentiates."""
    sizes = dict(plan.sizes, **{plan.token: x.shape[0]})
    cur, order = x, plan.input_order
    for st in plan.steps:
        if st.relayout:
            cur, order = relayout(cur, order, st.in_order), st.in_order
        a = view3(cur, order, sizes, (st.batch, st.left, st.contracted))
        b = view3(factors[st.factor], st.factor_order, sizes,
                  (st.batch, st.contracted, st.right))
        direct = st.out_order == st.batch + st.left + st.right
        out = torch.bmm(a, b) if direct else torch.bmm(b.transpose(1, 2), a.transpose(1, 2))
        cur, order = out.reshape([sizes[i] for i in st.out_order]), st.out_order
    y = relayout(cur, order, plan.output_order)
    return y if bias is None else y + bias


def regrad(fn, inputs, needs, dy) -> list:
    """Gradients of ``fn(*inputs)`` against ``dy`` for the inputs that ``needs`` marks, with
    graphs (for a backward run with ``create_graph=True``); None for the others."""
    want = [i for i, (t, n) in enumerate(zip(inputs, needs)) if n and t is not None]
    with torch.enable_grad():
        # fresh aliases: partial derivatives for this use of each input only, where one
        # input depends on another (the gates on x through the router); graphs still
        # reach the inputs through them
        inputs = [t if t is None else t.view_as(t) for t in inputs]
        y = fn(*inputs)
        got = torch.autograd.grad(y, [inputs[i] for i in want], dy, create_graph=True,
                                  allow_unused=True)
    out = [None] * len(inputs)
    for i, g in zip(want, got):
        out[i] = torch.zeros_like(inputs[i]) if g is None else g
    return out


class ChainFunction(torch.autograd.Function):
    """y = chain(x, *factors) + bias; x contiguous in plan.input_order (token first), each
    factor contiguous in its step's storage order, ``bias`` None or shaped like one token's
    output. Returns y contiguous in plan.output_order. Tokens run ``chunk`` at a time."""

    @staticmethod
    def forward(ctx, plan: Plan, chunk: int, keep: bool, x, bias, *factors):
        tokens = x.shape[0]
        chunk = max(1, min(chunk, tokens))
        y = _empty([tokens, *(plan.sizes[i] for i in plan.output_order[1:])], x)
        scratch, saved = Scratch(x), []
        for c0 in range(0, tokens, chunk):
            n = min(chunk, tokens - c0)
            rows = y[c0:c0 + n]
            saved += _forward_steps(plan, dict(plan.sizes, **{plan.token: n}), x[c0:c0 + n],
                                    factors, scratch, rows, keep)
            if bias is not None:  # while the rows are in cache
                rows.add_(bias)
        ctx.plan, ctx.tokens, ctx.chunk, ctx.has_bias = plan, tokens, chunk, bias is not None
        # x and bias (inputs, no copies) only for a differentiable backward
        ctx.save_for_backward(x, bias, *saved, *factors)
        return y

    @staticmethod
    def backward(ctx, dy):
        plan, tokens, chunk = ctx.plan, ctx.tokens, ctx.chunk
        nsteps = len(plan.steps)
        nf = len(ctx.needs_input_grad) - 5  # after plan, chunk, keep, x and bias
        x, bias, *saved = ctx.saved_tensors
        saved, factors = saved[:-nf], saved[-nf:]
        if torch.is_grad_enabled() or batched(dy):  # create_graph=True, or a batch of dy
            return (None, None, None, *regrad(lambda *t: chain_plain(plan, *t),
                                              [x, bias, *factors], ctx.needs_input_grad[3:], dy))
        need_b = ctx.has_bias and ctx.needs_input_grad[4]
        need_f = ctx.needs_input_grad[5:]
        grads, db, dx = [None] * nf, None, None
        if ctx.needs_input_grad[3]:
            dx = _empty([tokens, *(plan.sizes[i] for i in plan.input_order[1:])], dy)
        scratch = Scratch(dy)
        for j, c0 in enumerate(range(0, tokens, chunk)):
            n = min(chunk, tokens - c0)
            rows = dy[c0:c0 + n]
            if need_b:  # while the rows are in cache; half precision summed in float32
                part = rows.reshape(n, -1).sum(0, dtype=torch.float32 if _half(dy) else None)
                db = part if db is None else db.add_(part)
            _backward_steps(plan, dict(plan.sizes, **{plan.token: n}), rows,
                            saved[j * nsteps:(j + 1) * nsteps], factors, need_f, grads,
                            scratch, None if dx is None else dx[c0:c0 + n])
        if need_b and db is None:  # no tokens
            db = dy.new_zeros(dy.shape[1:])
        grads = [_factor_result(g, f) if g is not None else
                 torch.zeros_like(f) if need_f[k] else None  # no tokens
                 for k, (g, f) in enumerate(zip(grads, factors))]
        db = None if db is None else db.to(dy.dtype).view(dy.shape[1:])
        return (None, None, None, dx, db, *grads)
