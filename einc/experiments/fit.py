"""Compute-optimal frontiers and power-law fits (numpy only).

A run's curve is its held-out loss at increasing cumulative training FLOPs. Keeping the best
checkpoint so far makes each curve non-increasing; the frontier of a structure is the lower
envelope of its curves (all widths, all steps) on a log-spaced compute grid, each curve
interpolated linearly in log-log coordinates inside its own compute range; the envelope
is then made non-increasing (a budget C also buys the best run of any smaller budget).

The fit is ``loss = a * C^(-b)`` (least squares on ``log loss`` against ``log C``; the
standard error of ``b`` from the covariance of that fit) or, with ``irreducible=True``,
``loss = a * C^(-b) + c`` (``c`` by a one-dimensional search, the error of ``b`` by a
bootstrap over the frontier points). Frontier points are correlated, so both errors are
optimistic: read them as the fit's spread, not as a confidence interval.
"""
from __future__ import annotations

import math

import numpy as np


def best_so_far(loss) -> np.ndarray:
    """The running minimum of a loss curve (NaN or inf counts as no improvement)."""
    arr = np.asarray(loss, dtype=float)
    arr = np.where(np.isfinite(arr), arr, np.inf)
    return np.minimum.accumulate(arr)


def interpolate(flops, loss, grid) -> np.ndarray:
    """The curve at the compute levels ``grid``, linear in log-log; NaN outside its range."""
    c, l = np.asarray(flops, float), best_so_far(loss)
    ok = (c > 0) & np.isfinite(l) & (l > 0)
    c, l = c[ok], l[ok]
    out = np.full(len(grid), np.nan)
    if len(c) == 0:
        return out
    g = np.log(np.asarray(grid, float))
    inside = (g >= np.log(c[0]) - 1e-12) & (g <= np.log(c[-1]) + 1e-12)
    if len(c) == 1:
        out[inside] = l[0]
        return out
    out[inside] = np.exp(np.interp(g[inside], np.log(c), np.log(l)))
    return out


def _last_point(flops, loss):
    """The largest positive compute at which a curve has a finite positive loss."""
    c, l = np.asarray(flops, float), np.asarray(loss, float)
    ok = (c > 0) & np.isfinite(l) & (l > 0)
    return float(c[ok].max()) if ok.any() else None


def frontier(curves, points: int = 48, grid=None) -> dict:
    """Lower envelope of ``curves`` (an iterable of ``(flops, loss)`` or of
    ``(flops, loss, label)``): ``{'flops', 'loss', 'label'}`` on a log-spaced grid from the
    smallest to the largest positive compute any curve reaches, plus each curve's last
    compute (a run's end, usually its best point, falls between grid points) (NaN-free)."""
    curves = [tuple(c) if len(c) == 3 else (c[0], c[1], i) for i, c in enumerate(curves)]
    if grid is None:
        lo = min((min(f for f in c[0] if f > 0) for c in curves if any(f > 0 for f in c[0])),
                 default=None)
        if lo is None:
            return {"flops": [], "loss": [], "label": []}
        hi = max(max(c[0]) for c in curves)
        ends = [_last_point(f, l) for f, l, _ in curves]
        grid = np.geomspace(lo, hi, points) if hi > lo else np.array([lo])
        grid = np.union1d(grid, [e for e in ends if e is not None])
    grid = np.asarray(grid, float)
    table = np.vstack([interpolate(f, l, grid) for f, l, _ in curves])
    filled = np.where(np.isnan(table), np.inf, table)
    best = filled.argmin(0)
    env = filled[best, np.arange(len(grid))]
    labels = [curves[i][2] for i in best]
    for j in range(1, len(env)):  # a budget C also buys every smaller budget's best run
        if env[j - 1] < env[j]:
            env[j], labels[j] = env[j - 1], labels[j - 1]
    ok = np.isfinite(env)
    return {"flops": grid[ok].tolist(), "loss": env[ok].tolist(),
            "label": [lab for lab, k in zip(labels, ok) if k]}


def fit_power_law(flops, loss, irreducible: bool = False, bootstrap: int = 200,
                  seed: int = 0) -> dict:
    """Fit ``loss = a C^(-b) [+ c]``; returns a, b, b_err, c, rmse (in log loss), n."""
    c_arr, l_arr = np.asarray(flops, float), np.asarray(loss, float)
    ok = (c_arr > 0) & (l_arr > 0) & np.isfinite(l_arr)
    x, y = np.log(c_arr[ok]), np.log(l_arr[ok])
    n = len(x)
    if n < 3:
        return {"a": None, "b": None, "b_err": None, "c": 0.0, "rmse": None, "n": int(n)}
    if not irreducible:
        a, b, b_err, rmse = _loglinear(x, y)
        return {"a": a, "b": b, "b_err": b_err, "c": 0.0, "rmse": rmse, "n": int(n)}
    a, b, c, rmse = _with_offset(x, y)
    rng = np.random.default_rng(seed)
    bs = []
    for _ in range(bootstrap):
        idx = np.sort(rng.integers(0, n, n))
        if len(np.unique(idx)) >= 3:
            bs.append(_with_offset(x[idx], y[idx])[1])
    b_err = float(np.std(bs, ddof=1)) if len(bs) > 1 else None
    return {"a": a, "b": b, "b_err": b_err, "c": c, "rmse": rmse, "n": int(n)}


def _loglinear(x, y):
    X = np.column_stack([np.ones_like(x), x])
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ beta
    dof = max(len(x) - 2, 1)
    cov = (resid @ resid / dof) * np.linalg.inv(X.T @ X)
    return (float(math.exp(beta[0])), float(-beta[1]), float(math.sqrt(max(cov[1, 1], 0.0))),
            float(math.sqrt(np.mean(resid ** 2))))


def _with_offset(x, y):
    """The offset c on a grid up to just below the least loss, then refined between the
    best point's neighbours (golden sections): on the grid alone, b of exact power laws
    came out 2-3 bootstrap errors off."""
    lmin = float(np.exp(y.min()))

    def fit_at(c):
        a, b, _, _ = _loglinear(x, np.log(np.exp(y) - c))
        rmse = float(np.sqrt(np.mean((np.log(a * np.exp(-b * x) + c) - y) ** 2)))
        return a, b, float(c), rmse

    grid = np.unique(np.concatenate([[0.0], lmin * (1 - np.geomspace(1, 1e-3, 120))]))
    fits = [fit_at(c) for c in grid]
    i = min(range(len(fits)), key=lambda j: fits[j][3])
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    best = fits[i]
    ratio = (math.sqrt(5) - 1) / 2
    u, v = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fu, fv = fit_at(u), fit_at(v)
    for _ in range(60):
        if fu[3] < fv[3]:
            hi, v, fv = v, u, fu
            u = hi - ratio * (hi - lo)
            fu = fit_at(u)
        else:
            lo, u, fu = u, v, fv
            v = lo + ratio * (hi - lo)
            fv = fit_at(v)
    return min([best, fu, fv], key=lambda f: f[3])


def predict(fit: dict, flops) -> np.ndarray:
    return fit["a"] * np.asarray(flops, float) ** (-fit["b"]) + fit.get("c", 0.0)


def loss_at(front: dict, flops: float):
    """The frontier's loss at a compute level (log-log interpolation), None outside it."""
    if not front["flops"]:
        return None
    v = interpolate(front["flops"], front["loss"], [flops])[0]
    return None if np.isnan(v) else float(v)
