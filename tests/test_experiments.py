"""The scaling-law harness: FLOP accounting, frontiers and fits, tiny runs of each task,
resuming, the process-pool / Ray / DDP execution paths."""
import argparse
import json
import os
import socket

import numpy as np
import pytest
import torch
from torch import nn

import einc
from einc.experiments import (eval_steps, fit_power_law, frontier, job_key, model_flops,
                              run_job, scaling)
from einc.experiments import harness
from einc.experiments.ffmoe import FFMoE
from einc.experiments.harness import rerank, split_specs
from einc.experiments.tasks import make_task

TINY_LM = {"context": 16, "layers": 1, "head_dim": 16, "train_chars": 60_000,
           "val_chars": 8_000, "eval_windows": 8}


def _job(**kw):
    job = {"task": "regression", "spec": "btt", "width": 16, "seed": 0, "lr": 3e-3,
           "steps": 6, "batch": 32, "options": {"test_size": 128}, "eval_points": 3,
           "threads": 1}
    job.update(kw)
    return job


# -- FLOP accounting ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["dense", "btt", "kron", "lowrank(rank=d^(1/2))"])
def test_flops_are_the_analysis_times_tokens(spec):
    task = make_task("regression", test_size=16)
    model = task.build(spec, 64)
    count = model_flops(model)
    a_in = einc.analyze("dense", d_in=8, d_out=64)
    a_mid = einc.analyze(spec, d_in=64, d_out=64)
    a_out = einc.analyze("dense", d_in=64, d_out=1)
    assert count.forward == a_in.flops + 2 * a_mid.flops + a_out.flops
    assert count.backward == a_in.flops_backward + 2 * a_mid.flops_backward + a_out.flops_backward
    rec = run_job(_job(spec=spec, width=64, steps=4, batch=16))
    assert rec["flops_per_step"] == (count.forward + count.backward) * 16
    assert [c[1] for c in rec["curve"]] == [c[0] * rec["flops_per_step"] for c in rec["curve"]]


def test_moe_layers_count_active_flops():
    from einc.moe import BTTMoE
    moe = BTTMoE(64, 64, experts=8, k=2)
    count = model_flops(nn.Sequential(moe))
    report = einc.analyze("bttmoe(experts=8,k=2)", d_in=64, d_out=64)
    assert count.forward == report.moe["active_flops"] < report.flops
    assert count.backward == 2 * count.forward
    assert model_flops(moe).forward == count.forward  # the layer itself as the model
    # a layer factored otherwise than the analysis would (768 = 24 x 32, not 28 x 28 padded)
    odd = BTTMoE(768, 3072, experts=8, k=2)
    (g, a), (f, e) = odd.input_sizes, odd.output_sizes
    assert model_flops(nn.Sequential(odd)).forward == (
        2 * 2 * (g * a * f + f * g * e) + 2 * 768 * 8)
    ff = FFMoE(32, 64, experts=4, k=2)
    assert model_flops(nn.Sequential(ff)).forward == 2 * 32 * 4 + 2 * (2 * 2 * 32 * 64)


def test_charlm_adds_attention_flops():
    task = make_task("charlm", **TINY_LM)
    model = task.build("btt", 32)
    count = model_flops(model)
    structured = [layer for layer in count.layers if layer[0].startswith("blocks.")]
    assert len(structured) == 6 and all(layer[1] == "btt" for layer in structured)
    assert ("lm_head", "dense", 2 * 32 * 256, 4 * 32 * 256) in count.layers
    rec = run_job({"task": "charlm", "spec": "btt", "width": 32, "seed": 0, "lr": 1e-3,
                   "steps": 2, "batch": 4, "options": TINY_LM, "eval_points": 2, "threads": 1})
    fwd, bwd = task.extra_flops(32)
    assert rec["flops_per_step"] == (count.total + fwd + bwd) * 4 * 16


def test_rates_transfer_by_fan_in():
    from einc.experiments.harness import optimizer_groups
    task = make_task("charlm", **TINY_LM)
    for spec in ["btt", "ffmoe(experts=4,k=2)", "bttmoe(experts=4,k=2)"]:
        model = task.build(spec, 64)
        einc.experiments.tasks.add_moe_multipliers(model)
        base = {id(p): g["lr"] for g in optimizer_groups(model, 1e-2, None, 64)
                for p in g["params"]}
        scaled = {id(p): g["lr"] for g in optimizer_groups(model, 1e-2, 32, 64)
                  for p in g["params"]}
        mlp = model.blocks[0].mlp
        hidden = [mlp.w1, mlp.w2] if spec.startswith("ffmoe") else mlp.fc.factors()
        assert all(scaled[id(p)] == base[id(p)] / 2 for p in hidden)
        assert scaled[id(model.lm_head.weight)] == base[id(model.lm_head.weight)] == 1e-2
        assert scaled[id(model.tok.weight)] == 1e-2


# -- frontier and fit ----------------------------------------------------------------------------

def test_fit_recovers_a_power_law():
    rng = np.random.default_rng(0)
    c = np.geomspace(1e8, 1e12, 30)
    loss = 40.0 * c ** -0.3 * np.exp(rng.normal(0, 0.01, c.shape))
    fit = fit_power_law(c, loss)
    assert abs(fit["b"] - 0.3) < 3 * fit["b_err"] + 1e-3 and fit["b_err"] < 0.01
    offset = 40.0 * c ** -0.3 + 0.02
    fit = fit_power_law(c, offset, irreducible=True, bootstrap=20)
    assert abs(fit["b"] - 0.3) < 0.03 and abs(fit["c"] - 0.02) < 0.005


def test_frontier_of_width_curves_has_the_compute_optimal_exponent():
    # L(N, D) = N^-1/2 + D^-1/2 with C = N D: the compute-optimal loss falls as C^-1/4
    curves = []
    for n in np.geomspace(10, 1e5, 40):
        d = np.geomspace(1, 1e7, 80)
        curves.append((n * d, n ** -0.5 + d ** -0.5, n))
    front = frontier(curves, points=40)
    assert np.all(np.diff(front["loss"]) <= 1e-12)
    c, l = np.array(front["flops"]), np.array(front["loss"])
    keep = (c > 1e4) & (c < 1e10)
    fit = fit_power_law(c[keep], l[keep])
    assert abs(fit["b"] - 0.25) < 0.01
    # the envelope is the minimum of the curves wherever they overlap
    both = frontier([([1, 10, 100], [4, 2, 1]), ([10, 100], [3, 0.5])], grid=[10, 100])
    assert both["loss"] == [2, 0.5] and both["label"] == [0, 1]


def test_frontier_keeps_each_runs_last_point():
    """A run's end (usually its best point) fell between grid points, and the envelope
    carried an older, higher value past it."""
    front = frontier([([1, 10, 61], [5, 2, 0.9]), ([1, 100], [6, 1.5])], points=3)
    assert 61 in front["flops"]
    at = dict(zip(front["flops"], front["loss"]))
    assert at[61] == 0.9 and at[100] == 0.9 and front["label"][-1] == 0


def test_run_keys_tell_apart_what_the_readable_part_cannot():
    job = dict(task="regression", spec="lowrank(rank=d^(1/2))", width=16, seed=0, lr=3.1e-3,
               steps=5, batch=8)
    assert job_key(job) != job_key(dict(job, spec="lowrank(rank=d^1/2)"))  # one slug
    assert job_key(job) != job_key(dict(job, lr=3.104e-3))  # one 3-digit rate
    assert job_key(job) == job_key(dict(job))


def test_split_specs_and_eval_steps():
    assert split_specs('dense,lowrank(rank=d^(1/2)),bttmoe(experts=8,k=2)') == [
        "dense", "lowrank(rank=d^(1/2))", "bttmoe(experts=8,k=2)"]
    assert eval_steps(1000, 5)[-1] == 1000 and eval_steps(1000, 5)[0] == 10


# -- end-to-end, resuming ---------------------------------------------------------------------------

def test_regression_end_to_end_and_resume(tmp_path, monkeypatch):
    kw = dict(structures=["dense", "btt", "bttmoe(experts=4,k=2)"], widths=[16, 32], steps=5,
              batch=32, lr_sweep=[1e-3, 1e-2], options={"test_size": 64}, eval_points=3,
              out=str(tmp_path), progress=False)
    result = scaling("regression", **kw)
    assert len(result) == 6 and all(r["status"] == "ok" for r in result)
    assert len(result.sweep) == 6 and set(result.lrs) == set(kw["structures"])
    for name in ("runs.json", "runs.csv", "summary.json", "table.md", "frontier.png"):
        assert (tmp_path / name).exists()
    assert "exponent b" in result.table()
    assert len(json.loads((tmp_path / "runs.json").read_text())) == 6 + 3  # main + other rates

    def boom(job):
        raise AssertionError(f"ran {job_key(job)} again")
    monkeypatch.setattr(harness, "run_job", boom)
    again = scaling("regression", **kw)
    assert [r["curve"] for r in again] == [r["curve"] for r in result]
    with pytest.raises(AssertionError, match="again"):
        scaling("regression", **dict(kw, widths=[16, 64]))


def test_sweep_moves_to_a_width_the_structure_takes_and_failed_runs_rerun(tmp_path,
                                                                           monkeypatch):
    """kron cannot take width 7 (28.6% padding): its sweep failed there and the first rate
    was used unswept, anchored at 7. The sweep moves to 16. A failed run is not reused."""
    kw = dict(structures=["dense", "kron"], widths=[7, 16], steps=3, batch=16,
              lr_sweep=[1e-3, 1e-2], options={"test_size": 32}, eval_points=2,
              out=str(tmp_path), progress=False, plot=False)
    result = scaling("regression", **kw)
    kron = [r for r in result.sweep if r["spec"] == "kron"]
    assert {r["width"] for r in kron} == {7, 16}
    assert all(r["status"] == "error" for r in kron if r["width"] == 7)
    assert {r["lr_width"] for r in result if r["spec"] == "kron"} == {16}
    assert {r["lr_width"] for r in result if r["spec"] == "dense"} == {7}
    row = next(r for r in result.summary["structures"] if r["spec"] == "kron")
    assert row["omega"] is not None  # from a record that built
    ran = []
    real = harness.run_job
    monkeypatch.setattr(harness, "run_job", lambda job: ran.append(job["width"]) or real(job))
    scaling("regression", **kw)
    assert ran and set(ran) == {7}  # only kron's failed runs at 7 again


def test_charlm_end_to_end(tmp_path):
    result = scaling("charlm", structures=["dense", "btt", "bttmoe(experts=4,k=2)",
                                           "ffmoe(experts=4,k=2)"],
                     widths=[32], steps=3, batch=4, lr=1e-3, options=TINY_LM,
                     eval_points=2, progress=False, plot=False)
    assert [r["status"] for r in result] == ["ok"] * 4
    assert all(0 < r["final_loss"] < 8 for r in result)
    by = {r["spec"]: r for r in result}
    assert by["ffmoe(experts=4,k=2)"]["flops_forward_per_token"] < 1.2 * by["dense"][
        "flops_forward_per_token"]


def test_unknown_task_and_bad_structure():
    with pytest.raises(einc.UnknownNameError, match="known tasks"):
        scaling("nope", structures=["dense"], widths=[8], steps=1)
    rec = run_job(_job(spec="monarch(blocks=5)", width=16))
    assert rec["status"] == "error" and rec["error"]


def test_a_run_out_of_memory_is_an_error_record(monkeypatch):
    """A batch, model or test set too large for the memory was a torch traceback."""
    from einc.experiments.tasks import Regression

    def huge(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 3200000000000000 bytes")
    monkeypatch.setattr(Regression, "batch", huge)
    rec = run_job(_job(width=16, batch=32))
    assert rec["status"] == "error" and rec["curve"] == [] and rec["final_loss"] is None
    assert rec["error"].startswith("out of memory at width 16 with batch 32 ([enforce fail")
    assert "(--widths, --batch, --option)" in rec["error"]

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a lack of memory")
    monkeypatch.setattr(Regression, "batch", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        run_job(_job())


def test_seeds_option_reads_a_count_or_a_list():
    from einc.experiments.cli import _seeds
    # a lone number is a count, as an int seeds= of the Python API; a comma makes a list
    assert (_seeds("3"), _seeds("1000"), _seeds("1"), _seeds("7,"), _seeds("0,"),
            _seeds("0, 18446744073709551615")) == \
        (3, 1000, 1, [7], [0], [0, 2 ** 64 - 1])  # torch.manual_seed takes up to 2^64 - 1
    for text in ("0", "1001", "18446744073709551616,1", ",".join(["0"] * 1001)):
        with pytest.raises(argparse.ArgumentTypeError):
            _seeds(text)


# -- execution paths -------------------------------------------------------------------------------

def _curves(records):
    return [(r["spec"], r["width"], r["lr"], [c[2] for c in r["curve"]]) for r in records]


def test_process_pool_and_ray_give_the_same_records():
    kw = dict(structures=["dense", "btt"], widths=[16], steps=4, batch=32, lr=3e-3,
              options={"test_size": 64}, eval_points=2, progress=False, threads=1)
    serial = scaling("regression", **kw)
    pool = scaling("regression", workers=2, **kw)
    assert _curves(pool) == _curves(serial)
    ray = pytest.importorskip("ray")
    got = scaling("regression", workers=2, executor="ray", **kw)
    assert _curves(got) == _curves(serial)
    assert not ray.is_initialized()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, job, path):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    import torch.distributed as dist
    rec = run_job(job)
    if rank == 0:
        with open(path, "w") as fh:
            json.dump(rec, fh)
    # Both ranks leave together: a rank whose peer exits mid-teardown aborts inside gloo.
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_on_two_gloo_processes_matches_one_process(tmp_path):
    job = _job(spec="btt", width=16, steps=5, batch=32, eval_points=5)
    single = run_job(job)
    path = str(tmp_path / "rank0.json")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), job, path), nprocs=2)
    with open(path) as fh:
        ddp = json.load(fh)
    assert ddp["world_size"] == 2 and ddp["flops_per_step"] == single["flops_per_step"]
    np.testing.assert_allclose([c[2] for c in ddp["curve"]], [c[2] for c in single["curve"]],
                               rtol=1e-4)



@pytest.mark.parametrize("env,world,gpus,want", [
    ({}, 2, 0, "cpu"),                                              # no GPU: gloo on the CPU
    ({}, 2, 1, "cpu"),                                              # two processes, one GPU
    ({"LOCAL_RANK": "1"}, 2, 2, "cuda:1"),                          # one GPU each
    ({"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}, 8, 4, "cuda:3"),  # two nodes of four
    ({"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}, 8, 2, "cpu"),
    ({"LOCAL_RANK": "2", "SLURM_NTASKS_PER_NODE": "4"}, 8, 4, "cuda:2"),    # srun, 2 nodes
    ({"LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 4, 2, "cuda:1"),  # mpirun
])
def test_ddp_device_gives_each_process_its_own_gpu_or_the_cpu(env, world, gpus, want):
    assert harness.ddp_device(int(env.get("LOCAL_RANK", 0)), world, env, gpus) == \
        torch.device(want)

# -- arguments checked before any run -------------------------------------------------------------

def test_split_specs_keeps_quoted_specs_whole():
    assert split_specs("'i,io->o',btt") == ["i,io->o", "btt"]
    assert split_specs('dense, "i,io->o" ,lowrank(rank=4)') == ["dense", "i,io->o",
                                                                "lowrank(rank=4)"]
    assert split_specs("'(x)',\"a'b\"") == ["(x)", "a'b"]
    with pytest.raises(einc.SpecSyntaxError, match="unclosed"):
        split_specs("dense,'i,io->o")


def test_a_quoted_einsum_trains():
    result = scaling("regression", structures="'i,io->o',dense", widths=[8], steps=2,
                     batch=16, lr=1e-3, options={"test_size": 16}, eval_points=2,
                     progress=False, plot=False)
    assert [r["spec"] for r in result] == ["i,io->o", "dense"]
    assert all(r["status"] == "ok" for r in result)


@pytest.fixture
def no_runs(monkeypatch):
    def boom(job):
        raise AssertionError(f"ran {job_key(job)} before checking the arguments")
    monkeypatch.setattr(harness, "run_job", boom)


@pytest.mark.parametrize("kwargs,error,text", [
    ({"structures": ["btt(rank="]}, einc.SpecSyntaxError, "ends too early"),
    ({"structures": ["dense", "nope"]}, einc.UnknownNameError, "unknown preset"),
    ({"structures": ["ffmoe(experts=4,k=2)"]}, einc.UnknownNameError, "takes einc specs"),
    ({"structures": []}, einc.EincError, "no structures"),
    ({"widths": [0]}, einc.SizeError, "widths must be integers >= 1"),
    ({"widths": "abc"}, einc.SizeError, "widths must be integers >= 1"),
    ({"widths": {"btt": [8]}}, einc.SizeError, "no entry for 'dense'"),
    ({"steps": -1}, einc.SizeError, "steps must be an integer >= 1"),
    ({"steps": 0}, einc.SizeError, "steps must be an integer >= 1"),
    ({"seeds": 0}, einc.SizeError, "seeds"),
    ({"seeds": "abc"}, einc.SizeError, "seeds must be integers >= 0"),
    ({"batch": 0}, einc.SizeError, "batch must be an integer >= 1"),
    ({"workers": 0}, einc.SizeError, "workers must be an integer >= 1"),
    ({"eval_points": 0}, einc.SizeError, "eval_points must be an integer >= 1"),
    ({"lr": 0}, einc.SizeError, "lr must be a number > 0"),
    ({"lr_sweep": "abc"}, einc.SizeError, "lr_sweep"),
    ({"lr": 1e-3, "lr_sweep": [1e-3, 1e-2]}, einc.EincError, "not both"),
    ({"options": {"bogus": 1}}, einc.UnknownNameError, "unknown option 'bogus'"),
    ({"options": {"hidden": "abc"}}, einc.SizeError, "hidden of the regression task"),
    # upper bounds: these failed to allocate, or overflowed, once training started
    ({"steps": 10 ** 20}, einc.SizeError,
     r"steps must be an integer >= 1 and <= 1,000,000,000, got ~1e\+20"),
    ({"seeds": 10 ** 11}, einc.SizeError, r"seeds \(a count\) must be an integer >= 1 and "
                                          "<= 1,000"),
    ({"seeds": [0, 2 ** 64]}, einc.SizeError, "seeds must be integers >= 0 and <= 18,446,744,073,709,551,615"),
    ({"seeds": list(range(1001))}, einc.SizeError, "give at most 1,000"),
    ({"batch": 10 ** 14}, einc.SizeError, "batch must be an integer >= 1 and <= 1,048,576"),
    ({"eval_points": 10 ** 14}, einc.SizeError, "eval_points must be an integer >= 1 and "
                                                "<= 10,000"),
    ({"widths": [2 ** 32]}, einc.SizeError, "widths must be integers >= 1 and <= 1,048,576"),
    ({"widths": {"dense": [8], "btt": [8, 2 ** 32]}}, einc.SizeError,
     "the widths of 'btt' must be integers >= 1 and <= 1,048,576"),
    # task options: these ran on (hidden layers by the hundred million)
    ({"options": {"hidden": 10 ** 8}}, einc.SizeError,
     "option hidden of the regression task takes an integer >= 1 and <= 10,000"),
    ({"options": {"test_size": 2 ** 40}}, einc.SizeError, "<= 1,048,576"),
    # raw TypeErrors from os.fspath and dict(), or silently read by their truth
    ({"out": 1}, einc.EincError, "the output folder must be a path .* got 1"),
    ({"options": [1]}, einc.EincError, "options of the regression task are a dict"),
    ({"irreducible": "x"}, einc.EincError, "irreducible must be True or False"),
    ({"plot": "x"}, einc.EincError, "plot must be True or False"),
    ({"progress": 3}, einc.EincError, "progress must be True, False or None"),
])
def test_scaling_checks_its_arguments_before_any_run(no_runs, kwargs, error, text):
    kw = dict(structures=["dense", "btt"], widths=[8], steps=2, progress=False)
    with pytest.raises(error, match=text):
        scaling("regression", **dict(kw, **kwargs))


@pytest.mark.parametrize("spec,text", [
    # a raw ValueError from the layer, and a ZeroDivisionError, once the first run started
    ("ffmoe(experts=4,k=8)", "ffmoe takes k from 1 to experts = 4, got 8"),
    ("ffmoe(experts=0,k=0)", "ffmoe takes experts from 1 to 1,048,576, got 0"),
    ("ffmoe(k=9)", "ffmoe takes k from 1 to experts = 8, got 9"),
    # width 8 (ratio 4) leaves 32 // 64 = 0 hidden units: was a failed run among good ones
    ("ffmoe(experts=64,k=64)", "at width 8 leaves its experts no hidden units"),
])
def test_ffmoe_options_are_checked_before_any_run(no_runs, spec, text):
    with pytest.raises(einc.SizeError, match=text):
        scaling("charlm", structures=[spec], widths=[8], steps=2, progress=False)


def test_the_largest_teacher_seed_trains():
    """teacher_seed = 2^64 - 1, the documented maximum, overflowed manual_seed (seed + 1)."""
    rec = run_job(_job(options={"test_size": 16, "teacher_seed": 2 ** 64 - 1}, steps=1))
    assert rec["status"] == "ok"


def test_an_option_at_its_default_is_the_same_run():
    """--option hidden=2 (the default) got a new key and retrained every run."""
    assert job_key(_job(options={"hidden": 2})) == job_key(_job(options={}))
    assert job_key(_job(options={"hidden": 3})) != job_key(_job(options={}))


def test_the_progress_bar_ends_at_its_total(capsys):
    """The bar started from a total of 1 that later totals were added to, so it never
    reached 100% (10 of 11 steps)."""
    bar = harness._Bar(0, True)
    bar.total += 10
    for _ in range(10):
        bar(1)
    assert "100.0%" in capsys.readouterr().err.rsplit("\r", 1)[-1]


def test_model_flops_takes_a_module():
    with pytest.raises(einc.CompileError, match="model_flops takes a torch.nn.Module, got NoneType"):
        model_flops(None)  # AttributeError: 'NoneType' object has no attribute 'named_modules'


def test_rerank_names_a_bad_candidate(no_runs):
    with pytest.raises(einc.EincError, match="rerank takes specs or einc.search records"):
        rerank([{}])  # KeyError: 'spec'
    for bad in ("dense", None):  # the characters as specs ("unknown preset 'd'"); TypeError
        with pytest.raises(einc.EincError, match="rerank takes a list of specs"):
            rerank(bad)


def test_ffmoe_layer_and_hidden_width_are_checked():
    with pytest.raises(einc.CompileError, match="positive integer experts, got 0"):
        FFMoE(8, 8, experts=0, k=0)
    with pytest.raises(einc.CompileError, match="k from 1 to experts = 2, got 3"):
        FFMoE(8, 8, experts=2, k=3)
    task = make_task("charlm", **dict(TINY_LM, ratio=1, head_dim=4))
    with pytest.raises(einc.SizeError, match="no hidden units .* k must be at most 4"):
        task.build("ffmoe(experts=8,k=8)", 4)


@pytest.mark.parametrize("options,widths,text", [
    ({"layers": 10 ** 8}, [8], "option layers of the charlm task takes an integer >= 1 and "
                               "<= 10,000"),
    # a width its heads do not divide: refused before any run, not when building
    ({"head_dim": 32}, [64, 100], "width 100 does not split into its 3 heads"),
    ({"head_dim": 3}, [8, 10], "width 10 does not split into its 3 heads"),
])
def test_charlm_options_and_heads_are_checked_before_any_run(no_runs, options, widths, text):
    with pytest.raises(einc.SizeError, match=text):
        scaling("charlm", structures=["dense"], widths=widths, steps=2, progress=False,
                options=options)


def test_unknown_task_option_lists_the_options():
    with pytest.raises(einc.UnknownNameError) as e:
        make_task("regression", bogus=1)
    assert all(name in str(e.value) for name in ("hidden", "teacher_width", "test_size"))


def test_output_folder_is_checked_before_any_run(no_runs, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    kw = dict(structures=["dense"], widths=[8], steps=2, progress=False)
    with pytest.raises(einc.EincError, match="exists and is not a folder"):
        scaling("regression", out=str(afile), **kw)
    with pytest.raises(einc.EincError, match="is not a folder"):
        scaling("regression", out=str(afile / "sub"), **kw)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "runs").write_text("")
    with pytest.raises(einc.EincError, match="'runs'"):
        scaling("regression", out=str(tmp_path / "out"), **kw)


def test_when_every_run_fails_the_first_error_is_reported(tmp_path):
    # monarch(blocks=5) parses but needs too much padding at width 16: every run fails
    with pytest.raises(einc.EincError, match=r"every run failed; the first "
                       r"\(monarch\(blocks=5\) at width 16\): .*padding"):
        scaling("regression", structures=["monarch(blocks=5)"], widths=[16], steps=2,
                lr=1e-3, options={"test_size": 16}, eval_points=2, progress=False,
                out=str(tmp_path))
    assert not (tmp_path / "frontier.png").exists()
    assert len(list((tmp_path / "runs").iterdir())) == 1  # the failed run is still on disk


TINY = ["--widths", "8", "--steps", "2", "--lr", "1e-3", "--eval-points", "2",
        "--option", "test_size=16", "--no-progress"]


@pytest.mark.parametrize("args,text", [
    (["--widths", "abc"], "argument --widths: takes comma-separated integers >= 1"),
    (["--widths", "0"], "argument --widths"),
    (["--seeds", "abc"], "argument --seeds"),
    (["--lr-sweep", "abc"], "argument --lr-sweep: takes comma-separated numbers > 0"),
    (["--option", "noequals"], "argument --option: takes KEY=VALUE"),
    (["--option", "bogus=1"], "unknown option 'bogus' for the regression task"),
    (["--batch", "0"], "argument --batch: takes an integer >= 1"),
    (["--workers", "0"], "argument --workers: takes an integer >= 1"),
    (["--eval-points", "0"], "argument --eval-points: takes an integer >= 1"),
    (["--steps", "-1"], "argument --steps: takes an integer >= 1"),
    (["--seeds", "100000000000"], "argument --seeds: takes a count from 1 to 1,000"),
    (["--seeds", "0,99999999999999999999"], "seeds >= 0 and <= 18,446,744,073,709,551,615"),
    (["--batch", "100000000000000"], "argument --batch: takes an integer >= 1 and <= 1,048,576"),
    (["--eval-points", "100000000000000"], "argument --eval-points: takes an integer >= 1 and "
                                           "<= 10,000"),
    (["--steps", "100000000000000000000"], "argument --steps: takes an integer >= 1 and "
                                           "<= 1,000,000,000"),
    (["--widths", "64,4294967296"], "argument --widths: takes comma-separated integers >= 1 "
                                    "and <= 1,048,576"),
    (["--structures", "btt(rank="], "ends too early"),
    (["--out", "AFILE"], "exists and is not a folder"),
    (["--out", ""], "the output folder is an empty path"),  # was taken for "no folder"
    (["--ray-address", "auto"], "applies only with the ray executor"),  # was ignored
    (["--out", "TAKEN"], "holds 'table.md', which is not a file"),
])
def test_scaling_cli_refuses_bad_arguments(no_runs, run_einc, tmp_path, args, text):
    afile = tmp_path / "afile"
    afile.write_text("")
    (tmp_path / "taken" / "table.md").mkdir(parents=True)
    args = [str(afile) if a == "AFILE" else str(tmp_path / "taken") if a == "TAKEN" else a
            for a in args]
    rc, out, err = run_einc("experiment", "scaling", *TINY, *args)
    assert rc == 2 and text in err and out == "" and "training:" not in err  # no plan line


def _subparser(parser, name):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def test_scaling_help_shows_every_default():
    from einc import _commands  # noqa: F401  (registers the sub-commands)
    from einc.cli import build_parser

    scaling_parser = _subparser(_subparser(build_parser(), "experiment"), "scaling")
    for action in scaling_parser._actions:
        if action.dest != "help":
            assert "default" in action.help, action.option_strings
    assert "Without arguments: task regression, structures dense,btt, widths 64,128,256, 1000 " \
        "steps" in " ".join(scaling_parser.description.split())


def test_scaling_says_what_it_trains_before_training(monkeypatch, run_einc, capsys):
    """Without arguments it started a long run on hidden defaults, in silence."""
    class Started(Exception):
        pass

    def start(**kwargs):
        raise Started
    monkeypatch.setattr(harness, "scaling", start)
    with pytest.raises(Started):
        run_einc("experiment", "scaling")
    err = capsys.readouterr().err
    assert err == ("training: task regression; structures dense, btt; widths 64, 128, 256; "
                   "1,000 steps per run (--help lists every option and its default)\n")


@pytest.mark.parametrize("args,text", [
    (["--train-widths", "abc"], "argument --train-widths"),
    (["--train-steps", "0"], "argument --train-steps: takes an integer >= 1"),
    (["--train-steps", "100000000000000000000"], "argument --train-steps: takes an integer >= 1 "
                                                 "and <= 1,000,000,000"),
    (["--train-widths", "4294967296"], "argument --train-widths: takes comma-separated integers "
                                       ">= 1 and <= 1,048,576"),
    (["--train-seeds", "100000000000"], "argument --train-seeds: takes a count from 1 to 1,000"),
    (["--train-batch", "100000000000000"], "argument --train-batch: takes an integer >= 1 and "
                                           "<= 1,048,576"),
    (["--train-eval-points", "100000"], "argument --train-eval-points"),
    (["--train-option", "bogus=1"], "unknown option 'bogus'"),
    (["--train-out", "AFILE"], "exists and is not a folder"),
])
def test_search_train_arguments_are_checked_before_searching(no_runs, run_einc, tmp_path, args,
                                                             text):
    afile = tmp_path / "afile"
    afile.write_text("")
    args = [str(afile) if a == "AFILE" else a for a in args]
    rc, out, err = run_einc("search", "--d", "64", "--k", "4", "--top", "2",
                         "--train", "regression", *args)
    assert rc == 2 and text in err and out == ""  # nothing searched or printed


@pytest.mark.parametrize("fmt", ["--json", "--csv"])
def test_search_train_keeps_json_and_csv_machine_readable(run_einc, tmp_path, fmt):
    """The side-by-side rankings were printed after the records, which made the JSON and
    CSV unreadable; there each record carries its trained rank and loss instead."""
    import csv
    import io
    import json

    rc, out, err = run_einc("search", "--d", "16", "--top", "2", fmt, "--no-progress",
                            "--train", "regression", "--train-widths", "4", "--train-steps",
                            "2", "--train-lr", "1e-3", "--train-out", str(tmp_path / "runs"))
    assert rc == 0, err
    rows = json.loads(out) if fmt == "--json" else list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 2
    assert sorted(int(r["trained_rank"]) for r in rows) == [1, 2]
    assert all(float(r["trained_loss"]) > 0 for r in rows)
    assert "analytic ranking" not in out


def test_search_train_refuses_every_row(no_runs, run_einc):
    rc, out, err = run_einc("search", "--d", "16", "--top", "0", "--train", "regression")
    assert rc == 2 and out == "" and "--top 0 would show every candidate" in err


def test_search_train_with_nothing_to_train_leaves_no_folder(no_runs, run_einc, tmp_path):
    """A budget no row meets trains nothing: the --train-out folder made for the runs goes
    again (as --plot's does), instead of staying behind empty."""
    out = tmp_path / "runs"
    rc, stdout, err = run_einc("search", "--d", "16", "--top", "2", "--max-flops", "1",
                               "--train", "regression", "--train-out", str(out))
    assert rc == 0 and not out.exists()


def _record(spec, width, flops_per_step, losses):
    curve = [[i + 1, flops_per_step * (i + 1), l] for i, l in enumerate(losses)]
    return {"spec": spec, "width": width, "curve": curve, "flops_per_step": flops_per_step,
            "steps": len(losses), "lr": 1e-3, "status": "done", "best_loss": min(losses),
            "omega": 0.0, "psi": 1.0, "nu": 1.0}


def test_frontiers_without_a_common_compute_are_not_ranked():
    """The equal-compute point was the smallest frontier end: a structure whose frontier
    starts past it had no loss there and was left out of the ranking unnoted (lowrank
    ranked first, the far better dense last)."""
    from einc.experiments.harness import _NO_COMMON, format_table, summarize

    cheap = _record("lowrank(rank=1)", 256, 1e4, [2.0, 1.6, 1.4, 1.3])
    dear = _record("dense", 256, 1e7, [0.9, 0.6, 0.4, 0.3])
    apart = summarize([cheap, dear], [256])
    assert apart["common_flops"] is None and apart["ranking"] == []
    assert _NO_COMMON in format_table(apart)
    near = _record("dense", 256, 2e3, [0.9, 0.6, 0.4, 0.3, 0.2, 0.15, 0.1, 0.08])
    both = summarize([cheap, near], [256])
    assert both["common_flops"] == 1.6e4 and both["ranking"] == ["dense", "lowrank(rank=1)"]
    assert _NO_COMMON not in format_table(both)


def test_python_structure_lists_are_stripped_as_the_command_lines_are():
    from einc.experiments.harness import check_scaling

    a = check_scaling(structures=["dense", " dense", "btt "], widths={" dense": [16], "btt": [16]},
                      lr={"dense ": 1e-3, "btt": 2e-3})
    assert a["structures"] == ["dense", "btt"] and a["per"] == {"dense": [16], "btt": [16]}
    assert a["lr"] == {"dense": 1e-3, "btt": 2e-3}


@pytest.mark.parametrize("a,b,c", [(50, 0.2, 0.5), (5, 0.05, 2.0), (3, 0.1, 1.0)])
def test_the_irreducible_fit_recovers_an_exact_power_law(a, b, c):
    """The offset was taken from a fixed grid: b came out 0.2013 for 0.2 and 0.0492 for
    0.05, 2-3 times the bootstrap error off."""
    from einc.experiments.fit import fit_power_law

    C = np.geomspace(1e6, 1e12, 30)
    f = fit_power_law(C, a * C ** (-b) + c, irreducible=True, bootstrap=20)
    assert f["a"] == pytest.approx(a, rel=1e-6) and f["b"] == pytest.approx(b, rel=1e-6)
    assert f["c"] == pytest.approx(c, rel=1e-6)
