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

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from janus.decoding.common import choose_next, inference, normalized, repeating_tail, rule_edges, token_limits
from janus.decoding.types import Hypothesis
from janus.model import EncoderOut, JanusModel, KVCache
from janus.ops.ar_topk import ar_rules
from janus.streams import build_ar_step_rows, build_training_rows


def next_token_logits(
    model: JanusModel, enc: EncoderOut, tokens: Tensor, step: int, cache: Optional[KVCache]
) -> Tensor:
    """Logits of P_AR for the token at position step + 1 of every hypothesis: (N, V), the model's
    dtype (float32 for a bfloat16 model's few-row steps on a CPU, see ``JanusModel.project``).

    Args:
        tokens: int64 (N, >= step + 1), [bos, y_1 .. y_step, ...] per hypothesis; N = g * B. Or (N,),
            the tokens at position step alone, for a step the cache serves without autograd.
        step: position of the last known token.
        cache: a KVCache holding positions 0 .. step - 1 (one content row is added), or None
            to recompute the whole prefix (the specification the cache is tested against).
            Without autograd the step runs ``JanusModel.decode_ar_step`` (no rows, no masks).
    """
    sp = model.cfg.specials
    if tokens.dim() == 1:
        if cache is None or cache.length != step or torch.is_grad_enabled():
            raise ValueError("next_token_logits: the last tokens alone need a cache at the step, without autograd")
        return model.project(model.decode_ar_step(tokens, enc, cache))
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
    return model.project(hidden)


def next_token_logprobs(
    model: JanusModel, enc: EncoderOut, tokens: Tensor, step: int, cache: Optional[KVCache]
) -> Tensor:
    """Log P_AR of the token at position step + 1 for every hypothesis: (N, V) fp32 (the log_softmax of
    ``next_token_logits``, same arguments)."""
    return F.log_softmax(next_token_logits(model, enc, tokens, step, cache).float(), dim=-1)


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
        lo, hi = min_lens, max_lens  # of each live row
        edges, rules = rule_edges(min_lens, max_lens), None
        cache = KVCache(capacity=steps) if use_cache else None  # never grows during the search
        out: list[Optional[Hypothesis]] = [None] * B
        for step in range(steps):
            logits = next_token_logits(model, enc, tokens, step, cache)  # (N, V)
            stop = repeating_tail(tokens, step, repeat_ngram, repeat_times) if repeat_ngram else None
            if rules is None or step in edges or stop is not None:
                rules = ar_rules(step, lo, hi, stop)  # step: a host int, no copy
            best, tok = choose_next(logits, 1, rules, sp)
            best, tok = best[:, 0], tok[:, 0]
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
            alive, tokens, sums, lo, hi, rules = alive[keep], tokens[keep], sums[keep], lo[keep], hi[keep], rules[keep]
            enc = enc.select(keep)
            if cache is not None:
                cache.select(keep)
        return [h for h in out if h is not None]


# Sentences up to which a step ranks its candidates in Python lists (a few us a sentence); past that in one
# tensor sort (~30 us whatever the batch). Both sort the same fp64 sums stably, NaN as +inf: the same order.
_HOST_RANKED = 2


def _ranked(sums: list[float], row_top: Tensor, K: int, m: int) -> list[list[tuple[float, int]]]:
    """Per sentence, its m best candidates as (fp64 score, index into its K * per), best first.

    Args:
        sums: the N = nb * K live hypotheses' cumulative log-probabilities, K per sentence.
        row_top: float32 (N, per), each hypothesis' best next-token log-probabilities.
    Returns:
        nb lists; a candidate's index is k * per + i for token i of the sentence's hypothesis k. Ties go to
        the lower index (a stable sort); a NaN score counts as +inf.
    """
    N, per = row_top.shape
    nb, width = N // K, K * per
    if nb <= _HOST_RANKED:
        top = row_top.tolist()
        out = []
        for s in range(nb):
            cand = [v if (v := sums[h] + x) == v else math.inf for h in range(s * K, s * K + K) for x in top[h]]
            best = sorted(range(width), key=cand.__getitem__, reverse=True)[:m]
            out.append([(cand[p], p) for p in best])
        return out
    cand = (torch.tensor(sums, dtype=torch.float64, device=row_top.device)[:, None] + row_top.double()).view(nb, width)
    cand.masked_fill_(cand.isnan(), math.inf)
    vals, pos = torch.sort(cand, dim=1, descending=True, stable=True)
    return [list(zip(v, p)) for v, p in zip(vals[:, :m].tolist(), pos[:, :m].tolist())]


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
        # Each hypothesis' tokens after bos, on the host. A cached step needs the last ones only (one small
        # tensor a step); the repetition guard and the uncached recomputation read them all.
        paths: list[list[int]] = [[] for _ in range(B * K)]
        last = torch.full((B * K,), sp.bos, dtype=torch.long, device=dev)
        whole = bool(repeat_ngram) or not use_cache
        # Cumulative log-probabilities (host floats: fp64); at the start only beam 0 of each sentence is live.
        sums = [0.0 if i % K == 0 else -math.inf for i in range(B * K)]
        alive = list(range(B))  # batch index of each live sentence
        hyp_min, hyp_max = min_lens.repeat_interleave(K), max_lens.repeat_interleave(K)  # per live hypothesis
        edges, rules = rule_edges(min_lens, max_lens), None
        cache = KVCache(capacity=steps) if use_cache else None  # never grows during the search
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        passes = [0] * B
        eos, inf = sp.eos, math.inf
        for step in range(steps):
            nb = len(alive)
            tokens = torch.tensor([[sp.bos, *p] for p in paths], dtype=torch.long, device=dev) if whole else last
            # At the first step only beam 0 of each sentence is live: one row per sentence through the decoder, its
            # logits standing for all K (the others' scores are -inf); the cache grows to K rows at its select.
            alone = step == 0 and not whole and K > 1
            if alone:
                logits = next_token_logits(model, enc, tokens[::K], step, cache).repeat_interleave(K, 0)
            else:
                logits = next_token_logits(model, enc, tokens, step, cache)  # (nb*K, V)
            stop = repeating_tail(tokens, step, repeat_ngram, repeat_times) if repeat_ngram else None
            # The 2K best extensions of each sentence are among the 2K best tokens of each of its
            # hypotheses (a hypothesis adds one constant score to all its tokens): rank those
            # K * 2K candidates in fp64 instead of all K * V.
            per = min(2 * K, logits.shape[-1])
            if rules is None or step in edges or stop is not None:
                rules = ar_rules(step, hyp_min, hyp_max, stop)  # the same for every hypothesis of a sentence
            row_top, row_tok = choose_next(logits, per, rules, sp)  # (nb*K, per), best first
            # The rest is bookkeeping over nb * K * per candidates, on the host: their scores in fp64, the
            # 2K best of each sentence first (a stable sort: ties to the lower hypothesis, then the better-ranked
            # token; a NaN score, from a row without a softmax, counts as +inf, first, as torch.topk ranks NaN).
            ranked = _ranked(sums, row_top, K, min(2 * K, K * per))  # per sentence: (score, candidate) best first
            tok_h = row_tok.tolist()
            order: list[int] = []  # rows of the current batch, in their new order
            new_tok: list[int] = []
            new_sums: list[float] = []
            keep: list[int] = []
            for s in range(nb):
                b = alive[s]
                fins = finished[b]
                live = 0
                row_order, row_tok_new, row_sums = [], [], []
                for j, (score, p) in enumerate(ranked[s]):
                    h = s * K + p // per
                    t = tok_h[h][p % per]
                    if t == eos and -inf < score < inf:
                        # 1. An eos among the first K candidates finishes a hypothesis.
                        if j < K and len(fins) < K:
                            fins.append((normalized(score, step + 1, length_penalty), paths[h][:]))
                        continue
                    # 2. The first K non-eos candidates stay live.
                    if live < K:
                        row_order.append(h)
                        row_tok_new.append(t)
                        row_sums.append(score)
                        live += 1
                # 3. Sentences with K finished hypotheses (or nothing live left) leave.
                if len(fins) >= K or not row_sums or not (-inf < row_sums[0] < inf):
                    passes[b] = step + 1
                    continue
                keep.append(s)
                order += row_order
                new_tok += row_tok_new
                new_sums += row_sums
            if not keep:
                break
            paths = [paths[h] + [t] for h, t in zip(order, new_tok)]
            last = torch.tensor(new_tok, device=dev)
            sums = new_sums
            if cache is not None:
                cache.select([h // K for h in order] if alone else order)
            if len(keep) != nb:
                keep_t = torch.tensor(keep, device=dev)
                enc = enc.select(keep_t)
                alive = [alive[s] for s in keep]
                rows = (keep_t[:, None] * K + torch.arange(K, device=dev)).view(-1)
                hyp_min, hyp_max, rules = hyp_min[rows], hyp_max[rows], rules[rows]
        out = []
        for b in range(B):
            if not finished[b]:
                raise RuntimeError(f"beam search finished sentence {b} without a hypothesis (max length {steps})")
            score, ids = max(finished[b], key=lambda x: x[0])
            out.append(Hypothesis(ids=ids, score=score, passes=passes[b]))
        return out
