"""Score every kept point of a space at a layer width, with numpy and one template.

The lattice is walked in chunks of input-side rows. For each chunk: keep one point per
family (:meth:`Space.orbit_min`), orient two-factor points the paper's way, look the
concrete sizes up in per-side tables (rounded once per side pattern, exactly as
:func:`einc.analysis.concrete.concretize` rounds), then evaluate the template's lambdified
parameter and FLOP formulas and its cut sets on whole columns. Only the points that pass
the padding tolerance and the caller's filter are stored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from .lattice import Space
from .progress import Progress

CHUNK = 200_000


@dataclass
class Candidates:
    """Column arrays, one entry per kept point that passed the tolerance and the filters.

    omega, psi and nu are in units of 1/k. ``redundant`` / ``degenerate`` are -1 where the
    paper's rules do not apply (not a two-factor structure), else 0 or 1.
    """

    space: Space
    d_in: int
    d_out: int
    ids: np.ndarray
    params: np.ndarray
    flops: np.ndarray
    omega: np.ndarray
    psi: np.ndarray
    nu: np.ndarray
    rank_bound: np.ndarray
    redundant: np.ndarray
    degenerate: np.ndarray
    counts: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.ids)

    @property
    def params_per_flop(self) -> np.ndarray:
        return self.params / self.flops

    def take(self, idx) -> "Candidates":
        cols = {n: getattr(self, n)[idx] for n in _COLUMNS}
        return Candidates(self.space, self.d_in, self.d_out, counts=dict(self.counts), **cols)


_COLUMNS = ("ids", "params", "flops", "omega", "psi", "nu", "rank_bound", "redundant",
            "degenerate")


@dataclass
class SizeTables:
    """Concrete sizes by table row: each side's candidate roundings and, per pair of rows,
    the ones concretize may take (see :func:`einc.analysis.template.combine`): usually one,
    several when roundings are equally close; of those the one with the highest rank bound,
    then the fewest FLOPs and parameters, is picked per point (as concretize)."""

    x: np.ndarray        # (nX, choices, input classes) float64
    y: np.ndarray        # (nY, choices, output classes)
    pick_x: np.ndarray   # (nX, nY, ties) int8: the input-side choices of each pair of rows
    pick_y: np.ndarray   # (a pair with fewer ties repeats its first one)
    padded_x: np.ndarray  # (nX,) int64
    padded_y: np.ndarray
    counts: np.ndarray   # (nX, nY) int8: how many ties each pair of rows has

    @property
    def ties(self) -> int:
        return self.pick_x.shape[2]

    def sizes(self, ix, iy, tie: int = 0):
        return (self.x[ix, self.pick_x[ix, iy, tie]], self.y[iy, self.pick_y[ix, iy, tie]])


def size_tables(space: Space, d_in: int, d_out: int) -> SizeTables:
    from ..analysis.template import combine

    t, k = space.template, space.k
    rounds = {}
    for side, table in (("x", space.X), ("y", space.Y)):
        rounds[side] = [t.round_side(side, tuple(Fraction(v, k) for v in row), d_in, d_out)
                        for row in table.tolist()]
    assert max(r.free for r in rounds["x"]) + max(r.free for r in rounds["y"]) <= 14

    def stack(rs, width):
        most = max(len(r.choices) for r in rs)
        out = np.ones((len(rs), most, width))
        for i, r in enumerate(rs):
            out[i, :len(r.choices)] = r.choices
        return out

    rx, ry = rounds["x"], rounds["y"]
    picks = {}
    multi_y = [j for j, r in enumerate(ry) if len(r.choices) > 1]
    for i, a in enumerate(rx):
        for j in (range(len(ry)) if len(a.choices) > 1 else multi_y):
            picks[i, j] = combine(a, ry[j])
    most = max((len(p) for p in picks.values()), default=1)
    pick = np.zeros((2, len(rx), len(ry), most), dtype=np.int8)
    counts = np.ones((len(rx), len(ry)), dtype=np.int8)
    for (i, j), p in picks.items():
        counts[i, j] = len(p)
        p = p + [p[0]] * (most - len(p))
        pick[:, i, j] = np.array(p, dtype=np.int8).T
    return SizeTables(stack(rx, len(space.xc)), stack(ry, len(space.yc)), pick[0], pick[1],
                      np.array([r.padded for r in rx], dtype=np.int64),
                      np.array([r.padded for r in ry], dtype=np.int64), counts)


def score(space: Space, d_in: int, d_out: int, tolerance: float = 0.15, keep=None,
          progress: bool | None = None) -> Candidates:
    """Evaluate the space; ``keep(columns) -> bool mask`` filters (columns: a dict of arrays)."""
    t, k = space.template, space.k
    tables = size_tables(space, d_in, d_out)
    ok_x = tables.padded_x <= d_in * (1 + tolerance) + 1e-9
    ok_y = tables.padded_y <= d_out * (1 + tolerance) + 1e-9
    rank_sizes = np.array([[t.rank_size(Fraction(v, k), d_in, d_out) for v in row]
                           for row in space.R.tolist()], dtype=np.float64).reshape(space.nR, -1)
    per_row = space.nY * space.nR
    rows_per_chunk = max(1, CHUNK // per_row)
    counts = {"lattice": space.size, "distinct": 0, "padding": 0, "degenerate": 0,
              "passed": 0, "min_params": None, "min_flops": None}
    parts = []
    iy_base = np.repeat(np.arange(space.nY), space.nR)
    ir_base = np.tile(np.arange(space.nR), space.nY)
    two_factor = space.n == 2
    with Progress(space.nX, f"scoring {space.size:,} points", enabled=progress) as bar:
        for start in range(0, space.nX, rows_per_chunk):
            stop = min(space.nX, start + rows_per_chunk)
            ix = np.repeat(np.arange(start, stop), per_row)
            iy = np.tile(iy_base, stop - start)
            ir = np.tile(ir_base, stop - start)
            keep_mask = space.ids(ix, iy, ir) == space.orbit_min(ix, iy, ir)
            ix, iy, ir = ix[keep_mask], iy[keep_mask], ir[keep_mask]
            counts["distinct"] += len(ix)
            ix, iy, ir = space.orient(ix, iy, ir)
            fits = ok_x[ix] & ok_y[iy]
            if space.transpose:  # a family holds W and W^T: either may fit, and be cheaper
                tx, ty, tr = space.transposed(ix, iy, ir)
                fits_t = ok_x[tx] & ok_y[ty]
                tx, ty, tr = tx[fits | fits_t], ty[fits | fits_t], tr[fits | fits_t]
                fits_t, fits = fits_t[fits | fits_t], fits | fits_t
            counts["padding"] += int((~fits).sum())
            ix, iy, ir = ix[fits], iy[fits], ir[fits]
            bar.update(stop - start)
            if not len(ix):
                continue
            cols = _evaluate(space, tables, rank_sizes, ix, iy, ir, two_factor, d_in, d_out)
            if space.transpose:
                cols_t = _evaluate(space, tables, rank_sizes, tx, ty, tr, two_factor, d_in, d_out)
                at = lambda x, y, r, c: lambda i: _exact_costs(
                    space, tables, rank_sizes, x[i], y[i], r[i], c["tie"][i], d_in, d_out)
                cols = _cheaper(cols, fits_t, cols_t, ok_x[ix] & ok_y[iy],
                                at(ix, iy, ir, cols), at(tx, ty, tr, cols_t))
            counts["degenerate"] += int((cols["degenerate"] == 1).sum())
            for name, col in (("min_params", cols["params"]), ("min_flops", cols["flops"])):
                low = float(col.min())
                counts[name] = low if counts[name] is None else min(counts[name], low)
            if keep is not None:
                m = keep(cols)
                cols = {n: v[m] for n, v in cols.items()}
            if len(cols["ids"]):
                parts.append(cols)
    merged = {n: (np.concatenate([p[n] for p in parts]) if parts else
                  np.empty(0, dtype=np.int64 if n == "ids" else np.float64))
              for n in _COLUMNS}
    counts["passed"] = len(merged["ids"])
    return Candidates(space, d_in, d_out, counts=counts, **merged)


def _cheaper(cols: dict, fits_t, cols_t: dict, fits, exact, exact_t) -> dict:
    """Per point, the orientation that fits the padding tolerance and costs fewer FLOPs
    (then parameters); the first on a tie. ``exact(i)`` / ``exact_t(i)``: a point's exact
    (params, FLOPs, rank bound), for the pairs whose float costs cannot tell."""
    f, p, ft, pt = cols["flops"], cols["params"], cols_t["flops"], cols_t["params"]
    take = fits_t & (~fits | (ft < f) | ((ft == f) & (pt < p)))
    for i in np.nonzero(fits_t & fits & (_unsure(f, ft) | _unsure(p, pt)))[0]:
        (p0, f0, _), (p1, f1, _) = exact(i), exact_t(i)
        take[i] = f1 < f0 or (f1 == f0 and p1 < p0)
    return {n: np.where(take, cols_t[n], v) for n, v in cols.items()}


#: float64 holds every integer below this exactly; above it, costs are rounded
EXACT = 2.0 ** 53


def _unsure(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Where the float costs ``a`` and ``b`` may not order (or tie) as their exact values
    do: at or above 2^53, within a few roundings of each other (the formulas sum their
    terms in different orders, so equal costs can differ in the last bits)."""
    top = np.maximum(np.abs(a), np.abs(b))
    return (top >= EXACT) & (np.abs(a - b) <= top * 2.0 ** -40)


def _exact_costs(space, tables, rank_sizes, x: int, y: int, r: int, tie: int, d_in: int,
                 d_out: int) -> tuple:
    """One point's (params, FLOPs, rank bound) at rounding ``tie``, in Python integers."""
    t = space.template
    ix, iy, ir = np.array([x]), np.array([y]), np.array([r])
    present = space.exponents(ix, iy, ir)[0] > 0
    sub = {c: int(present[space.col[c]]) for c in t.classes}
    sx, sy = tables.sizes(ix, iy, tie)
    z = {c: int(sx[0, j]) for j, c in enumerate(space.xc)}
    z.update({c: int(sy[0, j]) for j, c in enumerate(space.yc)})
    z.update({c: int(rank_sizes[r, j]) for j, c in enumerate(space.rc)})
    return t.params(z, sub), t.flops(z, sub), t.rank_bound(z, d_in, d_out)


def _evaluate(space, tables, rank_sizes, ix, iy, ir, two_factor, d_in, d_out) -> dict:
    t = space.template
    e = space.exponents(ix, iy, ir)
    present = e > 0
    pres = {c: present[:, space.col[c]].astype(np.float64) for c in t.classes}

    def costs(at, tie):  # params, FLOPs and rank bound of the points ``at`` at this tie
        sx, sy = tables.sizes(ix[at], iy[at], tie)
        z = {c: sx[:, j] for j, c in enumerate(space.xc)}
        z.update({c: sy[:, j] for j, c in enumerate(space.yc)})
        z.update({c: rank_sizes[ir[at], j] for j, c in enumerate(space.rc)})
        sub = {c: v[at] for c, v in pres.items()}
        p, f = t.params(z, sub), t.flops(z, sub)
        n = len(ix) if isinstance(at, slice) else len(at)
        full = lambda v: np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)).copy()
        return full(p), full(f), full(t.rank_bound(z, d_in, d_out))

    params, flops, rank = costs(slice(None), 0)
    exact = lambda i, tie: _exact_costs(space, tables, rank_sizes, ix[i], iy[i], ir[i], tie,
                                        d_in, d_out)
    # as concretize: of equally close roundings the highest rank bound, then the fewest
    # FLOPs and parameters; only the points whose pair of rows has that many ties
    ties = tables.counts[ix, iy]
    chosen = np.zeros(len(ix), dtype=np.int8)
    for tie in range(1, tables.ties):
        at = np.nonzero(ties > tie)[0]
        if not at.size:
            continue
        p, f, r = costs(at, tie)
        was = (params[at], flops[at], rank[at])
        better = (r > was[2]) | ((r == was[2]) & ((f < was[1]) | ((f == was[1]) & (p < was[0]))))
        # rank bounds are exact (at most the layer's width); costs above 2^53 may not be
        for j in np.nonzero((r == was[2]) & (_unsure(f, was[1]) | _unsure(p, was[0])))[0]:
            (p1, f1, _), (p0, f0, _) = exact(at[j], tie), exact(at[j], chosen[at[j]])
            better[j] = f1 < f0 or (f1 == f0 and p1 < p0)
        won = at[better]
        params[won], flops[won], rank[won] = p[better], f[better], r[better]
        chosen[won] = tie
    exps = {c: e[:, space.col[c]].astype(np.int32) for c in t.classes}
    exps["__one__"] = space.k
    omega, psi, nu = t.exponents(exps)
    if two_factor:  # every point has a theta, so the paper's rules always apply
        c = space._pairs[0][3]
        lead = np.minimum(e[:, c["a"]], e[:, c["e"]])
        red = lead < np.minimum(e[:, c["b"]], e[:, c["dl"]])
        deg = e[:, c["r"]] > lead
        applies = np.ones(len(ix), dtype=bool)
    else:
        which, red, deg = space.paper_rules(e, space.factor_present(e))
        applies = which >= 0
    flag = lambda m: np.where(applies, m.astype(np.int8), np.int8(-1)).astype(np.int8)
    return {"ids": space.ids(ix, iy, ir), "tie": chosen,
            "params": np.asarray(params, dtype=np.float64),
            "flops": np.asarray(flops, dtype=np.float64), "omega": omega.astype(np.int16),
            "psi": psi.astype(np.int16), "nu": nu.astype(np.int16),
            "rank_bound": np.asarray(rank, dtype=np.float64),
            "redundant": flag(red), "degenerate": flag(deg)}
