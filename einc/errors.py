"""One error family for einc: every user-facing problem is an :class:`EincError`.

Errors raised while reading a spec carry the spec text and a position, and render
with a caret under the offending column, the way lark and einx do::

    einc: output index 'z' appears in no operand
      ga,gafr,fgre->fz
                     ^
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pos:
    """A span of the spec text: 1-based line and column, 0-based [start, end) offsets."""

    line: int
    column: int
    start: int
    end: int

    @staticmethod
    def at(text: str, start: int, end: int | None = None) -> "Pos":
        line = text.count("\n", 0, start) + 1
        column = start - (text.rfind("\n", 0, start) + 1) + 1
        return Pos(line, column, start, start + 1 if end is None else end)


class EincError(Exception):
    """Base class of every error einc raises on bad input."""

    def __init__(self, message: str, source: str | None = None, pos: Pos | None = None,
                 hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.source = source
        self.pos = pos
        self.hint = hint

    @property
    def line(self) -> int | None:
        return self.pos.line if self.pos else None

    @property
    def column(self) -> int | None:
        return self.pos.column if self.pos else None

    def __str__(self) -> str:
        out = [self.message]
        if self.source is not None and self.pos is not None:
            lines = self.source.split("\n")
            text = lines[self.pos.line - 1] if self.pos.line <= len(lines) else ""
            width = max(1, min(self.pos.end - self.pos.start, len(text) - self.pos.column + 1))
            # one printed column per character: a tab stays a tab in the caret line too, other
            # unprintable characters show as '?'
            text = "".join(c if c == "\t" or c.isprintable() else "?" for c in text)
            pad = "".join(c if c == "\t" else " " for c in text[:self.pos.column - 1])
            out.append("  " + text)
            out.append("  " + pad + "^" * width)
        if self.hint:
            out.append(self.hint)
        return "\n".join(out)


class SpecSyntaxError(EincError):
    """The spec text does not follow the grammar."""


class SpecTypeError(EincError, TypeError):
    """The spec is not a string (nor an already parsed Structure)."""


class StructureError(EincError):
    """The spec parses but does not describe a valid linear map."""


class SizeError(EincError):
    """A size is missing, not a positive integer, or cannot match d_in / d_out."""


class UnknownNameError(EincError):
    """An unknown preset, preset parameter, option or registry entry."""


class CompileError(EincError, ValueError):
    """A structure cannot be turned into a module with the requested settings."""
