"""decoder_step (csrc/cpu/decoder_step.cpp) against its reference: odd widths and heads, beams sharing a
sentence, source padding, ragged visibility, caches written where asked and nowhere else, weight matrices
row-major or in panels; thread-count
and row invariance; named errors; dispatch; and the model's passes through it (AR steps, beams,
speculative verification) equal to its own layers, with the same search outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ext_helpers import require_kernel
from tolerances import assert_within_baseline

from janus.config import preset
from janus.decoding import beam_search, greedy_search, mask_predict, speculative_decode
from janus.model import JanusModel, KVCache, quantize_dynamic_int8
from janus.ops.decoder_step import (
    DECODER_STEP,
    ENCODER_LAYER_WEIGHTS,
    LAYER_WEIGHTS,
    MAX_ROWS,
    _fits_cpp,
    decoder_step,
    decoder_step_ref,
    max_rows,
)
from janus.ops.skinny_linear import pack_panels, unpack_panels

FORCE = "JANUS_BACKEND_DECODER_STEP"


@pytest.fixture(autouse=True)
def _kernel():
    require_kernel("decoder_step", "cpu")


def problem(seed, N=2, R=2, C=1, D=32, H=4, F=48, L=2, B=1, S=7, W=12, transposed=True):
    """Random arguments of one pass: x, C, spans, columns, caches, cross keys/values, keep, weights, H, eps."""
    g = torch.Generator().manual_seed(seed)
    dk = D // H

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    x = rand(N, R, D)
    ends = torch.randint(1, W + 1, (N, R), generator=g)
    starts = (torch.rand(N, R, generator=g) * ends).long()  # some rows see from column 0, some from later on
    spans = torch.stack([starts, ends], -1)
    columns = torch.stack([torch.randperm(W, generator=g)[:C] for _ in range(N)])
    self_k = [rand(N, H, W, dk) for _ in range(L)]
    self_v = [rand(N, H, W, dk) for _ in range(L)]
    # the model's cross keys/values are transposed views of (B, S, H, dk)
    cross_k = [rand(B, S, H, dk).transpose(1, 2) if transposed else rand(B, H, S, dk) for _ in range(L)]
    cross_v = [rand(B, S, H, dk).transpose(1, 2) if transposed else rand(B, H, S, dk) for _ in range(L)]
    keep = torch.ones(B, S, dtype=torch.bool)
    for b in range(B):
        keep[b, 1 + b % (S - 1) :] = False  # right padding, a different amount per sentence
    shapes = {"qkv.weight": (3 * D, D), "qkv.bias": (3 * D,), "ff1.weight": (F, D), "ff1.bias": (F,)}
    shapes["ff2.weight"] = (D, F)
    weights = []
    for _ in range(L):
        for name in LAYER_WEIGHTS:
            shape = next((s for k, s in shapes.items() if name.endswith(k)), None)
            if shape is None:
                shape = (D, D) if name.endswith("weight") and "norm" not in name else (D,)
            weights.append(rand(*shape, scale=shape[-1] ** -0.5 if len(shape) == 2 else 1.0))
    return [x, C, spans, columns, self_k, self_v, cross_k, cross_v, keep, weights, H, 1e-5]


def cloned(args):
    """The arguments with fresh copies of the caches the pass writes."""
    out = list(args)
    out[4], out[5] = [t.clone() for t in args[4]], [t.clone() for t in args[5]]
    return out


def in_double(args):
    out = cloned(args)
    for i in (0, 4, 5, 6, 7, 9):
        out[i] = out[i].double() if torch.is_tensor(out[i]) else [t.double() for t in out[i]]
    return out


CASES = {
    "greedy": dict(N=1, R=2, C=1),
    "beams": dict(N=10, R=2, C=1, B=2),  # 5 hypotheses per sentence share its source
    "verify": dict(N=3, R=10, C=5, B=3),
    "queries only": dict(N=2, R=3, C=0),
    "canvas": dict(N=3, R=9, C=9, B=3),  # mask-predict: every row a content row
    "odd widths": dict(N=3, R=2, C=1, D=40, H=5, F=36, S=5, W=9),  # dk = 8: below one 16-lane vector
    "iwslt width": dict(N=2, R=2, C=1, D=512, H=4, F=1024, L=1, S=30, W=40),
    "contiguous cross": dict(N=2, R=4, C=2, transposed=False),
}


def packed(args):
    """The arguments with every weight matrix whose rows are a multiple of 16 in panels (as the model's
    ``fused_weights``; the others stay row-major: both layouts in one pass)."""
    out = cloned(args)
    out[9] = [pack_panels(w) if w.dim() == 2 and w.shape[0] % 16 == 0 else w for w in args[9]]
    return out


def in_dtype(args, dtype):
    out = cloned(args)
    for i in (0, 4, 5, 6, 7, 9):
        out[i] = out[i].to(dtype) if torch.is_tensor(out[i]) else [t.to(dtype) for t in out[i]]
    return out


@pytest.mark.parametrize("panels", [False, True], ids=["row-major", "panels"])
@pytest.mark.parametrize("name", ["greedy", "beams", "verify", "canvas", "odd widths", "iwslt width"])
def test_bfloat16_is_closer_to_the_exact_result_than_torchs_bf16_layers(name, panels):
    """bf16 weights, caches and source keys/values, fp32 arithmetic: within the reference's own bf16 error
    (of the same bf16 inputs, against fp64), and the keys/values it caches are those rounded to bf16."""
    args = in_dtype(problem(5, **CASES[name]), torch.bfloat16)
    args = packed(args) if panels else args
    kernel_args, ref_args, exact_args = cloned(args), cloned(args), in_double(args)
    out = torch.ops.janus.decoder_step(*kernel_args)
    want = decoder_step_ref(*ref_args)
    exact = decoder_step_ref(*exact_args)
    assert out.dtype == torch.bfloat16
    assert_within_baseline(out, exact, want, factor=1.0, atol=1e-2, name=name)
    for layer in range(len(args[4])):
        assert_within_baseline(kernel_args[4][layer], exact_args[4][layer], ref_args[4][layer], factor=1.0,
                               atol=1e-2, name=f"{name} cache {layer}")  # fmt: skip


# The bf16 products of a pass and of skinny_linear (csrc/cpu/skinny_gemm.h), computed in a child process with
# JANUS_CPU_BF16_DOT as given (the kernel reads it once per process) and written to a safetensors file.
_BF16_PRODUCTS = """
import sys
import torch
from safetensors.torch import save_file
sys.path.insert(0, sys.argv[2])
from test_ops_decoder_step import CASES, cloned, in_dtype, packed, problem
from janus import _ext
from janus.ops.skinny_linear import cpu_bf16_dot, pack_panels
_ext.load()
out = {"dot": torch.tensor(cpu_bf16_dot())}
for name, case in CASES.items():
    args = cloned(packed(in_dtype(problem(7, **case), torch.bfloat16)))
    out[name] = torch.ops.janus.decoder_step(*args)
    for layer, cache in enumerate(args[4]):
        out[f"{name} cache {layer}"] = cache
g = torch.Generator().manual_seed(5)
for N, K in ((8000, 128), (48, 40), (32, 70)):
    panels = pack_panels((torch.randn(N, K, generator=g) * K ** -0.5).bfloat16())
    for M in (1, 5, 8, 13, 64):
        x = torch.randn(M, K, generator=g).bfloat16().float()  # fp32 rows of bf16 values
        out[f"skinny {N} {K} {M}"] = torch.ops.janus.skinny_linear(x, panels, None)
save_file(out, sys.argv[1])
"""


def _bf16_products(tmp_path, dot: str) -> dict:
    from safetensors.torch import load_file

    path = tmp_path / f"dot{dot}.safetensors"
    env = {**os.environ, "JANUS_CPU_BF16_DOT": dot}
    subprocess.run([sys.executable, "-c", _BF16_PRODUCTS, str(path), str(Path(__file__).parent)], env=env, check=True)
    return load_file(str(path))


def test_bf16_dot_products_give_the_bits_of_the_widened_fmas(tmp_path):
    """On a CPU with AVX512_BF16 a bf16 pass multiplies on vdpbf16ps: every output and cache write equals, bit for
    bit, the widened FMAs' (JANUS_CPU_BF16_DOT=0), as do skinny_linear's fp32 rows of bf16 values by bf16
    panels (even and odd K, every row tiling), whose sums are the exact products' to fp32 rounding."""
    if not getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        pytest.skip("the CPU has no bf16 dot-product instruction: both runs would widen")
    dot, widened = _bf16_products(tmp_path, "1"), _bf16_products(tmp_path, "0")
    assert bool(dot.pop("dot")) and not bool(widened.pop("dot"))  # the two paths ran
    assert dot.keys() == widened.keys()
    for name in dot:
        assert torch.equal(dot[name], widened[name]), name
    g = torch.Generator().manual_seed(5)
    panels = pack_panels((torch.randn(8000, 128, generator=g) * 128**-0.5).bfloat16())
    x = torch.randn(1, 128, generator=g).bfloat16().float()
    exact = x.double() @ unpack_panels(panels).double().T
    torch.testing.assert_close(dot["skinny 8000 128 1"].double(), exact, rtol=0, atol=1e-5)


@pytest.mark.parametrize("panels", [False, True], ids=["row-major", "panels"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_the_reference(name, panels):
    args = problem(3, **CASES[name])
    args = packed(args) if panels else args
    kernel_args, ref_args, exact_args = cloned(args), cloned(args), in_double(args)
    out = torch.ops.janus.decoder_step(*kernel_args)
    want = decoder_step_ref(*ref_args)
    exact = decoder_step_ref(*exact_args)
    assert out.shape == args[0].shape and out.dtype == torch.float32
    assert_within_baseline(out, exact, want, factor=4.0, atol=1e-5, name=name)
    for layer in range(len(args[4])):
        # the cache columns written hold the same keys/values; every other column is untouched
        for got, ref, before in ((kernel_args[4], ref_args[4], args[4]), (kernel_args[5], ref_args[5], args[5])):
            assert_within_baseline(got[layer], exact_args[4 if got is kernel_args[4] else 5][layer], ref[layer],
                                   factor=4.0, atol=1e-5, name=f"{name} cache {layer}")  # fmt: skip
            written = torch.zeros(before[layer].shape[2], dtype=torch.bool)
            untouched = got[layer] == before[layer]
            for n in range(args[0].shape[0]):
                written[:] = False
                written[args[3][n]] = True
                assert untouched[n][:, ~written].all()


@pytest.mark.parametrize(
    "shape",
    [
        dict(N=6, R=4, C=2, D=64, F=96),
        dict(N=6, R=8, C=4, D=128, F=512),
        dict(N=6, R=12, C=6, D=128, F=512),
        dict(N=3, R=24, C=12, D=128, F=512),
    ],
    ids=["hypotheses split", "hypotheses split, 48 rows", "hypotheses split, 72 rows", "rows split"],
)
@pytest.mark.parametrize("panels", [False, True], ids=["row-major", "panels"])
def test_result_does_not_depend_on_the_thread_count_or_the_other_rows(panels, shape):
    """One thread or two, a hypothesis alone or among others: the same bits (decoding's batch
    invariance rests on it). With two threads a pass runs as two ranges of whole hypotheses (here 3 + 3 over
    three sentences of two: a range ends inside a sentence), or, three hypotheses of 24 rows, as two ranges of
    36 rows (one hypothesis split between the threads)."""
    args = problem(7, B=3, H=4, W=20, **shape)
    args = packed(args) if panels else args
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.janus.decoder_step(*cloned(args))
        torch.set_num_threads(2)
        two = torch.ops.janus.decoder_step(*cloned(args))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    # sentence 1 (its g hypotheses) on its own
    g = shape["N"] // 3
    alone = cloned(args)
    for i in (0, 2, 3):
        alone[i] = args[i][g : 2 * g].contiguous()
    alone[4] = [t[g : 2 * g].clone() for t in args[4]]
    alone[5] = [t[g : 2 * g].clone() for t in args[5]]
    alone[6] = [t[1:2] for t in args[6]]
    alone[7] = [t[1:2] for t in args[7]]
    alone[8] = args[8][1:2]
    assert torch.equal(torch.ops.janus.decoder_step(*alone), one[g : 2 * g])


@pytest.mark.parametrize(
    "shape",
    [dict(N=5, R=2, C=1), dict(N=1, R=10, C=5), dict(N=1, R=26, C=26), dict(N=1, R=5, C=2)],
    ids=["a beam of 5: hypotheses 3 + 2", "a verification: rows 5 + 5", "a canvas: rows 13 + 13", "rows 2 + 3"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_pass_split_across_threads_keeps_its_bits_and_cache_writes(shape, dtype):
    """A pass of one sentence on two threads, as ranges of hypotheses or of rows (a row's keys/values written by
    the other thread, a barrier between): the same hidden states and cache writes as on one thread, and (float32)
    as the reference to fp32 rounding."""
    args = packed(in_dtype(problem(5, B=1, D=128, H=4, F=512, W=32, **shape), dtype))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_args = cloned(args)
        one = torch.ops.janus.decoder_step(*one_args)
        torch.set_num_threads(2)
        two_args = cloned(args)
        two = torch.ops.janus.decoder_step(*two_args)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    for a, b in zip(one_args[4] + one_args[5], two_args[4] + two_args[5]):
        assert torch.equal(a, b)
    if dtype != torch.float32:
        return  # bfloat16 against the reference: test_bfloat16_is_closer_to_the_exact_result_than_torchs_bf16_layers
    want_args = cloned(problem(5, B=1, D=128, H=4, F=512, W=32, **shape))
    torch.testing.assert_close(two, decoder_step_ref(*want_args), rtol=1e-4, atol=1e-4)
    for a, b in zip(two_args[4] + two_args[5], want_args[4] + want_args[5]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dims", [dict(D=128, H=4, F=512), dict(D=40, H=5, F=36)], ids=["dk 32", "dk 8"])
def test_a_row_does_not_depend_on_how_many_rows_share_its_columns(dims):
    """Attention runs over the rows that see the same columns (a canvas' rows; every row of a sentence in
    cross-attention), in register blocks: a row's bits must not depend on the run or block it falls in. Query
    rows only (no cache writes), so a row's output depends on its own input alone: the first 13 of 40 rows
    sharing one span per hypothesis (runs of 32 and 8, blocks of 8) against those 13 alone (blocks of 8 and 5)."""
    args = problem(11, N=2, B=1, R=40, C=0, W=20, S=9, **dims)
    args[2] = torch.tensor([[3, 17], [0, 20]])[:, None, :].expand(2, 40, 2).contiguous()
    full = torch.ops.janus.decoder_step(*cloned(args))
    few = cloned(args)
    few[0] = args[0][:, :13].contiguous()
    few[2] = args[2][:, :13].contiguous()
    got = torch.ops.janus.decoder_step(*few)
    assert torch.equal(got, full[:, :13])
    want = decoder_step_ref(*cloned(args))
    torch.testing.assert_close(full, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "shape",
    [
        dict(N=1, R=2, C=1),
        dict(N=10, R=2, C=1, B=2),
        dict(N=3, R=10, C=5, B=3),
        dict(N=1, R=10, C=5),
        dict(N=3, R=9, C=9, B=3),
        dict(N=1, R=26, C=26),
    ],
    ids=["greedy", "beams", "verifications", "a verification: rows split", "canvases", "a canvas: rows split"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_outputs_leaves_the_rows_read_as_they_were_and_zeroes_the_others(shape, dtype, threads):
    """``outputs`` skips the last layer of the rows not read (but for their keys/values): the rows read come out
    the same bits as without it, the others zero (as the reference returns them), every cache write the same;
    on one thread or two (ranges of hypotheses, or of rows: each thread moving its own rows), with a
    hypothesis none of whose rows are read, and with every row read."""
    args = packed(in_dtype(problem(9, D=128, H=4, F=512, W=32, **shape), dtype))
    N, R = shape["N"], shape["R"]
    read = torch.rand(N, R, generator=torch.Generator().manual_seed(4)) < 0.5
    read[0, -1], read[0, 0] = True, False  # an AR pass reads its last (query) row, not its first (content) row
    if N > 1:
        read[-1] = False
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        full_args, some_args, all_args = cloned(args), cloned(args), cloned(args)
        full = torch.ops.janus.decoder_step(*full_args)
        some = torch.ops.janus.decoder_step(*some_args, read)
        every = torch.ops.janus.decoder_step(*all_args, torch.ones_like(read))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(some[read], full[read])
    assert not some[~read].any()
    assert torch.equal(every, full)
    for a, b in zip(full_args[4] + full_args[5], some_args[4] + some_args[5]):
        assert torch.equal(a, b)
    if dtype == torch.float32:
        want = decoder_step_ref(*cloned(args), outputs=read)
        assert not want[~read].any()
        torch.testing.assert_close(some, want, rtol=1e-4, atol=1e-4)


def test_bad_arguments_are_named():
    args = problem(1)
    bad = cloned(args)
    bad[2] = torch.zeros_like(args[2])
    with pytest.raises(ValueError, match=r"spans\[0, 0\]=\[0, 0\) must be a non-empty range of the cache's 12 columns"):
        torch.ops.janus.decoder_step(*bad)
    bad[2] = torch.tensor([[[0, 13], [0, 1]]] * 2)
    with pytest.raises(ValueError, match=r"spans\[0, 0\]=\[0, 13\)"):
        torch.ops.janus.decoder_step(*bad)
    bad = cloned(args)
    bad[3] = torch.full_like(args[3], 12)
    with pytest.raises(ValueError, match=r"columns\[0, 0\]=12 is outside the cache's 12 columns"):
        torch.ops.janus.decoder_step(*bad)
    bad = cloned(args)
    bad[9] = args[9][:-1]
    with pytest.raises(
        ValueError, match=r"2 layers need 2 of each cache list \(the cross lists empty for an encoder\) and 36 weights"
    ):
        torch.ops.janus.decoder_step(*bad)
    bad = cloned(args)
    bad[9] = list(args[9])
    bad[9][12] = args[9][12][:, :5].contiguous()
    with pytest.raises(
        ValueError, match=r"layer 0 W1 has shape \[48, 5\], expected \(48, 32\) or its panels \(3, 32, 16\)"
    ):
        torch.ops.janus.decoder_step(*bad)
    bad[9][12] = pack_panels(args[9][12])[:2].contiguous()
    with pytest.raises(ValueError, match=r"layer 0 W1 has shape \[2, 32, 16\], expected \(48, 32\)"):
        torch.ops.janus.decoder_step(*bad)
    bad = cloned(args)
    bad[0] = args[0].double()
    with pytest.raises(ValueError, match="x must be float32 or bfloat16"):
        torch.ops.janus.decoder_step(*bad)
    bad = cloned(args)
    bad[10] = 5
    with pytest.raises(ValueError, match="n_heads=5 does not divide the width 32"):
        torch.ops.janus.decoder_step(*bad)
    bad = cloned(args)
    bad[8] = args[8].repeat(3, 1)
    with pytest.raises(ValueError, match="2 hypotheses do not split evenly over 3 sentences"):
        torch.ops.janus.decoder_step(*bad)
    bad = cloned(args)
    bad[6] = [t.repeat(2, 1, 1, 1) for t in args[6]]
    with pytest.raises(ValueError, match=r"layer 0 cross_k must be Float \(1, 4, columns, 8\)"):
        torch.ops.janus.decoder_step(*bad)
    with pytest.raises(ValueError, match=r"outputs must be bool \(2, 2\) on the CPU, got Long \[2, 2\]"):
        torch.ops.janus.decoder_step(*cloned(args), torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"outputs must be bool \(2, 2\) on the CPU, got Bool \[2, 3\]"):
        torch.ops.janus.decoder_step(*cloned(args), torch.ones(2, 3, dtype=torch.bool))


def test_dispatch_sends_what_the_kernel_cannot_take_to_the_reference():
    args = problem(2)
    assert _fits_cpp(*args)[0] is True
    assert DECODER_STEP.select(*args).name == "cpp"
    assert _fits_cpp(*in_dtype(args, torch.bfloat16))[0] is True
    mixed = cloned(args)
    mixed[9] = [w.bfloat16() for w in args[9]]
    assert _fits_cpp(*mixed)[0] is False
    wide = in_double(args)
    assert _fits_cpp(*wide) == (False, "the kernel takes float32 or bfloat16 rows, caches and weights, all alike")
    out = decoder_step(*wide)  # through the reference
    assert out.dtype == torch.float64


# ------------------------------------------------------------------------------------------- the model


def tiny_model(seed=0, vocab=60, **overrides):
    torch.manual_seed(seed)
    m = JanusModel(preset("tiny", vocab_size=vocab, dropout=0.0, **overrides)).eval()
    with torch.no_grad():
        m.embed.weight.mul_(10)  # peaked outputs: searches differ, ties are rare
    return m


def sources(seed, batch, vocab=60):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 10, (batch,), generator=g)
    src = torch.zeros(batch, int(lengths.max()) + 1, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        src[b, :n] = torch.randint(5, vocab, (n,), generator=g)
        src[b, n] = 2
    return src


def count_calls(monkeypatch, encoder=False):
    """The shapes of the rows the model sends to the kernel: its decoder passes (those with cross-attention),
    or with ``encoder`` its encoder's."""
    import janus.model

    calls = []
    real = janus.model.decoder_step_checked

    def counted(*args):
        if bool(args[6]) != encoder:
            calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(janus.model, "decoder_step_checked", counted)
    return calls


def test_an_ar_step_through_the_kernel_equals_the_layers(monkeypatch):
    m = tiny_model()
    src = sources(1, 3)
    calls = count_calls(monkeypatch)
    states = {}
    tokens = torch.randint(5, 60, (3, 6))
    for force in ("cpp", "reference"):
        monkeypatch.setenv(FORCE, force)
        with torch.inference_mode():
            enc, cache = m.encode(src), KVCache()
            states[force] = torch.stack([m.decode_ar_step(tokens[:, t], enc, cache) for t in range(6)])
            states[force + " cache"] = cache.layers[-1].self_k[:, :, :6].clone()
    assert len(calls) == 6 and calls[0] == (3, 2, m.cfg.d_model)
    torch.testing.assert_close(states["cpp"], states["reference"], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(states["cpp cache"], states["reference cache"], rtol=1e-5, atol=2e-5)


def test_a_bfloat16_step_through_the_kernel_is_closer_to_float32_than_the_layers(monkeypatch):
    """A bf16 model's AR steps go through the kernel, which rounds less than torch's bf16 layers: its hidden
    states are at least as close to the float32 model's."""
    m = tiny_model(2)
    src = sources(3, 3)
    tokens = torch.randint(5, 60, (3, 6))
    calls = count_calls(monkeypatch)

    def steps(model):
        with torch.inference_mode():
            enc, cache = model.encode(src), KVCache()
            return torch.stack([model.decode_ar_step(tokens[:, t], enc, cache) for t in range(6)]).float()

    exact = steps(m)
    m16 = m.to(torch.bfloat16)
    fused = steps(m16)
    assert len(calls) == 12  # the float32 model's 6 steps and the bf16 model's 6
    monkeypatch.setenv(FORCE, "reference")
    layers = steps(m16)
    assert_within_baseline(fused, exact, layers, factor=1.0, atol=1e-2, name="bf16 steps")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_searches_through_the_kernel_equal_the_layers(monkeypatch, seed):
    """Greedy and beam steps and speculative verification passes of a batch go through the kernel (their rows
    fit MAX_ROWS); outputs, pass counts and scores equal those through the model's own layers."""
    m = tiny_model(seed)
    src = sources(seed + 5, 4)
    calls = count_calls(monkeypatch)
    runs = {}
    for force in ("cpp", "reference"):
        monkeypatch.setenv(FORCE, force)
        runs[force] = [
            greedy_search(m, src, max_len_a=1.0, max_len_b=8),
            beam_search(m, src, beam=4, max_len_a=1.0, max_len_b=8),
            speculative_decode(m, src, max_len_a=1.0, max_len_b=8),
        ]
        if force == "cpp":
            used = len(calls)
    assert used > 0 and len(calls) == used  # the forced reference never reached the kernel
    rows = {shape[1] for shape in calls}
    assert 2 in rows and max(rows) > 2  # AR steps, and verification passes with drafted tokens
    for fused, layers in zip(runs["cpp"], runs["reference"], strict=True):
        assert [h.ids for h in fused] == [h.ids for h in layers]
        assert [h.passes for h in fused] == [h.passes for h in layers]
        for a, b in zip(fused, layers, strict=True):
            assert a.score == pytest.approx(b.score, rel=1e-5, abs=1e-5)
    assert [h.ids for h in runs["cpp"][2]] == [h.ids for h in runs["cpp"][0]]  # spec is still greedy


@pytest.mark.parametrize("batch", [1, 3, 40], ids=["one sentence", "three", "40: spec's tensor loop"])
def test_searches_read_only_the_rows_they_use_and_keep_every_bit(monkeypatch, batch):
    """Every search passes ``outputs`` (the rows it reads) to the kernel, which then skips the last layer of the
    other rows: the outputs, scores and pass counts are exactly those of the same passes without ``outputs``."""
    import janus.model

    m = tiny_model(3)
    src = sources(9, batch)
    real = janus.model.decoder_step_checked
    read = []

    def spied(*args):
        if len(args) > 12 and args[12] is not None:
            read.append(args[12].clone())
        return real(*args)

    def decode_all():
        return [
            greedy_search(m, src, max_len_a=1.0, max_len_b=8),
            beam_search(m, src, beam=4, max_len_a=1.0, max_len_b=8),
            speculative_decode(m, src, max_len_a=1.0, max_len_b=8),
            speculative_decode(m, src, max_len_a=1.0, max_len_b=8, block=0, draft_iterations=2),
            mask_predict(m, src, iterations=4, length_beam=3),
        ]

    monkeypatch.setattr(janus.model, "decoder_step_checked", spied)
    some = decode_all()
    assert read and not all(bool(r.all()) for r in read)  # passes whose last layer skipped rows
    monkeypatch.setattr(janus.model, "decoder_step_checked", lambda *args: real(*args[:12]))
    every = decode_all()
    for a, b in zip(some, every, strict=True):
        assert [(h.ids, h.score, h.passes) for h in a] == [(h.ids, h.score, h.passes) for h in b]


def test_what_the_kernel_does_not_take_runs_through_the_layers(monkeypatch):
    m = tiny_model()
    src = sources(3, 2)
    calls = count_calls(monkeypatch)
    limit = max_rows(torch.float32, m.cfg.d_model)
    big = sources(4, limit // 2 + 1)  # greedy over more than the kernel's rows at its first steps
    greedy_search(m, big, max_len_a=0.0, max_len_b=1)
    assert not calls
    greedy_search(m.double(), src, max_len_a=1.0, max_len_b=4)
    m.float()
    greedy_search(quantize_dynamic_int8(m), src, max_len_a=1.0, max_len_b=4)
    assert not calls
    with torch.no_grad():  # training mode: the layers, dropout and all
        m.train()
        enc, cache = m.encode(src), KVCache()
        m.decode_ar_step(torch.full((2,), 1), enc, cache)
        m.eval()
    assert not calls
    greedy_search(m, src, max_len_a=1.0, max_len_b=4)
    assert calls


def test_weights_follow_in_place_updates(monkeypatch):
    """The kernel's weight list is kept between passes; an optimizer step (in place) must reach it."""
    m = tiny_model()
    src = sources(6, 2)
    before = greedy_search(m, src, max_len_a=1.0, max_len_b=8)
    with torch.no_grad():
        for layer in m.decoder:
            layer.ffn.ff2.weight.mul_(-3.0)
            layer.self_attn.v.bias.add_(1.0)
    fused = greedy_search(m, src, max_len_a=1.0, max_len_b=8)
    monkeypatch.setenv(FORCE, "reference")
    layers = greedy_search(m, src, max_len_a=1.0, max_len_b=8)
    assert [h.ids for h in fused] == [h.ids for h in layers]
    assert [h.score for h in fused] == pytest.approx([h.score for h in layers], rel=1e-5, abs=1e-5)
    assert [h.score for h in fused] != pytest.approx([h.score for h in before], rel=1e-3)


def test_a_decode_checks_the_kept_weights_once(monkeypatch):
    """Inside ``weights_fixed`` (every decode call) the parameters are compared with the kept copy at the first
    pass only; outside it, and in the next decode, at every pass."""
    m = tiny_model()
    src = sources(2, 2)
    greedy_search(m, src, max_len_a=1.0, max_len_b=8)  # builds the kept copy
    checks = []
    real = JanusModel._fused_key

    def key(params):  # the decoder's weights (the encoder's are checked once per encode call)
        if params is m._fused_params:
            checks.append(1)
        return real(params)

    monkeypatch.setattr(JanusModel, "_fused_key", staticmethod(key))
    hyps = greedy_search(m, src, max_len_a=1.0, max_len_b=8)
    assert max(h.passes for h in hyps) > 2 and len(checks) == 1
    checks.clear()
    with torch.inference_mode():
        enc, cache = m.encode(src), KVCache()
        for _ in range(3):
            m.decode_ar_step(torch.full((2,), 7), enc, cache)
    assert len(checks) == 3 and m._fused_checked is None
    with m.weights_fixed():
        assert m._fused_checked is False
        with m.weights_fixed():  # nested: the outer block's check stands
            m.fused_weights()
            assert m._fused_checked is True
        assert m._fused_checked is True
    assert m._fused_checked is None


def spans_as_matrix(rows):
    col = torch.arange(rows.visibility.shape[-1])
    span = rows.visible_span
    return (col >= span[..., :1]) & (col < span[..., 1:])


def test_the_builders_spans_are_their_visibility():
    """Rows that carry ``visible_span`` (what the kernel reads) carry the same visibility in it as in their
    matrix (what the layers read): AR verification, mask-predict canvases, and both in one speculative pass."""
    from janus.decoding.speculative import fused_rows
    from janus.streams import build_ar_verify_rows, build_canvas_rows

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 50, (4, 12), generator=g)
    starts, ends = torch.tensor([1, 3, 0, 5]), torch.tensor([4, 4, 2, 9])
    verify = build_ar_verify_rows(tokens, starts, ends, pad=0, mask=4)
    assert torch.equal(spans_as_matrix(verify), verify.visibility)
    canvas = torch.tensor([[1, 4, 4, 2, 0, 0], [1, 7, 4, 9, 4, 2], [0, 0, 0, 0, 0, 0], [1, 2, 0, 0, 0, 0]])
    nar = build_canvas_rows(canvas, pad=0)
    assert torch.equal(spans_as_matrix(nar), nar.visibility)
    both = fused_rows(verify, canvas, pad=0)
    assert torch.equal(spans_as_matrix(both), both.visibility)


@pytest.mark.parametrize("T,beam", [(1, 1), (4, 1), (3, 2)])
def test_mask_predict_through_the_kernel_equals_the_layers(monkeypatch, T, beam):
    """Canvas passes of at most MAX_ROWS rows go through the kernel (their keys/values in a scratch cache):
    the same outputs and scores as through the layers."""
    from janus.decoding import mask_predict

    m = tiny_model(4)
    src = sources(9, 3)
    calls = count_calls(monkeypatch)
    runs = {}
    for force in ("cpp", "reference"):
        monkeypatch.setenv(FORCE, force)
        runs[force] = [mask_predict(m, src[i : i + 1], iterations=T, length_beam=beam)[0] for i in range(3)]
    assert calls and all(shape[0] == beam for shape in calls)
    assert [h.ids for h in runs["cpp"]] == [h.ids for h in runs["reference"]]
    assert [h.score for h in runs["cpp"]] == pytest.approx([h.score for h in runs["reference"]], rel=1e-5, abs=1e-5)


def test_opcheck():
    args = problem(11, N=2, R=4, C=2, B=2)
    torch.library.opcheck(torch.ops.janus.decoder_step.default, tuple(args))


def test_rows_by_dtype_and_width():
    from janus.ops.decoder_step import NARROW, NARROW_ROWS

    assert max_rows(torch.float32, 512) == max_rows(torch.float32, NARROW + 1) == MAX_ROWS[torch.float32]
    assert max_rows(torch.float32, 64) == max_rows(torch.float32, NARROW) == NARROW_ROWS[torch.float32]
    assert MAX_ROWS[torch.float32] < NARROW_ROWS[torch.float32]
    assert max_rows(torch.bfloat16, 512) == MAX_ROWS[torch.bfloat16] < max_rows(torch.bfloat16, NARROW)
    assert max_rows(torch.bfloat16, NARROW) == NARROW_ROWS[torch.bfloat16]
    assert max_rows(torch.float64, 64) == max_rows(torch.float16, 64) == 0


def encoder_problem(seed, B=3, S=9, D=32, H=4, F=48, L=2):
    """Random arguments of one encoder pass (no cross lists): right-padded sentences whose rows see their
    real positions, written to scratch keys/values at columns 0 .. S-1."""
    args = problem(seed, N=B, R=S, C=S, D=D, H=H, F=F, L=L, B=B, S=S, W=S)
    lengths = torch.tensor([S - b % 4 for b in range(B)])
    args[2] = torch.stack([torch.zeros(B, dtype=torch.long), lengths], -1)[:, None, :].expand(B, S, 2)
    args[3] = torch.arange(S).expand(B, S)
    args[6], args[7] = [], []
    args[8] = torch.arange(S)[None, :] < lengths[:, None]
    per = len(LAYER_WEIGHTS)
    names = [name.replace("self_attn.", "attn.") for name in LAYER_WEIGHTS]
    keep = [names.index(name) for name in ENCODER_LAYER_WEIGHTS]  # norm2 stays: the feed-forward's norm there
    args[9] = [args[9][per * layer + i] for layer in range(L) for i in keep]
    assert len(args[9]) == L * len(ENCODER_LAYER_WEIGHTS)
    return args


@pytest.mark.parametrize("panels", [False, True], ids=["row-major", "panels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoder_layers_match_the_reference(panels, dtype):
    """Empty cross lists: the encoder's layers (self-attention over each sentence's real positions and the
    feed-forward, 12 weights a layer), in float32 to the reference's rounding, in bf16 within its error."""
    args = encoder_problem(4)
    args = in_dtype(args, dtype) if dtype != torch.float32 else args
    args = packed(args) if panels else args
    kernel_args, ref_args, exact_args = cloned(args), cloned(args), in_double(args)
    out = torch.ops.janus.decoder_step(*kernel_args)
    want, exact = decoder_step_ref(*ref_args), decoder_step_ref(*exact_args)
    assert out.shape == args[0].shape and out.dtype == dtype
    if dtype == torch.float32:
        assert_within_baseline(out, exact, want, factor=4.0, atol=1e-5, name="encoder")
    else:
        assert_within_baseline(out, exact, want, factor=1.0, atol=1e-2, name="bf16 encoder")
    # one sentence alone: the same bits
    alone = cloned(args)
    for i in (0, 2, 3, 8):
        alone[i] = args[i][1:2].contiguous()
    alone[4], alone[5] = [t[1:2].clone() for t in args[4]], [t[1:2].clone() for t in args[5]]
    assert torch.equal(torch.ops.janus.decoder_step(*alone), out[1:2])


def test_encoder_layers_name_a_bad_weight_count():
    args = encoder_problem(5)
    args[9] = args[9][:-1]
    with pytest.raises(ValueError, match="the cross lists empty for an encoder"):
        torch.ops.janus.decoder_step(*args)
    args = encoder_problem(5)
    args[6] = [torch.zeros(3, 4, 9, 8)] * 2  # cross keys without values
    with pytest.raises(ValueError, match="layers need"):
        torch.ops.janus.decoder_step(*args)
    args = encoder_problem(5)
    args[5] = [args[5][0], torch.zeros(3, 4, 10, 8)]  # layer 1's values one column wider
    with pytest.raises(ValueError, match=r"layer 1: cache widths 9/10 must agree across layers"):
        torch.ops.janus.decoder_step(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_encoder_through_the_kernel_equals_its_layers(monkeypatch, dtype):
    """The model's encoder runs through the kernel in one call (pad rows included: they see the real positions,
    as in the layers); its states equal the layers' to rounding, and follow in-place weight updates."""
    m = tiny_model(4).to(dtype)
    src = sources(8, 5)
    calls = count_calls(monkeypatch, encoder=True)
    with torch.inference_mode():
        fused = m.encode(src).states.float()
    assert calls == [(5, src.shape[1], m.cfg.d_model)]
    monkeypatch.setenv(FORCE, "reference")
    with torch.inference_mode():
        layers = m.encode(src).states.float()
    assert len(calls) == 1
    if dtype == torch.float32:
        torch.testing.assert_close(fused, layers, rtol=1e-5, atol=2e-5)
    else:
        exact = tiny_model(4)
        with torch.inference_mode():
            want = exact.encode(src).states
        assert_within_baseline(fused, want, layers, factor=1.0, atol=1e-2, name="bf16 encoder")
    monkeypatch.delenv(FORCE)
    with torch.no_grad():
        m.encoder[1].ffn.ff1.bias.add_(0.5)
        m.encoder[0].attn.k.weight.mul_(-1.0)
    with torch.inference_mode():
        moved = m.encode(src).states.float()
    monkeypatch.setenv(FORCE, "reference")
    with torch.inference_mode():
        moved_layers = m.encode(src).states.float()
    tol = dict(rtol=1e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(moved, moved_layers, **tol)
    assert not torch.allclose(moved, fused, rtol=1e-2, atol=1e-2)


def test_the_encoder_kernel_is_not_used_where_it_does_not_apply(monkeypatch):
    """Training mode, autograd, an int8 copy with a quantized encoder, float64, too many rows, a left-padded
    source: the layers."""
    m = tiny_model(5)
    src = sources(9, 3)
    calls = count_calls(monkeypatch, encoder=True)
    m.encode(src)  # autograd
    with torch.no_grad():
        m.train()
        m.encode(src)
        m.eval()
        m.double().encode(src)
        m.float()
        quantize_dynamic_int8(m, encoder=True).encode(src)
        big = sources(10, max_rows(torch.float32, m.cfg.d_model))  # more rows than the kernel takes
        m.encode(big)
        left = torch.where(src == 0, 0, src).flip(1)  # left-padded: the layers, which mask any positions
        left_states = m.encode(left).states
    assert not calls
    with torch.no_grad():
        quantize_dynamic_int8(m).encode(src)  # its encoder stays float32
        m.encode(src)
        monkeypatch.setenv(FORCE, "reference")
        torch.testing.assert_close(m.encode(left).states, left_states)
    assert len(calls) == 2


def test_the_benchmark_times_the_rows_read_after_checking_their_bits(tmp_path):
    """benchmarks/decoder_step.py: an AR pass and canvases, each through the kernel with every row, with the rows
    the model reads (``outputs``; same bits there, checked before timing) and through the layers."""
    out = tmp_path / "step.json"
    cmd = [sys.executable, "benchmarks/decoder_step.py", "--preset", "small", "--dtype", "float32", "--hypotheses",
           "1", "--rows", "10", "--canvases", "3", "--sources", "", "--rounds", "3", "--calls", "1", "--threads", "1",
           "--json", str(out)]  # fmt: skip
    subprocess.run(cmd, cwd=Path(__file__).parents[1], check=True, capture_output=True)
    import json

    rows = json.loads(out.read_text())["results"]
    assert [(r["pass"], r["rows"]) for r in rows] == [("decoder", 10), ("canvas", 66)]
    for r in rows:
        assert r["kernel_us"] > 0 and r["kernel_read_us"] > 0 and r["layers_us"] > 0 and r["max_abs_diff"] <= 1e-4
