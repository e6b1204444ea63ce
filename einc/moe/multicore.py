"""BTT-MoE of three or more cores, in torch's own operations (einsums, no kernels).

Core ``j`` of ``c`` consumes input index ``i(c-j+1)`` and produces ``oj``, batched over the
outputs already produced and the inputs not yet consumed; the expert index joins every core
(``bttmoe(cores=3)``: ``x[i1 i2 i3] A[i1 i2 i3 o1 r] B[o1 i1 i2 r o2] C[o1 o2 i1 r o3]``).
The index names, the order of every core's axes and the equation all come from the
``bttmoe`` preset, so the layer computes exactly the structure the analysis reports.

Two sparse paths, both sorting the ``N * k`` slots by expert: :class:`ChunkedCores` (the
CPU's) cuts each expert's run into cache-sized chunks and runs each as a rank-1 BTT the way
the dense layers' fused route runs a chunk of tokens (the planned chain of
:mod:`einc.codegen.plan` on the expert's slices of the cores), with a hand-written backward;
:func:`sparse_cores` (elsewhere, and under torch.func) lays the slots out as (expert,
capacity) rows, the capacity being the largest expert load (one host sync), runs each core
as one einsum with the expert as a batch index, and gathers every token's ``k`` rows back
for a fixed-order gated sum. Its padding rows read a zero row and are never gathered back;
their cost is the layout's ``E * C / (N * k)`` (1 when the load is balanced).
"""
from __future__ import annotations

import functools
import math
import string
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .dispatch import dense_gates


@dataclass(frozen=True)
class Layout:
    """Axis names of a ``c``-core BTT-MoE, from the ``bttmoe`` preset."""

    cores: int
    names: tuple[str, ...]                # the cores' attribute names: A, B, C, ...
    inputs: tuple[str, ...]               # x's indices
    outputs: tuple[str, ...]              # y's indices
    axes: tuple[tuple[str, ...], ...]     # every core's indices, in axis order
    expert: str                           # the expert index's name
    letters: dict                         # index name -> its letter in ``equation``
    equation: str                         # compact einsum, as the analysis spells it

    @property
    def expert_letter(self) -> str:
        return self.letters[self.expert]

    def consumed(self, j: int) -> str:
        """The input index core ``j`` (0-based) contracts: its fan-in."""
        return self.inputs[self.cores - 1 - j]

    def core_shape(self, j: int, sizes: dict) -> tuple[int, ...]:
        return tuple(sizes[i] for i in self.axes[j])


@functools.lru_cache(maxsize=None)
def layout(cores: int) -> Layout:
    from ..syntax import parse  # the preset itself: one definition of the structure

    s = parse(f"bttmoe(experts=1, k=1, cores={cores})")
    return Layout(cores, tuple(f.name for f in s.factors), s.input.indices, s.output.indices,
                  tuple(f.indices for f in s.factors), s.moe.expert_index, s.letters(),
                  s.equation)


def layer_sizes(lay: Layout, input_sizes: Sequence[int], output_sizes: Sequence[int],
                experts: int) -> dict:
    sizes = dict(zip(lay.inputs, input_sizes))
    sizes.update(zip(lay.outputs, output_sizes))
    sizes[lay.expert] = experts
    return sizes


def _spare_letter(lay: Layout) -> str:
    """A letter for the slot (or token) axis that no index uses."""
    used = set(lay.letters.values())
    return next(ch for ch in string.ascii_letters if ch not in used)


def masked_cores(x: Tensor, cores: Sequence[Tensor], lay: Layout, sizes: dict,
                 expert_idx: Tensor, gate: Tensor) -> Tensor:
    """Every expert on every token, then gated: ``x`` (N, prod inputs) -> (N, prod outputs).
    The cores run one by one, as the BTT chain, with the expert index kept until the gates
    sum over it: two-operand einsums (with more, torch.einsum asks opt_einsum for a path,
    which reads the batch size and so fixes it in an export)."""
    m, n = lay.letters, _spare_letter(lay)
    r = m[lay.expert]
    N = x.shape[0]
    z = x.reshape(N, *(sizes[i] for i in lay.inputs))
    held = list(lay.inputs)
    for j, (core, axes) in enumerate(zip(cores, lay.axes)):
        after = [i for i in axes if i != lay.consumed(j)]  # the expert index stays
        z = torch.einsum(f"{n}{''.join(m[i] for i in held)},{''.join(m[i] for i in axes)}"
                         f"->{n}{''.join(m[i] for i in after)}", z, core)
        held = after
    G = dense_gates(expert_idx, gate.to(x.dtype), sizes[lay.expert])
    y = torch.einsum(f"{n}{''.join(m[i] for i in held)},{n}{r}->{n}"
                     f"{''.join(m[i] for i in lay.outputs)}", z, G)
    return y.reshape(N, math.prod(sizes[o] for o in lay.outputs))


def _slot_plan(expert_idx: Tensor, E: int):
    """(capacity C, padded row of every slot in (token, choice) order, slot of every padded
    row or S for padding)."""
    N, k = expert_idx.shape
    S = N * k
    flat = expert_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    C = int(counts.max())  # one host sync: the capacity
    starts = torch.cumsum(counts, 0) - counts
    expert_of = flat[order]
    row = expert_of * C + torch.arange(S, device=flat.device) - starts[expert_of]
    slot_of_row = torch.full((E * C,), S, dtype=torch.long, device=flat.device)
    slot_of_row[row] = order
    slot_row = torch.empty_like(row)
    slot_row[order] = row
    return C, slot_row, slot_of_row


def _gather_rows(x: Tensor, slot_of_row: Tensor, k: int, deterministic: bool) -> Tensor:
    """x's row for every padded row, a zero row for padding. Gathering per slot (x's rows
    repeated k times first) makes every row's gradient one add; gathering per token is
    cheaper, and its gradient sums a token's k rows in whatever order the device adds."""
    N, D = x.shape
    zero = x.new_zeros(1, D)
    if deterministic:
        slots = x.unsqueeze(1).expand(N, k, D).reshape(N * k, D)
        return torch.cat([slots, zero]).index_select(0, slot_of_row)
    token = torch.div(slot_of_row, k, rounding_mode="floor")  # padding (N * k) -> N
    return torch.cat([x, zero]).index_select(0, token)


def sparse_cores(x: Tensor, cores: Sequence[Tensor], lay: Layout, sizes: dict,
                 expert_idx: Tensor, gate: Tensor, deterministic: bool) -> Tensor:
    """Only the k selected experts of each token: ``x`` (N, prod inputs) -> (N, prod
    outputs), see the module docstring."""
    N, k = expert_idx.shape
    E = sizes[lay.expert]
    m, slot = lay.letters, _spare_letter(lay)
    C, slot_row, slot_of_row = _slot_plan(expert_idx, E)
    z = _gather_rows(x, slot_of_row, k, deterministic).view(E, C, *(sizes[i] for i in lay.inputs))
    held = list(lay.inputs)  # z's axes after (expert, slot)
    r = m[lay.expert]
    for j, (core, axes) in enumerate(zip(cores, lay.axes)):
        consumed = lay.consumed(j)
        after = [i for i in axes if i not in (consumed, lay.expert)]
        eq = (f"{r}{slot}{''.join(m[i] for i in held)},{''.join(m[i] for i in axes)}"
              f"->{r}{slot}{''.join(m[i] for i in after)}")
        z = torch.einsum(eq, z, core)
        held = after
    # the last core leaves y's indices; put them in y's order
    width = math.prod(sizes[o] for o in lay.outputs)
    z = z.permute(0, 1, *(2 + held.index(o) for o in lay.outputs)).reshape(E * C, width)
    picked = z.index_select(0, slot_row).view(N, k, width)
    return (picked * gate.to(z.dtype).unsqueeze(-1)).sum(1)


#: the backends a layer of three or more cores runs on (the others are two-core kernels)
BACKENDS = ("auto", "chunked", "padded")


def check_backend(backend: str, cores: int) -> None:
    if backend not in BACKENDS:
        from ..errors import CompileError
        raise CompileError(f"backend {backend!r} runs two-core BTT-MoE layers only; a layer "
                           f"of cores={cores} runs on: {', '.join(BACKENDS)}")


def run_cores(x: Tensor, cores: Sequence[Tensor], lay: Layout, sizes: dict,
              expert_idx: Tensor, gate: Tensor, deterministic: bool, masked: bool,
              backend: str = "auto") -> Tensor:
    """The layer's experts on the routed rows ``x`` (N, prod inputs): masked (every
    expert) where asked, or where a dispatch cannot run (empty batch, tracing, export, vmap,
    meta or fake tensors: its sizes depend on the routing); otherwise sparse. Under autocast
    they run in autocast's dtype unless an operand is float64, which autocast leaves."""
    from ..runtime.fused import autocasting

    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    if autocasting(x.device) and all(t.dtype != torch.float64 for t in (x, *cores)):
        dt = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return _run(x.to(dt), [c.to(dt) for c in cores], lay, sizes, expert_idx, gate,
                        deterministic, masked, backend)
    return _run(x, cores, lay, sizes, expert_idx, gate, deterministic, masked, backend)


def _run(x, cores, lay, sizes, expert_idx, gate, deterministic, masked, backend):
    from ..runtime.fused import exporting, fake, vmapping

    if (masked or x.shape[0] == 0 or torch.jit.is_tracing() or exporting() or vmapping()
            or x.device.type == "meta"):
        return masked_cores(x, cores, lay, sizes, expert_idx, gate)
    if torch.compiler.is_compiling():
        return _sparse_eager(x, cores, lay, sizes, expert_idx, gate, deterministic, backend)
    if fake(x, *cores):
        return masked_cores(x, cores, lay, sizes, expert_idx, gate)
    return _dispatch(x, cores, lay, sizes, expert_idx, gate, deterministic, backend)


@torch.compiler.disable
def _sparse_eager(x, cores, lay, sizes, expert_idx, gate, deterministic, backend):
    """The dispatch between two compiled graphs: its capacity is a host sync."""
    from ..runtime.fused import fake

    if torch.compiler.is_compiling() or fake(x, *cores):  # where disable() does not apply
        return masked_cores(x, cores, lay, sizes, expert_idx, gate)
    return _dispatch(x, cores, lay, sizes, expert_idx, gate, deterministic, backend)


def _dispatch(x, cores, lay, sizes, expert_idx, gate, deterministic, backend):
    """chunked (CPU: the default there) or padded. torch.func transforms and forward-mode
    AD take padded whatever was named: ChunkedCores supports neither."""
    from .chunked import chunk_slots
    from ..runtime.fused import dual, tracing

    if tracing() or dual(x, gate, *cores) or backend == "padded" or (
            backend == "auto" and x.device.type != "cpu"):
        return sparse_cores(x, cores, lay, sizes, expert_idx, gate, deterministic)
    held = [lay.inputs] + [[i for i in a if i not in (lay.consumed(j), lay.expert)]
                           for j, a in enumerate(lay.axes)]
    widest = max(math.prod(sizes[i] for i in h) for h in held)
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate, *cores))
    return ChunkedCores.apply(x, expert_idx, gate, lay, sizes,
                              chunk_slots(widest, x.element_size()), keep, *cores)


@functools.lru_cache(maxsize=64)
def expert_plan(cores: int, size_items: tuple):
    """The planned chain (:mod:`einc.codegen.plan`) of one expert: the preset's equation
    with the expert index of size 1, at the layer's sizes (``size_items``: sorted (index,
    size) pairs). Its index names are the equation's letters."""
    from ..codegen.lower import cheapest_chains
    from ..codegen.plan import plan
    from ..syntax import as_structure

    lay = layout(cores)
    sizes = {lay.letters[i]: int(v) for i, v in size_items}
    sizes[lay.expert_letter] = 1
    s = as_structure(f"{lay.equation} with {', '.join(f'{i} = {v}' for i, v in sizes.items())}")
    return plan(s, sizes, cheapest_chains(s, sizes))


def _expert_major(core: Tensor, axes: tuple, order: tuple, lay: Layout) -> Tensor:
    """The core as (E, its other axes in the plan's storage ``order``), contiguous: every
    expert's slice is then the factor the planned chain reads."""
    letters = [lay.letters[i] for i in axes]
    e = letters.index(lay.expert_letter)
    return core.permute(e, *(letters.index(i) for i in order if i != lay.expert_letter)) \
        .contiguous()


def _core_layout(grad: Tensor, axes: tuple, order: tuple, lay: Layout) -> Tensor:
    """Inverse of :func:`_expert_major`: (E, *order) back to the core's own axis order."""
    letters = [lay.letters[i] for i in axes]
    held = [lay.expert_letter] + [i for i in order if i != lay.expert_letter]
    return grad.permute(*(held.index(i) for i in letters))


def _last_rows(plan, sizes: dict, cur: Tensor, factor: Tensor, scratch) -> Tensor:
    """The chain's last product on its saved input ``cur``, contiguous in the output's
    order: a chunk's ungated rows, recomputed rather than kept (they would add a tensor
    as large as y per core chain to the saved activations)."""
    from ..runtime.fused import _same, _size, bmm_into, relayout, view3

    st = plan.steps[-1]
    direct = st.out_order == st.batch + st.left + st.right
    groups = (st.batch, st.left, st.right) if direct else (st.batch, st.right, st.left)
    out = scratch.get("last", tuple(_size(sizes, g) for g in groups))
    bmm_into(view3(cur, st.in_order, sizes, (st.batch, st.left, st.contracted)),
             view3(factor, st.factor_order, sizes, (st.batch, st.contracted, st.right)),
             not direct, out)
    if _same(st.out_order, plan.output_order, sizes):
        return out
    z = out.view([sizes[i] for i in st.out_order])
    return relayout(z, st.out_order, plan.output_order,
                    scratch.get("last rows", [sizes[i] for i in plan.output_order]))


class ChunkedCores(torch.autograd.Function):
    """CPU sparse BTT-MoE of any number of cores: the slots sorted by expert, each expert's
    run in cache-sized chunks (as :mod:`einc.moe.chunked` for two cores), a chunk being one
    rank-1 BTT on its gathered rows, run as the dense layers' fused route runs a chunk of
    tokens (:func:`einc.runtime.fused._forward_steps`: bmm on strided views in the layouts
    the planner chose, the experts' slices of the cores stored in those layouts once per
    call), the gated rows then added into y. Backward by hand, chunk by chunk (autograd's
    backward of a chunk's gather would fill a gradient of the whole input, for every
    chunk), with the fused route's backward on the gated output gradient. Saved: every
    core's input but the first (re-gathered). The gate's gradient is the dot product of
    the output gradient with the slot's ungated output, the last product run once more
    on its saved input. ``x`` (N, prod inputs); returns (N, prod outputs)."""

    @staticmethod
    def forward(ctx, x, expert_idx, gate, lay, sizes, chunk, keep, *cores):
        from ..runtime.fused import Scratch, _forward_steps
        from .chunked import _chunks

        N, k = expert_idx.shape
        E = sizes[lay.expert]
        plan = expert_plan(lay.cores, tuple(sorted(sizes.items())))
        flat = expert_idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = torch.div(order, k, rounding_mode="floor")
        gates = gate.reshape(-1).index_select(0, order).to(x.dtype)
        chunks = _chunks(torch.bincount(flat, minlength=E).tolist(), chunk)
        order_of = {st.factor: st.factor_order for st in plan.steps}
        facs = [_expert_major(core, lay.axes[j], order_of[j], lay) for j, core in enumerate(cores)]
        d_in, width = x.shape[1], math.prod(sizes[o] for o in lay.outputs)
        # the fused route's steps permute rows held with one axis per index
        in_shape = [sizes[i] for i in lay.inputs]
        out_shape = [sizes[o] for o in lay.outputs]
        y = x.new_zeros(N, width)
        scratch, saved = Scratch(x), []
        for r, s0, s1 in chunks:
            tok, n = token[s0:s1], s1 - s0
            xc = torch.index_select(x, 0, tok, out=scratch.get("xg", (n, d_in)))
            rows = scratch.get("rows", (n, width))
            kept = _forward_steps(plan, dict(plan.sizes, **{plan.token: n}),
                                  xc.view(n, *in_shape), [f[r] for f in facs], scratch,
                                  rows.view(n, *out_shape), keep)
            if kept and not plan.steps[0].relayout:
                kept[0] = None  # the gathered rows themselves: scratch, gathered again
            saved += kept
            y.index_add_(0, tok, torch.mul(rows, gates[s0:s1, None],
                                           out=scratch.get("gated", (n, width))))
        ctx.plan, ctx.chunks, ctx.k = plan, chunks, k
        ctx.layout = (lay, sizes, len(cores), in_shape, out_shape)
        ctx.kept = [t is not None for t in saved]
        ctx.save_for_backward(x, expert_idx, gate, order, token, gates, *cores, *facs,
                              *(t for t in saved if t is not None))
        return y

    @staticmethod
    def backward(ctx, dy):
        from ..runtime.fused import (Scratch, _backward_steps, _factor_result, batched,
                                     regrad)

        x, expert_idx, gate, order, token, gates, *rest = ctx.saved_tensors
        lay, sizes, c, in_shape, out_shape = ctx.layout
        plan, chunks, k = ctx.plan, ctx.chunks, ctx.k
        cores, facs, rest = rest[:c], rest[c:2 * c], rest[2 * c:]
        need_x, _, need_gate = ctx.needs_input_grad[:3]
        need_cores = ctx.needs_input_grad[7:]
        if torch.is_grad_enabled() or batched(dy):  # create_graph=True, or a batch of dy
            plain = lambda x, gate, *cs: sparse_cores(x, cs, lay, sizes, expert_idx, gate,
                                                      deterministic=True)
            got = regrad(plain, [x, gate, *cores], [need_x, need_gate, *need_cores], dy)
            return (got[0], None, got[1], None, None, None, None, *got[2:])
        held = iter(rest)
        saved = [next(held) if kept else None for kept in ctx.kept]
        dy = dy.contiguous()
        N, d_in = x.shape
        width = dy.shape[1]
        nsteps = len(plan.steps)
        dx = torch.zeros_like(x) if need_x else None
        dgate = x.new_empty(order.shape[0]) if need_gate else None
        grads = {}  # expert -> per-core gradient accumulators (see _factor_grad)
        scratch = Scratch(x)
        for j, (r, s0, s1) in enumerate(chunks):
            tok, n = token[s0:s1], s1 - s0
            g = torch.index_select(dy, 0, tok, out=scratch.get("dyg", (n, width)))
            inputs = saved[j * nsteps:(j + 1) * nsteps]
            if inputs[0] is None:
                inputs[0] = torch.index_select(x, 0, tok, out=scratch.get("xg", (n, d_in)))
            if dgate is not None:  # <dy, ungated output>, the last product run once more
                sizes_n = dict(plan.sizes, **{plan.token: n})
                dgate[s0:s1] = torch.linalg.vecdot(
                    g, _last_rows(plan, sizes_n, inputs[-1], facs[plan.steps[-1].factor][r],
                                  scratch).view(n, width))
            g.mul_(gates[s0:s1, None])
            dx_rows = scratch.get("dxg", (n, d_in)) if dx is not None else None
            acc = grads.setdefault(r, [None] * c)
            _backward_steps(plan, dict(plan.sizes, **{plan.token: n}), g.view(n, *out_shape),
                            inputs, [f[r] for f in facs], need_cores, acc, scratch,
                            None if dx_rows is None else dx_rows.view(n, *in_shape))
            if dx is not None:
                dx.index_add_(0, tok, dx_rows)
        dcores = []
        for i, (core, fac, need) in enumerate(zip(cores, facs, need_cores)):
            if not need:
                dcores.append(None)
                continue
            d = torch.zeros_like(fac)
            for r, acc in grads.items():
                if acc[i] is not None:
                    d[r] = _factor_result(acc[i], fac[r])
            st = next(st for st in plan.steps if st.factor == i)
            dcores.append(_core_layout(d, lay.axes[i], st.factor_order, lay))
        grad_gate = None
        if dgate is not None:
            grad_gate = torch.empty_like(dgate).index_copy_(0, order, dgate)
            grad_gate = grad_gate.view(-1, k).to(gate.dtype)
        return (dx, None, grad_gate, None, None, None, None, *dcores)
