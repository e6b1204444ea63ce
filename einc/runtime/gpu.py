"""The "triton" route: the planned chain on the strided batched-matmul kernel.

The CPU route (:mod:`einc.runtime.fused`) runs every step as a ``bmm`` into a fresh
``[B][M][N]`` or ``[B][N][M]`` tensor, so wherever the next step wants another order it
copies (a relayout), and the last result is permuted into ``y`` when its order differs.
:func:`einc.kernels.strided_bmm` addresses each of its four index groups through up to
``MAX_GROUP_AXES`` axes with arbitrary strides, so here every step

* reads its left operand in exactly the layout the previous step wrote,
* reads its factor in the factor's storage layout,
* writes its result directly in the layout the next step reads (the last step straight
  into ``y``'s ``[n][out]`` order, the bias added in its epilogue).

Backward runs the same problems with the roles swapped: ``dF = L^T dC`` is written in the
factor's storage layout, ``dL = dC F^T`` in ``L``'s layout (``dx`` in ``x``'s), and ``dC``
is read through the strides autograd hands over (an expanded ``dy`` costs nothing).

Layout choice per intermediate ``j`` (written by step ``j-1``, read by step ``j``): the
order step ``j`` reads (no copy) when every launch touching it (forward, ``dF`` and ``dL``
of both steps) fits the kernel's axis limit, else the plan's CPU layout with its relayout
copy, which always fits (every group is one run there). The cheapest combination over the
chain is kept; ties go to the direct layouts.

Triton is optional: nothing here imports it, and the route refuses to run (it is not a
silent fallback) where the kernel cannot run: no triton, or a CPU tensor without
``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import importlib
import itertools
import math
from dataclasses import dataclass

import torch

from ..codegen.plan import Plan
from ..errors import CompileError, EincError
from .fused import _same, _strides, batched, relayout

# the module (the package re-exports the function under the same name)
sbmm = importlib.import_module("einc.kernels.strided_bmm")

__all__ = ["TritonChainFunction", "forward_triton", "route_available", "compile_program"]

#: axes per group a launch may have after merging (the kernel's limit; lower it to force
#: the relayout fallback)
AXIS_LIMIT = sbmm.MAX_GROUP_AXES


def route_available(x: torch.Tensor | None = None) -> bool:
    """Whether the triton route can run for ``x`` (on its device): triton importable, and
    ``x`` on CUDA, or the Triton interpreter on. Without ``x``: for any device here."""
    if not sbmm.triton_available():
        return False
    if x is None:
        return True
    return x.is_cuda or sbmm._interpreting()


# ---------------------------------------------------------------------------- launches
@dataclass(frozen=True)
class _Op:
    """One strided_bmm: its spec (for the torch fallback) and canonical kernel problem
    (None when a group has more axes than the kernel takes after merging)."""

    spec: sbmm.StridedBmmSpec
    problem: object

    @property
    def fits(self) -> bool:
        return self.problem is not None


def _op(sizes, groups, a_str, b_str, c_str) -> _Op:
    """C[bt, m, n] = sum_k A[bt, m, k] B[bt, k, n]; groups = (bt, m, k, n) index tuples,
    each ``*_str`` a dict index -> element stride of that operand."""
    bt, m, k, n = groups
    size = lambda g: tuple(sizes[i] for i in g)
    spec = sbmm.StridedBmmSpec(
        batch_sizes=size(bt), m_sizes=size(m), n_sizes=size(n), k_sizes=size(k),
        a_strides=tuple(a_str[i] for i in bt + m + k),
        b_strides=tuple(b_str[i] for i in bt + k + n),
        c_strides=tuple(c_str[i] for i in bt + m + n))
    problem = sbmm._make_problem(sbmm._spec_axes(spec), "a", "b", "c")
    fits = all(len(g) <= AXIS_LIMIT for g in problem.groups.values())
    return _Op(spec, problem if fits else None)


def _run(op: _Op, a, b, out, accumulate=False, bias=None) -> None:
    """Launch ``op`` (pointers from each tensor's data_ptr), or its torch reference.
    ``bias``: added per column of ``out``, a row-major ``[n][columns]`` matrix."""
    if op.fits and sbmm._triton_usable(a):
        sbmm._run(op.problem, a, b, out, 1.0, accumulate, bias, out.shape[-1] if bias is not None else 1)
    else:
        sbmm.strided_bmm_reference(a, b, op.spec, out, accumulate=accumulate)
        if bias is not None:
            out[:, :bias.numel()] += bias


@dataclass(frozen=True)
class _StepOps:
    fwd: _Op   # C = L F
    dF: _Op    # dF = L^T dC   (written in the factor's storage layout)
    dL: _Op    # dL = dC F^T   (written in L's layout)


def _step_ops(st, sizes, l_str, f_str, c_str) -> _StepOps:
    B, M, K, N = st.batch, st.left, st.contracted, st.right
    fstore = _strides(st.factor_order, sizes)  # gradients: contiguous in storage order
    return _StepOps(
        fwd=_op(sizes, (B, M, K, N), l_str, f_str, c_str),
        dF=_op(sizes, (B, K, M, N), l_str, c_str, fstore),
        dL=_op(sizes, (B, M, N, K), c_str, f_str, l_str))


# ---------------------------------------------------------------------------- program
@dataclass
class Program:
    """Layouts and launches of one plan at one token count (and factor strides).

    ``read[k]``: memory order step k reads its left operand in; ``write[k]``: the order
    step k writes its result in. A copy sits between them where they differ (and between
    x / y and the first read / last write)."""

    plan: Plan
    tokens: int
    d_out: int
    sizes: dict
    read: tuple
    write: tuple
    ops: tuple
    f_strides: tuple
    _dy_ops: dict

    def __post_init__(self):
        # which edges need a relayout copy, looked up on every call
        p, n, sz = self.plan, len(self.plan.steps), self.sizes
        self.copy_in = not _same(self.read[0], p.input_order, sz)
        self.copy_between = tuple(not _same(self.write[k], self.read[k + 1], sz) for k in range(n - 1))
        self.direct_y = _same(self.write[-1], p.output_order, sz)
        self.padded_out = math.prod(sz[i] for i in p.output_order[1:])

    @property
    def copies(self) -> int:
        """Relayout copies in forward (backward has the same number)."""
        p, n = self.plan, len(self.plan.steps)
        c = not _same(self.read[0], p.input_order, self.sizes)
        c += sum(not _same(self.write[k], self.read[k + 1], self.sizes) for k in range(n - 1))
        return c + (not _same(self.write[-1], p.output_order, self.sizes))

    def numel(self, order) -> int:
        return math.prod(self.sizes[i] for i in order)

    def last_ops(self, dy_str: dict) -> _StepOps:
        """The last step's ops with dC read through ``dy``'s own strides."""
        key = tuple(sorted(dy_str.items()))
        if key not in self._dy_ops:
            k = len(self.plan.steps) - 1
            st = self.plan.steps[k]
            self._dy_ops[key] = _step_ops(st, self.sizes, _strides(self.read[k], self.sizes),
                                          self.f_strides[st.factor], dy_str)
        return self._dy_ops[key]


def compile_program(plan: Plan, tokens: int, d_out: int, factor_strides) -> Program:
    """Choose the layouts of every intermediate (see the module docstring)."""
    sizes = dict(plan.sizes, **{plan.token: tokens})
    steps = plan.steps
    n = len(steps)
    f_str = {st.factor: dict(zip(st.factor_order, factor_strides[st.factor])) for st in steps}

    def uniq(opts):
        out = []
        for o in opts:
            if not any(_same(o[0], p[0], sizes) and _same(o[1], p[1], sizes) for p in out):
                out.append(o)
        return out

    # per edge j (0: x, n: y): options (write order, read order)
    edges = [uniq([(plan.input_order, plan.input_order), (plan.input_order, steps[0].in_order)])]
    for j in range(1, n):
        i_, o_ = steps[j].in_order, steps[j - 1].out_order
        edges.append(uniq([(i_, i_), (o_, o_), (o_, i_)]))
    edges.append(uniq([(plan.output_order, plan.output_order),
                       (steps[-1].out_order, plan.output_order)]))

    cache = {}

    def ops(k, r, w):
        if (k, r, w) not in cache:
            st = steps[k]
            cache[k, r, w] = _step_ops(st, sizes, _strides(r, sizes), f_str[st.factor],
                                       _strides(w, sizes))
        return cache[k, r, w]

    numel = lambda o: math.prod(sizes[i] for i in o)
    best = None
    for combo in itertools.product(*edges):
        cost = sum(numel(w) for w, r in combo if not _same(w, r, sizes))
        misfits = sum(not op.fits for k in range(n)
                      for op in vars(ops(k, combo[k][1], combo[k + 1][0])).values())
        key = (misfits, cost)
        if best is None or key < best[0]:
            best = (key, combo)
    combo = best[1]
    read = tuple(combo[k][1] for k in range(n))
    write = tuple(combo[k + 1][0] for k in range(n))
    return Program(plan, tokens, d_out, sizes, read, write,
                   tuple(ops(k, read[k], write[k]) for k in range(n)),
                   tuple(f_str.get(i) for i in range(max(f_str) + 1)), {})


_PROGRAMS: dict = {}
_MAX_PROGRAMS = 512


def _program(plan, tokens, d_out, factors) -> Program:
    fs = tuple(tuple(f.stride()) for f in factors)
    key = (id(plan), tokens, d_out, fs)
    prog = _PROGRAMS.get(key)
    if prog is None or prog.plan is not plan:
        if len(_PROGRAMS) >= _MAX_PROGRAMS:
            _PROGRAMS.clear()
        prog = _PROGRAMS[key] = compile_program(plan, tokens, d_out, fs)
    return prog


# ---------------------------------------------------------------------------- autograd
def _shaped(t, order, sizes):
    return t.view([sizes[i] for i in order])


class TritonChainFunction(torch.autograd.Function):
    """``y = chain(x, *factors) (+ bias)``.

    ``x``: contiguous ``[n][padded_in]`` (plan.input_order); each factor a view in its
    step's storage order (any strides); ``bias``: ``(d_out,)`` or None. Returns ``y`` as a
    contiguous ``[n][padded_out]`` tensor (padded outputs zero, bias on the first d_out)."""

    @staticmethod
    def forward(ctx, prog: Program, x, bias, *factors):
        plan, sizes = prog.plan, prog.sizes
        steps, n = plan.steps, len(plan.steps)
        tokens = prog.tokens
        padded_out = prog.padded_out
        cur = x
        if prog.copy_in:
            cur = relayout(_shaped(x, plan.input_order, sizes), plan.input_order, prog.read[0])
        saved = []
        direct_y = prog.direct_y
        y = None
        for k, st in enumerate(steps):
            last = k == n - 1
            if last and direct_y:  # bias added in the kernel's epilogue
                out = y = x.new_empty(tokens, padded_out)
            else:
                out = x.new_empty(prog.numel(prog.write[k]))
            _run(prog.ops[k].fwd, cur, factors[st.factor], out,
                 bias=bias if last and direct_y else None)
            saved.append(cur)
            if not last:
                w, r = prog.write[k], prog.read[k + 1]
                cur = relayout(_shaped(out, w, sizes), w, r) if prog.copy_between[k] else out
        if not direct_y:
            y = relayout(_shaped(out, prog.write[-1], sizes), prog.write[-1],
                         plan.output_order).view(tokens, padded_out)
            if bias is not None:
                y[:, :prog.d_out] += bias
        ctx.prog = prog
        ctx.has_bias = bias is not None
        ctx.save_for_backward(*saved, *factors)
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # its kernels' results have no graph to differentiate
            raise EincError("the triton route has no second derivatives (backward with "
                            "create_graph=True); route='fused' or 'plain' has them")
        if batched(dy):  # autograd's vmap over the backward: the kernels take plain tensors
            raise EincError("the triton route takes no batch of gradients (autograd.grad "
                            "with is_grads_batched=True, jacobian or hessian with "
                            "vectorize=True); route='fused' or 'plain' takes them")
        prog = ctx.prog
        plan, sizes = prog.plan, prog.sizes
        steps, n = plan.steps, len(plan.steps)
        saved, factors = ctx.saved_tensors[:n], ctx.saved_tensors[n:]
        need_x, need_bias = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grads = [None] * len(factors)
        dbias = dy[:, :prog.d_out].sum(0) if (ctx.has_bias and need_bias) else None

        # dC of the last step: dy through its own strides where the kernel can read them
        last_ops = prog.ops[-1]
        if prog.direct_y:
            d = dy
            if dy.stride() != (prog.padded_out, 1):  # an expanded or strided dy, read in place
                inner = _strides(plan.output_order[1:], sizes)
                dy_str = {plan.token: dy.stride(0), **{i: dy.stride(1) * s for i, s in inner.items()}}
                last_ops = prog.last_ops(dy_str)
                if not (last_ops.dF.fits and last_ops.dL.fits):
                    d, last_ops = dy.contiguous(), prog.ops[-1]
        else:
            d = relayout(dy.contiguous().view([sizes[i] for i in plan.output_order]),
                         plan.output_order, prog.write[-1])
        dx = None
        for k in range(n - 1, -1, -1):
            st = steps[k]
            ops = last_ops if k == n - 1 else prog.ops[k]
            f = factors[st.factor]
            if ctx.needs_input_grad[3 + st.factor]:
                g = f.new_empty([sizes[i] for i in st.factor_order])
                _run(ops.dF, saved[k], d, g)
                grads[st.factor] = g
            if k == 0 and not need_x:
                break
            dl = f.new_empty(prog.numel(prog.read[k]))
            _run(ops.dL, d, f, dl)
            r = prog.read[k]
            w = prog.write[k - 1] if k else plan.input_order
            copy = prog.copy_between[k - 1] if k else prog.copy_in
            d = relayout(_shaped(dl, r, sizes), r, w) if copy else dl
        if need_x:
            dx = d.view([sizes[i] for i in plan.input_order])
        return (None, dx, dbias, *grads)


# ---------------------------------------------------------------------------- module entry
def forward_triton(module, x: torch.Tensor, dtype=None) -> torch.Tensor:
    """StructuredLinear's "triton" route (same conventions as the other routes); ``dtype``:
    the factors cast to it (autocast)."""
    if not route_available(x):
        raise CompileError(
            f"route 'triton' cannot run for a tensor on {x.device}: it needs triton and a "
            "CUDA device (or TRITON_INTERPRET=1 for the interpreter on CPU); the other "
            "routes: auto, fused, plain, einsum, steps")
    low = module.lowered
    lead = x.shape[:-1]
    z = x.reshape(-1, module.in_features)
    if low.padded_in > low.d_in:
        z = torch.nn.functional.pad(z, (0, low.padded_in - low.d_in))
    n = z.shape[0]
    z = z.contiguous().view(n, *low.input_sizes)
    facs = module._storage_factors(dtype)
    bias = module.bias
    if bias is not None:  # the kernel reads it with unit stride, in the input's dtype
        bias = bias.to(z.dtype).contiguous()
    prog = _program(low.plan, n, low.d_out, facs)
    y = TritonChainFunction.apply(prog, z, bias, *facs)
    if low.padded_out > low.d_out:
        y = y[:, :low.d_out]
    return y.reshape(*lead, module.out_features)
