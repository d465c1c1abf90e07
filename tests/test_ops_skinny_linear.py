"""skinny_linear (csrc/cpu/skinny_linear.cpp) against F.linear: every row count of its row groups, odd
shapes, bf16, no bias, row-major weights and their panels; thread-count and row invariance; named errors;
dispatch; and the model's fp32 and bf16 decoder steps and projections through it equal to the same through
the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ext_helpers import require_kernel
from tolerances import assert_within_baseline

from janus.ops.skinny_linear import (
    PANEL,
    SKINNY_LINEAR,
    _fits_cpp,
    pack_panels,
    panel_rows,
    skinny_linear,
    skinny_linear_checked,
    skinny_linear_ref,
    unpack_panels,
)


@pytest.fixture(autouse=True)
def _kernel():
    require_kernel("skinny_linear", "cpu")


def exact(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 10, 11, 12, 13, 15, 16, 25])
def test_matches_f_linear_for_every_row_group(rows, dtype):
    """Every tiling: up to 4 rows one group of 4 x 4 tiles (1, 2, 3 and 4 have their own accumulator
    layouts); multiples of 5 groups of 5 by 3 weight rows; others groups of 8 by 2, the last one short;
    37 and 7 outputs leave a tail of weight rows after the tiles."""
    g = torch.Generator().manual_seed(rows)
    for n, k in ((37, 512), (64, 48), (7, 33)):  # odd output counts, a K tail below 16 lanes
        x = torch.randn(rows, k, generator=g).to(dtype)
        w = torch.randn(n, k, generator=g).to(dtype)
        b = torch.randn(n, generator=g).to(dtype)
        out = torch.ops.janus.skinny_linear(x, w, b)
        assert out.dtype == dtype and out.shape == (rows, n)
        assert_within_baseline(out, exact(x, w, b), F.linear(x, w, b), atol=1e-5, name=f"{n}x{k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 10, 11, 13, 16, 25])
def test_panels_match_f_linear_for_every_row_group(rows, dtype):
    """The panel tiles: 1-4 rows their own layouts, multiples of 5 groups of 5, others groups of 6, the last
    one short; 37 outputs pack into 3 panels whose last 11 rows are zero (outputs 0, or the padded bias's);
    panel counts that leave a task fewer panels than a tile (3, 25) run panel by panel."""
    g = torch.Generator().manual_seed(100 + rows)
    for n, k, bias in ((37, 128, False), (48, 128, True), (400, 512, True), (16, 33, True), (64, 1, False)):
        x = torch.randn(rows, k, generator=g).to(dtype)
        w = torch.randn(n, k, generator=g).to(dtype)
        panels = pack_panels(w)
        P = -(-n // PANEL)
        assert panels.shape == (P, k, PANEL) and panels.is_contiguous()
        b = torch.randn(P * PANEL, generator=g).to(dtype) if bias else None
        out = torch.ops.janus.skinny_linear(x, panels, b)
        assert out.dtype == dtype and out.shape == (rows, P * PANEL)
        want = F.linear(x, w, None if b is None else b[:n])
        assert_within_baseline(out[:, :n], exact(x, w, None if b is None else b[:n]), want, atol=1e-5, name=f"{n}x{k}")
        tail = torch.zeros(rows, P * PANEL - n, dtype=dtype) if b is None else b[n:].expand(rows, -1)
        assert torch.equal(out[:, n:], tail)


def test_panels_pack_and_unpack():
    w = torch.randn(37, 20)
    panels = pack_panels(w)
    assert torch.equal(panels[1, 3], w[16:32, 3])  # panel 1 holds outputs 16..31, K outermost
    full = unpack_panels(panels)
    assert full.shape == (48, 20) and torch.equal(full[:37], w) and not full[37:].any()
    assert pack_panels(w.bfloat16()).dtype == torch.bfloat16


# (rows, K, N): threads split the panels; a product too narrow for two tasks of panels, its rows split in two;
# more than 60 rows, split in tasks of 60
SPLITS = [(13, 256, 1000), (48, 128, 384), (150, 128, 128)]


@pytest.mark.parametrize("M,K,N", SPLITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_with_panels_a_rows_result_depends_on_neither_the_other_rows_nor_the_threads(dtype, M, K, N):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    panels = pack_panels(w)
    b = torch.randn(panels.shape[0] * PANEL, generator=g).to(dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.janus.skinny_linear(x, panels, b)
        torch.set_num_threads(2)
        full = torch.ops.janus.skinny_linear(x, panels, b)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, full)
    assert_within_baseline(full[:, :N].float(), exact(x, w, b[:N]), F.linear(x, w, b[:N]).float(), atol=1e-2 if
                           dtype == torch.bfloat16 else 1e-5, name=f"{M}x{K}x{N}")  # fmt: skip
    cuts = (slice(0, 1), slice(3, 5), slice(2, 5), slice(7, 11), slice(5, 10), slice(1, 7), slice(0, 12))
    cuts += (slice(0, M // 2), slice(M // 3, M), slice(M - 13, M))  # across the row tasks' boundaries
    for rows in cuts:
        assert torch.equal(torch.ops.janus.skinny_linear(x[rows].contiguous(), panels, b), full[rows]), rows


def test_panels_through_the_dispatch_and_the_reference(monkeypatch):
    x, w = torch.randn(3, 2, 40), torch.randn(21, 40)
    panels = pack_panels(w)
    with torch.no_grad():
        assert SKINNY_LINEAR.select(x, panels).name == "cpp"
        out = skinny_linear(x, panels)
    assert out.shape == (3, 2, 32)
    ref = skinny_linear_ref(x, panels)
    assert ref.shape == (3, 2, 32) and not ref[..., 21:].any()
    torch.testing.assert_close(ref[..., :21], F.linear(x, w), rtol=1e-6, atol=1e-6)
    assert_within_baseline(out[..., :21], exact(x, w, None), F.linear(x, w))
    monkeypatch.setenv("JANUS_BACKEND_SKINNY_LINEAR", "reference")
    assert torch.equal(skinny_linear_checked(x, panels), ref)
    assert _fits_cpp(x, torch.randn(2, 40, 8))[0] is False  # not 16 outputs a panel


def test_panels_float32_rows_by_bfloat16_weights_give_float32():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 128, generator=g)
    w = torch.randn(80, 128, generator=g).bfloat16()
    out = torch.ops.janus.skinny_linear(x, pack_panels(w), None)
    assert out.dtype == torch.float32
    assert_within_baseline(out, exact(x, w, None), F.linear(x, w.float()), atol=1e-5, name="mixed panels")


def test_the_projection_runs_on_panels_that_follow_the_embedding(monkeypatch):
    """Inference rows' logits come from a packed copy of the embedding (300 ids: 19 panels, the last padded), cut
    to the vocabulary, however many rows (the kernel runs chunks of 512: each row's logits are the ones it has
    alone); an in-place update of the embedding reaches it."""
    from janus.config import preset
    from janus.model import JanusModel

    torch.manual_seed(1)
    model = JanusModel(preset("tiny", vocab_size=300)).eval()
    seen = []
    real = torch.ops.janus.skinny_linear
    monkeypatch.setattr(torch.ops.janus, "skinny_linear", lambda *a: seen.append(a[1].shape) or real(*a),
                        raising=False)  # fmt: skip
    h, w = torch.randn(5, model.cfg.d_model), model.embed.weight
    with torch.no_grad():
        first = model.project(h)
        assert first.shape == (5, 300) and seen == [(19, model.cfg.d_model, PANEL)]
        assert_within_baseline(first, exact(h, w.detach(), None), F.linear(h, w.detach()))
        w.mul_(-2.0)
        second = model.project(h)
    assert_within_baseline(second, exact(h, w.detach(), None), F.linear(h, w.detach()))
    with torch.no_grad():
        assert model.project(torch.randn(40, model.cfg.d_model)).shape == (40, 300)  # a beam step of a batch
        assert len(seen) == 3
        many = torch.randn(1100, model.cfg.d_model)
        logits = model.project(many)
        assert logits.shape == (1100, 300) and len(seen) == 4
        for r in (0, 511, 512, 1023, 1024, 1099):  # either side of the chunks' edges
            assert torch.equal(logits[r], model.project(many[r : r + 1])[0])
    assert len(seen) == 10
    model.train()
    with torch.no_grad():
        model.project(h)  # the model in training mode still projects on panels without autograd
    assert len(seen) == 11
    assert model.project(h).requires_grad and len(seen) == 11  # with autograd: torch's, differentiable


def test_a_bfloat16_models_logits_are_float32_whatever_the_batch():
    """Where the CPU's bf16 dot products run them (and it has no AMX), every inference row of a bf16 model is
    projected to fp32 logits on the bf16 panels: the exact products' sums to fp32 rounding, each row's the ones it
    has alone, across the kernel's chunks of 512 rows."""
    from janus.config import preset
    from janus.model import JanusModel

    if panel_rows(torch.bfloat16) < 1100:
        pytest.skip("bf16 rows past 8 go to torch's bf16 GEMM here (no bf16 dot products, or AMX)")
    torch.manual_seed(2)
    model = JanusModel(preset("tiny", vocab_size=300)).eval().to(torch.bfloat16)
    many = torch.randn(1100, model.cfg.d_model).bfloat16()
    with torch.no_grad():
        logits = model.project(many)
        assert logits.dtype == torch.float32 and logits.shape == (1100, 300)
        for r in (0, 511, 512, 1099):
            assert torch.equal(logits[r], model.project(many[r : r + 1])[0])
    exact = many.double() @ model.embed.weight.detach().double().T
    torch.testing.assert_close(logits.double(), exact, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 4, 10, 13])
def test_float32_rows_by_bfloat16_weights_give_float32(rows):
    """Weight-only bf16 (a bf16 model's logits): the weight widened in registers, products and sums and the
    output in fp32, as F.linear of the widened weight; a row's output does not depend on the other rows."""
    g = torch.Generator().manual_seed(40 + rows)
    x = torch.randn(rows, 200, generator=g)
    w, b = torch.randn(45, 200, generator=g).bfloat16(), torch.randn(45, generator=g).bfloat16()
    out = torch.ops.janus.skinny_linear(x, w, b)
    assert out.dtype == torch.float32 and out.shape == (rows, 45)
    assert_within_baseline(out, exact(x, w, b), F.linear(x, w.float(), b.float()), atol=1e-5, name="mixed")
    assert torch.equal(torch.ops.janus.skinny_linear(x[-1:].contiguous(), w, b), out[-1:])
    with torch.no_grad():
        assert SKINNY_LINEAR.select(x, w, b).name == "cpp"
        assert torch.equal(skinny_linear(x, w, b), out)


def test_without_bias_and_with_leading_dims():
    x, w = torch.randn(2, 3, 64), torch.randn(48, 64)
    out = skinny_linear(x, w)
    assert out.shape == (2, 3, 48)
    assert_within_baseline(out, exact(x, w, None), F.linear(x, w))


def test_empty_inputs():
    assert torch.ops.janus.skinny_linear(torch.randn(0, 16), torch.randn(5, 16), None).shape == (0, 5)
    assert torch.ops.janus.skinny_linear(torch.randn(3, 16), torch.randn(0, 16), None).shape == (3, 0)


def test_result_does_not_depend_on_the_thread_count():
    x, w, b = torch.randn(6, 512).bfloat16(), torch.randn(3000, 512).bfloat16(), torch.randn(3000).bfloat16()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.janus.skinny_linear(x, w, b)
        torch.set_num_threads(2)
        two = torch.ops.janus.skinny_linear(x, w, b)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_result_does_not_depend_on_the_other_rows(dtype):
    """Tiles of up to 4 input rows: a row's output is the same bits alone, in a group of 4, or after
    other rows (decoding's batch invariance rests on it)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(11, 200, generator=g).to(dtype)
    w, b = torch.randn(45, 200, generator=g).to(dtype), torch.randn(45, generator=g).to(dtype)
    full = torch.ops.janus.skinny_linear(x, w, b)
    for rows in (slice(0, 1), slice(3, 4), slice(2, 5), slice(7, 11), slice(5, 11), slice(1, 6), slice(0, 10)):
        assert torch.equal(torch.ops.janus.skinny_linear(x[rows].contiguous(), w, b), full[rows]), rows


def test_nan_propagates():
    x, w = torch.randn(2, 32), torch.randn(4, 32)
    w[1, 3] = float("nan")
    out = torch.ops.janus.skinny_linear(x, w, None)
    assert out[:, 1].isnan().all() and not out[:, [0, 2, 3]].isnan().any()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="x must be \\(M, K\\)"):
        torch.ops.janus.skinny_linear(torch.randn(2, 3, 4), torch.randn(5, 4), None)
    with pytest.raises(RuntimeError, match="must have x's dtype"):
        torch.ops.janus.skinny_linear(torch.randn(2, 4).bfloat16(), torch.randn(5, 4), None)
    with pytest.raises(ValueError, match="bias must be \\(5,\\) of the weight's dtype"):
        torch.ops.janus.skinny_linear(torch.randn(2, 4), torch.randn(5, 4).bfloat16(), torch.randn(5))
    with pytest.raises(ValueError, match="x has 4 columns, weight 3"):
        torch.ops.janus.skinny_linear(torch.randn(2, 4), torch.randn(5, 3), None)
    with pytest.raises(ValueError, match="bias must be \\(5,\\)"):
        torch.ops.janus.skinny_linear(torch.randn(2, 4), torch.randn(5, 4), torch.randn(4))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.janus.skinny_linear(torch.randn(2, 4).double(), torch.randn(5, 4).double(), None)
    with pytest.raises(ValueError, match=r"a packed weight must be \(N / 16, K, 16\), got \[2, 4, 8\]"):
        torch.ops.janus.skinny_linear(torch.randn(2, 4), torch.randn(2, 4, 8), None)
    with pytest.raises(ValueError, match="x has 4 columns, weight 5"):
        torch.ops.janus.skinny_linear(torch.randn(2, 4), torch.randn(2, 5, 16), None)
    with pytest.raises(ValueError, match=r"bias must be \(32,\)"):
        torch.ops.janus.skinny_linear(torch.randn(2, 4), torch.randn(2, 4, 16), torch.randn(30))


def test_dispatch_sends_what_the_kernel_cannot_take_to_the_reference():
    w = torch.randn(5, 4, requires_grad=True)
    x = torch.randn(2, 4)
    assert _fits_cpp(x.double(), w.detach().double())[0] is False
    assert _fits_cpp(x.half(), w.detach().half())[0] is False
    assert _fits_cpp(x, w)[0] is False  # autograd wants a backward the kernel lacks
    with torch.no_grad():
        assert _fits_cpp(x, w)[0] is True
        assert SKINNY_LINEAR.select(x, w).name == "cpp"
    out = skinny_linear(x, w)  # through the reference, with its gradient
    out.sum().backward()
    assert w.grad is not None


def test_forcing_the_reference_is_honoured_by_the_checked_entry(monkeypatch):
    x, w = torch.randn(2, 64).bfloat16(), torch.randn(48, 64).bfloat16()
    monkeypatch.setenv("JANUS_BACKEND_SKINNY_LINEAR", "reference")
    assert torch.equal(skinny_linear_checked(x, w), F.linear(x, w))


def test_opcheck():
    args = (torch.randn(3, 40), torch.randn(9, 40), torch.randn(9))
    torch.library.opcheck(torch.ops.janus.skinny_linear.default, args)
    packed = (torch.randn(3, 40), pack_panels(torch.randn(9, 40)), torch.randn(16))
    torch.library.opcheck(torch.ops.janus.skinny_linear.default, packed)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_decoder_step_through_the_kernel_equals_the_reference(monkeypatch, dtype, tol):
    """The model routes a step's few fp32 or bf16 rows through the kernel; its hidden states and logits
    agree with the same step through F.linear to the dtype's rounding. (The model's own layers: fp32 steps
    otherwise run through janus.ops.decoder_step, tests/test_ops_decoder_step.py.)"""
    from janus.config import preset
    from janus.model import JanusModel, KVCache

    monkeypatch.setenv("JANUS_BACKEND_DECODER_STEP", "reference")
    torch.manual_seed(0)
    model = JanusModel(preset("tiny", vocab_size=300)).eval().to(dtype)
    src = torch.randint(5, 300, (2, 9))
    calls = []
    real = torch.ops.janus.skinny_linear

    def counted(*args):
        calls.append(1)
        return real(*args)

    def step(force: str):
        monkeypatch.setenv("JANUS_BACKEND_SKINNY_LINEAR", force)
        with torch.no_grad():
            enc = model.encode(src)
            cache = KVCache(capacity=4)
            last = torch.full((2,), model.cfg.specials.bos)
            h1 = model.decode_ar_step(last, enc, cache)
            h2 = model.decode_ar_step(torch.tensor([7, 9]), enc, cache)
            return torch.cat([h1, h2]).float(), model.project(h2).float()

    monkeypatch.setattr(torch.ops.janus, "skinny_linear", counted, raising=False)
    monkeypatch.setattr("janus.model.SKINNY_MIN_WEIGHT", 0)  # the tiny preset's weights are all small
    kernel = step("cpp")
    assert calls, f"the {dtype} step did not use the kernel"
    reference = step("reference")
    for a, r in zip(kernel, reference):
        torch.testing.assert_close(a, r, rtol=tol, atol=tol)


def test_small_weights_stay_with_torch(monkeypatch):
    """Inference rows meet the kernel only where the weight has MIN_WEIGHT elements or more."""
    from janus.model import infer_linear
    from janus.ops.skinny_linear import MIN_WEIGHT

    calls = []
    real = torch.ops.janus.skinny_linear
    monkeypatch.setattr(torch.ops.janus, "skinny_linear", lambda *a: calls.append(a[1].numel()) or real(*a),
                        raising=False)  # fmt: skip
    x = torch.randn(2, 128)
    with torch.no_grad():
        small, large = torch.randn(512, 128), torch.randn(MIN_WEIGHT // 128, 128)
        torch.testing.assert_close(infer_linear(x, small, None), x @ small.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(infer_linear(x, large, None), x @ large.T, rtol=1e-5, atol=1e-4)
    assert calls == [MIN_WEIGHT]
