"""Named structures, each lowered to an einsum (no special cases downstream).

A preset is a function of size-valued keyword arguments returning the einsum's operands and
its sizes; :func:`lower_preset` checks the arguments and hands the result to
:func:`einc.parse.build` like any written einsum.
"""
from __future__ import annotations

import inspect
from fractions import Fraction

from .errors import Pos, SizeError, UnknownNameError
from .ir import MAX_INDICES, MoE, Operand, Structure
from .sizes import Size, size_problem

#: A c-core btt or tt has 3c - 1 indices (c inputs, c outputs, c - 1 ranks), a c-core
#: bttmoe 2c + 1 (one expert index): the most cores that stay within MAX_INDICES.
MAX_CORES = (MAX_INDICES + 1) // 3
MAX_MOE_CORES = (MAX_INDICES - 1) // 2
_CORES_WHY = (f"a c-core {{}} has {{}} indices and einc allows at most {MAX_INDICES}, "
              "one einsum letter each")

PRESETS: dict[str, callable] = {}


def preset(fn):
    """Register ``fn`` under its name; its keyword defaults are the documented defaults."""
    PRESETS[fn.__name__.rstrip("_")] = fn
    return fn



D_IN, D_OUT, D_MIN = Size.symbol("d_in"), Size.symbol("d_out"), Size.symbol("d_min")


@preset
def dense():
    """y[o] = x[i] W[i o]: the dense layer."""
    return "x[i]", ["W[i o]"], "y[o]", {}


@preset
def lowrank(rank=1):
    """y[o] = x[i] A[i r] B[r o]: rank-r factorisation."""
    return "x[i]", ["A[i r]", "B[r o]"], "y[o]", {"r": rank}


@preset
def kron():
    """y[k l] = x[i j] A[j l] B[i k]: Kronecker product B (x) A of two square-root-sized maps."""
    return "x[i j]", ["A[j l]", "B[i k]"], "y[k l]", {
        "i": D_IN ** Fraction(1, 2), "j": D_IN ** Fraction(1, 2),
        "k": D_OUT ** Fraction(1, 2), "l": D_OUT ** Fraction(1, 2)}


@preset
def monarch(blocks=None):
    """Monarch: a rank-1 BTT whose first core A is ``blocks`` dense blocks. The intermediate
    g * f is kept d_min wide (f = d_min / blocks), so every block count is full rank (square:
    B is d/blocks blocks of blocks x blocks; g = f = blocks bounded the rank by blocks^2).
    The default is ``btt``'s point, g = a = d_in^(1/2) and f = e = d_out^(1/2)."""
    if blocks is None:
        return "x[g a]", ["A[g a f]", "B[f g e]"], "y[f e]", {
            "g": D_IN ** Fraction(1, 2), "e": D_OUT ** Fraction(1, 2)}
    return "x[g a]", ["A[g a f]", "B[f g e]"], "y[f e]", {"g": blocks, "f": D_MIN / blocks}


@preset
def btt(rank=1, cores=2):
    """Block tensor-train: core k maps input index k (from the last) to output index k and
    also carries the outputs already produced and the inputs not yet consumed."""
    return _btt(rank, _cores(cores, "btt", MAX_CORES, "3c - 1"), shared_rank=False)


@preset
def tt(rank=1, cores=2):
    """Tensor-train matrix (MPO): core k is [r_(k-1), i_k, o_k, r_k]."""
    c = _cores(cores, "tt", MAX_CORES, "3c - 1")
    ins, outs, ranks = _names(c)
    bond = [None] + ranks + [None]
    cores_ = []
    for k in range(c):
        idx = [bond[k], ins[k], outs[k], bond[k + 1]]
        cores_.append(_op(_core_name(k), [i for i in idx if i]))
    sizes = {i: D_IN ** Fraction(1, c) for i in ins}
    sizes.update({o: D_OUT ** Fraction(1, c) for o in outs})
    sizes.update({r: rank for r in ranks})
    return _op("x", ins), cores_, _op("y", outs), sizes


@preset
def bttmoe(experts=8, k=2, cores=2):
    """BTT-MoE: ``experts`` rank-1 BTTs (the expert index joins every core); top-k routing."""
    e = _int_param(experts, "experts", 1)
    top = _int_param(k, "k", 1)
    if top > e:
        raise ValueError(f"k = {top} exceeds experts = {e}")
    x, cores_, y, sizes = _btt(Size.const(e), _cores(cores, "bttmoe", MAX_MOE_CORES, "2c + 1"),
                               shared_rank=True)
    return x, cores_, y, sizes, MoE("r", top)


def _btt(rank, c: int, shared_rank: bool):
    ins, outs, ranks = _names(c)
    if shared_rank:
        ranks = ["r"]
    cores_ = []
    for k in range(1, c + 1):
        carried_out, produced = outs[:k - 1], outs[k - 1]
        carried_in, consumed = ins[:c - k], ins[c - k]
        if shared_rank:  # the expert index sits where the rank bonds would
            before, after = (["r"], []) if k > 1 else ([], ["r"])
        else:
            before = [ranks[k - 2]] if k > 1 else []
            after = [ranks[k - 1]] if k < c else []
        cores_.append(_op(_core_name(k - 1),
                          carried_out + carried_in + [consumed] + before + [produced] + after))
    sizes = {i: D_IN ** Fraction(1, c) for i in ins}
    sizes.update({o: D_OUT ** Fraction(1, c) for o in outs})
    sizes.update({r: rank for r in ranks})
    return _op("x", ins), cores_, _op("y", outs), sizes


def _names(c: int):
    if c == 2:  # the paper's spelling: ga,gafr,fgre->fe
        return ["g", "a"], ["f", "e"], ["r"]
    return ([f"i{k}" for k in range(1, c + 1)], [f"o{k}" for k in range(1, c + 1)],
            [f"r{k}" for k in range(1, c)])


def _core_name(k: int) -> str:
    return "ABCDEFGHIJKLMNOPQRSTUVW"[k] if k < 23 else f"G{k}"


def _op(name, indices) -> str:
    return f"{name}[{' '.join(indices)}]"


def _int_param(value, name: str, minimum: int, maximum: int | None = None,
               why: str | None = None) -> int:
    v = value if isinstance(value, int) else (value.coeff if value.is_const else None)
    shown = value.short() if isinstance(value, Size) else value
    if v is None or Fraction(v).denominator != 1 or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {shown}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name} must be an integer from {minimum} to {maximum}, got {shown}"
                         + (f": {why}" if why else ""))
    return int(v)


def _cores(value, preset_name: str, maximum: int, count: str) -> int:
    return _int_param(value, "cores", 2, maximum, _CORES_WHY.format(preset_name, count))


def lower_preset(name: str, args, spec: str, pos: Pos, bindings=()) -> Structure:
    from .syntax import Binding, build

    if name not in PRESETS:
        raise UnknownNameError(f"unknown preset {name!r}", spec, pos,
                               f"known presets: {', '.join(sorted(PRESETS))}")
    fn = PRESETS[name]
    params = inspect.signature(fn).parameters
    kwargs, arg_pos = {}, {}
    for key, value, kpos, vpos in args:
        if key not in params:
            known = ", ".join(params) or "none"
            raise UnknownNameError(f"preset {name!r} has no parameter {key!r}", spec, kpos,
                                   f"its parameters: {known}")
        if key in kwargs:
            raise UnknownNameError(f"parameter {key!r} given twice", spec, kpos)
        problem = size_problem(value)
        if problem:
            raise SizeError(f"{key} = {value.short()} {problem}", spec, vpos)
        kwargs[key], arg_pos[key] = value, vpos
    try:
        result = fn(**kwargs)
    except ValueError as e:
        bad = next((k for k in arg_pos if str(e).startswith(k + " ")), None)
        raise SizeError(str(e), spec, arg_pos.get(bad, pos)) from None
    x, factors, y, sizes, *rest = result
    moe = rest[0] if rest else None
    ops = [_parse_operand(t) for t in (x, *factors, y)]
    given = [Binding(((i, None),), v if isinstance(v, Size) else Size.const(v))
             for i, v in sizes.items()]
    names = {i for op in ops for i in op.indices}
    for b in bindings:
        for n, p in b.names:
            if n not in names:
                raise SizeError(f"unknown index {n!r} in the sizes; {name} has indices "
                                f"{', '.join(sorted(names))}", spec, p)
    # Sizes written after `with` override the preset's own. Where they cover part of the
    # input (output), the preset's size of its last index left out is solved from d_in
    # (d_out) instead: `btt with g = 4` has a = d_in / 4.
    overridden = {n for b in bindings for n, _ in b.names}
    valued = {n for b in bindings if b.value is not None for n, _ in b.names}
    # only a size the preset derives from the width is re-solved, never one set by a
    # parameter the user wrote (monarch(blocks=4) keeps g = 4)
    # (told by identity: a parameter's value may equal a derived size, btt(rank=d_in^(1/2)))
    params = {id(v) for v in kwargs.values()}
    derived = {i for i, v in sizes.items()
               if isinstance(v, Size) and v.symbols and id(v) not in params}
    for side in (ops[0], ops[-1]):
        left_out = [i for i in side.indices if i not in valued]
        free = [i for i in left_out if i in derived]
        if free and len(left_out) < len(side.indices):
            overridden.add(free[-1])
    given = [b for b in given if b.names[0][0] not in overridden] + list(bindings)
    try:
        s = build(ops[0], ops[1:-1], ops[-1], given, spec, moe=moe, origin=name)
    except SizeError as e:  # the preset's operands have no position: point at `with`
        if e.pos is not None or not bindings:
            raise
        raise SizeError(e.message, spec, bindings[0].names[0][1]) from None
    if moe is not None:  # `with` may resize the expert index below k
        size = s.size(moe.expert_index)
        if size.is_const and size.coeff < moe.k:
            where = next((p for b in bindings for n, p in b.names if n == moe.expert_index),
                         pos)
            raise SizeError(f"top-{moe.k} routing needs at least {moe.k} experts, but the "
                            f"expert index {moe.expert_index!r} has size {size.short()}",
                            spec, where)
    return s


def _parse_operand(text: str) -> Operand:
    name, rest = text.split("[")
    return Operand(name, tuple(rest.rstrip("]").split()))
