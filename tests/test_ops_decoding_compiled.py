"""The compiled mask-predict ops (csrc/: length_beam_init, remask_lowest) against their references.

tests/test_ops_decoding.py already holds every available backend, these included, to the
ops' contracts through plain-Python oracles. Here the compiled ops (torch.ops.janus.*)
are compared directly with the PyTorch references on what the oracles do not reach
(NaN, fp64 near-ties, int32 ids, strided views, check=False), checked with
``torch.library.opcheck`` and traced by torch.compile, fuzzed with hypothesis for
crashes and out-of-bounds writes, and shown to be what mask-predict dispatches to.

Each test runs on the CPU kernel and, marked ``gpu``, on the CUDA kernel. Tests skip
without the compiled ops and fail instead when JANUS_REQUIRE_EXT=1 (CI).
"""

from __future__ import annotations

import pytest
import torch
from ext_helpers import require_kernel
from hypothesis import given, settings
from hypothesis import strategies as st

from janus.config import preset
from janus.decoding import mask_predict
from janus.model import JanusModel
from janus.ops import length_beam_init, length_beam_init_ref, remask_lowest, remask_lowest_ref
from janus.ops.length_beam_init import CUDA_MAX_COLUMNS, LENGTH_BEAM_INIT
from janus.ops.remask_lowest import CUDA_MAX_LENGTH, REMASK_LOWEST

PAD, BOS, EOS, UNK, MASK = 0, 1, 2, 3, 4
INF, NAN = float("inf"), float("nan")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
SCORE_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

pytestmark = pytest.mark.cpp


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """A device whose kernels of both ops are compiled and loaded (else skip, or fail in CI)."""
    for op in ("length_beam_init", "remask_lowest"):
        require_kernel(op, request.param)
    return request.param


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of a float tensor, so that NaN == NaN and -0.0 != 0.0 in comparisons."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def lengths_op(scores, beam, min_len, max_len):
    """The compiled length_beam_init (an int max_len becomes a CPU scalar, as the dispatch passes it)."""
    if not isinstance(max_len, torch.Tensor):
        max_len = torch.tensor(max_len)
    return torch.ops.janus.length_beam_init(scores, beam, min_len, max_len, BOS, EOS, MASK, PAD)


def assert_lengths_match(scores, beam, min_len, max_len):
    tokens, lengths = lengths_op(scores, beam, min_len, max_len)
    want_tokens, want_lengths = length_beam_init_ref(scores.cpu(), beam, min_len, cpu(max_len), BOS, EOS, MASK, PAD)
    assert tokens.device == scores.device and lengths.device == scores.device
    assert tokens.dtype == torch.int64 and lengths.dtype == torch.int64
    assert torch.equal(lengths.cpu(), want_lengths)
    assert torch.equal(tokens.cpu(), want_tokens)


def cpu(x):
    return x.cpu() if isinstance(x, torch.Tensor) else x


def canvases(R: int, L: int, g: torch.Generator) -> torch.Tensor:
    """Random rows of word ids with pad/bos/eos scattered anywhere (ids 0..8 are drawn often)."""
    tokens = torch.randint(0, 40, (R, L), generator=g)
    few = torch.rand(R, L, generator=g) < 0.5
    tokens[few] = torch.randint(0, 9, (int(few.sum()),), generator=g)
    return tokens


def remaskable(tokens: torch.Tensor) -> torch.Tensor:
    return ((tokens != PAD) & (tokens != BOS) & (tokens != EOS)).sum(1)


def assert_remask_matches(tokens, scores, counts, check=True):
    """The compiled op on (tokens, scores, counts) equals the reference on copies, bit for bit."""
    want_t, want_s = remask_lowest_ref(
        tokens.cpu().clone(), scores.cpu().clone(), counts.cpu(), MASK, PAD, BOS, EOS, check
    )
    torch.ops.janus.remask_lowest(tokens, scores, counts, MASK, PAD, BOS, EOS, check)
    assert torch.equal(tokens.cpu(), want_t)
    assert torch.equal(bits(scores.cpu()), bits(want_s))


# ------------------------------------------------------------------------- length_beam_init


@pytest.mark.parametrize("dtype", SCORE_DTYPES, ids=str)
@pytest.mark.parametrize("B,C", [(1, 4), (7, 67), (123, 5), (64, 256)])
def test_length_beam_init_equals_the_reference(device, dtype, B, C):
    g = torch.Generator().manual_seed(B * 1000 + C)
    smooth = torch.randn(B, C, generator=g).log_softmax(-1)
    tied = torch.randint(-3, 1, (B, C), generator=g).float()
    special = smooth.clone()
    special[torch.rand(B, C, generator=g) < 0.1] = NAN  # NaN ranks above every number, like torch.sort
    special[torch.rand(B, C, generator=g) < 0.1] = -INF
    special[torch.rand(B, C, generator=g) < 0.05] = INF
    per_row = torch.randint(0, C + 3, (B,), generator=g)
    for scores in (smooth, tied, special):
        scores = scores.to(dtype).to(device)
        for beam, min_len, max_len in [
            (1, 2, C - 1),
            (3, 2, per_row.to(device)),
            (5, min(3, C - 1), per_row.to(device, torch.int32)),
            (C + 2, 2, C // 2),
            (3, C - 1, torch.tensor([C + 5], device=device)),  # one entry, broadcast
        ]:
            assert_lengths_match(scores, beam, min_len, max_len)


def test_length_beam_init_compares_fp64_scores_without_rounding(device):
    # 1 + 2^-40 and 1 are equal in fp32: rounded, the shorter length would win the tie.
    scores = torch.tensor([[0.0, 0.0, 1.0, 1.0 + 2.0**-40, 0.5]], dtype=torch.float64, device=device)
    _, lengths = lengths_op(scores, 2, 2, 4)
    assert lengths.tolist() == [3, 2]
    assert_lengths_match(scores, 3, 2, 4)


def test_length_beam_init_without_sentences(device):
    tokens, lengths = lengths_op(torch.zeros(0, 9, device=device), 3, 2, 8)
    assert tokens.shape == (0, 2) and lengths.shape == (0,)
    assert_lengths_match(torch.zeros(0, 9, device=device), 3, 2, 8)


def test_length_beam_init_errors_are_clear(device):
    scores = torch.zeros(3, 8, device=device)
    cases = [
        ((scores[0], 2, 2, 5), ValueError, r"length_scores must be \(B, C\), got shape \[8\]"),
        ((scores, 0, 2, 5), ValueError, r"beam=0 must be >= 1"),
        ((scores, 2, 1, 5), ValueError, r"min_len=1 must be in \[2, 7\]"),
        ((scores, 2, 8, 5), ValueError, r"min_len=8 must be in \[2, 7\]"),
        ((scores, 2, 2, torch.tensor([5, 6], device=device)), ValueError, r"max_len must be a scalar or hold one"),
        ((scores, 2, 2, torch.tensor(5.0, device=device)), RuntimeError, r"max_len must be int32 or int64, got Float"),
        ((scores.long(), 2, 2, 5), RuntimeError, r"length_scores must be float, double, half or bfloat16, got Long"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            lengths_op(*args)


# ---------------------------------------------------------------------------- remask_lowest


@pytest.mark.parametrize("dtype", SCORE_DTYPES, ids=str)
@pytest.mark.parametrize("R,L", [(1, 2), (7, 3), (123, 65), (192, 64), (3, 1000)])
def test_remask_lowest_equals_the_reference(device, dtype, R, L):
    g = torch.Generator().manual_seed(R * 1000 + L)
    tokens = canvases(R, L, g)
    available = remaskable(tokens)
    smooth = torch.randn(R, L, generator=g)
    tied = -torch.randint(0, 3, (R, L), generator=g).float()
    special = smooth.clone()
    special[torch.rand(R, L, generator=g) < 0.1] = NAN  # NaN ranks above every number: re-masked last
    special[torch.rand(R, L, generator=g) < 0.1] = -INF
    special[torch.rand(R, L, generator=g) < 0.1] = INF
    special[torch.rand(R, L, generator=g) < 0.1] = -0.0
    for scores in (smooth, tied, special):
        for counts in (available, available // 2, torch.zeros_like(available), (available - 1).clamp_min(0)):
            # Copies: the op works in place, and .to() of a CPU tensor to the CPU is the tensor itself.
            assert_remask_matches(tokens.to(device, copy=True), scores.to(device, dtype, copy=True), counts.to(device))


@pytest.mark.parametrize("token_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("count_dtype", [torch.int32, torch.int64], ids=str)
def test_remask_lowest_index_dtypes(device, token_dtype, count_dtype):
    g = torch.Generator().manual_seed(3)
    tokens = canvases(17, 33, g)
    scores = torch.randn(17, 33, generator=g).to(device)
    counts = (remaskable(tokens) * 2 // 3).to(device, count_dtype)
    assert_remask_matches(tokens.to(device, token_dtype, copy=True), scores, counts)


def test_remask_lowest_writes_through_strided_views(device):
    g = torch.Generator().manual_seed(4)
    R, L = 9, 21
    tokens = canvases(R, L, g)
    scores = torch.randn(R, L, generator=g)
    counts = remaskable(tokens) // 2
    want_t, want_s = remask_lowest_ref(tokens.clone(), scores.clone(), counts, MASK, PAD, BOS, EOS)
    # Column-major views, and views into the middle of larger buffers: only the view changes.
    token_buffer = torch.full((L + 4, 2 * R + 3), -7, dtype=torch.int64)
    score_buffer = torch.full((L + 4, 2 * R + 3), 99.0)
    t_view = token_buffer.to(device)[2 : L + 2, 1 : 2 * R + 1 : 2].t()
    s_view = score_buffer.to(device)[2 : L + 2, 1 : 2 * R + 1 : 2].t()
    t_view.copy_(tokens)
    s_view.copy_(scores)
    t_base, s_base = t_view._base, s_view._base
    assert not t_view.is_contiguous() and not s_view.is_contiguous()
    torch.ops.janus.remask_lowest(t_view, s_view, counts.to(device), MASK, PAD, BOS, EOS)
    assert torch.equal(t_view.cpu(), want_t) and torch.equal(s_view.cpu(), want_s)
    outside = torch.ones(L + 4, 2 * R + 3, dtype=torch.bool)
    outside[2 : L + 2, 1 : 2 * R + 1 : 2] = False
    assert bool((t_base.cpu()[outside] == -7).all()) and bool((s_base.cpu()[outside] == 99.0).all())


def test_remask_lowest_without_check_clamps_counts(device):
    g = torch.Generator().manual_seed(5)
    tokens = canvases(8, 12, g)
    scores = torch.rand(8, 12, generator=g) + 0.5  # no score is 0: a re-masked slot is recognisable by its 0
    available = remaskable(tokens)
    counts = torch.tensor([-3, 0, 1, 100]).repeat(2)
    assert bool((counts > available).any())
    assert_remask_matches(tokens.to(device, copy=True), scores.to(device, copy=True), counts.to(device), check=False)
    t, s = remask_lowest_ref(tokens.clone(), scores.clone(), counts, MASK, PAD, BOS, EOS, check=False)
    assert torch.equal(((t == MASK) & (s == 0)).sum(1), torch.minimum(counts.clamp_min(0), available))


def test_remask_lowest_errors_are_clear_and_write_nothing(device):
    g = torch.Generator().manual_seed(6)
    tokens = canvases(6, 10, g).to(device)
    scores = torch.randn(6, 10, generator=g).to(device)
    available = remaskable(tokens.cpu())
    before_t, before_s = tokens.clone(), scores.clone()
    for row, count in [(3, int(available[3]) + 1), (5, -1), (0, 1000)]:
        counts = (available // 2).to(device)
        counts[row] = count
        message = rf"counts\[{row}\]={count} is outside \[0, {int(available[row])}\].* of row {row}"
        with pytest.raises(ValueError, match=message):
            torch.ops.janus.remask_lowest(tokens, scores, counts, MASK, PAD, BOS, EOS)
        assert torch.equal(tokens, before_t) and torch.equal(bits(scores), bits(before_s))
    bad = [
        ((tokens, scores[:, :-1], available.to(device)), ValueError, r"must be \(R, L\)"),
        ((tokens, scores, available[:-1].to(device)), ValueError, r"counts \[5\] must be \(R,\)"),
        ((tokens.float(), scores, available.to(device)), RuntimeError, r"tokens must be int32 or int64, got Float"),
        ((tokens, scores.long(), available.to(device)), RuntimeError, r"scores must be float, double, half"),
        ((tokens, scores, available.float().to(device)), RuntimeError, r"counts must be int32 or int64, got Float"),
    ]
    for args, error, message in bad:
        with pytest.raises(error, match=message):
            torch.ops.janus.remask_lowest(*args, MASK, PAD, BOS, EOS)


@pytest.mark.gpu
def test_cuda_kernels_refuse_mixed_devices_and_too_long_rows():
    require_kernel("remask_lowest", "cuda")
    tokens = torch.full((2, 5), 9, device="cuda")
    scores = torch.zeros(2, 5, device="cuda")
    with pytest.raises(RuntimeError, match="must be on one CUDA device"):
        torch.ops.janus.remask_lowest(tokens, scores, torch.ones(2, dtype=torch.long), MASK, PAD, BOS, EOS)
    long_rows = torch.full((1, CUDA_MAX_LENGTH + 1), 9, device="cuda")
    with pytest.raises(ValueError, match=f"at most {CUDA_MAX_LENGTH} tokens"):
        torch.ops.janus.remask_lowest(long_rows, long_rows.float(), torch.ones(1, device="cuda", dtype=torch.long),
                                      MASK, PAD, BOS, EOS)  # fmt: skip
    # The dispatch sends such rows elsewhere instead: the reference (or the CPU kernel for CPU tensors).
    assert REMASK_LOWEST.select(long_rows, long_rows.float(), torch.ones(1, device="cuda"), 4, 0, 1, 2).name != "cuda"
    wide = torch.zeros(2, CUDA_MAX_COLUMNS + 1, device="cuda")
    assert LENGTH_BEAM_INIT.select(wide, 3, 2, 10, BOS, EOS, MASK, PAD).name != "cuda"
    with pytest.raises(RuntimeError, match="must be on"):
        lengths_op(torch.zeros(2, 9, device="cuda"), 2, 2, torch.tensor([5, 6]))


# ------------------------------------------------------------------ opcheck and torch.compile


def test_opcheck(device):
    g = torch.Generator().manual_seed(7)
    scores = torch.randn(5, 17, generator=g).to(device)
    for max_len in (torch.tensor(12), torch.tensor([3, 16, 30, 9, 2]).to(device)):
        torch.library.opcheck(torch.ops.janus.length_beam_init.default, (scores, 3, 2, max_len, BOS, EOS, MASK, PAD))
    tokens = canvases(6, 13, g).to(device)
    counts = (remaskable(tokens.cpu()) // 2).to(device)
    for check in (True, False):
        torch.library.opcheck(
            torch.ops.janus.remask_lowest.default,
            (tokens.clone(), torch.randn(6, 13, generator=g).to(device), counts, MASK, PAD, BOS, EOS, check),
        )


def test_torch_compile_traces_both_ops(device):
    def first_pass(length_scores, max_len, scores, counts):
        # length beam -> canvases; "predict" by copying scores in; re-mask the lowest.
        tokens, lengths = torch.ops.janus.length_beam_init(length_scores, 2, 2, max_len, BOS, EOS, MASK, PAD)
        tokens = torch.where(tokens == MASK, 10 + lengths[:, None], tokens)
        scores = scores[:, : tokens.shape[1]].clone()
        torch.ops.janus.remask_lowest(tokens, scores, counts, MASK, PAD, BOS, EOS, False)
        return tokens, scores, lengths

    g = torch.Generator().manual_seed(8)
    length_scores = torch.randn(3, 12, generator=g).to(device)
    max_len = torch.tensor([11, 6, 9]).to(device)
    scores = torch.randn(6, 12, generator=g).to(device)
    counts = torch.tensor([1, 0, 2, 3, 9, 1]).to(device)
    eager = first_pass(length_scores, max_len, scores, counts)
    compiled = torch.compile(first_pass, backend="aot_eager", fullgraph=True)(length_scores, max_len, scores, counts)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------- fuzzing


@settings(max_examples=150, deadline=None)
@given(
    B=st.integers(0, 9),
    C=st.integers(3, 70),
    beam=st.integers(1, 80),
    data=st.data(),
    dtype=st.sampled_from(SCORE_DTYPES),
    values=st.lists(st.sampled_from([0.0, -1.0, -0.5, -INF, INF, NAN, 2.0, -0.0]), min_size=1, max_size=8),
)
def test_fuzz_length_beam_init(B, C, beam, data, dtype, values):
    require_kernel("length_beam_init", "cpu")
    min_len = data.draw(st.integers(2, C - 1))
    per_row = data.draw(st.booleans())
    g = torch.Generator().manual_seed(B * 7919 + C * 31 + beam)
    pool = torch.tensor(values)
    scores = pool[torch.randint(0, len(values), (B, C), generator=g)].to(dtype)
    max_len = torch.randint(-2, C + 6, (B,) if per_row else (), generator=g)
    assert_lengths_match(scores, beam, min_len, max_len)


@settings(max_examples=150, deadline=None)
@given(
    R=st.integers(0, 12),
    L=st.integers(0, 70),
    dtype=st.sampled_from(SCORE_DTYPES),
    check=st.booleans(),
    shift=st.integers(-2, 2),
    data=st.data(),
)
def test_fuzz_remask_lowest_never_writes_out_of_bounds(R, L, dtype, check, shift, data):
    require_kernel("remask_lowest", "cpu")
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    tokens = canvases(R, L, g)
    scores = (torch.randn(R, L, generator=g) * 2).round().to(dtype)  # ties
    scores[torch.rand(R, L, generator=g) < 0.05] = NAN
    available = remaskable(tokens)
    counts = (torch.rand(R, generator=g) * (available + 1)).long() + shift * (torch.rand(R, generator=g) < 0.3)
    # The canvases live inside guarded buffers: nothing outside them may change.
    t_buf = torch.full((R + 2, L + 3), -5, dtype=torch.int64)
    s_buf = torch.full((R + 2, L + 3), 77.0, dtype=dtype)
    t, s = t_buf[1 : R + 1, 2 : L + 2], s_buf[1 : R + 1, 2 : L + 2]
    t.copy_(tokens)
    s.copy_(scores)
    out_of_range = bool(((counts < 0) | (counts > available)).any())
    if check and out_of_range:
        with pytest.raises(ValueError, match=r"counts\[\d+\]=-?\d+ is outside"):
            torch.ops.janus.remask_lowest(t, s, counts, MASK, PAD, BOS, EOS, check)
        assert torch.equal(t, tokens) and torch.equal(bits(s), bits(scores))
    else:
        want_t, want_s = remask_lowest_ref(tokens.clone(), scores.clone(), counts, MASK, PAD, BOS, EOS, check)
        torch.ops.janus.remask_lowest(t, s, counts, MASK, PAD, BOS, EOS, check)
        assert torch.equal(t, want_t) and torch.equal(bits(s), bits(want_s))
    inside = torch.zeros(R + 2, L + 3, dtype=torch.bool)
    inside[1 : R + 1, 2 : L + 2] = True
    assert bool((t_buf[~inside] == -5).all()) and bool((s_buf[~inside] == 77.0).all())


# -------------------------------------------------------------------------------- dispatch


def test_dispatch_picks_the_compiled_kernels_for_this_device(device):
    scores = torch.zeros(2, 9, device=device)
    tokens = torch.full((2, 9), 9, device=device)
    counts = torch.ones(2, dtype=torch.long, device=device)
    name = "cpp" if device == "cpu" else "cuda"
    assert LENGTH_BEAM_INIT.select(scores, 2, 2, 8, BOS, EOS, MASK, PAD).name == name
    assert REMASK_LOWEST.select(tokens, scores, counts, MASK, PAD, BOS, EOS, True).name == name
    # The public functions return the op's results; remask_lowest hands back its (updated) inputs.
    out_t, out_s = remask_lowest(tokens, scores, counts, MASK, PAD, BOS, EOS)
    assert out_t is tokens and out_s is scores and int((tokens == MASK).sum()) == 2
    assert length_beam_init(scores, 2, 2, 8, BOS, EOS, MASK, PAD)[0].shape == (4, 3)


def test_mask_predict_runs_on_the_compiled_ops_and_matches_the_reference(device, monkeypatch):
    torch.manual_seed(0)
    model = JanusModel(preset("tiny", vocab_size=40, dropout=0.0)).eval().to(device)
    with torch.no_grad():
        model.embed.weight.mul_(15)  # peaked outputs: re-masking decisions matter
    g = torch.Generator().manual_seed(1)
    src = torch.randint(5, 40, (6, 9), generator=g)
    src[:, -1] = EOS
    src[2, 4:] = PAD
    src[2, 4] = EOS
    src = src.to(device)
    used, calls = [], []
    for op in (LENGTH_BEAM_INIT, REMASK_LOWEST):
        select = op.select

        def spy(*args, _select=select, _op=op, **kwargs):
            backend = _select(*args, **kwargs)
            used.append(backend.name)
            calls.append(_op)
            return backend

        monkeypatch.setattr(op, "select", spy)
    fast = mask_predict(model, src, iterations=4, length_beam=3)
    assert set(used) == {"cpp" if device == "cpu" else "cuda"}
    # One length beam for the batch, then T - 1 re-masks per group of canvases of one width.
    remasks = calls.count(REMASK_LOWEST)
    assert calls.count(LENGTH_BEAM_INIT) == 1 and remasks > 0 and remasks % 3 == 0
    monkeypatch.setenv("JANUS_BACKEND", "reference")
    used.clear()
    slow = mask_predict(model, src, iterations=4, length_beam=3)
    assert set(used) == {"reference"}
    assert [h.ids for h in fast] == [h.ids for h in slow]
    # JANUS_BACKEND=reference also swaps the decoder_step kernel (CPU) and the Triton mask_predict_update
    # (CUDA) for torch's layers and log-softmax: the same tokens, log-probabilities that differ in the last bits.
    assert [h.score for h in fast] == pytest.approx([h.score for h in slow], rel=1e-5, abs=1e-5)
