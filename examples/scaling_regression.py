"""Scaling laws of structured MLPs on a random ReLU teacher: dense vs BTT vs Kronecker vs low rank."""
import argparse
import os
import time

import einc


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", nargs="?", default=os.path.join("runs", "scaling_regression"),
                    help="folder for the runs, tables and plot; finished runs there are kept "
                         "(default: %(default)s)")
    OUT = ap.parse_args().out
    start = time.perf_counter()
    result = einc.experiments.scaling(
        task="regression",                       # 8-d inputs, 6-layer width-256 ReLU teacher
        structures=["dense", "btt", "kron", "lowrank(rank=d^(1/2))"],
        # two structured hidden layers of each width; the cheaper structures get larger
        # widths so that every frontier reaches the same training compute
        widths={"dense": [64, 128, 256, 512], "btt": [64, 256, 1024, 2048],
                "kron": [64, 256, 1024, 2048], "lowrank(rank=d^(1/2))": [64, 256, 1024, 2048]},
        steps=2000, batch=256,
        lr_sweep=[1e-3, 3e-3, 1e-2],             # tried at width 64, reused at larger widths
        workers=2,                               # a local process pool, one thread each
        out=OUT)                                 # finished runs are kept and not redone
    print(result.table())
    print("\nbase learning rates:", {s: f"{v:.0e}" for s, v in result.lrs.items()})
    print("ranking at equal compute:", " < ".join(result.summary["ranking"]))
    runs = {r["key"] for r in result} | {r["key"] for r in result.sweep}
    print(f"\n{len(runs)} runs, {time.perf_counter() - start:.0f} s; "
          f"plot and records in {OUT}/")
