"""Training FLOPs of a model, counted from einc's analysis of each linear layer.

Every linear map is counted the way :func:`einc.analyze` counts it: forward FLOPs per input
vector (2 per multiply-add) and the backward FLOPs the analysis reports next to them (input
gradient plus factor gradients). Structured layers use their own structure; plain
``nn.Linear`` layers are counted as the ``dense`` structure at their widths; a BTT-MoE layer
counts its active FLOPs (the ``k`` routed experts plus the router). Biases, activations and
norms are not counted. A task adds what is not a linear layer (attention scores) itself.

Training FLOPs of a step = (forward + backward per token) x tokens in the step.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from torch import nn

from ..runtime.fused import check_module


@dataclass
class FlopCount:
    """Per-token FLOPs of a model: ``forward`` and ``backward``, and the layers counted."""
    forward: int = 0
    backward: int = 0
    layers: list = field(default_factory=list)  # (name, kind, forward, backward)

    @property
    def total(self) -> int:
        """Forward plus backward FLOPs per token."""
        return self.forward + self.backward

    def add(self, name: str, kind: str, forward: int, backward: int) -> None:
        self.forward += int(forward)
        self.backward += int(backward)
        self.layers.append((name, kind, int(forward), int(backward)))

    def training_flops(self, tokens: int) -> int:
        """FLOPs of a training step over ``tokens`` tokens (forward + backward)."""
        return self.total * int(tokens)


@lru_cache(maxsize=None)
def _analysis(spec, d_in: int, d_out: int):
    from ..analysis import analyze
    return analyze(spec, d_in=d_in, d_out=d_out)


def moe_spec(experts: int, k: int, cores: int = 2) -> str:
    more = f",cores={int(cores)}" if cores != 2 else ""
    return f"bttmoe(experts={int(experts)},k={int(k)}{more})"


def layer_flops(module: nn.Module):
    """``(kind, forward, backward)`` per token for a linear-like module, else None."""
    from ..moe import BTTMoE
    from ..runtime import StructuredLinear

    if isinstance(module, StructuredLinear):
        r = _analysis(module.structure, module.in_features, module.out_features)
        return module.spec, r.flops, r.flops_backward
    if isinstance(module, BTTMoE):  # its own sizes: the constructor may factor differently
        active = module.flops_per_token()  # than the analysis of the spec at these widths
        return moe_spec(module.experts, module.k, module.cores), active, 2 * active
    counter = getattr(module, "flop_count", None)
    if callable(counter):  # a baseline that counts itself (FFMoE)
        fwd, bwd = counter()
        return getattr(module, "spec", type(module).__name__), fwd, bwd
    if type(module) is nn.Linear:
        r = _analysis("dense", module.in_features, module.out_features)
        return "dense", r.flops, r.flops_backward
    return None


def model_flops(model: nn.Module) -> FlopCount:
    """Sum :func:`layer_flops` over the model; a counted module's children are skipped
    (the router inside a BTT-MoE is part of its active FLOPs)."""
    check_module("model_flops", model)
    count = FlopCount()
    skip: list[str] = []
    for name, mod in model.named_modules():
        if any(p == "" or name.startswith(p + ".") for p in skip):  # "": the model itself
            continue
        got = layer_flops(mod)
        if got is not None:
            count.add(name, *got)
            skip.append(name)
    return count


_SLUG = re.compile(r"[^A-Za-z0-9_.=-]+")


def slug(text: str) -> str:
    """A file-name-safe form of a spec (``lowrank(rank=d^(1/2))`` -> ``lowrank_rank=d_1_2``)."""
    return _SLUG.sub("_", text).strip("_") or "spec"
