"""StructuredLinear: a drop-in for nn.Linear whose weight is a structured einsum."""
from __future__ import annotations

import math
import numbers
import string

import numpy as np
import torch
from torch import nn

from ..analysis import DEFAULT_TOLERANCE
from ..codegen import emit
from ..codegen.lower import Lowered, as_structure, lower
from ..errors import CompileError
from .fused import (ChainFunction, allocating, autocasting, check_device, check_dtype,
                    check_flag, check_input, chunk_tokens, dtype_mismatch, dual, fixed_sizes,
                    tracing)

ROUTES = ("auto", "fused", "plain", "einsum", "steps", "triton")


def _factor_shapes(low) -> tuple:
    """Per factor, its shape in spec order and its indices (for messages). A plain
    attribute, not a cached_property, which torch 2.4's dynamo breaks its graph on."""
    return tuple((torch.Size(low.sizes[i] for i in f.indices), " ".join(f.indices))
                 for f in low.structure.factors)


class StructuredLinear(nn.Module):
    """``y = W x + b`` with ``W`` given by a structure spec.

    Conventions: the input vector is the row-major flattening of the input operand's
    indices in spec order (zero-padded when the structure is larger); the output likewise
    (padded outputs dropped); each factor is a parameter whose axes are in spec order,
    ``factors()`` returns them in spec order, and ``equation`` is the einsum without a batch
    index, so ``torch.einsum('...'+inp+','+facs+'->...'+out, x.reshape(-1, *input_sizes),
    *factors())`` reproduces the layer before the bias, on the padded input.
    """

    def __init__(self, in_features: int, out_features: int, spec="dense", bias: bool = True,
                 device=None, dtype=None, *, route: str = "auto",
                 tolerance: float = DEFAULT_TOLERANCE):
        super().__init__()
        _check_route(route)
        check_dtype(dtype)
        device = check_device(device)
        bias = check_flag("bias", bias)
        structure = as_structure(spec)
        if structure.moe is not None:
            raise CompileError("a bttmoe spec builds an einc.BTTMoE: use einc.compile or "
                               "einc.replace_linear, which pick the module for the spec")
        low = lower(structure, in_features, out_features, tolerance)
        # the checked widths (ints; None resolved from the spec or d_in), not the arguments
        in_features, out_features = low.d_in, low.d_out
        self.in_features, self.out_features = in_features, out_features
        self.spec = spec if isinstance(spec, str) else structure.source or structure.spec_text()
        self.lowered = low
        self._attrs = emit.attribute_names(low)
        self._shapes = _factor_shapes(low)
        kw = {"device": device, "dtype": dtype}
        with allocating(low.params + (out_features if bias else 0), dtype, device):
            for k, f in enumerate(structure.factors):
                store = _storage_order(low, k)
                t = torch.empty([low.sizes[i] for i in store], **kw)
                param = nn.Parameter(t.permute([store.index(i) for i in f.indices]))
                self.register_parameter(self._attrs[k], param)
            if bias:
                self.bias = nn.Parameter(torch.empty(out_features, **kw))
            else:
                self.register_parameter("bias", None)
        self.route = route
        self.chunk = None
        self._plain = _compile_forward(low, tuple(self._attrs))
        #: per factor, the permutation from its spec order to its storage order
        self._to_storage = tuple(tuple(f.indices.index(i) for i in _storage_order(low, k))
                                 for k, f in enumerate(structure.factors))
        self.reset_parameters()

    def __getstate__(self):
        # the plain forward is exec'd code, which pickle cannot name: rebuilt on load
        state = dict(super().__getstate__())
        state.pop("_plain", None)
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._shapes = _factor_shapes(self.lowered)
        self._plain = _compile_forward(self.lowered, tuple(self._attrs))

    @property
    def route(self) -> str:
        """How forward computes, one of ROUTES (see docs/compile.md); checked when set."""
        return self._route

    @route.setter
    def route(self, value: str) -> None:
        self._route = _check_route(value)

    @property
    def chunk(self) -> int | None:
        """Tokens per chunk of the fused route; None chooses per call (chunk_tokens)."""
        return self.__dict__.get("_chunk", self.__dict__.get("chunk"))  # or an old pickle's

    @chunk.setter
    def chunk(self, value) -> None:
        if value is not None and (isinstance(value, (bool, np.bool_))
                                  or not isinstance(value, numbers.Integral) or value < 1):
            raise CompileError(f"chunk must be None (chosen per call) or a positive integer, "
                               f"got {value!r}")
        self._chunk = None if value is None else int(value)

    # -- conventions -----------------------------------------------------------------
    @property
    def structure(self):
        return self.lowered.structure

    @property
    def equation(self) -> str:
        return self.structure.equation

    @property
    def input_sizes(self) -> tuple[int, ...]:
        return self.lowered.input_sizes

    @property
    def output_sizes(self) -> tuple[int, ...]:
        return self.lowered.output_sizes

    def factors(self) -> list[nn.Parameter]:
        return [getattr(self, a) for a in self._attrs]

    def factor_names(self) -> list[str]:
        """Attribute (and state_dict) names of the factors, in spec order."""
        return list(self._attrs)

    @property
    def source(self) -> str:
        """The plain forward as readable Python (what ``einc compile -o`` writes)."""
        return emit.forward_source(self.lowered, self._attrs)

    # -- init --------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        # Unit-norm Gaussian columns over each factor's fan-in (see emit.init_views).
        with torch.no_grad():
            for p, (perm, shape) in zip(self.factors(), emit.init_views(self.lowered)):
                # drawn apart and copied in: p.permute(...).reshape(...) is a view only in
                # the layout __init__ gives p, not after load_state_dict(assign=True)
                v = p.permute(*perm)
                w = torch.empty(shape, dtype=p.dtype, device=p.device).normal_()
                norm = w.norm(dim=1, keepdim=True)
                # a column of exact zeros (odds ~1e-7 per entry at fan-in 1, where w / |w|
                # is a sign) would divide 0 by 0: it becomes the constant unit column
                dead = norm == 0
                w.masked_fill_(dead, shape[1] ** -0.5).div_(norm.masked_fill_(dead, 1.0))
                v.copy_(w.view(v.shape))
            # the input is zero-padded to padded_in entries, which dilutes its RMS; the map
            # is linear in each factor, so one factor makes up for it
            self.factors()[0].mul_(emit.padding_gain(self.lowered))
            if self.bias is not None:
                self.bias.zero_()

    def lr_multipliers(self) -> dict[str, float]:
        """Adam learning-rate multiplier of each factor: d_in / (the factor's own fan-in),
        i.e. the muP rule lr ~ 1/fan-in applied to each factor as its own dense map,
        relative to a dense layer of this width."""
        return {a: self.in_features / fi for a, fi in zip(self._attrs, emit.fan_in(self.lowered))}

    # -- compute -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        facs = self.factors()  # once: each call builds a list (about 1 us)
        check_input(x, self.in_features, facs[0].device)
        # autocast casts inside torch ops, which the plain routes use and the fused ones
        # (computing in the factors' dtype) do not
        autocast = autocasting(x.device)
        dtype = self._check_factors(autocast, facs)
        route = self.route
        if route == "auto":
            plain = tracing() or autocast or dual(x, *facs, self.bias)
            route = "plain" if plain else _auto_route(self, x)
        elif route in ("fused", "triton") and (tracing() or dual(x, *facs, self.bias)):
            # their autograd Functions support neither torch.func transforms nor forward-mode
            # AD (torch's raw setup_context error), and write into buffers that a trace,
            # an export or a graph would freeze: the same chain in plain ops, as BTT-MoE's
            # backends do
            route = "plain"
        # autocast leaves float64 alone, so a float64 layer computes in float64 there too
        autocast = autocast and dtype != torch.float64
        # nor a float64 input: every route then refuses it, as outside autocast
        if x.dtype != dtype and (not autocast or x.dtype == torch.float64):
            raise dtype_mismatch(x.dtype, dtype)
        if autocast and route in ("fused", "triton"):
            # these routes compute in their operands' dtype: cast all to autocast's, as
            # nn.Linear does, and run with autocast off (its casts would be no-ops)
            cast = torch.get_autocast_dtype(x.device.type)
            with torch.autocast(x.device.type, enabled=False):
                if route == "triton":
                    from .gpu import forward_triton
                    return forward_triton(self, x.to(cast), cast)
                return self._forward_fused(x.to(cast), cast)
        if route == "plain":
            return self._plain(self, x)
        if route == "einsum":
            return self.forward_einsum(x)
        if route == "steps":
            return self.forward_steps(x)
        if route == "triton":  # strided Triton kernels, no relayout copies (runtime/gpu.py)
            from .gpu import forward_triton
            return forward_triton(self, x)
        return self._forward_fused(x)

    @fixed_sizes
    def _check_factors(self, autocast: bool = False, facs=None) -> torch.dtype:
        """The factors' (and bias's) shapes must be the structure's: the fused route reads a
        factor through its planned strides, so a replaced parameter of another shape would be
        read wrongly instead of refused. Their dtypes must be one, except under autocast,
        which casts float16 / bfloat16 / float32 operands to one (never float64). Returns
        the first factor's dtype."""
        facs, b = facs or self.factors(), self.bias
        tensors = facs if b is None else [*facs, b]
        first = facs[0].dtype
        same = not autocast or any(t.dtype == torch.float64 for t in tensors)
        for name, p, (want, indices) in zip(self._attrs, facs, self._shapes):
            if p.shape != want or (same and p.dtype != first):
                what = (f"shape {tuple(p.shape)}, expected {tuple(want)} ({indices})"
                        if p.shape != want else f"dtype {p.dtype}, the other factors' is {first}")
                raise CompileError(f"factor {name} of this {self.spec!r} layer has {what}")
        if b is not None and (b.shape != (self.out_features,) or (same and b.dtype != first)):
            raise CompileError(f"bias has shape {tuple(b.shape)} and dtype {b.dtype}, expected "
                               f"({self.out_features},) and {first}")
        return first

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (n, padded_in): flattened and zero-padded."""
        low = self.lowered
        z = x.reshape(-1, self.in_features)
        if low.padded_in > low.d_in:
            z = nn.functional.pad(z, (0, low.padded_in - low.d_in))
        return z

    def _finish(self, y: torch.Tensor, lead, bias: bool = True) -> torch.Tensor:
        """(n, padded_out) -> (..., out_features): padded outputs dropped, bias added (unless
        ``bias`` is False)."""
        low = self.lowered
        if low.padded_out > low.d_out:
            y = y[:, :low.d_out]
        if bias and self.bias is not None:  # in y's dtype, as nn.Linear under autocast
            y = y + self.bias.to(y.dtype)
        # contiguous as nn.Linear's: a slice past padded outputs or a transposed einsum
        # result is not, and y.view(-1) would fail
        return y.reshape(*lead, self.out_features).contiguous()

    def _forward_fused(self, x, dtype=None):
        """The fused route; ``dtype``: the factors and bias cast to it (autocast)."""
        low = self.lowered
        z = self._tokens(x)
        n = z.shape[0]
        z = z.contiguous().view(n, *low.input_sizes)
        # contiguous in storage order: free for the layout __init__ gave the parameters, a
        # copy (with its gradient) where a user replaced them, e.g. load_state_dict(assign=True)
        facs = self._storage_factors(dtype)
        # the bias rides along when no padded outputs sit between it and y
        fuse = self.bias is not None and low.padded_out == low.d_out
        bias = self.bias if dtype is None or self.bias is None else self.bias.to(dtype)
        bias = bias.view([low.sizes[i] for i in low.plan.output_order[1:]]) if fuse else None
        chunk = self.chunk or chunk_tokens(low.plan, n, z.device, z.element_size())
        # a backward to come? (inside forward, needs_input_grad follows requires_grad even
        # under no_grad; without one the intermediates are scratch)
        keep = torch.is_grad_enabled() and any(
            t.requires_grad for t in (z, *facs, *([] if bias is None else [bias])))
        y = ChainFunction.apply(low.plan, chunk, keep, z, bias, *facs).reshape(n, low.padded_out)
        if fuse:
            return y[:, :low.d_out].reshape(*x.shape[:-1], self.out_features)
        return self._finish(y, x.shape[:-1])

    def _storage_factors(self, dtype=None) -> list:
        """Each factor as a contiguous view in its storage order (a copy only if the
        parameter was replaced by a tensor of another layout, or cast to ``dtype``)."""
        perms = self.__dict__.get("_to_storage")
        if perms is None:  # a module pickled before the permutations were kept
            perms = self._to_storage = tuple(
                tuple(f.indices.index(i) for i in _storage_order(self.lowered, k))
                for k, f in enumerate(self.structure.factors))
        facs = [p.permute(perm) for p, perm in zip(self.factors(), perms)]
        return [(f if dtype is None else f.to(dtype)).contiguous() for f in facs]

    def forward_einsum(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """Reference route: one torch.einsum over the input and the factors; ``bias=False``
        leaves the bias out."""
        low = self.lowered
        inp, rest = self.equation.split(",", 1)
        facs, out = rest.split("->")
        y = torch.einsum(f"...{inp},{facs}->...{out}",
                         self._tokens(x).reshape(-1, *low.input_sizes), *self.factors())
        return self._finish(y.reshape(-1, low.padded_out), x.shape[:-1], bias)

    def forward_steps(self, x: torch.Tensor) -> torch.Tensor:
        """One torch.einsum per step of the planned chain: each call picks its own layouts,
        which wins where the plan needs several relayouts."""
        low, s = self.lowered, self.structure
        letters = s.letters()
        # a structure has at most 51 indices, so one of the 52 letters is always free
        tok = next(c for c in string.ascii_letters[::-1] if c not in letters.values())
        term = lambda idx: "".join(tok if i == low.plan.token else letters[i] for i in idx)
        z = self._tokens(x).reshape(-1, *low.input_sizes)
        order = low.plan.input_order
        facs = self.factors()
        for st in low.plan.steps:
            f = s.factors[st.factor]
            out = st.batch + st.left + st.right
            z = torch.einsum(f"{term(order)},{''.join(letters[i] for i in f.indices)}"
                             f"->{term(out)}", z, facs[st.factor])
            order = out
        final = low.plan.output_order
        z = z.permute([order.index(i) for i in final])
        return self._finish(z.reshape(z.shape[0], low.padded_out), x.shape[:-1])

    @torch.no_grad()
    def materialize(self) -> torch.Tensor:
        """The dense (out_features, in_features) weight."""
        p = next(self.parameters())
        eye = torch.eye(self.in_features, dtype=p.dtype, device=p.device)
        # the bias is left out, never set aside: other threads may be running forward, and
        # a parametrised bias cannot be assigned None
        return self.forward_einsum(eye, bias=False).T.contiguous()

    def extra_repr(self) -> str:
        low = self.lowered
        pad = ""
        if (low.padded_in, low.padded_out) != (low.d_in, low.d_out):
            pad = f", padded={low.padded_in}->{low.padded_out}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"spec={emit.comment(self.spec)!r}, equation={self.equation!r}{pad}, "
                f"params={low.params:,}, flops={low.flops:,}, bias={self.bias is not None}")


def _storage_order(low: Lowered, k: int) -> tuple[str, ...]:
    return next(st.factor_order for st in low.plan.steps if st.factor == k)


_FORWARD_CACHE: dict = {}


def _compile_forward(low: Lowered, attrs: tuple[str, ...]):
    """Exec the emitted plain forward once per (lowering, attribute names)."""
    key = (low.key, attrs)
    if key not in _FORWARD_CACHE:
        namespace = {"torch": torch}
        exec(compile(emit.forward_source(low, list(attrs)), "<einc plain forward>", "exec"),
             namespace)
        _FORWARD_CACHE[key] = namespace["forward"]
    return _FORWARD_CACHE[key]


def _check_route(route) -> str:
    if route not in ROUTES:
        raise CompileError(f"unknown route {route!r}; known routes: {', '.join(ROUTES)}")
    return route


def _auto_route(module: StructuredLinear, x: torch.Tensor) -> str:
    from .autotune import choose_route
    return choose_route(module, x)
