"""Size expressions: monomials c * d^p * d_in^q * d_out^s * d_min^t with rational c, p, q, s, t.

The language allows integers, the layer widths and products, quotients and rational
powers of them. A root of a number that is not a perfect power (2^(1/2)) is kept exact as
a power of a prime, which ``powers`` holds next to the width symbols under the prime's
digits (``("2", 1/2)``, exponent in (0, 1), the whole part folded into ``coeff``). That
set is closed under the operations, so a monomial is a complete normal form: equal sizes
compare equal, and the IR stays free of sympy. (What trial division up to 2^16 leaves of
a number is kept as one base, reduced to its smallest root when it is a perfect power;
two such bases that share a prime above 2^16 without being powers of one number are not
merged.)

Every number is bounded before it is computed, so no spec can make einc build a huge
integer, overflow a float or divide by zero:

* a size, and a layer width, is at most :data:`MAX_SIZE` (2^32). Symbolic sizes are
  evaluated in floating point (:meth:`Size.evaluate`), which tells an integer from its
  neighbours reliably only well below 2^53; 2^32 leaves that margin and is far above any
  real layer;
* inside a size expression every intermediate value is an exact fraction whose numerator
  and denominator have at most :data:`MAX_BITS` bits, and the exponents of d, d_in, d_out
  and d_min lie in [-:data:`MAX_EXPONENT`, :data:`MAX_EXPONENT`] (:func:`check_bounds`);
* a power is refused *before* it is computed when its result would be wider than that
  (:meth:`Size.__pow__`), and a power or quotient of zero with a negative exponent is a
  division by zero. These raise :class:`~einc.errors.SizeError`; :func:`einc.syntax.eval_size`
  adds the position of the offending sub-expression.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from fractions import Fraction

from .errors import SizeError

#: The size symbols a spec may use. ``d`` is the width of a square layer;
#: ``d_min`` is min(d_in, d_out) (the paper sizes the rank index with it).
SYMBOLS = ("d", "d_in", "d_out", "d_min")

_WIDTH_ORDER = ("d_in", "d_out", "d", "d_min")

#: The largest size of an index, and the largest layer width, einc accepts.
MAX_SIZE = 2 ** 32
MAX_SIZE_TEXT = f"2^32 = {MAX_SIZE}"
#: Numerators and denominators inside a size expression have at most this many bits
#: (about 38 decimal digits): far more than any size needs, small enough to stay fast.
MAX_BITS = 128
#: Exponents of the width symbols lie in [-MAX_EXPONENT, MAX_EXPONENT]: d^33 exceeds
#: MAX_SIZE at every width above 1.
MAX_EXPONENT = 32
#: No power einc computes (user expressions or the products it forms itself while solving
#: sizes) builds a number wider than this many bits.
_MAX_WORK_BITS = 8192


@dataclass(frozen=True)
class Size:
    """``coeff * prod(symbol ** exponent)``; ``powers`` is sorted and has no zero exponents.
    A symbol is a width (``d``, ``d_in``, ...) or a prime, by its digits (a radical)."""

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
        return Size(*_fold(self.coeff * other.coeff, exps))

    def __truediv__(self, other: "Size") -> "Size":
        if other.coeff == 0:
            raise SizeError("division by zero")
        return self * other ** Fraction(-1)

    def __pow__(self, exponent) -> "Size":
        exponent = Fraction(exponent)
        if self.coeff == 0 and exponent < 0:
            raise SizeError("division by zero (a negative power of 0)")
        if exponent.denominator != 1 and self.coeff < 0:
            raise ValueError("fractional power of a negative number")
        _check_power(self.coeff, exponent)
        exps = {n: e * exponent for n, e in self.powers}
        coeff = Fraction(0) if self.coeff == 0 else _exact_power(self.coeff, exponent)
        if coeff is None:  # an irrational root: exact as powers of primes
            coeff = Fraction(1)
            for base, e in _prime_powers(self.coeff, exponent):
                exps[base] = exps.get(base, Fraction(0)) + e
        return Size(*_fold(coeff, exps))

    # -- queries -----------------------------------------------------------------
    @property
    def is_const(self) -> bool:
        return not self.powers and isinstance(self.coeff, Fraction)

    @property
    def symbols(self) -> frozenset[str]:
        """The widths the size depends on."""
        return frozenset(n for n, _ in self.powers if not _radical(n))

    def exponent(self) -> Fraction:
        """Exponent of d when every symbol is d (the d -> infinity growth of the size)."""
        return sum((e for n, e in self.powers if not _radical(n)), Fraction(0))

    def scale(self) -> float:
        """The constant factor: ``coeff`` times the radicals, as a float."""
        return float(self.coeff) * math.prod(int(n) ** float(e) for n, e in self.powers
                                             if _radical(n))

    def evaluate(self, env: dict[str, int]) -> float:
        """The size at concrete widths (``env`` maps symbols to integer widths).

        Widths above :data:`MAX_SIZE`, and sizes that would exceed it, are refused. The value
        is exact (correctly rounded) whenever every factor is rational, so an integer size is
        returned as an exact integer; otherwise it is a float within a few ulps.
        """
        for name in sorted(env, key=_WIDTH_ORDER.index):  # d_in/d_out named before d
            w = env[name]
            if w > MAX_SIZE:
                raise SizeError(f"{name} = {short(w)} is above the largest width einc accepts "
                                f"({MAX_SIZE_TEXT})")
        if self.coeff <= 0:
            return 0.0
        log2 = _log2(self.coeff) + sum(float(e) * math.log2(_base(n, env))
                                       for n, e in self.powers)
        if log2 <= math.log2(MAX_SIZE) + 1:  # else too large, and maybe beyond a float
            value = self._value(env, log2)
            if ceil_int(value) <= MAX_SIZE:
                return value
        raise SizeError(f"size {self} is {short_log2(log2)} at {_widths(env, self)}, above "
                        f"the largest size einc accepts ({MAX_SIZE_TEXT})")

    def _value(self, env: dict[str, int], log2: float) -> float:
        exact = self.coeff
        for name, e in self.powers:
            base = _base(name, env)
            factor = (_exact_power(Fraction(base), e)
                      if abs(e) * math.log2(max(base, 2)) <= _MAX_WORK_BITS else None)
            if factor is None:
                break
            exact *= factor
        else:
            return float(exact)
        if abs(_log2(self.coeff)) > 1000:  # float() of the coefficient would overflow
            return 2.0 ** log2
        value = float(self.coeff)
        for name, e in self.powers:
            value *= float(_base(name, env)) ** float(e)
        return value

    def short(self) -> str:
        """For messages: a number as :func:`short` writes it, else the exact spelling."""
        return short(self.coeff) if self.is_const else str(self)

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


def _radical(name: str) -> bool:
    return name[0].isdigit()


def _base(name: str, env: dict[str, int]) -> int:
    return int(name) if _radical(name) else env[name]


#: trial division runs over the primes below this; what is left is kept as one base
_TRIAL = 1 << 16


@functools.lru_cache(maxsize=4096)
def _factor(n: int) -> dict[int, int]:
    """n >= 1 as {prime: multiplicity}, by trial division (see _TRIAL); what is left is
    one base, taken as its smallest root when it is a perfect power (65537^2 -> 65537).
    Cached: a spec may repeat one large constant many times. Callers do not mutate it."""
    out: dict[int, int] = {}
    p = 2
    while p * p <= n and p < _TRIAL:
        while n % p == 0:
            out[p] = out.get(p, 0) + 1
            n //= p
        p += 1 if p == 2 else 2
    if n > 1:  # no factor below _TRIAL, so a root of degree k has k < log_TRIAL(n)
        k = next((k for k in range(n.bit_length() // 16, 1, -1)
                  if _exact_root(n, k) is not None), 1)
        out[_exact_root(n, k) if k > 1 else n] = k
    return out


def _prime_powers(base: Fraction, exponent: Fraction) -> list[tuple[str, Fraction]]:
    """``base ** exponent`` (base > 0) as (prime, exponent) pairs."""
    out = [(str(p), k * exponent) for p, k in _factor(base.numerator).items()]
    return out + [(str(p), -k * exponent) for p, k in _factor(base.denominator).items()]


def _fold(coeff: Fraction, exps: dict[str, Fraction]):
    """(coeff, powers) in normal form: each prime keeps the fractional part of its exponent,
    in (0, 1); the whole part moves into the coefficient (refused first when too wide)."""
    for name, e in list(exps.items()):
        whole = math.floor(e)
        if _radical(name) and whole:
            p = int(name)
            if (p.bit_length() - 1) * abs(whole) > _MAX_WORK_BITS:
                raise SizeError(_range_message(math.log2(p) * whole))
            coeff *= Fraction(p) ** whole
            exps[name] = e - whole
    return coeff, _norm(exps)


def _norm(exps: dict[str, Fraction]) -> tuple[tuple[str, Fraction], ...]:
    return tuple(sorted((n, e if type(e) is Fraction else Fraction(e))
                        for n, e in exps.items() if e != 0))


def _fmt(q: Fraction) -> str:
    return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


def _exact_power(base: Fraction, exponent: Fraction) -> Fraction | None:
    """``base ** exponent`` when it is rational (base >= 0 for a fractional exponent)."""
    if exponent.denominator == 1:
        return base ** exponent.numerator
    num = _exact_root(base.numerator, exponent.denominator)
    den = _exact_root(base.denominator, exponent.denominator)
    if num is None or den is None:
        return None
    return Fraction(num, den) ** exponent.numerator


def _exact_root(n: int, k: int) -> int | None:
    """The integer k-th root of n >= 0 when n is a perfect k-th power, else None."""
    if n in (0, 1):
        return n
    if k >= n.bit_length():  # 2^k > n: no integer c >= 2 has c^k == n
        return None
    # Newton's method on integers, from an upper bound: converges to floor(n^(1/k)).
    c = 1 << -(-n.bit_length() // k)
    while True:
        nxt = ((k - 1) * c + n // c ** (k - 1)) // k
        if nxt >= c:
            break
        c = nxt
    return c if c ** k == n else None


def _log2(q: Fraction) -> float:
    """log2 |q| for any nonzero fraction, however wide (no float overflow)."""
    return math.log2(abs(q.numerator)) - math.log2(q.denominator)


def _bits(q: Fraction) -> int:
    return max(abs(q.numerator).bit_length(), q.denominator.bit_length())


def _check_power(base: Fraction, exponent: Fraction) -> None:
    """Refuse ``base ** exponent`` before computing it when the result would be too wide:
    its numerator or denominator has at least (bits - 1) * |exponent| bits."""
    if base == 0 or exponent == 0 or abs(base) == 1:
        return
    if (_bits(base) - 1) * abs(exponent) > _MAX_WORK_BITS:
        raise SizeError(_range_message(_log2(base) * float(exponent)))


def _range_message(log2: float, what: str = "this value") -> str:
    approx = "" if math.isinf(log2) else f" ({short_log2(log2)})"
    if log2 > 64:
        return f"{what} is far too large{approx}: sizes are at most {MAX_SIZE_TEXT}"
    if log2 < -64:
        return f"{what} is far too small{approx}: sizes are positive integers"
    return (f"{what} has too many digits: numbers in a size expression are exact fractions "
            f"of at most {MAX_BITS} bits (about 38 digits)")


def check_bounds(size: Size) -> Size:
    """Refuse an intermediate value of a size expression outside the bounds in the module
    docstring (raises :class:`~einc.errors.SizeError` without a position)."""
    if size.coeff != 0 and _bits(size.coeff) > MAX_BITS:
        raise SizeError(_range_message(_log2(size.coeff)))
    for name, e in size.powers:
        if abs(e) > MAX_EXPONENT or _bits(e) > MAX_BITS:
            raise SizeError(
                f"{name}^({short(e)}) is out of range: exponents of d, d_in, d_out and d_min "
                f"lie between -{MAX_EXPONENT} and {MAX_EXPONENT} (d^{MAX_EXPONENT + 1} exceeds "
                f"the largest size, {MAX_SIZE_TEXT}, at every width above 1)")
    return size


_NUMBER = re.compile(r"(\d*)(?:\.(\d*))?(?:[eE]([-+]?\d+))?")


def number(text: str) -> Size:
    """A number literal of the grammar (``32``, ``0.5``, ``.25``, ``1e3``) as an exact size,
    refused (:func:`check_bounds`) without building it when it is huge or tiny."""
    m = _NUMBER.fullmatch(text)
    if m is None:
        raise SizeError(f"{text[:24]!r} is not a number")
    what = text if len(text) <= 24 else "this number"
    whole, frac, exp = m.group(1), m.group(2) or "", m.group(3) or "0"
    digits = (whole + frac).lstrip("0")
    if not digits:
        return Size.const(0)
    exp_digits = exp.lstrip("+-").lstrip("0")
    if len(exp_digits) > 12:  # beyond any float: only the sign matters
        raise SizeError(_range_message(math.inf if not exp.startswith("-") else -math.inf,
                                       what))
    shift = int(exp) - len(frac)
    stripped = digits.rstrip("0")
    shift += len(digits) - len(stripped)
    if len(stripped) + abs(shift) > 4 * MAX_BITS:  # certainly out of range: do not build it
        raise SizeError(_range_message((len(stripped) - 1 + shift) * math.log2(10), what))
    value = Fraction(int(stripped)) * Fraction(10) ** shift
    try:
        return check_bounds(Size.const(value))
    except SizeError as e:
        raise SizeError(e.message.replace("this value", what, 1)) from None


def size_problem(size: Size) -> str | None:
    """Why ``size`` cannot be the size of an index, or None: a number must be a positive
    integer of at most MAX_SIZE, a symbolic size must have a positive coefficient."""
    if size.coeff <= 0:
        return "is not a positive integer" if size.is_const else "is not positive"
    if not size.symbols and not size.is_const:  # a constant with a radical (2^(1/2))
        return "is not a positive integer (it is irrational)"
    if not size.is_const:
        return None
    if not is_positive_integer(size.coeff):
        return "is not a positive integer"
    if size.coeff > MAX_SIZE:
        return f"is above the largest size einc accepts ({MAX_SIZE_TEXT})"
    return None


def short(x) -> str:
    """A number as messages show it: exact when short (``4096``, ``3/2``), else rounded
    (``~1.26``, ``~1e+400``)."""
    q = x if isinstance(x, Fraction) else Fraction(x)
    if q.denominator == 1 and abs(q.numerator) < 10 ** 16:
        return str(q.numerator)
    if q.denominator < 10 ** 6 and abs(q.numerator) < 10 ** 6:
        return f"{q.numerator}/{q.denominator}"
    text = short_log2(_log2(q))
    return text.replace("~", "~-", 1) if q < 0 else text


def short_log2(log2: float) -> str:
    """``~2^log2`` written in decimal: ``~1.26``, ``~1.1e+12``, ``~1e+400``."""
    log10 = log2 * math.log10(2)
    if -4 < log10 < 15:
        return f"~{10 ** log10:.3g}"
    exp = math.floor(log10)
    mant = float(f"{10 ** (log10 - exp):.2g}")
    if mant >= 10:
        mant, exp = mant / 10, exp + 1
    return f"~{mant:g}e{exp:+d}"


def _widths(env: dict, size: Size) -> str:
    used = sorted(size.symbols) or list(env)
    return ", ".join(f"{n} = {short(env[n])}" for n in used if n in env)


def is_positive_integer(x: Fraction) -> bool:
    return x.denominator == 1 and x > 0


def ceil_int(x: float) -> int:
    """Ceiling that forgives float noise (31.999999999999 -> 32).

    The noise of :meth:`Size.evaluate` is a few ulps (relative 1e-15); a size up to
    MAX_SIZE that is not an integer lies farther than 1e-12 (relative) from every integer
    (sqrt(n^2 + 1) - n ~ 1/(2n)), so the two cannot be confused.
    """
    r = round(x)
    return r if abs(x - r) < 1e-12 * max(1.0, abs(x)) else math.ceil(x)
