"""Readable torch source for a lowered structure.

The same text serves three purposes: the plain forward of :class:`einc.StructuredLinear`
(used under torch.compile and torch.export), ``module.source``, and the standalone file
``einc compile -o layer.py`` writes. Only validated identifiers (index and factor names
checked by :func:`safe_name`) and integers reach the text; the spec itself appears only in
comments, escaped by :func:`comment`.
"""
from __future__ import annotations

import dis
import functools
import keyword
import math
import re
import symtable

from ..errors import CompileError
from .lower import Lowered

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: names earlier versions reserved by hand: kept so that their state_dict keys stay the same
_LEGACY_RESERVED = frozenset({
    "bias", "weight", "forward", "training", "parameters", "buffers", "modules", "children",
    "state_dict", "load_state_dict", "to", "cuda", "cpu", "float", "double", "half", "type",
    "apply", "train", "eval", "zero_grad", "register_buffer", "register_parameter", "extra_repr",
    "factors", "equation", "input_sizes", "output_sizes", "reset_parameters", "source",
    "structure", "lowered", "route", "in_features", "out_features", "spec", "materialize",
    "lr_multipliers", "plan", "x", "y", "z", "n", "lead", "torch", "nn", "math", "self",
    "requires_grad_", "share_memory", "named_parameters", "get_parameter", "dtype", "device",
})
#: class name used while deriving which names a generated module relies on
_PLACEHOLDER = "EincGeneratedClass"


@functools.cache
def reserved_names() -> frozenset[str]:
    """Names a factor attribute may not take: every attribute of torch.nn.Module (class and
    instance), every attribute StructuredLinear defines or assigns, and every name the
    generated module and forward use. Derived, not listed, so that it follows torch and einc."""
    from torch import nn

    from ..runtime.module import StructuredLinear  # lazy: that module imports this one
    from .lower import lower

    names = set(_LEGACY_RESERVED) | set(dir(nn.Module)) | set(vars(nn.Module()))
    names |= set(dir(StructuredLinear)) | _assigned_attributes(StructuredLinear)
    table = symtable.symtable(_module_text(lower("dense", 2, 2), ["W"], _PLACEHOLDER),
                              "<einc module>", "exec")
    for scope in _scopes(table):  # module imports, class attributes, forward locals
        if scope.get_type() != "function" or scope.get_name() == "forward":
            names |= set(scope.get_identifiers())
    return frozenset(names - {_PLACEHOLDER})


def __getattr__(name):  # RESERVED was a constant; it now needs torch, so it is computed late
    if name == "RESERVED":
        return reserved_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _assigned_attributes(cls) -> set[str]:
    """Attribute names the methods of ``cls`` (and its einc bases) assign, e.g. ``self.chunk``:
    instance attributes that dir(cls) does not show."""
    out = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("einc."):
            continue
        for value in vars(klass).values():
            funcs = (value.fget, value.fset, value.fdel) if isinstance(value, property) \
                else (getattr(value, "__func__", value),)
            codes = [f.__code__ for f in funcs if hasattr(f, "__code__")]
            while codes:
                code = codes.pop()
                codes += [c for c in code.co_consts if hasattr(c, "co_code")]
                out |= {i.argval for i in dis.get_instructions(code)
                        if i.opname in ("STORE_ATTR", "DELETE_ATTR")}
    return out


def _scopes(table):
    stack = [table]
    while stack:
        t = stack.pop()
        yield t
        stack += t.get_children()


def safe_name(name: str) -> str:
    """A factor's attribute name: its own when that is a plain, unreserved identifier, else
    a sanitised one (never raw text in generated code)."""
    if not _IDENT.fullmatch(name) or keyword.iskeyword(name) or name.startswith("_"):
        cleaned = re.sub(r"[^A-Za-z0-9_]", "_", name).strip("_") or "factor"
        name = "w_" + cleaned
    if name in reserved_names() or keyword.iskeyword(name):
        name = "w_" + name
    assert _IDENT.fullmatch(name) and not keyword.iskeyword(name)
    return name


def padding_gain(low: Lowered) -> float:
    """sqrt(padded_in / d_in): zero-padding the input to padded_in entries scales its RMS by
    the inverse, which one factor's initialisation makes up for."""
    return math.sqrt(low.padded_in / low.d_in)


def attribute_names(low: Lowered) -> list[str]:
    """Each factor's attribute: its own name where :func:`safe_name` keeps it; a renamed one
    never takes a name the spec wrote (``bias`` next to a factor ``w_bias`` becomes
    ``w_bias_``, whatever their order)."""
    factors = low.structure.factors
    wanted = [safe_name(f.name) for f in factors]
    written = {n for f, n in zip(factors, wanted) if n == f.name}
    names, seen = [], set()
    for f, n in zip(factors, wanted):
        while n in seen or (n != f.name and n in written):
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
    L.append("if self.bias is not None:  # in y's dtype, as nn.Linear under autocast")
    L.append("    y = y + self.bias.to(y.dtype)")
    # contiguous as nn.Linear's output: a slice past padded outputs, or a result whose
    # last permute reshaped as a view, is strided (a no-op otherwise)
    L.append(f"return y.reshape(*lead, {low.d_out}).contiguous()")
    return [indent + line for line in L]


def forward_source(low: Lowered, attrs: list[str]) -> str:
    body = "\n".join(forward_lines(low, attrs))
    return f"def forward(self, x):\n{body}\n"


def module_source(low: Lowered, class_name: str = "StructuredLayer", spec: str = "") -> str:
    """A standalone module file that imports only torch."""
    check_class_name(low, class_name)
    return _module_text(low, attribute_names(low), class_name, spec)


def check_class_name(low: Lowered, name: str, what: str = "class name") -> None:
    """Refuse a class name that is not a plain ASCII identifier, or that would shadow a name
    the generated module relies on (its imports, the builtins it calls)."""
    used = _module_globals(low)
    why = None
    if not isinstance(name, str) or not _IDENT.fullmatch(name):
        why = "it is not an ASCII Python identifier"
    elif keyword.iskeyword(name):
        why = "it is a Python keyword"
    elif name.startswith("__") and name.endswith("__"):
        why = "it is a dunder name, which Python itself uses"
    elif name in used:
        why = f"the generated module uses {name!r} itself"
    if why:
        raise CompileError(f"{what} {name!r} cannot be used: {why}; a class name must be an "
                           "ASCII Python identifier, not a keyword or dunder name, and none of "
                           f"the names the generated module uses ({', '.join(sorted(used))})")


def _module_globals(low: Lowered) -> frozenset[str]:
    """Module-level names of the generated text (imports, definitions) and the global or
    builtin names its code looks up: what a class of the same name would shadow."""
    table = symtable.symtable(_module_text(low, attribute_names(low), _PLACEHOLDER),
                              "<einc module>", "exec")
    names = set(table.get_identifiers())
    for scope in _scopes(table):
        names |= {sym.get_name() for sym in scope.get_symbols() if sym.is_global()}
    return frozenset(names - {_PLACEHOLDER})


def _module_text(low: Lowered, attrs: list[str], class_name: str, spec: str = "") -> str:
    s = low.structure
    views = init_views(low)
    sizes = ", ".join(f"{comment(i)}={low.sizes[i]}" for i in s.index_names)
    lines = [
        # lines 1 and 2 hold no spec text: Python reads a "coding" there as the encoding
        "# A structured linear layer, generated by einc.",
        "# It needs only torch.",
        f"# spec: {comment(spec or s.source or s.equation)}",
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
        view = "" if perm == tuple(range(len(perm))) else f".permute({', '.join(map(str, perm))})"
        lines += [f"            v = self.{a}{view}",
                  f"            w = torch.empty({', '.join(map(str, shape))}, "
                  "dtype=v.dtype, device=v.device).normal_()",
                  "            norm = w.norm(dim=1, keepdim=True)",
                  "            dead = norm == 0  # an all-zero draw: the constant unit column",
                  f"            w.masked_fill_(dead, {shape[1] ** -0.5!r}).div_(norm.masked_fill_(dead, 1.0))",
                  "            v.copy_(w.view(v.shape))"]
    if low.padded_in != low.d_in:
        lines.append(f"            self.{attrs[0]}.mul_({padding_gain(low)!r})  "
                     f"# input zero-padded {low.d_in} -> {low.padded_in}: keep its RMS")
    lines += ["            if self.bias is not None:",
              "                self.bias.zero_()",
              ""]
    lines += ["    def forward(self, x):",
              f"        if x.dim() == 0 or x.shape[-1] != {low.d_in}:",
              f'            raise ValueError(f"expected input with last dimension {low.d_in}, '
              'got shape {tuple(x.shape)}")']
    lines += forward_lines(low, attrs, indent="        ")
    return "\n".join(lines) + "\n"
