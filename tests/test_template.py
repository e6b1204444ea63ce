"""The index-class template agrees with einc.analyze exactly, point by point."""
import random
from fractions import Fraction

import numpy as np
import pytest

import einc
from einc.analysis.template import Template
from einc.space.lattice import Space
from einc.space.rank import record
from einc.space.score import score

FIELDS = ("spec", "d_in", "d_out", "padded_in", "padded_out", "sizes", "input", "output",
          "factors", "params", "flops", "flops_backward", "omega", "psi", "nu", "rank_bound")


def _sample(space, n, seed):
    rng = random.Random(seed)
    ids = []
    while len(ids) < n:
        ix, iy, ir = rng.randrange(space.nX), rng.randrange(space.nY), rng.randrange(space.nR)
        ix, iy, ir = space.canonical(*(np.array([v]) for v in (ix, iy, ir)))
        ids.append(int(space.ids(ix, iy, ir)[0]))
    return ids


@pytest.mark.parametrize("factors,k,dims,n", [
    (2, 12, (1024, 1024), 40), (2, 6, (768, 512), 30), (2, 4, (100, 300), 30),
    (3, 4, (1024, 1024), 25), (3, 3, (512, 729), 20), (3, 2, (96, 64), 20),
])
def test_template_matches_analyze(factors, k, dims, n):
    space = Space(factors, k)
    d_in, d_out = dims
    checked = 0
    for pid in _sample(space, n, seed=factors * 100 + k):
        exps = space.point_exponents(*(int(v[0]) for v in space.split([pid])))
        if space.template.concrete_sizes(exps, d_in, d_out) is None:
            with pytest.raises(einc.SizeError):
                einc.analyze(record_spec(space, pid), d_in=d_in, d_out=d_out)
            continue
        rec = record(space, pid, d_in, d_out)
        rep = einc.analyze(rec["spec"], d_in=d_in, d_out=d_out).to_dict()
        assert {f: rec[f] for f in FIELDS} == {f: rep[f] for f in FIELDS}, rec["spec"]
        for f in ("theta", "redundant", "degenerate"):
            assert rec.get(f) == rep.get(f), (f, rec["spec"])
        checked += 1
    assert checked >= 8


def record_spec(space, pid):
    exps = space.point_exponents(*(int(v[0]) for v in space.split([pid])))
    theta = space.theta(exps)
    if theta is not None:
        return "(" + "|".join(str(v) for v in theta) + ")"
    return space.template.structure_at(exps).spec_text()


@pytest.mark.parametrize("factors,k", [(2, 12), (3, 2)])
def test_vectorised_scores_match_exact_records(factors, k):
    """The numpy columns (floats) agree with the exact integer records."""
    space = Space(factors, k)
    c = score(space, 1024, 1024, progress=False)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(c), 40, replace=False):
        rec = record(space, int(c.ids[i]), 1024, 1024)
        assert rec["params"] == c.params[i] and rec["flops"] == c.flops[i]
        assert rec["rank_bound"] == c.rank_bound[i]
        assert [Fraction(int(v), k) for v in (c.omega[i], c.psi[i], c.nu[i])] == \
            [Fraction(rec[f]).limit_denominator(100) for f in ("omega", "psi", "nu")]


def test_cut_sets_of_the_paper_template():
    space = Space(2, 12)
    t = space.template
    assert isinstance(t, Template)
    # theta letters: g=gamma b=beta a=alpha f=phi h=delta r=rho e=eps
    assert set(map(frozenset, t.cut_sets)) == {frozenset("gba"), frozenset("fhe"),
                                               frozenset("gbfhr"), frozenset("gafre")}


def test_exponents_of_known_points():
    space = Space(2, 12)
    t = space.template
    for theta, want in [((0, 0, 1, 0, 0, 1, 0), (0, 1, 1)),
                        ((Fraction(1, 2), 0, Fraction(1, 2), 0, Fraction(1, 2), Fraction(1, 2), 0),
                         (0, 1, Fraction(1, 2))),
                        ((Fraction(1, 2),) * 2 + (0,) + (Fraction(1, 2),) * 2 + (0, 0),
                         (Fraction(1, 2), 1, Fraction(1, 2)))]:
        exps = space.exps_from_theta(tuple(Fraction(v) for v in theta))
        assert t.exponents(exps) == want
