"""Emitted source: readable, standalone, equivalent to the in-memory module, and safe."""
import importlib.util
import os
import stat
import subprocess
import sys

import pytest
import torch

import einc
from einc.cli import main
from einc.codegen.emit import module_source, reserved_names, safe_name
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


@pytest.mark.parametrize("spec", [
    "x[i pos_encoding] W[i pos_encoding o] -> y[o] with pos_encoding = 4",
    "x[i coding] W[i coding o] -> y[o] with coding=d_in^(1/2)"])
def test_spec_text_never_declares_the_files_encoding(tmp_path, spec):
    """Python reads "coding[:=] NAME" in a comment on line 1 or 2 as the file's encoding:
    the spec and the sizes used to sit there, and such a file did not load."""
    path = tmp_path / "layer.py"
    path.write_text(module_source(lower(spec, 16, 16), "Layer"))
    compile(path.read_bytes(), str(path), "exec")  # bytes: the declaration is honoured
    assert load_module(path, "Layer")()(torch.randn(2, 16)).shape == (2, 16)


def _reinitialised_after_assign(module):
    """Load contiguous copies with assign=True (as from a safetensors file), fill them with
    a constant, reset: every factor must change."""
    sd = {k: torch.full(v.shape, 7.0) for k, v in module.state_dict().items()}
    module.load_state_dict(sd, assign=True)
    module.reset_parameters()
    return [bool((p != 7.0).any()) for p in module.factors()]


def test_reset_parameters_reaches_every_factor_in_any_layout(tmp_path):
    spec = "btt(rank=2, cores=3)"
    assert _reinitialised_after_assign(einc.compile(spec, 64)) == [True] * 3
    path = tmp_path / "layer.py"
    path.write_text(module_source(lower(spec, 64, 64), "Layer"))
    assert _reinitialised_after_assign(load_module(path, "Layer")()) == [True] * 3


def test_emitted_init_survives_exact_zero_draws(tmp_path, monkeypatch):
    """At fan-in 1 (element-wise factors) an exact zero draw made 0/0 = NaN in the file,
    where the in-memory module gives the constant unit column."""
    path = tmp_path / "layer.py"
    path.write_text(module_source(lower("(0|0|1|0|0|1|0)", 64, 64), "Layer"))
    Layer = load_module(path, "Layer")
    monkeypatch.setattr(torch.Tensor, "normal_", lambda self, *a, **k: self.zero_())
    layer = Layer()
    monkeypatch.undo()
    assert all(p.isfinite().all() for p in layer.factors())
    assert layer(torch.randn(3, 64)).isfinite().all()


def test_emitted_module_names_a_wrong_width(tmp_path):
    path = tmp_path / "layer.py"
    path.write_text(module_source(lower("btt", 250, 260), "Layer"))
    layer = load_module(path, "Layer")()
    with pytest.raises(ValueError, match=r"last dimension 250, got shape \(4, 125\)"):
        layer(torch.randn(4, 125))

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


def test_a_renamed_factor_never_takes_a_name_the_spec_wrote():
    """``bias`` is renamed w_bias; next to a factor written ``w_bias`` that one keeps its
    name, whatever order the two come in (the rename used to win when it came first)."""
    for spec in ("x[i] bias[i r] w_bias[r o] -> y[o]", "x[i] w_bias[i r] bias[r o] -> y[o]"):
        m = einc.compile(spec + " with r = 4", 16)
        keys = {n for n in m.state_dict() if n != "bias"}
        assert keys == {"w_bias", "w_bias_"}
        written = [f.name for f in m.structure.factors].index("w_bias")
        assert m.factors()[written] is m.w_bias


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


def test_every_reserved_name_is_renamed_and_works(tmp_path):
    # the reserved set is derived from nn.Module, StructuredLinear and the emitted code;
    # every name in it must give a working module, in memory and as a standalone file
    # (names starting "__" are refused by the parser; torch.compile adds one to nn.Module)
    names = sorted(n for n in reserved_names() if not n.startswith("__"))
    assert {"dump_patches", "T_destination", "compile", "chunk", "forward_steps", "x"} <= set(names)
    x = torch.randn(2, 8)
    for name in names:
        spec = f"u[i] {name}[i r] V[r o] -> v[o] with r = 2"
        m = einc.compile(spec, 8, 8)
        attr = m.factor_names()[0]
        assert attr == safe_name(name) != name and m.factors()[0] is getattr(m, attr), name
        assert m(x).shape == (2, 8), name
        namespace = {}
        exec(compile(module_source(m.lowered, "Layer", spec), "<emitted>", "exec"), namespace)
        theirs = namespace["Layer"]()
        theirs.load_state_dict(m.state_dict())
        assert torch.allclose(theirs(x), m(x), atol=1e-5), name
    path = tmp_path / "g.py"
    out = subprocess.run([sys.executable, "-m", "einc", "compile",
                          "x[i] dump_patches[i r] chunk[r o] -> y[o] with r = 2", "--d", "8",
                          "-o", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    layer = load_module(path, "StructuredLinear")()
    assert layer(x).shape == (2, 8)


@pytest.mark.parametrize("name", ["class", "\u00dcn\u00efcode", "torch", "nn", "super",
                                  "__name__", "A b", "Layer\n"])
def test_class_names_that_break_the_module_are_refused(name):
    with pytest.raises(einc.CompileError, match="ASCII Python identifier"):
        module_source(lower("btt", 64), name)


@pytest.mark.parametrize("name", ["Layer", "math", "bias", "forward", "x", "equation"])
def test_accepted_class_names_give_a_working_module(name):
    namespace = {}
    exec(compile(module_source(lower("btt", 64), name), "<emitted>", "exec"), namespace)
    assert namespace[name]()(torch.randn(2, 64)).shape == (2, 64)


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
    for name in ["class", "super", ""]:  # a keyword; a builtin __init__ calls; empty
        out = subprocess.run([sys.executable, "-m", "einc", "compile", "btt", "--d", "64",
                              "--class-name", name], capture_output=True, text=True)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert "--class-name" in out.stderr and out.stdout == ""
    out = subprocess.run([sys.executable, "-m", "einc", "compile", "btt", "--d", "64", "-o", ""],
                         capture_output=True, text=True)  # used to print to stdout
    assert out.returncode == 2 and "-o/--output is empty" in out.stderr and out.stdout == ""


def compile_to(path, **kw):
    return subprocess.run([sys.executable, "-m", "einc", "compile", "btt", "--d", "64", "-o",
                           str(path)], capture_output=True, text=True, **kw)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_compile_cli_replaces_only_regular_files(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    (tmp_path / "to_fifo").symlink_to(tmp_path / "fifo")
    (tmp_path / "to_null").symlink_to(os.devnull)  # replacing the link spares the device
    before = sorted(tmp_path.iterdir())
    for name, why in [("fifo", "FIFO"), ("folder", "directory"), ("to_fifo", "FIFO"),
                      ("to_null", "device")]:
        out = compile_to(tmp_path / name)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert str(tmp_path / name) in out.stderr and why in out.stderr
    assert sorted(tmp_path.iterdir()) == before
    assert stat.S_ISFIFO((tmp_path / "fifo").stat().st_mode)
    assert (tmp_path / "to_fifo").is_symlink() and (tmp_path / "to_null").is_symlink()
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_compile_cli_keeps_links_and_modes(tmp_path):
    target = tmp_path / "real.py"
    target.write_text("old")
    target.chmod(0o751)
    (tmp_path / "link.py").symlink_to(target)
    assert compile_to(tmp_path / "link.py").returncode == 0
    assert (tmp_path / "link.py").is_symlink() and "class BttLinear" in target.read_text()
    assert stat.S_IMODE(target.stat().st_mode) == 0o751
    out = compile_to(tmp_path / "new.py", preexec_fn=lambda: os.umask(0o002))
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE((tmp_path / "new.py").stat().st_mode) == 0o664  # not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.py", "new.py", "real.py"]


def test_compile_cli_os_errors_are_einc_errors(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    paths = [tmp_path / "file" / "x.py"] + [p for p in ["/proc/x.py", "/sys/x.py"]
                                            if os.path.isdir(os.path.dirname(p))]
    for path in paths:
        out = compile_to(path)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert f"cannot write {path}" in out.stderr
    # a failure after the temporary file exists removes it again
    def fail(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", fail)
    assert main(["compile", "btt", "--d", "64", "-o", str(tmp_path / "layer.py")]) == 2
    assert "No space left" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_compile_cli_reports_a_failed_stdout_write():
    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, "-m", "einc", "compile", "btt", "--d", "64"],
                             stdout=full, stderr=subprocess.PIPE, text=True)
    # as for analyze and search: an I/O failure (1), not a usage error (2)
    assert out.returncode == 1 and "cannot write to standard output" in out.stderr
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr


@pytest.mark.parametrize("route", ["auto", "fused"])
def test_torch_compile_has_no_graph_breaks_and_export_works(route):
    """An explicit "fused" route too: it broke the graph, and its export failed with grad
    enabled (bmm with out= in the graph)."""
    m = einc.compile("btt(rank=2)", 64, route=route)
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
    xg = torch.randn(4, 64, requires_grad=True)  # exported for 4 rows
    exported.module()(xg).sum().backward()
    assert xg.grad is not None


def test_compile_cli_refuses_a_folder_path(tmp_path):
    keep = tmp_path / "keep.py"
    keep.write_text("keep\n")
    for target in (f"{keep}/", f"{tmp_path / 'newdir'}/"):
        out = subprocess.run([sys.executable, "-m", "einc", "compile", "dense", "--d", "8",
                              "-o", target], capture_output=True, text=True)
        assert out.returncode == 2 and "names a folder" in out.stderr, out.stderr
    assert keep.read_text() == "keep\n" and not (tmp_path / "newdir").exists()


@pytest.mark.skipif(not os.path.exists("/dev/stdout"), reason="needs /dev/stdout")
def test_compile_cli_names_a_pipe_behind_dev_stdout():
    """With stdout a pipe, /dev/stdout resolves to a name realpath cannot stat ("pipe:[n]"):
    the path was taken as a new file and the error said "No such file or directory"."""
    out = subprocess.run([sys.executable, "-m", "einc", "compile", "dense", "--d", "8",
                          "-o", "/dev/stdout"], capture_output=True, text=True)
    assert out.returncode == 2 and "it is a FIFO" in out.stderr, out.stderr


def test_layout_planning_grows_linearly_with_the_chain(monkeypatch):
    # the planner tried every combination of layouts along the chain (2^steps): a diagonal
    # form of 24 factors compiled for minutes
    import einc.codegen.plan as plan
    calls = []
    real = plan.as_operand
    monkeypatch.setattr(plan, "as_operand", lambda *a, **k: calls.append(1) or real(*a, **k))
    factors = 16
    spec = "x[a] " + " ".join(f"W{k}[a]" for k in range(factors)) + " -> y[a]"
    m = einc.compile(spec, 6)
    assert len(calls) <= 4 * factors, len(calls)
    x = torch.randn(3, 6, dtype=torch.float64)
    m = m.double()
    w = torch.stack([f for f in m.factors()]).prod(0)
    torch.testing.assert_close(m(x), x * w + m.bias)


def test_compile_cli_leaves_a_read_only_file_alone(tmp_path, monkeypatch, capsys):
    # the rename replaced a 0444 file that open() could not have written
    target = tmp_path / "layer.py"
    target.write_text("kept")
    target.chmod(0o444)
    if os.geteuid() == 0:  # root may write anything: stand in for another user's access()
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and (
            mode != os.W_OK or bool(os.stat(p).st_mode & 0o222)))
    assert main(["compile", "btt", "--d", "64", "-o", str(target)]) == 2
    assert "the file is read-only" in capsys.readouterr().err
    assert target.read_text() == "kept" and [p.name for p in tmp_path.iterdir()] == ["layer.py"]


@pytest.mark.parametrize("spec,name", [("btt(rank=2)", "BttLinear"),
                                       ("btt(rank=3, cores=3)", "BttLinear"),
                                       ("tt(rank=2,cores=3)", "TtLinear"),
                                       ("ga,gafr,fgre->fe with g = a, f = e, r = 2", "StructuredLinear"),
                                       ("(0.5|0|0.5|0|0.5|0.5|0)", "StructuredLinear")])
def test_default_class_name_follows_the_preset(spec, name):
    from einc.codegen.cli import class_name_for
    assert class_name_for(einc.parse(spec)) == name
