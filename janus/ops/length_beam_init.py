"""length_beam_init: the l most likely target lengths of each sentence -> mask-predict canvases.

For sentence b with length scores ``s[b, n]`` (n = target length with bos and eos):

    lengths[b*l + i] = the i-th best n in [min_len, max_len[b]] by s[b, n]  (ties: smaller n first)
    tokens[b*l + i]  = [bos, <mask> x (n - 2), eos, pad ...]

When fewer than l lengths are allowed, the remaining candidates repeat clamped
lengths. ``length_beam_init_ref`` is the specification; a compiled backend joins
the dispatch list ahead of it (JANUS_BACKEND_LENGTH_BEAM_INIT forces one).
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from janus.ops._dispatch import Backend, register_op


def length_beam_init_ref(
    length_scores: Tensor,
    beam: int,
    min_len: int,
    max_len: Union[int, Tensor],
    bos: int,
    eos: int,
    mask: int,
    pad: int,
) -> tuple[Tensor, Tensor]:
    """Reference implementation.

    Args:
        length_scores: float (B, C), score of target length n = column index (with bos, eos).
        beam: l >= 1 candidates per sentence.
        min_len: smallest allowed n (>= 2: bos and eos).
        max_len: largest allowed n, an int or int64 (B,) per sentence; capped at C - 1.
        bos, eos, mask, pad: special ids.
    Returns:
        tokens int64 (B*l, Lmax) with Lmax the longest chosen n, and lengths int64 (B*l,);
        the candidates of sentence b are rows b*l .. b*l + l - 1, best first.
    """
    if length_scores.dim() != 2:
        raise ValueError(f"length_scores must be (B, C), got shape {tuple(length_scores.shape)}")
    B, C = length_scores.shape
    if beam < 1:
        raise ValueError(f"beam={beam} must be >= 1")
    if min_len < 2 or min_len > C - 1:
        raise ValueError(f"min_len={min_len} must be in [2, {C - 1}] (a canvas holds bos and eos)")
    dev = length_scores.device
    hi = torch.as_tensor(max_len, device=dev).expand(B).clamp(min_len, C - 1)  # (B,)
    n = torch.arange(C, device=dev)
    allowed = (n[None, :] >= min_len) & (n[None, :] <= hi[:, None])  # (B, C)
    scores = torch.where(allowed, length_scores.float(), float("-inf"))
    # A stable descending sort keeps equal scores in index order: the smaller length first. A second
    # stable sort puts every allowed length (even one scored -inf) before the disallowed ones.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    first = torch.sort((~allowed.gather(1, order)).to(torch.int8), dim=1, stable=True).indices
    order = order.gather(1, first)[:, :beam]  # (B, min(l, C))
    if order.shape[1] < beam:
        order = torch.cat([order, order[:, -1:].expand(B, beam - order.shape[1])], 1)
    lengths = torch.minimum(order.clamp_min(min_len), hi[:, None]).reshape(-1).long()  # (B*l,)
    return canvases(lengths, bos=bos, eos=eos, mask=mask, pad=pad), lengths


def canvases(lengths: Tensor, *, bos: int, eos: int, mask: int, pad: int) -> Tensor:
    """All-``<mask>`` canvases [bos, mask x (L-2), eos, pad ...] of lengths L (int64 (R,)): int64 (R, max L)."""
    L = int(lengths.max()) if lengths.numel() else 2
    col = torch.arange(L, device=lengths.device)[None, :]
    tokens = torch.where(col < lengths[:, None] - 1, mask, pad)
    tokens = torch.where(col == lengths[:, None] - 1, eos, tokens)
    tokens[:, 0] = bos
    return tokens.long()


LENGTH_BEAM_INIT = register_op("length_beam_init", [Backend("reference", length_beam_init_ref)])


def length_beam_init(
    length_scores: Tensor,
    beam: int,
    min_len: int,
    max_len: Union[int, Tensor],
    bos: int,
    eos: int,
    mask: int,
    pad: int,
) -> tuple[Tensor, Tensor]:
    """Top-``beam`` target lengths per sentence and their all-``<mask>`` canvases.

    Same contract as ``length_beam_init_ref``, on the fastest available backend.
    """
    return LENGTH_BEAM_INIT(length_scores, beam, min_len, max_len, bos, eos, mask, pad)
