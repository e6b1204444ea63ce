"""The structure space: enumeration, deduplication, ranking, records and the CLI."""
import csv
import io
import itertools
import json
import math
import re
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

import einc
from einc.analysis.taxonomy import closed_forms
from einc.space import Space, search
from einc.space.canonical import dedupe, same_family
from einc.space.rank import SORT_KEYS, to_csv
from einc.space.score import score


# -- lattice counts ---------------------------------------------------------------------
def _fixed_points(space, g):
    """Points fixed by relabeling g, counted directly from the class permutation."""
    perm = {c: space.act(g, c) for c in space.col}
    seen = set()
    cycles = []
    for c in space.col:
        if c in seen:
            continue
        cyc, cur = [], c
        while cur not in seen:
            seen.add(cur)
            cyc.append(cur)
            cur = perm[cur]
        cycles.append(cyc)
    # A fixed point is constant on each cycle; a cycle adds its value once per class it
    # has on each side, and both sides must sum to k.
    k = space.k
    side = lambda c: space.key[c][0]
    weights = [(sum(side(c) == "x" for c in cy), sum(side(c) == "y" for c in cy))
               for cy in cycles if side(cy[0]) != "r"]
    ways = {(0, 0): 1}  # (input sum, output sum) -> number of assignments so far
    for wx, wy in weights:
        nxt = {}
        for (sx, sy), n in ways.items():
            for v in range(k + 1):
                key = (sx + v * wx, sy + v * wy)
                if key[0] <= k and key[1] <= k:
                    nxt[key] = nxt.get(key, 0) + n
        ways = nxt
    count = ways.get((k, k), 0)
    return count * (k + 1) ** sum(1 for cy in cycles if side(cy[0]) == "r")


@pytest.mark.parametrize("factors,k,transpose", [(2, 12, False), (2, 5, True), (3, 2, False),
                                                 (3, 2, True), (3, 3, False)])
def test_lattice_counts(factors, k, transpose):
    space = Space(factors, k, transpose)
    nx = math.comb(k + len(space.xc) - 1, len(space.xc) - 1)
    assert space.size == nx * nx * (k + 1) ** len(space.rc)
    # Burnside: distinct families = mean number of fixed points over the relabelings.
    burnside = sum(_fixed_points(space, g) for g in space.group) // len(space.group)
    c = score(space, 4096, 4096, tolerance=10.0, progress=False)
    assert c.counts["distinct"] == burnside
    if factors == 2 and not transpose:
        half = k // 2 + 1
        assert burnside == (space.size + half * half * (k + 1)) // 2


def test_graph_dedupe_agrees_with_lattice_orbits():
    """Graph isomorphism (WL hash + exact check) finds the same families as the orbits."""
    for factors, k in ((2, 4), (3, 1)):
        space = Space(factors, k)
        structs = []
        for ix, iy, ir in itertools.product(range(space.nX), range(space.nY), range(space.nR)):
            exps = space.point_exponents(ix, iy, ir)
            structs.append(space.template.structure_at(exps))
        c = score(space, 4096, 4096, tolerance=10.0, progress=False)
        assert len(dedupe(structs)) == c.counts["distinct"]


def test_no_two_results_share_a_canonical_form():
    res = search(d=1024, top=1500, max_flops=None)
    forms = {einc.parse(r["spec"]).canonical() for r in res}
    assert len(forms) == len(res)
    res3 = search(d=256, factors=3, k=2, top=300, max_flops=None)
    assert len({einc.parse(r["spec"]).canonical() for r in res3}) == len(res3)


def test_isomorphic_specs_dedupe_to_one():
    specs = ["x[g a] A[g a f] B[f g e] -> y[f e] with g = a = d_in^(1/2), f = e = d_out^(1/2)",
             "x[p q] U[p v q] V[w v p] -> y[v w] with p = q = d_in^(1/2), v = w = d_out^(1/2)",
             "btt", "(1/2|0|1/2|0|1/2|1/2|0)", "(0|1/2|1/2|1/2|0|1/2|0)",
             # one input index split in two (a class of two indices) is the same family
             "x[g a1 a2] A[g a1 a2 f] B[f g e] -> y[f e] with g = d_in^(1/2), "
             "a1 = a2 = d_in^(1/4), f = e = d_out^(1/2)"]
    kept = dedupe([einc.parse(s) for s in specs])
    assert len(kept) == 1
    assert not same_family(einc.parse("kron"), einc.parse("btt"))
    # W and its transpose: one family only when transposes are identified
    a, b = einc.parse("(1|0|0|0|1/2|1/2|1/2)"), einc.parse("(0|1/2|1/2|1|0|0|1/2)")
    assert not same_family(a, b) and same_family(a, b, transpose=True)


# -- known structures and taxonomy --------------------------------------------------------
def test_known_structures_have_the_paper_taxonomy():
    from einc.space.names import known_ids
    from einc.space.rank import record

    space = Space(2, 12)
    names = known_ids(space)
    by_name = {n: record(space, pid, 1024, 1024, names=names) for pid, n in names.items()}
    top = search(d=1024, max_flops="0.1x", max_omega=0, min_psi=1, top=None)
    assert "Monarch / BTT r=1" in {r["name"] for r in top}
    want = {"dense": (0, 1, 1), "dense (2 factors)": (0, 1, 1),
            "Monarch / BTT r=1": (0, 1, 0.5), "Kronecker": (0.5, 1, 0.5),
            "low-rank r=d^1/2": (0, 0.5, 0.5), "BTT r=d^1/4": (0, 1, 0.75),
            "TT r=d^1/4": (0.5, 1, 0.75)}
    for name, taxo in want.items():
        r = by_name[name]
        assert (r["omega"], r["psi"], r["nu"]) == pytest.approx(taxo), name
    assert by_name["Monarch / BTT r=1"]["params"] == 2 * 1024 * 32
    # the same points parsed from presets land on the same family
    btt = einc.parse("btt")
    assert same_family(btt, einc.parse(by_name["Monarch / BTT r=1"]["spec"]))


def test_two_factor_points_agree_with_closed_forms():
    space = Space(2, 12)
    c = score(space, 1024, 1024, tolerance=10.0, progress=False)
    checked = 0
    for pid, om, ps, nu in zip(c.ids, c.omega, c.psi, c.nu):
        exps = space.point_exponents(*(int(v[0]) for v in space.split([pid])))
        cf = closed_forms(space.theta(exps))
        assert not cf["redundant"]  # renaming keeps the non-redundant orientation
        if cf["degenerate"]:
            continue
        got = tuple(Fraction(int(v), 12) for v in (om, ps, nu))
        assert got == (cf["omega"], cf["psi"], cf["nu"]), space.theta(exps)
        checked += 1
    assert checked > 10000


# -- filters, sort keys, records ----------------------------------------------------------
def test_filters_are_honoured():
    res = search(d=1024, max_flops="0.1x", max_params=50_000, min_psi="1", max_omega=0,
                 exclude_degenerate=True, top=None)
    assert res
    for r in res:
        assert r["flops"] <= 0.1 * 2 * 1024 * 1024 and r["params"] <= 50_000
        assert r["psi"] == 1 and r["omega"] == 0 and not r["degenerate"]
    key = [(r["omega"], -r["psi"], -r["params"] / r["flops"], r["flops"]) for r in res]
    assert key == sorted(key)
    by_flops = search(d=1024, sort="flops", top=50, max_flops=None)
    assert [r["flops"] for r in by_flops] == sorted(r["flops"] for r in by_flops)


def test_paper_order_puts_the_cheapest_first_among_equal_params_per_flop():
    """Every omega = 0, psi = 1 point has 1/2 parameter per FLOP: the lattice order used to
    decide, listing the costliest candidate first and Monarch / BTT 15th."""
    res = search(d=4096, max_flops="0.1x", min_psi=1, top=20)
    assert res[0]["name"].startswith("Monarch") and res[0]["flops"] == 1_048_576
    assert [r["flops"] for r in res] == sorted(r["flops"] for r in res)
    assert search(d=1024, top=1)[0]["name"] != "dense"


@pytest.mark.parametrize("sort,field,sign", [("omega", "omega", 1), ("psi", "psi", -1),
                                             ("nu", "nu", 1), ("rank", "rank_bound", -1)])
def test_single_key_sorts_break_ties_by_cost(sort, field, sign):
    """Equal key and parameters per FLOP (every omega = 0, psi = 1 point has 1/2): the
    cheaper candidate first, not lattice order."""
    res = search(d=1024, sort=sort, top=300, max_flops=None)
    key = [(sign * r[field], -r["params"] / r["flops"], r["flops"]) for r in res]
    assert key == sorted(key)

def test_rank_bound_never_exceeds_the_layer_width():
    """Padded points used to report (and rank by) the padded cut, above min(d_in, d_out)."""
    res = search(d_in=1000, d_out=900, sort="rank", top=20, max_flops=None)
    assert res and all(r["rank_bound"] <= 900 for r in res)
    assert max(r["rank_bound"] for r in res) == 900

def test_search_scores_the_cheapest_of_equally_close_roundings():
    """(1/3|...|0) at d = 1024 has roundings of equal padding and distance costing 440,000
    or 462,000 FLOPs; the search used to keep the costlier and drop the point here."""
    res = search(d=1024, max_flops=450_000, top=None)
    rec = [r for r in res if r["spec"] == "(1/3|1/3|1/3|1/3|1/3|1/3|0)"]
    assert len(rec) == 1 and rec[0]["flops"] == 440_000
    rep = einc.analyze(rec[0]["spec"], d=1024)
    assert (rep.flops, rep.params, rep.sizes) == (rec[0]["flops"], rec[0]["params"],
                                                  rec[0]["sizes"])

def test_budget_below_every_candidate_gives_an_empty_result():
    res = search(d=1024, max_flops=10)
    assert list(res) == [] and "cheapest candidate needs" in res.message
    # the budget prints as compared: 0.001x of 2,097,152 is 2,097.152, not "2,097"
    res = search(d=1024, max_flops="0.001x", max_params="0.001x")
    assert "(budget 2,097.152)" in res.message and "(budget 1,048.576)" in res.message


def test_each_layer_is_listed_once_at_its_width(capsys):
    """At d = 64, r = d^(1/12) rounds to 1, so (1/2|0|1/2|0|1/2|1/2|1/12) is Monarch and the
    top 20 listed the same layer twice (about half of all rows repeated one above)."""
    from einc.space.rank import layer_key

    every = search(d=64, top=0, distinct=False)
    once = search(d=64, top=0)
    assert len(once) + once.repeats == len(every) and once.repeats > 1000
    firsts, kept, cheapest, shown = {}, {}, {}, {}
    for r in every:
        key = layer_key(r)
        firsts.setdefault(key, r)
        kept.setdefault((key, r["flops"]), r)
        cheapest[key] = min(cheapest.get(key, r["flops"]), r["flops"])
    assert [r["spec"] for r in once] == [r["spec"] for r in kept.values()]
    # a cheaper count of a layer is never hidden behind a dearer one above it
    for r in once:
        shown.setdefault(layer_key(r), set()).add(r["flops"])
    assert all(cheapest[key] in flops for key, flops in shown.items())
    by_spec = {r["spec"]: r for r in every}
    monarch = by_spec["(1/2|0|1/2|0|1/2|1/2|0)"]
    btt = by_spec["(1/2|0|1/2|0|1/2|1/2|1/12)"]
    assert btt["sizes"]["r"] == 1 and layer_key(btt) == layer_key(monarch)
    # a repeat has the first one's parameters and rank bound; its FLOPs can differ where a
    # step sums over a size-1 index only (counted as multiply-adds, as opt_einsum counts;
    # a product without it): then both are listed
    for r in every:
        first = firsts[layer_key(r)]
        assert (r["params"], r["rank_bound"]) == (first["params"], first["rank_bound"])
        assert first["flops"] / 2 <= r["flops"] <= 2 * first["flops"]
    # not merged: a layer and its transpose, unless transpose=True
    t = by_spec["(2/3|0|1/3|0|1/2|1/2|1/12)"]
    tt = by_spec["(1/2|0|1/2|0|2/3|1/3|1/12)"]
    assert layer_key(t) != layer_key(tt) and layer_key(t, True) == layer_key(tt, True)
    # the default top 20 shows 20 different layers, and says how many it skipped
    top = search(d=64)
    assert len(top) == 20 and top.repeats > 0
    assert len({(layer_key(r), r["flops"]) for r in top}) == 20
    rc, out, err = _main(capsys, "--d", "64")
    assert rc == 0 and f"{top.repeats} skipped as the layer of a row above" in out
    rc, out, err = _main(capsys, "--d", "64", "--all-roundings", "--json")
    assert [r["spec"] for r in json.loads(out)] == [r["spec"] for r in every[:20]]
    with pytest.raises(einc.EincError, match="distinct must be True or False"):
        search(d=64, distinct="no")


def test_padded_layers_merge_only_where_they_crop_alike():
    """The module crops a padded side to its first d_in inputs (d_out outputs) in the
    written index order, so equal size products can drop different slices: at d = 50 these
    two points have equal counts, ranks 42 and 44, and the second was hidden as the first's
    layer. Padded points whose sizes round to the same ordered sizes are one layer: at
    d = 96, r = d^(1/12) rounds to 1 and the BTT point is Monarch (half of the top 12 rows
    were such repeats)."""
    import torch
    from einc.space.rank import layer_key

    specs = ["(1/4|3/4|0|1/12|2/3|1/4|0)", "(3/4|1/4|0|2/3|1/4|1/12|0)"]
    rows = {r["spec"]: r for r in search(d=50, top=0) if r["spec"] in specs}
    assert set(rows) == set(specs) and layer_key(rows[specs[0]]) != layer_key(rows[specs[1]])
    ranks = []
    for spec in specs:
        m = einc.compile(spec, 50, dtype=torch.float64, bias=False)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_()
        ranks.append(int(torch.linalg.matrix_rank(m.materialize())))
    assert ranks[0] != ranks[1]

    monarch, btt = "(1/2|0|1/2|0|1/2|1/2|0)", "(1/2|0|1/2|0|1/2|1/2|1/12)"
    every = {r["spec"]: r for r in search(d=96, top=20, distinct=False)}
    assert every[btt]["padded_in"] > 96 and every[btt]["sizes"]["r"] == 1
    assert layer_key(every[btt]) == layer_key(every[monarch])
    shown = [r["spec"] for r in search(d=96, top=20)]
    assert monarch in shown and btt not in shown
    # the same matrix: the BTT's factors are Monarch's with a size-1 axis
    a, b = (einc.compile(spec, 96, dtype=torch.float64, bias=False) for spec in (monarch, btt))
    with torch.no_grad():
        for p, q in zip(a.factors(), b.factors()):
            p.normal_()
            q.copy_(p.reshape(q.shape))
    torch.testing.assert_close(a.materialize(), b.materialize())


@pytest.mark.parametrize("kw", [dict(d_in=12, d_out=24, k=6, max_flops=None),
                                dict(d=12, k=6, transpose=True, max_flops=None),
                                dict(d=8, factors=3, k=2, max_flops="4x")])
def test_the_search_reads_each_points_layer_as_its_record_gives_it(kw):
    """The search keys every row off the template (records for thousands of repeats took
    seconds at small widths); that key is the record's, for every point."""
    from einc.space.rank import _point_key, layer_key

    res = search(top=0, distinct=False, **kw)
    c = res.candidates
    assert len(res) > 100
    for i, rec in zip(res.order, res):
        assert _point_key(res.space, int(c.ids[i]), rec["d_in"], rec["d_out"], 0.15) == \
            layer_key(rec, kw.get("transpose", False)), rec["spec"]


def test_budgets_are_exact():
    """0.567 * 20000 is 11339.999999999998 in floats: the four layers costing exactly
    0.567x dense were dropped. A budget is an exact fraction, compared with integer costs."""
    by_fraction = search(d=100, max_flops="0.567x", top=0)
    assert max(r["flops"] for r in by_fraction) == 11_340
    ids = lambda rs: sorted(r["spec"] for r in rs)
    assert ids(by_fraction) == ids(search(d=100, max_flops=11_340, top=0))
    assert ids(by_fraction) == ids(search(d=100, max_flops="567/1000x", top=0))
    assert 11_340 not in {r["flops"] for r in search(d=100, max_flops=11_339, top=0)}
    # a finite budget past float range is a budget, not an error
    assert len(search(d=64, k=4, max_flops="1e400", top=0)) == \
        len(search(d=64, k=4, max_flops=None, top=0))


@pytest.mark.parametrize("kwargs,error,text", [
    ({"k": 0}, einc.SizeError, "k = 0"),
    ({"sort": "speed"}, einc.UnknownNameError, "unknown sort key"),
    ({"max_flops": "lots"}, einc.SizeError, "bad FLOP budget"),
    ({"max_params": "-1x"}, einc.SizeError, "positive"),
    # below one FLOP or parameter nothing fits: surely a forgotten x
    ({"max_flops": "0.1"}, einc.SizeError, "'0.1': an absolute budget below 1.*write 0.1x"),
    ({"max_params": 0.5}, einc.SizeError, "parameter budget 0.5.*write 0.5x"),
    ({"min_psi": "half"}, einc.SizeError, r"min_psi \(--min-psi\) = .half. is not a number"),
    ({"factors": 4}, einc.UnknownNameError, "2 or 3"),
    ({"factors": 3, "k": 6}, einc.SizeError, "choose k <= 4"),
    # counted, not built: refused at once (building first took minutes and GBs)
    ({"k": 10_000}, einc.SizeError, "25,017,504,750,625,040,001 lattice points"),
    ({"factors": 3, "k": 50}, einc.SizeError, "choose k <= 4"),
    ({"k": 47}, einc.SizeError, "66,382,848 lattice points.*choose k <= 46"),
    ({"d_in": 512, "d_out": 256, "transpose": True}, einc.SizeError, "d_in = d_out"),
])
def test_bad_options(kwargs, error, text):
    with pytest.raises(error, match=text):
        search(**kwargs)
    if "sort" in kwargs:
        with pytest.raises(einc.UnknownNameError) as e:
            search(**kwargs)
        assert all(k in str(e.value) for k in SORT_KEYS)


@pytest.mark.parametrize("kwargs,text", [
    ({"min_psi": 10 ** 400}, r"min_psi \(--min-psi\) = ~1e\+400 is out of range: psi lies "
                             r"in \[0, 1\]"),
    ({"min_psi": "1e400"}, r"out of range: psi lies in \[0, 1\]"),
    ({"min_psi": "1e100000000"}, "out of range"),  # Fraction(text) took minutes
    ({"min_psi": "2"}, "out of range"),  # psi = min(1, ...): nothing would pass
    ({"min_psi": "-1/2"}, "out of range"),
    ({"min_psi": "1" * 5000 + "/1"}, "is not a number"),  # Python's 4,300-digit limit
    ({"max_omega": "1e400"}, r"max_omega \(--max-omega\) = '1e400' is out of range: omega "
                             r"lies in \[0, 3\] in the 2-factor space"),
    ({"max_omega": float("inf")}, "out of range"),
    ({"max_omega": "nan"}, r"is not a number: give one from 0 to 3"),
    ({"max_omega": "1/0"}, "is not a number"),
])
def test_exponent_bounds_are_checked_at_once(kwargs, text):
    with pytest.raises(einc.SizeError, match=text):
        search(d=64, k=4, **kwargs)


def test_exponent_bounds_in_range_filter_exactly():
    assert search(d=64, k=4, min_psi="1e-100000000", top=None).counts["passed"] == \
        search(d=64, k=4, top=None).counts["passed"]  # 0, without building 10^100000000
    half = search(d=64, k=4, min_psi="1/2", top=None)
    assert list(search(d=64, k=4, min_psi=np.float64(0.5), top=None)) == list(half)
    assert all(r["psi"] >= 0.5 for r in half)


def test_cli_refuses_huge_exponent_bounds(capsys):
    rc, out, err = _main(capsys, "--d", "64", "--k", "4", "--no-progress", "--max-omega",
                         "1e400")
    assert rc == 2 and out == "" and err.startswith("einc: max_omega (--max-omega)")


@pytest.mark.parametrize("kwargs,error,text", [
    ({"tolerance": "0.1"}, einc.SizeError, "padding tolerance must be a number >= 0, got '0.1'"),
    ({"factors": 2.0}, einc.UnknownNameError, "must be 2 or 3, got 2.0"),
    ({"k": 4.0}, einc.SizeError, "k = 4.0"),
    ({"transpose": 1}, einc.EincError, "transpose must be True or False, got 1"),
    ({"exclude_degenerate": "no"}, einc.EincError, "exclude_degenerate must be True or False"),
    ({"measure": "yes"}, einc.EincError, "measure must be True or False"),
    ({"progress": "x"}, einc.EincError, "progress must be True, False or None"),
    ({"sort": ["paper"]}, einc.UnknownNameError, "unknown sort key"),
    ({"top": 2.0}, einc.SizeError, "top must be a non-negative integer"),
    ({"d": 2.0}, einc.SizeError, "d must be a positive integer, got 2.0"),
    ({"max_flops": 10 ** 5000}, einc.SizeError, "bad FLOP budget ~1e+5000: give a number"),
    ({"max_params": "nan"}, einc.SizeError, "it must be a positive, finite number"),
    ({"max_params": float("nan")}, einc.SizeError, "it must be a positive, finite number"),
    ({"max_params": True}, einc.SizeError, "bad parameter budget True: give a number"),
])
def test_argument_types_are_checked(kwargs, error, text):
    with pytest.raises(error, match=re.escape(text)):
        search(**{"d": 64, "k": 4, **kwargs})


def test_numpy_integers_are_accepted():
    ref = search(d=64, k=4, top=3)
    got = search(d=np.int64(64), k=np.int32(4), top=np.int64(3))
    assert list(got) == list(ref) and got[0]["d_in"] == 64 and type(got[0]["d_in"]) is int


def test_json_schema_matches_analyze():
    res = search(d_in=1024, d_out=512, top=15, max_flops=None)
    fields = ("spec", "d_in", "d_out", "padded_in", "padded_out", "sizes", "input", "output",
              "factors", "params", "flops", "flops_backward", "omega", "psi", "nu",
              "rank_bound", "redundant", "degenerate", "theta")
    for r in res:
        assert r["absorbable"] is False  # left out by default
        assert set(fields) | {"name"} <= set(r)
        rep = einc.analyze(r["spec"], d_in=1024, d_out=512).to_dict()
        assert {f: r[f] for f in fields} == {f: rep[f] for f in fields}
    json.dumps(list(res))
    assert to_csv(res).splitlines()[0].startswith("rank,name,spec")


def test_three_factor_records_parse_and_analyse():
    res = search(d=1024, factors=3, k=2, top=5, max_flops="0.2x")
    assert res
    for r in res:
        rep = einc.analyze(r["spec"], d=1024)
        assert (rep.params, rep.flops) == (r["params"], r["flops"])


def _absorbable_by_indices(rec) -> bool:
    """Independently of the lattice: some factor's indices (of size > 1 exponent, as
    written in the record's spec) all belong to another factor."""
    s = einc.parse(rec["spec"])
    held = [set(f.indices) for f in s.factors if f.indices]
    return any(i != j and a <= b for i, a in enumerate(held) for j, b in enumerate(held))


@pytest.mark.parametrize("factors,k", [(2, 3), (3, 2)])
def test_absorbable_points_are_those_with_a_factor_inside_another(factors, k):
    """A factor whose indices all lie in another can be multiplied into it (a Hadamard
    product of two dense factors is dense): every such point is flagged, no other."""
    res = search(d=256, factors=factors, k=k, top=0, max_flops="0.25x" if factors == 3 else
                 None, keep_absorbable=True, distinct=False)
    flags = [r["absorbable"] for r in res]
    assert any(flags) and not all(flags)
    assert flags == [_absorbable_by_indices(r) for r in res]
    # counted before the filters, as the degenerate points are
    assert res.counts["absorbable"] >= sum(flags)
    assert factors == 3 or res.counts["absorbable"] == sum(flags)  # no filter but tolerance
    dense2 = search(d=64, k=1, top=0, max_flops=None, keep_absorbable=True)
    assert [r["absorbable"] for r in dense2 if r["spec"] == "(0|0|1|0|0|1|0)"] == [True]


def test_absorbable_points_are_left_out_unless_kept(capsys):
    """They hold a smaller point's matrices at more parameters, so parameters per FLOP, the
    paper sort's third key, ranked them first: at d = 256 with three factors, Monarch / BTT
    with a third factor on the indices of one of its two came out on top."""
    res = search(d=256, factors=3, k=2, top=20)
    assert res and not any(r["absorbable"] or _absorbable_by_indices(r) for r in res)
    assert res[0]["name"].startswith("Monarch")
    assert res.counts["absorbable"] > 0
    kept = search(d=256, factors=3, k=2, top=0, keep_absorbable=True)
    assert len(kept) > len(search(d=256, factors=3, k=2, top=0))
    assert einc.space.rank.table(kept).count("absorbable") > 1
    assert "with an absorbable factor flagged" in einc.space.rank.table(kept)
    assert "with an absorbable factor left out" in einc.space.rank.table(res)
    out = _cli("--d", "64", "--factors", "3", "--k", "2", "--keep-absorbable", "--csv",
               "--top", "0")
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert {"True", "False"} <= {row["absorbable"] for row in rows}


def test_the_table_shows_each_rows_rank_bound():
    """psi is asymptotic: at d = 64 the first psi = 1 rows are padded layers of rank 48."""
    res = search(d=64, top=5)
    lines = einc.space.rank.table(res).splitlines()
    spans = [m.span() for m in re.finditer(r"-+", lines[2])]  # the columns, by the rule line
    start, end = spans[[lines[1][a:b].strip() for a, b in spans].index("rank")]
    shown = [int(ln[start:end].replace(",", "")) for ln in lines[3:3 + len(res)]]
    assert shown == [r["rank_bound"] for r in res] and min(shown) < 64


def test_measure_adds_a_column():
    pytest.importorskip("einc.runtime")
    res = search(d=64, k=4, top=2, measure=True, sort="measured", progress=False)
    assert all(r["measured_ms"] > 0 for r in res)
    assert [r["measured_ms"] for r in res] == sorted(r["measured_ms"] for r in res)


def test_measure_compiles_with_the_search_tolerance(monkeypatch):
    """--measure compiled every row with the default tolerance: a row the search kept at
    --tolerance 0.5 (16.7% padding at d = 12) was refused while measuring. The layer timed
    has the record's sizes."""
    pytest.importorskip("einc.runtime")
    import einc.runtime

    built = []
    real = einc.runtime.compile

    def spy(*args, **kw):
        built.append(real(*args, **kw))
        return built[-1]

    monkeypatch.setattr(einc.runtime, "compile", spy)
    res = search(d=12, k=6, tolerance=0.5, max_flops=None, sort="params", top=8,
                 measure=True, progress=False)
    assert len(res) == 8 and all(r["measured_ms"] > 0 for r in res)
    assert any(r["padded_in"] > 12 * 1.15 for r in res)
    assert [dict(m.lowered.sizes) for m in built] == [r["sizes"] for r in res]


# -- command line -------------------------------------------------------------------------
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "einc", "search", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_default_table_and_json():
    out = _cli()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "2-factor space, lattice step 1/12, d_in = 1024" in lines[0]
    assert sum(1 for ln in lines if ln.split() and ln.split()[0].isdigit()) == 20
    out = _cli("--d", "256", "--json", "--top", "3", "--max-flops", "0.05x")
    data = json.loads(out.stdout)
    assert len(data) == 3 and all(r["flops"] <= 0.05 * 2 * 256 * 256 for r in data)


@pytest.mark.parametrize("args,text", [(["--k", "0"], "k = 0"),
                                       (["--sort", "nope"], "known sort keys"),
                                       (["--max-params", "x"], "bad parameter budget"),
                                       (["--max-flops", "0.1"], "write 0.1x"),
                                       # silently ignored without --train
                                       (["--train-steps", "5"],
                                        "--train-steps applies only with --train TASK"),
                                       (["--train-out", "o", "--train-widths", "8"],
                                        "--train-out, --train-widths apply only")])
def test_cli_errors_exit_2(args, text):
    out = _cli(*args)
    assert out.returncode == 2 and text in out.stderr and "Traceback" not in out.stderr


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from einc.space.plot import plot

    res = search(d=256, k=4, top=5)
    paths = plot(res, tmp_path)
    assert {p.rsplit("/", 1)[-1] for p in paths} == {"cube.png", "pareto.png"}


# -- arguments checked before searching ---------------------------------------------------
def _main(capsys, *args):
    """``einc search ARGS`` in this process: (exit status, stdout, stderr)."""
    from einc.cli import main
    try:
        rc = main(["search", *args])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_top_zero_means_all_in_python_and_on_the_command_line(capsys):
    every = search(d=64, k=4, top=None)
    assert len(every) == every.counts["passed"] > 20
    assert list(search(d=64, k=4, top=0)) == list(every)
    rc, out, _ = _main(capsys, "--d", "64", "--k", "4", "--top", "0", "--json")
    assert rc == 0 and json.loads(out) == list(every)
    with pytest.raises(einc.SizeError, match="0 or None for all"):
        search(d=64, k=4, top=-1)


def test_sort_measured_needs_measure(capsys):
    with pytest.raises(einc.EincError, match="--measure"):
        search(d=64, k=4, sort="measured")
    rc, out, err = _main(capsys, "--d", "64", "--k", "4", "--sort", "measured")
    assert rc == 2 and out == "" and "nothing is measured" in err


def test_measure_with_top_zero_is_refused(capsys):
    """--top 0 used to measure 20 rows silently and then offer --top 0 to see them all."""
    for top in (0, None):
        with pytest.raises(einc.EincError, match="give --top N"):
            search(d=64, k=4, top=top, measure=True)
    rc, out, err = _main(capsys, "--d", "64", "--k", "4", "--measure", "--top", "0")
    assert rc == 2 and out == "" and "--top 0" in err and "give --top N" in err


@pytest.mark.parametrize("args,text", [
    (["--batch", "0"], "argument --batch: takes an integer >= 1 and <= 1,048,576, got '0'"),
    # a batch of 10^8 rows at d = 4096 was a raw allocation traceback
    (["--batch", "100000000"], "argument --batch: takes an integer >= 1 and <= 1,048,576"),
    (["--top", "-1"], "argument --top: takes an integer >= 0"),
])
def test_counts_are_checked_when_parsing(capsys, args, text):
    rc, out, err = _main(capsys, "--d", "64", "--k", "4", *args)
    assert rc == 2 and out == "" and text in err


def test_plot_destination_is_checked_before_searching(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    afile = tmp_path / "afile"
    afile.write_text("")
    cases = [(afile, "exists and is not a folder"), (afile / "plots", "is not a folder")]
    if sys.platform.startswith("linux"):  # /proc takes no new folders, even from root
        cases.append(("/proc/einc-plots", "cannot create the plot folder"))
    for dest, text in cases:
        rc, out, err = _main(capsys, "--d", "64", "--k", "4", "--plot", str(dest))
        assert rc == 2 and text in err and str(dest) in err
        assert out == ""  # refused before the search printed anything
    # a folder made for --plot is taken back when the search refuses its options
    rc, out, err = _main(capsys, "--k", "0", "--plot", str(tmp_path / "new" / "plots"))
    assert rc == 2 and "k = 0" in err and not (tmp_path / "new").exists()
    rc, out, err = _main(capsys, "--d", "64", "--k", "4", "--top", "3", "--plot",
                         str(tmp_path / "made" / "plots"))
    assert rc == 0 and (tmp_path / "made" / "plots" / "cube.png").exists()
    # an empty path was taken for "no plot"; a folder where a plot goes failed at the end
    (tmp_path / "taken" / "pareto.png").mkdir(parents=True)
    for dest, text in (("", "the plot folder is an empty path"),
                       (tmp_path / "taken", "holds 'pareto.png', which is not a file")):
        rc, out, err = _main(capsys, "--d", "64", "--k", "4", "--plot", str(dest))
        assert rc == 2 and text in err and out == ""
    # nothing to plot: the folder made for the plots goes again
    rc, out, err = _main(capsys, "--d", "64", "--k", "4", "--max-flops", "100", "--plot",
                         str(tmp_path / "empty" / "plots"))
    assert rc == 2 and "nothing to plot" in err and not (tmp_path / "empty").exists()


def test_transpose_keeps_the_cheaper_orientation():
    """A family holds W and W^T; with transpose=True it is scored at the orientation with
    fewer FLOPs. It was the orbit's smallest lattice id, whatever it cost, so a FLOP budget
    dropped families whose transpose fits (29 of 124 families here)."""
    transpose = lambda t: "(" + "|".join(map(str, (*t[3:6], *t[0:3], t[6]))) + ")"
    theta = lambda r: [Fraction(v).limit_denominator(64) for v in r["theta"]]
    every = search(d=64, k=3, top=0, max_flops="none", transpose=True)
    cheapest = []
    for r in every:
        other = einc.analyze(transpose(theta(r)), d=64)
        assert r["flops"] <= other.flops
        cheapest.append(r["flops"])
    budget = sorted(cheapest)[len(cheapest) // 2]
    kept = search(d=64, k=3, top=0, max_flops=budget, transpose=True)
    assert len(kept) == sum(f <= budget for f in cheapest)
    # the plain search's families within the budget, identified with their transposes
    space = Space(2, 3, transpose=True)
    family = lambda r: int(space.ids(*space.canonical(*(
        np.array([v]) for v in space.point_of(space.exps_from_theta(theta(r))))))[0])
    assert {family(r) for r in search(d=64, k=3, top=0, max_flops=budget)} == \
        {family(r) for r in kept}
    # known structures are named at either orientation
    named = lambda rs: {r["name"] for r in rs if r["name"]}
    assert named(every) == named(search(d=64, k=3, top=0, max_flops="none"))


def test_train_widths_are_checked_against_the_task_before_searching(tmp_path, capsys):
    """A charlm width its heads do not divide was refused only after the search had printed
    its table, leaving the --train-out folder behind."""
    out = tmp_path / "o"
    rc, stdout, err = _main(capsys, "--d", "64", "--k", "4", "--top", "2", "--train", "charlm",
                            "--train-widths", "100", "--train-option", "head_dim=32",
                            "--train-out", str(out))
    assert rc == 2 and stdout == "" and "width 100 does not split into its 3 heads" in err
    assert not out.exists()


def test_exponent_bounds_are_exact():
    """min_psi and max_omega had a slack of 1e-9 (in units of 1/k): 0.50000000001 kept the
    psi = 1/2 rows and 0.49999999999 the omega = 1/2 ones."""
    over = search(d=256, k=4, min_psi="0.50000000001", max_flops=None, top=0)
    assert over and all(Fraction(r["psi"]) > Fraction(1, 2) for r in over)
    under = search(d=256, k=4, max_omega="0.49999999999", max_flops=None, top=0)
    assert under and all(Fraction(r["omega"]) < Fraction(1, 2) for r in under)
    at = search(d=256, k=4, min_psi="1/2", max_flops=None, top=0)
    assert any(Fraction(r["psi"]) == Fraction(1, 2) for r in at)


def test_a_tiny_budget_is_not_printed_as_zero(capsys):
    rc, out, err = _main(capsys, "--d", "64", "--max-flops", "1e-400x")
    assert "budget 8.19e-397" in out + err and "budget 0.0" not in out + err


def test_a_cost_rounding_onto_the_cap_is_not_counted_as_passing():
    """Above 2^53 a cost just over the cap can round onto it as a float; the exact re-check
    dropped the row but the header still counted it ("2 pass", one row shown)."""
    res = search(d=2 ** 32, k=1, max_flops=2 ** 65 - 1, top=0)
    assert len(res) == res.counts["passed"] == 1


def test_a_cost_equal_to_the_cap_above_2_53_is_kept():
    """The float FLOPs of a point at d = 2^32 - 1 came out 64 above its exact count, and a
    budget equal to that count dropped it before the exact check."""
    spec = "(1/3|0|2/3|0|11/12|1/12|1/6)"
    cost = einc.analyze(spec, d=2 ** 32 - 1).flops
    assert cost > 2 ** 53
    res = search(d=2 ** 32 - 1, max_flops=cost, sort="flops", top=0, progress=False)
    assert spec in {r["spec"] for r in res}
    assert all(r["flops"] <= cost for r in res) and len(res) == res.counts["passed"]


def test_huge_widths_pick_the_rounding_analyze_picks():
    """At d = 2^32 the FLOPs of two equally close roundings tie exactly but are above 2^53,
    where their float values differ in the last bits: the scorer decided the tie by that
    noise, took the costlier parameters, and dropped a point that meets the budget exactly."""
    spec = "(1/4|2/3|1/12|1/12|5/6|1/12|0)"
    rec = einc.analyze(spec, d=2 ** 32)
    rows = einc.search(d=2 ** 32, max_flops="none", max_params=rec.params, min_psi=rec.psi,
                       max_omega=rec.omega, sort="params", top=0, progress=False)
    assert rows[-1]["spec"] == spec and rows[-1]["params"] == rec.params
    assert all(a["params"] <= b["params"] for a, b in zip(rows, rows[1:]))


@pytest.mark.parametrize("kw", [{}, {"min_psi": 1}])
def test_rows_are_in_exact_order_above_2_53(kw):
    """Parameters per FLOP from float counts above 2^53 are rounded: equal exact ratios came
    out one ulp apart and were listed by it, not by the FLOPs that break the tie. Rows are
    ordered by their exact counts, and a top N is the start of the full list."""
    key = lambda r: (-Fraction(r["params"], r["flops"]), r["flops"])
    rows = einc.search(d=2 ** 32, max_flops="none", sort="params-per-flop", top=60,
                       progress=False, **kw)
    assert all(key(a) <= key(b) for a, b in zip(rows, rows[1:]))
    for n in (1, 13, 37):
        top = einc.search(d=2 ** 32, max_flops="none", sort="params-per-flop", top=n,
                          progress=False, **kw)
        assert [r["spec"] for r in top] == [r["spec"] for r in rows[:n]]


def test_the_pad_column_never_shows_0_percent_for_a_padded_layer(capsys):
    """(7/12|0|5/12|0|5/12|7/12|0) at d = 1024 pads 1024 to 1026: the table said 0%."""
    from einc.space.rank import _percent

    assert [_percent(p) for p in (0, 0.0002, 0.002, 0.05, 0.1, 0.15)] == \
        ["0%", "<0.1%", "0.2%", "5.0%", "10%", "15%"]
    rc, out, _ = _main(capsys, "--d", "1024", "--top", "3")
    row = next(line for line in out.splitlines() if "(7/12|0|5/12|0|5/12|7/12|0)" in line)
    assert rc == 0 and " 0.2% " in row
