"""Tests for the BTT mixture-of-experts layer and its sparse dispatch."""

import copy
import io
import math

import numpy as np
import pytest

import einc
import torch
from torch import nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, grad

from einc.moe.chunked import btt_moe_chunked
from einc.moe.dispatch import _sparse_triton
from einc.moe import (
    BTTMoE,
    btt_dense,
    btt_moe_masked,
    btt_moe_sparse,
    dense_gates,
    grouped_mm_available,
    moe_aux_loss,
    near_square_factors,
    route,
)

DT = torch.float64
GMM = grouped_mm_available(torch.device("cpu"), torch.float32)


def plain_reference(x, A, B, expert_idx, gate):
    """Independent per-token loop: sum over selected experts of gate * rank-1 BTT."""
    out = []
    for n in range(x.shape[0]):
        acc = torch.zeros(A.shape[2], B.shape[3], dtype=x.dtype)
        for j in range(expert_idx.shape[1]):
            r = int(expert_idx[n, j])
            acc = acc + gate[n, j] * torch.einsum("ga,gaf,fge->fe", x[n], A[..., r], B[:, :, r, :])
        out.append(acc)
    if not out:
        return torch.zeros(0, A.shape[2], B.shape[3], dtype=x.dtype)
    return torch.stack(out)


def make_problem(N, g, a, f, e, E, k, seed=0, dtype=DT):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, g, a, generator=gen, dtype=dtype).requires_grad_()
    A = torch.randn(g, a, f, E, generator=gen, dtype=dtype).requires_grad_()
    B = torch.randn(f, g, E, e, generator=gen, dtype=dtype).requires_grad_()
    W = torch.randn(E, g * a, generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(E, generator=gen, dtype=dtype).requires_grad_()
    return x, A, B, W, b


def forward_and_grads(fn, x, A, B, W, b, k, logits_fn=None, seed=1):
    N = x.shape[0]
    if logits_fn is None:
        logits = x.reshape(N, W.shape[1]) @ W.t() + b
    else:
        logits = logits_fn(x, W, b)
    idx, gate = route(logits, k)
    out = fn(x, A, B, idx, gate)
    gen = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    grads = torch.autograd.grad(out, (x, A, B, W, b), go, allow_unused=True)
    return out, grads, idx, gate


SPARSE_VARIANTS = {
    "strided": lambda *t: btt_moe_sparse(*t, backend="strided"),
    "strided-det": lambda *t: btt_moe_sparse(*t, backend="strided", deterministic=True),
    "padded": lambda *t: btt_moe_sparse(*t, backend="padded"),
    # the layouts of the triton backend over torch matmuls (the kernel is tested below)
    "triton": lambda x, A, B, i, g: _sparse_triton(x, A, B, i, g.to(x.dtype), kernel="torch"),
    "chunked": lambda *t: btt_moe_sparse(*t, backend="chunked"),
    "chunked-2": lambda *t: btt_moe_chunked(*t, chunk=2),  # several chunks per expert
    "auto": lambda *t: btt_moe_sparse(*t),
}


def assert_same(masked, sparse, tol=1e-10):
    (om, gm), (os_, gs) = masked, sparse
    assert os_.shape == om.shape
    torch.testing.assert_close(os_, om, rtol=tol, atol=tol)
    for name, u, v in zip("x A B W b".split(), gm, gs):
        if u is None:
            assert v is None or v.abs().max() == 0, name
            continue
        assert v is not None, name
        torch.testing.assert_close(v, u, rtol=tol, atol=tol, msg=f"grad {name}")


def check_equal(N, g, a, f, e, E, k, seed=0, logits_fn=None):
    x, A, B, W, b = make_problem(N, g, a, f, e, E, k, seed)
    om, gm, idx, gate = forward_and_grads(btt_moe_masked, x, A, B, W, b, k, logits_fn)
    for name, fn in SPARSE_VARIANTS.items():
        os_, gs, _, _ = forward_and_grads(fn, x, A, B, W, b, k, logits_fn)
        assert_same((om, gm), (os_, gs))
    return om, idx, gate, (x, A, B)


# ---------------------------------------------------------------------------
# sparse == masked, float64, forward and every gradient
# ---------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    N=st.integers(0, 12),
    g=st.integers(1, 4),
    a=st.integers(1, 4),
    f=st.integers(1, 4),
    e=st.integers(1, 4),
    E=st.integers(1, 6),
    kf=st.floats(0, 1),
    seed=st.integers(0, 10_000),
)
def test_sparse_matches_masked_random(N, g, a, f, e, E, kf, seed):
    k = 1 + int(kf * (E - 1) + 0.5)
    check_equal(N, g, a, f, e, E, k, seed)


@pytest.mark.parametrize(
    "N,g,a,f,e,E,k",
    [
        (9, 3, 5, 4, 2, 5, 2),  # generic, non-square
        (1, 2, 3, 4, 5, 4, 2),  # one token
        (0, 2, 3, 4, 5, 4, 2),  # empty batch
        (7, 2, 2, 3, 3, 4, 4),  # k = E
        (6, 3, 2, 2, 3, 1, 1),  # a single expert
        (20, 4, 4, 4, 4, 8, 1),  # top-1
    ],
)
def test_sparse_matches_masked_cases(N, g, a, f, e, E, k):
    om, idx, gate, (x, A, B) = check_equal(N, g, a, f, e, E, k)
    ref = plain_reference(x.detach(), A.detach(), B.detach(), idx, gate.detach())
    torch.testing.assert_close(om.detach(), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("N,E,k", [(9, 5, 2), (1, 4, 2), (20, 8, 1), (7, 4, 4)])
def test_triton_backend_through_the_strided_kernel(N, E, k):
    """backend="triton" on the strided kernel (the Triton interpreter on a CPU)."""
    from einc.kernels import triton_available

    if not triton_available():
        pytest.skip("the strided kernel cannot run here (no triton, or no interpreter)")
    x, A, B, W, b = make_problem(N, 3, 4, 5, 2, E, k, seed=N)
    masked = forward_and_grads(btt_moe_masked, x, A, B, W, b, k)[:2]
    fn = lambda *t: btt_moe_sparse(*t, backend="triton")  # noqa: E731
    first = forward_and_grads(fn, x, A, B, W, b, k)[:2]
    assert_same(masked, first)
    again = forward_and_grads(fn, x, A, B, W, b, k)[:2]  # no atomics: bitwise repeatable
    for u, v in zip([first[0], *first[1]], [again[0], *again[1]]):
        assert (u is None and v is None) or torch.equal(u, v)


def test_expert_without_tokens_and_all_on_one_expert():
    E = 5

    def skewed(x, W, b):  # expert 3 always wins, expert 1 second, 0/2/4 never used
        lg = (x.reshape(x.shape[0], W.shape[1]) @ W.t() + b) * 1e-3
        return lg + torch.tensor([0.0, 5.0, -1.0, 10.0, -2.0], dtype=lg.dtype)

    _, idx, _, _ = check_equal(11, 3, 2, 2, 3, E, 2, logits_fn=skewed)
    assert set(idx.reshape(-1).tolist()) == {1, 3}
    _, idx, _, _ = check_equal(11, 3, 2, 2, 3, E, 1, logits_fn=skewed)
    assert set(idx.reshape(-1).tolist()) == {3}


def test_masked_matches_plain_reference_random():
    x, A, B, W, b = make_problem(13, 3, 4, 5, 2, 6, 3, seed=5)
    idx, gate = route(x.reshape(13, -1) @ W.t() + b, 3)
    with torch.no_grad():
        ref = plain_reference(x, A, B, idx, gate)
        torch.testing.assert_close(btt_moe_masked(x, A, B, idx, gate), ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(btt_moe_sparse(x, A, B, idx, gate), ref, rtol=1e-10, atol=1e-10)


def test_dense_btt_is_einsum():
    x, A, B, _, _ = make_problem(5, 3, 4, 2, 3, 2, 1, seed=3)
    ref = torch.einsum("nga,gafr,fgre->nfe", x, A, B)
    torch.testing.assert_close(btt_dense(x, A, B), ref)
    torch.testing.assert_close(btt_dense(x, A, B, method="strided"), ref)
    assert torch.autograd.gradcheck(lambda *t: btt_dense(*t, method="strided"), (x, A, B))


@pytest.mark.skipif(not GMM, reason="grouped_mm not available for float32 on this CPU build")
@pytest.mark.parametrize("N,E,k", [(37, 6, 2), (1, 4, 4), (0, 4, 2), (25, 3, 1)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_grouped_mm_backend_float32(N, E, k, deterministic):
    g, a, f, e = 4, 8, 12, 4  # 16-byte aligned strides
    x, A, B, W, b = make_problem(N, g, a, f, e, E, k, seed=N, dtype=torch.float32)
    om, gm, _, _ = forward_and_grads(btt_moe_masked, x, A, B, W, b, k)
    fn = lambda *t: btt_moe_sparse(*t, backend="grouped_mm", deterministic=deterministic)  # noqa: E731
    os_, gs, _, _ = forward_and_grads(fn, x, A, B, W, b, k)
    assert_same((om, gm), (os_, gs), tol=1e-4)


def test_grouped_mm_backend_rejects_float64():
    x, A, B, W, b = make_problem(4, 2, 2, 2, 2, 3, 1)
    idx, gate = route(x.reshape(4, -1) @ W.t(), 1)
    with pytest.raises(einc.CompileError,
                       match="grouped_mm cannot run .*dtype=torch.float64.*: torch.float64 on cpu"):
        btt_moe_sparse(x, A, B, idx, gate, backend="grouped_mm")


# ---------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------


def test_route_ties_and_gates():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 3.0, 3.0, 2.0], [5.0, -1.0, 5.0, 5.0]])
    idx, gate = route(logits, 2)
    assert idx.tolist() == [[0, 1], [1, 2], [0, 2]]
    torch.testing.assert_close(gate, torch.full((3, 2), 0.5))
    idx, gate = route(torch.tensor([[math.log(3.0), 0.0, -5.0]]), 2)
    assert idx.tolist() == [[0, 1]]
    torch.testing.assert_close(gate, torch.tensor([[0.75, 0.25]]))
    dg = dense_gates(idx, gate, 3)
    torch.testing.assert_close(dg, torch.tensor([[0.75, 0.25, 0.0]]))
    with pytest.raises(ValueError):
        route(logits, 5)


# ---------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["strided", "padded", "auto"] + (["grouped_mm"] if GMM else []))
def test_deterministic_bitwise(backend):
    torch.manual_seed(0)
    x, A, B, W, b = make_problem(200, 4, 8, 4, 8, 6, 2, seed=11, dtype=torch.float32)
    runs = []
    for _ in range(2):
        fn = lambda *t: btt_moe_sparse(*t, deterministic=True, backend=backend)  # noqa: E731
        out, grads, _, _ = forward_and_grads(fn, x, A, B, W, b, 2)
        runs.append([out] + list(grads))
    for u, v in zip(*runs):
        assert torch.equal(u, v)


# ---------------------------------------------------------------------------
# layer
# ---------------------------------------------------------------------------


def test_near_square_factors():
    assert near_square_factors(1024) == (32, 32)
    assert near_square_factors(4096) == (64, 64)
    assert near_square_factors(1000) == (25, 40)
    assert near_square_factors(768) == (24, 32)
    for n in [1, 2, 3, 7, 97, 1021, 1500]:
        p, q = near_square_factors(n)
        s = math.ceil(math.sqrt(n))
        assert p <= q <= 2 * p and n <= p * q <= s * s


def test_layer_api_and_shapes():
    m = BTTMoE(30, 22, experts=5, k=2, dtype=DT)
    assert m.equation == "ga,gafr,fgre->fe" and m.expert_index == "r"
    assert m.input_sizes == near_square_factors(30) and m.output_sizes == near_square_factors(22)
    g, a = m.input_sizes
    f, e = m.output_sizes
    A, B = m.factors()
    assert A is m.A and B is m.B
    assert A.shape == (g, a, f, 5) and B.shape == (f, g, 5, e)
    assert isinstance(m.router, torch.nn.Linear)
    assert m.router.weight.abs().sum() == 0 and m.router.bias.abs().sum() == 0
    assert "experts=5" in repr(m)
    x = torch.randn(2, 3, 30, dtype=DT)
    assert m(x).shape == (2, 3, 22)
    assert m(torch.randn(30, dtype=DT)).shape == (22,)
    assert m(torch.randn(0, 30, dtype=DT)).shape == (0, 22)
    for cores in (1, 26, 2.0):
        with pytest.raises(einc.CompileError, match="cores must be"):
            BTTMoE(16, 16, cores=cores)
    with pytest.raises(ValueError):
        BTTMoE(16, 16, experts=4, k=5)
    m2 = BTTMoE(12, 10, experts=3, k=1, input_sizes=(3, 4), output_sizes=(2, 5), bias=False)
    assert m2.input_sizes == (3, 4) and m2.bias is None


@pytest.mark.parametrize("d_in,d_out", [(23, 17), (36, 20)])  # padded; exact (bias folded)
def test_layer_sparse_matches_masked(d_in, d_out):
    torch.manual_seed(1)
    m = BTTMoE(d_in, d_out, experts=6, k=2, dtype=DT)
    with torch.no_grad():
        m.router.weight.normal_()
        m.router.bias.normal_()
        m.bias.normal_()
    x = torch.randn(4, 5, d_in, dtype=DT, requires_grad=True)
    params = [x, m.A, m.B, m.router.weight, m.router.bias, m.bias]
    go = torch.randn(4, 5, d_out, dtype=DT)
    ys = m(x)
    gs = torch.autograd.grad(ys, params, go)
    ym = m.forward_masked(x)
    gm = torch.autograd.grad(ym, params, go)
    torch.testing.assert_close(ys, ym, rtol=1e-10, atol=1e-10)
    for u, v in zip(gs, gm):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)
    # padded inputs are zeros: the dropped rows of A get no gradient
    g, a = m.input_sizes
    flat = gs[1].reshape(g * a, -1)
    assert g * a == d_in or flat[d_in:].abs().max() == 0


@pytest.mark.parametrize("backend", ["chunked", "strided", "padded", "triton"])
def test_sparse_bias_argument(backend):
    x, A, B, W, b = make_problem(9, 3, 2, 4, 2, 4, 2, seed=5)
    bias = torch.randn(4, 2, dtype=DT, requires_grad=True)
    idx, gate = route(x.reshape(9, -1) @ W.t() + b, 2)
    go = torch.randn(9, 4, 2, dtype=DT)
    want = btt_moe_masked(x, A, B, idx, gate) + bias
    got = btt_moe_sparse(x, A, B, idx, gate, backend=backend, bias=bias)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for u, v in zip(torch.autograd.grad(got, [x, A, B, bias], go, retain_graph=True),
                    torch.autograd.grad(want, [x, A, B, bias], go)):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["auto", "chunked", "strided", "padded", "triton"])
def test_empty_batch_gives_every_operand_its_gradient(backend):
    """As the masked route does: x too (an empty one), not only the cores and gates."""
    x, A, B, W, b = make_problem(0, 2, 3, 4, 5, 4, 2)
    bias = torch.randn(4, 5, dtype=DT, requires_grad=True)
    idx, gate = route(torch.randn(0, 4, dtype=DT, requires_grad=True), 2)  # not from x
    ops = [x, A, B, bias]
    want = torch.autograd.grad((btt_moe_masked(x, A, B, idx, gate) + bias).sum(), ops)
    got = torch.autograd.grad(
        btt_moe_sparse(x, A, B, idx, gate, backend=backend, bias=bias).sum(), ops)
    for u, v in zip(got, want):
        assert u.shape == v.shape and torch.equal(u, v)


@pytest.mark.parametrize("backend", ["chunked", "strided", "padded", "triton"])
def test_sparse_refuses_a_wrong_bias_or_mixed_dtypes(backend):
    """A bias must be (f, e) and every operand of one dtype: a broadcast (e,) bias was taken
    silently, other shapes and mixed dtypes failed inside torch, and a float64 bias gave a
    float64 result on some backends and float32 on others."""
    x, A, B, W, b = make_problem(6, 2, 3, 4, 5, 4, 2, dtype=torch.float32)
    idx, gate = route(x.reshape(6, -1) @ W.t() + b, 2)
    run = lambda *ops, **kw: btt_moe_sparse(*ops, idx, gate, backend=backend, **kw)
    for bias in (torch.zeros(5), torch.zeros(20), torch.zeros(5, 4), [0.0] * 20):
        with pytest.raises(einc.CompileError, match=r"bias must be None or an \(f, e\) = "
                                                    r"\(4, 5\) tensor"):
            run(x, A, B, bias=bias)
    for ops, bias, named in (((x, A.double(), B.double()), None, "A torch.float64"),
                             ((x, A, B), torch.zeros(4, 5, dtype=torch.float64),
                              "bias torch.float64"),
                             ((x[:0], A.double(), B), None, "A torch.float64")):
        n = ops[0].shape[0]
        with pytest.raises(einc.CompileError, match=f"share one dtype.*{named}"):
            btt_moe_sparse(*ops, idx[:n], gate[:n], backend=backend, bias=bias)
    # under autocast all run in its dtype, mixed or not, unless one is float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run(x, A, B.bfloat16(), bias=torch.zeros(4, 5))
        assert y.dtype == torch.bfloat16
        with pytest.raises(einc.CompileError, match="share one dtype"):
            run(x, A.double(), B)


def test_layer_init_rms():
    torch.manual_seed(0)
    m = BTTMoE(1024, 1024, experts=8, k=2)
    x = torch.randn(512, 1024)
    with torch.no_grad():
        y = m(x)
    ratio = (y.pow(2).mean() / x.pow(2).mean()).sqrt().item()
    assert 0.85 < ratio < 1.15
    # zero router: all ties -> experts 0..k-1 with gate 1/k
    load = m.router_stats()["load"]
    torch.testing.assert_close(load, torch.tensor([0.5, 0.5] + [0.0] * 6))


def test_aux_loss_hand_checked():
    m = BTTMoE(4, 4, experts=4, k=1, input_sizes=(2, 2), output_sizes=(2, 2), dtype=DT)
    # logits = x (router = identity), two tokens
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(4, dtype=DT))
    x = torch.tensor([[math.log(3.0), 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=DT)
    m(x)
    # token 0 -> expert 0 (probs 1/2, 1/6, 1/6, 1/6); token 1 -> expert 0 (tie), probs 1/4 each
    f_r = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=DT)
    P_r = (torch.tensor([1 / 2, 1 / 6, 1 / 6, 1 / 6]) + torch.tensor([1 / 4] * 4)).to(DT) / 2
    balance = 4 * (f_r * P_r).sum()  # = 4 * 3/8 = 1.5
    assert abs(balance.item() - 1.5) < 1e-12
    z = (math.log(6.0) ** 2 + math.log(4.0) ** 2) / 2
    assert abs(m.aux_loss.item() - (1.5 + 0.1 * z)) < 1e-12
    stats = m.router_stats()
    torch.testing.assert_close(stats["load"], f_r)
    ent0 = -(0.5 * math.log(0.5) + 3 * (1 / 6) * math.log(1 / 6))
    assert abs(stats["entropy"].item() - (ent0 + math.log(4.0)) / 2) < 1e-12
    # uniform router at init: balance = 1 for any k, z-loss = log(E)^2
    m2 = BTTMoE(8, 8, experts=8, k=2)
    m2(torch.randn(10, 8))
    assert abs(m2.aux_loss.item() - (1.0 + 0.1 * math.log(8.0) ** 2)) < 1e-5


def _aux_reference(logits, idx, k):
    """The aux loss as the module docstring defines it, in plain float64 torch ops."""
    N, E = logits.shape
    probs = torch.softmax(logits, -1)
    frac = torch.stack([(idx == r).sum() for r in range(E)]).to(logits.dtype) / (N * k)
    z = torch.logsumexp(logits, -1).square().mean()
    return E * (frac * probs.mean(0)).sum() + 0.1 * z


@pytest.mark.parametrize("N, E, k", [(1, 1, 1), (5, 4, 1), (37, 8, 2), (64, 16, 4)])
def test_aux_loss_gradient_and_second_derivative_match_the_definition(N, E, k):
    """The layer's aux loss has a hand-written backward: its gradient for the router (and
    with create_graph=True its second derivative) equals autograd's over the definition."""
    torch.manual_seed(N + E)
    m = BTTMoE(12, 10, experts=E, k=k, dtype=DT)
    with torch.no_grad():
        m.router.weight.normal_(0, 1.0)
        m.router.bias.normal_(0, 1.0)
    x = torch.randn(N, 12, dtype=DT)
    m(x)
    logits = m.router(x)
    idx, _ = route(logits.detach(), k)
    want = _aux_reference(logits, idx, k)
    assert abs(float(m.aux_loss) - float(want)) < 1e-12
    params = [m.router.weight, m.router.bias]
    # first order: the hand-written backward
    got = torch.autograd.grad(m.aux_loss * 3.0, params, retain_graph=True)
    ref = torch.autograd.grad(want * 3.0, params, retain_graph=True)
    for u, v in zip(got, ref):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
    # with a graph (create_graph=True)
    got = torch.autograd.grad(m.aux_loss * 3.0, params, create_graph=True)
    ref = torch.autograd.grad(want * 3.0, params, create_graph=True)
    for u, v in zip(got, ref):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
    second = torch.autograd.grad(sum((u ** 2).sum() for u in got), params)
    second_ref = torch.autograd.grad(sum((v ** 2).sum() for v in ref), params)
    for u, v in zip(second, second_ref):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-12)


def test_aux_loss_backward_takes_batched_gradients():
    """autograd.grad(..., is_grads_batched=True) (vmap over the backward, as jacobian and
    hessian with vectorize=True use) goes through the hand-written backward."""
    torch.manual_seed(0)
    m = BTTMoE(8, 8, experts=4, k=2, dtype=DT)
    with torch.no_grad():
        m.router.weight.normal_()
    m(torch.randn(5, 8, dtype=DT))
    scale = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    (got,) = torch.autograd.grad(m.aux_loss, m.router.weight, scale, is_grads_batched=True,
                                 retain_graph=True)
    (one,) = torch.autograd.grad(m.aux_loss, m.router.weight)
    torch.testing.assert_close(got, scale.view(3, 1, 1) * one)


def test_sparse_backward_takes_batched_gradients():
    """is_grads_batched=True (jacobian / hessian with vectorize=True) through the layer:
    the chunked backend (the CPU default) differentiates plain ops, matching the masked
    reference; backends whose backward cannot take a batch say so."""
    torch.manual_seed(0)
    m = BTTMoE(16, 12, experts=4, k=2, dtype=DT)
    with torch.no_grad():
        m.router.weight.normal_()
    x = torch.randn(6, 16, dtype=DT, requires_grad=True)
    y = m(x)
    v = torch.randn(3, *y.shape, dtype=DT)
    params = [x, *m.parameters()]
    got = torch.autograd.grad(y, params, v, is_grads_batched=True)
    ref = m.forward_masked(x)
    for i in range(3):
        want = torch.autograd.grad(ref, params, v[i], retain_graph=True)
        for u, w in zip(got, want):
            torch.testing.assert_close(u[i], w)
    jac = torch.autograd.functional.jacobian(m, x, vectorize=True)
    torch.testing.assert_close(jac, torch.autograd.functional.jacobian(m.forward_masked, x))
    m.backend = "strided"
    y = m(x)
    with pytest.raises(einc.EincError, match="is_grads_batched.*backend='chunked'"):
        torch.autograd.grad(y, x, v, is_grads_batched=True)


def test_router_stats_are_the_last_forwards_when_read_later():
    """The statistics are computed when read: from the last forward's routing, not from a
    later one, and kept by copies and pickles."""
    import copy
    import pickle

    torch.manual_seed(1)
    m = BTTMoE(16, 16, experts=4, k=2, dtype=DT)
    with torch.no_grad():
        m.router.weight.normal_(0, 1.0)
    x1, x2 = torch.randn(9, 16, dtype=DT), torch.randn(5, 16, dtype=DT)
    with pytest.raises(einc.EincError, match="router_stats.*run the layer on a batch first"):
        m.router_stats()
    m(x2)
    m(x1)
    probs = torch.softmax(m.router(x1), -1).detach()
    idx, _ = route(m.router(x1).detach(), 2)
    clone = copy.deepcopy(m)
    stats = m.router_stats()
    assert stats["tokens"] == 9
    torch.testing.assert_close(stats["entropy"], -(probs * probs.log()).sum(-1).mean())
    torch.testing.assert_close(stats["load"], torch.bincount(idx.reshape(-1), minlength=4).to(DT) / 18)
    for other in (clone, pickle.loads(pickle.dumps(m))):
        for name, v in other.router_stats().items():
            assert v == stats[name] if name == "tokens" else torch.equal(v, stats[name])


def test_moe_aux_loss_sums_layers_and_reaches_router():
    torch.manual_seed(0)
    net = torch.nn.Sequential(BTTMoE(16, 16, experts=4, k=2), torch.nn.GELU(), BTTMoE(16, 8, experts=4, k=1))
    y = net(torch.randn(7, 16))
    total = moe_aux_loss(net)
    torch.testing.assert_close(total, net[0].aux_loss + net[2].aux_loss)
    (y.square().mean() + total).backward()
    assert net[0].router.weight.grad.abs().sum() > 0
    assert net[0].A.grad is not None and net[2].B.grad is not None
    assert moe_aux_loss(torch.nn.Linear(2, 2)).item() == 0.0


def test_checkpoint_recomputation_keeps_the_forwards_aux_loss():
    """Non-reentrant checkpointing runs the forward again inside backward; that run's aux
    loss must not replace the forward's: its graph is never freed, so a step that skipped
    the layer took a second, stale gradient from it."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    m = BTTMoE(16, 16, experts=4, k=2)
    with torch.no_grad():
        m.router.weight.normal_()
    x = torch.randn(9, 16)
    (m(x).square().mean() + m.aux_loss).backward()
    want = m.router.weight.grad.clone()
    m.zero_grad()
    calls = []
    m.register_forward_pre_hook(lambda *args: calls.append(1))
    y = checkpoint(m, x, use_reentrant=False)
    aux = m.aux_loss
    total = moe_aux_loss(m)
    assert len(calls) == 1  # asking whether the graph is alive recomputed the layer
    (y.square().mean() + total).backward()
    assert len(calls) == 2
    torch.testing.assert_close(m.router.weight.grad, want)
    assert m.aux_loss is aux and not moe_aux_loss(m).requires_grad  # the step's, settled
    assert m.router_stats()["tokens"] == 9


def test_moe_aux_loss_with_a_layer_skipped_this_step():
    """Layer drop: a layer not run this step still holds last step's aux_loss, whose graph
    that step's backward freed. It adds its value without a gradient; a graph kept by
    retain_graph still takes the aux loss's backward."""
    torch.manual_seed(0)
    a, b = BTTMoE(16, 16, experts=4, k=2), BTTMoE(16, 16, experts=4, k=2)
    for m in (a, b):
        with torch.no_grad():
            m.router.weight.normal_()
    x = torch.randn(9, 16)
    (b(a(x)).square().mean() + moe_aux_loss(torch.nn.ModuleList([a, b]))).backward()
    stale = b.aux_loss.detach().clone()
    a.zero_grad()
    y = a(x)  # b skipped
    total = moe_aux_loss(torch.nn.ModuleList([a, b]))
    torch.testing.assert_close(total, a.aux_loss + stale)
    (y.square().mean() + total).backward()  # failed: backward through a freed graph
    (want,) = torch.autograd.grad(a(x).square().mean() + a.aux_loss, a.router.weight)
    torch.testing.assert_close(a.router.weight.grad, want)
    # after the backward the sum is still the step's value, for logging
    torch.testing.assert_close(moe_aux_loss(torch.nn.ModuleList([a, b])), a.aux_loss + stale)
    # retain_graph keeps the graph, so the aux loss still takes its own backward
    a.zero_grad()
    a(x).square().mean().backward(retain_graph=True)
    assert moe_aux_loss(a).requires_grad
    moe_aux_loss(a).backward()
    assert a.router.weight.grad is not None and not moe_aux_loss(a).requires_grad


def test_moe_aux_loss_after_an_evaluation_outside_no_grad():
    """A layer evaluated (eval mode, gradients on) and then skipped by a training step
    adds that evaluation's aux loss without a gradient: its router must get no gradient
    from a batch the step never saw. Trained in eval mode, the layer keeps its gradient."""
    torch.manual_seed(1)
    a, b = BTTMoE(16, 16, experts=4, k=2), BTTMoE(16, 16, experts=4, k=2)
    model = torch.nn.ModuleList([a, b])
    with torch.no_grad():
        b.router.weight.normal_()
    model.eval()
    b(a(torch.randn(9, 16)))  # evaluation with gradients on: b's graph stays alive
    model.train()
    stale = b.aux_loss.detach().clone()
    x = torch.randn(9, 16)
    y = a(x)  # b skipped this step
    total = moe_aux_loss(model)
    torch.testing.assert_close(total, a.aux_loss + stale)
    (y.square().mean() + total).backward()
    assert b.router.weight.grad is None  # was a gradient from the evaluation's batch
    # the whole model in eval mode (dropout off) while training: the aux loss is this
    # step's and keeps its gradient
    model.eval()
    b(a(x))
    assert moe_aux_loss(model).requires_grad
    moe_aux_loss(model).backward()
    assert b.router.weight.grad is not None and b.router.weight.grad.abs().sum() > 0


def test_layer_deterministic_flag():
    torch.manual_seed(0)
    m = BTTMoE(64, 48, experts=6, k=2)
    with torch.no_grad():
        m.router.weight.normal_()
    m.deterministic = True
    x = torch.randn(300, 64)
    outs = []
    for _ in range(2):
        m.zero_grad()
        y = m(x)
        y.square().sum().backward()
        outs.append((y, m.A.grad.clone(), m.B.grad.clone(), m.router.weight.grad.clone()))
    for u, v in zip(*outs):
        assert torch.equal(u, v)


@pytest.mark.parametrize("backend", ["chunked", "strided", "padded", "triton", "grouped_mm"])
def test_layer_backend_option_matches_masked(backend):
    """The layer's backend (constructor, spec options, attribute), float64 against the
    masked route, in the output and every gradient."""
    if backend == "grouped_mm" and not grouped_mm_available(torch.device("cpu"), torch.float64):
        with pytest.raises(einc.CompileError, match="grouped_mm cannot run"):
            einc.BTTMoE(30, 20, experts=5, k=2, backend=backend).double()(
                torch.randn(4, 30, dtype=torch.float64))
        return
    torch.manual_seed(1)
    m = einc.compile("bttmoe(experts=5, k=2)", 30, 20, backend=backend, deterministic=True)
    m = m.double()
    with torch.no_grad():
        m.router.weight.normal_()
        m.bias.normal_()
    assert m.backend == backend and m.deterministic and f"backend='{backend}'" in repr(m)
    x = torch.randn(2, 23, 30, dtype=torch.float64, requires_grad=True)
    go = torch.randn(2, 23, 20, dtype=torch.float64)
    grads = []
    for run in (m, m.forward_masked):
        y = run(x)
        grads.append((y, *torch.autograd.grad(y, [x, *m.parameters()], go)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bad,match", [
    (dict(backend="fast"), "known: auto, chunked"),
    (dict(deterministic=2), "True or False"),
    (dict(bogus=1), "allowed: tolerance, backend, deterministic")])
def test_layer_options_are_checked(bad, match):
    with pytest.raises(einc.CompileError, match=match):
        einc.compile("bttmoe(experts=4, k=2)", 16, **bad)


@pytest.mark.parametrize("fn", [btt_moe_masked, btt_moe_sparse,
                                lambda *a: btt_moe_sparse(*a, backend="grouped_mm")])
@pytest.mark.parametrize("idx,match", [
    ([[0], [3]], "in \\[0, 2\\] \\(experts = 3\\), got values from 0 to 3"),
    ([[-1], [0]], "got values from -1 to 0"),
    ([[0.0], [1.0]], "integer tensor .*got torch.float32"),
    ([0, 1], r"must be \(N, k\), got shape \(2,\)")])
def test_expert_indices_are_checked(fn, idx, match):
    # grouped_mm returned unwritten rows for an index >= E; the others failed inside torch
    x, A, B, _, _ = make_problem(2, 4, 4, 4, 4, 3, 1)
    with pytest.raises(einc.CompileError, match=match):
        fn(x, A, B, torch.tensor(idx), torch.ones(2, 1, dtype=DT))


def test_validate_false_skips_reading_the_indices(monkeypatch):
    # the range check is a host sync on a GPU: routed indices (and the layer) skip it
    x, A, B, W, b = make_problem(6, 2, 3, 2, 3, 4, 2)
    idx, gate = route(x.reshape(6, -1) @ W.t() + b, 2)
    calls = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    btt_moe_sparse(x, A, B, idx, gate)
    assert len(calls) == 1
    btt_moe_sparse(x, A, B, idx, gate, validate=False)
    btt_moe_masked(x, A, B, idx, gate, validate=False)
    BTTMoE(12, 12, experts=4, k=2)(torch.randn(5, 12))
    assert len(calls) == 1


def test_an_expert_named_twice_adds_its_gates_in_every_route():
    x, A, B, _, _ = make_problem(3, 2, 3, 2, 3, 4, 2)
    idx = torch.tensor([[1, 1], [0, 2], [3, 3]])
    gate = torch.tensor([[0.3, 0.7], [0.5, 0.5], [0.9, 0.1]], dtype=DT)
    want = plain_reference(x, A, B, idx, gate)
    torch.testing.assert_close(btt_moe_masked(x, A, B, idx, gate), want)
    for backend in ("chunked", "padded", "strided", "triton"):
        torch.testing.assert_close(btt_moe_sparse(x, A, B, idx, gate, backend=backend), want)


@pytest.mark.parametrize("k", [2.0, True, 0, 5])
def test_route_checks_k(k):
    with pytest.raises(einc.CompileError, match="k must be an integer in \\[1, 4\\]"):
        route(torch.randn(3, 4), k)


def test_moe_helpers_check_their_arguments():
    with pytest.raises(einc.CompileError, match="takes a torch.nn.Module, got str"):
        moe_aux_loss("model")
    m = einc.BTTMoE(16, 16, experts=4, k=2)
    m.deterministic = "yes"  # set after construction: checked at the next call
    with pytest.raises(einc.CompileError, match="deterministic must be True or False"):
        m(torch.randn(3, 16))


def test_module_moves_and_casts_like_any_module():
    m = einc.BTTMoE(64, 64, experts=4, k=2).double()
    assert m.A.dtype == torch.float64 and m.router.weight.dtype == torch.float64
    assert m(torch.randn(3, 64, dtype=torch.float64)).dtype == torch.float64


def test_chunks_cover_each_expert_run_evenly():
    from einc.moe.chunked import _chunks
    counts = [0, 5, 1030, 0, 512, 513, 767, 768, 1300]
    chunks = _chunks(counts, 512)
    assert [c[1] for c in chunks][0] == 0 and chunks[-1][2] == sum(counts)
    assert all(b[1] == a[2] for a, b in zip(chunks, chunks[1:]))  # contiguous, in order
    for r, c in enumerate(counts):
        mine = [s1 - s0 for e, s0, s1 in chunks if e == r]
        # the nearest whole number of chunks: 513 stays one chunk, 1030 is two of 515
        assert sum(mine) == c and all(0 < m < 1.5 * 512 for m in mine)
        assert len(mine) == (max(1, int(c / 512 + 0.5)) if c else 0)
        assert not mine or max(mine) - min(mine) <= 1


def test_chunked_backend_is_the_cpu_default_and_handles_any_core_layout():
    """Contiguous (g, a, f, E) cores and BTTMoE's expert-major storage give one result."""
    x, A, B, W, b = make_problem(30, 3, 4, 5, 2, 6, 2, seed=3)
    logits = x.reshape(30, -1) @ W.t() + b
    idx, gate = route(logits, 2)
    want = btt_moe_masked(x, A, B, idx, gate)
    stored = (A.detach().permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),
              B.detach().permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3))
    assert stored[0].stride(2) == 1 and not stored[0].is_contiguous()
    for A_, B_ in [(A, B), stored]:
        got = btt_moe_chunked(x, A_, B_, idx, gate, chunk=4)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("names", [("x",), ("A",), ("B",), ("gate",), ("x", "A"),
                                   ("B", "gate"), ("x", "gate")])
def test_chunked_gradients_of_any_subset_of_inputs(names):
    """Frozen cores, a frozen router or a constant input skip their parts of the backward;
    what is still computed shares scratch buffers (non-square sizes: they differ in size)."""
    x, A, B, W, b = make_problem(40, 3, 5, 4, 6, 5, 2, seed=11)
    idx, gate = route(x.detach().reshape(40, -1) @ W.detach().t() + b.detach(), 2)
    gate = gate.detach()
    inputs = {"x": x.detach(), "A": A.detach(), "B": B.detach(), "gate": gate}
    for n in names:
        inputs[n] = inputs[n].clone().requires_grad_()
    go = torch.randn(40, 4, 6, generator=torch.Generator().manual_seed(3), dtype=DT)
    got = torch.autograd.grad(btt_moe_chunked(inputs["x"], inputs["A"], inputs["B"], idx,
                                              inputs["gate"], chunk=7), [inputs[n] for n in names], go)
    want = torch.autograd.grad(btt_moe_masked(inputs["x"], inputs["A"], inputs["B"], idx,
                                              inputs["gate"]), [inputs[n] for n in names], go)
    for n, u, v in zip(names, got, want):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10, msg=f"gradient of {n}")


def test_chunked_gradgradcheck():
    """Second-order gradients through the chunked backend (it differentiates the padded
    route's plain torch ops when the backward is asked for a graph)."""
    x, A, B, W, b = make_problem(9, 2, 3, 3, 2, 4, 2, seed=5)
    bias = torch.randn(3, 2, dtype=DT, requires_grad=True)
    idx, gate = route(x.detach().reshape(9, -1) @ W.detach().t() + b.detach(), 2)
    gate = gate.detach().requires_grad_()
    fn = lambda x, A, B, gate, bias: btt_moe_chunked(x, A, B, idx, gate, chunk=2, bias=bias)
    assert torch.autograd.gradgradcheck(fn, (x, A, B, gate, bias))


@pytest.mark.parametrize("backend", ["strided", "triton"])
def test_backends_without_second_derivatives_say_so(backend):
    x, A, B, W, b = make_problem(9, 2, 3, 3, 2, 4, 2, seed=5)
    idx, gate = route(x.detach().reshape(9, -1) @ W.detach().t() + b.detach(), 2)
    y = btt_moe_sparse(x, A, B, idx, gate.detach(), backend=backend)
    with pytest.raises(einc.EincError, match=f"{backend} BTT-MoE backend has no second"):
        torch.autograd.grad(y.pow(2).sum(), [x, A], create_graph=True)
    # first order is unaffected
    y = btt_moe_sparse(x, A, B, idx, gate.detach(), backend=backend)
    assert all(g is not None for g in torch.autograd.grad(y.sum(), [x, A]))


def test_gradient_penalty_through_the_layer_matches_the_masked_route():
    """A gradient penalty (the input gradient's norm, differentiated again) through the
    layer's default sparse route equals the one through the masked reference."""
    torch.manual_seed(0)
    m = einc.BTTMoE(12, 10, experts=4, k=2).double()
    with torch.no_grad():
        m.router.weight.normal_()
    x = torch.randn(7, 12, dtype=DT, requires_grad=True)

    def penalty_grads(fn):
        gx, = torch.autograd.grad(fn(x).pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), list(m.parameters()))

    for got, want in zip(penalty_grads(m), penalty_grads(m.forward_masked)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_autocast_runs_the_experts_in_low_precision_like_nn_linear():
    torch.manual_seed(0)
    m = einc.BTTMoE(64, 48, experts=4, k=2)
    with torch.no_grad():
        m.router.weight.normal_()
        m.bias.normal_()
    x = torch.randn(30, 64)
    want = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, ref = m(x), m.forward_masked(x)
        assert got.dtype == torch.nn.Linear(64, 48)(x).dtype == torch.bfloat16
    scale = want.abs().max()
    assert (got.float() - want).abs().max() < 0.03 * scale
    assert (got.float() - ref.float()).abs().max() < 0.03 * scale
    got.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())


@pytest.mark.parametrize("backend", ["auto", "chunked", "padded", "strided", "triton"])
def test_sparse_under_autocast_runs_in_its_dtype(backend):
    """btt_moe_sparse under autocast computes in autocast's dtype whatever the operands'
    (as nn.Linear); float64 operands stay float64, as autocast leaves them."""
    x, A, B, W, b = make_problem(40, 4, 8, 4, 6, 4, 2, seed=7, dtype=torch.float32)
    idx, gate = route(x.reshape(40, -1) @ W.t() + b, 2)
    want = btt_moe_masked(x, A, B, idx, gate)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = btt_moe_sparse(x, A, B, idx, gate, backend=backend)
        wide = btt_moe_sparse(*(t.double() for t in (x, A, B)), idx, gate.double(),
                              backend=backend)
    assert got.dtype == torch.bfloat16 and wide.dtype == torch.float64
    assert _rel(got, want) < 3e-2 and _rel(wide, want) < 1e-6


def test_sparse_under_autocast_empty_batch_and_refused_backend():
    """An empty batch comes back in autocast's dtype as a full one does; a backend that
    cannot take autocast's dtype says that autocast chose it."""
    x, A, B, W, b = make_problem(10, 4, 8, 4, 8, 4, 2, seed=8, dtype=torch.float32)
    idx, gate = route(x.reshape(10, -1) @ W.t() + b, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        empty = btt_moe_sparse(x[:0], A, B, idx[:0], gate[:0], bias=torch.zeros(4, 8))
        assert empty.dtype == torch.bfloat16 and empty.shape == (0, 4, 8)
        if not grouped_mm_available(torch.device("cpu"), torch.bfloat16):
            with pytest.raises(einc.CompileError, match="under autocast the experts run in "
                                                        "torch.bfloat16"):
                btt_moe_sparse(x, A, B, idx, gate, backend="grouped_mm")


def test_aux_loss_is_float32_under_low_precision_autocast():
    """Rounded to bf16, the aux loss (about 1 for a balanced router) kept 2-3 digits."""
    torch.manual_seed(3)
    m = einc.BTTMoE(64, 48, experts=8, k=2)
    with torch.no_grad():
        m.router.weight.normal_(0, 0.02)
    x = torch.randn(300, 64)
    m(x)
    want = m.aux_loss.detach()
    for n in (300, 0):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(x[:n])
        assert m.aux_loss.dtype == torch.float32
    m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(x)
    assert abs(float(m.aux_loss) - float(want)) < 1e-3 * float(want)
    assert m.aux_loss.requires_grad
    assert m.double()(x.double()) is not None and m.aux_loss.dtype == torch.float64


def test_meta_device_forward_gives_shapes():
    m = einc.BTTMoE(64, 48, experts=4, k=2, device="meta")
    y = m(torch.empty(2, 5, 64, device="meta"))
    assert y.shape == (2, 5, 48) and y.device.type == "meta"


def test_assigned_checkpoints_get_the_expert_major_layout_back():
    """load_state_dict(assign=True) with plain contiguous cores: the layer restores the
    layout its backends read in place (same values, still Parameters, still trainable)."""
    m = einc.BTTMoE(64, 48, experts=4, k=2)
    n = einc.BTTMoE(64, 48, experts=4, k=2)
    n.load_state_dict({k: v.contiguous() for k, v in m.state_dict().items()}, assign=True)
    for got, want in ((n.A, m.A), (n.B, m.B)):
        assert isinstance(got, torch.nn.Parameter) and got.requires_grad
        assert got.stride() == want.stride() and torch.equal(got, want)
    x = torch.randn(5, 64)
    torch.testing.assert_close(n(x), m(x))


def test_loading_a_checkpoint_keeps_the_parameters_an_optimizer_holds():
    """The layout restore after load_state_dict replaced the cores' Parameter objects when
    their layout was not expert-major (here after .to(memory_format=channels_last)), so an
    optimizer built before the load silently stopped training them."""
    torch.manual_seed(0)
    m = einc.BTTMoE(64, 48, experts=4, k=2)
    ckpt = {k: v.clone() for k, v in m.state_dict().items()}
    m = m.to(memory_format=torch.channels_last)
    assert not m.A.permute(0, 3, 1, 2).is_contiguous()  # the case: not expert-major
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    held = dict(m.named_parameters())
    m.load_state_dict(ckpt)
    for name, p in m.named_parameters():
        assert p is held[name], name
        torch.testing.assert_close(p, ckpt[name], rtol=0, atol=0)
    assert m.A.permute(0, 3, 1, 2).is_contiguous() and m.B.permute(0, 2, 1, 3).is_contiguous()
    before = [p.detach().clone() for p in (m.A, m.B)]
    m(torch.randn(8, 64)).square().mean().backward()
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip((m.A, m.B), before))


def test_jit_trace_computes_every_expert_and_holds_for_other_inputs():
    """A trace would freeze the sparse dispatch's routing-dependent sizes: under
    torch.jit.trace the layer takes the masked route, exact for any input."""
    import warnings
    torch.manual_seed(0)
    m = einc.BTTMoE(64, 48, experts=4, k=2)
    with torch.no_grad():
        m.router.weight.normal_()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        traced = torch.jit.trace(m, (torch.randn(5, 64),))
    assert not [w for w in seen if "/einc/" in w.filename], [str(w.message) for w in seen]
    for n in (1, 7, 40):
        x = torch.randn(n, 64)
        torch.testing.assert_close(traced(x), m(x), rtol=1e-5, atol=1e-5)


def test_jit_trace_keeps_the_users_own_tracer_warnings():
    """einc silences the warnings of its own size checks under a trace, not those of code
    it runs for the user, such as a parametrisation of a core."""
    import warnings
    import torch.nn.utils.parametrize as parametrize

    class SignFlip(nn.Module):
        def forward(self, w):
            return w if w.sum() > 0 else -w  # data-dependent: a trace should warn here

    m = einc.BTTMoE(16, 16, experts=4, k=2)
    parametrize.register_parametrization(m, "A", SignFlip())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.jit.trace(m, (torch.randn(3, 16),), check_trace=False)
    tracer = [w for w in seen if issubclass(w.category, torch.jit.TracerWarning)]
    assert tracer and all("/einc/" not in w.filename for w in tracer)


@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_computes_every_expert_for_any_batch(strict):
    """routing makes the sparse dispatch's sizes data-dependent, which an exported program
    cannot hold: under torch.export the layer takes the masked route and writes no state."""
    import warnings
    if strict and not hasattr(torch.compiler, "is_exporting"):
        pytest.skip("strict export needs torch.compiler.is_exporting (torch 2.5)")
    torch.manual_seed(0)
    m = einc.BTTMoE(64, 48, experts=4, k=2)
    with torch.no_grad():
        m.router.weight.normal_()
    n = torch.export.Dim("n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "attribute assigned during export"
        # torch's own modules imported lazily inside export may warn of their deprecations
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        ep = torch.export.export(m, (torch.randn(5, 64),), dynamic_shapes=({0: n},),
                                 strict=strict)
    assert m.aux_loss is None
    for rows in (1, 7, 40):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(ep.module()(x), m(x), rtol=1e-5, atol=1e-5)


def test_non_strict_export_without_is_exporting_takes_the_masked_route(monkeypatch):
    """torch 2.4 has no is_exporting: a non-strict export is told by its fake tensors."""
    import einc.moe.dispatch as dispatch
    import einc.moe.layer as layer
    for mod in (dispatch, layer):
        monkeypatch.setattr(mod, "exporting", lambda: False)
    torch.manual_seed(0)
    m = einc.BTTMoE(64, 48, experts=4, k=2)
    with torch.no_grad():
        m.router.weight.normal_()
    n = torch.export.Dim("n")
    ep = torch.export.export(m, (torch.randn(5, 64),), dynamic_shapes=({0: n},), strict=False)
    assert m.aux_loss is None
    for rows in (1, 40):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(ep.module()(x), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["chunked", "padded", "strided", "triton"])
def test_flat_rows_give_the_same_result_and_a_gradient_of_their_shape(backend):
    """x as (N, g * a) rows: same output and gradients as (N, g, a); the chunked backend
    returns the input gradient as a tensor of the rows' own shape, not a view, which
    autograd can sum the router's gradient into in place."""
    x, A, B, W, b = make_problem(11, 3, 4, 2, 5, 4, 2, seed=2)
    rows = x.detach().reshape(11, 12).requires_grad_()
    idx, gate = route(rows.detach() @ W.detach().t(), 2)
    go = torch.randn(11, 2, 5, dtype=DT)
    got = btt_moe_sparse(rows, A, B, idx, gate, backend=backend)
    want = btt_moe_sparse(x, A, B, idx, gate, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (dr,) = torch.autograd.grad(got, rows, go)
    (dx,) = torch.autograd.grad(want, x, go)
    assert dr.shape == (11, 12)
    torch.testing.assert_close(dr, dx.reshape(11, 12), rtol=1e-12, atol=1e-12)
    if backend == "chunked":
        assert not dr._is_view()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_every_accepted_index_dtype_runs_on_every_backend(dtype):
    """check_experts accepts these integer dtypes; every backend, the masked reference and
    forward-mode AD (which takes the padded route) give what int64 indices give."""
    x, A, B, W, b = make_problem(10, 2, 4, 3, 5, 4, 2, seed=5)
    idx, gate = route(x.detach().reshape(10, -1) @ W.detach().t(), 2)
    want = btt_moe_masked(x, A, B, idx, gate)
    torch.testing.assert_close(btt_moe_masked(x, A, B, idx.to(dtype), gate), want)
    for backend in ("auto", "chunked", "padded", "strided", "triton"):
        got = btt_moe_sparse(x, A, B, idx.to(dtype), gate, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=backend)
    xd = x.detach()
    _, tangent = torch.func.jvp(lambda t: btt_moe_sparse(t, A.detach(), B.detach(),
                                                         idx.to(dtype), gate.detach()),
                                (xd,), (torch.ones_like(xd),))
    _, want_t = torch.func.jvp(lambda t: btt_moe_masked(t, A.detach(), B.detach(), idx,
                                                        gate.detach()),
                               (xd,), (torch.ones_like(xd),))
    torch.testing.assert_close(tangent, want_t, rtol=1e-12, atol=1e-12)


def test_the_masked_reference_takes_flat_rows_too():
    """btt_moe_masked takes the same two layouts as btt_moe_sparse, with the rows'
    gradient in their own shape; a width that is not g * a is still refused by name."""
    x, A, B, W, b = make_problem(11, 3, 4, 2, 5, 4, 2, seed=3)
    rows = x.detach().reshape(11, 12).requires_grad_()
    idx, gate = route(rows.detach() @ W.detach().t(), 2)
    got = btt_moe_masked(rows, A, B, idx, gate)
    want = btt_moe_masked(x, A, B, idx, gate)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, btt_moe_sparse(rows, A, B, idx, gate), rtol=1e-12, atol=1e-12)
    go = torch.randn(11, 2, 5, dtype=DT)
    (dr,) = torch.autograd.grad(got, rows, go)
    (dx,) = torch.autograd.grad(want, x, go)
    assert dr.shape == (11, 12)
    torch.testing.assert_close(dr, dx.reshape(11, 12), rtol=1e-12, atol=1e-12)
    with pytest.raises(einc.CompileError, match=r"x must be \(N, g, a\)"):
        btt_moe_masked(rows[:, :10], A, B, idx, gate)


def test_the_functional_traces_for_any_routing():
    import warnings
    x, A, B, W, b = make_problem(9, 2, 3, 3, 2, 4, 2, seed=4)
    A, B, W = A.detach(), B.detach(), W.detach()

    def fn(x):
        return btt_moe_sparse(x, A, B, *route(x.reshape(x.shape[0], -1) @ W.t(), 2))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(fn, (x.detach(),))
    for n in (1, 6, 40):
        z = torch.randn(n, 2, 3, dtype=DT)
        torch.testing.assert_close(traced(z), fn(z), rtol=1e-10, atol=1e-10)


def test_inference_keeps_no_intermediates():
    """Without a backward the chunked forward keeps no per-chunk intermediate: the pool
    holds the output and a few scratch buffers, not the saved h of every chunk."""
    from einc.runtime import buffers
    x, A, B, W, b = make_problem(2048, 32, 32, 32, 32, 4, 2, seed=3, dtype=torch.float32)
    idx, gate = route(x.detach().reshape(2048, -1) @ W.detach().t(), 2)

    def held(grad):
        buffers.empty_cache()
        with torch.set_grad_enabled(grad):
            y = btt_moe_chunked(x, A, B, idx, gate.detach(), chunk=256)
        return buffers.held(), y

    infer, y = held(False)
    del y
    train, y = held(True)
    assert infer + 8 * 2**20 <= train  # training keeps ~16 chunks' h of 1 MiB each
    y.sum().backward()  # what training kept is what its backward reads


def test_a_mismatched_input_dtype_is_a_clear_error():
    m = einc.BTTMoE(64, 64, experts=4, k=2)
    with pytest.raises(einc.CompileError, match="input dtype torch.float64 differs"):
        m(torch.randn(3, 64, dtype=torch.float64))


def test_chunked_bfloat16_core_gradients_do_not_degrade_with_chunks():
    x, A, B, W, b = make_problem(512, 4, 4, 4, 4, 4, 2, seed=7)
    idx, gate = route(x.reshape(512, -1) @ W.t() + b, 2)
    go = torch.randn(512, 4, 4, dtype=DT)
    want = torch.autograd.grad(btt_moe_masked(x, A, B, idx, gate), [A, B], go,
                               retain_graph=True)
    low = [t.detach().bfloat16().requires_grad_() for t in (x, A, B)]

    def errors(chunk):
        out = btt_moe_chunked(*low, idx, gate.detach().bfloat16(), chunk=chunk)
        got = torch.autograd.grad(out, low[1:], go.bfloat16())
        return [((u.double() - v).norm() / v.norm()).item() for u, v in zip(got, want)]

    whole, many = errors(1024), errors(2)  # one chunk per expert vs ~64 per expert
    assert all(m <= 1.5 * w + 1e-4 for w, m in zip(whole, many)), (whole, many)


def test_layer_copies_and_pickles_after_a_training_step():
    """aux_loss belongs to the last forward's graph; copies keep its value, detached."""
    import copy
    import io
    m = einc.BTTMoE(16, 16, experts=4, k=2)
    m(torch.randn(5, 16)).sum().backward()
    c = copy.deepcopy(m)
    assert not c.aux_loss.requires_grad and torch.equal(c.aux_loss, m.aux_loss.detach())
    assert m.aux_loss.requires_grad  # the original keeps its graph
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded(x), m(x))


@pytest.mark.parametrize("bad", [dict(k=2.0), dict(experts=2.5), dict(experts=True),
                                 dict(cores=2.0)])
def test_layer_rejects_non_integer_sizes(bad):
    with pytest.raises(einc.CompileError, match="must be an integer"):
        einc.BTTMoE(8, 8, **{"experts": 4, **bad})


@pytest.mark.parametrize("width,match", [(10 ** 30, "above the largest width"),
                                         (2 ** 32 + 1, "above the largest width"),
                                         (0, "must be a positive integer"),
                                         (None, "must be a positive integer"),
                                         (8.0, "must be a positive integer")])
def test_layer_checks_widths_before_choosing_core_sizes(width, match):
    """A width past einc's limit is refused at once, like einc.compile refuses it, not
    after a core-size search that grows with its square root (10**30 never returned)."""
    for args in ((width, 64), (64, width)):
        with pytest.raises(einc.SizeError, match=match):  # as einc.compile's and StructuredLinear's
            einc.BTTMoE(*args)


def test_layer_widths_are_python_ints():
    m = einc.BTTMoE(np.int64(64), np.int16(48), experts=np.int8(4))
    assert type(m.in_features) is int and type(m.out_features) is int and type(m.experts) is int
    assert m(torch.randn(2, 64)).shape == (2, 48)


@pytest.mark.parametrize("sizes,match", [((4, 4), "covers only 16 < 64"), ((8,), "2 positive"),
                                         ("88", "2 positive"), ((8, 0), "2 positive"),
                                         ((2.9, 40), "each of input_sizes must be an integer")])
def test_layer_rejects_bad_core_sizes(sizes, match):
    with pytest.raises(einc.CompileError, match=match):
        einc.BTTMoE(64, 64, input_sizes=sizes)


@pytest.mark.parametrize("chunk", [0, -3, 2.5])
def test_chunked_rejects_bad_chunk(chunk):
    x, A, B, W, b = make_problem(3, 2, 2, 2, 2, 4, 2)
    idx, gate = route(x.reshape(3, -1) @ W.t() + b, 2)
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        btt_moe_chunked(x, A, B, idx, gate, chunk=chunk)


@pytest.mark.parametrize("backend", ["chunked", "strided", "triton", "grouped_mm"])
def test_named_backends_compute_as_padded_under_torch_func(backend):
    """Their autograd functions (old style, preallocated buffers) cannot run under a
    transform: jacrev used to fail with torch's own setup_context error."""
    from torch.func import jacrev
    torch.manual_seed(0)
    m = einc.BTTMoE(24, 20, experts=4, k=2, backend=backend).double()
    with torch.no_grad():
        m.router.weight.normal_()
    x = torch.randn(5, 24, dtype=torch.float64)
    ref = jacrev(m.forward_masked)(x)
    torch.testing.assert_close(jacrev(m)(x), ref, rtol=1e-10, atol=1e-10)


def test_torch_func_grad_matches_autograd():
    """Under torch.func the auto backend takes plain torch ops (padded), so transforms work."""
    m = einc.BTTMoE(16, 12, experts=4, k=2).double()
    with torch.no_grad():
        m.router.weight.normal_()
    x = torch.randn(7, 16, dtype=torch.float64)
    params = dict(m.named_parameters())
    got = grad(lambda p: functional_call(m, p, (x,)).square().sum())(params)
    m(x).square().sum().backward()
    for name, p in m.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-10, atol=1e-10)


def test_vmap_takes_the_masked_route_and_ensembles_work():
    """Routing sizes a dispatch per batch entry, which vmap cannot hold; under vmap the
    layer computes every expert and gates them (it used to fail inside functorch)."""
    torch.manual_seed(0)
    m = einc.BTTMoE(16, 12, experts=4, k=2).double()
    with torch.no_grad():
        m.router.weight.normal_()
    xs = torch.randn(3, 5, 16, dtype=torch.float64)
    want = torch.stack([m.forward_masked(x) for x in xs])
    torch.testing.assert_close(torch.func.vmap(m)(xs), want, rtol=1e-12, atol=1e-12)
    assert m.aux_loss.shape == (3,)  # one value per vmapped entry, read after vmap
    stats = m.router_stats()  # so are the statistics, computed after it
    assert stats["entropy"].shape == (3,) and stats["load"].shape == (3, 4)
    for j, x in enumerate(xs):
        m(x)
        torch.testing.assert_close(m.router_stats()["entropy"], stats["entropy"][j])
    # an ensemble: stacked parameters of three layers, one input
    ms = [copy.deepcopy(m) for _ in range(3)]
    for j, layer in enumerate(ms):
        with torch.no_grad():
            layer.A.mul_(j + 1)
    params, bufs = torch.func.stack_module_state(ms)
    base = copy.deepcopy(m).to("meta")
    got = torch.func.vmap(lambda p, b, x: torch.func.functional_call(base, (p, b), (x,)),
                          in_dims=(0, 0, None))(params, bufs, xs[0])
    torch.testing.assert_close(got, torch.stack([layer(xs[0]) for layer in ms]),
                               rtol=1e-12, atol=1e-12)


def test_state_written_under_a_transform_is_usable_after_it():
    """aux_loss and the router statistics written inside torch.func.grad used to stay
    wrapped after it: deepcopy, torch.save and moe_aux_loss then failed."""
    m = einc.BTTMoE(16, 16, experts=4, k=2)
    with torch.no_grad():
        m.router.weight.normal_()
    x = torch.randn(5, 16)
    params = dict(m.named_parameters())
    got = grad(lambda p: functional_call(m, p, (x,)).sum() + einc.moe_aux_loss(m))(params)
    value = einc.moe_aux_loss(m)
    assert not torch._C._functorch.is_functorch_wrapped_tensor(value)
    stats = m.router_stats()
    copy.deepcopy(m)
    torch.save(m, io.BytesIO())
    (m(x).sum() + einc.moe_aux_loss(m)).backward()  # the aux loss counted inside grad too
    for name, p in m.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(value, m.aux_loss.detach())
    torch.testing.assert_close(stats["load"], m.router_stats()["load"])

def test_torch_compile_runs_the_layer_and_its_backward():
    m = einc.BTTMoE(16, 16, experts=4, k=2)
    with torch.no_grad():
        m.router.weight.normal_()
    x = torch.randn(6, 16)
    want = m.forward_masked(x)
    xg = x.clone().requires_grad_()
    y = torch.compile(m, backend="aot_eager")(xg)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert xg.grad is not None and m.A.grad is not None and m.router.weight.grad is not None
    # an explicit backend is traced too; grouped_mm's probe runs outside the trace
    idx, gate = route(torch.randn(6, 4), 2)
    xs = x.view(6, *m.input_sizes)
    f = torch.compile(lambda t: btt_moe_sparse(t, m.A, m.B, idx, gate, backend="strided"),
                      backend="aot_eager")
    torch.testing.assert_close(f(xs), btt_moe_masked(xs, m.A, m.B, idx, gate),
                               rtol=1e-5, atol=1e-5)


def test_inductor_gives_the_router_its_gradient():
    """With the aux loss computed inside the compiled graph next to the routing, inductor
    (CPU) produced a backward giving the router a zero gradient and x a wrong one (E = 4);
    the aux loss now runs eagerly between graphs."""
    torch.manual_seed(0)
    m = einc.BTTMoE(64, 64, experts=4, k=2)
    with torch.no_grad():
        m.router.weight.normal_(0, 0.1)
    x = torch.randn(7, 64)

    def step(f):
        m.zero_grad()
        xx = x.clone().requires_grad_()
        (f(xx).square().sum() + einc.moe_aux_loss(m)).backward()
        return [xx.grad] + [p.grad.clone() for p in m.parameters()]

    want = step(m)
    torch._dynamo.reset()
    for got, ref in zip(step(torch.compile(m)), want):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_moe_aux_loss_with_a_layer_skipped_under_torch_compile():
    """Compiled, the routing's marker node used to be traced away, so a layer skipped this
    step gave its freed aux loss with a gradient and the backward failed."""
    torch.manual_seed(0)
    m = einc.BTTMoE(32, 32, experts=4, k=2)
    f = torch.compile(m, backend="aot_eager")
    x = torch.randn(8, 32, requires_grad=True)
    (f(x).sum() + moe_aux_loss(m)).backward()
    assert not moe_aux_loss(m).requires_grad  # its graph is gone
    (x.sum() + moe_aux_loss(m)).backward()  # the layer skipped: failed on a freed graph
    f(x).sum().backward()  # a backward of the output alone frees it too
    assert not moe_aux_loss(m).requires_grad
    y = f(x)
    assert moe_aux_loss(m).requires_grad  # a fresh forward's aux loss keeps its gradient
    (y.sum() + moe_aux_loss(m)).backward()


def test_torch_compile_is_not_taken_for_export(monkeypatch):
    """torch 2.11's dynamo answers torch.compiler.is_exporting() with True under every
    torch.compile: the compiled layer took the masked route and recorded no aux loss."""
    if not hasattr(torch.compiler, "_is_exporting_flag"):
        pytest.skip("this torch has no export flag to read (before 2.5)")
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    torch._dynamo.reset()
    m = einc.BTTMoE(32, 32, experts=4, k=2)
    y = torch.compile(m, backend="aot_eager")(torch.randn(8, 32, requires_grad=True))
    assert m.aux_loss is not None and m.aux_loss.requires_grad
    (y.sum() + moe_aux_loss(m)).backward()
    assert m.router.weight.grad is not None


@pytest.mark.parametrize("backend", ["chunked", "grouped_mm", "padded"])
def test_named_backends_run_under_torch_compile(backend):
    """A named backend runs eagerly between graphs as "auto" does: chunked's buffers and
    grouped_mm's fake kernel used to fail inside the trace."""
    if backend == "grouped_mm" and not GMM:
        pytest.skip("grouped_mm not available for float32 on this CPU build")
    m = einc.BTTMoE(64, 64, experts=4, k=2, backend=backend)
    with torch.no_grad():
        m.router.weight.normal_()
    x = torch.randn(32, 64)
    want = m.forward_masked(x)
    torch._dynamo.reset()
    xg = x.clone().requires_grad_()
    y = torch.compile(m, backend="aot_eager")(xg)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert xg.grad is not None and m.router.weight.grad.abs().sum() > 0

def test_wrong_width_is_a_compile_error_and_autocast_inputs_run():
    m = einc.BTTMoE(16, 16, experts=4, k=2)
    with pytest.raises(einc.CompileError, match="last dimension 16"):
        m(torch.randn(3, 12))
    x = torch.randn(5, 16)
    want = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x.bfloat16().requires_grad_())
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
    # autocast leaves float64 alone: a float64 input to a float32 layer is refused, as
    # outside autocast (the router failed with torch's own message)
    with torch.autocast("cpu", dtype=torch.bfloat16), \
            pytest.raises(einc.CompileError, match="input dtype torch.float64 differs"):
        m(x.double())


def test_numpy_integer_sizes_are_accepted():
    np = pytest.importorskip("numpy")
    m = einc.BTTMoE(np.int64(16), np.int64(16), experts=np.int64(4), k=np.int32(2))
    assert (m.in_features, m.experts, m.k) == (16, 4, 2) and type(m.k) is int


def test_non_strict_export_does_not_recurse(monkeypatch):
    """torch.export (non-strict) reports compiling but does not honour compiler.disable: the
    eager fallback must name a concrete backend instead of coming back to "auto"."""
    import einc.moe.dispatch as dispatch
    monkeypatch.setattr(dispatch, "tracing", lambda: True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x, A, B, W, b = make_problem(6, 2, 3, 2, 3, 4, 2)
    idx, gate = route(x.reshape(6, -1) @ W.t() + b, 2)
    got = btt_moe_sparse(x, A, B, idx, gate)
    torch.testing.assert_close(got, btt_moe_masked(x, A, B, idx, gate), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------
# CUDA (skipped without a GPU): the GPU backends against a float64 CPU reference
# ---------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA_BACKENDS = ["auto", "grouped_mm", "strided", "padded", "triton"]


def _rel(u, v):
    u, v = u.detach().double(), v.detach().double()
    return float((u - v).norm() / v.norm().clamp_min(1e-30))


@cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("N,E,k", [(1000, 8, 2), (37, 4, 4), (0, 8, 2), (513, 16, 1)])
def test_cuda_sparse_matches_float64_reference(dtype, tol, backend, N, E, k):
    g, a, f, e = 8, 16, 16, 8  # 16-byte aligned strides in both dtypes
    x, A, B, W, b = make_problem(N, g, a, f, e, E, k, seed=N + E, dtype=DT)
    ref, rgrads, idx, gate = forward_and_grads(btt_moe_masked, x, A, B, W, b, k)
    if backend == "grouped_mm" and not grouped_mm_available(torch.device("cuda"), dtype):
        pytest.skip("grouped_mm unsupported here")
    dev = [t.detach().to("cuda", dtype).requires_grad_() for t in (x, A, B)]
    gate_d = gate.detach().to("cuda", dtype).requires_grad_()
    out = btt_moe_sparse(*dev, idx.cuda(), gate_d, backend=backend)
    assert out.device.type == "cuda" and out.dtype == dtype
    if N == 0:
        assert out.shape == (0, f, e)
        return
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    grads = torch.autograd.grad(out, [*dev, gate_d], go.to("cuda", dtype))
    # reference gradients for x, A, B and the gates, in float64 on the CPU
    xr, Ar, Br = (t.detach().requires_grad_() for t in (x, A, B))
    gr = gate.detach().requires_grad_()
    want = btt_moe_masked(xr, Ar, Br, idx, gr)
    wgrads = torch.autograd.grad(want, [xr, Ar, Br, gr], go)
    assert _rel(out.cpu(), want) < tol
    for name, u, v in zip("x A B gate".split(), grads, wgrads):
        assert torch.isfinite(u).all(), name
        assert _rel(u.cpu(), v) < tol, name


@cuda
def test_cuda_layer_trains_and_matches_masked():
    torch.manual_seed(0)
    m = BTTMoE(256, 192, experts=8, k=2, device="cuda")
    with torch.no_grad():
        m.router.weight.normal_(0, 0.05)
    x = torch.randn(4, 300, 256, device="cuda", requires_grad=True)
    y = m(x)
    ym = m.forward_masked(x)
    assert _rel(y, ym) < 2e-3
    params = [x, *m.parameters()]
    gs = torch.autograd.grad((y ** 2).sum() + m.aux_loss, params)
    gm = torch.autograd.grad((m.forward_masked(x) ** 2).sum() + m.aux_loss, params)
    for u, v in zip(gs, gm):
        assert _rel(u, v) < 2e-3
    stats = m.router_stats()
    assert abs(float(stats["load"].sum()) - 1.0) < 1e-5


@cuda
def test_cuda_deterministic_bitwise():
    x, A, B, W, b = make_problem(2000, 8, 16, 16, 8, 8, 2, seed=3, dtype=torch.float32)
    dev = [t.detach().cuda().requires_grad_() for t in (x, A, B)]
    idx, gate = route((x.reshape(2000, -1) @ W.t()).detach().cuda(), 2)
    runs = []
    for _ in range(2):
        out = btt_moe_sparse(*dev, idx, gate, deterministic=True)
        runs.append([out, *torch.autograd.grad(out.square().sum(), dev)])
    for u, v in zip(*runs):
        assert torch.equal(u, v)



def _cuda_layer(seed=0, **kw):
    torch.manual_seed(seed)
    # 16 x 16 cores both sides: strides of 16-byte multiples, which grouped_mm needs
    m = BTTMoE(256, 256, experts=8, k=2, device="cuda", **kw)
    with torch.no_grad():
        m.router.weight.normal_(0, 0.05)
        m.bias.normal_()
    return m


def _step(f, m, x):
    """Output, and the gradients of x and every parameter, of one step through f."""
    m.zero_grad()
    xx = x.detach().clone().requires_grad_()
    y = f(xx)
    (y.float().square().sum() + einc.moe_aux_loss(m)).backward()
    return [y, xx.grad] + [p.grad.clone() for p in m.parameters()]


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["auto", "padded", "triton", "grouped_mm", "strided"])
def test_cuda_autocast_runs_the_experts_in_low_precision(dtype, backend):
    """Every backend's output in autocast's dtype: autocast's float32 rule for sum on CUDA
    gave the padded backend's float16 output back in float32."""
    if backend == "grouped_mm" and not grouped_mm_available(torch.device("cuda"), dtype):
        pytest.skip("grouped_mm unsupported here")
    m = _cuda_layer(backend=backend)
    x = torch.randn(3, 200, 256, device="cuda")
    want = _step(m, m, x)
    with torch.autocast("cuda", dtype=dtype):
        got = _step(m, m, x)
        masked = m.forward_masked(x)
    assert got[0].dtype == masked.dtype == dtype
    assert _rel(got[0], want[0]) < 3e-2 and _rel(masked, want[0]) < 3e-2
    for name, u, v in zip(["x"] + [n for n, _ in m.named_parameters()], got[1:], want[1:]):
        assert u.dtype == v.dtype and torch.isfinite(u).all(), name
        assert _rel(u, v) < 5e-2, name


@cuda
@pytest.mark.parametrize("backend", ["auto", "triton", "padded"])
def test_cuda_torch_compile_matches_eager(backend):
    """Inductor on the GPU: output and every gradient (router included) as in eager."""
    m = _cuda_layer(backend=backend)
    x = torch.randn(2, 300, 256, device="cuda")
    want = _step(m, m, x)
    torch._dynamo.reset()
    got = _step(torch.compile(m), m, x)
    for u, v in zip(got, want):
        assert _rel(u, v) < 1e-4
    assert got[2 + [n for n, _ in m.named_parameters()].index("router.weight")].abs().sum() > 0


@cuda
@pytest.mark.parametrize("train", [True, False])
def test_cuda_auto_measures_once_and_picks_a_candidate(train, monkeypatch):
    import einc.moe.dispatch as dispatch

    calls = []
    measure = dispatch.measure_backends
    monkeypatch.setattr(dispatch, "_AUTO", {})
    monkeypatch.setattr(dispatch, "measure_backends",
                        lambda names, *a, **kw: calls.append(names) or measure(names, *a, **kw))
    x, A, B, W, b = make_problem(700, 8, 16, 16, 8, 8, 2, seed=4, dtype=torch.float32)
    idx, gate = route(x.reshape(700, -1) @ W.t() + b, 2)
    dev = [t.detach().cuda().requires_grad_(train) for t in (x, A, B)]
    with torch.set_grad_enabled(train):
        for _ in range(2):  # the second call finds the measured choice cached
            out = btt_moe_sparse(*dev, idx.cuda(), gate.cuda(), backend="auto")
    # E = 8 <= 4k: the masked computation is timed too, after the sparse backends
    assert len(calls) == 1 and calls[0][-2:] == ["padded", "masked"] and "triton" in calls[0]
    chosen, = dispatch._AUTO.values()
    assert chosen in calls[0]
    assert _rel(out.cpu(), btt_moe_masked(x.float(), A.float(), B.float(), idx, gate)) < 2e-3
    # deterministic: nothing is timed, the first candidate runs
    btt_moe_sparse(*dev, idx.cuda(), gate.cuda(), deterministic=True)
    assert len(calls) == 1


@pytest.mark.skipif(not GMM, reason="grouped_mm not available for float32 on this CPU build")
def test_grouped_mm_splits_calls_over_the_group_limit(monkeypatch):
    """More (core index, expert) groups than one grouped_mm call takes: several calls."""
    import einc.moe.dispatch as dispatch

    monkeypatch.setattr(dispatch, "GMM_MAX_GROUPS", 6)  # E = 4: one core index per call
    x, A, B, W, b = make_problem(29, 4, 8, 4, 8, 4, 2, seed=2, dtype=torch.float32)
    om, gm, _, _ = forward_and_grads(btt_moe_masked, x, A, B, W, b, 2)
    fn = lambda *t: btt_moe_sparse(*t, backend="grouped_mm")  # noqa: E731
    assert_same((om, gm), forward_and_grads(fn, x, A, B, W, b, 2)[:2], tol=1e-4)


@cuda
@pytest.mark.parametrize("backend", ["auto", "grouped_mm", "triton"])
def test_cuda_more_groups_than_one_grouped_mm_call(backend):
    g, a, f, e, E, k = 80, 8, 72, 8, 16, 2  # 1280 and 1152 (core index, expert) groups
    x, A, B, W, b = make_problem(300, g, a, f, e, E, k, seed=9, dtype=DT)
    ref, _, idx, gate = forward_and_grads(btt_moe_masked, x, A, B, W, b, k)
    if backend == "grouped_mm" and not grouped_mm_available(torch.device("cuda"), torch.float32):
        pytest.skip("grouped_mm unsupported here")
    dev = [t.detach().to("cuda", torch.float32).requires_grad_() for t in (x, A, B)]
    out = btt_moe_sparse(*dev, idx.cuda(), gate.detach().cuda().float(), backend=backend)
    assert _rel(out.cpu(), ref) < 2e-3
    grads = torch.autograd.grad(out.square().sum(), dev)
    assert all(torch.isfinite(t).all() for t in grads)


def test_measure_backends_times_each_and_leaves_the_caller_alone():
    import einc.moe.dispatch as dispatch

    torch.manual_seed(5)
    before = torch.randn(3)
    torch.manual_seed(5)
    chosen = dispatch.measure_backends(["padded", "triton"], (2, 4, 3, 4, 4, 2), torch.float32,
                                       torch.device("cpu"), tokens=16, train=True, reps=1)
    assert chosen in ("padded", "triton")
    assert torch.equal(torch.randn(3), before)  # random stream untouched
    assert dispatch.measure_backends(["padded"], (2, 4, 3, 4, 4, 2), torch.float32,
                                     torch.device("cpu"), tokens=16, train=False, reps=1) == "padded"
    # a backend that cannot run here (grouped_mm refuses float64) is left out, not fatal
    assert dispatch.measure_backends(["grouped_mm", "padded"], (2, 4, 3, 4, 4, 2), torch.float64,
                                     torch.device("cpu"), tokens=16, train=True, reps=1) == "padded"
    with pytest.raises(einc.CompileError, match="grouped_mm cannot run"):
        dispatch.measure_backends(["grouped_mm"], (2, 4, 3, 4, 4, 2), torch.float64,
                                  torch.device("cpu"), tokens=16, train=True, reps=1)


@pytest.mark.parametrize("E, k, masked", [(8, 2, True), (9, 2, False), (4, 1, True),
                                           (16, 2, False), (16, 4, True)])
def test_gpu_candidates_time_the_masked_computation_for_few_experts(E, k, masked):
    import einc.moe.dispatch as dispatch

    x, A, B, _, _ = make_problem(10, 2, 4, 3, 4, E, k)
    names = dispatch._gpu_candidates(x, 2, 4, 3, 4, E, k)
    assert ("masked" in names) == masked and names[-1] == ("masked" if masked else "padded")


def test_measured_masked_choice_computes_the_masked_result():
    """auto may pick "masked" (measured fastest): the measurement runs it, and the layer's
    dispatch then computes every expert, bias and gradients included."""
    import einc.moe.dispatch as dispatch

    # grouped_mm refuses float64, so only the masked computation is left to time
    assert dispatch.measure_backends(["grouped_mm", "masked"], (2, 4, 3, 4, 4, 2), torch.float64,
                                     torch.device("cpu"), tokens=16, train=True, reps=1) == "masked"
    x, A, B, W, b = make_problem(37, 2, 4, 3, 4, 8, 2, seed=3)
    bias = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    idx, gate = route(x.reshape(37, -1) @ W.t() + b, 2)
    got = dispatch._run_backend(x, A, B, idx, gate, False, "masked", bias)
    want = btt_moe_masked(x, A, B, idx, gate) + bias
    assert torch.equal(got, want)
    ga = torch.autograd.grad(got.square().sum(), (x, A, B, W, bias), retain_graph=True)
    gb = torch.autograd.grad(want.square().sum(), (x, A, B, W, bias))
    assert all(torch.equal(u, v) for u, v in zip(ga, gb))


def test_auto_backend_off_the_cpu_is_measured_once_per_shape(monkeypatch):
    import einc.moe.dispatch as dispatch

    calls = []

    def fake_measure(names, sizes, dtype, device, tokens, train, reps=3, like=None):
        calls.append((tuple(names), sizes, tokens, train))
        return names[-1]

    monkeypatch.setattr(dispatch, "_AUTO", {})
    monkeypatch.setattr(dispatch, "measure_backends", fake_measure)
    monkeypatch.setattr(dispatch, "_gpu_candidates", lambda *a: ["triton", "padded"])
    x, A, B, W, b = make_problem(300, 2, 4, 3, 4, 4, 2)
    assert dispatch._auto_backend(x, A, B, 2) == "padded"
    assert dispatch._auto_backend(x[:260], A, B, 2) == "padded"  # same bucket: cached
    assert len(calls) == 1 and calls[0] == (("triton", "padded"), (2, 4, 3, 4, 4, 2), 512, True)
    with torch.no_grad():
        dispatch._auto_backend(x, A, B, 2)  # inference is measured apart
    assert len(calls) == 2 and calls[1][3] is False
    monkeypatch.setattr(dispatch, "_gpu_candidates", lambda *a: ["padded"])
    assert dispatch._auto_backend(x[:5], A, B, 2) == "padded" and len(calls) == 2  # nothing to compare
    monkeypatch.setattr(dispatch, "_gpu_candidates", lambda *a: ["triton", "padded"])
    assert dispatch._auto_backend(x[:5], A, B, 2, deterministic=True) == "triton"  # fixed, not timed
    assert len(calls) == 2


def test_auto_backend_measures_with_the_cores_layout(monkeypatch):
    """What a backend copies depends on how the cores are laid out (BTTMoE stores them
    expert-major): the measurement uses the caller's layout, and each layout is measured
    apart."""
    import einc.moe.dispatch as dispatch

    seen = []
    real = dispatch.measure_backends

    def spy(names, sizes, dtype, device, tokens, train, reps=3, like=None):
        seen.append(tuple(t.stride() for t in like))
        return real(names, sizes, dtype, device, tokens, train, reps=1, like=like)

    monkeypatch.setattr(dispatch, "_AUTO", {})
    monkeypatch.setattr(dispatch, "measure_backends", spy)
    monkeypatch.setattr(dispatch, "_gpu_candidates", lambda *a: ["padded", "masked"])
    m = BTTMoE(12, 12, experts=4, k=2)
    x = torch.randn(20, 3, 4, requires_grad=True)
    A, B = m.A.detach().requires_grad_(), m.B.detach().requires_grad_()
    dispatch._auto_backend(x, A, B, 2)
    Ac, Bc = A.detach().contiguous().requires_grad_(), B.detach().contiguous().requires_grad_()
    dispatch._auto_backend(x, Ac, Bc, 2)
    dispatch._auto_backend(x, A, B, 2)  # cached
    assert seen == [(A.stride(), B.stride()), (Ac.stride(), Bc.stride())]
    assert A.stride() != Ac.stride()
    # the random cores the backends are timed on have that layout
    timed = []
    masked = dispatch._masked
    monkeypatch.setattr(dispatch, "_masked", lambda x, A, B, *rest, **kw:
                        timed.append((A.stride(), B.stride())) or masked(x, A, B, *rest, **kw))
    real(["masked"], (3, 4, 3, 4, 4, 2), torch.float32, torch.device("cpu"), 16, True, reps=1,
         like=(A, B))
    assert timed and set(timed) == {(A.stride(), B.stride())}


def test_auto_backend_measures_inside_activation_checkpointing(monkeypatch):
    """The first call of a layer may sit in a checkpointed block: the measurement's own
    forward and backward must not count as tensors of the checkpointed forward."""
    import einc.moe.dispatch as dispatch
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setattr(dispatch, "_AUTO", {})
    monkeypatch.setattr(dispatch, "_gpu_candidates", lambda *a: ["triton", "padded"])
    x, A, B, W, b = make_problem(40, 2, 4, 3, 4, 4, 2)
    idx, gate = route((x.reshape(40, -1) @ W.t()).detach(), 2)

    def block(x, A, B):
        backend = dispatch._auto_backend(x, A, B, 2)
        return btt_moe_sparse(x, A, B, idx, gate.detach(), backend=backend).square().sum()

    loss = checkpoint(block, x, A, B, use_reentrant=False)
    loss.backward()
    assert x.grad is not None and len(dispatch._AUTO) == 1


@pytest.mark.parametrize("bias", [False, True])
def test_outputs_are_contiguous(bias):
    """As nn.Linear's: with padded outputs and no bias the result was a strided slice."""
    m = BTTMoE(64, 47, experts=4, k=2, bias=bias)
    assert m.output_sizes[0] * m.output_sizes[1] > 47
    for y in (m(torch.randn(2, 5, 64)), m.forward_masked(torch.randn(2, 5, 64))):
        assert y.shape == (2, 5, 47) and y.is_contiguous()


def test_deterministic_algorithms_make_the_dispatch_deterministic(monkeypatch):
    """torch.use_deterministic_algorithms(True) asks every operation for repeatable bits:
    the sparse dispatch takes its deterministic mode (no index_add_, no timed choice)."""
    from einc.moe import dispatch
    seen = []
    real = dispatch._run
    monkeypatch.setattr(dispatch, "_run", lambda *a: seen.append(a[5]) or real(*a))
    m = BTTMoE(16, 16, experts=4, k=2)
    x = torch.randn(5, 16)
    m(x)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        m(x)
    finally:
        torch.use_deterministic_algorithms(before)
    assert seen == [False, True]


def test_forward_mode_ad():
    """Dual tensors take plain torch ops (the chunked backend has no jvp); the tangent
    equals torch.func.jvp of the masked reference."""
    import torch.autograd.forward_ad as fwAD
    torch.manual_seed(0)
    m = BTTMoE(16, 12, experts=4, k=2, dtype=torch.float64)
    with torch.no_grad():
        m.router.weight.normal_()
    x, t = torch.randn(7, 16, dtype=torch.float64), torch.randn(7, 16, dtype=torch.float64)
    with fwAD.dual_level():
        y, tangent = fwAD.unpack_dual(m(fwAD.make_dual(x, t)))
    want_y, want_t = torch.func.jvp(m.forward_masked, (x,), (t,))
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(tangent, want_t)
    # inside a dual level without dual tensors nothing changes: a skipped layer's aux loss
    # still settles, and routing indices are still checked
    head = torch.nn.Linear(12, 1, dtype=torch.float64)
    with fwAD.dual_level():
        (head(m(x)).square().mean() + moe_aux_loss(m)).backward()
        (head(x[:, :12]).square().mean() + moe_aux_loss(m)).backward()
        with pytest.raises(einc.CompileError, match=r"\[0, 3\]"):
            btt_moe_sparse(x.view(7, 4, 4), m.A, m.B, torch.full((7, 2), 9), torch.ones(7, 2))


@pytest.mark.parametrize("bias", [None, "yes", 2, 1.0])
def test_bias_must_be_a_bool(bias):
    """nn.Linear reads bias by its truth; einc refuses what is not True or False (None used
    to fail inside the parameter count with a TypeError), taking numpy bools and 0/1."""
    for make in (lambda: einc.BTTMoE(16, 16, experts=4, k=2, bias=bias),
                 lambda: einc.compile("bttmoe(experts=4, k=2)", 16, bias=bias),
                 lambda: einc.compile("btt", 16, bias=bias)):
        with pytest.raises(einc.CompileError, match="bias must be True or False"):
            make()
    import numpy as np

    for ok, has in ((1, True), (0, False), (np.bool_(True), True)):
        assert (einc.BTTMoE(16, 16, experts=4, k=2, bias=ok).bias is not None) is has
        assert (einc.compile("btt", 16, bias=ok).bias is not None) is has


def test_a_bttmoe_layer_is_built_only_from_the_presets_structure():
    import dataclasses
    s = einc.parse("bttmoe(experts=4, k=2)")
    A, B = s.factors  # B's axes in another order: the same sizes, another structure
    other = dataclasses.replace(s, factors=(A, dataclasses.replace(B, indices=("g", "f", "r", "e"))))
    with pytest.raises(einc.CompileError, match=r"structure of the bttmoe preset.*bttmoe\(cores=2\)"):
        einc.compile(other, 16)


def test_nested_tensor_input_is_a_clear_error():
    nt = torch.nested.nested_tensor([torch.randn(2, 16), torch.randn(3, 16)])
    for layer in (einc.BTTMoE(16, 16, experts=4, k=2), einc.compile("btt", 16)):
        with pytest.raises(einc.CompileError, match="nested tensors are not supported"):
            layer(nt)


@pytest.mark.parametrize("device", ["nope", 99, "cuda:99"] + (
    [] if torch.cuda.is_available() else ["cuda"]))
def test_an_unusable_device_is_refused(device):
    # torch's parse error or 'Torch not compiled with CUDA enabled' came out of the layer
    with pytest.raises(einc.CompileError, match=f"device must be None or one of cpu, meta.*"
                                                f"got {device!r}"):
        einc.BTTMoE(16, 16, experts=4, k=2, device=device)


def test_an_input_on_another_device_is_a_clear_error():
    # 'Tensor on device cpu is not on the expected device meta!' came out of forward
    m = einc.BTTMoE(16, 16, experts=4, k=2, device="meta")
    for call in (m, m.forward_masked):
        with pytest.raises(einc.CompileError, match="input on device cpu differs from the "
                                                    "layer's meta"):
            call(torch.randn(3, 16))
    with pytest.raises(einc.CompileError, match="input on device meta differs from the "
                                                "layer's cpu"):
        einc.BTTMoE(16, 16, experts=4, k=2)(torch.empty(3, 16, device="meta"))


@pytest.mark.parametrize("layout", ["to_sparse", "to_sparse_csr"])
def test_a_sparse_input_is_a_clear_error(layout):
    # 'reshape is not implemented for sparse tensors' came out of forward
    m = einc.BTTMoE(16, 16, experts=4, k=2)
    with pytest.raises(einc.CompileError, match="input layout torch.sparse_.* is not "
                                                "supported, only torch.strided"):
        m(getattr(torch.randn(3, 16), layout)())
    assert m.aux_loss is None  # refused before routing


def test_a_replaced_core_of_another_shape_is_named():
    m = einc.BTTMoE(16, 16, experts=4, k=2)
    m(torch.randn(5, 16))
    aux, stats = m.aux_loss, m.router_stats()
    m.A = torch.nn.Parameter(torch.randn(4, 2, 4, 4))  # g * a = 8, not 16
    with pytest.raises(einc.CompileError, match=r"core A of this BTT-MoE layer has shape "
                                                r"\(4, 2, 4, 4\), expected \(4, 4, 4, 4\)"):
        m(torch.randn(3, 16))
    assert m.aux_loss is aux and m.router_stats()["tokens"] == stats["tokens"] == 5


def test_deferred_initialisation_keeps_the_router_at_zero():
    """Deferred init (meta, to_empty, then every module's reset_parameters, as FSDP does)
    reset the router after the layer, with nn.Linear's random init instead of zeros."""
    with torch.device("meta"):
        model = nn.Sequential(einc.BTTMoE(16, 16, experts=4, k=2))
    model.to_empty(device="cpu")
    for module in model.modules():  # parents first: the router comes after its layer
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    router = model[0].router
    assert isinstance(router, nn.Linear)
    assert not router.weight.any() and not router.bias.any()


@pytest.mark.parametrize("cores", [2, 3])
def test_forward_mode_hessian_through_the_layer(cores):
    """A hessian with a forward-mode outer jacobian (vectorized) failed: the routing
    marker's jvp was not taken for a view, and the two-core plain path's advanced-indexing
    backward could not run under the batched tangents."""
    from torch.autograd.functional import hessian

    torch.manual_seed(0)
    m = BTTMoE(8, 8, experts=3, k=2, cores=cores, dtype=torch.float64)
    with torch.no_grad():
        m.router.weight.normal_()
    x = torch.randn(3, 8, dtype=torch.float64)
    f = lambda v: m(v).pow(2).sum()
    got = hessian(f, x, vectorize=True, outer_jacobian_strategy="forward-mode")
    torch.testing.assert_close(got, hessian(f, x))
