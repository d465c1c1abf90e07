"""decoder_step: every decoder layer of one incremental inference pass over a few rows, in one call.

An AR step (greedy: a content and a query row per hypothesis), a beam step, or a speculative verification
pass (a few content and query rows per hypothesis) of a small model costs far more in operator overhead than
in arithmetic: the ``small`` preset's step is about 0.7 MFLOP, yet torch runs it as ~60 operator calls from
Python. The "cpp" kernel (csrc/cpu/decoder_step.cpp) runs the same layers as loops over preallocated
buffers, its products through ``skinny_linear``'s tiles.

The pass, per layer (JANUS.md section 2's post-norm decoder layer, inference form, no dropout); x (N, R, D),
the first C = ``num_content`` rows of each hypothesis content rows:

1. q, k, v = x Wqkv^T + bqkv; the content rows' k, v are written into the layer's cache
   (``self_k``, ``self_v``: (N, H, W, D/H), in place) at ``columns`` (N, C);
2. row r of hypothesis n attends to cache columns [``spans[n, r, 0]``, ``spans[n, r, 1]``) (every row of
   an AR pass sees a prefix of the columns: a content row at t sees t and before, a query row at t + 1 the
   same; a mask-predict canvas row sees its canvas' columns, a pad row column 0 alone);
   x = LN1(x + attention Wo^T + bo);
3. cross-attention over sentence n // g's source keys/values (``cross_k``, ``cross_v``: (B, H, S, D/H),
   g = N / B hypotheses per sentence) where ``keep`` (B, S) holds; x = LN2(x + ...);
4. x = LN3(x + relu(x W1^T + b1) W2^T + b2).

``outputs`` (bool (N, R), optional) names the rows whose final states the caller reads: a mask-predict pass its
masked rows, an AR pass its query rows. The kernel runs the last layer's steps 2-4 on those alone (the other rows
still write their keys/values) and returns the others as zeros, as the reference does; the rows read are the same
bits either way (a row's sums do not depend on the other rows).

With empty ``cross_k`` and ``cross_v`` the layers are the encoder's (``ENCODER_LAYER_WEIGHTS``): steps 1, 2
and 4 (x = LN2(x + ...) there), every row a content row seeing its sentence's real positions. The model's
encoder runs through it (``JanusModel.encode``): a 20-token sentence's three layers in one call, where torch
makes ~60 operator calls. Attention runs by runs of rows that see the same columns of the same keys/values (a
canvas' rows, an AR step's content and query rows, in cross-attention every row of a sentence's beams): each
run's keys are transposed once per head and read for all its rows, the scores in register blocks of 8 rows, the
weighted values summed in registers; every row's sums run in one order whatever its run, so a row's result
depends on neither the other rows nor the thread count. Each thread runs every layer over one range of the pass:
of whole hypotheses (a beam step, a batch's canvases), or of rows (a speculative verification, one sentence's
canvases: a barrier per layer once the keys/values are written), where the products used to be split one by one
(a small-preset beam step 258 -> 210 us, a verification of 10 rows 261 -> 216).

``decoder_step_ref`` is the specification (torch's linear, attention and layer norm, as the model's own
layers compute them) and the fallback; ``decoder_step`` dispatches (janus.ops._dispatch) between:

- "cpp": ``torch.ops.janus.decoder_step``, CPU tensors, all float32 or all bfloat16, no autograd. In
  bfloat16 the kernel reads the weights, caches and source keys/values as bf16; its products multiply the rows
  rounded to bf16 by the weights (exact products, fp32 sums), on the CPU's bf16 dot-product instruction where
  it has one (AVX512_BF16's vdpbf16ps: twice the fp32 multiply-adds; the same bits as the widened FMAs of the
  other CPUs, which ``JANUS_CPU_BF16_DOT=0`` forces); the rows between products, attention and norms stay in
  fp32 (rounded to bf16 only where a key/value is cached and at the output): half the bytes of a float32 pass,
  and closer to the fp32 result than the reference in bf16, which rounds every intermediate;
- "reference": ``decoder_step_ref``.

Force one with ``JANUS_BACKEND_DECODER_STEP=cpp|reference``. The model (``janus.model.JanusModel``) runs
its inference passes of at most ``max_rows(dtype, width)`` rows through the "cpp" kernel when it is available (see
``JanusModel.fused_step_ok``); results agree with its own layers to fp32 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from janus import _ext
from janus.ops._dispatch import Backend, Verdict, all_on_cpu, compiled, register_op
from janus.ops.skinny_linear import CPU_AMX, unpack_panels

# The 18 tensors of one layer in ``weights``, in this order.
LAYER_WEIGHTS = (
    "self_attn.qkv.weight",  # (3D, D): [Wq; Wk; Wv]
    "self_attn.qkv.bias",  # (3D,)
    "self_attn.out.weight",
    "self_attn.out.bias",
    "norm1.weight",
    "norm1.bias",
    "cross_attn.q.weight",
    "cross_attn.q.bias",
    "cross_attn.out.weight",
    "cross_attn.out.bias",
    "norm2.weight",
    "norm2.bias",
    "ffn.ff1.weight",  # (F, D)
    "ffn.ff1.bias",
    "ffn.ff2.weight",  # (D, F)
    "ffn.ff2.bias",
    "norm3.weight",
    "norm3.bias",
)

# The 12 tensors of one encoder layer (no cross-attention lists), in this order.
ENCODER_LAYER_WEIGHTS = (
    "attn.qkv.weight",  # (3D, D): [Wq; Wk; Wv]
    "attn.qkv.bias",
    "attn.out.weight",
    "attn.out.bias",
    "norm1.weight",
    "norm1.bias",
    "ffn.ff1.weight",
    "ffn.ff1.bias",
    "ffn.ff2.weight",
    "ffn.ff2.bias",
    "norm2.weight",
    "norm2.bias",
)

# Rows (N * R) up to which a pass goes through the kernel, by dtype. ``python benchmarks/decoder_step.py`` on
# a 2-core AVX-512 Xeon with AMX, 2 threads (benchmarks/results/decoder_step_cpu.json), the kernel's speedup
# over the layers at 2 / 10 / 16 / 32 / 50 / 64 / 80 rows: float32 small preset 3.8 / 3.0 / 2.1 / 1.6 / 1.0 /
# 1.2 / 0.85, iwslt 3.0 / 1.9 / 1.4 / 1.4 / 1.1 / 1.05 / 0.88 (its products are skinny_linear's tiles, made
# for few rows); bfloat16 iwslt 2.9 / 1.8 / 1.4 / 0.94 / 0.61 / 0.70 / 0.50 (oneDNN's bf16 GEMMs with AMX
# tiles are flat in the rows), bfloat16 small preset 7.3 / 4.2 / 3.4 / 2.3 / 1.8 / 1.7 / 1.2. Those bf16 figures
# were the kernel's widened fp32 arithmetic; on a CPU without AMX, whose bf16 products run on the bf16
# dot-product instruction (skinny_linear.cpu_bf16_dot) against oneDNN's AVX512_BF16 GEMMs, the same benchmark
# on the 2-core AMD EPYC gave bfloat16 iwslt 2.96 / 3.14 / 2.73 / 2.39 / 2.21 / 2.45 at 2 / 10 / 16 / 32 / 50 /
# 64 rows, its encoder 2.07 / 1.51 at 20 / 80: there bf16 goes as far as float32.
MAX_ROWS = {torch.float32: 64, torch.bfloat16: 16 if CPU_AMX else 64}
# Widths up to this (the small preset's 128), where the kernel stays ahead past those rows. Its attention by runs
# of rows sharing their columns (a canvas' rows read its transposed keys once), measured on the model shipped
# as builtin:de-en, 2-core AVX-512 AMD EPYC, 2 threads, mask-predict passes over 3 canvases of 26 tokens per
# sentence (the median of 7 interleaved rounds), the kernel's speedup over the layers at 78 / 156 / 624 / 1248 /
# 1872 / 2496 / 3744 / 7488 rows: float32 1.86 / 1.67 / 1.29 / 1.51 / 1.42 / 1.35 / 1.47 / 1.35; bfloat16 at
# 78 / 156 / 312 / 468 / 624 / 1248 / 2496 rows 2.00 / 1.50 / 1.17 / 1.06 / 1.09 / 0.84 / 0.88 (oneDNN's bf16
# GEMMs pull ahead of the kernel's fp32 arithmetic on bf16 weights). With the bf16 dot products, the whole
# batch-32 decode of 64 test sentences (3 interleaved rounds) at 8192 rows against 640 took T=10 l=3 8.03 / 9.44
# ms a sentence, T=4 l=1 1.78 / 1.92: the limit is float32's where the CPU has no AMX.
NARROW = 128
NARROW_ROWS = {torch.float32: 8192, torch.bfloat16: 640 if CPU_AMX else 8192}


def max_rows(dtype: torch.dtype, width: int) -> int:
    """Rows (N * R) up to which a pass of this dtype and model width goes through the kernel (0: never)."""
    if width <= NARROW:
        return NARROW_ROWS.get(dtype, 0)
    return MAX_ROWS.get(dtype, 0)


def decoder_step_ref(
    x: Tensor,
    num_content: int,
    spans: Tensor,
    columns: Tensor,
    self_k: Sequence[Tensor],
    self_v: Sequence[Tensor],
    cross_k: Sequence[Tensor],
    cross_v: Sequence[Tensor],
    keep: Tensor,
    weights: Sequence[Tensor],
    n_heads: int,
    eps: float,
    outputs: Optional[Tensor] = None,
) -> Tensor:
    """Reference (see the module docstring).

    Args:
        x: (N, R, D) float rows; the first ``num_content`` of each hypothesis are content rows.
        spans: int64 (N, R, 2), row r of hypothesis n sees self-attention cache columns
            [spans[n, r, 0], spans[n, r, 1]) (a non-empty range).
        columns: int64 (N, num_content), the cache column of each content row.
        self_k, self_v: per layer (N, H, W, D/H), written in place at ``columns``.
        cross_k, cross_v: per layer (B, H, S, D/H), the encoder's keys/values; N = g * B. Both empty: the
            encoder's layers (no cross-attention).
        keep: bool (B, S), True at the source positions to attend to.
        weights: ``len(LAYER_WEIGHTS)`` per layer, in that order (``len(ENCODER_LAYER_WEIGHTS)`` for the
            encoder's); a weight matrix may come packed in panels (``janus.ops.skinny_linear.pack_panels``; its
            row count a multiple of 16).
        n_heads, eps: attention heads and the layer norms' epsilon.
        outputs: bool (N, R), the rows whose final states are read (None: all); the others come back zero (the
            kernel skips their last layer beyond its keys/values).
    Returns:
        (N, R, D) final hidden states.
    """
    N, R, D = x.shape
    H, dk, C = n_heads, D // n_heads, num_content
    B, W = keep.shape[0], self_k[0].shape[2] if self_k else 0
    g = N // B
    col = torch.arange(W, device=x.device)[None, None, :]
    seen = (col >= spans[:, :, :1]) & (col < spans[:, :, 1:])  # (N, R, W)
    cross_mask = keep.repeat_interleave(g, 0)[:, None, None, :]  # (N, 1, 1, S)
    index = columns[:, None, :, None].expand(N, H, C, dk)

    def split(t: Tensor) -> Tensor:  # (N, L, D) -> (N, H, L, dk)
        return t.view(N, t.shape[1], H, dk).transpose(1, 2)

    def merge(t: Tensor) -> Tensor:  # (N, H, L, dk) -> (N, L, D)
        return t.transpose(1, 2).reshape(N, -1, D)

    cross = bool(cross_k) or bool(cross_v)
    names = LAYER_WEIGHTS if cross else ENCODER_LAYER_WEIGHTS
    per, f = len(names), names.index("ffn.ff1.weight")  # f: the feed-forward's first
    for layer in range(len(self_k)):
        w = [unpack_panels(t) if t.dim() == 3 else t for t in weights[per * layer : per * (layer + 1)]]
        q, k, v = F.linear(x, w[0], w[1]).split(D, -1)
        self_k[layer].scatter_(2, index, split(k[:, :C]))
        self_v[layer].scatter_(2, index, split(v[:, :C]))
        o = F.scaled_dot_product_attention(split(q), self_k[layer], self_v[layer], attn_mask=seen[:, None])
        x = F.layer_norm(x + F.linear(merge(o), w[2], w[3]), (D,), w[4], w[5], eps)
        if cross:
            ck = cross_k[layer].repeat_interleave(g, 0)
            cv = cross_v[layer].repeat_interleave(g, 0)
            o = F.scaled_dot_product_attention(split(F.linear(x, w[6], w[7])), ck, cv, attn_mask=cross_mask)
            x = F.layer_norm(x + F.linear(merge(o), w[8], w[9]), (D,), w[10], w[11], eps)
        y = F.linear(F.relu(F.linear(x, w[f], w[f + 1])), w[f + 2], w[f + 3])
        x = F.layer_norm(x + y, (D,), w[f + 4], w[f + 5], eps)
    return x if outputs is None else x.masked_fill(~outputs[..., None], 0.0)


def _decoder_step_fake(x: Tensor, *args) -> Tensor:
    return torch.empty_like(x)


@_ext.when_loaded  # registering a fake needs the C++ schema (csrc/ops.cpp) to exist
def _register_fake() -> None:
    torch.library.register_fake("janus::decoder_step", _decoder_step_fake)


def _fits_cpp(x: Tensor, num_content: int, spans: Tensor, columns: Tensor, self_k, self_v, cross_k, cross_v,
              keep: Tensor, weights, n_heads: int, eps: float,
              outputs: Optional[Tensor] = None) -> Verdict:  # fmt: skip
    tensors = [x, spans, columns, keep, *self_k, *self_v, *cross_k, *cross_v, *weights]
    tensors += [outputs] if outputs is not None else []
    ok, why = all_on_cpu(*tensors)
    if not ok:
        return ok, why
    floats = [x, *self_k, *self_v, *cross_k, *cross_v, *weights]
    if x.dtype not in (torch.float32, torch.bfloat16) or any(t.dtype != x.dtype for t in floats):
        return False, "the kernel takes float32 or bfloat16 rows, caches and weights, all alike"
    if torch.is_grad_enabled() and any(t.requires_grad for t in floats):
        return False, "the kernel has no backward (inference only: run under torch.no_grad)"
    return True, ""


def decoder_step_checked(*args) -> Tensor:
    """The "cpp" kernel, ``decoder_step_ref``'s arguments in its order, for a caller that checked them
    (``JanusModel.fused_step_ok``): the dispatch's per-call checks skipped (the kernel checks shapes itself)."""
    return torch.ops.janus.decoder_step(*args)


DECODER_STEP = register_op(
    "decoder_step",
    [
        Backend("cpp", decoder_step_checked, available=compiled("decoder_step", "cpu"), supports=_fits_cpp),
        Backend("reference", decoder_step_ref),
    ],
)


def kernel_ready() -> bool:
    """Whether the model may send its small inference passes to the "cpp" kernel: it is compiled and
    loaded, and JANUS_BACKEND_DECODER_STEP (or JANUS_BACKEND) does not force another backend."""
    return DECODER_STEP.may_use("cpp")


def decoder_step(
    x: Tensor,
    num_content: int,
    spans: Tensor,
    columns: Tensor,
    self_k: Sequence[Tensor],
    self_v: Sequence[Tensor],
    cross_k: Sequence[Tensor],
    cross_v: Sequence[Tensor],
    keep: Tensor,
    weights: Sequence[Tensor],
    n_heads: int,
    eps: float,
    outputs: Optional[Tensor] = None,
) -> Tensor:
    """The decoder layers of one inference pass on the fastest available backend (see the module docstring).

    Same contract as ``decoder_step_ref``; the "cpp" kernel sums in another order than torch's kernels, so
    results agree to fp32 rounding, not bit for bit.
    """
    return DECODER_STEP(
        x, num_content, spans, columns, self_k, self_v, cross_k, cross_v, keep, weights, n_heads, eps, outputs
    )
