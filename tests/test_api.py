"""janus.fast_generate and Generator: inputs, batching, order, empty and over-long sources."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import janus
from janus.api import Generator, make_decode_batches
from janus.config import DecodeConfig, preset
from janus.model import JanusModel, quantize_dynamic_int8

EOS, PAD = 2, 0


def test_text_ids_and_tensor_inputs_agree_and_order_is_restored(synthetic_model):
    gen = Generator.from_checkpoint(synthetic_model.checkpoint, device="cpu")
    src = synthetic_model.test_src[:17]
    by_text = janus.fast_generate(gen, src, mode="ar", beam_size=1, max_batch_size=4)
    ids = gen.encode(src)
    by_ids = janus.fast_generate(gen, ids, mode="ar", beam_size=1, max_batch_size=4)
    width = max(map(len, ids))
    tensor = torch.tensor([s + [PAD] * (width - len(s)) for s in ids])
    by_tensor = janus.fast_generate(gen, tensor, mode="ar", beam_size=1)
    with_eos = janus.fast_generate(gen, [s + [EOS] for s in ids], mode="ar", beam_size=1)
    one_by_one = [janus.fast_generate(gen, [s], mode="ar", beam_size=1)[0] for s in src]
    for hyps in (by_ids, by_tensor, with_eos, one_by_one):
        assert [h.ids for h in hyps] == [h.ids for h in by_text]
    assert [h.text for h in by_text] == synthetic_model.test_ref[:17]
    assert all(h.text == gen.vocab.decode(h.ids) for h in by_text)


def test_checkpoint_path_and_every_mode(synthetic_model):
    src, ref = synthetic_model.test_src[:10], synthetic_model.test_ref[:10]
    for mode, kw in (("ar", {}), ("nar", {"rerank": True}), ("spec", {})):
        hyps = janus.fast_generate(synthetic_model.checkpoint, src, mode=mode, device="cpu", **kw)
        assert sum(h.text == r for h, r in zip(hyps, ref, strict=True)) >= 9, mode
        assert all(h.passes >= 1 for h in hyps)
    # a training folder resolves to its latest checkpoint
    run_dir = synthetic_model.checkpoint.parent
    same = janus.fast_generate(run_dir, src, mode="ar", device="cpu")
    assert [h.text for h in same] == [h.text for h in janus.fast_generate(synthetic_model.checkpoint, src, mode="ar")]


def test_empty_sources_and_truncation(synthetic_model):
    gen = Generator.from_checkpoint(synthetic_model.checkpoint, device="cpu")
    sentence = synthetic_model.test_src[0]
    long = " ".join([sentence] * 5)
    with pytest.warns(UserWarning, match=r"source 2 has \d+ tokens; truncated to the first 6"):
        hyps = gen.generate(["", sentence, long, "   "], mode="ar", beam_size=1, max_source_len=6)
    assert hyps[0].ids == [] and hyps[0].text == "" and hyps[0].passes == 0
    assert hyps[1].text == synthetic_model.test_ref[0]
    assert len(hyps[2].ids) <= int(6 * 1.2 + 10)
    assert hyps[3].ids == [] and hyps[3].passes == 0  # whitespace encodes to nothing


def test_bad_input_is_a_clear_error():
    model = JanusModel(preset("tiny", vocab_size=30))
    with pytest.raises(ValueError, match="text sources need a vocabulary"):
        janus.fast_generate(model, ["hello"])
    with pytest.raises(ValueError, match="source 1: id 99 is outside the vocabulary"):
        janus.fast_generate(model, [[5, 6], [99]])
    with pytest.raises(ValueError, match="mode='fast'"):
        janus.fast_generate(model, [[5, 6]], mode="fast")
    with pytest.raises(ValueError, match="iterations=0"):
        DecodeConfig(iterations=0)
    # The same one-line message as the janus commands, naming the path, for every way in.
    missing = "/nonexistent/checkpoint is neither a checkpoint folder nor a .safetensors file"
    for load in (lambda p: janus.fast_generate(p, ["x"]), Generator.from_checkpoint):
        with pytest.raises(FileNotFoundError, match=f"^{missing}"):
            load("/nonexistent/checkpoint")
    # a bare model decodes ids without a vocabulary; text stays None
    hyps = janus.fast_generate(model, [[5, 6, 7]], mode="nar", iterations=2)
    assert hyps[0].text is None and hyps[0].passes == 2


def test_batches_respect_size_and_token_limits():
    lengths = [5, 1, 9, 3, 9, 2, 7]
    opts = DecodeConfig(max_batch_size=3)
    batches = make_decode_batches(lengths, opts)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= 3 for b in batches)
    assert [lengths[b[0]] for b in batches] == sorted((lengths[b[0]] for b in batches), reverse=True)
    tight = make_decode_batches(lengths, dataclasses.replace(opts, max_batch_tokens=18))
    assert all(len(b) * max(lengths[i] for i in b) <= 18 or len(b) == 1 for b in tight)


def test_long_sentences_get_their_own_batches():
    lengths = [12, 1000, 30, 800, 9, 200, 130]
    batches = make_decode_batches(lengths, DecodeConfig(max_batch_size=64))
    assert [[lengths[i] for i in b] for b in batches] == [[1000, 800], [200, 130], [30, 12, 9]]
    ordinary = [40, 12, 60, 5]  # under 64 tokens nothing is split
    assert len(make_decode_batches(ordinary, DecodeConfig(max_batch_size=64))) == 1


def test_generate_iter_yields_in_input_order_as_batches_finish(synthetic_model, monkeypatch):
    import janus.api

    gen = Generator.from_checkpoint(synthetic_model.checkpoint, device="cpu")
    src = ["", *synthetic_model.test_src[:20], "  ", synthetic_model.test_src[20]]
    opts = DecodeConfig(mode="ar", beam_size=1, max_batch_size=4, window=8)
    whole = gen.generate(src, dataclasses.replace(opts, window=0))
    assert [h.text for h in gen.generate(src, opts)] == [h.text for h in whole]
    calls = []
    real = janus.api.decode_batch

    def counting(model, src_ids, options, forced=None):
        calls.append(src_ids.shape[0])
        return real(model, src_ids, options, forced)

    monkeypatch.setattr(janus.api, "decode_batch", counting)
    it = gen.generate_iter(src, opts)
    assert calls == []  # nothing decoded before the first next()
    first, second = next(it), next(it)
    assert first.ids == [] and first.passes == 0 and second.text == whole[1].text
    assert len(calls) == 1  # line 1 came out after one batch (the one holding it), not after the window
    rest = list(it)
    assert [h.text for h in [first, second, *rest]] == [h.text for h in whole]
    assert sum(calls) == 21 and max(calls) <= 4
    with pytest.raises(ValueError, match="outside the vocabulary"):  # bad input fails at the call
        gen.generate_iter([[5], [10**6]], opts)


def test_dtype_and_device_resolution():
    from janus.api import resolve_device, resolve_dtype
    from janus.info import cpu_bf16_support

    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    if cpu_bf16_support()[0]:
        assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("int8", cpu) == torch.qint8
    with pytest.raises(ValueError, match="dtype='half'"):
        resolve_dtype("half", cpu)
    with pytest.raises(ValueError, match="CPU only, not on cuda"):  # no device needed to refuse it
        resolve_dtype("int8", torch.device("cuda"))
    assert resolve_device("cpu") == cpu


def test_bfloat16_is_refused_on_a_cpu_that_would_emulate_it(monkeypatch):
    from janus import info
    from janus.api import resolve_dtype

    monkeypatch.setattr(info, "cpu_bf16_support", lambda: (False, "neither AVX512_BF16 nor AMX-BF16 found"))
    with pytest.raises(ValueError, match="bfloat16 on this CPU: neither AVX512_BF16"):
        resolve_dtype("bfloat16", torch.device("cpu"))


def test_int8_generator_quantizes_a_copy_and_stays_close_to_fp32():
    """int8 weights (per output channel) and per-call activation scales: not exact, so the test states
    tolerances: log-probabilities within 0.05 nats of fp32 on a random iwslt-width layer stack, and the
    cached step within 0.05 of the recomputed prefix (their activation ranges differ)."""
    from janus.decoding.beam_search import next_token_logprobs
    from janus.decoding.common import inference

    torch.manual_seed(0)
    model = JanusModel(preset("tiny", vocab_size=60, dropout=0.0)).eval()
    gen = Generator(model, device="cpu", dtype="int8")
    assert gen.dtype == torch.qint8 and gen.model is not model
    assert type(model.decoder[0].self_attn.q) is torch.nn.Linear  # the model given is untouched
    quantized = torch.ao.nn.quantized.dynamic.Linear
    assert isinstance(gen.model.decoder[0].self_attn.qkv, quantized) and isinstance(gen.model.out_proj, quantized)
    # every decoder linear layer is int8; the encoder and the length head (once per sentence) stay fp32
    for name, m in gen.model.named_modules():
        if isinstance(m, (torch.nn.Linear, quantized)):
            assert isinstance(m, quantized) == (name.startswith("decoder.") or name == "out_proj"), name
    whole = quantize_dynamic_int8(model, encoder=True)
    assert not any(type(m) is torch.nn.Linear for m in whole.modules())  # every linear layer is int8
    assert isinstance(whole.encoder[0].attn.qkv, quantized)
    src = torch.tensor([[7, 8, 9, 10, 2], [11, 12, 2, 0, 0]])
    tokens = torch.tensor([[1, 7, 8, 9], [1, 5, 6, 7]])
    with inference(model), torch.no_grad():
        enc, qenc, qenc2 = model.encode(src), gen.model.encode(src), gen.model.encode(src)
        from janus.model import KVCache

        cache = KVCache()
        for step in range(4):
            ref = next_token_logprobs(model, enc, tokens, step, None)
            cached = next_token_logprobs(gen.model, qenc, tokens, step, cache)
            full = next_token_logprobs(gen.model, qenc2, tokens, step, None)
            torch.testing.assert_close(cached, ref, rtol=0, atol=0.05)
            torch.testing.assert_close(cached, full, rtol=0, atol=0.05)
