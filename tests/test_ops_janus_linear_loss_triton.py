"""The fused linear + JANUS loss (kernels/janus_loss.py's chunked driver) against janus_linear_loss_ref.

Runs the Triton kernel through the interpreter on a CPU-only torch (tests/conftest.py), else on the GPU.
Values, gradients of the states and of the projection, chunk sizes from one row to all
rows, every stream layout, masked rows paired in any order, low precision and autocast,
and that no chunk ever forms more logits than its own rows.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import linear_loss_cases
import pytest
import torch
from linear_loss_cases import EPS, SCALES, check_backend, run

from janus.kernels import janus_loss as kernel
from janus.ops._dispatch import triton_available
from janus.ops.janus_linear_loss import JANUS_LINEAR_LOSS, janus_linear_loss_ref, janus_linear_loss_triton

pytestmark = pytest.mark.triton

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
problem = functools.partial(linear_loss_cases.problem, device=DEVICE)


@pytest.fixture(autouse=True, scope="module")
def _triton():
    ok, why = triton_available()
    if not ok:
        pytest.skip(f"triton cannot run here: {why}")


def check(*args, **kwargs):
    return check_backend(janus_linear_loss_triton, 1e-4, *args, **kwargs)


@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_chunks_of_any_size_match_the_reference(chunk_rows):
    hidden, weight, ya, y, pair = problem(13, 6, seed=chunk_rows)
    check(hidden, weight, ya, y, pair, chunk_rows=chunk_rows)


def test_skl_gradient_into_p_ar_stopped():
    """LossScales.skl_grad_ar = 0 (TrainConfig.skl_stop_grad="ar") through the chunked driver."""
    hidden, weight, ya, y, pair = problem(13, 6, seed=5)
    check(hidden, weight, ya, y, pair, scales=dataclasses.replace(SCALES, skl_grad_ar=0.0), chunk_rows=4)


@pytest.mark.parametrize("streams", ["a", "b", "bc", "ab"])
def test_stream_layouts(streams):
    hidden, weight, ya, y, pair = problem(9, 5, seed=len(streams), streams=streams)
    check(hidden, weight, ya, y, pair, chunk_rows=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision(dtype):
    hidden, weight, ya, y, pair = problem(10, 6, seed=3)
    check(hidden, weight, ya, y, pair, dtype, chunk_rows=4)


def test_no_masked_rows_and_repeated_pairs_fall_back():
    hidden, weight, ya, y, pair = problem(7, 0, seed=4)
    check(hidden, weight, ya, y, pair, chunk_rows=3)
    hidden, weight, ya, y, pair = problem(8, 4, seed=5)
    pair[1] = pair[0]  # the dispatched backend then runs the reference
    want = janus_linear_loss_ref(hidden["a"], hidden["b"], hidden["c"], weight, ya, y, pair, EPS, SCALES)
    got = JANUS_LINEAR_LOSS.backend("triton").impl(hidden["a"], hidden["b"], hidden["c"], weight, ya, y, pair,
                                                    EPS, SCALES)  # fmt: skip
    torch.testing.assert_close(got.loss, want.loss)


def test_no_chunk_forms_more_logits_than_its_rows(monkeypatch):
    hidden, weight, ya, y, pair = problem(20, 9, seed=6, shuffled=False)
    seen = []
    forward = kernel.janus_loss_forward

    def spy(a, ya_, b, c, *args, **kwargs):
        seen.append(sum(x.shape[0] for x in (a, b, c) if x is not None))
        return forward(a, ya_, b, c, *args, **kwargs)

    monkeypatch.setattr(kernel, "janus_loss_forward", spy)
    check(hidden, weight, ya, y, pair, chunk_rows=5)
    assert len(seen) == 4  # 20 AR rows in chunks of 5
    assert max(seen) <= 5 * 3 and sum(seen) == 20 + 2 * 9  # every row exactly once


def test_autocast_computes_in_the_autocast_dtype():
    hidden, weight, ya, y, pair = problem(9, 4, seed=7)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = run(janus_linear_loss_triton, hidden, weight, ya, y, pair, torch.float32, chunk_rows=4)
        want = run(janus_linear_loss_ref, hidden, weight, ya, y, pair, torch.float32)
    assert got[2]["w"].dtype == torch.float32 and got[2]["a"].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=2e-2, atol=0.5)
    for k in "abcw":
        torch.testing.assert_close(got[2][k], want[2][k], rtol=5e-2, atol=2e-2)


def test_backward_runs_once():
    hidden, weight, ya, y, pair = problem(6, 3, seed=8)
    w = weight.clone().requires_grad_()
    out = janus_linear_loss_triton(hidden["a"], hidden["b"], hidden["c"], w, ya, y, pair, EPS, SCALES)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.loss.backward()


@pytest.mark.parametrize("objective", ["janus", "ar", "cmlm"])
def test_training_loss_through_the_fused_path_matches(objective, monkeypatch):
    """compute_loss on real training rows (their pair_index layout), fused vs reference: loss and every
    parameter's gradient."""
    from functools import partial

    from test_losses import toy_batch

    import janus.losses as losses
    from janus.config import LossWeights, preset
    from janus.model import JanusModel

    torch.manual_seed(0)
    model = JanusModel(preset("tiny", vocab_size=40, dropout=0.0)).to(DEVICE)
    src, tgt, masked = (t.to(DEVICE) for t in toy_batch())
    kw = dict(objective=objective, weights=LossWeights.for_objective(objective), label_smoothing=0.1)
    results = []
    for fn in (janus_linear_loss_ref, partial(janus_linear_loss_triton, chunk_rows=5)):
        monkeypatch.setattr(losses, "janus_linear_loss", fn)
        out = losses.compute_loss(model, src, tgt, masked, **kw)
        grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
        results.append((out.loss.detach(), out.sums, grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-4)
    for got, want in zip(results[1][2], results[0][2]):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
