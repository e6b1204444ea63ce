"""The slot moves of the padded BTT-MoE layout (einc.kernels.slot_rows), on the Triton
kernels (the interpreter on a CPU) and on torch operations, against dense one-hot matrices
in float64."""

import pytest
import torch

from einc.errors import EincError
from einc.kernels import triton_available
from einc.kernels.slot_rows import combine_slots, dispatch_slots, place_slots
from einc.moe.dispatch import _padded_plan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = ["torch", pytest.param("auto", marks=pytest.mark.skipif(
    not triton_available(), reason="no triton kernel here (no triton, or no interpreter)"))]


def plan(N, E, k, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(N)]) if N else \
        torch.zeros(0, k, dtype=torch.long)
    C, slot_row, row_slot = _padded_plan(idx.to(DEVICE), E)
    assert row_slot.numel() == E * C
    return slot_row.view(N, k), row_slot


def one_hot(slot_row, P, dtype):
    """(N, P): token t's row j holds a 1 at column slot_row[t, j]."""
    N, k = slot_row.shape
    M = torch.zeros(N, k, P, dtype=dtype, device=slot_row.device)
    M.scatter_(2, slot_row.unsqueeze(2), 1.0)
    return M


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("N,E,k,W", [(9, 5, 2, 7), (1, 4, 2, 3), (12, 3, 3, 1030),
                                     (20, 8, 1, 16), (0, 4, 2, 5), (5, 3, 2, 2048),
                                     (4, 4, 4, 1)])
def test_moves_match_one_hot_products(kernel, N, E, k, W):
    slot_row, row_slot = plan(N, E, k, seed=N + W)
    P = row_slot.numel()
    gen = torch.Generator().manual_seed(W)
    x = torch.randn(N, W, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    rows = torch.randn(P, W, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    gate = torch.rand(N, k, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    dy = torch.randn(N, W, generator=gen, dtype=torch.float64).to(DEVICE)
    dz = torch.randn(P, W, generator=gen, dtype=torch.float64).to(DEVICE)

    y = combine_slots(rows, slot_row, row_slot, gate, kernel=kernel)
    z = dispatch_slots(x, slot_row, row_slot, kernel=kernel)
    got = [y, z, *torch.autograd.grad((y * dy).sum() + (z * dz).sum(), (rows, gate, x))]

    M = one_hot(slot_row, P, torch.float64)  # independent: dense products
    y_ref = torch.einsum("tjp,tj,pw->tw", M, gate, rows)
    z_ref = torch.einsum("tjp,tw->pw", M, x)
    want = [y_ref, z_ref, *torch.autograd.grad((y_ref * dy).sum() + (z_ref * dz).sum(),
                                               (rows, gate, x))]
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    # padding rows: dispatched as zeros, and no gradient reaches them
    pad = row_slot < 0
    assert torch.all(z[pad] == 0) and torch.all(got[2][pad] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_agrees_with_torch_moves_in_low_precision(dtype):
    if not triton_available():
        pytest.skip("no triton kernel here")
    slot_row, row_slot = plan(16, 4, 2, seed=3)
    P = row_slot.numel()
    rows = torch.randn(P, 40, device=DEVICE).to(dtype).requires_grad_()
    gate = torch.rand(16, 2, device=DEVICE).to(dtype).requires_grad_()
    dy = torch.randn(16, 40, device=DEVICE).to(dtype)
    out = {}
    for kernel in ("auto", "torch"):
        y = combine_slots(rows, slot_row, row_slot, gate, kernel=kernel)
        out[kernel] = [y, *torch.autograd.grad(y, (rows, gate), dy)]
    for u, v in zip(out["auto"], out["torch"]):
        assert u.dtype == dtype
        # float32 sums in the kernel, rounded once: within a rounding of the torch moves
        torch.testing.assert_close(u.float(), v.float(), rtol=2e-2 if dtype != torch.float32
                                   else 1e-5, atol=1e-2 if dtype != torch.float32 else 1e-5)


def test_no_second_derivatives():
    slot_row, row_slot = plan(5, 3, 2, seed=1)
    dev = slot_row.device
    rows = torch.randn(row_slot.numel(), 4, dtype=torch.float64, device=dev, requires_grad=True)
    gate = torch.rand(5, 2, dtype=torch.float64, device=dev, requires_grad=True)
    y = combine_slots(rows, slot_row, row_slot, gate, kernel="torch")
    with pytest.raises(EincError, match="second derivatives"):
        torch.autograd.grad(y.sum(), rows, create_graph=True)


PLACE_KERNELS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available(), reason="no triton kernel here (no triton, or no interpreter)"))]


@pytest.mark.parametrize("kernel", PLACE_KERNELS)  # "triton" fails unless the kernel runs
@pytest.mark.parametrize("S,E,skew,layout", [
    (0, 4, False, "plain"), (1, 1, False, "plain"), (37, 5, False, "plain"),
    (200, 8, True, "plain"), (3000, 300, False, "plain"), (64, 700, True, "plain"),
    (20, 5000, False, "plain"), (40, 6, False, "strided"), (30, 4, False, "expanded"),
    (50, 7, False, "int32")])
def test_place_slots_puts_each_experts_slots_in_order(kernel, S, E, skew, layout):
    """The i-th slot of expert r (ascending slot ids) goes to row r * C + i; every other
    row is padding (-1). The expert ids may come as a strided or expanded view (a slice of
    (N, k) indices) or as int32."""
    gen = torch.Generator().manual_seed(S + E)
    flat = torch.randint(0, 3 if skew else E, (S,), generator=gen) % E
    if layout == "strided":
        flat = torch.stack([flat, flat.flip(0)], 1)[:, 0]
    elif layout == "expanded":
        flat = flat[:1].expand(S)
    elif layout == "int32":
        flat = flat.int()
    counts = torch.bincount(flat, minlength=E)
    C = int(counts.max()) + 3 if S else 0
    order = torch.argsort(flat, stable=True)
    dev = [t.to(DEVICE) if DEVICE != "cpu" else t for t in (flat, order, counts)]
    slot_row, row_slot = place_slots(*dev, C, kernel=kernel)
    want_row = torch.empty(S, dtype=torch.long)
    want_slot = torch.full((E * C,), -1, dtype=torch.long)
    for r in range(E):
        mine = [s for s in range(S) if int(flat[s]) == r]
        for i, s in enumerate(mine):
            want_row[s] = r * C + i
            want_slot[r * C + i] = s
    assert torch.equal(slot_row.cpu(), want_row) and torch.equal(row_slot.cpu(), want_slot)


def test_padded_plan_row_slot_inverts_slot_row():
    slot_row, row_slot = plan(11, 4, 3, seed=2)
    S = slot_row.numel()
    assert torch.equal(row_slot[slot_row.reshape(-1)], torch.arange(S, device=DEVICE))
    assert int((row_slot >= 0).sum()) == S


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("need", ["rows", "gate", "x"])
def test_one_input_needing_a_gradient(kernel, need):
    slot_row, row_slot = plan(7, 4, 2, seed=4)
    gen = torch.Generator().manual_seed(4)
    t = {"rows": torch.randn(row_slot.numel(), 6, generator=gen, dtype=torch.float64),
         "gate": torch.rand(7, 2, generator=gen, dtype=torch.float64),
         "x": torch.randn(7, 6, generator=gen, dtype=torch.float64)}
    t = {n: v.to(DEVICE).requires_grad_(n == need) for n, v in t.items()}
    out = combine_slots(t["rows"], slot_row, row_slot, t["gate"], kernel=kernel) + \
        dispatch_slots(t["x"], slot_row, row_slot, kernel=kernel)[slot_row[:, 0]]
    (got,) = torch.autograd.grad(out.sum(), t[need])
    ref = {n: v.detach().requires_grad_(n == need) for n, v in t.items()}
    M = one_hot(slot_row, row_slot.numel(), torch.float64)
    out = torch.einsum("tjp,tj,pw->tw", M, ref["gate"], ref["rows"]) + ref["x"]
    (want,) = torch.autograd.grad(out.sum(), ref[need])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
def test_strided_indices_and_a_non_finite_gate(kernel):
    slot_row, row_slot = plan(6, 4, 2, seed=5)
    assert bool((row_slot < 0).any())  # the plan has padding rows
    rows = torch.randn(row_slot.numel(), 5, dtype=torch.float64, device=DEVICE).requires_grad_()
    gate = torch.rand(6, 2, dtype=torch.float64, device=DEVICE)
    gate[0, 0] = float("inf")  # padding rows must not read it: 0 * inf is nan
    gate.requires_grad_()
    strided = torch.stack([row_slot, row_slot], 1)[:, 0]  # same values, stride 2
    assert not strided.is_contiguous()
    grads = []
    for rs in (row_slot, strided, row_slot.int()):
        y = combine_slots(rows, slot_row, rs, gate, kernel=kernel)
        grads.append(torch.autograd.grad(y[1:].sum(), (rows, gate)))
        assert torch.equal(grads[-1][0][row_slot < 0], torch.zeros_like(rows[row_slot < 0]))
    for other in grads[1:]:  # (token 0's own row: inf * 0, nan, as autograd's)
        for u, v in zip(grads[0], other):
            torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True)


def test_kernel_choice_is_checked(monkeypatch):
    import einc.kernels.slot_rows as slot_rows

    slot_row, row_slot = plan(3, 2, 1, seed=6)
    x = torch.randn(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="kernel must be one of"):
        dispatch_slots(x, slot_row, row_slot, kernel="cuda")
    monkeypatch.setattr(slot_rows, "_triton_usable", lambda t: False)
    with pytest.raises(RuntimeError, match="triton slot moves are unavailable"):
        dispatch_slots(x, slot_row, row_slot, kernel="triton")
    # "auto" then takes torch operations
    torch.testing.assert_close(dispatch_slots(x, slot_row, row_slot)[slot_row[:, 0]], x)


@pytest.mark.parametrize("kernel", KERNELS)
def test_inconsistent_operands_are_refused(kernel):
    """The kernels read by offset without masks: a wrong shape or index read out of bounds
    (on the interpreter, garbage with a plausible shape) where the torch moves raised."""
    from einc.errors import CompileError

    slot_row, row_slot = plan(3, 3, 2, seed=7)
    x = torch.randn(3, 8, dtype=torch.float64, device=DEVICE)
    rows = torch.randn(row_slot.numel(), 4, dtype=torch.float64, device=DEVICE)
    gate = torch.rand(3, 2, dtype=torch.float64, device=DEVICE)
    P, S = row_slot.numel(), slot_row.numel()
    far_row, far_slot = slot_row.clone(), row_slot.clone()
    far_row[1, 1], far_slot[0] = P, S
    cases = [
        (lambda: dispatch_slots(x.view(3, 2, 4), slot_row, row_slot, kernel), "must be 2-d"),
        (lambda: dispatch_slots(x[:2], slot_row, row_slot, kernel), "has 3 tokens, expected 2"),
        (lambda: dispatch_slots(x, far_row, row_slot, kernel), f"padded rows in \\[0, {P}\\)"),
        (lambda: dispatch_slots(x, slot_row, far_slot, kernel), f"slots in \\[0, {S}\\)"),
        (lambda: dispatch_slots(x, slot_row[:, :0], row_slot, kernel), "k >= 1"),
        (lambda: dispatch_slots(x, slot_row.double(), row_slot, kernel), "integer tensor"),
        (lambda: combine_slots(rows, slot_row, row_slot, gate[:2], kernel), "gate must have"),
        (lambda: combine_slots(rows, slot_row, row_slot, gate[:, :1], kernel), "gate must have"),
        (lambda: combine_slots(rows[:-1], slot_row, row_slot, gate, kernel),
         f"{P - 1} rows for {P} padded rows"),
        (lambda: combine_slots(rows, far_row, row_slot, gate, kernel), "padded rows in"),
    ]
    if DEVICE == "cpu":
        cases.append((lambda: dispatch_slots(x, slot_row.to("meta"), row_slot, kernel),
                      "slot_row is on meta"))
    for call, text in cases:
        with pytest.raises(CompileError, match=text):
            call()


def test_meta_tensors_take_the_torch_moves():
    """Under the interpreter any non-CUDA tensor counted as kernel-ready: meta tensors then
    failed with 'Cannot copy out of meta tensor'."""
    slot_row, row_slot = plan(5, 4, 2, seed=8)
    x = torch.randn(5, 6, device="meta")
    for validate in (False, True):  # the ranges are not read there
        out = dispatch_slots(x, slot_row.to("meta"), row_slot.to("meta"), validate=validate)
        assert out.device.type == "meta" and out.shape == (row_slot.numel(), 6)
