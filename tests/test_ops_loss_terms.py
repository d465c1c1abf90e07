"""loss_terms: the C++ CPU kernel (csrc/cpu/loss_terms.cpp) against the reference, its errors, and
the dispatch.

The kernel computes in fp32 whatever the logits' dtype; it is checked against the reference in fp64
from the same inputs, within twice the error of the reference in fp32 (tests/tolerances.py), for every
stream layout, paired and unpaired masked rows, repeated pairs, ignored rows, a partial or absent SKL
gradient into P_AR, row widths that are and are not multiples of the kernel's 16 lanes, and bf16
logits and gradients. Tests marked ``cpp`` fail instead of skipping when JANUS_REQUIRE_EXT=1 (CI).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from ext_helpers import require_kernel
from tolerances import assert_within_baseline

from janus.ops.janus_loss import TERMS, LossScales
from janus.ops.loss_terms import LOSS_TERMS, _loss_terms_cpp, loss_terms, loss_terms_ref

EPS = 0.1
SCALES = LossScales(ar=0.3, nar=0.5, aux=0.7, skl_ar_nar=1.1, skl_ar_aux=1.3, skl_nar_aux=1.7)

pytestmark = pytest.mark.cpp


@pytest.fixture(autouse=True)
def _kernel():
    require_kernel("loss_terms", "cpu")


def chunk(r: int, m: int, V: int, streams: str, seed: int, paired: bool = True, ignored: float = 0.2,
          repeats: bool = False):  # fmt: skip
    """Logits of the streams in ``streams`` (a: r AR rows, b/c: m masked rows each), clamped targets,
    keep (the two masked streams share their rows' targets, as in training), sorted pairs or None."""
    g = torch.Generator().manual_seed(seed)
    counts = (r if "a" in streams else 0, m if "b" in streams else 0, m if "c" in streams else 0)
    rows = sum(counts)
    logits = torch.randn(rows, V, generator=g) * 4
    targets = torch.randint(0, V, (rows,), generator=g)
    keep = (torch.rand(rows, generator=g) >= ignored).float()
    if counts[1] and counts[2]:
        targets[counts[0] + m :] = targets[counts[0] : counts[0] + m]
        keep[counts[0] + m :] = keep[counts[0] : counts[0] + m]
    pairs = None
    if paired and counts[0] and (counts[1] or counts[2]):
        pairs = torch.randint(0, r, (m,), generator=g) if repeats else torch.randperm(r, generator=g)[:m]
        pairs = pairs.sort().values
    return logits, counts, targets, keep, pairs


def check(logits, counts, targets, keep, pairs, scales=SCALES, dtype=torch.float32, grad_dtype=torch.float32,
          need_grad=True):  # fmt: skip
    """The kernel vs the fp64 reference from the same (rounded) logits, within 2x the fp32 reference's error."""
    x = logits.to(dtype)
    exact = loss_terms_ref(x.double(), counts, targets, keep.double(), pairs, EPS, scales, need_grad)
    base = loss_terms_ref(x.float(), counts, targets, keep, pairs, EPS, scales, need_grad)
    sums, grad = _loss_terms_cpp(x, counts, targets, keep, pairs, EPS, scales, need_grad, grad_dtype)
    assert sums.dtype == torch.float32 and sums.shape == (len(TERMS),)
    assert_within_baseline(sums, exact[0], base[0], atol=1e-4, name="sums")
    if not need_grad:
        assert grad is None
        return sums, None
    assert grad.dtype == grad_dtype and grad.shape == logits.shape
    # A bf16 gradient is the fp32 one rounded once: half an ulp of 2^-8 on top.
    rtol = 2.0**-8 if grad_dtype == torch.bfloat16 else 0.0
    assert_within_baseline(grad.float(), exact[1], base[1], atol=1e-6, rtol=rtol, name="grad")
    return sums, grad


@pytest.mark.parametrize("streams", ["abc", "ab", "ac", "bc", "a", "b", "c"])
@pytest.mark.parametrize("V", [7, 16, 1031])
def test_every_layout_matches_the_reference(streams, V):
    check(*chunk(13, 6, V, streams, seed=V))


def test_unpaired_masked_rows_have_no_skl_with_the_ar_rows():
    logits, counts, targets, keep, _ = chunk(13, 6, 300, "abc", seed=1)
    sums, _ = check(logits, counts, targets, keep, None)
    assert sums[TERMS.index("skl_ar_nar")] == 0 and sums[TERMS.index("skl_ar_aux")] == 0
    assert sums[TERMS.index("skl_nar_aux")] > 0


def test_repeated_pairs_and_ar_rows_without_masked_rows():
    logits, counts, targets, keep, pairs = chunk(9, 12, 300, "abc", seed=2, repeats=True)
    assert pairs.unique().numel() < pairs.numel() < 2 * 9  # repeats, and some AR rows unpaired
    check(logits, counts, targets, keep, pairs)


@pytest.mark.parametrize("factor", [0.0, 0.5])
def test_skl_gradient_into_p_ar_is_scaled(factor):
    logits, counts, targets, keep, pairs = chunk(13, 6, 300, "abc", seed=3)
    scales = dataclasses.replace(SCALES, skl_grad_ar=factor)
    sums, grad = check(logits, counts, targets, keep, pairs, scales=scales)
    full, full_grad = _loss_terms_cpp(logits, counts, targets, keep, pairs, EPS, SCALES, True, torch.float32)
    torch.testing.assert_close(sums, full)  # the loss value does not depend on it
    torch.testing.assert_close(grad[13:], full_grad[13:])  # nor the masked rows' gradients
    assert not torch.allclose(grad[:13], full_grad[:13])


def test_every_row_ignored_gives_zero_terms_and_gradient():
    logits, counts, targets, keep, pairs = chunk(5, 3, 64, "abc", seed=4, ignored=1.0)
    sums, grad = check(logits, counts, targets, keep, pairs)
    assert not sums.any() and not grad.any()


@pytest.mark.parametrize("dtype, grad_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                               (torch.float32, torch.bfloat16)])  # fmt: skip
def test_bf16_logits_and_gradients(dtype, grad_dtype):
    check(*chunk(21, 10, 1031, "abc", seed=5), dtype=dtype, grad_dtype=grad_dtype)


def test_without_gradient():
    check(*chunk(13, 6, 1031, "abc", seed=6), need_grad=False)


def test_result_does_not_depend_on_the_thread_count():
    args = chunk(40, 25, 4001, "abc", seed=7)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _loss_terms_cpp(*args, EPS, SCALES, True, torch.float32)
        torch.set_num_threads(2)
        two = _loss_terms_cpp(*args, EPS, SCALES, True, torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_extreme_logits_stay_finite_and_nan_propagates():
    logits, counts, targets, keep, pairs = chunk(4, 2, 100, "abc", seed=8, ignored=0.0)
    logits[0, 3] = 1e4  # one certain token: the rest of the row underflows
    logits[5, :] = -1e4
    check(logits, counts, targets, keep, pairs)
    logits[1, 7] = float("nan")
    sums, _ = _loss_terms_cpp(logits, counts, targets, keep, pairs, EPS, SCALES, True, torch.float32)
    assert sums[TERMS.index("ar")].isnan()


def test_bad_arguments_are_named():
    logits, counts, targets, keep, pairs = chunk(6, 3, 50, "abc", seed=9)
    with pytest.raises(ValueError, match="add up to"):
        _loss_terms_cpp(logits, (6, 3, 2), targets, keep, pairs, EPS, SCALES, True)
    bad = targets.clone()
    bad[2] = 50
    with pytest.raises(IndexError, match=r"targets\[2\] = 50"):
        _loss_terms_cpp(logits, counts, bad, keep, pairs, EPS, SCALES, True)
    with pytest.raises(IndexError, match=r"pairs\[0\] = 6"):
        _loss_terms_cpp(logits, counts, targets, keep, torch.full((3,), 6), EPS, SCALES, True)
    with pytest.raises(ValueError, match="must be sorted"):
        _loss_terms_cpp(logits, counts, targets, keep, pairs.flip(0) + torch.tensor([0, 0, 1]), EPS, SCALES, True)


def test_dispatch_sends_what_the_kernel_cannot_take_to_the_reference():
    logits, counts, targets, keep, pairs = chunk(13, 6, 100, "abc", seed=10)
    assert LOSS_TERMS.select(logits, counts, targets, keep, pairs, EPS, SCALES, True).name == "cpp"
    assert LOSS_TERMS.select(logits.double(), counts, targets, keep, pairs, EPS, SCALES, True).name == "reference"
    shuffled = pairs[torch.randperm(6, generator=torch.Generator().manual_seed(0))]
    assert LOSS_TERMS.select(logits, counts, targets, keep, shuffled, EPS, SCALES, True).name == "reference"
    half = LOSS_TERMS.select(logits, counts, targets, keep, pairs, EPS, SCALES, True, torch.float16)
    assert half.name == "reference"  # a gradient dtype the kernel does not write, passed as the callers pass it
    # The public function: same results whichever backend runs.
    got = loss_terms(logits, counts, targets, keep, pairs, EPS, SCALES, True)
    want = loss_terms_ref(logits, counts, targets, keep, pairs, EPS, SCALES, True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_opcheck():
    logits, counts, targets, keep, pairs = chunk(6, 3, 40, "abc", seed=11)
    args = (logits, list(counts), targets, keep, pairs, EPS, list(dataclasses.astuple(SCALES)), True, torch.float32)
    torch.library.opcheck(torch.ops.janus.loss_terms.default, args)
