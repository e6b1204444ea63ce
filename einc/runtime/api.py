"""einc.compile, einc.replace_linear and einc.param_groups."""
from __future__ import annotations

import fnmatch
import math
import numbers
from dataclasses import dataclass, field

import torch
from torch import nn

from ..analysis import DEFAULT_TOLERANCE, resolve_dims
from ..codegen.lower import as_structure
from ..errors import CompileError, EincError
from ..analysis.concrete import check_tolerance
from .fused import check_flag, check_module
from .module import StructuredLinear, _check_route


def compile(spec, d_in: int | None = None, d_out: int | None = None, bias: bool = True,
            device=None, dtype=None, *, d: int | None = None, **options) -> nn.Module:
    """The module for ``spec`` at the given widths: a StructuredLinear, or a BTTMoE for a
    spec with experts. ``d_out`` defaults to ``d_in``; both default to the spec's own sizes
    when they are all numbers; ``d`` is a square width, as in :func:`einc.analyze`.
    Options: ``route`` and ``tolerance`` (StructuredLinear); ``tolerance``, ``backend``
    and ``deterministic`` (BTTMoE)."""
    s = as_structure(spec)
    _check_options(s, options)
    d_in, d_out = resolve_dims(s, d, d_in, d_out)
    if s.moe is not None:
        from ..moe import from_structure
        return from_structure(s, d_in, d_out, bias=bias, device=device, dtype=dtype, **options)
    return StructuredLinear(d_in, d_out, s if not isinstance(spec, str) else spec, bias=bias,
                            device=device, dtype=dtype, **options)


def _check_options(s, options: dict) -> None:
    """The options' names for the spec's kind of layer, and their values."""
    moe = s.moe is not None
    allowed = ("tolerance", "backend", "deterministic") if moe else ("route", "tolerance")
    unknown = ", ".join(sorted(set(options) - set(allowed)))
    if unknown:
        raise CompileError(f"unknown option(s) for a {'BTT-MoE' if moe else 'structured'} "
                           f"layer: {unknown}; allowed: {', '.join(allowed)}")
    if "tolerance" in options:
        check_tolerance(options["tolerance"])
    if "route" in options:
        _check_route(options["route"])
    if "deterministic" in options:
        check_flag("deterministic", options["deterministic"])
    if "backend" in options:
        from ..moe.dispatch import check_backend

        check_backend(options["backend"])


def _patterns(name: str, value) -> list | None:
    """``include`` / ``exclude``: None, a glob pattern, or a collection of them (a list,
    tuple, set, dict keys, a config system's list...)."""
    if value is None or isinstance(value, str):
        return value if value is None else [value]
    try:
        patterns = list(value)
    except TypeError:
        patterns = None
    if patterns is None or not all(isinstance(v, str) for v in patterns):
        raise CompileError(f"{name} must be a glob pattern on module names or a collection of "
                           f"them (e.g. 'blocks.*.mlp.*'), got {value!r}")
    return patterns


@dataclass
class ReplaceReport:
    rows: list = field(default_factory=list)  # (name, in, out, params/FLOPs before and after)
    kept: list = field(default_factory=list)  # (name, why it stayed dense)

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
        kept = [f"kept dense: {name}: {why}" for name, why in self.kept]
        return "\n".join([*(fmt(r) for r in table), *kept])


def replace_linear(model: nn.Module, spec, include=None, exclude=None,
                   tolerance: float = DEFAULT_TOLERANCE, keep_unembedding: bool = True,
                   **options) -> ReplaceReport:
    """Swap the model's nn.Linear layers for structured ones (in place).

    ``include`` / ``exclude`` are glob patterns (or lists of them) on qualified module names
    (``blocks.*.attn.*``, ``lm_head``). Every layer is built before any is swapped, so a
    layer that cannot take the structure leaves the model untouched. A layer registered
    under several names is replaced by one module at all of them.

    Some layers stay dense whatever the patterns say, and the report's ``kept`` lists them
    with the reason: a layer whose weight or bias is shared with another module (tied
    embeddings: replacing it would untie them), a subclass of nn.Linear (torch's attention
    reads its ``out_proj.weight`` directly), the projections inside nn.MultiheadAttention
    (bare parameters), the router of a BTT-MoE layer (part of that layer), and, unless
    ``keep_unembedding=False``, the unembedding: a layer mapping an nn.Embedding's width to
    its vocabulary (see :func:`_unembedding` for how it is told from an inner layer).
    """
    check_module("replace_linear", model)
    _check_options(as_structure(spec), dict(options, tolerance=tolerance))  # also when no
    include = _patterns("include", include)                                # layer is chosen
    exclude = _patterns("exclude", exclude) or []
    keep_unembedding = check_flag("keep_unembedding", keep_unembedding)
    report = ReplaceReport()
    names = _names_by_module(model)
    kept = _kept_dense(model, names, keep_unembedding)
    chosen = []
    # a layer registered under several names matches a pattern through any of them
    matches = lambda mod, pats: any(fnmatch.fnmatchcase(n, p) for n in names[id(mod)]
                                    for p in pats)
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.MultiheadAttention)):
            continue
        if include is not None and not matches(mod, include):
            continue
        if matches(mod, exclude):
            continue
        if id(mod) in kept:
            report.kept.append((name, kept[id(mod)]))
            continue
        if not name:  # the model itself: nothing holds it that could be updated in place
            raise CompileError("replace_linear swaps layers inside a model, and this model is "
                               "itself an nn.Linear: build its replacement with "
                               f"einc.compile(spec, {mod.in_features}, {mod.out_features})")
        chosen.append((name, mod))
    built = []
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
        _follow(new, old)
        built.append((old, new))
        params = sum(p.numel() for n, p in new.named_parameters() if n != "bias")
        report.rows.append((name, old.in_features, old.out_features,
                            old.in_features * old.out_features, params,
                            2 * old.in_features * old.out_features, _flops(new)))
    for old, new in built:
        for name in names[id(old)]:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
    _no_fast_path(model)
    return report


def _no_fast_path(model: nn.Module) -> None:
    """nn.TransformerEncoderLayer's inference fast path (eval, no grad) reads
    ``linear1.weight`` and ``linear2.weight`` directly, and nn.TransformerEncoder's reads
    them of its first layer: both are turned off where those layers were replaced, through
    the flags torch itself checks first. The regular path calls the layers."""
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoderLayer) and not (
                type(mod.linear1) is nn.Linear and type(mod.linear2) is nn.Linear):
            mod.activation_relu_or_gelu = 0  # the layer's "fast path possible" flag
        if isinstance(mod, nn.TransformerEncoder) and any(
                not (type(m.linear1) is nn.Linear and type(m.linear2) is nn.Linear)
                for m in mod.layers if isinstance(m, nn.TransformerEncoderLayer)):
            mod.use_nested_tensor = False


def _follow(new: nn.Module, old: nn.Linear) -> None:
    """The replacement takes the layer's mode and freezing: a frozen weight freezes every
    parameter standing for it (factors, router), a frozen bias the bias."""
    new.train(old.training)
    for name, p in new.named_parameters():
        source = old.bias if name == "bias" else old.weight
        p.requires_grad_(source.requires_grad)


def _names_by_module(model: nn.Module) -> dict[int, list[str]]:
    """Every qualified name of every submodule (a shared module has several)."""
    out: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        out.setdefault(id(mod), []).append(name)
    return out


def _kept_dense(model: nn.Module, names: dict, keep_unembedding: bool) -> dict[int, str]:
    """The layers replace_linear leaves alone, by id, with the reason."""
    owners: dict[int, set[int]] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(mod))
    from ..moe import BTTMoE

    kept = {}
    for mod in model.modules():
        if isinstance(mod, BTTMoE):
            owner = names[id(mod)][0] or "the model"
            kept[id(mod.router)] = f"the router of the BTT-MoE layer {owner!r}, part of that layer"
        if isinstance(mod, nn.MultiheadAttention):
            kept[id(mod)] = ("nn.MultiheadAttention keeps its q/k/v projections as bare "
                             "parameters that torch's attention reads directly")
            kept[id(mod.out_proj)] = ("inside nn.MultiheadAttention, which reads its weight "
                                      "directly instead of calling it")
        elif isinstance(mod, nn.Linear) and type(mod) is not nn.Linear and id(mod) not in kept:
            kept[id(mod)] = (f"{type(mod).__name__} is a subclass of nn.Linear; einc only "
                             "replaces plain nn.Linear layers")
        elif type(mod) is nn.Linear:
            for p in mod.parameters(recurse=False):
                other = owners[id(p)] - {id(mod)}
                if other:
                    where = names[min(other, key=lambda i: names[i][0])][0] or "the model"
                    kept[id(mod)] = (f"its parameters are shared with {where!r} (tied "
                                     "weights, which a replacement would untie)")
                    break
    if keep_unembedding:
        head = _unembedding(model, owners, names)
        if head is not None and id(head) not in kept:
            kept[id(head)] = (f"the unembedding ({head.in_features} -> {head.out_features}, "
                              "an nn.Embedding's width to its vocabulary); "
                              "keep_unembedding=False replaces it too")
    return kept


def _unembedding(model: nn.Module, owners: dict, names: dict) -> nn.Linear | None:
    """The layer that maps an nn.Embedding's width d to its vocabulary V, if one can be
    told: none when an embedding is tied to a layer (that layer is the unembedding, kept
    as shared); else the model's last plain nn.Linear if it maps some (d, V); else the last
    (d -> V) layer without a (V -> d) layer beside it in its own parent module: an MLP
    onto as many hidden units as the vocabulary has entries, or as there are positions (a
    match for the position embedding), has its way back next to it."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    ids = {id(m) for m in linears}
    # a parametrized embedding's weight is computed, owned by no module: never tied
    if not linears or any(ids & owners.get(id(e.weight), set()) for e in embeddings):
        return None
    vocab = {(e.embedding_dim, e.num_embeddings) for e in embeddings}
    maps = lambda m: (m.in_features, m.out_features) in vocab
    if maps(linears[-1]):
        return linears[-1]
    parent = lambda m: names[id(m)][0].rpartition(".")[0]
    back = {(parent(m), m.out_features, m.in_features) for m in linears}
    heads = [m for m in linears
             if maps(m) and (parent(m), m.in_features, m.out_features) not in back]
    return heads[-1] if heads else None


def _flops(module) -> int:
    info = getattr(module, "flops_per_token", None)
    if info is not None:
        return int(info() if callable(info) else info)
    return module.lowered.flops


def _leaves(mod: nn.Module, attr: str) -> list:
    """The parameters an optimizer updates for the factor ``attr``: itself, or for a
    parametrized factor (weight_norm, a custom parametrization) the originals it is
    computed from, not the computed tensor, which is no leaf."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(mod, attr):
        return list(mod.parametrizations[attr].parameters(recurse=False))
    p = getattr(mod, attr)
    return [p] if isinstance(p, nn.Parameter) else []


def param_groups(model: nn.Module, lr: float, weight_decay: float | None = None) -> list[dict]:
    """Optimizer groups with per-factor learning rates: each structured factor gets
    ``lr * multiplier`` from its module's ``lr_multipliers()`` (see docs/compile.md); every
    other parameter gets ``lr``. ``weight_decay``, when given, is set on every group
    (None leaves the optimizer's default). Pass the result to torch.optim.AdamW."""
    check_module("param_groups", model)
    # a number, or a one-element tensor (which torch's optimizers take too)
    value = lr.item() if isinstance(lr, torch.Tensor) and lr.numel() == 1 \
        and lr.is_floating_point() else lr
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise CompileError(f"lr must be a positive finite number, got {lr!r}")
    if weight_decay is not None and (isinstance(weight_decay, bool)
                                     or not isinstance(weight_decay, numbers.Real)
                                     or not 0 <= weight_decay < math.inf):
        raise CompileError("weight_decay must be None (the optimizer's default) or a finite "
                           f"number >= 0, got {weight_decay!r}")
    by_mult: dict[float, list] = {}
    claimed = set()
    for mod in model.modules():
        mults = getattr(mod, "lr_multipliers", None)
        if not callable(mults):
            continue
        for attr, m in mults().items():
            for p in _leaves(mod, attr):
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
