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
from janus.ops import ar_topk


def _any_training(model: nn.Module) -> bool:
    """Whether ``model`` or any module inside it is in training mode. A walk over the children, where
    ``model.modules()`` builds every module's name and a memo: on the shipped model's 104 modules 68-85 us against
    127-138 (a busy 2-core host), once per decode call."""
    stack = [model]
    while stack:
        module = stack.pop()
        if module.training:
            return True
        stack.extend(child for child in module._modules.values() if child is not None)
    return False


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and ``torch.inference_mode`` for the duration; the model's mode is restored after. The
    parameters do not change in the block (``JanusModel.weights_fixed``).

    A model already in eval mode throughout is left alone: switching every module's mode costs ~1.5 ms
    (the small preset's 200 modules, twice), a tenth of decoding a sentence at batch 1."""
    was_training = model.training
    switch = _any_training(model)
    if switch:
        model.eval()
    fixed = model.weights_fixed() if isinstance(model, JanusModel) else contextlib.nullcontext()
    try:
        with torch.inference_mode(), fixed:
            yield
    finally:
        if switch:
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


def repeating(tokens: Tensor, ends: Tensor, ngram: int, times: int) -> Tensor:
    """Which prefixes end in a degenerate repetition: for some n in 1 .. ``ngram``, the last n
    tokens up to and including position ``ends`` occurred ``times`` times back to back.

    Positions before the start of ``tokens`` never count: a window too short to hold ``times``
    copies is not repeating. Bos is never a generated token, so a run never reaches past it.

    Args:
        tokens: int64 (N, L) token rows ([bos, y_1, ...] or a tail of one).
        ends: int64 (N, Q): per query, the position in ``tokens`` of the last known token.
        ngram: longest period checked (0 = none: all False).
        times: copies that make a repetition (>= 2).
    Returns:
        bool (N, Q).
    """
    N, L = tokens.shape
    out = torch.zeros(ends.shape, dtype=torch.bool, device=tokens.device)
    for n in range(1, ngram + 1):
        span = n * times  # tokens the run covers
        if span > L:
            break
        # same[:, e] (e >= n): tokens[e] == tokens[e - n]; a run of period n and span n * times
        # ending at e is n * (times - 1) consecutive such equalities ending at e.
        same = torch.zeros(N, L, dtype=torch.int32, device=tokens.device)
        same[:, n:] = (tokens[:, n:] == tokens[:, :-n]).int()
        count = torch.cat([torch.zeros_like(same[:, :1]), same.cumsum(1)], 1)  # count[:, e + 1] = sum(same[:, :e+1])
        need = n * (times - 1)
        valid = ends - span + 1 >= 0
        e = ends.clamp(0, L - 1)
        hits = count.gather(1, e + 1) - count.gather(1, (e + 1 - need).clamp_min(0))
        out |= valid & (hits == need)
    return out


def repeating_tail(tokens: Tensor, step: int, ngram: int, times: int) -> Tensor:
    """``repeating`` for one query per row whose last known token is at ``step``: bool (N,).

    Only the last ``ngram * times`` tokens are looked at, so a step costs the same at any length.

    Args:
        tokens: int64 (N, >= step + 1) rows [bos, y_1 .. y_step, ...].
    """
    start = max(0, step + 1 - ngram * times)
    tail = tokens[:, start : step + 1]
    ends = torch.full((tokens.shape[0], 1), step - start, dtype=torch.long, device=tokens.device)
    return repeating(tail, ends, ngram, times).squeeze(1)


def choose_next(logits: Tensor, k: int, rules: Tensor, sp: SpecialIds) -> tuple[Tensor, Tensor]:
    """The k best next tokens under the AR rules and their log-probabilities, best first: the top k of
    ``log_softmax(logits)`` with the ids the rules forbid at -inf, in one ``janus.ops.ar_topk`` call.
    Every AR search (greedy, beam, a speculative verification) chooses through this, so that they rank
    equal scores alike (ties: the smaller id). Past the allowed ids the scores are -inf.

    Args:
        logits: (N, ..., V) next-token logits.
        rules: uint8 of shape logits.shape[:-1] (or broadcastable to it): ``janus.ops.ar_topk.ar_rules``
            of the tokens generated so far, the length limits and the repetition guard's stops.
    Returns:
        (scores float32, ids int64), each (N, ..., k).
    """
    shape = logits.shape[:-1]
    if logits.dim() != 2 or rules.shape != shape:
        logits, rules = logits.reshape(-1, logits.shape[-1]), rules.expand(shape).reshape(-1)
    scores, ids = ar_topk(logits, k, banned_ids(sp), sp.eos, rules)
    return scores.view(*shape, k), ids.view(*shape, k)


def rule_edges(min_lens: Tensor, max_lens: Tensor) -> set[int]:
    """The steps (tokens generated so far) at which ``ar_rules`` of some row changes without a repetition
    guard: each row's minimum and maximum. A search recomputes its rules there only (one host sync here)."""
    return set(torch.cat([min_lens, max_lens]).tolist())


def normalized(sum_logp: float, num_tokens: int, length_penalty: float) -> float:
    """sum(log p) / num_tokens ** length_penalty (num_tokens counts eos)."""
    return sum_logp / math.pow(max(num_tokens, 1), length_penalty)
