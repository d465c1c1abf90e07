"""The JANUS objective and the `ar` / `cmlm` baselines (JANUS.md section 3).

    L = w_ar  * ls(P_AR over all n-1 AR targets)
      + w_nar * ls(P_NAR over M) + w_aux * ls(P_AUX over M)
      + w_len * CE(length)
      + w_an * SKL(P_AR, P_NAR) + w_ac * SKL(P_AR, P_AUX) + w_nc * SKL(P_NAR, P_AUX)

Each term is a mean over its own tokens. "Its own tokens" means all of the
update's tokens: with gradient accumulation and data parallelism the caller
passes the update-wide ``Counts`` so that every micro-batch contributes
sum / global count, and the update equals the one of a single big batch.

Objectives: ``janus`` (all terms), ``ar`` (only the AR term: a plain AR
Transformer trained through the same query stream the AR decoder uses) and
``cmlm`` (P_NAR on uniformly masked targets + length).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from janus.config import LossWeights
from janus.decoding.common import canvas_banned_ids
from janus.model import EncoderOut, JanusModel
from janus.ops.janus_linear_loss import janus_linear_loss
from janus.ops.janus_loss import TERMS, LossScales
from janus.ops.length_beam_init import canvases
from janus.ops.remask_lowest import remask_lowest
from janus.streams import DecoderRows, build_canvas_rows, build_training_rows

# Logged sums: the masked-token terms, then the length loss.
LOG_TERMS = TERMS + ("length",)
OBJECTIVES = ("janus", "ar", "cmlm")


@dataclass(frozen=True)
class Streams:
    """Which decoder streams an objective needs."""

    ar: bool
    nar: bool
    aux: bool

    @classmethod
    def of(cls, objective: str) -> "Streams":
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if objective == "ar":
            return cls(True, False, False)
        if objective == "cmlm":
            return cls(False, True, False)
        return cls(True, True, True)


@dataclass
class Counts:
    """Token counts that normalise the terms: sentences, AR targets (sum of n-1), masked tokens."""

    sentences: int = 0
    ar_tokens: int = 0
    masked_tokens: int = 0

    @classmethod
    def of_batch(cls, tgt_lengths: Tensor, masked: Tensor) -> "Counts":
        """tgt_lengths (B,) int64 n per sentence; masked (B, T) bool."""
        return cls(int(tgt_lengths.numel()), int((tgt_lengths - 1).sum()), int(masked.sum()))

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(
            self.sentences + other.sentences,
            self.ar_tokens + other.ar_tokens,
            self.masked_tokens + other.masked_tokens,
        )

    def as_tensor(self) -> Tensor:
        return torch.tensor([self.sentences, self.ar_tokens, self.masked_tokens], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: Tensor) -> "Counts":
        s, a, m = (int(round(float(x))) for x in t.tolist())
        return cls(s, a, m)


@dataclass
class LossOutput:
    """The scalar to backpropagate and the raw sums for logging."""

    loss: Tensor  # () fp32: this micro-batch's share of the update's objective
    sums: Tensor  # (len(LOG_TERMS),) fp32, detached, in LOG_TERMS order
    counts: Counts  # the counts the terms were normalised by (this batch's own when none were given)


def scales_for(
    weights: LossWeights, counts: Counts, multiplier: float = 1.0, skl_grad_ar: float = 1.0
) -> tuple[LossScales, float]:
    """Per-term scales (weight * multiplier / count) and the length scale for update-wide counts;
    ``skl_grad_ar`` is passed through (``LossScales.skl_grad_ar``)."""

    def s(w: float, n: int) -> float:
        return w * multiplier / n if n > 0 else 0.0

    return (
        LossScales(
            ar=s(weights.ar, counts.ar_tokens),
            nar=s(weights.nar, counts.masked_tokens),
            aux=s(weights.aux, counts.masked_tokens),
            skl_ar_nar=s(weights.skl_ar_nar, counts.masked_tokens),
            skl_ar_aux=s(weights.skl_ar_aux, counts.masked_tokens),
            skl_nar_aux=s(weights.skl_nar_aux, counts.masked_tokens),
            skl_grad_ar=skl_grad_ar,
        ),
        s(weights.length, counts.sentences),
    )


def training_rows(tgt: Tensor, masked: Optional[Tensor], objective: str, *, pad: int, mask: int) -> DecoderRows:
    """The decoder rows ``objective`` trains on (see ``janus.streams.build_training_rows``).

    Args:
        tgt: (B, T) int64 targets; masked: (B, T) bool masked set (None for ``ar``).
    """
    st = Streams.of(objective)
    return build_training_rows(tgt, masked, pad=pad, mask=mask, ar=st.ar, nar=st.nar, aux=st.aux)


def row_states(hidden: Tensor, rows: DecoderRows) -> tuple[Optional[Tensor], ...]:
    """Decoder states of the AR query, P and Q rows: (N, D), (M, D), (M, D) or None each."""
    flat = hidden.reshape(-1, hidden.shape[-1])  # (B*R, D)
    return tuple(flat.index_select(0, r) if r is not None else None for r in (rows.ar_rows, rows.p_rows, rows.q_rows))


@torch.no_grad()
def first_pass_tokens(model: JanusModel, enc: EncoderOut, tgt: Tensor) -> tuple[Tensor, Tensor]:
    """What mask-predict's first pass puts on an all-masked canvas of each target's length: (B, T) int64,
    ``tgt`` with every token between bos and eos replaced by the model's most likely one (never a special id),
    and (B, T) fp32 its log-probability there (+inf elsewhere). Runs in the model's current mode (in training,
    with its dropout)."""
    sp = model.cfg.specials
    canvas = canvases((tgt != sp.pad).sum(1), bos=sp.bos, eos=sp.eos, mask=sp.mask, pad=sp.pad)
    canvas = F.pad(canvas, (0, tgt.shape[1] - canvas.shape[1]), value=sp.pad)  # tgt's width, were it padded wider
    inner = canvas == sp.mask
    hidden = model.decode(build_canvas_rows(canvas, pad=sp.pad), enc)  # (B, T, D)
    logits = model.project(hidden[inner]).float()  # (K, V)
    logits[:, canvas_banned_ids(sp)] = float("-inf")
    best, token = F.log_softmax(logits, -1).max(-1)
    scores = torch.full(tgt.shape, float("inf"), device=tgt.device).masked_scatter(inner, best)
    return canvas.masked_scatter(inner, token), scores


def expose_observed(
    model: JanusModel,
    enc: EncoderOut,
    tgt: Tensor,
    masked: Tensor,
    rows: DecoderRows,
    share: float,
    objective: str,
    least_confident: bool = False,
) -> DecoderRows:
    """``rows`` with the observed canvas tokens (U rows other than bos and eos) of a random ``share`` of the
    sentences replaced by ``first_pass_tokens`` (``TrainConfig.nar_exposure``). The AR rows, the gold rows of
    P_AUX and every target stay the references.

    Args:
        tgt: (B, T) targets; masked: (B, T) the masked set; rows: ``training_rows(tgt, masked, objective)``.
            Sentences are drawn with torch's generator.
        least_confident: a drawn sentence's masked set becomes the m first-pass tokens the model is least sure
            of (m its size in ``masked``), the state mask-predict's second pass starts from
            (``TrainConfig.nar_exposure_mask="least-confident"``); the rows are then rebuilt for it.
    """
    sp = model.cfg.specials
    B, T = tgt.shape
    pick = torch.rand(B, device=tgt.device) < share
    first, scores = first_pass_tokens(model, enc, tgt)
    if least_confident:  # mask-predict's re-masking of the first pass, as many slots as the masking drew
        lowest, _ = remask_lowest(first.clone(), scores.clone(), masked.sum(1), sp.mask, sp.pad, sp.bos, sp.eos)
        masked = torch.where(pick[:, None], lowest == sp.mask, masked)
        rows = training_rows(tgt, masked, objective, pad=sp.pad, mask=sp.mask)
    observed = torch.isfinite(scores) & ~masked & pick[:, None]
    start = T - 1 if Streams.of(objective).ar else 0  # the canvas follows the AR content rows
    tokens = rows.tokens.clone()
    canvas = tokens[:, start : start + T]
    canvas.copy_(torch.where(observed, first, canvas))
    return dataclasses.replace(rows, tokens=tokens)


def compute_loss(
    model: JanusModel,
    src: Tensor,
    tgt: Tensor,
    masked: Optional[Tensor],
    *,
    objective: str,
    weights: LossWeights,
    label_smoothing: float,
    norm: Optional[Counts] = None,
    multiplier: float = 1.0,
    rows: Optional[DecoderRows] = None,
    skl_grad_ar: float = 1.0,
    exposure: float = 0.0,
    exposure_mask: str = "random",
) -> LossOutput:
    """Run the teacher-forced passes of ``objective`` and return its loss.

    Args:
        src: (B, S) int64 source ids (tokens + eos, padded).
        tgt: (B, T) int64 target ids ([bos] + tokens + [eos], padded).
        masked: (B, T) bool masked set (ignored by ``ar``).
        norm: counts the terms are normalised by (default: this batch's own counts).
        multiplier: extra factor on every term (e.g. world size under DDP's gradient averaging).
        rows: ``training_rows(tgt, masked, objective, ...)`` built ahead (e.g. on the CPU while
            the previous step runs); built here when None.
        skl_grad_ar: factor on the gradient the SKL terms send into P_AR (1: the published objective;
            0: a stop-gradient, ``TrainConfig.skl_stop_grad="ar"``).
        exposure: ``TrainConfig.nar_exposure``, the share of sentences whose observed canvas tokens are the
            model's own first-pass predictions (``expose_observed``); applied only while the model trains.
        exposure_mask: ``TrainConfig.nar_exposure_mask``: "random" (the given masked set) or "least-confident".
    Returns:
        LossOutput with ``loss = sum_t scale_t * sum_t``.
    """
    specials = model.cfg.specials
    st = Streams.of(objective)
    tgt_lengths = (tgt != specials.pad).sum(1)
    if masked is None:
        masked = torch.zeros_like(tgt, dtype=torch.bool)
    # Counting this batch's tokens syncs with the device: only done when no counts are given.
    counts = norm if norm is not None else Counts.of_batch(tgt_lengths, masked)
    scales, length_scale = scales_for(weights, counts, multiplier, skl_grad_ar)

    if rows is None:
        rows = training_rows(tgt, masked, objective, pad=specials.pad, mask=specials.mask)
    enc = model.encode(src)
    if exposure > 0 and st.nar and model.training:
        rows = expose_observed(model, enc, tgt, masked & (tgt != specials.pad), rows, exposure, objective,
                               least_confident=exposure_mask == "least-confident")  # fmt: skip
    hidden = model.decode(rows, enc)  # (B, R, D)
    # Only the rows whose logits are used reach the vocabulary projection (one GEMM in the reference;
    # chunk by chunk, never all at once, in the fused kernel).
    h_ar, h_nar, h_aux = row_states(hidden, rows)
    out = janus_linear_loss(
        h_ar, h_nar, h_aux, model.embed.weight, rows.ar_targets, rows.masked_targets, rows.pair_index,
        label_smoothing, scales,
    )  # fmt: skip
    loss, length_sum = out.loss, torch.zeros((), device=tgt.device)
    if weights.length > 0 or st.nar:
        length_logits = model.length_logits(enc)  # (B, C)
        target = model.length_target(tgt_lengths, enc.lengths)
        length_sum = F.cross_entropy(length_logits.float(), target, reduction="sum")
        if weights.length > 0:
            loss = loss + length_scale * length_sum
    return LossOutput(loss, torch.cat([out.sums, length_sum.detach().reshape(1)]), counts)


class Criterion(nn.Module):
    """The model plus its objective as one module, so that data parallelism wraps a single forward.

    ``forward`` returns ``(loss, sums)`` tensors (see ``compute_loss``). ``objective`` and ``weights``
    may change between updates (the joint_start / joint_ramp schedule of ``TrainConfig``).
    """

    def __init__(
        self,
        model: JanusModel,
        objective: str,
        weights: LossWeights,
        label_smoothing: float,
        skl_grad_ar: float = 1.0,
        exposure: float = 0.0,
        exposure_mask: str = "random",
    ) -> None:
        super().__init__()
        Streams.of(objective)  # validates the name
        self.model, self.objective, self.weights, self.eps = model, objective, weights, label_smoothing
        self.skl_grad_ar, self.exposure, self.exposure_mask = skl_grad_ar, exposure, exposure_mask

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        masked: Optional[Tensor],
        norm: Optional[Counts] = None,
        multiplier: float = 1.0,
        rows: Optional[DecoderRows] = None,
    ) -> tuple[Tensor, Tensor]:
        out = compute_loss(
            self.model, src, tgt, masked, objective=self.objective, weights=self.weights,
            label_smoothing=self.eps, norm=norm, multiplier=multiplier, rows=rows, skl_grad_ar=self.skl_grad_ar,
            exposure=self.exposure, exposure_mask=self.exposure_mask,
        )  # fmt: skip
        return out.loss, out.sums


def summarize(sums: Tensor, counts: Counts, weights: LossWeights) -> dict[str, float]:
    """Means per term for logging: each sum over its own count; ``loss`` is the weighted objective."""
    per = dict(zip(LOG_TERMS, sums.tolist()))
    den = {"ar": counts.ar_tokens, "ar_nll": counts.ar_tokens, "length": counts.sentences}
    out = {k: v / max(den.get(k, counts.masked_tokens), 1) for k, v in per.items()}
    out["loss"] = sum(getattr(weights, k) * out[k] for k in LOG_TERMS if not k.endswith("_nll"))
    return out
