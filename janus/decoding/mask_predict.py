"""NAR decoding over P_NAR: mask-predict with a length beam (JANUS.md section 4).

T counts decoder passes (the original's "10 iterations" ran 11 passes; here T=10
means 10). For each sentence:

1. Encode once; take the l most likely target lengths from the length head.
2. One canvas per candidate: [bos, <mask> x (L-2), eos]. The l candidates of a
   sentence share its encoder states and cross-attention keys/values.
3. Pass t = 0 .. T-1: run the decoder over the canvas (U and P rows, full
   visibility); at every masked slot take the best token and its log-probability
   as the new token and score. If t < T-1, re-mask the floor((L-2) * (T-1-t) / T)
   lowest-scoring tokens (ties: the smaller position), scores reset to 0.
4. Choose the candidate with the best mean log-probability over its tokens (bos and
   eos excluded), or, with ``rerank``, the best mean log P_AR of its tokens and eos
   from one teacher-forced AR pass over all candidates (with ``dedup`` too, over the
   candidates with their repeats collapsed: P_AR scores what would be output). With ``length_weight`` w > 0
   (an option beyond JANUS.md) the length head votes too: (sum of the tokens'
   log-probabilities + w * log P(length)) / tokens.

Pad, bos, eos and <mask> are never predicted at a masked slot: the canvas length
decides where eos is. The three steps are the ops ``length_beam_init``,
``mask_predict_update`` and ``remask_lowest`` (janus.ops), each with a fast backend
where one is available.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from janus.decoding.common import canvas_banned_ids, forced_limits, inference, token_limits
from janus.decoding.types import CanvasStep, Hypothesis
from janus.model import EncoderOut, JanusModel
from janus.ops import length_beam_init, mask_predict_update, remask_lowest
from janus.ops.length_beam_init import canvases
from janus.streams import DecoderRows, build_canvas_rows, build_training_rows


def remask_counts(num_slots: Tensor, t: int, passes: int) -> Tensor:
    """Tokens re-masked after pass t of T: floor(m * (T - 1 - t) / T) for m re-maskable slots (int64)."""
    return num_slots * (passes - 1 - t) // passes


# A decoder pass over one more group of canvases costs about as much as this many more canvas rows
# (CPU, one thread: a few ms of per-call work against ~0.5 ms per row of the iwslt preset, less for smaller ones).
# On CUDA a pass is launch-bound at these sizes and padding costs little: one group.
_GROUP_COST_ROWS = {"cpu": 16}


def length_groups(widths: list[int], per_sentence: int, group_cost: float) -> list[list[int]]:
    """Split sentences into groups decoded separately, each padded to its own widest canvas.

    Minimises sum over groups of (per_sentence * sentences * widest canvas + group_cost) by dynamic
    programming over the sentences sorted by width (a group is a run of that order).

    Args:
        widths: canvas width (with bos, eos) of each sentence's widest candidate.
        per_sentence: candidates per sentence (l).
        group_cost: the cost of one more group, in canvas rows.
    Returns:
        Groups of sentence indices, each widest first; together every sentence once.
    """
    order = sorted(range(len(widths)), key=lambda b: (-widths[b], b))
    B = len(order)
    best = [0.0] + [math.inf] * B  # best[i]: the cost of order[:i]
    cut = [0] * (B + 1)
    for i in range(1, B + 1):
        for k in range(i):  # the last group is order[k:i], its widest sentence order[k]
            cost = best[k] + group_cost + per_sentence * (i - k) * widths[order[k]]
            if cost < best[i]:
                best[i], cut[i] = cost, k
    groups, i = [], B
    while i:
        groups.append(order[cut[i] : i])
        i = cut[i]
    return groups[::-1]


@dataclasses.dataclass
class _Group:
    """Sentences decoded together by ``refine``: their candidates' rows of the full canvases (None: all),
    encoder output, canvases, scores, re-maskable slots, each sentence's most slots, decoder rows."""

    rows_of: Optional[Tensor]
    enc: EncoderOut
    tokens: Tensor
    scores: Tensor
    num_slots: Tensor
    slots: list[int]
    rows: DecoderRows


def refine(
    model: JanusModel,
    enc: EncoderOut,
    tokens: Tensor,
    scores: Tensor,
    num_slots: Tensor,
    passes: int,
    history: Optional[list[tuple[Tensor, Tensor, Tensor]]] = None,
) -> None:
    """``passes`` mask-predict passes over canvases, in place.

    Each pass fills every <mask> slot with its best token and log-probability; after pass
    t < T-1 the ``remask_counts(num_slots, t, T)`` lowest-scoring tokens are masked again.
    Tokens that must never be re-masked besides bos/eos (a fixed prefix) score +inf.

    Batching without paying for padding: on a CPU the sentences are split into groups of similar
    canvas width (``length_groups``), each decoded at its own width and source length; a sentence
    whose canvases hold no <mask> any more (re-mask counts reach 0 early for m < T slots) leaves
    its group's passes. Neither changes a result: every canvas sees only its own rows.

    Args:
        tokens: int64 (R, L) canvases, R = g * B grouped by sentence of ``enc``.
        scores: float (R, L).
        num_slots: int64 (R,) how many tokens of each canvas may change.
        history: when given, gets (tokens, scores, re-masked) copies after every pass.
    """
    sp = model.cfg.specials
    banned = canvas_banned_ids(sp)
    panels = model.output_panels()  # the CPU's faster products for mask_predict_update (None elsewhere)
    R, B = tokens.shape[0], enc.states.shape[0]
    if R == 0:
        return
    g = R // B
    widths = (tokens != sp.pad).sum(1).view(B, g).max(1).values
    most = num_slots.view(B, g).max(1).values
    cost = _GROUP_COST_ROWS.get(tokens.device.type, math.inf)
    host = torch.stack([widths, most, enc.lengths]).tolist()  # one host sync for the whole refinement
    plan = length_groups(host[0], g, cost) if B > 1 and math.isfinite(cost) else [list(range(B))]
    groups = []
    for members in plan:
        if len(plan) == 1 and members == list(range(B)):
            rows_of, sub_enc = None, enc
            L, tk, sc, ns = tokens.shape[1], tokens, scores, num_slots
        else:
            idx = torch.tensor(members, device=tokens.device)
            rows_of = (idx[:, None] * g + torch.arange(g, device=tokens.device)).view(-1)
            L, S = host[0][members[0]], max(host[2][b] for b in members)
            sub_enc = EncoderOut(enc.states[idx, :S], enc.padding[idx, :S], enc.lengths[idx])
            tk, sc, ns = tokens[rows_of, :L], scores[rows_of, :L], num_slots[rows_of]
        # Sentences with a <mask> left before pass t >= 1 (m * (T - t) >= T), widest first.
        slots = [host[1][b] for b in members]
        groups.append(_Group(rows_of, sub_enc, tk, sc, ns, slots, build_canvas_rows(tk, pad=sp.pad)))
    for t in range(passes):
        if history is not None:
            before = (tokens.clone(), scores.clone())  # filled in below: every canvas after this pass's update
        for gr in groups:
            live = _live(gr.slots, t, passes)
            if live == 0:
                continue
            cut = live * g
            tk, sc, rows, sub_enc = gr.tokens, gr.scores, gr.rows, gr.enc
            if live < len(gr.slots):  # a prefix of the group; views, updated in place
                rows = dataclasses.replace(
                    rows, tokens=tk[:cut], positions=rows.positions[:cut], kinds=rows.kinds[:cut],
                    ranks=rows.ranks[:cut], visibility=rows.visibility[:cut], visible_span=rows.visible_span[:cut],
                )  # fmt: skip
                sub_enc = EncoderOut(sub_enc.states[:live], sub_enc.padding[:live], sub_enc.lengths[:live],
                                     [(k[:live], v[:live]) for k, v in sub_enc.cross])  # fmt: skip
            hidden = model.decode(rows, sub_enc, outputs=tk[:cut] == sp.mask)  # (cut, L, D), read at the <mask> slots
            mask_predict_update(hidden, model.embed.weight, tk[:cut], sc[:cut], sp.mask, banned, panels=panels)
            if history is not None:
                _put(before[0], gr.rows_of, tk)
                _put(before[1], gr.rows_of, sc)
            if t < passes - 1:
                counts = remask_counts(gr.num_slots[:cut], t, passes)
                remask_lowest(tk[:cut], sc[:cut], counts, sp.mask, sp.pad, sp.bos, sp.eos)
        if history is not None or t == passes - 1:
            for gr in groups:
                if gr.rows_of is not None:
                    _put(tokens, gr.rows_of, gr.tokens)
                    _put(scores, gr.rows_of, gr.scores)
        if history is not None:
            history.append((*before, tokens == sp.mask))


def _live(slots: list[int], t: int, passes: int) -> int:
    """How many of a group's first sentences pass t must decode: those with a <mask> left (pass 0: all;
    after pass t - 1, m * (T - t) // T slots of a canvas with m were masked again). All of them when the
    sentences with a <mask> left are not the first ones (a group in input order)."""
    if t == 0:
        return len(slots)
    left = [m * (passes - t) >= passes for m in slots]
    live = sum(left)
    return live if all(left[:live]) else len(slots)


def _put(full: Tensor, rows_of: Optional[Tensor], part: Tensor) -> None:
    """Write a group's (r, L') canvases back into rows ``rows_of`` of ``full`` (R, L) (None: all rows)."""
    if rows_of is None:
        if part is not full:
            full.copy_(part)
    else:
        full[rows_of, : part.shape[1]] = part


def forced_candidates(target_lengths: Tensor, beam: int, lo: Tensor, hi: Tensor) -> Tensor:
    """Candidate token counts around forced ones: n, n-1, n+1, n-2, ... clamped to [lo, hi]: (B, l)."""
    offsets = torch.tensor([((i + 1) // 2) * (1 if i % 2 == 0 else -1) for i in range(beam)])  # 0, -1, 1, -2 ..
    offsets = offsets.to(target_lengths.device)
    return torch.minimum(torch.maximum(target_lengths[:, None] + offsets[None, :], lo[:, None]), hi[:, None])


def collapse_repeats(tokens: Tensor, pad: int) -> Tensor:
    """Canvases with every run of one repeated token collapsed into one and pads moved to the end: (R, L).

    Args:
        tokens: int64 (R, L) [bos, ..., eos, pad ...].
    """
    keep = tokens != pad
    keep[:, 1:] &= tokens[:, 1:] != tokens[:, :-1]
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept slots first, in their order
    kept = keep.sum(1, keepdim=True)
    return tokens.gather(1, order).masked_fill(torch.arange(tokens.shape[1], device=tokens.device) >= kept, pad)


def ar_mean_logprob(model: JanusModel, enc: EncoderOut, tokens: Tensor) -> Tensor:
    """Mean log P_AR of each canvas' tokens and eos, one teacher-forced pass: (R,) fp32.

    Args:
        tokens: int64 (R, L) [bos, ..., eos, pad ...], R = g * B candidates grouped by sentence.
    """
    sp = model.cfg.specials
    rows = build_training_rows(tokens, None, pad=sp.pad, mask=sp.mask, ar=True, nar=False, aux=False)
    hidden = model.decode(rows, enc)  # (R, rows, D)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.ar_rows)
    logp = F.log_softmax(model.project(h).float(), dim=-1).gather(1, rows.ar_targets[:, None]).squeeze(1)
    owner = rows.ar_rows // rows.num_rows
    R = tokens.shape[0]
    sums = torch.zeros(R, device=tokens.device).index_add_(0, owner, logp)
    counts = torch.zeros(R, device=tokens.device).index_add_(0, owner, torch.ones_like(logp))
    return sums / counts.clamp_min(1)


def mask_predict(
    model: JanusModel,
    src: Tensor,
    *,
    iterations: int = 10,
    length_beam: int = 3,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    min_len: int = 1,
    rerank: bool = False,
    length_weight: float = 0.0,
    dedup: bool = False,
    history: bool = False,
    target_lengths: Optional[Tensor] = None,
) -> list[Hypothesis]:
    """Mask-predict decoding of a batch (see the module docstring).

    Args:
        model: a JanusModel (put in eval mode for the call).
        src: int64 (B, S) source ids + eos, right-padded.
        iterations: T decoder passes (T = 1 is a single argmax pass).
        length_beam: l candidates per sentence.
        max_len_a, max_len_b, min_len: token-count limits, as in ``DecodeConfig``.
        rerank: choose the candidate by mean log P_AR (one more pass; with ``dedup``, of the candidates with
            their repeats collapsed).
        length_weight: w >= 0; choose the candidate by (sum of its token log-probabilities + w * log P(length))
            / tokens, P the length head's (0: the mean token log-probability). Not with ``rerank``.
        dedup: collapse runs of one repeated token in the chosen candidate's ids (its history stays the
            canvas's, and so does its score but with ``rerank``).
        history: return the chosen canvas after every pass.
        target_lengths: int64 (B,) token counts to use instead of the length head; with l > 1
            the candidates are n, n-1, n+1, ... (clamped).
    Returns:
        B hypotheses in batch order.
    """
    if iterations < 1 or length_beam < 1:
        raise ValueError(f"iterations={iterations} and length_beam={length_beam} must be >= 1")
    if not (math.isfinite(length_weight) and length_weight >= 0) or (rerank and length_weight):
        raise ValueError(f"length_weight={length_weight} must be a number >= 0, and 0 with rerank")
    with inference(model):
        sp = model.cfg.specials
        T, beam = iterations, length_beam
        enc = model.encode(src)
        B = src.shape[0]
        if B == 0:
            return []
        # 1. Length candidates and their canvases (lengths here include bos and eos).
        lo, hi = token_limits(model, enc, None, max_len_a=max_len_a, max_len_b=max_len_b, min_len=min_len)
        length_lp = model.length_scores(enc)  # (B, C) log P(n), n with bos and eos
        if target_lengths is None:
            tokens, lengths = length_beam_init(length_lp, beam, min_len + 2, hi + 2, sp.bos, sp.eos,
                                               sp.mask, sp.pad)  # fmt: skip
        else:
            forced, _ = forced_limits(target_lengths.to(src.device), model.cfg.max_target_positions)
            counts = forced_candidates(forced, beam, torch.minimum(lo, forced), torch.maximum(hi, forced))
            lengths = counts.reshape(-1) + 2
            tokens = canvases(lengths, bos=sp.bos, eos=sp.eos, mask=sp.mask, pad=sp.pad)
        scores = torch.zeros(tokens.shape, dtype=torch.float32, device=src.device)
        steps: list[tuple[Tensor, Tensor, Tensor]] = []
        # 2. T passes over the canvases.
        refine(model, enc, tokens, scores, lengths - 2, T, steps if history else None)
        # 3. Choose a candidate per sentence.
        real = (tokens != sp.pad) & (tokens != sp.bos) & (tokens != sp.eos)
        total = (scores * real).sum(1)
        if length_weight:
            # A length the head cannot score (a forced one beyond its classes) counts as its least likely one.
            n = lengths.view(B, beam)
            floor = length_lp.masked_fill(~torch.isfinite(length_lp), float("inf")).amin(1, keepdim=True)
            lp = length_lp.gather(1, n.clamp_max(length_lp.shape[1] - 1))
            lp = torch.where((n < length_lp.shape[1]) & torch.isfinite(lp), lp, floor)
            total = total + length_weight * lp.reshape(-1)
        mean = total / real.sum(1).clamp_min(1)
        shown = collapse_repeats(tokens, sp.pad) if dedup else tokens  # each candidate as it would be output
        if rerank:
            mean = ar_mean_logprob(model, enc, shown)
        best = mean.view(B, beam).argmax(1)  # ties: the earlier (more likely) length
        rows = torch.arange(B, device=src.device) * beam + best
        out = []
        widths = (shown != sp.pad).sum(1).tolist()
        for r in rows.tolist():
            n = int(lengths[r])
            hist = None
            if history:
                hist = [
                    CanvasStep(
                        tokens=tk[r, :n].tolist(),
                        scores=sc[r, :n].tolist(),
                        remasked=rm[r, :n].nonzero().squeeze(1).tolist(),
                    )
                    for tk, sc, rm in steps
                ]
            ids = shown[r, 1 : widths[r] - 1].tolist()
            out.append(Hypothesis(ids=ids, score=float(mean[r]), passes=T + int(rerank), history=hist))
        return out
