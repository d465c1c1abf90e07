"""remask_lowest: the re-masking step of mask-predict.

Per row r, among the non-special tokens (not pad, bos or eos), the ``counts[r]``
lowest-scoring ones become ``<mask>`` and their scores 0. Ties go to the smaller
position, so the result is deterministic; NaN ranks above every number, as in
``torch.sort``. Works in place and returns its inputs.

``remask_lowest_ref`` is the specification, the fallback and the test oracle;
``remask_lowest`` dispatches (janus.ops._dispatch) between:

- "cuda": ``torch.ops.janus.remask_lowest`` (csrc/cuda/remask_lowest.cu), CUDA
  tensors with rows of at most ``CUDA_MAX_LENGTH`` tokens (one thread block per
  row with the row staged in shared memory; longer rows use the next backend);
- "cpp": the same op's CPU kernel (csrc/cpu/remask_lowest.cpp), CPU tensors;
- "reference": ``remask_lowest_ref``.

Force one with ``JANUS_BACKEND_REMASK_LOWEST=cuda|cpp|reference``. The compiled op
returns nothing (so that torch.compile can functionalize it); the functions here
return the updated tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from janus import _ext
from janus.ops._dispatch import Backend, Verdict, all_on_cpu, all_on_cuda, compiled, register_op

# Longest row the CUDA kernel takes (csrc/cuda/remask_lowest.cu, kMaxLength).
CUDA_MAX_LENGTH = 4096


def remask_lowest_ref(
    tokens: Tensor, scores: Tensor, counts: Tensor, mask: int, pad: int, bos: int, eos: int, check: bool = True
) -> tuple[Tensor, Tensor]:
    """Reference implementation.

    Args:
        tokens: int64 (R, L) canvases, modified in place.
        scores: float (R, L) score of each token, modified in place.
        counts: int64 (R,), 0 <= counts[r] <= number of non-special tokens of row r.
        mask, pad, bos, eos: special ids.
        check: raise on a count out of range; when False, counts are clamped into range.
    Returns:
        (tokens, scores), the same tensors.
    Raises:
        ValueError: (check) a count below 0 or above its row's number of non-special tokens.
    """
    if tokens.shape != scores.shape or tokens.dim() != 2 or counts.shape != tokens.shape[:1]:
        raise ValueError(
            f"remask_lowest: tokens {tuple(tokens.shape)} and scores {tuple(scores.shape)} must be (R, L) "
            f"and counts {tuple(counts.shape)} must be (R,)"
        )
    R, L = tokens.shape
    eligible = (tokens != pad) & (tokens != bos) & (tokens != eos)
    available = eligible.sum(1)
    bad = (counts < 0) | (counts > available)
    if not check:
        counts = torch.minimum(counts.clamp_min(0), available)
    elif bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"remask_lowest: counts[{r}]={int(counts[r])} is outside [0, {int(available[r])}], "
            f"the number of non-special tokens of row {r}"
        )
    # Stable ascending sort: equal scores keep position order, so the smaller position goes first.
    # A second stable sort puts every eligible slot (even one scored +inf or NaN) before the others.
    order = torch.sort(scores, dim=1, stable=True).indices  # (R, L)
    order = order.gather(1, torch.sort((~eligible.gather(1, order)).to(torch.int8), dim=1, stable=True).indices)
    chosen = torch.arange(L, device=tokens.device)[None, :] < counts[:, None]  # first counts[r] of each row
    hit = torch.zeros_like(eligible).scatter_(1, order, chosen)
    tokens.masked_fill_(hit, mask)
    scores.masked_fill_(hit, 0.0)
    return tokens, scores


def _remask_lowest_fake(
    tokens: Tensor, scores: Tensor, counts: Tensor, mask: int, pad: int, bos: int, eos: int, check: bool = True
) -> None:
    return None  # only mutates its inputs


@_ext.when_loaded  # registering a fake needs the C++ schema (csrc/ops.cpp) to exist
def _register_fake() -> None:
    torch.library.register_fake("janus::remask_lowest", _remask_lowest_fake)


def _remask_lowest_compiled(
    tokens: Tensor, scores: Tensor, counts: Tensor, mask: int, pad: int, bos: int, eos: int, check: bool = True
) -> tuple[Tensor, Tensor]:
    torch.ops.janus.remask_lowest(tokens, scores, counts, mask, pad, bos, eos, check)
    return tokens, scores


def _fits_cuda_kernel(tokens: Tensor, scores: Tensor, counts: Tensor, *args, **kwargs) -> Verdict:
    ok, why = all_on_cuda(tokens, scores, counts)
    if ok and tokens.dim() == 2 and tokens.shape[1] > CUDA_MAX_LENGTH:
        return False, f"rows of {tokens.shape[1]} tokens exceed the CUDA kernel's {CUDA_MAX_LENGTH}"
    return ok, why


REMASK_LOWEST = register_op(
    "remask_lowest",
    [
        Backend(
            "cuda", _remask_lowest_compiled, available=compiled("remask_lowest", "cuda"), supports=_fits_cuda_kernel
        ),
        Backend("cpp", _remask_lowest_compiled, available=compiled("remask_lowest", "cpu"), supports=all_on_cpu),
        Backend("reference", remask_lowest_ref),
    ],
)


def remask_lowest(
    tokens: Tensor, scores: Tensor, counts: Tensor, mask: int, pad: int, bos: int, eos: int, check: bool = True
) -> tuple[Tensor, Tensor]:
    """Re-mask the ``counts[r]`` lowest-scoring non-special tokens of each row, in place.

    Same contract as ``remask_lowest_ref``, on the fastest available backend.

    Args:
        tokens: int64 (R, L) canvases (any strides), modified in place.
        scores: float, double, half or bfloat16 (R, L), modified in place.
        counts: int64 (R,), 0 <= counts[r] <= number of tokens of row r other than pad/bos/eos.
        mask, pad, bos, eos: special ids.
        check: raise on a count out of range (on CUDA a device-to-host sync per call); when False
            counts are clamped into [0, non-special tokens of the row] and the call never syncs.
    Returns:
        (tokens, scores), the same tensors.
    Raises:
        ValueError: bad shapes, or (check) a count out of range, naming the row; nothing is written then.
    """
    return REMASK_LOWEST(tokens, scores, counts, mask, pad, bos, eos, check)
