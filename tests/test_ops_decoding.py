"""The decoding ops (length_beam_init, remask_lowest, mask_predict_update) against plain-Python oracles.

Every available backend of each op runs the same cases, so a compiled or Triton backend
added later is held to the reference's contract by these tests.
"""

from __future__ import annotations

import math

import pytest
import torch

from janus.ops import registry

PAD, BOS, EOS, UNK, MASK = 0, 1, 2, 3, 4


def backends(op: str):
    found = [b for b in registry()[op].backends if b.available()[0]]
    return pytest.mark.parametrize("impl", [b.impl for b in found], ids=[b.name for b in found])


# --------------------------------------------------------------------------- length_beam_init


def oracle_length_beam(scores, beam, min_len, max_len):
    """Allowed lengths best first (ties: shorter); if fewer than ``beam``, the disallowed classes follow
    in index order, clamped into the allowed range, and the last one repeats past C."""
    B, C = scores.shape
    lengths, rows = [], []
    for b in range(B):
        hi = int(max_len[b]) if isinstance(max_len, torch.Tensor) else max_len
        hi = max(min(hi, C - 1), min_len)
        allowed = [n for n in range(C) if min_len <= n <= hi]
        ranked = sorted(allowed, key=lambda n: (-float(scores[b, n]), n))
        ranked += [min(max(n, min_len), hi) for n in range(C) if n not in allowed]
        ranked = (ranked + [ranked[-1]] * beam)[:beam]
        lengths += ranked
    L = max(lengths)
    for n in lengths:
        rows.append([BOS] + [MASK] * (n - 2) + [EOS] + [PAD] * (L - n))
    return torch.tensor(rows), torch.tensor(lengths)


@backends("length_beam_init")
@pytest.mark.parametrize("B", [1, 7, 123])
@pytest.mark.parametrize("C", [4, 5, 67])
@pytest.mark.parametrize("beam", [1, 3, 70])
def test_length_beam_init_matches_the_oracle(impl, B, C, beam):
    g = torch.Generator().manual_seed(B * 1000 + C * 10 + beam)
    scores = torch.randint(-3, 3, (B, C), generator=g).float()  # few values: many ties
    min_len = 2 if C < 6 else 3
    for max_len in (C + 5, 3, torch.randint(min_len, C + 3, (B,), generator=g)):
        tokens, lengths = impl(scores, beam, min_len, max_len, BOS, EOS, MASK, PAD)
        want_tokens, want_lengths = oracle_length_beam(scores, beam, min_len, max_len)
        assert torch.equal(lengths, want_lengths)
        assert torch.equal(tokens, want_tokens)
        assert tokens.dtype == torch.long and lengths.dtype == torch.long


@backends("length_beam_init")
def test_length_beam_init_ties_prefer_the_shorter_length(impl):
    scores = torch.tensor([[0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 1.0, 0.0]])
    tokens, lengths = impl(scores, 4, 2, 7, BOS, EOS, MASK, PAD)
    assert lengths.tolist() == [3, 4, 5, 2]
    assert tokens[3].tolist() == [BOS, EOS, PAD, PAD, PAD]
    assert tokens[2].tolist() == [BOS, MASK, MASK, MASK, EOS]


@backends("length_beam_init")
def test_length_beam_init_errors(impl):
    with pytest.raises(ValueError, match="min_len=1"):
        impl(torch.zeros(2, 8), 1, 1, 5, BOS, EOS, MASK, PAD)
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        impl(torch.zeros(8), 1, 2, 5, BOS, EOS, MASK, PAD)
    with pytest.raises(ValueError, match="beam=0"):
        impl(torch.zeros(2, 8), 0, 2, 5, BOS, EOS, MASK, PAD)


# ------------------------------------------------------------------------------ remask_lowest


def oracle_remask(tokens, scores, counts):
    tokens, scores = tokens.clone(), scores.clone()
    for r in range(tokens.shape[0]):
        eligible = [p for p in range(tokens.shape[1]) if int(tokens[r, p]) not in (PAD, BOS, EOS)]
        for p in sorted(eligible, key=lambda p: (float(scores[r, p]), p))[: int(counts[r])]:
            tokens[r, p], scores[r, p] = MASK, 0.0
    return tokens, scores


def random_canvases(R, L, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, 50, (R, L), generator=g)
    lengths = torch.randint(min(2, L), L + 1, (R,), generator=g)
    for r, n in enumerate(lengths.tolist()):
        tokens[r, 0] = BOS
        if n >= 2:
            tokens[r, n - 1] = EOS
        tokens[r, max(n, 1) :] = PAD
    scores = -torch.randint(0, 4, (R, L), generator=g).float()  # ties everywhere
    return tokens, scores


@backends("remask_lowest")
@pytest.mark.parametrize("R", [1, 7, 123])
@pytest.mark.parametrize("L", [2, 3, 65])
def test_remask_lowest_matches_the_oracle(impl, R, L):
    tokens, scores = random_canvases(R, L, R * 100 + L)
    eligible = ((tokens != PAD) & (tokens != BOS) & (tokens != EOS)).sum(1)
    g = torch.Generator().manual_seed(R + L)
    for counts in (
        torch.zeros(R, dtype=torch.long),
        eligible.clone(),
        (torch.rand(R, generator=g) * (eligible + 1)).long(),
    ):
        t, s = tokens.clone(), scores.clone()
        out_t, out_s = impl(t, s, counts, MASK, PAD, BOS, EOS)
        assert out_t.data_ptr() == t.data_ptr() and out_s.data_ptr() == s.data_ptr()  # in place
        want_t, want_s = oracle_remask(tokens, scores, counts)
        assert torch.equal(t, want_t)
        assert torch.equal(s, want_s)
        assert torch.equal((t == MASK).sum(1), counts)


@backends("remask_lowest")
def test_remask_lowest_counts_out_of_range_is_a_clear_error(impl):
    tokens, scores = random_canvases(3, 6, 0)
    eligible = ((tokens != PAD) & (tokens != BOS) & (tokens != EOS)).sum(1)
    too_many = eligible.clone()
    too_many[1] += 1
    before = tokens.clone()
    with pytest.raises(ValueError, match=r"counts\[1\]="):
        impl(tokens, scores, too_many, MASK, PAD, BOS, EOS)
    with pytest.raises(ValueError, match=r"counts\[0\]=-1"):
        impl(tokens, scores, torch.tensor([-1, 0, 0]), MASK, PAD, BOS, EOS)
    assert torch.equal(tokens, before)  # nothing written on error


# ------------------------------------------------------------------------ mask_predict_update


def oracle_update(hidden, weight, tokens, scores, banned):
    tokens, scores = tokens.clone(), scores.clone()
    W = weight.float()
    for r in range(tokens.shape[0]):
        for p in range(tokens.shape[1]):
            if int(tokens[r, p]) != MASK:
                continue
            logits = (hidden[r, p].float() @ W.T).double()
            logz = math.log(sum(math.exp(x) for x in (logits - logits.max()).tolist())) + float(logits.max())
            best = max((v for v in range(W.shape[0]) if v not in banned), key=lambda v: (float(logits[v]), -v))
            tokens[r, p] = best
            scores[r, p] = float(logits[best]) - logz
    return tokens, scores


@backends("mask_predict_update")
@pytest.mark.parametrize("R,L,V", [(1, 2, 11), (7, 3, 1031), (5, 9, 64)])
def test_mask_predict_update_matches_the_oracle(impl, R, L, V):
    g = torch.Generator().manual_seed(R * L + V)
    D = 16
    hidden = torch.randn(R, L, D, generator=g)
    weight = torch.randn(V, D, generator=g)
    tokens = torch.randint(5, V, (R, L), generator=g)
    tokens[torch.rand(R, L, generator=g) < 0.5] = MASK
    tokens[0, 0] = MASK
    scores = torch.randn(R, L, generator=g)
    banned = [PAD, BOS, EOS, MASK]
    t, s = tokens.clone(), scores.clone()
    out_t, out_s = impl(hidden, weight, t, s, MASK, banned)
    assert out_t.data_ptr() == t.data_ptr() and out_s.data_ptr() == s.data_ptr()
    want_t, want_s = oracle_update(hidden, weight, tokens, scores, banned)
    assert torch.equal(t, want_t)
    torch.testing.assert_close(s, want_s, rtol=1e-5, atol=1e-5)
    untouched = tokens != MASK
    assert torch.equal(s[untouched], scores[untouched])  # bit-identical where nothing was masked


@backends("mask_predict_update")
def test_mask_predict_update_nothing_masked_and_banned_ids(impl):
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(2, 4, 8, generator=g), torch.randn(9, 8, generator=g)
    tokens, scores = torch.full((2, 4), 7), torch.randn(2, 4, generator=g)
    t, s = tokens.clone(), scores.clone()
    impl(hidden, weight, t, s, MASK, [PAD])
    assert torch.equal(t, tokens) and torch.equal(s, scores)
    # a banned id is never chosen even when it is the most likely
    weight[5] = hidden[0, 0] * 100
    t = torch.full((2, 4), MASK)
    impl(hidden, weight, t, torch.zeros(2, 4), MASK, [PAD, 5])
    assert 5 not in t.tolist()[0] and PAD not in sum(t.tolist(), [])


@backends("mask_predict_update")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mask_predict_update_low_precision(impl, dtype):
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(3, 5, 16, generator=g), torch.randn(101, 16, generator=g)
    tokens = torch.full((3, 5), MASK)
    t, s = tokens.clone(), torch.zeros(3, 5)
    impl(hidden.to(dtype), weight.to(dtype), t, s, MASK, [PAD, BOS, EOS, MASK])
    want_t, want_s = oracle_update(hidden.to(dtype), weight.to(dtype), tokens, torch.zeros(3, 5), [PAD, BOS, EOS, MASK])
    # the low-precision GEMM may flip near-ties; the chosen tokens' scores stay close to the best
    assert (t == want_t).float().mean() >= 0.9
    torch.testing.assert_close(s, want_s, rtol=0.05, atol=0.1)
