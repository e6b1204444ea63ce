"""Concrete sizes: turn symbolic sizes into integers for given d_in, d_out.

Sizes of indices on the input (output) side are rounded down or up so that their product is
at least d_in (d_out) with the least padding; other indices (ranks) round to the nearest
integer. More padding than the tolerance is refused, as in the paper (15%).
"""
from __future__ import annotations

import itertools
import math
import numbers
from collections import Counter
from dataclasses import dataclass

from ..errors import SizeError
from ..ir import Structure
from ..sizes import MAX_SIZE, MAX_SIZE_TEXT, ceil_int, short

DEFAULT_TOLERANCE = 0.15
#: up to this many free sizes every rounding is tried; beyond, interchangeable ones are grouped
EXHAUSTIVE = 14


@dataclass(frozen=True)
class Concrete:
    sizes: dict
    d_in: int
    d_out: int
    padded_in: int
    padded_out: int

    @property
    def padding_in(self) -> float:
        return self.padded_in / self.d_in - 1

    @property
    def padding_out(self) -> float:
        return self.padded_out / self.d_out - 1


def _prod(values) -> int:
    return math.prod(values)


def check_width(value, name: str):
    """A layer width given as ``name``: None, or an int (numpy integers too) from 1 to
    :data:`~einc.sizes.MAX_SIZE`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise SizeError(f"{name} must be a positive integer, got {value!r}")
    if value > MAX_SIZE:
        raise SizeError(f"{name} = {short(value)} is above the largest width einc accepts "
                        f"({MAX_SIZE_TEXT})")
    return int(value)


def check_tolerance(tolerance) -> None:
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) \
            or not tolerance >= 0:  # NaN fails every comparison; inf accepts any padding
        raise SizeError(f"the padding tolerance must be a number >= 0, got {tolerance!r}")


def resolve_dims(s: Structure, d=None, d_in=None, d_out=None) -> tuple[int, int]:
    """d_in and d_out from the arguments, or from the spec when its sizes are all numbers."""
    if d is not None:
        if d_in is not None or d_out is not None:
            raise SizeError("give either d or d_in/d_out, not both")
        d_in = d_out = check_width(d, "d")
    else:
        d_in, d_out = check_width(d_in, "d_in"), check_width(d_out, "d_out")
    if d_in is None or d_out is None:
        sizes = s.sizes
        fixed_in = all(sizes[i].is_const for i in s.input.indices)
        fixed_out = all(sizes[i].is_const for i in s.output.indices)
        # One width given and the other side symbolic: a square layer. A side of fixed
        # sizes is no width given: its other side, if symbolic, still needs one.
        given_in, given_out = d_in, d_out
        if d_in is None and fixed_in:
            d_in = _prod(int(sizes[i].coeff) for i in s.input.indices)
        if d_out is None and fixed_out:
            d_out = _prod(int(sizes[i].coeff) for i in s.output.indices)
        if given_in is not None and d_out is None:
            d_out = given_in
        if given_out is not None and d_in is None:
            d_in = given_out
        if d_in is None and d_out is None:
            raise SizeError("this structure's sizes depend on the layer width: give d "
                            "(or d_in and d_out)", s.source or None)
        if d_in is None or d_out is None:
            side, fixed = ("input", d_out) if d_in is None else ("output", d_in)
            raise SizeError(f"this structure's {side} sizes depend on the layer width (the "
                            f"other side is fixed at {fixed}): give d_{side[:-3]}",
                            s.source or None)
    return d_in, d_out


def concretize(s: Structure, d_in: int, d_out: int,
               tolerance: float = DEFAULT_TOLERANCE) -> Concrete:
    check_tolerance(tolerance)
    uses_d = any("d" in ix.size.symbols for ix in s.indices)
    if uses_d and d_in != d_out:
        raise SizeError(f"this spec uses d, which needs a square layer, but d_in = {d_in} and "
                        f"d_out = {d_out}: write its sizes with d_in, d_out or d_min",
                        s.source or None)
    env = {"d": d_in, "d_in": d_in, "d_out": d_out, "d_min": min(d_in, d_out)}
    real = {ix.name: ix.size.evaluate(env) for ix in s.indices}
    for name, v in real.items():
        if v < 0.5:
            raise SizeError(f"index {name!r} has size {v:.3g} at d_in = {d_in}, d_out = "
                            f"{d_out}: the layer is too small for this structure", s.source or None)
    side = set(s.input.indices) | set(s.output.indices)
    fixed, free = {}, []
    for ix in s.indices:
        v = real[ix.name]
        if ix.size.is_const:
            fixed[ix.name] = int(ix.size.coeff)
        elif ix.name in side:
            lo, hi = max(1, math.floor(v + 1e-9)), max(1, ceil_int(v))
            if lo == hi:
                fixed[ix.name] = lo
            else:
                free.append((ix.name, lo, hi, v))
        else:
            fixed[ix.name] = max(1, math.floor(v + 0.5))
    best = _choose(s, fixed, free, d_in, d_out)
    if best is None:
        raise SizeError(_shortfall(s, fixed, free, d_in, d_out), s.source or None)
    sizes = {ix.name: best[ix.name] for ix in s.indices}
    pin = _prod(sizes[i] for i in s.input.indices)
    pout = _prod(sizes[i] for i in s.output.indices)
    over = [(what, padded, d) for what, padded, d in (("d_in", pin, d_in), ("d_out", pout, d_out))
            if padded > d * (1 + tolerance) + 1e-9]
    if over:
        what, padded, d = over[0]
        fits = [_fitting(s, sizes, real, w, n, tolerance) for w, _, n in over]
        hint = f", give its sizes ({'; '.join(fits)})" if all(fits) else ""
        raise SizeError(
            f"{what} = {d} needs {padded / d - 1:.1%} padding with this structure "
            f"({_describe(s, sizes, what)} = {padded}), above the tolerance of "
            f"{tolerance + 0.0:.0%}: choose a width that suits the structure{hint} or raise "
            f"the tolerance", s.source or None)
    return Concrete(sizes, d_in, d_out, pin, pout)


def _choose(s, fixed, free, d_in, d_out):
    """The rounding of the free sizes with the least padding, then closest to the real sizes;
    roundings equally close (several sizes with the same real value, one of them rounded up)
    are told apart by the rank bound (highest), then FLOPs, then parameters, then the
    first."""
    if len(free) > EXHAUSTIVE:
        return _choose_grouped(s, fixed, free, d_in, d_out)
    found = []
    for choice in itertools.product(*[(lo, hi) for _, lo, hi, _ in free]):
        sizes = dict(fixed)
        sizes.update({n: c for (n, *_), c in zip(free, choice)})
        pin = _prod(sizes[i] for i in s.input.indices)
        pout = _prod(sizes[i] for i in s.output.indices)
        if pin < d_in or pout < d_out:
            continue
        drift = sum(abs(math.log(c / v)) for (_, _, _, v), c in zip(free, choice))
        found.append((pin / d_in + pout / d_out, drift, sizes))
    return _pick(s, found, d_in, d_out)


def _pick(s, found: list, d_in: int, d_out: int):
    """Of (padding, drift, sizes) candidates: the least padding, then the closest, then the
    highest rank bound (capped by the widths, as the layer is cropped to them), then the
    cheapest (FLOPs, parameters), then the first. The rank comes first: the rounding that
    costs fewer FLOPs is often the one that shrinks the cut bounding the rank (btt at
    d = 2048: bound 2025 against 2048 at 1.1% fewer FLOPs)."""
    if not found:
        return None
    padding = min(f[0] for f in found)
    found = [f for f in found if f[0] == padding]
    ties = closest(found, lambda f: f[1])
    if len(ties) == 1:
        return ties[0][2]
    from .rank import rank_bound
    rank = lambda z: min(rank_bound(s, z)[0], d_in, d_out)
    return min(ties, key=lambda f: (-rank(f[2]), cost(s, f[2]), f[1]))[2]


#: drifts closer than this are the same rounding distance (float sums in another order)
DRIFT_TIE = 1e-9


def closest(items: list, drift) -> list:
    """The items whose drift is within :data:`DRIFT_TIE` of the least, in their order."""
    low = min(drift(i) for i in items)
    return [i for i in items if drift(i) <= low + DRIFT_TIE]


def cost(s: Structure, sizes: dict) -> tuple[int, int]:
    """(FLOPs of the cheapest contraction order, parameters) at these sizes."""
    from .symbolic import symbolic

    sym = symbolic(s)
    args = [sizes[i] for i in sym.index_names]
    return min(int(f(*args)) for f in sym.flops_fns.values()), int(sym.params_fn(*args))


def _choose_grouped(s, fixed, free, d_in, d_out, by_factor: bool = True):
    """:func:`_choose` for many free sizes. Those that round between the same two integers
    and sit in the same operands are interchangeable, for padding and for cost, so only how
    many of each such group round up matters; the ones rounded up are those with the largest
    real sizes (least drift). The search is then a product of (group size + 1) choices
    instead of 2 ** (free sizes), with the same rule for ties. When that is still too many,
    sizes in different factors are grouped too (interchangeable for padding only: ties then
    go by index order), and beyond that every size rounds up."""
    count_in, count_out = Counter(s.input.indices), Counter(s.output.indices)
    factors = lambda name: tuple(k for k, f in enumerate(s.factors) if name in f.indices) \
        if by_factor else ()
    groups: dict[tuple, list] = {}
    for entry in free:
        name, lo, hi, _ = entry
        groups.setdefault((lo, hi, count_in[name], count_out[name], factors(name)),
                          []).append(entry)
    keys = list(groups)
    for members in groups.values():
        members.sort(key=lambda t: -t[3])
    if math.prod(len(groups[k]) + 1 for k in keys) > 1 << EXHAUSTIVE:
        if by_factor:
            return _choose_grouped(s, fixed, free, d_in, d_out, by_factor=False)
        return {**fixed, **{n: hi for n, lo, hi, v in free}}  # round all up: fits
    base_in = _prod(fixed[i] for i in s.input.indices if i in fixed)
    base_out = _prod(fixed[i] for i in s.output.indices if i in fixed)
    found = []
    for ups in itertools.product(*[range(len(groups[k]) + 1) for k in keys]):
        pin, pout, drift = base_in, base_out, 0.0
        for key, u in zip(keys, ups):
            lo, hi, m_in, m_out, _ = key
            members = groups[key]
            factor = hi ** u * lo ** (len(members) - u)
            pin, pout = pin * factor ** m_in, pout * factor ** m_out
            drift += sum(abs(math.log((hi if j < u else lo) / v))
                         for j, (_, _, _, v) in enumerate(members))
        if pin < d_in or pout < d_out:
            continue
        sizes = dict(fixed)
        for key, u in zip(keys, ups):
            for j, (name, lo, hi, _) in enumerate(groups[key]):
                sizes[name] = hi if j < u else lo
        found.append((pin / d_in + pout / d_out, drift, sizes))
    return _pick(s, found, d_in, d_out)


def _shortfall(s, fixed, free, d_in, d_out) -> str:
    sizes = dict(fixed)
    sizes.update({n: hi for n, lo, hi, v in free})
    for what, op, d in (("d_in", s.input, d_in), ("d_out", s.output, d_out)):
        total = _prod(sizes[i] for i in op.indices)
        if total < d:
            return (f"the sizes of {op.name} ({_describe(s, sizes, what)} = {total}) cannot "
                    f"cover {what} = {d}")
    return "no integer sizes fit d_in and d_out"  # pragma: no cover


def _fitting(s, sizes, real, what, d, tolerance) -> str:
    """Sizes of the side's growing indices that fit ``d`` within the tolerance (rounding
    only down or up from d^(1/c) misses 512 = 4 x 4 x 4 x 8 for four cores), for the error
    message; empty when there are none."""
    op = s.input if what == "d_in" else s.output
    names = sorted((i for i in op.indices if not s.size(i).is_const), key=lambda i: real[i])
    fixed = _prod(sizes[i] for i in op.indices if s.size(i).is_const)
    if not names:
        return ""
    fit = near_factors(-(-d // fixed), len(names))
    padded = fixed * _prod(fit)
    if padded > d * (1 + tolerance) + 1e-9:
        return ""
    given = ", ".join(f"{i} = {n}" for i, n in zip(names, fit))
    return f"`{given}`: {padded / d - 1:.1%} padding of {what}"


def _describe(s, sizes, what) -> str:
    op = s.input if what == "d_in" else s.output
    return " x ".join(f"{i}={sizes[i]}" for i in op.indices)


def _iroot_ceil(n: int, c: int) -> int:
    """The least s with s ** c >= n."""
    s = max(1, int(round(n ** (1.0 / c))))
    while s ** c < n:
        s += 1
    while s > 1 and (s - 1) ** c >= n:
        s -= 1
    return s


def near_factors(n: int, c: int, max_ratio: float = 2.0) -> tuple[int, ...]:
    """``c`` non-decreasing sizes whose product is at least ``n``, as even as possible: the
    least padding among tuples whose largest size is at most ``max_ratio`` times the
    smallest, ties going to the more even tuple. ``(s,) * c`` with ``s = ceil(n^(1/c))`` is
    always a candidate. Examples: 1024 at c = 3 -> (8, 8, 16); 1000 -> (10, 10, 10)."""
    if c == 1:
        return (n,)
    s = _iroot_ceil(n, c)
    best = [(s ** c - n, 0, (s,) * c)]
    low = _iroot_ceil(max(1, int(n / max_ratio ** (c - 1))), c)

    def extend(prefix: tuple, product: int, lo: int, hi: int) -> None:
        left = c - len(prefix)
        if left == 1:
            q = max(lo, -(-n // product))
            if q <= hi:
                best[0] = min(best[0], (product * q - n, q - prefix[0], prefix + (q,)))
            return
        for p in range(lo, hi + 1):
            # every later size is >= p: the product only grows from here
            if product * p ** left - n > best[0][0]:
                break
            extend(prefix + (p,), product * p, p, hi)

    for p1 in range(max(1, low - 1), s + 1):
        extend((p1,), p1, p1, int(max_ratio * p1))
    return best[0][2]
