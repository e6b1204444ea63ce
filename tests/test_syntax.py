"""Parsing: every spelling of the language, and a table of bad specs with their carets."""
import pytest

import einc
from einc import EincError, SizeError, SpecSyntaxError, StructureError, UnknownNameError
from einc.presets import PRESETS
from einc.syntax import parse

BTT = "g=d_in^(1/2), a=d_in^(1/2), f=d_out^(1/2), r=1, e=d_out^(1/2)"

# spec, einsum equation, sizes (as printed)
GOOD = [
    # compact einsum with every size given, with ties, and with sizes solved from d_in/d_out
    ("ga,gafr,fgre->fe with g = a = d_in^(1/2), f = e = d_out^(1/2), r = 4",
     "ga,gafr,fgre->fe", "g=d_in^(1/2), a=d_in^(1/2), f=d_out^(1/2), r=4, e=d_out^(1/2)"),
    ("ga,gafr,fgre->fe with g = a, f = e, r = 1", "ga,gafr,fgre->fe", BTT),
    ("ga,gafr,fgre->fe with g = 32, f = 16, r = 2", "ga,gafr,fgre->fe",
     "g=32, a=1/32*d_in, f=16, r=2, e=1/16*d_out"),
    ("i,io->o", "i,io->o", "i=d_in, o=d_out"),
    ("i , io -> o", "i,io->o", "i=d_in, o=d_out"),
    ("ab,bc,ca->c with a = 2, b = 3", "ab,bc,ca->c", "a=2, b=3, c=d_out"),
    # named form: multi-letter names, optional commas, any operand names
    ("x[i] W[i o] -> y[o]", "i,io->o", "i=d_in, o=d_out"),
    ("x[i], W[i, o] -> y[o]", "i,io->o", "i=d_in, o=d_out"),
    ("inp[blk a] core1[blk a out1 rank] core2[out1 blk rank b] -> out[out1 b] "
     "with blk = a, out1 = b, rank = 2", "ab,abcd,cade->ce",
     "blk=d_in^(1/2), a=d_in^(1/2), out1=d_out^(1/2), rank=2, b=d_out^(1/2)"),
    # size expressions: products, quotients, powers, every symbol
    ("i,ir,ro->o with r = d^(1/2)", "i,ir,ro->o", "i=d_in, r=d^(1/2), o=d_out"),
    ("i,ir,ro->o with r = d_min^(1/4)*2", "i,ir,ro->o", "i=d_in, r=2*d_min^(1/4), o=d_out"),
    ("i,ir,ro->o with r = d_in/8", "i,ir,ro->o", "i=d_in, r=1/8*d_in, o=d_out"),
    ("i,ir,ro->o with r = d_out**0.5", "i,ir,ro->o", "i=d_in, r=d_out^(1/2), o=d_out"),
    ("i,ir,ro->o with r = (2*4)^(2/3)", "i,ir,ro->o", "i=d_in, r=4, o=d_out"),
    ("i,ir,ro->o with r = d_in^(-1/2)*d_in", "i,ir,ro->o", "i=d_in, r=d_in^(1/2), o=d_out"),
    ("i,ir,ro->o with r = d^-1*d^2", "i,ir,ro->o", "i=d_in, r=d, o=d_out"),
    # an index named like a size symbol: a bare `d` after `with` is the index
    ("ab,ac,bd->cd with a = b = d_in^(1/2), c = d = d_out^(1/2)", "ab,ac,bd->cd",
     "a=d_in^(1/2), b=d_in^(1/2), c=d_out^(1/2), d=d_out^(1/2)"),
    ("x[i] W[i o] -> y[o] with o = d", "i,io->o", "i=d_in, o=d"),
    ("ij,jl,ik->kl with i = j = d_in^(1/2), k = l = d_out^(1/2)", "ij,jl,ik->kl",
     "i=d_in^(1/2), j=d_in^(1/2), l=d_out^(1/2), k=d_out^(1/2)"),
    # theta points
    ("(0.5|0|0.5|0|0.5|0.5|0)", "ga,fga,feg->fe",
     "g=d_in^(1/2), a=d_in^(1/2), f=d_out^(1/2), e=d_out^(1/2)"),
    ("(1/2|0|1/2|0|1/2|1/2|1/4)", "ga,frga,ferg->fe",
     "g=d_in^(1/2), a=d_in^(1/2), f=d_out^(1/2), r=d_min^(1/4), e=d_out^(1/2)"),
    ("(1|0|0|0|1|0|1/2)", "a,ra,er->e", "a=d_in, r=d_min^(1/2), e=d_out"),
    ("(0|0|1|0|0|1|0)", "g,fg,fg->f", "g=d_in, f=d_out"),
    ("(1|0|0|0|1|0|-0)", "a,a,e->e", "a=d_in, e=d_out"),  # -0 is 0
    ("( 1/3 | 1/3 | 1/3 | 1/3 | 1/3 | 1/3 | 0 )", "gba,fhga,fegb->feh",
     "g=d_in^(1/3), b=d_in^(1/3), a=d_in^(1/3), f=d_out^(1/3), h=d_out^(1/3), "
     "e=d_out^(1/3)"),
    # presets, with and without arguments, with size expressions and `with` overrides
    ("dense", "i,io->o", "i=d_in, o=d_out"),
    ("dense()", "i,io->o", "i=d_in, o=d_out"),
    ("lowrank", "i,ir,ro->o", "i=d_in, r=1, o=d_out"),
    ("lowrank(rank=d^(1/2))", "i,ir,ro->o", "i=d_in, r=d^(1/2), o=d_out"),
    ("lowrank(rank=16)", "i,ir,ro->o", "i=d_in, r=16, o=d_out"),
    ("kron", "ij,jl,ik->kl", "i=d_in^(1/2), j=d_in^(1/2), l=d_out^(1/2), k=d_out^(1/2)"),
    ("monarch", "ga,gaf,fge->fe",
     "g=d_in^(1/2), a=d_in^(1/2), f=d_out^(1/2), e=d_out^(1/2)"),
    ("monarch(blocks=8)", "ga,gaf,fge->fe", "g=8, a=1/8*d_in, f=1/8*d_min, e=8*d_min^(-1)*d_out"),
    ("btt", "ga,gafr,fgre->fe", BTT),
    ("btt(rank=4)", "ga,gafr,fgre->fe",
     "g=d_in^(1/2), a=d_in^(1/2), f=d_out^(1/2), r=4, e=d_out^(1/2)"),
    ("btt(rank=2, cores=3)", "abc,abcde,dabefg,dfagh->dfh",
     "i1=d_in^(1/3), i2=d_in^(1/3), i3=d_in^(1/3), o1=d_out^(1/3), r1=2, o2=d_out^(1/3), "
     "r2=2, o3=d_out^(1/3)"),
    ("btt with r = 8", "ga,gafr,fgre->fe",
     "g=d_in^(1/2), a=d_in^(1/2), f=d_out^(1/2), r=8, e=d_out^(1/2)"),
    ("tt(rank=3, cores=3)", "abc,ade,ebfg,gch->dfh",
     "i1=d_in^(1/3), i2=d_in^(1/3), i3=d_in^(1/3), o1=d_out^(1/3), r1=3, o2=d_out^(1/3), "
     "r2=3, o3=d_out^(1/3)"),
    ("bttmoe(experts=4, k=1)", "ga,gafr,fgre->fe",
     "g=d_in^(1/2), a=d_in^(1/2), f=d_out^(1/2), r=4, e=d_out^(1/2)"),
]


def _sizes(s):
    return ", ".join(f"{ix.name}={ix.size}" for ix in s.indices)


@pytest.mark.parametrize("spec,equation,sizes", GOOD)
def test_good(spec, equation, sizes):
    s = parse(spec)
    assert s.equation == equation
    assert _sizes(s) == sizes
    if s.moe is None:  # the named form has no spelling for routing
        assert parse(s.spec_text()) == s  # the named form round-trips


def test_named_and_compact_agree():
    compact = parse("ga,gafr,fgre->fe with g = a = d_in^(1/2), f = e = d_out^(1/2), r = 1")
    named = parse("x[g a] A[g a f r] B[f g r e] -> y[f e] with g = a, f = e, r = 1")
    assert compact == named == parse("btt")


def test_theta_matches_the_papers_einsum():
    s = parse("(1/4|1/4|1/2|1/4|1/4|1/2|1/2)")
    assert s.theta == tuple(einc.analysis.taxonomy.theta_of(s))
    assert [f.indices for f in s.factors] == [tuple("fhrga"), tuple("fergb")]


def test_parse_is_cached_and_type_checked():
    assert parse("btt") is parse("btt")
    for bad in (None, 4, b"btt", ["btt"]):
        with pytest.raises(einc.SpecTypeError, match="a spec is a string"):
            parse(bad)
    # one error family, and still a TypeError for code that catches that
    assert issubclass(einc.SpecTypeError, einc.EincError)
    assert issubclass(einc.SpecTypeError, TypeError)
    for call in (lambda: einc.analyze(None, d=64), lambda: einc.compile(3, d_in=64)):
        with pytest.raises(einc.EincError, match="a spec is a string"):
            call()


def test_moe_preset_records_experts():
    s = parse("bttmoe(experts=8, k=2)")
    assert (s.moe.expert_index, s.moe.k) == ("r", 2)


# spec, error class, message fragment, caret column (1-based), caret width
BAD = [
    # empty or truncated
    ("", SpecSyntaxError, "empty spec", 1, 1),
    ("   ", SpecSyntaxError, "empty spec", 1, 1),
    ("ga,gafr", SpecSyntaxError, "ends too early", 7, 1),
    ("btt(rank=", SpecSyntaxError, "ends too early", 9, 1),
    ("btt(rank=4", SpecSyntaxError, "expected ')'", 10, 1),
    ("(0.5|0|", SpecSyntaxError, "ends too early", 7, 1),
    ("x[i] W[i o] -> y[o", SpecSyntaxError, "expected ',', ']'", 18, 1),
    ("x[i] W[i o] -> y[o] with", SpecSyntaxError, "expected a name", 24, 1),
    # not the grammar
    ("ga,ga fr,fgre->fe", SpecSyntaxError, "unexpected 'fr'", 7, 2),
    ("x[i] -> y[i]", SpecSyntaxError, "unexpected '->'", 6, 2),
    ("i,io->o with o = 3 = 4", SpecSyntaxError, "only index names", 18, 1),
    ("i,io->o ; o", SpecSyntaxError, "unexpected character ';'", 9, 1),
    # the list is the parser's for this place, not the lexer state's (which offered ','
    # and '->' after the output operand too)
    ("x[i] W[i o] -> y[o] #", SpecSyntaxError,
     "unexpected character '#'; expected 'with', the end of the spec", 21, 1),
    ("x[i] W[i o] #", SpecSyntaxError, "unexpected character '#'; expected ',', '->', a name",
     13, 1),
    # an unexpected token's list was lark's for the state, which LALR shares between places:
    # it offered ',', '->' and a name after the output, ')' and '|' after a size, and left
    # out '*' or '/' and '^'
    ("x[i] W[i o] -> y[o] ]", SpecSyntaxError,
     "unexpected ']'; expected 'with', the end of the spec", 21, 1),
    ("i,io->o with o=3 with o=4", SpecSyntaxError, "unexpected 'with'; expected '*' or '/', "
     "'+' or '-', ',', '=', '^', the end of the spec", 18, 4),
    ("i,io->o with o=3 )", SpecSyntaxError, "unexpected ')'; expected '*' or '/', '+' or '-', "
     "',', '=', '^', the end of the spec", 18, 1),
    # index errors
    ("ga,gafr,fgre->fz", StructureError, "output index 'z' appears in no operand", 16, 1),
    ("x[i] W[i o] V[o p] -> y[p q] with p = 4", StructureError,
     "output index 'q' appears in no operand", 27, 1),
    ("ga,gafq,fgre->fe with r = 2", StructureError, "index 'q' appears only in A", 7, 1),
    ("ab,bc->c with a = 2", StructureError, "input index 'a' is touched by no factor", 1, 1),
    ("x[i k] W[i o] -> y[o k]", StructureError, "input index 'k' is touched by no factor", 5, 1),
    ("x[i] W[i o] -> y[o k] with k = 2", StructureError, "output index 'k'", 20, 1),
    ("ii,io->o", StructureError, "appears twice in x", 2, 1),
    ("i1,io->o", StructureError, "'1' is not an index", 2, 1),
    ("ga,gafr,fgre->", StructureError, "output has no indices", 14, 1),
    ("i->i", StructureError, "at least one weight factor", 1, 1),
    ("x[i] V[] W[i o] -> y[o]", StructureError, "factor V has no indices", 6, 1),
    ("x[class] W[class o] -> y[o]", StructureError, "reserved", 3, 5),
    # duplicate names
    ("x[g a] A[g a f r] A[f g r e] -> y[f e] with r = 4", StructureError,
     "duplicate operand name 'A'", 19, 1),
    ("x[i] W[i o] -> x[o]", StructureError, "duplicate operand name 'x'", 16, 1),
    # sizes
    ("ga,gafr,fgre->fe with r = 0", SizeError, "size 0 is not a positive integer", 27, 1),
    ("ga,gafr,fgre->fe with r = 1.5", SizeError, "size 3/2 is not a positive integer", 27, 3),
    ("ga,gafr,fgre->fe with r = -2", SizeError, "sizes must be positive", 27, 2),
    ("i,ir,ro->o with r = d+1", SizeError, "no sums", 22, 1),
    ("i,io->o with o = 2^d", SizeError, "exponent must be a number", 20, 1),
    ("i,ir,ro->o with r = d*(-1)", SizeError, "sizes must be positive", 24, 2),
    ("i,ir,ro->o with r = 4^(-1/2)", SizeError, "size 1/2 is not a positive integer", 21, 8),
    ("i,ir,ro->o with r = n", SizeError, "unknown index 'n'", 21, 1),
    ("i,ir,ro->o with r = d_in^x", SizeError, "unknown size symbol 'x'", 26, 1),
    ("i,ir,ro->o with q = 3", SizeError, "unknown index 'q' in the sizes", 17, 1),
    ("i,ir,ro->o with r = 2, r = 3", SizeError, "given two sizes", 28, 1),
    ("ga,gafr,fgre->fe with r = 4", SizeError, "cannot solve the sizes of g, a", 1, 2),
    ("ga,gafr,fgre->fe with g = a = d_in^(1/2), f = e = d_out^(1/3), r = 2", SizeError,
     "multiply to d_out^(2/3), which cannot match d_out", 15, 2),
    ("x[i j] W[i j o] -> y[o] with i = 3, j = d_in", SizeError,
     "multiply to 3*d_in, which cannot match d_in", 1, 1),
    # the caret stood under the last character; it now points at the index
    ("x[i] W[i r] V[r o] -> y[o]", SizeError, "size of r is not given", 10, 1),
    ("btt with g = f", SizeError, "multiply to d_in^(1/2)*d_out^(1/2)", 10, 1),
    # theta
    ("(0.5|0|0.6|0|0.5|0.5|0)", SizeError, "alpha+beta+gamma = 11/10", 1, 23),
    ("(1/2|0|1/2|1/2|1/2|1/2|0)", SizeError, "delta+eps+phi = 3/2", 1, 25),
    ("(0.5|0|0.5|0|0.5|0.5|1.5)", SizeError, "rho = 3/2 is out of range", 22, 3),
    ("(0.5|0|0.5|0|0.5|0.5|-0.1)", SizeError,
     "rho = -1/10 is out of range: exponents lie in [0, 1]", 22, 4),
    ("(1|-0.5|0.5|0|0.5|0.5|0)", SizeError, "beta = -1/2 is out of range", 4, 4),
    ("(1.5|-0.5|0|0|0.5|0.5|0)", SizeError, "alpha = 3/2 is out of range", 2, 3),
    ("(1e999|0|1|0|1|0|0)", SizeError, "alpha = 1e999 is out of range: exponents lie in", 2, 5),
    ("(0.5|0|0.5|0|0.5|0.5)", SizeError, "has 7 exponents", 1, 21),
    ("(1/2|0|1/2|0|1/2|1/2|0) with r = 2", SizeError, "remove the `with` clause", 1, 23),
    ("(d|0|0|0|1|0|0)", SizeError,
     "alpha = d is not a number: theta exponents are numbers in [0, 1]", 2, 1),
    ("(0.5|0|x|0|0.5|0.5|0)", SizeError,
     "gamma = x is not a number: theta exponents are numbers in [0, 1]", 8, 1),
    ("(0.5|0|nan|0|0.5|0.5|0)", SizeError, "gamma = nan is not a number", 8, 3),
    # a sum was called out of range
    ("(0.25+0.25|0|0.5|0|0.5|0.5|0)", SizeError, "alpha = 0.25+0.25 is a sum: a theta "
     "exponent is one number in [0, 1]", 2, 9),
    ("(0.5|0|0.5|0|0.5|0.5|-inf)", SizeError, "rho = -inf is not a number", 22, 4),
    # irrational exponents were read as their rational part (2^(1/2) as 1)
    ("(2^(1/2)|0|0|0|1|0|0)", SizeError, "alpha = 2^(1/2) is not a rational number", 2, 7),
    ("(1|0|0|0|1|0|3^(1/2)/3)", SizeError, "rho = 3^(1/2)/3 is not a rational number", 14, 9),
    ("(2*1e999|0|0|0|1|0|0)", SizeError, "alpha = 2*1e999 is out of range", 2, 7),
    # the value is in [0, 1]: what is out of range is a number written in it
    ("(10^39/10^39|0|0|0|1|0|0)", SizeError, "every number written in one within 128 bits",
     2, 11),
    ("(0.5" + "0" * 40 + "1|0.5|0|0|1|0|0)", SizeError, "alpha: this number has too many "
     "digits", 2, 44),
    # names are ASCII; the message said only "expected ']', a name"
    ("x[\u00e9] W[o] -> y[o]", SpecSyntaxError, "names are ASCII: a letter or _", 3, 1),
    # presets
    ("foo", UnknownNameError, "unknown preset 'foo'", 1, 3),
    ("btt(rnk=2)", UnknownNameError, "preset 'btt' has no parameter 'rnk'", 5, 3),
    ("kron(rank=2)", UnknownNameError, "has no parameter 'rank'", 6, 4),
    ("btt(rank=2, rank=3)", UnknownNameError, "given twice", 13, 4),
    ("lowrank(rank=0)", SizeError, "rank = 0 is not a positive integer", 14, 1),
    ("btt(rank=1/2)", SizeError, "rank = 1/2 is not a positive integer", 10, 3),
    # a negative argument is named like a zero one (it read "sizes must be positive")
    ("bttmoe(experts=8, k=-1)", SizeError, "k = -1 is not a positive integer", 21, 2),
    ("bttmoe(experts=-3)", SizeError, "experts = -3 is not a positive integer", 16, 2),
    ("lowrank(rank=-d)", SizeError, "rank = -1*d is not positive", 14, 2),
    ("btt(cores=1)", SizeError, "cores must be an integer >= 2", 11, 1),
    ("bttmoe(experts=4, k=8)", SizeError, "k = 8 exceeds experts = 4", 21, 1),
    ("btt with q = 2", SizeError, "unknown index 'q'", 10, 1),
    # division by zero, anywhere a size expression is written
    ("i,ir,ro->o with r = 4/0", SizeError, "division by zero", 21, 3),
    ("i,ir,ro->o with r = 2*d/(4*0)", SizeError, "division by zero", 21, 9),
    ("i,ir,ro->o with r = 0^-1", SizeError, "division by zero", 21, 4),
    ("btt(rank=1/0)", SizeError, "division by zero", 10, 3),
    ("(1/0|0|1|0|1|0|0)", SizeError, "division by zero", 2, 3),
    ("x[i j] W[i j o] -> y[o] with i = 0*d", SizeError, "size 0*d is not positive", 34, 3),
    # values beyond the limits are refused before they are computed
    ("btt(rank=1e400)", SizeError, "1e400 is far too large (~1e+400)", 10, 5),
    ("btt(rank=2^100000)", SizeError, "2^100000 is far too large", 10, 8),
    ("btt(rank=10^(10^6))", SizeError, "10^(10^6) is far too large (~1e+1000000)", 10, 9),
    ("btt(rank=d^(10^10))", SizeError, "exponents of d, d_in, d_out and d_min lie between", 10, 9),
    ("i,ir,ro->o with r = 0.5^(-200)", SizeError, "far too large (~1.6e+60)", 21, 10),
    ("i,ir,ro->o with r = 2^40", SizeError,
     "size 1099511627776 is above the largest size einc accepts (2^32 = 4294967296)", 21, 4),
    ("btt(rank=2^40)", SizeError, "rank = 1099511627776 is above the largest size", 10, 4),
    ("bttmoe(experts=2^40, k=1)", SizeError, "experts = 1099511627776 is above", 16, 4),
    ("(1e-400|0|1|0|1|0|0)", SizeError, "alpha = 1e-400 is too small to tell from 0", 2, 6),
    ("i,ir,ro->o with r = 1.0000000000000000000000000000000000000000001", SizeError,
     "has too many digits", 21, 45),
    # short values in messages, the expression under the caret
    ("i,ir,ro->o with r = 2^(1/3)", SizeError, "size 2^(1/3) is not a positive integer (it is irrational)", 21, 7),
    ("btt(rank=2^(1/3))", SizeError, "rank = 2^(1/3) is not a positive integer (it is irr", 10, 7),
    ("i,ir,ro->o with r = 1e-400", SizeError, "1e-400 is far too small (~1e-400)", 21, 6),
    # core counts within the 51-index limit
    ("btt(cores=20)", SizeError, "cores must be an integer from 2 to 17, got 20", 11, 2),
    ("btt(cores=60)", SizeError, "a c-core btt has 3c - 1 indices", 11, 2),
    ("tt(cores=18)", SizeError, "cores must be an integer from 2 to 17", 10, 2),
    ("bttmoe(cores=26)", SizeError, "cores must be an integer from 2 to 25", 14, 2),
    ("x[" + " ".join(f"i{k}" for k in range(60)) + "] W[" + " ".join(f"i{k}" for k in range(60))
     + " o] -> y[o]", StructureError, "61 indices; einc allows at most 51", 197, 3),
]


@pytest.mark.parametrize("spec,error,fragment,column,width", BAD)
def test_bad(spec, error, fragment, column, width):
    with pytest.raises(error) as info:
        parse(spec)
    e = info.value
    assert isinstance(e, EincError)
    assert fragment in e.message
    assert (e.line, e.column) == (1, column)
    text = str(e).split("\n")
    caret = next(line for line in text[1:] if line.strip() and set(line.strip()) == {"^"})
    assert caret.index("^") - 2 == column - 1
    assert caret.count("^") == width


@pytest.mark.parametrize("spec,d,want", [
    ("btt with g = 4", 64, dict(g=4, a=16, f=8, e=8)),
    ("btt(cores=3) with i1 = 4", 512, dict(i1=4, i2=8, i3=16)),
    ("tt(cores=3) with i1 = 2, i2 = 2", 64, dict(i1=2, i2=2, i3=16, o1=4)),
    ("kron with l = 2", 64, dict(i=8, j=8, k=32, l=2)),
    ("btt with g = f = 4", 64, dict(g=4, a=16, f=4, e=16)),
    ("monarch with a = 16", 64, dict(g=4, a=16)),
    # a parameter equal to a derived size (r = g = d_in^(1/2)) was taken for one: g * a
    # then multiplied to 4 * d_in^(1/2)
    ("btt(rank=d_in^(1/2)) with g = 4", 64, dict(g=4, a=16, r=8)),
    ("tt(rank=d_in^(1/3), cores=3) with i1 = 2", 64, dict(i1=2, i2=4, i3=8, r1=4))])
def test_a_preset_size_written_after_with_resolves_the_rest_of_its_side(spec, d, want):
    # overriding g kept the preset's a = d_in^(1/2), so g * a could never match d_in
    sizes = einc.analyze(spec, d=d).sizes
    assert {i: sizes[i] for i in want} == want


def test_a_size_set_by_a_preset_parameter_is_not_re_solved():
    # monarch(blocks=4) with a = 8 silently took g = 8
    with pytest.raises(SizeError, match="cannot cover d_in = 64"):
        einc.analyze("monarch(blocks=4) with a = 8", d=64)


def test_known_names_are_listed():
    with pytest.raises(UnknownNameError) as info:
        parse("blocktt")
    assert all(name in str(info.value) for name in PRESETS)
    with pytest.raises(UnknownNameError) as info:
        parse("btt(width=3)")
    assert "rank, cores" in str(info.value)


def test_multiline_spec_reports_the_line():
    with pytest.raises(StructureError) as info:
        parse("x[g a] A[g a f r]\n  B[f g r e] -> y[f z] with r = 4")
    e = info.value
    assert (e.line, e.column) == (2, 21)
    assert str(e).split("\n")[1] == "    B[f g r e] -> y[f z] with r = 4"


def test_the_caret_lines_up_under_tabs_and_control_characters():
    # the tab was printed as such but counted as one column in the caret line
    for spec, col in (("\tbtt(rank=0)", 10), ("x[i]\x00 W[i o] -> y[o]", 4)):
        lines = str(_message(spec)).split("\n")
        source, caret = lines[1][2:], lines[2][2:]
        assert caret.rstrip("^") == "".join(c if c == "\t" else " " for c in source[:col])
        assert "\x00" not in source


def test_a_theta_point_is_counted_before_its_values_are_read():
    # 200,000 components were each evaluated (14 s) before the count of 7 was checked
    e = _message("(" + "|".join(["1e-999"] * 20) + ")")
    assert "7 exponents" in e.message and "got 20" in e.message


# ---------------------------------------------------------------------------- limits
def _message(spec):
    with pytest.raises(EincError) as info:
        parse(spec)
    return info.value


def test_messages_stay_short():
    """Tiny, huge and irrational values are shown rounded, never as long fractions."""
    for spec in ("i,ir,ro->o with r = 1e-400", "i,ir,ro->o with r = 2^(1/3)",
                 "btt(rank=1e400)", "i,ir,ro->o with r = 1" + "0" * 5000,
                 "i,ir,ro->o with r = 0." + "0" * 5000 + "1", "btt(rank=2^100000)"):
        e = _message(spec)
        assert isinstance(e, SizeError) and len(e.message) < 160, e.message


def test_long_expressions_do_not_recurse():
    ones = "*".join(["1"] * 3000)
    s = parse(f"i,ir,ro->o with r = {ones}*4")
    assert s.size("r").coeff == 4
    assert parse("i,ir,ro->o with r = 4^(" + "-" * 3000 + "1/2)").size("r").coeff == 2
    # 3000 factors of 2 are refused as too large, at the factor that crosses the bound
    e = _message("i,ir,ro->o with r = " + "*".join(["2"] * 3000))
    assert isinstance(e, SizeError) and "far too large" in e.message


def test_the_limits_themselves_are_accepted():
    assert parse("i,ir,ro->o with r = 2^32").size("r").coeff == 2 ** 32
    assert parse("i,ir,ro->o with r = 2^100/2^98").size("r").coeff == 4
    assert parse("i,ir,ro->o with r = d^32/d^31").size("r") == parse("lowrank(rank=d)").size("r")


def test_most_cores_parse():
    for spec, n in (("btt(cores=17)", 50), ("tt(cores=17)", 50),
                    ("bttmoe(cores=25, experts=4, k=1)", 51)):
        s = parse(spec)
        assert len(s.indices) == n
        assert len(set(s.equation) - set(",->")) == n  # one einsum letter per index


def test_widths_beyond_the_limit_are_refused():
    with pytest.raises(SizeError, match=r"d = 9007199254740993 is above the largest width"):
        einc.analyze("i,io->o", 9007199254740993)
    with pytest.raises(SizeError, match=r"d = ~1e\+300 is above the largest width"):
        einc.analyze("btt", 10 ** 300)
    with pytest.raises(SizeError, match="d_in = 1099511627776"):
        einc.analyze("i,io->o", d_in=2 ** 40, d_out=64)
    with pytest.raises(SizeError, match=r"size d\^2 is ~1.1e\+12 at d = 1048576"):
        einc.analyze("i,ir,ro->o with r = d^2", 2 ** 20)
    rep = einc.analyze("i,io->o", 2 ** 32)
    assert rep.sizes == {"i": 2 ** 32, "o": 2 ** 32}


@pytest.mark.parametrize("n", [30000, 65535])
def test_large_widths_round_exactly(n):
    """d = n^2 + 1: sqrt(d) is n + 1/(2n), so btt needs n x (n + 1), not n x n."""
    rep = einc.analyze("btt", n * n + 1)
    assert sorted((rep.sizes["g"], rep.sizes["a"])) == [n, n + 1]
    assert rep.padded_in == n * (n + 1)


@pytest.mark.parametrize("spec", [
    "i,ir,ro->o with r = 4/0", "btt(rank=1e400)", "btt(rank=d^(10^10))", "btt(cores=20)",
    "i,ir,ro->o with r = " + "*".join(["2"] * 3000)])
def test_cli_reports_limits_without_traceback(spec, capsys):
    from einc.cli import main
    assert main(["analyze", spec, "--d", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("einc: ") and "Traceback" not in err and "^" in err


def test_cli_refuses_huge_width(capsys):
    from einc.cli import main
    with pytest.raises(SystemExit) as e:  # refused by the parser, naming the option typed
        main(["analyze", "btt", "--d", str(10 ** 300)])
    err = capsys.readouterr().err.splitlines()[-1]
    assert e.value.code == 2 and len(err) < 200
    assert err.startswith("einc: error: argument --d: takes an integer >= 1 and <= "
                          "4,294,967,296, got '10000")


def test_an_output_index_tied_to_an_input_index_needs_matching_widths():
    """`with o = i` makes y multiply to d_in: fine for a square layer, a sizing error (not a
    parse error) when the widths differ beyond the padding tolerance."""
    spec = "x[i] W[i o] -> y[o] with o = i"
    rep = einc.analyze(spec, d=64)
    assert rep.sizes == {"i": 64, "o": 64}
    with pytest.raises(einc.SizeError, match="cannot cover d_out = 128"):
        einc.analyze(spec, d_in=64, d_out=128)


@pytest.mark.parametrize("spec,d_in,want", [
    ("pvy,pvyo->o with p = 4, v = y", 64, (4, 4, 4)),
    # v = y = (d_in/2)^(1/2) = 2^(-1/2) d_in^(1/2): irrational constants stay exact, so the
    # side multiplies to exactly d_in (a float coefficient refused this)
    ("pvy,pvyo->o with p = 2, v = y", 32, (2, 4, 4)),
    ("pvy,pvyo->o with p = 3, v = y", 48, (3, 4, 4)),
    ("x[p v y] W[p v y o] -> out[o] with v = (d_in/2)^(1/2), y = (2*d_in)^(1/2), p = 1",
     32, (1, 4, 8)),
])
def test_ties_with_irrational_constants_are_solved_exactly(spec, d_in, want):
    r = einc.analyze(spec, d_in=d_in, d_out=8)
    assert tuple(r.sizes[i] for i in "pvy") == want
    assert r.params_formula == "d_in*d_out" and r.params == d_in * 8


@pytest.mark.parametrize("expr", ["(65537^2)^(1/4)*65537^(1/2)", "(1000003^2)^(1/4)*1000003^(1/2)",
                                  "65537"])
def test_roots_of_large_perfect_powers_stay_exact(expr):
    """what trial division leaves of a constant is reduced to its smallest root, so the
    two spellings of one integer agree (65537^2 and 65537 were two bases)"""
    want = int(expr.split("^")[0].strip("(")) if "^" in expr else int(expr)
    assert parse(f"ab,ar,rbo->o with a = b, r = {expr}").size("r").coeff == want
    a = parse("ab,abo->o with a = (2*65537^2*d_in)^(1/2), b = d_in^(1/2)/(2^(1/2)*65537)")
    assert a.size("a") == parse("ab,abo->o with a = 65537*(2*d_in)^(1/2)").size("a")


@pytest.mark.parametrize("spec,equation", [
    ("x[i] without[i o] -> y[o]", "i,io->o"),
    ("x[within] W[within o] -> y[o] with within = 4, o = 2", "a,ab->b"),
    ("x[i] with_w[i o] -> y[o] with i = 2", "i,io->o"),
])
def test_names_that_begin_with_the_keyword_are_names(spec, equation):
    assert parse(spec).equation == equation


@pytest.mark.parametrize("spec,bad", [("btt withr = 4", "withr"),
                                      ("x[i] W[i o] -> y[o] withi = 4", "withi")])
def test_the_keyword_glued_to_a_name_is_an_error(spec, bad):
    with pytest.raises(SpecSyntaxError, match=f"unexpected '{bad}'"):
        parse(spec)
