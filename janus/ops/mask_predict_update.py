"""mask_predict_update: one mask-predict pass's new tokens and scores at the masked slots.

For every slot (r, t) with tokens[r, t] == mask:

    logp = log_softmax(hidden[r, t] @ weight.T)           (fp32, over the whole vocabulary)
    tokens[r, t] = argmax_{v not banned} logp[v]           (ties: the smaller id)
    scores[r, t] = logp[tokens[r, t]]

Only the masked slots are projected: the logits of the other rows are never formed.
``mask_predict_update_ref`` is the specification; a fused kernel that streams over
the vocabulary joins the dispatch list ahead of it (JANUS_BACKEND_MASK_PREDICT_UPDATE).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from janus.ops._dispatch import Backend, register_op


def mask_predict_update_ref(
    hidden: Tensor, weight: Tensor, tokens: Tensor, scores: Tensor, mask: int, banned: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Reference implementation.

    Args:
        hidden: (R, L, D) final decoder states of the canvas rows (any float dtype).
        weight: (V, D) output projection (the shared embedding).
        tokens: int64 (R, L) canvases, updated in place at the masked slots.
        scores: float (R, L), updated in place at the masked slots.
        mask: the ``<mask>`` id.
        banned: ids never chosen (e.g. pad, bos, eos, mask); their probability still counts
            in the normalisation.
    Returns:
        (tokens, scores), the same tensors.
    """
    slots = (tokens == mask).reshape(-1).nonzero().squeeze(1)  # (M,)
    if slots.numel() == 0:
        return tokens, scores
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, slots)  # (M, D)
    logp = F.log_softmax(F.linear(h, weight).float(), dim=-1)  # (M, V)
    choice = logp.clone() if banned else logp
    if banned:
        choice[:, list(banned)] = float("-inf")
    best, tok = choice.max(dim=-1)
    tokens.view(-1).index_copy_(0, slots, tok)
    scores.view(-1).index_copy_(0, slots, best.to(scores.dtype))
    return tokens, scores


MASK_PREDICT_UPDATE = register_op("mask_predict_update", [Backend("reference", mask_predict_update_ref)])


def mask_predict_update(
    hidden: Tensor, weight: Tensor, tokens: Tensor, scores: Tensor, mask: int, banned: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Fill every ``<mask>`` slot with its best allowed token and that token's log-probability.

    Same contract as ``mask_predict_update_ref``, on the fastest available backend.
    """
    return MASK_PREDICT_UPDATE(hidden, weight, tokens, scores, mask, banned)
