"""pad_batch: gather ragged sentences from a flat id array into a padded batch.

    out[b] = [bos?] + flat[offsets[index[b]] : offsets[index[b] + 1]] + [eos?] + [pad ...]

This is the data pipeline's collate step (it runs once per batch, for source
and target). ``pad_batch_ref`` is the specification and the fallback;
``pad_batch`` dispatches (janus.ops._dispatch) between:

- "cpp": ``torch.ops.janus.pad_batch`` (csrc/cpu/pad_batch.cpp), CPU tensors;
- "reference": ``pad_batch_ref``.

Force one with ``JANUS_BACKEND_PAD_BATCH=cpp|reference``.
"""

from __future__ import annotations

import torch

from janus import _ext
from janus.ops._dispatch import Backend, all_on_cpu, extension_available, register_op


def pad_batch_ref(
    flat: torch.Tensor, offsets: torch.Tensor, index: torch.Tensor, pad: int, bos: int, eos: int
) -> torch.Tensor:
    """Reference implementation.

    Args:
        flat: int32 [T], all sentences' ids back to back (no bos/eos).
        offsets: int64 [N + 1], sentence i is flat[offsets[i]:offsets[i + 1]].
        index: int64 [B], which sentences to gather, in output order.
        pad, bos, eos: ids; ``bos < 0`` / ``eos < 0`` means "do not add".
    Returns:
        int64 [B, L] with L = max gathered length + (bos >= 0) + (eos >= 0) (0 when B == 0).
    """
    starts = offsets[index]
    lengths = offsets[index + 1] - starts
    head = int(bos >= 0)
    width = (int(lengths.max()) if index.numel() else 0) + head + int(eos >= 0)
    out = torch.full((index.numel(), width), pad, dtype=torch.int64)
    for b in range(index.numel()):
        s, n = int(starts[b]), int(lengths[b])
        if bos >= 0:
            out[b, 0] = bos
        out[b, head : head + n] = flat[s : s + n].to(torch.int64)
        if eos >= 0:
            out[b, head + n] = eos
    return out


def _pad_batch_fake(
    flat: torch.Tensor, offsets: torch.Tensor, index: torch.Tensor, pad: int, bos: int, eos: int
) -> torch.Tensor:
    # The width is the longest gathered sentence (+ bos, eos): it depends on the data.
    width = torch.library.get_ctx().new_dynamic_size(min=int(bos >= 0) + int(eos >= 0))
    return index.new_empty((index.shape[0], width), dtype=torch.int64)


@_ext.when_loaded  # registering a fake needs the C++ schema (csrc/ops.cpp) to exist
def _register_fake() -> None:
    torch.library.register_fake("janus::pad_batch", _pad_batch_fake)


def _pad_batch_cpp(
    flat: torch.Tensor, offsets: torch.Tensor, index: torch.Tensor, pad: int, bos: int, eos: int
) -> torch.Tensor:
    return torch.ops.janus.pad_batch(flat, offsets, index, pad, bos, eos)


PAD_BATCH = register_op(
    "pad_batch",
    [
        Backend("cpp", _pad_batch_cpp, available=extension_available, supports=all_on_cpu),
        Backend("reference", pad_batch_ref),
    ],
)


def pad_batch(
    flat: torch.Tensor, offsets: torch.Tensor, index: torch.Tensor, pad: int, bos: int, eos: int
) -> torch.Tensor:
    """Gather sentences ``index`` of a ragged corpus into one padded batch.

    Same contract as ``pad_batch_ref``, on the fastest available backend.

    Args:
        flat: int32 or int64 [T], all sentences' ids back to back (no bos/eos).
        offsets: int64 (or int32) [N + 1], non-decreasing, in [0, T]; sentence i is
            flat[offsets[i]:offsets[i + 1]].
        index: int64 (or int32) [B], values in [0, N): which sentences, in output order.
        pad, bos, eos: ids; ``bos < 0`` / ``eos < 0`` means "do not add".
    Returns:
        int64 [B, L], L = longest gathered sentence + (bos >= 0) + (eos >= 0);
        row b is [bos] + sentence index[b] + [eos] + pad up to L.
    Raises:
        RuntimeError (cpp backend) for an index out of range or offsets that
        decrease or leave [0, T], naming the offending entry.
    """
    return PAD_BATCH(flat, offsets, index, pad, bos, eos)
