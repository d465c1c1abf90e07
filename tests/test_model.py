"""Model shapes, presets, length head, projection and the incremental (cached) AR pass."""

from __future__ import annotations

import pytest
import torch

from janus.config import PRESETS, ModelConfig, preset
from janus.model import Dropout, JanusModel, KVCache, _cpu_keep_mask
from janus.streams import build_ar_step_rows, build_training_rows

PAD, BOS, EOS, MASK = 0, 1, 2, 4


def test_presets_build_with_expected_shapes():
    sizes = {}
    for name in PRESETS:
        cfg = preset(name, vocab_size=8000)
        with torch.device("meta"):
            m = JanusModel(cfg)
        sizes[name] = m.num_parameters()
        assert len(m.encoder) == cfg.encoder_layers and len(m.decoder) == cfg.decoder_layers
    c = preset("iwslt")
    assert (c.d_model, c.ffn_dim, c.n_heads, c.encoder_layers, c.decoder_layers) == (512, 1024, 4, 6, 6)
    assert sizes["tiny"] < sizes["iwslt"] < sizes["base"] < sizes["big"]
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=100, n_heads=3)


def test_config_round_trip_and_init():
    cfg = preset("tiny", vocab_size=60)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    m = JanusModel(cfg)
    assert m.embed.weight[PAD].abs().sum() == 0
    assert abs(float(m.decoder[0].ffn.ff1.weight.detach().std()) - cfg.init_std) < 0.005
    assert float(m.decoder[0].ffn.ff1.bias.detach().abs().sum()) == 0


def test_length_head_targets_and_inverse():
    for offset in (False, True):
        m = JanusModel(preset("tiny", vocab_size=60, length_classes=16, length_offset=offset))
        n = torch.tensor([3, 9, 40])
        s = torch.tensor([5, 5, 5])
        t = m.length_target(n, s)
        assert t.max() <= 15 and t.min() >= 0
        back = m.lengths_from_classes(t[:, None], s)[:, 0]
        assert back[:2].tolist() == [3, 9]  # the third is clamped
        src = torch.tensor([[7, 8, EOS, PAD], [7, 8, 9, EOS]])
        assert m.length_logits(m.encode(src)).shape == (2, 16)


def test_source_padding_does_not_change_encoder_outputs():
    torch.manual_seed(0)
    m = JanusModel(preset("tiny", vocab_size=60)).eval()
    a = m.encode(torch.tensor([[7, 8, 9, EOS]]))
    b = m.encode(torch.tensor([[7, 8, 9, EOS, PAD, PAD]]))
    torch.testing.assert_close(a.states, b.states[:, :4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.length_logits(a), m.length_logits(b), rtol=1e-5, atol=1e-5)


def test_cached_incremental_ar_equals_full_pass():
    torch.manual_seed(0)
    m = JanusModel(preset("tiny", vocab_size=60)).eval()
    B, n = 3, 7
    tgt = torch.randint(5, 60, (B, n))
    tgt[:, 0], tgt[:, -1] = BOS, EOS
    src = torch.randint(5, 60, (B, 5))
    enc = m.encode(src)
    with torch.no_grad():
        rows = build_training_rows(tgt, None, pad=PAD, mask=MASK, ar=True, nar=False, aux=False)
        full = m.decode(rows, enc).flatten(0, 1)[rows.ar_rows].view(B, n - 1, -1)  # (B, n-1, D)
        cache = KVCache()
        steps = []
        for t in range(n - 1):
            step = build_ar_step_rows(tgt[:, t], t, cache.length, mask=MASK)
            steps.append(m.decode(step, enc, cache)[:, 1])
        assert cache.length == n - 1
        torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-5, atol=1e-5)
        # select follows beam search: hypotheses reorder, finished sentences leave
        kept = cache.layers[0].self_k[[2, 0], :, : n - 1].clone()
        cache.select(torch.tensor([2, 0]))
        assert cache.layers[0].self_k.shape[0] == 2
        assert enc.cross[0] is not None and enc.select(torch.tensor([2, 0])).cross[0][0].shape[0] == 2
        torch.testing.assert_close(cache.layers[0].self_k[:, :, : n - 1], kept, rtol=0, atol=0)
        cache.select(torch.tensor([1, 1]))  # same size: reordered in place
        torch.testing.assert_close(cache.layers[0].self_k[:, :, : n - 1], kept[[1, 1]], rtol=0, atol=0)


def test_fused_qkv_equals_separate_projections_and_follows_weight_changes():
    torch.manual_seed(0)
    m = JanusModel(preset("tiny", vocab_size=60)).eval()
    attn = m.decoder[0].self_attn
    x = torch.randn(3, 5, m.cfg.d_model)
    # fp32 rounding: one GEMM vs three, and 15 rows go through janus.ops.skinny_linear, which sums in
    # another order than the BLAS (the weight + 1 below makes outputs of about 10).
    tol = dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        q, k, v = attn.project_qkv(x, 2)
        torch.testing.assert_close(q, attn.q(x), **tol)
        torch.testing.assert_close(k, attn.split(attn.k(x[:, :2])), **tol)
        torch.testing.assert_close(v, attn.split(attn.v(x[:, :2])), **tol)
        w = attn.fused_qkv_weights()[0]
        assert attn.fused_qkv_weights()[0] is w  # concatenated once ...
        attn.k.weight.add_(1.0)  # ... and again after an in-place update (optimizer step, load_state_dict)
        torch.testing.assert_close(attn.project_qkv(x, 2)[1], attn.split(attn.k(x[:, :2])), **tol)
        m.load_state_dict(JanusModel(preset("tiny", vocab_size=60)).state_dict())
        torch.testing.assert_close(attn.project_qkv(x, 2)[2], attn.split(attn.v(x[:, :2])), **tol)
    assert "decoder.0.self_attn.q.weight" in m.state_dict()  # the checkpoint format is unchanged
    assert not any("qkv" in name or "fused" in name for name in m.state_dict())


def test_training_passes_do_not_use_the_fused_projection():
    torch.manual_seed(0)
    m = JanusModel(preset("tiny", vocab_size=60))
    tgt = torch.tensor([[BOS, 7, 8, 9, EOS]])
    rows = build_training_rows(tgt, None, pad=PAD, mask=MASK, ar=True, nar=False, aux=False)
    hidden, _ = m(torch.tensor([[7, 8, EOS]]), rows)
    hidden.sum().backward()
    assert all(layer.self_attn._fused is None for layer in m.decoder)
    assert all(layer.attn._fused is None for layer in m.encoder)
    assert m.decoder[0].self_attn.k.weight.grad is not None


def test_decode_ar_step_equals_the_step_rows_and_reserves_the_cache():
    torch.manual_seed(0)
    m = JanusModel(preset("tiny", vocab_size=60)).eval()
    B, n = 3, 6
    tgt = torch.randint(5, 60, (B, n))
    tgt[:, 0] = BOS
    src = torch.tensor([[7, 8, 9, EOS], [7, 8, EOS, PAD], [9, EOS, PAD, PAD]])
    with torch.no_grad():
        enc, enc2 = m.encode(src), m.encode(src)
        rows_cache, step_cache = KVCache(), KVCache(capacity=n)
        for t in range(n):
            a = m.decode(build_ar_step_rows(tgt[:, t], t, rows_cache.length, mask=MASK), enc, rows_cache)[:, 1]
            buffer = None if t == 0 else step_cache.layers[0].self_k
            b = m.decode_ar_step(tgt[:, t], enc2, step_cache)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            assert buffer is None or step_cache.layers[0].self_k is buffer  # preallocated: never regrown
        assert step_cache.length == n and step_cache.layers[0].self_k.shape[2] == n
        assert m.encode(src[:1, :3]).attention_mask() is None  # no padding: attention without a mask
        assert enc.attention_mask().shape == (B, 1, 1, 4)
    with pytest.raises(RuntimeError, match="inference"):
        m.decode_ar_step(tgt[:, 0], enc, KVCache())


def test_cache_select_reorders_and_drops_hypotheses_in_every_layer():
    """KVCache.select on the joint buffer of a cache with a capacity (every layer's keys/values reordered in
    one copy), on the per-layer buffers of one without, and after a layer outgrew the capacity: the same rows."""
    torch.manual_seed(1)
    m = JanusModel(preset("tiny", vocab_size=60)).eval()
    N, n = 4, 3
    tgt = torch.randint(5, 60, (N, n))
    src = torch.tensor([[7, 8, 9, EOS]])
    with torch.no_grad():
        enc = m.encode(src)
        caches = {"joint": KVCache(capacity=n), "layers": KVCache(), "outgrown": KVCache(capacity=n - 1)}
        for cache in caches.values():
            for t in range(n):
                m.decode_ar_step(tgt[:, t], enc, cache)
        assert caches["joint"]._joint_in_use() and caches["joint"].layers[-1].self_v._base is not None
        assert caches["layers"].joint is None and not caches["outgrown"]._joint_in_use()
        before = [[t.clone() for t in (c.self_k, c.self_v)] for c in caches["layers"].layers]
        steps = (torch.tensor([2, 0, 0, 3]), torch.tensor([0, 1, 2, 3]), torch.tensor([3, 1]))
        for cache in caches.values():
            want = before
            for order in steps:
                cache.select(order)
                want = [[t[order] for t in kv] for kv in want]
                for c, (k, v) in zip(cache.layers, want, strict=True):
                    assert torch.equal(c.self_k[:, :, :n], k[:, :, :n]) and torch.equal(c.self_v[:, :, :n], v[:, :, :n])
        assert caches["joint"]._joint_in_use() and caches["joint"].joint.shape[2] == 2


def test_position_limit_is_a_clear_error():
    m = JanusModel(preset("tiny", vocab_size=60, max_target_positions=8))
    tgt = torch.full((1, 10), 7)
    tgt[0, 0], tgt[0, -1] = BOS, EOS
    rows = build_training_rows(tgt, None, pad=PAD, mask=MASK, ar=True, nar=False, aux=False)
    with pytest.raises(ValueError, match="max_target_positions"):
        m.decode(rows, m.encode(torch.tensor([[7, EOS]])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_scales_kept_elements_like_f_dropout_and_keeps_1_minus_p(dtype):
    p = 0.3
    drop = Dropout(p).train()
    x = torch.randn(61, 37, 45, dtype=dtype).requires_grad_()  # an odd element count
    torch.manual_seed(5)
    y = drop(x)
    kept = y != 0
    # The factor F.dropout applies: 1 / (1 - p) rounded to the input's dtype.
    scale = torch.ones((), dtype=dtype).div_(1 - p)
    assert torch.equal(y[kept], x.detach()[kept] * scale)
    n = x.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, torch.where(kept, scale, torch.zeros((), dtype=dtype)))
    # The same seed gives the same mask; the next call another one.
    torch.manual_seed(5)
    assert torch.equal(drop(x) != 0, kept)
    assert not torch.equal(drop(x) != 0, kept)


def test_dropout_identity_in_eval_and_at_zero_zeros_at_one_and_rejects_bad_p():
    x = torch.randn(4, 5)
    assert Dropout(0.5).eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=str(bad)):
            Dropout(bad)


def test_cpu_keep_mask_is_uniform_over_the_words_halves():
    """Each 64-bit word gives two elements: both halves keep 1 - keep of their elements, independently."""
    torch.manual_seed(0)
    n, keep = 400_000, 0.9
    m = _cpu_keep_mask(torch.Size([n]), keep).float()
    sigma = (keep * (1 - keep) / (n / 2)) ** 0.5
    even, odd = m[0::2], m[1::2]
    assert abs(even.mean().item() - keep) < 5 * sigma and abs(odd.mean().item() - keep) < 5 * sigma
    # Independent halves: P(both kept) = keep ** 2.
    assert abs((even * odd).mean().item() - keep**2) < 5 * (keep**2 * (1 - keep**2) / (n / 2)) ** 0.5
    assert _cpu_keep_mask(torch.Size([0, 3]), keep).shape == (0, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_keep_mask_in_a_float_dtype_is_the_bool_mask_for_the_same_draws(dtype):
    torch.manual_seed(3)
    ref = _cpu_keep_mask(torch.Size([7, 11, 5]), 0.8)
    torch.manual_seed(3)
    got = _cpu_keep_mask(torch.Size([7, 11, 5]), 0.8, dtype)
    assert got.dtype == dtype and torch.equal(got, ref.to(dtype))


def test_a_bfloat16_models_step_logits_are_float32_from_its_bf16_weights():
    """A bf16 model's incremental step projects its few rows to fp32 logits (the product of the bf16 weights
    and the widened rows, summed in fp32), not logits rounded to bf16; more rows (``panel_rows``) likewise where
    the CPU's bf16 dot products run them, else torch's bf16 product."""
    from janus.ops.skinny_linear import panel_rows

    m = JanusModel(preset("small", vocab_size=3000)).eval().to(torch.bfloat16)
    with torch.no_grad():
        few = torch.randn(2, m.cfg.d_model).bfloat16()
        logits = m.project(few)
        assert logits.dtype == torch.float32
        exact = few.double() @ m.embed.weight.double().T
        assert (logits.double() - exact).abs().max() < 1e-4
        many = m.project(few[:, None].expand(2, 40, -1))
        if panel_rows(torch.bfloat16) >= 80:
            assert many.dtype == torch.float32 and torch.equal(many[:, 0], logits)
        else:  # bf16 logits of magnitude ~1 are ~4e-3 apart: the fp32 ones are finer than that
            assert many.dtype == torch.bfloat16
            assert (logits.double() - exact).abs().max() < (many[:, 0].double() - exact).abs().max()
