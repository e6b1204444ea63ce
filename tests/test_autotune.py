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
    big = einc.compile("btt", 1024)
    x = torch.randn(1024, 1024)
    before = dict(autotune.routes())
    choice = autotune.choose_route(big, x)
    assert choice in autotune.CANDIDATES
    new = {k: v for k, v in autotune.routes().items() if k not in before}
    assert list(new.values()) == [choice]  # one measurement, cached under one key
    assert autotune.choose_route(big, x) == choice
    assert all(p.grad is None for p in big.parameters())  # measuring left no gradients
