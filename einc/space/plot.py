"""Plots of a search (``einc search --plot DIR``; needs the ``plot`` extra: matplotlib).

- ``cube.png``: the (omega, psi, nu) cube, one marker per occupied point, coloured by the
  best parameters per FLOP found there, sized by how many candidates share it;
- ``pareto.png``: parameters against FLOPs for every candidate, with the Pareto front
  (most parameters for the FLOPs) drawn;
- ``pareto_time.png``: parameters against measured time, when the search measured.
Known structures are labelled in each.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import EincError
from ..files import save_png
from .checks import check_targets, prepare_folder, remove_folders

MAX_POINTS = 20_000


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise EincError("plotting needs matplotlib: pip install 'einc[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


#: the files :func:`plot` writes (the last one only for measured records)
PLOT_FILES = ("cube.png", "pareto.png", "pareto_time.png")


def prepare(directory) -> list[str]:
    """Check, before a search, that its plots can be written: matplotlib imports and
    ``directory`` is (or can be made) a writable folder. Returns the folders it created."""
    _pyplot()
    created = prepare_folder(directory, "plot folder")
    try:
        check_targets(directory, PLOT_FILES, "plot folder")
    except EincError:
        remove_folders(created)
        raise
    return created


def plot(result, directory) -> list[str]:
    """Write the plots of a :class:`~einc.space.rank.SearchResult`; returns the paths."""
    plt = _pyplot()
    prepare_folder(directory, "plot folder")
    c = result.candidates
    if not len(c):
        raise EincError("nothing to plot: no candidate passed the filters")
    from .names import known_ids

    names = known_ids(c.space)
    k = c.space.k
    known = [(i, names[int(pid)]) for i, pid in enumerate(c.ids) if int(pid) in names]
    paths = [_cube(plt, c, k, known, os.path.join(directory, "cube.png")),
             _pareto(plt, c, known, os.path.join(directory, "pareto.png"))]
    measured = [r for r in result if r.get("measured_ms") is not None]
    if measured:
        paths.append(_pareto_time(plt, measured, os.path.join(directory, "pareto_time.png")))
    return paths


def _title(c) -> str:
    s = c.space
    return f"{s.n}-factor space, step 1/{s.k}, d_in={c.d_in}, d_out={c.d_out}, {len(c):,} candidates"


def _cube(plt, c, k, known, path):
    ppf = c.params_per_flop
    triples = np.stack([c.omega, c.psi, c.nu], axis=1)
    uniq, inv, counts = np.unique(triples, axis=0, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    best = np.full(len(uniq), -np.inf)
    np.maximum.at(best, inv, ppf)
    fig = plt.figure(figsize=(7.5, 6))
    ax = fig.add_subplot(projection="3d")
    sc = ax.scatter(uniq[:, 0] / k, uniq[:, 1] / k, uniq[:, 2] / k, c=np.log10(best),
                    s=8 + 40 * np.sqrt(counts / counts.max()), cmap="viridis", depthshade=False)
    fig.colorbar(sc, ax=ax, shrink=0.6, pad=0.1, label="log10 best parameters per FLOP")
    seen = set()
    for i, name in known:
        key = tuple(triples[i])
        if key in seen:
            continue
        seen.add(key)
        ax.text(*(v / k for v in key), " " + name, fontsize=7, color="crimson")
    ax.set_xlabel("omega (parameter sharing)")
    ax.set_ylabel("psi (rank)")
    ax.set_zlabel("nu (FLOP exponent - 1)")
    ax.set_title(_title(c), fontsize=9)
    fig.tight_layout()
    try:
        return save_png(fig, path)
    finally:
        plt.close(fig)


def _front(x, y):
    """Indices of the points with the most y for at most their x (Pareto front)."""
    order = np.lexsort((-y, x))
    front, best = [], -np.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    return np.array(front, dtype=int)


def _sample(n, limit=MAX_POINTS):
    if n <= limit:
        return np.arange(n)
    return np.random.default_rng(0).choice(n, limit, replace=False)


def _pareto(plt, c, known, path):
    fig, ax = plt.subplots(figsize=(7, 5))
    idx = _sample(len(c))
    ax.scatter(c.flops[idx], c.params[idx], s=4, alpha=0.3, color="grey", label="candidates")
    f = _front(c.flops, c.params)
    ax.plot(c.flops[f], c.params[f], "-o", ms=3, color="tab:blue", label="Pareto front")
    for i, name in known:
        ax.scatter([c.flops[i]], [c.params[i]], s=20, color="crimson")
        ax.annotate(name, (c.flops[i], c.params[i]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FLOPs per vector (forward)")
    ax.set_ylabel("parameters")
    ax.set_title(_title(c), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return save_png(fig, path)
    finally:
        plt.close(fig)


def _pareto_time(plt, records, path):
    t = np.array([r["measured_ms"] for r in records])
    p = np.array([r["params"] for r in records], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter(t, p, s=12, color="grey")
    f = _front(t, p)
    ax.plot(t[f], p[f], "-o", ms=3, color="tab:blue", label="Pareto front")
    for r, ti, pi in zip(records, t, p):
        if r.get("name"):
            ax.annotate(r["name"], (ti, pi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"measured forward+backward time per batch of {records[0]['measured_batch']} (ms)")
    ax.set_ylabel("parameters")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return save_png(fig, path)
    finally:
        plt.close(fig)
