"""einc.compile, einc.replace_linear and einc.param_groups."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from ..analysis import DEFAULT_TOLERANCE, resolve_dims
from ..codegen.lower import as_structure
from ..errors import CompileError, EincError
from .module import StructuredLinear


def compile(spec, d_in: int | None = None, d_out: int | None = None, bias: bool = True,
            device=None, dtype=None, **options) -> nn.Module:
    """The module for ``spec`` at the given widths: a StructuredLinear, or a BTTMoE for a
    spec with experts. ``d_out`` defaults to ``d_in``; both default to the spec's own sizes
    when they are all numbers."""
    s = as_structure(spec)
    d_in, d_out = resolve_dims(s, None, d_in, d_out)
    if s.moe is not None:
        from ..moe import from_structure
        return from_structure(s, d_in, d_out, bias=bias, device=device, dtype=dtype, **options)
    return StructuredLinear(d_in, d_out, s if not isinstance(spec, str) else spec, bias=bias,
                            device=device, dtype=dtype, **options)


@dataclass
class ReplaceReport:
    rows: list = field(default_factory=list)  # (name, in, out, params/FLOPs before and after)

    @property
    def params_before(self) -> int:
        return sum(r[3] for r in self.rows)

    @property
    def params_after(self) -> int:
        return sum(r[4] for r in self.rows)

    @property
    def flops_before(self) -> int:
        return sum(r[5] for r in self.rows)

    @property
    def flops_after(self) -> int:
        return sum(r[6] for r in self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        head = ("layer", "in", "out", "params before", "params after", "FLOPs before",
                "FLOPs after")
        body = [tuple(str(v) if i < 3 else f"{v:,}" for i, v in enumerate(r)) for r in self.rows]
        total = ("total", "", "", f"{self.params_before:,}", f"{self.params_after:,}",
                 f"{self.flops_before:,}", f"{self.flops_after:,}")
        table = [head, *body, total]
        width = [max(len(r[c]) for r in table) for c in range(len(head))]
        fmt = lambda r: "  ".join(v.ljust(w) if c == 0 else v.rjust(w)
                                  for c, (v, w) in enumerate(zip(r, width)))
        return "\n".join(fmt(r) for r in table)


def replace_linear(model: nn.Module, spec, include=None, exclude=None,
                   tolerance: float = DEFAULT_TOLERANCE, **options) -> ReplaceReport:
    """Swap the model's nn.Linear layers for structured ones (in place).

    ``include`` / ``exclude`` are glob patterns (or lists of them) on qualified module names
    (``blocks.*.attn.*``, ``lm_head``). Every layer is built before any is swapped, so a
    layer that cannot take the structure leaves the model untouched.
    """
    include = [include] if isinstance(include, str) else include
    exclude = [exclude] if isinstance(exclude, str) else (exclude or [])
    chosen = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:
            continue
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if not name:  # the model itself: nothing holds it that could be updated in place
            raise CompileError("replace_linear swaps layers inside a model, and this model is "
                               "itself an nn.Linear: build its replacement with "
                               f"einc.compile(spec, {mod.in_features}, {mod.out_features})")
        chosen.append((name, mod))
    built, report = [], ReplaceReport()
    for name, old in chosen:
        w = old.weight
        try:
            new = compile(spec, old.in_features, old.out_features, bias=old.bias is not None,
                          device=w.device, dtype=w.dtype, tolerance=tolerance, **options)
        except EincError as e:  # same error class, naming the layer
            raise type(e)(f"layer {name!r} ({old.in_features} -> {old.out_features}) cannot "
                          f"take {spec!r}: {e.message}", e.source, e.pos, e.hint) from None
        if old.bias is not None:
            with torch.no_grad():
                new.bias.copy_(old.bias)
        built.append((name, new))
        params = sum(p.numel() for n, p in new.named_parameters() if n != "bias")
        report.rows.append((name, old.in_features, old.out_features,
                            old.in_features * old.out_features, params,
                            2 * old.in_features * old.out_features, _flops(new)))
    for name, new in built:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return report


def _flops(module) -> int:
    info = getattr(module, "flops_per_token", None)
    if info is not None:
        return int(info() if callable(info) else info)
    return module.lowered.flops


def param_groups(model: nn.Module, lr: float, weight_decay: float | None = None) -> list[dict]:
    """Optimizer groups with per-factor learning rates: each structured factor gets
    ``lr * multiplier`` from its module's ``lr_multipliers()`` (see docs/compile.md); every
    other parameter gets ``lr``. Pass the result to torch.optim.AdamW."""
    if lr <= 0:
        raise CompileError(f"lr must be positive, got {lr}")
    by_mult: dict[float, list] = {}
    claimed = set()
    for mod in model.modules():
        mults = getattr(mod, "lr_multipliers", None)
        if not callable(mults):
            continue
        for attr, m in mults().items():
            p = getattr(mod, attr)
            if id(p) in claimed:
                continue
            claimed.add(id(p))
            by_mult.setdefault(float(m), []).append(p)
    rest = [p for p in model.parameters() if id(p) not in claimed]
    groups = []
    if rest:
        groups.append({"params": rest, "lr": lr, "lr_multiplier": 1.0})
    for m, ps in sorted(by_mult.items()):
        groups.append({"params": ps, "lr": lr * m, "lr_multiplier": m})
    if weight_decay is not None:
        for g in groups:
            g["weight_decay"] = weight_decay
    return groups
