"""The masked-token loss across the three distributions (JANUS.md section 3).

For AR rows a_n (n = 1..N, all AR targets) and masked rows j = 1..M with P_NAR
logits b_j, P_AUX logits c_j and the paired AR row a_{pair(j)}:

    ls(z, y)   = (1 - eps) * (-log p_z(y)) - eps * mean_v log p_z(v)
    SKL(z, w)  = (KL(p_z || p_w) + KL(p_w || p_z)) / 2 = 1/2 * sum_v (p_z,v - p_w,v)(log p_z,v - log p_w,v)

    loss = s_ar  * sum_n ls(a_n, y_n)
         + s_nar * sum_j ls(b_j, y_j) + s_aux * sum_j ls(c_j, y_j)
         + s_an  * sum_j SKL(a_pair(j), b_j) + s_ac * sum_j SKL(a_pair(j), c_j)
         + s_nc  * sum_j SKL(b_j, c_j)

The six scales s_* carry both the weights of the objective and the
normalisation (weight / number of tokens of that term), so the same function
serves a mean over one batch or over a whole distributed update. Everything is
computed in fp32 whatever the logits' dtype, with gradients into both sides of
every SKL (no stop-gradient) unless ``LossScales.skl_grad_ar`` scales the share that
reaches P_AR. Rows whose target is ``ignore_index`` contribute nothing.

``janus_loss_ref`` is the specification, the CPU fallback and the oracle of the
fused kernel; ``janus_loss`` dispatches (janus.ops._dispatch) between:

- "triton": the fused kernel (kernels/janus_loss.py) through ``FusedJanusLoss``, an
  autograd.Function: one streaming pass over the vocabulary per row for every term,
  and the gradients computed in the same launch into one buffer per logits tensor,
  in the logits' dtype (no [rows x V] fp32 buffer). CUDA tensors, fp32/fp16/bf16
  logits with unit stride along V, pair_index without repeats (otherwise the
  reference runs, logged once);
- "reference": ``janus_loss_ref``.

Force one with ``JANUS_BACKEND_JANUS_LOSS=triton|reference``.
"""

from __future__ import annotations

import logging
from dataclasses import astuple, dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from janus.ops._dispatch import Backend, Verdict, all_on_cuda, register_op, triton_available

log = logging.getLogger(__name__)

# Order of the per-term sums returned for logging.
TERMS = ("ar", "nar", "aux", "skl_ar_nar", "skl_ar_aux", "skl_nar_aux", "ar_nll", "nar_nll", "aux_nll")


@dataclass(frozen=True)
class LossScales:
    """Multipliers of the summed terms (weight / token count of the term)."""

    ar: float = 0.0
    nar: float = 0.0
    aux: float = 0.0
    skl_ar_nar: float = 0.0
    skl_ar_aux: float = 0.0
    skl_nar_aux: float = 0.0
    # Factor on the gradient that the SKL terms send into the AR logits: 1 is the published objective
    # (gradients into both sides); 0 a stop-gradient, P_AR a fixed teacher of P_NAR and P_AUX. The loss
    # value does not depend on it.
    skl_grad_ar: float = 1.0


@dataclass
class MaskedTokenLoss:
    """Result: the scalar to backpropagate and the unscaled per-term sums (detached, fp32)."""

    loss: Tensor  # () fp32
    sums: Tensor  # (len(TERMS),) fp32, in TERMS order


def label_smoothed_nll(logp: Tensor, target: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-row label-smoothed CE and plain NLL from log-probabilities (rows, V) fp32."""
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (1.0 - eps) * nll - eps * logp.mean(-1), nll


def symmetric_kl(logp: Tensor, logq: Tensor) -> Tensor:
    """Per-row SKL(p, q) = (KL(p||q) + KL(q||p)) / 2 from log-probabilities (rows, V) fp32."""
    return 0.5 * ((logp.exp() - logq.exp()) * (logp - logq)).sum(-1)


def janus_loss_ref(
    ar_logits: Optional[Tensor],
    ar_targets: Optional[Tensor],
    nar_logits: Optional[Tensor],
    aux_logits: Optional[Tensor],
    masked_targets: Optional[Tensor],
    pair_index: Optional[Tensor],
    eps: float,
    scales: LossScales,
    ignore_index: int = -100,
) -> MaskedTokenLoss:
    """Reference implementation of the three-distribution masked-token loss.

    Args:
        ar_logits: (N, V) any float dtype, P_AR logits of every AR target row, or None.
        ar_targets: (N,) int64.
        nar_logits: (M, V) P_NAR logits of the masked rows, or None.
        aux_logits: (M, V) P_AUX logits of the masked rows, or None.
        masked_targets: (M,) int64 gold tokens of the masked rows.
        pair_index: (M,) int64, row of ar_logits whose target is the same token (needed for
            the SKL terms that involve P_AR).
        eps: label smoothing epsilon.
        scales: multipliers of the summed terms.
        ignore_index: target value of rows to skip.
    Returns:
        MaskedTokenLoss(loss () fp32, sums (9,) fp32 in TERMS order).
    """
    dev = next(t.device for t in (ar_logits, nar_logits, aux_logits) if t is not None)
    zero = torch.zeros((), device=dev)
    sums = dict.fromkeys(TERMS, zero)
    loss = zero

    def logp_of(logits: Tensor) -> Tensor:  # at least fp32 (fp64 stays fp64 for gradcheck)
        return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)

    la = lb = lc = None
    if ar_logits is not None:
        keep = ar_targets != ignore_index
        la = logp_of(ar_logits)
        ls, nll = label_smoothed_nll(la, ar_targets.clamp_min(0), eps)
        sums["ar"], sums["ar_nll"] = (ls * keep).sum(), (nll * keep).sum()
        loss = loss + scales.ar * sums["ar"]
    if nar_logits is not None or aux_logits is not None:
        mkeep = masked_targets != ignore_index
        y = masked_targets.clamp_min(0)
        if nar_logits is not None:
            lb = logp_of(nar_logits)
            ls, nll = label_smoothed_nll(lb, y, eps)
            sums["nar"], sums["nar_nll"] = (ls * mkeep).sum(), (nll * mkeep).sum()
            loss = loss + scales.nar * sums["nar"]
        if aux_logits is not None:
            lc = logp_of(aux_logits)
            ls, nll = label_smoothed_nll(lc, y, eps)
            sums["aux"], sums["aux_nll"] = (ls * mkeep).sum(), (nll * mkeep).sum()
            loss = loss + scales.aux * sums["aux"]
        la_paired = None
        if la is not None and (lb is not None or lc is not None):
            if pair_index is None:
                raise ValueError("pair_index is required for the SKL terms between P_AR and the masked rows")
            la_paired = la.index_select(0, pair_index)
            if scales.skl_grad_ar != 1.0:  # same value, gradient scaled by skl_grad_ar
                frozen = la_paired.detach()
                la_paired = frozen + scales.skl_grad_ar * (la_paired - frozen) if scales.skl_grad_ar else frozen
        for name, p, q in (("skl_ar_nar", la_paired, lb), ("skl_ar_aux", la_paired, lc), ("skl_nar_aux", lb, lc)):
            if p is not None and q is not None:
                sums[name] = (symmetric_kl(p, q) * mkeep).sum()
                loss = loss + getattr(scales, name) * sums[name]
    return MaskedTokenLoss(loss, torch.stack([sums[k].detach() for k in TERMS]))


class FusedJanusLoss(torch.autograd.Function):
    """The fused kernel as an autograd.Function: the forward also computes d loss / d logits (for a
    loss gradient of 1) into one buffer per logits tensor; the backward scales them by the incoming
    gradient, in place, so it runs once per forward (a second backward raises)."""

    @staticmethod
    def forward(
        ctx: Any,
        ar_logits: Optional[Tensor],
        nar_logits: Optional[Tensor],
        aux_logits: Optional[Tensor],
        ar_targets: Optional[Tensor],
        masked_targets: Optional[Tensor],
        pair_index: Optional[Tensor],
        partner: Optional[Tensor],
        eps: float,
        scales: tuple[float, ...],
        ignore_index: int,
    ) -> tuple[Tensor, Tensor]:
        from janus.kernels.janus_loss import janus_loss_forward

        logits = [x if x is None or x.stride(-1) == 1 else x.contiguous() for x in (ar_logits, nar_logits, aux_logits)]
        # The kernel writes every present row's gradient, so each present tensor gets a buffer once any
        # gradient is needed; the ones nobody asked for are dropped right after.
        need = ctx.needs_input_grad[:3]
        grads = tuple(torch.empty_like(x) if x is not None else None for x in logits) if any(need) else None
        loss, sums = janus_loss_forward(
            logits[0], ar_targets, logits[1], logits[2], masked_targets, pair_index, eps, scales, ignore_index,
            grads=grads, partner=partner,
        )  # fmt: skip
        ctx.grads = tuple(g if n else None for g, n in zip(grads, need)) if grads is not None else (None,) * 3
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, grad_sums: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        return (*scale_precomputed_grads(ctx, grad_loss, "janus_loss (triton)"), *([None] * 7))


def _janus_loss_triton(
    ar_logits: Optional[Tensor],
    ar_targets: Optional[Tensor],
    nar_logits: Optional[Tensor],
    aux_logits: Optional[Tensor],
    masked_targets: Optional[Tensor],
    pair_index: Optional[Tensor],
    eps: float,
    scales: LossScales,
    ignore_index: int = -100,
) -> MaskedTokenLoss:
    from janus.kernels.janus_loss import partners

    partner = None
    has_masked = any(x is not None and x.shape[0] > 0 for x in (nar_logits, aux_logits))
    if ar_logits is not None and has_masked:
        if pair_index is None:
            raise ValueError("pair_index is required for the SKL terms between P_AR and the masked rows")
        partner = partners(pair_index, ar_logits.shape[0])
        if partner is None:  # an AR row paired twice: only the reference takes that layout
            if not _repeats_logged:
                _repeats_logged.append(True)
                log.info("janus_loss: pair_index repeats an AR row; the reference runs such calls")
            return janus_loss_ref(
                ar_logits, ar_targets, nar_logits, aux_logits, masked_targets, pair_index, eps, scales, ignore_index
            )
    loss, sums = FusedJanusLoss.apply(
        ar_logits, nar_logits, aux_logits, ar_targets, masked_targets, pair_index, partner,
        eps, astuple(scales), ignore_index,
    )  # fmt: skip
    return MaskedTokenLoss(loss, sums)


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_repeats_logged: list[bool] = []


def fits_triton_loss_kernel(*args: Any, **kwargs: Any) -> Verdict:
    """``supports`` of the fused loss backends: CUDA tensors, floating ones in fp32, fp16 or bf16."""
    ok, why = all_on_cuda(*args, **kwargs)
    if not ok:
        return ok, why
    for x in (*args, *kwargs.values()):
        if isinstance(x, Tensor) and x.is_floating_point() and x.dtype not in _KERNEL_DTYPES:
            return False, f"a {x.dtype} tensor (the kernel takes fp32, fp16 and bf16)"
    return True, ""


def scale_precomputed_grads(ctx: Any, grad_loss: Tensor, op: str) -> tuple[Optional[Tensor], ...]:
    """Backward of a Function whose forward left its input gradients (for a loss gradient of 1) in
    ``ctx.grads``: scale them by ``grad_loss`` in place, once."""
    if ctx.grads is None:
        raise RuntimeError(f"{op}: backward ran twice; its gradients are scaled in place")
    grads, ctx.grads = ctx.grads, None
    return tuple(g.mul_(grad_loss.to(g.dtype)) if g is not None else None for g in grads)


JANUS_LOSS = register_op(
    "janus_loss",
    [
        Backend("triton", _janus_loss_triton, available=triton_available, supports=fits_triton_loss_kernel),
        Backend("reference", janus_loss_ref),
    ],
)


def janus_loss(
    ar_logits: Optional[Tensor],
    ar_targets: Optional[Tensor],
    nar_logits: Optional[Tensor],
    aux_logits: Optional[Tensor],
    masked_targets: Optional[Tensor],
    pair_index: Optional[Tensor],
    eps: float,
    scales: LossScales,
    ignore_index: int = -100,
) -> MaskedTokenLoss:
    """The three-distribution masked-token loss on the best available backend.

    Same arguments and result as ``janus_loss_ref``: logits (N, V) / (M, V) of any float
    dtype (each may be None), int64 targets, pair_index int64 (M,), label smoothing eps,
    the scales (``LossScales``) and ignore_index. Returns MaskedTokenLoss(loss () fp32, sums (9,) fp32).
    """
    return JANUS_LOSS(
        ar_logits, ar_targets, nar_logits, aux_logits, masked_targets, pair_index, eps, scales, ignore_index
    )
