"""The Triton kernel of mask_predict_update (kernels/mask_predict_update.py) against mask_predict_update_ref.

Accuracy follows the flash-attention rule: against log-probabilities computed in fp64 from the
same inputs, the kernel's scores may be off by at most twice the plain-PyTorch reference's error
in the inputs' precision, plus a small atol. Tokens must equal the reference's except at near-ties
(where the two choices' fp64 log-probabilities are within the dtype's tie tolerance), and equal the
fp64 argmax except at such near-ties.

On a CPU-only torch the kernel runs in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so the shapes stay small. Each accuracy test also runs with the small
blocks used on a GPU (BLOCK_V 128, BLOCK_D 16: several blocks of ids and of D) and with the
vocabulary split over several programs, so that every code path runs here too.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from janus.ops import mask_predict_update_ref, registry

pytestmark = pytest.mark.triton

PAD, BOS, EOS, UNK, MASK = 0, 1, 2, 3, 4
SPECIALS = [PAD, BOS, EOS, MASK]

# Keyword arguments of the launcher: its own choice, the GPU's small blocks, and those with split vocabularies.
CONFIGS = [
    pytest.param({}, id="default"),
    pytest.param({"blocks": (16, 128, 16)}, id="small-blocks"),
    pytest.param({"blocks": (16, 128, 16), "splits": 3}, id="splits"),
]
# Near-tie tolerance per input dtype: two tokens whose fp64 log-probabilities differ by less may swap.
TIE = {torch.float32: 1e-4, torch.float16: 1.5e-2, torch.bfloat16: 1e-1, torch.float64: 1e-4}
# The atol of the accuracy rule per input dtype.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3, torch.float64: 1e-5}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def device() -> str:
    """CPU tensors under the interpreter, else CUDA; decided when a test runs, not at collection."""
    if interpreting():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("needs a CUDA device, or TRITON_INTERPRET=1 to interpret the kernel on the CPU")


@pytest.fixture
def launch():
    pytest.importorskip("triton")
    from janus.kernels.mask_predict_update import mask_predict_update_triton

    return mask_predict_update_triton


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def make_inputs(R, L, V, D, *, seed, masked=0.5, scale=1.0, dtype=torch.float32, device="cpu"):
    """hidden (R, L, D) and weight (V, D) in ``dtype``, canvases with about ``masked`` of the slots <mask>
    (specials at some unmasked ones), random fp32 scores."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(R, L, D, generator=g) * scale).to(dtype)
    weight = torch.randn(V, D, generator=g).to(dtype)
    tokens = torch.randint(0, V, (R, L), generator=g)
    tokens[tokens == MASK] = UNK
    tokens[torch.rand(R, L, generator=g) < masked] = MASK
    scores = torch.randn(R, L, generator=g)
    return [x.to(device) for x in (hidden, weight, tokens, scores)]


def fp64_logp(hidden: torch.Tensor, weight: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """(M, V) fp64 log-probabilities of the masked slots, from the given (upcast) inputs."""
    h = hidden[masked].double()  # (M, D)
    return F.log_softmax(h @ weight.double().T, dim=-1)


def check(launch, hidden, weight, tokens, scores, banned, **config):
    """Run the kernel and the reference on copies; assert the contract and the accuracy rule.
    Returns (kernel tokens, kernel scores, kernel error, reference error)."""
    t_ref, s_ref = mask_predict_update_ref(hidden, weight, tokens.clone(), scores.clone(), MASK, banned)
    t, s = tokens.clone(), scores.clone()
    h_before, w_before = hidden.clone(), weight.clone()
    out_t, out_s = launch(hidden, weight, t, s, MASK, banned, **config)
    assert out_t is t and out_s is s  # in place
    assert torch.equal(hidden, h_before) and torch.equal(weight, w_before)  # only read
    masked = tokens == MASK
    assert torch.equal(t[~masked], tokens[~masked])  # unmasked slots untouched, bit for bit
    assert torch.equal(bits(s[~masked]), bits(scores[~masked]))
    if not bool(masked.any()):
        return t, s, 0.0, 0.0

    tie = TIE[hidden.dtype]
    logp = fp64_logp(hidden, weight, masked)  # (M, V)
    allowed = logp.clone()
    allowed[:, list(banned)] = -math.inf
    best, best_id = allowed.max(dim=-1)
    got, ref = t[masked], t_ref[masked]
    assert not bool(torch.isin(got, torch.tensor(list(banned) or [-1], device=got.device)).any())
    got_logp, ref_logp = logp.gather(1, got[:, None])[:, 0], logp.gather(1, ref[:, None])[:, 0]
    # Tokens: the fp64 argmax and the reference's, except at near-ties.
    off_best = got != best_id
    assert bool((best[off_best] - got_logp[off_best] <= tie).all()), (best - got_logp).max()
    assert int(off_best.sum()) <= max(1, got.numel() // 20)  # near-ties are rare
    off_ref = got != ref  # the reference rounds low-precision logits: more of its choices are near-ties
    assert bool(((got_logp - ref_logp)[off_ref].abs() <= tie).all())
    # Scores: the fp64 log-probability of the chosen token, no worse than 2x the reference + atol.
    err = float((s[masked].double() - got_logp).abs().max())
    err_ref = float((s_ref[masked].double() - ref_logp).abs().max())
    assert err <= 2 * err_ref + ATOL[hidden.dtype], (err, err_ref)
    return t, s, err, err_ref


# ----------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("R,L,V,D", [(5, 7, 1031, 19), (3, 4, 37, 5), (2, 9, 300, 70)])
def test_fp32_matches_the_reference(launch, device, config, R, L, V, D):
    hidden, weight, tokens, scores = make_inputs(R, L, V, D, seed=R * L + V + D, device=device)
    check(launch, hidden, weight, tokens, scores, SPECIALS, **config)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_obeys_the_accuracy_rule(launch, device, config, dtype):
    hidden, weight, tokens, scores = make_inputs(6, 11, 1031, 19, seed=3, scale=0.5, dtype=dtype, device=device)
    _, s, err, err_ref = check(launch, hidden, weight, tokens, scores, SPECIALS, **config)
    assert s.dtype == torch.float32
    assert err_ref > 0  # the rule compares with a real rounding error of the reference


def test_fp64_inputs_and_scores_in_their_own_dtype(launch, device):
    hidden, weight, tokens, scores = make_inputs(4, 6, 1031, 19, seed=4, dtype=torch.float64, device=device)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        t, s, _, _ = check(launch, hidden, weight, tokens, scores.to(dtype), SPECIALS)
        assert s.dtype == dtype


@pytest.mark.parametrize("config", CONFIGS)
def test_one_row(launch, device, config):
    hidden, weight, tokens, scores = make_inputs(1, 13, 1031, 19, seed=5, device=device)
    tokens[0, 0] = MASK
    check(launch, hidden, weight, tokens, scores, SPECIALS, **config)
    tokens.fill_(UNK)
    tokens[0, -1] = MASK  # a single masked slot
    check(launch, hidden, weight, tokens, scores, SPECIALS, **config)


@pytest.mark.parametrize("config", CONFIGS)
def test_everything_masked(launch, device, config):
    hidden, weight, tokens, scores = make_inputs(4, 9, 1031, 19, seed=6, masked=1.0, device=device)
    assert bool((tokens == MASK).all())
    t, _, _, _ = check(launch, hidden, weight, tokens, scores, SPECIALS, **config)
    assert not bool((t == MASK).any())


def test_rows_without_masked_slots_are_untouched(launch, device):
    hidden, weight, tokens, scores = make_inputs(6, 8, 1031, 19, seed=7, device=device)
    tokens[[1, 4]] = UNK  # two rows with nothing masked
    tokens[2, 3] = MASK
    check(launch, hidden, weight, tokens, scores, SPECIALS)

    tokens.fill_(UNK)  # nothing masked at all: nothing is written, not even the same values
    scores[0, 0], scores[1, 1], scores[2, 2] = -0.0, -math.inf, math.nan
    t, s = tokens.clone(), scores.clone()
    out = launch(hidden, weight, t, s, MASK, SPECIALS)
    assert out[0] is t and out[1] is s
    assert torch.equal(t, tokens) and torch.equal(bits(s), bits(scores))


# ------------------------------------------------------------------------------ banned, ties


@pytest.mark.parametrize("config", CONFIGS)
def test_a_banned_best_token_still_counts_in_the_normalisation(launch, device, config):
    R, L, V, D = 4, 6, 1031, 12
    hidden, weight, tokens, scores = make_inputs(R, L, V, D, seed=8, scale=0.2, device=device)
    hidden[..., -1] = 1.0
    weight[:, -1] = 0.0
    weight[900] = 0.0
    weight[900, -1] = 30.0  # id 900: logit 30 at every slot, banned below
    weight[77] = 0.0
    weight[77, -1] = 29.0  # then 77
    banned = [*SPECIALS, 900]
    t, s, _, _ = check(launch, hidden, weight, tokens, scores, banned, **config)
    masked = tokens == MASK
    assert bool((t[masked] == 77).all())
    # log(e^29 / (e^30 + e^29 + the rest)) is about -log(1 + e): banned 900 keeps most of the mass.
    assert float((s[masked] + math.log1p(math.e)).abs().max()) < 1e-3
    # Unbanned, 900 wins with about -log(1 + 1/e).
    t, s, _, _ = check(launch, hidden, weight, tokens, scores, SPECIALS, **config)
    assert bool((t[masked] == 900).all())
    assert float((s[masked] + math.log1p(math.exp(-1))).abs().max()) < 1e-3


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("banned", [[], SPECIALS, [MASK, 130, 17, 130]], ids=["none", "specials", "some"])
def test_exact_ties_go_to_the_smaller_id(launch, device, config, banned):
    # Integer inputs: every logit is exact, and the maximum is shared by several ids, some of them
    # in different blocks of 128 ids and different splits (130, 700, 1029).
    R, L, V, D = 3, 5, 1031, 5
    g = torch.Generator().manual_seed(9)
    hidden = torch.randint(1, 3, (R, L, D), generator=g).float()  # positive: the all-2 rows of weight win
    weight = torch.randint(-2, 2, (V, D), generator=g).float()  # at most 1: no all-2 row by chance
    weight[[1029, 700, 130, 131, MASK]] = 2.0
    tokens = torch.full((R, L), UNK)
    tokens[torch.rand(R, L, generator=g) < 0.7] = MASK
    tokens[:, 0] = MASK
    scores = torch.full((R, L), -7.0)
    hidden, weight, tokens, scores = (x.to(device) for x in (hidden, weight, tokens, scores))
    t, s, err, _ = check(launch, hidden, weight, tokens, scores, banned, **config)
    expected = min(v for v in (MASK, 130, 131, 700, 1029) if v not in banned)
    masked = tokens == MASK
    assert bool((t[masked] == expected).all()), t[masked]
    assert err < 1e-5


def test_ties_between_splits_go_to_the_smaller_id(launch, device):
    # The best logit only at the last id of each split: the first split must win.
    V, D = 128 * 6, 16
    weight = torch.zeros(V, D, device=device)
    weight[[128 * 2 - 1, 128 * 4 - 1, 128 * 6 - 1], 0] = 1.0
    hidden = torch.ones(2, 3, D, device=device)
    tokens = torch.full((2, 3), MASK, device=device)
    scores = torch.zeros(2, 3, device=device)
    for splits, banned in ((3, []), (3, [255]), (2, [255]), (6, [255, 511])):
        t, _, _, _ = check(launch, hidden, weight, tokens, scores, banned, blocks=(16, 128, 16), splits=splits)
        want = min({255, 511, 767} - set(banned))
        assert bool((t == want).all()), (splits, banned, t)


# ---------------------------------------------------------------------------- layouts, errors


@pytest.mark.parametrize("config", CONFIGS)
def test_non_contiguous_inputs(launch, device, config):
    hidden, weight, tokens, scores = make_inputs(4, 14, 1031, 40, seed=10, device=device)
    hidden = hidden[:, ::2, 3:22]  # (4, 7, 19): strided in L, offset and cut in D
    weight = weight[:, 3:22].T.contiguous().T  # (1031, 19) with strides (1, 1031)
    tokens, scores = tokens[:, ::2].contiguous(), scores[:, ::2].contiguous()
    tokens[0, 0] = MASK
    assert not (hidden.is_contiguous() or weight.is_contiguous())
    check(launch, hidden, weight, tokens, scores, SPECIALS, **config)

    # tokens and scores as strided views (the reference needs flat ones): written through, in place,
    # exactly as their contiguous copies are, and nothing else of the underlying storage changes.
    want_t, want_s = launch(hidden, weight, tokens.clone(), scores.clone(), MASK, SPECIALS, **config)
    t_storage = torch.full((14, 4), -1, device=device).T  # (4, 14) column-major
    s_storage = torch.full((4, 21), 9.0, device=device)
    t_view, s_view = t_storage[:, 1::2], s_storage[:, ::3]  # (4, 7) each
    t_view.copy_(tokens)
    s_view.copy_(scores)
    out = launch(hidden, weight, t_view, s_view, MASK, SPECIALS, **config)
    assert out[0] is t_view and out[1] is s_view
    assert torch.equal(t_view, want_t) and torch.equal(bits(s_view), bits(want_s))
    assert bool((t_storage[:, ::2] == -1).all())
    s_rest = torch.ones_like(s_storage, dtype=torch.bool)
    s_rest[:, ::3] = False
    assert bool((s_storage[s_rest] == 9.0).all())


def test_clear_errors_and_nothing_written(launch, device):
    hidden, weight, tokens, scores = make_inputs(3, 4, 50, 8, seed=11, device=device)
    cases = [
        ((hidden[0], weight, tokens, scores), "hidden"),
        ((hidden, weight[:, :5], tokens, scores), "weight"),
        ((hidden, weight, tokens[:, :3], scores), "tokens"),
        ((hidden, weight, tokens, scores[:2]), "scores"),
        ((hidden, weight.double(), tokens, scores), "dtype"),
        ((hidden.long(), weight.long(), tokens, scores), "dtype"),
        ((hidden, weight, tokens.int(), scores), "int64"),
        ((hidden, weight, tokens, scores.long()), "float"),
        ((hidden, weight[:0], tokens, scores), "empty vocabulary"),
    ]
    for args, needle in cases:
        before = [a.clone() for a in args[2:]]
        with pytest.raises(ValueError, match=needle):
            launch(*args, MASK, SPECIALS)
        assert all(torch.equal(a, b) for a, b in zip(args[2:], before))
    for banned, needle in (([3, 50], "banned id 50"), ([-1], "banned id -1"), (range(50), "all 50 ids")):
        with pytest.raises(ValueError, match=needle):
            launch(hidden, weight, tokens, scores, MASK, banned)
    with pytest.raises(ValueError, match="splits"):
        launch(hidden, weight, tokens, scores, MASK, SPECIALS, splits=0)
    with pytest.raises(ValueError, match="blocks"):
        launch(hidden, weight, tokens, scores, MASK, SPECIALS, blocks=(16, 100, 16))
    assert bool((tokens == MASK).any())  # the failed calls above had work to do and wrote nothing


def test_registered_first_and_loaded_lazily():
    op = registry()["mask_predict_update"]
    assert [b.name for b in op.backends] == ["triton", "cpp", "blocked", "reference"]
    triton_backend = op.backend("triton")
    cpu = torch.zeros(1)
    ok, why = triton_backend.supports(cpu)
    assert not ok and "cuda" in why  # the dispatch sends CPU tensors to a CPU backend:
    # the compiled reduction where the ops are built, else the blocked torch one
    want = "cpp" if op.backend("cpp").available()[0] else "blocked"
    assert op.select(cpu, cpu, cpu, cpu, MASK, []).name == want


# ----------------------------------------------------------------------------------------- GPU


def _cuda_or_skip() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if interpreting():
        pytest.skip("a realistic size is too slow for Triton's interpreter")


@pytest.mark.gpu
@pytest.mark.parametrize("masked", [0.5, 0.01], ids=["half-masked", "few-masked"])
def test_realistic_size_on_cuda(launch, masked):
    """192 canvases x 64 tokens, D = 512, V = 32000 in bf16 (mask-predict over 64 sentences, beam 3)."""
    _cuda_or_skip()
    hidden, weight, tokens, scores = make_inputs(
        192, 64, 32000, 512, seed=12, masked=masked, scale=0.05, dtype=torch.bfloat16, device="cuda"
    )  # logits of standard deviation about 1.1: the largest about 4.5
    _, _, err, err_ref = check(launch, hidden, weight, tokens, scores, SPECIALS)
    assert err < 1e-3, (err, err_ref)
    # Through the dispatch too: CUDA tensors take the triton backend.
    assert registry()["mask_predict_update"].select(hidden, weight, tokens, scores, MASK, SPECIALS).name == "triton"


@pytest.mark.gpu
def test_offsets_past_two_to_the_31_on_cuda(launch):
    """V * D = 2**31 + 2**14 bf16 weights (4 GiB): the ids at the end of the vocabulary need 64-bit offsets."""
    _cuda_or_skip()
    V, D = 2**17 + 1, 2**14
    if torch.cuda.get_device_properties(0).total_memory < 12 * 2**30:
        pytest.skip("needs 12 GiB of GPU memory")
    weight = torch.zeros(V, D, dtype=torch.bfloat16, device="cuda")
    weight[-1, -1] = 4.0  # the best token is the last id, its logit set by the last element of the weight
    weight[V // 2, 0] = 2.0
    hidden = torch.ones(2, 3, D, dtype=torch.bfloat16, device="cuda")
    tokens = torch.full((2, 3), MASK, device="cuda")
    scores = torch.zeros(2, 3, device="cuda")
    t, s = launch(hidden, weight, tokens, scores, MASK, SPECIALS)
    assert bool((t == V - 1).all())
    want = 4.0 - math.log(math.exp(4.0) + math.exp(2.0) + (V - 2))
    assert float((s - want).abs().max()) < 1e-4
