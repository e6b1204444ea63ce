"""Rank structures by training them: the scaling-law harness.

``scaling(task, structures, widths, ...)`` trains every (structure, width, seed) with one
protocol, logs held-out loss against training FLOPs counted from einc's analysis, and fits
each structure's compute-optimal frontier with a power law. Tasks: ``regression`` (an MLP
student of a random ReLU teacher) and ``charlm`` (a small GPT on the bytes of Python's
standard library). Runs execute locally, in a process pool or through Ray, and one run can
be data-parallel under torchrun. See docs/experiments.md.
"""
import importlib

# Importing these loads torch; the CLI imports this package (for its `experiment` command)
# on every call, so they load on first use and `einc analyze` starts without torch.
_LAZY = {
    "dist_env": "executors", "ray_available": "executors", "run_jobs": "executors",
    "FFMoE": "ffmoe",
    "fit_power_law": "fit", "frontier": "fit", "loss_at": "fit",
    "FlopCount": "flops", "layer_flops": "flops", "model_flops": "flops",
    "ScalingResult": "harness", "eval_steps": "harness", "format_rerank": "harness",
    "format_table": "harness", "job_key": "harness", "rerank": "harness",
    "run_job": "harness", "scaling": "harness", "summarize": "harness",
    "TASKS": "tasks", "make_task": "tasks", "task": "tasks",
}


_MODULES = ("cli", "executors", "ffmoe", "fit", "flops", "harness", "plot", "tasks")


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name in _MODULES:  # einc.experiments.harness without importing it by name first
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY, *_MODULES})


__all__ = ["scaling", "rerank", "format_rerank", "ScalingResult", "run_job", "job_key",
           "eval_steps", "summarize", "format_table", "frontier", "fit_power_law", "loss_at",
           "model_flops", "layer_flops", "FlopCount", "FFMoE", "TASKS", "make_task", "task",
           "run_jobs", "dist_env", "ray_available"]
