"""BTT-MoE: sparse dispatch vs. masked reference vs. the rank-k floor.

Times one forward + backward pass (median of a few repeats after warm-up). The variants
of a configuration run in rounds, in a new random order each round, so that machine load
and whatever one variant leaves in the caches hit them alike (in a fixed order the floors,
which share ``x``, found it in cache after one another, while sparse ran after the
cache-flushing masked reference). Upstream gradients are allocated once, outside the
timed calls. Ratios are medians of the per-round ratios:

* masked: every expert for every token, gated by a dense (N, E) matrix
  (``btt_moe_masked``), i.e. E/k times the useful work;
* sparse: only the k selected experts per token (``btt_moe_sparse``);
* floor:  a plain rank-k BTT ``ga,gafr,fgre->fe`` without any routing -- the
  same useful work with perfect dispatch; the fastest of the two dense
  methods of ``einc.moe`` (``bmm`` and ``strided``) and einc's compiled
  ``btt(rank=k)`` layer (fused route) is used.

The cores are laid out as ``einc.BTTMoE`` stores them (expert-major slices); the masked
reference is also timed with plain contiguous cores and reported as the faster of the two.

Routing (top-k + softmax over fixed router logits) is included in masked and
sparse; the router's linear map is not (it is the same for both).

    python benchmarks/moe.py                # full table (a few minutes on 2 cores)
    python benchmarks/moe.py --quick        # d=1024 only
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import statistics
import time

import torch

import einc
from einc.moe import btt_dense, btt_moe_masked, btt_moe_sparse, route


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{platform.node()} ({name}, {platform.system()} {platform.release()})"


def fwd_bwd(fn, params):
    grad = []  # the upstream gradient, made once: a fresh 16+ MiB tensor costs page faults

    def step():
        for p in params:
            p.grad = None
        out = fn()
        if not grad:
            grad.append(torch.ones_like(out))
        out.backward(grad[0])

    return step


def bench(cands: dict, warmup: int, repeats: int, seed: int = 0) -> dict:
    """Per variant, the list of its times (ms), one per round; rounds run the variants in
    a new random order."""
    times = {name: [] for name in cands}
    for _ in range(warmup):
        for fn in cands.values():
            fn()
    order = random.Random(seed)
    for _ in range(repeats):
        names = list(cands)
        order.shuffle(names)
        for name in names:
            t0 = time.perf_counter()
            cands[name]()
            times[name].append(1e3 * (time.perf_counter() - t0))
    return times


def config(d: int, E: int, k: int, tokens: int, warmup: int, repeats: int, seed: int = 0):
    s = int(round(d**0.5))
    assert s * s == d, "d must be a square"
    g = a = f = e = s
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, g, a, generator=gen).requires_grad_()
    # BTTMoE's storage: (g, E, a, f) and (f, E, g, e), exposed as (g, a, f, E) / (f, g, E, e)
    A = (torch.randn(g, E, a, f, generator=gen) / a**0.5).permute(0, 2, 3, 1).requires_grad_()
    B = (torch.randn(f, E, g, e, generator=gen) * (k / g) ** 0.5).permute(0, 2, 1, 3)
    B.requires_grad_()
    # a trained-looking router: random weights, roughly balanced load
    W = torch.randn(E, d, generator=gen) / d**0.5
    logits = (x.detach().reshape(tokens, d) @ W.t()).requires_grad_()
    Ak = (torch.randn(g, a, f, k, generator=gen) / a**0.5).requires_grad_()
    Bk = (torch.randn(f, g, k, e, generator=gen) / g**0.5).requires_grad_()

    layer = einc.compile(f"btt(rank={k})", d_in=d, d_out=d, bias=False, route="fused")
    xf = x.detach().reshape(tokens, d).requires_grad_()

    # the masked reference also gets plain contiguous cores (g, a, f, E) / (f, g, E, e)
    # and is timed as the faster of the two layouts
    Ac, Bc = A.detach().contiguous().requires_grad_(), B.detach().contiguous().requires_grad_()

    def masked(A, B):
        def run():
            idx, gate = route(logits, k)
            return btt_moe_masked(x, A, B, idx, gate, validate=False)
        return run

    def sparse():
        idx, gate = route(logits, k)
        return btt_moe_sparse(x, A, B, idx, gate, validate=False)

    cands = {
        "masked": fwd_bwd(masked(A, B), [x, A, B, logits]),
        "masked_contiguous": fwd_bwd(masked(Ac, Bc), [x, Ac, Bc, logits]),
        "sparse": fwd_bwd(sparse, [x, A, B, logits]),
        "floor_bmm": fwd_bwd(lambda: btt_dense(x, Ak, Bk), [x, Ak, Bk]),
        "floor_strided": fwd_bwd(lambda: btt_dense(x, Ak, Bk, method="strided"), [x, Ak, Bk]),
        "floor_einc": fwd_bwd(lambda: layer(xf), [xf, *layer.parameters()]),
    }
    runs = bench(cands, warmup, repeats)
    with torch.no_grad():
        idx, _ = route(logits, k)
        load = torch.bincount(idx.reshape(-1), minlength=E).float()
    med = {name: statistics.median(ts) for name, ts in runs.items()}
    masked = min(("masked", "masked_contiguous"), key=med.get)
    floor = min(("floor_bmm", "floor_strided", "floor_einc"), key=med.get)
    per_round = lambda a, b: sorted(u / v for u, v in zip(runs[a], runs[b]))
    over_floor = per_round("sparse", floor)
    return {
        "d": d,
        "E": E,
        "k": k,
        "masked": med[masked],
        "sparse": med["sparse"],
        "floor": med[floor],
        "floor_kind": floor.removeprefix("floor_"),
        "speedup": statistics.median(per_round(masked, "sparse")),
        "over_floor": statistics.median(over_floor),
        "over_floor_range": (over_floor[0], over_floor[-1]),
        "max_load": (load.max() / load.mean()).item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--repeats", type=int, default=9, help="timed rounds for d <= 1024 (at most 5 above)")
    ap.add_argument("--quick", action="store_true", help="d=1024 only")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dims = [1024] if args.quick else args.dims

    print(f"machine : {machine()}")
    print(f"torch   : {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
    print(f"date    : {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"tokens  : {args.tokens}, k = {args.k}; times: forward+backward, median, ms")
    print()
    head = (
        f"{'d':>5} {'E':>3} {'k':>2} | {'masked ms':>10} {'sparse ms':>10} {'floor ms':>9} | "
        f"{'masked/sparse':>13} {'target':>6} | {'sparse/floor':>12} {'rounds':>11} {'target':>6} | "
        f"{'max load':>8} {'floor from':>10}"
    )
    print(head)
    print("-" * len(head))
    for d in dims:
        for E in args.experts:
            reps = args.repeats if d <= 1024 else max(2, min(args.repeats, 5))
            r = config(d, E, args.k, args.tokens, warmup=1, repeats=reps)
            lo, hi = r["over_floor_range"]
            print(
                f"{d:>5} {E:>3} {args.k:>2} | {r['masked']:>10.1f} {r['sparse']:>10.1f} "
                f"{r['floor']:>9.1f} | {r['speedup']:>13.2f} {0.6 * E / args.k:>6.2f} | "
                f"{r['over_floor']:>12.2f} {f'{lo:.2f}-{hi:.2f}':>11} {1.5:>6.2f} | "
                f"{r['max_load']:>8.2f} {r['floor_kind']:>10}",
                flush=True,
            )
    print()
    print("target: masked/sparse >= 0.6*E/k; sparse/floor <= 1.5 (medians of per-round ratios;")
    print("rounds: lowest-highest round). floor = fastest rank-k BTT (einc.moe bmm / strided,")
    print("einc fused layer); max load = busiest expert / mean load.")


if __name__ == "__main__":
    main()
