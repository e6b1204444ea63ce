"""Readable torch source for a lowered structure.

The same text serves three purposes: the plain forward of :class:`einc.StructuredLinear`
(used under torch.compile and torch.export), ``module.source``, and the standalone file
``einc compile -o layer.py`` writes. Only validated identifiers (index and factor names
checked by :func:`safe_name`) and integers reach the text; the spec itself appears only in
comments, escaped by :func:`comment`.
"""
from __future__ import annotations

import keyword
import math
import re

from .lower import Lowered

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: attribute names of nn.Module (and of our modules) a factor may not shadow
RESERVED = frozenset({
    "bias", "weight", "forward", "training", "parameters", "buffers", "modules", "children",
    "state_dict", "load_state_dict", "to", "cuda", "cpu", "float", "double", "half", "type",
    "apply", "train", "eval", "zero_grad", "register_buffer", "register_parameter", "extra_repr",
    "factors", "equation", "input_sizes", "output_sizes", "reset_parameters", "source",
    "structure", "lowered", "route", "in_features", "out_features", "spec", "materialize",
    "lr_multipliers", "plan", "x", "y", "z", "n", "lead", "torch", "nn", "math", "self",
    "requires_grad_", "share_memory", "named_parameters", "get_parameter", "dtype", "device",
})


def safe_name(name: str) -> str:
    """A factor's attribute name: its own when that is a plain, unreserved identifier, else
    a sanitised one (never raw text in generated code)."""
    if not _IDENT.match(name) or keyword.iskeyword(name) or name.startswith("_"):
        cleaned = re.sub(r"[^A-Za-z0-9_]", "_", name).strip("_") or "factor"
        name = "w_" + cleaned
    if name in RESERVED or keyword.iskeyword(name):
        name = "w_" + name
    assert _IDENT.match(name) and not keyword.iskeyword(name)
    return name


def attribute_names(low: Lowered) -> list[str]:
    names, seen = [], set()
    for f in low.structure.factors:
        n = safe_name(f.name)
        while n in seen:
            n += "_"
        seen.add(n)
        names.append(n)
    return names


def comment(text: str) -> str:
    """Text safe inside a ``#`` comment: one line, printable ASCII."""
    return re.sub(r"[^\x20-\x7e]", "?", str(text))


def _idx(names) -> str:
    return " ".join(comment(i) for i in names)


def _perm(src, dst) -> str:
    return ", ".join(str(src.index(i)) for i in dst)


def init_views(low: Lowered) -> list[tuple[tuple[int, ...], tuple[int, int, int]]]:
    """Per factor: the permutation to its storage order and its [B, K, N] matrix shape.

    Each factor is initialised as a dense map per batch entry: Gaussian columns over the
    indices it contracts (its fan-in), each scaled to unit norm, so every step keeps the
    squared norm of an isotropic activation exactly (variance 1/fan-in per entry, as in muP,
    without the sampling noise of small factors)."""
    out = [None] * len(low.structure.factors)
    for st in low.plan.steps:
        f = low.structure.factors[st.factor]
        shape = tuple(math.prod(low.sizes[i] for i in g)
                      for g in (st.batch, st.contracted, st.right))
        out[st.factor] = (tuple(f.indices.index(i) for i in st.factor_order), shape)
    return out


def fan_in(low: Lowered) -> list[int]:
    out = [1] * len(low.structure.factors)
    for st in low.plan.steps:
        out[st.factor] = math.prod(low.sizes[i] for i in st.contracted)
    return out


def forward_lines(low: Lowered, attrs: list[str], indent: str = "    ") -> list[str]:
    """Body of ``forward(self, x)`` using plain torch ops (default autograd)."""
    s, p, sizes = low.structure, low.plan, low.sizes
    tok = p.token
    dim = lambda group: math.prod(sizes[i] for i in group if i != tok)
    shape = lambda group: ", ".join("n" if i == tok else str(sizes[i]) for i in group)
    merged = lambda group: "n" if tok in group and len(group) == 1 else (
        f"n * {dim(group)}" if tok in group else str(dim(group)))
    L = [f"lead = x.shape[:-1]",
         f"z = x.reshape(-1, {low.d_in})  # x: (n, d_in)",
         "n = z.shape[0]"]
    if low.padded_in > low.d_in:
        L.append(f"z = torch.nn.functional.pad(z, (0, {low.padded_in - low.d_in}))"
                 "  # zero-pad the input")
    L.append(f"z = z.view({shape(p.input_order)})  # {comment(s.input.name)}[{_idx(p.input_order)}]")
    order = p.input_order
    for k, st in enumerate(p.steps):
        f = s.factors[st.factor]
        target = st.batch + st.left + st.contracted
        res = s.output.name if k == len(p.steps) - 1 else f"Z{k + 1}"
        out = st.batch + st.left + st.right
        L.append(f"# {comment(res)}[{_idx(out)}] = {comment('Z%d' % k if k else s.input.name)}"
                 f"[{_idx(order)}] * {comment(f.name)}[{_idx(f.indices)}]")
        lhs = f"z.permute({_perm(order, target)})" if tuple(order) != target else "z"
        fac = f"self.{attrs[st.factor]}"
        rhs = f"{fac}.permute({_perm(f.indices, st.factor_order)})" \
            if tuple(f.indices) != st.factor_order else fac
        L.append(f"z = torch.bmm({lhs}.reshape({merged(st.batch) if st.batch else 1}, "
                 f"{merged(st.left)}, {dim(st.contracted)}),")
        L.append(f"              {rhs}.reshape({dim(st.batch)}, {dim(st.contracted)}, "
                 f"{dim(st.right)}))  # [{_idx(st.batch)}] x [{_idx(st.left)}] x [{_idx(st.right)}]")
        L.append(f"z = z.view({shape(out)})")
        order = out
    final = p.output_order
    if tuple(order) != final:
        L.append(f"z = z.permute({_perm(order, final)})  # {comment(s.output.name)}[{_idx(final)}]")
    L.append(f"y = z.reshape(n, {low.padded_out})")
    if low.padded_out > low.d_out:
        L.append(f"y = y[:, :{low.d_out}]  # drop the padded outputs")
    L.append("if self.bias is not None:")
    L.append("    y = y + self.bias")
    L.append(f"return y.reshape(*lead, {low.d_out})")
    return [indent + line for line in L]


def forward_source(low: Lowered, attrs: list[str]) -> str:
    body = "\n".join(forward_lines(low, attrs))
    return f"def forward(self, x):\n{body}\n"


def module_source(low: Lowered, class_name: str = "StructuredLayer", spec: str = "") -> str:
    """A standalone module file that imports only torch."""
    if not _IDENT.match(class_name) or keyword.iskeyword(class_name):
        raise ValueError(f"class name {class_name!r} is not a Python identifier")
    s = low.structure
    attrs = attribute_names(low)
    views = init_views(low)
    sizes = ", ".join(f"{comment(i)}={low.sizes[i]}" for i in s.index_names)
    lines = [
        f"# Generated by einc from: {comment(spec or s.source or s.equation)}",
        f"# einsum {s.equation}; sizes {sizes}",
        f"# d_in {low.d_in} -> d_out {low.d_out}; {low.params:,} parameters, "
        f"{low.flops:,} FLOPs per vector",
        "import torch",
        "from torch import nn",
        "",
        "",
        f"class {class_name}(nn.Module):",
        f'    """y = W x + b with W structured as {s.equation} ({low.d_in} -> {low.d_out})."""',
        "",
        f'    equation = "{s.equation}"',
        f"    input_sizes = {tuple(low.input_sizes)!r}",
        f"    output_sizes = {tuple(low.output_sizes)!r}",
        f"    in_features = {low.d_in}",
        f"    out_features = {low.d_out}",
        "",
        "    def __init__(self, bias=True, device=None, dtype=None):",
        "        super().__init__()",
        '        kw = {"device": device, "dtype": dtype}',
    ]
    for k, f in enumerate(s.factors):
        st = next(st for st in low.plan.steps if st.factor == k)
        store = st.factor_order
        if tuple(store) != tuple(f.indices):
            lines.append(f"        # {comment(f.name)}[{_idx(f.indices)}] is stored as "
                         f"[{_idx(store)}]: its step reads it without a copy")
        view = "" if tuple(store) == tuple(f.indices) else f".permute({_perm(store, f.indices)})"
        lines.append(f"        self.{attrs[k]} = nn.Parameter(torch.empty("
                     f"{', '.join(str(low.sizes[i]) for i in store)}, **kw){view})")
    lines += [
        "        if bias:",
        f"            self.bias = nn.Parameter(torch.empty({low.d_out}, **kw))",
        "        else:",
        '            self.register_parameter("bias", None)',
        "        self.reset_parameters()",
        "",
        "    def factors(self):",
        f"        return [{', '.join('self.' + a for a in attrs)}]",
        "",
        "    def reset_parameters(self):",
        "        with torch.no_grad():",
    ]
    lines.append("            # each factor: unit-norm Gaussian columns over its fan-in, per batch entry")
    for a, (perm, shape) in zip(attrs, views):
        lines.append(f"            w = self.{a}.permute({', '.join(map(str, perm))})"
                     f".reshape{shape}")
        lines.append("            w.normal_()")
        lines.append("            w.div_(w.norm(dim=1, keepdim=True))")
    lines += ["            if self.bias is not None:",
              "                self.bias.zero_()",
              ""]
    lines.append("    def forward(self, x):")
    lines += forward_lines(low, attrs, indent="        ")
    return "\n".join(lines) + "\n"
