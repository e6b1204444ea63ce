"""Tests of the strided batched matmul kernel and its torch reference.

Without a GPU the Triton kernel runs under the Triton interpreter, which must
be switched on before triton decorates any kernel, hence the environment
variable is set at import time. Sizes stay small: the interpreter executes
every program in numpy, one after another.
"""

import importlib
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from einc.kernels import (
    StridedBmmFunction,
    StridedBmmSpec,
    contiguous_strides,
    strided_bmm,
    strided_bmm_reference,
    triton_available,
)

# The package re-exports the function under the submodule's name.
sbmm_module = importlib.import_module("einc.kernels.strided_bmm")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@pytest.fixture
def kernel():
    """Skip unless the Triton kernel can run (GPU, or the interpreter on CPU)."""
    pytest.importorskip("triton")
    if not triton_available():
        pytest.skip("triton cannot run here")


@pytest.fixture
def kernel_grads_only(monkeypatch):
    """Make the torch fallback for gradients fail, proving the kernel computed them."""

    def _fail(*args, **kwargs):
        raise AssertionError("gradient fell back to the torch reference")

    monkeypatch.setattr(sbmm_module, "_reference_grads", _fail)


# ---------------------------------------------------------------------------
# Random problems
# ---------------------------------------------------------------------------


def random_layout(shape, gen, dtype=torch.float32, pad=False):
    """A tensor of logical ``shape`` stored with its axes in a random order.

    With ``pad`` every axis is sliced out of a bigger one (gaps and a nonzero
    storage offset), so the layout is not dense either.
    """
    perm = torch.randperm(len(shape), generator=gen).tolist()
    phys = [shape[p] for p in perm]
    if pad:
        base = torch.randn([s + 2 for s in phys], generator=gen, dtype=torch.float64)
        t = base[tuple(slice(1, 1 + s) for s in phys)]
    else:
        t = torch.randn(phys, generator=gen, dtype=torch.float64)
    t = t.to(dtype=dtype, device=DEVICE)
    inverse = sorted(range(len(perm)), key=perm.__getitem__)
    return t.permute(inverse)


def random_strides(shape, gen):
    """Dense strides for ``shape`` in a random axis order."""
    perm = torch.randperm(len(shape), generator=gen).tolist()
    phys_strides = contiguous_strides([shape[p] for p in perm])
    strides = [0] * len(shape)
    for pos, axis in enumerate(perm):
        strides[axis] = phys_strides[pos]
    return tuple(strides)


def random_groups(gen, max_axes=3, max_size=5):
    def group(lo, hi=max_size):
        n = int(torch.randint(lo, max_axes + 1, (1,), generator=gen))
        return tuple(int(s) for s in torch.randint(1, hi + 1, (n,), generator=gen))

    # Small batch axes: the interpreter runs one program per batch entry and tile.
    return group(0, 3), group(0), group(0), group(1)  # batch, m, n, k


def random_problem(seed, dtype=torch.float32, pad=None):
    """Random group split, random input layouts and a random output layout."""
    gen = torch.Generator().manual_seed(seed)
    batch, m, n, k = random_groups(gen)
    pad = bool(seed % 2) if pad is None else pad
    a = random_layout(batch + m + k, gen, dtype, pad)
    b = random_layout(batch + k + n, gen, dtype, pad)
    spec = StridedBmmSpec.from_views(
        a, b, batch_ndim=len(batch), k_ndim=len(k), c_strides=random_strides(batch + m + n, gen)
    )
    return a, b, spec


def einsum_reference(a, b, spec):
    """float64 einsum over the logical views, the ground truth of every test."""
    nb, nm, nn, nk = (len(spec.batch_sizes), len(spec.m_sizes), len(spec.n_sizes), len(spec.k_sizes))
    names = iter(LETTERS)
    bt, mt, nt, kt = ("".join(next(names) for _ in range(n)) for n in (nb, nm, nn, nk))
    av = torch.as_strided(a, spec.a_shape, spec.a_strides, a.storage_offset())
    bv = torch.as_strided(b, spec.b_shape, spec.b_strides, b.storage_offset())
    return torch.einsum(f"{bt}{mt}{kt},{bt}{kt}{nt}->{bt}{mt}{nt}", av.double(), bv.double())


def close(actual, expected, dtype=torch.float32):
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-4, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------
# Reference path (no triton needed)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_reference_matches_einsum(seed):
    a, b, spec = random_problem(seed, torch.float64)
    c = strided_bmm_reference(a, b, spec)
    assert c.shape == spec.c_shape and c.stride() == spec.c_strides
    close(c, einsum_reference(a, b, spec), torch.float64)
    c2 = strided_bmm(a, b, spec, backend="torch")
    close(c2, c, torch.float64)


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, einc.kernels as k\n"
        "assert not k.triton_available()\n"
        "s = k.StridedBmmSpec((), (2,), (2,), (2,), a_strides=(2, 1), b_strides=(2, 1))\n"
        "x = torch.eye(2).reshape(-1)\n"
        "assert torch.equal(k.strided_bmm(x, x, s), torch.eye(2))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)


def test_auto_backend_without_triton_uses_reference(monkeypatch):
    monkeypatch.setattr(sbmm_module, "triton_available", lambda: False)
    a, b, spec = random_problem(3)
    close(strided_bmm(a, b, spec), einsum_reference(a, b, spec))
    with pytest.raises(RuntimeError, match="triton backend unavailable"):
        strided_bmm(a, b, spec, backend="triton")


def test_spec_validation():
    with pytest.raises(ValueError, match="a_strides has"):
        StridedBmmSpec((2,), (3,), (4,), (5,), a_strides=(1, 1), b_strides=(1, 1, 1))
    with pytest.raises(ValueError, match="negative"):
        StridedBmmSpec((), (3,), (4,), (5,), a_strides=(5, -1), b_strides=(4, 1))
    spec = StridedBmmSpec((), (3,), (4,), (5,), a_strides=(5, 1), b_strides=(4, 1))
    assert spec.c_strides == (4, 1) and (spec.batch, spec.m, spec.n, spec.k) == (1, 3, 4, 5)

    a, b = torch.randn(15), torch.randn(20)
    with pytest.raises(TypeError, match="dtype"):
        strided_bmm(a, b.double(), spec)
    with pytest.raises(ValueError, match="storage holds only"):
        strided_bmm(torch.randn(10), b, spec)
    with pytest.raises(ValueError, match="overlap"):
        bad = StridedBmmSpec((), (3,), (4,), (5,), a_strides=(5, 1), b_strides=(4, 1), c_strides=(1, 1))
        strided_bmm(a, b, bad)
    with pytest.raises(ValueError, match="broadcast"):
        bad = StridedBmmSpec((), (3,), (4,), (5,), a_strides=(5, 1), b_strides=(4, 1), c_strides=(0, 1))
        strided_bmm(a, b, bad)
    with pytest.raises(ValueError, match="needs an out"):
        strided_bmm(a, b, spec, accumulate=True)
    buf = torch.randn(40)
    with pytest.raises(ValueError, match="in-place"):
        strided_bmm(buf, b, spec, out=buf[10:])
    with pytest.raises(ValueError, match="backend"):
        strided_bmm(a, b, spec, backend="cuda")


# ---------------------------------------------------------------------------
# Kernel forward
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(16))
def test_kernel_random_layouts(kernel, seed):
    a, b, spec = random_problem(seed)
    c = strided_bmm(a, b, spec, backend="triton")
    assert c.shape == spec.c_shape and c.stride() == spec.c_strides
    close(c, einsum_reference(a, b, spec))


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (33, 17, 37), (31, 65, 16), (32, 32, 33)])
def test_kernel_edge_tiles(kernel, m, n, k):
    gen = torch.Generator().manual_seed(m * n * k)
    a = random_layout((2, m, k), gen)
    b = random_layout((2, k, n), gen)
    spec = StridedBmmSpec.from_views(a, b, batch_ndim=1, k_ndim=1, c_strides=random_strides((2, m, n), gen))
    close(strided_bmm(a, b, spec, backend="triton"), einsum_reference(a, b, spec))


def test_kernel_multi_axis_edges(kernel):
    # Group sizes that split the flat index unevenly across tile borders.
    gen = torch.Generator().manual_seed(7)
    a = random_layout((3, 5, 7, 3, 11), gen, pad=True)  # batch (3,), m (5, 7), k (3, 11)
    b = random_layout((3, 3, 11, 2, 9, 2), gen, pad=True)  # n (2, 9, 2)
    spec = StridedBmmSpec.from_views(a, b, batch_ndim=1, k_ndim=2, c_strides=random_strides((3, 5, 7, 2, 9, 2), gen))
    close(strided_bmm(a, b, spec, backend="triton"), einsum_reference(a, b, spec))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_kernel_dtypes(kernel, dtype):
    a, b, spec = random_problem(11, dtype)
    c = strided_bmm(a, b, spec, backend="triton")
    assert c.dtype == dtype
    close(c, einsum_reference(a, b, spec), dtype)


def test_kernel_accumulate_alpha_into_buffer(kernel):
    a, b, spec = random_problem(5)
    span = sbmm_module._span(spec.c_shape, spec.c_strides)
    buf = torch.randn(span + 10, device=DEVICE)
    before = buf.clone()
    out = buf[3:]  # nonzero storage offset
    old = torch.as_strided(out, spec.c_shape, spec.c_strides, out.storage_offset()).double().clone()

    c = strided_bmm(a, b, spec, out=out, alpha=0.5, accumulate=True, backend="triton")
    assert c.data_ptr() == out.data_ptr()
    close(c, old + 0.5 * einsum_reference(a, b, spec))
    assert torch.equal(buf[:3], before[:3]) and torch.equal(buf[3 + span :], before[3 + span :])

    c = strided_bmm(a, b, spec, out=out, alpha=-2.0, backend="triton")
    close(c, -2.0 * einsum_reference(a, b, spec))


def test_kernel_broadcast_stride0(kernel):
    gen = torch.Generator().manual_seed(2)
    # A is one weight matrix shared by every batch entry; B is shared along
    # the second batch axis only.
    w = random_layout((6, 5), gen)
    a = w.expand(3, 4, 6, 5)
    b = random_layout((3, 5, 7), gen).unsqueeze(1).expand(3, 4, 5, 7)
    spec = StridedBmmSpec.from_views(a, b, batch_ndim=2, k_ndim=1)
    assert spec.a_strides[:2] == (0, 0) and spec.b_strides[1] == 0
    close(strided_bmm(a, b, spec, backend="triton"), einsum_reference(a, b, spec))


def test_kernel_degenerate_sizes(kernel):
    a, b = torch.randn(12, device=DEVICE), torch.randn(12, device=DEVICE)
    empty_k = StridedBmmSpec((2,), (3,), (4,), (0,), a_strides=(3, 1, 1), b_strides=(4, 1, 1))
    c = strided_bmm(a, b, empty_k, backend="triton")
    assert torch.equal(c, torch.zeros(2, 3, 4, device=DEVICE))
    out = torch.ones(24, device=DEVICE)
    strided_bmm(a, b, empty_k, out=out, accumulate=True, backend="triton")
    assert torch.equal(out, torch.ones(24, device=DEVICE))
    empty_m = StridedBmmSpec((2,), (0,), (4,), (3,), a_strides=(3, 3, 1), b_strides=(12, 4, 1))
    assert strided_bmm(a, torch.randn(24, device=DEVICE), empty_m, backend="triton").shape == (2, 0, 4)


def test_group_merging(kernel):
    # Five m axes that are contiguous in both A and C merge into one.
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(2, 2, 2, 2, 3, 5, generator=gen).to(DEVICE)
    b = torch.randn(5, 4, generator=gen).to(DEVICE)
    spec = StridedBmmSpec.from_views(a, b, batch_ndim=0, k_ndim=1)
    problem = sbmm_module._make_problem(sbmm_module._spec_axes(spec), "a", "b", "c")
    assert len(problem.groups["m"]) == 1
    close(strided_bmm(a, b, spec, backend="triton"), einsum_reference(a, b, spec))

    # Four m axes scrambled in A cannot merge: the kernel refuses, auto falls back.
    phys = torch.randn(3, 3, 5, 2, 2, generator=gen).to(DEVICE)  # (m3, m1, k, m2, m0)
    a4 = phys.permute(4, 1, 3, 0, 2)  # logical (m0, m1, m2, m3, k)
    b4 = torch.randn(5, 4, generator=gen).to(DEVICE)
    spec4 = StridedBmmSpec.from_views(a4, b4, batch_ndim=0, k_ndim=1)
    assert len(sbmm_module._make_problem(sbmm_module._spec_axes(spec4), "a", "b", "c").groups["m"]) == 4
    with pytest.raises(ValueError, match="cannot be merged"):
        strided_bmm(a4, b4, spec4, backend="triton")
    close(strided_bmm(a4, b4, spec4), einsum_reference(a4, b4, spec4))


# ---------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_gradients_match_reference(kernel, kernel_grads_only, seed):
    a, b, spec = random_problem(seed, torch.float64, pad=False)
    gen = torch.Generator().manual_seed(100 + seed)
    weight = torch.randn(spec.c_shape, generator=gen, dtype=torch.float64).to(DEVICE)

    def run(fn):
        a_leaf = a.detach().clone().requires_grad_()  # clone keeps the permuted layout
        b_leaf = b.detach().clone().requires_grad_()
        s = StridedBmmSpec.from_views(a_leaf, b_leaf, batch_ndim=len(spec.batch_sizes),
                                      k_ndim=len(spec.k_sizes), c_strides=spec.c_strides)  # fmt: skip
        c = fn(a_leaf, b_leaf, s)
        ((c * weight).sum() + 0.5 * c.sum()).backward()  # dC is dense + broadcast parts
        return c.detach(), a_leaf.grad, b_leaf.grad

    c_k, ga_k, gb_k = run(lambda x, y, s: StridedBmmFunction.apply(x, y, s, 1.5))
    c_r, ga_r, gb_r = run(lambda x, y, s: strided_bmm_reference(x, y, s, alpha=1.5))
    close(c_k, c_r, torch.float64)
    close(ga_k, ga_r, torch.float64)
    close(gb_k, gb_r, torch.float64)


def test_gradients_flat_buffers_and_broadcast(kernel, kernel_grads_only):
    # A: weights (k, m) shared across a batch of 3 (stride 0), read from a flat
    # buffer whose tail it never reads; B: activations stored (n, batch, k). Each gradient is one kernel
    # launch; the broadcast batch axis becomes a reduced axis of dA.
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(5 * 4 + 3, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()  # tail unused
    x = torch.randn(6, 3, 5, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    spec = StridedBmmSpec(
        batch_sizes=(3,), m_sizes=(4,), n_sizes=(6,), k_sizes=(5,),
        a_strides=(0, 1, 4), b_strides=(5, 1, 15), c_strides=(1, 18, 3),
    )  # fmt: skip
    c = strided_bmm(w, x, spec)
    g = torch.randn(spec.c_shape, generator=gen, dtype=torch.float64).to(DEVICE)
    ga, gb = torch.autograd.grad(c, (w, x), g)

    w_r, x_r = w.detach().requires_grad_(), x.detach().requires_grad_()
    ref = torch.einsum("km,nbk->bmn", w_r[:20].view(5, 4), x_r)
    ga_r, gb_r = torch.autograd.grad(ref, (w_r, x_r), g)
    close(c, ref, torch.float64)
    close(ga, ga_r, torch.float64)
    close(gb, gb_r, torch.float64)


def test_gradients_fallback_when_kernel_cannot_write(kernel):
    # A reads overlapping windows of a 1-D signal (stride 1 on both m and k):
    # its gradient would need atomic adds, so the torch reference takes over.
    gen = torch.Generator().manual_seed(5)
    sig = torch.randn(20, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    filt = torch.randn(5, 3, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    spec = StridedBmmSpec((), (16,), (3,), (5,), a_strides=(1, 1), b_strides=(3, 1))
    c = strided_bmm(sig, filt, spec)
    ga, gb = torch.autograd.grad(c.sum(), (sig, filt))
    windows = sig.unfold(0, 5, 1)
    ga_r, gb_r = torch.autograd.grad((windows @ filt).sum(), (sig, filt))
    close(ga, ga_r, torch.float64)
    close(gb, gb_r, torch.float64)


def test_monarch_chain_without_permutes(kernel, kernel_grads_only):
    """Two block-diagonal factors where each contraction writes the layout the next reads.

    y[t, i, j] = sum_{p, q} L[j, i, p] R[p, j, q] x[t, p, q]  (x: (t, p, q))
    step 1: z[p, t, j] = sum_q x[t, p, q] R[p, j, q]   batch p, m t, n j, k q
    step 2: y[t, i, j] = sum_p z[p, t, j] L[j, i, p]   batch j, m t, n i, k p
    """
    gen = torch.Generator().manual_seed(21)
    t, p, q, i, j = 5, 3, 4, 3, 2
    x = torch.randn(t, p, q, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    r = torch.randn(p, j, q, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    l_ = torch.randn(j, i, p, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()

    # z stored as (j, p, t): whatever the second step likes best.
    z_strides = {"p": t, "t": 1, "j": p * t}
    s1 = StridedBmmSpec(
        batch_sizes=(p,), m_sizes=(t,), n_sizes=(j,), k_sizes=(q,),
        a_strides=(q, p * q, 1),  # x[t, p, q]
        b_strides=(j * q, 1, q),  # r[p, j, q] read as (p, q, j)
        c_strides=(z_strides["p"], z_strides["t"], z_strides["j"]),
    )  # fmt: skip
    z = strided_bmm(x, r, s1)
    s2 = StridedBmmSpec(
        batch_sizes=(j,), m_sizes=(t,), n_sizes=(i,), k_sizes=(p,),
        a_strides=(z_strides["j"], z_strides["t"], z_strides["p"]),  # z read as (j, t, p)
        b_strides=(i * p, 1, p),  # l_[j, i, p] read as (j, p, i)
        c_strides=(1, i * j, j),  # y stored as (t, i, j)
    )  # fmt: skip
    y = strided_bmm(z, l_, s2)
    y_tij = torch.as_strided(y, (t, i, j), (i * j, j, 1))

    ref = torch.einsum("jip,pjq,tpq->tij", l_, r, x)
    close(y_tij, ref, torch.float64)
    g = torch.randn(t, i, j, generator=gen, dtype=torch.float64).to(DEVICE)
    grads = torch.autograd.grad(y_tij, (x, r, l_), g)
    refs = torch.autograd.grad(ref, (x, r, l_), g)
    for got, want in zip(grads, refs):
        close(got, want, torch.float64)


def test_autotune_pruning_keeps_fitting_configs(kernel):
    import triton

    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=st, num_warps=4)
        for bm, bn, bk, st in [(128, 256, 64, 3), (64, 64, 32, 4), (16, 32, 16, 2)]
    ]

    def kept(m, n, k, dtype):
        args = {"M": m, "N": n, "K": k, "x_ptr": torch.empty(1, dtype=dtype)}
        return [c.kwargs["BLOCK_M"] for c in sbmm_module._prune_configs(configs, args)]

    assert kept(4096, 4096, 4096, torch.bfloat16) == [128, 64, 16]
    assert kept(4096, 4096, 4096, torch.float32) == [64, 16]  # 128x256x64 fp32 overflows smem
    assert kept(40, 40, 20, torch.float16) == [64, 16]
    assert kept(3, 3, 3, torch.float16) == [16]


def test_tuning_modes_and_heuristic_tiles(monkeypatch):
    monkeypatch.setattr(sbmm_module, "_tuning", None)
    monkeypatch.delenv("EINC_TRITON_TUNE", raising=False)
    assert sbmm_module.tuning() == "heuristic"
    monkeypatch.setenv("EINC_TRITON_TUNE", "full")
    assert sbmm_module.tuning() == "full"
    monkeypatch.setenv("EINC_TRITON_TUNE", "fastest")
    with pytest.raises(ValueError, match="heuristic"):
        sbmm_module.tuning()
    with pytest.raises(ValueError, match="full"):
        sbmm_module.set_tuning("nope")
    sbmm_module.set_tuning("heuristic")
    assert sbmm_module.tuning() == "heuristic"

    def tile(m, n, k, size):
        c = sbmm_module._heuristic_config(m, n, k, size)
        return c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_stages"]

    assert tile(8192, 64, 64, 2) == (128, 64, 64, 1)  # BTT step at d = 4096: one K step
    assert tile(8192, 64, 1024, 2) == (128, 64, 64, 4)
    assert tile(8192, 1024, 4096, 2)[:3] == (128, 256, 64)
    assert tile(3, 3, 3, 4) == (16, 32, 16, 1)  # nothing fits: the smallest tile
    for m, n, k, size in [(8192, 1024, 4096, 4), (40, 40, 20, 2), (100, 7, 300, 8)]:
        bm, bn, bk, stages = tile(m, n, k, size)
        assert bm <= max(16, 1 << (m - 1).bit_length()) and bn <= max(16, 1 << (n - 1).bit_length())
        assert stages * (bm + bn) * bk * size <= sbmm_module._SHARED_MEMORY_BUDGET


def test_direct_launch_passes_every_argument_in_signature_order(monkeypatch):
    """After a kernel's first launch, einc calls its compiled launcher directly: the
    arguments must arrive as Triton's own dispatch passes them (signature order,
    constexprs included), with a stream and the launch hooks."""
    import inspect

    pytest.importorskip("triton")
    names = list(inspect.signature(sbmm_module._strided_bmm_kernel_fn).parameters)
    seen = {}

    class Compiled:
        function, packed_metadata = "fn", "meta"

        def launch_metadata(self, grid, stream, *args):
            return None

        def run(self, g0, g1, g2, stream, function, packed, meta, enter, exit_, *args):
            seen.update(grid=(g0, g1, g2), function=function, packed=packed, args=args)

    class Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 1234

    import triton.runtime

    monkeypatch.setattr(triton.runtime.driver, "_active", Driver(), raising=False)
    monkeypatch.setattr(type(triton.runtime.driver), "active", property(lambda self: Driver()), raising=False)
    slots = {"x_ptr": 0, "alpha": names.index("alpha")}
    launcher = sbmm_module._DirectLauncher(Compiled(), list(range(len(names))), slots)
    launcher((7,), {"x_ptr": 0, "alpha": names.index("alpha")})
    assert seen["grid"] == (7, 1, 1) and (seen["function"], seen["packed"]) == ("fn", "meta")
    assert list(seen["args"]) == list(range(len(names)))


class _FakeTriton:
    """A stand-in for Triton's JIT dispatch and compiled launcher: every launch is recorded
    in ``calls`` as ("dispatch" or "direct", 3-d grid, the arguments in signature order)."""

    def __init__(self, monkeypatch):
        import inspect

        import triton.runtime

        calls = self.calls = []

        class Compiled:
            function, packed_metadata = "fn", "meta"

            def launch_metadata(self, grid, stream, *args):
                return None

            def run(self, g0, g1, g2, stream, function, packed, meta, enter, exit_, *args):
                calls.append(("direct", (g0, g1, g2), list(args)))

        class Jit:
            def __init__(self, fn):
                self.sig = inspect.signature(fn)
                self.arg_names = list(self.sig.parameters)

            def bound(self, grid, args, kwargs):
                """(3-d grid, arguments in signature order) as a dispatch binds them."""
                kwargs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
                grid = tuple(grid) + (1,) * (3 - len(grid))
                return grid, list(self.sig.bind(*args, **kwargs).arguments.values())

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    calls.append(("dispatch", *self.bound(grid, args, kwargs)))
                    return Compiled()
                return launch

        class Driver:
            def get_current_device(self):
                return 0

            def get_current_stream(self, device):
                return 0

        self.Compiled, self.Jit = Compiled, Jit
        monkeypatch.setattr(type(triton.runtime.driver), "active",
                            property(lambda self: Driver()), raising=False)
        monkeypatch.setattr(sbmm_module, "_interpreting", lambda: False)
        monkeypatch.setattr(sbmm_module, "DIRECT_LAUNCH", True)


def test_direct_launch_repeats_the_first_launch_exactly(monkeypatch):
    """The second launch of a problem skips Triton's dispatch: the compiled launcher must
    get exactly the arguments the first (dispatched) launch bound, in signature order."""
    import inspect

    pytest.importorskip("triton")
    sbmm_module._get_kernel("full")  # decorates the kernels, sets the module's tl
    fake = _FakeTriton(monkeypatch)
    calls, Compiled, FakeJit = fake.calls, fake.Compiled, fake.Jit
    monkeypatch.setattr(sbmm_module, "_KERNELS", {
        "heuristic": FakeJit(sbmm_module._strided_bmm_kernel_fn), "full": None})
    monkeypatch.setattr(sbmm_module, "_tuning", "heuristic")
    monkeypatch.setattr(sbmm_module, "_SHARED_LAUNCHES", {})
    spec = StridedBmmSpec(batch_sizes=(8,), m_sizes=(12,), n_sizes=(8,), k_sizes=(16,),
                          a_strides=(192, 16, 1), b_strides=(128, 8, 1), c_strides=(1, 96, 8))
    a, b = torch.randn(8, 12, 16), torch.randn(8, 16, 8)
    out = torch.empty(8 * 12 * 8)
    bias = torch.randn(5)
    problem = sbmm_module._make_problem(sbmm_module._spec_axes(spec), "a", "b", "c")
    for _ in range(2):
        sbmm_module._launch(problem, a, b, out, 0.5, False, bias, 8)
    assert [c[0] for c in calls] == ["dispatch", "direct"]
    assert calls[0][1] == calls[1][1]
    first, second = calls[0][2], calls[1][2]
    assert len(first) == len(second) == len(inspect.signature(sbmm_module._strided_bmm_kernel_fn).parameters)
    assert all(u is v or u == v for u, v in zip(first, second))
    # the memo keeps no tensor of the first launch alive
    launcher = next(v for v in problem.launches.values() if isinstance(v, sbmm_module._DirectLauncher))
    assert not any(isinstance(v, torch.Tensor) for v in launcher.args)
    # once a direct launch went through, an error is raised, not retried through dispatch
    # (the kernel may already have been queued)
    assert launcher.proven

    def broken(*args):
        raise TypeError("launcher failed")

    monkeypatch.setattr(Compiled, "run", broken)
    with pytest.raises(TypeError, match="launcher failed"):
        sbmm_module._launch(problem, a, b, out, 0.5, False, bias, 8)
    assert [c[0] for c in calls] == ["dispatch", "direct"] and sbmm_module.DIRECT_LAUNCH


def test_launch_kernel_goes_direct_for_arguments_of_the_same_kind(monkeypatch):
    """launch_kernel (the slot-move and placement kernels): the first launch of a kind goes
    through Triton's dispatch, later ones of the same kind (dtypes, alignment, fixed ints,
    constexprs; varying ints by what Triton specialises) straight to the compiled kernel
    with the arguments the dispatch would have bound, other grids included."""
    pytest.importorskip("triton")
    from einc.kernels import slot_rows

    slot_rows._kernels()  # decorates the kernels (sets the module's tl)
    fake = _FakeTriton(monkeypatch)
    calls, FakeJit = fake.calls, fake.Jit
    monkeypatch.setattr(sbmm_module, "_PLAIN_LAUNCHES", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    place = FakeJit(slot_rows._place_fn)
    t = lambda n, dt=torch.long: torch.zeros(n, dtype=dt)  # noqa: E731
    const = dict(BLOCK=64)

    def launch(args, grid=(3,), kernel=place, constexprs=const, varying=(6, 7)):
        sbmm_module.launch_kernel(kernel, grid, args, constexprs, varying=varying)

    first = (t(40), t(40), t(8), t(8), t(40), t(64), 40, 8)
    launch(first)
    second = (t(56), t(56), t(8), t(8), t(56), t(80), 56, 10)  # other tensors and sizes
    launch(second, grid=(4,))
    assert [c[0] for c in calls] == ["dispatch", "direct"]
    want_grid, want_args = place.bound((4,), second, const)
    assert calls[1][1] == want_grid
    assert all(u is v or u == v for u, v in zip(calls[1][2], want_args)) and \
        len(calls[1][2]) == len(want_args)
    # another kind: an int keyed by its value (C, not declared varying), a varying one
    # divisible by 16, a dtype, a constexpr
    launch(second[:7] + (11,), varying=(6,))
    launch(second[:6] + (56, 16))
    launch((t(56, torch.int32),) + second[1:])
    launch(second, constexprs=dict(BLOCK=32))
    assert [c[0] for c in calls[2:]] == ["dispatch"] * 4
    # a two-dimensional grid and a constexpr passed by name (the sum kernel)
    summed = FakeJit(slot_rows._sum_fn)
    rows = (torch.zeros(6, 5), t(6), torch.zeros(3, 2), torch.zeros(3, 5), 5)
    meta = dict(K=2, BLOCK=16, SCALE=True, ACC=None)
    for _ in range(2):
        launch(rows, grid=(3, 1), kernel=summed, constexprs=meta, varying=())
    assert [c[0] for c in calls[6:]] == ["dispatch", "direct"]
    assert calls[7][1] == (3, 1, 1) and calls[7][2] == calls[6][2]
    assert all(u is v for u, v in zip(calls[7][2], calls[6][2]) if isinstance(u, torch.Tensor))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_split_reduction_for_few_tiles_and_a_long_k(kernel, dtype, monkeypatch):
    """Weight gradients reduce over every token into a few small tiles: the reduction is
    split over several programs and their partial sums added up after the launch."""
    splits = []
    original = sbmm_module._split_k

    def recorded(*args):
        out = original(*args)
        splits.append(out[0])
        return out

    monkeypatch.setattr(sbmm_module, "_split_k", recorded)
    monkeypatch.setattr(sbmm_module, "_SHARED_LAUNCHES", {})
    monkeypatch.setattr(sbmm_module, "SPLIT_MIN_BYTES", 0)
    gen = torch.Generator().manual_seed(3)
    # batch (2,), m (3, 5) over two axes, n (7,), k (300, 2): K = 600 split in parts
    a = random_layout((2, 3, 5, 300, 2), gen, pad=True).to(dtype)
    b = random_layout((2, 300, 2, 7), gen).to(dtype)
    spec = StridedBmmSpec.from_views(a, b, batch_ndim=1, k_ndim=2, c_strides=random_strides((2, 3, 5, 7), gen))
    c = strided_bmm(a, b, spec, backend="triton")
    assert splits and splits[-1] > 1
    close(c, einsum_reference(a, b, spec), dtype)
    acc = c.clone()
    strided_bmm(a, b, spec, out=acc, accumulate=True, alpha=0.5, backend="triton")
    close(acc, 1.5 * einsum_reference(a, b, spec), dtype)


def test_split_k_rule():
    big = 128 << 20
    assert sbmm_module._split_k(tiles=64, K=8192, block_k=64, processors=132, traffic=big) == (5, 1664)
    assert sbmm_module._split_k(tiles=300, K=8192, block_k=64, processors=132, traffic=big) == (1, 8192)
    assert sbmm_module._split_k(tiles=1, K=256, block_k=64, processors=132, traffic=big) == (1, 256)  # 4 steps
    assert sbmm_module._split_k(tiles=32, K=8192, block_k=64, processors=132, traffic=32 << 20) == (1, 8192)
    split, chunk = sbmm_module._split_k(tiles=8, K=65536, block_k=64, processors=132, traffic=big)
    assert split == 32 and chunk * split >= 65536 and chunk % 64 == 0


def test_gradient_of_an_expanded_view_is_per_element(kernel):
    """b = b0.expand(...) is broadcast by torch, not by the spec: autograd wants one
    gradient per element of the view and sums them itself."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(6, 40, 3, generator=gen, dtype=torch.float64).permute(0, 2, 1).to(DEVICE).requires_grad_()
    b0 = torch.randn(40, 5, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    b = b0.expand(6, 40, 5)
    spec = StridedBmmSpec.from_views(a, b, batch_ndim=1, k_ndim=1)
    g = torch.randn(spec.c_shape, generator=gen, dtype=torch.float64).to(DEVICE)
    got = torch.autograd.grad(strided_bmm(a, b, spec, backend="triton"), (a, b0), g)
    want = torch.autograd.grad(torch.matmul(a, b), (a, b0), g)
    for u, v in zip(got, want):
        close(u, v, torch.float64)


def test_second_derivatives_through_the_reference():
    """A backward with create_graph=True differentiates the torch reference (kernel results
    carry no graph), here on a broadcast, transposed-output layout."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 2, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(4, 5, dtype=torch.float64, generator=g).requires_grad_()
    bv = b.unsqueeze(0).expand(2, 4, 5)  # batch broadcast: stride 0
    av = a.permute(2, 0, 1)  # (2, 3, 4), strided
    spec = StridedBmmSpec.from_views(av, bv, batch_ndim=1, k_ndim=1,
                                     c_strides=(1, 2, 6))  # C stored [m][n][batch]
    fn = lambda a, b: strided_bmm(a.permute(2, 0, 1), b.unsqueeze(0).expand(2, 4, 5), spec,
                                  alpha=0.5)
    assert torch.autograd.gradgradcheck(fn, (a, b))


def test_reading_past_the_operand_needs_the_whole_buffer_for_a_gradient():
    """A spec may read a slice's buffer past the slice; the gradient has the slice's elements
    only, so the addresses past it got none (silently). Without a gradient the read stays
    allowed; with one, passing the whole buffer gives every address its gradient."""
    big = torch.randn(100, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.float64)
    spec = StridedBmmSpec((), (6,), (2,), (4,), (4, 1), (2, 1))  # reads 24 elements
    with pytest.raises(ValueError, match="reads A past the last element"):
        strided_bmm(big[7:17], b, spec)
    with torch.no_grad():
        torch.testing.assert_close(strided_bmm(big[7:17], b, spec),
                                   big[7:31].view(6, 4) @ b)
    (g,) = torch.autograd.grad(strided_bmm(big[7:], b, spec).sum(), big)
    want = torch.zeros(100, dtype=torch.float64)
    want[7:31] = b.sum(1).repeat(6)
    torch.testing.assert_close(g, want)


def test_problems_are_memoised_per_spec_and_gradient_layout():
    """A spec's canonical problem is built once (host time of every launch), and equals a
    fresh build; a gradient read through other strides is another problem."""
    sb = sbmm_module
    spec = StridedBmmSpec((2,), (3,), (5,), (4,), (12, 4, 1), (20, 5, 1))
    same = StridedBmmSpec((2,), (3,), (5,), (4,), (12, 4, 1), (20, 5, 1))
    first = sb._problem_of(spec, None, "a", "b", "c")
    assert sb._problem_of(same, None, "a", "b", "c") is first
    assert first.groups == sb._make_problem(sb._spec_axes(spec), "a", "b", "c").groups
    grad = sb._problem_of(spec, (15, 1, 3), "c", "b", "a")
    assert grad is not first
    assert grad.groups == sb._make_problem(sb._spec_axes(spec, (15, 1, 3)), "c", "b", "a").groups


def test_int64_index_math_only_for_offsets_within_a_tile():
    """The batch moves the base pointers by int64 scalars, so a batch spanning past 2^31
    elements with small tiles keeps int32 index math (it switched to int64 for every
    launch of a million-token MoE layer); an m extent past 2^31 elements switches."""
    pytest.importorskip("triton")
    sbmm_module._import_triton()

    def index_64(batch, m):  # x[b][m][k] @ y[b][k][n] -> out[b][m][n], k = n = 64
        key = (((batch, m * 64, 64 * 64, m * 64),), ((m, 64, 0, 64),), ((64, 0, 1, 1),),
               ((64, 1, 64, 0),))
        plan = sbmm_module._launch_plan(key, torch.float32, False, False, "heuristic",
                                        "ieee", 132)
        return plan[2]["INDEX_64"]

    assert not index_64(2**20, 64)  # 2^32 elements in all, 2^12 per batch entry
    assert index_64(1, 2**25 + 1)  # one entry of 2^31 + 64 elements
    assert not index_64(1, 2**24)
