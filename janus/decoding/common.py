"""What every search shares: length limits, the AR next-token constraints, eval mode."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Optional

import torch
from torch import Tensor, nn

from janus.config import SpecialIds
from janus.model import EncoderOut, JanusModel


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and ``torch.inference_mode`` for the duration; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def length_limits(
    src_lengths: Tensor, *, max_len_a: float, max_len_b: int, min_len: int, max_target_positions: int
) -> tuple[Tensor, Tensor]:
    """Per-sentence (min, max) number of target tokens, without bos and eos.

    Args:
        src_lengths: int64 (B,) source tokens without eos.
    Returns:
        (min_lens, max_lens) int64 (B,): max = floor(a * src + b), capped so that bos, the
        tokens and eos fit in the learned positions, and never below min.
    """
    cap = max_target_positions - 2
    if min_len > cap:
        raise ValueError(f"min_len={min_len} exceeds what max_target_positions={max_target_positions} allows ({cap})")
    hi = torch.floor(src_lengths.double() * max_len_a + max_len_b + 1e-9).long().clamp(min_len, cap)
    return torch.full_like(hi, min_len), hi


def forced_limits(target_lengths: Tensor, max_target_positions: int) -> tuple[Tensor, Tensor]:
    """(min, max) that force exactly ``target_lengths`` (int64 (B,), tokens without bos/eos)."""
    cap = max_target_positions - 2
    if bool((target_lengths < 0).any()) or bool((target_lengths > cap).any()):
        raise ValueError(f"target_lengths must be in [0, {cap}], got {target_lengths.tolist()}")
    return target_lengths.clone(), target_lengths.clone()


def token_limits(
    model: JanusModel,
    enc: EncoderOut,
    target_lengths: Optional[Tensor],
    *,
    max_len_a: float,
    max_len_b: int,
    min_len: int,
) -> tuple[Tensor, Tensor]:
    """(min, max) target tokens per sentence of ``enc``: forced ``target_lengths`` when given,
    else ``length_limits`` of the source lengths."""
    if target_lengths is not None:
        return forced_limits(target_lengths.to(enc.lengths.device), model.cfg.max_target_positions)
    return length_limits(
        enc.lengths - 1,
        max_len_a=max_len_a,
        max_len_b=max_len_b,
        min_len=min_len,
        max_target_positions=model.cfg.max_target_positions,
    )


def banned_ids(sp: SpecialIds) -> list[int]:
    """Ids no search ever emits as a token: pad, bos and <mask> (eos is emitted by AR only at the end)."""
    return [sp.pad, sp.bos, sp.mask]


def canvas_banned_ids(sp: SpecialIds) -> list[int]:
    """Ids never predicted at a masked canvas slot: the canvas length decides where eos is."""
    return [sp.pad, sp.bos, sp.eos, sp.mask]


def constrain_ar(logp: Tensor, words: Tensor, min_lens: Tensor, max_lens: Tensor, sp: SpecialIds) -> Tensor:
    """Apply the AR next-token rules to log-probabilities, in place.

    Pad, bos and <mask> are never chosen; eos is banned while fewer than ``min_lens`` tokens
    were generated; once ``max_lens`` tokens were generated, only eos remains. The
    log-probabilities themselves stay normalised over the whole vocabulary.

    Args:
        logp: (N, ..., V) fp32 log-probabilities of the next token.
        words: int64 broadcastable to logp.shape[:-1]: tokens generated before this one.
        min_lens, max_lens: int64 broadcastable likewise.
    """
    neg = float("-inf")
    logp[..., banned_ids(sp)] = neg
    too_short = (words < min_lens).expand(logp.shape[:-1])
    logp[..., sp.eos].masked_fill_(too_short, neg)
    at_max = (words >= max_lens).expand(logp.shape[:-1])
    if bool(at_max.any()):
        eos = logp[..., sp.eos].clone()
        logp.masked_fill_(at_max[..., None], neg)
        logp[..., sp.eos] = torch.where(at_max, eos, logp[..., sp.eos])
    return logp


def normalized(sum_logp: float, num_tokens: int, length_penalty: float) -> float:
    """sum(log p) / num_tokens ** length_penalty (num_tokens counts eos)."""
    return sum_logp / math.pow(max(num_tokens, 1), length_penalty)
