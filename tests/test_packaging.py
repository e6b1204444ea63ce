"""The wheel ships the grammar and parses specs outside the source tree."""
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(ROOT)], check=True, capture_output=True,
                   timeout=300)
    (whl,) = out.glob("einc-*.whl")
    return whl


def test_wheel_contains_the_grammar(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "einc/grammar/einc.lark" in names
    assert "einc/syntax.py" in names and "einc/analysis/__init__.py" in names
    assert not any(n.startswith("tests/") for n in names)


def test_installed_wheel_parses_outside_the_repo(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; "
                           "print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    if sys.prefix != sys.base_prefix:
        # Running inside a virtual environment: its packages (torch, lark, ...) are the
        # "system" ones for the new environment. A path line in a .pth file adds only that
        # folder, after the new site-packages, so the installed wheel is what imports.
        Path(site, "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--force-reinstall", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    code = ("import einc, pathlib; s = einc.parse('btt(rank=2)'); "
            "print(pathlib.Path(einc.__file__).parent); print(s.equation); "
            "from einc.syntax import grammar_text; assert 'compact' in grammar_text(); "
            "print(einc.analyze('btt', d=64).params)")
    # a PYTHONPATH entry holding an einc package (this checkout) would shadow the wheel;
    # the others (folders of dependencies) stay, made absolute for the subprocess's cwd
    paths = [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
             if p and not Path(p, "einc", "__init__.py").exists()]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    run = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    where, equation, params = run.stdout.split()
    assert Path(where).resolve().is_relative_to(env_dir.resolve())
    assert equation == "ga,gafr,fgre->fe"
    assert params == str(2 * 8 ** 3)
