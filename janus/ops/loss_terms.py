"""loss_terms: every term of the JANUS loss over one chunk of stacked logits, and d loss / d logits.

The inner step of janus_linear_loss's CPU backend (janus/ops/janus_linear_loss.py): a chunk's logits
[a (AR rows); b (P_NAR rows); c (P_AUX rows)] in, the nine summed terms (``TERMS``) and the gradient of
the scaled loss with respect to those logits out, in closed form (JANUS.md section 3), without an
autograd graph over the (rows, V) logits. ``loss_terms_ref`` is the specification and the fallback;
``loss_terms`` dispatches (janus.ops._dispatch) between:

- "cpp": ``torch.ops.janus.loss_terms`` (csrc/cpu/loss_terms.cpp), CPU tensors, fp32 or bf16 logits,
  pairs sorted: one row group (an AR row and its masked rows) at a time, read from the logits while it
  is in the cache, the gradient written once in its dtype;
- "reference": ``loss_terms_ref``, any dtype (fp64 too), pairs in any order.

Force one with ``JANUS_BACKEND_LOSS_TERMS=cpp|reference``.
"""

from __future__ import annotations

from dataclasses import astuple
from typing import Optional

import torch
from torch import Tensor

from janus import _ext
from janus.ops._dispatch import Backend, Verdict, all_on_cpu, compiled, register_op
from janus.ops.janus_loss import TERMS, LossScales


def loss_terms_ref(
    logits: Tensor,
    counts: tuple[int, int, int],
    targets: Tensor,
    keep: Tensor,
    pairs: Optional[Tensor],
    eps: float,
    scales: LossScales,
    need_grad: bool,
    grad_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Every term of one chunk and d loss / d logits, computed in fp32 (or fp64 for fp64 logits), in
    closed form.

    Args:
        logits: (r + m_b + m_c, V) the chunk's logits, rows of a (AR), b (P_NAR), c (P_AUX) stacked.
        counts: (r, m_b, m_c) rows of each stream in ``logits`` (0 for an absent one; m_b and m_c are
            equal when both are present).
        targets: (rows,) int64 target of every row (ignored rows clamped to 0); keep: (rows,) 0/1 mask
            of the rows whose target is not ignored (float of the accumulation dtype).
        pairs: (m,) int64, AR row within the chunk of each masked row (None without an AR stream);
            repeats allowed, any order.
        eps: label smoothing; scales: the multipliers of the summed terms.
        need_grad: also return d loss / d logits.
        grad_dtype: dtype of the returned gradient (default: the accumulation dtype).
    Returns:
        (sums (9,) in TERMS order in the accumulation dtype, d loss / d logits (rows, V) for a loss
        gradient of 1, or None).

    With p = softmax(z), l = log p and D = l_x - l_y (JANUS.md section 3):
        d ls / d z        = p - (1 - eps) onehot(y) - eps / V
        d SKL(x, y) / d z_x = (p_x (D - KL(x || y)) + p_x - p_y) / 2,  symmetrically for z_y.
    """
    acc = torch.promote_types(logits.dtype, torch.float32)
    lp = torch.log_softmax(logits, dim=-1, dtype=acc)  # (rows, V)
    prob = lp.exp()
    V = lp.shape[1]
    r, mb, mc = counts
    bounds = (0, r, r + mb, r + mb + mc)
    view = lambda x, k: x[bounds[k] : bounds[k + 1]] if bounds[k + 1] > bounds[k] else None  # noqa: E731

    # 1. Label-smoothed CE and NLL of every row, summed per stream.
    nll = -lp.gather(1, targets[:, None]).squeeze(1)
    ls = (1.0 - eps) * nll - eps * lp.mean(1)
    row_scale = torch.cat([
        torch.full((n,), w, dtype=acc) for n, w in zip(counts, (scales.ar, scales.nar, scales.aux))
    ]) * keep  # fmt: skip
    sums = torch.zeros(len(TERMS), dtype=acc)
    for k, (n, name) in enumerate(zip(counts, ("ar", "nar", "aux"))):
        if n:
            sums[TERMS.index(name)] = (ls[bounds[k] : bounds[k + 1]] * keep[bounds[k] : bounds[k + 1]]).sum()
            sums[TERMS.index(name + "_nll")] = (nll[bounds[k] : bounds[k + 1]] * keep[bounds[k] : bounds[k + 1]]).sum()
    grad = prob * row_scale[:, None] if need_grad else None

    # 2. The SKL terms of each masked row with its AR row and with the other masked stream.
    mkeep = keep[r : r + max(mb, mc)]
    sides = {k: (view(lp, k), view(prob, k), view(grad, k) if need_grad else None) for k in range(3)}
    if r and pairs is not None:
        a_lp, a_p = sides[0][0].index_select(0, pairs), sides[0][1].index_select(0, pairs)
        paired_a = (a_lp, a_p, None)
    for name, x, y in (("skl_ar_nar", 0, 1), ("skl_ar_aux", 0, 2), ("skl_nar_aux", 1, 2)):
        if not (counts[x] and counts[y]) or (x == 0 and pairs is None):
            continue
        lx, px, gx = paired_a if x == 0 else sides[x]
        ly, py, gy = sides[y]
        diff = lx - ly  # (m, V): log p_x - log p_y
        kl_xy = (px * diff).sum(1)
        kl_yx = -(py * diff).sum(1)
        sums[TERMS.index(name)] = (0.5 * (kl_xy + kl_yx) * mkeep).sum()
        if not need_grad:
            continue
        w = (0.5 * getattr(scales, name)) * mkeep[:, None]
        d_y = (-diff).sub_(kl_yx[:, None] - 1.0).mul_(py).sub_(px).mul_(w)  # (p_y (D' - KL(y||x)) + p_y - p_x) / 2
        gy += d_y
        if x == 0 and scales.skl_grad_ar != 1.0:  # the share that reaches P_AR (0: a stop-gradient)
            if not scales.skl_grad_ar:
                continue
            w = w * scales.skl_grad_ar
        d_x = diff.sub_(kl_xy[:, None] - 1.0).mul_(px).sub_(py).mul_(w)
        if x == 0:
            sides[0][2].index_add_(0, pairs, d_x)
        else:
            gx += d_x
    if need_grad:
        grad.sub_((eps / V) * row_scale[:, None])
        # One element per row: a flat index_add_ (scatter_add_ along dim 1 walks far more slowly).
        flat = torch.arange(grad.shape[0]) * V + targets
        grad.view(-1).index_add_(0, flat, -(1.0 - eps) * row_scale)
        if grad_dtype is not None:
            grad = grad.to(grad_dtype)
    return sums, grad


def _loss_terms_fake(logits, counts, targets, keep, pairs, eps, scales, need_grad, grad_dtype):
    rows = logits.shape[0] if need_grad else 0
    return logits.new_empty((len(TERMS),), dtype=torch.float32), logits.new_empty(
        (rows, logits.shape[1]), dtype=grad_dtype
    )


@_ext.when_loaded  # registering a fake needs the C++ schema (csrc/ops.cpp) to exist
def _register_fake() -> None:
    torch.library.register_fake("janus::loss_terms", _loss_terms_fake)


def _loss_terms_cpp(
    logits: Tensor,
    counts: tuple[int, int, int],
    targets: Tensor,
    keep: Tensor,
    pairs: Optional[Tensor],
    eps: float,
    scales: LossScales,
    need_grad: bool,
    grad_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    grad_dtype = grad_dtype or torch.float32
    sums, grad = torch.ops.janus.loss_terms(
        logits, list(counts), targets, keep.float(), pairs, eps, list(astuple(scales)), need_grad, grad_dtype
    )
    return sums, (grad if need_grad else None)


_CPP_DTYPES = (torch.float32, torch.bfloat16)


def _fits_cpp(
    logits: Tensor,
    counts: tuple[int, int, int],
    targets: Tensor,
    keep: Tensor,
    pairs: Optional[Tensor],
    eps: float,
    scales: LossScales,
    need_grad: bool,
    grad_dtype: Optional[torch.dtype] = None,
) -> Verdict:
    ok, why = all_on_cpu(logits, targets, keep, pairs)
    if not ok:
        return ok, why
    grad_dtype = grad_dtype or torch.float32
    if logits.dtype not in _CPP_DTYPES or grad_dtype not in _CPP_DTYPES:
        return False, f"logits {logits.dtype} / gradient {grad_dtype}: the CPU kernel takes float32 and bfloat16"
    if pairs is not None and pairs.shape[0] > 1 and not bool((pairs[1:] >= pairs[:-1]).all()):
        return False, "pairs are not sorted (the CPU kernel reads each AR row's masked rows as one range)"
    return True, ""


LOSS_TERMS = register_op(
    "loss_terms",
    [
        Backend("cpp", _loss_terms_cpp, available=compiled("loss_terms", "cpu"), supports=_fits_cpp),
        Backend("reference", loss_terms_ref),
    ],
)


def loss_terms(
    logits: Tensor,
    counts: tuple[int, int, int],
    targets: Tensor,
    keep: Tensor,
    pairs: Optional[Tensor],
    eps: float,
    scales: LossScales,
    need_grad: bool,
    grad_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """The nine summed terms of one chunk and d loss / d logits, on the fastest available backend.

    Same contract as ``loss_terms_ref``; the "cpp" backend returns the sums in fp32 and computes in fp32
    whatever the logits' dtype (fp32 or bf16).
    """
    return LOSS_TERMS(logits, counts, targets, keep, pairs, eps, scales, need_grad, grad_dtype)
