"""The paper's theta notation, lowered to its two-factor einsum.

``theta = (alpha|beta|gamma|delta|eps|phi|rho)`` names the exponents of seven index classes;
the structure is ``y[f e h] = sum x[g b a] A[f h r g a] B[f e r g b]`` with
a = d_in^alpha, b = d_in^beta, g = d_in^gamma, h = d_out^delta, e = d_out^eps,
f = d_out^phi, r = d_min^rho. Classes with exponent 0 have size 1 and are left out.
"""
from __future__ import annotations

from fractions import Fraction

from .errors import Pos, SizeError
from .ir import Operand, Structure
from .sizes import Size, short

CLASSES = ("alpha", "beta", "gamma", "delta", "eps", "phi", "rho")
#: class -> (index letter, size symbol)
LETTERS = {"alpha": ("a", "d_in"), "beta": ("b", "d_in"), "gamma": ("g", "d_in"),
           "delta": ("h", "d_out"), "eps": ("e", "d_out"), "phi": ("f", "d_out"),
           "rho": ("r", "d_min")}
LAYOUT = {"x": "gba", "A": "fhrga", "B": "fergb", "y": "feh"}


def check_count(n: int, spec: str, pos: Pos) -> None:
    if n != len(CLASSES):
        raise SizeError(f"a theta point has 7 exponents (alpha|beta|gamma|delta|eps|phi|rho); "
                        f"got {n}", spec, pos)


def lower_theta(values, spec: str, pos: Pos, bindings=()) -> Structure:
    from .syntax import Binding, build

    check_count(len(values), spec, pos)
    if bindings:
        raise SizeError("a theta point fixes every size: remove the `with` clause", spec, pos)
    for (v, p), name in zip(values, CLASSES):
        if not 0 <= v <= 1:
            raise SizeError(f"{name} = {short(v)} is out of range: exponents lie in [0, 1]",
                            spec, p)
    theta = dict(zip(CLASSES, (v for v, _ in values)))
    for group, what in ((("alpha", "beta", "gamma"), "d_in"), (("delta", "eps", "phi"), "d_out")):
        total = sum(theta[c] for c in group)
        if total != 1:
            raise SizeError(f"{'+'.join(group)} = {_fmt(total)}, but the exponents of {what} "
                            "must sum to 1 (write 1/3 rather than 0.33)", spec, pos)
    return structure_from_theta(tuple(theta[c] for c in CLASSES), spec)


def structure_from_theta(theta: tuple[Fraction, ...], spec: str = "") -> Structure:
    """Build the two-factor structure of a (validated) theta point."""
    from .syntax import Binding, build

    exps = dict(zip(CLASSES, theta))
    letter_exp = {LETTERS[c][0]: (exps[c], LETTERS[c][1]) for c in CLASSES}
    keep = lambda s: tuple(ch for ch in s if letter_exp[ch][0] > 0)
    ops = {k: keep(v) for k, v in LAYOUT.items()}
    bindings = [Binding(((ch, None),), Size.symbol(sym) ** e)
                for ch, (e, sym) in letter_exp.items() if e > 0]
    # A factor left with no index is a scalar: the same family without it.
    factors = tuple(Operand(n, ops[n]) for n in ("A", "B") if ops[n])
    return build(Operand("x", ops["x"]), factors, Operand("y", ops["y"]), bindings, spec,
                 origin="theta", theta=tuple(theta))


def _fmt(q: Fraction) -> str:
    return short(q)
