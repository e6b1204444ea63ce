"""Structured linear layers on one GPU: every einc route next to nn.Linear and naive code.

For each width d and structure it times forward, backward and forward+backward (median of
--reps timed runs after warm-up; CUDA events on a GPU) of

* nn.Linear(d, d) (the baseline of every ratio),
* the einc routes: triton (strided Triton kernels, no relayout copies), fused (planned bmm
  chain) and plain (the emitted torch code),
* two naive routes over the same factors: "einsum" (one torch.einsum per step of the
  chain, e.g. two for BTT) and "bmm+copy" (per step: transposed view -> reshape copy ->
  bmm, then permute+copy of the result),

and BTT-MoE (E experts, k per token): sparse dispatch, masked (all experts, gated) and the
rank-k BTT floor (same useful work, no routing). Routing (top-k + softmax of fixed logits)
is inside the MoE timings; the router's linear map is not, except in the "moe-layer" row:
the whole einc.BTTMoE layer (router, routing, aux loss, experts, bias) as a model runs it. Where Triton runs, a comment line
per MoE shape times the triton backend's slot moves (einc.kernels.slot_rows) against the
torch operations they replaced.

    python benchmarks/gpu.py                  # everything (< 5 min on one H100/H200)
    python benchmarks/gpu.py --quick          # a subset
    python benchmarks/gpu.py --structures     # nn.Linear and BTT-MoE only
    TRITON_INTERPRET=1 python benchmarks/gpu.py --quick --dims 64 --tokens 64   # CPU smoke

Forward is timed with autograd recording (as in training); x requires grad, so backward
computes dx and every weight gradient. TFLOP/s counts the useful FLOPs of the structure
(3x forward for forward+backward). Cells that run out of memory are reported as "oom" and
skipped. Kernel tuning: "--tune heuristic" (default) compiles one tile configuration per
problem shape, chosen from its sizes; "--tune full" uses the kernel's own autotuning
(better tiles, much longer compile time); see einc.kernels.set_tuning.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import math
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

import einc
from einc.moe import btt_dense, btt_moe_masked, btt_moe_sparse, route
from einc.moe.layer import near_square_factors
from einc.runtime.gpu import route_available

sbmm = importlib.import_module("einc.kernels.strided_bmm")

STRUCTURES = {
    "btt1": "btt(rank=1)",
    "btt4": "btt(rank=4)",
    "monarch": "monarch",
    "lowrank": "lowrank(rank={r})",  # r = d / 4
    "theta0": "(0.5|0.25|0.25|0.25|0.5|0.25|0)",
    "theta1": "(0.5|0.25|0.25|0.25|0.5|0.25|0.25)",
}
QUICK_STRUCTURES = ("btt1", "btt4", "theta0")
EINC_ROUTES = ("triton", "fused", "plain")
MOE_BACKENDS = ("grouped_mm", "padded", "triton")  # timed next to auto
NAIVE_ROUTES = ("einsum", "bmm+copy")


# ---------------------------------------------------------------------------- timing
class Timer:
    def __init__(self, device: torch.device, warmup: int, reps: int):
        self.cuda = device.type == "cuda"
        self.warmup, self.reps = warmup, reps

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def median_ms(self, fn, before=None) -> float:
        """Median of ``reps`` timed calls of ``fn`` (``before`` runs untimed each time)."""
        for _ in range(self.warmup):
            if before:
                before()
            fn()
        self.sync()
        times = []
        for _ in range(self.reps):
            if before:
                before()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                times.append((start, end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        self.sync()
        if self.cuda:
            times = [s.elapsed_time(e) for s, e in times]
        return statistics.median(times)


def measure(timer: Timer, forward, params) -> dict:
    """fwd / bwd / fwd+bwd milliseconds of ``forward()`` (returns the output)."""
    def clear():
        for p in params:
            p.grad = None

    y = forward()
    dy = torch.randn_like(y)
    out = {"fwd": timer.median_ms(forward)}

    def bwd():
        y.backward(dy, retain_graph=True)

    out["bwd"] = timer.median_ms(bwd, before=clear)
    del y

    def step():
        forward().backward(dy)

    out["f+b"] = timer.median_ms(step, before=clear)
    clear()
    return out


PROFILE_WANTED: set = set()  # (d, layer, route) cells whose f+b step gets a kernel table


def profile_step(label: str, forward, params, steps: int = 5) -> None:
    """Device time per forward+backward step of each kernel (torch.profiler), top 15."""
    from torch.profiler import ProfilerActivity, profile

    def clear():
        for p in params:
            p.grad = None

    y = forward()
    dy = torch.randn_like(y)
    del y
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            clear()
            forward().backward(dy)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    rows, ranges = [], []
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None)
        if t is None:
            t = getattr(ev, "self_cuda_time_total", 0)
        if t > 0:
            # host ranges (aten ops, autograd functions) report the device time of the
            # kernels they launched: listed apart, so the total counts each kernel once
            kernel = "CUDA" in str(getattr(ev, "device_type", "CUDA"))
            (rows if kernel else ranges).append((t / steps / 1e3, ev.count // steps, ev.key))
    rows.sort(reverse=True)
    ranges.sort(reverse=True)
    lines = [f"## profile {label}: device ms per f+b step, top kernels (total "
             f"{sum(r[0] for r in rows):.3f} ms of kernels)"]
    lines += [f"{ms:8.3f} ms  x{n:<4d} {name[:110]}" for ms, n, name in rows[:15]]
    lines += ["  by host range (the same kernels again):"]
    lines += [f"{ms:8.3f} ms  x{n:<4d} {name[:110]}" for ms, n, name in ranges[:6]]
    print("\n".join(lines) + "\n", flush=True)


def timed(timer, key, forward, params) -> dict:
    """measure(), plus a kernel profile when the cell was asked for with --profile."""
    out = measure(timer, forward, params)
    if key in PROFILE_WANTED:
        profile_step(":".join(map(str, key)), forward, params)
    return out


def failure(exc: BaseException, *cell) -> str:
    """The table entry of a cell that raised: "oom", or "error" with the reason printed."""
    if is_oom(exc):
        return "oom"
    print(f"# error in {':'.join(map(str, cell))}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    return "error"


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ---------------------------------------------------------------------------- naive routes
def naive_forward(m, x, kind: str):
    """The chain of ``m`` written the naive way over its parameters (same factors/bias)."""
    low = m.lowered
    plan = low.plan
    names = sorted(set(plan.sizes) | {plan.token}, key=str)
    letter = {i: chr(ord("a") + k) if k < 26 else chr(ord("A") + k - 26) for k, i in enumerate(names)}
    n = x.shape[0]
    sizes = dict(plan.sizes, **{plan.token: n})
    z = x
    if low.padded_in > low.d_in:
        z = nn.functional.pad(z, (0, low.padded_in - low.d_in))
    cur, idx = z.reshape(n, *low.input_sizes), plan.input_order
    facs = m.factors()
    for st in plan.steps:
        f = facs[st.factor]
        f_idx = m.structure.factors[st.factor].indices
        out_idx = st.batch + st.left + st.right
        if kind == "einsum":
            eq = "".join(letter[i] for i in idx) + "," + "".join(letter[i] for i in f_idx) + \
                "->" + "".join(letter[i] for i in out_idx)
            cur = torch.einsum(eq, cur, f)
        else:  # transposed view -> reshape (a copy unless it is a view) -> bmm
            prod = lambda g: math.prod(sizes[i] for i in g)
            left = cur.permute([idx.index(i) for i in st.batch + st.left + st.contracted])
            left = left.reshape(prod(st.batch), prod(st.left), prod(st.contracted))
            right = f.permute([f_idx.index(i) for i in st.batch + st.contracted + st.right])
            right = right.reshape(prod(st.batch), prod(st.contracted), prod(st.right))
            cur = torch.bmm(left, right).view([sizes[i] for i in out_idx])
        idx = out_idx
    y = cur.permute([idx.index(i) for i in plan.output_order]).reshape(n, low.padded_out)
    y = y[:, :low.d_out]
    return y + m.bias if m.bias is not None else y


# ---------------------------------------------------------------------------- cells
def spec_for(name: str, d: int) -> str:
    return STRUCTURES[name].format(r=max(1, d // 4))


def linear_cell(timer, d, tokens, dtype, device):
    lin = nn.Linear(d, d, device=device, dtype=dtype)
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    return measure(timer, lambda: lin(x), [x, *lin.parameters()])


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().double(), ref.detach().double()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def structure_cells(timer, name, d, tokens, dtype, device, routes):
    m = einc.compile(spec_for(name, d), d, dtype=dtype).to(device)
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    params = [x, *m.parameters()]
    flops = m.lowered.flops
    # reference: one torch.einsum per step over float32 copies of the same factors
    with torch.no_grad():
        ref = naive_forward(copy.deepcopy(m).float(), x.float(), "einsum")
    for route in routes:
        try:
            if route in NAIVE_ROUTES:
                fwd = lambda r=route: naive_forward(m, x, r)  # noqa: E731
            else:
                m.route = route
                fwd = lambda: m(x)  # noqa: E731
            with torch.no_grad():
                err = rel_err(fwd(), ref)
            yield route, flops, timed(timer, (d, name, route), fwd, params), err
        except Exception as exc:  # noqa: BLE001 - report and go on
            yield route, flops, failure(exc, d, name, route), None
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()


def moe_cells(timer, d, E, k, tokens, dtype, device, seed=0):
    g, a = near_square_factors(d)
    f, e = near_square_factors(d)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(device, dtype)  # noqa: E731
    x = rnd(tokens, g, a).requires_grad_()
    A = rnd(g, a, f, E, scale=a ** -0.5).requires_grad_()
    B = rnd(f, g, E, e, scale=(k / g) ** 0.5).requires_grad_()
    W = rnd(E, g * a, scale=(g * a) ** -0.5)
    logits = (x.detach().reshape(tokens, g * a) @ W.t()).requires_grad_()
    Ak = rnd(g, a, f, k, scale=a ** -0.5).requires_grad_()
    Bk = rnd(f, g, k, e, scale=g ** -0.5).requires_grad_()
    flops = 2 * k * (g * a * f + f * g * e)  # useful forward FLOPs per token

    def sparse(backend="auto"):
        idx, gate = route(logits, k)
        return btt_moe_sparse(x, A, B, idx, gate, backend=backend, validate=False)

    def masked():
        idx, gate = route(logits, k)
        return btt_moe_masked(x, A, B, idx, gate, validate=False)

    # the floors: a rank-k BTT with two bmm calls, and einc's own btt(rank=k) layer
    layer = einc.compile(f"btt(rank={k})", g * a, f * e, dtype=dtype).to(device)
    layer.route = "triton" if route_available(x) else "fused"
    xf = x.detach().reshape(tokens, g * a).requires_grad_()
    # the whole layer as a model uses it: router, routing, aux loss, experts, bias
    moe = einc.BTTMoE(g * a, f * e, experts=E, k=k, device=device, dtype=dtype)
    with torch.no_grad():
        moe.router.weight.normal_(0, (g * a) ** -0.5)
    cands = {
        "moe-sparse": (sparse, [x, A, B, logits]),  # the auto backend
        **{f"moe-{b}": (lambda b=b: sparse(b), [x, A, B, logits]) for b in MOE_BACKENDS},
        "moe-masked": (masked, [x, A, B, logits]),
        "rank-k floor": (lambda: btt_dense(x, Ak, Bk), [x, Ak, Bk]),
        "einc floor": (lambda: layer(xf), [xf, *layer.parameters()]),
        "moe-layer": (lambda: moe(xf), [xf, *moe.parameters()]),
    }
    with torch.no_grad():  # reference: the masked route over float32 copies
        idx, gate = route(logits, k)
        ref = btt_moe_masked(x.float(), A.float(), B.float(), idx, gate.float())
    for name, (fn, params) in cands.items():
        try:
            with torch.no_grad():
                err = None if name.endswith(("floor", "layer")) else rel_err(fn(), ref)
            yield name, flops, timed(timer, (d, f"bttmoe(E={E},k={k})", name), fn, params), err
        except Exception as exc:  # noqa: BLE001 - report and go on
            yield name, flops, failure(exc, d, f"bttmoe(E={E},k={k})", name), None
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()


def auto_line(d, E, k) -> str:
    """What the measured ``auto`` backend chose for this layer shape (per token bucket,
    training and inference apart): one comment line."""
    from einc.moe import dispatch

    g, a = near_square_factors(d)
    f, e = near_square_factors(d)
    picks = [f"{'train' if key[9] else 'infer'} {key[8]} tokens: {name}"
             for key, name in dispatch._AUTO.items() if key[:6] == (g, a, f, e, E, k)]
    return f"# auto d={d} E={E} k={k} chose " + ("; ".join(picks) or "nothing measured")


def slot_move_line(timer, d, E, k, tokens, dtype, device) -> str:
    """Forward+backward ms of the triton backend's two slot moves (token rows into the
    padded slots, and a token's gated slot rows back), on the Triton kernels and on the
    torch operations they replaced, at this layer's routing: one comment line."""
    from einc.kernels.slot_rows import combine_slots, dispatch_slots
    from einc.moe.dispatch import _padded_plan

    gen = torch.Generator(device="cpu").manual_seed(1)
    logits = torch.randn(tokens, E, generator=gen).to(device)
    idx, gate = route(logits, k)
    C, slot_row, row_slot = _padded_plan(idx, E)
    slot_row = slot_row.view(tokens, k)
    x = torch.randn(tokens, d, generator=gen).to(device, dtype).requires_grad_()
    gate = gate.to(dtype).requires_grad_()
    ms = {}
    for kernel in ("auto", "torch"):
        def moves(kernel=kernel):  # the slot rows stand in for the experts' outputs
            rows = dispatch_slots(x, slot_row, row_slot, kernel)
            return combine_slots(rows, slot_row, row_slot, gate, kernel)
        ms[kernel] = measure(timer, moves, [x, gate])["f+b"]
    return (f"# slot moves d={d} E={E} k={k} ({E * C} padded rows): f+b {ms['auto']:.3f} ms "
            f"on the kernels, {ms['torch']:.3f} ms on torch operations "
            f"({ms['torch'] / ms['auto']:.2f}x)")


# ---------------------------------------------------------------------------- report
def fmt_row(cells):
    return " | ".join(cells)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a subset: d<=4096, 3 structures, E=8")
    ap.add_argument("--dims", type=int, nargs="+", default=None)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) | float32 (CPU)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--structures", nargs="*", default=None, choices=tuple(STRUCTURES),
                    metavar="NAME", help=f"structures to time, of {', '.join(STRUCTURES)} "
                    "(the flag alone: none, BTT-MoE only)")
    ap.add_argument("--experts", type=int, nargs="+", default=None)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--tune", choices=("heuristic", "full"), default="heuristic")
    ap.add_argument("--budget", type=float, default=280.0,
                    help="seconds; cells left when it is spent are skipped")
    ap.add_argument("--profile", nargs="+", default=[], metavar="D:LAYER:ROUTE",
                    help="print a kernel table of these cells' f+b step, e.g. 4096:btt1:triton "
                         "or '4096:bttmoe(E=8,k=2):moe-sparse'")
    args = ap.parse_args(argv)
    for item in args.profile:
        d_s, _, rest = item.partition(":")
        layer, _, route_name = rest.rpartition(":")
        if not (d_s.isdigit() and layer and route_name):
            ap.error(f"--profile takes D:LAYER:ROUTE, got {item!r}")
        PROFILE_WANTED.add((int(d_s), layer, route_name))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    dims = args.dims or ([1024, 4096] if args.quick else [1024, 4096, 16384])
    names = tuple(args.structures) if args.structures is not None else \
        QUICK_STRUCTURES if args.quick else tuple(STRUCTURES)
    experts = args.experts or ([8] if args.quick else [8, 16])
    reps = min(args.reps, 10) if args.quick else args.reps
    timer = Timer(device, args.warmup, reps)
    triton_ok = route_available(torch.empty(0, device=device))
    sbmm.set_tuning(args.tune)
    routes = (EINC_ROUTES if triton_ok else EINC_ROUTES[1:]) + NAIVE_ROUTES

    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()})" + \
        (", Triton interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "")
    print(f"# einc GPU benchmark  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# card: {card}; torch {torch.__version__}; triton {tv}; dtype {str(dtype)[6:]}; "
          f"tokens {args.tokens}; median of {reps} after {args.warmup} warm-up; tune {args.tune}")
    if not triton_ok:
        print("# triton route unavailable here (no triton, or CPU without TRITON_INTERPRET=1)")
    header = ["d", "layer", "flop ratio", "route", "fwd ms", "bwd ms", "f+b ms", "TFLOP/s",
              "x Linear f+b", "rel err"]
    print(fmt_row(header))
    print(fmt_row(["---"] * len(header)))

    t_start = time.perf_counter()
    results = {}  # (d, layer, route) -> (dict | str, flops)
    skipped = 0

    def emit(d, layer, route, flops, t, base, err=None):
        results[d, layer, route] = (t, flops)
        ratio = f"{2 * d * d / flops:.1f}"
        if isinstance(t, str):
            print(fmt_row([str(d), layer, ratio, route, t, t, t, "-", "-", "-"]))
            return
        tflops = 3 * args.tokens * flops / (t["f+b"] * 1e-3) / 1e12
        speed = f"{base['f+b'] / t['f+b']:.2f}x" if isinstance(base, dict) else "-"
        print(fmt_row([str(d), layer, ratio, route, f"{t['fwd']:.3f}", f"{t['bwd']:.3f}",
                       f"{t['f+b']:.3f}", f"{tflops:.3g}", speed,
                       "-" if err is None else f"{err:.1e}"]), flush=True)

    def over_budget():
        return time.perf_counter() - t_start > args.budget

    for d in dims:
        if over_budget():
            skipped += 1
            continue
        try:
            base = linear_cell(timer, d, args.tokens, dtype, device)
        except Exception as exc:  # noqa: BLE001
            if not is_oom(exc):
                raise
            base = "oom"
        emit(d, "nn.Linear", "dense", 2 * d * d, base, base)
        for name in names:
            if over_budget():
                skipped += 1
                continue
            for route, flops, t, err in structure_cells(timer, name, d, args.tokens, dtype, device,
                                                        routes):
                emit(d, name, route, flops, t, base, err)
        for E in experts:
            if over_budget():
                skipped += 1
                continue
            for route, flops, t, err in moe_cells(timer, d, E, args.k, args.tokens, dtype, device):
                emit(d, f"bttmoe(E={E},k={args.k})", route, flops, t, base, err)
            print(auto_line(d, E, args.k), flush=True)
            if route_available(torch.empty(0, device=device, dtype=dtype)):
                try:
                    print(slot_move_line(timer, d, E, args.k, args.tokens, dtype, device),
                          flush=True)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    failure(exc, d, f"bttmoe(E={E},k={args.k})", "slot moves")
    elapsed = time.perf_counter() - t_start
    if skipped:
        print(f"# {skipped} group(s) of cells skipped: time budget of {args.budget:.0f} s spent")

    # -- targets
    def best(d, layer):
        ts = [(results[d, layer, r][0]["f+b"], r) for r in EINC_ROUTES
              if isinstance(results.get((d, layer, r), (None,))[0], dict)]
        return min(ts) if ts else None

    def speedup(d, layer):
        lin, b = results.get((d, "nn.Linear", "dense"), (None,))[0], best(d, layer)
        if not isinstance(lin, dict) or b is None:
            return None
        return lin["f+b"] / b[0], b[1]

    def verdict(ok):
        return "n/a " if ok is None else ("PASS" if ok else "FAIL")

    print("\n# targets (forward+backward, best einc route)")
    for d, need in ((4096, 4.0), (1024, 1.5)):
        s = speedup(d, "btt1")
        print(f"{verdict(None if s is None else s[0] >= need)}  BTT rank 1, d={d}: >= {need}x "
              f"faster than nn.Linear" + ("" if s is None else f" (got {s[0]:.2f}x, {s[1]})"))
    for d in dims:
        if d < 4096:
            continue
        for name in names:
            key = next(((dd, n, r) for (dd, n, r) in results if dd == d and n == name), None)
            if key is None:
                continue
            ratio = 2 * d * d / results[key][1]
            if ratio < 8:
                continue
            s = speedup(d, name)
            print(f"{verdict(None if s is None else s[0] > 1)}  {name}, d={d} (FLOP ratio "
                  f"{ratio:.1f}): faster than nn.Linear" +
                  ("" if s is None else f" (got {s[0]:.2f}x, {s[1]})"))
    for d in dims:
        for E in experts:
            layer = f"bttmoe(E={E},k={args.k})"
            sp = results.get((d, layer, "moe-sparse"), (None,))[0]
            floors = [results.get((d, layer, f), (None,))[0] for f in ("rank-k floor", "einc floor")]
            floors = [f for f in floors if isinstance(f, dict)]
            fl = min(floors, key=lambda f: f["f+b"]) if floors else None
            if sp is None and fl is None:
                continue
            ok = None if not (isinstance(sp, dict) and isinstance(fl, dict)) else \
                sp["f+b"] <= 1.3 * fl["f+b"]
            got = "" if ok is None else f" (got {sp['f+b'] / fl['f+b']:.2f}x)"
            print(f"{verdict(ok)}  BTT-MoE E={E} k={args.k}, d={d}: sparse within 1.3x of "
                  f"the rank-k floor{got}")
    print(f"# total {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
