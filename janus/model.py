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

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from janus.config import ModelConfig
from janus.streams import DecoderRows


@dataclass
class EncoderOut:
    """Encoder states and their padding."""

    states: Tensor  # (B, S, D)
    padding: Tensor  # (B, S) bool, True at pad
    lengths: Tensor  # (B,) int64, non-pad source tokens


@dataclass
class LayerCache:
    """Keys/values of one decoder layer for incremental decoding."""

    self_k: Optional[Tensor] = None  # (B, H, C_so_far, D/H): content rows seen so far
    self_v: Optional[Tensor] = None
    cross_k: Optional[Tensor] = None  # (B, H, S, D/H): computed once from the encoder
    cross_v: Optional[Tensor] = None


@dataclass
class KVCache:
    """Per-layer caches plus the number of content rows already cached.

    Rows of the cache follow the batch dimension; ``reorder`` follows beam search.
    """

    layers: list[LayerCache] = field(default_factory=list)
    length: int = 0

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (int64 (B',)) of every cached tensor, in that order."""
        for c in self.layers:
            for name in ("self_k", "self_v", "cross_k", "cross_v"):
                t = getattr(c, name)
                if t is not None:
                    setattr(c, name, t.index_select(0, index))


class Attention(nn.Module):
    """Multi-head attention; queries from ``x``, keys/values from ``kv`` (one SDPA call)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.h, self.dk = n_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def split(self, x: Tensor) -> Tensor:  # (B, L, D) -> (B, H, L, D/H)
        return x.view(x.shape[0], x.shape[1], self.h, self.dk).transpose(1, 2)

    def project_kv(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        return self.split(self.k(kv)), self.split(self.v(kv))

    def attend(self, x: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        """x (B, L, D); k, v (B, H, C, D/H); mask (B, 1|H, L, C) bool (True = attend) or None."""
        q = self.split(self.q(x))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class FeedForward(nn.Module):
    """Linear -> ReLU -> dropout -> Linear."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ff1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.ff2 = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.act_drop = nn.Dropout(cfg.activation_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.ff2(self.act_drop(F.relu(self.ff1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        k, v = self.attn.project_kv(x)
        x = self.norm1(x + self.drop(self.attn.attend(x, k, v, mask)))
        return self.norm2(x + self.drop(self.ffn(x)))


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
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        num_content: int,
        self_mask: Optional[Tensor],
        enc: EncoderOut,
        cross_mask: Tensor,
        cache: Optional[LayerCache] = None,
    ) -> Tensor:
        """x (B, R, D), the first ``num_content`` rows are content rows; masks (B, 1, R, C|S) bool."""
        # 1. Keys/values come from content rows only; with a cache, new content rows are appended.
        k, v = self.self_attn.project_kv(x[:, :num_content])
        if cache is not None:
            if cache.self_k is not None:
                k, v = torch.cat([cache.self_k, k], 2), torch.cat([cache.self_v, v], 2)
            cache.self_k, cache.self_v = k, v
        x = self.norm1(x + self.drop(self.self_attn.attend(x, k, v, self_mask)))
        # 2. Cross-attention; the encoder's keys/values are computed once per cache.
        if cache is not None and cache.cross_k is not None:
            ck, cv = cache.cross_k, cache.cross_v
        else:
            ck, cv = self.cross_attn.project_kv(enc.states)
            if cache is not None:
                cache.cross_k, cache.cross_v = ck, cv
        x = self.norm2(x + self.drop(self.cross_attn.attend(x, ck, cv, cross_mask)))
        # 3. Feed-forward.
        return self.norm3(x + self.drop(self.ffn(x)))


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
        self.drop = nn.Dropout(cfg.dropout)
        self.scale = math.sqrt(D)
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
        mask = (~padding)[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.encoder:
            x = layer(x, mask)
        return EncoderOut(x, padding, (~padding).sum(1))

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

    def lengths_from_classes(self, classes: Tensor, src_lengths: Tensor) -> Tensor:
        """Inverse of ``length_target``: target lengths n for classes (B, l) given src_lengths (B,)."""
        if self.cfg.length_offset:
            return classes - self.cfg.length_classes // 2 + src_lengths[:, None]
        return classes

    # -- decoder -------------------------------------------------------------------------------
    def decode(self, rows: DecoderRows, enc: EncoderOut, cache: Optional[KVCache] = None) -> Tensor:
        """Run decoder rows through every layer; returns the final hidden states (B, R, D).

        With ``cache``, the content rows of ``rows`` are appended to the cached ones and
        ``rows.visibility`` must cover all cached + new content columns (B, R, cache.length + C).
        """
        if rows.max_position >= self.cfg.max_target_positions:
            raise ValueError(
                f"target position {rows.max_position} exceeds max_target_positions={self.cfg.max_target_positions}"
            )
        x = self.drop(self.embed(rows.tokens) * self.scale + self.tgt_pos(rows.positions))  # (B, R, D)
        self_mask = rows.visibility[:, None]  # (B, 1, R, C)
        cross_mask = (~enc.padding)[:, None, None, :]  # (B, 1, 1, S)
        if cache is not None and not cache.layers:
            cache.layers = [LayerCache() for _ in self.decoder]
        for i, layer in enumerate(self.decoder):
            x = layer(x, rows.num_content, self_mask, enc, cross_mask, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.length += rows.num_content
        return x

    def project(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits of the given rows through the shared embedding: (..., D) -> (..., V)."""
        return F.linear(hidden, self.embed.weight)

    def forward(self, src: Tensor, rows: DecoderRows) -> tuple[Tensor, Tensor]:
        """Teacher-forced pass: (hidden (B, R, D), length_logits (B, C))."""
        enc = self.encode(src)
        return self.decode(rows, enc), self.length_logits(enc)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
