"""Decoding: AR greedy/beam search, mask-predict, self-speculative decoding (JANUS.md section 4)."""

from __future__ import annotations

import importlib
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from janus.config import DecodeConfig, preset
from janus.decoding import beam_search, greedy_search, mask_predict, speculative_decode
from janus.decoding.beam_search import next_token_logprobs
from janus.decoding.common import repeating, repeating_tail
from janus.decoding.mask_predict import ar_mean_logprob, collapse_repeats, length_groups, remask_counts
from janus.model import JanusModel, KVCache
from janus.ops import length_beam_init
from janus.streams import build_ar_verify_rows, build_canvas_rows, build_training_rows

PAD, BOS, EOS, UNK, MASK = 0, 1, 2, 3, 4


def random_model(seed: int, vocab: int = 40, eos_bias: float = 0.0, **overrides) -> JanusModel:
    """A random tiny model with peaked outputs (so searches disagree); ``eos_bias`` is added to
    the eos logit of every AR prediction, to make outputs end sooner or later."""
    torch.manual_seed(seed)
    m = JanusModel(preset("tiny", vocab_size=vocab, dropout=0.0, **overrides)).eval()
    with torch.no_grad():
        m.embed.weight.mul_(15)
    if eos_bias:
        bias = torch.zeros(vocab)
        bias[EOS] = eos_bias
        m.project = lambda hidden: F.linear(hidden, m.embed.weight) + bias
    return m


def random_sources(seed: int, batch: int, vocab: int = 40, lo: int = 2, hi: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (batch,), generator=g)
    src = torch.full((batch, int(lengths.max()) + 1), PAD)
    for b, n in enumerate(lengths.tolist()):
        src[b, :n] = torch.randint(5, vocab, (n,), generator=g)
        src[b, n] = EOS
    return src


def canvas_limit(src: torch.Tensor) -> torch.Tensor:
    """The longest canvas (with bos, eos) of the default limits: floor(1.2 * source + 10) + 2."""
    return torch.floor(((src != PAD).sum(1) - 1) * 1.2 + 10 + 1e-9).long() + 2


def varied_model(seed: int) -> JanusModel:
    """A random model whose greedy outputs end at different lengths (eos tuned until they do)."""
    src = random_sources(seed, 8)
    for bias in (0.0, 5.0, 10.0, 15.0, 20.0, 30.0):
        m = random_model(seed, eos_bias=bias)
        lengths = {len(h.ids) for h in greedy_search(m, src, max_len_a=1.0, max_len_b=6)}
        if len(lengths) >= 3:
            return m
    raise AssertionError("no eos bias gave varied output lengths")


# ---------------------------------------------------------------------------------------- AR


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_search_equals_recomputation(seed):
    m = varied_model(seed)
    src = random_sources(seed + 10, 6)
    for search, kw in ((greedy_search, {}), (beam_search, {"beam": 4})):
        cached = search(m, src, max_len_a=1.0, max_len_b=6, **kw)
        full = search(m, src, max_len_a=1.0, max_len_b=6, use_cache=False, **kw)
        assert [h.ids for h in cached] == [h.ids for h in full]
        for a, b in zip(cached, full, strict=True):
            assert math.isclose(a.score, b.score, rel_tol=1e-5, abs_tol=1e-5)
            assert a.passes == b.passes


def test_every_ar_topk_backend_gives_the_same_searches(monkeypatch):
    """The AR searches choose through janus.ops.ar_topk: its compiled kernel, torch's max/topk and the
    reference (a stable sort) give the same tokens (random logits never tie) and scores to rounding."""
    from janus.ops.ar_topk import AR_TOPK

    m = varied_model(1)
    src = random_sources(21, 6)
    runs = {}
    for backend in ("cpp", "torch", "reference"):
        if not AR_TOPK.backend(backend).available()[0]:
            continue
        monkeypatch.setenv("JANUS_BACKEND_AR_TOPK", backend)
        runs[backend] = [
            search(m, src, max_len_a=1.0, max_len_b=6, repeat_ngram=2, repeat_times=2, **kw)
            for search, kw in ((greedy_search, {}), (beam_search, {"beam": 3}), (speculative_decode, {}))
        ]
    assert "torch" in runs and "reference" in runs
    want = runs.pop("reference")
    for backend, got in runs.items():
        for a, b in zip(got, want, strict=True):
            assert [h.ids for h in a] == [h.ids for h in b], backend
            assert all(math.isclose(x.score, y.score, rel_tol=1e-5, abs_tol=1e-5) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("seed", [0, 3])
def test_beam_one_is_greedy(seed):
    m = varied_model(seed)
    src = random_sources(seed, 10)
    for lp in (0.0, 1.0):
        g = greedy_search(m, src, length_penalty=lp, max_len_a=1.0, max_len_b=6)
        b = beam_search(m, src, beam=1, length_penalty=lp, max_len_a=1.0, max_len_b=6)
        assert [h.ids for h in g] == [h.ids for h in b]
        assert all(math.isclose(x.score, y.score, rel_tol=1e-6, abs_tol=1e-6) for x, y in zip(g, b, strict=True))
        assert [h.passes for h in g] == [len(h.ids) + 1 for h in g]


def sequence_logprob(m: JanusModel, src: torch.Tensor, words: tuple[int, ...]) -> float:
    """log P_AR(words + eos | src) by one teacher-forced pass (no search involved)."""
    tgt = torch.tensor([[BOS, *words, EOS]])
    with torch.no_grad():
        rows = build_training_rows(tgt, None, pad=PAD, mask=MASK, ar=True, nar=False, aux=False)
        h = m.decode(rows, m.encode(src)).flatten(0, 1)[rows.ar_rows]
        logp = F.log_softmax(m.project(h).float(), -1)
    return float(logp.gather(1, rows.ar_targets[:, None]).sum())


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_wide_beam_finds_the_exhaustive_optimum(length_penalty):
    """With a beam wider than every prefix set, beam search returns the best of ALL sequences."""
    vocab, max_len = 8, 3  # words 5, 6, 7
    m = random_model(4, vocab=vocab)
    for s in range(3):
        src = random_sources(s, 1, vocab=vocab)
        best = max(
            (
                sequence_logprob(m, src, w) / (len(w) + 1) ** length_penalty,
                w,
            )
            for n in range(1, max_len + 1)
            for w in itertools.product(range(5, vocab), repeat=n)
        )
        h = beam_search(m, src, beam=64, length_penalty=length_penalty, max_len_a=0.0, max_len_b=max_len)[0]
        assert tuple(h.ids) == best[1]
        assert math.isclose(h.score, best[0], rel_tol=1e-5, abs_tol=1e-5)


def test_length_limits_and_forced_lengths():
    m = random_model(5, eos_bias=-1e4)  # eos unlikely: outputs run to the maximum
    src = random_sources(5, 5)
    src_len = (src != PAD).sum(1) - 1
    for decode in (greedy_search, beam_search, speculative_decode):
        hyps = decode(m, src, max_len_a=0.5, max_len_b=2)
        assert [len(h.ids) for h in hyps] == torch.floor(src_len * 0.5 + 2).long().tolist()
    eager = random_model(5, eos_bias=1e4)  # eos very likely: min_len must hold it back
    for decode in (greedy_search, beam_search, speculative_decode):
        assert all(len(h.ids) >= 3 for h in decode(eager, src, min_len=3))
    wanted = torch.tensor([1, 4, 2, 7, 3])
    for decode in (greedy_search, beam_search, speculative_decode, mask_predict):
        kw = {"length_beam": 1} if decode is mask_predict else {}
        assert [len(h.ids) for h in decode(m, src, target_lengths=wanted, **kw)] == wanted.tolist()


@pytest.mark.parametrize("decode", ["greedy", "beam", "nar", "spec"])
def test_batched_equals_one_by_one(decode):
    """Finished sentences leave the batch without disturbing the others."""
    m = varied_model(6)
    src = random_sources(7, 7)
    fn = {
        "greedy": lambda s: greedy_search(m, s, max_len_a=1.0, max_len_b=6),
        "beam": lambda s: beam_search(m, s, beam=3, max_len_a=1.0, max_len_b=6),
        "nar": lambda s: mask_predict(m, s, iterations=3, length_beam=2),
        "spec": lambda s: speculative_decode(m, s, max_len_a=1.0, max_len_b=6),
    }[decode]
    together = fn(src)
    for b in range(src.shape[0]):
        row = src[b : b + 1, : int((src[b] != PAD).sum())]
        alone = fn(row)[0]
        assert alone.ids == together[b].ids
        assert math.isclose(alone.score, together[b].score, rel_tol=1e-4, abs_tol=1e-4)


def test_decoding_runs_in_eval_and_inference_mode_and_restores_training():
    m = random_model(8)
    m.cfg = preset("tiny", vocab_size=40, dropout=0.5)  # a training model would drop out
    src = random_sources(8, 3)
    seen = []
    original = m.decode

    def spy(*args, **kwargs):
        seen.append((m.training, torch.is_inference_mode_enabled()))
        return original(*args, **kwargs)

    m.decode = spy
    m.train()
    out = [greedy_search(m, src).copy(), mask_predict(m, src), speculative_decode(m, src)]
    assert m.training
    assert seen and all(s == (False, True) for s in seen)
    m.eval()
    again = [greedy_search(m, src), mask_predict(m, src), speculative_decode(m, src)]
    assert [[h.ids for h in x] for x in out] == [[h.ids for h in x] for x in again]


def test_a_model_in_eval_mode_is_not_switched_and_a_stray_training_module_is():
    """Switching every module's mode costs more than a batch-1 decode of a small model: a model in eval
    mode throughout is left alone; one training submodule (dropout on) is enough to switch them all."""
    m = random_model(8)
    src = random_sources(8, 2)
    switches = []
    original = type(m).train

    def spy(module, mode=True):
        switches.append(mode)
        return original(module, mode)

    m.train = spy.__get__(m)
    m.eval = lambda: m.train(False)
    greedy_search(m, src)
    assert switches == []
    m.decoder[0].drop.train()
    seen = []
    original_step = m.decode_ar_step
    m.decode_ar_step = lambda *a, **k: seen.append(m.decoder[0].drop.training) or original_step(*a, **k)
    greedy_search(m, src)
    assert switches == [False, False] and seen and not any(seen)


# -------------------------------------------------------------------------------- mask-predict


def test_one_pass_is_one_argmax_pass():
    m = random_model(9)
    src = random_sources(9, 4)
    hyps = mask_predict(m, src, iterations=1, length_beam=1)
    with torch.no_grad():
        enc = m.encode(src)
        canvas, lengths = length_beam_init(m.length_scores(enc), 1, 3, canvas_limit(src), BOS, EOS, MASK, PAD)
        hidden = m.decode(build_canvas_rows(canvas, pad=PAD), enc)
        logp = F.log_softmax(m.project(hidden).float(), -1)
        logp[..., [PAD, BOS, EOS, MASK]] = float("-inf")
        best, tok = logp.max(-1)
    for b, h in enumerate(hyps):
        n = int(lengths[b])
        assert h.ids == tok[b, 1 : n - 1].tolist()
        assert h.passes == 1
        assert math.isclose(h.score, float(best[b, 1 : n - 1].mean()), rel_tol=1e-5)


@pytest.mark.parametrize("T", [2, 3, 10])
def test_remask_counts_follow_the_formula_and_history_has_every_canvas(T):
    m = random_model(10)
    src = random_sources(10, 5, lo=6, hi=14)
    hyps = mask_predict(m, src, iterations=T, length_beam=2, history=True)
    for h in hyps:
        L = len(h.ids) + 2
        assert len(h.history) == T
        for t, step in enumerate(h.history):
            assert step.tokens[0] == BOS and step.tokens[-1] == EOS and MASK not in step.tokens
            expected = (L - 2) * (T - 1 - t) // T if t < T - 1 else 0
            assert len(step.remasked) == expected == int(remask_counts(torch.tensor(L - 2), t, T))
            # the re-masked tokens are the lowest-scoring ones of that canvas
            inner = sorted(range(1, L - 1), key=lambda p: (step.scores[p], p))
            assert sorted(step.remasked) == sorted(inner[:expected])
            if t > 0:  # only re-masked slots change
                before = h.history[t - 1]
                changed = [p for p in range(L) if step.tokens[p] != before.tokens[p]]
                assert set(changed) <= set(before.remasked)
        assert h.history[-1].tokens == [BOS, *h.ids, EOS]
    assert all(h.history is None for h in mask_predict(m, src, iterations=T))


def test_dedup_collapses_runs_of_a_token_and_nothing_else():
    m = random_model(11)
    src = random_sources(11, 6)
    plain = mask_predict(m, src, iterations=2, length_beam=2)
    collapsed = mask_predict(m, src, iterations=2, length_beam=2, dedup=True)
    assert any(len(p.ids) != len(c.ids) for p, c in zip(plain, collapsed))  # random weights repeat tokens
    for p, c in zip(plain, collapsed):
        want = [t for i, t in enumerate(p.ids) if i == 0 or t != p.ids[i - 1]]
        assert c.ids == want and c.score == p.score and c.passes == p.passes


def test_candidate_choice_and_rerank():
    m = random_model(11)
    src = random_sources(11, 4)
    k, T = 3, 4
    chosen = mask_predict(m, src, iterations=T, length_beam=k)
    reranked = mask_predict(m, src, iterations=T, length_beam=k, rerank=True)
    with torch.no_grad():
        enc = m.encode(src)
        _, lengths = length_beam_init(m.length_scores(enc), k, 3, canvas_limit(src), BOS, EOS, MASK, PAD)
    lengths = lengths.view(-1, k) - 2
    for b in range(src.shape[0]):
        row = src[b : b + 1]
        cands = [
            mask_predict(m, row, iterations=T, length_beam=1, target_lengths=lengths[b, i : i + 1])[0] for i in range(k)
        ]
        best = max(range(k), key=lambda i: (cands[i].score, -i))
        assert chosen[b].ids == cands[best].ids
        assert chosen[b].passes == T and reranked[b].passes == T + 1
        with torch.no_grad():
            ar = [sequence_logprob(m, row, tuple(c.ids)) / (len(c.ids) + 1) for c in cands]
        assert reranked[b].ids == cands[max(range(k), key=lambda i: (ar[i], -i))].ids
        assert math.isclose(reranked[b].score, max(ar), rel_tol=1e-4)


def test_collapse_repeats_keeps_the_first_of_every_run_and_pads_the_rest():
    tokens = torch.tensor([[BOS, 7, 7, 8, 7, 9, 9, 9, EOS, PAD], [BOS, 5, 5, 5, EOS, PAD, PAD, PAD, PAD, PAD],
                           [BOS, 4, 6, EOS, PAD, PAD, PAD, PAD, PAD, PAD]])  # fmt: skip
    want = torch.tensor([[BOS, 7, 8, 7, 9, EOS, PAD, PAD, PAD, PAD], [BOS, 5, EOS, PAD, PAD, PAD, PAD, PAD, PAD, PAD],
                         [BOS, 4, 6, EOS, PAD, PAD, PAD, PAD, PAD, PAD]])  # fmt: skip
    assert torch.equal(collapse_repeats(tokens, PAD), want)
    assert torch.equal(tokens[2], want[2])  # the input is left as it was


def test_rerank_with_dedup_scores_the_collapsed_candidates():
    """With rerank and dedup, P_AR chooses among the candidates as they would be output (runs collapsed)."""
    m = random_model(11)
    src = random_sources(11, 6)
    k, T = 3, 2
    both = mask_predict(m, src, iterations=T, length_beam=k, rerank=True, dedup=True)
    with torch.no_grad():
        enc = m.encode(src)
        _, lengths = length_beam_init(m.length_scores(enc), k, 3, canvas_limit(src), BOS, EOS, MASK, PAD)
    lengths = lengths.view(-1, k) - 2
    differs = 0
    for b in range(src.shape[0]):
        row = src[b : b + 1]
        cands = [
            mask_predict(m, row, iterations=T, length_beam=1, target_lengths=lengths[b, i : i + 1], dedup=True)[0]
            for i in range(k)
        ]
        raw = [mask_predict(m, row, iterations=T, length_beam=1, target_lengths=lengths[b, i : i + 1])[0]
               for i in range(k)]  # fmt: skip
        with torch.no_grad():
            ar = [sequence_logprob(m, row, tuple(c.ids)) / (len(c.ids) + 1) for c in cands]
        assert both[b].ids == cands[max(range(k), key=lambda i: (ar[i], -i))].ids
        assert math.isclose(both[b].score, max(ar), rel_tol=1e-4) and both[b].passes == T + 1
        differs += any(len(r.ids) != len(c.ids) for r, c in zip(raw, cands))
    assert differs  # random weights repeat tokens: the collapsed candidates are not the raw ones


def test_length_weight_adds_the_length_heads_vote_to_the_choice():
    """With length_weight w, each sentence keeps the candidate with the best (sum of token log-probabilities
    + w * log P(length)) / tokens; w = 0 is the plain mean."""
    m = random_model(11)
    src = random_sources(11, 6)
    k, T = 3, 3
    with torch.no_grad():
        enc = m.encode(src)
        length_lp = m.length_scores(enc)
        _, lengths = length_beam_init(length_lp, k, 3, canvas_limit(src), BOS, EOS, MASK, PAD)
    lengths = lengths.view(-1, k)
    assert [h.ids for h in mask_predict(m, src, iterations=T, length_beam=k, length_weight=0.0)] == [
        h.ids for h in mask_predict(m, src, iterations=T, length_beam=k)
    ]
    changed = 0
    for w in (1.0, 20.0):
        chosen = mask_predict(m, src, iterations=T, length_beam=k, length_weight=w)
        for b in range(src.shape[0]):
            cands = [
                mask_predict(m, src[b : b + 1], iterations=T, length_beam=1, target_lengths=lengths[b, i : i + 1] - 2)[
                    0
                ]
                for i in range(k)
            ]
            n = [len(c.ids) for c in cands]
            joint = [(cands[i].score * n[i] + w * float(length_lp[b, lengths[b, i]])) / n[i] for i in range(k)]
            best = max(range(k), key=lambda i: (joint[i], -i))
            assert chosen[b].ids == cands[best].ids
            assert math.isclose(chosen[b].score, joint[best], rel_tol=1e-4, abs_tol=1e-5)
            changed += best != max(range(k), key=lambda i: (cands[i].score, -i))
    assert changed  # the weight moved at least one choice: the check above can tell the rules apart
    with pytest.raises(ValueError, match="length_weight"):
        mask_predict(m, src, iterations=T, length_beam=k, length_weight=1.0, rerank=True)
    with pytest.raises(ValueError, match="length_weight"):
        mask_predict(m, src, iterations=T, length_beam=k, length_weight=-1.0)
    # Forced lengths the head has no class for (offset mode, far from the source length) count as its least
    # likely length: every score stays finite and such a candidate is chosen only on its tokens' merit.
    offset = random_model(11, length_classes=8, length_offset=True)
    far = torch.full((src.shape[0],), 30)
    for h in mask_predict(offset, src, iterations=T, length_beam=k, length_weight=1.0, target_lengths=far):
        assert math.isfinite(h.score) and len(h.ids) in (29, 30, 31)
    for kw, text in ((dict(length_weight=-0.5), "-0.5"), (dict(length_weight=math.nan), "nan"),
                     (dict(length_weight=1.0, rerank=True), "rerank")):  # fmt: skip
        with pytest.raises(ValueError, match=text):
            DecodeConfig(mode="nar", **kw)


def test_length_groups_minimise_padded_rows_plus_group_cost():
    widths = [9, 4, 12, 4, 7, 30, 5]
    for per, cost in ((1, 0.0), (3, 10.0), (2, 1e9)):
        groups = length_groups(widths, per, cost)
        assert sorted(b for grp in groups for b in grp) == list(range(len(widths)))
        assert all(widths[grp[0]] == max(widths[b] for b in grp) for grp in groups)  # widest first

        def total(gs, per=per, cost=cost):
            return sum(cost + per * len(grp) * max(widths[b] for b in grp) for grp in gs)

        order = sorted(range(len(widths)), key=lambda b: -widths[b])
        best = min(  # every split of the width order into runs
            total([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))])
            for k in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), k)
        )
        assert math.isclose(total(groups), best)
    assert length_groups(widths, 3, 1e9) == [sorted(range(len(widths)), key=lambda b: -widths[b])]


@pytest.mark.parametrize("T", [1, 4, 12])
def test_grouped_refinement_equals_one_padded_batch(T, monkeypatch):
    """Canvases decoded in width groups (sentences whose canvases are full leaving early) give what one
    padded batch gives: tokens, scores and every pass of the history."""
    m = random_model(15)
    src = random_sources(15, 9, lo=1, hi=14)
    wanted = torch.tensor([1, 2, 14, 3, 9, 2, 20, 5, 11])  # short canvases run out of masks before pass T
    runs = {}
    for cost in (math.inf, 0.0, 1e9):  # one batch in input order; a group per width; one group widest first
        # (the package's ``mask_predict`` attribute is the function: import the module by name)
        monkeypatch.setattr(importlib.import_module("janus.decoding.mask_predict"), "_GROUP_COST_ROWS", {"cpu": cost})
        runs[cost] = [mask_predict(m, src, iterations=T, length_beam=3, history=True, **kw)
                      for kw in ({}, {"target_lengths": wanted})]  # fmt: skip
    for one, grouped in itertools.chain(zip(runs[math.inf], runs[0.0]), zip(runs[math.inf], runs[1e9])):
        for a, b in zip(one, grouped, strict=True):
            assert a.ids == b.ids and a.passes == b.passes == T
            assert math.isclose(a.score, b.score, rel_tol=1e-5, abs_tol=1e-5)
            assert [s.tokens for s in a.history] == [s.tokens for s in b.history]
            assert [s.remasked for s in a.history] == [s.remasked for s in b.history]
            for x, y in zip(a.history, b.history, strict=True):
                torch.testing.assert_close(torch.tensor(x.scores), torch.tensor(y.scores), rtol=1e-5, atol=1e-5)


def test_ar_mean_logprob_matches_per_sequence_scoring():
    m = random_model(12)
    src = random_sources(12, 2)
    tokens = torch.tensor(
        [[BOS, 7, 8, 9, EOS], [BOS, 5, EOS, PAD, PAD], [BOS, 6, 6, EOS, PAD], [BOS, 9, EOS, PAD, PAD]]
    )
    with torch.no_grad():
        got = ar_mean_logprob(m, m.encode(src), tokens)  # two candidates per sentence
    for r in range(4):
        words = tuple(t for t in tokens[r].tolist() if t not in (PAD, BOS, EOS))
        want = sequence_logprob(m, src[r // 2 : r // 2 + 1], words) / (len(words) + 1)
        assert math.isclose(float(got[r]), want, rel_tol=1e-5)


# ------------------------------------------------------------------------- repetition guard


def test_repeating_finds_every_period_up_to_ngram():
    B, P = BOS, PAD
    rows = torch.tensor(
        [
            [B, 7, 5, 5, 5, 5, P, P],  # period 1, 4 copies at the end
            [B, 5, 6, 5, 6, 5, P, P],  # period 2: 5 6 5 6 5 -> the last 2-gram (6 5) twice, not 3 times
            [B, 5, 6, 7, 5, 6, 7, P],  # period 3, twice
            [B, 9, 5, 6, 5, 6, 5, 6],  # period 2, 3 copies
            [B, 5, 5, 5, 6, 7, 8, P],  # a run that does not reach the end
        ]
    )
    L = rows.shape[1]
    last = torch.tensor([5, 5, 6, 7, 6])[:, None]
    assert repeating(rows, last, 1, 3).squeeze(1).tolist() == [True, False, False, False, False]
    assert repeating(rows, last, 2, 3).squeeze(1).tolist() == [True, False, False, True, False]
    assert repeating(rows, last, 3, 2).squeeze(1).tolist() == [True, True, True, True, False]
    assert repeating(rows, last, 0, 2).squeeze(1).tolist() == [False] * 5  # off
    # every end position at once (as speculative verification asks): row 0 repeats 3 times from position 4 on
    ends = torch.arange(L)[None, :].expand(5, L)
    assert repeating(rows, ends, 1, 3)[0].tolist() == [False, False, False, False, True, True, False, False]
    assert repeating(rows, ends, 1, 3)[4].tolist() == [False, False, False, True, False, False, False, False]
    # a window too short to hold the copies never repeats; bos never joins a run
    assert not repeating(rows[:, :3], torch.full((5, 1), 2), 1, 3).any()
    assert repeating_tail(rows, 5, 1, 4).tolist() == [True, False, False, False, False]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_repetition_guard_ends_loops_and_speculative_still_equals_greedy(seed):
    m = random_model(seed, eos_bias=-1e4)  # eos unlikely: greedy outputs loop up to the length limit
    src = random_sources(seed, 5, lo=6, hi=10)
    limits = dict(max_len_a=3.0, max_len_b=10)
    free = greedy_search(m, src, **limits)
    assert all(repeating_tail(torch.tensor([[BOS, *h.ids]]), len(h.ids), 3, 3) for h in free)  # the stub loops
    guard = dict(repeat_ngram=3, repeat_times=3)
    g = greedy_search(m, src, **limits, **guard)
    for decode in (greedy_search, beam_search, speculative_decode):
        hyps = g if decode is greedy_search else decode(m, src, **limits, **guard)
        for h, f in zip(hyps, free, strict=True):
            # a repeating prefix can only be followed by eos: no shorter prefix repeats
            seq = torch.tensor([[BOS, *h.ids]])
            assert not any(repeating_tail(seq, k, 3, 3) for k in range(len(h.ids)))
            if decode is not beam_search:  # (beam search may prefer a longer hypothesis that never repeats)
                assert len(h.ids) < len(f.ids) and repeating_tail(seq, len(h.ids), 3, 3)
    s = speculative_decode(m, src, **limits, **guard)
    assert [h.ids for h in s] == [h.ids for h in g]
    assert all(math.isclose(a.score, b.score, rel_tol=1e-5, abs_tol=1e-5) for a, b in zip(s, g, strict=True))
    # on models that end on their own, the guard (off or rarely hit) leaves spec == greedy too
    v, vsrc = varied_model(seed), random_sources(seed + 30, 8)
    for kw in ({}, dict(repeat_ngram=2, repeat_times=2)):
        a = greedy_search(v, vsrc, max_len_a=1.0, max_len_b=6, **kw)
        b = speculative_decode(v, vsrc, max_len_a=1.0, max_len_b=6, **kw)
        assert [h.ids for h in a] == [h.ids for h in b]


def test_repetition_guard_waits_for_min_len():
    m = random_model(0, eos_bias=-1e4)
    src = random_sources(0, 3, lo=6, hi=10)
    for decode in (greedy_search, beam_search, speculative_decode):
        hyps = decode(m, src, max_len_a=3.0, max_len_b=10, min_len=7, repeat_ngram=1, repeat_times=2)
        # greedy and spec loop from the start, so they end exactly at min_len (beam may avoid the loop)
        assert all(len(h.ids) == 7 if decode is not beam_search else len(h.ids) >= 7 for h in hyps), decode


# ---------------------------------------------------------------------------- speculative


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_speculative_equals_greedy_on_random_models(seed):
    m = varied_model(seed)
    src = random_sources(seed + 20, 12)
    g = greedy_search(m, src, max_len_a=1.0, max_len_b=6)
    for draft in (1, 2):
        s = speculative_decode(m, src, draft_iterations=draft, max_len_a=1.0, max_len_b=6)
        assert [h.ids for h in s] == [h.ids for h in g]
        assert all(math.isclose(a.score, b.score, rel_tol=1e-5, abs_tol=1e-5) for a, b in zip(s, g, strict=True))
        # each pass accepts at least one token, a NAR draft shares its pass: never more passes than greedy
        assert all(h.passes <= b.passes for h, b in zip(s, g, strict=True))


def test_verification_rows_reproduce_the_full_pass():
    """Ragged cached AR passes (rejected content rows overwritten) equal one full teacher-forced pass."""
    m = random_model(13)
    src = random_sources(13, 3)
    tgt = torch.tensor([[BOS, 7, 8, 9, 10, 11, EOS], [BOS, 5, 6, EOS, PAD, PAD, PAD], [BOS, 9, 9, 9, 9, EOS, PAD]])
    with torch.no_grad():
        enc = m.encode(src)
        rows = build_training_rows(tgt, None, pad=PAD, mask=MASK, ar=True, nar=False, aux=False)
        full = m.decode(rows, enc)[:, rows.num_content :]  # (3, T-1, D) query rows at positions 1..
        cache = KVCache()
        # pass 1 writes junk drafts past position 2, pass 2 rewrites from there with the real tokens
        junk = tgt.clone()
        junk[:, 3:] = 20
        first = build_ar_verify_rows(junk, torch.tensor([0, 0, 0]), torch.tensor([5, 3, 5]), pad=PAD, mask=MASK)
        m.decode(first, enc, cache)
        starts, ends = torch.tensor([2, 1, 3]), torch.tensor([6, 3, 5])
        second = build_ar_verify_rows(tgt, starts, ends, pad=PAD, mask=MASK)
        out = m.decode(second, enc, cache)[:, second.num_content :]
    for b in range(3):
        for j in range(int(ends[b] - starts[b])):
            q = int(starts[b]) + 1 + j  # query position; full pass row q-1
            torch.testing.assert_close(out[b, j], full[b, q - 1], rtol=1e-5, atol=1e-5)


def test_next_token_logprobs_cache_matches_recomputation():
    m = random_model(14)
    src = random_sources(14, 2)
    tokens = torch.tensor([[BOS, 7, 8, 9], [BOS, 5, 6, 7]])
    with torch.no_grad():
        enc = m.encode(src)
        cache = KVCache()
        for step in range(4):
            a = next_token_logprobs(m, enc, tokens, step, cache)
            b = next_token_logprobs(m, enc, tokens, step, None)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- the trained tiny model


def exact(hyps, refs) -> float:
    return sum(h.text == r for h, r in zip(hyps, refs, strict=True)) / len(refs)


def test_trained_model_decodes_the_learned_outputs(synthetic_model):
    import sacrebleu

    from janus.api import Generator

    gen = Generator.from_checkpoint(synthetic_model.checkpoint, device="cpu")
    src, ref = synthetic_model.test_src, synthetic_model.test_ref
    greedy = gen.generate(src, mode="ar", beam_size=1)
    beam = gen.generate(src, mode="ar", beam_size=5)
    spec = gen.generate(src, mode="spec")
    nar = gen.generate(src, mode="nar", iterations=10, length_beam=3, rerank=True)
    nar_plain = gen.generate(src, mode="nar", iterations=4, length_beam=1)
    assert exact(greedy, ref) >= 0.95
    assert exact(beam, ref) >= 0.95
    assert exact(nar, ref) >= 0.9
    assert sacrebleu.corpus_bleu([h.text for h in nar_plain], [ref]).score >= 60
    # speculative decoding is greedy decoding, in far fewer sequential passes
    assert [h.ids for h in spec] == [h.ids for h in greedy]
    mean_spec = sum(h.passes for h in spec) / len(spec)
    mean_greedy = sum(h.passes for h in greedy) / len(greedy)
    assert mean_spec < 0.6 * mean_greedy, (mean_spec, mean_greedy)


# ------------------------------------------------------------------------------------- CUDA


@pytest.fixture(scope="session")
def cuda_device():
    """Skips (before any expensive session fixture listed after it) where there is no CUDA device."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda")


@pytest.mark.gpu
def test_every_mode_on_cuda_matches_cpu(cuda_device, synthetic_model):
    from janus.api import Generator

    src = synthetic_model.test_src
    cpu = Generator.from_checkpoint(synthetic_model.checkpoint, device="cpu")
    gpu = Generator.from_checkpoint(synthetic_model.checkpoint, device="cuda", dtype="float32")
    for kw in ({"mode": "ar", "beam_size": 1}, {"mode": "ar", "beam_size": 5}, {"mode": "spec"},
               {"mode": "nar", "iterations": 10, "length_beam": 3, "rerank": True}):  # fmt: skip
        a, b = cpu.generate(src, **kw), gpu.generate(src, **kw)
        agree = sum(x.ids == y.ids for x, y in zip(a, b, strict=True)) / len(src)
        assert agree >= 0.98, (kw, agree)
    bf16 = Generator.from_checkpoint(synthetic_model.checkpoint, device="cuda")
    assert bf16.dtype in (torch.bfloat16, torch.float16)
    hyps = bf16.generate(src, mode="ar", beam_size=1)
    assert sum(h.text == r for h, r in zip(hyps, synthetic_model.test_ref, strict=True)) >= 90


def test_beam_ranks_its_candidates_alike_in_lists_and_in_one_tensor_sort():
    """A step with few sentences ranks its candidates in Python lists, one with many in a tensor sort: the
    same order (ties to the lower candidate, NaN first as +inf, -inf last), so that a sentence's beam does
    not depend on the batch it is decoded in."""
    import random

    bs = importlib.import_module("janus.decoding.beam_search")
    rng = random.Random(0)
    special = [0.0, -1.0, -2.5, -math.inf, math.nan]
    for _ in range(300):
        K, per, nb = rng.randint(1, 5), rng.randint(1, 10), rng.randint(1, 4)
        top = [rng.choice(special) if rng.random() < 0.3 else rng.uniform(-9, 0) for _ in range(nb * K * per)]
        sums = [rng.choice(special[:4]) if rng.random() < 0.3 else rng.uniform(-20, 0) for _ in range(nb * K)]
        row_top = torch.tensor(top, dtype=torch.float32).view(nb * K, per)
        m = min(2 * K, K * per)
        saved = bs._HOST_RANKED
        try:
            bs._HOST_RANKED = nb
            lists = bs._ranked(sums, row_top, K, m)
            bs._HOST_RANKED = 0
            tensor = bs._ranked(sums, row_top, K, m)
        finally:
            bs._HOST_RANKED = saved
        assert lists == tensor
        for ranked in lists:
            assert len(ranked) == m and all(a[0] >= b[0] for a, b in zip(ranked, ranked[1:]))
