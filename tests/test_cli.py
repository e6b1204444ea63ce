"""The command line, run as a user runs it: exit codes, messages without tracebacks, JSON."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def repo_env():
    """The environment with this checkout first on PYTHONPATH (entries already there, such
    as a folder of dependencies, kept after it)."""
    rest = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + ([rest] if rest else [])))


def einc(*args):
    env = repo_env()
    return subprocess.run([sys.executable, "-m", "einc", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_no_sub_command_is_a_usage_error():
    """It printed the help and exited 0, so a script that lost its sub-command passed."""
    r = einc()
    assert r.returncode == 2 and r.stdout == "" and "usage: einc" in r.stderr
    r = einc("experiment")  # its own sub-command missing: the same
    assert r.returncode == 2 and r.stdout == "" and "usage: einc experiment" in r.stderr


def test_analyze_table():
    r = einc("analyze", "btt", "--d", "1024")
    assert r.returncode == 0, r.stderr
    assert "65,536" in r.stdout and "omega psi nu" in r.stdout


def test_analyze_json():
    r = einc("analyze", "(0.25|0|0.75|0|0.75|0.25|0)", "--d", "4096", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["d_in"] == out["d_out"] == 4096
    assert (out["omega"], out["psi"], out["nu"]) == (0, 1, 0.75)
    assert out["redundant"] is False and out["degenerate"] is False
    assert out["rank_cut"] and set(out["rank_cut"]) <= set(out["sizes"])


def test_analyze_rectangular():
    r = einc("analyze", "btt(rank=2)", "--d-in", "768", "--d-out", "3072", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["padded_in"], out["padded_out"]) == (784, 3080)


@pytest.mark.parametrize("args,fragment,caret", [
    (["analyze", "ga,gafr,fgre->fz", "--d", "64"], "output index 'z' appears in no operand",
     "                 ^"),
    (["analyze", "btt(rnk=2)", "--d", "64"], "no parameter 'rnk'", "      ^^^"),
    (["analyze", "", "--d", "64"], "empty spec", "  ^"),
    (["analyze", "(0.5|0|0.6|0|0.5|0.5|0)", "--d", "64"], "must sum to 1", "  " + "^" * 23),
    (["analyze", "btt", "--d", "5"], "padding", None),
    (["analyze", "btt"], "give d", None),
    (["analyze", "bttmoe(experts=4, k=4) with r = 2", "--d", "1024"],
     "top-4 routing needs at least 4 experts", "                              ^"),
    (["analyze", "btt", "--d", "64", "--tolerance", "nan"], "tolerance must be a number >= 0", None),
])
def test_errors_exit_2_without_traceback(args, fragment, caret):
    r = einc(*args)
    assert r.returncode == 2
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("einc: ") and fragment in r.stderr
    if caret is not None:
        assert caret in r.stderr.splitlines()
    assert len(r.stderr.splitlines()) <= 5


def test_analyze_and_version_do_not_load_torch():
    """The CLI registers every stage's command on each call; the experiments package loaded
    torch while doing so, and `einc --version` took 1.9 s instead of 0.4 s."""
    code = ("import sys; from einc.cli import main; main(['analyze', 'btt', '--d', '64']); "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "False", r.stderr


def test_stages_are_attributes_of_the_package():
    """`import einc` alone loads no torch, but einc.moe, einc.runtime, ... are reachable
    as attributes (the docs write einc.moe.route); only on first use do they load."""
    code = ("import sys, einc; before = 'torch' in sys.modules; "
            "print(before, callable(einc.moe.route), einc.runtime.__name__, "
            "einc.space.__name__, einc.codegen.__name__, einc.kernels.__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True", "einc.runtime", "einc.space", "einc.codegen",
                                "einc.kernels"]


def test_version():
    """`einc --version` prints the version the package is built with (pyproject.toml)."""
    from einc import __version__

    r = einc("--version")
    assert r.returncode == 0 and r.stdout == f"einc {__version__}\n"
    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert declared and declared.group(1) == __version__


def test_usage_errors_exit_2():
    r = einc("analyze", "btt", "--d", "many")
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_an_unwritable_stdout_is_an_error_without_traceback():
    env = repo_env()
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "einc", "analyze", "btt", "--d", "1024"],
                           stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("einc: cannot write to standard output: No space left")


@pytest.mark.parametrize("args", [["analyze", "btt", "--d", "64"], ["search", "--d", "16"],
                                  ["compile", "btt", "--d", "16"]])
def test_a_closed_stdout_is_an_error_without_traceback(args):
    """`einc ... >&-`: Python starts with sys.stdout None, and the final flush raised an
    AttributeError with a traceback."""
    r = subprocess.run([sys.executable, "-m", "einc", *args], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, env=repo_env(), timeout=120,
                       preexec_fn=lambda: os.close(1))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == "einc: cannot write to standard output: it is closed"


def test_compile_to_a_file_needs_no_stdout(tmp_path):
    out = tmp_path / "layer.py"
    r = subprocess.run([sys.executable, "-m", "einc", "compile", "btt", "--d", "16", "-o",
                        str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True, env=repo_env(), timeout=120, preexec_fn=lambda: os.close(1))
    assert r.returncode == 0 and out.exists(), r.stderr


@pytest.mark.parametrize("command", [["analyze", "btt"], ["compile", "btt"], ["search"]])
@pytest.mark.parametrize("option,value", [("--d", "0"), ("--d", "1000000000000"),
                                          ("--d-in", "-5"), ("--d-out", "4294967297")])
def test_a_bad_width_names_the_option_typed(run_einc, command, option, value):
    """--d 0 was reported as 'd_in must be a positive integer', --d 10^12 as 'd_in = ...'."""
    rc, out, err = run_einc(*command, option, value)
    assert rc == 2 and out == "" and "Traceback" not in err
    assert f"argument {option}: takes an integer >= 1 and <= 4,294,967,296, got '{value}'" in err
    assert "d_in" not in err.replace("--d-in", "")


@pytest.mark.parametrize("command", [["analyze", "btt"], ["compile", "btt"], ["search"]])
def test_d_with_d_in_names_the_options(run_einc, command):
    rc, out, err = run_einc(*command, "--d", "64", "--d-out", "64")
    assert (rc, out, err) == (2, "", "einc: give either --d or --d-in/--d-out, not both\n")


def test_the_largest_width_is_accepted(run_einc):
    rc, out, err = run_einc("analyze", "btt", "--d", "4294967296")
    assert rc == 0 and "d_in -> d_out    4294967296 -> 4294967296" in out
