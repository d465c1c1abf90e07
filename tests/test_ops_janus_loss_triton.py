"""The fused Triton JANUS loss (kernels/janus_loss.py) against the reference janus_loss_ref.

On a CPU-only torch the kernel runs in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so the shapes stay small; V = 1031 is odd and spans several blocks
when the block is narrowed. Values and gradients, fp32 and fp16/bf16 (the tolerance
rule of tests/tolerances.py), every stream layout, ignored rows, masked rows paired
with AR rows in any order, and the reference's fallback for repeated pairs.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from tolerances import assert_within_baseline

from janus.ops._dispatch import triton_available
from janus.ops.janus_loss import JANUS_LOSS, TERMS, LossScales, janus_loss_ref

pytestmark = pytest.mark.triton

V = 1031
EPS = 0.1
SCALES = LossScales(ar=0.3, nar=0.5, aux=0.7, skl_ar_nar=1.1, skl_ar_aux=1.3, skl_nar_aux=1.7)
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture(scope="module")
def fused():
    """The triton backend's implementation (on CPU tensors under the interpreter)."""
    ok, why = triton_available()
    if not ok:
        pytest.skip(f"triton cannot run here: {why}")
    return JANUS_LOSS.backend("triton").impl


def problem(
    N: int, M: int, seed: int, streams: str = "abc", ignored: float = 0.2, pairs: str = "sorted", device: str = DEVICE
):
    """Logits (fp32, spread like a trained model's), targets with some ignored, and a pairing, on ``device``
    (drawn on the CPU: the same values on every device)."""
    g = torch.Generator().manual_seed(seed)
    logits = {k: (torch.randn(n, V, generator=g) * 2.5 if k in streams else None) for k, n in zip("abc", (N, M, M))}
    ya = torch.randint(0, V, (N,), generator=g)
    ya[torch.rand(N, generator=g) < ignored] = -100
    y = torch.randint(0, V, (M,), generator=g)
    y[torch.rand(M, generator=g) < ignored] = -100
    if pairs == "sorted":
        pair = torch.randperm(N, generator=g)[:M].sort().values
    elif pairs == "shuffled":
        pair = torch.randperm(N, generator=g)[:M]
    else:  # "repeated": two masked rows share an AR row
        pair = torch.randint(0, max(N, 1), (M,), generator=g)
        pair[-1] = pair[0]
    logits = {k: (v.to(device) if v is not None else None) for k, v in logits.items()}
    return logits, ya.to(device), y.to(device), pair.to(device)


def run(fn, logits, ya, y, pair, dtype, grad_scale=2.5, device=DEVICE, scales=SCALES):
    """fn's (loss, sums, grads) for logits cast to ``dtype``; the loss is backpropagated times grad_scale."""
    # Fresh leaves every run (``to`` alone would return the caller's tensor and pool the gradients).
    xs = {k: (v.to(device, dtype, copy=True).requires_grad_() if v is not None else None) for k, v in logits.items()}
    dev = lambda t: t.to(device) if t is not None else None  # noqa: E731
    out = fn(xs["a"], dev(ya), xs["b"], xs["c"], dev(y), dev(pair), EPS, scales)
    (out.loss * grad_scale).backward()
    grads = {k: (x.grad if x is not None else None) for k, x in xs.items()}
    return out.loss.detach().cpu(), out.sums.cpu(), {k: (v.cpu() if v is not None else None) for k, v in grads.items()}


def check(fused, logits, ya, y, pair, dtype=torch.float32, scales=SCALES):
    """Kernel vs the fp64 reference on the same rounded inputs, within 2x PyTorch's own error in dtype."""
    rounded = {k: (v.to(dtype).double() if v is not None else None) for k, v in logits.items()}
    exact = run(janus_loss_ref, rounded, ya, y, pair, torch.float64, device="cpu", scales=scales)
    baseline = run(janus_loss_ref, logits, ya, y, pair, dtype, device="cpu", scales=scales)
    got = run(fused, logits, ya, y, pair, dtype, scales=scales)
    atol = 1e-4 if dtype == torch.float32 else 2e-3
    assert_within_baseline(got[0], exact[0], baseline[0], atol=atol * 10, name="loss")
    assert_within_baseline(got[1], exact[1], baseline[1], atol=atol * 10, name="sums")
    # The kernel stores d loss / d logits in the logits' dtype and the backward scales it there: two
    # roundings where PyTorch has one (and the interpreter's bf16 cast truncates). One unit in the
    # last place, relative, on top of the rule.
    ulp = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    for k in "abc":
        if logits[k] is None:
            continue
        assert got[2][k].dtype == dtype
        assert_within_baseline(
            got[2][k].float(), exact[2][k], baseline[2][k].float(), atol=atol, rtol=ulp, name=f"grad {k}"
        )
    return got


@pytest.mark.parametrize("streams", ["abc", "a", "b", "bc", "ab", "ac"])
def test_every_stream_layout_matches_the_reference(fused, streams):
    logits, ya, y, pair = problem(9, 5, seed=len(streams) * 7 + ord(streams[-1]), streams=streams)
    loss, sums, _ = check(fused, logits, ya, y, pair)
    present = {"a": ["ar", "ar_nll"], "b": ["nar", "nar_nll"], "c": ["aux", "aux_nll"]}
    used = {t for k in streams for t in present[k]}
    if "a" in streams and "b" in streams:
        used.add("skl_ar_nar")
    if "a" in streams and "c" in streams:
        used.add("skl_ar_aux")
    if "b" in streams and "c" in streams:
        used.add("skl_nar_aux")
    for name, value in zip(TERMS, sums.tolist()):
        assert (value != 0) == (name in used), (name, value)  # absent terms are exactly 0


@pytest.mark.parametrize("skl_grad_ar", [0.0, 0.5])
def test_skl_gradient_into_p_ar_scaled_or_stopped(fused, skl_grad_ar):
    """LossScales.skl_grad_ar (TrainConfig.skl_stop_grad): the kernel scales the SKL terms' share of the
    AR logits' gradient like the reference does."""
    logits, ya, y, pair = problem(9, 5, seed=11)
    check(fused, logits, ya, y, pair, scales=dataclasses.replace(SCALES, skl_grad_ar=skl_grad_ar))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_logits_accumulate_in_fp32(fused, dtype):
    logits, ya, y, pair = problem(8, 5, seed=3)
    check(fused, logits, ya, y, pair, dtype)


def test_one_row_and_no_masked_rows(fused):
    logits, ya, y, pair = problem(1, 1, seed=4, ignored=0.0)
    check(fused, logits, ya, y, pair)
    logits, ya, y, pair = problem(6, 0, seed=5)  # nothing masked in the batch
    loss, sums, grads = check(fused, logits, ya, y, pair)
    assert sums[1:6].abs().sum() == 0 and grads["b"].shape == (0, V)


def test_ignored_rows_contribute_nothing_and_get_zero_gradients(fused):
    logits, ya, y, pair = problem(7, 4, seed=6, ignored=0.0)
    ya[:] = -100
    y[:] = -100
    loss, sums, grads = run(fused, logits, ya, y, pair, torch.float32)
    assert float(loss) == 0 and bool((sums == 0).all())
    assert all(bool((g == 0).all()) for g in grads.values())
    # An ignored AR target still ties its row to the masked partner through the SKL terms.
    logits, ya, y, pair = problem(7, 4, seed=7, ignored=0.0)
    ya[pair] = -100
    check(fused, logits, ya, y, pair)


@pytest.mark.parametrize("pairs", ["shuffled", "repeated"])
def test_pairings_in_any_order_and_repeated_pairs(fused, pairs):
    logits, ya, y, pair = problem(11, 6, seed=8, pairs=pairs)
    check(fused, logits, ya, y, pair)  # "repeated": the reference runs (the kernel needs distinct pairs)


def test_views_of_one_projection_and_strided_logits(fused):
    # The layout the training loss uses: three row ranges of one (N + 2M, V) projection output.
    logits, ya, y, pair = problem(6, 3, seed=9)
    packed = torch.cat([logits["a"], logits["b"], logits["c"]]).requires_grad_()
    views = {"a": packed[:6], "b": packed[6:9], "c": packed[9:]}
    out = fused(views["a"], ya, views["b"], views["c"], y, pair, EPS, SCALES)
    out.loss.backward()
    ref_packed = packed.detach().clone().requires_grad_()
    ref = janus_loss_ref(ref_packed[:6], ya, ref_packed[6:9], ref_packed[9:], y, pair, EPS, SCALES)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(packed.grad, ref_packed.grad, rtol=1e-4, atol=1e-5)
    # Logits with a stride along V: computed on a contiguous copy, gradients still land right.
    wide = {k: torch.stack([v, torch.zeros_like(v)], -1) for k, v in logits.items()}
    strided = {k: w[..., 0] for k, w in wide.items()}
    assert not strided["a"].is_contiguous()
    check(fused, strided, ya, y, pair)


def test_backward_scales_by_the_incoming_gradient_and_runs_once(fused):
    logits, ya, y, pair = problem(5, 3, seed=10)
    a = logits["a"].clone().requires_grad_()
    out = fused(a, ya, logits["b"], logits["c"], y, pair, EPS, SCALES)
    upstream = torch.tensor(-3.0, device=DEVICE)
    out.loss.backward(upstream, retain_graph=True)
    ref_a = logits["a"].clone().requires_grad_()
    janus_loss_ref(ref_a, ya, logits["b"], logits["c"], y, pair, EPS, SCALES).loss.backward(upstream)
    torch.testing.assert_close(a.grad, ref_a.grad, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.loss.backward()
    # No logits need a gradient: values only, nothing allocated for gradients.
    out = fused(logits["a"], ya, logits["b"], logits["c"], y, pair, EPS, SCALES)
    assert not out.loss.requires_grad
    torch.testing.assert_close(
        out.sums, janus_loss_ref(logits["a"], ya, logits["b"], logits["c"], y, pair, EPS, SCALES).sums,
        rtol=1e-5, atol=1e-4,
    )  # fmt: skip


def test_gradients_for_some_logits_only_leave_the_others_alone(fused):
    logits, ya, y, pair = problem(7, 4, seed=12)
    a = logits["a"].clone().requires_grad_()
    b, c = logits["b"].clone(), logits["c"].clone()
    out = fused(a, ya, b, c, y, pair, EPS, SCALES)
    out.loss.backward()
    assert torch.equal(b, logits["b"]) and torch.equal(c, logits["c"]) and torch.equal(a.detach(), logits["a"])
    ref_a = logits["a"].clone().requires_grad_()
    janus_loss_ref(ref_a, ya, logits["b"], logits["c"], y, pair, EPS, SCALES).loss.backward()
    torch.testing.assert_close(a.grad, ref_a.grad, rtol=1e-4, atol=1e-5)


def test_dispatch_keeps_cpu_tensors_on_the_reference():
    logits, ya, y, pair = problem(3, 2, seed=11, device="cpu")
    backend = JANUS_LOSS.select(logits["a"], ya, logits["b"], logits["c"], y, pair, EPS, SCALES)
    assert backend.name == "reference"
    why = JANUS_LOSS.backend("triton").verdict(logits["a"], ya, logits["b"], logits["c"], y, pair, EPS, SCALES)[1]
    assert "cuda" in why


@pytest.mark.gpu
@pytest.mark.slow
def test_full_size_bf16_on_cuda():
    """N = 8192 AR rows, M = 5600 masked rows, V = 32000, bf16 (the benchmark's size), against the reference."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = torch.Generator(device="cuda").manual_seed(0)
    N, M, Vb = 8192, 5600, 32000
    ya = torch.randint(0, Vb, (N,), device="cuda", generator=g)
    y = torch.randint(0, Vb, (M,), device="cuda", generator=g)
    pair = torch.randperm(N, device="cuda", generator=g)[:M].sort().values
    outs = []
    for backend in ("triton", "reference"):
        xs = [(torch.randn(n, Vb, device="cuda", generator=torch.Generator(device="cuda").manual_seed(i)) * 2.5)
              .bfloat16().requires_grad_() for i, n in enumerate((N, M, M))]  # fmt: skip
        out = JANUS_LOSS.backend(backend).impl(xs[0], ya, xs[1], xs[2], y, pair, EPS, SCALES)
        out.loss.backward()
        outs.append((out.loss.float(), out.sums, [x.grad.float() for x in xs]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=2e-3, atol=1e-2)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=2e-3, atol=1e-2)
    for got, want in zip(outs[0][2], outs[1][2]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.slow
def test_offsets_past_two_to_the_31_on_cuda():
    """N * V > 2^31 logits: rows past the 32-bit range are read and written at the right place."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    Vb = 32000
    N = 2**31 // Vb + 64  # the last 64 rows start beyond element 2^31
    g = torch.Generator(device="cuda").manual_seed(1)
    logits = torch.randn(N, Vb, device="cuda", dtype=torch.bfloat16, generator=g)
    targets = torch.full((N,), -100, device="cuda")
    targets[-64:] = torch.randint(0, Vb, (64,), device="cuda", generator=g)
    logits.requires_grad_()
    out = JANUS_LOSS.backend("triton").impl(logits, targets, None, None, None, None, EPS, SCALES)
    out.loss.backward()
    tail = logits.detach()[-64:].clone().requires_grad_()
    ref = janus_loss_ref(tail, targets[-64:], None, None, None, None, EPS, SCALES)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(logits.grad[-64:].float(), tail.grad.float(), rtol=2e-2, atol=2e-3)
    assert bool((logits.grad[:-64] == 0).all())
