"""Emitted source: readable, standalone, equivalent to the in-memory module, and safe."""
import importlib.util
import subprocess
import sys

import pytest
import torch

import einc
from einc.codegen.emit import module_source, safe_name
from einc.codegen.lower import lower


def load_module(path, name):
    spec = importlib.util.spec_from_file_location("emitted_layer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, name)


@pytest.mark.parametrize("spec,d_in,d_out", [
    ("btt(rank=2)", 64, 64), ("kron", 60, 50), ("tt(rank=2, cores=3)", 64, 27),
    ("(0.5|0.25|0.25|0.25|0.5|0.25|0.25)", 256, 256),
    ("x[i j] W1[j k r] W2[r i l] -> y[k l] with i = j = d_in^(1/2), k = l = d_out^(1/2), r = 3",
     49, 36)])
def test_emitted_module_matches_in_memory(tmp_path, spec, d_in, d_out):
    path = tmp_path / "layer.py"
    out = subprocess.run([sys.executable, "-m", "einc", "compile", spec, "--d-in", str(d_in),
                          "--d-out", str(d_out), "-o", str(path), "--class-name", "Layer"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = path.read_text()
    assert "import einc" not in text and "from einc" not in text
    Layer = load_module(path, "Layer")
    mine = einc.compile(spec, d_in, d_out)
    theirs = Layer()
    theirs.load_state_dict(mine.state_dict())
    x = torch.randn(3, 2, d_in)
    assert torch.allclose(theirs(x), mine(x), atol=1e-5, rtol=1e-5)
    assert theirs.equation == mine.equation
    assert [p.shape for p in theirs.factors()] == [p.shape for p in mine.factors()]


def test_emitted_init_keeps_unit_rms(tmp_path):
    path = tmp_path / "layer.py"
    path.write_text(module_source(lower("btt(rank=4)", 1024, 1024), "Layer"))
    layer = load_module(path, "Layer")()
    x = torch.randn(64, 1024)
    rms = layer(x).square().mean().sqrt().item()
    assert 0.5 < rms < 2


def test_source_is_readable_and_names_the_spec():
    m = einc.compile("btt", 64)
    src = m.source
    assert "torch.bmm" in src and "# Z1[" in src and "self.A" in src


@pytest.mark.parametrize("name", ["forward", "bias", "training", "parameters", "torch",
                                  "self", "z", "lead"])
def test_factor_names_that_clash_are_sanitised(name):
    spec = f"x[i] {name}[i r] B[r o] -> y[o] with r = 2"
    m = einc.compile(spec, 8, 8)
    assert m.factor_names()[0] == f"w_{name}"
    assert f"w_{name}" in dict(m.named_parameters())
    assert m(torch.randn(2, 8)).shape == (2, 8)
    compile(module_source(m.lowered, "Layer"), "<emitted>", "exec")  # valid Python


@pytest.mark.parametrize("hostile", [
    'x[i] A["i" r] B[r o] -> y[o] with r = 2',
    "x[i] A[i r] B[r o] -> y[o] with r = 2\nimport os",
    "x[i] A[i r] B[r o] -> y[o] with r = 2; import os",
    "x[i] class[i r] B[r o] -> y[o] with r = 2",
    "x[i] __init__[i r] B[r o] -> y[o] with r = 2",
    "x[i] A[i __dict__] B[__dict__ o] -> y[o]",
    "x[i] A[i r] B[r o] -> y[o] with r = __import__",
])
def test_hostile_names_are_refused(hostile):
    with pytest.raises(einc.EincError):
        einc.compile(hostile, 8, 8)


def test_safe_name_never_returns_raw_text():
    for raw in ["a b", "1x", "x'y", "del", "__class__", "bias"]:
        name = safe_name(raw)
        assert name.isidentifier() and not name.startswith("_")


def test_compile_cli_errors_leave_nothing_behind(tmp_path):
    path = tmp_path / "layer.py"
    out = subprocess.run([sys.executable, "-m", "einc", "compile", "btt", "--d", "1000001",
                          "--tolerance", "0", "-o", str(path)], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []
    out = subprocess.run([sys.executable, "-m", "einc", "compile", "btt", "--d", "64",
                          "--class-name", "not valid"], capture_output=True, text=True)
    assert out.returncode == 2 and "identifier" in out.stderr


def test_torch_compile_has_no_graph_breaks_and_export_works():
    m = einc.compile("btt(rank=2)", 64)
    x = torch.randn(4, 64)
    explanation = torch._dynamo.explain(m)(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(m, backend="aot_eager")
    xg = x.clone().requires_grad_()
    y = compiled(xg)
    assert torch.allclose(y, m(x), atol=1e-5)
    y.sum().backward()
    assert xg.grad is not None and m.factors()[0].grad is not None
    exported = torch.export.export(m, (x,))
    assert torch.allclose(exported.module()(x), m(x), atol=1e-5)
