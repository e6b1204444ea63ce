"""A standard top-k feed-forward mixture of experts: the baseline BTT-MoE is compared with.

``FFMoE(d, hidden, experts=E, k=K)`` replaces a transformer's feed-forward block
(``d -> hidden -> d``, GELU) by ``E`` such blocks and a router (``nn.Linear(d, E)``,
zero-initialised). Each token runs its top ``k`` experts, weighted by the softmax of their
``k`` logits, and the layer stores ``aux_loss`` after each forward: the switch
load-balancing loss plus 0.1 x the router z-loss, as :class:`einc.BTTMoE` does. With
``hidden = 4 d / k`` a token costs as many FLOPs as the dense ``d -> 4d -> d`` block.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CompileError
from ..moe.layer import Router

Z_LOSS_WEIGHT = 0.1


class FFMoE(nn.Module):
    def __init__(self, d: int, hidden: int, experts: int = 8, k: int = 2, bias: bool = True):
        super().__init__()
        for name, value in (("d", d), ("hidden", hidden), ("experts", experts), ("k", k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CompileError(f"FFMoE takes a positive integer {name}, got {value!r}")
        if k > experts:
            raise CompileError(f"FFMoE takes k from 1 to experts = {experts}, got {k}")
        self.d, self.hidden, self.experts, self.k = d, hidden, experts, k
        self.spec = f"ffmoe(experts={experts},k={k})"
        self.router = Router(d, experts)  # zero-initialised, also by deferred init
        self.w1 = nn.Parameter(torch.empty(experts, d, hidden))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, d))
        self.b1 = nn.Parameter(torch.zeros(experts, hidden)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(d)) if bias else None
        self.aux_loss = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.w1.normal_(0.0, 1.0 / math.sqrt(self.d))
            self.w2.normal_(0.0, 1.0 / math.sqrt(self.hidden))
            self.router.reset_parameters()

    def lr_multipliers(self) -> dict[str, float]:
        """Per-factor rates as einc.param_groups reads them: each expert map is a dense
        layer, so the multiplier relative to a dense layer of its own width is 1."""
        return {"w1": 1.0, "w2": 1.0}

    def flop_count(self) -> tuple[int, int]:
        """Forward and backward FLOPs per token: router plus k experts, each two dense maps
        (2 per multiply-add forward, twice that backward, as einc counts a dense layer)."""
        fwd = 2 * self.d * self.experts + self.k * 2 * (2 * self.d * self.hidden)
        return fwd, 2 * fwd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d)
        logits = self.router(x2)                                  # (N, E)
        top, idx = logits.topk(self.k, dim=-1)                    # (N, k)
        gate = torch.softmax(top, dim=-1)
        probs = torch.softmax(logits, dim=-1)
        counts = torch.bincount(idx.reshape(-1), minlength=self.experts)
        frac = counts.to(probs.dtype) / (x2.shape[0] * self.k)
        balance = self.experts * (frac * probs.mean(0)).sum()
        self.aux_loss = balance + Z_LOSS_WEIGHT * torch.logsumexp(logits, -1).pow(2).mean()
        y = torch.zeros_like(x2)
        for e in range(self.experts):                             # only routed tokens
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            h = x2[tok] @ self.w1[e]
            if self.b1 is not None:
                h = h + self.b1[e]
            h = F.gelu(h) @ self.w2[e]
            y = y.index_add(0, tok, h * gate[tok, slot, None])
        if self.b2 is not None:
            y = y + self.b2
        return y.reshape(*lead, self.d)

    def extra_repr(self) -> str:
        return f"d={self.d}, hidden={self.hidden}, experts={self.experts}, k={self.k}"
