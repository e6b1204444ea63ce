"""``BTTMoE``: a BTT layer whose rank index is an expert index.

The layer is the two-core BTT ``ga,gafr,fgre->fe`` with rank ``r`` of size
``E`` (the number of experts).  Expert ``r`` is the rank-1 BTT

    y_r[f, e] = sum_{g, a} x[g, a] A[g, a, f, r] B[f, g, r, e]

and a router (``nn.Linear(in_features, E)``, zero-initialised) picks the top
``k`` experts of every token; the softmax over the ``k`` selected logits
weights them.  The forward pass runs only the selected experts
(:func:`einc.moe.dispatch.btt_moe_sparse`); :meth:`BTTMoE.forward_masked`
evaluates the same function by computing every expert and masking.

Each forward pass stores ``aux_loss``: the switch load-balancing loss
``E * sum_r f_r * P_r`` (``f_r``: fraction of the ``N * k`` token slots sent to
``r``; ``P_r``: mean softmax probability of ``r`` over all ``E`` logits) plus
``0.1 *`` the router z-loss ``mean(logsumexp(logits) ** 2)``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import _autocast_operands, _masked, _sparse, check_backend, route
from .multicore import check_backend as check_cores_backend, layer_sizes, layout
from .multicore import run_cores
from ..analysis.concrete import check_width, near_factors
from ..errors import CompileError, EincError, SizeError
from ..runtime.fused import (allocating, autocasting, check_device, check_dtype, check_flag,
                             check_input, check_module, dtype_mismatch, dual, exporting, fake,
                             fixed_sizes, tracing, vmapping)

__all__ = ["BTTMoE", "moe_aux_loss", "near_square_factors"]

Z_LOSS_WEIGHT = 0.1


def near_square_factors(n: int, max_ratio: float = 2.0) -> Tuple[int, int]:
    """A pair ``(p, q)`` with ``p <= q`` and ``p * q >= n``, as square as possible.

    Among pairs with ``q <= max_ratio * p`` the one with the least padding
    ``p * q - n`` wins, ties going to the more square pair.  ``(s, s)`` with
    ``s = ceil(sqrt(n))`` is always a candidate, so the padding is at most
    ``2 * s - 1``.  Examples: 1024 -> (32, 32), 1000 -> (25, 40), 768 -> (24, 32).
    """
    if n < 1:
        raise CompileError(f"size must be positive, got {n}")
    s = math.isqrt(n - 1) + 1 if n > 1 else 1  # ceil(sqrt(n))
    best = (s * s - n, 0, s, s)
    for p in range(1, s + 1):
        q = -(-n // p)
        if q < p or q > max_ratio * p:
            continue
        cand = (p * q - n, q - p, p, q)
        if cand < best:
            best = cand
    return best[2], best[3]


def _integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise CompileError(f"{name} must be an integer, got {value!r}")
    return int(value)  # numpy integers too


def _width(name: str, value) -> int:
    """A layer width: an int from 1 to einc's largest (None, which check_width lets through
    for widths taken from a spec, is refused: a BTTMoE has no spec sizes)."""
    if value is None:  # the error check_width gives any other non-width, as StructuredLinear
        raise SizeError(f"{name} must be a positive integer, got None")
    return check_width(value, name)


def _sizes(name: str, given: Optional[Sequence[int]], n: int, cores: int) -> Tuple[int, ...]:
    if given is None:
        return near_square_factors(n) if cores == 2 else near_factors(n, cores)
    what = f"{name} must be {cores} positive integers (one per core)"
    if isinstance(given, (str, bytes)) or not isinstance(given, Sequence) or len(given) != cores:
        raise CompileError(f"{what}, got {given!r}")
    sizes = tuple(_integer(f"each of {name}", s) for s in given)
    if min(sizes) < 1:
        raise CompileError(f"{what}, got {given!r}")
    if math.prod(sizes) < n:
        raise CompileError(f"{name}={sizes} covers only {math.prod(sizes)} < {n} features")
    return sizes


class _Routed(torch.autograd.Function):
    """Identity on the router logits that saves an empty tensor. Every backward through the
    layer passes it, and one without ``retain_graph`` frees what it saved: reading
    ``saved_tensors`` then fails, which tells that this forward's graph is gone."""

    @staticmethod
    def forward(ctx, logits):
        ctx.save_for_backward(logits.new_empty(0))
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad):
        return grad

    @staticmethod
    def jvp(ctx, tangent):  # forward-mode AD through the identity (a view, as forward's)
        return tangent.view_as(tangent)


def _settled(t):
    """A value stored under a torch.func transform and read after it ended: the tensor under
    the transform's wrappers, detached. A wrapper that outlived its transform can be
    neither computed with, copied nor saved; inside the transform it is returned as is."""
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    if not torch.is_tensor(t) or tracing() or wrapped is None or not wrapped(t):
        return t
    while wrapped(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t.detach()


def _recomputing() -> bool:
    """Whether this forward runs inside a backward: activation checkpointing recomputing
    it. Its routing equals the original forward's, which already set ``aux_loss``."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _alive(node) -> bool:
    try:
        # the raw form: unpacking would run saved-tensor hooks (a non-reentrant
        # checkpoint recomputes its whole region to answer)
        getattr(node, "_raw_saved_tensors", None) or node.saved_tensors
    except RuntimeError:  # freed by a backward
        return False
    return True


def _accumulating(logits: Tensor) -> Tensor:
    """The logits in the aux loss's dtype: float32 at least (in bf16, under autocast, its
    value kept 2-3 digits), float64 for a float64 router."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _no_autocast(device: torch.device):
    """Autocast off where it is on: the aux loss's products stay in float32 or float64,
    whatever autocast's lists hold."""
    if autocasting(device):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _counts(expert_idx: Tensor, E: int) -> Tensor:
    """Slots per expert, counted by comparison, not bincount: on a GPU bincount waits for
    the host to learn the largest index, a sync in every layer's forward."""
    return (expert_idx.reshape(-1, 1) == torch.arange(E, device=expert_idx.device)).sum(0)


def _aux_plain(logits: Tensor, expert_idx: Tensor, k: int):
    """(aux loss, softmax probabilities, slots per expert) with plain torch ops, as
    :class:`_AuxLoss` computes them (for torch.func transforms and forward-mode AD)."""
    N, E = logits.shape
    acc = _accumulating(logits)
    probs = torch.softmax(acc, dim=-1)
    counts = _counts(expert_idx, E)
    frac = counts.to(probs.dtype) / (N * k)
    balance = E * (frac * probs.mean(0)).sum()
    z_loss = torch.logsumexp(acc, dim=-1).pow(2).mean()
    return balance + Z_LOSS_WEIGHT * z_loss, probs.detach(), counts


class _AuxLoss(torch.autograd.Function):
    """The aux loss in a dozen operations with a hand-written backward (the plain
    formulation recorded about twenty autograd nodes: on a GPU each is host time, about a
    millisecond per layer and step on an H200's host). With ``c = E / (N^2 k)``,
    ``n_e`` the slots of expert e, ``p`` the softmax and ``l`` the logsumexp of a token::

        aux = c * sum_e n_e sum_t p_te + (0.1 / N) * sum_t l_t^2
        d aux / d logit_te = p_te * (c * (n_e - <p_t, n>) + (0.2 / N) * l_t)

    Returns (aux, probabilities, counts); only aux has a gradient."""

    @staticmethod
    def forward(ctx, logits: Tensor, expert_idx: Tensor, k: int):
        N, E = logits.shape
        with _no_autocast(logits.device):
            acc = _accumulating(logits)
            lse = torch.logsumexp(acc, dim=1)
            probs = torch.softmax(acc, dim=1)
            counts = _counts(expert_idx, E)
            n = counts.to(acc.dtype)
            c, z = E / (N * N * k), Z_LOSS_WEIGHT / N
            aux = torch.dot(n, probs.sum(0)).mul_(c).add_(torch.dot(lse, lse), alpha=z)
        ctx.save_for_backward(logits, expert_idx, probs, lse, n)
        ctx.k = k
        ctx.mark_non_differentiable(probs, counts)
        return aux, probs, counts

    @staticmethod
    def backward(ctx, grad, _probs, _counts):
        logits, expert_idx, probs, lse, n = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain ops
            from ..runtime.fused import regrad
            (d,) = regrad(lambda t: _aux_plain(t, expert_idx, ctx.k)[0], [logits], [True], grad)
            return d, None, None
        N, E = logits.shape
        c, z = E / (N * N * ctx.k), Z_LOSS_WEIGHT / N
        with _no_autocast(probs.device):  # a backward may run inside autocast too
            # p * (c n_e + (2 z l - c <p, n>)), times the incoming gradient (out of place:
            # a batched gradient, is_grads_batched, cannot be multiplied into d in place)
            per_token = torch.add(lse, torch.mv(probs, n), alpha=-c / (2 * z)).mul_(2 * z)
            d = probs * torch.add(per_token.unsqueeze(1), n, alpha=c)
            return (d * grad).to(logits.dtype), None, None


class _PendingStats:
    """A forward's router statistics, computed on the first :meth:`BTTMoE.router_stats`
    (a training step that does not log them skips the entropy's operations)."""

    def __init__(self, probs: Tensor, counts: Tensor, tokens: int, k: int):
        self.probs, self.counts, self.tokens, self.k = probs, counts, tokens, k

    def settle(self) -> dict:
        probs, counts = _settled(self.probs), _settled(self.counts)
        with torch.no_grad():
            # per sample after a vmap ((B, N, E) probabilities), as read inside it
            entropy = -torch.special.xlogy(probs, probs).sum(-1).mean(-1)
            load = counts.to(probs.dtype) / (self.tokens * self.k)
        return {"load": load, "entropy": entropy, "tokens": self.tokens}


class Router(nn.Linear):
    """The router: an ``nn.Linear`` whose own ``reset_parameters`` zero-initialises it, so
    that deferred initialisation, which calls every module's ``reset_parameters`` (meta
    device, then ``to_empty``; FSDP), does not leave it with nn.Linear's random init after
    the layer's reset."""

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            if self.bias is not None:
                self.bias.zero_()


class BTTMoE(nn.Module):
    """Mixture of ``experts`` rank-1 BTT experts, ``k`` active per token.

    Args:
        in_features, out_features: sizes of the input and output vectors.
        experts: number of experts ``E`` (= BTT rank).
        k: experts per token; their gates are the softmax over the k selected logits, so
            at k = 1 the gate is 1 and the router learns only from ``aux_loss``.
        cores: number of BTT cores, 2 (the default) to :data:`einc.presets.MAX_MOE_CORES`.
            Two cores run on the backends below; three or more on
            :mod:`einc.moe.multicore` (``auto``: ``chunked`` on the CPU, ``padded``
            elsewhere).
        bias: add a learnable output bias (zero-initialised).
        input_sizes: ``(g, a)`` with ``g * a >= in_features``; the input is
            zero-padded to ``g * a`` and read as the row-major ``x[g, a]``.
            Default: :func:`near_square_factors`. With ``c`` cores, ``c`` sizes of the
            input indices ``i1 .. ic`` (default: :func:`einc.analysis.concrete.near_factors`).
        output_sizes: ``(f, e)`` with ``f * e >= out_features``; padded
            outputs are dropped.  Default: :func:`near_square_factors`; ``c`` sizes
            (``o1 .. oc``) with ``c`` cores.
        deterministic: bitwise repeatable results on every device (see
            :func:`einc.moe.btt_moe_sparse`); also the attribute ``deterministic``.
        backend: the sparse backend of :func:`einc.moe.btt_moe_sparse` (``"auto"``:
            chunked on the CPU, measured elsewhere); also the attribute ``backend``.

    Parameters ``A`` (``(g, a, f, E)``) and ``B`` (``(f, g, E, e)``) are stored
    as permuted views of contiguous ``(g, E, a, f)`` and ``(f, E, g, e)``
    tensors, the layouts the expert kernels read; ``.shape`` is the
    documented order. With ``c >= 3`` cores the parameters are ``A, B, C, ...`` in the
    axis order of :attr:`equation` (the ``bttmoe(cores=c)`` preset's), contiguous.

    Initialisation: ``A ~ N(0, 1/a)`` (fan-in of core A is ``a``) and
    ``B ~ N(0, k * a / in_features)`` (``= k / g`` without padding).  With the
    zero-initialised router every token gets ``k`` experts with gate ``1/k``,
    and the output variance is ``in_features * var(A) * var(B) / k`` times the
    mean square input, i.e. output RMS = input RMS at init. With more cores every core
    but the last has variance 1 / its fan-in (the input index it contracts) and the last
    ``k * (product of the other fan-ins) / in_features``.  All tied logits
    route to experts ``0..k-1`` at init (lowest index wins ties); the router
    gradient (gates and load-balancing loss) breaks the tie.
    """

    equation = "ga,gafr,fgre->fe"
    expert_index = "r"
    backend = "auto"  # class default: layers pickled before the option existed

    def __init__(
        self,
        in_features: int,
        out_features: int,
        experts: int = 8,
        k: int = 2,
        cores: int = 2,
        bias: bool = True,
        device=None,
        dtype=None,
        input_sizes: Optional[Sequence[int]] = None,
        output_sizes: Optional[Sequence[int]] = None,
        deterministic: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        experts, k, cores = (_integer(name, value) for name, value in (
            ("experts", experts), ("k", k), ("cores", cores)))
        # the widths einc accepts everywhere (1 to 2^32), checked before any size search
        in_features, out_features = (_width(name, value) for name, value in (
            ("in_features", in_features), ("out_features", out_features)))
        from ..presets import MAX_MOE_CORES
        if not 2 <= cores <= MAX_MOE_CORES:
            raise CompileError(f"cores must be in [2, {MAX_MOE_CORES}], got {cores}")
        if experts < 1:
            raise CompileError(f"experts must be >= 1, got {experts}")
        if not 1 <= k <= experts:
            raise CompileError(f"k must be in [1, experts={experts}], got {k}")
        bias = check_flag("bias", bias)
        deterministic = check_flag("deterministic", deterministic)
        check_backend(backend)
        if cores != 2:
            check_cores_backend(backend, cores)
        check_dtype(dtype)
        device = check_device(device)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.experts = experts
        self.k = k
        self.cores = cores
        self.input_sizes = _sizes("input_sizes", input_sizes, in_features, cores)
        self.output_sizes = _sizes("output_sizes", output_sizes, out_features, cores)
        self._lay = lay = layout(cores)  # the cores' axes: an attribute, as torch.compile reads it
        self.equation, self.expert_index = lay.equation, lay.expert_letter
        E = experts
        shapes = self._core_shapes()
        numel = sum(map(math.prod, shapes.values())) + (in_features + 1) * E + out_features * bias
        with allocating(numel, dtype, device):
            self.router = Router(in_features, E, bias=True, **factory)
            if cores == 2:
                g, a = self.input_sizes
                f, e = self.output_sizes
                # expose (g, a, f, E) / (f, g, E, e); store (g, E, a, f) / (f, E, g, e)
                self.A = nn.Parameter(torch.empty(g, E, a, f, **factory).permute(0, 2, 3, 1))
                self.B = nn.Parameter(torch.empty(f, E, g, e, **factory).permute(0, 2, 1, 3))
            else:
                for name, shape in shapes.items():
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
            if bias:
                self.bias = nn.Parameter(torch.empty(out_features, **factory))
            else:
                self.register_parameter("bias", None)
        self.register_load_state_dict_post_hook(_keep_expert_major)
        self.deterministic = deterministic
        self.backend = backend
        self._aux_loss: Optional[Tensor] = None
        self._routed = None  # the last forward's _Routed node, when it recorded a graph
        self._aux_training = True  # the layer's mode in the forward that set aux_loss
        self._stats: Optional[dict] = None
        self.reset_parameters()

    # ------------------------------------------------------------------
    def _layout(self):
        return self._lay

    def _sizes(self) -> dict:
        """Every index's size, by the names of the ``bttmoe`` preset."""
        return layer_sizes(self._layout(), self.input_sizes, self.output_sizes, self.experts)

    def _core_shapes(self) -> dict:
        """Each core's name and shape, in the axis order of :attr:`equation`."""
        lay, sizes = self._layout(), self._sizes()
        return {name: lay.core_shape(j, sizes) for j, name in enumerate(lay.names)}

    def _fan_ins(self) -> List[int]:
        """The size of the input index each core contracts (A: the last input index)."""
        lay, sizes = self._layout(), self._sizes()
        return [sizes[lay.consumed(j)] for j in range(lay.cores)]

    def reset_parameters(self) -> None:
        fans, cores = self._fan_ins(), self.factors()
        with torch.no_grad():
            for core, fan in zip(cores[:-1], fans):
                core.normal_(0.0, 1.0 / math.sqrt(fan))
            # the last core makes the output's variance the input's (see the docstring)
            last = self.k * math.prod(fans[:-1]) / self.in_features
            cores[-1].normal_(0.0, math.sqrt(last))
            self.router.reset_parameters()
            if self.bias is not None:
                self.bias.zero_()

    def factors(self) -> List[nn.Parameter]:
        """The BTT cores (``[A, B]`` with two) in the order of :attr:`equation`."""
        return [getattr(self, name) for name in self._layout().names]

    def lr_multipliers(self) -> dict:
        """Per-core Adam multipliers by the rule of StructuredLinear (d_in / own fan-in):
        core A contracts ``a``, core B contracts ``g`` for each expert (with more cores,
        each core its input index)."""
        return {name: self.in_features / fan
                for name, fan in zip(self._layout().names, self._fan_ins())}

    def flops_per_token(self) -> int:
        """Forward FLOPs per token: the k active rank-1 BTTs plus the router. A rank-1
        core's step costs the product of its sizes without the expert index."""
        per_expert = sum(math.prod(shape) for shape in self._core_shapes().values())
        return 2 * self.k * per_expert // self.experts + 2 * self.in_features * self.experts

    # ------------------------------------------------------------------
    def _route(self, x2: Tensor) -> Tuple[Tensor, Tensor]:
        logits = self.router(x2)
        if exporting():  # an exported program has no module state to write into
            return route(logits, self.k)
        return self._route_marked(logits)

    # Eager, between compiled graphs: the _Routed marker needs a real autograd node (a
    # traced one leaves none, and moe_aux_loss could not tell a freed graph), and inductor
    # (torch 2.13, CPU) compiled the aux loss next to the routing into a backward that gave
    # the router a zero gradient at E = 4.
    @torch.compiler.disable
    def _route_marked(self, logits: Tensor) -> Tuple[Tensor, Tensor]:
        """Top-k routing of ``logits`` through the _Routed marker, with the records."""
        if fake(logits):  # a non-strict export on torch < 2.5: no state to write
            return route(logits, self.k)
        node = None
        # torch.func takes no old-style Function, and under forward-mode AD (a forward-mode
        # hessian batches the tangents) the marker's jvp was not taken for a view
        if logits.requires_grad and not tracing() and not dual(logits):
            logits = _Routed.apply(logits)
            node = logits.grad_fn
        expert_idx, gate = route(logits, self.k)
        self._record(logits, expert_idx, node)
        return expert_idx, gate

    @property
    def aux_loss(self) -> Optional[Tensor]:
        """The last forward's auxiliary loss (see the module docstring)."""
        return _settled(self.__dict__.get("_aux_loss"))

    @aux_loss.setter
    def aux_loss(self, value: Optional[Tensor]) -> None:
        self.__dict__["_aux_loss"] = value

    def __getstate__(self):
        # aux_loss is part of the last forward's graph, which copy.deepcopy and pickle
        # refuse (non-leaf tensor): copies keep its value, detached
        state = dict(super().__getstate__())
        if self.aux_loss is not None:
            state["_aux_loss"] = self.aux_loss.detach()
        if self._stats is not None:
            state["_stats"] = self.router_stats()
        state["_routed"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_lay" not in self.__dict__:  # pickled before layers had more than two cores
            self._lay = layout(self.__dict__.get("cores", 2))

    def _aux_alive(self) -> bool:
        """Whether ``aux_loss`` belongs in a training step's loss with its gradient: false
        once a backward without ``retain_graph`` went through the forward it came from,
        and false for an evaluation's (a forward in eval mode) once the layer trains again,
        whose graph may be alive but whose batch is not this step's."""
        if self.training and not getattr(self, "_aux_training", True):
            return False
        node = getattr(self, "_routed", None)  # absent in layers pickled before it existed
        return node is None or _alive(node)

    def _record(self, logits: Tensor, expert_idx: Tensor, node=None) -> None:
        """Set ``aux_loss``, the router statistics and ``_routed`` (``node``, the routing's
        _Routed node). A checkpoint's recomputation (in backward) computes the same, as it
        must save what the forward saved, but keeps the forward's records: its aux loss
        would be a graph no backward frees."""
        if _recomputing():
            kept = self._aux_loss, self._stats
            self._record_values(logits, expert_idx)
            self._aux_loss, self._stats = kept
            return
        self._routed, self._aux_training = node, self.training
        self._record_values(logits, expert_idx)

    def _record_values(self, logits: Tensor, expert_idx: Tensor) -> None:
        N, E = logits.shape
        if N == 0:
            acc = _accumulating(logits)
            self.aux_loss = acc.sum() * 0.0
            with torch.no_grad():
                zero = acc.new_zeros(())
                self._stats = {"load": acc.new_zeros(E), "entropy": zero, "tokens": 0}
            return
        if tracing() or dual(logits):  # torch.func and forward-mode AD: plain torch ops
            self.aux_loss, probs, counts = _aux_plain(logits, expert_idx, self.k)
        else:
            self.aux_loss, probs, counts = _AuxLoss.apply(logits, expert_idx, self.k)
        # the statistics are computed when asked for (router_stats), from these
        self._stats = _PendingStats(probs, counts, N, self.k)  # neither has a gradient

    @fixed_sizes  # its shape checks and branches on sizes
    def _evaluate(self, x: Tensor, masked: bool) -> Tensor:
        check_input(x, self.in_features, self.A.device)
        # autocast leaves float64 alone: a float64 layer computes in float64 there too
        autocast = autocasting(x.device) and self.A.dtype != torch.float64
        # nor a float64 input (the router's nn.Linear refused it with torch's own message)
        if x.dtype != self.A.dtype and (not autocast or x.dtype == torch.float64):
            raise dtype_mismatch(x.dtype, self.A.dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        N = x2.shape[0]
        lay = self._layout()
        # a replaced core: named here (not as a wrongly shaped input), before routing
        # overwrites the last forward's aux loss and statistics
        for (name, want), p, axes in zip(self._core_shapes().items(), self.factors(), lay.axes):
            if p.shape != want:
                raise CompileError(f"core {name} of this BTT-MoE layer has shape "
                                   f"{tuple(p.shape)}, expected {want} ({' '.join(axes)})")
        if lay.cores != 2:
            check_cores_backend(self.backend, lay.cores)
        expert_idx, gate = self._route(x2)
        d_in = math.prod(self.input_sizes)
        if d_in != self.in_features:
            x2 = F.pad(x2, (0, d_in - self.in_features))
        if lay.cores != 2:
            y = run_cores(x2, self.factors(), lay, self._sizes(), expert_idx, gate,
                          self.deterministic, masked, self.backend)
            y = y[:, : self.out_features]
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)  # autocast's dtype, as the experts ran
            return y.reshape(*lead, self.out_features).contiguous()
        g, a = self.input_sizes
        f, e = self.output_sizes
        A, B, bias = self.A, self.B, self.bias
        if autocast:  # the experts run in autocast's dtype, as nn.Linear does
            x2, A, B, bias = _autocast_operands(x2, A, B, bias)
        masked = masked or vmapping()  # vmap: a dispatch's sizes would differ per entry
        if masked:
            y = _masked(x2.reshape(N, g, a), A, B, expert_idx, gate, routed=True)
        else:
            # the bias rides along where no padded outputs sit between it and y
            fold = bias is not None and f * e == self.out_features
            # flat rows: the input gradient then comes back as a tensor of x2's own shape
            # that autograd can add the router's gradient into in place
            y = _sparse(x2, A, B, expert_idx, gate, self.deterministic, self.backend,
                        bias.view(f, e) if fold else None, routed=True)
        y = y.reshape(N, f * e)
        if f * e != self.out_features:
            y = y[:, : self.out_features]
        if bias is not None and (masked or not fold):
            y = y + bias
        # contiguous as nn.Linear's output (a slice past padded outputs is not)
        return y.reshape(*lead, self.out_features).contiguous()

    def forward(self, x: Tensor) -> Tensor:
        """Sparse evaluation: every token runs only its ``k`` experts."""
        return self._evaluate(x, masked=False)

    def forward_masked(self, x: Tensor) -> Tensor:
        """Reference evaluation: every expert for every token, masked by the gates."""
        return self._evaluate(x, masked=True)

    def router_stats(self) -> dict:
        """Statistics of the last forward pass.

        ``load``: ``(E,)`` fraction of the token slots routed to each expert;
        ``entropy``: mean entropy (nats) of the router softmax over all ``E``
        experts; ``tokens``: number of routed tokens.
        """
        if self._stats is None:
            raise EincError("router_stats() reports the last forward pass: run the layer "
                            "on a batch first")
        if isinstance(self._stats, _PendingStats):
            self._stats = self._stats.settle()
        return {name: _settled(v) for name, v in self._stats.items()}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"experts={self.experts}, k={self.k}, "
            + (f"cores={self.cores}, " if self.cores != 2 else "")
            + f"input_sizes={self.input_sizes}, "
            f"output_sizes={self.output_sizes}, bias={self.bias is not None}, "
            f"equation='{self.equation}'"
            + (f", backend='{self.backend}'" if self.backend != "auto" else "")
            + (", deterministic=True" if self.deterministic else "")
        )


def _keep_expert_major(module: "BTTMoE", incompatible_keys) -> None:
    """After ``load_state_dict``: the cores back in the expert-major storage the sparse
    backends read in place (otherwise every forward would copy them). ``assign=True``
    installs the checkpoint's tensors in whatever layout they were saved; a copying load
    keeps the current layout, which ``.to(memory_format=...)`` may have changed. The
    Parameter objects stay (only their data moves): an optimizer built before the load
    keeps training them."""
    if module.cores != 2:  # stored in the documented order
        return
    for name, to_storage in (("A", (0, 3, 1, 2)), ("B", (0, 2, 1, 3))):
        p = getattr(module, name)
        stored = p.permute(*to_storage)
        if not stored.is_contiguous():
            back = tuple(to_storage.index(i) for i in range(4))
            with torch.no_grad():
                p.data = stored.contiguous().permute(*back)


def from_structure(s, d_in: int, d_out: int, bias: bool = True, device=None, dtype=None,
                   tolerance: float = 0.15, **options) -> "BTTMoE":
    """The BTTMoE for a parsed ``bttmoe(...)`` spec, with the sizes the analysis chose."""
    from ..analysis import concretize
    from ..runtime.api import _check_options  # the one list of each layer's options

    from ..presets import MAX_MOE_CORES

    _check_options(s, options)
    c = len(s.factors)
    lay = layout(c) if 2 <= c <= MAX_MOE_CORES else None
    if lay is None or s.equation != lay.equation or s.moe.expert_index != lay.expert:
        raise CompileError(f"a BTT-MoE layer is the structure of the bttmoe preset "
                           f"(with {c} cores: bttmoe(cores={c})); this spec has {s.equation}")
    sizes = concretize(s, d_in, d_out, tolerance).sizes
    return BTTMoE(d_in, d_out, experts=sizes[lay.expert], k=s.moe.k, cores=c, bias=bias,
                  device=device, dtype=dtype,
                  input_sizes=tuple(sizes[i] for i in lay.inputs),
                  output_sizes=tuple(sizes[o] for o in lay.outputs), **options)


def moe_aux_loss(model: nn.Module) -> Tensor:
    """Sum of ``aux_loss`` over every :class:`BTTMoE` in ``model`` (from their last forward).

    A layer whose last forward a backward has already been through (without
    ``retain_graph``), such as one skipped in this step by layer drop or conditional
    compute, adds its value without a gradient: its graph is gone. So does a layer in
    training mode whose last forward ran in eval mode (an evaluation outside no_grad, then
    a step that skipped the layer): that batch is not this step's. After the step's
    backward, the sum is the step's value for logging."""
    check_module("moe_aux_loss", model)
    total: Optional[Tensor] = None
    for m in model.modules():
        if isinstance(m, BTTMoE) and m.aux_loss is not None:
            aux = m.aux_loss if m._aux_alive() else m.aux_loss.detach()
            total = aux if total is None else total + aux
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return total
