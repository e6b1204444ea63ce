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
    paper's rules do not apply (not a two-factor structure), else 0 or 1; ``absorbable`` is
    1 where a factor could be multiplied into another (:meth:`Space.absorbable`).
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
    absorbable: np.ndarray
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
            "degenerate", "absorbable")


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
              "absorbable": 0, "passed": 0, "min_params": None, "min_flops": None}
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
            args = (space, tables, rank_sizes, two_factor, d_in, d_out, keep)
            cols = _evaluate(*args, ix, iy, ir)
            if space.transpose:
                cols_t = _evaluate(*args, tx, ty, tr)
                at = lambda x, y, r, c: lambda rows: _exact_costs(
                    space, tables, rank_sizes, x[rows], y[rows], r[rows], c["tie"][rows],
                    d_in, d_out)
                cols = _cheaper(cols, fits_t, cols_t, ok_x[ix] & ok_y[iy], keep,
                                at(ix, iy, ir, cols), at(tx, ty, tr, cols_t))
            counts["degenerate"] += int((cols["degenerate"] == 1).sum())
            counts["absorbable"] += int((cols["absorbable"] == 1).sum())
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


def _cheaper(cols: dict, fits_t, cols_t: dict, fits, keep, exact, exact_t) -> dict:
    """Per point, the orientation that fits the padding tolerance and costs fewer FLOPs
    (then parameters); the first on a tie. ``exact(rows)`` / ``exact_t(rows)``: those
    points' exact (params, FLOPs, rank bound), for the pairs whose float costs cannot tell
    and that may pass ``keep``."""
    f, p, ft, pt = cols["flops"], cols["params"], cols_t["flops"], cols_t["params"]
    take = fits_t & (~fits | (ft < f) | ((ft == f) & (pt < p)))
    unsure = fits_t & fits & (_unsure(f, ft) | _unsure(p, pt))
    if unsure.any() and keep is not None:
        unsure &= keep(cols) | keep(cols_t)
    rows = np.nonzero(unsure)[0]
    if rows.size:
        (p0, f0, _), (p1, f1, _) = exact(rows), exact_t(rows)
        take[rows] = (f1 < f0) | ((f1 == f0) & (p1 < p0))
    return {n: np.where(take, cols_t[n], v) for n, v in cols.items()}


#: float64 holds every integer below this exactly; above it, costs are rounded
EXACT = 2.0 ** 53


def _unsure(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Where the float costs ``a`` and ``b`` may not order (or tie) as their exact values
    do: at or above 2^53, within a few roundings of each other (the formulas sum their
    terms in different orders, so equal costs can differ in the last bits)."""
    top = np.maximum(np.abs(a), np.abs(b))
    return (top >= EXACT) & (np.abs(a - b) <= top * 2.0 ** -40)


def _exact_costs(space, tables, rank_sizes, ix, iy, ir, tie, d_in: int, d_out: int) -> list:
    """(params, FLOPs, rank bound) of the points ``(ix, iy, ir)``, each at its rounding
    ``tie``, exactly: object arrays of Python integers (sizes are at most 2^32, so their
    float64 values are exact)."""
    t = space.template
    present = space.exponents(ix, iy, ir) > 0
    exact = lambda v: np.asarray(v).astype(np.int64).astype(object)
    out = [np.empty(len(ix), dtype=object) for _ in range(3)]
    for tv in np.unique(tie):
        at = np.nonzero(tie == tv)[0]
        sx, sy = tables.sizes(ix[at], iy[at], int(tv))
        z = {c: exact(sx[:, j]) for j, c in enumerate(space.xc)}
        z.update({c: exact(sy[:, j]) for j, c in enumerate(space.yc)})
        z.update({c: exact(rank_sizes[ir[at], j]) for j, c in enumerate(space.rc)})
        sub = {c: exact(present[at, space.col[c]]) for c in t.classes}
        for o, v in zip(out, (t.params(z, sub), t.flops(z, sub), t.rank_bound(z, d_in, d_out))):
            o[at] = np.broadcast_to(np.asarray(v, dtype=object), (len(at),))
    return out


def _evaluate(space, tables, rank_sizes, two_factor, d_in, d_out, keep, ix, iy, ir) -> dict:
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
    # as concretize: of equally close roundings the highest rank bound, then the fewest
    # FLOPs and parameters; only the points whose pair of rows has that many ties
    ties = tables.counts[ix, iy]
    chosen = np.zeros(len(ix), dtype=np.int8)
    unsure = np.zeros(len(ix), dtype=bool)  # a choice the float costs could not make
    low_p, low_f = params.copy(), flops.copy()  # the cheapest any rounding could be
    for tie in range(1, tables.ties):
        at = np.nonzero(ties > tie)[0]
        if not at.size:
            continue
        p, f, r = costs(at, tie)
        was = (params[at], flops[at], rank[at])
        better = (r > was[2]) | ((r == was[2]) & ((f < was[1]) | ((f == was[1]) & (p < was[0]))))
        # rank bounds are exact (at most the layer's width); costs above 2^53 may not be
        unsure[at] |= (r == was[2]) & (_unsure(f, was[1]) | _unsure(p, was[0]))
        low_p[at], low_f[at] = np.minimum(low_p[at], p), np.minimum(low_f[at], f)
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
    cols = {"ids": space.ids(ix, iy, ir), "tie": chosen,
            "params": np.asarray(params, dtype=np.float64),
            "flops": np.asarray(flops, dtype=np.float64), "omega": omega.astype(np.int16),
            "psi": psi.astype(np.int16), "nu": nu.astype(np.int16),
            "rank_bound": np.asarray(rank, dtype=np.float64),
            "redundant": flag(red), "degenerate": flag(deg),
            "absorbable": space.absorbable(e).astype(np.int8)}
    rows = np.nonzero(unsure)[0]
    if rows.size and keep is not None:  # settled only where some rounding may pass
        loose = {n: v[rows] for n, v in cols.items()}
        loose["params"], loose["flops"] = low_p[rows], low_f[rows]
        rows = rows[keep(loose)]
    if rows.size:
        _settle(cols, rows, ties[rows], lambda tie: _exact_costs(
            space, tables, rank_sizes, ix[rows], iy[rows], ir[rows], tie, d_in, d_out))
    return cols


def _settle(cols: dict, rows, ties, exact) -> None:
    """Pick the rounding of ``rows`` again, as concretize does, from exact costs:
    ``exact(tie)`` gives the rows' (params, FLOPs, rank bound) at ``tie`` (one per row)."""
    tie = np.zeros(len(rows), dtype=np.int8)
    p, f, r = exact(tie)
    for t in range(1, int(ties.max())):
        has = ties > t
        p1, f1, r1 = exact(np.where(has, t, tie))  # rows without this tie repeat theirs
        better = has & ((r1 > r) | ((r1 == r) & ((f1 < f) | ((f1 == f) & (p1 < p)))))
        p, f, r = (np.where(better, new, old) for new, old in ((p1, p), (f1, f), (r1, r)))
        tie[better] = t
    cols["tie"][rows] = tie
    for name, v in (("params", p), ("flops", f), ("rank_bound", r)):
        cols[name][rows] = np.array([float(x) for x in v], dtype=np.float64)
