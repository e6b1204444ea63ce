"""Structures as graphs, and deduplication up to renaming.

The graph of a structure has one node per tensor (x, y and each factor) and one node per
index class (the set of tensors an index joins), with an edge from a class to each tensor
it joins. Node labels: ``x`` and ``y`` for the input and output, ``F`` for every factor (so
factors may be renamed and reordered), and the class's total size for a class node
(indices of one class multiply into one: reshaping them together gives the same family).

Quotiented out: names of factors and indices, the order of factors, the axis order inside
factors and the grouping of indices within a class; with ``transpose=True`` also the swap
of x and y (W against W^T; their sizes read d_in <-> d_out). Kept apart: anything that
changes a class or its size. Two structures are the same family iff their graphs are
isomorphic with matching labels; a Weisfeiler-Lehman hash buckets the graphs and an exact
isomorphism check settles every bucket with more than one graph.
"""
from __future__ import annotations

import networkx as nx

from ..ir import INPUT, OUTPUT, Structure
from ..sizes import Size

_SWAP = {"d_in": "d_out", "d_out": "d_in"}


def class_sizes(s: Structure) -> dict[frozenset, Size]:
    """Index class (set of tensor roles, factors by name) -> product of its index sizes."""
    out: dict[frozenset, Size] = {}
    for ix in s.indices:
        cls = s.index_class(ix.name)
        out[cls] = out[cls] * ix.size if cls in out else ix.size
    return out


def structure_graph(s: Structure, transpose: bool = False) -> nx.Graph:
    """The labelled graph of a structure (of its transpose when ``transpose``)."""
    g = nx.Graph()
    role = {"x": "y", "y": "x"} if transpose else {"x": "x", "y": "y"}
    g.add_node("x", label=role["x"])
    g.add_node("y", label=role["y"])
    for f in s.factors:
        if f.indices:
            g.add_node(("F", f.name), label="F")
    for k, (cls, size) in enumerate(sorted(class_sizes(s).items(), key=lambda kv: sorted(kv[0]))):
        if size.is_const and size.coeff == 1:
            continue  # a size-1 index changes nothing
        if transpose:
            size = Size(size.coeff, tuple(sorted((_SWAP.get(n, n), e) for n, e in size.powers)))
        node = ("C", k)
        g.add_node(node, label=str(size))
        for t in cls:
            g.add_edge(node, {INPUT: "x", OUTPUT: "y"}.get(t, ("F", t)))
    return g


def graph_hash(g: nx.Graph) -> str:
    return nx.weisfeiler_lehman_graph_hash(g, node_attr="label", iterations=3)


def _match(a, b) -> bool:
    return a["label"] == b["label"]


def same_family(s1: Structure, s2: Structure, transpose: bool = False) -> bool:
    g1 = structure_graph(s1)
    if nx.is_isomorphic(g1, structure_graph(s2), node_match=_match):
        return True
    return transpose and nx.is_isomorphic(g1, structure_graph(s2, True), node_match=_match)


class Deduper:
    """Keeps the first structure of each family: ``add(s)`` returns True when ``s`` is new."""

    def __init__(self, transpose: bool = False):
        self.transpose = transpose
        self.buckets: dict[str, list[nx.Graph]] = {}
        self.collisions = 0  # hash matches that needed an isomorphism check

    def key(self, s: Structure) -> tuple[str, nx.Graph, list[nx.Graph]]:
        g = structure_graph(s)
        variants = [g]
        h = graph_hash(g)
        if self.transpose:
            gt = structure_graph(s, True)
            ht = graph_hash(gt)
            variants.append(gt)
            h = min(h, ht)
        return h, g, variants

    def add(self, s: Structure) -> bool:
        h, g, variants = self.key(s)
        bucket = self.buckets.setdefault(h, [])
        for other in bucket:
            self.collisions += 1
            if any(nx.is_isomorphic(v, other, node_match=_match) for v in variants):
                return False
        bucket.append(g)
        return True


def dedupe(structures, transpose: bool = False) -> list[Structure]:
    """One structure per family, in the order first met."""
    d = Deduper(transpose)
    return [s for s in structures if d.add(s)]
