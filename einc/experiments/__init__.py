"""Rank structures by training them: the scaling-law harness.

``scaling(task, structures, widths, ...)`` trains every (structure, width, seed) with one
protocol, logs held-out loss against training FLOPs counted from einc's analysis, and fits
each structure's compute-optimal frontier with a power law. Tasks: ``regression`` (an MLP
student of a random ReLU teacher) and ``charlm`` (a small GPT on the bytes of Python's
standard library). Runs execute locally, in a process pool or through Ray, and one run can
be data-parallel under torchrun. See docs/experiments.md.
"""
from .executors import dist_env, ray_available, run_jobs
from .ffmoe import FFMoE
from .fit import fit_power_law, frontier, loss_at
from .flops import FlopCount, layer_flops, model_flops
from .harness import (ScalingResult, eval_steps, format_rerank, format_table, job_key,
                      rerank, run_job, scaling, summarize)
from .tasks import TASKS, make_task, task

__all__ = ["scaling", "rerank", "format_rerank", "ScalingResult", "run_job", "job_key",
           "eval_steps", "summarize", "format_table", "frontier", "fit_power_law", "loss_at",
           "model_flops", "layer_flops", "FlopCount", "FFMoE", "TASKS", "make_task", "task",
           "run_jobs", "dist_env", "ray_available"]
