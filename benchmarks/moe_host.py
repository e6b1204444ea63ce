"""Where a BTT-MoE training step spends its host time.

On a fast GPU a small BTT-MoE step waits on the host (Python, autograd and launches)
rather than on its kernels. For each backend this script runs training steps back to back,
as a training loop does (no synchronisation between steps), and prints per step:

* ``step ms``: wall time per step over the whole run (what a training loop gets);
* ``fwd host`` / ``bwd host``: time until the forward / the backward call returned to
  Python (on a GPU: launching, plus waiting where a host sync sits, e.g. the capacity of
  the padded layouts);
* ``kernels ms``: summed device time of the step's kernels (torch.profiler, CUDA only);
* ``launches``: kernels per step (CUDA only).

Then the Python functions with the most time of their own (cProfile) for the backends
named by ``--functions``, in microseconds per step.

    python benchmarks/moe_host.py                         # d = 1024 and 4096, E = 8
    python benchmarks/moe_host.py --dims 64 --tokens 256  # a CPU smoke run
"""
from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import pstats
import sys
import time

import torch

from _timing import header

import einc
from einc.moe import btt_moe_masked, btt_moe_sparse, route
from einc.moe.layer import near_square_factors

dispatch = importlib.import_module("einc.moe.dispatch")

BACKENDS = ("triton", "padded", "grouped_mm", "masked", "auto", "layer")


def problem(d: int, E: int, k: int, tokens: int, dtype, device):
    g, a = near_square_factors(d)
    f, e = near_square_factors(d)
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(device, dtype)  # noqa: E731
    x = rnd(tokens, g * a).requires_grad_()
    A = rnd(g, a, f, E, scale=a ** -0.5).requires_grad_()
    B = rnd(f, g, E, e, scale=(k / g) ** 0.5).requires_grad_()
    router = torch.nn.Linear(g * a, E, device=device, dtype=dtype)
    layer = einc.BTTMoE(g * a, f * e, experts=E, k=k, device=device, dtype=dtype)
    with torch.no_grad():
        layer.router.weight.normal_(0, (g * a) ** -0.5)
    return x, A, B, router, layer


def step_fn(name: str, x, A, B, router, layer, k: int):
    """One training step's forward (returns what its backward takes) for this backend; the
    layer's output comes with its aux loss, which a training loss includes."""
    if name == "layer":
        return lambda: (layer(x), layer.aux_loss)

    def forward():
        idx, gate = route(router(x), k)
        xs = x.view(x.shape[0], A.shape[0], A.shape[1])
        if name == "masked":
            return btt_moe_masked(xs, A, B, idx, gate, validate=False)
        return btt_moe_sparse(xs, A, B, idx, gate, backend=name, validate=False)
    return forward


def backward(out, dy) -> None:
    if isinstance(out, tuple):  # (output, aux loss)
        torch.autograd.backward(list(out), [dy.view_as(out[0]), torch.ones_like(out[1])])
    else:
        out.backward(dy.view_as(out))


def run_steps(forward, dy, steps: int, cuda: bool):
    """Back-to-back steps; returns (wall ms per step, fwd host ms, bwd host ms)."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fwd = bwd = 0.0
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        t1 = time.perf_counter()
        y = forward()
        t2 = time.perf_counter()
        backward(y, dy)
        t3 = time.perf_counter()
        fwd, bwd = fwd + t2 - t1, bwd + t3 - t2
    sync()
    wall = time.perf_counter() - t0
    return 1e3 * wall / steps, 1e3 * fwd / steps, 1e3 * bwd / steps


def kernel_time(forward, dy, steps: int):
    """(device ms of kernels per step, kernels per step) from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            backward(forward(), dy)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in kernels) / 1e3 / steps, len(kernels) / steps


def hot_functions(forward, dy, steps: int, top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        backward(forward(), dy)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # by own time
    lines = []
    for (file, line, fn), (_, calls, own, total, _) in rows:
        where = fn if file == "~" else f"{file.rsplit('/', 2)[-2:][-1]}:{line}({fn})"
        lines.append(f"  {1e6 * own / steps:8.1f} us own  {1e6 * total / steps:8.1f} us total  "
                     f"{calls / steps:5.1f} calls  {where}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--experts", type=int, nargs="+", default=[8])
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--functions", nargs="*", default=["triton", "layer"], choices=BACKENDS,
                   help="backends whose hottest Python functions are listed")
    p.add_argument("--top", type=int, default=18)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype) if cuda else torch.float32
    print(header("BTT-MoE host time per training step"))
    print(f"# tokens {args.tokens}, k = {args.k}, {dtype}, {args.steps} steps back to back "
          f"after warm-up")
    print("d | E | backend | step ms | fwd host ms | bwd host ms | kernels ms | launches")
    print("--- | --- | --- | --- | --- | --- | --- | ---")
    listings = []
    for d in args.dims:
        for E in args.experts:
            x, A, B, router, layer = problem(d, E, args.k, args.tokens, dtype, device)
            dy = torch.randn(args.tokens, layer.out_features, device=device, dtype=dtype)
            for name in args.backends:
                forward = step_fn(name, x, A, B, router, layer, args.k)
                try:
                    for _ in range(3):  # warm-up: kernels compiled, auto measured
                        backward(forward(), dy)
                except Exception as exc:  # noqa: BLE001 - a backend this setup lacks
                    print(f"{d} | {E} | {name} | failed: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:80]} | | | |")
                    continue
                g = dy
                wall, fh, bh = run_steps(forward, g, args.steps, cuda)
                kt, nk = kernel_time(forward, g, min(args.steps, 10)) if cuda else (None, None)
                chosen = ""
                if name == "auto" and cuda:
                    picks = [v for key, v in dispatch._AUTO.items() if key[:6] ==
                             (A.shape[0], A.shape[1], A.shape[2], B.shape[3], E, args.k)]
                    chosen = f" ({', '.join(sorted(set(picks)))})"
                print(f"{d} | {E} | {name}{chosen} | {wall:.3f} | {fh:.3f} | {bh:.3f} | "
                      + (f"{kt:.3f} | {nk:.0f}" if cuda else "- | -"), flush=True)
                if name in args.functions:
                    listings.append((f"## d={d} E={E} {name}: hottest Python functions, per step",
                                     hot_functions(forward, g, min(args.steps, 10), args.top)))
    for title, body in listings:
        print(f"\n{title}\n{body}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
