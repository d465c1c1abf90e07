"""The fused linear + JANUS loss (kernels/janus_loss.py's chunked driver) against janus_linear_loss_ref.

Runs the Triton kernel through the interpreter on a CPU-only torch (tests/conftest.py).
Values, gradients of the states and of the projection, chunk sizes from one row to all
rows, every stream layout, masked rows paired in any order, low precision and autocast,
and that no chunk ever forms more logits than its own rows.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tolerances import assert_within_baseline

from janus.kernels import janus_loss as kernel
from janus.ops._dispatch import triton_available
from janus.ops.janus_linear_loss import JANUS_LINEAR_LOSS, janus_linear_loss_ref, janus_linear_loss_triton
from janus.ops.janus_loss import LossScales

pytestmark = pytest.mark.triton

V, D = 1031, 24
EPS = 0.1
SCALES = LossScales(ar=0.3, nar=0.5, aux=0.7, skl_ar_nar=1.1, skl_ar_aux=1.3, skl_nar_aux=1.7)


@pytest.fixture(autouse=True, scope="module")
def _triton():
    ok, why = triton_available()
    if not ok:
        pytest.skip(f"triton cannot run here: {why}")


def problem(N: int, M: int, seed: int, streams: str = "abc", shuffled: bool = True):
    g = torch.Generator().manual_seed(seed)
    hidden = {k: (torch.randn(n, D, generator=g) if k in streams else None) for k, n in zip("abc", (N, M, M))}
    weight = torch.randn(V, D, generator=g) * 0.6
    ya = torch.randint(0, V, (N,), generator=g)
    ya[torch.rand(N, generator=g) < 0.2] = -100
    y = torch.randint(0, V, (M,), generator=g)
    y[torch.rand(M, generator=g) < 0.2] = -100
    pair = torch.randperm(N, generator=g)[:M]
    if not shuffled:
        pair = pair.sort().values
    return hidden, weight, ya, y, pair


def run(fn, hidden, weight, ya, y, pair, dtype, scales=SCALES, **kwargs):
    """(loss, sums, grads of the a/b/c states and of the weight) with inputs cast to dtype; loss x 1.5."""
    # Fresh leaves every run (``to`` alone would return the caller's tensor and pool the gradients).
    hs = {k: (v.to(dtype, copy=True).requires_grad_() if v is not None else None) for k, v in hidden.items()}
    w = weight.to(dtype, copy=True).requires_grad_()
    out = fn(hs["a"], hs["b"], hs["c"], w, ya, y, pair, EPS, scales, **kwargs)
    (out.loss * 1.5).backward()
    grads = {k: (h.grad if h is not None else None) for k, h in hs.items()} | {"w": w.grad}
    return out.loss.detach(), out.sums, grads


def check(hidden, weight, ya, y, pair, dtype=torch.float32, scales=SCALES, **kwargs):
    exact = run(janus_linear_loss_ref, {k: v.to(dtype).double() if v is not None else None for k, v in hidden.items()},
                weight.to(dtype).double(), ya, y, pair, torch.float64, scales)  # fmt: skip
    baseline = run(janus_linear_loss_ref, hidden, weight, ya, y, pair, dtype, scales)
    got = run(janus_linear_loss_triton, hidden, weight, ya, y, pair, dtype, scales, **kwargs)
    atol = 1e-4 if dtype == torch.float32 else 2e-3
    ulp = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    assert_within_baseline(got[0], exact[0], baseline[0], atol=10 * atol, name="loss")
    assert_within_baseline(got[1], exact[1], baseline[1], atol=10 * atol, name="sums")
    for k, g in got[2].items():
        if g is None:
            continue
        assert g.dtype == dtype
        # Per chunk, d logits is rounded to the compute dtype before the two GEMMs: the relative slack.
        assert_within_baseline(g.float(), exact[2][k], baseline[2][k].float(), atol=atol, rtol=4 * ulp, name=k)
    return got


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
    with torch.autocast("cpu", dtype=torch.bfloat16):
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
    model = JanusModel(preset("tiny", vocab_size=40, dropout=0.0))
    src, tgt, masked = toy_batch()
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
