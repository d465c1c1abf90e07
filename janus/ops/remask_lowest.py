"""remask_lowest: the re-masking step of mask-predict.

Per row r, among the non-special tokens (not pad, bos or eos), the ``counts[r]``
lowest-scoring ones become ``<mask>`` and their scores 0. Ties go to the smaller
position, so the result is deterministic. Works in place and returns its inputs.
``remask_lowest_ref`` is the specification; a compiled backend joins the dispatch
list ahead of it (JANUS_BACKEND_REMASK_LOWEST forces one).
"""

from __future__ import annotations

import torch
from torch import Tensor

from janus.ops._dispatch import Backend, register_op


def remask_lowest_ref(
    tokens: Tensor, scores: Tensor, counts: Tensor, mask: int, pad: int, bos: int, eos: int
) -> tuple[Tensor, Tensor]:
    """Reference implementation.

    Args:
        tokens: int64 (R, L) canvases, modified in place.
        scores: float (R, L) score of each token, modified in place.
        counts: int64 (R,), 0 <= counts[r] <= number of non-special tokens of row r.
        mask, pad, bos, eos: special ids.
    Returns:
        (tokens, scores), the same tensors.
    Raises:
        ValueError: a count below 0 or above its row's number of non-special tokens.
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
    if bool(bad.any()):
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


REMASK_LOWEST = register_op("remask_lowest", [Backend("reference", remask_lowest_ref)])


def remask_lowest(
    tokens: Tensor, scores: Tensor, counts: Tensor, mask: int, pad: int, bos: int, eos: int
) -> tuple[Tensor, Tensor]:
    """Re-mask the ``counts[r]`` lowest-scoring non-special tokens of each row, in place.

    Same contract as ``remask_lowest_ref``, on the fastest available backend.
    """
    return REMASK_LOWEST(tokens, scores, counts, mask, pad, bos, eos)
