"""Time forward + backward of compiled candidates (``einc search --measure``)."""
from __future__ import annotations

import statistics
import time

from ..errors import EincError
from .checks import MAX_BATCH
from .progress import Progress


def _compiler():
    try:
        from ..runtime import compile as compile_
    except ImportError as e:
        raise EincError("--measure needs the runtime stage (einc.runtime) and torch, which "
                        f"could not be imported: {e}") from None
    return compile_


def measure_records(records, *, batch: int = 64, repeats: int = 5, warmup: int = 2,
                    progress: bool | None = None, threads: int | None = None,
                    tolerance: float | None = None) -> None:
    """Add ``measured_ms`` (median forward+backward time of a batch, in ms) to each record,
    compiled with the padding ``tolerance`` its search used (None: the default)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
        raise EincError(f"the batch size must be an integer from 1 to {MAX_BATCH:,}, "
                        f"got {batch!r}")
    compile_ = _compiler()
    import torch

    if threads:
        torch.set_num_threads(threads)
    with Progress(len(records), "measuring", enabled=progress, delay=0.0) as bar:
        for rec in records:
            extra = {} if tolerance is None else {"tolerance": tolerance}
            module = compile_(rec["spec"], d_in=rec["d_in"], d_out=rec["d_out"], **extra)
            try:
                times = _time(module, torch.randn(batch, rec["d_in"]), warmup, repeats)
            except (MemoryError, RuntimeError) as e:  # torch's OutOfMemoryError is one
                if not isinstance(e, MemoryError) and "alloc" not in str(e):
                    raise
                raise EincError(f"measuring {rec['spec']} at a batch of {batch:,} needs more "
                                f"memory than this machine has; use a smaller --batch") from None
            rec["measured_ms"] = 1000 * statistics.median(times)
            rec["measured_batch"] = batch
            bar.update()


def _time(module, x, warmup: int, repeats: int) -> list[float]:
    """Forward+backward times of ``module`` on ``x`` after ``warmup`` untimed calls."""
    times = []
    for k in range(warmup + repeats):
        module.zero_grad(set_to_none=True)
        start = time.perf_counter()
        module(x).sum().backward()
        if k >= warmup:
            times.append(time.perf_counter() - start)
    return times
