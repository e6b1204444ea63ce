"""Training tasks, each small enough for a CPU: ``regression`` and ``charlm``.

A task builds a model whose linear layers carry the structure under test, serves
deterministic batches (a function of the seed and the step, sliced by data-parallel rank),
and evaluates a held-out loss. Register a new task with :func:`task`.
"""
from __future__ import annotations

import inspect
import math
import numbers
import os
import re
import sysconfig
import zlib
from collections.abc import Mapping
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EincError, SizeError, UnknownNameError
from ..space.checks import MAX_SEED, shown
from .ffmoe import FFMoE

TASKS: dict[str, type] = {}


def task(cls):
    """Register a task class under its ``name``."""
    TASKS[cls.name] = cls
    return cls


def make_task(name: str, **options):
    if name not in TASKS:
        raise UnknownNameError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](**check_options(name, options))


def task_options(name: str) -> dict:
    """``{option: default}``: the keyword arguments the task ``name`` takes."""
    if name not in TASKS:
        raise UnknownNameError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    params = inspect.signature(TASKS[name].__init__).parameters.values()
    return {p.name: p.default for p in params if p.name != "self"
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


#: the largest value of an integer task option unless the task gives its own
OPTION_MAXIMUM = 2 ** 20


def check_options(name: str, options: dict) -> dict:
    """The options of task ``name``, checked against what its constructor takes: an unknown
    option lists the known ones; an integer option needs an integer at least the task's
    ``option_minimum`` (1 unless the task says otherwise) and at most its ``option_maximum``
    (:data:`OPTION_MAXIMUM` unless the task says otherwise: far beyond a run that finishes,
    so that a typo is refused at once), a number option a finite number."""
    known = task_options(name)
    minimum = getattr(TASKS[name], "option_minimum", {})
    maximum = getattr(TASKS[name], "option_maximum", {})
    if not isinstance(options, Mapping):
        raise EincError(f"the options of the {name} task are a dict of option name -> value, "
                        f"got {shown(options)}")
    out = {}
    for key, value in options.items():
        if key not in known:
            raise UnknownNameError(
                f"unknown option {key!r} for the {name} task",
                hint=f"options of the {name} task: "
                + ", ".join(f"{k} (default {v:_})" if isinstance(v, int) else f"{k} (default {v})"
                            for k, v in known.items()))
        default = known[key]
        if isinstance(default, bool):
            out[key] = value
        elif isinstance(default, int):
            lo, hi = minimum.get(key, 1), maximum.get(key, OPTION_MAXIMUM)
            v = (int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool)
                 else int(value) if isinstance(value, float) and value.is_integer() else None)
            if v is None or not lo <= v <= hi:
                raise SizeError(f"option {key} of the {name} task takes an integer >= {lo} and "
                                f"<= {hi:,}, got {shown(value)}")
            out[key] = v
        elif isinstance(default, float):
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not ok or not math.isfinite(value):
                raise SizeError(f"option {key} of the {name} task takes a number, got {value!r}")
            out[key] = float(value)
        else:
            out[key] = value
    return out


# -- building structured layers --------------------------------------------------------------

_FFMOE = re.compile(r"^\s*ffmoe\s*(?:\((.*)\))?\s*$")


def ffmoe_options(spec: str):
    """``{'experts': E, 'k': K}`` for an ``ffmoe(experts=E,k=K)`` baseline spec, else None."""
    m = _FFMOE.match(spec) if isinstance(spec, str) else None
    if m is None:
        return None
    opts = {"experts": 8, "k": 2}
    for part in filter(None, (p.strip() for p in (m.group(1) or "").split(","))):
        key, _, value = part.partition("=")
        if key.strip() not in opts or not value.strip().isdigit():
            raise UnknownNameError(f"ffmoe takes experts=<int> and k=<int>, got {part!r}", spec)
        opts[key.strip()] = int(value)
    if not 1 <= opts["experts"] <= OPTION_MAXIMUM:
        raise SizeError(f"ffmoe takes experts from 1 to {OPTION_MAXIMUM:,}, got {opts['experts']}",
                        spec)
    if not 1 <= opts["k"] <= opts["experts"]:
        raise SizeError(f"ffmoe takes k from 1 to experts = {opts['experts']}, got {opts['k']}",
                        spec)
    return opts


def structured_layer(spec, d_in: int, d_out: int, bias: bool = True) -> nn.Module:
    """``einc.compile(spec, d_in, d_out)``: a StructuredLinear, or a BTTMoE for a spec with
    experts."""
    from ..runtime import compile as einc_compile
    return einc_compile(spec, d_in, d_out, bias=bias)


def structure_model(model: nn.Module, spec, include=None, exclude=None) -> None:
    """``einc.replace_linear`` on the model's linear layers."""
    from ..runtime import replace_linear
    replace_linear(model, spec, include=include, exclude=exclude)


def add_moe_multipliers(model: nn.Module) -> None:
    """Give each BTT-MoE core the per-factor rate every structured factor gets (d_in over
    the core's own fan-in: ``a`` for A, ``g`` for B), where the layer has no
    ``lr_multipliers`` of its own."""
    from ..moe import BTTMoE
    for mod in model.modules():
        if isinstance(mod, BTTMoE) and not callable(getattr(mod, "lr_multipliers", None)):
            g, a = mod.input_sizes
            mults = {"A": mod.in_features / a, "B": mod.in_features / g}
            object.__setattr__(mod, "lr_multipliers", lambda m=mults: dict(m))


def taxonomy(spec, width: int) -> dict:
    """omega, psi and nu of ``spec`` at a square width (FF-MoE: its dense experts')."""
    if ffmoe_options(spec) is not None:
        return {"omega": 0.0, "psi": 1.0, "nu": 1.0}
    from ..analysis import analyze
    r = analyze(spec, d=width)
    num = lambda q: None if q is None else float(q)
    return {"omega": num(r.omega), "psi": num(r.psi), "nu": num(r.nu)}


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2 ** 62))


def _shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    if world == 1:
        return t
    if t.shape[0] % world:
        raise ValueError(f"batch {t.shape[0]} does not split over {world} processes")
    return t.chunk(world)[rank]


# -- regression --------------------------------------------------------------------------------

@task
class Regression:
    """MLP regression on a random ReLU teacher.

    Teacher: ``depth`` ReLU layers of ``teacher_width`` on ``d_in``-dimensional Gaussian
    inputs, He-initialised with a fixed seed, output centred and scaled to unit variance.
    Student: ``Linear(d_in, w)``, then ``hidden`` structured ``w -> w`` layers (ReLU after
    each), then ``Linear(w, 1)``. Fresh inputs every step; MSE on a fixed test set.
    """
    name = "regression"
    option_minimum = {"teacher_seed": 0}
    option_maximum = {"teacher_seed": MAX_SEED, "teacher_depth": 10_000, "hidden": 10_000}
    tokens_per_example = 1
    default_batch = 512
    default_lr_sweep = (1e-3, 3e-3, 1e-2)

    def __init__(self, d_in: int = 8, teacher_width: int = 256, teacher_depth: int = 6,
                 hidden: int = 2, test_size: int = 4096, teacher_seed: int = 0):
        self.d_in, self.hidden, self.teacher_seed = int(d_in), int(hidden), int(teacher_seed)
        self.teacher_width, self.teacher_depth = int(teacher_width), int(teacher_depth)
        self.options = {"d_in": self.d_in, "teacher_width": self.teacher_width,
                        "teacher_depth": self.teacher_depth, "hidden": self.hidden,
                        "test_size": int(test_size), "teacher_seed": self.teacher_seed}
        self.teacher, self.shift, self.scale = _teacher(self.d_in, self.teacher_width,
                                                        self.teacher_depth, self.teacher_seed)
        # mod 2^64: the largest seed allowed, 2^64 - 1, overflowed manual_seed
        g = torch.Generator().manual_seed((self.teacher_seed + 1) % 2 ** 64)
        self.test_x = torch.randn(int(test_size), self.d_in, generator=g)
        self.test_y = self.target(self.test_x)

    @torch.no_grad()
    def target(self, x):
        return (self.teacher(x) - self.shift) / self.scale

    def build(self, spec, width: int) -> nn.Module:
        if ffmoe_options(spec) is not None:
            raise UnknownNameError("ffmoe is a transformer feed-forward baseline; the "
                                   "regression task takes einc specs", spec)
        layers: list[nn.Module] = [nn.Linear(self.d_in, width), nn.ReLU()]
        for _ in range(self.hidden):
            layers += [structured_layer(spec, width, width), nn.ReLU()]
        layers.append(nn.Linear(width, 1))
        return nn.Sequential(*layers)

    def extra_flops(self, width: int) -> tuple[int, int]:
        return 0, 0

    def batch(self, step: int, size: int, seed: int, rank: int = 0, world: int = 1):
        x = torch.randn(size, self.d_in, generator=_step_generator(seed, step))
        x = _shard(x, rank, world)
        return x, self.target(x)

    def loss(self, model, batch):
        x, y = batch
        return F.mse_loss(model(x), y)

    @torch.no_grad()
    def evaluate(self, model) -> float:
        return float(F.mse_loss(model(self.test_x), self.test_y))


@lru_cache(maxsize=4)
def _teacher(d_in, width, depth, seed):
    g = torch.Generator().manual_seed(seed)
    dims = [d_in] + [width] * depth
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g) * math.sqrt(2.0 / a))
            lin.bias.copy_(torch.randn(b, generator=g) * 0.1)
        layers += [lin, nn.ReLU()]
    out = nn.Linear(width, 1)
    with torch.no_grad():
        out.weight.copy_(torch.randn(1, width, generator=g) / math.sqrt(width))
        out.bias.zero_()
    teacher = nn.Sequential(*layers, out).requires_grad_(False)
    with torch.no_grad():
        ref = teacher(torch.randn(8192, d_in, generator=g))
    return teacher, float(ref.mean()), float(ref.std())


# -- character-level language model ------------------------------------------------------------

def stdlib_text_files() -> list[str]:
    """The .py files of this Python's standard library (site-packages left out), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__",
                                                                "dist-packages"))
        found += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(found, key=lambda p: os.path.relpath(p, root))


@lru_cache(maxsize=4)
def load_corpus(train_chars: int, val_chars: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of the standard library: a file goes to validation when the CRC of its relative
    path is 0 mod 20 (held-out files, not a held-out tail), else to training."""
    root = sysconfig.get_paths()["stdlib"]
    train, val, nt, nv = [], [], 0, 0
    for path in stdlib_text_files():
        if nt >= train_chars and nv >= val_chars:
            break
        held_out = zlib.crc32(os.path.relpath(path, root).encode()) % 20 == 0
        if (nv >= val_chars) if held_out else (nt >= train_chars):
            continue
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        (val if held_out else train).append(data)
        if held_out:
            nv += len(data)
        else:
            nt += len(data)
    to_t = lambda parts, n: torch.frombuffer(bytearray(b"".join(parts)[:n]), dtype=torch.uint8)
    tr, va = to_t(train, train_chars), to_t(val, val_chars)
    if len(tr) < 10_000 or len(va) < 1_000:
        raise RuntimeError(f"too little standard-library text found under {root}")
    return tr.long(), va.long()


class _Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, D = x.shape
        split = lambda t: t.view(B, T, self.heads, D // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                           is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, D))


class _MLP(nn.Module):
    def __init__(self, d, ratio):
        super().__init__()
        self.fc, self.proj = nn.Linear(d, ratio * d), nn.Linear(ratio * d, d)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class _Block(nn.Module):
    def __init__(self, d, heads, ratio, moe=None):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _Attention(d, heads)
        self.mlp = (_MLP(d, ratio) if moe is None
                    else FFMoE(d, ratio * d // moe["k"], moe["experts"], moe["k"]))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small GPT: byte embedding, learned positions, pre-norm blocks, untied unembedding."""

    def __init__(self, d, layers, heads, context, vocab=256, ratio=4, moe=None):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(_Block(d, heads, ratio, moe) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        with torch.no_grad():
            self.tok.weight.normal_(0, 1.0)
            self.pos.weight.normal_(0, 0.1)
            self.lm_head.weight.zero_()

    def forward(self, idx):
        x = self.tok(idx) + self.pos.weight[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.ln_f(x))


@task
class CharLM:
    """A small GPT on the bytes of Python's standard library (no download).

    Every linear layer in the blocks (q, k, v, o and the feed-forward maps) takes the
    structure; the embedding and the unembedding (``lm_head``) stay dense. ``ffmoe(...)``
    swaps each feed-forward block for :class:`~einc.experiments.ffmoe.FFMoE` with dense
    attention. Validation loss: mean cross-entropy (nats per byte) on fixed windows of
    held-out files. Width ``w`` has ``w // head_dim`` heads (at least one) of equal width.
    """
    name = "charlm"
    accepts_ffmoe = True
    option_minimum = {"train_chars": 10_000, "val_chars": 1_000}
    option_maximum = {"train_chars": 2 ** 36, "val_chars": 2 ** 36, "layers": 10_000}
    default_batch = 32
    default_lr_sweep = (1e-3, 3e-3, 1e-2)

    def __init__(self, context: int = 64, layers: int = 2, head_dim: int = 32, ratio: int = 4,
                 train_chars: int = 2_000_000, val_chars: int = 200_000,
                 eval_windows: int = 64):
        self.context, self.layers, self.head_dim = int(context), int(layers), int(head_dim)
        self.ratio, self.eval_windows = int(ratio), int(eval_windows)
        self.options = {"context": self.context, "layers": self.layers,
                        "head_dim": self.head_dim, "ratio": self.ratio,
                        "train_chars": int(train_chars), "val_chars": int(val_chars),
                        "eval_windows": self.eval_windows}
        self.train, self.val = load_corpus(int(train_chars), int(val_chars))
        if self.context + 1 >= min(len(self.train), len(self.val)):
            raise SizeError(f"context {self.context} does not fit the text: give a shorter "
                            f"context or more val_chars ({len(self.val)} bytes held out)")
        g = torch.Generator().manual_seed(1234)
        starts = torch.randint(0, len(self.val) - self.context - 1, (self.eval_windows,),
                               generator=g)
        self.val_x, self.val_y = self._windows(self.val, starts)

    @property
    def tokens_per_example(self) -> int:
        return self.context

    def _windows(self, data, starts):
        off = torch.arange(self.context + 1)
        w = data[starts[:, None] + off]
        return w[:, :-1], w[:, 1:]

    @staticmethod
    def heads(width: int, head_dim: int) -> int:
        """``width // head_dim`` heads (at least one), each ``width / heads`` wide: head_dim
        is the target head width (48 at 32 is one head of 48, 8 at 3 two heads of 4); a
        width those heads do not divide is refused."""
        heads = max(1, width // head_dim)
        if width % heads:
            raise SizeError(f"width {width} does not split into its {heads} heads "
                            f"(width // head_dim, head_dim {head_dim}): give another width "
                            "or head_dim")
        return heads

    @classmethod
    def check_widths(cls, per: dict, options: dict) -> None:
        """Before any run (``per``: each structure's widths): every width splits into heads,
        and an ffmoe baseline leaves its experts hidden units."""
        defaults = task_options(cls.name)
        head_dim = options.get("head_dim", defaults["head_dim"])
        ratio = options.get("ratio", defaults["ratio"])
        for spec, widths in per.items():
            for w in widths:
                cls.heads(w, head_dim)
                cls._check_hidden(spec, ffmoe_options(spec), ratio, w)

    @staticmethod
    def _check_hidden(spec, moe, ratio: int, width: int) -> None:
        if moe and ratio * width < moe["k"]:  # each expert's hidden width is ratio*width // k
            raise SizeError(f"{spec} at width {width} leaves its experts no hidden units "
                            f"(ratio * width // k = {ratio * width} // {moe['k']} = 0); "
                            f"k must be at most {ratio * width} here")

    def build(self, spec, width: int) -> nn.Module:
        moe = ffmoe_options(spec)
        self._check_hidden(spec, moe, self.ratio, width)
        heads = self.heads(width, self.head_dim)
        model = GPT(width, self.layers, heads, self.context, ratio=self.ratio, moe=moe)
        structure_model(model, "dense" if moe else spec, include="blocks.*")
        return model

    def extra_flops(self, width: int) -> tuple[int, int]:
        """Attention scores and their weighted sum, per token: 2 maps of T x width,
        counted over the whole context (causal masking not subtracted)."""
        fwd = self.layers * 2 * (2 * self.context * width)
        return fwd, 2 * fwd

    def batch(self, step: int, size: int, seed: int, rank: int = 0, world: int = 1):
        starts = torch.randint(0, len(self.train) - self.context - 1, (size,),
                               generator=_step_generator(seed, step))
        return self._windows(self.train, _shard(starts, rank, world))

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    @torch.no_grad()
    def evaluate(self, model) -> float:
        total = 0.0
        for i in range(0, self.eval_windows, 32):
            logits = model(self.val_x[i:i + 32])
            total += float(F.cross_entropy(logits.flatten(0, 1), self.val_y[i:i + 32].flatten(),
                                           reduction="sum"))
        return total / self.val_y.numel()
