"""Every example in docs/language.md runs: ```einc blocks analyse, ```einc-error blocks fail."""
import re
from pathlib import Path

import pytest

import einc

DOC = Path(__file__).resolve().parent.parent / "docs" / "language.md"
BLOCK = re.compile(r"^```(einc|einc-error)\n(.*?)^```", re.S | re.M)


def examples():
    out = []
    for m in BLOCK.finditer(DOC.read_text()):
        kind, body = m.groups()
        widths, error = {"d": 4096}, None
        for line in body.splitlines():
            line = line.strip()
            if line.startswith("#"):
                if "=" in line and "error" not in line:
                    pairs = re.findall(r"(d_in|d_out|d)\s*=\s*(\d+)", line)
                    widths = {k: int(v) for k, v in pairs}
                elif line.startswith("# error:"):
                    error = getattr(einc, line.split(":", 1)[1].strip())
                continue
            if line:
                spec = "" if line == "-" else line
                out.append(pytest.param(kind, spec, dict(widths), error, id=line[:60]))
    return out


EXAMPLES = examples()


def test_the_reference_has_examples():
    kinds = [p.values[0] for p in EXAMPLES]
    assert kinds.count("einc") >= 30 and kinds.count("einc-error") >= 25


@pytest.mark.parametrize("kind,spec,widths,error", EXAMPLES)
def test_example(kind, spec, widths, error):
    if kind == "einc":
        s = einc.parse(spec)
        if all(ix.size.is_const for ix in s.indices):
            widths = {}
        rep = einc.analyze(s, **widths)
        assert rep.params > 0 and rep.flops > 0
    else:
        assert error is not None and issubclass(error, einc.EincError)
        with pytest.raises(error):
            s = einc.parse(spec)
            einc.analyze(s, **widths)


def test_every_preset_is_documented():
    from einc.presets import PRESETS
    text = DOC.read_text()
    for name in PRESETS:
        assert f"| `{name}` |" in text


README = DOC.parent.parent / "README.md"


def readme_table_examples():
    """The example column of the README's language table, except the sizes row (a phrase)."""
    section = README.read_text().split("## The language, in one screen", 1)[1].split("\n\n")[1]
    out = []
    for row in section.splitlines()[2:]:
        form, example = row.strip("|").split("|", 1)
        if form.strip() in ("sizes", "presets"):  # prose and a list of names, not one spec
            continue
        out.append(pytest.param(re.search(r"`([^`]*)`", example).group(1), id=form.strip()))
    return out


@pytest.mark.parametrize("spec", readme_table_examples())
def test_readme_table_example(spec):
    assert einc.analyze(spec, d=1024).params > 0


def test_readme_table_has_examples():
    assert len(readme_table_examples()) == 3
