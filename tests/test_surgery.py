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
    report = einc.replace_linear(model, "btt(rank=2)")
    assert len(report) == 12  # q, k, v, o, fc, proj in two blocks
    assert [name for name, _ in report.kept] == ["lm_head"]  # the unembedding, found
    assert "kept dense: lm_head: the unembedding" in str(report)
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
        # 64 -> 37 needs > 5% padding
        einc.replace_linear(model, "kron", tolerance=0.05, keep_unembedding=False)
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_bttmoe_everywhere_but_the_head():
    torch.manual_seed(0)
    model = GPT()
    report = einc.replace_linear(model, "bttmoe(experts=4, k=2)")
    assert len(report) == 12 and isinstance(model.blocks[0].q, einc.BTTMoE)
    assert type(model.lm_head) is nn.Linear
    losses = train(model, 40, aux=True)
    assert sum(losses[-10:]) < sum(losses[:10])
    assert einc.moe_aux_loss(model).item() > 0


def test_a_bare_linear_is_refused_and_errors_keep_their_class():
    with pytest.raises(einc.CompileError, match="itself an nn.Linear"):
        einc.replace_linear(nn.Linear(64, 64), "btt")
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(5, 5))
    with pytest.raises(einc.UnknownNameError, match="unknown preset"):  # before any layer
        einc.replace_linear(model, "foo")
    with pytest.raises(einc.SizeError, match=r"layer '1' \(5 -> 5\).*20\.0% padding"):
        einc.replace_linear(model, "btt")
    assert type(model[0]) is nn.Linear


def test_the_unembedding_is_replaced_on_request_and_found_by_its_shape():
    model = GPT()
    report = einc.replace_linear(model, "btt(rank=2)", keep_unembedding=False)
    assert len(report) == 13 and not report.kept
    assert isinstance(model.lm_head, einc.StructuredLinear)
    # without an embedding there is no vocabulary to recognise: every layer is replaced
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 10))
    assert len(einc.replace_linear(mlp, "lowrank(rank=2)")) == 2
    # only the last layer onto the vocabulary is the unembedding
    two = nn.ModuleDict({"emb": nn.Embedding(16, 16), "a": nn.Linear(16, 16),
                         "b": nn.Linear(16, 16)})
    report = einc.replace_linear(two, "lowrank(rank=2)")
    assert [r[0] for r in report.rows] == ["a"] and [n for n, _ in report.kept] == ["b"]


class Positions(nn.Module):
    """A model whose MLP maps its width onto as many hidden units as there are positions."""

    def __init__(self, head: bool = True, tied: bool = False):
        super().__init__()
        self.tok, self.pos = nn.Embedding(50, 16), nn.Embedding(64, 16)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)) for _ in range(2))
        self.head = nn.Linear(16, 50 if head else 3, bias=False)
        if tied:
            self.head.weight = self.tok.weight


@pytest.mark.parametrize("head,tied,kept", [(True, False, ["head"]), (False, False, []),
                                            (True, True, ["head"])])
def test_only_the_last_layer_can_be_the_unembedding(head, tied, kept):
    """An inner 16 -> 64 layer matches the position embedding (16 wide, 64 positions): it
    was kept dense as "the unembedding", next to a tied head or in a classifier."""
    model = Positions(head, tied)
    report = einc.replace_linear(model, "lowrank(rank=2)")
    assert [n for n, _ in report.kept] == kept
    assert len(report) == 4 + (len(kept) == 0)
    assert all(isinstance(b[0], einc.StructuredLinear) for b in model.blocks)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.fc = nn.Linear(32, 32)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.emb.weight


def test_tied_weights_stay_tied_whatever_the_options():
    model = Tied()
    report = einc.replace_linear(model, "btt(rank=2)", keep_unembedding=False)
    assert [r[0] for r in report.rows] == ["fc"]
    assert report.kept[0][0] == "head" and "shared with 'emb'" in report.kept[0][1]
    assert model.head.weight is model.emb.weight and type(model.head) is nn.Linear


def test_torch_attention_is_reported_not_broken():
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    report = einc.replace_linear(layer, "btt(rank=2)")
    assert [r[0] for r in report.rows] == ["linear1", "linear2"]
    assert [n for n, _ in report.kept] == ["self_attn", "self_attn.out_proj"]
    assert "reads its weight directly" in str(report)
    assert layer(torch.randn(2, 5, 64)).shape == (2, 5, 64)  # still runs


@pytest.mark.parametrize("spec", ["btt(rank=2)", "bttmoe(experts=4, k=2)"])
def test_torch_transformer_encoders_run_in_eval(spec):
    """nn.TransformerEncoderLayer's inference fast path reads linear1.weight directly (as
    nn.TransformerEncoder's does of its first layer with a padding mask): it failed in
    eval after the replacement. Reference: train mode without dropout, the regular path."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0,
                                                           batch_first=True), 2)
    einc.replace_linear(enc, spec)
    x = torch.randn(3, 6, 32)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True
    want = [enc(x), enc(x, src_key_padding_mask=pad)]
    enc.eval()
    with torch.no_grad():
        got = [enc(x), enc(x, src_key_padding_mask=pad), enc.layers[0](x)]
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1][~pad], want[1][~pad])  # padded rows are left unset
    torch.testing.assert_close(got[2], enc.train().layers[0](x))


def test_patterns_see_every_name_of_a_shared_layer():
    """A layer registered under two names matches include / exclude through either."""
    def model():
        m = nn.Module()
        m.enc = nn.Sequential(nn.Linear(16, 16))
        m.dec = nn.Sequential(m.enc[0])
        return m
    m = model()
    assert len(einc.replace_linear(m, "lowrank(rank=2)", exclude="dec.*")) == 0
    assert type(m.enc[0]) is nn.Linear
    m = model()
    assert len(einc.replace_linear(m, "lowrank(rank=2)", include="dec.*")) == 1
    assert isinstance(m.enc[0], einc.StructuredLinear) and m.enc[0] is m.dec[0]


def test_a_shared_layer_is_replaced_by_one_module_everywhere():
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = einc.replace_linear(model, "lowrank(rank=2)")
    assert len(report) == 1
    assert isinstance(model[0], einc.StructuredLinear) and model[0] is model[2]


def test_a_bttmoe_router_is_part_of_its_layer():
    moe = einc.BTTMoE(64, 64, experts=8, k=2)
    with torch.no_grad():
        moe.router.weight.normal_()
    model = nn.Sequential(moe, nn.GELU(), nn.Linear(64, 64))
    router, trained = moe.router, moe.router.weight.clone()
    for spec in ("btt(rank=2)", "bttmoe(experts=4, k=1)"):  # later passes over the model
        report = einc.replace_linear(model, spec)
        assert [r[0] for r in report.rows] == (["2"] if spec.startswith("btt(") else [])
        assert report.kept == [("0.router", "the router of the BTT-MoE layer '0', part of that layer")]
        assert moe.router is router and torch.equal(moe.router.weight, trained)
    assert model(torch.randn(3, 64)).shape == (3, 64)


@pytest.mark.parametrize("spec", ["btt", "bttmoe(experts=4, k=2)"])
def test_replacements_keep_the_mode_and_the_freezing(spec):
    """A frozen layer used to come back trainable, and an eval() model half in train mode."""
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64), nn.Linear(64, 64))
    model[0].requires_grad_(False)
    model[3].bias.requires_grad_(False)
    model.eval()
    einc.replace_linear(model, spec)
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model[0].parameters())
    assert all(p.requires_grad for p in model[2].parameters())
    assert {n: p.requires_grad for n, p in model[3].named_parameters()
            if n == "bias" or not p.requires_grad} == {"bias": False}


@pytest.mark.parametrize("spec,options,error", [
    ("totally bogus (((", {}, einc.SpecSyntaxError),
    ("btt", {"rout": "fused"}, einc.CompileError),
    ("bttmoe(experts=4)", {"route": "fused"}, einc.CompileError),
])
def test_the_spec_and_options_are_checked_when_no_layer_matches(spec, options, error):
    with pytest.raises(error):
        einc.replace_linear(nn.Sequential(nn.ReLU()), spec, **options)
    with pytest.raises(error):
        einc.replace_linear(nn.Sequential(nn.Linear(8, 8)), spec, include="nothing*", **options)

def test_the_bttmoe_gpt_example_runs():
    """examples/bttmoe_gpt.py end to end at a toy size: both models train and report."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "examples" / "bttmoe_gpt.py"
    out = subprocess.run([sys.executable, str(script), "--steps", "2", "--log-every", "2",
                          "--d", "64", "--val-batches", "1", "--batch", "4"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert "(lm_head kept dense)" in out.stdout
    assert "load " in out.stdout and "validation loss after 2 steps" in out.stdout


@pytest.mark.parametrize("spec,kw,error,match", [
    ("bttmoe(experts=4, k=2)", {"backend": "bad"}, einc.CompileError, "unknown backend 'bad'"),
    ("bttmoe(experts=4, k=2)", {"deterministic": "yes"}, einc.CompileError,
     "deterministic must be True or False"),
    ("btt", {"tolerance": -1}, einc.SizeError, "tolerance must be a number >= 0"),
    ("btt", {"route": "fast"}, einc.CompileError, "known routes"),
    ("btt", {"include": 0}, einc.CompileError, "include must be a glob pattern"),
    ("btt", {"exclude": [1]}, einc.CompileError, "exclude must be a glob pattern"),
    ("btt", {"keep_unembedding": None}, einc.CompileError, "keep_unembedding must be True"),
])
def test_option_values_are_checked_even_when_no_layer_matches(spec, kw, error, match):
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(error, match=match):
        einc.replace_linear(model, spec, **dict({"include": "nothing"}, **kw))
    assert type(model[0]) is nn.Linear
    # patterns as a set, and no model at all
    assert len(einc.replace_linear(model, "btt", include={"0"})) == 1
    with pytest.raises(einc.CompileError, match="takes a torch.nn.Module, got list"):
        einc.replace_linear([nn.Linear(4, 4)], "btt")


class Heads(nn.Module):
    """Layouts of a language model's head: ``order`` lists the modules in registration
    order; "blocks" is an MLP onto as many units as there are positions."""

    def __init__(self, order, shared_embeddings=False, spectral=False):
        super().__init__()
        parts = {"tok": lambda: nn.Embedding(50, 16), "pos": lambda: nn.Embedding(64, 16),
                 "dec": lambda: nn.Embedding(50, 16),
                 "blocks": lambda: nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)),
                 # an MLP onto as many hidden units as the vocabulary has entries
                 "wide": lambda: nn.Sequential(nn.Linear(16, 50), nn.GELU(), nn.Linear(50, 16)),
                 "head": lambda: nn.Linear(16, 50), "v_head": lambda: nn.Linear(16, 1)}
        for name in order:
            setattr(self, name, parts[name]())
        if shared_embeddings:  # encoder and decoder embeddings share one weight
            self.dec.weight = self.tok.weight
        if spectral:
            nn.utils.parametrizations.spectral_norm(self.tok)


@pytest.mark.parametrize("order,kw", [
    (["tok", "pos", "blocks", "head"], {}),
    (["tok", "pos", "head", "blocks"], {}),  # the head registered before the blocks
    (["tok", "pos", "head", "wide", "blocks"], {}),  # and before an MLP 16 -> 50 -> 16
    (["tok", "pos", "blocks", "head", "v_head"], {}),  # a value head after it
    (["tok", "dec", "pos", "blocks", "head"], {"shared_embeddings": True}),
    (["tok", "pos", "blocks", "head"], {"spectral": True}),  # a computed embedding weight
])
def test_the_unembedding_in_common_layouts(order, kw):
    model = Heads(order, **kw)
    report = einc.replace_linear(model, "lowrank(rank=2)")
    assert [n for n, _ in report.kept] == ["head"]
    assert isinstance(model.blocks[0], einc.StructuredLinear)
    assert len(einc.replace_linear(Heads(order, **kw), "lowrank(rank=2)",
                                   keep_unembedding=False).kept) == 0


def test_patterns_from_any_collection_of_strings():
    from collections import UserList

    for include in (UserList(["0"]), {"0": 1}.keys(), ("0",)):
        assert len(einc.replace_linear(nn.Sequential(nn.Linear(64, 64)), "btt",
                                       include=include)) == 1
