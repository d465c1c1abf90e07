"""The chunked CPU linear + JANUS loss (janus_linear_loss's "cpu" backend) against janus_linear_loss_ref.

Values, gradients of the states and of the projection, chunk sizes from one row to all rows,
every stream layout (ar only, cmlm only, janus all three, and the pairs in between), ignored
rows, no masked rows, repeated and shuffled pairs, low precision and autocast (the
low-precision rule of tests/tolerances.py), that no chunk forms more logits than its own rows,
and the training loss of every objective through the dispatched path.
"""

from __future__ import annotations

import dataclasses
import importlib
from functools import partial

import pytest
import torch
from linear_loss_cases import EPS, SCALES, check_backend, problem, run
from tolerances import assert_within_baseline

from janus.ops.janus_linear_loss import JANUS_LINEAR_LOSS, janus_linear_loss_cpu, janus_linear_loss_ref

op = importlib.import_module("janus.ops.janus_linear_loss")  # the module (janus.ops exports its function)


def check(*args, **kwargs):
    return check_backend(janus_linear_loss_cpu, 1e-5, *args, **kwargs)


def test_fp64_equals_the_reference_exactly_enough():
    """In fp64 the closed-form gradients and autograd's agree to rounding, for every layout."""
    for streams in ("abc", "a", "b", "bc", "ab", "ac"):
        for shuffled in (False, True):
            hidden, weight, ya, y, pair = problem(13, 6, seed=1, streams=streams, shuffled=shuffled)
            want = run(janus_linear_loss_ref, hidden, weight, ya, y, pair, torch.float64)
            got = run(partial(janus_linear_loss_cpu, chunk_rows=3), hidden, weight, ya, y, pair, torch.float64)
            torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
            for k in got[2]:
                assert (got[2][k] is None) == (want[2][k] is None), (streams, k)
                if got[2][k] is not None:
                    torch.testing.assert_close(got[2][k], want[2][k], rtol=1e-10, atol=1e-12, msg=(streams, k))


@pytest.mark.parametrize("skl_grad_ar", [0.0, 0.5])
@pytest.mark.parametrize("shuffled", [False, True], ids=["sorted", "shuffled"])
def test_skl_gradient_into_p_ar_scaled_or_stopped_like_the_reference(skl_grad_ar, shuffled):
    """LossScales.skl_grad_ar (TrainConfig.skl_stop_grad): the same values, the SKL terms' gradient into
    the AR rows scaled (0: none), in fp64 to rounding and in fp32 by the usual rule."""
    scales = dataclasses.replace(SCALES, skl_grad_ar=skl_grad_ar)
    hidden, weight, ya, y, pair = problem(13, 6, seed=7, shuffled=shuffled)
    want = run(janus_linear_loss_ref, hidden, weight, ya, y, pair, torch.float64, scales)
    got = run(partial(janus_linear_loss_cpu, chunk_rows=3), hidden, weight, ya, y, pair, torch.float64, scales)
    full = run(janus_linear_loss_ref, hidden, weight, ya, y, pair, torch.float64)
    torch.testing.assert_close(got[0], full[0], rtol=1e-12, atol=1e-12)  # the value does not change
    for k in got[2]:
        torch.testing.assert_close(got[2][k], want[2][k], rtol=1e-10, atol=1e-12, msg=k)
    assert not torch.allclose(got[2]["a"], full[2]["a"])  # ... the AR side's gradient does
    check(hidden, weight, ya, y, pair, scales=scales, chunk_rows=4)


@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_chunks_of_any_size_match_the_reference(chunk_rows):
    hidden, weight, ya, y, pair = problem(13, 6, seed=chunk_rows)
    check(hidden, weight, ya, y, pair, chunk_rows=chunk_rows)


@pytest.mark.parametrize("streams", ["a", "b", "bc", "ab", "ac", "abc"])
@pytest.mark.parametrize("shuffled", [False, True], ids=["sorted", "shuffled"])
def test_stream_layouts(streams, shuffled):
    """a: the `ar` objective; b: `cmlm`; abc: `janus`; pairs sorted (training rows) or in any order."""
    hidden, weight, ya, y, pair = problem(9, 5, seed=len(streams), streams=streams, shuffled=shuffled)
    check(hidden, weight, ya, y, pair, chunk_rows=3)


def test_default_chunking_on_training_sizes():
    hidden, weight, ya, y, pair = problem(300, 170, seed=11, shuffled=False)
    check(hidden, weight, ya, y, pair)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision(dtype):
    hidden, weight, ya, y, pair = problem(10, 6, seed=3)
    check(hidden, weight, ya, y, pair, dtype, chunk_rows=4)


def test_ignored_rows_and_no_masked_rows():
    hidden, weight, ya, y, pair = problem(7, 0, seed=4)
    check(hidden, weight, ya, y, pair, chunk_rows=3)
    hidden, weight, ya, y, pair = problem(8, 5, seed=5, ignored=1.0)  # every target ignored: SKL only... of none
    got = check(hidden, weight, ya, y, pair, chunk_rows=3)
    assert float(got[0]) == 0.0 and not got[2]["w"].any()
    hidden, weight, ya, y, pair = problem(8, 5, seed=5, streams="bc")
    got = check(hidden, weight, ya, y, pair, chunk_rows=2)


def test_repeated_pairs_are_taken():
    hidden, weight, ya, y, pair = problem(8, 4, seed=5)
    pair[1] = pair[0]
    pair[3] = pair[0]
    check(hidden, weight, ya, y, pair, chunk_rows=3)


def test_no_chunk_forms_more_logits_than_its_rows(monkeypatch):
    hidden, weight, ya, y, pair = problem(20, 9, seed=6, shuffled=False)
    seen = []
    terms = op.loss_terms

    def spy(logits, counts, *args, **kwargs):
        assert logits.shape[0] == sum(counts)
        seen.append(logits.shape[0])
        return terms(logits, counts, *args, **kwargs)

    monkeypatch.setattr(op, "loss_terms", spy)
    check(hidden, weight, ya, y, pair, chunk_rows=5)
    assert len(seen) == 4  # 20 AR rows in chunks of 5
    assert max(seen) <= 5 * 3 and sum(seen) == 20 + 2 * 9  # every row exactly once


def test_autocast_computes_in_the_autocast_dtype():
    """Under bf16 autocast: logits and their gradient in bf16 (like F.linear there), loss in fp32,
    gradients in the inputs' dtypes; within the low-precision rule of the reference under autocast."""
    hidden, weight, ya, y, pair = problem(9, 4, seed=7)
    exact = run(janus_linear_loss_ref, {k: v.bfloat16().double() for k, v in hidden.items()},
                weight.bfloat16().double(), ya, y, pair, torch.float64)  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(partial(janus_linear_loss_cpu, chunk_rows=4), hidden, weight, ya, y, pair, torch.float32)
        want = run(janus_linear_loss_ref, hidden, weight, ya, y, pair, torch.float32)
    assert got[0].dtype == torch.float32 and got[2]["w"].dtype == torch.float32 and got[2]["a"].dtype == torch.float32
    assert_within_baseline(got[0], exact[0], want[0], atol=1e-2, name="loss")
    for k in "abcw":
        assert_within_baseline(got[2][k], exact[2][k], want[2][k], atol=2e-3, rtol=4 * 2.0**-7, name=k)


def test_backward_runs_once():
    hidden, weight, ya, y, pair = problem(6, 3, seed=8)
    w = weight.clone().requires_grad_()
    out = janus_linear_loss_cpu(hidden["a"], hidden["b"], hidden["c"], w, ya, y, pair, EPS, SCALES)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.loss.backward()


def test_dispatch_runs_cpu_tensors_on_the_cpu_backend():
    hidden, weight, ya, y, pair = problem(6, 3, seed=9)
    args = (hidden["a"], hidden["b"], hidden["c"], weight, ya, y, pair, EPS, SCALES)
    assert JANUS_LINEAR_LOSS.select(*args).name == "cpu"
    names = [b.name for b in JANUS_LINEAR_LOSS.backends]
    assert names.index("cpu") < names.index("reference")


@pytest.mark.parametrize("objective", ["janus", "ar", "cmlm"])
def test_training_loss_through_the_cpu_path_matches(objective, monkeypatch):
    """compute_loss on real training rows (their pair_index layout), CPU path vs reference: loss and every
    parameter's gradient, in fp32 and under bf16 autocast."""
    from test_losses import toy_batch

    import janus.losses as losses
    from janus.config import LossWeights, preset
    from janus.model import JanusModel

    torch.manual_seed(0)
    model = JanusModel(preset("tiny", vocab_size=40, dropout=0.0))
    src, tgt, masked = toy_batch()
    kw = dict(objective=objective, weights=LossWeights.for_objective(objective), label_smoothing=0.1)
    for amp in (False, True):
        results = []
        for fn in (janus_linear_loss_ref, partial(janus_linear_loss_cpu, chunk_rows=5)):
            monkeypatch.setattr(losses, "janus_linear_loss", fn)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = losses.compute_loss(model, src, tgt, masked, **kw)
            grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
            results.append((out.loss.detach(), out.sums, grads))
        tol = dict(rtol=2e-2, atol=2e-3) if amp else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(results[1][0], results[0][0], **tol)
        torch.testing.assert_close(results[1][1], results[0][1], rtol=tol["rtol"], atol=10 * tol["atol"])
        for got, want in zip(results[1][2], results[0][2]):
            assert (got is None) == (want is None)
            if got is not None:
                torch.testing.assert_close(got, want, rtol=tol["rtol"] * 10, atol=tol["atol"] if amp else 1e-6)
