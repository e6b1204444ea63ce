"""The frozen IR every later stage works on.

A :class:`Structure` is an einsum ``y[out] = sum x[in] * F1[...] * F2[...] * ...``: the first
operand is the input vector, every other operand is a weight factor. Every index carries a
:class:`~einc.sizes.Size`. Nodes are frozen and hashable; source positions and the
spelling the user wrote are kept but do not take part in equality.
"""
from __future__ import annotations

import itertools
import string
from dataclasses import dataclass, field, replace
from fractions import Fraction

from .errors import EincError, Pos, StructureError
from .sizes import Size

#: The most indices a structure may have: torch.einsum names each index with one of the 52
#: ASCII letters, and einc keeps one letter free for the batch (token) index.
MAX_INDICES = len(string.ascii_letters) - 1

#: the labels of the input and the output in :meth:`Structure.index_class`
INPUT, OUTPUT = "<x>", "<y>"


@dataclass(frozen=True)
class Index:
    """An index with its size: symbolic (d_in^(1/2)) or concrete (32)."""

    name: str
    size: Size
    pos: Pos | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Operand:
    """A tensor of the einsum: its name and its indices, in axis order."""

    name: str
    indices: tuple[str, ...]
    pos: Pos | None = field(default=None, compare=False)
    index_pos: tuple[Pos, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class MoE:
    """Read index ``expert_index`` (shared by every factor) as experts; route each input to ``k``."""

    expert_index: str
    k: int


@dataclass(frozen=True)
class Structure:
    input: Operand
    factors: tuple[Operand, ...]
    output: Operand
    indices: tuple[Index, ...]
    moe: MoE | None = None
    source: str = field(default="", compare=False)
    origin: str = field(default="einsum", compare=False)
    theta: tuple[Fraction, ...] | None = field(default=None, compare=False)

    # -- lookups -----------------------------------------------------------------
    @property
    def operands(self) -> tuple[Operand, ...]:
        return (self.input, *self.factors, self.output)

    @property
    def sizes(self) -> dict[str, Size]:
        return {ix.name: ix.size for ix in self.indices}

    def size(self, name: str) -> Size:
        for ix in self.indices:
            if ix.name == name:
                return ix.size
        raise KeyError(name)

    @property
    def index_names(self) -> tuple[str, ...]:
        return tuple(ix.name for ix in self.indices)

    @property
    def is_concrete(self) -> bool:
        return all(ix.size.is_const for ix in self.indices)

    def concrete_sizes(self) -> dict[str, int]:
        if not self.is_concrete:
            raise ValueError("structure has symbolic sizes; concretise it first")
        return {ix.name: int(ix.size.coeff) for ix in self.indices}

    def index_class(self, name: str) -> frozenset[str]:
        """The operands an index joins: :data:`INPUT` for the input, factor names,
        :data:`OUTPUT` for the output (labels no name can be: a factor may be named x or y)."""
        roles = set()
        if name in self.input.indices:
            roles.add(INPUT)
        if name in self.output.indices:
            roles.add(OUTPUT)
        roles.update(f.name for f in self.factors if name in f.indices)
        return frozenset(roles)

    # -- spellings ---------------------------------------------------------------
    def letters(self) -> dict[str, str]:
        """One letter per index, for torch.einsum: the index's own name when it is one letter."""
        names = self.index_names
        if len(names) > MAX_INDICES:  # syntax.build refuses these; a hand-built IR may not
            raise StructureError(f"this structure has {len(names)} indices; einc allows at "
                                 f"most {MAX_INDICES} (one letter each for torch.einsum)",
                                 self.source or None, self.input.pos)
        if all(len(n) == 1 and n in string.ascii_letters for n in names):
            return {n: n for n in names}
        pool = iter(string.ascii_letters)
        return {n: next(pool) for n in names}

    @property
    def equation(self) -> str:
        """The einsum in torch.einsum spelling, without a batch index (``ga,gafr,fgre->fe``)."""
        m = self.letters()
        term = lambda op: "".join(m[i] for i in op.indices)
        return ",".join(term(op) for op in (self.input, *self.factors)) + "->" + term(self.output)

    def spec_text(self) -> str:
        """A spec in the named form that parses back to an equal structure. Expert routing
        has no named form: a BTT-MoE structure is spelled as its ``bttmoe(...)`` preset
        when it is one, otherwise as its einsum without the routing."""
        if self.moe is not None:
            preset = self._moe_preset()
            if preset is not None:
                return preset
        ops = " ".join(f"{op.name}[{' '.join(op.indices)}]" for op in (self.input, *self.factors))
        names = {ix.name for ix in self.indices}

        def size_text(size) -> str:
            text = str(size)
            # a bare `d_in` would read back as a tie to an index of that name: `d_in^1` is
            # the width
            return f"{text}^1" if text in names else text

        sizes = ", ".join(f"{ix.name} = {size_text(ix.size)}" for ix in self.indices)
        return f"{ops} -> {self.output.name}[{' '.join(self.output.indices)}] with {sizes}"

    def _moe_preset(self) -> str | None:
        size = self.sizes.get(self.moe.expert_index)
        if size is None or not size.is_const:
            return None
        text = f"bttmoe(experts={int(size.coeff)}, k={self.moe.k}, cores={len(self.factors)})"
        from .syntax import parse  # the preset's structure, to compare with
        try:
            return text if parse(text) == self else None
        except EincError:  # not a preset's parameters
            return None

    def with_sizes(self, sizes: dict[str, int]) -> "Structure":
        """The same structure with every index given a concrete integer size."""
        return replace(self, indices=tuple(replace(ix, size=Size.const(sizes[ix.name]))
                                           for ix in self.indices))

    def canonical(self) -> tuple:
        return canonical_form(self)


def canonical_form(s: Structure) -> tuple:
    """A key equal for structures that differ only in index names, factor names, factor order
    and the axis order inside factors (which only change how parameters are stored).

    The input's and output's index order is kept: it fixes how vectors are flattened.
    """
    n = len(s.factors)
    perms = itertools.permutations(range(n)) if n <= 6 else [_signature_order(s)]
    best = None
    for perm in perms:
        key = _form_for_order(s, [s.factors[i] for i in perm])
        if best is None or key < best:
            best = key
    return best


def _signature_order(s: Structure) -> tuple[int, ...]:
    sig = lambda f: (len(f.indices), sorted(str(s.size(i)) for i in f.indices))
    return tuple(sorted(range(len(s.factors)), key=lambda i: sig(s.factors[i])))


def _form_for_order(s: Structure, factors: list[Operand]) -> tuple:
    sizes = s.sizes
    ops = [s.input, *factors, s.output]

    def membership(name):
        return tuple(k for k, op in enumerate(ops) if name in op.indices)

    ids: dict[str, int] = {}
    for op in ops:
        fresh = [i for i in op.indices if i not in ids]
        if op is not s.input and op is not s.output:
            fresh.sort(key=lambda i: (membership(i), str(sizes[i])))
        for i in fresh:
            ids[i] = len(ids)
    size_of = tuple(str(sizes[name]) for name in sorted(ids, key=ids.get))
    moe = None if s.moe is None else (ids[s.moe.expert_index], s.moe.k)
    return (
        tuple(ids[i] for i in s.input.indices),
        tuple(tuple(sorted(ids[i] for i in f.indices)) for f in factors),
        tuple(ids[i] for i in s.output.indices),
        size_of,
        moe,
    )
