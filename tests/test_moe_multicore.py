"""BTT-MoE layers of three or more cores (einc.moe.multicore), against references written
here: each token's k experts as plain einsums over the layer's own factors, float64."""
import copy
import io
import itertools
import math
import pickle

import pytest
import torch

import einc
from einc.analysis.concrete import near_factors
from einc.moe.multicore import layout

DT = torch.float64


def _reference(m: einc.BTTMoE, x: torch.Tensor) -> torch.Tensor:
    """Route with the layer's router (top-k, lowest index first among ties, softmax over
    the k), then every token's experts one by one: the expert's slice of every factor in
    ``m.equation`` with the expert index dropped."""
    x2 = x.reshape(-1, m.in_features)
    logits = m.router(x2)
    order = torch.sort(-logits, dim=1, stable=True).indices[:, : m.k]
    gates = torch.softmax(logits.gather(1, order), dim=1)
    xp = torch.nn.functional.pad(x2, (0, math.prod(m.input_sizes) - m.in_features))
    lhs, out = m.equation.split("->")
    x_term, *terms = lhs.split(",")
    r = m.expert_index
    sliced_eq = ",".join([x_term] + [t.replace(r, "") for t in terms]) + "->" + out
    rows = []
    for t in range(x2.shape[0]):
        acc = 0
        for j in range(m.k):
            e = int(order[t, j])
            cores = [c.select(term.index(r), e) for c, term in zip(m.factors(), terms)]
            y = torch.einsum(sliced_eq, xp[t].view(*m.input_sizes), *cores).reshape(-1)
            acc = acc + gates[t, j] * y
        rows.append(acc[: m.out_features] if m.out_features else acc[:0])
    y = torch.stack(rows) if rows else x2.new_zeros(0, m.out_features)
    if m.bias is not None:
        y = y + m.bias
    return y.reshape(*x.shape[:-1], m.out_features)


def _brute_factors(n: int, c: int):
    """Least padding, then the smallest spread, over every non-decreasing tuple with
    max <= 2 min."""
    s = 1
    while s ** c < n:
        s += 1
    best = None
    for t in itertools.combinations_with_replacement(range(1, 2 * s + 1), c):
        if math.prod(t) >= n and t[-1] <= 2 * t[0]:
            key = (math.prod(t) - n, t[-1] - t[0])
            best = key if best is None or key < best else best
    return best


@pytest.mark.parametrize("c", [3, 4])
def test_near_factors_have_the_least_padding(c):
    for n in list(range(1, 130)) + [512, 1000, 1024, 4097]:
        t = near_factors(n, c)
        assert len(t) == c and list(t) == sorted(t) and t[-1] <= 2 * t[0]
        assert (math.prod(t) - n, t[-1] - t[0]) == _brute_factors(n, c), n
    assert near_factors(1024, 3) == (8, 8, 16) and near_factors(4096, 4) == (8, 8, 8, 8)


def test_layout_comes_from_the_preset():
    for c in (2, 3, 5):
        lay, s = layout(c), einc.parse(f"bttmoe(cores={c})")
        assert lay.equation == s.equation
        assert lay.axes == tuple(f.indices for f in s.factors)
        assert [lay.consumed(j) for j in range(c)] == list(reversed(s.input.indices))


def _layer(c, d_in, d_out, E, k, bias=True, seed=0, **kw):
    torch.manual_seed(seed)
    m = einc.BTTMoE(d_in, d_out, experts=E, k=k, cores=c, bias=bias, dtype=DT, **kw)
    with torch.no_grad():  # a router that routes (the zero init ties every token)
        m.router.weight.normal_()
        m.router.bias.normal_()
        if bias:
            m.bias.normal_()
    return m


CASES = [  # cores, d_in, d_out, experts, k, tokens
    (3, 96, 160, 6, 2, 37),
    (3, 7, 13, 3, 3, 5),
    (4, 100, 30, 5, 1, 64),
    (3, 27, 27, 1, 1, 3),
    (3, 64, 64, 8, 2, 1),
    (5, 40, 33, 4, 2, 9),
]


@pytest.mark.parametrize("c,d_in,d_out,E,k,N", CASES)
@pytest.mark.parametrize("deterministic,backend", [(False, "chunked"), (True, "chunked"),
                                                   (False, "padded"), (True, "padded")])
def test_sparse_and_masked_equal_the_reference_with_all_gradients(c, d_in, d_out, E, k, N,
                                                                    deterministic, backend):
    m = _layer(c, d_in, d_out, E, k, bias=N % 2 == 1, deterministic=deterministic,
               backend=backend)
    x = torch.randn(N, d_in, dtype=DT, requires_grad=True)
    params = [x, *m.parameters()]
    want = _reference(m, x)
    w = torch.randn_like(want)
    grads_want = torch.autograd.grad((want * w).sum(), params, allow_unused=True)
    for run in (m, m.forward_masked):
        y = run(x)
        assert y.shape == (N, d_out)
        torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)
        grads = torch.autograd.grad((y * w).sum(), params, allow_unused=True)
        for name, g, gw in zip(["x"] + [n for n, _ in m.named_parameters()], grads, grads_want):
            if gw is None:  # the output bias of a layer without one, or an unused parameter
                assert g is None or not g.any(), name
            else:
                torch.testing.assert_close(g, gw, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("ins,outs", [((1, 2, 1), (1, 1, 1)), ((2, 1, 3), (1, 3, 1))])
def test_size_one_indices_and_a_relaid_first_step(ins, outs):
    """Sizes of 1 change the planned chain: with (1, 2, 1) -> (1, 1, 1) its first step
    relays the gathered rows out (then kept, not gathered again in backward)."""
    from einc.moe.multicore import expert_plan

    m = _layer(3, math.prod(ins), math.prod(outs), 5, 2, input_sizes=ins, output_sizes=outs)
    first = expert_plan(3, tuple(sorted(m._sizes().items()))).steps[0]
    assert first.relayout == (ins == (1, 2, 1))
    x = torch.randn(23, m.in_features, dtype=DT, requires_grad=True)
    params = [x, *m.parameters()]
    want = _reference(m, x)
    w = torch.randn_like(want)
    y = m(x)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)
    for g, gw in zip(torch.autograd.grad((y * w).sum(), params),
                     torch.autograd.grad((want * w).sum(), params)):
        torch.testing.assert_close(g, gw, rtol=1e-9, atol=1e-11)


def test_edge_cases_empty_batch_one_expert_for_all_and_k_equal_experts():
    m = _layer(3, 30, 20, 4, 2)
    x = torch.randn(0, 30, dtype=DT, requires_grad=True)
    y = m(x)
    assert y.shape == (0, 20)
    y.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in m.factors())
    with torch.no_grad():  # every token's top two: experts 3 and 1
        m.router.weight.zero_()
        m.router.bias.copy_(torch.tensor([0.0, 5.0, -1.0, 9.0]))
    x = torch.randn(11, 30, dtype=DT)
    torch.testing.assert_close(m(x), _reference(m, x))
    assert m.router_stats()["load"].tolist() == [0.0, 0.5, 0.0, 0.5]
    full = _layer(4, 20, 20, 3, 3)
    x = torch.randn(2, 5, 20, dtype=DT)
    torch.testing.assert_close(full(x), _reference(full, x))
    torch.testing.assert_close(full(x[0, 0]), _reference(full, x[0, 0]))


def test_deterministic_results_repeat_bitwise():
    m = _layer(3, 64, 64, 8, 3, deterministic=True)
    x = torch.randn(300, 64, dtype=DT, requires_grad=True)
    runs = []
    for _ in range(2):
        y = m(x)
        runs.append([y, *torch.autograd.grad(y.square().sum(), [x, *m.parameters()])])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_spec_compiles_to_the_analysed_structure():
    spec = "bttmoe(experts=4, k=2, cores=3)"
    m = einc.compile(spec, 96, 160)
    s = einc.parse(spec)
    r = einc.analyze(spec, d_in=96, d_out=160)
    assert (m.cores, m.experts, m.k, m.equation) == (3, 4, 2, s.equation)
    assert m.expert_index == s.letters()[s.moe.expert_index]
    assert m.input_sizes == tuple(r.sizes[i] for i in s.input.indices)
    assert m.output_sizes == tuple(r.sizes[o] for o in s.output.indices)
    assert [tuple(p.shape) for p in m.factors()] == [
        tuple(r.sizes[i] for i in f.indices) for f in s.factors]
    assert m.flops_per_token() == r.moe["active_flops"]
    assert "cores=3" in repr(m)
    x = torch.randn(10, 96)
    torch.testing.assert_close(m(x), m.forward_masked(x))


def test_initial_output_rms_matches_the_input():
    torch.manual_seed(0)
    for c, d, k in ((3, 512, 2), (3, 1000, 1), (4, 256, 3)):
        m = einc.BTTMoE(d, d, experts=4, k=k, cores=c)
        x = torch.randn(2048, d)
        assert 0.85 < float(m(x).detach().pow(2).mean().sqrt()) < 1.15
        assert m.lr_multipliers() == {n: d / f for n, f in zip("ABCD", reversed(m.input_sizes))}


def test_two_core_backends_are_refused_by_name():
    with pytest.raises(einc.CompileError, match="cores=3 runs on: auto, chunked, padded"):
        einc.BTTMoE(27, 27, experts=4, cores=3, backend="strided")
    m = einc.BTTMoE(27, 27, experts=4, cores=3, backend="padded")
    m.backend = "triton"
    with pytest.raises(einc.CompileError, match="two-core BTT-MoE layers only"):
        m(torch.randn(2, 27))
    with pytest.raises(einc.CompileError, match="input_sizes must be 3 positive integers"):
        einc.BTTMoE(27, 27, cores=3, input_sizes=(3, 9))


def test_copies_state_dict_and_autocast():
    m = _layer(3, 30, 20, 4, 2)
    x = torch.randn(7, 30, dtype=DT)
    y = m(x)
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        torch.testing.assert_close(other(x), y)
    fresh = einc.BTTMoE(30, 20, experts=4, k=2, cores=3, dtype=DT)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh(x), y)
    m32 = m.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = m32(x.float())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), y.float(), rtol=0.05, atol=0.05)


def test_vmap_and_torch_func_grad_take_plain_ops():
    m = _layer(3, 27, 27, 4, 2)
    x = torch.randn(3, 5, 27, dtype=DT)
    params = dict(m.named_parameters())
    f = lambda p, xb: torch.func.functional_call(m, p, (xb,))
    torch.testing.assert_close(torch.func.vmap(f, in_dims=(None, 0))(params, x), _reference(m, x))
    g = torch.func.grad(lambda p: f(p, x[0]).square().sum())(params)
    want = torch.autograd.grad(_reference(m, x[0]).square().sum(), list(params.values()))
    for got, w in zip(g.values(), want):
        torch.testing.assert_close(got, w)


def test_replace_linear_with_a_three_core_spec_trains():
    from gpt import GPT  # tests/gpt.py

    torch.manual_seed(0)
    model = GPT(vocab=40, d=64, layers=1, heads=2, context=16)
    einc.replace_linear(model, "bttmoe(experts=4, k=2, cores=3)")
    moes = [mod for mod in model.modules() if isinstance(mod, einc.BTTMoE)]
    assert moes and all(mod.cores == 3 for mod in moes)
    opt = torch.optim.AdamW(einc.param_groups(model, lr=3e-3))
    tokens = torch.randint(0, 40, (4, 17))
    losses = []
    for _ in range(8):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), tokens[:, 1:].reshape(-1))
        (loss + 0.01 * einc.moe_aux_loss(model)).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_export_and_trace_compute_every_expert_for_any_batch():
    m = _layer(3, 27, 20, 4, 2)
    x = torch.randn(11, 27, dtype=DT)
    n = torch.export.Dim("n")
    ep = torch.export.export(m, (torch.randn(5, 27, dtype=DT),), dynamic_shapes=({0: n},))
    torch.testing.assert_close(ep.module()(x), _reference(m, x))
    traced = torch.jit.trace(m, (torch.randn(5, 27, dtype=DT),), check_trace=False)
    torch.testing.assert_close(traced(x), _reference(m, x))


def test_chunks_of_a_few_slots_and_frozen_parts_give_the_reference():
    """Chunks of 1-3 slots (each expert's run cut in many), a frozen core, a frozen input
    and second derivatives (create_graph: plain ops) through the chunked backend."""
    from einc.moe import route
    from einc.moe.multicore import ChunkedCores, sparse_cores

    m = _layer(3, 30, 20, 5, 2)
    lay, sizes = layout(3), m._sizes()
    x = torch.randn(17, math.prod(m.input_sizes), dtype=DT, requires_grad=True)
    idx, gate = route(torch.randn(17, 5, dtype=DT, requires_grad=True), 2)
    cores = [p.detach().clone().requires_grad_(j != 1) for j, p in enumerate(m.factors())]
    want = sparse_cores(x, cores, lay, sizes, idx, gate, True)
    w = torch.randn_like(want)
    for chunk in (1, 3):
        got = ChunkedCores.apply(x, idx, gate, lay, sizes, chunk, True, *cores)
        torch.testing.assert_close(got, want)
        live = [x, gate, cores[0], cores[2]]
        for g, h in zip(torch.autograd.grad((got * w).sum(), live, retain_graph=True),
                        torch.autograd.grad((want * w).sum(), live, retain_graph=True)):
            torch.testing.assert_close(g, h)
    assert torch.autograd.gradcheck(
        lambda x, c0: ChunkedCores.apply(x, idx[:4], gate[:4].detach(), lay, sizes, 2, True, c0,
                                         *cores[1:]),
        (x[:4].detach().requires_grad_(), cores[0].detach().requires_grad_()))
    assert torch.autograd.gradgradcheck(
        lambda x: ChunkedCores.apply(x, idx[:4], gate[:4].detach(), lay, sizes, 2, True, *cores),
        (x[:4].detach().requires_grad_(),))
