"""Known structures as points of a space, so the table can name them.

Each entry is a family of exponent points (square-layer notation, the paper's theta for two
factors); a point is named when its kept representative equals a known point's.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

from .lattice import Space

H = Fraction(1, 2)


def _frac(q: Fraction) -> str:
    return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


def _rank_name(rho: Fraction) -> str:
    return "1" if rho == 0 else "d" if rho == 1 else f"d^{_frac(rho)}"


def two_factor_points(k: int):
    """(name, theta) of the paper's known structures on the lattice of step 1/k."""
    out = [("dense", (1, 0, 0, 1, 0, 0, 0)),
           ("dense (2 factors)", (0, 0, 1, 0, 0, 1, 0)),
           ("Kronecker", (H, H, 0, H, H, 0, 0)),
           ("Monarch / BTT r=1", (H, 0, H, 0, H, H, 0))]
    for j in range(k + 1):
        rho = Fraction(j, k)
        out.append((f"low-rank r={_rank_name(rho)}", (1, 0, 0, 0, 1, 0, rho)))
        if rho > 0:
            out.append((f"BTT r={_rank_name(rho)}", (H, 0, H, 0, H, H, rho)))
            out.append((f"TT r={_rank_name(rho)}", (H, H, 0, H, H, 0, rho)))
    return [(n, tuple(Fraction(v) for v in t)) for n, t in out]


def three_factor_points(k: int):
    """(name, class -> exponent) of three-factor structures: Kronecker, TT and BTT cores."""
    t3 = Fraction(1, 3)
    out = [("Kronecker (3 factors)", {"iA": t3, "iB": t3, "iC": t3,
                                       "oA": t3, "oB": t3, "oC": t3})]
    for j in range(k + 1):
        rho = Fraction(j, k)
        if rho > 0:
            out.append((f"TT (3 cores) r={_rank_name(rho)}",
                        {"iA": t3, "iB": t3, "iC": t3, "oA": t3, "oB": t3, "oC": t3,
                         "rAB": rho, "rBC": rho}))
        # BTT with 3 cores (see einc.presets.btt): inputs i1 (ABC), i2 (AB), i3 (A);
        # outputs o1 (ABC), o2 (BC), o3 (C); ranks AB and BC.
        out.append((f"BTT (3 cores) r={_rank_name(rho)}",
                    {"iABC": t3, "iAB": t3, "iA": t3, "oABC": t3, "oBC": t3, "oC": t3,
                     "rAB": rho, "rBC": rho}))
    return out


def known_ids(space: Space) -> dict[int, str]:
    """Kept-point id -> name, for the known structures that lie on this space's lattice."""
    entries = []
    for name, theta in two_factor_points(space.k):
        entries.append((name, space.exps_from_theta(theta)))
    if space.n == 3:
        entries += three_factor_points(space.k)
    out: dict[int, str] = {}
    for name, exps in entries:
        rows = space.point_of(exps)
        if rows is None:
            continue
        ix, iy, ir = space.canonical(*(np.array([v]) for v in rows))
        out.setdefault(int(space.ids(ix, iy, ir)[0]), name)
        if space.transpose:  # the search may keep the family's transposed orientation
            out.setdefault(int(space.ids(*space.transposed(ix, iy, ir))[0]), name)
    return out
