"""Self-speculative decoding v2: fused NAR drafts, Jacobi drafts, bounded blocks, relaxed verification."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from ext_helpers import require_kernel
from test_decoding import BOS, EOS, MASK, PAD, random_model, random_sources, varied_model

from janus.config import DecodeConfig
from janus.decoding import greedy_search, speculative_decode
from janus.decoding.common import banned_ids
from janus.decoding.speculative import POLICIES, fused_rows, lookup_shift
from janus.model import KVCache
from janus.ops.ar_topk import ar_rules, mask_disallowed
from janus.streams import build_ar_verify_rows, build_ar_verify_rows_host, build_canvas_rows, build_training_rows

LIMITS = dict(max_len_a=1.0, max_len_b=6)
VARIANTS = [
    dict(policy=policy, block=block, draft_iterations=T)
    for policy, block, T in itertools.product(POLICIES, (0, 1, 3), (1, 2))
    if not (T == 2 and block == 1)
] + [dict(policy="exhausted", block=block, keep_draft=False) for block in (0, 3)]
BY_POSITION = (("exhausted", 4, 1), ("first", 0, 1), ("always", 2, 2), ("stall", 0, 3))  # the rest: lookup
VARIANTS += [dict(policy=policy, block=block, draft_iterations=T, align="position") for policy, block, T in BY_POSITION]


def assert_greedy(spec, greedy, what) -> None:
    """Same ids and scores as greedy search, and never more decoder passes, sentence by sentence."""
    assert [h.ids for h in spec] == [h.ids for h in greedy], what
    for i, (s, g) in enumerate(zip(spec, greedy, strict=True)):
        assert math.isclose(s.score, g.score, rel_tol=1e-5, abs_tol=1e-5), (what, i)
        assert 1 <= s.passes <= g.passes == len(g.ids) + 1, (what, i, s.passes, g.passes)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_variant_equals_greedy_in_at_most_its_passes(seed):
    m = varied_model(seed)
    src = random_sources(seed + 40, 10)
    g = greedy_search(m, src, **LIMITS)
    for kw in VARIANTS:
        assert_greedy(speculative_decode(m, src, **kw, **LIMITS), g, kw)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_weights_worst_case_long_outputs(seed):
    """Random weights, outputs that run to the length limit or to forced lengths: drafts are
    almost never right, and spec still costs no more passes than greedy for any sentence."""
    m = random_model(seed, eos_bias=-1e4)
    src = random_sources(seed, 6, lo=4, hi=12)
    limits = dict(max_len_a=2.0, max_len_b=8)
    forced = torch.tensor([1, 3, 9, 17, 5, 12])
    for target in (None, forced):
        g = greedy_search(m, src, target_lengths=target, **limits)
        for kw in VARIANTS:
            s = speculative_decode(m, src, target_lengths=target, **kw, **limits)
            assert_greedy(s, g, (kw, target is not None))


@pytest.mark.parametrize("kw", [dict(policy="exhausted"), dict(policy="always", block=2, draft_iterations=3),
                                dict(policy="stall", top_beta=3, tolerance=2.0),
                                dict(policy="exhausted", align="position", draft_iterations=2)])  # fmt: skip
def test_batch_invariance(kw):
    """A sentence's result, passes included, does not depend on the batch it is decoded in."""
    m = varied_model(6)
    src = random_sources(7, 7)
    together = speculative_decode(m, src, **kw, **LIMITS)
    for b in range(src.shape[0]):
        row = src[b : b + 1, : int((src[b] != PAD).sum())]
        alone = speculative_decode(m, row, **kw, **LIMITS)[0]
        assert alone.ids == together[b].ids
        assert alone.passes == together[b].passes
        assert math.isclose(alone.score, together[b].score, rel_tol=1e-4, abs_tol=1e-4)


def teacher_forced_logprobs(m, src, ids):
    """log P_AR of every next token after [bos, *ids] (positions 1 .. len(ids) + 1): (len(ids) + 1, V)."""
    tgt = torch.tensor([[BOS, *ids, EOS]])
    with torch.no_grad():
        rows = build_training_rows(tgt, None, pad=PAD, mask=MASK, ar=True, nar=False, aux=False)
        h = m.decode(rows, m.encode(src)).flatten(0, 1)[rows.ar_rows]
        return F.log_softmax(m.project(h).float(), -1)


@pytest.mark.parametrize("seed", [0, 3])
def test_relaxed_verification(seed):
    m = varied_model(seed)
    src = random_sources(seed + 50, 8)
    g = greedy_search(m, src, **LIMITS)
    # tolerance 0 admits only tokens as likely as the best: greedy's output again
    assert_greedy(speculative_decode(m, src, top_beta=4, tolerance=0.0, **LIMITS), g, "tolerance 0")
    beta, tol = 3, 3.0
    relaxed = speculative_decode(m, src, top_beta=beta, tolerance=tol, **LIMITS)
    for b, h in enumerate(relaxed):
        logp = teacher_forced_logprobs(m, src[b : b + 1], h.ids)
        most = torch.floor(((src[b] != PAD).sum() - 1) * LIMITS["max_len_a"] + LIMITS["max_len_b"]).long()
        rules = ar_rules(torch.arange(len(h.ids) + 1), torch.tensor(1), most)
        mask_disallowed(logp, banned_ids(m.cfg.specials), EOS, rules)
        chosen = torch.tensor([*h.ids, EOS])
        lp = logp.gather(1, chosen[:, None]).squeeze(1)
        top = logp.topk(beta, -1).values
        # every token is among the AR's top beta (under greedy's rules) and within the tolerance of its best
        assert bool((lp >= top[:, -1] - 1e-5).all()) and bool((lp >= top[:, 0] - tol - 1e-5).all())
        assert math.isclose(h.score, float(lp.sum()) / (len(h.ids) + 1), rel_tol=1e-4, abs_tol=1e-4)
        assert h.passes <= len(h.ids) + 1


def test_fused_rows_keep_the_two_streams_apart():
    """An AR verification pass with a NAR canvas in it gives the AR rows of the pass without it and
    the canvas rows of a plain canvas pass; the cache then serves the next pass as if no canvas was there."""
    m = random_model(13)
    src = random_sources(13, 3)
    tgt = torch.tensor([[BOS, 7, 8, 9, 10, 11, EOS], [BOS, 5, 6, EOS, PAD, PAD, PAD], [BOS, 9, 9, 9, 9, EOS, PAD]])
    canvas = torch.tensor([[BOS, MASK, MASK, 6, EOS, PAD], [PAD] * 6, [BOS, 12, MASK, MASK, MASK, EOS]])
    with torch.no_grad():
        enc = m.encode(src)
        starts, ends = torch.tensor([0, 0, 0]), torch.tensor([3, 2, 4])
        plain_cache, fused_cache = KVCache(), KVCache()
        ar = build_ar_verify_rows(tgt, starts, ends, pad=PAD, mask=MASK)
        plain = m.decode(ar, enc, plain_cache)
        fused = m.decode(fused_rows(ar, canvas, pad=PAD), enc, fused_cache)
        Ca, Lc = ar.num_content, canvas.shape[1]
        torch.testing.assert_close(fused[:, Ca + Lc :], plain[:, Ca:], rtol=1e-5, atol=1e-5)
        nar = m.decode(build_canvas_rows(canvas, pad=PAD), m.encode(src))
        for b in (0, 2):
            real = canvas[b] != PAD
            torch.testing.assert_close(fused[b, Ca : Ca + Lc][real], nar[b][real], rtol=1e-5, atol=1e-5)
        # the next pass continues from the accepted prefix on both caches alike
        nxt = build_ar_verify_rows(tgt, ends - 1, ends + 1, pad=PAD, mask=MASK)
        a = m.decode(nxt, enc, plain_cache)[:, nxt.num_content :]
        b = m.decode(nxt, enc, fused_cache)[:, nxt.num_content :]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_options_name_the_value():
    m = random_model(0)
    src = random_sources(0, 2)
    for kw, text in ((dict(policy="sometimes"), "sometimes"), (dict(block=-1), "block=-1"),
                     (dict(top_beta=0), "top_beta=0"), (dict(draft_iterations=0), "draft_iterations=0"),
                     (dict(align="nearest"), "nearest")):  # fmt: skip
        with pytest.raises(ValueError, match=text):
            speculative_decode(m, src, **kw)
    bad = ((dict(draft_policy="never"), "never"), (dict(draft_block=-2), "-2"),
           (dict(verify_top_beta=0), "verify_top_beta=0"), (dict(verify_tolerance=-1.0), "-1.0"),
           (dict(draft_align="nearest"), "nearest"))  # fmt: skip
    for kw, text in bad:
        with pytest.raises(ValueError, match=text):
            DecodeConfig(mode="spec", **kw)


def test_trained_model_spec_variants_equal_greedy_in_fewer_passes(synthetic_model):
    from janus.api import Generator

    gen = Generator.from_checkpoint(synthetic_model.checkpoint, device="cpu")
    src = synthetic_model.test_src[:48]
    greedy = gen.generate(src, mode="ar", beam_size=1)
    mean_greedy = sum(h.passes for h in greedy) / len(greedy)
    runs = [(p, 0, 1, "position") for p in POLICIES] + [
        ("exhausted", 4, 1, "position"),
        ("exhausted", 0, 2, "position"),
    ]
    runs += [("exhausted", 4, 1, "lookup"), ("always", 4, 2, "lookup")]
    for policy, block, T, align in runs:
        kw = dict(draft_policy=policy, draft_block=block, draft_iterations=T, draft_align=align)
        spec = gen.generate(src, mode="spec", **kw)
        assert_greedy(spec, greedy, kw)
        mean = sum(h.passes for h in spec) / len(spec)
        assert mean < 0.6 * mean_greedy, (kw, mean, mean_greedy)


@pytest.mark.parametrize("seed,keep,host", [(0, True, False), (1, True, False), (0, False, False), (0, True, True),
                                            (0, False, True)])  # fmt: skip
def test_draft_tokens_past_a_rejected_one_stay_in_the_draft(seed, keep, host, monkeypatch):
    """Pass 1 carries a NAR canvas whose tokens are greedy's up to position k and others from k on;
    pass 2 verifies that draft and rejects its token k. What pass 3 verifies past the new prefix is the
    draft's own tokens, not the AR's tokens of pass 2 there (predicted from the rejected token); with
    ``keep_draft=False``, the AR's tokens. Through the tensor loop and the host loop."""
    import janus.decoding.speculative as spec_module

    m = random_model(seed)
    src = random_sources(seed + 7, 6, lo=6, hi=10)
    forced = torch.tensor([7, 9, 8, 10, 6, 9])
    g = greedy_search(m, src, target_lengths=forced, **LIMITS)
    V = m.cfg.vocab_size
    draft = torch.full((len(g), int(forced.max()) + 2), PAD)
    wrong = [2 + b % 3 for b in range(len(g))]  # k: the first wrong token's position
    for b, h in enumerate(g):
        ids = torch.tensor([BOS, *h.ids, EOS])
        k = wrong[b]
        ids[k:-1] = 5 + (ids[k:-1] - 5 + 1) % (V - 5)  # other ordinary tokens from k on
        draft[b, : len(ids)] = ids

    def nar_draft(hidden, weight, tokens, scores, mask, banned, **_):  # pass 1's canvas, every sentence
        slots = tokens == mask
        tokens[slots] = draft[:, : tokens.shape[1]][slots]
        return tokens, scores

    verified = []
    name = "_host_pass" if host else "build_ar_verify_rows"
    build = getattr(spec_module, name)

    def record(*args, **kw):
        tokens, starts = args[3:5] if host else args[:2]
        verified.append((torch.as_tensor(tokens).clone(), torch.as_tensor(starts).clone()))
        return build(*args, **kw)

    monkeypatch.setattr(spec_module, "_HOST_SENTENCES", len(g) if host else 0)
    monkeypatch.setattr(spec_module, "mask_predict_update", nar_draft)
    monkeypatch.setattr(spec_module, name, record)
    s = speculative_decode(
        m, src, target_lengths=forced, policy="first", block=0, keep_draft=keep, align="position", **LIMITS
    )
    assert [h.ids for h in s] == [h.ids for h in g]
    tokens, starts = verified[2]  # pass 3: every sentence still decoding (the draft's tail is wrong)
    kept = []
    for b, h in enumerate(g):
        k, n = wrong[b], len(h.ids) + 2
        assert int(starts[b]) == k  # prefix y_0 .. y_k: pass 2 accepted up to the AR's token at k
        kept.append(tokens[b, k + 1 : n - 1].tolist() == draft[b, k + 1 : n - 1].tolist())
    # keep=False: the AR's tokens of pass 2 (predicted from the wrong token) replaced the draft's
    assert kept == [keep] * len(g)


def test_lookup_shift_finds_the_longest_key_nearest_its_position():
    X = PAD
    tok = torch.tensor([[BOS, 7, 8, 9, X, X, X, X], [BOS, 20, 21, X, X, X, X, X],
                        [BOS, 7, 7, 7, 7, 7, X, X], [BOS, X, X, X, X, X, X, X],
                        [BOS, 5, 6, 9, X, X, X, X]])  # fmt: skip
    p = torch.tensor([4, 3, 6, 1, 4])
    source = torch.tensor([[BOS, 7, 9, 8, 9, 10, EOS, X, X, X],  # [8, 9] one column later: shift +1
                           [BOS, 5, 6, EOS, X, X, X, X, X, X],  # no key occurs
                           [BOS, 7, 7, 7, 7, 7, 7, 7, 9, EOS],  # [7, 7, 7] everywhere: the aligned one
                           [BOS, 5, EOS, X, X, X, X, X, X, X],  # the key is bos alone
                           [BOS, 6, 9, 11, EOS, X, X, X, X, X]])  # last: [5, 6, 9] absent, [6, 9] early  # fmt: skip
    shift, found = lookup_shift(tok, p, source, pad=PAD)
    assert found.tolist() == [True, False, True, True, True]
    assert shift.tolist() == [1, 0, 0, 0, -1]
    # the draft at the next position q = p follows the key in the source
    nxt = source.gather(1, (p + shift).clamp_max(source.shape[1] - 1)[:, None]).squeeze(1)
    assert [int(nxt[b]) for b in (0, 2, 3, 4)] == [10, 7, 5, 11]
    # a key is never matched against padding, and at most ``longest`` tokens long
    shift1, found1 = lookup_shift(tok[:1], p[:1], source[:1], pad=PAD, longest=1)
    # 9 is at columns 2 and 4, one either side of the key's column 3: a tie goes to the earlier
    assert found1.tolist() == [True] and shift1.tolist() == [-1]


def test_lookup_shift_on_the_host_equals_the_tensor_ops(monkeypatch):
    """Few rows of CPU tensors take the host path; it finds the tensor ops' keys, shifts and ties."""
    import janus.decoding.speculative as spec_module

    g = torch.Generator().manual_seed(5)
    cases = []
    for _ in range(200):
        N, L, Ls = int(torch.randint(1, 4, (1,), generator=g)), 12, int(torch.randint(4, 30, (1,), generator=g))
        tok = torch.randint(5, 9, (N, L), generator=g)  # four words: keys recur often
        tok[:, 0] = BOS
        p = torch.randint(1, L, (N,), generator=g)
        source = torch.randint(5, 9, (N, Ls), generator=g)
        source[:, 0] = BOS
        cut = torch.randint(2, Ls + 1, (N,), generator=g)
        source[torch.arange(Ls)[None, :] >= cut[:, None]] = PAD
        cases.append((tok, p, source, int(torch.randint(1, 4, (1,), generator=g))))
    host = [lookup_shift(t, q, s, pad=PAD, longest=k) for t, q, s, k in cases]
    monkeypatch.setattr(spec_module, "_HOST_LOOKUP_CELLS", 0)
    ops = [lookup_shift(t, q, s, pad=PAD, longest=k) for t, q, s, k in cases]
    assert sum(bool(f.any()) for _, f in ops) > 100  # keys were found
    for (a, fa), (b, fb) in zip(host, ops, strict=True):
        assert torch.equal(a, b) and torch.equal(fa, fb)


def test_lookup_realigns_a_canvas_with_an_inserted_token(synthetic_model, monkeypatch):
    """Pass 1's canvas is greedy's output with one extra token at position k (and, its length being
    greedy's, without greedy's last token). Position drafts miss every token past k; lookup finds the AR's
    token of pass 2 one column later in the canvas and drafts the rest from there: pass 3 accepts up to
    the last token, pass 4 the eos."""
    import janus.decoding.speculative as spec_module
    from janus.api import Generator

    gen = Generator.from_checkpoint(synthetic_model.checkpoint, device="cpu")
    m = gen.model
    src_ids = gen.encode(synthetic_model.test_src)
    rows = [s + [EOS] for s in src_ids]
    src = torch.full((len(rows), max(map(len, rows))), PAD)
    for b, r in enumerate(rows):
        src[b, : len(r)] = torch.tensor(r)
    g = greedy_search(m, src, **LIMITS)
    # sentences of 6+ tokens, none repeated (so a token's column in the canvas is unambiguous)
    pick = [b for b, h in enumerate(g) if len(h.ids) >= 6 and len(set(h.ids)) == len(h.ids)][:6]
    assert len(pick) >= 3
    src, g = src[pick], [g[b] for b in pick]
    forced = torch.tensor([len(h.ids) for h in g])
    V = m.cfg.vocab_size
    draft = torch.full((len(g), int(forced.max()) + 3), PAD)
    for b, h in enumerate(g):
        k = 2 + b % 3
        extra = next(t for t in range(5, V) if t not in h.ids)
        canvas = [BOS, *h.ids[: k - 1], extra, *h.ids[k - 1 : -1], EOS]
        draft[b, : len(canvas)] = torch.tensor(canvas)

    def nar_draft(hidden, weight, tokens, scores, mask, banned, **_):
        slots = tokens == mask
        tokens[slots] = draft[:, : tokens.shape[1]][slots]
        return tokens, scores

    monkeypatch.setattr(spec_module, "mask_predict_update", nar_draft)
    passes = {}
    for align in ("position", "lookup"):
        s = speculative_decode(m, src, target_lengths=forced, policy="first", block=0, align=align, **LIMITS)
        assert [h.ids for h in s] == [h.ids for h in g]
        passes[align] = [h.passes for h in s]
    assert passes["lookup"] == [4] * len(g)
    assert all(a > 4 for a in passes["position"]), passes


def test_host_rows_equal_the_tensor_rows():
    """``build_ar_verify_rows_host`` builds the rows ``build_ar_verify_rows`` builds, field by field."""
    g = torch.Generator().manual_seed(3)
    for _ in range(100):
        B, L = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(3, 16, (1,), generator=g))
        tokens = torch.randint(5, 30, (B, L), generator=g)
        tokens[:, 0] = BOS
        starts = torch.randint(0, L - 1, (B,), generator=g)
        ends = starts + 1 + (torch.rand(B, generator=g) * (L - 1 - starts)).long()
        want = build_ar_verify_rows(tokens, starts, ends, pad=PAD, mask=MASK)
        got = build_ar_verify_rows_host(tokens.tolist(), starts.tolist(), ends.tolist(), pad=PAD, mask=MASK,
                                        device=torch.device("cpu"))  # fmt: skip
        assert got.num_content == want.num_content and got.max_position == want.max_position
        for name in ("tokens", "positions", "kinds", "ranks", "visibility", "cache_columns", "visible_span"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_a_host_pass_from_spans_equals_its_rows(monkeypatch):
    """``_host_pass`` builds the kernel's arguments from host ints (``JanusModel.decode_spans``): the same hidden
    states and cache writes as ``build_ar_verify_rows_host`` + ``fused_rows`` + ``decode``, with windows of
    different sizes (pad rows), canvases of different lengths and a sentence without one."""
    import janus.decoding.speculative as spec_module

    require_kernel("decoder_step", "cpu")

    m = random_model(4).eval()
    src = random_sources(9, 3)
    tokens = [[BOS, *range(10, 30)] for _ in range(3)]
    starts, window = [3, 0, 6], [5, 2, 1]
    canvases = [[BOS, MASK, 12, MASK, EOS, PAD, PAD], [PAD] * 7, [BOS, 13, MASK, MASK, 14, MASK, EOS]]
    runs, through_spans = [], []
    decode_spans = m.decode_spans

    def spy(*a, **k):
        out = decode_spans(*a, **k)
        through_spans.append(out is not None)
        return out

    for fast in (True, False):
        with torch.inference_mode(), monkeypatch.context() as patch:
            patch.setattr(m, "decode_spans", spy if fast else lambda *a, **k: None)
            enc = m.encode(src)
            cache = KVCache()
            prefix = build_ar_verify_rows(torch.tensor(tokens), torch.zeros(3, dtype=torch.long),
                                          torch.tensor(starts), pad=PAD, mask=MASK)  # fmt: skip
            m.decode(prefix, enc, cache)
            hidden = spec_module._host_pass(m, enc, cache, tokens, starts, window, canvases, pad=PAD, mask=MASK)
            runs.append((hidden.clone(), cache.length, [t.clone() for c in cache.layers for t in (c.self_k, c.self_v)]))
    (fast_h, fast_len, fast_kv), (rows_h, rows_len, rows_kv) = runs
    assert through_spans == [True]  # the kernel took the fast pass
    assert fast_h.shape == (3, 2 * 5 + 7, m.cfg.d_model)
    assert torch.equal(fast_h, rows_h) and fast_len == rows_len == 6 + 5 + 7
    for a, b in zip(fast_kv, rows_kv, strict=True):
        assert torch.equal(a[:, :, :fast_len], b[:, :, :rows_len])


def _both_loops(m, src, monkeypatch, sizes=(1, 2, 4), **kw):
    """Every sentence of ``src`` decoded in batches of each size through the host loop, and all of them through
    the tensor loop; the two must agree hypothesis by hypothesis (ids, passes, score)."""
    import janus.decoding.speculative as spec_module

    with monkeypatch.context() as patch:
        patch.setattr(spec_module, "_HOST_SENTENCES", 0)
        tensor = speculative_decode(m, src, **kw)
    for size in sizes:
        with monkeypatch.context() as patch:
            patch.setattr(spec_module, "_HOST_SENTENCES", size)

            def unused(*args, **kwargs):
                raise AssertionError("the tensor loop ran")

            patch.setattr(spec_module, "build_ar_verify_rows", unused)
            host = []
            for b in range(0, src.shape[0], size):
                part = src[b : b + size]
                part = part[:, : int((part != PAD).sum(1).max())]
                host += speculative_decode(m, part, **{k: v[b : b + size] if isinstance(v, torch.Tensor) else v
                                                       for k, v in kw.items()})  # fmt: skip
        for i, (h, t) in enumerate(zip(host, tensor, strict=True)):
            assert (h.ids, h.passes) == (t.ids, t.passes), (kw, size, i)
            assert math.isclose(h.score, t.score, rel_tol=1e-6, abs_tol=1e-6), (kw, size, i)
    return tensor


@pytest.mark.parametrize("seed", [0, 1])
def test_host_loop_equals_the_tensor_loop(seed, monkeypatch):
    """A few sentences on a CPU keep the bookkeeping on the host: the same passes, drafts and results as the
    tensor loop for every variant, with forced lengths and the repetition guard."""
    m = varied_model(seed)
    src = random_sources(seed + 60, 6)
    for kw in VARIANTS + [dict(policy="first", block=0, keep_draft=False, align="position")]:
        _both_loops(m, src, monkeypatch, **kw, **LIMITS)
    worst = random_model(seed, eos_bias=-1e4)
    src = random_sources(seed + 61, 4, lo=4, hi=12)
    forced = torch.tensor([1, 9, 17, 5])
    for kw in (VARIANTS[0], VARIANTS[-1], dict(policy="always", block=2, draft_iterations=3)):
        _both_loops(worst, src, monkeypatch, target_lengths=forced, max_len_a=2.0, max_len_b=8, **kw)
        _both_loops(worst, src, monkeypatch, repeat_ngram=2, repeat_times=2, max_len_a=2.0, max_len_b=8, **kw)


def test_host_loop_equals_the_tensor_loop_with_good_drafts(synthetic_model, monkeypatch):
    """The synthetic model's drafts are mostly right: lookups, kept drafts and multi-pass canvases are
    exercised, and both loops still agree."""
    from janus.api import Generator

    gen = Generator.from_checkpoint(synthetic_model.checkpoint, device="cpu")
    rows = [s + [EOS] for s in gen.encode(synthetic_model.test_src[:12])]
    src = torch.full((len(rows), max(map(len, rows))), PAD)
    for b, r in enumerate(rows):
        src[b, : len(r)] = torch.tensor(r)
    g = greedy_search(gen.model, src, **LIMITS)
    for kw in (dict(), dict(block=0, draft_iterations=3), dict(policy="always", align="position", block=2),
               dict(policy="stall", draft_iterations=2, keep_draft=False),
               dict(policy="first", block=0, keep_draft=False, align="position")):  # fmt: skip
        spec = _both_loops(gen.model, src, monkeypatch, sizes=(1, 3), **kw, **LIMITS)
        assert_greedy(spec, g, kw)
        assert sum(h.passes for h in spec) < 0.7 * sum(h.passes for h in g), kw
