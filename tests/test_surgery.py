"""einc.replace_linear on a GPT-2-style model."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import einc
from gpt import GPT, batches


def train(model, steps, lr=3e-3, aux=False):
    opt = torch.optim.AdamW(einc.param_groups(model, lr))
    data = batches()
    losses = []
    for _ in range(steps):
        x, y = next(data)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        total = loss + 0.01 * einc.moe_aux_loss(model) if aux else loss
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_replace_every_linear_but_the_head_and_train():
    torch.manual_seed(0)
    model = GPT()
    report = einc.replace_linear(model, "btt(rank=2)", exclude="lm_head")
    assert len(report) == 12  # q, k, v, o, fc, proj in two blocks
    assert {r[0] for r in report.rows} >= {"blocks.0.q",
                                          "blocks.1.proj"}
    assert isinstance(model.blocks[0].q, einc.StructuredLinear)
    assert type(model.lm_head) is torch.nn.Linear
    assert report.params_after < report.params_before
    assert "total" in str(report)
    losses = train(model, 60)
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10


def test_include_patterns_bias_and_dtype_are_kept():
    model = GPT().double()
    with torch.no_grad():
        model.blocks[0].q.bias.fill_(0.5)
    einc.replace_linear(model, "lowrank(rank=8)", include=["blocks.0.q", "blocks.*.fc"])
    q = model.blocks[0].q
    assert isinstance(q, einc.StructuredLinear) and q.factors()[0].dtype == torch.float64
    assert torch.all(q.bias == 0.5)
    assert isinstance(model.blocks[1].fc, einc.StructuredLinear)
    assert type(model.blocks[1].q) is torch.nn.Linear


def test_a_layer_that_cannot_take_the_structure_leaves_the_model_untouched():
    model = GPT(vocab=37)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(einc.SizeError, match="lm_head"):
        einc.replace_linear(model, "kron", tolerance=0.05)  # 64 -> 37 needs > 5% padding
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_bttmoe_everywhere_but_the_head():
    torch.manual_seed(0)
    model = GPT()
    report = einc.replace_linear(model, "bttmoe(experts=4, k=2)", exclude="lm_head")
    assert len(report) == 12 and isinstance(model.blocks[0].q, einc.BTTMoE)
    losses = train(model, 40, aux=True)
    assert sum(losses[-10:]) < sum(losses[:10])
    assert einc.moe_aux_loss(model).item() > 0


def test_a_bare_linear_is_refused_and_errors_keep_their_class():
    with pytest.raises(einc.CompileError, match="itself an nn.Linear"):
        einc.replace_linear(nn.Linear(64, 64), "btt")
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(einc.UnknownNameError, match="layer '0'.*unknown preset"):
        einc.replace_linear(model, "foo")
    assert type(model[0]) is nn.Linear
