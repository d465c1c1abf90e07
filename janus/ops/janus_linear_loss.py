"""janus_linear_loss: the masked-token loss from decoder states and the shared output projection.

    loss = janus_loss(h_ar @ W.T, h_nar @ W.T, h_aux @ W.T, ...)     (janus/ops/janus_loss.py)

with W (V, D) the output projection (the shared embedding). ``janus_linear_loss_ref``
is the specification: one GEMM over the three row sets, then ``janus_loss_ref``. It
is what training runs where the fused path does not apply.

``janus_linear_loss`` dispatches (janus.ops._dispatch) between:

- "triton": ``FusedLinearJanusLoss``, an autograd.Function over
  kernels/janus_loss.py's chunked driver: per chunk of AR rows and the masked rows
  paired with them it forms that chunk's logits, runs the fused loss kernel (which
  turns them into d loss / d logits in place) and folds them into the gradients of
  the states and of W (W's accumulated in fp32). The (rows, V) logits are never
  materialised. CUDA tensors, pair_index without repeats;
- "reference": ``janus_linear_loss_ref``.

Under torch.autocast both compute in the autocast dtype (as F.linear would); the
gradient of W comes back in W's dtype. Force a backend with
``JANUS_BACKEND_JANUS_LINEAR_LOSS=triton|reference``.
"""

from __future__ import annotations

from dataclasses import astuple
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from janus.ops._dispatch import Backend, register_op, triton_available
from janus.ops.janus_loss import (
    LossScales,
    MaskedTokenLoss,
    fits_triton_loss_kernel,
    janus_loss_ref,
    scale_precomputed_grads,
)


def janus_linear_loss_ref(
    hidden_ar: Optional[Tensor],
    hidden_nar: Optional[Tensor],
    hidden_aux: Optional[Tensor],
    weight: Tensor,
    ar_targets: Optional[Tensor],
    masked_targets: Optional[Tensor],
    pair_index: Optional[Tensor],
    eps: float,
    scales: LossScales,
    ignore_index: int = -100,
) -> MaskedTokenLoss:
    """Reference implementation: project the given rows in one GEMM, then ``janus_loss_ref``.

    Args:
        hidden_ar: (N, D) decoder states of the AR query rows, or None.
        hidden_nar: (M, D) states of the P rows (P_NAR), or None.
        hidden_aux: (M, D) states of the Q rows (P_AUX), or None.
        weight: (V, D) output projection.
        ar_targets, masked_targets, pair_index, eps, scales, ignore_index: as in ``janus_loss_ref``.
    Returns:
        MaskedTokenLoss(loss () fp32, sums (9,) fp32).
    """
    parts = [h for h in (hidden_ar, hidden_nar, hidden_aux) if h is not None]
    if not parts:
        raise ValueError("janus_linear_loss: no decoder states given")
    logits = F.linear(torch.cat(parts), weight)  # (N + 2M, V)
    out: list[Optional[Tensor]] = []
    start = 0
    for h in (hidden_ar, hidden_nar, hidden_aux):
        if h is None:
            out.append(None)
        else:
            out.append(logits[start : start + h.shape[0]])
            start += h.shape[0]
    return janus_loss_ref(out[0], ar_targets, out[1], out[2], masked_targets, pair_index, eps, scales, ignore_index)


class FusedLinearJanusLoss(torch.autograd.Function):
    """The chunked fused path as an autograd.Function: gradients are computed in the forward (for a
    loss gradient of 1) and scaled in the backward, in place, so it runs once per forward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden_ar: Optional[Tensor],
        hidden_nar: Optional[Tensor],
        hidden_aux: Optional[Tensor],
        weight: Tensor,
        ar_targets: Optional[Tensor],
        masked_targets: Optional[Tensor],
        pair_index: Optional[Tensor],
        eps: float,
        scales: tuple[float, ...],
        ignore_index: int,
        compute_dtype: torch.dtype,
        chunk_rows: Optional[int],
    ) -> tuple[Tensor, Tensor]:
        from janus.kernels.janus_loss import janus_linear_loss_forward

        need_h = any(ctx.needs_input_grad[:3])
        loss, sums, grads_h, grad_w = janus_linear_loss_forward(
            hidden_ar, hidden_nar, hidden_aux, weight, ar_targets, masked_targets, pair_index, eps, scales,
            ignore_index, need_hidden_grad=need_h, need_weight_grad=ctx.needs_input_grad[3],
            compute_dtype=compute_dtype, chunk_rows=chunk_rows,
        )  # fmt: skip
        ctx.grads = (*grads_h, grad_w.to(weight.dtype) if grad_w is not None else None)
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, grad_sums: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        return (*scale_precomputed_grads(ctx, grad_loss, "janus_linear_loss"), *([None] * 8))


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype F.linear would compute in here: the autocast dtype inside autocast, else the promotion."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def janus_linear_loss_triton(
    hidden_ar: Optional[Tensor],
    hidden_nar: Optional[Tensor],
    hidden_aux: Optional[Tensor],
    weight: Tensor,
    ar_targets: Optional[Tensor],
    masked_targets: Optional[Tensor],
    pair_index: Optional[Tensor],
    eps: float,
    scales: LossScales,
    ignore_index: int = -100,
    chunk_rows: Optional[int] = None,
) -> MaskedTokenLoss:
    """The fused path (see the module docstring); ``chunk_rows`` overrides the chunk size (tests)."""
    first = next((h for h in (hidden_ar, hidden_nar, hidden_aux) if h is not None), None)
    if first is None:
        raise ValueError("janus_linear_loss: no decoder states given")
    if hidden_ar is not None and any(h is not None and h.shape[0] for h in (hidden_nar, hidden_aux)):
        if pair_index is None:
            raise ValueError("pair_index is required for the SKL terms between P_AR and the masked rows")
    dtype = _compute_dtype(first, weight)
    with torch.autocast(first.device.type, enabled=False):
        loss, sums = FusedLinearJanusLoss.apply(
            hidden_ar, hidden_nar, hidden_aux, weight, ar_targets, masked_targets, pair_index, eps,
            astuple(scales), ignore_index, dtype, chunk_rows,
        )  # fmt: skip
    return MaskedTokenLoss(loss, sums)


def _janus_linear_loss_triton(*args: Any, **kwargs: Any) -> MaskedTokenLoss:
    from janus.kernels.janus_loss import RepeatedPairsError

    try:
        return janus_linear_loss_triton(*args, **kwargs)
    except RepeatedPairsError:  # the kernel needs distinct pairs; the reference takes any
        return janus_linear_loss_ref(*args, **kwargs)


JANUS_LINEAR_LOSS = register_op(
    "janus_linear_loss",
    [
        Backend("triton", _janus_linear_loss_triton, available=triton_available, supports=fits_triton_loss_kernel),
        Backend("reference", janus_linear_loss_ref),
    ],
)


def janus_linear_loss(
    hidden_ar: Optional[Tensor],
    hidden_nar: Optional[Tensor],
    hidden_aux: Optional[Tensor],
    weight: Tensor,
    ar_targets: Optional[Tensor],
    masked_targets: Optional[Tensor],
    pair_index: Optional[Tensor],
    eps: float,
    scales: LossScales,
    ignore_index: int = -100,
) -> MaskedTokenLoss:
    """The masked-token loss of the projected decoder states, on the best available backend.

    Args:
        hidden_ar: (N, D) states of the AR query rows, or None.
        hidden_nar, hidden_aux: (M, D) states of the P / Q rows, or None.
        weight: (V, D) output projection (the shared embedding).
        ar_targets: int64 (N,); masked_targets: int64 (M,); pair_index: int64 (M,) AR row of each
            masked row; eps: label smoothing; scales: the six term multipliers; ignore_index.
    Returns:
        MaskedTokenLoss(loss () fp32, sums (9,) fp32 in TERMS order).
    """
    return JANUS_LINEAR_LOSS(
        hidden_ar, hidden_nar, hidden_aux, weight, ar_targets, masked_targets, pair_index, eps, scales, ignore_index
    )
