"""Stage 1: spec text -> :class:`~einc.ir.Structure`.

The grammar lives in ``grammar/einc.lark`` (shipped in the wheel as ``einc/grammar``).
Every spelling (einsum, named einsum, theta point, preset) ends in :func:`build`, which
checks the einsum and solves open sizes, so later stages see one kind of structure.
"""
from __future__ import annotations

import collections
import functools
import keyword
from dataclasses import dataclass
from fractions import Fraction
from importlib import resources
from pathlib import Path

import lark

from .errors import (Pos, SizeError, SpecSyntaxError, SpecTypeError, StructureError,
                     UnknownNameError)
from .ir import MAX_INDICES, Index, MoE, Operand, Structure
from .sizes import MAX_BITS, SYMBOLS, Size, check_bounds, number, size_problem


# ---------------------------------------------------------------------------- grammar
def grammar_text() -> str:
    try:
        return resources.files("einc.grammar").joinpath("einc.lark").read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        # Running from a source checkout that was not installed.
        return (Path(__file__).resolve().parent.parent / "grammar" / "einc.lark").read_text()


@functools.lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    return lark.Lark(grammar_text(), parser="lalr", propagate_positions=True)


_TERMINALS = {
    "NAME": "a name", "NUMBER": "a number", "ARROW": "'->'", "COMMA": "','",
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "VBAR": "'|'",
    "EQUAL": "'='", "_WITH": "'with'", "MULOP": "'*' or '/'", "POWOP": "'^'",
    "ADDOP": "'+' or '-'", "MINUS": "'-'", "$END": "the end of the spec",
}


def _expected(names) -> str:
    return ", ".join(sorted({_TERMINALS.get(n, n) for n in names}))


@dataclass(frozen=True)
class Binding:
    """``names[0] = names[1] = ... = value``; ``value`` None is a tie without a size."""

    names: tuple[tuple[str, Pos | None], ...]
    value: Size | None = None
    value_pos: Pos | None = None


# ---------------------------------------------------------------------------- entry point
def as_structure(spec) -> Structure:
    """The structure of a spec given to analyze or compile: text is parsed, a Structure
    (perhaps built by hand) is checked."""
    return check(spec) if isinstance(spec, Structure) else parse(spec)


def parse(spec: str) -> Structure:
    """Parse a spec into a structure (cached: the IR is immutable)."""
    if not isinstance(spec, str):
        raise SpecTypeError("a spec is a string (an einsum, a theta point or a preset such "
                            f"as 'btt'), got {type(spec).__name__}")
    return _parse_cached(spec)


@functools.lru_cache(maxsize=4096)
def _parse_cached(spec: str) -> Structure:
    if not spec.strip():
        raise SpecSyntaxError(
            "empty spec: expected an einsum (ga,gafr,fgre->fe), a theta point "
            "((0.5|0|0.5|0|0.5|0.5|0)) or a preset name (dense, btt, ...)", spec, Pos.at(spec, 0))
    tree = _lark_parse(spec)
    body = tree.children[0]
    bindings = (_bindings(tree.children[1], spec, _written_indices(body))
                if len(tree.children) > 1 else [])
    if body.data == "compact":
        return _compact(body, bindings, spec)
    if body.data == "named":
        return _named(body, bindings, spec)
    if body.data == "theta":
        from .theta import lower_theta
        return lower_theta(_theta_values(body, spec), spec, _pos(body, spec), bindings)
    from .presets import lower_preset
    return lower_preset(body.children[0].value, _preset_args(body, spec), spec,
                        _pos(body.children[0], spec), bindings)


def _lark_parse(spec: str) -> lark.Tree:
    try:
        return _parser().parse(spec)
    except lark.UnexpectedEOF as e:
        allowed = _accepted_after(spec) or e.expected
        raise SpecSyntaxError(f"the spec ends too early; expected {_expected(allowed)}",
                              spec, Pos.at(spec, max(len(spec) - 1, 0))) from None
    except lark.UnexpectedCharacters as e:
        ch = spec[e.pos_in_stream]
        ascii_only = "" if ch.isascii() else (
            " (names are ASCII: a letter or _, then letters, digits or _)")
        allowed = _accepted_after(spec[:e.pos_in_stream]) or e.allowed
        raise SpecSyntaxError(f"unexpected character {ch!r}; expected {_expected(allowed)}"
                              f"{ascii_only}", spec, Pos.at(spec, e.pos_in_stream)) from None
    except lark.UnexpectedToken as e:
        tok = e.token
        if tok.type == "$END":
            allowed = _accepted_after(spec) or e.expected
            raise SpecSyntaxError(f"the spec ends too early; expected {_expected(allowed)}",
                                  spec, Pos.at(spec, max(len(spec.rstrip()) - 1, 0))) from None
        allowed = _accepted_after(spec[:tok.start_pos]) or e.expected
        raise SpecSyntaxError(f"unexpected {tok.value!r}; expected {_expected(allowed)}",
                              spec, Pos.at(spec, tok.start_pos, tok.end_pos)) from None


def _accepted_after(prefix: str) -> set:
    """The terminals the grammar takes after ``prefix``. The lists lark attaches to a bad
    character or token are the state's, which LALR shares between places (after an output
    operand they offered ',' and '->' too; after a size, ')' and '|' but not '*' or '^');
    feeding the prefix to the parser gives the exact set. Empty where the prefix cannot be
    replayed."""
    try:
        ip = _parser().parse_interactive(prefix)
        ip.exhaust_lexer()
        return set(ip.accepts())
    except lark.exceptions.LarkError:
        return set()


def _pos(node, spec: str) -> Pos:
    if isinstance(node, lark.Token):
        return Pos.at(spec, node.start_pos, node.end_pos)
    return Pos.at(spec, node.meta.start_pos, node.meta.end_pos)


# ---------------------------------------------------------------------------- einsum forms
def _compact(body: lark.Tree, bindings: list[Binding], spec: str) -> Structure:
    toks = [t for t in body.children if isinstance(t, lark.Token)]
    arrow = next(i for i, t in enumerate(toks) if t.type == "ARROW")
    terms, out = toks[:arrow], toks[arrow + 1:]

    def operand(tok, name):
        if tok is None:
            return Operand(name, (), Pos.at(spec, body.meta.end_pos - 1), ())
        for k, ch in enumerate(tok.value):
            if not ch.isalpha():
                raise StructureError(
                    f"{ch!r} is not an index: the einsum spelling takes one letter per index "
                    "(use the named form x[i1 i2] A[...] -> y[...] for longer names)",
                    spec, Pos.at(spec, tok.start_pos + k))
        return Operand(name, tuple(tok.value), _pos(tok, spec),
                       tuple(Pos.at(spec, tok.start_pos + k) for k in range(len(tok.value))))

    names = ["x"] + _factor_names(len(terms) - 1)
    ops = [operand(t, n) for t, n in zip(terms, names)]
    output = operand(out[0] if out else None, "y")
    return build(ops[0], ops[1:], output, bindings, spec)


def _factor_names(n: int) -> list[str]:
    letters = "ABCDEFGHIJKLMNOPQRSTUVW"
    return [letters[i] if i < len(letters) else f"F{i}" for i in range(n)]


def _named(body: lark.Tree, bindings: list[Binding], spec: str) -> Structure:
    ops = [c for c in body.children if isinstance(c, lark.Tree)]

    def operand(node):
        name, *idx = [t for t in node.children if t is not None]
        return Operand(name.value, tuple(t.value for t in idx), _pos(name, spec),
                       tuple(_pos(t, spec) for t in idx))

    ops = [operand(o) for o in ops]
    return build(ops[0], ops[1:-1], ops[-1], bindings, spec)


# ---------------------------------------------------------------------------- sizes
def _written_indices(body: lark.Tree) -> frozenset[str]:
    """The index names an einsum spells out (a bare ``d`` after ``with`` then means the index)."""
    if body.data == "compact":
        return frozenset(ch for t in body.children if isinstance(t, lark.Token)
                         and t.type == "NAME" for ch in t.value)
    if body.data == "named":
        return frozenset(t.value for op in body.children if isinstance(op, lark.Tree)
                         for t in op.children[1:] if t is not None)
    return frozenset()


def _bindings(node: lark.Tree, spec: str, indices=frozenset()) -> list[Binding]:
    out = []
    for b in node.children:
        first, *rest = b.children
        names = [(first.value, _pos(first, spec))]
        value = value_pos = None
        for k, item in enumerate(rest):
            last = k == len(rest) - 1
            if item.data == "symbol" and (item.children[0].value not in SYMBOLS
                                          or item.children[0].value in indices):
                names.append((item.children[0].value, _pos(item, spec)))
            elif last:
                value, value_pos = eval_size(item, spec), _pos(item, spec)
            else:
                raise SpecSyntaxError("only index names may stand between '=' signs; "
                                      "the size comes last (g = a = 32)", spec, _pos(item, spec))
        out.append(Binding(tuple(names), value, value_pos))
    return out


def eval_size(node, spec: str, signed: bool = False) -> Size:
    """Evaluate a size expression tree to a monomial (``signed``: inside an exponent, where
    a minus sign is allowed: ``d_out^(-1/4)``).

    The walk is iterative (an expression may be thousands of operators long) and every
    sub-expression is bounded (:func:`einc.sizes.check_bounds`) as soon as it is computed;
    an error names the sub-expression that failed.
    """
    # (node, signed, children done); values of finished sub-expressions on `done`
    todo, done = [(node, signed, False)], []
    while todo:
        n, sgn, ready = todo.pop()
        if isinstance(n, lark.Token):
            raise SpecSyntaxError("expected a size expression", spec, _pos(n, spec))
        kind = n.data
        if not ready:
            if kind in ("number", "symbol"):
                done.append(_leaf(n, spec))
            elif kind == "add":
                raise SizeError("sizes are products, quotients and powers (no sums): write "
                                "2*d, d/4 or d^(1/2)", spec, _pos(n.children[1], spec))
            elif kind == "neg":
                if not sgn:
                    raise SizeError("sizes must be positive", spec, _pos(n, spec))
                todo += [(n, sgn, True), (n.children[0], sgn, False)]
            elif kind == "mul":  # the left operand is evaluated first
                todo += [(n, sgn, True), (n.children[2], sgn, False), (n.children[0], sgn, False)]
            elif kind == "pow":  # the exponent first; the base is never signed
                todo += [(n, sgn, True), (n.children[0], False, False), (n.children[2], True, False)]
            else:  # pragma: no cover
                raise SpecSyntaxError(f"unexpected {kind}", spec, _pos(n, spec))
            continue
        try:
            if kind == "neg":
                value = Size.const(-1) * done.pop()
            elif kind == "mul":
                b, a = done.pop(), done.pop()
                value = a * b if n.children[1].value == "*" else a / b
            else:  # pow
                base, exponent = done.pop(), done.pop()
                if not exponent.is_const:
                    raise SizeError("an exponent must be a number", spec,
                                    _pos(n.children[2], spec))
                value = base ** exponent.coeff
            done.append(check_bounds(value))
        except SizeError as e:
            if e.pos is not None:
                raise
            raise SizeError(e.message.replace("this value", _snippet(n, spec), 1), spec,
                            _pos(n, spec)) from None
        except ValueError as e:
            raise SizeError(str(e), spec, _pos(n, spec)) from None
    return done.pop()


def _snippet(node, spec: str) -> str:
    """The text of a sub-expression for a message, when it is short."""
    text = spec[node.meta.start_pos:node.meta.end_pos]
    return text if len(text) <= 24 else "this expression"


def _leaf(node, spec: str) -> Size:
    token = node.children[0]
    if node.data == "number":
        try:
            return number(token.value)
        except SizeError as e:
            raise SizeError(e.message, spec, _pos(node, spec)) from None
    if token.value not in SYMBOLS:
        raise SizeError(f"unknown size symbol {token.value!r}; sizes may use numbers and "
                        f"{', '.join(SYMBOLS)}", spec, _pos(node, spec))
    return Size.symbol(token.value)


def _theta_values(body: lark.Tree, spec: str) -> list[tuple[Fraction, Pos]]:
    """The exponents of a theta point, each with its position. A minus sign is read (-0 is
    0; a negative value is refused by :func:`einc.theta.lower_theta`, which names it); a
    name (d, x, nan, inf), an irrational value or one past the size limits is refused here,
    naming the component."""
    from .theta import CLASSES, check_count

    check_count(len(body.children), spec, _pos(body, spec))  # before evaluating them
    out = []
    for i, item in enumerate(body.children):
        name = CLASSES[i]
        pos = _pos(item, spec)
        text = spec[item.meta.start_pos:item.meta.end_pos]
        what = f"{name} = {text}" if len(text) <= 24 else name
        if any(t.data == "symbol" for t in item.iter_subtrees()):
            raise SizeError(f"{what} is not a number: theta exponents are numbers in [0, 1]",
                            spec, pos)
        if any(t.data == "add" for t in item.iter_subtrees()):  # else read as out of range
            raise SizeError(f"{what} is a sum: a theta exponent is one number in [0, 1] "
                            "(0.5, 1/2 or 2^(-1)), with no + or - between terms", spec, pos)
        try:
            value = eval_size(item, spec, signed=True)
        except SizeError as e:
            # the size limits (2^32, positive integers) mean here: out of range, or ~0
            if "division by zero" in e.message:
                raise
            if "too many digits" in e.message:
                raise SizeError(f"{name}: {e.message}", spec, e.pos) from None
            why = ("is too small to tell from 0: write 0" if "too small" in e.message
                   else f"is out of range: exponents lie in [0, 1] (and every number written "
                        f"in one within {MAX_BITS} bits)")
            raise SizeError(f"{what} {why}", spec, pos) from None
        if not value.is_const:  # a root such as 2^(1/2): no rational point of the space
            raise SizeError(f"{what} is not a rational number: theta exponents are rational "
                            "numbers in [0, 1]", spec, pos)
        out.append((Fraction(value.coeff), pos))
    return out


def _preset_args(body: lark.Tree, spec: str) -> list[tuple[str, Size, Pos, Pos]]:
    args = []
    for arg in body.children[1:]:
        if arg is None:
            continue
        name, value = arg.children
        # signed: a negative value reaches lower_preset, whose message names the parameter
        args.append((name.value, eval_size(value, spec, signed=True), _pos(name, spec),
                     _pos(value, spec)))
    return args


# ---------------------------------------------------------------------------- checks + solve
def build(inp: Operand, factors, output: Operand, bindings: list[Binding], spec: str, *,
          moe: MoE | None = None, origin: str = "einsum", theta=None) -> Structure:
    """Check an einsum and solve its sizes; every spelling of a structure goes through here."""
    factors = tuple(factors)
    _check_einsum(inp, factors, output, spec)
    first_pos = _first_positions((inp, *factors, output))
    order = list(first_pos)
    sizes = solve_sizes(order, inp, output, bindings, spec, first_pos)
    indices = tuple(Index(i, sizes[i], first_pos[i]) for i in order)
    return Structure(inp, factors, output, indices, moe=moe, source=spec, origin=origin,
                     theta=theta)


def check(s: Structure) -> Structure:
    """``s``, after the checks a written spec gets in :func:`build`, with its given sizes in
    place of solving them: a Structure built by hand otherwise reached the analysis and
    codegen unchecked (a KeyError for an index without a size, IndexError for no factors)."""
    spec = s.source or None  # no text: the messages come without a caret
    _check_types(s)
    _check_einsum(s.input, s.factors, s.output, spec)
    _check_given_sizes(s, spec)
    if s.moe is not None:
        _check_moe(s, spec)
    if s.theta is not None:
        _check_theta(s, spec)
    return s


def _check_theta(s: Structure, spec):
    """A theta given with a hand-built structure is the point its sizes read as (in either
    orientation): the report shows it and the paper's rules computed from it."""
    from .analysis.taxonomy import read_theta
    from .theta import check_count

    theta = s.theta
    if not isinstance(theta, (tuple, list)):
        raise SizeError(f"theta must be None or a tuple of 7 exponents, got {theta!r}", spec,
                        s.input.pos)
    check_count(len(theta), spec, s.input.pos)
    read = read_theta(s)
    try:
        ok = read is not None and tuple(Fraction(t) for t in theta) in read
    except (TypeError, ValueError):
        ok = False
    if not ok:
        fmt = lambda t: "(" + "|".join(str(v) for v in t) + ")"
        got = "no theta point" if read is None else f"{fmt(read[0])} or {fmt(read[1])}"
        shown = fmt(theta) if all(
            isinstance(v, (int, float, Fraction)) for v in theta) else repr(theta)
        raise SizeError(f"theta {shown} does not match the structure's sizes, which read as "
                        f"{got}: leave theta None to read it off", spec, s.input.pos)


def _check_einsum(inp, factors, output, spec):
    _check_names(inp, factors, output, spec)
    _check_count(inp, factors, output, spec)
    _check_indices(inp, factors, output, spec)


def _first_positions(ops) -> dict:
    """Every index, in order of first appearance, with where it is first written (or None)."""
    first = {}
    for op in ops:
        for k, i in enumerate(op.indices):
            first.setdefault(i, op.index_pos[k] if k < len(op.index_pos) else None)
    return first


def _check_types(s: Structure):
    """The IR's own nodes, in tuples: later stages hash structures (a list of factors gave
    'unhashable type')."""
    def need(ok, what, kind, value):
        if not ok:
            raise SpecTypeError(f"{what} must be {kind}, got {type(value).__name__}")

    need(isinstance(s.input, Operand), "Structure.input", "an Operand", s.input)
    need(isinstance(s.output, Operand), "Structure.output", "an Operand", s.output)
    need(isinstance(s.factors, tuple) and all(isinstance(f, Operand) for f in s.factors),
         "Structure.factors", "a tuple of Operand", s.factors)
    need(isinstance(s.indices, tuple), "Structure.indices", "a tuple of Index", s.indices)
    for ix in s.indices:
        need(isinstance(ix, Index), "each of Structure.indices", "an Index", ix)
        need(isinstance(ix.name, str), "an Index's name", "a str", ix.name)
        need(isinstance(ix.size, Size), f"the size of index {ix.name!r}",
             "a Size (einc.sizes.Size.const(8) for 8)", ix.size)
    for op in s.operands:
        need(isinstance(op.name, str), "an operand's name", "a str", op.name)
        need(isinstance(op.indices, tuple) and all(isinstance(i, str) for i in op.indices),
             f"the indices of {op.name}", "a tuple of index names (str)", op.indices)


def _check_given_sizes(s: Structure, spec):
    """One valid size for every index of the operands and for no other (the checks
    :func:`solve_sizes` makes of the sizes written after `with`)."""
    first_pos = _first_positions(s.operands)
    given = {}
    for ix in s.indices:
        if ix.name not in first_pos:
            raise SizeError(f"unknown index {ix.name!r} in the sizes; the indices are "
                            f"{', '.join(first_pos)}", spec, ix.pos)
        if ix.name in given:
            raise SizeError(f"index {ix.name!r} is given two sizes: {given[ix.name].short()} "
                            f"and {ix.size.short()}", spec, ix.pos)
        problem = size_problem(ix.size)
        if problem:
            raise SizeError(f"size {ix.size.short()} of index {ix.name!r} {problem}", spec,
                            ix.pos)
        given[ix.name] = ix.size
    missing = [i for i in first_pos if i not in given]
    if missing:
        raise SizeError(f"the size of {', '.join(missing)} is not given: a Structure lists "
                        "every index of its operands in its indices, with a size", spec,
                        first_pos[missing[0]])
    for op, what in ((s.input, "d_in"), (s.output, "d_out")):
        _check_product(op, given, what, spec)


def _check_moe(s: Structure, spec):
    e, k = s.moe.expert_index, s.moe.k
    outside = [f.name for f in s.factors if e not in f.indices]
    if outside:
        raise StructureError(f"expert index {e!r} is not in {', '.join(outside)}: the expert "
                             "index joins every factor", spec, s.input.pos)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SizeError(f"k = {k!r} is not a positive integer: each input is routed to k "
                        "experts, k >= 1", spec, s.input.pos)


def _check_names(inp, factors, output, spec):
    if not factors:
        raise StructureError("a structure needs at least one weight factor after the input "
                             "(for example x[i] W[i o] -> y[o])", spec, inp.pos)
    seen = {}
    for op in (inp, *factors, output):
        _check_identifier(op.name, "operand", spec, op.pos)
        if op.name in seen:
            raise StructureError(f"duplicate operand name {op.name!r}: factor names must be "
                                 "unique", spec, op.pos)
        seen[op.name] = op
        for i, p in zip(op.indices, op.index_pos or [None] * len(op.indices)):
            _check_identifier(i, "index", spec, p)


def _check_count(inp, factors, output, spec):
    """At most MAX_INDICES distinct indices: torch.einsum names each with one letter."""
    seen = set()
    for op in (inp, *factors, output):
        for k, i in enumerate(op.indices):
            seen.add(i)
            if len(seen) > MAX_INDICES:
                pos = op.index_pos[k] if k < len(op.index_pos) else (op.pos or inp.pos)
                total = len({j for o in (inp, *factors, output) for j in o.indices})
                raise StructureError(
                    f"this structure has {total} indices; einc allows at most {MAX_INDICES} "
                    "(torch.einsum names each index with one of the 52 letters, and one is kept "
                    "for the batch)", spec, pos)


def _check_identifier(name: str, what: str, spec, pos):
    if keyword.iskeyword(name) or name.startswith("__"):
        raise StructureError(f"{what} name {name!r} is reserved (a Python keyword or dunder "
                             "name); choose another", spec, pos)


def _check_indices(inp, factors, output, spec):
    where = lambda op, k: op.index_pos[k] if k < len(op.index_pos) else op.pos
    for op in (inp, *factors, output):
        dup = [k for k, i in enumerate(op.indices) if op.indices.index(i) != k]
        if dup:
            raise StructureError(f"index {op.indices[dup[0]]!r} appears twice in {op.name}: "
                                 "diagonals are not linear layers einc supports", spec,
                                 where(op, dup[0]))
    if not inp.indices:
        raise StructureError("the input has no indices", spec, inp.pos)
    if not output.indices:
        raise StructureError("the output has no indices: write at least one after '->'",
                             spec, output.pos)
    for f in factors:
        if not f.indices:  # a scalar weight only rescales another factor
            raise StructureError(f"factor {f.name} has no indices: a scalar weight adds nothing "
                                 "a factor with indices cannot learn; drop it", spec, f.pos)
    in_factors = {i for f in factors for i in f.indices}
    for k, i in enumerate(output.indices):
        if i not in inp.indices and i not in in_factors:
            raise StructureError(f"output index {i!r} appears in no operand", spec,
                                 where(output, k))
    for op, role in ((inp, "input"), (output, "output")):
        for k, i in enumerate(op.indices):
            if i not in in_factors:
                raise StructureError(f"{role} index {i!r} is touched by no factor: every "
                                     "index of the input and output must meet a weight",
                                     spec, where(op, k))
    tensors = collections.Counter(i for op in (inp, *factors, output) for i in op.indices)
    for f in factors:
        for k, i in enumerate(f.indices):
            if tensors[i] == 1:
                raise StructureError(
                    f"index {i!r} appears only in {f.name}: an index must join at least two "
                    "tensors (sum it out of the factor instead)", spec, where(f, k))


def solve_sizes(order, inp: Operand, output: Operand, bindings: list[Binding], spec: str,
                first_pos: dict | None = None):
    """Assign a Size to every index: given values, ties, then d_in / d_out products
    (``first_pos``: where each index is first written, for the messages)."""
    parent = {i: i for i in order}

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    values: dict[str, tuple[Size, Pos | None]] = {}

    def give(root, value, pos, name):
        if root in values and values[root][0] != value:
            raise SizeError(f"index {name!r} is given two sizes: {values[root][0].short()} and "
                            f"{value.short()}", spec, pos)
        values.setdefault(root, (value, pos))

    def union(a, b, pos):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[rb] = ra
            if rb in values:
                give(ra, *values.pop(rb), a)

    for b in bindings:
        for name, pos in b.names:
            if name not in parent:
                raise SizeError(f"unknown index {name!r} in the sizes; the indices are "
                                f"{', '.join(order)}", spec, pos)
        problem = None if b.value is None else size_problem(b.value)
        if problem:
            raise SizeError(f"size {b.value.short()} {problem}", spec, b.value_pos)
        first = b.names[0][0]
        for name, pos in b.names[1:]:
            union(first, name, pos)
        if b.value is not None:
            give(find(first), b.value, b.value_pos, first)

    def solve(op: Operand, total: Size, what: str):
        known, open_groups = Size.const(1), {}
        for i in op.indices:
            r = find(i)
            if r in values:
                known = known * values[r][0]
            else:
                open_groups[r] = open_groups.get(r, 0) + 1
        if len(open_groups) > 1:
            names = [i for i in op.indices if find(i) in open_groups]
            raise SizeError(
                f"cannot solve the sizes of {', '.join(names)} from {what} alone: give them, "
                f"for example `with {' = '.join(names)} = {what}^(1/{len(names)})`, or tie "
                "them with `=`", spec, op.pos)
        for r, m in open_groups.items():
            values[r] = ((total / known) ** Fraction(1, m), None)

    solve(inp, Size.symbol("d_in"), "d_in")
    solve(output, Size.symbol("d_out"), "d_out")
    missing = [i for i in order if find(i) not in values]
    if missing:
        pos = (first_pos or {}).get(missing[0])
        if pos is None and spec:
            pos = Pos.at(spec, len(spec.rstrip()) - 1)
        raise SizeError(f"the size of {', '.join(missing)} is not given and cannot be solved "
                        "from d_in or d_out: add it after `with`", spec, pos)
    sizes = {i: values[find(i)][0] for i in order}
    for op, what in ((inp, "d_in"), (output, "d_out")):
        _check_product(op, sizes, what, spec)
    return sizes


def _check_product(op: Operand, sizes, what: str, spec: str):
    total = Size.const(1)
    for i in op.indices:
        total = total * sizes[i]
    # a side may also multiply to the other side's width (`with o = i`): it then needs
    # d_in and d_out to agree, or padding, which sizing at concrete widths checks
    ok = total.is_const or (total.coeff == 1 and len(total.powers) == 1 and
                            total.powers[0] in ((what, 1), ("d", 1), ("d_in", 1), ("d_out", 1)))
    if not ok:
        raise SizeError(f"the sizes of {op.name}[{' '.join(op.indices)}] multiply to {total}, "
                        f"which cannot match {what}", spec, op.pos)


def preset_error(message, spec, pos, known=None):
    hint = f"known: {', '.join(known)}" if known else None
    return UnknownNameError(message, spec, pos, hint)
