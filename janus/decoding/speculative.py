"""Self-speculative decoding: NAR drafts verified by the model's own AR head (JANUS.md section 4).

The same model has both heads, so a NAR draft can be checked by ONE parallel
teacher-forced AR pass. Per sentence, with the accepted prefix y_0 .. y_{p-1}
(initially bos) and a canvas length n (initially the length head's best):

1. Draft: canvas [prefix, <mask> x (n-1-p), eos]; ``draft_iterations``
   mask-predict passes fill the masked slots, the prefix stays fixed context.
2. Verify: one cached AR pass writes the content rows of positions p-1 .. n-2 and
   asks query rows at positions p .. n-1; a_q is the AR's greedy token at q
   (with the same constraints as greedy search).
3. Accept a_p .. a_j where j is the first position whose draft token differs from
   a_j (the AR's own token replaces it), or the whole draft up to its eos. Every
   accepted token is the AR's greedy choice given an accepted prefix, so the output
   equals greedy search exactly; each round accepts at least one token.
4. Stop at an accepted eos. If the prefix outgrew the canvas, lengthen it.

The AR key/value cache keeps only accepted positions valid: a rejected draft's
content rows are overwritten by the next verification before any query sees them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from janus.decoding.common import constrain_ar, inference, normalized, repeating, token_limits
from janus.decoding.mask_predict import refine
from janus.decoding.types import Hypothesis
from janus.model import JanusModel, KVCache
from janus.ops import length_beam_init
from janus.streams import build_ar_verify_rows

# When the accepted prefix fills the canvas without an eos, it grows by this fraction of the
# prefix (at least _EXTEND_MIN slots): the length head cannot see the prefix, so this is a guess
# that the next verification corrects either way.
_EXTEND_FRACTION = 0.25
_EXTEND_MIN = 3


def speculative_decode(
    model: JanusModel,
    src: Tensor,
    *,
    draft_iterations: int = 1,
    length_penalty: float = 1.0,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    min_len: int = 1,
    target_lengths: Optional[Tensor] = None,
    repeat_ngram: int = 0,
    repeat_times: int = 4,
) -> list[Hypothesis]:
    """Self-speculative decoding of a batch; the output equals ``greedy_search`` (with the same
    repetition guard: it is applied to every verification query on its own drafted prefix, so an
    accepted token is greedy's choice under the guard).

    Args:
        model: a JanusModel (put in eval mode for the call).
        src: int64 (B, S) source ids + eos, right-padded.
        draft_iterations: mask-predict passes per draft.
        length_penalty, max_len_a, max_len_b, min_len: as in ``DecodeConfig``.
        target_lengths: int64 (B,) token counts to force (eos exactly there), or None.
        repeat_ngram, repeat_times: the degenerate-repetition guard, as in ``DecodeConfig``.
    Returns:
        B hypotheses in batch order; ``passes`` counts draft and verification passes.
    """
    if draft_iterations < 1:
        raise ValueError(f"draft_iterations={draft_iterations} must be >= 1")
    with inference(model):
        sp = model.cfg.specials
        dev = src.device
        enc = model.encode(src)
        B = src.shape[0]
        if B == 0:
            return []
        min_lens, max_lens = token_limits(
            model, enc, target_lengths, max_len_a=max_len_a, max_len_b=max_len_b, min_len=min_len
        )
        if target_lengths is not None:
            n = max_lens + 2
        else:
            scores = model.length_scores(enc)
            n = length_beam_init(scores, 1, min_len + 2, max_lens + 2, sp.bos, sp.eos, sp.mask, sp.pad)[1]
        seq = torch.full((B, int(max_lens.max()) + 2), sp.pad, dtype=torch.long, device=dev)
        seq[:, 0] = sp.bos
        p = torch.ones(B, dtype=torch.long, device=dev)  # accepted tokens, bos included
        sums = torch.zeros(B, dtype=torch.float64, device=dev)
        passes = torch.zeros(B, dtype=torch.long, device=dev)
        alive = torch.arange(B, device=dev)
        cache = KVCache()
        out: list[Optional[Hypothesis]] = [None] * B
        while alive.numel():
            # 1. Draft the slots p .. n-2 with the prefix as fixed context.
            L = int(n.max())
            col = torch.arange(L, device=dev)[None, :]
            prefix = col < p[:, None]
            slots = prefix.logical_not() & (col < n[:, None] - 1)
            canvas = torch.where(prefix, seq[:, :L], torch.where(slots, sp.mask, sp.pad))
            canvas = torch.where(col == n[:, None] - 1, sp.eos, canvas)
            num_slots = slots.sum(1)
            if bool((num_slots > 0).any()):
                # The prefix scores +inf, so re-masking never picks it.
                scores = torch.where(prefix, float("inf"), 0.0)
                refine(model, enc, canvas, scores, num_slots, draft_iterations)
                passes += torch.where(num_slots > 0, draft_iterations, 0)
            # 2. Verify positions p .. n-1 in one cached AR pass.
            rows = build_ar_verify_rows(canvas, p - 1, n - 1, pad=sp.pad, mask=sp.mask)
            hidden = model.decode(rows, enc, cache)[:, rows.num_content :]  # (N, C, D): queries at p + j
            logp = F.log_softmax(model.project(hidden).float(), dim=-1)  # (N, C, V)
            j = torch.arange(rows.num_content, device=dev)[None, :]
            stop = None
            if repeat_ngram:  # query p + j sees canvas[0 .. p + j - 1]: the accepted prefix, then the draft
                stop = repeating(canvas, (p[:, None] + j - 1).clamp_max(L - 1), repeat_ngram, repeat_times)
            constrain_ar(logp, p[:, None] + j - 1, min_lens[:, None], max_lens[:, None], sp, stop)
            best, ar_tok = logp.max(-1)  # (N, C)
            passes += 1
            # 3. Accept the AR's tokens up to and including the first disagreement.
            count = n - p  # queries of each hypothesis
            draft = canvas.gather(1, (p[:, None] + j).clamp_max(L - 1))
            differ = (ar_tok != draft) & (j < count[:, None])
            first = torch.where(differ.any(1), differ.int().argmax(1), count)
            accepted = torch.minimum(first + 1, count)  # >= 1
            take = j < accepted[:, None]
            seq.scatter_(1, torch.where(take, p[:, None] + j, 0), torch.where(take, ar_tok, sp.bos))
            sums += (best.double() * take).sum(1)
            last = ar_tok.gather(1, (accepted - 1)[:, None]).squeeze(1)
            p = p + accepted
            ended = last == sp.eos
            # 4. Finished sentences leave; canvases the prefix outgrew are lengthened.
            for i in ended.nonzero().squeeze(1).tolist():
                k = int(p[i]) - 2  # tokens without bos and eos
                out[int(alive[i])] = Hypothesis(
                    ids=seq[i, 1 : k + 1].tolist(),
                    score=normalized(float(sums[i]), k + 1, length_penalty),
                    passes=int(passes[i]),
                )
            if bool(ended.all()):
                break
            if bool(ended.any()):
                keep = (~ended).nonzero().squeeze(1)
                alive, seq, p, n, sums, passes = alive[keep], seq[keep], p[keep], n[keep], sums[keep], passes[keep]
                min_lens, max_lens = min_lens[keep], max_lens[keep]
                enc = enc.select(keep)
                cache.select(keep)
            grow = torch.clamp(torch.ceil(p.double() * _EXTEND_FRACTION).long(), min=_EXTEND_MIN)
            n = torch.where(p >= n, torch.minimum(p + grow, max_lens + 2), n)
        return [h for h in out if h is not None]
