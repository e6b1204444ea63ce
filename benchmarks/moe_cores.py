"""BTT-MoE of three or more cores (``einc.moe.multicore``): sparse vs. masked vs. floor.

Times one forward + backward pass of the experts (routing included, the router's linear map
not), median of rounds run in a new random order each round, as ``benchmarks/moe.py`` does
for two cores:

* masked: every expert for every token, gated (``masked_cores``), E/k times the work;
* sparse: only the k selected experts of each token, on the CPU's backend (chunked);
* padded: the same on the (expert, capacity) rows of ``sparse_cores``;
* floor:  k experts that every token uses, with perfect dispatch: the fastest (per round)
  of the einsum chain over all tokens (``masked_cores`` with E = k, every gate set), the
  chunked backend with every token on all k, and einc's compiled layer of that dense
  structure (the preset's equation with the expert index of size k, its ``auto`` route).

    python benchmarks/moe_cores.py            # cores 3 and 4, d = 512 and 4096
    python benchmarks/moe_cores.py --quick    # d = 512 only
"""
from __future__ import annotations

import argparse
import datetime
import random
import statistics
import time

import torch

import einc
from einc.moe import route
from einc.moe.multicore import layout, masked_cores, run_cores, sparse_cores

from moe import machine


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def config(c: int, d: int, E: int, k: int, tokens: int, repeats: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    layer = einc.BTTMoE(d, d, experts=E, k=k, cores=c)
    lay, sizes = layout(c), layer._sizes()
    floor_layer = einc.BTTMoE(d, d, experts=k, k=k, cores=c)
    cores = [p.detach().clone().requires_grad_() for p in layer.factors()]
    floor_cores = [p.detach().clone().requires_grad_() for p in floor_layer.factors()]
    x = torch.randn(tokens, layer.in_features, generator=g).requires_grad_()
    logits = torch.randn(tokens, E, generator=g).requires_grad_()
    dy = torch.randn(tokens, layer.out_features, generator=g)
    every = torch.arange(k).expand(tokens, k)
    even = torch.full((tokens, k), 1.0 / k)
    floor_sizes = floor_layer._sizes()
    # the same k-expert structure as an ordinary einc layer: the expert index is then
    # just a summed index of size k
    sized = ", ".join(f"{lay.letters[i]} = {floor_sizes[i]}" for i in lay.letters)
    dense = einc.compile(f"{lay.equation} with {sized}", bias=False)
    xd = torch.randn(tokens, dense.in_features, generator=g).requires_grad_()
    dyd = torch.randn(tokens, dense.out_features, generator=g)

    def run(fn, params, grad=dy):
        def step():
            for p in params:
                p.grad = None
            y = fn()
            y[:, : grad.shape[1]].backward(grad)
        return step

    def routed(fn):
        def go():
            idx, gate = route(logits, k)
            return fn(x, cores, lay, sizes, idx, gate)
        return go

    chunked = lambda *a: run_cores(*a, deterministic=False, masked=False, backend="chunked")
    cands = {
        "masked": run(routed(masked_cores), [x, logits, *cores]),
        "sparse": run(routed(chunked), [x, logits, *cores]),
        "padded": run(routed(lambda *a: sparse_cores(*a, deterministic=False)),
                      [x, logits, *cores]),
        "floor chain": run(lambda: masked_cores(x, floor_cores, lay, floor_sizes, every, even),
                           [x, *floor_cores]),
        "floor chunked": run(lambda: chunked(x, floor_cores, lay, floor_sizes, every, even),
                             [x, *floor_cores]),
        "floor einc": run(lambda: dense(xd), [xd, *dense.parameters()], dyd),
    }
    for step in cands.values():  # warm-up
        step()
    times = {name: [] for name in cands}
    order = list(cands)
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            times[name].append(timed(cands[name]))
    floors = ("floor chain", "floor chunked", "floor einc")
    times["floor"] = [min(t) for t in zip(*(times[f] for f in floors))]
    ratio = lambda a, b: statistics.median(p / q for p, q in zip(times[a], times[b]))
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {**med, "masked/sparse": ratio("masked", "sparse"),
            "sparse/floor": ratio("sparse", "floor"), "sizes": layer.input_sizes,
            "floor from": min(floors, key=med.get).removeprefix("floor ")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--dims", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="d = 512 only")
    args = ap.parse_args()
    dims = [512] if args.quick else args.dims
    print(f"machine : {machine()}")
    print(f"torch   : {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU; "
          f"{args.tokens} tokens, k = {args.k}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    head = (f"{'cores':>5} {'d':>5} {'E':>3} {'sizes':>14} | {'masked ms':>10} {'sparse ms':>10} "
            f"{'padded ms':>10} {'floor ms':>9} | {'masked/sparse':>13} {'E/k':>5} | "
            f"{'sparse/floor':>12} {'floor from':>10}")
    print(head)
    print("-" * len(head))
    for c in args.cores:
        for d in dims:
            for E in args.experts:
                r = config(c, d, E, args.k, args.tokens, args.repeats)
                sizes = "x".join(map(str, r["sizes"]))
                print(f"{c:>5} {d:>5} {E:>3} {sizes:>14} | {r['masked']:>10.1f} "
                      f"{r['sparse']:>10.1f} {r['padded']:>10.1f} {r['floor']:>9.1f} | "
                      f"{r['masked/sparse']:>13.2f} {E / args.k:>5.1f} | "
                      f"{r['sparse/floor']:>12.2f} {r['floor from']:>10}", flush=True)


if __name__ == "__main__":
    main()
