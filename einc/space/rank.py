"""Filters, sort keys and records: :func:`search` ties the space stage together."""
from __future__ import annotations

import csv
import io
import itertools
import math
import numbers
import re
from decimal import Decimal
from fractions import Fraction

import numpy as np

from ..analysis.concrete import DEFAULT_TOLERANCE, check_tolerance, resolve_dims
from ..ir import INPUT, OUTPUT
from ..analysis.report import _frac, _num
from ..analysis.taxonomy import closed_forms, theta_of
from ..errors import EincError, SizeError, UnknownNameError
from ..theta import structure_from_theta
from .checks import flag, shown
from .lattice import Space
from .names import known_ids
from .score import Candidates, score

DEFAULT_D = 1024
DEFAULT_TOP = 20
#: Without a budget a search looks for layers no costlier than dense ("none" lifts it).
DEFAULT_MAX_FLOPS = "1x"

#: name -> what it sorts by. "paper" is the rule of the paper: no parameter sharing first,
#: then full rank, then the most parameters per FLOP, then the cheapest (many omega = 0,
#: psi = 1 points tie at 1/2 parameter per FLOP, dense and Monarch among them: without
#: FLOPs the lattice order decided and the costliest of them could come first).
SORT_KEYS = {
    "paper": "omega ascending, psi descending, parameters per FLOP descending, then FLOPs "
             "ascending",
    "params-per-flop": "parameters per FLOP descending",
    "flops": "FLOPs ascending",
    "params": "parameters ascending",
    "omega": "omega ascending",
    "psi": "psi descending",
    "nu": "nu ascending",
    "rank": "rank bound descending",
    "measured": "measured forward+backward time ascending (needs measure=True, --measure)",
}


#: per sort key, its columns in priority order, each ascending (1) or descending (-1); the
#: point ids break every remaining tie
_ORDER = {
    "paper": (("omega", 1), ("psi", -1), ("ppf", -1), ("flops", 1)),
    "params-per-flop": (("ppf", -1), ("flops", 1)),
    "flops": (("flops", 1),),
    "params": (("params", 1),),
    "omega": (("omega", 1), ("ppf", -1), ("flops", 1)),
    "psi": (("psi", -1), ("ppf", -1), ("flops", 1)),
    "nu": (("nu", 1), ("ppf", -1), ("flops", 1)),
    "rank": (("rank_bound", -1), ("ppf", -1), ("flops", 1)),
    # which candidates to measure: the paper's first (then sorted by time)
    "measured": (("omega", 1), ("psi", -1), ("ppf", -1), ("flops", 1)),
}
_ROUNDED = ("params", "flops", "ppf")  # float columns that may be rounded (the others exact)


def _columns(c: Candidates, key: str) -> list:
    return [(c.params_per_flop if n == "ppf" else getattr(c, n), sign) for n, sign in _ORDER[key]]


def _sort_order(c: Candidates, key: str) -> np.ndarray:
    """The candidates in float order (np.lexsort sorts by the last key first)."""
    return np.lexsort([c.ids] + [sign * col for col, sign in reversed(_columns(c, key))])


def _exact_key(c: Candidates, i: int, key: str, params: int, flops: int) -> tuple:
    """Candidate ``i``'s sort key with exact counts: float64 rounds counts above 2^53, and
    a ratio of counts at any size, so the float order can tie or swap points whose exact
    values differ."""
    exact = {"params": params, "flops": flops, "ppf": Fraction(params, flops)}
    return tuple(sign * (exact[n] if n in exact else int(getattr(c, n)[i]))
                 for n, sign in _ORDER[key]) + (int(c.ids[i]),)


def _cheap_key(c: Candidates, i: int, key: str) -> tuple | None:
    """:func:`_exact_key` from the float columns, where they hold the counts exactly."""
    p, f = float(c.params[i]), float(c.flops[i])
    return _exact_key(c, i, key, int(p), int(f)) if max(p, f) < 2.0 ** 53 else None


def _past(cols: list, names, i: int, last: int) -> bool:
    """Whether candidate ``i``, after ``last`` in the float order, is after it exactly, and
    so is every later one: an exact column orders them before the first rounded one, or
    that one differs by more than rounding."""
    for (col, _), n in zip(cols, names):
        a, b = float(col[i]), float(col[last])
        if n in _ROUNDED:
            return abs(a - b) > 2.0 ** -40 * max(abs(a), abs(b))
        if a != b:
            return True
    return False


def check_sort_key(key: str) -> str:
    if not isinstance(key, str) or key not in SORT_KEYS:
        raise UnknownNameError(f"unknown sort key {key!r}",
                               hint="known sort keys: " + ", ".join(SORT_KEYS))
    return key


def parse_budget(value, dense: int, what: str) -> Fraction | None:
    """A budget: a number (1e6, 250000, 1/3) or a multiple of the dense layer's ("0.1x"),
    as an exact fraction: integer costs are compared with it exactly, so a layer costing
    0.567x dense meets a budget of 0.567x (0.567 * 20000 is 11339.999999999998 in floats)."""
    if value is None:
        return None
    bad = SizeError(f"bad {what} budget {shown(value)}: give a number (for example 1e6) or a "
                    "fraction of the dense layer's (for example 0.1x)")
    if isinstance(value, (bool, np.bool_)):
        raise bad
    try:
        text = str(value).strip().replace("_", "")  # str() refuses 4,300+ digit integers
    except ValueError:
        raise bad from None
    if text.lower() in ("none", "inf"):
        return None
    times = isinstance(value, str) and text.lower().endswith("x")
    body = text[:-1].strip() if times else text
    power = re.search(r"[eE]([+-]?\d+)$", body) if isinstance(value, str) else None
    if power and abs(int(power.group(1))) > 4000:  # exact, 1e10000000 takes seconds
        raise SizeError(f"bad {what} budget {shown(value)}: its exponent is out of range "
                        "(none lifts the budget)")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    try:
        if isinstance(value, str):
            amount = Fraction(body)
        elif isinstance(value, numbers.Integral):
            amount = Fraction(int(value))
        else:  # float, numpy floats, Fraction, Decimal, 0-d tensors...
            amount = Fraction(value) if isinstance(value, (numbers.Rational, float)) \
                else Fraction(float(value))
    except (ValueError, TypeError, OverflowError, ZeroDivisionError):
        if body.lower().lstrip("+-") in ("nan", "inf", "infinity"):
            raise SizeError(f"bad {what} budget {shown(value)}: it must be a positive, finite "
                            "number (none lifts the budget)") from None
        raise bad from None
    amount *= dense if times else 1
    if amount <= 0:
        raise SizeError(f"bad {what} budget {shown(value)}: it must be a positive, finite number "
                        "(none lifts the budget)")
    if amount < 1 and not times:  # surely a forgotten x: nothing fits
        raise SizeError(f"bad {what} budget {shown(value)}: an absolute budget below 1 fits "
                        f"nothing; for a fraction of the dense layer's, write {text}x")
    return amount


def _within(costs: np.ndarray, cap: Fraction) -> np.ndarray:
    """costs <= cap for integer costs held as float64: against the cap's whole part, which
    is exact below 2**53. Above, the float costs are sums of rounded products, off by a
    few units in the last place either way: the cap gets a relative slack of 2**-40, so a
    cost within it is never dropped, and :func:`search` re-checks the costs just over it
    on the exact records."""
    whole = math.floor(cap)
    if whole >= 2 ** 1000:
        return np.ones(costs.shape, dtype=bool)
    return costs <= (float(whole) if whole < 2 ** 53 else float(whole) * (1 + 2.0 ** -40))


def format_budget(amount: float) -> str:
    """A budget as it is compared: 209,715.2 stays 209,715.2 (rounding it to a whole number
    could print a budget the cheapest candidate seems to meet)."""
    if Fraction(amount).denominator == 1:
        return f"{int(amount):,}"
    text = repr(float(amount))
    if "e" in text or float(amount) == 0:  # tiny fractions of a small dense layer
        q = Fraction(amount)  # 1e-400x: not 0.0, which float(amount) gives
        return f"{Decimal(q.numerator) / Decimal(q.denominator):.3g}"
    whole, frac = text.split(".")
    return f"{int(whole):,}.{frac}"


def parse_exponent(value, option: str, symbol: str, most, where: str = ""):
    """A bound on the exponent ``symbol`` as a Fraction in [0, most]: a number (0.5, "1/2",
    "0.25"). ``option`` names it in messages ("min_psi (--min-psi)")."""
    if value is None:
        return None
    bad = SizeError(f"{option} = {shown(value)} is not a number: give one from 0 to {most}, "
                    "such as 1/2 or 0.5")
    if isinstance(value, numbers.Rational) and not isinstance(value, bool):
        q = Fraction(value)  # ints and Fractions exactly, however large
    else:
        # Fraction(text) takes minutes on "1e100000000": the float decides the range first,
        # and its shortest repr (a short exponent) is made exact
        text = str(value).strip().replace("_", "")
        try:
            q = Fraction(text) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError):  # Python refuses 4,300+ digit integers
            raise bad from None
        if q != q:  # NaN
            raise bad
        if isinstance(q, float) and 0 <= q <= most:
            q = Fraction(repr(q))
    if not 0 <= q <= most:
        raise SizeError(f"{option} = {shown(value)} is out of range: {symbol} lies in "
                        f"[0, {most}]{where}")
    return q


def _integer(value, minimum: int, message: str) -> int:
    """``value`` as an int (numpy integers too) >= minimum, else SizeError(message)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise SizeError(f"{message}, got {shown(value)}")
    return int(value)


class SearchResult(list):
    """The ranked records (dicts), with the counts of the run and the scored columns."""

    def __init__(self, records, *, candidates: Candidates, order, sort: str, message: str = "",
                 repeats: int = 0, keep_absorbable: bool = False):
        super().__init__(records)
        self.candidates = candidates
        self.order = order        # indices into candidates, ranked (all that passed)
        self.sort = sort
        self.message = message
        self.repeats = repeats    # rows left out above the last shown: a layer shown already
        self.keep_absorbable = keep_absorbable  # absorbable points listed (flagged), not left out

    @property
    def counts(self) -> dict:
        return self.candidates.counts

    @property
    def space(self) -> Space:
        return self.candidates.space


def search(d=None, *, d_in=None, d_out=None, factors: int = 2, k: int = 12,
           max_flops=DEFAULT_MAX_FLOPS, max_params=None, min_psi=None, max_omega=None,
           sort: str = "paper", top: int | None = DEFAULT_TOP, transpose: bool = False,
           exclude_degenerate: bool = False, tolerance: float = DEFAULT_TOLERANCE,
           measure: bool = False, batch: int = 64, progress: bool | None = None,
           distinct: bool = True, keep_absorbable: bool = False) -> SearchResult:
    """Enumerate, score, filter and rank structures for a layer of width d.

    ``search(d=1024, max_flops="0.1x")`` returns a list of records (dicts with the fields of
    ``einc analyze --json`` plus ``name``), best first; ``top`` keeps the first ``top``
    (default 20; 0 or None: all, as ``--top 0`` on the command line). Budgets are numbers or
    multiples of the dense layer's ("0.1x"); the FLOP budget defaults to the dense layer's
    ("none" lifts it). ``measure=True`` times the first ``top`` (default 20) compiled modules
    with a batch of ``batch`` and is refused with ``top`` 0 or None; ``sort="measured"``
    orders them by that time and needs ``measure=True``. With ``distinct`` (the default) a
    point whose layer at this width is one ranked above (its sizes round alike, see
    :func:`layer_key`) is left out; ``distinct=False`` lists every point. A point with a
    factor that could be multiplied into another (``absorbable``: the matrices of a point
    with one factor fewer, at more parameters) is left out unless ``keep_absorbable``.
    """
    if d is None and d_in is None and d_out is None:
        d = DEFAULT_D
    if d is not None and (d_in is not None or d_out is not None):
        raise SizeError("give either d or d_in/d_out, not both")
    if d is None:
        d_in = d_in if d_in is not None else d_out
        d_out = d_out if d_out is not None else d_in
    din, dout = resolve_dims(_NoStructure, d, d_in, d_out)
    check_tolerance(tolerance)
    check_sort_key(sort)
    transpose, exclude_degenerate, measure, distinct, keep_absorbable = (
        flag(v, name) for v, name in ((transpose, "transpose"),
                                       (exclude_degenerate, "exclude_degenerate"),
                                       (measure, "measure"), (distinct, "distinct"),
                                       (keep_absorbable, "keep_absorbable")))
    progress = flag(progress, "progress", none="a bar when stderr is a terminal")
    if top is not None:
        top = _integer(top, 0, "top must be a non-negative integer (0 or None for all)")
    if top == 0:
        top = None
    if sort == "measured" and not measure:
        raise EincError("sort key 'measured' orders by measured time, and nothing is "
                        "measured: add --measure (measure=True in Python)")
    if measure and top is None:  # compiling and timing thousands of modules is never meant
        raise EincError("--measure compiles and times every row shown, and --top 0 would show "
                        "every candidate: give --top N, for example --top 20 (in Python: top=N "
                        "with measure=True)")
    if measure:
        batch = _integer(batch, 1, "the batch size for measuring must be an integer >= 1")
    if transpose and din != dout:
        raise SizeError(f"transpose identifies W with its transpose, which needs d_in = d_out "
                        f"(got {din} and {dout})")
    flop_cap = parse_budget(max_flops, 2 * din * dout, "FLOP")
    param_cap = parse_budget(max_params, din * dout, "parameter")
    space = Space(factors, k, transpose)
    psi_min = parse_exponent(min_psi, "min_psi (--min-psi)", "psi", 1)
    # omega <= the FLOP exponent <= 2 + one per rank class (each side's exponents sum to 1,
    # a rank class's is at most 1): 3 for two factors, 6 for three
    omega_max = parse_exponent(max_omega, "max_omega (--max-omega)", "omega",
                               2 + len(space.rc), f" in the {space.n}-factor space")

    def keep(cols):
        m = np.ones(len(cols["ids"]), dtype=bool)
        if flop_cap is not None:
            m &= _within(cols["flops"], flop_cap)
        if param_cap is not None:
            m &= _within(cols["params"], param_cap)
        # exponents are whole multiples of 1/k: compare exactly against the bound's
        if psi_min is not None:
            m &= cols["psi"] >= math.ceil(psi_min * space.k)
        if omega_max is not None:
            m &= cols["omega"] <= math.floor(omega_max * space.k)
        if exclude_degenerate:
            m &= cols["degenerate"] != 1
        if not keep_absorbable:
            m &= cols["absorbable"] != 1
        return m

    cands = score(space, din, dout, tolerance, keep, progress)
    order = _sort_order(cands, sort)
    names = known_ids(space)
    records, keys, seen, repeats, last = [], [], set(), 0, None
    cols, names_ = _columns(cands, sort), [n for n, _ in _ORDER[sort]]
    for i in order:  # best first, until top rows and those the float order may have swapped
        i = int(i)
        if top is not None and len(records) >= top:
            if _past(cols, names_, i, last):
                break
            cheap = _cheap_key(cands, i, sort)
            if cheap is not None and cheap > sorted(keys)[top - 1]:
                continue  # exactly after the top rows
        pid = int(cands.ids[i])
        # the same layer and the same counted cost (see layer_key)
        layer = _point_key(space, pid, din, dout, tolerance) if distinct else None
        if layer is not None:
            key = (layer, cands.flops[i])
            if key in seen:
                repeats += 1
                continue
        r = record(space, pid, din, dout, tolerance, names)
        if (flop_cap is not None and r["flops"] > flop_cap) or \
                (param_cap is not None and r["params"] > param_cap):
            cands.counts["passed"] -= 1  # exact, see _within: the float cost met the cap
            continue
        if layer is not None:
            seen.add(key)
        records.append(r)
        keys.append(_exact_key(cands, i, sort, r["params"], r["flops"]))
        if top is None or len(records) <= top:
            last = i
    # the exact order (a stable sort: float order where the counts are equal)
    records = [r for _, r in sorted(zip(keys, records), key=lambda kr: kr[0])][:top]
    message = "" if len(cands) else _empty_message(cands, flop_cap, param_cap)
    if measure and records:
        from .measure import measure_records

        measure_records(records, batch=batch, progress=progress, tolerance=tolerance)
        if sort == "measured":
            records.sort(key=lambda r: r["measured_ms"])
    return SearchResult(records, candidates=cands, order=order, sort=sort, message=message,
                        repeats=repeats, keep_absorbable=keep_absorbable)


def layer_key(rec: dict, transpose: bool = False) -> tuple:
    """What makes a record's layer at its width, whatever its exponents: per set of
    operands an index joins (input, output, which factors), the product of the sizes of
    such indices, size 1 left out, under every renaming of the factors (and, with
    ``transpose``, input and output swapped). Two lattice points whose sizes round alike
    (r = d^(1/12) is 1 at d = 64) give the same key: the same layer, up to the order of
    its input and output features. The search also compares FLOPs: a step summing over
    a size-1 index only is counted as multiply-adds (as opt_einsum counts), the same step
    without that index as products, so such a pair is listed twice, the cheaper count
    never hidden behind the dearer. A padded layer keeps the first d_in inputs (d_out
    outputs) in the written index order, so there the input's and the output's indices
    count in that order (two points with equal products can drop different slices: ranks
    42 and 44 at d = 50); padded points with the same ordered sizes are the same layer."""
    factors = rec["factors"]
    padded = (rec["padded_in"], rec["padded_out"]) != (rec["d_in"], rec["d_out"])
    items = [(ix in rec["input"], ix in rec["output"],
              frozenset(f for f in factors if ix in factors[f]), size)
             for ix, size in rec["sizes"].items()]
    position = {ix: n for n, ix in enumerate([*rec["input"], *rec["output"]])}
    order = [position.get(ix) for ix in rec["sizes"]] if padded else None
    return _canonical_key(items, list(factors), transpose, order)


def _point_key(space: Space, pid: int, d_in: int, d_out: int, tolerance: float) -> tuple:
    """:func:`layer_key` of a lattice point read off the template, without building its
    record (the search checks every row for repeats, thousands at small widths)."""
    t = space.template
    ix, iy, ir = (int(v[0]) for v in space.split(np.array([pid])))
    exps = space.point_exponents(ix, iy, ir)
    sizes, pin, pout = t.concrete_sizes(exps, d_in, d_out, tolerance)
    classes = [c for c in t.classes if exps[c] > 0]
    items = [(INPUT in t.membership[c], OUTPUT in t.membership[c],
              frozenset(t.membership[c]) - {INPUT, OUTPUT}, sizes[c]) for c in classes]
    s = t.structure
    position = {c: n for n, c in enumerate([*s.input.indices, *s.output.indices])}
    order = [position.get(c) for c in classes] if (pin, pout) != (d_in, d_out) else None
    return _canonical_key(items, list(t.factor_names), space.transpose, order)


def _canonical_key(items, factor_names, transpose: bool, order=None) -> tuple:
    """items: (in the input, in the output, the factors it joins, size) per index. Indices
    of size 1 are left out, and so are factors left without an index (a point without
    its B, or with a B of size 1, is the same layer). ``order``, for a padded layer: each
    index's place in the input or output (None for the others); there the input's and
    output's indices stay a sequence, neighbours joining the same operands merged (they
    flatten as one index of their product)."""
    keep = [n for n, it in enumerate(items) if it[3] != 1]
    items = [items[n] for n in keep]
    order = None if order is None else [order[n] for n in keep]
    factor_names = [f for f in factor_names if any(f in it[2] for it in items)]
    best = None
    for perm in itertools.permutations(factor_names):
        for flip in ((False, True) if transpose else (False,)):
            groups: dict = {}
            ordered: list = []
            for n, (in_x, in_y, joins, size) in enumerate(items):
                names = perm[::-1] if flip else perm
                sig = ((in_y, in_x) if flip else (in_x, in_y), tuple(f in joins for f in names))
                if order is not None and order[n] is not None:
                    ordered.append((order[n], sig, size))
                else:
                    groups[sig] = groups.get(sig, 1) * size
            key = tuple(sorted(groups.items()))
            if order is not None:
                key = (key, _sides(ordered, flip))
            best = key if best is None or key < best else best
    return best


def _sides(ordered: list, flip: bool) -> tuple:
    """The input's and the output's (signature, size) sequences in written order (output
    first when flipped), neighbours with one signature merged."""
    seqs = {True: [], False: []}
    for _, sig, size in sorted(ordered, key=lambda o: o[0]):
        seq = seqs[sig[0][0]]  # sig[0] = (in x, in y) after the flip
        if seq and seq[-1][0] == sig:
            seq[-1] = (sig, seq[-1][1] * size)
        else:
            seq.append((sig, size))
    return tuple(seqs[True]), tuple(seqs[False])


class _NoStructure:  # resolve_dims only consults the structure when widths are missing
    sizes: dict = {}
    input = output = None


def _empty_message(c: Candidates, flop_cap, param_cap) -> str:
    n = c.counts
    if not n["distinct"] or n["min_flops"] is None:
        return "no structure of this space fits the padding tolerance at this width"
    parts = []
    if flop_cap is not None and n["min_flops"] > flop_cap:
        parts.append(f"the cheapest candidate needs {int(n['min_flops']):,} FLOPs "
                     f"(budget {format_budget(flop_cap)})")
    if param_cap is not None and n["min_params"] > param_cap:
        parts.append(f"the smallest candidate has {int(n['min_params']):,} parameters "
                     f"(budget {format_budget(param_cap)})")
    why = "; ".join(parts) if parts else "no candidate meets every filter at once"
    return f"no structure fits: {why}"


# -- records -----------------------------------------------------------------------
def record(space: Space, pid: int, d_in: int, d_out: int,
           tolerance: float = DEFAULT_TOLERANCE, names: dict | None = None) -> dict:
    """The exact record of one kept point: the fields of ``einc analyze --json`` that a
    search reports, evaluated with Python integers from the template."""
    t = space.template
    ix, iy, ir = (int(v[0]) for v in space.split(np.array([pid])))
    exps = space.point_exponents(ix, iy, ir)
    theta = space.theta(exps)
    if theta is not None:
        spec = "(" + "|".join(_frac(v) for v in theta) + ")"
        s = structure_from_theta(theta, spec)
    else:
        s = t.structure_at(exps)
        spec = s.spec_text()
        theta = theta_of(s)
    sizes, pin, pout = t.concrete_sizes(exps, d_in, d_out, tolerance)
    present = {c: int(exps[c] > 0) for c in t.classes}
    params = t.params(sizes, present)
    flops = t.flops(sizes, present)
    omega, psi, nu = t.exponents(exps)
    out = {
        "name": (names or {}).get(pid, ""),
        "spec": spec, "equation": s.equation, "d_in": d_in, "d_out": d_out,
        "padded_in": pin, "padded_out": pout,
        "sizes": {ix_.name: sizes[ix_.name] for ix_ in s.indices},
        "input": list(s.input.indices), "output": list(s.output.indices),
        "factors": {f.name: list(f.indices) for f in s.factors},
        "params": params, "flops": flops, "flops_backward": 2 * flops,
        "omega": _num(omega), "psi": _num(psi), "nu": _num(nu),
        "rank_bound": t.rank_bound(sizes, d_in, d_out),
        "params_per_flop": params / flops,
        "classes": {c: _frac(exps[c]) for c in t.classes if exps[c] > 0},
        "absorbable": bool(space.absorbable(space.exponents(
            np.array([ix]), np.array([iy]), np.array([ir])))[0]),
    }
    if theta is not None:
        rules = closed_forms(theta)
        out["theta"] = [_num(v) for v in theta]
        out["redundant"] = rules["redundant"]
        out["degenerate"] = rules["degenerate"]
    return out


# -- output -------------------------------------------------------------------------
def short_form(rec: dict) -> str:
    """The structure in a line: theta for two factors, class^exponent otherwise."""
    if "theta" in rec and rec["spec"].startswith("("):
        return rec["spec"]
    return " ".join(f"{c}^{e}" for c, e in rec["classes"].items())


def table(result: SearchResult) -> str:
    """The records as a text table, with a header line of counts."""
    n = result.counts
    c = result.candidates
    space = result.space
    head = (f"{space.n}-factor space, lattice step 1/{space.k}, d_in = {c.d_in}, "
            f"d_out = {c.d_out}: {n['lattice']:,} lattice points, {n['distinct']:,} distinct "
            f"families after renaming factors{' and transposing' if space.transpose else ''}, "
            f"{n['padding']:,} refused for padding, {n['degenerate']:,} flagged degenerate, "
            f"{n['absorbable']:,} with an absorbable factor "
            f"{'flagged' if result.keep_absorbable else 'left out'}, "
            f"{n['passed']:,} pass the filters; sorted by {result.sort}")
    lines = [head]
    if not result:
        lines.append(result.message or "no structure fits the filters")
        return "\n".join(lines)
    measured = any("measured_ms" in r for r in result)
    dense_p, dense_f = c.d_in * c.d_out, 2 * c.d_in * c.d_out
    # the rank bound at this width: psi is asymptotic, and rounded sizes can leave a psi = 1
    # layer short of full rank (48 of 64 at d = 64)
    cols = ["#", "name", "omega", "psi", "nu", "rank", "params", "xdense", "FLOPs", "xdense",
            "pad", "rules"] + (["ms"] if measured else []) + ["structure"]
    rows = []
    for i, r in enumerate(result, 1):
        pad = max(r["padded_in"] / r["d_in"], r["padded_out"] / r["d_out"]) - 1
        rules = ("degenerate" if r.get("degenerate") else "ok") if "degenerate" in r else "-"
        if r.get("absorbable"):
            rules = "absorbable" if rules in ("ok", "-") else f"absorbable, {rules}"
        row = [str(i), r["name"] or "", _fmt_exp(r["omega"]), _fmt_exp(r["psi"]),
               _fmt_exp(r["nu"]), f"{r['rank_bound']:,}", f"{r['params']:,}",
               f"{r['params'] / dense_p:.3g}",
               f"{r['flops']:,}", f"{r['flops'] / dense_f:.3g}", _percent(pad), rules]
        if measured:
            row.append(f"{r['measured_ms']:.3g}" if r.get("measured_ms") is not None else "-")
        row.append(short_form(r))
        rows.append(row)
    width = [max(len(x) for x in col) for col in zip(cols, *rows)]
    fmt = lambda row: "  ".join(x.ljust(w) if j in (1, len(row) - 1) else x.rjust(w)
                                for j, (x, w) in enumerate(zip(row, width))).rstrip()
    lines += [fmt(cols), fmt(["-" * w for w in width])] + [fmt(r) for r in rows]
    repeated = (f"{result.repeats:,} skipped as the layer of a row above, sizes rounded "
                "alike at this width (--all-roundings lists them); " if result.repeats else "")
    if len(result) + result.repeats < n["passed"]:
        lines.append(f"(top {len(result):,} of {n['passed']:,}; {repeated}--top 0 shows all)")
    elif repeated:
        lines.append(f"({repeated.rstrip('; ')})")
    return "\n".join(lines)


def _fmt_exp(v) -> str:
    return _frac(Fraction(v).limit_denominator(1000)) if v is not None else "-"


def _percent(pad: float) -> str:
    """Padding for the table: whole percents, but never 0% for a padded layer (1026 of
    1024 is 0.2%)."""
    if pad <= 0 or pad >= 0.095:
        return f"{pad:.0%}"
    return f"{pad:.1%}" if pad >= 0.001 else "<0.1%"


CSV_FIELDS = ["rank", "name", "spec", "theta", "d_in", "d_out", "padded_in", "padded_out",
              "params", "flops", "flops_backward", "omega", "psi", "nu", "rank_bound",
              "params_per_flop", "redundant", "degenerate", "absorbable", "measured_ms"]


def to_csv(records) -> str:
    """The records as CSV, ranked; with ``einc search --train`` also their trained rank and
    loss."""
    buf = io.StringIO()
    trained = ["trained_rank", "trained_loss"] if any("trained_rank" in r for r in records) \
        else []
    w = csv.DictWriter(buf, CSV_FIELDS + trained, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for i, r in enumerate(records, 1):
        row = dict(r, rank=i)
        if "theta" in r:
            row["theta"] = "(" + "|".join(_frac(Fraction(v).limit_denominator(1000))
                                          for v in r["theta"]) + ")"
        w.writerow(row)
    return buf.getvalue()


__all__ = ["search", "SearchResult", "SORT_KEYS", "record", "table", "to_csv", "EincError"]
