"""The scaling-law harness: train every (structure, width, seed) by one protocol and compare
their compute-optimal frontiers.

Protocol, the same for every structure:

* Adam on :func:`einc.param_groups` (each structured factor at ``base_lr x`` its muP-style
  multiplier; a BTT-MoE core likewise), linear warm-up over the first 2% of the steps, then
  a constant rate, so every step of a run is a point on its loss-compute curve.
* The base rate: each structure is trained at its smallest width w0 with every rate of the
  sweep; the rate with the lowest final held-out loss is used at every larger width w,
  where the factors of the structured layers get ``base x multiplier x w0 / w`` (muP for
  Adam: each factor's rate goes as 1 / its own fan-in); the other parameters (input and
  output layers, embeddings, biases, norms, routers) keep the base rate. Pass ``lr`` to
  skip the sweep (the rate is then taken at the smallest width).
* MoE layers add ``aux_weight x`` their auxiliary losses to the training loss.
* Training FLOPs: :mod:`einc.experiments.flops` (forward + backward per token, from the
  analysis, x tokens); evaluation is not counted.

Each finished run is a JSON file under ``OUT/runs/``; a later call with the same ``out`` loads
it instead of training again.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import sys
import time

import numbers

import numpy as np

from ..errors import EincError, Pos, SizeError, SpecSyntaxError, UnknownNameError
from ..files import sweep_temporaries, write_output
from ..space.checks import (MAX_BATCH, MAX_EVAL_POINTS, MAX_SEED, MAX_SEEDS, MAX_STEPS,
                            MAX_TRAIN_WIDTH, bounds_text, check_targets, prepare_folder,
                            flag, remove_folders, shown)
from ..syntax import parse
from . import fit as fitting
from .executors import EXECUTORS, dist_env, run_jobs
from .flops import model_flops, slug
from .tasks import (TASKS, add_moe_multipliers, check_options, ffmoe_options, make_task,
                    task_options, taxonomy)

WARMUP_FRACTION = 0.02
DEFAULT_AUX_WEIGHT = 0.01


# -- one run ---------------------------------------------------------------------------------

def eval_steps(steps: int, points: int) -> list[int]:
    """Log-spaced evaluation steps from about steps/100 to steps (always including steps)."""
    steps = int(steps)
    if steps <= 0:
        return []
    start = max(1, steps // 100)
    got = {int(round(s)) for s in np.geomspace(start, steps, max(int(points), 2))}
    return sorted(got | {steps})


def job_key(job: dict) -> str:
    """A run's file name: readable fields, and a digest of everything that tells runs
    apart exactly (two specs can share a slug, two rates their 3 digits)."""
    # an option given at its default value is the same run as one left out
    defaults = task_options(job["task"])
    opts = json.dumps({k: v for k, v in (job.get("options") or {}).items()
                       if k not in defaults or defaults[k] != v}, sort_keys=True)
    digest = hashlib.sha1(f"{opts}|{job.get('aux_weight')}|{job.get('eval_points')}|"
                          f"{job.get('lr_width')}|{job['spec']}|{float(job['lr'])!r}"
                          .encode()).hexdigest()[:8]
    return (f"{job['task']}_{slug(str(job['spec']))}_w{job['width']}_s{job['seed']}"
            f"_lr{job['lr']:.3g}_n{job['steps']}_b{job['batch']}_{digest}")


def _aux_loss(model):
    total = None
    for m in model.modules():
        aux = getattr(m, "aux_loss", None)
        if aux is not None and hasattr(aux, "backward"):
            total = aux if total is None else total + aux
    return total


def optimizer_groups(model, lr: float, lr_width: int | None, width: int) -> list[dict]:
    """``einc.param_groups(model, lr)`` with the muP width transfer: a factor's Adam rate
    goes as 1 / its fan-in, so from the sweep's width ``lr_width`` to ``width`` the factors
    of every layer with ``lr_multipliers`` get ``lr_width / width`` more (param_groups'
    multipliers already carry each factor's fan-in relative to a dense layer of its
    width). Everything else keeps ``lr``."""
    from ..runtime import param_groups
    groups = param_groups(model, lr)
    if lr_width:
        hidden = {id(getattr(m, a)) for m in model.modules()
                  if callable(getattr(m, "lr_multipliers", None)) for a in m.lr_multipliers()}
        for g in groups:
            if all(id(p) in hidden for p in g["params"]):
                g["lr"] *= float(lr_width) / int(width)
    return groups


def run_job(job: dict) -> dict:
    """Train one (structure, width, seed, rate) and return its record (a plain dict).

    Under torchrun (``WORLD_SIZE`` > 1) the run is data-parallel: the process group is
    started if needed (NCCL with CUDA, else gloo), the model is wrapped in
    DistributedDataParallel and each process takes its slice of every global batch, so the
    run matches a one-process run on the same data.
    """
    import torch

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    rank, world = dist_env()
    device = torch.device("cpu")
    if world > 1:
        import torch.distributed as dist
        device = ddp_device(rank, world, os.environ,
                            torch.cuda.device_count() if torch.cuda.is_available() else 0)
        if not dist.is_initialized():
            dist.init_process_group("gloo" if device.type == "cpu" else "nccl")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    start = time.perf_counter()
    rec = {k: job[k] for k in ("task", "spec", "width", "seed", "lr", "steps", "batch")}
    rec.update(key=job_key(job), role=job.get("role", "main"), options=job.get("options") or {},
               lr_width=job.get("lr_width"), world_size=world, status="ok")
    try:
        return _train(job, rec, device, rank, world, start)
    except (MemoryError, RuntimeError) as e:
        # a model, batch or test set too large: torch's CPU allocator raises a plain
        # RuntimeError ("can't allocate memory"); any other error is a bug and propagates
        if not (isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "allocate" in str(e)):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        rec.update(status="error", curve=[], final_loss=None, best_loss=None,
                   wall_s=time.perf_counter() - start,
                   error=f"out of memory at width {job['width']} with batch {job['batch']} "
                   f"({first}); try smaller widths, batch or task options (--widths, --batch, "
                   "--option)")
        return rec


#: variables that launchers set to the number of processes on this node
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE")


def ddp_device(rank: int, world: int, env, gpus: int):
    """The device of one data-parallel process: its own GPU (cuda:LOCAL_RANK, NCCL) when
    every process on this node has one, else the CPU (gloo), with a warning where GPUs are
    present. The processes per node come from the launcher (torchrun, Slurm, Open MPI; all
    of ``world`` on one node without one), so ranks on alike nodes decide alike: two
    processes on one GPU do not both take it, nor one take a cuda:1 that is not there."""
    import torch

    per_node = next((int(env[v]) for v in LOCAL_SIZE_VARS if str(env.get(v, "")).isdigit()),
                    world)
    if 0 < per_node <= gpus:
        return torch.device("cuda", int(env.get("LOCAL_RANK", rank)))
    if gpus:
        print(f"einc: {per_node} data-parallel processes on this node and {gpus} visible "
              f"GPU(s): training on the CPU (gloo). Give each process its own GPU, or set "
              f"LOCAL_WORLD_SIZE to the processes per node.", file=sys.stderr)
    return torch.device("cpu")


def _train(job, rec, device, rank, world, start) -> dict:
    """:func:`run_job` once the device is chosen: build, train, evaluate."""
    import torch

    try:
        rec.update(taxonomy(job["spec"], job["width"]))
        task = make_task(job["task"], **(job.get("options") or {}))
        torch.manual_seed(int(job["seed"]))
        model = task.build(job["spec"], int(job["width"]))
    except EincError as e:
        rec.update(status="error", error=str(e), curve=[], final_loss=None, best_loss=None,
                   wall_s=time.perf_counter() - start)
        return rec
    add_moe_multipliers(model)
    count = model_flops(model)
    extra_f, extra_b = task.extra_flops(int(job["width"]))
    fwd, bwd = count.forward + extra_f, count.backward + extra_b
    tokens = int(job["batch"]) * task.tokens_per_example
    per_step = (fwd + bwd) * tokens
    rec.update(params=sum(p.numel() for p in model.parameters()),
               flops_forward_per_token=fwd, flops_backward_per_token=bwd,
               tokens_per_step=tokens, flops_per_step=per_step,
               layers=[list(layer) for layer in count.layers])

    if device.type != "cpu":
        model.to(device)
    opt = torch.optim.Adam(optimizer_groups(model, float(job["lr"]), job.get("lr_width"),
                                            int(job["width"])))
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, find_unused_parameters=_aux_loss(model) is not None
                                      or any(hasattr(m, "aux_loss") for m in model.modules()))
    steps, aux_weight = int(job["steps"]), float(job.get("aux_weight", DEFAULT_AUX_WEIGHT))
    warmup = max(1, int(WARMUP_FRACTION * steps))
    evals = set(eval_steps(steps, job.get("eval_points", 24)))
    curve, train_loss, hook = [], None, job.get("_hook")
    for step in range(1, steps + 1):
        scale = min(1.0, step / warmup)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * scale
        batch = [t.to(device) for t in task.batch(step, int(job["batch"]), int(job["seed"]),
                                                  rank, world)]
        loss = task.loss(net, batch)
        train_loss = float(loss.detach())
        aux = _aux_loss(model)
        if aux is not None:
            loss = loss + aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in evals:
            value = task.evaluate(model)
            curve.append([step, step * per_step, value])
            if not math.isfinite(value) or not math.isfinite(train_loss):
                rec["status"] = "diverged"
                break
        if hook is not None:
            hook(1)
    losses = [c[2] for c in curve if math.isfinite(c[2])]
    rec.update(curve=curve, final_loss=curve[-1][2] if curve else None,
               best_loss=min(losses) if losses else None, train_loss=train_loss,
               wall_s=time.perf_counter() - start)
    return rec


# -- many runs --------------------------------------------------------------------------------

class _Bar:
    """Progress over all steps of all runs, on stderr."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled
        self.start, self.last, self.note = time.perf_counter(), 0.0, ""

    def __call__(self, n: int = 1, note: str | None = None):
        self.done += n
        if note is not None:
            self.note = note
        now = time.perf_counter()
        if self.enabled and (now - self.last > 0.5 or self.done >= self.total):
            self.last = now
            frac = min(self.done / self.total, 1.0) if self.total else 1.0
            el = now - self.start
            eta = el / frac - el if frac > 0 else 0.0
            bar = "#" * int(28 * frac) + "-" * (28 - int(28 * frac))
            sys.stderr.write(f"\r[{bar}] {frac:6.1%} {el:6.0f}s eta {eta:5.0f}s  "
                             f"{self.note[:40]:<40}")
            sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


class ScalingResult(list):
    """The records of the main runs (a list of dicts), with the sweep's records, the rate
    chosen per structure, each structure's frontier and fit, and the summary table."""

    def __init__(self, records, *, sweep, lrs, summary, files):
        super().__init__(records)
        self.sweep, self.lrs, self.summary, self.files = sweep, lrs, summary, files

    @property
    def frontiers(self) -> dict:
        return {s["spec"]: s["frontier"] for s in self.summary["structures"]}

    @property
    def fits(self) -> dict:
        return {s["spec"]: s["fit"] for s in self.summary["structures"]}

    def table(self) -> str:
        return format_table(self.summary)


def split_specs(text: str) -> list[str]:
    """Split a comma-separated list at top-level commas (``lowrank(rank=4),btt``).

    Commas inside parentheses or brackets stay in their item, and so do commas inside
    quotes: a quoted item is one item and loses its quotes, so a compact einsum can be
    given as ``dense,'i,io->o'`` (or ``"i,io->o"``). An unclosed quote is an error."""
    out, depth, cur, quote, opened = [], 0, "", None, 0
    for i, ch in enumerate(text):
        if quote is not None:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote, opened = ch, i
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0 and quote is None:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if quote is not None:
        raise SpecSyntaxError(f"unclosed {quote} quote in the list of specs", text,
                              Pos.at(text, opened))
    if cur.strip():
        out.append(cur.strip())
    return [x[1:-1] if len(x) > 1 and x[0] == x[-1] and x[0] in "'\"" else x for x in out]


# -- checking the arguments of a scaling run, before anything is trained ------------------------

def _int_value(v):
    """``v`` as an int when it is integer-valued (int, numpy int, 3.0, "3"), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            return None
    return None


def _count(value, what: str, minimum: int = 1, most: int | None = None) -> int:
    v = _int_value(value)
    if v is None or v < minimum or (most is not None and v > most):
        raise SizeError(f"{what} must be an integer {bounds_text(minimum, most)}, "
                        f"got {shown(value)}")
    return v


def _items(value) -> list:
    if isinstance(value, str):
        return split_specs(value)
    if isinstance(value, numbers.Number):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def _ints(value, what: str, minimum: int = 1, most: int | None = None) -> list[int]:
    got = [_int_value(v) for v in _items(value)]
    if not got or any(v is None or v < minimum or (most is not None and v > most)
                      for v in got):
        raise SizeError(f"{what} must be integers {bounds_text(minimum, most)}, "
                        f"got {shown(value)}")
    return got


def _number(value, what: str, positive: bool = True) -> float:
    try:
        v = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise SizeError(f"{what} must be a number {'>' if positive else '>='} 0, got {value!r}")
    return v


def _check_structure(spec: str, task: str) -> None:
    """Parse ``spec`` with einc's parser (or read an ``ffmoe(...)`` baseline), so that a
    misspelt structure fails before any run."""
    if ffmoe_options(spec) is not None:  # raises for bad ffmoe options
        if not getattr(TASKS[task], "accepts_ffmoe", False):
            raise UnknownNameError(f"{spec!r} is a transformer feed-forward MoE baseline; the "
                                   f"{task} task takes einc specs", spec)
        return
    parse(spec)


def check_scaling(task: str = "regression", structures=None, widths=(64, 128, 256),
                  steps=1000, seeds=(0,), batch=None, lr=None, lr_sweep=None, workers=1,
                  executor: str = "local", options=None, eval_points=24, threads=None,
                  aux_weight=DEFAULT_AUX_WEIGHT, ray_address=None) -> dict:
    """Check and normalise the arguments of :func:`scaling` without training anything;
    raise an :class:`~einc.errors.EincError` for the first bad one. ``structures=None``
    checks everything but the structures (``einc search --train`` checks its options
    before it knows its candidates)."""
    if task not in TASKS:
        make_task(task)  # raises the error that lists the tasks
    cls = TASKS[task]
    if structures is not None:
        # stripped, as the command line's comma-separated list is: " dense" is dense
        structures = list(dict.fromkeys(str(s).strip() for s in _items(structures)))
        if not structures:
            raise EincError("no structures to train")
        for s in structures:
            _check_structure(s, task)
    if isinstance(widths, dict):
        widths = {str(s).strip(): v for s, v in widths.items()}
        missing = [s for s in structures or [] if s not in widths]
        if missing:
            raise SizeError(f"widths has no entry for {', '.join(map(repr, missing))}")
        per = {s: sorted(set(_ints(widths[s], f"the widths of {s!r}", 1, MAX_TRAIN_WIDTH)))
               for s in structures or []}
        every = sorted({w for ws in per.values() for w in ws})
    else:
        every = sorted(set(_ints(widths, "widths", 1, MAX_TRAIN_WIDTH)))
        per = dict.fromkeys(structures or [], every)
    if isinstance(seeds, numbers.Number) and not isinstance(seeds, bool):
        seeds = list(range(_count(seeds, "seeds (a count)", 1, MAX_SEEDS)))
    else:
        seeds = list(dict.fromkeys(_ints(seeds, "seeds", 0, MAX_SEED)))  # each seed once
        if len(seeds) > MAX_SEEDS:
            raise SizeError(f"seeds holds {len(seeds):,} seeds: give at most {MAX_SEEDS:,}")
    if isinstance(lr, dict):
        lr = {str(s).strip(): v for s, v in lr.items()}
        missing = [s for s in structures or [] if s not in lr]
        if missing:
            raise SizeError(f"lr has no rate for {', '.join(map(repr, missing))}")
        lr = {s: _number(v, f"the rate of {s!r}") for s, v in lr.items()}
    elif lr is not None:
        lr = _number(lr, "lr")
    rates = None
    if lr is not None and lr_sweep is not None:
        raise EincError("give one rate for every structure (lr; --lr, or --train-lr in einc "
                        "search) or the rates to sweep (lr_sweep; --lr-sweep, --train-lr-sweep), "
                        "not both")
    if lr_sweep is not None:
        rates = [_number(r, "every lr_sweep rate") for r in _items(lr_sweep)]
        if not rates:
            raise SizeError(f"lr_sweep must hold rates > 0, got {lr_sweep!r}")
    if executor not in EXECUTORS:
        raise UnknownNameError(f"unknown executor {executor!r}; known executors: "
                               f"{', '.join(EXECUTORS)}")
    if ray_address is not None and executor != "ray":  # it would be silently unused
        raise EincError(f"ray_address (--ray-address, or --train-ray-address in einc search) "
                        f"applies only with the ray executor (--executor ray, "
                        f"--train-executor ray), not {executor!r}")
    options = check_options(task, options or {})
    if hasattr(cls, "check_widths"):  # the task's own rules, e.g. widths that split into heads
        # without structures (einc search --train, before its search) every width still checks
        cls.check_widths(per or {None: every}, options)
    return {"task": task, "structures": structures, "per": per, "widths": every,
            "steps": _count(steps, "steps", 1, MAX_STEPS), "seeds": seeds,
            "batch": cls.default_batch if batch is None else _count(batch, "batch", 1,
                                                                     MAX_BATCH),
            "lr": lr, "lr_sweep": rates, "workers": _count(workers, "workers"),
            "executor": executor, "options": options,
            "eval_points": _count(eval_points, "eval_points", 1, MAX_EVAL_POINTS),
            "threads": None if threads is None else _count(threads, "threads"),
            "aux_weight": _number(aux_weight, "aux_weight", positive=False)}


def prepare_out(out) -> list[str]:
    """Make sure ``out`` (and ``out/runs``) can hold the runs before any is trained; returns
    the folders created."""
    if out is None:
        return []
    created = prepare_folder(out, "output folder")  # refuses "" by name
    runs = os.path.join(out, "runs")
    try:
        if os.path.lexists(runs) and not os.path.isdir(runs):
            raise EincError(f"the output folder {out!r} holds a file 'runs' where the runs go")
        check_targets(out, OUTPUT_FILES)
    except EincError:
        remove_folders(created)
        raise
    for folder in (out, runs):  # what a killed earlier run was writing
        sweep_temporaries(folder)
    return created


def _all_failed(records) -> EincError:
    """The error to raise when no run reached a finite held-out loss."""
    failed = [r for r in records if r.get("error")]
    if failed:
        r = failed[0]
        return EincError(f"every run failed; the first ({r['spec']} at width {r['width']}): "
                         f"{r['error']}")
    rates = ", ".join(f"{v:.3g}" for v in sorted({r["lr"] for r in records}))
    return EincError(f"every run diverged (no finite held-out loss at learning rate {rates}); "
                     "try lower rates (lr, lr_sweep; --lr, --lr-sweep)")


def scaling(task: str = "regression", structures=("dense", "btt"), widths=(64, 128, 256),
            steps: int = 1000, seeds=(0,), batch: int | None = None, lr=None, lr_sweep=None,
            out: str | None = None, workers: int = 1, executor: str = "local",
            ray_address: str | None = None, options: dict | None = None,
            eval_points: int = 24, threads: int | None = None,
            aux_weight: float = DEFAULT_AUX_WEIGHT, irreducible: bool = False,
            progress: bool | None = None, plot: bool = True) -> ScalingResult:
    """Train each structure at each width (and seed) and compare their frontiers.

    ``structures``: einc specs (BTT-MoE included) or ``ffmoe(experts=E,k=K)`` for the
    charlm task. ``widths``: a list, or ``{spec: list}`` to give structures of different
    cost per width their own ranges. ``lr``: a base rate (or ``{spec: rate}``) to skip the sweep. ``lr_sweep``:
    the base rates tried at the smallest width (default per task). ``seeds``: a list, or an
    int n for seeds 0..n-1. ``out``: a folder for the records, tables and plot (and for
    resuming). Returns a :class:`ScalingResult` (a list of the main runs' records).

    Every argument is checked (structures parsed, ``out`` made) before the first run, see
    :func:`check_scaling`; when no run reaches a finite held-out loss an
    :class:`~einc.errors.EincError` reports the first run's error.
    """
    if structures is None:
        raise EincError("no structures to train")
    irreducible, plot = flag(irreducible, "irreducible"), flag(plot, "plot")
    progress = flag(progress, "progress", none="a bar when stderr is a terminal")
    a = check_scaling(task=task, structures=structures, widths=widths, steps=steps,
                      seeds=seeds, batch=batch, lr=lr, lr_sweep=lr_sweep, workers=workers,
                      executor=executor, options=options, eval_points=eval_points,
                      threads=threads, aux_weight=aux_weight, ray_address=ray_address)
    structures, per, widths, seeds, batch = (a["structures"], a["per"], a["widths"],
                                             a["seeds"], a["batch"])
    steps, lr, workers, options, eval_points, threads, aux_weight = (
        a["steps"], a["lr"], a["workers"], a["options"], a["eval_points"], a["threads"],
        a["aux_weight"])
    cls = TASKS[task]
    prepare_out(out)
    rank, world = dist_env()
    lead = rank == 0
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(workers, 1)) if workers > 1 else None
    if progress is None:
        progress = lead and sys.stderr.isatty()
    base = {"task": task, "steps": int(steps), "batch": batch, "options": dict(options or {}),
            "eval_points": int(eval_points), "aux_weight": float(aux_weight),
            "threads": threads}
    cache = _load_cache(out)
    bar = _Bar(0, bool(progress) and lead)

    def execute(jobs):
        todo = [j for j in jobs if job_key(j) not in cache]
        bar.total += sum(j["steps"] for j in todo)
        sequential = world > 1 or (executor == "local" and workers <= 1)

        def done(i, rec):
            cache[rec["key"]] = rec
            if lead:
                _save_run(out, rec)
            bar(0 if sequential else todo[i]["steps"],
                f"{rec['spec']} w={rec['width']} {rec['status']}")

        if sequential:
            for i, job in enumerate(todo):
                bar(0, f"{job['spec']} w={job['width']} lr={job['lr']:.3g}")
                rec = run_job(dict(job, _hook=bar))
                done(i, rec)
                if world > 1:
                    import torch.distributed as dist
                    dist.barrier()
        else:
            run_jobs(run_job, todo, executor=executor, workers=workers,
                     ray_address=ray_address, on_done=done)
        return [cache[job_key(j)] for j in jobs]

    # 1. base rate per structure, at the smallest width where it builds: where every sweep
    # run failed (say the width needs more padding than allowed), at the next width
    lrs, sweep, at = {}, [], {s: per[s][0] for s in structures}
    if lr is None:
        rates = list(a["lr_sweep"] or cls.default_lr_sweep)
        pending = {s: list(per[s]) for s in structures}
        while pending:
            runs = execute([dict(base, spec=s, width=ws[0], seed=seeds[0], lr=r,
                                 role="sweep", lr_width=ws[0])
                            for s, ws in pending.items() for r in rates])
            sweep += runs
            retry = {}
            for s, ws in pending.items():
                mine = [r for r in runs if r["spec"] == s]
                good = [r for r in mine if r.get("final_loss") is not None
                        and math.isfinite(r["final_loss"])]
                if not good and len(ws) > 1 and all(r["status"] == "error" for r in mine):
                    retry[s] = ws[1:]
                    continue
                at[s] = ws[0]  # no finite loss at any rate: the first (status says why)
                lrs[s] = min(good, key=lambda r: r["final_loss"])["lr"] if good else rates[0]
            pending = retry
    else:
        lrs = {s: float(lr[s] if isinstance(lr, dict) else lr) for s in structures}
    # 2. every width and seed at that rate (the sweep's own run is reused)
    jobs = [dict(base, spec=s, width=w, seed=sd, lr=lrs[s], role="main", lr_width=at[s])
            for s in structures for w in per[s] for sd in seeds]
    records = [dict(r, role="main") for r in execute(jobs)]
    bar.close()
    if not any(math.isfinite(c[2]) for r in records for c in r.get("curve") or []):
        raise _all_failed(records)  # nothing to fit or plot: say why every run failed
    summary = summarize(records, widths, irreducible=irreducible)
    summary.update(task=task, lrs=lrs, lr_widths=at, lr_sweep=sorted({r["lr"] for r in sweep}),
                   steps=int(steps), batch=batch, seeds=seeds, widths=widths,
                   options=base["options"])
    files = _write_outputs(out, records, sweep, summary, plot) if (out and lead) else []
    return ScalingResult(records, sweep=sweep, lrs=lrs, summary=summary, files=files)


# -- analysis of the runs -----------------------------------------------------------------------

def mean_curves(records) -> dict:
    """``{(spec, width): (flops, loss)}``: the mean over seeds, on the steps all seeds
    reached."""
    groups: dict = {}
    for r in records:
        if r.get("curve"):
            groups.setdefault((r["spec"], r["width"]), []).append(r["curve"])
    out = {}
    for key, curves in groups.items():
        n = min(len(c) for c in curves)
        arr = np.array([[p[1:] for p in c[:n]] for c in curves], dtype=float)
        out[key] = (arr[0, :, 0], arr[:, :, 1].mean(0))
    return out


def summarize(records, widths, irreducible: bool = False, levels=None) -> dict:
    """Frontier, fit and losses at a few compute levels for each structure."""
    curves = mean_curves(records)
    specs = list(dict.fromkeys(r["spec"] for r in records))
    rows = []
    for spec in specs:
        recs = [r for r in records if r["spec"] == spec]
        mine = [(f, l, w) for (s, w), (f, l) in curves.items() if s == spec]
        front = fitting.frontier(mine) if mine else {"flops": [], "loss": [], "label": []}
        # fit past the first 10% of the smallest width's run (its fastest-falling stretch)
        ok = [r for r in recs if r.get("flops_per_step")]
        lo = (min(r["flops_per_step"] * r["steps"] for r in ok if r["width"] == min(
            x["width"] for x in ok)) * 0.1) if ok else 0
        pts = [(c, l) for c, l in zip(front["flops"], front["loss"]) if c >= lo]
        fit = fitting.fit_power_law([p[0] for p in pts], [p[1] for p in pts],
                                    irreducible=irreducible)
        fit["from_flops"] = lo
        # the exponents of a record that built (a failed one has none)
        first = next((r for r in recs if r.get("omega") is not None), recs[0])
        rows.append({"spec": spec, "omega": first.get("omega"), "psi": first.get("psi"),
                     "nu": first.get("nu"), "lr": first["lr"], "frontier": front, "fit": fit,
                     "status": sorted({r["status"] for r in recs}),
                     "best_loss": min((r["best_loss"] for r in recs
                                       if r.get("best_loss") is not None), default=None),
                     "widths": sorted({r["width"] for r in recs}),
                     "errors": sorted({f"w={r['width']}: {r['error']}" for r in recs
                                       if r.get("error")})})
    fronts = [r["frontier"]["flops"] for r in rows if r["frontier"]["flops"]]
    if levels is None and fronts:
        lo, hi = min(f[0] for f in fronts), max(f[-1] for f in fronts)
        decades = [10.0 ** k for k in range(math.ceil(math.log10(lo)),
                                            math.floor(math.log10(hi)) + 1)]
        levels = decades[-3:]
    levels = list(levels or [])
    # the largest compute every frontier reaches; none where one frontier starts past
    # another's end (a ranking would leave out, unnoted, the structure not yet trained there)
    common = min((f[-1] for f in fronts), default=None)
    if common is not None and max(f[0] for f in fronts) > common:
        common = None
    for row in rows:
        row["loss_at"] = {f"{c:.0e}": fitting.loss_at(row["frontier"], c) for c in levels}
        row["loss_at_common"] = (fitting.loss_at(row["frontier"], common)
                                 if common else None)
    ranked = sorted((r for r in rows if r["loss_at_common"] is not None),
                    key=lambda r: r["loss_at_common"])
    return {"structures": rows, "levels": levels, "common_flops": common,
            "ranking": [r["spec"] for r in ranked]}


def _fmt(v, spec=".4g"):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _frac(v):
    if v is None:
        return "-"
    from fractions import Fraction
    q = Fraction(v).limit_denominator(100)
    return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


_NO_COMMON = ("no compute level lies on every structure's frontier (one starts past where "
              "another ends): not ranked at equal compute; train the cheaper ones longer")


def format_table(summary: dict) -> str:
    """The per-structure table (markdown), best frontier loss at equal compute first."""
    levels = [f"{c:.0e}" for c in summary["levels"]]
    common = summary.get("common_flops")
    head = (["structure", "omega", "psi", "nu", "base lr", "exponent b", *[f"loss @ {c}" for c
            in levels]] + ([f"loss @ {common:.2g} (equal C)"] if common else []))
    order = {s: i for i, s in enumerate(summary.get("ranking", []))}
    rows = sorted(summary["structures"], key=lambda r: order.get(r["spec"], len(order)))
    body = []
    for r in rows:
        f = r["fit"]
        b = "-" if f["b"] is None else f"{f['b']:.3f} ± {_fmt(f['b_err'], '.3f')}"
        body.append([r["spec"], _frac(r["omega"]), _frac(r["psi"]), _frac(r["nu"]),
                     f"{r['lr']:.3g}", b, *[_fmt(r["loss_at"][c]) for c in levels]]
                    + ([_fmt(r["loss_at_common"])] if common else []))
    width = [max(len(str(x[c])) for x in [head, *body]) for c in range(len(head))]
    line = lambda xs: "| " + " | ".join(str(x).ljust(w) for x, w in zip(xs, width)) + " |"
    notes = [f"{r['spec']} failed at {e}" for r in rows for e in r.get("errors", [])]
    if not common and sum(bool(r["frontier"]["flops"]) for r in rows) > 1:
        notes.append(_NO_COMMON)
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in width) + "|",
                      *map(line, body), *(["", *notes] if notes else [])])


# -- files --------------------------------------------------------------------------------------

def _load_cache(out) -> dict:
    cache = {}
    folder = os.path.join(out, "runs") if out else None
    if folder and os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".json"):
                try:
                    with open(os.path.join(folder, name)) as fh:
                        rec = json.load(fh)
                    if rec.get("status") != "error":  # a failed run is tried again
                        cache[rec["key"]] = rec
                except (OSError, ValueError, KeyError):
                    continue  # a half-written file: run it again
    return cache


def _save_run(out, rec) -> None:
    if not out:
        return
    folder = os.path.join(out, "runs")
    os.makedirs(folder, exist_ok=True)
    write_output(os.path.join(folder, rec["key"] + ".json"), lambda fh: json.dump(rec, fh))


def runs_csv(records) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["role", "spec", "width", "seed", "lr", "omega", "psi", "nu", "params",
                "flops_per_step", "step", "flops", "loss", "status"])
    for r in records:
        for step, flops, loss in r.get("curve") or [[None, None, None]]:
            w.writerow([r["role"], r["spec"], r["width"], r["seed"], r["lr"], r.get("omega"),
                        r.get("psi"), r.get("nu"), r.get("params"), r.get("flops_per_step"),
                        step, flops, loss, r["status"]])
    return buf.getvalue()


#: the files :func:`_write_outputs` writes into the output folder
OUTPUT_FILES = ("runs.json", "runs.csv", "frontier.csv", "summary.json", "table.md",
                "frontier.png")


def _write_outputs(out, records, sweep, summary, plot) -> list[str]:
    os.makedirs(out, exist_ok=True)
    files = []

    def write(name, text):
        path = os.path.join(out, name)
        write_output(path, lambda fh: fh.write(text))
        files.append(path)

    allrecs = list(records) + [r for r in sweep if r["key"] not in {x["key"] for x in records}]
    write("runs.json", json.dumps(allrecs, indent=1))
    write("runs.csv", runs_csv(allrecs))
    fr = io.StringIO()
    w = csv.writer(fr)
    w.writerow(["spec", "flops", "loss", "width"])
    for row in summary["structures"]:
        f = row["frontier"]
        for c, l, lab in zip(f["flops"], f["loss"], f["label"]):
            w.writerow([row["spec"], c, l, lab])
    write("frontier.csv", fr.getvalue())
    write("summary.json", json.dumps(summary, indent=1))
    write("table.md", format_table(summary) + "\n")
    if plot:
        try:
            from .plot import plot_frontiers
            files.append(plot_frontiers(records, summary, os.path.join(out, "frontier.png")))
        except ImportError:
            pass
    return files


# -- re-ranking the analytic search by training --------------------------------------------------

def rerank(candidates, task: str = "regression", widths=(32, 64, 128), steps: int = 300,
           **kw) -> dict:
    """Train the candidates of an analytic ranking (``einc.search`` records or specs) with
    :func:`scaling` and rank them by frontier loss at the largest compute every one reached.

    Returns ``{'analytic': [...], 'trained': [...], 'result': ScalingResult}``, the first
    two being lists of ``(rank, spec, name, loss)`` (loss None for the analytic list)."""
    if isinstance(candidates, (str, dict)) or not hasattr(candidates, "__iter__"):
        raise EincError(f"rerank takes a list of specs or einc.search records, got "
                        f"{shown(candidates)}")
    specs, names = [], {}
    for c in candidates:
        if not (isinstance(c, str) or (isinstance(c, dict) and isinstance(c.get("spec"), str))):
            raise EincError(f"rerank takes specs or einc.search records (dicts with a 'spec'), "
                            f"got {shown(c)}")
        spec = c["spec"] if isinstance(c, dict) else c
        if spec not in names:
            specs.append(spec)
            names[spec] = (c.get("name") if isinstance(c, dict) else "") or ""
    result = scaling(task=task, structures=specs, widths=widths, steps=steps, **kw)
    losses = {r["spec"]: r["loss_at_common"] for r in result.summary["structures"]}
    analytic = [(i + 1, s, names[s], None) for i, s in enumerate(specs)]
    ordered = sorted(specs, key=lambda s: (losses.get(s) is None, losses.get(s) or 0.0))
    trained = [(i + 1, s, names[s], losses.get(s)) for i, s in enumerate(ordered)]
    return {"analytic": analytic, "trained": trained, "result": result}


def format_rerank(ranks: dict) -> str:
    """Both rankings side by side."""
    common = ranks["result"].summary.get("common_flops")
    label = lambda s, n: f"{n} {s}".strip() if n else s
    left = [f"{i}. {label(s, n)}" for i, s, n, _ in ranks["analytic"]]
    right = [f"{i}. {label(s, n)}  loss {_fmt(v)}" for i, s, n, v in ranks["trained"]]
    w = max(len(x) for x in left + ["analytic ranking"])
    head = ("analytic ranking".ljust(w) + "   trained ranking (frontier loss at "
            + (f"{common:.3g} FLOPs)" if common else "equal compute)"))
    rows = [a.ljust(w) + "   " + b for a, b in zip(left, right)]
    if not common and len(left) > 1:
        rows.append(_NO_COMMON)
    return "\n".join([head, "-" * len(head)] + rows)
