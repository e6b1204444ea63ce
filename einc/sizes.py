"""Size expressions: monomials c * d^p * d_in^q * d_out^s * d_min^t with rational c, p, q, s, t.

The language allows integers, the layer widths and products, quotients and rational
powers of them. That set is closed under those operations, so a monomial is a complete
normal form: equal sizes compare equal, and the IR stays free of sympy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

#: The size symbols a spec may use. ``d`` is the width of a square layer;
#: ``d_min`` is min(d_in, d_out) (the paper sizes the rank index with it).
SYMBOLS = ("d", "d_in", "d_out", "d_min")


@dataclass(frozen=True)
class Size:
    """``coeff * prod(symbol ** exponent)``; ``powers`` is sorted and has no zero exponents."""

    coeff: Fraction = Fraction(1)
    powers: tuple[tuple[str, Fraction], ...] = ()

    @staticmethod
    def const(value) -> "Size":
        return Size(Fraction(value), ())

    @staticmethod
    def symbol(name: str) -> "Size":
        if name not in SYMBOLS:
            raise ValueError(f"unknown size symbol {name!r}")
        return Size(Fraction(1), ((name, Fraction(1)),))

    # -- algebra -----------------------------------------------------------------
    def __mul__(self, other: "Size") -> "Size":
        exps = dict(self.powers)
        for name, e in other.powers:
            exps[name] = exps.get(name, Fraction(0)) + e
        return Size(self.coeff * other.coeff, _norm(exps))

    def __truediv__(self, other: "Size") -> "Size":
        return self * other ** Fraction(-1)

    def __pow__(self, exponent) -> "Size":
        exponent = Fraction(exponent)
        if exponent.denominator != 1 and self.coeff < 0:
            raise ValueError("fractional power of a negative number")
        coeff = _rational_power(self.coeff, exponent)
        return Size(coeff, _norm({n: e * exponent for n, e in self.powers}))

    # -- queries -----------------------------------------------------------------
    @property
    def is_const(self) -> bool:
        return not self.powers and isinstance(self.coeff, Fraction)

    @property
    def symbols(self) -> frozenset[str]:
        return frozenset(n for n, _ in self.powers)

    def exponent(self) -> Fraction:
        """Exponent of d when every symbol is d (the d -> infinity growth of the size)."""
        return sum((e for _, e in self.powers), Fraction(0))

    def evaluate(self, env: dict[str, float]) -> float:
        value = float(self.coeff)
        for name, e in self.powers:
            value *= float(env[name]) ** float(e)
        return value

    def __str__(self) -> str:
        parts = []
        if self.coeff != 1 or not self.powers:
            parts.append(_fmt(self.coeff))
        for name, e in self.powers:
            if e == 1:
                parts.append(name)
            elif e.denominator == 1 and e > 0:
                parts.append(f"{name}^{e}")
            else:
                parts.append(f"{name}^({e})")
        return "*".join(parts)


def _norm(exps: dict[str, Fraction]) -> tuple[tuple[str, Fraction], ...]:
    return tuple(sorted((n, e if type(e) is Fraction else Fraction(e))
                        for n, e in exps.items() if e != 0))


def _fmt(q: Fraction) -> str:
    return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


def _rational_power(base: Fraction, exponent: Fraction) -> Fraction | float:
    """Exact rational power when the root is exact, else a float (flagged later as not an integer)."""
    if exponent.denominator == 1:
        return base ** exponent.numerator
    num = _exact_root(base.numerator, exponent.denominator)
    den = _exact_root(base.denominator, exponent.denominator)
    if num is None or den is None:
        return Fraction(float(base) ** float(exponent))
    return Fraction(num, den) ** exponent.numerator


def _exact_root(n: int, k: int) -> int | None:
    r = round(n ** (1.0 / k))
    for c in (r - 1, r, r + 1):
        if c >= 0 and c ** k == n:
            return c
    return None


def is_positive_integer(x: Fraction) -> bool:
    return x.denominator == 1 and x > 0


def ceil_int(x: float) -> int:
    """Ceiling that forgives float noise (31.999999999 -> 32)."""
    r = round(x)
    return r if abs(x - r) < 1e-9 * max(1.0, abs(x)) else math.ceil(x)
