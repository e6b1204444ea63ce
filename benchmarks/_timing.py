"""Shared helpers for the benchmark scripts: timing and a header naming the machine."""
import os
import platform
import statistics
import time

import torch


def header(title: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return (f"# {title}\n# {time.strftime('%Y-%m-%d %H:%M')}  {cpu}  ({os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads)  device: {dev}\n"
            f"# python {platform.python_version()}  torch {torch.__version__}")


def median_ms(fn, reps: int = 5, warmup: int = 1) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def interleaved_ms(fns: dict, reps: int = 5, warmup: int = 1) -> dict:
    """Median ms of each callable, the repetitions taken round-robin (one of each in turn)
    so that a noisy moment on a shared machine hits every candidate alike."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def table(rows, head) -> str:
    cells = [head] + [[str(c) for c in r] for r in rows]
    width = [max(len(r[c]) for r in cells) for c in range(len(head))]
    line = lambda r: "| " + " | ".join(v.rjust(w) if k else v.ljust(w)
                                       for k, (v, w) in enumerate(zip(r, width))) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in width) + "|"
    return "\n".join([line(cells[0]), sep, *map(line, cells[1:])])
