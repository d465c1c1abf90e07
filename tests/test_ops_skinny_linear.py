"""skinny_linear (csrc/cpu/skinny_linear.cpp) against F.linear: every row count of its row groups, odd
shapes, bf16, no bias; thread-count invariance; named errors; dispatch; and the model's bf16 decoder
step through it equal to the step through the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ext_helpers import require_kernel
from tolerances import assert_within_baseline

from janus.ops.skinny_linear import SKINNY_LINEAR, _fits_cpp, skinny_linear, skinny_linear_checked


@pytest.fixture(autouse=True)
def _kernel():
    require_kernel("skinny_linear", "cpu")


def exact(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 11, 12, 13, 25])
def test_matches_f_linear_for_every_row_group(rows, dtype):
    """Rows 1-12 are one pass each (their own accumulator layouts), 13 and 25 split into passes of 12."""
    g = torch.Generator().manual_seed(rows)
    for n, k in ((37, 512), (64, 48), (7, 33)):  # odd output counts, a K tail below 16 lanes
        x = torch.randn(rows, k, generator=g).to(dtype)
        w = torch.randn(n, k, generator=g).to(dtype)
        b = torch.randn(n, generator=g).to(dtype)
        out = torch.ops.janus.skinny_linear(x, w, b)
        assert out.dtype == dtype and out.shape == (rows, n)
        assert_within_baseline(out, exact(x, w, b), F.linear(x, w, b), atol=1e-5, name=f"{n}x{k}")


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


def test_nan_propagates():
    x, w = torch.randn(2, 32), torch.randn(4, 32)
    w[1, 3] = float("nan")
    out = torch.ops.janus.skinny_linear(x, w, None)
    assert out[:, 1].isnan().all() and not out[:, [0, 2, 3]].isnan().any()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="x must be \\(M, K\\)"):
        torch.ops.janus.skinny_linear(torch.randn(2, 3, 4), torch.randn(5, 4), None)
    with pytest.raises(RuntimeError, match="must have x's dtype"):
        torch.ops.janus.skinny_linear(torch.randn(2, 4), torch.randn(5, 4).bfloat16(), None)
    with pytest.raises(ValueError, match="x has 4 columns, weight 3"):
        torch.ops.janus.skinny_linear(torch.randn(2, 4), torch.randn(5, 3), None)
    with pytest.raises(ValueError, match="bias must be \\(5,\\)"):
        torch.ops.janus.skinny_linear(torch.randn(2, 4), torch.randn(5, 4), torch.randn(4))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.janus.skinny_linear(torch.randn(2, 4).double(), torch.randn(5, 4).double(), None)


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


def test_bf16_decoder_step_through_the_kernel_equals_the_reference(monkeypatch):
    """The model routes a bf16 step's few rows through the kernel; its hidden states agree with the same
    step through F.linear to bf16 rounding."""
    from janus.config import preset
    from janus.model import JanusModel, KVCache

    torch.manual_seed(0)
    model = JanusModel(preset("tiny", vocab_size=300)).eval().to(torch.bfloat16)
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
    kernel = step("cpp")
    assert calls, "the bf16 step did not use the kernel"
    reference = step("reference")
    for a, r in zip(kernel, reference):
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2)
