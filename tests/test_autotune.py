"""Route selection: the measured choice, its cache, and the margin that keeps "fused"."""
import torch

import einc
from einc.runtime import autotune


def test_pick_keeps_fused_within_the_margin():
    assert autotune.pick({"fused": 1.04, "plain": 1.0, "einsum": 2.0}) == "fused"
    assert autotune.pick({"fused": 1.2, "plain": 1.0, "einsum": 2.0}) == "plain"
    assert autotune.pick({"plain": 1.0, "einsum": 0.5}) == "einsum"


def test_small_problems_skip_measuring_and_large_ones_are_cached():
    m = einc.compile("btt", 64)
    assert autotune.choose_route(m, torch.randn(4, 64)) == "fused"
    big = einc.compile("btt", 256)
    x = torch.randn(1024, 256)
    assert 1024 * big.lowered.flops >= autotune.MEASURE_ABOVE  # large enough to measure
    before = dict(autotune.routes())
    choice = autotune.choose_route(big, x)
    assert choice in autotune.CANDIDATES
    new = {k: v for k, v in autotune.routes().items() if k not in before}
    assert list(new.values()) == [choice]  # one measurement, cached under one key
    assert autotune.choose_route(big, x) == choice
    assert all(p.grad is None for p in big.parameters())  # measuring left no gradients


def _measuring(monkeypatch):
    autotune._CACHE.clear()
    monkeypatch.setattr(autotune, "MEASURE_ABOVE", 0)  # measure even a small layer


def test_measuring_keeps_accumulated_gradients_hooks_and_rng(monkeypatch):
    _measuring(monkeypatch)
    m = einc.compile("btt(rank=2)", 64, dtype=torch.float64)
    x1, x2 = torch.randn(8, 64, dtype=torch.float64), torch.randn(40, 64, dtype=torch.float64)
    calls = []
    for p in m.parameters():
        p.register_hook(lambda g: calls.append(1))
    m(x1).sum().backward()          # measures once (bucket 8)
    n_hooks = len(calls)
    assert n_hooks == len(list(m.parameters()))  # one call per parameter: the user's pass
    torch.manual_seed(5)
    m(x2).sum().backward()          # measures again (bucket 64), mid-accumulation
    after = torch.rand(1)
    assert len(calls) == 2 * n_hooks  # only the user's two backward passes ran the hooks
    torch.manual_seed(5)
    assert torch.equal(torch.rand(1), after)  # the measurement drew nothing from the stream
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.route = "einsum"
    (m(x1).sum() + m(x2).sum()).backward()
    for a, p in zip(grads, m.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-10, atol=1e-10)


def test_measuring_under_activation_checkpointing(monkeypatch):
    from torch.utils.checkpoint import checkpoint
    _measuring(monkeypatch)
    m = einc.compile("btt(rank=2)", 64, dtype=torch.float64)
    x = torch.randn(16, 64, dtype=torch.float64, requires_grad=True)
    checkpoint(m, x, use_reentrant=False).sum().backward()
    got = x.grad.clone()
    x.grad = None
    m.route = "einsum"
    m(x).sum().backward()
    assert torch.allclose(got, x.grad, rtol=1e-10, atol=1e-10)


def test_measuring_with_computed_factors(monkeypatch):
    """functional_call with fast weights (MAML) or a parametrization hands the layer
    factors that are not leaves, which copy.deepcopy of the module refused."""
    _measuring(monkeypatch)
    m = einc.compile("btt(rank=2)", 64, dtype=torch.float64)
    fast = {n: p * 2.0 for n, p in m.named_parameters()}
    x = torch.randn(16, 64, dtype=torch.float64)
    y = torch.func.functional_call(m, fast, (x,))
    y.sum().backward()
    m.route = "einsum"
    want = torch.func.functional_call(m, {n: p.detach() * 2.0 for n, p in m.named_parameters()},
                                      (x,))
    torch.testing.assert_close(y, want)
    assert all(p.grad is not None for p in m.parameters())  # through the fast weights


def test_deterministic_algorithms_skip_measuring(monkeypatch):
    """A measured route can differ between runs, and so the gradients' bits:
    torch.use_deterministic_algorithms(True) keeps the fused route."""
    _measuring(monkeypatch)
    m = einc.compile("btt(rank=2)", 64)
    monkeypatch.setattr(autotune, "_measure", lambda *a, **k: 1 / 0)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert autotune.choose_route(m, torch.randn(16, 64)) == "fused"
    finally:
        torch.use_deterministic_algorithms(before)


def test_measuring_copies_no_module_hooks(monkeypatch):
    """The timing copy deep-copied the layer's forward hooks: one holding a lock failed the
    user's first large forward with a TypeError, one bound to a model copied that model."""
    import functools
    import threading

    _measuring(monkeypatch)
    m = einc.compile("btt(rank=2)", 64, dtype=torch.float64)
    seen = []
    m.register_forward_hook(functools.partial(lambda lock, mod, i, o: seen.append(1),
                                              threading.Lock()))
    m.register_forward_pre_hook(functools.partial(lambda lock, mod, i: None, threading.Lock()))
    x = torch.randn(8, 64, dtype=torch.float64)
    y = m(x)
    assert seen == [1]  # the user's call ran the hook once; the timing never did
    m.route = "einsum"
    torch.testing.assert_close(y, m(x))
