"""Exact symbolic counts. This is the only module of einc that imports sympy.

For a structure it derives, once (cached): the parameter count and the FLOPs of every chain
order as sympy expressions in the index sizes and in d_in / d_out, the order einc runs for
large d, the exponents (omega, psi, nu) for d_in = d_out = d -> infinity, and lambdified
formulas that later evaluate counts at concrete sizes without sympy.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import sympy

from ..ir import Structure
from ..sizes import Size
from . import path as _path
from .rank import rank_exponent

D = sympy.Symbol("d", positive=True)
WIDTHS = {"d": D, "d_in": sympy.Symbol("d_in", positive=True),
          "d_out": sympy.Symbol("d_out", positive=True),
          "d_min": sympy.Symbol("d_min", positive=True)}


@dataclass(frozen=True)
class Symbolic:
    params: sympy.Expr          # in the index sizes
    flops: sympy.Expr           # forward, per input vector, for ``order``
    params_d: sympy.Expr        # in d_in / d_out (d, d_min)
    flops_d: sympy.Expr
    order: tuple[int, ...]      # asymptotically cheapest absorption order
    omega: Fraction | None
    psi: Fraction | None
    nu: Fraction | None
    params_fn: callable         # sizes in index order -> int
    flops_fns: dict             # order -> (sizes in index order -> int)
    index_names: tuple[str, ...]


def size_expr(size: Size) -> sympy.Expr:
    out = sympy.Rational(size.coeff.numerator, size.coeff.denominator)
    for name, e in size.powers:  # a width, or a prime (by its digits)
        base = sympy.Integer(int(name)) if name[0].isdigit() else WIDTHS[name]
        out *= base ** sympy.Rational(e.numerator, e.denominator)
    return out


def _posynomial(terms) -> tuple:
    """Sum of c * d^e terms, merged and sorted from the leading exponent down."""
    acc: dict[Fraction, float] = {}
    for c, e in terms:
        acc[e] = acc.get(e, 0.0) + c
    return tuple(sorted(acc.items(), reverse=True))


def _flop_terms(steps, sizes: dict[str, Size]):
    coeff = {i: sz.scale() for i, sz in sizes.items()}
    exp = {i: sz.exponent() for i, sz in sizes.items()}
    for st in steps:
        yield ((2.0 if st.contracted else 1.0) * math.prod(coeff[i] for i in st.union),
               sum((exp[i] for i in st.union), Fraction(0)))


@functools.lru_cache(maxsize=65536)
def exponents(s: Structure) -> tuple:
    """``(order, omega, psi, nu)`` without sympy: the absorption order with the smallest FLOPs
    as d -> infinity (ties keep the spec order), and the exponents for d_in = d_out = d
    (None when no size grows with d, or when one shrinks: d -> infinity would take it below
    1, so the structure has no asymptotics to read)."""
    sizes = s.sizes
    keys = {o: _posynomial(_flop_terms(_path.chain(s, o), sizes)) for o in _path.orders(s)}
    order = min(keys, key=lambda o: keys[o])  # min() keeps the first (spec order) on ties
    exps = {i: sizes[i].exponent() for i in s.index_names}
    if not any(e != 0 for e in exps.values()) or any(e < 0 for e in exps.values()):
        return order, None, None, None
    lead_flops = keys[order][0][0]
    lead_params = _posynomial((1.0, sum((exps[i] for i in f.indices), Fraction(0)))
                              for f in s.factors)[0][0]
    psi = min(Fraction(1), rank_exponent(s, exps))
    return order, lead_flops - lead_params, psi, lead_flops - 1


@functools.lru_cache(maxsize=65536)
def symbolic(s: Structure) -> Symbolic:
    names = s.index_names
    syms = {i: sympy.Symbol(i, positive=True, integer=True) for i in names}
    sizes = s.sizes
    params = sympy.Add(*[sympy.Mul(*[syms[i] for i in f.indices]) for f in s.factors])
    flops_by_order = {
        order: sympy.Add(*[(2 if st.contracted else 1) * sympy.Mul(*[syms[i] for i in st.union])
                           for st in _path.chain(s, order)])
        for order in _path.orders(s)}
    order, omega, psi, nu = exponents(s)

    subs = {syms[i]: size_expr(sizes[i]) for i in names}
    params_d = sympy.simplify(params.subs(subs))
    flops_d = sympy.simplify(flops_by_order[order].subs(subs))

    args = [syms[i] for i in names]
    lam = lambda e: sympy.lambdify(args, e, modules="math")
    return Symbolic(params, flops_by_order[order], params_d, flops_d, order, omega, psi, nu,
                    lam(params), {o: lam(f) for o, f in flops_by_order.items()}, names)


def to_text(expr) -> str:
    return str(expr).replace("**", "^")
