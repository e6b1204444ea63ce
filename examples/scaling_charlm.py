"""Scaling of a small character-level GPT: dense vs BTT vs BTT-MoE vs a feed-forward MoE."""
import argparse
import os
import time

import einc


# Every linear layer in the blocks (q, k, v, o, feed-forward) takes the structure; the
# embedding and unembedding stay dense. ffmoe: dense attention, each feed-forward block
# swapped for 8 dense experts of hidden size 4d/2, 2 per token (the dense block's FLOPs).
STRUCTURES = ["dense", "btt", "bttmoe(experts=8,k=2)", "ffmoe(experts=8,k=2)"]
# BTT layers cost less per width, so they get a larger width too; frontiers are compared
# at equal training FLOPs, whatever the width.
WIDTHS = {"dense": [64, 128], "ffmoe(experts=8,k=2)": [64, 128],
          "btt": [64, 128, 256], "bttmoe(experts=8,k=2)": [64, 128, 256]}

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", nargs="?", default=os.path.join("runs", "scaling_charlm"),
                    help="folder for the runs, tables and plot; finished runs there are kept "
                         "(default: %(default)s)")
    OUT = ap.parse_args().out
    start = time.perf_counter()
    result = einc.experiments.scaling(
        task="charlm", structures=STRUCTURES, widths=WIDTHS,
        options={"context": 64, "layers": 2},    # bytes of the standard library's .py files
        steps=300, batch=32,                     # 32 x 64 tokens a step
        lr_sweep=[3e-3, 1e-2],                   # tried at width 64, reused at larger widths
        workers=2, out=OUT)
    print(result.table())
    print("\nbase learning rates:", {s: f"{v:.0e}" for s, v in result.lrs.items()})
    print("ranking at equal compute:", " < ".join(result.summary["ranking"]))
    runs = {r["key"] for r in result} | {r["key"] for r in result.sweep}
    print(f"\n{len(runs)} runs, {time.perf_counter() - start:.0f} s; "
          f"plot and records in {OUT}/")
