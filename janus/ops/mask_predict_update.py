"""mask_predict_update: one mask-predict pass's new tokens and scores at the masked slots.

For every slot (r, t) with tokens[r, t] == mask:

    logp = log_softmax(hidden[r, t] @ weight.T)           (fp32, over the whole vocabulary)
    tokens[r, t] = argmax_{v not banned} logp[v]           (ties: the smaller id)
    scores[r, t] = logp[tokens[r, t]]

Banned ids are never chosen but still count in the normalisation. Only the masked
slots are projected: the logits of the other rows are never formed. Unmasked slots
are left untouched; works in place and returns its inputs.

``mask_predict_update_ref`` is the specification, the fallback and the test oracle;
``mask_predict_update`` dispatches (janus.ops._dispatch) between:

- "triton": ``janus.kernels.mask_predict_update`` (kernels/mask_predict_update.py), CUDA
  tensors: one fused kernel that streams over the vocabulary with an online log-sum-exp
  and argmax, so that the (slots, V) logits never reach memory (imported on first call).
  Its fp16/bf16 logits stay in fp32 where the reference rounds them to the inputs' dtype,
  so the two may pick different tokens at near-ties;
- "reference": ``mask_predict_update_ref``, which forms the logits of the masked slots.

Force one with ``JANUS_BACKEND_MASK_PREDICT_UPDATE=triton|reference``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from janus.ops._dispatch import Backend, Verdict, all_on_cuda, register_op, triton_available


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


def _mask_predict_update_triton(
    hidden: Tensor, weight: Tensor, tokens: Tensor, scores: Tensor, mask: int, banned: Sequence[int]
) -> tuple[Tensor, Tensor]:
    from janus.kernels.mask_predict_update import mask_predict_update_triton  # imports triton: first call only

    return mask_predict_update_triton(hidden, weight, tokens, scores, mask, banned)


def _fits_triton_kernel(*args, **kwargs) -> Verdict:
    ok, why = all_on_cuda(*args, **kwargs)
    hidden, weight = (list(args[:2]) + [None, None])[:2]
    if ok and isinstance(hidden, Tensor) and isinstance(weight, Tensor) and hidden.dtype != weight.dtype:
        return False, f"hidden ({hidden.dtype}) and weight ({weight.dtype}) differ in dtype"
    return ok, why


MASK_PREDICT_UPDATE = register_op(
    "mask_predict_update",
    [
        Backend("triton", _mask_predict_update_triton, available=triton_available, supports=_fits_triton_kernel),
        Backend("reference", mask_predict_update_ref),
    ],
)


def mask_predict_update(
    hidden: Tensor, weight: Tensor, tokens: Tensor, scores: Tensor, mask: int, banned: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Fill every ``<mask>`` slot with its best allowed token and that token's log-probability.

    Same contract as ``mask_predict_update_ref``, on the fastest available backend.

    Args:
        hidden: (R, L, D) final decoder states of the canvas rows: fp16, bf16, fp32 or fp64, any strides.
        weight: (V, D) output projection (the shared embedding), the dtype of ``hidden``.
        tokens: int64 (R, L) canvases, updated in place at the slots equal to ``mask``.
        scores: float (R, L) (fp32 normally), updated in place at the same slots, in its own dtype.
        mask: the ``<mask>`` id.
        banned: ids never chosen (e.g. pad, bos, eos, mask), each in [0, V); their probability
            still counts in the normalisation.
    Returns:
        (tokens, scores), the same tensors. At every masked slot the best allowed id (ties: the
        smaller id) and its log-probability, computed in fp32; every other slot is unchanged.
    """
    return MASK_PREDICT_UPDATE(hidden, weight, tokens, scores, mask, banned)
