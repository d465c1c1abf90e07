"""janus_linear_loss: the masked-token loss from decoder states and the shared output projection.

    loss = janus_loss(h_ar @ W.T, h_nar @ W.T, h_aux @ W.T, ...)     (janus/ops/janus_loss.py)

with W (V, D) the output projection (the shared embedding). ``janus_linear_loss_ref``
is the specification: one GEMM over the three row sets, then ``janus_loss_ref``. It
is what training runs where the fused path does not apply.

``janus_linear_loss`` dispatches (janus.ops._dispatch) between:

- "triton": ``ChunkedLinearJanusLoss`` (an autograd.Function) over
  kernels/janus_loss.py's chunked driver: per chunk of AR rows and the masked rows
  paired with them it forms that chunk's logits, runs the fused loss kernel (which
  turns them into d loss / d logits in place) and folds them into the gradients of
  the states and of W (W's accumulated in fp32). The (rows, V) logits are never
  materialised. CUDA tensors, pair_index without repeats;
- "cpu": the same Function over the same chunked scheme in PyTorch for CPU tensors:
  per chunk of AR rows and their paired masked rows, one GEMM forms the chunk's logits
  in the compute dtype, the loss terms and d loss / d logits are computed in fp32 in
  closed form (softmax statistics once per row, no autograd graph over [rows x V]),
  then one GEMM each gives the chunk's d states and adds its share of d W (fp32
  accumulator). A chunk's fp32 buffers stay in the cache, where the reference streams
  several [rows x V] fp32 tensors through memory in forward and backward. Takes any
  pair_index (repeats too);
- "reference": ``janus_linear_loss_ref``.

Under torch.autocast every backend computes the projection in the autocast dtype (as
F.linear would) and the loss in fp32; the gradient of W comes back in W's dtype. Force
a backend with ``JANUS_BACKEND_JANUS_LINEAR_LOSS=triton|cpu|reference``.
"""

from __future__ import annotations

from dataclasses import astuple
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from janus.ops._dispatch import Backend, Verdict, all_on_cpu, register_op, triton_available
from janus.ops.janus_loss import (
    TERMS,
    LossScales,
    MaskedTokenLoss,
    fits_triton_loss_kernel,
    janus_loss_ref,
    scale_precomputed_grads,
)
from janus.ops.loss_terms import loss_terms


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


class ChunkedLinearJanusLoss(torch.autograd.Function):
    """Either chunked path as an autograd.Function: ``driver`` (the Triton driver or the CPU one)
    computes the gradients in the forward (for a loss gradient of 1); the backward scales them in
    place, so each runs once per forward. ``label`` names the path in errors."""

    @staticmethod
    def forward(
        ctx: Any,
        driver: Any,
        label: str,
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
        need_h = any(ctx.needs_input_grad[2:5])
        loss, sums, grads_h, grad_w = driver(
            hidden_ar, hidden_nar, hidden_aux, weight, ar_targets, masked_targets, pair_index, eps, scales,
            ignore_index, need_hidden_grad=need_h, need_weight_grad=ctx.needs_input_grad[5],
            compute_dtype=compute_dtype, chunk_rows=chunk_rows,
        )  # fmt: skip
        ctx.grads = (*grads_h, grad_w.to(weight.dtype) if grad_w is not None else None)
        ctx.label = label
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, grad_sums: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        return (None, None, *scale_precomputed_grads(ctx, grad_loss, ctx.label), *([None] * 8))


def _triton_driver(*args: Any, **kwargs: Any) -> Any:
    from janus.kernels.janus_loss import janus_linear_loss_forward

    return janus_linear_loss_forward(*args, **kwargs)


def _cpu_driver(*args: Any, **kwargs: Any) -> Any:
    *head, scales, ignore_index = args
    return janus_linear_loss_cpu_forward(*head, LossScales(*scales), ignore_index, **kwargs)


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype F.linear would compute in here: the autocast dtype inside autocast, else the promotion."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _apply_chunked(
    driver: Any,
    label: str,
    hidden_ar: Optional[Tensor],
    hidden_nar: Optional[Tensor],
    hidden_aux: Optional[Tensor],
    weight: Tensor,
    ar_targets: Optional[Tensor],
    masked_targets: Optional[Tensor],
    pair_index: Optional[Tensor],
    eps: float,
    scales: LossScales,
    ignore_index: int,
    chunk_rows: Optional[int],
) -> MaskedTokenLoss:
    """Check the arguments shared by both chunked paths and run ``driver`` through
    ChunkedLinearJanusLoss in the dtype F.linear would compute in, autocast off inside."""
    first = next((h for h in (hidden_ar, hidden_nar, hidden_aux) if h is not None), None)
    if first is None:
        raise ValueError("janus_linear_loss: no decoder states given")
    if hidden_ar is not None and any(h is not None and h.shape[0] for h in (hidden_nar, hidden_aux)):
        if pair_index is None:
            raise ValueError("pair_index is required for the SKL terms between P_AR and the masked rows")
    dtype = _compute_dtype(first, weight)
    with torch.autocast(first.device.type, enabled=False):
        loss, sums = ChunkedLinearJanusLoss.apply(
            driver, label, hidden_ar, hidden_nar, hidden_aux, weight, ar_targets, masked_targets, pair_index, eps,
            astuple(scales), ignore_index, dtype, chunk_rows,
        )  # fmt: skip
    return MaskedTokenLoss(loss, sums)


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
    return _apply_chunked(_triton_driver, "janus_linear_loss (triton)", hidden_ar, hidden_nar, hidden_aux, weight,
                          ar_targets, masked_targets, pair_index, eps, scales, ignore_index, chunk_rows)  # fmt: skip


def _janus_linear_loss_triton(*args: Any, **kwargs: Any) -> MaskedTokenLoss:
    from janus.kernels.janus_loss import RepeatedPairsError

    try:
        return janus_linear_loss_triton(*args, **kwargs)
    except RepeatedPairsError:  # the kernel needs distinct pairs; the reference takes any
        return janus_linear_loss_ref(*args, **kwargs)


# -- the CPU backend ------------------------------------------------------------------------------
def cpu_chunk_rows(vocab: int, rows_per_lead: float, budget: int = 1 << 24) -> int:
    """Lead rows (AR rows, else masked rows) per chunk of the CPU path: about ``budget`` logits over
    the chunk's rows of every stream (64 MB in fp32), at least 32 rows.

    Large on purpose: every elementwise op of a chunk is one parallel region, and on a busy 2-core
    machine each region waits for its slowest thread, so many small chunks cost more than the
    cache misses of a few large ones (measured: 4 chunks of a small-preset janus batch took 1.3-1.7x
    the time of one chunk at 2 threads, about the same at 1 thread). Memory stays bounded by the
    budget, not by the batch."""
    return max(32, int(budget / max(1.0, vocab * rows_per_lead)))


def janus_linear_loss_cpu_forward(
    hidden_ar: Optional[Tensor],
    hidden_nar: Optional[Tensor],
    hidden_aux: Optional[Tensor],
    weight: Tensor,
    ar_targets: Optional[Tensor],
    masked_targets: Optional[Tensor],
    pair_index: Optional[Tensor],
    eps: float,
    scales: LossScales,
    ignore_index: int,
    *,
    need_hidden_grad: bool,
    need_weight_grad: bool,
    compute_dtype: torch.dtype,
    chunk_rows: Optional[int] = None,
) -> tuple[Tensor, Tensor, tuple[Optional[Tensor], ...], Optional[Tensor]]:
    """The loss from decoder states and the shared projection, chunk by chunk, with its gradients (CPU).

    1. Masked rows are ordered by their AR row (training rows already are), so that the masked rows
       of a chunk of AR rows are one contiguous range.
    2. Per chunk: logits = [h_ar; h_nar; h_aux] @ weight.T in ``compute_dtype`` (one GEMM), the terms
       and d loss / d logits in fp32 (``loss_terms``, janus/ops/loss_terms.py), then d h = g @ weight and
       d weight += g.T @ h with g rounded to ``compute_dtype`` (fp32 accumulator).

    Returns:
        (loss () fp32, sums (9,) fp32, (d hidden_ar, d hidden_nar, d hidden_aux) in the states'
        dtypes or None, d weight fp32 or None), gradients for a loss gradient of 1.
    """
    hs = [hidden_ar, hidden_nar, hidden_aux]
    if hs[1] is not None and hs[1].shape[0] == 0:
        hs[1] = None
    if hs[2] is not None and hs[2].shape[0] == 0:
        hs[2] = None
    acc = torch.promote_types(compute_dtype, torch.float32)
    device = weight.device
    has_a, has_m = hs[0] is not None, hs[1] is not None or hs[2] is not None
    empty_m = not has_m and any(h is not None for h in (hidden_nar, hidden_aux))
    need_grad = need_hidden_grad or need_weight_grad
    grad_w = torch.zeros(weight.shape, dtype=acc, device=device) if need_weight_grad else None
    # Every row belongs to exactly one chunk, which writes its gradient: no zero fill is needed.
    grads_h: list[Optional[Tensor]] = [
        torch.empty_like(h) if h is not None and need_hidden_grad else None
        for h in (hidden_ar, hidden_nar, hidden_aux)
    ]  # fmt: skip
    total = torch.zeros((), dtype=acc, device=device)
    sums = torch.zeros(len(TERMS), dtype=acc, device=device)
    if not has_a and not has_m:
        if empty_m:  # only empty masked streams: nothing to compute
            return total.float(), sums.float(), tuple(grads_h), grad_w.zero_() if grad_w is not None else None
        raise ValueError("janus_linear_loss: no decoder states given")
    w = weight.to(compute_dtype)
    V = weight.shape[0]
    m_rows = next((h.shape[0] for h in hs[1:] if h is not None), 0)
    mtarget = masked_targets if has_m else None

    # 1. Masked rows in the order of their AR rows.
    order = None
    pairs = pair_index if has_a and has_m else None
    if pairs is not None:
        if pairs.shape[0] > 1 and not bool((pairs[1:] >= pairs[:-1]).all()):
            order = torch.argsort(pairs, stable=True)
            pairs = pairs.index_select(0, order)
            hs = [hs[0]] + [h.index_select(0, order) if h is not None else None for h in hs[1:]]
            mtarget = mtarget.index_select(0, order)
    lead_rows = hs[0].shape[0] if has_a else m_rows
    streams = sum(h is not None for h in hs)
    per_lead = 1.0 + (streams - 1) * m_rows / max(lead_rows, 1) if has_a else float(streams)
    step = chunk_rows or cpu_chunk_rows(V, per_lead)
    starts = list(range(0, lead_rows, step))
    if pairs is not None:
        bounds = torch.tensor([*starts, lead_rows], dtype=pairs.dtype, device=device)
        edges = torch.searchsorted(pairs, bounds).tolist()  # one pass for every chunk's masked range
    # Gradients of the masked rows in chunk order (the caller's order when no reordering was needed).
    d_masked = [
        None if h is None or not need_hidden_grad else grads_h[k] if order is None else torch.empty_like(h)
        for k, h in enumerate(hs)
    ]  # fmt: skip
    sc = astuple(scales)

    # 2. Chunk by chunk.
    for i, start in enumerate(starts):
        end = min(start + step, lead_rows)
        if has_a:
            lo, hi = (edges[i], edges[i + 1]) if pairs is not None else (0, 0)
            a_part = [hs[0][start:end]]
            local = pairs[lo:hi] - start if pairs is not None else None
            targets = [ar_targets[start:end]]
        else:
            lo, hi, local = start, end, None
            a_part, targets = [], []
        m_part = [h[lo:hi] for h in hs[1:] if h is not None]
        if m_part:
            targets += [mtarget[lo:hi]] * len(m_part)
        counts = (end - start if has_a else 0, hi - lo if hs[1] is not None else 0, hi - lo if hs[2] is not None else 0)
        h_chunk = torch.cat([x.to(compute_dtype) for x in a_part + m_part])  # (rows, D)
        logits = h_chunk @ w.T  # (rows, V)
        y = torch.cat(targets)
        keep = (y != ignore_index).to(acc)
        part, g = loss_terms(logits, counts, y.clamp_min(0), keep, local, eps, scales, need_grad, compute_dtype)
        sums += part
        if g is None:
            continue
        if need_hidden_grad:
            dh = g @ w  # (rows, D)
            if has_a:
                grads_h[0][start:end] = dh[: end - start]
            offset = counts[0]
            for k in (1, 2):
                if counts[k]:
                    d_masked[k][lo:hi] = dh[offset : offset + counts[k]]
                    offset += counts[k]
        if grad_w is not None:
            if compute_dtype == acc:
                grad_w.addmm_(g.T, h_chunk)
            else:
                grad_w += (g.T @ h_chunk).to(acc)
    if need_hidden_grad and order is not None:
        for k in (1, 2):
            if d_masked[k] is not None:
                grads_h[k].index_copy_(0, order, d_masked[k])
    for k, name in enumerate(("ar", "nar", "aux", "skl_ar_nar", "skl_ar_aux", "skl_nar_aux")):
        total = total + sc[k] * sums[TERMS.index(name)]  # sc[6], skl_grad_ar, only shapes gradients
    out_dtype = torch.promote_types(acc, torch.float32)
    return total.to(out_dtype), sums.to(out_dtype), tuple(grads_h), grad_w


def janus_linear_loss_cpu(
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
    """The chunked CPU path (see the module docstring); ``chunk_rows`` overrides the chunk size (tests).

    Same arguments and result as ``janus_linear_loss_ref``; CPU tensors.
    """
    return _apply_chunked(_cpu_driver, "janus_linear_loss (cpu)", hidden_ar, hidden_nar, hidden_aux, weight,
                          ar_targets, masked_targets, pair_index, eps, scales, ignore_index, chunk_rows)  # fmt: skip


def fits_cpu_path(*args: Any, **kwargs: Any) -> Verdict:
    """``supports`` of the CPU path: CPU tensors (any float dtype; the terms are computed in fp32, or
    in fp64 for fp64 inputs)."""
    return all_on_cpu(*args, **kwargs)


JANUS_LINEAR_LOSS = register_op(
    "janus_linear_loss",
    [
        Backend("triton", _janus_linear_loss_triton, available=triton_available, supports=fits_triton_loss_kernel),
        Backend("cpu", janus_linear_loss_cpu, supports=fits_cpu_path),
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
            masked row; eps: label smoothing; scales: the term multipliers (``LossScales``); ignore_index.
    Returns:
        MaskedTokenLoss(loss () fp32, sums (9,) fp32 in TERMS order).
    """
    return JANUS_LINEAR_LOSS(
        hidden_ar, hidden_nar, hidden_aux, weight, ar_targets, masked_targets, pair_index, eps, scales, ignore_index
    )
