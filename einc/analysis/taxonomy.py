"""The paper's two-factor taxonomy: theta points read off a structure, and the closed forms.

The closed forms are a check on the derivation in :mod:`einc.analysis.symbolic`, which works
from the IR for any number of factors; they are not how einc computes the exponents.
"""
from __future__ import annotations

from fractions import Fraction

from ..ir import INPUT, OUTPUT, Structure

#: index class (the operands it joins, A = the factor absorbed first) -> theta position
_CLASS_POS = {frozenset("xA"): 0, frozenset("xB"): 1, frozenset("xAB"): 2,
              frozenset("Ay"): 3, frozenset("By"): 4, frozenset("ABy"): 5, frozenset("AB"): 6}


def closed_forms(theta) -> dict:
    """omega, psi, nu of a point by the paper's formulas (square layer, d -> infinity)."""
    a, b, g, dl, e, f, r = (Fraction(t) for t in theta)
    m = min(a, e)
    return {"omega": min(a + dl, b + e) - m, "psi": min(Fraction(1), 2 + r - a - e),
            "nu": 1 + r - m, "redundant": m < min(b, dl), "degenerate": r > m}


def theta_of(s: Structure):
    """The theta point of a two-factor structure with growing sizes (none shrinking, as a
    theta's components are exponents in [0, 1]) whose input and output sizes each multiply
    to d (alpha + beta + gamma = delta + epsilon + phi = 1), else None.

    The factors' names and order in a spec are arbitrary; A is the factor absorbed first in
    the cheaper order (the non-redundant orientation), so a theta read off an einsum is never
    redundant; where both orders are as cheap, the larger tuple. A theta typed as such keeps
    its orientation and may be redundant.
    """
    read = read_theta(s) if len(s.factors) == 2 else None
    if read is None:
        return None
    theta, swapped = read
    a, b, g, dl, e, f, r = theta
    if min(a, e) < min(b, dl):  # spec order put B first: read it the way einc absorbs it
        return swapped
    if min(a, e) == min(b, dl):  # either order as cheap: the larger tuple, whatever the order
        return max(theta, swapped)
    return theta


def read_theta(s: Structure):
    """(theta with the spec's first factor as A, theta with its second as A), or None where
    the structure is no theta point (see :func:`theta_of`). One factor reads as A with an
    empty B: the structure a theta point with beta = epsilon = gamma = phi = rho = 0 lowers
    to (dense, (1|0|0|1|0|0|0))."""
    if len(s.factors) not in (1, 2) or s.moe is not None:
        return None
    sizes = s.sizes
    if all(sz.is_const for sz in sizes.values()) or any(sz.exponent() < 0
                                                        for sz in sizes.values()):
        return None
    a_name = s.factors[0].name
    theta = [Fraction(0)] * 7
    for name in s.index_names:
        cls = s.index_class(name)
        key = frozenset("x" if c == INPUT else "y" if c == OUTPUT else "A" if c == a_name
                        else "B" for c in cls)
        if key not in _CLASS_POS:
            return None
        theta[_CLASS_POS[key]] += sizes[name].exponent()
    a, b, g, dl, e, f, r = theta
    if a + b + g != 1 or dl + e + f != 1:  # a side of fixed (or not d-wide) size: no point
        return None
    return tuple(theta), (b, a, g, e, dl, f, r)
