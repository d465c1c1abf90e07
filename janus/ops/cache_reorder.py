"""cache_reorder: a beam step's reordering of its key/value cache, in place.

    cache[a, n, b, :length] = old cache[a, order[n], b, :length]   for every row n

The cache is (A, N, B, C, E): rows (hypotheses) along dim 1, C columns of E values each (``KVCache``'s
joint buffer (layers, 2, N, H, capacity, D/H) viewed as (layers * 2, N, H, capacity, D/H)). A beam step
keeps about half its hypotheses where they were; only the others' columns in use move.
``cache_reorder_ref`` is the specification and the fallback (``index_select`` / ``index_copy_`` of the
moved rows); ``cache_reorder`` dispatches (janus.ops._dispatch) between:

- "cpp": ``torch.ops.janus.cache_reorder`` (csrc/cpu/cache_reorder.cpp), a CPU cache whose slabs of
  columns are contiguous: the moved rows' sources copied aside, then into place, one memcpy per slab;
- "reference": ``cache_reorder_ref``, any device.

Force one with ``JANUS_BACKEND_CACHE_REORDER=cpp|reference``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from janus import _ext
from janus.ops._dispatch import Backend, Verdict, all_on_cpu, compiled, register_op


def cache_reorder_ref(cache: Tensor, order: Sequence[int], length: int) -> None:
    """Reference (see the module docstring).

    Args:
        cache: (A, N, B, C, E), written in place.
        order: N ints in [0, N): the row each row takes its columns from.
        length: columns [0, length) move; the others are not touched.
    """
    N = cache.shape[1]
    if len(order) != N:
        raise ValueError(f"cache_reorder: order has {len(order)} entries for the cache's {N} rows")
    if not 0 <= length <= cache.shape[3]:
        raise ValueError(f"cache_reorder: length={length} is outside [0, {cache.shape[3]}]")
    moved = [n for n, h in enumerate(order) if h != n]
    if not moved or length == 0:
        return
    idx = torch.tensor(moved, device=cache.device)
    used = cache.narrow(3, 0, length)
    used.index_copy_(1, idx, used.index_select(1, torch.tensor([order[n] for n in moved], device=cache.device)))


def _cache_reorder_fake(cache: Tensor, order: Sequence[int], length: int) -> None:
    return None


@_ext.when_loaded  # registering a fake needs the C++ schema (csrc/ops.cpp) to exist
def _register_fake() -> None:
    torch.library.register_fake("janus::cache_reorder", _cache_reorder_fake)


def cache_reorder_checked(cache: Tensor, order: Sequence[int], length: int) -> None:
    """The "cpp" kernel for a caller that checked its arguments (``KVCache.select``): the dispatch's
    per-call checks skipped (the kernel checks shapes and indices itself)."""
    torch.ops.janus.cache_reorder(cache, list(order), length)


def _fits_cpp(cache: Tensor, order: Sequence[int], length: int) -> Verdict:
    ok, why = all_on_cpu(cache)
    if not ok:
        return ok, why
    if cache.dim() != 5 or cache.stride(4) != 1 or (cache.shape[3] > 1 and cache.stride(3) != cache.shape[4]):
        return False, f"the kernel takes a 5-dim cache whose slabs of columns are contiguous, got {tuple(cache.shape)}"
    return True, ""


CACHE_REORDER = register_op(
    "cache_reorder",
    [
        Backend("cpp", cache_reorder_checked, available=compiled("cache_reorder", "cpu"), supports=_fits_cpp),
        Backend("reference", cache_reorder_ref),
    ],
)


def kernel_ready() -> bool:
    """Whether the "cpp" kernel may run: compiled and loaded, and JANUS_BACKEND_CACHE_REORDER (or
    JANUS_BACKEND) does not force another backend."""
    return CACHE_REORDER.may_use("cpp")


def cache_reorder(cache: Tensor, order: Sequence[int], length: int) -> None:
    """Reorder the rows of a key/value cache in place, on the fastest available backend (see the module
    docstring). Same contract as ``cache_reorder_ref``."""
    CACHE_REORDER(cache, order, length)
