"""The frontier plot: loss against training FLOPs (log-log), one colour per taxonomy.

Thin lines are the runs (mean over seeds), one per width; the thick line is the structure's
frontier and the dashed line its power-law fit. Colour encodes (omega, psi): green for
omega = 0 and psi = 1 (the paper's best class), orange for parameter sharing (omega > 0),
blue for reduced rank (psi < 1), purple for both; a structure's shade, line style and marker
tell structures of one class apart.
"""
from __future__ import annotations

import numpy as np

from ..files import save_png
from .fit import predict
from .harness import mean_curves

_CMAPS = {"full": "Greens", "shared": "Oranges", "lowrank": "Blues", "both": "Purples"}
_STYLES = ["-", "--", "-.", ":"]
_MARKERS = ["o", "s", "^", "D", "v", "P"]


def _family(omega, psi) -> str:
    shared = omega is not None and omega > 1e-9
    low = psi is not None and psi < 1 - 1e-9
    return "both" if shared and low else "shared" if shared else "lowrank" if low else "full"


def plot_frontiers(records, summary, path: str, title: str | None = None) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = mean_curves(records)
    rows = summary["structures"]
    fams = [_family(r["omega"], r["psi"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (row, fam) in enumerate(zip(rows, fams)):
        same = [j for j, f in enumerate(fams) if f == fam]
        shade = 0.95 - 0.6 * (same.index(i) / max(len(same) - 1, 1)) if len(same) > 1 else 0.7
        colour = plt.get_cmap(_CMAPS[fam])(shade)
        style = _STYLES[same.index(i) % len(_STYLES)]
        for (spec, _w), (f, l) in sorted(curves.items(), key=lambda kv: kv[0][1]):
            if spec == row["spec"]:
                ok = f > 0
                ax.plot(f[ok], np.minimum.accumulate(l[ok]), color=colour, lw=0.7, alpha=0.35)
        fr, fit = row["frontier"], row["fit"]
        label = row["spec"]
        if row["omega"] is not None:
            label += f"  (ω={row['omega']:.2g}, ψ={row['psi']:.2g})"
        if fit.get("b") is not None:
            label += f"  b={fit['b']:.3f}"
            err = fit.get("b_err")
            label += f"±{err:.3f}" if err is not None else ""
        ax.plot(fr["flops"], fr["loss"], color=colour, lw=2.2, ls=style, label=label,
                marker=_MARKERS[i % len(_MARKERS)], markevery=6, markersize=5)
        if fit.get("b") is not None:
            xs = np.geomspace(max(fit.get("from_flops") or fr["flops"][0], fr["flops"][0]),
                              fr["flops"][-1], 50)
            ax.plot(xs, predict(fit, xs), color=colour, lw=1.0, ls=(0, (2, 2)), alpha=0.9)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs (forward + backward, from einc's analysis)")
    ax.set_ylabel("held-out loss")
    ax.set_title(title or f"{summary.get('task', '')}: compute-optimal frontiers")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    try:
        return save_png(fig, path)
    finally:
        plt.close(fig)
