"""The JANUS model: a Transformer encoder, ONE shared two-stream decoder, a length head.

Every weight (embeddings, attention, FFN, norms, output projection) is shared by
every stream and every mode. Post-norm layers, learned positions, one joint
embedding matrix that is also the output projection, BERT-style init
(JANUS.md section 3). Which rows exist and who sees whom lives in
``janus.streams``; this file only runs rows through layers.

Shapes: B batch, S source length, R decoder rows, C content rows, D d_model,
H heads, V vocabulary.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.ao.nn.quantized.dynamic import Linear as _DynamicInt8Linear

from janus.config import ModelConfig
from janus.ops.cache_reorder import cache_reorder_checked
from janus.ops.cache_reorder import kernel_ready as cache_reorder_ready
from janus.ops.decoder_step import (
    ENCODER_LAYER_WEIGHTS,
    LAYER_WEIGHTS,
    decoder_step_checked,
    kernel_ready,
    max_rows,
)
from janus.ops.skinny_linear import MAX_ROWS as SKINNY_ROWS
from janus.ops.skinny_linear import MIN_WEIGHT as SKINNY_MIN_WEIGHT
from janus.ops.skinny_linear import PANEL, pack_panels, panel_rows, skinny_linear_checked
from janus.ops.skinny_linear import kernel_ready as skinny_kernel_ready
from janus.streams import DecoderRows


@dataclass
class EncoderOut:
    """Encoder states and their padding.

    When decoding without gradients, each decoder layer's cross-attention keys/values are
    computed on first use and kept in ``cross``, so every later pass (beam steps,
    mask-predict passes, verification passes) reuses them.
    """

    states: Tensor  # (B, S, D)
    padding: Tensor  # (B, S) bool, True at pad
    lengths: Tensor  # (B,) int64, non-pad source tokens (with eos)
    cross: list[Optional[tuple[Tensor, Tensor]]] = field(default_factory=list)  # per layer (B, H, S, D/H) x2
    # (B, 1, 1, S) bool attention mask over the source, or None when no sentence has padding; made on
    # first use by ``attention_mask`` (one host sync per batch, not one per decoder pass).
    mask: Optional[Tensor] = None
    mask_known: bool = False
    keep: Optional[Tensor] = None  # (B, S) bool, True at real source tokens (``source_keep``)

    def select(self, index: Tensor) -> "EncoderOut":
        """The sentences ``index`` (int64 (B',)), in that order, with their cached keys/values."""
        cross = [None if kv is None else (kv[0][index], kv[1][index]) for kv in self.cross]
        return EncoderOut(self.states[index], self.padding[index], self.lengths[index], cross)

    def attention_mask(self) -> Optional[Tensor]:
        """(B, 1, 1, S) bool, True at real source tokens, or None when there is no padding at all
        (attention without a mask is the same and cheaper)."""
        if not self.mask_known:
            self.mask = (~self.padding)[:, None, None, :] if bool(self.padding.any()) else None
            self.mask_known = True
        return self.mask

    def source_keep(self) -> Tensor:
        """(B, S) bool, True at real source tokens (made on first use)."""
        if self.keep is None:
            self.keep = ~self.padding
        return self.keep


@dataclass
class LayerCache:
    """Keys/values of one decoder layer for incremental decoding.

    Self-attention keys/values live in a buffer whose column j holds the content row
    written to column j (AR decoding writes position t to column t). The buffer grows
    by doubling, so appending a step costs no copy of the past.
    """

    self_k: Optional[Tensor] = None  # (N, H, capacity, D/H), N hypotheses
    self_v: Optional[Tensor] = None
    reserve: int = 0  # columns to allocate at the first write (KVCache.capacity)

    def ensure(self, need: int, N: int, H: int, dk: int, like: Tensor) -> None:
        """Buffers (N, H, >= need, dk) in ``like``'s dtype and on its device (the columns in use kept)."""
        cap = 0 if self.self_k is None else self.self_k.shape[2]
        if need > cap:
            new_cap = max(need, self.reserve) if cap == 0 and self.reserve else max(need, 2 * cap, 16)
            # Zeros, not empty: a column no row sees still enters attention with weight 0, and
            # uninitialised memory may hold NaN, which survives multiplication by 0.
            grown_k, grown_v = like.new_zeros(N, H, new_cap, dk), like.new_zeros(N, H, new_cap, dk)
            if cap:
                grown_k[:, :, :cap] = self.self_k
                grown_v[:, :, :cap] = self.self_v
            self.self_k, self.self_v = grown_k, grown_v

    def write(self, k: Tensor, v: Tensor, start: int, columns: Optional[Tensor], width: int) -> tuple[Tensor, Tensor]:
        """Store new content keys/values and return columns [0, width) of the buffers.

        Args:
            k, v: (N, H, C, D/H) of the new content rows.
            start: first column of a contiguous write (used when ``columns`` is None).
            columns: (N, C) int64 column of each new content row, or None.
            width: how many columns the caller's visibility covers.
        """
        N, H, C, dk = k.shape
        need = max(width, start + C) if columns is None else max(width, int(columns.max()) + 1 if C else 0)
        self.ensure(need, N, H, dk, k)
        if columns is None:
            self.self_k[:, :, start : start + C] = k
            self.self_v[:, :, start : start + C] = v
        else:
            index = columns[:, None, :, None].expand(N, H, C, dk)
            self.self_k.scatter_(2, index, k)
            self.self_v.scatter_(2, index, v)
        return self.self_k[:, :, :width], self.self_v[:, :, :width]


@dataclass
class KVCache:
    """Per-layer self-attention caches of incremental decoding, one row per hypothesis.

    ``length`` is the number of cache columns in use. (Cross-attention keys/values are
    kept per sentence on the ``EncoderOut``.) ``capacity``, when the caller knows how many
    columns it will write (AR search: its step limit), is allocated at the first write, so the
    buffers never grow (and are never copied) during the search.
    """

    layers: list[LayerCache] = field(default_factory=list)
    length: int = 0
    capacity: int = 0
    # With a capacity: one buffer (layers, 2, N, H, capacity, D/H) whose views are every layer's keys and
    # values, so that a beam step reorders all of them in one copy; None before the first write.
    joint: Optional[Tensor] = None
    _views: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def prepare(self, num_layers: int, N: int, H: int, dk: int, like: Tensor) -> None:
        """Before a pass: the layers' caches, and with a ``capacity`` and nothing written yet, the joint buffer
        of that many columns for N hypotheses in ``like``'s dtype and device (zeros, as ``LayerCache.ensure``)."""
        if not self.layers:
            self.layers = [LayerCache(reserve=self.capacity) for _ in range(num_layers)]
        if self.capacity and self.joint is None and all(c.self_k is None for c in self.layers):
            self.joint = like.new_zeros(len(self.layers), 2, N, H, self.capacity, dk)
            self._view_joint()

    def _view_joint(self) -> None:
        self._views = [(self.joint[i, 0], self.joint[i, 1]) for i in range(len(self.layers))]
        for c, (k, v) in zip(self.layers, self._views):
            c.self_k, c.self_v = k, v

    def _joint_in_use(self) -> bool:
        """Whether every layer's keys/values are still the joint buffer's views (a layer that outgrew the
        capacity has buffers of its own)."""
        return self.joint is not None and all(
            c.self_k is k and c.self_v is v for c, (k, v) in zip(self.layers, self._views, strict=True)
        )

    def select(self, hypotheses: Union[Tensor, list[int]]) -> None:
        """Keep hypothesis rows ``hypotheses`` (int64 (N',), or host ints) in that order: beam search
        reorders them every step, and finished hypotheses leave."""
        layers = [c for c in self.layers if c.self_k is not None]
        if not layers:
            return
        joint = self._joint_in_use()
        N = layers[0].self_k.shape[0]
        if isinstance(hypotheses, list):
            if joint and len(hypotheses) == N and self.joint.device.type == "cpu" and cache_reorder_ready():
                # Same batch size on the CPU: the moved rows' columns in use, in one call (janus.ops.cache_reorder).
                J = self.joint
                cache_reorder_checked(J.view(J.shape[0] * 2, *J.shape[2:]), hypotheses, self.length)
                return
            hypotheses = torch.tensor(hypotheses, device=layers[0].self_k.device)
        if hypotheses.numel() != N:
            if joint:
                self.joint = self.joint.index_select(2, hypotheses)
                self._view_joint()
            else:
                self.joint = None
                for c in layers:
                    c.self_k, c.self_v = c.self_k[hypotheses], c.self_v[hypotheses]
            return
        # Same batch size: in place, only the rows that change (a beam step keeps about half its hypotheses
        # where they were) and the columns in use; index_select / index_copy_ take half the time of [] there.
        if hypotheses.device.type == "cpu":  # a few host ints: cheaper than four tensor ops
            order = hypotheses.tolist()
            pairs = [(i, h) for i, h in enumerate(order) if h != i]
            if not pairs:
                return
            moved = torch.tensor([i for i, _ in pairs])
            sources = torch.tensor([h for _, h in pairs])
        else:
            moved = (hypotheses != torch.arange(hypotheses.numel(), device=hypotheses.device)).nonzero().squeeze(1)
            if moved.numel() == 0:
                return
            sources = hypotheses[moved]
        if joint:
            used = self.joint.narrow(4, 0, self.length)
            used.index_copy_(2, moved, used.index_select(2, sources))
            return
        for c in layers:
            for t in (c.self_k, c.self_v):
                used = t.narrow(2, 0, self.length)
                used.index_copy_(0, moved, used.index_select(0, sources))


class Dropout(nn.Module):
    """Inverted dropout, as ``nn.Dropout(p)``, with cheaper masks for CPU tensors.

    torch's CPU dropout draws every element's Bernoulli sample on its own, from two 32-bit
    Mersenne-Twister outputs through a double uniform: about 7 ns per element, 8% of a small-preset
    janus update (bf16, one thread). On a CPU this
    module instead draws 32 random bits per element in bulk (``random_`` of 64-bit words) and keeps an
    element when they fall below (1 - p) * 2**32: kept with probability 1 - p (to 2**-32), scaled by
    1 / (1 - p) rounded to the input's dtype, as ``F.dropout`` scales. That is about half the time
    (``_cpu_keep_mask``); the masks still come from torch's default generator, so a seed, and a
    checkpoint's saved RNG state on resume, fix them, but they differ from ``F.dropout``'s for that
    seed. Other devices (CUDA: fused Philox) use ``F.dropout``.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability {p} is not in [0, 1]")
        self.p = p

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: Tensor) -> Tensor:
        """x (...) any float dtype -> same shape and dtype; the identity in eval mode or for p = 0."""
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.p == 1.0:
            return F.dropout(x, self.p, True)
        noise = _cpu_keep_mask(x.shape, 1.0 - self.p, x.dtype).div_(1.0 - self.p)  # (...) 0 or 1/(1-p)
        return x * noise


def _cpu_keep_mask(shape: torch.Size, keep: float, dtype: torch.dtype = torch.bool) -> Tensor:
    """Mask of ``shape`` in ``dtype`` (True / 1 where kept), each element kept with probability ``keep``
    (in (0, 1]), independently.

    Random 64-bit words from torch's default CPU generator, read as pairs of int32 u, uniform on
    [-2**31, 2**31): an element is kept when u < keep * 2**32 - 2**31. The comparison writes ``dtype``
    directly (half the time of a bool mask and a conversion).
    """
    n = math.prod(shape)
    bits = torch.empty((n + 1) // 2, dtype=torch.int64).random_(-(2**63), None)  # full 64-bit range
    threshold = min(round(keep * 2**32) - 2**31, 2**31 - 1)
    return torch.lt(bits.view(torch.int32)[:n].view(shape), threshold, out=torch.empty(shape, dtype=dtype))


class Attention(nn.Module):
    """Multi-head attention; queries from ``x``, keys/values from ``kv`` (one SDPA call).

    The parameters are ``q``, ``k``, ``v``, ``out`` (the checkpoint format). For inference,
    ``project_qkv`` runs the three input projections as ONE GEMM over weights concatenated once
    and kept until a parameter changes (its storage or version counter), so training, which
    never uses it, is unchanged, and a loaded or updated model never sees stale weights. One kind of
    update escapes that key: torch's fused optimizers (``AdamW(fused=True)``) write parameters in place
    without bumping their version counters; code that decodes between such steps calls
    ``torch.autograd.graph.increment_version(params)`` after each, as the trainer does.
    ``Quantized`` (int8) instead gives the layer a fused ``qkv`` module of its own.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.h, self.dk = n_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.qkv: Optional[nn.Module] = None  # (D -> 3D) set by quantize_dynamic_int8 only
        self._fused: Optional[tuple[tuple, Tensor, Tensor]] = None  # (key, (3D, D) weight, (3D,) bias)

    def split(self, x: Tensor) -> Tensor:  # (B, L, D) -> (B, H, L, D/H)
        return x.view(x.shape[0], x.shape[1], self.h, self.dk).transpose(1, 2)

    def project_kv(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        return self.split(self.k(kv)), self.split(self.v(kv))

    def fused_qkv_weights(self) -> tuple[Tensor, Tensor]:
        """[W_q; W_k; W_v] (3D, D) and [b_q; b_k; b_v] (3D,), concatenated once per version of the
        parameters (detached: for inference only)."""
        params = (self.q.weight, self.k.weight, self.v.weight, self.q.bias, self.k.bias, self.v.bias)
        if any(p.is_inference() for p in params):  # no version counter to key a cache on
            key = None
        else:
            key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if key is None or self._fused is None or self._fused[0] != key:
            with torch.no_grad():
                w = torch.cat([p.detach() for p in params[:3]])
                b = torch.cat([p.detach() for p in params[3:]])
            if key is None:
                return w, b
            self._fused = (key, w, b)
        return self._fused[1], self._fused[2]

    def project_qkv(self, x: Tensor, num_kv: int) -> tuple[Tensor, Tensor, Tensor]:
        """Queries of every row of x (N, R, D) and keys/values of its first ``num_kv`` rows in one
        GEMM (inference only): q (N, R, D) unsplit; k, v (N, H, num_kv, D/H)."""
        if self.qkv is not None:
            qkv = _linear(self.qkv, x)  # (N, R, 3D)
        else:
            qkv = infer_linear(x, *self.fused_qkv_weights())
        D = self.h * self.dk
        kv = qkv[:, :num_kv]
        return qkv[..., :D], self.split(kv[..., D : 2 * D]), self.split(kv[..., 2 * D :])

    def attend(self, x: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], q: Optional[Tensor] = None) -> Tensor:
        """x (N, L, D); k, v (B, H, C, D/H); mask (B, 1|H, L', C) bool (True = attend) or None;
        q (N, L, D), the queries' projection when already computed (``project_qkv``), else None.

        N may be a multiple g of B: rows b*g .. b*g+g-1 of ``x`` then share keys/values b
        (beams of one sentence), and ``mask`` must broadcast over their g*L queries.
        """
        N, L, D = x.shape
        B = k.shape[0]
        if q is None:
            q = _linear(self.q, x.reshape(B, (N // B) * L, D) if N != B else x)
        elif N != B:
            q = q.reshape(B, (N // B) * L, D)
        o = _sdpa(self.split(q), k, v, mask, self.dropout if self.training else 0.0)
        return _linear(self.out, o.transpose(1, 2).reshape(N, L, D))


def _fuse_qkv(x: Tensor, num_content: int) -> bool:
    """Whether a pass over x (N, R, D) should project q, k, v as one GEMM: only without autograd
    (training keeps its three), and only where computing keys/values of the R - C query rows too
    costs nothing: every row is a content row, or so few rows that reading the weights dominates."""
    return not torch.is_grad_enabled() and (num_content == x.shape[1] or x.shape[0] * x.shape[1] <= _FUSE_ROWS)


# Rows up to which a GEMM against a D x 3D weight is bound by reading the weight, not by arithmetic.
_FUSE_ROWS = 32
# The weight matrices among a layer's ``LAYER_WEIGHTS`` (packed in panels for the kernel), and an encoder layer's.
_PRODUCTS = frozenset(i for i, name in enumerate(LAYER_WEIGHTS) if name.endswith(".weight") and "norm" not in name)
_ENCODER_PRODUCTS = frozenset(
    i for i, name in enumerate(ENCODER_LAYER_WEIGHTS) if name.endswith(".weight") and "norm" not in name
)
# The rows of an AR step (``JanusModel.decode_ar_step``: a content row, then a query row) whose states are read.
_QUERY_ROW = torch.tensor([False, True])


def _layer_params(layers: nn.ModuleList, attention: str, names: Sequence[str]) -> list[Tensor]:
    """Per layer: its self-attention's (``attention``) q, k, v weights and biases, then the parameters
    ``names`` past the fused two (``janus.ops.decoder_step.LAYER_WEIGHTS`` or ``ENCODER_LAYER_WEIGHTS``)."""
    params: list[Tensor] = []
    for layer in layers:
        a = layer.get_submodule(attention)
        params += [a.q.weight, a.k.weight, a.v.weight, a.q.bias, a.k.bias, a.v.bias]
        params += [layer.get_parameter(name) for name in names[2:]]
    return params


def _packed_layers(params: list[Tensor], num_layers: int, products: frozenset[int]) -> list[Tensor]:
    """``_layer_params``' tensors as the kernel takes them: q, k, v concatenated, the ``products`` (indices of a
    layer's weight matrices) packed in panels where their rows allow (janus.ops.skinny_linear); copies."""
    out: list[Tensor] = []
    per = len(params) // num_layers
    with torch.no_grad():
        for i in range(0, len(params), per):
            p = [t.detach() for t in params[i : i + per]]
            layer = [torch.cat(p[0:3]), torch.cat(p[3:6]), *p[6:]]
            out += [pack_panels(w) if j in products and w.shape[0] % PANEL == 0 else w for j, w in enumerate(layer)]
    return out


def _skinny(x: Tensor) -> bool:
    """Whether a product of x (..., K) with a weight is an inference step's few fp32 or bf16 CPU rows,
    for ``janus.ops.skinny_linear`` (see there how few, by dtype, and why)."""
    rows = SKINNY_ROWS.get(x.dtype, 0)
    return rows > 0 and x.device.type == "cpu" and x.numel() <= rows * x.shape[-1] and not torch.is_grad_enabled()


def infer_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear(x, weight, bias)``; an inference step's few fp32 or bf16 CPU rows go through
    ``janus.ops.skinny_linear``, which reads the weight once for them, where the weight is large."""
    if (
        _skinny(x)
        and weight.numel() >= SKINNY_MIN_WEIGHT
        and weight.dtype == x.dtype
        and (bias is None or bias.dtype == x.dtype)
    ):
        return skinny_linear_checked(x, weight, bias)
    return F.linear(x, weight, bias)


def _linear(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)``. Without autograd, the op itself: ``infer_linear`` for a plain nn.Linear, torch's
    ``quantized::linear_dynamic`` overload for the int8 layers of ``quantize_dynamic_int8``, as their
    forward calls it (module hooks are not run there). A decoder step makes ~40 of these calls; the
    module and op-packet wrappers cost ~0.4 ms of an int8 step's 2.6."""
    if torch.is_grad_enabled():
        return layer(x)
    kind = type(layer)
    if kind is nn.Linear:
        return infer_linear(x, layer.weight, layer.bias)
    if kind is _DynamicInt8Linear and layer._packed_params.dtype == torch.qint8 and (layer.version or 0) >= 4:
        return _linear_dynamic_op()(x, layer._packed_params._packed_params, True)
    return layer(x)


_BF16_ATTENTION_ROWS = 16


@functools.cache
def _linear_dynamic_op() -> Callable[..., Tensor]:
    """``quantized::linear_dynamic`` (x, packed, reduce_range) -> fp32, as its overload's C++ callable: the
    overload's Python __call__ first scans the arguments for the fake script objects of tracing (7 us of a
    30 us call in eager decoding). Looked up on first use: only int8 layers need it."""
    op = torch.ops.quantized.linear_dynamic.default
    return getattr(op, "_op", op)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], dropout_p: float) -> Tensor:
    """``F.scaled_dot_product_attention``, in fp32 for bf16 inputs on the CPU.

    torch's CPU attention kernels are 2-4x slower in bf16 than in fp32 (forward and backward,
    at this model's shapes), while the projections around them gain 2-3x from bf16 GEMMs. So under
    CPU autocast only the attention itself runs in fp32, its result rounded back to bf16. An
    inference step's few query rows (up to ``_BF16_ATTENTION_ROWS`` per head) are the exception:
    there the casts of the keys and values cost more than the attention (2 rows against 28 cached
    columns, 8 heads: 12.9 us in bf16, 25.5 us through fp32).
    """
    inference_step = q.shape[-2] <= _BF16_ATTENTION_ROWS and not torch.is_grad_enabled()
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and not inference_step:
        with torch.autocast("cpu", enabled=False):
            o = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p)
        return o.to(torch.bfloat16)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class FeedForward(nn.Module):
    """Linear -> ReLU -> dropout -> Linear."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ff1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.ff2 = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.act_drop = Dropout(cfg.activation_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return _linear(self.ff2, self.act_drop(F.relu(_linear(self.ff1, x))))


def _residual_norm(norm: nn.LayerNorm, drop: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``norm(x + drop(y))``, the post-norm residual; in eval mode without autograd the functional layer
    norm, with no module calls (a decoder step makes 18 of these)."""
    if drop.training or torch.is_grad_enabled():
        return norm(x + drop(y))
    return F.layer_norm(x + y, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        if _fuse_qkv(x, x.shape[1]):
            q, k, v = self.attn.project_qkv(x, x.shape[1])
        else:
            q, (k, v) = None, self.attn.project_kv(x)
        x = _residual_norm(self.norm1, self.drop, x, self.attn.attend(x, k, v, mask, q))
        return _residual_norm(self.norm2, self.drop, x, self.ffn(x))


class DecoderLayer(nn.Module):
    """Self-attention over content rows (all rows ask), cross-attention, FFN; post-norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.cross_attn = Attention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg)
        self.norm3 = nn.LayerNorm(cfg.d_model)
        self.drop = Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        num_content: int,
        self_mask: Optional[Tensor],
        cross_kv: tuple[Tensor, Tensor],
        cross_mask: Tensor,
        cache: Optional[LayerCache] = None,
        cache_start: int = 0,
        cache_columns: Optional[Tensor] = None,
    ) -> Tensor:
        """x (N, R, D), the first ``num_content`` rows are content rows; self_mask (N, 1, R, W) and
        cross_mask (B, 1, 1, S) bool, or None where every row sees every column. With a cache, the
        new content rows are written at ``cache_columns`` (N, C) or from column ``cache_start`` on, and
        rows see cache columns [0, W) (W = cache_start + C when self_mask is None)."""
        # 1. Keys/values come from content rows only; with a cache, they join the cached ones.
        if _fuse_qkv(x, num_content):
            q, k, v = self.self_attn.project_qkv(x, num_content)
        else:
            q, (k, v) = None, self.self_attn.project_kv(x[:, :num_content])
        if cache is not None:
            width = cache_start + num_content if self_mask is None else self_mask.shape[-1]
            k, v = cache.write(k, v, cache_start, cache_columns, width)
        x = _residual_norm(self.norm1, self.drop, x, self.self_attn.attend(x, k, v, self_mask, q))
        # 2. Cross-attention over the encoder's keys/values (B sentences; N = g * B rows).
        x = _residual_norm(self.norm2, self.drop, x, self.cross_attn.attend(x, *cross_kv, cross_mask))
        # 3. Feed-forward.
        return _residual_norm(self.norm3, self.drop, x, self.ffn(x))


class JanusModel(nn.Module):
    """Encoder + shared two-stream decoder + length head.

    ``forward`` runs a batch of decoder rows (``janus.streams``) and returns their final
    hidden states; ``project`` turns only the rows you ask for into vocabulary logits.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, D, padding_idx=cfg.specials.pad)  # shared everywhere
        self.src_pos = nn.Embedding(cfg.max_source_positions, D)
        self.tgt_pos = nn.Embedding(cfg.max_target_positions, D)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.length_head = nn.Linear(D, cfg.length_classes)
        self.drop = Dropout(cfg.dropout)
        self.scale = math.sqrt(D)
        # The parameters and weights of ``fused_weights`` (inference passes through janus.ops.decoder_step).
        self._fused_params: Optional[list[Tensor]] = None
        self._fused_list: Optional[tuple[tuple, list[Tensor]]] = None
        self._encoder_params: Optional[list[Tensor]] = None  # the same for the encoder (``encoder_weights``)
        self._encoder_list: Optional[tuple[tuple, list[Tensor]]] = None
        self._norm_eps = self.decoder[0].norm1.eps  # every decoder norm's (decoder_step takes one)
        self._fused_float = True  # False in the int8 copy of quantize_dynamic_int8, whose layers differ
        self._encoder_float = True  # likewise for its encoder, when quantized
        # Inside ``weights_fixed``: None outside, False until fused_weights has checked them, then True.
        self._fused_checked: Optional[bool] = None
        self.out_proj: Optional[nn.Module] = None  # (D -> V) set by quantize_dynamic_int8 only
        self._proj_panels: Optional[tuple[tuple, Tensor]] = None  # (key, the embedding's panels) of ``project``
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT-style init: N(0, init_std) weights, zero biases, unit norms, zero pad embedding."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.cfg.init_std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.embed.weight[self.cfg.specials.pad].zero_()

    # -- encoder -------------------------------------------------------------------------------
    def encode(self, src: Tensor) -> EncoderOut:
        """src (B, S) int64, tokens + eos, right-padded -> EncoderOut."""
        B, S = src.shape
        if S > self.cfg.max_source_positions:
            raise ValueError(f"source length {S} exceeds max_source_positions={self.cfg.max_source_positions}")
        padding = src == self.cfg.specials.pad
        pos = torch.arange(S, device=src.device)
        x = self.drop(self.embed(src) * self.scale + self.src_pos(pos))  # (B, S, D)
        lengths = (~padding).sum(1)
        if self.fused_step_ok(x, encoder=True) and not bool((padding[:, :-1] & ~padding[:, 1:]).any()):
            # Every layer in one decoder_step call without cross-attention (its encoder form): each sentence's
            # rows are content rows at columns 0 .. S-1 of scratch keys/values and see its real positions, a
            # prefix (checked: a pad before a real token, which the decoding paths never make, takes the layers);
            # a pad row, as in the layers, sees them too.
            H, dk = self.cfg.n_heads, self.cfg.d_model // self.cfg.n_heads
            caches = [x.new_empty(B, H, S, dk) for _ in range(2 * len(self.encoder))]
            seen = torch.stack([torch.zeros_like(lengths), lengths.clamp_min(1)], -1)[:, None, :].expand(B, S, 2)
            columns = pos.expand(B, S)
            x = decoder_step_checked(x, S, seen, columns, caches[0::2], caches[1::2], [], [], ~padding,
                                     self.encoder_weights(), H, self.encoder[0].norm1.eps)  # fmt: skip
            return EncoderOut(x, padding, lengths)
        mask = (~padding)[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.encoder:
            x = layer(x, mask)
        return EncoderOut(x, padding, lengths)

    def length_logits(self, enc: EncoderOut) -> Tensor:
        """Mean-pool the encoder states over non-pad tokens, then a linear layer: (B, C) logits."""
        keep = (~enc.padding).unsqueeze(-1).to(enc.states.dtype)
        pooled = (enc.states * keep).sum(1) / keep.sum(1).clamp_min(1)
        return self.length_head(pooled)

    def length_target(self, tgt_lengths: Tensor, src_lengths: Tensor) -> Tensor:
        """Class of each target length n (B,) int64: n, or n - src_len + C/2 in offset mode, clamped."""
        C = self.cfg.length_classes
        t = tgt_lengths - src_lengths + C // 2 if self.cfg.length_offset else tgt_lengths
        return t.clamp(0, C - 1)

    def length_scores(self, enc: EncoderOut) -> Tensor:
        """Log-probability of each target length n (with bos and eos), indexed by n: (B, C) fp32.

        In offset mode class c means n = c - C/2 + source length; lengths outside [0, C) get -inf.
        """
        lp = F.log_softmax(self.length_logits(enc).float(), dim=-1)  # (B, C) by class
        if not self.cfg.length_offset:
            return lp
        C = self.cfg.length_classes
        cls = torch.arange(C, device=lp.device)[None, :] - enc.lengths[:, None] + C // 2  # class of each n
        inside = (cls >= 0) & (cls < C)
        return torch.where(inside, lp.gather(1, cls.clamp(0, C - 1)), float("-inf"))

    def lengths_from_classes(self, classes: Tensor, src_lengths: Tensor) -> Tensor:
        """Inverse of ``length_target``: target lengths n for classes (B, l) given src_lengths (B,)."""
        if self.cfg.length_offset:
            return classes - self.cfg.length_classes // 2 + src_lengths[:, None]
        return classes

    # -- decoder -------------------------------------------------------------------------------
    def decode(
        self, rows: DecoderRows, enc: EncoderOut, cache: Optional[KVCache] = None, *, outputs: Optional[Tensor] = None
    ) -> Tensor:
        """Run decoder rows through every layer; returns the final hidden states (N, R, D).

        ``rows`` may hold g hypotheses per sentence of ``enc`` (N = g * B, hypotheses of one
        sentence adjacent); they share the sentence's encoder states.

        With ``cache``, the content rows of ``rows`` are written to cache columns
        ``rows.cache_columns`` (N, C), or appended at ``cache.length`` when that is None, and
        ``rows.visibility`` (N, R, W) says which of cache columns [0, W) each row sees;
        ``cache.length`` becomes W.

        ``outputs`` (bool (N, R), inference only) names the rows whose states the caller reads; the others'
        are then unspecified (zeros where ``janus.ops.decoder_step`` takes the pass and skips their last layer).
        """
        N = rows.tokens.shape[0]
        x = self._embed_rows(rows.tokens, rows.positions, rows.max_position, enc)  # (N, R, D)
        spans = rows.visible_span
        if spans is not None and (cache is None or rows.cache_columns is not None) and self.fused_step_ok(x):
            if cache is None:  # a pass over its own rows (mask-predict): their keys/values in a scratch cache
                C = rows.num_content
                columns = torch.arange(C, device=x.device).expand(N, C)
                return self._fused_pass(x, C, spans, columns, enc, KVCache(), C, outputs)
            width = rows.visibility.shape[-1]
            x = self._fused_pass(x, rows.num_content, spans, rows.cache_columns, enc, cache, width, outputs)
            cache.length = width
            return x
        self_mask = rows.visibility[:, None]  # (B, 1, R, C)
        keep_cross = not torch.is_grad_enabled()  # never reuse a graph across training passes
        cross_mask = enc.attention_mask() if keep_cross else (~enc.padding)[:, None, None, :]  # (B, 1, 1, S)
        start = 0 if cache is None else cache.length
        x = self._run_decoder(x, rows.num_content, self_mask, enc, cross_mask, cache, start, rows.cache_columns)
        if cache is not None:
            cache.length = rows.visibility.shape[-1]
        return x

    def _embed_rows(self, tokens: Tensor, positions: Tensor, max_position: int, enc: EncoderOut) -> Tensor:
        """The decoder's input rows (N, R, D) of ``tokens`` at ``positions`` (int64 (N, R); ``max_position`` their
        largest, a host int), after checking them against the table of positions and ``enc``'s sentences."""
        N, B = tokens.shape[0], enc.states.shape[0]
        if N % max(B, 1):
            raise ValueError(f"{N} decoder hypotheses do not split evenly over {B} encoded sentences")
        if max_position >= self.cfg.max_target_positions:
            raise ValueError(
                f"target position {max_position} exceeds max_target_positions={self.cfg.max_target_positions}"
            )
        return self.drop(self.embed(tokens) * self.scale + self.tgt_pos(positions))

    def decode_spans(
        self,
        tokens: Tensor,
        positions: Tensor,
        spans: Tensor,
        columns: Tensor,
        width: int,
        max_position: int,
        enc: EncoderOut,
        cache: KVCache,
        outputs: Optional[Tensor] = None,
    ) -> Optional[Tensor]:
        """``decode`` of rows given as the kernel takes them, without ``DecoderRows``: through
        ``janus.ops.decoder_step`` when it takes the pass (``fused_step_ok``), else None (the caller then builds
        the rows and calls ``decode``). Inference only; a speculative pass of a few sentences on a CPU builds
        these from host ints in one call each, where rows with a visibility matrix cost ~50-170 us more.

        Args:
            tokens, positions: int64 (N, R); the first C = columns.shape[1] rows are content rows.
            spans: int64 (N, R, 2): row r of hypothesis n sees cache columns [spans[n, r, 0], spans[n, r, 1]).
            columns: int64 (N, C), the cache column each content row is written to.
            width: a host int bounding every column and span; ``cache.length`` becomes ``width``.
            max_position: the largest of ``positions`` (a host int).
            outputs: bool (N, R), the rows read (as ``decode``'s).
        Returns:
            (N, R, D) final hidden states, as ``decode`` returns them for the same rows, or None.
        """
        if torch.is_grad_enabled():
            raise RuntimeError("decode_spans is for inference: call it under torch.no_grad or inference_mode")
        x = self._embed_rows(tokens, positions, max_position, enc)
        if not self.fused_step_ok(x):
            return None
        x = self._fused_pass(x, columns.shape[1], spans, columns, enc, cache, width, outputs)
        cache.length = width
        return x

    def decode_ar_step(self, last: Tensor, enc: EncoderOut, cache: KVCache) -> Tensor:
        """One incremental AR step without building rows: ``decode`` of ``build_ar_step_rows(last,
        cache.length, cache.length)`` (a content row y_t at position t = cache.length, a query row at
        t + 1, both seeing every cached column), with no visibility mask at all. Inference only.

        Args:
            last: int64 (N,), the token y_t of each hypothesis; N = g * B for B sentences of ``enc``.
        Returns:
            (N, D) final hidden state of the query row, which predicts y_{t+1}.
        """
        if torch.is_grad_enabled():
            raise RuntimeError("decode_ar_step is for inference: call it under torch.no_grad or inference_mode")
        t = cache.length
        if t + 1 >= self.cfg.max_target_positions:
            raise ValueError(f"target position {t + 1} exceeds max_target_positions={self.cfg.max_target_positions}")
        N = last.shape[0]
        if N % max(enc.states.shape[0], 1):
            raise ValueError(f"{N} decoder hypotheses do not split evenly over {enc.states.shape[0]} encoded sentences")
        # rows [y_t at position t, <mask> at t + 1] of every hypothesis, as ``decode`` embeds them: (N, 2, D)
        ids = torch.stack([last, torch.full_like(last, self.cfg.specials.mask)], 1)
        x = F.embedding(ids, self.embed.weight) * self.scale + self.tgt_pos.weight[t : t + 2]
        if self.fused_step_ok(x):
            spans = torch.tensor([0, t + 1], device=x.device).expand(N, 2, 2)  # both rows see columns 0 .. t
            columns = torch.full((N, 1), t, dtype=torch.long, device=x.device)  # the content row's
            x = self._fused_pass(x, 1, spans, columns, enc, cache, t + 1, _QUERY_ROW.expand(N, 2))
        else:
            x = self._run_decoder(x, 1, None, enc, enc.attention_mask(), cache, t, None)
        cache.length = t + 1
        return x[:, 1]

    def fused_step_ok(self, x: Tensor, *, encoder: bool = False) -> bool:
        """Whether an inference pass over rows x (N, R, D) runs through ``janus.ops.decoder_step``'s kernel:
        float32 or bfloat16 (the model's own dtype) on the CPU, eval mode without autograd, at most
        ``decoder_step.max_rows`` rows for that dtype and width, the decoder's own float layers (not the int8
        copy's; with ``encoder``, a pass of the encoder's layers, and its own), and the kernel compiled and
        not forced away."""
        return (
            x.device.type == "cpu"
            and x.shape[0] * x.shape[1] <= max_rows(x.dtype, x.shape[2])
            and x.dtype == self.embed.weight.dtype
            and (self._encoder_float if encoder else self._fused_float)
            and not self.training
            and not torch.is_grad_enabled()
            and kernel_ready()
        )

    @contextlib.contextmanager
    def weights_fixed(self) -> Iterator[None]:
        """A block in which the parameters do not change (a decode call: ``janus.decoding.common.inference``):
        ``fused_weights`` checks them against its kept copy once, at the block's first pass, instead of at
        every pass (13 us of the small preset's ~0.5 ms greedy step; 0.3 us once checked). Nested blocks
        share the outer one's check."""
        outermost = self._fused_checked is None
        if outermost:
            self._fused_checked = False
        try:
            yield
        finally:
            if outermost:
                self._fused_checked = None

    @staticmethod
    def _fused_key(params: list[Tensor]) -> Optional[tuple]:
        """What identifies the parameters' values: storage and version of each (None for inference tensors,
        which have no version counter: their weights are rebuilt every call)."""
        return None if params[0].is_inference() else tuple((p.data_ptr(), p._version) for p in params)

    def fused_weights(self) -> list[Tensor]:
        """The decoder's weights in ``janus.ops.decoder_step.LAYER_WEIGHTS`` order, each self-attention's
        q, k, v concatenated, the weight matrices packed in panels (``janus.ops.skinny_linear.pack_panels``:
        a second copy of the decoder's matrices, whose products the kernel runs about twice as fast). Kept
        between calls while every parameter keeps its storage and version (a step of a small model cannot
        afford to walk the modules: ~150 us); inside ``weights_fixed``, checked once."""
        if self._fused_checked and self._fused_list is not None:
            return self._fused_list[1]
        if self._fused_params is None:
            self._fused_params = _layer_params(self.decoder, "self_attn", LAYER_WEIGHTS)
        params = self._fused_params
        key = self._fused_key(params)
        if self._fused_checked is False and key is not None:
            self._fused_checked = True  # the copy returned below matches these parameters
        if key is not None and self._fused_list is not None and self._fused_list[0] == key:
            return self._fused_list[1]
        out = _packed_layers(params, len(self.decoder), _PRODUCTS)
        if key is not None:
            self._fused_list = (key, out)
        return out

    def encoder_weights(self) -> list[Tensor]:
        """The encoder's weights in ``janus.ops.decoder_step.ENCODER_LAYER_WEIGHTS`` order, as ``fused_weights``
        keeps the decoder's (q, k, v concatenated, the matrices in panels), checked against the parameters'
        storage and version at every call (one a decode)."""
        if self._encoder_params is None:
            self._encoder_params = _layer_params(self.encoder, "attn", ENCODER_LAYER_WEIGHTS)
        key = self._fused_key(self._encoder_params)
        if key is not None and self._encoder_list is not None and self._encoder_list[0] == key:
            return self._encoder_list[1]
        out = _packed_layers(self._encoder_params, len(self.encoder), _ENCODER_PRODUCTS)
        if key is not None:
            self._encoder_list = (key, out)
        return out

    def _fused_pass(
        self,
        x: Tensor,
        num_content: int,
        spans: Tensor,
        columns: Tensor,
        enc: EncoderOut,
        cache: KVCache,
        width: int,
        outputs: Optional[Tensor] = None,
    ) -> Tensor:
        """x (N, R, D) through every decoder layer in one ``decoder_step`` call: content rows written to cache
        ``columns`` (N, C), row r of hypothesis n seeing cache columns [spans[n, r, 0], spans[n, r, 1]);
        ``width`` (a host int) bounds every column and span; ``outputs`` (bool (N, R)): the rows read."""
        N = x.shape[0]
        H, dk = self.cfg.n_heads, self.cfg.d_model // self.cfg.n_heads
        cache.prepare(len(self.decoder), N, H, dk, x)
        for c in cache.layers:
            c.ensure(width, N, H, dk, x)
        cross = self._cross_kv(enc)
        return decoder_step_checked(
            x,
            num_content,
            spans,
            columns,
            [c.self_k for c in cache.layers],
            [c.self_v for c in cache.layers],
            [kv[0] for kv in cross],
            [kv[1] for kv in cross],
            enc.source_keep(),
            self.fused_weights(),
            H,
            self._norm_eps,
            outputs,
        )

    def _cross_kv(self, enc: EncoderOut) -> list[tuple[Tensor, Tensor]]:
        """Every decoder layer's cross-attention keys/values of ``enc``, computed on first use and kept on it
        (inference only)."""
        if len(enc.cross) == len(self.decoder) and None not in enc.cross:  # every step after the first
            return enc.cross
        if len(enc.cross) != len(self.decoder):
            enc.cross = [None] * len(self.decoder)
        for i, layer in enumerate(self.decoder):
            if enc.cross[i] is None:
                enc.cross[i] = layer.cross_attn.project_kv(enc.states)
        return enc.cross

    def _run_decoder(
        self,
        x: Tensor,
        num_content: int,
        self_mask: Optional[Tensor],
        enc: EncoderOut,
        cross_mask: Optional[Tensor],
        cache: Optional[KVCache],
        start: int,
        columns: Optional[Tensor],
    ) -> Tensor:
        """x (N, R, D) through every decoder layer (cross-attention keys/values kept on ``enc`` when
        there is no autograd)."""
        if cache is not None:
            cache.prepare(len(self.decoder), x.shape[0], self.cfg.n_heads, self.cfg.d_model // self.cfg.n_heads, x)
        kept = self._cross_kv(enc) if not torch.is_grad_enabled() else None
        for i, layer in enumerate(self.decoder):
            cross_kv = kept[i] if kept is not None else layer.cross_attn.project_kv(enc.states)
            layer_cache = None if cache is None else cache.layers[i]
            x = layer(x, num_content, self_mask, cross_kv, cross_mask, layer_cache, start, columns)
        return x

    def project(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits of the given rows through the shared embedding: (..., D) -> (..., V), in the
        model's dtype; a bfloat16 model's inference rows on a CPU (``janus.ops.skinny_linear.panel_rows``) get
        float32 logits."""
        if self.out_proj is not None:
            return _linear(self.out_proj, hidden)
        w = self.embed.weight
        if hidden.dtype == w.dtype and hidden.numel() <= panel_rows(w.dtype) * hidden.shape[-1]:
            # Inference rows through the kernel's panel tiles, on a packed copy of the embedding: every float32
            # row, so that a row's logits do not depend on the batch. In bf16, float32 logits from the bf16
            # weights (bf16 logits of magnitude ~10 are rounded to ~0.06, enough to tie or swap a search's best
            # candidates), on the CPU's bf16 dot products.
            panels = self.output_panels()
            if panels is not None:
                logits = skinny_linear_checked(hidden.float(), panels, None)
                return logits if logits.shape[-1] == w.shape[0] else logits[..., : w.shape[0]]
        return infer_linear(hidden, w, None)

    def output_panels(self) -> Optional[Tensor]:
        """The tied output projection (the embedding) packed for ``janus.ops.skinny_linear``'s panel tiles,
        kept while the embedding does not change (storage and version), for inference on a CPU: what
        ``project`` and the CPU backends of ``janus.ops.mask_predict_update`` multiply with. None where the
        kernel does not apply: an untied projection, a dtype other than float32 and bfloat16, another
        device, autograd, the kernel not compiled or forced away."""
        w = self.embed.weight
        if (
            self.out_proj is not None
            or w.device.type != "cpu"
            or w.dtype not in (torch.float32, torch.bfloat16)
            or torch.is_grad_enabled()
            or not skinny_kernel_ready()
        ):
            return None
        key = self._fused_key([w])
        if key is None or self._proj_panels is None or self._proj_panels[0] != key:
            with torch.no_grad():
                self._proj_panels = (key, pack_panels(w.detach()))
        return self._proj_panels[1]

    def forward(self, src: Tensor, rows: DecoderRows) -> tuple[Tensor, Tensor]:
        """Teacher-forced pass: (hidden (B, R, D), length_logits (B, C))."""
        enc = self.encode(src)
        return self.decode(rows, enc), self.length_logits(enc)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def quantize_dynamic_int8(model: JanusModel, *, encoder: bool = False) -> JanusModel:
    """A CPU inference copy of ``model`` whose decoder's linear layers compute with int8 weights (dynamic
    quantization).

    torch's own ``torch.ao.quantization.quantize_dynamic`` (fbgemm / x86 kernels, weights prepacked
    once): weights int8 with one scale per output channel, activations quantized per call from their
    own range, everything else (embeddings, norms, attention) fp32. Before converting, each
    self-attention gets a fused ``qkv`` layer (one GEMM, as ``Attention.project_qkv``) and the tied
    output projection an ``out_proj`` layer of its own, so those read int8 weights too. The original
    ``model`` is not changed; the copy is for decoding only (no training, no checkpoint saving).

    The encoder and the length head stay fp32 unless ``encoder``: they run once per sentence, so int8
    saves little there, and their rounding reaches every decoder pass and the predicted lengths. On
    janus-light at 10,500 updates (1000 LibreOffice test pairs) an int8 encoder cost mask-predict T=10
    l=3 0.41 BLEU against fp32 (paired bootstrap p = 0.012), an fp32 one 0.19 (p = 0.12).

    Raises:
        ValueError: the model is not on the CPU, or this torch has no x86 / fbgemm quantized engine.
    """
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(
            f"int8 dynamic quantization runs on the CPU only, the model is on {device}; use bfloat16 there"
        )
    engines = torch.backends.quantized.supported_engines
    if not {"x86", "fbgemm"} & set(engines):
        raise ValueError(f"int8 needs torch's x86 or fbgemm quantized engine; this torch has {engines}")
    from torch.ao import quantization as tq

    q = copy.deepcopy(model).float().eval()
    q._fused_params, q._fused_list, q._fused_float, q._proj_panels = None, None, False, None
    q._encoder_params, q._encoder_list, q._encoder_float = None, None, not encoder
    with torch.no_grad():
        for attn in [layer.attn for layer in q.encoder if encoder] + [layer.self_attn for layer in q.decoder]:
            attn.qkv = nn.Linear(attn.q.in_features, 3 * attn.q.out_features)
            w, b = attn.fused_qkv_weights()
            attn.qkv.weight.copy_(w)
            attn.qkv.bias.copy_(b)
            attn._fused = None
        q.out_proj = nn.Linear(q.cfg.d_model, q.cfg.vocab_size, bias=False)
        q.out_proj.weight.copy_(q.embed.weight)
    layers = {
        name: tq.per_channel_dynamic_qconfig
        for name, m in q.named_modules()
        if isinstance(m, nn.Linear) and (encoder or name.startswith("decoder.") or name == "out_proj")
    }
    with warnings.catch_warnings():
        # torch >= 2.10 marks torch.ao.quantization deprecated in favour of torchao; the eager dynamic
        # path still works (and is tested here), torchao is not a dependency.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return tq.quantize_dynamic(q, layers, inplace=True)
