"""The decoder's rows and visibility against the table of JANUS.md section 2."""

from __future__ import annotations

import pytest
import torch

from janus.config import preset
from janus.model import JanusModel
from janus.streams import RowKind as K
from janus.streams import build_canvas_rows, build_training_rows

PAD, BOS, EOS, MASK = 0, 1, 2, 4


def example(lengths=(5,), masked_pos=((1, 3),), vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    tgt = torch.full((len(lengths), T), PAD)
    masked = torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, (n, mp) in enumerate(zip(lengths, masked_pos)):
        tgt[b, :n] = torch.randint(5, vocab, (n,), generator=g)
        tgt[b, 0], tgt[b, n - 1] = BOS, EOS
        masked[b, list(mp)] = True
    return tgt, masked


def labels(rows, b=0):
    """Human labels of the rows of sentence b: ARC0, ARQ1 (position), U2, P0 (rank), G1, Q0, pad."""
    out = []
    for k, p, r in zip(rows.kinds[b].tolist(), rows.positions[b].tolist(), rows.ranks[b].tolist()):
        k = K(k)
        out.append(
            {
                K.AR_C: f"ARC{p}",
                K.AR_Q: f"ARQ{p}",
                K.U: f"U{p}",
                K.P: f"P{r}",
                K.G: f"G{r}",
                K.Q: f"Q{r}",
                K.PAD: "pad",
            }[k]
        )
    return out


def test_visibility_matches_table_cell_by_cell():
    # n = 5: bos w1 w2 w3 eos, masked positions {1, 3} -> P0 at 1, P1 at 3.
    tgt, masked = example()
    rows = build_training_rows(tgt, masked, pad=PAD, mask=MASK, ar=True, nar=True, aux=True)
    lab = labels(rows)
    cols = lab[: rows.num_content]
    U = {"U0", "U2", "U4"}
    canvas = U | {"P0", "P1"}
    # Written out by hand from the table (not from the code under test).
    expected = {
        "ARC0": {"ARC0"},
        "ARC1": {"ARC0", "ARC1"},
        "ARC2": {"ARC0", "ARC1", "ARC2"},
        "ARC3": {"ARC0", "ARC1", "ARC2", "ARC3"},
        "ARQ1": {"ARC0"},
        "ARQ2": {"ARC0", "ARC1"},
        "ARQ3": {"ARC0", "ARC1", "ARC2"},
        "ARQ4": {"ARC0", "ARC1", "ARC2", "ARC3"},
        "U0": canvas,
        "U2": canvas,
        "U4": canvas,
        "P0": canvas,
        "P1": canvas,
        "G0": U | {"P1", "G0"},
        "G1": U | {"G0", "G1"},
        "Q0": U | {"P0", "P1"},
        "Q1": U | {"P1", "G0"},
    }
    assert sorted(x for x in lab if x != "pad") == sorted(expected), lab
    assert rows.num_content == 4 + 5 + 2
    for r, name in enumerate(lab):
        if name == "pad":
            continue
        for c, col in enumerate(cols):
            assert bool(rows.visibility[0, r, c]) == (col in expected[name]), (name, col)


def test_tokens_positions_and_gather_indices():
    tgt, masked = example()
    rows = build_training_rows(tgt, masked, pad=PAD, mask=MASK, ar=True, nar=True, aux=True)
    lab = labels(rows)
    tok = dict(zip(lab, rows.tokens[0].tolist()))
    pos = dict(zip(lab, rows.positions[0].tolist()))
    y = tgt[0].tolist()
    assert [tok[f"ARC{t}"] for t in range(4)] == y[:4]
    assert all(tok[f"ARQ{t}"] == MASK for t in range(1, 5))
    assert (tok["P0"], tok["P1"], tok["Q0"], tok["Q1"]) == (MASK,) * 4
    assert (tok["G0"], tok["G1"]) == (y[1], y[3])  # gold tokens at the masked positions
    assert (pos["P0"], pos["G0"], pos["Q0"], pos["P1"], pos["G1"], pos["Q1"]) == (1, 1, 1, 3, 3, 3)
    assert rows.ar_targets.tolist() == y[1:]
    assert rows.masked_targets.tolist() == [y[1], y[3]]
    # pair_index points at the AR query row predicting the same token.
    ar_labels = [lab[i] for i in rows.ar_rows.tolist()]
    assert [ar_labels[i] for i in rows.pair_index.tolist()] == ["ARQ1", "ARQ3"]
    assert [lab[i] for i in rows.p_rows.tolist()] == ["P0", "P1"]
    assert [lab[i] for i in rows.q_rows.tolist()] == ["Q0", "Q1"]


def test_batch_padding_rows_and_pairs():
    tgt, masked = example(lengths=(7, 4, 3), masked_pos=((1, 2, 5), (2,), (1,)))
    rows = build_training_rows(tgt, masked, pad=PAD, mask=MASK, ar=True, nar=True, aux=True)
    B, R = rows.tokens.shape
    pad_rows = rows.kinds == K.PAD
    # A pad row sees exactly column 0, a real row; no real row sees a pad column.
    assert (rows.visibility[pad_rows][:, 1:] == 0).all() and rows.visibility[pad_rows][:, 0].all()
    pad_cols = pad_rows[:, : rows.num_content]
    assert not (rows.visibility & pad_cols[:, None, :] & ~pad_rows[:, :, None]).any()
    assert rows.ar_rows.numel() == 6 + 3 + 2 and rows.masked_targets.numel() == 5
    flat_tgt = rows.ar_targets
    assert torch.equal(flat_tgt[rows.pair_index], rows.masked_targets)
    assert rows.masked_sentence.tolist() == [0, 0, 0, 1, 2]


def closure(vis, num_content, layers):
    v = vis.float()
    dep = v.clone()
    for _ in range(layers - 1):
        dep = ((v + v @ dep[:num_content]) > 0).float()
    return dep > 0


@pytest.mark.parametrize("layers", [1, 3])
def test_output_unchanged_by_tokens_a_row_must_not_see(layers):
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=50, decoder_layers=layers, encoder_layers=1)
    model = JanusModel(cfg).eval()
    tgt, masked = example(lengths=(7,), masked_pos=((1, 2, 5),))
    rows = build_training_rows(tgt, masked, pad=PAD, mask=MASK, ar=True, nar=True, aux=True)
    src = torch.tensor([[7, 8, 9, EOS]])
    enc = model.encode(src)
    lab = labels(rows)
    C = rows.num_content
    dep = closure(rows.visibility[0], C, layers)  # (R, C)
    with torch.no_grad():
        base = model.decode(rows, enc)[0]
        for c in range(C):
            tokens = rows.tokens.clone()
            tokens[0, c] = 5 + (tokens[0, c] + 1) % 40
            changed = (model.decode(type(rows)(**{**rows.__dict__, "tokens": tokens}), enc)[0] - base).abs().amax(
                -1
            ) > 1e-6
            allowed = dep[:, c].clone()
            allowed[c] = True  # the row itself
            assert not (changed & ~allowed).any(), (lab[c], [lab[r] for r in changed.nonzero().flatten().tolist()])
            seers = rows.visibility[0, :, c].clone()
            assert changed[seers].all(), lab[c]  # not vacuous: direct viewers do change
    # The semantic facts the table exists for: no gold leaks.
    col = {n: i for i, n in enumerate(lab[:C])}
    row = {n: i for i, n in enumerate(lab)}
    for p in ("P0", "P1", "P2"):
        assert not dep[row[p], [col[f"G{j}"] for j in range(3)]].any()
        assert not dep[row[p], [col[f"ARC{t}"] for t in range(6)]].any()
    for i in range(3):
        assert not dep[row[f"Q{i}"], [col[f"G{j}"] for j in range(i, 3)]].any()
    for t in range(1, 7):
        assert not dep[row[f"ARQ{t}"], [col[f"ARC{s}"] for s in range(t, 6)]].any()


def test_streams_do_not_leak_into_each_other_and_canvas_equals_inference():
    torch.manual_seed(0)
    model = JanusModel(preset("tiny", vocab_size=50)).eval()
    tgt, masked = example(lengths=(7, 5), masked_pos=((1, 2, 5), (3,)))
    src = torch.tensor([[7, 8, 9, EOS], [10, 11, EOS, PAD]])
    enc = model.encode(src)
    with torch.no_grad():
        full = build_training_rows(tgt, masked, pad=PAD, mask=MASK, ar=True, nar=True, aux=True)
        h_full = model.decode(full, enc).flatten(0, 1)
        ar = build_training_rows(tgt, masked, pad=PAD, mask=MASK, ar=True, nar=False, aux=False)
        h_ar = model.decode(ar, enc).flatten(0, 1)
        torch.testing.assert_close(h_full[full.ar_rows], h_ar[ar.ar_rows], rtol=1e-5, atol=1e-5)
        cmlm = build_training_rows(tgt, masked, pad=PAD, mask=MASK, ar=False, nar=True, aux=False)
        h_cmlm = model.decode(cmlm, enc).flatten(0, 1)
        torch.testing.assert_close(h_full[full.p_rows], h_cmlm[cmlm.p_rows], rtol=1e-5, atol=1e-5)
        # NAR inference on the same canvas gives the same P_NAR rows.
        canvas = torch.where(masked, torch.full_like(tgt, MASK), tgt)
        inf = build_canvas_rows(canvas, pad=PAD)
        h_inf = model.decode(inf, enc).flatten(0, 1)
        torch.testing.assert_close(h_inf[cmlm.p_rows], h_cmlm[cmlm.p_rows], rtol=1e-5, atol=1e-5)


def test_aux_requires_canvas():
    tgt, masked = example()
    with pytest.raises(ValueError, match="needs the canvas"):
        build_training_rows(tgt, masked, pad=PAD, mask=MASK, ar=True, nar=False, aux=True)


def table_sees(row, col) -> bool:
    """JANUS.md's visibility table, one cell at a time, on (kind, position, rank) labels."""
    rk, rp, rr = row
    ck, cp, cr = col
    if rk == K.PAD:
        return False  # pad rows are checked separately
    if rk == K.AR_C:
        return ck == K.AR_C and cp <= rp
    if rk == K.AR_Q:
        return ck == K.AR_C and cp < rp
    if rk in (K.U, K.P):
        return ck in (K.U, K.P)
    if rk == K.G:
        return ck == K.U or (ck == K.P and cr > rr) or (ck == K.G and cr <= rr)
    if rk == K.Q:
        return ck == K.U or (ck == K.P and cr >= rr) or (ck == K.G and cr < rr)
    raise AssertionError(rk)


@pytest.mark.parametrize("seed", range(12))
def test_random_batches_match_the_table_and_keep_their_invariants(seed):
    g = torch.Generator().manual_seed(seed)
    B = int(torch.randint(1, 5, (1,), generator=g))
    lengths = torch.randint(3, 12, (B,), generator=g).tolist()
    masked_pos = []
    for n in lengths:
        k = n - 2
        m = int(torch.randint(1, k + 1, (1,), generator=g))
        masked_pos.append(tuple(sorted((1 + torch.randperm(k, generator=g)[:m]).tolist())))
    tgt, masked = example(lengths=tuple(lengths), masked_pos=tuple(masked_pos), seed=seed)
    rows = build_training_rows(tgt, masked, pad=PAD, mask=MASK, ar=True, nar=True, aux=True)
    C = rows.num_content
    for b, n in enumerate(lengths):
        attrs = list(zip(rows.kinds[b].tolist(), rows.positions[b].tolist(), rows.ranks[b].tolist()))
        kinds = [a[0] for a in attrs]
        m = len(masked_pos[b])
        assert (kinds.count(K.AR_C), kinds.count(K.AR_Q), kinds.count(K.U)) == (n - 1, n - 1, n - m)
        assert kinds.count(K.P) == kinds.count(K.G) == kinds.count(K.Q) == m
        for r, row in enumerate(attrs):
            if row[0] == K.PAD:
                assert rows.visibility[b, r].tolist() == [True] + [False] * (C - 1)
                continue
            expect = [table_sees(row, col) for col in attrs[:C]]
            assert rows.visibility[b, r].tolist() == expect, (b, r, row)
    # Gather indices: targets line up with the rows that predict them.
    flat_kinds = rows.kinds.flatten()
    flat_pos = rows.positions.flatten()
    assert (flat_kinds[rows.ar_rows] == K.AR_Q).all() and (flat_kinds[rows.p_rows] == K.P).all()
    assert (flat_kinds[rows.q_rows] == K.Q).all()
    assert torch.equal(flat_pos[rows.p_rows], flat_pos[rows.q_rows])
    b_of = torch.arange(B).repeat_interleave(rows.num_rows)
    assert torch.equal(tgt[b_of[rows.p_rows], flat_pos[rows.p_rows]], rows.masked_targets)
    assert torch.equal(tgt[b_of[rows.ar_rows], flat_pos[rows.ar_rows]], rows.ar_targets)
    assert torch.equal(rows.ar_targets[rows.pair_index], rows.masked_targets)
    paired = rows.ar_rows[rows.pair_index]  # the AR query row of each masked token: same sentence, same position
    assert torch.equal(b_of[paired], b_of[rows.p_rows]) and torch.equal(flat_pos[paired], flat_pos[rows.p_rows])
