"""ar_topk (janus/ops/ar_topk.py, csrc/cpu/ar_topk.cpp), the next-token choice of every AR search step: the
reference against log_softmax, the AR rules written out row by row and a top-k; the compiled kernel against
the reference (odd widths, every rule, ties, fewer allowed ids than k, non-finite rows, thread-count
invariance, named errors)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ext_helpers import require_kernel

from janus.config import SpecialIds
from janus.decoding.common import banned_ids
from janus.ops.ar_topk import NO_EOS, ONLY_EOS, ar_rules, ar_topk_ref, rule_bits

SP = SpecialIds()


def kernel(logits, k, banned, eos, rules):
    return torch.ops.janus.ar_topk(logits, k, banned, eos, rules)


def random_rules(R: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 4, (R,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def rules_applied(logp: torch.Tensor, words, min_lens, max_lens, stop) -> torch.Tensor:
    """The AR rules row by row, as the searches state them: pad, bos and <mask> never; eos not while fewer
    than min_lens tokens were generated; eos alone once max_lens were, or where stop is set and min_lens
    allows eos. A copy of ``logp`` with -inf at every id a row may not choose."""
    out = logp.clone()
    for r in range(out.shape[0]):
        out[r, banned_ids(SP)] = float("-inf")
        too_short = bool(words[r] < min_lens[r])
        if too_short:
            out[r, SP.eos] = float("-inf")
        if bool(words[r] >= max_lens[r]) or (bool(stop[r]) and not too_short):
            eos = out[r, SP.eos].clone()
            out[r] = float("-inf")
            out[r, SP.eos] = eos
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_reference_is_log_softmax_the_rules_and_topk(seed):
    g = torch.Generator().manual_seed(seed)
    V, R, k = 50, 24, 6
    logits = torch.randn(R, V, generator=g) * 3
    words = torch.randint(0, 6, (R,), generator=g)
    min_lens = torch.randint(0, 4, (R,), generator=g)
    max_lens = min_lens + torch.randint(0, 4, (R,), generator=g)
    stop = torch.rand(R, generator=g) < 0.3
    logp = rules_applied(F.log_softmax(logits, -1), words, min_lens, max_lens, stop)
    scores, ids = ar_topk_ref(logits, k, banned_ids(SP), SP.eos, ar_rules(words, min_lens, max_lens, stop))
    want = logp.topk(k, dim=-1).values
    torch.testing.assert_close(scores, want, rtol=0, atol=0)
    finite = torch.isfinite(scores)
    assert torch.equal(logp.gather(1, ids)[finite], scores[finite])
    # a row at its length limit has eos alone; one too short never eos
    rules = ar_rules(words, min_lens, max_lens, stop)
    only = (rules & ONLY_EOS) != 0
    assert (ids[only & ((rules & NO_EOS) == 0), 0] == SP.eos).all()
    assert not ((ids == SP.eos) & finite)[(rules & NO_EOS) != 0].any()


@pytest.fixture
def _kernel():
    require_kernel("ar_topk", "cpu")


@pytest.mark.usefixtures("_kernel")
@pytest.mark.parametrize("V", [5, 16, 17, 31, 300, 8000])
@pytest.mark.parametrize("k", [1, 2, 10])
def test_kernel_matches_the_reference(V, k):
    k = min(k, V)
    g = torch.Generator().manual_seed(V * 10 + k)
    R = 29
    logits = torch.randn(R, V, generator=g) * 4
    logits[3, : V // 2] = float("-inf")  # ids of probability 0 rank with the ones not allowed
    banned = [b for b in (0, 1, 3) if b < V - 1]
    eos = min(2, V - 1)
    rules = random_rules(R, V)
    scores, ids = kernel(logits, k, banned, eos, rules)
    want_scores, want_ids = ar_topk_ref(logits, k, banned, eos, rules)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(scores, want_scores, rtol=0, atol=2e-6)


@pytest.mark.usefixtures("_kernel")
@pytest.mark.parametrize("k", [1, 3, 10])
def test_the_selection_skips_only_spans_and_blocks_without_a_better_logit(k):
    """The selection passes over spans of 256 and blocks of 16 logits holding none above the k-th best so far:
    the best ones planted in the last span, at span and block edges, in a row rising to its end (no span
    skipped), ties across spans (the smaller id first), a span past the first whose maximum equals the k-th
    best (not above it: skipped, as an equal logit loses to the smaller id), and a tail past the last block."""
    V = 256 * 5 + 16 * 3 + 7
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(8, V, generator=g)
    logits[0, V - 300] = logits[0, V - 1] = 9.0  # the last span and the tail
    logits[1, 255] = logits[1, 256] = logits[1, 511] = 8.0  # either side of span edges
    logits[2] = torch.linspace(-5, 5, V)  # rising: every block holds a larger logit
    logits[3, [17, 300, 600, 900, 1250]] = 7.0  # ties in different spans
    logits[4, :k] = 6.0
    logits[4, 512 + 37] = 6.0  # equal to the k-th best, in a later span
    logits[5, 256 * 5 + 16 * 2 + 3] = 10.0  # in the last block before the tail
    logits[6, 256 * 5 + 16 * 3 + 2] = 10.0  # in the tail
    rules = torch.zeros(8, dtype=torch.uint8)
    scores, ids = kernel(logits, k, [], 2, rules)
    want_scores, want_ids = ar_topk_ref(logits, k, [], 2, rules)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(scores, want_scores, rtol=0, atol=2e-6)


@pytest.mark.usefixtures("_kernel")
def test_ties_fewer_allowed_than_k_and_the_rules():
    logits = torch.zeros(5, 40)
    logits[0, [7, 23, 39]] = 2.0  # a three-way tie, across 16-column blocks: 7, 23, 39
    logits[1, 2] = 9.0  # eos (2) is the favourite but not allowed yet
    logits[2, 30] = 9.0  # eos alone is allowed: eos, then the smallest other ids at -inf
    logits[3, 2] = 9.0  # both rules: nothing allowed
    rules = torch.tensor([0, NO_EOS, ONLY_EOS, NO_EOS | ONLY_EOS, 0], dtype=torch.uint8)
    scores, ids = kernel(logits, 4, [0, 1], 2, rules)
    assert ids[0].tolist() == [7, 23, 39, 2]  # then the smallest allowed id (eos, allowed here)
    assert ids[1, 0] != 2
    assert ids[2].tolist() == [2, 0, 1, 3] and torch.isfinite(scores[2, 0]) and (scores[2, 1:] == -float("inf")).all()
    assert ids[3].tolist() == [0, 1, 2, 3] and (scores[3] == -float("inf")).all()
    assert ids[4].tolist() == [2, 3, 4, 5]  # all tied: the smallest allowed ids
    want_scores, want_ids = ar_topk_ref(logits, 4, [0, 1], 2, rules)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(scores, want_scores, rtol=0, atol=2e-6)


@pytest.mark.usefixtures("_kernel")
def test_rows_without_a_log_softmax_score_nan():
    inf, nan = float("inf"), float("nan")
    logits = torch.randn(4, 50)
    logits[0, 33] = nan
    logits[1, 3] = inf
    logits[2] = -inf
    logits[3, 49] = nan  # in the scalar tail
    rules = torch.zeros(4, dtype=torch.uint8)
    scores, ids = kernel(logits, 3, [0], 1, rules)
    assert torch.isnan(scores).all()
    assert ids.tolist() == [[0, 1, 2]] * 4
    ref_scores, ref_ids = ar_topk_ref(logits, 3, [0], 1, rules)
    assert torch.isnan(ref_scores).all() and torch.equal(ids, ref_ids)


@pytest.mark.usefixtures("_kernel")
def test_the_thread_count_changes_nothing():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(3))
    rules = random_rules(64, 3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(logits, 5, [0, 1, 3], 2, rules)
        torch.set_num_threads(max(2, before))
        many = kernel(logits, 5, [0, 1, 3], 2, rules)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.usefixtures("_kernel")
def test_bad_arguments_are_named():
    x = torch.randn(3, 10)
    rules = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="k=11"):
        kernel(x, 11, [], 2, rules)
    with pytest.raises(ValueError, match="banned id 10"):
        kernel(x, 2, [10], 2, rules)
    with pytest.raises(ValueError, match="eos id 12"):
        kernel(x, 2, [], 12, rules)
    with pytest.raises(ValueError, match="rules must be uint8"):
        kernel(x, 2, [], 2, rules.long())
    with pytest.raises(ValueError, match="float32"):
        kernel(x.double(), 2, [], 2, rules)
    with pytest.raises(ValueError, match="k=0"):
        ar_topk_ref(x, 0, [], 2, rules)


def test_torch_backend_matches_the_reference():
    """The backend of CUDA tensors (and of CPU tensors without the compiled ops): equal to the reference
    wherever no two scores of a row tie (random logits), every rule and non-finite rows included."""
    from janus.ops.ar_topk import ar_topk_torch

    g = torch.Generator().manual_seed(7)
    logits = torch.randn(40, 300, generator=g) * 3
    logits[5, 17] = float("nan")
    logits[6] = float("-inf")
    rules = random_rules(40, 7)
    for k in (1, 4):
        got = ar_topk_torch(logits, k, [0, 1, 3], 2, rules)
        want = ar_topk_ref(logits, k, [0, 1, 3], 2, rules)
        finite = torch.isfinite(want[0])
        assert torch.equal(got[1][finite], want[1][finite])
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, equal_nan=True)
        assert torch.equal(got[1][5], torch.arange(k)) and torch.equal(got[1][6], torch.arange(k))


def test_rule_bits_are_ar_rules_of_host_ints():
    words, lo, hi = torch.meshgrid(torch.arange(0, 8), torch.arange(0, 5), torch.arange(0, 9), indexing="ij")
    want = ar_rules(words, lo, hi)
    got = [
        rule_bits(w, a, b) for w, a, b in zip(words.flatten().tolist(), lo.flatten().tolist(), hi.flatten().tolist())
    ]
    assert got == want.flatten().tolist()
    assert {NO_EOS, ONLY_EOS, NO_EOS | ONLY_EOS, 0} == set(got)
