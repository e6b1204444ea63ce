"""Rank of the structured matrix: a min-cut bound from the tensor network, and the exact
numerical rank of a random instance (to check the bound at small sizes).

The network: each factor is a node; each index is a node of capacity log(size) (split in
two so the capacity sits on a vertex, since an index may join three or more tensors); the
input's indices hang off a source and the output's off a sink. Any set of indices whose
removal separates source from sink is a matrix factorisation through those indices, so the
rank is at most the product of their sizes.
"""
from __future__ import annotations

import math
import string
from collections import deque
from fractions import Fraction

from ..ir import Structure


def _network(s: Structure, capacity: dict) -> dict:
    """Residual capacities ``net[u][v]``; edges without a capacity are infinite."""
    net: dict = {}

    def edge(u, v, c=math.inf):
        net.setdefault(u, {})[v] = net.get(u, {}).get(v, 0) + c
        net.setdefault(v, {}).setdefault(u, 0)

    for ix in s.index_names:
        edge(("in", ix), ("out", ix), capacity[ix])
    for k, f in enumerate(s.factors):
        for ix in f.indices:
            edge(("T", k), ("in", ix))
            edge(("out", ix), ("T", k))
    for ix in s.input.indices:
        edge("SRC", ("in", ix))
    for ix in s.output.indices:
        edge(("out", ix), "SNK")
    return net


def _reach(net: dict, eps: float) -> dict:
    """Breadth-first search from the source over edges with residual capacity: parents."""
    parent, queue = {"SRC": None}, deque(["SRC"])
    while queue and "SNK" not in parent:
        u = queue.popleft()
        for v, c in net[u].items():
            if c > eps and v not in parent:
                parent[v] = u
                queue.append(v)
    return parent


def min_cut(s: Structure, capacity: dict) -> tuple[float, tuple[str, ...]]:
    """Smallest total capacity of indices separating input from output, and those indices.

    Edmonds-Karp on the vertex-split network (a few dozen nodes: plain Python is fastest).
    """
    net = _network(s, capacity)
    eps = 1e-12 if any(isinstance(c, float) for c in capacity.values()) else 0
    value = 0
    while True:
        parent = _reach(net, eps)
        if "SNK" not in parent:
            break
        path, v = [], "SNK"
        while parent[v] is not None:
            path.append((parent[v], v))
            v = parent[v]
        push = min(net[u][v] for u, v in path)
        for u, v in path:
            net[u][v] -= push
            net[v][u] += push
        value += push
    cut = tuple(ix for ix in s.index_names if ("in", ix) in parent and ("out", ix) not in parent)
    return value, cut


def rank_bound(s: Structure, sizes: dict) -> tuple[int, tuple[str, ...]]:
    """Upper bound on the rank at concrete sizes, and the cut attaining it."""
    _, cut = min_cut(s, {i: math.log(sizes[i]) for i in s.index_names})
    return math.prod(sizes[i] for i in cut), cut


def rank_exponent(s: Structure, exponents: dict) -> Fraction:
    """Exponent of the rank bound when every size is d^exponent (d -> infinity)."""
    scale = math.lcm(*(Fraction(e).denominator for e in exponents.values()), 1)
    value, cut = min_cut(s, {i: int(Fraction(e) * scale) for i, e in exponents.items()})
    return sum((Fraction(exponents[i]) for i in cut), Fraction(0))


def numerical_rank(s: Structure, sizes: dict, seed: int = 0) -> int:
    """Rank of the materialised matrix for random float64 factors (small sizes only)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    factors = [torch.randn(*[sizes[i] for i in f.indices], generator=gen, dtype=torch.float64)
               for f in s.factors]
    letters = s.letters()
    d_in = math.prod(sizes[i] for i in s.input.indices)
    eye = torch.eye(d_in, dtype=torch.float64).reshape(d_in, *[sizes[i] for i in s.input.indices])
    z = next(c for c in string.ascii_letters if c not in letters.values())
    term = lambda op: "".join(letters[i] for i in op.indices)
    eq = f"{z}{term(s.input)},{','.join(term(f) for f in s.factors)}->{z}{term(s.output)}"
    w = torch.einsum(eq, eye, *factors).reshape(d_in, -1)
    sv = torch.linalg.svdvals(w)
    if sv.numel() == 0 or sv[0] == 0:
        return 0
    tol = sv[0] * max(w.shape) * torch.finfo(torch.float64).eps * 10
    return int((sv > tol).sum())
