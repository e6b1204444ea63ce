"""The analysis report: one object that prints as a table and converts to JSON."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fractions import Fraction


def _num(q):
    """Exponents print as exact fractions in text and as numbers in JSON."""
    if q is None:
        return None
    q = Fraction(q)
    return int(q) if q.denominator == 1 else float(q)


def _frac(q) -> str:
    if q is None:
        return "-"
    q = Fraction(q)
    return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


@dataclass(frozen=True)
class Report:
    spec: str
    d_in: int
    d_out: int
    padded_in: int
    padded_out: int
    sizes: dict
    input: list
    output: list
    factors: dict
    params: int
    flops: int
    flops_backward: int
    omega: Fraction | None
    psi: Fraction | None
    nu: Fraction | None
    rank_bound: int
    rank_cut: list
    path: list
    largest_intermediate: int
    equation: str
    params_formula: str
    flops_formula: str
    redundant: bool | None = None
    degenerate: bool | None = None
    theta: tuple | None = None
    moe: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def dense_params(self) -> int:
        return self.d_in * self.d_out

    @property
    def dense_flops(self) -> int:
        return 2 * self.d_in * self.d_out

    def to_dict(self) -> dict:
        out = {
            "spec": self.spec, "equation": self.equation,
            "d_in": self.d_in, "d_out": self.d_out,
            "padded_in": self.padded_in, "padded_out": self.padded_out,
            "sizes": dict(self.sizes), "input": list(self.input), "output": list(self.output),
            "factors": {k: list(v) for k, v in self.factors.items()},
            "params": self.params, "flops": self.flops, "flops_backward": self.flops_backward,
            "omega": _num(self.omega), "psi": _num(self.psi), "nu": _num(self.nu),
            "rank_bound": self.rank_bound, "rank_cut": list(self.rank_cut),
            "path": list(self.path),
            "largest_intermediate": self.largest_intermediate,
            "params_formula": self.params_formula, "flops_formula": self.flops_formula,
        }
        if self.theta is not None:
            out["theta"] = [_num(t) for t in self.theta]
        if self.redundant is not None:
            out["redundant"] = self.redundant
            out["degenerate"] = self.degenerate
        if self.moe is not None:
            out["moe"] = dict(self.moe)
        out.update(self.extra)
        return out

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def _rank_text(self) -> str:
        if not self.rank_cut:  # no index joins x to y: y is a fixed vector times a scalar
            return f"{self.rank_bound:,}  (an empty cut: no index joins x to y)"
        cut = ", ".join(self.rank_cut)
        through = math.prod(self.sizes[i] for i in self.rank_cut)
        if self.rank_bound < through:  # the cropped padding binds, not the network
            return f"{self.rank_bound:,}  (the layer's width; the cut at {cut} gives {through:,})"
        return f"{self.rank_bound:,}  (cut at {cut})"

    def __str__(self) -> str:
        rows = [
            ("spec", self.spec),
            ("einsum", self.equation),
            ("sizes", ", ".join(f"{k}={v}" for k, v in self.sizes.items())),
            ("d_in -> d_out", f"{self.d_in} -> {self.d_out}"
             + (f"  (padded {self.padded_in} -> {self.padded_out})"
                if (self.padded_in, self.padded_out) != (self.d_in, self.d_out) else "")),
            ("params", f"{self.params:,}  ({self.params / self.dense_params:.4g}x dense"
             + (", the experts' cores)" if self.moe else ")")),
            ("FLOPs / vector", f"{self.flops:,}  ({self.flops / self.dense_flops:.4g}x dense"
             + (", every expert: see active FLOPs)" if self.moe else ")")),
            ("backward FLOPs", f"{self.flops_backward:,}"),
            ("params formula", self.params_formula),
            ("FLOPs formula", self.flops_formula),
            ("contraction", self.path[0] if self.path else "-"),
            *[("", p) for p in self.path[1:]],
            ("largest interm.", f"{self.largest_intermediate:,} per vector"
             if len(self.path) > 1 else "none (one step)"),
            ("rank bound", self._rank_text()),
            ("omega psi nu", f"{_frac(self.omega)}  {_frac(self.psi)}  {_frac(self.nu)}"),
        ]
        if self.theta is not None:
            rows.append(("theta", "(" + "|".join(_frac(t) for t in self.theta) + ")"))
        if self.redundant is not None:
            notes = [n for n, flag in (("redundant", self.redundant),
                                       ("degenerate", self.degenerate)) if flag]
            rows.append(("paper's rules", ", ".join(notes) if notes else "non-redundant, "
                         "non-degenerate"))
        if self.moe is not None:
            m = self.moe
            rows.append(("experts", f"{m['experts']} (top-{m['k']}), index {m['expert_index']}"))
            rows.append(("total params", f"{m['total_params']:,}  (experts "
                         f"{m['total_params'] - m['router_params']:,} + router "
                         f"{m['router_params']:,})"))
            rows.append(("active params", f"{m['active_params']:,} per token (router included)"))
            rows.append(("active FLOPs", f"{m['active_flops']:,} per token (router included; "
                         f"{m['active_flops'] / self.dense_flops:.4g}x dense)"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
