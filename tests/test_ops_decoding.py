"""The mask-predict decoding ops against plain-Python oracles.

Ops: length_beam_init, remask_lowest, mask_predict_update (janus.ops). Every test runs the
public (dispatched) op and, directly, every backend of the op that is available here, and
compares each with an oracle written below from the ops' contracts, one row at a time. A
compiled or Triton backend registered later is thereby held to the same contract without
changes to this file; a backend that only takes CUDA tensors runs on the GPU when there is one.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from janus.ops import length_beam_init, mask_predict_update, registry, remask_lowest
from janus.ops._dispatch import Backend

PAD, BOS, EOS, UNK, MASK = 0, 1, 2, 3, 4
SPECIAL = (PAD, BOS, EOS)  # never re-masked
INF = float("inf")


# ----------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One way to run an op: the public dispatched function, or one backend's impl called directly."""

    fn: Callable[..., Any]
    device: str
    backend: Backend | None = None

    def __call__(self, *args: Any) -> Any:
        """Run on ``self.device``; the tensor arguments must already be there."""
        if self.backend is not None and not _interpreted(self.backend):
            ok, why = self.backend.verdict(*args)
            assert ok, f"backend {self.backend.name!r} refuses this test's arguments: {why}"
        return self.fn(*args)

    def put(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Copies of ``tensors`` on this target's device (fresh tensors even on the CPU)."""
        return [t.to(self.device, copy=True) for t in tensors]


def _interpreted(backend: Backend) -> bool:
    """A Triton backend run by Triton's interpreter: it takes CPU tensors, whatever its predicate says."""
    return backend.name == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def _backend_device(backend: Backend) -> str:
    """The device whose tensors ``backend`` takes: the CPU if it can, else CUDA when present."""
    if backend.supports is None or _interpreted(backend):
        return "cpu"
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        try:
            ok = backend.supports(torch.zeros(1, device=device))[0]
        except Exception:  # a predicate that needs the op's real arguments: try it on the CPU
            ok = device == "cpu"
        if ok:
            return device
    return "cpu"  # cannot run here at all: the test then fails with the backend's reason


def targets(op_name: str, public: Callable[..., Any]) -> list[Any]:
    """pytest params: the public op (on the CPU, and on CUDA when present), then every available backend."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    params = [pytest.param(Target(public, d), id=f"public-{d}") for d in devices]
    for backend in registry()[op_name].backends:
        if backend.available()[0]:
            device = _backend_device(backend)
            params.append(pytest.param(Target(backend.impl, device, backend), id=f"{backend.name}-{device}"))
    return params


LENGTH_BEAM_INIT = targets("length_beam_init", length_beam_init)
REMASK_LOWEST = targets("remask_lowest", remask_lowest)
MASK_PREDICT_UPDATE = targets("mask_predict_update", mask_predict_update)


def test_every_op_is_registered_with_its_reference_backend_last():
    for name in ("length_beam_init", "remask_lowest", "mask_predict_update"):
        backends = registry()[name].backends
        assert backends[-1].name == "reference" and backends[-1].available()[0]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of a float tensor (so that -0.0 != 0.0 and comparisons are exact)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_storage(out: torch.Tensor, given: torch.Tensor) -> None:
    assert out.data_ptr() == given.data_ptr()
    assert out.shape == given.shape and out.dtype == given.dtype and out.stride() == given.stride()


# -------------------------------------------------------------------------- length_beam_init


def oracle_length_beam(
    scores: torch.Tensor, beam: int, min_len: int, max_len: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sentence: the allowed lengths n in [min_len, min(max_len, C - 1)] best first, ties to the
    shorter. A max_len below min_len allows only min_len. When fewer than ``beam`` are allowed, the
    missing candidates are, as the reference fills them, the clamped disallowed lengths in length
    order (min_len once per n < min_len, then hi once per n > hi), and past C the last one repeated."""
    rows = scores.tolist()
    B, C = scores.shape
    caps = max_len.tolist() if isinstance(max_len, torch.Tensor) else [max_len] * B
    lengths: list[int] = []
    for row, cap in zip(rows, caps):
        hi = max(min(cap, C - 1), min_len)
        ranked = sorted(range(min_len, hi + 1), key=lambda n: (-row[n], n))[:beam]
        if len(ranked) < beam:
            fill = [min_len] * min_len + [hi] * (C - 1 - hi)
            ranked += fill[: beam - len(ranked)]
            ranked += [ranked[-1]] * (beam - len(ranked))
        lengths += ranked
    L = max(lengths)
    canvas = {n: torch.tensor([BOS] + [MASK] * (n - 2) + [EOS] + [PAD] * (L - n)) for n in set(lengths)}
    return torch.stack([canvas[n] for n in lengths]), torch.tensor(lengths, dtype=torch.long)


def run_length_beam(target: Target, scores: torch.Tensor, beam: int, min_len: int, max_len) -> tuple:
    scores_dev, *rest = target.put(scores, *([max_len] if isinstance(max_len, torch.Tensor) else []))
    max_arg = rest[0] if rest else max_len
    before = scores_dev.clone()
    tokens, lengths = target(scores_dev, beam, min_len, max_arg, BOS, EOS, MASK, PAD)
    assert torch.equal(bits(scores_dev), bits(before))  # the scores are only read
    assert tokens.dtype == torch.long and lengths.dtype == torch.long
    assert tokens.device == scores_dev.device and lengths.device == scores_dev.device
    return tokens.cpu(), lengths.cpu()


def check_length_beam(target: Target, scores: torch.Tensor, beam: int, min_len: int, max_len) -> torch.Tensor:
    tokens, lengths = run_length_beam(target, scores, beam, min_len, max_len)
    want_tokens, want_lengths = oracle_length_beam(scores, beam, min_len, max_len)
    assert lengths.shape == (scores.shape[0] * beam,)
    assert torch.equal(lengths, want_lengths)
    assert tokens.shape == want_tokens.shape  # (B * beam, longest chosen length)
    assert torch.equal(tokens, want_tokens)
    return lengths


@pytest.mark.parametrize("target", LENGTH_BEAM_INIT)
@pytest.mark.parametrize("B", [1, 7, 123])
@pytest.mark.parametrize("C", [4, 5, 67])
def test_length_beam_init_matches_the_oracle(target, B, C):
    g = torch.Generator().manual_seed(1000 * B + C)
    tied = torch.randint(-3, 1, (B, C), generator=g).float() / 2  # four values: ties everywhere
    smooth = torch.randn(B, C, generator=g)
    seen_short_range = False
    for scores in (tied, smooth):
        for min_len in sorted({2, 3, C - 1}):
            per_row = torch.randint(min_len - 1, C + 4, (B,), generator=g)  # some below min_len, some past C - 1
            for i, max_len in enumerate((C + 10, C - 1, min_len + 1, min_len, per_row)):
                big = C - min_len + 2 if i % 2 else C + 3  # both exceed every allowed range; C + 3 exceeds C
                for beam in (1, 3, big):
                    lengths = check_length_beam(target, scores, beam, min_len, max_len)
                    assert bool(((lengths >= min_len) & (lengths <= C - 1)).all())
                    seen_short_range |= beam > C - min_len
    assert seen_short_range


@pytest.mark.parametrize("target", LENGTH_BEAM_INIT)
def test_length_beam_init_ties_and_clamped_repeats_by_hand(target):
    scores = torch.tensor([[9.0, 9.0, 1.0, 5.0, 5.0, 5.0, 1.0, 0.0]])  # columns 0, 1 are never allowed
    tokens, lengths = run_length_beam(target, scores, 4, 2, 7)
    assert lengths.tolist() == [3, 4, 5, 2]  # equal scores: the shorter length first
    assert tokens.tolist() == [
        [BOS, MASK, EOS, PAD, PAD],
        [BOS, MASK, MASK, EOS, PAD],
        [BOS, MASK, MASK, MASK, EOS],
        [BOS, EOS, PAD, PAD, PAD],
    ]
    # Only 3 and 4 are allowed: the best first, then clamped repeats inside [3, 4].
    tokens, lengths = run_length_beam(target, scores, 5, 3, torch.tensor([4]))
    assert lengths.tolist()[:2] == [3, 4]
    assert set(lengths.tolist()[2:]) <= {3, 4}
    assert tokens.shape == (5, 4)
    # A max_len past C - 1 is capped at C - 1 = 7.
    _, lengths = run_length_beam(target, torch.arange(8.0)[None], 2, 2, 100)
    assert lengths.tolist() == [7, 6]


@pytest.mark.parametrize("target", LENGTH_BEAM_INIT)
def test_length_beam_init_per_row_max_len_and_sentence_order(target):
    B, C, beam = 5, 12, 3
    scores = torch.arange(float(C)).repeat(B, 1)  # longer is better: each sentence takes its longest lengths
    max_len = torch.tensor([2, 5, 11, 40, 7])
    tokens, lengths = run_length_beam(target, scores, beam, 2, max_len)
    assert lengths.view(B, beam).tolist() == [[2, 2, 2], [5, 4, 3], [11, 10, 9], [11, 10, 9], [7, 6, 5]]
    assert tokens.shape == (B * beam, 11)
    for row, n in zip(tokens.tolist(), lengths.tolist()):
        assert row == [BOS] + [MASK] * (n - 2) + [EOS] + [PAD] * (11 - n)


@pytest.mark.parametrize("target", LENGTH_BEAM_INIT)
def test_length_beam_init_is_deterministic(target):
    g = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 3, (123, 67), generator=g).float()
    max_len = torch.randint(2, 70, (123,), generator=g)
    first = run_length_beam(target, scores, 7, 2, max_len)
    second = run_length_beam(target, scores, 7, 2, max_len)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("target", LENGTH_BEAM_INIT)
def test_length_beam_init_rejects_bad_arguments(target):
    scores = torch.zeros(3, 8, device=target.device)
    for min_len in (1, 0, -2):
        with pytest.raises(ValueError, match="min_len"):
            target(scores, 2, min_len, 5, BOS, EOS, MASK, PAD)
    with pytest.raises(ValueError, match="min_len"):
        target(scores, 2, 8, 8, BOS, EOS, MASK, PAD)  # no canvas length n <= C - 1 = 7 is >= 8
    for bad in (torch.zeros(8, device=target.device), torch.zeros(2, 3, 8, device=target.device)):
        with pytest.raises(ValueError, match="length_scores"):
            target(bad, 2, 2, 5, BOS, EOS, MASK, PAD)
    with pytest.raises(ValueError, match="beam"):
        target(scores, 0, 2, 5, BOS, EOS, MASK, PAD)


# ----------------------------------------------------------------------------- remask_lowest


def eligible_counts(tokens: torch.Tensor) -> torch.Tensor:
    return torch.tensor([sum(t not in SPECIAL for t in row) for row in tokens.tolist()], dtype=torch.long)


def oracle_remask(tokens: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor) -> tuple:
    """Per row: the counts[r] lowest-scoring tokens that are not pad/bos/eos, ties to the smaller
    position, become <mask> with score 0. Returns (tokens, scores, the re-masked positions)."""
    T, S = tokens.tolist(), scores.tolist()
    hit = [[False] * len(row) for row in T]
    for r, k in enumerate(counts.tolist()):
        eligible = [p for p, tok in enumerate(T[r]) if tok not in SPECIAL]
        assert 0 <= k <= len(eligible)
        for p in sorted(eligible, key=lambda p: (S[r][p], p))[:k]:
            T[r][p], S[r][p], hit[r][p] = MASK, 0.0, True
    shape = tokens.shape
    return (
        torch.tensor(T, dtype=torch.long).view(shape),
        torch.tensor(S, dtype=scores.dtype).view(shape),
        torch.tensor(hit, dtype=torch.bool).view(shape),
    )


def canvas_rows(R: int, L: int, g: torch.Generator, scattered: bool) -> torch.Tensor:
    """Canvases [bos, words..., eos, pad...] of random lengths (about one in five all pad except bos/eos),
    or, ``scattered``, tokens drawn from the first few ids so that specials sit anywhere in a row."""
    if scattered:
        return torch.randint(0, 9, (R, L), generator=g)
    tokens = torch.randint(UNK, 40, (R, L), generator=g)  # words, <unk> and <mask> included
    n = torch.randint(2, L + 1, (R,), generator=g)
    n[torch.rand(R, generator=g) < 0.2] = 2
    col = torch.arange(L)[None, :]
    tokens[col >= n[:, None]] = PAD
    tokens[col == n[:, None] - 1] = EOS
    tokens[:, 0] = BOS
    return tokens


def run_remask(target: Target, tokens: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor) -> tuple:
    t, s, c = target.put(tokens, scores, counts)
    out_t, out_s = target(t, s, c, MASK, PAD, BOS, EOS)
    assert_same_storage(out_t, t)  # in place: the very input tensors come back
    assert_same_storage(out_s, s)
    return t.cpu(), s.cpu()


def check_remask(target: Target, tokens: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor) -> None:
    t, s = run_remask(target, tokens, scores, counts)
    want_t, want_s, hit = oracle_remask(tokens, scores, counts)
    assert torch.equal(t, want_t)
    assert torch.equal(hit.sum(1), counts)
    assert bool((s[hit] == 0).all())  # re-masked slots score 0 (slots that already held <mask> included)
    assert torch.equal(bits(s[~hit]), bits(scores[~hit]))  # every other score is bit-identical
    assert torch.equal(bits(s[~hit]), bits(want_s[~hit]))


@pytest.mark.parametrize("target", REMASK_LOWEST)
@pytest.mark.parametrize("R", [1, 7, 123])
@pytest.mark.parametrize("L", [2, 3, 65])
def test_remask_lowest_matches_the_oracle(target, R, L):
    g = torch.Generator().manual_seed(100 * R + L)
    for scattered in (False, True):
        tokens = canvas_rows(R, L, g, scattered)
        eligible = eligible_counts(tokens)
        tied = -torch.randint(0, 4, (R, L), generator=g).float()  # {-0, -1, -2, -3}: ties in every row
        smooth = torch.randn(R, L, generator=g).where(torch.rand(R, L, generator=g) > 0.05, -INF)
        for scores in (tied, smooth):
            for counts in (
                torch.zeros(R, dtype=torch.long),
                eligible,
                (torch.rand(R, generator=g) * (eligible + 1)).long().clamp_max(eligible),
            ):
                check_remask(target, tokens, scores, counts)


@pytest.mark.parametrize("target", REMASK_LOWEST)
def test_remask_lowest_ties_and_specials_by_hand(target):
    tokens = torch.tensor(
        [
            [BOS, 10, 11, 12, 13, EOS, PAD],
            [BOS, 10, MASK, 12, 13, EOS, PAD],
            [BOS, EOS, PAD, PAD, PAD, PAD, PAD],
            [PAD, 20, BOS, 21, EOS, 22, PAD],
        ]
    )
    scores = torch.tensor(
        [
            [-9.0, -1.0, -2.0, -1.0, -2.0, -9.0, -9.0],
            [0.0, -3.0, 0.0, -3.0, -0.5, 0.0, 0.0],
            [-5.0, -5.0, -5.0, -5.0, -5.0, -5.0, -5.0],
            [-9.0, -0.5, -9.0, -0.5, -9.0, -0.5, -9.0],
        ]
    )
    counts = torch.tensor([3, 2, 0, 2])
    t, s = run_remask(target, tokens, scores, counts)
    assert t.tolist() == [
        [BOS, MASK, MASK, 12, MASK, EOS, PAD],  # the two -2, then the first of the two -1
        [BOS, MASK, MASK, MASK, 13, EOS, PAD],  # the two -3; an existing <mask> is an ordinary token
        [BOS, EOS, PAD, PAD, PAD, PAD, PAD],  # nothing to re-mask
        [PAD, MASK, BOS, MASK, EOS, 22, PAD],  # specials are skipped wherever they sit; ties by position
    ]
    assert s.tolist() == [
        [-9.0, 0.0, 0.0, -1.0, 0.0, -9.0, -9.0],
        [0.0, 0.0, 0.0, 0.0, -0.5, 0.0, 0.0],
        [-5.0] * 7,
        [-9.0, 0.0, -9.0, 0.0, -9.0, -0.5, -9.0],
    ]


@pytest.mark.parametrize("target", REMASK_LOWEST)
def test_remask_lowest_counts_out_of_range_name_the_row(target):
    g = torch.Generator().manual_seed(9)
    tokens = canvas_rows(6, 9, g, scattered=False)
    tokens[4, 1:] = PAD
    tokens[4, 1] = EOS  # row 4: bos, eos and pads only
    tokens[2, 1:8] = 30  # row 2: 7 eligible tokens
    scores = torch.randn(6, 9, generator=g)
    eligible = eligible_counts(tokens)
    assert eligible[4] == 0 and eligible[2] == 7
    cases = [(2, -1), (2, 8), (4, 1), (0, int(eligible[0]) + 5)]
    for row, count in cases:
        counts = torch.zeros(6, dtype=torch.long)
        counts[row] = count
        t, s, c = target.put(tokens, scores, counts)
        with pytest.raises(ValueError) as err:
            target(t, s, c, MASK, PAD, BOS, EOS)
        message = str(err.value)
        assert re.search(rf"\[{row}\]|\brow {row}\b", message), message
        assert re.search(rf"(?<![\d.]){count}(?![\d.])", message), message
        assert torch.equal(t.cpu(), tokens) and torch.equal(bits(s.cpu()), bits(scores))  # nothing written


@pytest.mark.parametrize("target", REMASK_LOWEST)
def test_remask_lowest_is_deterministic(target):
    g = torch.Generator().manual_seed(11)
    tokens = canvas_rows(123, 65, g, scattered=True)
    scores = -torch.randint(0, 3, (123, 65), generator=g).float()
    counts = eligible_counts(tokens) // 2
    first = run_remask(target, tokens, scores, counts)
    second = run_remask(target, tokens, scores, counts)
    assert torch.equal(first[0], second[0]) and torch.equal(bits(first[1]), bits(second[1]))
    assert not torch.equal(first[0], tokens)


# ------------------------------------------------------------------------ mask_predict_update


@dataclass
class UpdateOracle:
    """Per masked slot (r, t): the best allowed token, its log-probability, and the margin to the next
    allowed token (0 on a tie). Unmasked slots keep their inputs."""

    tokens: torch.Tensor
    scores: torch.Tensor
    margin: dict[tuple[int, int], float]


def slot_logp(hidden: torch.Tensor, weight: torch.Tensor, r: int, t: int) -> list[float]:
    """log_softmax over the whole vocabulary of one slot, from fp64 logits of the given (upcast) inputs."""
    logits = (weight.double() @ hidden[r, t].double()).tolist()
    m = max(logits)
    log_z = m + math.log(sum(map(math.exp, [x - m for x in logits])))
    return [x - log_z for x in logits]


def oracle_update(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, scores: torch.Tensor, banned: Sequence[int]
) -> UpdateOracle:
    T, S = tokens.tolist(), scores.tolist()
    W = weight.double()
    banned_ids = sorted(set(banned))
    margin = {}
    for r, row in enumerate(T):
        slots = [t for t, tok in enumerate(row) if tok == MASK]
        if not slots:
            continue
        logits = (hidden[r, slots].double() @ W.T).tolist()  # fp64 logits of this row's masked slots
        for t, z in zip(slots, logits):
            m = max(z)
            log_z = m + math.log(sum(map(math.exp, [x - m for x in z])))
            allowed = list(z)
            for v in banned_ids:
                allowed[v] = -INF
            best = max(allowed)
            tok = allowed.index(best)  # the first, i.e. smallest, id among equals
            allowed[tok] = -INF
            second = max(allowed)
            T[r][t], S[r][t] = tok, best - log_z
            margin[r, t] = best - second
    return UpdateOracle(torch.tensor(T).view(tokens.shape), torch.tensor(S, dtype=scores.dtype), margin)


def run_update(target: Target, hidden, weight, tokens, scores, banned) -> tuple[torch.Tensor, torch.Tensor]:
    h, w, t, s = target.put(hidden, weight, tokens, scores)
    out_t, out_s = target(h, w, t, s, MASK, banned)
    assert_same_storage(out_t, t)
    assert_same_storage(out_s, s)
    assert torch.equal(h.cpu(), hidden) and torch.equal(w.cpu(), weight)  # only read
    return t.cpu(), s.cpu()


def check_update(target, hidden, weight, tokens, scores, banned, tol: float = 0.0, score_tol: float = 1e-5):
    """Compare with the oracle. Where the oracle's best allowed token leads the next by at least ``tol``
    (always, when tol = 0: exact inputs) the token must be that one; elsewhere any allowed token within
    ``tol`` of the best will do. Scores must match the oracle's log-probability of the chosen token."""
    t, s = run_update(target, hidden, weight, tokens, scores, banned)
    want = oracle_update(hidden, weight, tokens, scores, banned)
    masked = tokens == MASK
    assert torch.equal(t[~masked], tokens[~masked])  # unmasked slots are untouched, bit for bit
    assert torch.equal(bits(s[~masked]), bits(scores[~masked]))
    assert not any(v in set(banned) for v in t[masked].tolist())
    differ = 0
    for (r, p), margin in want.margin.items():
        got, best = int(t[r, p]), int(want.tokens[r, p])
        expected = float(want.scores[r, p])
        if got != best:
            assert margin < tol, f"slot ({r}, {p}): token {got}, oracle {best} leads by {margin}"
            expected = slot_logp(hidden, weight, r, p)[got]
            assert expected >= float(want.scores[r, p]) - tol
            differ += 1
        assert abs(float(s[r, p]) - expected) <= score_tol, (r, p, float(s[r, p]), expected)
    return t, s, differ


def random_update_inputs(R: int, L: int, V: int, D: int, g: torch.Generator, masked: float = 0.5, scale: float = 1.0):
    hidden = torch.randn(R, L, D, generator=g) * scale
    weight = torch.randn(V, D, generator=g)
    tokens = torch.randint(0, V, (R, L), generator=g)  # specials included at the unmasked slots
    tokens[tokens == MASK] = UNK
    tokens[torch.rand(R, L, generator=g) < masked] = MASK
    scores = torch.randn(R, L, generator=g)
    return hidden, weight, tokens, scores


@pytest.mark.parametrize("target", MASK_PREDICT_UPDATE)
@pytest.mark.parametrize("R", [1, 7, 123])
@pytest.mark.parametrize("L", [2, 3, 65])
def test_mask_predict_update_matches_the_oracle(target, R, L):
    g = torch.Generator().manual_seed(R * 100 + L)
    hidden, weight, tokens, scores = random_update_inputs(R, L, 1031, 19, g)
    tokens[0, -1] = MASK
    _, _, differ = check_update(target, hidden, weight, tokens, scores, [PAD, BOS, EOS, MASK], tol=1e-4, score_tol=1e-4)
    assert differ <= 1


@pytest.mark.parametrize("target", MASK_PREDICT_UPDATE)
@pytest.mark.parametrize("R,L", [(1, 2), (7, 65), (123, 3)])
@pytest.mark.parametrize(
    "banned", [[PAD, BOS, EOS, MASK], (), (MASK, 17, 1030, 17, 500)], ids=["specials", "none", "some"]
)
def test_mask_predict_update_exact_ties_go_to_the_smaller_id(target, R, L, banned):
    # Small integers: every logit is exact in fp32, and the best logit is shared by several ids.
    g = torch.Generator().manual_seed(R + L + len(banned))
    V, D = 1031, 5
    hidden = torch.randint(-2, 3, (R, L, D), generator=g).float()
    weight = torch.randint(-2, 3, (V, D), generator=g).float()
    tokens = torch.randint(5, V, (R, L), generator=g)
    tokens[torch.rand(R, L, generator=g) < 0.6] = MASK
    tokens[:, 0] = MASK
    scores = torch.full((R, L), -7.0)
    t, s, differ = check_update(target, hidden, weight, tokens, scores, list(banned))
    assert differ == 0
    logits = hidden @ weight.T
    allowed = torch.ones(V, dtype=torch.bool)
    allowed[list(banned)] = False
    best = logits.masked_fill(~allowed, -INF).amax(-1)
    ties = ((logits == best[..., None]) & allowed).sum(-1)
    assert bool((ties[tokens == MASK] > 1).any())  # the case exercised: ties at the max


@pytest.mark.parametrize("target", MASK_PREDICT_UPDATE)
def test_mask_predict_update_banned_best_token_still_counts_in_the_normalisation(target):
    g = torch.Generator().manual_seed(21)
    R, L, V, D = 7, 9, 1031, 12
    hidden, weight, tokens, scores = random_update_inputs(R, L, V, D, g, scale=0.2)
    hidden[..., -1] = 1.0
    weight[:, -1] = 0.0
    weight[BOS] = 0.0
    weight[BOS, -1] = 30.0  # bos: logit 30 at every slot, the most likely token by far
    weight[77] = 0.0
    weight[77, -1] = 29.0  # then 77: logit 29
    banned = [PAD, BOS, EOS, MASK]
    t, s, _ = check_update(target, hidden, weight, tokens, scores, banned, tol=1e-4, score_tol=1e-4)
    masked = tokens == MASK
    assert bool((t[masked] == 77).all())
    # log(e^29 / (e^30 + e^29 + the rest)) = -log(1 + e) nearly: banned bos keeps most of the mass.
    assert float((s[masked] + math.log1p(math.e)).abs().max()) < 1e-3


@pytest.mark.parametrize("target", MASK_PREDICT_UPDATE)
def test_mask_predict_update_without_masked_slots_changes_nothing(target):
    g = torch.Generator().manual_seed(22)
    hidden, weight, tokens, scores = random_update_inputs(7, 65, 1031, 19, g, masked=0.0)
    scores[0, 0] = -0.0
    scores[1, 1] = -INF
    assert not bool((tokens == MASK).any())
    t, s = run_update(target, hidden, weight, tokens, scores, [PAD, BOS, EOS, MASK])
    assert torch.equal(t, tokens) and torch.equal(bits(s), bits(scores))


@pytest.mark.parametrize("target", MASK_PREDICT_UPDATE)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 0.015), (torch.bfloat16, 0.1)], ids=["fp16", "bf16"])
def test_mask_predict_update_low_precision(target, dtype, tol):
    g = torch.Generator().manual_seed(23)
    hidden, weight, tokens, scores = random_update_inputs(123, 17, 1031, 19, g, scale=0.5)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    masked = int((tokens == MASK).sum())
    # The oracle is the fp64 computation from the same low-precision inputs.
    t, s, differ = check_update(target, hidden, weight, tokens, scores, [PAD, BOS, EOS, MASK], tol=tol, score_tol=tol)
    assert s.dtype == torch.float32
    assert differ <= masked // 20  # near-ties only


@pytest.mark.parametrize("target", MASK_PREDICT_UPDATE)
def test_mask_predict_update_is_deterministic(target):
    g = torch.Generator().manual_seed(24)
    hidden, weight, tokens, scores = random_update_inputs(123, 65, 1031, 19, g)
    first = run_update(target, hidden, weight, tokens, scores, [PAD, BOS, EOS, MASK])
    second = run_update(target, hidden, weight, tokens, scores, [PAD, BOS, EOS, MASK])
    assert torch.equal(first[0], second[0]) and torch.equal(bits(first[1]), bits(second[1]))
    assert not bool((first[0] == MASK).any())


@pytest.mark.parametrize("backend", ["cpp", "blocked"])
@pytest.mark.parametrize("R,L,V,D", [(1, 7, 1031, 19), (7, 65, 1031, 32), (9, 65, 8000, 24)])
def test_mask_predict_update_on_panels_matches_the_oracle(backend, R, L, V, D, monkeypatch):
    """Given the weight's panels, the CPU backends multiply on them (every block: several of 262 rows at
    V = 8000), match the oracle to rounding, and give a slot the same bits whatever the other rows."""
    from ext_helpers import require_kernel

    from janus.ops.skinny_linear import pack_panels

    require_kernel("skinny_linear", "cpu")
    impl = registry()["mask_predict_update"].backend(backend)
    if not impl.available()[0]:
        require_kernel("best_token", "cpu")
    g = torch.Generator().manual_seed(R + L + V + D)
    hidden, weight, tokens, scores = random_update_inputs(R, L, V, D, g)
    panels = pack_panels(weight)
    seen = []
    real = torch.ops.janus.skinny_linear
    monkeypatch.setattr(torch.ops.janus, "skinny_linear", lambda *a: seen.append(a[0].shape[0]) or real(*a),
                        raising=False)  # fmt: skip
    target = Target(lambda *args: impl.impl(*args, panels=panels), "cpu")
    t, s, differ = check_update(target, hidden, weight, tokens, scores, [PAD, BOS, EOS, MASK], tol=1e-4,
                                score_tol=1e-4)  # fmt: skip
    assert differ <= 1
    assert sum(seen) == int((tokens == MASK).sum()) and (V < 8000 or len(seen) > 1), seen
    alone = run_update(target, hidden[:1], weight, tokens[:1], scores[:1], [PAD, BOS, EOS, MASK])
    assert torch.equal(alone[0], t[:1]) and torch.equal(bits(alone[1]), bits(s[:1]))
    # the reference and the triton kernel take the argument and leave it: the oracle's result
    seen.clear()
    ref = registry()["mask_predict_update"].backend("reference").impl
    check_update(Target(lambda *args: ref(*args, panels=panels), "cpu"), hidden, weight, tokens, scores,
                 [PAD, BOS, EOS, MASK], tol=1e-4, score_tol=1e-4)  # fmt: skip
    assert seen == []


@pytest.mark.parametrize("target", LENGTH_BEAM_INIT)
def test_length_beam_init_prefers_an_allowed_length_scored_minus_inf_to_a_repeat(target):
    # offset-mode length scores are -inf outside the class window; those lengths are still allowed
    inf = float("inf")
    lengths = check_length_beam(target, torch.tensor([[0.0, 0.0, 0.0, -inf, -1.0, -inf, -inf, -inf]]), 3, 2, 7)
    assert lengths.tolist() == [2, 4, 3]
    scores = torch.tensor([[-inf] * 5 + [-0.5, -1.0, -2.0] + [-inf] * 2])
    assert check_length_beam(target, scores, 5, 2, 7).tolist() == [5, 6, 7, 2, 3]


@pytest.mark.parametrize("target", REMASK_LOWEST)
def test_remask_lowest_never_touches_specials_even_against_inf_and_nan_scores(target):
    inf, nan = float("inf"), float("nan")
    t, s = run_remask(target, torch.tensor([[BOS, 10, EOS]]), torch.tensor([[0.0, inf, 0.0]]), torch.tensor([1]))
    assert t.tolist() == [[BOS, MASK, EOS]]
    t, s = run_remask(
        target, torch.tensor([[BOS, 10, 11, EOS, PAD]]), torch.tensor([[0.0, nan, -1.0, 0.0, 0.0]]), torch.tensor([2])
    )
    assert t.tolist() == [[BOS, MASK, MASK, EOS, PAD]]
