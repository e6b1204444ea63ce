"""StructuredLinear against independent references: torch.einsum over its own factors and
the materialised matrix, in float64, for random structures and every route."""
import math
import pickle
import random
import re

import numpy as np
import pytest
import torch

import einc
from einc.analysis import analyze
from einc.analysis.rank import numerical_rank, rank_bound
from structures import random_spec

ROUTES = ("fused", "plain", "steps", "einsum")


def _randomize(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _einsum_reference(m, x):
    """Independent of the module's routes: the documented convention, written out."""
    low = m.lowered
    z = x.reshape(-1, m.in_features)
    z = torch.nn.functional.pad(z, (0, low.padded_in - low.d_in))
    inp, rest = m.equation.split(",", 1)
    facs, out = rest.split("->")
    y = torch.einsum("..." + inp + "," + facs + "->..." + out,
                     z.reshape(-1, *m.input_sizes), *m.factors())
    return y.reshape(-1, low.padded_out)[:, :m.out_features] + m.bias


def _dense_reference(m, x):
    """Materialise W column by column from one-hot inputs through the factors, in float64."""
    eye = torch.eye(m.in_features, dtype=torch.float64)
    w = _einsum_reference(m, eye) - m.bias  # (d_in, d_out): row i is W e_i
    return x.reshape(-1, m.in_features) @ w + m.bias


CASES = [random_spec(random.Random(seed), factors=2 + seed % 2) for seed in range(200)]


@pytest.mark.parametrize("spec,d_in,d_out", CASES, ids=[c[0] for c in CASES])
def test_random_structures_match_references(spec, d_in, d_out):
    m = einc.compile(spec, d_in, d_out, dtype=torch.float64)
    _randomize(m)
    x = torch.randn(2, 3, d_in, dtype=torch.float64)
    ref = _einsum_reference(m, x)
    dense = _dense_reference(m, x)
    scale = dense.abs().max().clamp_min(1e-300)
    assert (ref - dense).abs().max() / scale <= 1e-10
    for route in ROUTES:
        m.route = route
        y = m(x).reshape(-1, d_out)
        assert (y - dense).abs().max() / scale <= 1e-10, route
    report = analyze(spec, d_in=d_in, d_out=d_out)
    assert sum(p.numel() for p in m.factors()) == report.params
    if d_in * d_out <= 4096:
        w_rank = numerical_rank(m.structure, m.lowered.sizes)  # the padded matrix
        assert w_rank == rank_bound(m.structure, m.lowered.sizes)[0]
        # the layer crops the padding: a block, of rank at most the padded one's
        assert report.rank_bound == min(w_rank, d_in, d_out)
        with torch.no_grad():
            assert int(torch.linalg.matrix_rank(m.materialize())) <= report.rank_bound


@pytest.mark.parametrize("spec,d_in,d_out", CASES[:40], ids=[c[0] for c in CASES[:40]])
def test_gradients_agree_across_routes(spec, d_in, d_out):
    m = einc.compile(spec, d_in, d_out, dtype=torch.float64)
    _randomize(m, 1)
    x = torch.randn(5, d_in, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, d_out, dtype=torch.float64)
    grads = {}
    for route in ROUTES:
        m.route = route
        grads[route] = torch.autograd.grad((m(x) * w).sum(), [x, *m.parameters()])
    for route in ROUTES[:-1]:
        for a, b in zip(grads[route], grads["einsum"]):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), route


@pytest.mark.parametrize("spec", ["btt(rank=2)", "tt(rank=2, cores=3)", "kron",
                                  "(0.5|0.25|0.25|0.25|0.5|0.25|0.25)", "btt(rank=2, cores=3)"])
def test_gradcheck_fused(spec):
    m = einc.compile(spec, 16, 16, dtype=torch.float64, route="fused")
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *ps: m(x), (x, *m.parameters()))


@pytest.mark.parametrize("spec", ["btt(rank=2)", "tt(rank=2, cores=3)",
                                  "(0.5|0.25|0.25|0.25|0.5|0.25|0.25)"])
def test_gradgradcheck_fused(spec):
    """create_graph=True gives gradients with graphs (gradient penalties, second-order
    methods): the fused route differentiates a plain re-run in that case."""
    m = einc.compile(spec, 16, 16, dtype=torch.float64, route="fused")
    m.chunk = 2
    with torch.no_grad():
        m.bias.normal_()
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, *ps: m(x), (x, *m.parameters()))


@pytest.mark.parametrize("spec", ["btt(rank=2)", "lowrank(rank=2)", "tt(rank=2, cores=3)"])
def test_fused_backward_takes_batched_gradients(spec):
    """autograd.grad(..., is_grads_batched=True), as jacobian and hessian with
    vectorize=True use, runs the backward under autograd's vmap, where out= products and
    copies into preallocated buffers fail: the fused route differentiates a plain re-run."""
    torch.manual_seed(0)
    m = einc.compile(spec, 16, 12, dtype=torch.float64, route="fused")
    m.chunk = 2
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    y = m(x)
    v = torch.randn(3, *y.shape, dtype=torch.float64)
    params = [x, *m.parameters()]
    got = torch.autograd.grad(y, params, v, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        one = torch.autograd.grad(y, params, v[i], retain_graph=True)
        for u, w in zip(got, one):
            torch.testing.assert_close(u[i], w)
    jac = torch.autograd.functional.jacobian(m, x, vectorize=True)
    torch.testing.assert_close(jac, torch.autograd.functional.jacobian(m, x))


def test_chunk_is_checked_when_set():
    """module.chunk took 2.5 until a forward failed deep inside with a TypeError, and took
    0 and negatives silently."""
    m = einc.compile("btt", 64)
    x = torch.randn(7, 64)
    want = m(x)
    for bad in (2.5, 0, -3, True, "4"):
        with pytest.raises(einc.CompileError, match="chunk must be None"):
            m.chunk = bad
    assert m.chunk is None
    m.chunk = np.int64(3)
    assert m.chunk == 3 and type(m.chunk) is int
    torch.testing.assert_close(m(x), want)
    assert pickle.loads(pickle.dumps(m)).chunk == 3


def test_inference_keeps_no_intermediates():
    """Without a backward to come, the fused route's intermediates are per-chunk scratch:
    the buffer pool does not grow by one intermediate per chunk."""
    from einc.runtime import buffers
    m = einc.compile("btt", 1024, route="fused", bias=False)
    m.chunk = 256
    x = torch.randn(4096, 1024)

    def held(grad):
        buffers.empty_cache()
        with torch.set_grad_enabled(grad):
            y = m(x.requires_grad_(grad))
        return buffers.held(), y

    infer, y = held(False)
    del y
    train, y = held(True)
    assert infer + 8 * 2**20 <= train  # 16 chunks' intermediates of 1 MiB each are kept
    y.sum().backward()


def test_factor_gradients_keep_the_parameter_layout():
    m = einc.compile("btt(rank=4)", 256, route="fused")
    m(torch.randn(7, 256)).sum().backward()
    for p in m.factors():
        assert p.grad.stride() == p.stride()


def test_conventions_and_repr():
    m = einc.compile("ga,gafr,fgre->fe with g = a = d_in^(1/2), f = e = d_out^(1/2), r = 4",
                     64, 36)
    assert m.equation == "ga,gafr,fgre->fe"
    assert m.input_sizes == (8, 8) and m.output_sizes == (6, 6)
    assert [tuple(p.shape) for p in m.factors()] == [(8, 8, 6, 4), (6, 8, 4, 6)]
    text = repr(m)
    assert "ga,gafr,fgre->fe" in text and "params=" in text and "flops=" in text


def test_any_batch_shape_and_empty_batch():
    m = einc.compile("btt", 64)
    assert m(torch.randn(2, 3, 4, 64)).shape == (2, 3, 4, 64)
    assert m(torch.randn(64)).shape == (64,)
    for route in ROUTES:
        m.route = route
        assert m(torch.randn(0, 64)).shape == (0, 64)


def test_state_dict_round_trip_and_reset():
    a = einc.compile("tt(rank=3, cores=3)", 64, bias=True)
    b = einc.compile("tt(rank=3, cores=3)", 64, bias=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 64)
    assert torch.equal(a(x), b(x))
    before = [p.clone() for p in b.factors()]
    b.reset_parameters()
    assert not all(torch.equal(p, q) for p, q in zip(before, b.factors()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtypes(dtype):
    m = einc.compile("btt(rank=2)", 64, dtype=dtype)
    x = torch.randn(5, 64, dtype=dtype)
    ref = m.forward_einsum(x.double() if dtype == torch.float64 else x)
    tol = {torch.float32: 1e-4, torch.float64: 1e-12, torch.bfloat16: 5e-2}[dtype]
    for route in ROUTES:
        m.route = route
        y = m(x)
        assert y.dtype == dtype
        assert (y.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()


def test_no_bias_and_padding():
    m = einc.compile("btt", 60, 50, bias=False)
    assert m.bias is None and m.lowered.padded_in == 64
    x = torch.randn(3, 60)
    assert torch.allclose(m(x), x @ m.materialize().T, atol=1e-5)


def test_unknown_route_is_a_clear_error():
    with pytest.raises(einc.CompileError, match="known routes"):
        einc.StructuredLinear(16, 16, "btt", route="fast")
    with pytest.raises(einc.CompileError, match="unknown option.*: foo; allowed: route, tolerance"):
        einc.compile("btt", 16, foo=1)


@pytest.mark.parametrize("spec", ["(0|0|1|0|0|1|0)", "btt"])
def test_init_survives_exact_zero_draws(spec, monkeypatch):
    """Columns are normalised over their fan-in; at fan-in 1 (element-wise steps) an exact
    0.0 draw made 0/0 = NaN. Forced here: every draw is zero."""
    from einc.codegen import emit
    m = einc.compile(spec, 64)
    monkeypatch.setattr(torch.Tensor, "normal_", lambda self, *a, **k: self.zero_())
    m.reset_parameters()
    monkeypatch.undo()
    gain = emit.padding_gain(m.lowered)
    for k, (p, (perm, shape)) in enumerate(zip(m.factors(), emit.init_views(m.lowered))):
        norms = p.detach().permute(*perm).reshape(shape).norm(dim=1)
        torch.testing.assert_close(norms, torch.full_like(norms, gain if k == 0 else 1.0))
    assert m(torch.randn(3, 64)).isfinite().all()


@pytest.mark.parametrize("spec", ["dense", "btt", "(0.5|0.25|0.25|0.25|0.5|0.25|0)"])
def test_pickle_and_torch_save_keep_every_route(spec):
    """The plain forward is exec'd code: a pickled layer rebuilds it on load."""
    import io
    import pickle
    m = einc.compile(spec, 24, 20)
    buf = io.BytesIO()
    torch.save(torch.nn.Sequential(m), buf)  # what saving a whole model does
    buf.seek(0)
    copies = [pickle.loads(pickle.dumps(m)), torch.load(buf, weights_only=False)[0]]
    x = torch.randn(3, 24)
    for route in ("plain", "fused", "einsum"):
        m.route = route
        for c in copies:
            c.route = route
            assert torch.equal(c(x), m(x))


@pytest.mark.parametrize("spec", ["btt", "bttmoe(experts=4, k=2)"])
def test_wrong_input_width_type_or_dtype(spec):
    m = einc.compile(spec, 16)
    with pytest.raises(einc.CompileError, match="last dimension 16"):
        m(torch.randn(2, 15))
    with pytest.raises(einc.CompileError, match=r"last dimension 16, got shape \(\)"):
        m(torch.tensor(1.0))
    with pytest.raises(einc.CompileError, match="floating-point input, got torch.int64"):
        m(torch.ones(2, 16, dtype=torch.int64))
    with pytest.raises(einc.CompileError, match="tensor input, got list"):
        m([0.0] * 16)
    with pytest.raises(einc.CompileError, match="input dtype torch.float64 differs"):
        m(torch.ones(2, 16, dtype=torch.float64))


@pytest.mark.parametrize("spec", ["btt", "bttmoe(experts=4, k=2)"])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, "float32"])
def test_a_layer_dtype_must_be_floating_point(spec, dtype):
    # complex and integer layers were built and could never be called
    with pytest.raises(einc.CompileError, match="dtype must be None or one of torch.float16"):
        einc.compile(spec, 16, dtype=dtype)


# devices torch cannot parse, and ones this build or machine has not got
BAD_DEVICES = ["nope", "cuda:99", 99, True, 1.5] + (
    [] if torch.cuda.is_available() else ["cuda", torch.device("cuda")])


@pytest.mark.parametrize("spec", ["btt", "bttmoe(experts=4, k=2)"])
@pytest.mark.parametrize("device", BAD_DEVICES)
def test_an_unusable_device_is_refused_naming_the_available_ones(spec, device):
    # torch's parse error, 'Torch not compiled with CUDA enabled' or 'Cannot access
    # accelerator device' came out of einc.compile
    with pytest.raises(einc.CompileError, match=r"device must be None or one of cpu, meta.*"
                                                "got " + re.escape(repr(device))):
        einc.compile(spec, 16, device=device)
    if "moe" not in spec:
        with pytest.raises(einc.CompileError, match="device must be None or one of cpu, meta"):
            einc.StructuredLinear(16, 16, spec, device=device)


@pytest.mark.parametrize("device", ["cpu", "meta", torch.device("cpu"), None])
def test_usable_devices_are_taken(device):
    m = einc.StructuredLinear(16, 16, "btt", device=device)
    assert all(p.device == torch.device(device or "cpu") for p in m.parameters())


@pytest.mark.parametrize("route", ["auto", "fused", "plain", "einsum", "steps"])
def test_an_input_on_another_device_is_a_clear_error(route):
    # torch's 'Attempting to copy from device cpu to device meta' came out of forward
    m = einc.compile("btt", 16, device="meta", route=route)
    with pytest.raises(einc.CompileError, match=r"input on device cpu differs from the "
                                                r"layer's meta.*to_empty\(device='cpu'\)"):
        m(torch.randn(3, 16))
    m = einc.compile("btt", 16, route=route)
    with pytest.raises(einc.CompileError, match=r"input on device meta differs from the "
                                                r"layer's cpu.*module.to\('meta'\)"):
        m(torch.empty(3, 16, device="meta"))


@pytest.mark.parametrize("layout", ["to_sparse", "to_sparse_csr"])
def test_a_sparse_input_is_a_clear_error(layout):
    # 'reshape is not implemented for sparse tensors' came out of forward
    m = einc.compile("btt", 16)
    with pytest.raises(einc.CompileError, match="input layout torch.sparse_.* is not "
                                                "supported, only torch.strided"):
        m(getattr(torch.randn(3, 16), layout)())


@pytest.mark.parametrize("spec,d", [("lowrank(rank=2^32)", 2**20),  # 32 PiB
                                    ("bttmoe(experts=100000)", 2**16)])  # 12 TiB
def test_parameters_beyond_the_memory_are_refused_before_allocating(spec, d):
    # torch's allocator error came out of einc.compile (512 GiB for the first)
    with pytest.raises(einc.CompileError, match=r"the layer's parameters need [\d,.]+ GiB"):
        einc.compile(spec, d)
    assert isinstance(einc.compile(spec, d, device="meta"), torch.nn.Module)  # no memory


def test_an_unknown_memory_size_refuses_nothing(monkeypatch):
    # sysconf answers -1 where it cannot tell: every layer was refused
    import os
    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda n: -1 if n == "SC_PHYS_PAGES" else real(n))
    assert einc.compile("btt", 64).in_features == 64
    assert einc.compile("bttmoe(experts=4, k=2)", 64).in_features == 64


@pytest.mark.parametrize("spec", ["btt", "bttmoe(experts=4, k=2)"])
def test_a_failed_allocation_is_an_einc_error(spec, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")
    monkeypatch.setattr(torch, "empty", refuse)
    with pytest.raises(einc.CompileError, match="cannot allocate the layer's parameters"):
        einc.compile(spec, 16)


@pytest.mark.filterwarnings("ignore:Complex modules")
def test_a_layer_moved_to_complex_names_the_fix():
    m = einc.compile("btt", 16).to(torch.complex64)
    with pytest.raises(einc.CompileError, match=r"einc layers compute in floating point"):
        m(torch.randn(2, 16))


@pytest.mark.parametrize("spec,d_in,d_out", CASES[:60], ids=[c[0] for c in CASES[:60]])
def test_chunked_fused_route_matches_einsum(spec, d_in, d_out):
    """Tokens in uneven chunks (10 = 3 + 3 + 3 + 1): y and every gradient, bias included,
    with a non-contiguous upstream gradient (from .sum())."""
    m = einc.compile(spec, d_in, d_out, dtype=torch.float64)
    _randomize(m, 2)
    x = torch.randn(10, d_in, dtype=torch.float64, requires_grad=True)
    m.route = "einsum"
    ref = m(x)
    want = torch.autograd.grad(ref.sum(), [x, *m.parameters()])
    m.route, m.chunk = "fused", 3
    y = m(x)
    assert torch.allclose(y, ref, rtol=1e-10, atol=1e-10)
    got = torch.autograd.grad(y.sum(), [x, *m.parameters()])
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("spec", ["btt(rank=2)", "kron", "(0.5|0.25|0.25|0.25|0.5|0.25|0.25)"])
def test_gradcheck_fused_chunked(spec):
    m = einc.compile(spec, 16, 16, dtype=torch.float64, route="fused")
    m.chunk = 2
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *ps: m(x), (x, *m.parameters()))


def test_overlapping_graphs_and_retained_backward():
    """Two forwards before either backward, and a second backward through a retained graph,
    see their own intermediates (the fused route recycles buffers between calls)."""
    m = einc.compile("btt", 1024, route="fused")
    m.chunk = 128
    xs = [torch.randn(512, 1024) for _ in range(2)]
    ys = [m(x) for x in xs]
    grads = [torch.autograd.grad(y.square().sum(), m.factors(), retain_graph=True) for y in ys]
    again = torch.autograd.grad(ys[0].square().sum(), m.factors())
    m.route = "einsum"
    for x, g in zip(xs, grads):
        want = torch.autograd.grad(m(x).square().sum(), m.factors())
        for a, b in zip(g, want):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-3)
    for a, b in zip(again, grads[0]):
        assert torch.equal(a, b)


def test_empty_batch_gives_zero_gradients():
    m = einc.compile("btt", 64, route="fused")
    x = torch.randn(0, 64, requires_grad=True)
    m(x).sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_fused_route_low_precision(dtype):
    m = einc.compile("btt(rank=2)", 256, dtype=dtype, route="fused")
    m.chunk = 7
    x = torch.randn(40, 256, dtype=dtype, requires_grad=True)
    y = m(x)
    y.float().square().sum().backward()
    got = [x.grad.float()] + [p.grad.float() for p in m.parameters()]
    x2 = x.detach().double().requires_grad_()
    m64 = einc.compile("btt(rank=2)", 256, dtype=torch.float64, route="einsum")
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    y64 = m64(x2)
    y64.square().sum().backward()
    want = [x2.grad] + [p.grad for p in m64.parameters()]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert (y.double() - y64).abs().max() <= tol * y64.abs().max()
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max() <= 2 * tol * b.abs().max()


@pytest.mark.parametrize("spec", ["tt(rank=2)", "btt(rank=2, cores=3)", "kron", "monarch"])
def test_parameters_in_any_layout(spec):
    """Parameters replaced by plain contiguous tensors (load_state_dict(assign=True), the
    usual path from a checkpoint or the meta device) give the same results and gradients."""
    m = einc.compile(spec, 64, 64, dtype=torch.float64)
    _randomize(m, 3)
    m.load_state_dict({k: v.contiguous() for k, v in m.state_dict().items()}, assign=True)
    x = torch.randn(9, 64, dtype=torch.float64, requires_grad=True)
    results = {}
    for route in ROUTES:
        m.route = route
        y = m(x)
        results[route] = (y, *torch.autograd.grad(y.square().sum(), [x, *m.parameters()]))
    for route in ROUTES:
        for a, b in zip(results[route], results["einsum"]):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), route


def test_bfloat16_gradients_do_not_degrade_with_the_number_of_chunks():
    torch.manual_seed(0)
    m = einc.compile("btt(rank=2)", 256, dtype=torch.bfloat16, route="fused")
    x = torch.randn(2048, 256, dtype=torch.bfloat16)
    ref = einc.compile("btt(rank=2)", 256, dtype=torch.float64, route="einsum")
    ref.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    ref(x.double()).square().sum().backward()

    def errors(chunk):
        m.zero_grad()
        m.chunk = chunk
        m(x).float().square().sum().backward()
        return [((p.grad.double() - q.grad).norm() / q.grad.norm()).item()
                for p, q in zip(m.parameters(), ref.parameters())]

    whole, many = errors(2048), errors(16)  # one chunk vs 128 chunks
    assert all(b <= 1.5 * a + 1e-4 for a, b in zip(whole, many)), (whole, many)


def test_torch_func_grad_takes_a_plain_route():
    from torch.func import functional_call, grad
    m = einc.compile("btt(rank=2)", 32, bias=True).double()
    x = torch.randn(9, 32, dtype=torch.float64)
    params = dict(m.named_parameters())
    got = grad(lambda p: functional_call(m, p, (x,)).square().sum())(params)
    m(x).square().sum().backward()
    for name, p in m.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("route", ["fused", "plain", "einsum", "steps"])
def test_torch_func_transforms_run_on_every_named_route(route):
    """An explicit fused route under vmap / jacrev / forward-mode AD raised torch's raw
    setup_context error; it takes the plain route there, as auto does."""
    from torch.func import jacrev, jvp, vmap
    m = einc.compile("btt(rank=2)", 16, bias=True, route=route).double()
    x = torch.randn(3, 16, dtype=torch.float64)
    w = m.materialize().detach()  # (out_features, in_features), as nn.Linear's weight
    torch.testing.assert_close(vmap(m)(x), x @ w.t() + m.bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jacrev(m)(x[0]), w, rtol=1e-12, atol=1e-12)
    _, tangent = jvp(m, (x,), (torch.ones_like(x),))
    torch.testing.assert_close(tangent, torch.ones_like(x) @ w.t(), rtol=1e-12, atol=1e-12)


def test_steps_route_finds_a_free_batch_letter():
    """The steps route picked its token letter from the uppercase letters but R, and so found
    none when a spec used those 25 (a bare StopIteration, also from a timed auto call)."""
    up = "ABCDEFGHIJKLMNOPQSTUVWXYZ"
    x, mid, y = up[:12], up[12:17], up[17:]
    sizes = ", ".join(f"{c} = {2 if c in 'AMS' else 1}" for c in up)
    m = einc.compile(f"{x},{x}{mid},{mid}{y}->{y} with {sizes}", route="steps",
                     dtype=torch.float64)
    xin = torch.randn(3, m.in_features, dtype=torch.float64)
    m.route = "einsum"
    want = m(xin)
    m.route = "steps"
    torch.testing.assert_close(m(xin), want, rtol=1e-12, atol=1e-12)


def test_route_is_checked_when_set():
    m = einc.compile("btt", 64)
    with pytest.raises(einc.CompileError, match="unknown route 'bogus'"):
        m.route = "bogus"
    m.route = "plain"
    assert m.route == "plain"


def test_a_mismatched_input_dtype_is_a_clear_error():
    m = einc.compile("btt", 64)
    with pytest.raises(einc.CompileError, match="input dtype torch.float64 differs"):
        m(torch.randn(3, 64, dtype=torch.float64))


@pytest.mark.parametrize("route", ["auto", "fused", "plain", "einsum", "steps"])
def test_autocast_leaves_a_float64_layer_in_float64(route):
    # as nn.Linear: autocast does not touch float64 (the fused route cast it to bfloat16)
    m = einc.compile("btt(rank=2)", 64, route=route, dtype=torch.float64)
    x = torch.randn(5, 64, dtype=torch.float64)
    want = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x)
        with pytest.raises(einc.CompileError, match="input dtype torch.float32 differs"):
            m(x.float())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("route", ["auto", "fused", "plain", "einsum", "steps"])
def test_autocast_runs_every_route_in_low_precision(route):
    # a named fused route computed in float32 and refused bfloat16 inputs under autocast
    m = einc.compile("btt(rank=2)", 64, 48, route=route)
    x = torch.randn(5, 64)
    want = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for inp in (x, x.bfloat16()):
            got = m(inp.requires_grad_())
            got.float().sum().backward()
            assert inp.grad is not None
            assert got.dtype == torch.nn.Linear(64, 48)(inp).dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
    assert all(p.grad.dtype == torch.float32 for p in m.parameters())


@pytest.mark.parametrize("spec,route", [("btt(rank=2)", "auto"), ("tt(rank=2, cores=3)", "auto"),
                                        ("btt(rank=2)", "fused")])
def test_jit_trace_takes_the_plain_route_and_holds_for_other_batch_sizes(spec, route):
    """An explicit "fused" route too: its trace failed for any other batch size."""
    import warnings
    m = einc.compile(spec, 64, 48, route=route)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        traced = torch.jit.trace(m, (torch.randn(5, 64),))
    # einc's checks of fixed sizes add nothing to torch's own notes
    assert not [w for w in seen if "/einc/" in w.filename], [str(w.message) for w in seen]
    for n in (1, 7, 40):
        x = torch.randn(n, 64)
        torch.testing.assert_close(traced(x), m(x))


def test_meta_device_forward_gives_shapes():
    m = einc.compile("btt", 64, device="meta")
    assert m(torch.empty(4, 64, device="meta")).shape == (4, 64)


@pytest.mark.parametrize("route", ["auto", "fused", "plain", "einsum", "steps"])
def test_a_replaced_factor_of_another_shape_is_refused(route):
    """The fused route reads factors through their planned strides: a parameter replaced
    by one of the same size but another shape (nn.Linear's (out, in) weight for dense's
    (in, out) W) or a larger one was read wrongly instead of refused."""
    x = torch.randn(3, 64)
    m = einc.compile("dense", d_in=64, d_out=48, route=route)
    m.W = torch.nn.Parameter(torch.randn(48, 64))
    with pytest.raises(einc.CompileError, match=r"factor W .* shape \(48, 64\), expected "
                                                r"\(64, 48\) \(i o\)"):
        m(x)
    m = einc.compile("btt(rank=2)", d_in=64, route=route)
    m.A = torch.nn.Parameter(torch.randn(8, 8, 8, 3))
    with pytest.raises(einc.CompileError, match=r"factor A .*expected \(8, 8, 8, 2\)"):
        m(x)
    m = einc.compile("btt(rank=2)", d_in=64, route=route)
    m.B = torch.nn.Parameter(m.B.detach().double())
    with pytest.raises(einc.CompileError, match="dtype torch.float64, the other factors' is "
                                                "torch.float32"):
        m(x)
    m = einc.compile("btt(rank=2)", d_in=64, route=route)
    m.bias = torch.nn.Parameter(torch.zeros(63))
    with pytest.raises(einc.CompileError, match=r"bias has shape \(63,\)"):
        m(x)


@pytest.mark.parametrize("route", ["auto", "fused", "plain"])
def test_mixed_dtypes_run_under_autocast(route):
    """Autocast casts the factors and bias to one dtype, as nn.Linear's weight and bias:
    a bfloat16 layer with a float32 bias (or factor) runs there, as before the shape check."""
    m = einc.compile("btt", d_in=64, route=route).to(torch.bfloat16)
    m.bias.data = m.bias.data.float()
    m.A.data = m.A.data.float()
    x = torch.randn(2, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    with pytest.raises(einc.CompileError, match="dtype"):  # outside autocast, as nn.Linear
        m(x.bfloat16())


@pytest.mark.parametrize("spec,d_out,bias", [("btt(rank=2)", 48, False), ("btt(rank=2)", 48, True),
                                              ("monarch", 64, False), ("lowrank(rank=4)", 64, True),
                                              ("(0|0|1|0|0|1|0)", 64, True)])
@pytest.mark.parametrize("route", ["auto", "fused", "plain", "einsum", "steps"])
def test_outputs_are_contiguous(spec, d_out, bias, route):
    """As nn.Linear's: padded outputs sliced off, or an einsum result in a transposed
    layout, gave strided outputs on which y.view(-1) failed."""
    m = einc.compile(spec, d_in=64, d_out=d_out, bias=bias, route=route)
    y = m(torch.randn(2, 5, 64))
    assert y.shape == (2, 5, d_out) and y.is_contiguous()
    y.view(-1)


@pytest.mark.parametrize("spec", ["btt", "lowrank(rank=3)", "tt(rank=2, cores=3)"])
@pytest.mark.parametrize("route", ["auto", "plain", "einsum"])
def test_forward_mode_ad(spec, route):
    """Forward-mode AD (dual tensors): auto takes plain torch ops (the fused route's
    autograd function has no jvp). The tangent of y = W x + b is W t."""
    import torch.autograd.forward_ad as fwAD
    m = einc.compile(spec, d_in=64, d_out=48, dtype=torch.float64, route=route)
    x, t = torch.randn(3, 64, dtype=torch.float64), torch.randn(3, 64, dtype=torch.float64)
    with fwAD.dual_level():
        y, tangent = fwAD.unpack_dual(m(fwAD.make_dual(x, t)))
    W = m.materialize()
    torch.testing.assert_close(y, x @ W.T + m.bias)
    torch.testing.assert_close(tangent, t @ W.T)


def test_a_float64_factor_is_refused_under_autocast_too():
    """Autocast casts float32 / float16 / bfloat16 operands to one dtype but leaves float64
    alone: a float64 factor in a float32 layer is refused on every route, not a torch error
    on some and a silent cast on the fused one."""
    for route in ("auto", "fused", "plain", "einsum"):
        m = einc.compile("btt", d_in=64, route=route)
        m.B.data = m.B.data.double()
        with torch.autocast("cpu", dtype=torch.bfloat16), \
                pytest.raises(einc.CompileError, match="factor B .*torch.float64"):
            m(torch.randn(2, 64))
    # a float64 input, likewise: the fused route ran it in bfloat16, the others failed in torch
    for route in ("auto", "fused", "plain", "einsum", "steps"):
        m = einc.compile("btt", d_in=64, route=route)
        with torch.autocast("cpu", dtype=torch.bfloat16), \
                pytest.raises(einc.CompileError, match="input dtype torch.float64 differs"):
            m(torch.randn(2, 64, dtype=torch.float64))


def test_materialize_leaves_the_bias_alone():
    """materialize() computes the weight without setting the bias aside: a parametrised bias
    (which cannot be assigned None) works, and the bias object is never swapped out, so a
    forward in another thread keeps it."""
    import torch.nn.utils.parametrize as P

    class Positive(torch.nn.Module):
        def forward(self, b):
            return torch.nn.functional.softplus(b)

    m = einc.compile("lowrank(rank=4)", d_in=12, d_out=20, dtype=torch.float64)
    P.register_parametrization(m, "bias", Positive())
    x = torch.randn(3, 12, dtype=torch.float64)
    W = m.materialize()
    torch.testing.assert_close(m(x), x @ W.T + m.bias)
    assert W.shape == (20, 12)

    seen = []
    m2 = einc.compile("btt", d_in=16, d_out=16)
    cls = type(m2)
    cls_setattr = cls.__setattr__

    def spy(self, name, value):
        seen.append(name)
        cls_setattr(self, name, value)

    try:
        cls.__setattr__ = spy
        m2.materialize()
    finally:
        cls.__setattr__ = cls_setattr
    assert "bias" not in seen


def test_structured_linear_keeps_the_checked_widths():
    """The module's widths are the checked ones: numpy integers become ints (and no longer
    overflow in the parameter count), None takes d_in or the spec's own sizes, as
    einc.compile does."""
    m = einc.StructuredLinear(np.int64(64), np.int16(30000), "lowrank(rank=1)")
    assert (m.in_features, m.out_features) == (64, 30000)
    assert type(m.in_features) is int and type(m.out_features) is int
    assert m.bias.shape == (30000,)
    m = einc.StructuredLinear(64, None, "btt")
    assert m.out_features == 64 and m(torch.randn(2, 64)).shape == (2, 64)
    m = einc.StructuredLinear(None, None, "x[i j] W[i j o] -> y[o] with i = 3, j = 5, o = 4")
    assert (m.in_features, m.out_features) == (15, 4)
    assert m(torch.randn(2, 15)).shape == (2, 4)


def test_compile_takes_a_square_width_as_d_like_analyze():
    m = einc.compile("btt", d=256)
    assert (m.in_features, m.out_features) == (256, 256)
    assert einc.compile("bttmoe(experts=4, k=2)", d=64).in_features == 64
    with pytest.raises(einc.EincError, match="either d or d_in/d_out"):
        einc.compile("btt", 256, d=256)
