"""Decoder rows and their visibility: the two streams of JANUS.md section 2.

The decoder runs over a set of rows; a row is (token, position, kind). The
first ``num_content`` rows of a batch are CONTENT rows: they are the keys and
values of self-attention. The remaining rows are QUERY rows: they only ask.
One boolean matrix ``visibility[b, row, content_col]`` says who sees whom, and
every decoder layer makes one attention call with it.

Row kinds (``RowKind``) and what they see (everything else is blocked):

=========  ====================================================  ==========
kind       sees                                                  output
=========  ====================================================  ==========
AR_C  t    AR_C at positions <= t                                 (keys only)
AR_Q  t+1  AR_C at positions <  t+1  (i.e. content 0..t)          P_AR(y_{t+1})
U, P       every U and every P                                    P: P_NAR
G_j        every U, P_k with k > j, G_k with k <= j               (keys only)
Q_i        every U, P_k with k >= i, G_k with k < i               P_AUX
PAD        content column 0 (a real row; keeps softmax finite)    unused
=========  ====================================================  ==========

U and P rows are laid out together as the *canvas*: position p holds y_p when
p is unmasked (U) and ``<mask>`` when it is masked (P). This is the same set of
rows as JANUS.md's "U then P" order; attention is order-free because every row
carries its position. j, k, i are the ranks of masked positions in increasing
position order (0-based here).

Position convention (the only place it is decided): an AR query row that
predicts y_{t+1} sits at position t+1 and sees content rows at positions < t+1.

Training layout of one batch (sections padded to the batch maximum):

    content: [AR_C (T-1) | canvas (T) | G (Mmax)]   queries: [AR_Q (T-1) | Q (Mmax)]

Only the rows whose logits are used (AR_Q, P, Q) are handed to the output
projection, through the flat row indices of ``DecoderRows``.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor


class RowKind(enum.IntEnum):
    AR_C = 0
    AR_Q = 1
    U = 2
    P = 3
    G = 4
    Q = 5
    PAD = 6


@dataclass
class DecoderRows:
    """A batch of decoder rows with their visibility and the indices of the rows to project.

    Shapes: B sentences, R rows per sentence, C = num_content content rows (the first C rows),
    N AR targets, M masked tokens, all over the whole batch.
    """

    tokens: Tensor  # (B, R) int64
    positions: Tensor  # (B, R) int64
    kinds: Tensor  # (B, R) int64, RowKind
    ranks: Tensor  # (B, R) int64, rank of the masked position for P/G/Q rows, else -1
    num_content: int  # C
    visibility: Tensor  # (B, R, C) bool, True = row sees column
    max_position: int  # largest position of any row (a host int: checking it needs no device sync)
    ar_rows: Optional[Tensor] = None  # (N,) flat indices into B*R of the AR query rows
    ar_targets: Optional[Tensor] = None  # (N,) int64, y_{t+1} for each AR query row
    p_rows: Optional[Tensor] = None  # (M,) flat indices of P rows (P_NAR)
    q_rows: Optional[Tensor] = None  # (M,) flat indices of Q rows (P_AUX), aligned with p_rows
    masked_targets: Optional[Tensor] = None  # (M,) int64 gold tokens at the masked positions
    pair_index: Optional[Tensor] = None  # (M,) index into ar_rows of the AR row with the same target
    masked_sentence: Optional[Tensor] = None  # (M,) int64 sentence of each masked token
    cache_columns: Optional[Tensor] = None  # (B, C) int64 KV-cache column of each content row (decoding)
    # (B, R, 2) int64 where each row sees exactly the columns [span[0], span[1]) (the decoding passes: AR steps,
    # verification, canvases): the visibility in the form janus.ops.decoder_step takes, or None
    visible_span: Optional[Tensor] = None

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[1]

    def _map(self, fn) -> "DecoderRows":
        return dataclasses.replace(
            self,
            **{
                f.name: fn(getattr(self, f.name))
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), Tensor)
            },  # fmt: skip
        )

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> "DecoderRows":
        """Every tensor moved to ``device`` (rows are cheap to build on the CPU, ahead of the step)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "DecoderRows":
        """Every tensor in pinned host memory, for asynchronous copies to a GPU."""
        return self._map(lambda t: t.pin_memory())


def visibility(kinds: Tensor, positions: Tensor, ranks: Tensor, num_content: int) -> Tensor:
    """Build the boolean visibility matrix from the row attributes (the table above).

    Args:
        kinds, positions, ranks: (B, R) int64 row attributes.
        num_content: C, the first C rows are the content rows (columns).
    Returns:
        (B, R, C) bool, True where the row sees the column.
    """
    rk, rp, rr = kinds[:, :, None], positions[:, :, None], ranks[:, :, None]
    ck, cp, cr = kinds[:, None, :num_content], positions[:, None, :num_content], ranks[:, None, :num_content]
    K = RowKind
    col_canvas = (ck == K.U) | (ck == K.P)
    vis = (rk == K.AR_C) & (ck == K.AR_C) & (cp <= rp)
    vis |= (rk == K.AR_Q) & (ck == K.AR_C) & (cp < rp)
    vis |= ((rk == K.U) | (rk == K.P)) & col_canvas
    vis |= (rk == K.G) & ((ck == K.U) | ((ck == K.P) & (cr > rr)) | ((ck == K.G) & (cr <= rr)))
    vis |= (rk == K.Q) & ((ck == K.U) | ((ck == K.P) & (cr >= rr)) | ((ck == K.G) & (cr < rr)))
    # A row that sees nothing would give NaN through softmax, and a NaN value leaks even
    # through zero attention weights; pad rows look at column 0, which is always real.
    pad_row = rk[:, :, 0] == K.PAD
    vis[:, :, 0] |= pad_row
    return vis


def _flat(mask: Tensor) -> Tensor:
    """Flat (row-major) indices of the True entries of a (B, R) mask, as int64."""
    return mask.reshape(-1).nonzero().squeeze(1)


def build_training_rows(
    tgt: Tensor, masked: Optional[Tensor], *, pad: int, mask: int, ar: bool, nar: bool, aux: bool
) -> DecoderRows:
    """Rows of the teacher-forced training passes.

    Args:
        tgt: (B, T) int64, [bos, w_1 .. w_k, eos, pad ...] per sentence.
        masked: (B, T) bool, the masked set M (never bos/eos/pad); required when nar or aux.
        pad, mask: special ids.
        ar: include the AR pass (AR_C + AR_Q rows, P_AR).
        nar: include the canvas (U + P rows, P_NAR).
        aux: include the G + Q rows (P_AUX); requires nar, since G and Q attend to U and P.
    Returns:
        DecoderRows with visibility and the gather indices of the rows to project.
    """
    if aux and not nar:
        raise ValueError("the auxiliary stream (G, Q rows) needs the canvas: set nar=True with aux=True")
    if not (ar or nar):
        raise ValueError("build_training_rows needs at least one of ar, nar")
    B, T = tgt.shape
    dev = tgt.device
    K = RowKind
    real = tgt != pad  # (B, T)
    lengths = real.sum(1)  # (B,) n
    pos = torch.arange(T, device=dev).expand(B, T)
    minus1 = lambda shape: torch.full(shape, -1, dtype=torch.long, device=dev)  # noqa: E731

    content, queries = [], []  # lists of (tokens, positions, kinds, ranks)
    if ar:
        ar_pos = pos[:, : T - 1]
        ar_real = ar_pos < (lengths[:, None] - 1)
        content.append((tgt[:, : T - 1], ar_pos, torch.where(ar_real, K.AR_C, K.PAD), minus1((B, T - 1))))
        queries.append(
            (
                torch.full((B, T - 1), mask, device=dev),
                ar_pos + 1,
                torch.where(ar_real, K.AR_Q, K.PAD),
                minus1((B, T - 1)),
            )
        )
    m_count = None
    if nar:
        if masked is None:
            raise ValueError("the NAR stream needs the masked set: pass masked=(B, T) bool")
        masked = masked & real
        rank = torch.where(masked, masked.long().cumsum(1) - 1, -1)
        canvas_tok = torch.where(masked, torch.full_like(tgt, mask), tgt)
        canvas_kind = torch.where(masked, K.P, torch.where(real, K.U, K.PAD))
        content.append((canvas_tok, pos, canvas_kind, rank))
        m_count = masked.sum(1)  # (B,)
    if aux:
        mmax = int(m_count.max()) if B else 0
        slot = torch.arange(mmax, device=dev).expand(B, mmax)
        has = slot < m_count[:, None]  # (B, Mmax)
        # The masked positions of each sentence in increasing order: a stable sort of
        # "not masked" puts the masked positions first, in position order.
        order = torch.sort((~masked).to(torch.int8), dim=1, stable=True).indices[:, :mmax]
        g_pos = torch.where(has, order, 0)
        g_tok = torch.where(has, tgt.gather(1, g_pos), pad)
        g_rank = torch.where(has, slot, -1)
        content.append((g_tok, g_pos, torch.where(has, K.G, K.PAD), g_rank))
        queries.append((torch.where(has, mask, pad), g_pos, torch.where(has, K.Q, K.PAD), g_rank))

    sections = content + queries
    tokens = torch.cat([s[0] for s in sections], 1)
    positions = torch.cat([s[1] for s in sections], 1)
    kinds = torch.cat([s[2] for s in sections], 1).long()
    ranks = torch.cat([s[3] for s in sections], 1)
    num_content = sum(s[0].shape[1] for s in content)
    vis = visibility(kinds, positions, ranks, num_content)
    rows = DecoderRows(tokens, positions, kinds, ranks, num_content, vis, max_position=T - 1)

    if ar:
        rows.ar_rows = _flat(kinds == K.AR_Q)
        rows.ar_targets = tgt[:, 1:][(pos[:, : T - 1] < (lengths[:, None] - 1))]
    if nar:
        rows.p_rows = _flat(kinds == K.P)
        rows.masked_targets = tgt[masked]
        rows.masked_sentence = masked.nonzero()[:, 0]
    if aux:
        rows.q_rows = _flat(kinds == K.Q)
    if ar and nar:
        # The AR query row that predicts y_p of sentence b is number (p - 1) of that sentence.
        ar_start = torch.cumsum(lengths - 1, 0) - (lengths - 1)
        b_idx, p_idx = masked.nonzero(as_tuple=True)
        rows.pair_index = ar_start[b_idx] + p_idx - 1
    return rows


def build_canvas_rows(canvas: Tensor, *, pad: int) -> DecoderRows:
    """Rows of NAR inference: the canvas only (U and P rows), full visibility among non-pad rows.

    Args:
        canvas: (B, L) int64, [bos, tokens or <mask>, eos, pad ...].
    Returns:
        DecoderRows whose visibility is the canvas key-padding pattern; no gather indices.
    """
    B, L = canvas.shape
    real = canvas != pad
    kinds = torch.where(real, RowKind.U, RowKind.PAD).long()
    positions = torch.arange(L, device=canvas.device).expand(B, L)
    ranks = torch.full_like(canvas, -1)
    # a real row sees the canvas' real rows, [0, n); a pad row column 0 alone
    ends = torch.where(real, real.sum(1, keepdim=True), 1)
    return DecoderRows(
        canvas,
        positions,
        kinds,
        ranks,
        L,
        visibility(kinds, positions, ranks, L),
        max_position=L - 1,
        visible_span=spans_from(ends),
    )


def spans_from(ends: Tensor, starts: Optional[Tensor] = None) -> Tensor:
    """Visible column ranges (B, R, 2) [starts, ends) from (B, R) int64 ends (and starts, default 0)."""
    return torch.stack([torch.zeros_like(ends) if starts is None else starts, ends], -1)


def build_ar_step_rows(last: Tensor, step: int, num_cached: int, *, mask: int) -> DecoderRows:
    """Rows of one incremental AR step: content row y_step at ``step`` + query row at ``step + 1``.

    The content row sees the ``num_cached`` cached content rows (positions 0..step-1) and
    itself; the query row sees the same, so it predicts y_{step+1} from y_0..y_step.

    Args:
        last: (B,) int64, the token at position ``step`` of each hypothesis.
        step: position of ``last`` (== num_cached when every earlier step was cached).
    Returns:
        DecoderRows with R = 2, C = 1 new content row; visibility (B, 2, num_cached + 1).
    """
    B = last.shape[0]
    dev = last.device
    tokens = torch.stack([last, torch.full_like(last, mask)], 1)  # (B, 2)
    positions = torch.tensor([step, step + 1], device=dev).expand(B, 2)
    kinds = torch.tensor([RowKind.AR_C, RowKind.AR_Q], device=dev).expand(B, 2)
    ranks = torch.full((B, 2), -1, dtype=torch.long, device=dev)
    vis = torch.ones(B, 2, num_cached + 1, dtype=torch.bool, device=dev)
    return DecoderRows(tokens, positions, kinds, ranks, 1, vis, max_position=step + 1)


def build_ar_verify_rows(tokens: Tensor, starts: Tensor, ends: Tensor, *, pad: int, mask: int) -> DecoderRows:
    """Rows of one cached teacher-forced AR pass over a ragged suffix (speculative verification).

    Hypothesis b has valid cached content rows at columns (= positions) 0 .. starts[b]-1. This
    pass writes content rows tokens[b, t] for t in starts[b] .. ends[b]-1 at column t, and asks
    query rows at positions starts[b]+1 .. ends[b], so query q predicts y_q from y_0..y_{q-1}.

    Args:
        tokens: (B, L) int64 sequences, [bos, accepted prefix, draft ...]; only columns < ends are read.
        starts, ends: (B,) int64, 0 <= starts < ends < L.
    Returns:
        DecoderRows with C = max(ends - starts) content rows then C query rows (pad rows where a
        hypothesis has fewer), ``cache_columns`` (B, C) and visibility (B, 2C, W) over cache
        columns, W = max(starts) + C. Pad content rows write to columns past their hypothesis'
        ends, which no query of this pass sees and a later pass overwrites before use.
    """
    B = tokens.shape[0]
    dev = tokens.device
    counts = ends - starts  # (B,)
    C = int(counts.max()) if B else 0
    j = torch.arange(C, device=dev).expand(B, C)
    real = j < counts[:, None]  # (B, C)
    columns = starts[:, None] + j  # (B, C)
    content_tok = torch.where(real, tokens.gather(1, columns.clamp_max(tokens.shape[1] - 1)), pad)
    content_pos = torch.where(real, columns, 0)
    query_pos = torch.where(real, columns + 1, 0)
    K = RowKind
    kinds = torch.cat([torch.where(real, K.AR_C, K.PAD), torch.where(real, K.AR_Q, K.PAD)], 1).long()
    positions = torch.cat([content_pos, query_pos], 1)
    row_tokens = torch.cat([content_tok, torch.where(real, mask, pad)], 1)
    W = (int(starts.max()) + C) if B else 0
    col = torch.arange(W, device=dev)
    # A content row at t sees columns <= t; a query row at q sees columns < q; pad rows see column 0 (a
    # pad query row's limit, 0, raised to 1; a pad content row's is 1 already).
    limit = torch.cat([content_pos + 1, query_pos], 1).clamp_min(1)  # (B, 2C): columns below it are seen
    vis = col[None, None, :] < limit[:, :, None]
    ranks = torch.full_like(row_tokens, -1)
    max_position = int(ends.max()) if B else 0
    return DecoderRows(
        row_tokens,
        positions,
        kinds,
        ranks,
        C,
        vis,
        max_position=max_position,
        cache_columns=columns,
        visible_span=spans_from(limit),
    )


def build_ar_verify_rows_host(
    tokens: list[list[int]], starts: list[int], ends: list[int], *, pad: int, mask: int, device: torch.device
) -> DecoderRows:
    """``build_ar_verify_rows`` from host lists: the same rows, built in a few tensor calls where the tensor
    version takes about twenty (a speculative pass of one sentence on a CPU: ~30 us against ~130).

    Args:
        tokens: per hypothesis, its sequence [bos, accepted prefix, draft ...] (only columns < ends are read).
        starts, ends: per hypothesis, 0 <= starts < ends < len(tokens[b]).
        device: where the rows go.
    """
    B = len(tokens)
    C = max(e - s for s, e in zip(starts, ends)) if B else 0
    ints = []  # per hypothesis: row tokens, positions, kinds, visible limits (2C each)
    columns = []
    for seq, s, e in zip(tokens, starts, ends):
        n = e - s
        cols = list(range(s, s + C))
        fill = C - n
        content_pos = cols[:n] + [0] * fill
        query_pos = [c + 1 for c in cols[:n]] + [0] * fill
        ints.append(
            [
                seq[s:e] + [pad] * fill + [mask] * n + [pad] * fill,
                content_pos + query_pos,
                [RowKind.AR_C] * n + [RowKind.PAD] * fill + [RowKind.AR_Q] * n + [RowKind.PAD] * fill,
                [c + 1 for c in content_pos] + [max(q, 1) for q in query_pos],
            ]
        )
        columns.append(cols)
    packed = torch.tensor(ints, dtype=torch.long, device=device).view(B, 4, 2 * C)
    limit = packed[:, 3]
    W = (max(starts) + C) if B else 0
    vis = torch.arange(W, device=device)[None, None, :] < limit[:, :, None]
    return DecoderRows(
        packed[:, 0],
        packed[:, 1],
        packed[:, 2],
        torch.full((B, 2 * C), -1, dtype=torch.long, device=device),
        C,
        vis,
        max_position=max(ends) if B else 0,
        cache_columns=torch.tensor(columns, dtype=torch.long, device=device).view(B, C),
        visible_span=spans_from(limit),
    )
