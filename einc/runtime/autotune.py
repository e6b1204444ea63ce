"""Route selection by measurement, cached per (structure, sizes, dtype, device, tokens).

Small problems skip the measurement (the fused route: planned layouts, no copies); larger
ones time forward+backward of each route once on the real device and keep the fastest.
"""
from __future__ import annotations

import copy
import time

import torch

_CACHE: dict = {}
#: below this many multiply-adds per call, measuring costs more than it can save
MEASURE_ABOVE = 1 << 24
#: the most tokens a measurement runs: a route's rank can change between 1024 and 2048
#: tokens (chunking, cache fit), so measure at the call's own bucket up to here
MEASURE_TOKENS = 4096
CANDIDATES = ("fused", "plain", "einsum", "steps")


def candidates(x: torch.Tensor) -> tuple[str, ...]:
    """Routes worth measuring for ``x``: the Triton route only for CUDA inputs with triton."""
    if x.is_cuda:
        from .gpu import route_available
        if route_available(x):
            return CANDIDATES + ("triton",)
    return CANDIDATES


def _bucket(tokens: int) -> int:
    return 1 << max(0, (tokens - 1).bit_length())


def choose_route(module, x: torch.Tensor) -> str:
    tokens = x.numel() // max(1, module.in_features)
    low = module.lowered
    # under torch.use_deterministic_algorithms(True) a measured choice would make the
    # route, and so the bits, differ between runs; the fused route is deterministic
    if tokens * low.flops < MEASURE_ABOVE or torch.are_deterministic_algorithms_enabled():
        return "fused"
    train = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    key = (low.key, x.dtype, x.device.type, _bucket(tokens), train)
    if key not in _CACHE:
        tokens = min(_bucket(tokens), MEASURE_TOKENS)
        _CACHE[key] = _measure(module, x.dtype, x.device, tokens, train)
    return _CACHE[key]


def _measure(module, dtype, device, tokens: int, train: bool, reps: int = 5) -> str:
    """Time forward+backward (training) or forward alone (inference) of every route: best
    of ``reps``, taken round-robin so a noisy moment hits every route alike.

    The timing runs on a copy of the module through ``forward`` itself, so the caller's
    gradients, hooks, route and random stream are untouched (the measurement may happen in
    the middle of gradient accumulation, under activation checkpointing, or in two threads
    at once)."""
    # own parameters, no gradients, no tensor hooks; a factor computed from others
    # (functional_call with fast weights, a parametrization) is not a leaf, which deepcopy
    # refuses: the copy takes its values
    memo = {id(t): t.detach().clone().requires_grad_(t.requires_grad)
            for t in module.parameters() if not t.is_leaf}
    # nor module hooks: the timing calls forward directly, and a hook may hold anything (a
    # lock deepcopy refuses, or a whole model through a bound method)
    for m in module.modules():
        for name, value in vars(m).items():
            if "hooks" in name and isinstance(value, dict):
                memo[id(value)] = type(value)()
    twin = copy.deepcopy(module, memo)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        x = torch.randn(tokens, module.in_features, dtype=dtype, device=device,
                        requires_grad=train)
        step = (lambda: twin.forward(x).sum().backward()) if train else (lambda: twin.forward(x))
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        routes = candidates(x)
        times = dict.fromkeys(routes, float("inf"))
        for rnd in range(reps + 1):
            for route in routes:
                twin.route = route
                t0 = time.perf_counter()
                step()
                sync()
                if rnd:  # round 0 warms up
                    times[route] = min(times[route], time.perf_counter() - t0)
    return pick(times)


#: a route must beat the fused route by more than this to be chosen: timings on a shared
#: machine vary by a few percent, and the fused route also uses the least memory
MARGIN = 0.05


def pick(times: dict) -> str:
    """The fastest route, keeping "fused" unless another is clearly faster."""
    best = min(times, key=times.get)
    if "fused" in times and times["fused"] <= (1 + MARGIN) * times[best]:
        return "fused"
    return best


def routes() -> dict:
    """The cached choices (for inspection and benchmarks)."""
    return dict(_CACHE)
