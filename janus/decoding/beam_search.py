"""AR decoding over P_AR: greedy search and beam search with a key/value cache (JANUS.md section 4).

Each step adds ONE content row (the last token, at position t) to the cache and runs
ONE query row (at position t + 1) that predicts the next token; the encoder and its
cross-attention keys/values are computed once. Sentences whose search is over leave
the batch, so their rows cost nothing afterwards.

Beam search keeps ``beam`` live hypotheses per sentence. Each step it takes the 2 *
beam best extensions; an eos among the first ``beam`` of them finishes a hypothesis
(score = sum log p / (tokens + eos) ** length_penalty), the first ``beam`` others stay
live. A sentence is done once it has ``beam`` finished hypotheses; its best one is
the result. With beam 1 this is greedy search.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from janus.decoding.common import constrain_ar, inference, normalized, repeating_tail, token_limits
from janus.decoding.types import Hypothesis
from janus.model import EncoderOut, JanusModel, KVCache
from janus.streams import build_ar_step_rows, build_training_rows


def next_token_logprobs(
    model: JanusModel, enc: EncoderOut, tokens: Tensor, step: int, cache: Optional[KVCache]
) -> Tensor:
    """Log P_AR of the token at position step + 1 for every hypothesis: (N, V) fp32.

    Args:
        tokens: int64 (N, >= step + 1), [bos, y_1 .. y_step, ...] per hypothesis; N = g * B.
        step: position of the last known token.
        cache: a KVCache holding positions 0 .. step - 1 (one content row is added), or None
            to recompute the whole prefix (the specification the cache is tested against).
            Without autograd the step runs ``JanusModel.decode_ar_step`` (no rows, no masks).
    """
    sp = model.cfg.specials
    if cache is not None and cache.length == step and not torch.is_grad_enabled():
        hidden = model.decode_ar_step(tokens[:, step], enc, cache)  # (N, D): the query row
    elif cache is not None:
        rows = build_ar_step_rows(tokens[:, step], step, cache.length, mask=sp.mask)
        hidden = model.decode(rows, enc, cache)[:, 1]  # (N, D): the query row
    else:
        # The prefix plus a placeholder eos: its last AR query row predicts position step + 1.
        prefix = torch.cat([tokens[:, : step + 1], torch.full_like(tokens[:, :1], sp.eos)], 1)
        rows = build_training_rows(prefix, None, pad=sp.pad, mask=sp.mask, ar=True, nar=False, aux=False)
        hidden = model.decode(rows, enc)[:, -1]
    return F.log_softmax(model.project(hidden).float(), dim=-1)


def greedy_search(
    model: JanusModel,
    src: Tensor,
    *,
    length_penalty: float = 1.0,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    min_len: int = 1,
    target_lengths: Optional[Tensor] = None,
    repeat_ngram: int = 0,
    repeat_times: int = 4,
    use_cache: bool = True,
) -> list[Hypothesis]:
    """Greedy AR decoding of a batch.

    Args:
        model: a JanusModel (put in eval mode for the call).
        src: int64 (B, S) source ids + eos, right-padded.
        length_penalty, max_len_a, max_len_b, min_len: as in ``DecodeConfig``.
        target_lengths: int64 (B,) token counts to force (eos exactly there), or None.
        repeat_ngram, repeat_times: the degenerate-repetition guard, as in ``DecodeConfig``.
        use_cache: False recomputes the whole prefix every step (slow; for testing).
    Returns:
        B hypotheses in batch order.
    """
    with inference(model):
        sp = model.cfg.specials
        enc = model.encode(src)
        min_lens, max_lens = token_limits(
            model, enc, target_lengths, max_len_a=max_len_a, max_len_b=max_len_b, min_len=min_len
        )
        B = src.shape[0]
        steps = int(max_lens.max()) + 1 if B else 0
        tokens = torch.full((B, steps + 1), sp.pad, dtype=torch.long, device=src.device)
        tokens[:, 0] = sp.bos
        sums = torch.zeros(B, dtype=torch.float64, device=src.device)
        alive = torch.arange(B, device=src.device)  # batch index of each live row
        cache = KVCache(capacity=steps) if use_cache else None  # never grows during the search
        out: list[Optional[Hypothesis]] = [None] * B
        for step in range(steps):
            logp = next_token_logprobs(model, enc, tokens, step, cache)  # (N, V)
            stop = repeating_tail(tokens, step, repeat_ngram, repeat_times) if repeat_ngram else None
            constrain_ar(logp, step, min_lens[alive], max_lens[alive], sp, stop)  # step: a host int, no copy
            best, tok = logp.max(-1)
            tokens[:, step + 1] = tok
            sums += best.double()
            ended = tok == sp.eos
            if not bool(ended.any()):
                continue
            for i in ended.nonzero().squeeze(1).tolist():
                b = int(alive[i])
                out[b] = Hypothesis(
                    ids=tokens[i, 1 : step + 1].tolist(),
                    score=normalized(float(sums[i]), step + 1, length_penalty),
                    passes=step + 1,
                )
            keep = (~ended).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            alive, tokens, sums = alive[keep], tokens[keep], sums[keep]
            enc = enc.select(keep)
            if cache is not None:
                cache.select(keep)
        return [h for h in out if h is not None]


def beam_search(
    model: JanusModel,
    src: Tensor,
    *,
    beam: int = 5,
    length_penalty: float = 1.0,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    min_len: int = 1,
    target_lengths: Optional[Tensor] = None,
    repeat_ngram: int = 0,
    repeat_times: int = 4,
    use_cache: bool = True,
) -> list[Hypothesis]:
    """Beam search over P_AR (see the module docstring); beam 1 equals ``greedy_search``.

    Args:
        model: a JanusModel (put in eval mode for the call).
        src: int64 (B, S) source ids + eos, right-padded.
        beam: live hypotheses per sentence.
        length_penalty, max_len_a, max_len_b, min_len: as in ``DecodeConfig``.
        target_lengths: int64 (B,) token counts to force (eos exactly there), or None.
        repeat_ngram, repeat_times: the degenerate-repetition guard, as in ``DecodeConfig``.
        use_cache: False recomputes the whole prefix every step (slow; for testing).
    Returns:
        B hypotheses in batch order, each the best finished one of its sentence.
    """
    if beam < 1:
        raise ValueError(f"beam={beam} must be >= 1")
    with inference(model):
        sp = model.cfg.specials
        dev = src.device
        enc = model.encode(src)
        min_lens, max_lens = token_limits(
            model, enc, target_lengths, max_len_a=max_len_a, max_len_b=max_len_b, min_len=min_len
        )
        B, K = src.shape[0], beam
        steps = int(max_lens.max()) + 1 if B else 0
        tokens = torch.full((B * K, steps + 1), sp.pad, dtype=torch.long, device=dev)
        tokens[:, 0] = sp.bos
        # Cumulative log-probabilities; at the start only beam 0 of each sentence is live.
        sums = torch.zeros(B, K, dtype=torch.float64, device=dev)
        sums[:, 1:] = float("-inf")
        sums = sums.view(-1)
        alive = torch.arange(B, device=dev)  # batch index of each live sentence
        cache = KVCache(capacity=steps) if use_cache else None  # never grows during the search
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        passes = [0] * B
        for step in range(steps):
            nb = alive.numel()
            logp = next_token_logprobs(model, enc, tokens, step, cache)  # (nb*K, V)
            V = logp.shape[-1]
            per_hyp = torch.arange(nb * K, device=dev) // K
            stop = repeating_tail(tokens, step, repeat_ngram, repeat_times) if repeat_ngram else None
            constrain_ar(logp, step, min_lens[alive][per_hyp], max_lens[alive][per_hyp], sp, stop)
            # The 2K best extensions of each sentence are among the 2K best tokens of each of its
            # hypotheses (a hypothesis adds one constant score to all its tokens): rank those
            # K * 2K candidates in fp64 instead of all K * V.
            per = min(2 * K, V)
            row_top, row_tok = logp.topk(per, dim=1)  # (nb*K, per) fp32, best first
            cand = (sums[:, None] + row_top.double()).view(nb, K * per)
            top, pos = cand.topk(min(2 * K, K * per), dim=1)  # (nb, 2K), best first
            src_beam = pos // per
            tok = row_tok.view(nb, K * per).gather(1, pos)
            is_eos = (tok == sp.eos) & torch.isfinite(top)
            # 1. An eos among the first K candidates finishes a hypothesis.
            fin = is_eos[:, :K].nonzero().tolist()
            for s, j in fin:
                b = int(alive[s])
                if len(finished[b]) < K:
                    h = s * K + int(src_beam[s, j])
                    ids = tokens[h, 1 : step + 1].tolist()
                    finished[b].append((normalized(float(top[s, j]), step + 1, length_penalty), ids))
            # 2. The first K non-eos candidates stay live.
            live_rank = torch.where(is_eos, 2 * K + 1, torch.arange(top.shape[1], device=dev))
            pick = live_rank.argsort(dim=1, stable=True)[:, :K]  # (nb, K)
            new_sums = top.gather(1, pick)
            new_tok = tok.gather(1, pick)
            new_src = (torch.arange(nb, device=dev)[:, None] * K + src_beam.gather(1, pick)).view(-1)
            # 3. Sentences with K finished hypotheses (or nothing live left) leave.
            done = torch.tensor(
                [len(finished[int(b)]) >= K for b in alive.tolist()], dtype=torch.bool, device=dev
            ) | ~torch.isfinite(new_sums[:, 0])
            for s in done.nonzero().squeeze(1).tolist():
                passes[int(alive[s])] = step + 1
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            order = new_src.view(nb, K)[keep].view(-1)  # rows of the current batch, new order
            tokens = tokens[order]
            tokens[:, step + 1] = new_tok[keep].view(-1)
            sums = new_sums[keep].view(-1)
            if cache is not None:
                cache.select(order)
            if keep.numel() != nb:
                enc = enc.select(keep)
                alive = alive[keep]
        out = []
        for b in range(B):
            if not finished[b]:
                raise RuntimeError(f"beam search finished sentence {b} without a hypothesis (max length {steps})")
            score, ids = max(finished[b], key=lambda x: x[0])
            out.append(Hypothesis(ids=ids, score=score, passes=passes[b]))
        return out
