"""Run independent training jobs: in this process, in a local process pool, or through Ray.

Every job is a plain dict and every result a plain dict, so a job runs the same wherever it
runs. ``local`` with one worker runs the jobs in order in this process; with more it uses a
``concurrent.futures`` process pool (spawned workers). ``ray`` submits one task per job to a
Ray cluster: a local one by default, or the one at ``ray_address`` (``auto`` or
``ray://host:10001``); Ray is an optional dependency (``pip install ray``).

One job on several GPUs is torch.distributed's business, not the executor's: see
:func:`dist_env` and ``docs/experiments.md``.
"""
from __future__ import annotations

import os
from typing import Callable

from ..errors import UnknownNameError

EXECUTORS = ("local", "ray")


def dist_env() -> tuple[int, int]:
    """``(rank, world_size)`` from the variables torchrun sets; ``(0, 1)`` without them."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        return 0, 1


def run_jobs(fn: Callable[[dict], dict], jobs: list[dict], executor: str = "local",
             workers: int = 1, ray_address: str | None = None,
             on_done: Callable[[int, dict], None] | None = None) -> list[dict]:
    """``[fn(job) for job in jobs]``, in job order, calling ``on_done(i, result)`` as each
    finishes (in completion order)."""
    if executor not in EXECUTORS:
        raise UnknownNameError(f"unknown executor {executor!r}; known executors: "
                               f"{', '.join(EXECUTORS)}")
    on_done = on_done or (lambda i, r: None)
    results: list = [None] * len(jobs)
    if not jobs:
        return results
    if executor == "ray":
        return _run_ray(fn, jobs, workers, ray_address, on_done)
    if workers <= 1 or len(jobs) == 1:
        for i, job in enumerate(jobs):
            results[i] = fn(job)
            on_done(i, results[i])
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    ctx = multiprocessing.get_context("spawn")  # forking a process that ran torch can hang
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
        futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
        for fut in as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()
            on_done(i, results[i])
    return results


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def _run_ray(fn, jobs, workers, address, on_done):
    try:
        import ray
    except ImportError:
        raise UnknownNameError("the ray executor needs Ray (pip install ray); or use "
                               "--executor local") from None
    threads = max(int(j.get("threads") or 1) for j in jobs)
    started_here = not ray.is_initialized()
    if started_here:
        kw = {"address": address} if address else {"num_cpus": max(int(workers), 1) * threads}
        ray.init(ignore_reinit_error=True, include_dashboard=False,
                 log_to_driver=False, **kw)
    try:
        remote = ray.remote(num_cpus=threads)(fn)
        refs = [remote.remote(job) for job in jobs]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list = [None] * len(jobs)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                i = index[ref]
                results[i] = ray.get(ref)
                on_done(i, results[i])
        return results
    finally:
        if started_here and not address:
            ray.shutdown()
