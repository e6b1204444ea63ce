"""The "triton" route of StructuredLinear (einc/runtime/gpu.py) against the einsum route.

Without a GPU the Triton kernel runs under the Triton interpreter, which has to be switched
on before triton decorates the kernel, hence the environment variable at import time. Sizes
stay tiny: the interpreter runs every program in numpy, one after another.
"""
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")

import einc  # noqa: E402
from einc.runtime import autotune, gpu  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (spec, d_in, d_out); the last ones are padded (d_in/d_out below the structure's size)
SPECS = [
    ("btt(rank=1)", 64, 64),
    ("btt(rank=4)", 64, 64),
    ("monarch", 64, 64),
    ("lowrank(rank=4)", 64, 64),
    ("kron", 64, 64),
    ("tt(cores=3)", 64, 64),
    ("btt(cores=3)", 64, 64),
    ("(0.5|0.25|0.25|0.25|0.5|0.25|0)", 64, 64),
    ("(0.5|0.25|0.25|0.25|0.5|0.25|0.25)", 64, 64),
    ("btt(rank=1)", 60, 50),
    ("monarch", 60, 62),
    ("(0.5|0.25|0.25|0.25|0.5|0.25|0.25)", 60, 56),
]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count kernel launches and torch-reference fallbacks of the route."""
    calls = {"kernel": 0, "reference": 0}
    run, ref = gpu.sbmm._run, gpu.sbmm.strided_bmm_reference

    def counted_run(*a, **k):
        calls["kernel"] += 1
        return run(*a, **k)

    def counted_ref(*a, **k):
        calls["reference"] += 1
        return ref(*a, **k)

    monkeypatch.setattr(gpu.sbmm, "_run", counted_run)
    monkeypatch.setattr(gpu.sbmm, "strided_bmm_reference", counted_ref)
    return calls


def _randomize(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _outputs_and_grads(m, x, w, route):
    m.route = route
    y = m(x)
    return y, torch.autograd.grad((y * w).sum(), [x, *m.parameters()])


def _compare(spec, d_in, d_out, dtype, tol, bias=True, tokens=5):
    m = einc.compile(spec, d_in, d_out, dtype=dtype, bias=bias).to(DEVICE)
    _randomize(m)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, d_in, generator=g, dtype=dtype).to(DEVICE).requires_grad_()
    w = torch.randn(tokens, d_out, generator=g, dtype=dtype).to(DEVICE)
    y_ref, g_ref = _outputs_and_grads(m, x, w, "einsum")
    y, grads = _outputs_and_grads(m, x, w, "triton")
    scale = y_ref.abs().max().clamp_min(1)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert (y - y_ref).abs().max() <= tol * scale
    for a, b in zip(grads, g_ref):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= tol * b.abs().max().clamp_min(1)
    return m


@pytest.mark.parametrize("spec,d_in,d_out", SPECS, ids=[f"{s}-{i}x{o}" for s, i, o in SPECS])
def test_matches_einsum_float64(spec, d_in, d_out, kernel_calls):
    m = _compare(spec, d_in, d_out, torch.float64, 1e-12)
    # every matmul ran on the kernel, forward and backward, and no relayout was needed
    assert kernel_calls["reference"] == 0
    assert kernel_calls["kernel"] == 3 * len(m.lowered.plan.steps)
    prog = gpu._PROGRAMS[next(k for k in gpu._PROGRAMS if k[0] == id(m.lowered.plan))]
    assert prog.copies == 0


@pytest.mark.parametrize("spec", ["btt(rank=4)", "(0.5|0.25|0.25|0.25|0.5|0.25|0)"])
def test_matches_einsum_float32_no_bias(spec):
    _compare(spec, 64, 64, torch.float32, 1e-5, bias=False, tokens=7)


def test_relayout_fallback_when_groups_exceed_the_axis_limit(monkeypatch, kernel_calls):
    """With a 1-axis limit the direct layouts no longer fit: the plan's CPU layouts (one
    run per group) and their copies are used instead, still exact and still on the kernel."""
    monkeypatch.setattr(gpu, "AXIS_LIMIT", 1)
    monkeypatch.setattr(gpu, "_PROGRAMS", {})
    m = _compare("(0.5|0.25|0.25|0.25|0.5|0.25|0.25)", 64, 64, torch.float64, 1e-12)
    prog = next(iter(gpu._PROGRAMS.values()))
    assert prog.copies >= 1
    assert all(op.fits for s in prog.ops for op in vars(s).values())
    assert kernel_calls["reference"] == 0 and m.lowered.plan.copies >= 1


def test_expanded_output_gradient_and_factor_layout():
    """dy from .sum() is an expanded tensor (stride 0): read in place, same gradients;
    factor gradients keep the parameters' storage layout."""
    m = einc.compile("btt(rank=4)", 64, dtype=torch.float64).to(DEVICE)
    _randomize(m)
    x = torch.randn(2, 3, 64, dtype=torch.float64, device=DEVICE)
    m.route = "einsum"
    m(x).sum().backward()
    ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    m.route = "triton"
    y = m(x)
    assert y.shape == (2, 3, 64)
    y.sum().backward()
    for p, r in zip(m.parameters(), ref):
        assert torch.allclose(p.grad, r, rtol=1e-12, atol=1e-12)
    for p in m.factors():
        assert p.grad.stride() == p.stride()


def test_empty_batch_and_single_token():
    m = einc.compile("btt(rank=2)", 16, 16, dtype=torch.float64, route="triton").to(DEVICE)
    assert m(torch.randn(0, 16, dtype=torch.float64, device=DEVICE)).shape == (0, 16)
    _compare("btt(rank=2)", 16, 16, torch.float64, 1e-12, tokens=1)


def test_autotune_does_not_offer_triton_for_cpu_inputs():
    x = torch.randn(4, 64)
    assert "triton" not in autotune.candidates(x)
    assert "triton" in einc.runtime.module.ROUTES


def test_not_selectable_on_cpu_without_the_interpreter():
    code = (
        "import torch, einc\n"
        "from einc.runtime import autotune\n"
        "m = einc.compile('btt', 64, route='triton')\n"
        "x = torch.randn(4, 64)\n"
        "assert 'triton' not in autotune.candidates(x)\n"
        "try:\n"
        "    m(x)\n"
        "except einc.CompileError as e:\n"
        "    assert 'triton' in str(e)\n"
        "    print('refused')\n"
        "m.route = 'auto'\n"
        "m(torch.randn(4096, 64))\n"
        "assert 'triton' not in autotune.routes().values()\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused" in out.stdout


@pytest.mark.parametrize("spec", ["btt(rank=1)", "(0.5|0.25|0.25|0.25|0.5|0.25|0)"])
def test_weight_gradients_with_a_split_reduction(spec, monkeypatch):
    """Many tokens into few weight-gradient tiles: the reduction over tokens is split over
    programs (as on a GPU with many multiprocessors) and still exact."""
    monkeypatch.setattr(gpu.sbmm, "_processors", lambda t: 64)
    monkeypatch.setattr(gpu.sbmm, "SPLIT_MIN_BYTES", 0)
    monkeypatch.setattr(gpu.sbmm, "_SHARED_LAUNCHES", {})
    monkeypatch.setattr(gpu, "_PROGRAMS", {})
    splits = []
    original = gpu.sbmm._split_k
    monkeypatch.setattr(gpu.sbmm, "_split_k", lambda *a: splits.append(original(*a)[0]) or original(*a))
    _compare(spec, 64, 64, torch.float64, 1e-12, tokens=140)
    assert max(splits) > 1


def test_a_strided_bias_is_read_correctly():
    """The bias is added in the kernel's epilogue with unit stride: a parameter replaced by
    a strided tensor must still give the right result."""
    m = einc.compile("btt(rank=1)", 64, dtype=torch.float64).to(DEVICE)
    _randomize(m)
    m.bias = torch.nn.Parameter(torch.randn(128, dtype=torch.float64, device=DEVICE)[::2])
    x = torch.randn(9, 64, dtype=torch.float64, device=DEVICE)
    m.route = "einsum"
    want = m(x)
    m.route = "triton"
    torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)


def test_second_derivatives_are_refused_by_name():
    """The kernels' results carry no graph: a backward asked for one says so instead of
    returning incomplete second derivatives; first order is unaffected."""
    m = einc.compile("btt(rank=2)", 64, route="triton", device=DEVICE, dtype=torch.float64)
    x = torch.randn(5, 64, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.grad(m(x).sum(), x)[0].shape == x.shape
    with pytest.raises(einc.EincError, match="triton route has no second derivatives"):
        torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)


def test_autocast_runs_the_route_in_low_precision():
    # under autocast the route computed in float32 and refused a low-precision input
    dt = torch.bfloat16 if DEVICE == "cpu" else torch.float16
    m = einc.compile("btt(rank=2)", 16, 12, route="triton").to(DEVICE)
    x = torch.randn(5, 16, device=DEVICE)
    m.route = "plain"
    with torch.autocast(DEVICE, dtype=dt):
        want = m(x)
        m.route = "triton"
        for inp in (x, x.to(dt)):
            got = m(inp.requires_grad_())
            assert got.dtype == dt
            torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)
            got.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in m.parameters())
