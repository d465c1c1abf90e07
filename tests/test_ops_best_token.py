"""best_token (csrc/cpu/best_token.cpp), the reduction of the "cpp" backend of mask_predict_update, against
log_softmax + max in torch: odd widths (the vector body and its scalar tail), ties, a banned favourite,
non-finite rows, thread-count invariance and named errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ext_helpers import require_kernel


@pytest.fixture(autouse=True)
def _kernel():
    require_kernel("best_token", "cpu")


def best_token(logits: torch.Tensor, banned: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.janus.best_token(logits, banned)


def reference(logits: torch.Tensor, banned: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    logp = F.log_softmax(logits.double(), dim=-1)
    if banned:
        logp[:, banned] = float("-inf")
    best, ids = logp.max(dim=-1)
    return best.float(), ids


@pytest.mark.parametrize("V", [1, 5, 16, 17, 31, 300, 8000])
@pytest.mark.parametrize("banned", [[], [0, 2], [0, 1, 2, 4]])
def test_matches_log_softmax_and_max(V, banned):
    banned = [b for b in banned if b < V - 1]
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(37, V, generator=g) * 4
    scores, ids = best_token(logits, banned)
    want_scores, want_ids = reference(logits, banned)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(scores, want_scores, rtol=0, atol=2e-6)


def test_ties_go_to_the_smaller_id_and_a_banned_favourite_is_passed_over():
    logits = torch.zeros(3, 40)
    logits[0, [7, 23, 39]] = 2.0  # a three-way tie: 7, in another 16-column lane than 23
    logits[1, [2, 30]] = 5.0  # the favourite (2) is banned: 30
    logits[2, 2] = 9.0  # banned favourite, the rest tied: the smallest allowed id, 1
    scores, ids = best_token(logits, [0, 2])
    assert ids.tolist() == [7, 30, 1]
    want, _ = reference(logits, [0, 2])
    torch.testing.assert_close(scores, want, rtol=0, atol=2e-6)


def test_rows_without_a_log_softmax_score_nan_and_the_smallest_allowed_id():
    inf, nan = float("inf"), float("nan")
    logits = torch.randn(5, 50)
    logits[0, 33] = nan
    logits[1, 3] = inf
    logits[2] = -inf
    logits[3, 10] = -inf  # an id with probability 0: an ordinary row
    logits[4, 49] = nan  # in the scalar tail
    scores, ids = best_token(logits, [0, 1])
    assert torch.isnan(scores[[0, 1, 2, 4]]).all() and ids[[0, 1, 2, 4]].tolist() == [2, 2, 2, 2]
    want, want_id = reference(logits[3:4], [0, 1])
    assert ids[3] == want_id[0] and torch.isfinite(scores[3])
    torch.testing.assert_close(scores[3:4], want, rtol=0, atol=2e-6)


def test_result_does_not_depend_on_the_thread_count():
    logits = torch.randn(300, 1000) * 3
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = best_token(logits, [1])
        torch.set_num_threads(max(2, before))
        many = best_token(logits, [1])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="banned id 9 is outside the vocabulary"):
        best_token(torch.zeros(2, 9), [9])
    with pytest.raises(ValueError, match="every one of the 2 ids is banned"):
        best_token(torch.zeros(1, 2), [0, 1])
    with pytest.raises(ValueError, match="float32"):
        best_token(torch.zeros(1, 4, dtype=torch.float64), [])
    with pytest.raises(ValueError, match=r"\(rows, V\)"):
        best_token(torch.zeros(4), [])
    empty = best_token(torch.zeros(0, 4), [0, 1, 2, 3])
    assert empty[0].shape == (0,) and empty[1].dtype == torch.long
