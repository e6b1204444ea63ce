"""The structure space: index classes, their exponent lattice, and one point per family.

A structure with n weight factors is described by its *index classes*: the set of tensors
an index joins. Useful classes join at least two tensors, contain at least one factor (an
input or output index must meet a weight) and never both x and y (that would be a
diagonal, which the paper's space leaves out as well). With n = 2 these are the paper's
seven classes alpha..rho; with n = 3 there are 18: 7 on the input side (x with a nonempty
set of factors), 7 on the output side and 4 internal (rank) classes joining 2 or 3 factors.

A point gives every class an exponent on a lattice of step 1/k: input-side exponents sum
to 1 (sizes d_in^e), output-side exponents sum to 1 (sizes d_out^e), internal exponents
lie in [0, 1] (sizes d_min^e). Exponent 0 means size 1: the class is absent.

Points are stored as a triple of row numbers (ix, iy, ir) into three tables: input-side
compositions, output-side compositions and internal exponent tuples. Renaming factors (and,
when asked, transposing) permutes classes, hence maps rows to rows; a family is kept once,
as the point with the smallest id in its orbit (see docs/search.md and
:mod:`einc.space.canonical`, which checks this against graph isomorphism).
"""
from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ..analysis.template import Template
from ..errors import SizeError, UnknownNameError
from ..theta import CLASSES as THETA_CLASSES
from ..theta import LETTERS, structure_from_theta

FACTOR_NAMES = "ABC"
#: Refuse spaces whose raw lattice is larger than this (memory and time stay bounded).
MAX_POINTS = 60_000_000
#: The paper's class name -> (side, factor set) for the two-factor space.
THETA_KEYS = {"alpha": ("x", "A"), "beta": ("x", "B"), "gamma": ("x", "AB"),
              "delta": ("y", "A"), "eps": ("y", "B"), "phi": ("y", "AB"), "rho": ("r", "AB")}


def compositions(k: int, parts: int) -> np.ndarray:
    """All tuples of ``parts`` non-negative integers summing to k (stars and bars)."""
    rows = []
    for bars in itertools.combinations(range(k + parts - 1), parts - 1):
        prev, row = -1, []
        for b in bars + (k + parts - 1,):
            row.append(b - prev - 1)
            prev = b
        rows.append(row)
    return np.array(rows, dtype=np.int16).reshape(-1, parts)


def _three_factor_template():
    from ..syntax import parse

    sets = [c for r in (1, 2, 3) for c in itertools.combinations(FACTOR_NAMES, r)]
    xs = ["i" + "".join(f) for f in sets]
    ys = ["o" + "".join(f) for f in sets]
    rs = ["r" + "".join(f) for f in sets if len(f) > 1]
    ops = []
    for name in FACTOR_NAMES:
        idx = [c for c in xs + rs + ys if name in c[1:]]
        ops.append(f"{name}[{' '.join(idx)}]")
    sizes = [f"{c} = d_in^(1/7)" for c in xs] + [f"{c} = d_out^(1/7)" for c in ys] + \
            [f"{c} = d_min^(1/2)" for c in rs]
    text = f"x[{' '.join(xs)}] {' '.join(ops)} -> y[{' '.join(ys)}] with {', '.join(sizes)}"
    return parse(text)


@dataclass(frozen=True)
class GroupElement:
    """A relabeling: factor renaming ``sigma`` (old -> new), then transposition if ``t``."""

    sigma: tuple[tuple[str, str], ...]
    t: bool

    def __str__(self):
        moved = ",".join(f"{a}->{b}" for a, b in self.sigma if a != b) or "identity"
        return moved + (" + transpose" if self.t else "")


class Space:
    """The lattice of one space: ``Space(factors=2, k=12)``."""

    def __init__(self, factors: int = 2, k: int = 12, transpose: bool = False):
        integer = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)
        if not integer(factors) or factors not in (2, 3):  # 2.0 == 2 would pass
            raise UnknownNameError(f"--factors must be 2 or 3, got {factors!r}",
                                   hint="known spaces: 2 (the paper's), 3")
        if not integer(k) or k < 1:
            raise SizeError(f"the lattice step is 1/k with k a positive integer, got k = {k!r}")
        factors, k = int(factors), int(k)
        self.n, self.k, self.transpose = factors, k, transpose
        self.factor_names = FACTOR_NAMES[:factors]
        if factors == 2:
            third = Fraction(1, 3)
            s = structure_from_theta((third,) * 6 + (Fraction(1, 2),))
            by_letter = {LETTERS[c][0]: THETA_KEYS[c] for c in THETA_CLASSES}
            self.key = {c: (side, frozenset(fs)) for c, (side, fs) in by_letter.items()}
        else:
            s = _three_factor_template()
            self.key = {c: (("x" if c[0] == "i" else "y" if c[0] == "o" else "r"),
                            frozenset(c[1:])) for c in s.index_names}
        self.template = Template(s)
        t = self.template
        self.xc, self.yc, self.rc = (t.side_classes(sd) for sd in "xyr")
        self.by_key = {v: c for c, v in self.key.items()}
        # counted, not built: stars and bars, so a huge k is refused at once
        points = lambda k: math.comb(k + len(self.xc) - 1, k) * \
            math.comb(k + len(self.yc) - 1, k) * (k + 1) ** len(self.rc)
        if (total := points(k)) > MAX_POINTS:
            fits = 1  # points grows with k: count up (a few dozen steps at most)
            while points(fits + 1) <= MAX_POINTS:
                fits += 1
            raise SizeError(f"the {factors}-factor space at k = {k} has {total:,} lattice points;"
                            f" einc enumerates at most {MAX_POINTS:,}: choose k <= {fits}")
        self.X = compositions(k, len(self.xc))
        self.Y = compositions(k, len(self.yc))
        self.R = np.array(list(itertools.product(range(k + 1), repeat=len(self.rc))),
                          dtype=np.int16).reshape(-1, len(self.rc))
        self.nX, self.nY, self.nR = len(self.X), len(self.Y), len(self.R)
        self.size = self.nX * self.nY * self.nR
        self.group = self._group()
        self._maps = [self._row_maps(g) for g in self.group]
        # Columns of the full exponent matrix, in the template's class order.
        self.col = {c: i for i, c in enumerate(t.classes)}
        self._pairs = [self._pair_info(p, q) for p, q in
                       itertools.combinations(self.factor_names, 2)]

    # -- symmetry ---------------------------------------------------------------
    def _group(self) -> list[GroupElement]:
        out = []
        for perm in itertools.permutations(self.factor_names):
            sigma = tuple(zip(self.factor_names, perm))
            out.append(GroupElement(sigma, False))
            if self.transpose:
                out.append(GroupElement(sigma, True))
        return out

    def act(self, g: GroupElement, c: str) -> str:
        side, fs = self.key[c]
        m = dict(g.sigma)
        if g.t and side != "r":
            side = "y" if side == "x" else "x"
        return self.by_key[(side, frozenset(m[f] for f in fs))]

    def _row_maps(self, g: GroupElement):
        """Row maps of the three tables under g: (from-X, from-Y, R) -> new rows."""
        def table_map(src_cls, src, dst_cls, dst):
            where = {tuple(r): i for i, r in enumerate(dst.tolist())}
            pos = [dst_cls.index(self.act(g, c)) for c in src_cls]
            out = np.empty(len(src), dtype=np.int64)
            for i, row in enumerate(src.tolist()):
                new = [0] * len(dst_cls)
                for j, v in zip(pos, row):
                    new[j] = v
                out[i] = where[tuple(new)]
            return out
        r = table_map(self.rc, self.R, self.rc, self.R)
        if g.t:  # input classes become output classes and back
            return table_map(self.yc, self.Y, self.xc, self.X), \
                table_map(self.xc, self.X, self.yc, self.Y), r, True
        return table_map(self.xc, self.X, self.xc, self.X), \
            table_map(self.yc, self.Y, self.yc, self.Y), r, False

    def ids(self, ix, iy, ir):
        return (ix.astype(np.int64) * self.nY + iy) * self.nR + ir

    def split(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        return ids // (self.nY * self.nR), (ids // self.nR) % self.nY, ids % self.nR

    def orbit_min(self, ix, iy, ir):
        """Smallest id over each point's orbit under the relabelings."""
        best = None
        for fx, fy, fr, t in self._maps:
            nx, ny = (fx[iy], fy[ix]) if t else (fx[ix], fy[iy])
            cand = self.ids(nx, ny, fr[ir])
            best = cand if best is None else np.minimum(best, cand)
        return best

    # -- exponents --------------------------------------------------------------
    def exponents(self, ix, iy, ir) -> np.ndarray:
        """Exponent matrix (points x classes, template order), in units of 1/k."""
        e = np.empty((len(ix), len(self.col)), dtype=np.int16)
        for j, c in enumerate(self.xc):
            e[:, self.col[c]] = self.X[ix, j]
        for j, c in enumerate(self.yc):
            e[:, self.col[c]] = self.Y[iy, j]
        for j, c in enumerate(self.rc):
            e[:, self.col[c]] = self.R[ir, j]
        return e

    def factor_present(self, e: np.ndarray) -> np.ndarray:
        t = self.template
        return np.stack([(e[:, [self.col[c] for c in f]] > 0).any(axis=1)
                         for f in t.factor_classes], axis=1)

    def absorbable(self, e: np.ndarray) -> np.ndarray:
        """Points with a factor whose indices all belong to another present factor: it can
        be multiplied into that one elementwise, so the point holds exactly the matrices of
        a point with one factor fewer, which needs fewer parameters (a Hadamard product of
        two dense factors is a dense layer, Monarch with a third factor on the indices of
        one of its two is Monarch)."""
        present = e > 0
        fpres = self.factor_present(e)
        classes = [set(f) for f in self.template.factor_classes]
        out = np.zeros(len(e), dtype=bool)
        for i, j in itertools.permutations(range(self.n), 2):
            own = [self.col[c] for c in classes[i] - classes[j]]  # i's classes without j
            alone = present[:, own].any(axis=1)
            out |= fpres[:, i] & fpres[:, j] & ~alone
        return out

    # -- the paper's rules on two-factor points --------------------------------------
    def _pair_info(self, p, q):
        g = next(i for i, el in enumerate(self.group)
                 if not el.t and dict(el.sigma) == {**{f: f for f in self.factor_names},
                                                     p: q, q: p})
        col = lambda side, fs: self.col[self.by_key[(side, frozenset(fs))]]
        cols = {"a": col("x", p), "b": col("x", q), "dl": col("y", p), "e": col("y", q),
                "r": col("r", p + q)}
        return self.factor_names.index(p), self.factor_names.index(q), g, cols

    def paper_rules(self, e, fpres):
        """(pair index or -1, redundant, degenerate) per point with exactly two factors."""
        n = len(e)
        which = np.full(n, -1, dtype=np.int8)
        red = np.zeros(n, dtype=bool)
        deg = np.zeros(n, dtype=bool)
        two = fpres.sum(axis=1) == 2
        for k, (pi, qi, _, c) in enumerate(self._pairs):
            m = two & fpres[:, pi] & fpres[:, qi]
            which[m] = k
            lead = np.minimum(e[:, c["a"]], e[:, c["e"]])
            red[m] = (lead < np.minimum(e[:, c["b"]], e[:, c["dl"]]))[m]
            deg[m] = (e[:, c["r"]] > lead)[m]
        return which, red, deg

    def canonical(self, ix, iy, ir):
        """The kept representative of each point's family: the orbit's smallest id, turned
        into its non-redundant orientation when it has two factors (the paper's rule)."""
        ix, iy, ir = self.split(self.orbit_min(ix, iy, ir))
        return self.orient(ix, iy, ir)

    def transposed(self, ix, iy, ir):
        """Each point's transpose (input and output classes swapped, factors kept), in the
        paper's orientation; a space with ``transpose`` scores both and keeps the cheaper."""
        g = next(i for i, el in enumerate(self.group)
                 if el.t and all(a == b for a, b in el.sigma))
        fx, fy, fr, _ = self._maps[g]
        return self.orient(fx[iy], fy[ix], fr[ir])

    def orient(self, ix, iy, ir):
        e = self.exponents(ix, iy, ir)
        which, red, _ = self.paper_rules(e, self.factor_present(e))
        if red.any():
            ix, iy, ir = ix.copy(), iy.copy(), ir.copy()
            for k, (_, _, g, _) in enumerate(self._pairs):
                m = red & (which == k)
                fx, fy, fr, _ = self._maps[g]
                ix[m], iy[m], ir[m] = fx[ix[m]], fy[iy[m]], fr[ir[m]]
        return ix, iy, ir

    # -- single points ----------------------------------------------------------
    def point_exponents(self, ix: int, iy: int, ir: int) -> dict:
        e = self.exponents(np.array([ix]), np.array([iy]), np.array([ir]))[0]
        return {c: Fraction(int(e[self.col[c]]), self.k) for c in self.col}

    def point_of(self, exps: dict):
        """(ix, iy, ir) of a point given as class -> exponent, or None if off the lattice."""
        units = {}
        for c in self.col:
            v = Fraction(exps.get(c, 0)) * self.k
            if v.denominator != 1:
                return None
            units[c] = int(v)
        find = lambda table, cls: next((i for i, r in enumerate(table.tolist())
                                        if r == [units[c] for c in cls]), None)
        rows = find(self.X, self.xc), find(self.Y, self.yc), find(self.R, self.rc)
        return None if None in rows else rows

    def theta(self, exps: dict):
        """The theta tuple of a two-factor space point."""
        if self.n != 2:
            return None
        return tuple(exps[self.by_key[(THETA_KEYS[c][0], frozenset(THETA_KEYS[c][1]))]]
                     for c in THETA_CLASSES)

    def exps_from_theta(self, theta, pair=("A", "B")) -> dict:
        """Class exponents of a theta point placed on factors ``pair`` (other factors empty)."""
        p, q = pair
        ren = {"A": p, "B": q}
        out = {c: Fraction(0) for c in self.col}
        for name, v in zip(THETA_CLASSES, theta):
            side, fs = THETA_KEYS[name]
            out[self.by_key[(side, frozenset(ren[f] for f in fs))]] = Fraction(v)
        return out
