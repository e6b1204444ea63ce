"""Recycled CPU buffers for the fused route's large tensors.

Fresh memory from the system costs a page fault on every first touch of each 4 KiB page:
measured at about 1 us per page on this project's 2-core VM, i.e. 8-9 ms to first write a
32 MiB tensor that then takes 0.3 ms to refill. glibc returns large blocks (over 32 MiB
always, smaller ones often) to the system on free, so a layer that allocates its output,
its saved intermediates and its input gradient each step pays those faults each step; for
a BTT layer at d = 4096 they were about a third of a training step.

The pool hands out tensors viewing Python ``bytearray`` blocks it keeps. A tensor keeps its
block referenced for as long as it or any view of it lives, so a block whose only referrer
is the pool is free: the next request of its size class (four per power of two) reuses
it, already faulted in. Callers get ordinary tensors, except that their storage cannot
grow (``resize_`` beyond the block, or ``out=`` arguments that must resize, fail). Blocks
are kept up to ``limit()`` bytes; a new block that would pass it first drops idle blocks
of other sizes, and :func:`empty_cache` drops every idle one.
"""
from __future__ import annotations

import sys
import threading

import torch

#: requests below this many bytes go to torch.empty (the C heap recycles small blocks)
MIN_BYTES = 256 << 10
_ALIGN = 64  # one cache line, the widest vector load

_blocks: dict[int, list[bytearray]] = {}
_lock = threading.Lock()  # finding an idle block and wrapping it is one step
_held = 0
_limit = 2 << 30


def limit(nbytes: int | None = None) -> int:
    """The most bytes the pool keeps (idle or in use); with an argument, set it."""
    global _limit
    if nbytes is not None:
        if nbytes < 0:
            raise ValueError(f"the buffer limit must be >= 0 bytes, got {nbytes}")
        _limit = int(nbytes)
    return _limit


def held() -> int:
    """Bytes the pool keeps, idle or in use."""
    return _held


def empty_cache() -> int:
    """Drop every idle block; returns the bytes released."""
    global _held
    freed = 0
    with _lock:
        for size, blocks in _blocks.items():
            idle = set(_idle(blocks))
            freed += size * len(idle)
            blocks[:] = [b for i, b in enumerate(blocks) if i not in idle]
        _held -= freed
    return freed


def _refcounts(blocks) -> list[int]:
    return [sys.getrefcount(b) for b in blocks]


def _idle(blocks) -> list[int]:
    """Positions of the blocks no tensor refers to any more. A fresh probe, held once (by
    a local, as each block is by the pool), is counted in the same pass: its count is the
    count of a block nothing else holds, whatever the interpreter adds to both."""
    probe = bytearray(1)
    counts = _refcounts([*blocks, probe])
    return [i for i, c in enumerate(counts[:-1]) if c <= counts[-1]]


def _size_class(nbytes: int) -> int:
    """Block size for a request: rounded up to one of four sizes per power of two (at most
    25% unused), so that requests of slowly varying size share blocks."""
    step = 1 << max(0, nbytes.bit_length() - 3)
    return -(-nbytes // step) * step


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor, from the pool where that pays (large, CPU)."""
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    size = _size_class(nbytes + _ALIGN)
    with _lock:
        block = _take(size)
        if block is None:
            return torch.empty(shape, dtype=dtype, device=device)
        base = torch.frombuffer(block, dtype=torch.uint8)
        offset = -base.data_ptr() % _ALIGN
        # frombuffer wants count in the target dtype's elements and offset in bytes
        flat = torch.frombuffer(block, dtype=dtype, count=numel, offset=offset)
    # not flat.view(shape): a view keeps its base, so its storage has two owners, and
    # autograd then sums a gradient arriving in this tensor with a fresh out-of-place add
    # (page faults again) instead of adding into it
    return torch.empty(0, dtype=dtype).set_(flat).as_strided_(shape, _contiguous(shape))


def _contiguous(shape) -> tuple:
    strides, step = [], 1
    for s in reversed(shape):
        strides.append(step)
        step *= s
    return tuple(reversed(strides))


def _take(size: int) -> bytearray | None:
    """An idle block of ``size`` bytes, else a new one, after dropping idle blocks of other
    sizes if the limit needs it; None when the blocks in use leave no room."""
    global _held
    blocks = _blocks.setdefault(size, [])
    idle = _idle(blocks)
    if idle:
        return blocks[idle[0]]
    if _held + size > _limit:
        _held -= _evict(_held + size - _limit)
    if _held + size > _limit:
        return None
    blocks.append(bytearray(size))
    _held += size
    return blocks[-1]


def _evict(need: int) -> int:
    """Drop idle blocks, largest sizes first, until ``need`` bytes are freed (or none are
    left idle); returns the bytes freed."""
    freed = 0
    for size in sorted(_blocks, reverse=True):
        blocks = _blocks[size]
        for i in sorted(_idle(blocks), reverse=True):  # from the end: indices stay valid
            if freed >= need:
                return freed
            del blocks[i]
            freed += size
    return freed
