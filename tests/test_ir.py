"""The IR: frozen, equal structures hash equal, canonical form ignores names and orders."""
import dataclasses

import pytest

import einc
from einc import SizeError, SpecTypeError, StructureError
from einc.ir import INPUT, MAX_INDICES, Index, Operand, Structure, canonical_form
from einc.sizes import Size
from einc.syntax import check, parse

BTT = "x[g a] A[g a f r] B[f g r e] -> y[f e] with g = a, f = e, r = 2"

SAME = [
    # renamed indices
    (BTT, "x[p q] A[p q s t] B[s p t u] -> y[s u] with p = q, s = u, t = 2"),
    # renamed factors
    (BTT, "inp[g a] U[g a f r] V[f g r e] -> out[f e] with g = a, f = e, r = 2"),
    # reordered factors
    (BTT, "x[g a] B[f g r e] A[g a f r] -> y[f e] with g = a, f = e, r = 2"),
    # reordered axes inside a factor
    (BTT, "x[g a] A[r f a g] B[e r g f] -> y[f e] with g = a, f = e, r = 2"),
    # all at once, in the compact spelling
    (BTT, "pq,tpus,uqtp->ts with p = q, t = s, u = 2"),
    ("lowrank(rank=4)", "i,ro,ir->o with r = 4"),
    ("kron", "ab,ac,bd->cd with a = b = d_in^(1/2), c = d = d_out^(1/2)"),
]

DIFFERENT = [
    (BTT, BTT.replace("r = 2", "r = 3")),                        # a size
    (BTT, "x[g a] A[g a f r] B[f g r e] -> y[e f] with g = a, f = e, r = 2"),  # output order
    (BTT, "x[a g] A[g a f r] B[f g r e] -> y[f e] with g = a, f = e, r = 2"),  # input order
    ("btt", "kron"),
    ("lowrank(rank=4)", "tt(rank=4)"),
    ("dense", "lowrank(rank=d)"),
    ("bttmoe(experts=4, k=1)", "bttmoe(experts=4, k=2)"),
]


def test_frozen():
    s = parse("btt")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.factors = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.indices[0].name = "z"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.factors[0].name = "Z"


def test_equal_structures_compare_and_hash_equal():
    a = parse("ga,gafr,fgre->fe with g = a = d_in^(1/2), f = e = d_out^(1/2), r = 1")
    b = parse("x[g a]  A[g a f r]  B[f g r e] -> y[f e] with g = a, f = e, r = 1")
    c = parse("btt")
    assert a == b == c
    assert hash(a) == hash(b) == hash(c)
    assert len({a, b, c}) == 1
    # positions and the spelling do not take part in equality
    assert a.source != b.source and a.input.pos != b.input.pos


@pytest.mark.parametrize("a,b", SAME)
def test_canonical_form_ignores_names_and_orders(a, b):
    sa, sb = parse(a), parse(b)
    assert sa.canonical() == sb.canonical()
    assert hash(canonical_form(sa)) == hash(canonical_form(sb))


@pytest.mark.parametrize("a,b", DIFFERENT)
def test_different_structures_differ(a, b):
    sa, sb = parse(a), parse(b)
    assert sa != sb
    assert sa.canonical() != sb.canonical()


def test_theta_and_einsum_share_a_canonical_form():
    theta = parse("(1/2|0|1/2|0|1/2|1/2|0)")
    written = parse("x[g a] A[f g a] B[f e g] -> y[f e] with g = a = d_in^(1/2), "
                    "f = e = d_out^(1/2)")
    assert theta == written
    assert theta.canonical() == written.canonical()


def test_spellings():
    s = parse("x[blk a] W1[blk a o r] W2[o blk r b] -> y[o b] with blk = a, o = b, r = 2")
    assert s.equation == "ab,abcd,cade->ce"
    assert parse(s.spec_text()) == s
    assert s.index_class("r") == frozenset({"W1", "W2"})
    assert s.index_class("blk") == frozenset({INPUT, "W1", "W2"})
    conc = s.with_sizes({"blk": 4, "a": 4, "o": 8, "r": 2, "b": 8})
    assert conc.is_concrete and conc.concrete_sizes()["o"] == 8
    assert conc != s


@pytest.mark.parametrize("width", ["d", "d_in", "d_out", "d_min"])
def test_spec_text_keeps_a_width_apart_from_an_index_of_its_name(width):
    """With an index named like a width, a size that is that bare width printed as `r = d_in`,
    which reads back as a tie to the index: the reported spec described another layer."""
    s = parse(f"x[{width} a] W[{width} a r] V[r o] -> y[o] with a = 2, r = {width}^1")
    assert parse(s.spec_text()) == s
    assert s.size("r") == Size.symbol(width) and s.size(width) != Size.symbol(width)


def test_letters_refuse_more_indices_than_einsum_has():
    """A hand-built IR past the limit gets a clear error, not StopIteration."""
    names = [f"i{k}" for k in range(MAX_INDICES + 1)]
    s = Structure(Operand("x", tuple(names)), (Operand("W", (*names, "o")),), Operand("y", ("o",)),
                  tuple(Index(n, Size.const(2)) for n in (*names, "o")))
    with pytest.raises(StructureError, match=f"at most {MAX_INDICES}"):
        s.equation
    ok = parse("btt(cores=17)")  # 50 indices: every one gets its own letter
    assert len(set(ok.letters().values())) == len(ok.indices) == 50


def _hand_built(inp, factors, out, sizes):
    """A Structure built without a spec: operands as (name, indices), sizes as numbers."""
    op = lambda name, ix: Operand(name, tuple(ix.split()))
    return Structure(op("x", inp), tuple(op(n, ix) for n, ix in factors), op("y", out),
                     tuple(Index(i, Size.const(v)) for i, v in sizes.items()))


# a hand-built structure, the error a written spec gets for the same problem
BAD_BY_HAND = [
    # raised KeyError: 'q' deep in the analysis
    (_hand_built("i", [("W", "i q"), ("V", "q o")], "o", dict(i=4, o=4)), SizeError,
     "the size of q is not given"),
    # IndexError in the planner
    (_hand_built("i", [], "i", dict(i=4)), StructureError, "at least one weight factor"),
    # ValueError from tuple.index in the emitter
    (_hand_built("i", [("W", "i o")], "o z", dict(i=4, o=2, z=2)), StructureError,
     "output index 'z' appears in no operand"),
    # a torch permute error
    (_hand_built("i", [("W", "i i o")], "o", dict(i=4, o=4)), StructureError,
     "index 'i' appears twice in W"),
    (_hand_built("i", [("W", "i o")], "o", dict(i=4, o=4, q=2)), SizeError,
     "unknown index 'q' in the sizes; the indices are i, o"),
    (_hand_built("i", [("W", "i o")], "o", dict(i=4, o=0)), SizeError,
     "size 0 of index 'o' is not a positive integer"),
    (Structure(Operand("x", ("i",)), [Operand("W", ("i", "o"))], Operand("y", ("o",)),
               (Index("i", Size.const(4)), Index("o", Size.const(4)))), SpecTypeError,
     "Structure.factors must be a tuple of Operand, got list"),
    (Structure(Operand("x", ("i",)), (Operand("W", ("i", "o")),), Operand("y", ("o",)),
               (Index("i", 4), Index("o", Size.const(4)))), SpecTypeError,
     "the size of index 'i' must be a Size"),
]


@pytest.mark.parametrize("s,error,fragment", BAD_BY_HAND)
def test_a_hand_built_structure_is_checked_like_a_written_one(s, error, fragment):
    for enter in (lambda: einc.analyze(s, d=4), lambda: einc.compile(s, 4)):
        with pytest.raises(error) as info:
            enter()
        assert fragment in info.value.message
        assert "\n" not in str(info.value)  # no source text, so no caret


def test_a_valid_hand_built_structure_passes():
    s = _hand_built("i", [("W", "i r"), ("V", "r o")], "o", dict(i=4, r=2, o=4))
    assert einc.analyze(s, d=4).params == 16
    assert check(parse("btt")) == parse("btt")


def test_a_theta_given_with_a_hand_built_structure_must_be_its_point():
    """check() looked at theta's length only: (0,)*7 or (1.5, 0, ...) on btt's structure was
    reported as its theta, with the paper's rules computed from it."""
    import dataclasses
    from fractions import Fraction as Q

    btt = parse("btt")
    half = Q(1, 2)
    for theta in [(0,) * 7, (1.5, 0, 0, 0, 0, 0, 0), (half,) * 7]:
        with pytest.raises(SizeError, match=r"does not match the structure's sizes, which "
                                            r"read as \(1/2\|0\|1/2\|0\|1/2\|1/2\|0\)"):
            einc.analyze(dataclasses.replace(btt, theta=theta), d=64)
    with pytest.raises(SizeError, match="theta must be None or a tuple of 7 exponents"):
        einc.analyze(dataclasses.replace(btt, theta="abc"), d=64)
    with pytest.raises(SizeError, match="has 7 exponents"):
        einc.analyze(dataclasses.replace(btt, theta=(0, 1)), d=64)
    # either orientation of the structure's own point is accepted, and reported as given
    for theta in [(half, 0, half, 0, half, half, 0), (0, half, half, half, 0, half, 0)]:
        got = einc.analyze(dataclasses.replace(btt, theta=theta), d=64).to_dict()["theta"]
        assert got == [float(t) for t in theta]
    typed = parse("(0|1/4|3/4|3/4|0|1/4|0)")  # a redundant point, typed as such
    assert check(typed) is typed
    # points whose second factor is empty lower to one factor (dense): still their own point
    for spec in ("(1|0|0|1|0|0|0)", "(0|1|0|0|1|0|0)"):
        s = parse(spec)
        assert len(s.factors) == 1 and check(s) is s
        assert einc.compile(spec, 16).lowered.params == 256


def test_factors_named_x_or_y_are_factors():
    """index_class labels the input and output apart from every name: a factor may be named
    x or y when the input and output are not (the theta point, the paper's rules and the
    search's canonical graph read those labels)."""
    from einc.space.canonical import graph_hash, structure_graph

    for names in (("y", "B"), ("A", "x"), ("y", "x")):
        spec = "inp[g a] {}[g a f] {}[f g e] -> out[f e] with g = a, f = e".format(*names)
        s = parse(spec)
        assert s.index_class("g") == frozenset({INPUT, *names})
        r, want = einc.analyze(spec, d=1024), einc.analyze("btt", d=1024)
        assert (r.theta, r.redundant, r.degenerate) == (want.theta, False, False)
        assert graph_hash(structure_graph(s)) == graph_hash(structure_graph(parse("btt")))


def test_a_bttmoe_structure_is_spelled_as_its_preset():
    for spec in ("bttmoe(experts=4, k=2)", "bttmoe(experts=3, k=3, cores=3)"):
        s = parse(spec)
        assert parse(s.spec_text()) == s
