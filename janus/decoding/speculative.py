"""Self-speculative decoding: drafts verified by the model's own AR head (JANUS.md section 4).

The same model has both heads, so a draft can be checked by ONE parallel teacher-forced AR
pass, and a NAR draft can ride along in that very pass. Per sentence, with the accepted prefix
y_0 .. y_{p-1} (initially bos) and a draft d_p .. d_{e-1} (initially none):

1. One decoder pass holds the AR verification rows (content rows at p-1 .. p+c-2: y_{p-1}
   and the draft; queries at p .. p+c-1) and, when the policy asks for one, a NAR canvas
   [y_0 .. y_{p-1}, <mask> x (n-1-p), eos] in the same rows (the two streams never see each
   other: JANUS.md section 2). c - 1 is the number of draft tokens checked: all of them up to
   the draft's first eos, at most ``block`` (0: no bound). a_q is the AR's greedy token at q (with the
   constraints greedy search applies).
2. Accept a_p .. a_j where j is the first query whose draft token differs from a_j (the AR's
   own token replaces it), or all c. Every accepted token is greedy's choice given an
   accepted prefix, so the output equals greedy search exactly, and every pass accepts at
   least one token: no sentence ever takes more decoder passes than greedy search.
3. The draft past the new prefix: the draft tokens d_{j+1} .. stay, and where the window ran past
   the draft, the AR's own tokens there become the draft (Jacobi). The AR's tokens after a rejected
   d_j were predicted from d_j; the draft's were not, and they are accepted more often: in passes
   against greedy's (300 test sentences, the default policy and block), 0.618 against 0.649 with
   the AR's tokens in their place (``janus-sched`` of the quality study), 0.788 against 0.850
   (``janus-light``), 0.753 against 0.829 (``janus-ar-init-stopgrad``). With random weights it is the
   other way round (the AR's tokens repeat, the draft's are wrong): decode_speed.py --random-weights, 26.6
   passes against 13.6. ``keep_draft=False`` (``DecodeConfig.draft_keep``) makes the AR's tokens replace the
   draft's past a rejection. If a NAR canvas rode along, its tokens past
   the new prefix replace the draft instead (up to the canvas' eos); with ``draft_iterations``
   T > 1 the canvas stays in the next T - 1 passes, mask-predict style: after its pass t the
   floor(m * (T-1-t) / T) lowest-scoring of its m slots past the prefix are masked again, and
   accepted tokens are written into it.
4. Stop at an accepted eos.

Draft policy (when a pass carries a NAR canvas), ``policy``:

- ``"first"``: only the first pass; afterwards only Jacobi drafts.
- ``"exhausted"`` (the default): the first pass, and the pass after one that used the draft up
  without reaching an eos (the canvas is lengthened if the prefix outgrew it).
- ``"stall"``: as ``exhausted``, and also after a pass that accepted just one token.
- ``"always"``: every pass.

Why ``exhausted``, measured (one thread, batch 1, methods taking turns; passes are batch-invariant and
counted on more sentences at batch 32; every variant returned greedy's output on every sentence and no
sentence took more passes than greedy):

- small janus initialised from ``ar`` (1500 updates) + 250 janus updates, 200 LibreOffice test
  sentences, greedy 16.5 passes per sentence; its NAR draft matches greedy at 21% of positions:
  passes / greedy's: first 0.90, exhausted 0.90, stall 0.82, always 0.80 (``draft_iterations`` 2:
  0.88 to 0.82); wall / greedy's (16 sentences): first 1.64, exhausted 1.66, stall 2.18, and with
  ``block`` 4: exhausted 1.40, stall 2.00, always 2.16. A canvas costs its rows and their
  vocabulary projection in every pass it joins, more than the passes it saves with weak drafts.
- the tests' synthetic model (a word-for-word code, good drafts), 100 sentences, greedy 5.5 passes:
  2.0 passes for every policy (0.37), wall 0.93 of greedy's for first and exhausted, 1.06 for stall
  and always.

- ``janus-light`` of the quality study at 9000 updates (greedy 16.45 passes, 300 test sentences, batch
  32): passes / greedy's: exhausted 0.756 (block 4) and 0.754 (all), stall 0.726, always 0.718
  (``draft_iterations`` 2: 0.722, 3: 0.732). Even a canvas in every pass saves a twentieth of the passes:
  a pass accepts about 1.4 tokens, the drafts being right that rarely. Its NAR output (T=10 l=3) aligned
  with greedy's: 2,946 of greedy's 4,634 tokens match, insertions and deletions (1,321) outnumber
  substitutions (1,132), 48 of 300 have greedy's length; drafts are checked position by position, so
  after a length slip the rest misses (moving the draft back a column where the AR's token is the
  draft's next one gained 0.756 -> 0.748).

- the iwslt preset with random weights (decode_speed.py --random-weights: the first 8 shipped sentences,
  forced reference lengths), greedy 28.6 passes: exhausted 12.5 passes (Jacobi drafts converge on
  the repetitive output of random weights), wall 1.09 of greedy's, with ``block`` 4 13.6 passes and
  wall 0.86 (v1, a NAR draft pass and a verification pass per round: 41.4 passes, wall 3.57).

Why ``block`` 4 by default (passes / greedy's on the first two models; wall / greedy's on the first):
0 (all) 0.90 / 0.37, wall 1.70; 8: 0.90 / 0.37, wall 1.59; 4: 0.90 / 0.42, wall 1.48; 2: wall
1.33; on the synthetic model wall 0.97 with 4 against 0.93 with all. Checking fewer tokens costs
fewer rows and vocabulary projections in every pass where drafts fail early, and caps a pass at
block + 1 accepted tokens where they do not. With drafts as good as the self-distilled models' the cap
binds: passes / greedy's on all 1000 LibreOffice test sentences (benchmarks/spec_passes.py, lookup,
exhausted; every output greedy's), block 4 / 0 (the whole draft): ``builtin:de-en``'s stage 2 T=1 0.593 /
0.571, T=2 0.563 / 0.543, T=3 0.558 / 0.538; its second self-distillation round (P_NAR weight 1.0,
benchmarks/results/quality_cpu_selfkd2/) T=1 0.556 / 0.525, T=3 0.528 / 0.504 (block 8: 0.507), and with
block 0 T=2 0.498, T=4 0.510, T=5 0.518; the model shipped now (that round trained on) T=1 0.527, T=3 0.502,
block 0 T=2 0.466. Where passes are the time (a GPU) check the whole
draft (``DecodeConfig.draft_block`` 0, ``draft_iterations`` 2: decode_speed.py's ``spec-whole``); on a
CPU each pass then costs more rows than the passes it saves (stage 2 at batch 1, three runs, methods
taking turns: 1.54-1.80x greedy's time, against 1.12-1.29x with the defaults; benchmarks/results/spec_whole_cpu/).

Draft alignment (``align``). ``"position"`` takes a canvas' token at position q as the draft for q;
a canvas that dropped or repeated a token then misses everything after the slip. ``"lookup"`` finds the
accepted prefix's last 1-3 tokens in the latest canvas after every pass (the longest such key, nearest
its own column: ``lookup_shift``) and drafts the canvas' tokens that follow them. Passes / greedy's, all
1000 LibreOffice test sentences, batch 64, identical output in every run (benchmarks/spec_passes.py;
benchmarks/results/spec_align_builtin_cpu/passes_stage1.json and passes.json), position / lookup:

- ``janus-light`` at 10,500 updates (greedy 16.2 passes; NAR T=10 l=3 20.4 BLEU): exhausted T=1 0.738 /
  0.731, T=2 0.733 / 0.718, T=3 0.734 / 0.715; always T=1 0.701 / 0.699.
- the same self-distilled (``builtin:de-en``'s stage 2; NAR 27.1 BLEU): exhausted T=1 0.640 / 0.593,
  T=2 0.634 / 0.563, T=3 0.629 / 0.558; always T=1 0.581 / 0.579.
- its second round, shipped now (NAR 30.0 BLEU): exhausted T=1 0.616 / 0.527
  (benchmarks/results/spec_builtin_kd2_cpu/passes.json).
- random weights (decode_speed.py --random-weights' 8 sentences): 26.6 / 27.0 passes (greedy 28.6).

A simulation over fixed canvases of the first model bounds what alignment can give: T=1 canvases 0.708
by position, 0.693 by lookup, 0.681 with both verified in one pass; T=10 l=3 canvases 0.647 / 0.582 /
0.562, before the first pass that has no draft (+0.06): the better the canvas, the more alignment is
worth, and the canvas' quality is what limits the drafts. Lookup's bookkeeping cost about 80 us a pass
on a 2-core CPU as tensor ops (at batch 1, 100 test sentences, methods taking turns, spec was 12% slower
with lookup on the first model and 2% on the shipped one); a few rows are now aligned on the host, about
20 us a pass (spec at batch 1 6% faster on the shipped model). ``lookup`` is the default: on the shipped
model it saves 7% of the passes for 2% of the time on a CPU, and on a GPU, where a pass's rows cost
little, passes are the time.

Relaxed verification (``top_beta`` > 1, SpecDec++ style): a draft token is also accepted where it
is among the AR's ``top_beta`` most likely tokens and its log-probability is within
``tolerance`` of the AR's best. The output is then NOT greedy search's; it is greedy's for
``top_beta`` = 1 (the default). On the first model above (200 sentences, greedy BLEU 13.05),
passes / greedy's and BLEU: top_beta 2, tolerance 1: 0.88, 12.74; 3 and 2: 0.86, 12.88; 5 and 3:
0.81, 12.38 (exhausted 0.90 exact).

Bookkeeping on the host. A pass's work besides the decoder, the projection and the token choice (windows,
acceptance, drafts, canvases, lookups: ~80 small tensor ops) costs about 0.5 ms on a 2-core CPU whatever
the batch, more than the verification pass itself at batch 1 on the shipped model. Up to
``_HOST_SENTENCES`` (32) sentences on a CPU (exact verification) it runs in Python over their ints instead
(``_decode_host``: the same passes, acceptances, drafts and results, tested against the tensor loop variant
by variant), the rows built from host lists (``build_ar_verify_rows_host``) and the rules from host ints.
On the shipped model at batch 1 (64 test sentences, methods taking turns) spec went from about 2.0x
greedy's time to 1.5x with it, and to 1.2x with the canvases' projections on weight panels
(``JanusModel.output_panels``); the draft block (1-4) then moves it by less than this host's noise. Where
the decoder kernel takes the pass, its arguments (tokens, positions, visible spans, cache columns) are built
from the host ints directly (``_host_pass``, ``JanusModel.decode_spans``), with no rows or visibility matrix:
a 10-row verification pass 414 -> 349 us, one carrying a canvas 867 -> 583 us; spec at batch 1 (32 test
sentences, 10 rounds taking turns) 1.05x -> 0.98x greedy's time.

The AR key/value cache keeps only accepted positions valid: a rejected draft's content rows,
and the canvas rows (written to columns past every AR row of their pass), are overwritten by
a later pass before any AR query sees them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from janus.decoding.common import canvas_banned_ids, choose_next, inference, normalized, repeating, token_limits
from janus.decoding.types import Hypothesis
from janus.model import EncoderOut, JanusModel, KVCache
from janus.ops import length_beam_init, mask_predict_update, remask_lowest
from janus.ops.ar_topk import ar_rules, rule_bits
from janus.streams import DecoderRows, RowKind, build_ar_verify_rows, build_ar_verify_rows_host, spans_from

# When a canvas is due and the accepted prefix has outgrown the last one, the new one is longer by
# this fraction of the prefix (at least _EXTEND_MIN slots): the length head cannot see the prefix, so
# this is a guess that the verification corrects either way.
_EXTEND_FRACTION = 0.25
_EXTEND_MIN = 3

POLICIES = ("first", "exhausted", "stall", "always")
ALIGNS = ("position", "lookup")


def fused_rows(ar: DecoderRows, canvas: Tensor, *, pad: int) -> DecoderRows:
    """AR verification rows and NAR canvas rows in one decoder pass.

    Rows: [AR content (Ca) | canvas (Lc)] are the content rows, then the Ca AR query rows. The AR
    rows keep their cache columns and visibility (columns [0, W_a)); canvas row i is written to
    cache column W_a + i and sees every non-pad canvas row (pad rows see column 0), so neither
    stream sees the other. Columns from W_a on hold no accepted AR position of any hypothesis
    (W_a = max(starts) + Ca, past every AR row of this pass), and later passes overwrite them
    before an AR query sees them.

    Args:
        ar: rows of ``build_ar_verify_rows`` (N hypotheses, Ca content and Ca query rows).
        canvas: int64 (N, Lc) canvases [bos, tokens or <mask>, eos, pad ...], or all pad where a
            hypothesis has none.
    Returns:
        DecoderRows with R = 2 * Ca + Lc rows, visibility (N, R, W_a + Lc), ``cache_columns`` (N, Ca + Lc).
    """
    N, Lc = canvas.shape
    Ca, Wa = ar.num_content, ar.visibility.shape[-1]
    dev = canvas.device
    real = canvas != pad
    pos = torch.arange(Lc, device=dev).expand(N, Lc)
    kinds = torch.where(real, RowKind.U, RowKind.PAD).long()

    def join(a: Tensor, c: Tensor) -> Tensor:
        return torch.cat([a[:, :Ca], c, a[:, Ca:]], 1)

    vis = torch.zeros(N, 2 * Ca + Lc, Wa + Lc, dtype=torch.bool, device=dev)
    vis[:, :Ca, :Wa] = ar.visibility[:, :Ca]
    vis[:, Ca + Lc :, :Wa] = ar.visibility[:, Ca:]
    vis[:, Ca : Ca + Lc, Wa:] = real[:, None, :] & real[:, :, None]
    vis[:, Ca : Ca + Lc, 0] |= ~real
    columns = torch.cat([ar.cache_columns, (Wa + pos)], 1)
    spans = None
    if ar.visible_span is not None:  # a canvas row sees its canvas' columns [Wa, Wa + n), a pad row column 0
        n = real.sum(1, keepdim=True)
        canvas_spans = spans_from(torch.where(real, Wa + n, 1), torch.where(real, Wa, 0))
        spans = join(ar.visible_span, canvas_spans)
    return DecoderRows(
        join(ar.tokens, canvas),
        join(ar.positions, pos),
        join(ar.kinds, kinds),
        torch.full((N, 2 * Ca + Lc), -1, dtype=torch.long, device=dev),
        Ca + Lc,
        vis,
        max_position=max(ar.max_position, Lc - 1),
        cache_columns=columns,
        visible_span=spans,
    )


# The longest key of ``lookup_shift``: the prefix's last 1-3 tokens.
_LOOKUP_LONGEST = 3


def lookup_shift(
    tok: Tensor, p: Tensor, source: Tensor, *, pad: int, longest: int = _LOOKUP_LONGEST
) -> tuple[Tensor, Tensor]:
    """Where the accepted prefix's last tokens occur in a draft source (``align="lookup"``).

    For each row, the longest key of the last k <= ``longest`` accepted tokens (k <= p) that occurs in
    ``source``; of its occurrences, the one nearest the key's own position. Row r's draft at position q
    is then ``source[r, q + shift[r]]``: a source aligned with the prefix gives shift 0, one that dropped
    or repeated a token before the key gives -1 or +1, and so on.

    Args:
        tok: int64 (N, L) accepted prefixes (tok[r, :p[r]]).
        p: int64 (N,) accepted lengths, >= 1.
        source: int64 (N, Ls) draft sources (a canvas: bos, tokens, eos, then pad).
        pad: the pad id (never matched).
    Returns:
        (shift int64 (N,), found bool (N,)); rows where no key occurs have shift 0 and found False.
    """
    N, Ls = source.shape
    if source.device.type == "cpu" and N * Ls <= _HOST_LOOKUP_CELLS:
        return _lookup_shift_host(tok, p, source, pad=pad, longest=longest)
    col = torch.arange(Ls, device=source.device)[None, :]
    # run[r, e]: how many of the prefix's last tokens (up to ``longest``) end at source column e
    run = (source == tok.gather(1, (p - 1)[:, None])) & (source != pad)
    length = run.long()
    for k in range(2, longest + 1):
        key = torch.where(p >= k, tok.gather(1, (p - k).clamp_min(0)[:, None]).squeeze(1), -1)
        before = F.pad(source, (k - 1, 0), value=-2)[:, :Ls]  # before[r, e] = source[r, e - k + 1]; -2 off the left end
        run &= before == key[:, None]
        length += run.long()
    # the longest key first, then the nearest to the key's own column (p - 1); ties to the earlier
    score = length * (2 * Ls + 1) - (col - (p - 1)[:, None]).abs()
    e = score.argmax(1)
    found = length.gather(1, e[:, None]).squeeze(1) > 0
    shift = torch.where(found, e + 1 - p, 0)
    return shift, found


# A lookup over at most this many source cells (rows x columns) runs on the host: at batch 1 a pass's ~20
# tensor ops cost about 120 us on a 2-core CPU, the same loops over a few dozen Python ints about 20.
_HOST_LOOKUP_CELLS = 128


def _lookup_shift_host(tok: Tensor, p: Tensor, source: Tensor, *, pad: int, longest: int) -> tuple[Tensor, Tensor]:
    """``lookup_shift`` for a few rows of CPU tensors, in Python over their values: the same keys, scores
    and ties (the first column of the best score)."""
    rows = [_lookup_row(t, n, src, pad, longest) for t, n, src in zip(tok.tolist(), p.tolist(), source.tolist())]
    return torch.tensor([r[0] for r in rows], dtype=torch.long), torch.tensor([r[1] for r in rows], dtype=torch.bool)


def _lookup_row(t: list[int], n: int, src: list[int], pad: int, longest: int) -> tuple[int, bool]:
    """(shift, found) of one row of ``lookup_shift``: prefix ``t[:n]``, draft source ``src``."""
    keys = [t[n - k] for k in range(1, min(longest, n) + 1)]  # the last token first
    if keys[0] == pad:
        return 0, False
    Ls = len(src)
    best, best_e = None, 0
    # Only the columns holding the last token matter: a column ending a key outscores every column that does
    # not (2 * Ls + 1 per key token, against distances to the key's column that differ by less than Ls).
    for e in [e for e, x in enumerate(src) if x == keys[0]]:
        length = 1
        while length < len(keys) and e - length >= 0 and src[e - length] == keys[length]:
            length += 1
        score = length * (2 * Ls + 1) - abs(e - (n - 1))
        if best is None or score > best:
            best, best_e = score, e
    return (best_e + 1 - n, True) if best is not None else (0, False)


def speculative_decode(
    model: JanusModel,
    src: Tensor,
    *,
    draft_iterations: int = 1,
    policy: str = "exhausted",
    block: int = 4,
    keep_draft: bool = True,
    align: str = "lookup",
    top_beta: int = 1,
    tolerance: float = 1.0,
    length_penalty: float = 1.0,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    min_len: int = 1,
    target_lengths: Optional[Tensor] = None,
    repeat_ngram: int = 0,
    repeat_times: int = 4,
) -> list[Hypothesis]:
    """Self-speculative decoding of a batch (see the module docstring); with ``top_beta`` = 1 the
    output equals ``greedy_search`` (with the same repetition guard: it is applied to every
    verification query on its own drafted prefix, so an accepted token is greedy's choice under
    the guard), in at most as many decoder passes for every sentence.

    Args:
        model: a JanusModel (put in eval mode for the call).
        src: int64 (B, S) source ids + eos, right-padded.
        draft_iterations: T, passes a NAR canvas stays in (mask-predict refinements of one draft).
        policy: which passes carry a NAR canvas: first, exhausted, stall or always.
        block: check at most this many draft tokens per pass (0 = all up to the draft's eos).
        keep_draft: draft tokens past a rejected one stay (step 3); False: the AR's tokens of the pass replace them.
        align: how the latest canvas gives the draft past the prefix: ``"position"`` (its tokens at the same
            positions) or ``"lookup"`` (after every pass, its tokens that follow the prefix's last tokens
            where they occur in it; see ``lookup_shift``).
        top_beta, tolerance: relaxed verification (``top_beta`` = 1: exact, greedy's output).
        length_penalty, max_len_a, max_len_b, min_len: as in ``DecodeConfig``.
        target_lengths: int64 (B,) token counts to force (eos exactly there), or None.
        repeat_ngram, repeat_times: the degenerate-repetition guard, as in ``DecodeConfig``.
    Returns:
        B hypotheses in batch order; ``passes`` counts decoder passes (a canvas shares its pass
        with a verification).
    """
    if draft_iterations < 1:
        raise ValueError(f"draft_iterations={draft_iterations} must be >= 1")
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r}: choose one of {', '.join(POLICIES)}")
    if align not in ALIGNS:
        raise ValueError(f"align={align!r}: choose one of {', '.join(ALIGNS)}")
    if block < 0:
        raise ValueError(f"block={block} must be >= 0 (0 = the whole draft)")
    if top_beta < 1 or not tolerance >= 0:
        raise ValueError(f"top_beta={top_beta} must be >= 1 and tolerance={tolerance} >= 0")
    T = draft_iterations
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
        if dev.type == "cpu" and B <= _HOST_SENTENCES and top_beta == 1:
            return _decode_host(
                model, enc, n.tolist(), min_lens.tolist(), max_lens.tolist(), T=T, policy=policy, block=block,
                keep_draft=keep_draft, lookup=align == "lookup", length_penalty=length_penalty,
                repeat_ngram=repeat_ngram, repeat_times=repeat_times,
            )  # fmt: skip
        Lmax = int(max_lens.max()) + 2
        col = torch.arange(Lmax, device=dev)[None, :]
        banned = canvas_banned_ids(sp)
        panels = model.output_panels()
        # tok[b, :p] is the accepted prefix (bos first), tok[b, p:dend] the draft.
        tok = torch.full((B, Lmax), sp.pad, dtype=torch.long, device=dev)
        tok[:, 0] = sp.bos
        p = torch.ones(B, dtype=torch.long, device=dev)
        dend = p.clone()
        # The NAR canvas of each sentence: tokens, scores, length n, refinements done (-1: none in use).
        ctok = torch.full((B, Lmax), sp.pad, dtype=torch.long, device=dev)
        cscore = torch.zeros(B, Lmax, dtype=torch.float32, device=dev)
        cstep = torch.full((B,), -1, dtype=torch.long, device=dev)
        due = torch.ones(B, dtype=torch.bool, device=dev)
        lookup = align == "lookup"
        # lookup: the latest canvas as its pass filled it (bos .. eos, then pad), the source of the drafts.
        stok = torch.full((B, Lmax), sp.pad, dtype=torch.long, device=dev) if lookup else None
        sums = torch.zeros(B, dtype=torch.float64, device=dev)
        passes = torch.zeros(B, dtype=torch.long, device=dev)
        alive = torch.arange(B, device=dev)
        cache = KVCache()
        out: list[Optional[Hypothesis]] = [None] * B
        while alive.numel():
            # 1. Canvases that start in this pass (at least one slot past the prefix).
            if policy == "always":
                due = cstep < 0
            start = due & (cstep < 0)
            if bool(start.any()):
                grow = torch.clamp(torch.ceil(p.double() * _EXTEND_FRACTION).long(), min=_EXTEND_MIN)
                n = torch.where(start & (n < p + 2), torch.minimum(p + grow, max_lens + 2), n)
                start &= n >= p + 2
                prefix = col < p[:, None]
                fresh = torch.where(prefix, tok, torch.where(col < n[:, None] - 1, sp.mask, sp.pad))
                fresh = torch.where(col == n[:, None] - 1, sp.eos, fresh)
                ctok = torch.where(start[:, None], fresh, ctok)
                cscore = torch.where(start[:, None], torch.where(prefix, math.inf, 0.0), cscore)
                cstep = torch.where(start, 0, cstep)
            active = cstep >= 0
            # 2. The verification window: c - 1 draft tokens (to the first eos, at most ``block``).
            in_draft = (col >= p[:, None]) & (col < dend[:, None])
            is_eos = in_draft & (tok == sp.eos)
            first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), dend)
            checked = first_eos - p
            if block:
                checked = checked.clamp_max(block)
            c = torch.minimum(1 + checked, max_lens + 2 - p)  # queries p .. p+c-1, the last <= max_lens + 1
            rows = build_ar_verify_rows(tok, p - 1, p - 1 + c, pad=sp.pad, mask=sp.mask)
            Ca, Lc = rows.num_content, 0
            if bool(active.any()):
                Lc = int(n[active].max())
                canvas = torch.where(active[:, None], ctok[:, :Lc], sp.pad)
                rows = fused_rows(rows, canvas, pad=sp.pad)
            # the rows read: the queries (all Ca: a shorter window's extra ones are ignored) and the <mask> slots
            read = [torch.zeros(tok.shape[0], Ca, dtype=torch.bool, device=dev)]
            read += [canvas == sp.mask] if Lc else []
            outputs = torch.cat([*read, torch.ones_like(read[0])], 1)
            hidden = model.decode(rows, enc, cache, outputs=outputs)
            passes += 1
            # 3. Accept the AR's tokens up to and including the first rejected draft token.
            logits = model.project(hidden[:, Ca + Lc :])  # (N, Ca, V)
            j = torch.arange(Ca, device=dev)[None, :]
            q = p[:, None] + j  # query positions
            stop = None
            if repeat_ngram:  # query q sees tok[0 .. q - 1]: the accepted prefix, then the draft
                stop = repeating(tok, (q - 1).clamp_max(Lmax - 1), repeat_ngram, repeat_times)
            # greedy's choice (and, relaxed, the top_beta best) of every query, as greedy_search chooses
            rules = ar_rules(q - 1, min_lens[:, None], max_lens[:, None], stop)
            top_lp, top_tok = choose_next(logits, min(top_beta, logits.shape[-1]), rules, sp)
            best, ar_tok = top_lp[..., 0], top_tok[..., 0]  # (N, Ca)
            draft = tok.gather(1, q.clamp_max(Lmax - 1))
            drafted = q < dend[:, None]
            if top_beta == 1:
                ok = drafted & (draft == ar_tok)
                lp = best
            else:
                hit = top_tok == draft[..., None]  # the draft token among the AR's top_beta
                lp_draft = torch.where(hit, top_lp, -math.inf).max(-1).values
                ok = drafted & (lp_draft >= best - tolerance) & torch.isfinite(lp_draft)
                lp = torch.where(ok, lp_draft, best)
            bad = ~ok & (j < c[:, None])
            first = torch.where(bad.any(1), bad.int().argmax(1), c)
            accepted = torch.minimum(first + 1, c)  # >= 1
            take = j < accepted[:, None]
            chosen = torch.where(j < first[:, None], draft, ar_tok)
            # Accepted tokens, then the Jacobi draft of the window's positions that hold no draft token: a
            # draft token past the rejected one stays (it did not see the rejected token; the AR's did).
            window = j < c[:, None]
            if keep_draft:
                window &= (j < accepted[:, None]) | ~drafted
            tok.scatter_(1, torch.where(window, q, 0), torch.where(window, chosen, sp.bos))
            sums += (lp.double() * take).sum(1)
            last = chosen.gather(1, (accepted - 1)[:, None]).squeeze(1)
            old_p = p
            p = p + accepted
            dend = torch.maximum(dend, old_p + c)
            # 4. A canvas in this pass: its tokens past the new prefix are the draft; it is refined again
            #    (T > 1) with the accepted tokens written in.
            if Lc:
                cols = col[:, :Lc]
                ch, cs = canvas, cscore[:, :Lc].clone()
                mask_predict_update(hidden[:, Ca : Ca + Lc], model.embed.weight, ch, cs, sp.mask, banned, panels=panels)
                live = active & (p < n - 1)  # slots left past the prefix
                newly = live[:, None] & (cols >= old_p[:, None]) & (cols < p[:, None])
                ch = torch.where(newly, tok[:, :Lc], ch)
                cs = torch.where(newly, math.inf, cs)
                use = live[:, None] & (cols >= p[:, None]) & (cols < n[:, None])
                tok[:, :Lc] = torch.where(use, ch, tok[:, :Lc])
                if lookup:  # the canvas as this pass filled it, before remask_lowest masks it again in place
                    stok = torch.where(active[:, None], F.pad(ch, (0, Lmax - Lc), value=sp.pad), stok)
                dend = torch.where(live, n, dend)
                cstep = torch.where(live & (cstep + 1 < T), cstep + 1, -1)
                if T > 1 and bool((cstep >= 0).any()):
                    counts = torch.where(cstep >= 0, (n - 1 - p) * (T - cstep) // T, 0)
                    remask_lowest(ch, cs, counts, sp.mask, sp.pad, sp.bos, sp.eos)
                ctok[:, :Lc], cscore[:, :Lc] = ch, cs
            # 4b. lookup: the draft past the new prefix follows the prefix's last tokens in the latest canvas.
            if lookup:
                shift, found = lookup_shift(tok, p, stok, pad=sp.pad)
                at = col + shift[:, None]
                size = (stok != sp.pad).sum(1, keepdim=True)
                put = found[:, None] & (col >= p[:, None]) & (at >= 0) & (at < size)
                tok = torch.where(put, stok.gather(1, at.clamp(0, Lmax - 1)), tok)
                dend = torch.where(found, torch.maximum(size.squeeze(1) - shift, p), dend)
            # 5. The policy: which sentences get a canvas in the next pass.
            due = torch.zeros_like(due)
            if policy != "first":
                due = dend <= p  # the draft is used up (no eos reached: the sentence goes on)
                if policy == "stall":
                    due |= accepted < 2
            ended = last == sp.eos
            # 6. Finished sentences leave.
            if bool(ended.any()):
                for i in ended.nonzero().squeeze(1).tolist():
                    k = int(p[i]) - 2  # tokens without bos and eos
                    out[int(alive[i])] = Hypothesis(
                        ids=tok[i, 1 : k + 1].tolist(),
                        score=normalized(float(sums[i]), k + 1, length_penalty),
                        passes=int(passes[i]),
                    )
                if bool(ended.all()):
                    break
                keep = (~ended).nonzero().squeeze(1)
                alive, tok, p, dend, n, sums, passes = (x[keep] for x in (alive, tok, p, dend, n, sums, passes))
                if lookup:
                    stok = stok[keep]
                ctok, cscore, cstep, due = ctok[keep], cscore[keep], cstep[keep], due[keep]
                min_lens, max_lens = min_lens[keep], max_lens[keep]
                enc = enc.select(keep)
                cache.select(keep)
        return [h for h in out if h is not None]


# Sentences up to which a CPU decode keeps its bookkeeping (prefixes, drafts, canvases, acceptance) in Python
# lists: a pass's ~80 small tensor ops cost about 0.5 ms on a 2-core CPU whatever the batch, which at batch 1 is
# more than the verification pass itself; the same work costs a few dozen us a sentence. Measured on the shipped
# model (64 test sentences, 2 threads, ms per sentence, tensor ops / host): batch 2 9.64 / 6.79, 4 6.85 / 4.83,
# 8 5.93 / 5.25, 16 5.27 / 4.59, 32 4.93 / 4.50, 64 5.07 / 5.11.
_HOST_SENTENCES = 32


@dataclasses.dataclass
class _Sentence:
    """One sentence of ``_decode_host``: its batch index, tokens (accepted prefix ``tok[:p]``, draft
    ``tok[p:dend]``, pad past), canvas length n, token limits, canvas tokens and scores with the refinements
    done (-1: none in use), whether a canvas is due, the draft source of ``lookup``, log-probability sum and
    passes."""

    index: int
    tok: list[int]
    p: int
    dend: int
    n: int
    lo: int
    hi: int
    ctok: list[int]
    cscore: list[float]
    cstep: int = -1
    due: bool = True
    stok: Optional[list[int]] = None
    sums: float = 0.0
    passes: int = 0


def _host_pass(
    model: JanusModel,
    enc: EncoderOut,
    cache: KVCache,
    tokens: list[list[int]],
    starts: list[int],
    window: list[int],
    canvases: list[list[int]],
    *,
    pad: int,
    mask: int,
) -> Tensor:
    """One pass of ``_decode_host``: the rows of ``build_ar_verify_rows_host`` (content rows at starts[b] ..
    starts[b] + window[b] - 1, padded to Ca = max(window), then as many query rows) and, where ``canvases`` is
    not empty (Lc > 0), ``fused_rows``' canvas rows between them, decoded. Through ``JanusModel.decode_spans``
    from host ints where the kernel takes the pass (the same spans, columns and width as those rows'), else
    through the rows and ``decode``.

    Args:
        tokens: per sentence, [bos, accepted prefix, draft ...]; canvases: per sentence, Lc canvas tokens (all
        pad where it has none).
    Returns:
        (N, 2 * Ca + Lc, D) hidden states: content rows, canvas rows, query rows; only the window's queries
        and the canvas' <mask> slots are read (and computed in full: ``decode``'s ``outputs``).
    """
    dev = enc.states.device
    Ca, Lc = max(window), len(canvases[0]) if canvases else 0
    Wa = max(starts) + Ca  # the AR rows' columns; the canvas rows' follow
    ints, columns = [], []
    for seq, s, n, cv in zip(tokens, starts, window, canvases):
        fill = Ca - n
        real = sum(x != pad for x in cv)
        row_tok = seq[s : s + n] + [pad] * fill + cv + [mask] * n + [pad] * fill
        row_pos = list(range(s, s + n)) + [0] * fill + list(range(Lc)) + list(range(s + 1, s + n + 1)) + [0] * fill
        # visible spans [first, last): an AR row at position q sees columns [0, q + 1) (a query row at q, the
        # content rows before it), a pad row column 0, a canvas row its canvas' real columns
        first = [0] * Ca + [Wa if x != pad else 0 for x in cv] + [0] * Ca
        ar_last = list(range(s + 1, s + n + 1)) + [1] * fill
        last = ar_last + [Wa + real if x != pad else 1 for x in cv] + ar_last
        # the rows read: the window's queries and the canvas' <mask> slots
        read = [0] * Ca + [int(x == mask) for x in cv] + [1] * n + [0] * fill
        ints.append(row_tok + row_pos + first + last + read)
        columns.append(list(range(s, s + Ca)) + list(range(Wa, Wa + Lc)))
    R = 2 * Ca + Lc
    packed = torch.tensor(ints, dtype=torch.long, device=dev).view(len(tokens), 5, R)
    spans = torch.stack([packed[:, 2], packed[:, 3]], -1)
    ends = [s + n for s, n in zip(starts, window)]
    cols = torch.tensor(columns, dtype=torch.long, device=dev)
    outputs = packed[:, 4] == 1
    hidden = model.decode_spans(
        packed[:, 0], packed[:, 1], spans, cols, Wa + Lc, max(max(ends), Lc - 1), enc, cache, outputs
    )
    if hidden is not None:
        return hidden
    rows = build_ar_verify_rows_host(tokens, starts, ends, pad=pad, mask=mask, device=dev)
    if Lc:
        rows = fused_rows(rows, torch.tensor(canvases, dtype=torch.long, device=dev), pad=pad)
    return model.decode(rows, enc, cache, outputs=outputs)


def _decode_host(
    model: JanusModel,
    enc: EncoderOut,
    lengths: list[int],
    min_lens: list[int],
    max_lens: list[int],
    *,
    T: int,
    policy: str,
    block: int,
    keep_draft: bool,
    lookup: bool,
    length_penalty: float,
    repeat_ngram: int,
    repeat_times: int,
) -> list[Hypothesis]:
    """``speculative_decode``'s loop (exact verification, ``top_beta`` = 1) with its bookkeeping on the
    host: the same passes, acceptances, drafts and canvases, step for step (tested against the tensor
    loop), for up to ``_HOST_SENTENCES`` sentences on a CPU. The decoder, projection, token choice, canvas
    update and re-mask are the same ops; everything between them is Python over ints.

    Args:
        enc: the encoded sentences; lengths: each one's canvas length (bos and eos included).
        min_lens, max_lens: each one's token limits.
    """
    sp = model.cfg.specials
    dev = enc.states.device
    banned = canvas_banned_ids(sp)
    panels = model.output_panels()
    Lmax = max(max_lens) + 2
    live = [
        _Sentence(b, [sp.bos] + [sp.pad] * (Lmax - 1), 1, 1, lengths[b], min_lens[b], max_lens[b],
                  [sp.pad] * Lmax, [0.0] * Lmax, stok=[sp.pad] * Lmax if lookup else None)
        for b in range(len(lengths))
    ]  # fmt: skip
    limits = torch.tensor([[s.lo for s in live], [s.hi for s in live]], dtype=torch.long, device=dev)
    cache = KVCache()
    out: list[Optional[Hypothesis]] = [None] * len(live)
    while live:
        # 1. Canvases that start in this pass (at least one slot past the prefix).
        for s in live:
            if policy == "always":
                s.due = s.cstep < 0
            if s.due and s.cstep < 0:
                if s.n < s.p + 2:
                    s.n = min(s.p + max(math.ceil(s.p * _EXTEND_FRACTION), _EXTEND_MIN), s.hi + 2)
                if s.n >= s.p + 2:
                    s.ctok = s.tok[: s.p] + [sp.mask] * (s.n - 1 - s.p) + [sp.eos] + [sp.pad] * (Lmax - s.n)
                    s.cscore = [math.inf] * s.p + [0.0] * (Lmax - s.p)
                    s.cstep = 0
        active = [s.cstep >= 0 for s in live]
        # 2. The verification window: c - 1 draft tokens (to the first eos, at most ``block``).
        window = []
        for s in live:
            draft = s.tok[s.p : s.dend]
            checked = draft.index(sp.eos) if sp.eos in draft else len(draft)
            if block:
                checked = min(checked, block)
            window.append(min(1 + checked, s.hi + 2 - s.p))
        Ca = max(window)
        Lc = max((s.n for s, a in zip(live, active) if a), default=0)
        canvases = [s.ctok[:Lc] if a else [sp.pad] * Lc for s, a in zip(live, active)]
        canvas = torch.tensor(canvases, dtype=torch.long, device=dev) if Lc else None
        hidden = _host_pass(model, enc, cache, [s.tok for s in live], [s.p - 1 for s in live], window, canvases,
                            pad=sp.pad, mask=sp.mask)  # fmt: skip
        # 3. Greedy's choice at every query, as greedy_search chooses; accept up to the first rejected draft token.
        logits = model.project(hidden[:, Ca + Lc :])  # (N, Ca, V)
        if repeat_ngram:  # query q sees tok[0 .. q - 1]: the accepted prefix, then the draft
            before = torch.tensor([[s.p - 1 + j for j in range(Ca)] for s in live], dtype=torch.long, device=dev)
            toks = torch.tensor([s.tok for s in live], dtype=torch.long, device=dev)
            stop = repeating(toks, before.clamp_max(Lmax - 1), repeat_ngram, repeat_times)
            rules = ar_rules(before, limits[0][:, None], limits[1][:, None], stop)
        else:
            bits = [[rule_bits(s.p - 1 + j, s.lo, s.hi) for j in range(Ca)] for s in live]
            rules = torch.tensor(bits, dtype=torch.uint8, device=dev)
        top_lp, top_tok = choose_next(logits, 1, rules, sp)
        best, ar_tok = top_lp[..., 0].tolist(), top_tok[..., 0].tolist()
        accepted, old_p, ended = [], [], []
        for s, c, lp, ar in zip(live, window, best, ar_tok):
            s.passes += 1
            first = c
            for j in range(c):
                q = s.p + j
                if not (q < s.dend and s.tok[q] == ar[j]):
                    first = j
                    break
            take = min(first + 1, c)  # >= 1
            # Accepted tokens (the draft's up to the first rejection, then the AR's), then the Jacobi draft of
            # the window's positions that hold no draft token; a draft token past the rejected one stays.
            for j in range(c):
                q = s.p + j
                drafted = q < s.dend
                if j < take or not (keep_draft and drafted):
                    s.tok[q] = s.tok[q] if j < first else ar[j]
            s.sums += sum(lp[:take])
            ended.append(s.tok[s.p + take - 1] == sp.eos)
            old_p.append(s.p)
            s.p += take
            s.dend = max(s.dend, old_p[-1] + c)
            accepted.append(take)
        # 4. A canvas in this pass: its tokens past the new prefix are the draft; it is refined again (T > 1)
        #    with the accepted tokens written in.
        if Lc:
            cs = torch.tensor([s.cscore[:Lc] for s in live], dtype=torch.float32, device=dev)
            mask_predict_update(hidden[:, Ca : Ca + Lc], model.embed.weight, canvas, cs, sp.mask, banned, panels=panels)
            filled, scores = canvas.tolist(), cs.tolist()
            counts = []
            for s, a, ch, sc, p0 in zip(live, active, filled, scores, old_p):
                going = a and s.p < s.n - 1  # slots left past the prefix
                if going:
                    for q in range(p0, min(s.p, Lc)):
                        ch[q], sc[q] = s.tok[q], math.inf
                    s.tok[s.p : s.n] = ch[s.p : s.n]
                    s.dend = s.n
                if lookup and a:  # the canvas as this pass filled it, before remask_lowest masks it again
                    s.stok = ch + [sp.pad] * (Lmax - Lc)
                s.cstep = s.cstep + 1 if going and s.cstep + 1 < T else -1
                counts.append((s.n - 1 - s.p) * (T - s.cstep) // T if s.cstep >= 0 else 0)
            if any(counts):
                canvas = torch.tensor(filled, dtype=torch.long, device=dev)
                cs = torch.tensor(scores, dtype=torch.float32, device=dev)
                counted = torch.tensor(counts, dtype=torch.long, device=dev)
                remask_lowest(canvas, cs, counted, sp.mask, sp.pad, sp.bos, sp.eos)
                filled, scores = canvas.tolist(), cs.tolist()
            for s, a, ch, sc in zip(live, active, filled, scores):
                if a:
                    s.ctok[:Lc], s.cscore[:Lc] = ch, sc
        for s, take in zip(live, accepted):
            # 4b. lookup: the draft past the new prefix follows the prefix's last tokens in the latest canvas.
            if lookup:
                shift, found = _lookup_row(s.tok, s.p, s.stok, sp.pad, _LOOKUP_LONGEST)
                if found:
                    size = sum(x != sp.pad for x in s.stok)
                    for q in range(s.p, min(Lmax, size - shift)):
                        if q + shift >= 0:
                            s.tok[q] = s.stok[q + shift]
                    s.dend = max(size - shift, s.p)
            # 5. The policy: whether the sentence gets a canvas in the next pass.
            s.due = policy != "first" and (s.dend <= s.p or (policy == "stall" and take < 2))
        # 6. Finished sentences leave.
        if any(ended):
            for s, e in zip(live, ended):
                if e:
                    k = s.p - 2  # tokens without bos and eos
                    out[s.index] = Hypothesis(ids=s.tok[1 : k + 1], score=normalized(s.sums, k + 1, length_penalty),
                                              passes=s.passes)  # fmt: skip
            keep = [i for i, e in enumerate(ended) if not e]
            if not keep:
                break
            live = [live[i] for i in keep]
            index = torch.tensor(keep, dtype=torch.long, device=dev)
            limits, enc = limits[:, index], enc.select(index)
            cache.select(keep)
    return [h for h in out if h is not None]
