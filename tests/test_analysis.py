"""Analysis against independent references: instantiated factors (parameters), opt_einsum
(FLOPs of the executed chain), SVD (rank), the paper's closed forms (exponents)."""
import itertools
import json
import math
import re
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction

import networkx as nx
import opt_einsum as oe
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import einc
from einc.analysis import analyze, closed_forms, numerical_rank
from einc.analysis.rank import min_cut, rank_bound
from einc.analysis.symbolic import exponents
from einc.syntax import parse
from einc.theta import structure_from_theta


# ------------------------------------------------------------------ random structures
@st.composite
def structures(draw, factors=st.sampled_from([2, 3])):
    """A random valid einsum with concrete sizes 1..4: every index joins two or more tensors,
    at least one of them a factor."""
    n = draw(factors)
    names = ["x"] + [f"F{k}" for k in range(n)] + ["y"]
    roles = [m for r in range(2, n + 3) for m in itertools.combinations(names, r)
             if any(t.startswith("F") for t in m) and set(m) != {"x", "y"}]
    picks = draw(st.lists(st.sampled_from(roles), min_size=2, max_size=6))
    ops = {t: [f"i{k}" for k, m in enumerate(picks) if t in m] for t in names}
    if any(not ops[t] for t in names):
        from hypothesis import reject
        reject()
    sizes = {f"i{k}": draw(st.integers(1, 4)) for k in range(len(picks))}
    spec = (" ".join(f"{t}[{' '.join(ops[t])}]" for t in names[:-1])
            + f" -> y[{' '.join(ops['y'])}] with "
            + ", ".join(f"{i} = {v}" for i, v in sizes.items()))
    return spec, ops, sizes


def executed_order(rep, s):
    names = [f.name for f in s.factors]
    return [names.index(p.split(" * ")[1].split("[")[0]) for p in rep.path]


def chain_cost(ops, sizes, order):
    """FLOPs of absorbing the factors into x in ``order``, counted by opt_einsum."""
    terms = [ops["x"]] + [ops[f"F{k}"] for k in order]
    letters = {i: oe.get_symbol(k) for k, i in enumerate(sizes)}
    eq = (",".join("".join(letters[i] for i in t) for t in terms) + "->"
          + "".join(letters[i] for i in ops["y"]))
    path = [(0, 1)] + [(0, len(terms) - 1 - k) for k in range(1, len(order))]
    shapes = [tuple(sizes[i] for i in t) for t in terms]
    _, info = oe.contract_path(eq, *shapes, shapes=True, optimize=path)
    return int(info.opt_cost)


def networkx_cut(s, sizes):
    g = nx.DiGraph()
    for ix in s.index_names:
        g.add_edge(("in", ix), ("out", ix), capacity=math.log(sizes[ix]))
    for k, f in enumerate(s.factors):
        for ix in f.indices:
            g.add_edge(("T", k), ("in", ix))
            g.add_edge(("out", ix), ("T", k))
    for ix in s.input.indices:
        g.add_edge("SRC", ("in", ix))
    for ix in s.output.indices:
        g.add_edge(("out", ix), "SNK")
    return math.exp(nx.minimum_cut_value(g, "SRC", "SNK"))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(structures())
def test_counts_against_references(case):
    spec, ops, sizes = case
    rep = analyze(spec)
    s = parse(spec)
    factors = [torch.empty(*[sizes[i] for i in ops[f"F{k}"]]) for k in range(len(s.factors))]
    assert rep.params == sum(f.numel() for f in factors)
    order = executed_order(rep, s)
    assert sorted(order) == list(range(len(s.factors)))
    assert rep.flops == chain_cost(ops, sizes, order)
    # the executed chain is the cheapest chain
    assert rep.flops == min(chain_cost(ops, sizes, o)
                            for o in itertools.permutations(range(len(s.factors))))
    assert rep.flops_backward == 2 * rep.flops
    d_in = math.prod(sizes[i] for i in ops["x"])
    d_out = math.prod(sizes[i] for i in ops["y"])
    assert (rep.d_in, rep.d_out, rep.padded_in, rep.padded_out) == (d_in, d_out, d_in, d_out)
    # rank: the min-cut bound is an upper bound on the rank of a random instance
    assert rep.rank_bound == pytest.approx(networkx_cut(s, sizes))
    assert numerical_rank(s, sizes) <= rep.rank_bound <= min(d_in, d_out)
    if len(s.factors) == 2:
        z = [math.prod(sizes[i] for i in st_.out) for st_ in
             (einc.analysis.path.chain(s, o)[0] for o in [(0, 1), (1, 0)])]
        assert rep.rank_bound == min(d_in, d_out, *z)


def test_numerical_rank_of_known_matrices():
    sizes = {"i": 6, "r": 3, "o": 5}
    assert numerical_rank(parse("lowrank(rank=3)").with_sizes(sizes), sizes) == 3
    s = parse("kron").with_sizes({"i": 2, "j": 3, "k": 2, "l": 3})
    assert numerical_rank(s, {"i": 2, "j": 3, "k": 2, "l": 3}) == 6


# ------------------------------------------------------------------ rank: two factors
CLASSES = {"alpha": "a", "beta": "b", "gamma": "g", "delta": "h", "eps": "e", "phi": "f",
           "rho": "r"}
LAYOUT = {"x": "gba", "A": "fhrga", "B": "fergb", "y": "feh"}
#: Sizes (alpha, beta, gamma, delta, eps, phi, rho) in {1, 2, 3}^7 (d_in * d_out <= 144) where a random instance
#: has a lower rank than the min-cut bound: (SVD rank, bound). See docs/analysis.md.
BELOW_BOUND = {(2, 2, 2, 3, 3, 1, 1): (7, 8), (3, 3, 1, 2, 2, 2, 1): (7, 8)}


def theta_sizes(vals):
    sizes = dict(zip(CLASSES.values(), vals))
    keep = lambda t: [c for c in t if sizes[c] > 1]
    ops = {k: keep(v) for k, v in LAYOUT.items()}
    if not all(ops.values()):
        return None
    spec = (f"x[{' '.join(ops['x'])}] A[{' '.join(ops['A'])}] B[{' '.join(ops['B'])}] -> "
            f"y[{' '.join(ops['y'])}] with " + ", ".join(f"{c} = {v}" for c, v in sizes.items()
                                                         if v > 1))
    try:
        s = parse(spec)
    except einc.StructureError:  # an index left joining one tensor
        return None
    return s, {c: v for c, v in sizes.items() if v > 1}


def test_two_factor_bound_is_attained_except_known_cases():
    below = {}
    for vals in itertools.product([1, 2, 3], repeat=7):
        if math.prod(vals[:6]) > 144:
            continue
        got = theta_sizes(vals)
        if got is None:
            continue
        s, sizes = got
        bound, _ = rank_bound(s, sizes)
        rank = numerical_rank(s, sizes)
        assert rank <= bound
        if rank < bound:
            below[vals] = (rank, bound)
    assert below == BELOW_BOUND


def test_rank_below_bound_is_generic():
    """The deficit is not bad luck of one random draw: it holds for every seed."""
    s, sizes = theta_sizes((2, 2, 2, 3, 3, 1, 1))
    assert {numerical_rank(s, sizes, seed=k) for k in range(4)} == {7}
    assert rank_bound(s, sizes)[0] == 8



@pytest.mark.parametrize("spec,d_in,d_out", [("kron", 60, 60), ("btt", 60, 60),
                                             ("monarch", 1024, 4096), ("lowrank", 50, 70)])
def test_rank_bound_is_capped_by_the_cropped_layer(spec, d_in, d_out):
    """Padded sizes give a network cut above the layer's width; the module crops the
    padding, so the bound is at most min(d_in, d_out) and is what the layer can reach."""
    rep = einc.analyze(spec, d_in=d_in, d_out=d_out)
    assert rep.rank_bound <= min(d_in, d_out)
    if d_in * d_out > 10_000:
        return
    torch.manual_seed(0)
    m = einc.compile(spec, d_in=d_in, d_out=d_out, bias=False).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
        w = m(torch.eye(d_in, dtype=torch.float64))
    assert int(torch.linalg.matrix_rank(w)) <= rep.rank_bound
    if spec == "kron":  # two full-rank 8 x 8 blocks, cropped: the bound is reached
        assert "the layer's width" in str(rep) and int(torch.linalg.matrix_rank(w)) == 60

@pytest.mark.parametrize("blocks,d_in,d_out", [(2, 64, 64), (4, 64, 64), (16, 64, 64),
                                                 (4, 32, 64), (8, 64, 32), (2, 64, 32),
                                                 (2, 128, 48), (4, 96, 40)])
def test_monarch_is_full_rank_at_every_block_count(blocks, d_in, d_out):
    """monarch(blocks=b) sized g = f = b bounded the rank by b^2 (16 of 64 at b = 4): only
    b = sqrt(d) was a Monarch matrix. A is b blocks and the intermediate g * f is d_min wide
    (square: B is d/b blocks of b x b), so every b is full rank, pads nothing where b
    divides the widths, and costs less than dense (an intermediate sqrt(d_in * d_out) wide
    made e irrational at most rectangular widths: refused for padding, or dearer than dense)."""
    spec = f"monarch(blocks={blocks})"
    rep = einc.analyze(spec, d_in=d_in, d_out=d_out)
    assert rep.rank_bound == min(d_in, d_out) and rep.sizes["g"] == blocks
    assert (rep.padded_in, rep.padded_out) == (d_in, d_out)
    assert rep.flops < 2 * d_in * d_out
    assert d_in != d_out or rep.sizes["e"] == blocks
    torch.manual_seed(0)
    m = einc.compile(spec, d_in=d_in, d_out=d_out, bias=False, dtype=torch.float64)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    assert int(torch.linalg.matrix_rank(m.materialize())) == min(d_in, d_out)


# ------------------------------------------------------------------ exponents: closed forms
K = 12
_TRI = [(Fraction(a, K), Fraction(b, K), Fraction(K - a - b, K))
        for a in range(K + 1) for b in range(K + 1 - a)]
LATTICE = [(*i, *o, Fraction(r, K)) for i in _TRI for o in _TRI for r in range(K + 1)]


def _check_points(points):
    bad = []
    for p in points:
        forms = closed_forms(p)
        if forms["redundant"] or forms["degenerate"]:
            continue
        _, omega, psi, nu = exponents(structure_from_theta(p))
        if (omega, psi, nu) != (forms["omega"], forms["psi"], forms["nu"]):
            bad.append((p, (omega, psi, nu)))
    return bad


def test_closed_forms_on_the_whole_lattice():
    """Every non-redundant, non-degenerate point of the 1/12 lattice (20,167 of 107,653)."""
    chunks = [LATTICE[k::2] for k in range(2)]
    with ProcessPoolExecutor(2) as pool:
        bad = [b for part in pool.map(_check_points, chunks) for b in part]
    assert bad == []


def test_analyze_at_lattice_points():
    """The report at d = 4096 = 2^12, where every d^(k/12) is an integer, on a sample."""
    for p in LATTICE[::997]:
        forms = closed_forms(p)
        spec = "(" + "|".join(str(t) for t in p) + ")"
        rep = analyze(spec, d=4096)
        assert (rep.padded_in, rep.padded_out) == (4096, 4096)
        assert (rep.redundant, rep.degenerate) == (forms["redundant"], forms["degenerate"])
        if not forms["redundant"] and not forms["degenerate"]:
            assert (rep.omega, rep.psi, rep.nu) == (forms["omega"], forms["psi"], forms["nu"])


@pytest.mark.parametrize("spec,omega,psi,nu,redundant,degenerate", [
    ("dense", 0, 1, 1, None, None),
    ("(0|0|1|0|0|1|0)", 0, 1, 1, False, False),
    ("btt", 0, 1, Fraction(1, 2), False, False),
    ("kron", Fraction(1, 2), 1, Fraction(1, 2), False, False),
    ("lowrank(rank=d^(1/4))", 0, Fraction(1, 4), Fraction(1, 4), False, False),
    ("(1|0|0|0|1|0|1/4)", 0, Fraction(1, 4), Fraction(1, 4), False, False),
    ("tt(rank=4, cores=3)", Fraction(2, 3), 1, Fraction(1, 3), None, None),
])
def test_named_points(spec, omega, psi, nu, redundant, degenerate):
    rep = analyze(spec, d=4096)
    assert (rep.omega, rep.psi, rep.nu) == (omega, psi, nu)
    assert (rep.redundant, rep.degenerate) == (redundant, degenerate)


@pytest.mark.parametrize("spec,redundant,degenerate", [
    ("(1/2|1/2|0|1/2|1/2|0|1)", False, True),    # rho > min(alpha, eps)
    ("(0|1/2|1/2|1/2|0|1/2|0)", True, False),    # min(alpha, eps) < min(beta, delta)
    ("(0|1|0|1|0|0|1)", True, True),
])
def test_flags(spec, redundant, degenerate):
    d = analyze(spec, d=4096).to_dict()
    assert (d["redundant"], d["degenerate"]) == (redundant, degenerate)


def test_written_two_factor_einsum_gets_its_theta():
    rep = analyze("ga,gafr,fgre->fe with g = a, f = e, r = d_min^(1/4)", d=4096)
    assert rep.theta == tuple(Fraction(t) for t in ("1/2", "0", "1/2", "0", "1/2", "1/2", "1/4"))
    assert rep.to_dict()["redundant"] is False



@pytest.mark.parametrize("spec,theta", [
    ("x[i] B[r o] A[i r] -> y[o] with r = d^(1/2)", "(1|0|0|0|1|0|1/2)"),
    ("x[i] A[i r] B[r o] -> y[o] with r = d^(1/2)", "(1|0|0|0|1|0|1/2)"),
    ("x[g b] B[g e] A[f g b] -> y[f e] with g = b = e = f",
     "x[g b] A[f g b] B[g e] -> y[f e] with g = b = e = f"),
    # min(alpha, eps) = min(beta, delta): both orders as cheap
    ("x[g a] P[d f g a] Q[g f] -> y[f d] with a = d_in^(2/3), g = d_in^(1/3), "
     "d = d_out^(1/3), f = d_out^(2/3)", "(2/3|0|1/3|1/3|0|2/3|0)"),
    ("x[g a] Q[g f] P[d f g a] -> y[f d] with a = d_in^(2/3), g = d_in^(1/3), "
     "d = d_out^(1/3), f = d_out^(2/3)", "(2/3|0|1/3|1/3|0|2/3|0)"),
])
def test_theta_of_an_einsum_does_not_depend_on_factor_order(spec, theta):
    """The factor written first used to be read as A: a plain low-rank layer written
    B-first came out as the redundant point (0|1|0|1|0|0|1/2) and was flagged degenerate."""
    rep = analyze(spec, d=4096)
    assert rep.theta == analyze(theta, d=4096).theta
    assert (rep.redundant, rep.degenerate) == (False, False)
    assert (rep.omega, rep.psi, rep.nu) == tuple(closed_forms(rep.theta)[k]
                                                 for k in ("omega", "psi", "nu"))

# ------------------------------------------------------------------ concrete sizes
@pytest.mark.parametrize("spec,d_in,d_out,padded_in,padded_out", [
    ("btt", 1024, 1024, 1024, 1024),
    ("btt", 1000, 1000, 1024, 1024),
    ("btt", 4000, 4000, 4032, 4032),
    ("btt", 768, 3072, 784, 3080),
    ("kron", 110, 110, 110, 110),
    ("tt(cores=3)", 1000, 1000, 1000, 1000),
    ("tt(cores=3)", 900, 900, 900, 900),
    ("tt(cores=3)", 2000, 2000, 2028, 2028),
    ("dense", 1000, 7, 1000, 7),
])
def test_least_padding(spec, d_in, d_out, padded_in, padded_out):
    rep = analyze(spec, d_in=d_in, d_out=d_out)
    assert (rep.padded_in, rep.padded_out) == (padded_in, padded_out)
    s = parse(spec)
    # no rounding of each size down or up covers d_in (d_out) with less padding
    for op, d, padded in ((s.input, d_in, padded_in), (s.output, d_out, padded_out)):
        real = [s.size(i).evaluate({"d": d, "d_in": d_in, "d_out": d_out,
                                    "d_min": min(d_in, d_out)}) for i in op.indices]
        options = [sorted({max(1, math.floor(v + 1e-9)), max(1, math.ceil(v - 1e-9))})
                   for v in real]
        best = min(p for c in itertools.product(*options) if (p := math.prod(c)) >= d)
        assert padded == best


@pytest.mark.parametrize("theta,d", [("(1/3|1/3|1/3|1/3|1/3|1/3|0)", 1024),
                                     ("(1/4|1/2|1/4|1/8|1/2|3/8|0)", 3000),
                                     ("(1/3|1/3|1/3|1/3|1/3|1/3|1/6)", 2000)])
def test_equally_close_roundings_take_the_cheapest(theta, d):
    """Sizes with the same real value round up interchangeably for padding and distance,
    not for cost (a size shared by both factors costs more): every such rounding is tried
    and the report's FLOPs (then parameters) are the least of them."""
    rep = analyze(theta, d=d)
    s = parse(theta)
    env = {"d": d, "d_in": d, "d_out": d, "d_min": d}
    real = {i: s.size(i).evaluate(env) for i in s.index_names}
    side = set(s.input.indices) | set(s.output.indices)
    free = [i for i in s.index_names if i in side and real[i] % 1]
    costs = []
    for choice in itertools.product(*[(math.floor(real[i]), math.ceil(real[i])) for i in free]):
        sizes = {**rep.sizes, **dict(zip(free, choice))}
        pin = math.prod(sizes[i] for i in s.input.indices)
        pout = math.prod(sizes[i] for i in s.output.indices)
        drift = sum(abs(math.log(sizes[i] / real[i])) for i in free)
        if (pin, pout) == (rep.padded_in, rep.padded_out) and drift < 1e-6 + sum(
                abs(math.log(rep.sizes[i] / real[i])) for i in free):
            explicit = ", ".join(f"{i} = {sizes[i]}" for i in s.index_names)
            r = analyze(f"{s.equation} with {explicit}", d=d)
            costs.append((r.flops, r.params))
    assert len(set(costs)) > 1  # the case is a real tie with different costs
    assert (rep.flops, rep.params) == min(costs)

def test_padding_tolerance():
    with pytest.raises(einc.SizeError, match=r"needs 20\.0% padding .* tolerance of 15%"):
        analyze("btt", d=5)
    rep = analyze("btt", d=5, tolerance=0.25)
    assert (rep.padded_in, rep.padded_out) == (6, 6)
    with pytest.raises(einc.SizeError, match="tolerance of 0%"):
        analyze("btt", d=1000, tolerance=0)
    for bad in (-0.1, float("nan"), "0.2", None, True):
        with pytest.raises(einc.SizeError, match="tolerance must be a number >= 0"):
            analyze("btt", d=1024, tolerance=bad)
    assert analyze("btt", d=1000, tolerance=float("inf")).padded_in == 1024  # any padding


def test_least_padding_with_many_free_sizes():
    """Beyond 14 free sizes, interchangeable ones are searched by how many round up, so
    btt(cores=8) still gets the least padding (2^4 * 3^4 = 1296 fits exactly)."""
    rep = analyze("btt(cores=8)", d=1296)
    assert (rep.padded_in, rep.padded_out) == (1296, 1296)


def test_many_free_sizes_break_ties_by_cost_too():
    """Beyond 14 free sizes the grouped search took the first of equally close roundings:
    the index rounded up, and so the cost, followed the order x lists its indices."""
    letters = [c for c in "abcdefghijklmnpqstuvw"][:15]
    sizes = ", ".join(f"{c} = d_in^(1/15)" for c in letters)
    body = (f"A[{' '.join(letters[:8])} r] B[{' '.join(letters[8:])} r o] -> y[o] with "
            f"{sizes}, r = 4, o = d_out")
    reports = [analyze(f"x[{' '.join(order)}] {body}", d_in=40000, d_out=64, tolerance=0.5)
               for order in (letters, letters[8:] + letters[:8])]
    costs = set()
    for c in letters:  # 3^1 * 2^14 = 49152 is the least padding: one size rounds up
        explicit = ", ".join(f"{i} = {3 if i == c else 2}" for i in letters)
        costs.add(analyze(f"x[{' '.join(letters)}] {body.split(' with ')[0]} with {explicit}, "
                          "r = 4, o = 64", d_in=40000, d_out=64, tolerance=0.5).flops)
    assert len(costs) > 1
    assert [r.flops for r in reports] == [min(costs)] * 2

@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5), st.floats(0.05, 0.95), st.sampled_from("io")),
                min_size=1, max_size=9),
       st.floats(0.9, 1.2), st.floats(0.9, 1.2))
def test_grouped_rounding_matches_brute_force(entries, scale_in, scale_out):
    """The grouped search (used beyond 14 free sizes) finds a padding as small as trying
    every rounding."""
    import itertools
    import math
    from types import SimpleNamespace
    from einc.analysis.concrete import _choose_grouped
    free = [(f"{side}{j}", lo, lo + 1, lo + frac) for j, (lo, frac, side) in enumerate(entries)]
    ins = [n for n, *_ in free if n[0] == "i"] + ["a"]
    outs = [n for n, *_ in free if n[0] == "o"] + ["b"]
    s = SimpleNamespace(input=SimpleNamespace(indices=ins), output=SimpleNamespace(indices=outs),
                        factors=[])
    fixed = {"a": 2, "b": 3}
    real = lambda side: math.prod(v for n, _, _, v in free if n[0] == side)
    d_in, d_out = max(1, round(2 * real("i") * scale_in)), max(1, round(3 * real("o") * scale_out))
    with pytest.MonkeyPatch.context() as mp:  # padding only: no structure to cost ties by
        mp.setattr("einc.analysis.concrete.cost", lambda s, sizes: (0, 0))
        got = _choose_grouped(s, fixed, free, d_in, d_out)
    best = None
    for choice in itertools.product(*[(lo, hi) for _, lo, hi, _ in free]):
        sizes = dict(fixed, **{n: c for (n, *_), c in zip(free, choice)})
        pin, pout = math.prod(sizes[i] for i in ins), math.prod(sizes[i] for i in outs)
        if pin >= d_in and pout >= d_out:
            best = min(best or math.inf, pin / d_in + pout / d_out)
    if best is None:
        assert got is None
    else:
        pin, pout = math.prod(got[i] for i in ins), math.prod(got[i] for i in outs)
        assert pin >= d_in and pout >= d_out
        assert pin / d_in + pout / d_out == pytest.approx(best)


@pytest.mark.parametrize("kwargs,fragment", [
    ({}, "give d"),
    ({"d": 0}, "^d must be a positive integer, got 0$"),  # named as given (it said d_in)
    ({"d_in": 64, "d_out": -1}, "^d_out must be a positive integer"),
    ({"d": 10 ** 12}, r"^d = 1000000000000 is above the largest width einc accepts \(2\^32"),
    ({"d_in": 2 ** 32 + 1, "d_out": 64}, "^d_in = 4294967297 is above the largest width"),
    ({"d": 64, "d_in": 64}, "either d or d_in"),
    ({"d": 2}, "too small"),
])
def test_bad_widths(kwargs, fragment):
    with pytest.raises(einc.SizeError, match=fragment):
        analyze("lowrank(rank=d/8)" if kwargs.get("d") == 2 else "btt", **kwargs)


def test_a_fixed_side_is_not_a_width_for_the_other():
    """With no width given, a spec whose input sizes are all numbers took their product as
    d_out too (3 -> 3): a square layer is assumed only from a width that was given."""
    spec = "x[i] W[i o] -> y[o] with i = 3"
    with pytest.raises(einc.SizeError, match="output sizes depend.*fixed at 3.*give d_out"):
        analyze(spec)
    with pytest.raises(einc.SizeError, match="input sizes depend.*give d_in"):
        analyze("x[i] W[i o] -> y[o] with o = 5")
    assert (analyze(spec, d_out=8).d_in, analyze(spec, d_out=8).d_out) == (3, 8)
    assert analyze("btt", d_out=64).d_in == 64  # one width given: square
    assert analyze("x[i] W[i o] -> y[o] with i = 3, o = 5").d_out == 5


def test_widths_of_any_integer_type():
    """numpy integers were refused as 'd_in must be a positive integer, got np.int64(1024)'."""
    np = pytest.importorskip("numpy")
    ref = analyze("btt", d=1024)
    for d in (np.int64(1024), np.int32(1024), np.uint16(1024)):
        rep = analyze("btt", d=d)
        assert rep.params == ref.params and type(rep.d_in) is int
    rep = analyze("btt(rank=2)", d_in=np.int64(768), d_out=np.int32(3072))
    assert (rep.padded_in, rep.padded_out) == (784, 3080)
    layer = einc.compile("btt", d_in=np.int64(64), d_out=np.int16(64))
    assert layer(torch.randn(2, 64)).shape == (2, 64)
    with pytest.raises(einc.SizeError, match="d must be a positive integer, got True"):
        analyze("btt", d=True)


def test_square_symbol_needs_square_layer():
    with pytest.raises(einc.SizeError, match="needs a square layer"):
        analyze("lowrank(rank=d^(1/2))", d_in=256, d_out=1024)
    assert analyze("lowrank(rank=d_min^(1/2))", d_in=256, d_out=1024).sizes["r"] == 16


# ------------------------------------------------------------------ report / JSON
FIELDS = {"spec", "d_in", "d_out", "padded_in", "padded_out", "sizes", "input", "output",
          "factors", "params", "flops", "flops_backward", "omega", "psi", "nu", "rank_bound"}


def test_json_schema():
    theta = json.loads(analyze("(1/2|0|1/2|0|1/2|1/2|0)", d=1024).to_json())
    assert FIELDS | {"redundant", "degenerate", "theta"} <= set(theta)
    assert theta["sizes"] == {"g": 32, "a": 32, "f": 32, "e": 32}
    assert theta["factors"] == {"A": ["f", "g", "a"], "B": ["f", "e", "g"]}
    assert (theta["omega"], theta["psi"], theta["nu"]) == (0, 1, 0.5)
    assert theta["params"] == 2 * 32 ** 3 and theta["flops"] == 4 * 32 ** 3
    three = analyze("tt(rank=2, cores=3)", d=512).to_dict()
    assert FIELDS <= set(three) and "redundant" not in three and "degenerate" not in three
    assert isinstance(three["rank_bound"], int)
    fixed = analyze("x[i j] W[i j o] -> y[o] with i = 3, j = 5, o = 4").to_dict()
    assert (fixed["d_in"], fixed["d_out"], fixed["omega"]) == (15, 4, None)
    text = str(analyze("btt", d=1024))
    assert "omega psi nu" in text and "rank bound" in text


@pytest.mark.parametrize("spec,d", [
    ("ga,gafr,fgre->fe with g = a, f = e, r = 16*d^(-1/4)", 256),
    ("i,ir,ro->o with r = 64*d^(-1/2)", 64),
    ("i,ir,ro->o with r = 1024/d", 64),
])
def test_a_size_shrinking_with_d_has_no_exponents_or_theta(spec, d):
    """A negative exponent went into the min-cut as a capacity, which the max-flow reads
    as 0: psi came out 1/4 (the {g, f, r} cut is 3/4) or negative, and the theta point had
    rho = -1/4, outside [0, 1]. Such a size falls below 1 as d grows: no asymptotics. The
    counts at the given width stay exact."""
    r = analyze(spec, d=d).to_dict()
    assert (r["omega"], r["psi"], r["nu"]) == (None, None, None)
    assert r.get("theta") is None and r.get("redundant") is None
    m = einc.compile(spec, d_in=d)
    assert r["params"] == sum(f.numel() for f in m.factors())
    assert "omega psi nu     -  -  -" in str(analyze(spec, d=d))


@pytest.mark.parametrize("spec,kw", [
    ("btt with g = 4, a = 4", {"d_out": 64}),  # the input side fixed at 16
    ("x[i] A[i r] B[r o] -> y[o] with i = 4, r = 2", {"d_out": 64}),
])
def test_a_side_of_fixed_size_has_no_theta(spec, kw):
    """A theta point's input and output sides each grow as d (alpha + beta + gamma = 1):
    with one side fixed, (0|0|0|1/2|0|1/2|0) was reported, flagged non-redundant and
    non-degenerate, and refused when given back."""
    r = analyze(spec, **kw).to_dict()
    assert r.get("theta") is None and r.get("redundant") is None
    assert "paper's rules" not in str(analyze(spec, **kw))


def test_a_one_step_chain_has_no_intermediate():
    """dense printed "largest interm.  0 per vector"; JSON keeps the number."""
    dense = analyze("dense", d=64)
    assert dense.to_dict()["largest_intermediate"] == 0
    assert re.search(r"^largest interm\.\s+none \(one step\)$", str(dense), re.M)
    assert re.search(r"^largest interm\.\s+64 per vector$", str(analyze("btt", d=64)), re.M)


def test_repeated_analysis_reuses_the_symbolic_derivation():
    # The speed itself is measured in benchmarks/analysis_speed.py; here, the cache that
    # makes it fast: a structure already seen is not derived again, at any width.
    from einc.analysis.symbolic import symbolic
    for spec in ("btt(rank=4)", "tt(rank=4, cores=3)", "(1/4|1/4|1/2|1/4|1/4|1/2|1/4)"):
        analyze(spec, d=4096)
        misses = symbolic.cache_info().misses
        analyze(spec, d=4096)
        analyze(spec, d=1024)
        assert symbolic.cache_info().misses == misses


@pytest.mark.parametrize("E, k, d_in, d_out", [(8, 2, 1024, 1024), (16, 4, 768, 3072),
                                                (4, 4, 64, 48), (4, 2, 1, 1)])
def test_moe_totals_and_active_costs_by_hand(E, k, d_in, d_out):
    """Two-core BTT-MoE: ga,gafr,fgre->fe. Totals count every expert, active costs the k
    routed ones; the router (d_in -> E, with bias) is in both, and in the text report."""
    r = einc.analyze(f"bttmoe(experts={E}, k={k})", d_in=d_in, d_out=d_out)
    g, a, f, e = (r.sizes[i] for i in "gafe")
    router = d_in * E + E
    assert r.params == g * a * f * E + f * g * E * e
    assert r.moe["total_params"] == r.params + router
    assert r.moe["active_params"] == g * a * f * k + f * g * k * e + router
    assert r.moe["active_flops"] == 2 * (g * a * f * k + f * g * k * e) + 2 * d_in * E
    text = str(r)
    assert f"total params     {r.moe['total_params']:,}" in text
    assert f"{r.moe['active_flops']:,} per token" in text
    # the headline costs are every expert's, and say so
    assert f"FLOPs / vector   {r.flops:,}" in text and "every expert: see active FLOPs" in text
    dense = 2 * d_in * d_out
    assert f"{r.moe['active_flops'] / dense:.4g}x dense)" in text


def test_pooled_rounding_keeps_the_rank():
    """Beyond 14 free sizes ties go by index order: btt(cores=8) at d = 4096 keeps full
    rank (a cost-driven choice of which equal size rounds down took 2x fewer FLOPs but
    bounded a cut, rank 2916)."""
    rep = analyze("btt(cores=8)", d=4096)
    assert (rep.padded_in, rep.padded_out, rep.rank_bound) == (4374, 4374, 4096)


def test_equally_close_roundings_keep_the_highest_rank():
    """Ties of padding and closeness went to the fewest FLOPs, which is often the rounding
    that shrinks the cut bounding the rank: btt(cores=5) at d = 100 had bound 48 (the
    materialised matrix rank 43) where an equal rounding gives 100."""
    import torch
    rep = analyze("btt(cores=5)", d=100)
    assert rep.rank_bound == 100
    m = einc.compile("btt(cores=5)", 100, dtype=torch.float64, bias=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    assert torch.linalg.matrix_rank(m.materialize()) > 48
    assert analyze("btt", d=2048).rank_bound == 2048


def test_search_rounds_ties_as_analyze_does():
    """The search's vectorised rounding takes the same tie as concretize (rank first): at
    d = 200 this family's equally close roundings have rank bounds 68 and 102."""
    import torch
    from einc.space import search
    spec = "(1|0|0|1/6|1/6|2/3|0)"  # the family's kept form of (0|1|0|1/6|1/6|2/3|0)
    rec = next(r for r in search(d=200, k=6, top=0, max_flops="none") if r["spec"] == spec)
    rep = analyze(spec, d=200)
    assert (rec["rank_bound"], rec["flops"], rec["params"]) == \
        (rep.rank_bound, rep.flops, rep.params) == (102, 41004, rep.params)
    m = einc.compile(spec, 200, dtype=torch.float64, bias=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    assert torch.linalg.matrix_rank(m.materialize()) > 68


def test_an_empty_rank_cut_is_named():
    """x and y joined by no index (an outer product through a scalar): the table printed
    "rank bound 1  (cut at )"."""
    rep = analyze("b,h,b->h", d=16)
    assert rep.rank_bound == 1 and not rep.rank_cut
    assert re.search(r"^rank bound\s+1  \(an empty cut: no index joins x to y\)$", str(rep), re.M)


@pytest.mark.parametrize("spec,d,given", [
    ("btt(cores=4)", 512, "i1 = i2 = i3 = o1 = o2 = o3 = 4, i4 = o4 = 8"),
    ("tt(rank=2, cores=4)", 64, "i1 = i2 = o1 = o2 = 2, i3 = i4 = o3 = o4 = 4"),
])
def test_a_padding_error_names_sizes_that_fit(spec, d, given):
    """Rounding only down or up from d^(1/4) cannot fit 512 = 4 x 4 x 4 x 8: the error
    names such sizes, and the spec with them compiles without padding."""
    with pytest.raises(einc.SizeError) as err:
        einc.analyze(spec, d=d)
    msg = str(err.value)
    assert "give its sizes" in msg and "0.0% padding of d_in" in msg
    r = einc.analyze(f"{spec} with {given}", d=d)
    assert (r.padded_in, r.padded_out) == (d, d)


def test_near_factors_examples():
    from einc.analysis.concrete import near_factors
    assert near_factors(1024, 3) == (8, 8, 16) and near_factors(13, 1) == (13,)
    assert near_factors(160, 4) == (3, 3, 3, 6)  # 2 x 4 x 4 x 5 spreads wider than 2x
