"""Host memory: keep freed buffers for reuse on glibc (CPU training and decoding).

A CPU training step allocates and frees the same large buffers every update (logits and their
gradients, hundreds of MB), and a decoding pass its activations. glibc serves every block above its
mmap threshold with a fresh mmap and unmaps it on free, so each step pays first-touch page faults on
all of them again: a third of a training step's time was spent in the kernel on a 2-core VM. Served
from the heap and never trimmed, the blocks are reused and the faults go (a small janus update went
from 0.85 to 0.6 s on one thread); peak memory stays what one step needs.

The threshold also rises by itself as a process frees large blocks, so without this a process gets
faster as it runs: timings taken early and late in one benchmark would not be comparable.
"""

from __future__ import annotations

import os

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4

_state = "unchanged"


def keep_freed_memory() -> str:
    """Let glibc keep freed memory for reuse instead of returning it to the system.

    For the process: call it once, early, from an entry point (``janus train``, the ``janus``
    commands, the benchmarks). Returns what was done, for logs: nothing happens off glibc or when
    ``JANUS_KEEP_FREED_MEMORY=0``. Calling it again is harmless.
    """
    global _state
    if os.environ.get("JANUS_KEEP_FREED_MEMORY", "1") == "0":
        _state = "unchanged (JANUS_KEEP_FREED_MEMORY=0)"
        return _state
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
    except (OSError, AttributeError, TypeError):
        _state = "unchanged (not glibc)"
        return _state
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = [mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, 2**31 - 1), mallopt(_M_TOP_PAD, 2**28)]
    _state = "glibc: freed memory kept for reuse" if done == [1, 1, 1] else "unchanged (mallopt refused)"
    return _state


def allocator_state() -> str:
    """What keep_freed_memory did in this process ("unchanged" when it was not called)."""
    return _state


# oneDNN keeps up to 1024 compiled primitives (one per GEMM shape and dtype) with their buffers.
ONEDNN_CACHE_CAPACITY = 64


def bound_onednn_cache() -> str:
    """Cap oneDNN's primitive cache at ``ONEDNN_CACHE_CAPACITY`` entries unless the user set
    ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``; returns the capacity in effect, for logs.

    bf16 GEMMs on the CPU go through oneDNN, which caches one primitive per shape. Length-bucketed
    training batches bring hundreds of shapes, so with the default capacity a bf16 CPU training run
    grew by about 1.4 GB over its first 100 updates (small preset, 2048 tokens; fp32 stayed flat), and
    further as new shapes came. Capped at 64 it grew by a third as much at the same speed. oneDNN reads
    the variable when it first builds a primitive: call this before the first bf16 GEMM.
    """
    return os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))
