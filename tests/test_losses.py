"""The JANUS objective: each term against a direct per-token formula, SKL gradients, normalisation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from janus.config import LossWeights, preset
from janus.decoding.mask_predict import mask_predict
from janus.losses import LOG_TERMS, Counts, compute_loss, expose_observed, first_pass_tokens, summarize, training_rows
from janus.model import JanusModel
from janus.ops.janus_loss import TERMS, LossScales, janus_loss_ref

PAD, BOS, EOS, MASK = 0, 1, 2, 4


def direct_terms(a, ya, b, c, yb, pair, eps):
    """Per-token formulas written with Python floats, term by term (JANUS.md section 3)."""

    def logsm(row):
        mx = max(row)
        lse = mx + math.log(sum(math.exp(x - mx) for x in row))
        return [x - lse for x in row]

    def ls(row, y):
        lp = logsm(row)
        return (1 - eps) * -lp[y] - eps * sum(lp) / len(lp), -lp[y]

    def kl(p_row, q_row):
        lp, lq = logsm(p_row), logsm(q_row)
        return sum(math.exp(x) * (x - z) for x, z in zip(lp, lq))

    def skl(p_row, q_row):
        return (kl(p_row, q_row) + kl(q_row, p_row)) / 2

    out = dict.fromkeys(TERMS, 0.0)
    for row, y in zip(a.tolist(), ya.tolist()):
        s, n = ls(row, y)
        out["ar"] += s
        out["ar_nll"] += n
    for j, y in enumerate(yb.tolist()):
        bj, cj, aj = b[j].tolist(), c[j].tolist(), a[pair[j]].tolist()
        s, n = ls(bj, y)
        out["nar"] += s
        out["nar_nll"] += n
        s, n = ls(cj, y)
        out["aux"] += s
        out["aux_nll"] += n
        out["skl_ar_nar"] += skl(aj, bj)
        out["skl_ar_aux"] += skl(aj, cj)
        out["skl_nar_aux"] += skl(bj, cj)
    return out


def random_case(N=6, M=4, V=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(N, V, generator=g) * 2).to(dtype)
    b = (torch.randn(M, V, generator=g) * 2).to(dtype)
    c = (torch.randn(M, V, generator=g) * 2).to(dtype)
    ya = torch.randint(0, V, (N,), generator=g)
    yb = torch.randint(0, V, (M,), generator=g)
    pair = torch.randperm(N, generator=g)[:M]
    return a, ya, b, c, yb, pair


SCALES = LossScales(ar=1.0, nar=0.5, aux=0.5, skl_ar_nar=1.0, skl_ar_aux=3.0, skl_nar_aux=1.0)


@pytest.mark.parametrize("V", [11, 1031])
def test_each_term_matches_direct_formula(V):
    a, ya, b, c, yb, pair = random_case(V=V)
    out = janus_loss_ref(a, ya, b, c, yb, pair, 0.1, SCALES)
    expect = direct_terms(a, ya, b, c, yb, pair, 0.1)
    for name, got in zip(TERMS, out.sums.tolist()):
        assert got == pytest.approx(expect[name], rel=1e-5, abs=1e-5), name
    total = sum(getattr(SCALES, k) * expect[k] for k in TERMS[:6])
    assert float(out.loss) == pytest.approx(total, rel=1e-5)


def test_low_precision_inputs_are_computed_in_fp32():
    a, ya, b, c, yb, pair = random_case(dtype=torch.float16)
    out = janus_loss_ref(a, ya, b, c, yb, pair, 0.1, SCALES)
    assert out.loss.dtype == torch.float32
    ref = janus_loss_ref(a.float(), ya, b.float(), c.float(), yb, pair, 0.1, SCALES)
    torch.testing.assert_close(out.sums, ref.sums)


def test_skl_gradient_matches_closed_form_into_both_sides():
    a, _, b, _, _, _ = random_case(N=5, M=5, V=13)
    a = a.double().requires_grad_()
    b = b.double().requires_grad_()
    ya = torch.zeros(5, dtype=torch.long)
    only_skl = LossScales(skl_ar_nar=1.0)
    out = janus_loss_ref(a, ya, b, None, ya, torch.arange(5), 0.1, only_skl)
    out.loss.backward()

    def closed_form(x, y):  # dSKL/dx_v = (p_v (l_p,v - l_q,v - KL(p||q)) + p_v - q_v) / 2
        lp, lq = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
        p, q = lp.exp(), lq.exp()
        kl = (p * (lp - lq)).sum(-1, keepdim=True)
        return (p * (lp - lq - kl) + p - q) / 2

    torch.testing.assert_close(a.grad, closed_form(a.detach(), b.detach()))
    torch.testing.assert_close(b.grad, closed_form(b.detach(), a.detach()))


@pytest.mark.parametrize("factor", [0.0, 0.5])
def test_skl_grad_ar_scales_only_the_skl_gradient_into_p_ar(factor):
    """LossScales.skl_grad_ar: the value is the objective's; the gradient of the P_AR logits is the CE's
    plus ``factor`` times the SKL terms' share; P_NAR and P_AUX get their full gradients."""

    def grads(scales):
        xs = [t.double().requires_grad_() for t in (a, b, c)]
        out = janus_loss_ref(xs[0], ya, xs[1], xs[2], yb, pair, 0.1, scales)
        out.loss.backward()
        return out.loss.detach(), [x.grad for x in xs]

    a, ya, b, c, yb, pair = random_case(N=6, M=4, V=17)
    full_loss, full = grads(SCALES)
    no_skl_ar = dataclasses.replace(SCALES, skl_ar_nar=0.0, skl_ar_aux=0.0)
    _, ce_only = grads(no_skl_ar)
    loss, got = grads(dataclasses.replace(SCALES, skl_grad_ar=factor))
    torch.testing.assert_close(loss, full_loss)
    torch.testing.assert_close(got[0], ce_only[0] + factor * (full[0] - ce_only[0]))
    torch.testing.assert_close(got[1], full[1])
    torch.testing.assert_close(got[2], full[2])


def test_full_loss_gradcheck_float64():
    a, ya, b, c, yb, pair = random_case(N=4, M=3, V=7)
    args = [t.double().requires_grad_() for t in (a, b, c)]

    def f(a_, b_, c_):
        return janus_loss_ref(a_, ya, b_, c_, yb, pair, 0.1, SCALES).loss

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-5)


def test_ignore_index_rows_contribute_nothing():
    a, ya, b, c, yb, pair = random_case()
    ya2, yb2 = ya.clone(), yb.clone()
    ya2[0] = -100
    yb2[1] = -100
    keep_a = torch.arange(len(ya)) != 0
    keep_m = torch.arange(len(yb)) != 1
    out = janus_loss_ref(a, ya2, b, c, yb2, pair, 0.1, SCALES)
    # dropping the rows by hand: the AR rows stay (SKL pairs point into them); only their CE goes
    ar_only = janus_loss_ref(a[keep_a], ya[keep_a], None, None, None, None, 0.1, SCALES)
    masked = janus_loss_ref(a, ya, b[keep_m], c[keep_m], yb[keep_m], pair[keep_m], 0.1, SCALES)
    torch.testing.assert_close(out.sums[[0, 6]], ar_only.sums[[0, 6]])
    torch.testing.assert_close(out.sums[[1, 2, 3, 4, 5, 7, 8]], masked.sums[[1, 2, 3, 4, 5, 7, 8]])


def toy_batch(B=4, T=8, S=6, V=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    tgt = torch.randint(5, V, (B, T), generator=g)
    src = torch.randint(5, V, (B, S), generator=g)
    masked = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        n = T - b
        tgt[b, 0], tgt[b, n - 1] = BOS, EOS
        tgt[b, n:] = PAD
        masked[b, 1 : n - 1] = torch.rand(n - 2, generator=g) < 0.6
        masked[b, 1] = True
        src[b, S - 1 - b % 2 :] = PAD
        src[b, S - 2 - b % 2] = EOS
    return src, tgt, masked


@pytest.mark.parametrize("objective", ["janus", "ar", "cmlm"])
def test_accumulated_micro_batches_equal_one_batch(objective):
    torch.manual_seed(0)
    model = JanusModel(preset("tiny", vocab_size=40, dropout=0.0))
    w = LossWeights.for_objective(objective)
    src, tgt, masked = toy_batch()
    kw = dict(objective=objective, weights=w, label_smoothing=0.1)
    whole = compute_loss(model, src, tgt, masked, **kw)
    g_whole = torch.autograd.grad(whole.loss, list(model.parameters()), allow_unused=True)
    halves = [(src[:2], tgt[:2], masked[:2]), (src[2:], tgt[2:], masked[2:])]
    norm = sum((Counts.of_batch((t != PAD).sum(1), m) for _, t, m in halves), Counts())
    assert norm == whole.counts
    parts = [compute_loss(model, s, t, m, norm=norm, **kw) for s, t, m in halves]
    loss = parts[0].loss + parts[1].loss
    g_parts = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, whole.loss, rtol=1e-5, atol=1e-6)
    for x, y in zip(g_whole, g_parts):
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    logged = summarize(parts[0].sums + parts[1].sums, norm, w)
    assert logged["loss"] == pytest.approx(float(whole.loss.detach()), rel=1e-5)


def test_objectives_use_their_terms_only():
    torch.manual_seed(0)
    model = JanusModel(preset("tiny", vocab_size=40))
    src, tgt, masked = toy_batch()
    for objective, nonzero in (("ar", {"ar", "ar_nll"}), ("cmlm", {"nar", "nar_nll", "length"})):
        out = compute_loss(
            model,
            src,
            tgt,
            masked,
            objective=objective,
            weights=LossWeights.for_objective(objective),
            label_smoothing=0.1,
        )
        got = {k for k, v in summarize(out.sums, out.counts, LossWeights()).items() if v != 0 and k != "loss"}
        assert got == nonzero, objective
    out = compute_loss(model, src, tgt, masked, objective="janus", weights=LossWeights(), label_smoothing=0.1)
    assert (out.sums != 0).all()
    with pytest.raises(ValueError, match="unknown objective"):
        compute_loss(model, src, tgt, masked, objective="nat", weights=LossWeights(), label_smoothing=0.1)


def test_first_pass_tokens_are_mask_predicts_first_pass():
    """The tokens error exposure puts on the canvas are those a one-pass mask-predict of the same
    length decodes (the inference code is the oracle), specials never among them."""
    torch.manual_seed(0)
    model = JanusModel(preset("tiny", vocab_size=40, dropout=0.0)).eval()
    src, tgt, _ = toy_batch()
    lengths = (tgt != PAD).sum(1)
    got, scores = first_pass_tokens(model, model.encode(src), tgt)
    want = mask_predict(model, src, iterations=1, length_beam=1, target_lengths=lengths - 2)
    for b, hyp in enumerate(want):
        n = int(lengths[b])
        assert got[b, 1 : n - 1].tolist() == hyp.ids
        assert got[b, 0] == BOS and got[b, n - 1] == EOS and (got[b, n:] == PAD).all()


def test_expose_observed_replaces_only_the_observed_canvas_tokens():
    torch.manual_seed(0)
    model = JanusModel(preset("tiny", vocab_size=40, dropout=0.0)).eval()
    src, tgt, masked = toy_batch()
    B, T = tgt.shape
    rows = training_rows(tgt, masked, "janus", pad=PAD, mask=model.cfg.specials.mask)
    enc = model.encode(src)
    first, _ = first_pass_tokens(model, enc, tgt)
    torch.manual_seed(3)
    out = expose_observed(model, enc, tgt, masked, rows, 1.0, "janus")
    canvas = out.tokens[:, T - 1 : 2 * T - 1]
    n = (tgt != PAD).sum(1, keepdim=True)
    pos = torch.arange(T)[None, :]
    observed = (pos >= 1) & (pos < n - 1) & ~masked
    assert observed.any() and (first[observed] != tgt[observed]).any()  # the case exposes something
    torch.testing.assert_close(canvas[observed], first[observed], rtol=0, atol=0)
    torch.testing.assert_close(canvas[~observed], rows.tokens[:, T - 1 : 2 * T - 1][~observed], rtol=0, atol=0)
    # Outside the canvas (AR rows, gold rows of P_AUX, queries) nothing moves; targets are the references.
    outside = torch.ones_like(rows.tokens, dtype=torch.bool)
    outside[:, T - 1 : 2 * T - 1] = False
    assert torch.equal(out.tokens[outside], rows.tokens[outside])
    assert torch.equal(out.masked_targets, tgt[masked]) and out.ar_targets is rows.ar_targets
    # share 0 draws no sentence; a share draws sentences (whole ones) by torch's generator
    assert torch.equal(expose_observed(model, enc, tgt, masked, rows, 0.0, "janus").tokens, rows.tokens)
    torch.manual_seed(1)
    half = expose_observed(model, enc, tgt, masked, rows, 0.5, "janus").tokens[:, T - 1 : 2 * T - 1]
    torch.manual_seed(1)
    drawn = torch.rand(B) < 0.5
    for b in range(B):
        assert torch.equal(half[b], canvas[b] if drawn[b] else rows.tokens[b, T - 1 : 2 * T - 1])


@pytest.mark.parametrize("objective", ["janus", "cmlm"])
def test_exposure_changes_the_training_loss_only(objective):
    """compute_loss(exposure=1) in training mode trains on exposed canvases: other masked-token terms, the
    same AR and length terms and counts; in eval mode (validation) it is the plain loss; 0 is the plain loss."""
    model = JanusModel(preset("tiny", vocab_size=40, dropout=0.0))
    src, tgt, masked = toy_batch()
    kw = dict(objective=objective, weights=LossWeights.for_objective(objective), label_smoothing=0.1)
    plain = compute_loss(model, src, tgt, masked, **kw)
    assert torch.equal(compute_loss(model, src, tgt, masked, exposure=0.0, **kw).loss, plain.loss)
    exposed = compute_loss(model, src, tgt, masked, exposure=1.0, **kw)
    assert exposed.counts == plain.counts and exposed.loss.requires_grad
    term = {k: i for i, k in enumerate(LOG_TERMS)}
    for k in ("nar", "nar_nll") + (("aux_nll", "skl_ar_nar") if objective == "janus" else ()):
        assert exposed.sums[term[k]] != plain.sums[term[k]], k
    for k in ("ar", "ar_nll", "length"):
        assert exposed.sums[term[k]] == plain.sums[term[k]], k
    model.eval()
    torch.testing.assert_close(compute_loss(model, src, tgt, masked, exposure=1.0, **kw).loss, plain.loss)


@pytest.mark.parametrize("objective", ["janus", "cmlm"])
def test_least_confident_exposure_masks_what_the_first_pass_is_least_sure_of(objective):
    """nar_exposure_mask="least-confident": a drawn sentence keeps m masked slots, m as before, at its m
    lowest-scoring first-pass tokens (mask-predict's re-masking), sees the first pass's tokens everywhere else,
    and its rows are those of that masked set (targets the references)."""
    torch.manual_seed(0)
    model = JanusModel(preset("tiny", vocab_size=40, dropout=0.0)).eval()
    src, tgt, masked = toy_batch()
    T = tgt.shape[1]
    enc = model.encode(src)
    first, scores = first_pass_tokens(model, enc, tgt)
    rows = training_rows(tgt, masked, objective, pad=PAD, mask=MASK)
    out = expose_observed(model, enc, tgt, masked, rows, 1.0, objective, least_confident=True)
    start = T - 1 if objective == "janus" else 0
    canvas = out.tokens[:, start : start + T]
    now = canvas == MASK
    assert torch.equal(now.sum(1), masked.sum(1)) and not torch.equal(now, masked)
    for b in range(tgt.shape[0]):
        n = int((tgt[b] != PAD).sum())
        lowest = scores[b, 1 : n - 1].topk(int(masked[b].sum()), largest=False).indices + 1
        assert sorted(now[b].nonzero().flatten().tolist()) == sorted(lowest.tolist())
        keep = ~now[b, :n]
        assert torch.equal(canvas[b, :n][keep], first[b, :n][keep])
    rebuilt = training_rows(tgt, now, objective, pad=PAD, mask=MASK)
    assert torch.equal(out.masked_targets, tgt[now]) and torch.equal(out.p_rows, rebuilt.p_rows)
    outside = torch.ones_like(out.tokens, dtype=torch.bool)
    outside[:, start : start + T] = False
    assert torch.equal(out.tokens[outside], rebuilt.tokens[outside])
