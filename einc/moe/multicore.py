"""BTT-MoE of three or more cores, in plain torch ops (autograd does the backward).

Core ``j`` of ``c`` consumes input index ``i(c-j+1)`` and produces ``oj``, batched over the
outputs already produced and the inputs not yet consumed; the expert index joins every core
(``bttmoe(cores=3)``: ``x[i1 i2 i3] A[i1 i2 i3 o1 r] B[o1 i1 i2 r o2] C[o1 o2 i1 r o3]``).
The index names, the order of every core's axes and the equation all come from the
``bttmoe`` preset, so the layer computes exactly the structure the analysis reports.

The sparse path sorts the ``N * k`` slots by expert into (expert, capacity) rows, the
capacity being the largest expert load (one host sync), runs each core as one einsum with
the expert as a batch index, and gathers every token's ``k`` rows back for a fixed-order
gated sum. Padding rows read a zero row and are never gathered back; their cost is the
layout's ``E * C / (N * k)`` (1 when the load is balanced).
"""
from __future__ import annotations

import functools
import math
import string
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..analysis.concrete import near_factors  # noqa: F401  (the layer's default sizes)
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
BACKENDS = ("auto", "padded")


def check_backend(backend: str, cores: int) -> None:
    if backend not in BACKENDS:
        from ..errors import CompileError
        raise CompileError(f"backend {backend!r} runs two-core BTT-MoE layers only; a layer "
                           f"of cores={cores} runs on: {', '.join(BACKENDS)}")


def run_cores(x: Tensor, cores: Sequence[Tensor], lay: Layout, sizes: dict,
              expert_idx: Tensor, gate: Tensor, deterministic: bool, masked: bool) -> Tensor:
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
                        deterministic, masked)
    return _run(x, cores, lay, sizes, expert_idx, gate, deterministic, masked)


def _run(x, cores, lay, sizes, expert_idx, gate, deterministic, masked):
    from ..runtime.fused import exporting, fake, vmapping

    if (masked or x.shape[0] == 0 or torch.jit.is_tracing() or exporting() or vmapping()
            or x.device.type == "meta"):
        return masked_cores(x, cores, lay, sizes, expert_idx, gate)
    if torch.compiler.is_compiling():
        return _sparse_eager(x, cores, lay, sizes, expert_idx, gate, deterministic)
    if fake(x, *cores):
        return masked_cores(x, cores, lay, sizes, expert_idx, gate)
    return sparse_cores(x, cores, lay, sizes, expert_idx, gate, deterministic)


@torch.compiler.disable
def _sparse_eager(x, cores, lay, sizes, expert_idx, gate, deterministic):
    """The dispatch between two compiled graphs: its capacity is a host sync."""
    from ..runtime.fused import fake

    if torch.compiler.is_compiling() or fake(x, *cores):  # where disable() does not apply
        return masked_cores(x, cores, lay, sizes, expert_idx, gate)
    return sparse_cores(x, cores, lay, sizes, expert_idx, gate, deterministic)
