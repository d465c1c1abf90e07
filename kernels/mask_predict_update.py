"""Fused mask-predict update: project the masked slots, log-softmax and banned-aware argmax in one pass over V.

For every masked slot, a flat index s = r * L + t into the (R, L) canvases, with x = hidden[r, t]:

    z_v   = x . weight[v]                                  (fp32 accumulation)
    lse   = log sum_v exp(z_v)                             (every id, banned ones included)
    tok   = min { v not banned : z_v = max_{u not banned} z_u }   (ties: the smaller id)
    tokens[r, t] = tok,  scores[r, t] = z_tok - lse

The (slots, V) logits are never stored. A program takes BLOCK_M masked slots and one
contiguous range of the vocabulary (a "split"; the whole vocabulary when there is one):

1. gather the slots' rows of ``hidden`` through their flat indices (64-bit offsets, any strides);
2. for each block of BLOCK_V ids: the logits block with ``tl.dot`` over D in BLOCK_D chunks
   (fp32 accumulation), then an online log-sum-exp (running max m and sum s of exp(z - m))
   and a running best allowed logit with its id. Banned ids come as an int8 (V,) mask, one
   load per block. Blocks are visited in id order and a block replaces the best only when
   strictly better, so ties keep the smaller id;
3. one split: write tokens and scores directly. Several splits (so that a few masked slots
   still fill the GPU): each writes its (m, s, best, id) to a (splits, M) buffer and
   ``_combine_kernel`` merges them: lse = max_k m_k + log sum_k s_k exp(m_k - max_k m_k),
   and the best over splits, ties to the smaller id (the splits' ids are disjoint ranges).

Inputs of any float dtype: fp16 and bf16 tiles go to ``tl.dot`` as they are; fp32 and fp64
tiles are multiplied in fp32 with ``input_precision="ieee"`` (TF32 would change which token
wins). Triton's interpreter (TRITON_INTERPRET=1, the tests on CPU) gets fp16/bf16 ``tl.dot``
wrong, so there every tile is upcast to fp32 first.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from janus.kernels import interpreting

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NO_ID = tl.constexpr(2147483647)  # larger than every vocabulary id: the neutral element of "smallest id"


@triton.jit
def _mask_predict_update_kernel(
    hidden_ptr, weight_ptr, slots_ptr, banned_ptr,
    tokens_ptr, scores_ptr,
    part_max_ptr, part_sum_ptr, part_best_ptr, part_id_ptr,
    M, V, D, L, v_per_split,
    stride_hr, stride_hl, stride_hd, stride_wv, stride_wd,
    stride_tr, stride_tl, stride_sr, stride_sl,
    FINAL: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Programs (slot blocks, splits). FINAL: one split, write tokens/scores; else write the partials."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < M

    # 1. The slots' rows of hidden, found through their flat indices into the (R, L) canvases.
    slot = tl.load(slots_ptr + offs_m, mask=in_m, other=0).to(tl.int64)  # (BLOCK_M,)
    row = slot // L
    col = slot - row * L
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = hidden_ptr + (row * stride_hr + col * stride_hl)[:, None] + offs_d[None, :] * stride_hd

    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_M,), tl.float32)
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_id = tl.zeros((BLOCK_M,), tl.int32)

    v_start = pid_v * v_per_split
    v_stop = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        in_v = offs_v < v_stop
        # (BLOCK_D, BLOCK_V) tile of weight.T; v * stride_wv can pass 2**31, hence int64.
        w_ptrs = weight_ptr + offs_d[:, None] * stride_wd + (offs_v.to(tl.int64) * stride_wv)[None, :]

        # 2. Logits of the block, fp32 accumulation over D.
        acc = tl.full((BLOCK_M, BLOCK_V), 0.0, tl.float32)
        for d0 in range(0, D, BLOCK_D):
            in_d = offs_d < D - d0
            h = tl.load(h_ptrs + d0 * stride_hd, mask=in_m[:, None] & in_d[None, :], other=0.0)
            w = tl.load(w_ptrs + d0 * stride_wd, mask=in_d[:, None] & in_v[None, :], other=0.0)
            if DOT_FP32:
                acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(h, w, acc)
        z = tl.where(in_v[None, :], acc, float("-inf"))  # (BLOCK_M, BLOCK_V)

        # Online log-sum-exp over every id. Each block holds at least one id of the range, so
        # new_max is finite and exp(run_max - new_max) is exp(-inf) = 0 on the first block.
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max

        # Best allowed id: banned ids are out of the argmax only.
        allowed = tl.load(banned_ptr + offs_v, mask=in_v, other=1) == 0  # (BLOCK_V,)
        cand = tl.where(allowed[None, :], z, float("-inf"))
        blk_best = tl.max(cand, axis=1)
        blk_id = tl.min(tl.where(cand == blk_best[:, None], offs_v[None, :], _NO_ID), axis=1)
        better = blk_best > best  # strictly: an equal logit in a later block has a larger id
        best = tl.where(better, blk_best, best)
        best_id = tl.where(better, blk_id, best_id)

    # 3. Results, or this split's partials.
    if FINAL:
        lse = run_max + tl.log(run_sum)
        tl.store(tokens_ptr + row * stride_tr + col * stride_tl, best_id.to(tl.int64), mask=in_m)
        score = (best - lse).to(scores_ptr.dtype.element_ty)
        tl.store(scores_ptr + row * stride_sr + col * stride_sl, score, mask=in_m)
    else:
        part = pid_v.to(tl.int64) * M + offs_m
        tl.store(part_max_ptr + part, run_max, mask=in_m)
        tl.store(part_sum_ptr + part, run_sum, mask=in_m)
        tl.store(part_best_ptr + part, best, mask=in_m)
        tl.store(part_id_ptr + part, best_id, mask=in_m)


@triton.jit
def _combine_kernel(
    slots_ptr, tokens_ptr, scores_ptr,
    part_max_ptr, part_sum_ptr, part_best_ptr, part_id_ptr,
    M, L, splits,
    stride_tr, stride_tl, stride_sr, stride_sl,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Merge the (splits, M) partials of ``_mask_predict_update_kernel`` into tokens and scores."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < M
    offs_s = tl.arange(0, BLOCK_S)
    valid = (offs_s < splits)[:, None] & in_m[None, :]  # (BLOCK_S, BLOCK_M)
    part = offs_s.to(tl.int64)[:, None] * M + offs_m[None, :]

    m = tl.load(part_max_ptr + part, mask=valid, other=float("-inf"))
    s = tl.load(part_sum_ptr + part, mask=valid, other=0.0)
    b = tl.load(part_best_ptr + part, mask=valid, other=float("-inf"))
    i = tl.load(part_id_ptr + part, mask=valid, other=_NO_ID)

    # Finite for a real slot (every split has a logit); 0 stands in for the others, which are not stored.
    top = tl.where(in_m, tl.max(m, axis=0), 0.0)  # (BLOCK_M,)
    total = tl.sum(tl.where(valid, s * tl.exp(m - top[None, :]), 0.0), axis=0)
    lse = top + tl.log(tl.where(in_m, total, 1.0))
    best = tl.max(b, axis=0)
    best_id = tl.min(tl.where(b == best[None, :], i, _NO_ID), axis=0)

    slot = tl.load(slots_ptr + offs_m, mask=in_m, other=0).to(tl.int64)
    row = slot // L
    col = slot - row * L
    tl.store(tokens_ptr + row * stride_tr + col * stride_tl, best_id.to(tl.int64), mask=in_m)
    tl.store(scores_ptr + row * stride_sr + col * stride_sl, (best - lse).to(scores_ptr.dtype.element_ty), mask=in_m)


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=64)
def _banned_mask(ids: tuple[int, ...], V: int, device: torch.device) -> Tensor:
    """int8 (V,), 1 at the banned ids. Cached: every pass of a decode bans the same ids, and building
    it costs a host-to-device copy."""
    banned = torch.zeros(V, dtype=torch.int8)
    banned[list(ids)] = 1
    return banned.to(device)


def _check(hidden: Tensor, weight: Tensor, tokens: Tensor, scores: Tensor, banned: Sequence[int]) -> tuple[int, ...]:
    """Raise ValueError on arguments the op does not take; return the banned ids, sorted and distinct."""
    name = "mask_predict_update"
    if hidden.dim() != 3 or weight.dim() != 2 or tokens.dim() != 2:
        raise ValueError(
            f"{name}: hidden {tuple(hidden.shape)} must be (R, L, D), weight {tuple(weight.shape)} (V, D) "
            f"and tokens {tuple(tokens.shape)} (R, L)"
        )
    R, L, D = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != D:
        raise ValueError(f"{name}: weight {tuple(weight.shape)} must be (V, D) with D = {D}, the last dim of hidden")
    if tokens.shape != (R, L) or scores.shape != (R, L):
        raise ValueError(
            f"{name}: tokens {tuple(tokens.shape)} and scores {tuple(scores.shape)} must both be (R, L) = {(R, L)}, "
            f"the first dims of hidden {tuple(hidden.shape)}"
        )
    if V == 0:
        raise ValueError(f"{name}: weight {tuple(weight.shape)} has an empty vocabulary")
    if hidden.dtype not in _FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(
            f"{name}: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one of the float dtypes "
            f"{[str(d) for d in _FLOAT_DTYPES]}; cast one of them"
        )
    if tokens.dtype != torch.int64:
        raise ValueError(f"{name}: tokens must be int64, got {tokens.dtype}")
    if scores.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: scores must be a float tensor, got {scores.dtype}")
    devices = {t.device for t in (hidden, weight, tokens, scores)}
    if len(devices) != 1:
        raise ValueError(
            f"{name}: hidden ({hidden.device}), weight ({weight.device}), tokens ({tokens.device}) and scores "
            f"({scores.device}) must be on one device"
        )
    ids = tuple(sorted({operator.index(b) for b in banned}))
    if ids and (ids[0] < 0 or ids[-1] >= V):
        bad = ids[0] if ids[0] < 0 else ids[-1]
        raise ValueError(f"{name}: banned id {bad} is outside the vocabulary [0, {V})")
    if len(ids) == V:
        raise ValueError(f"{name}: all {V} ids are banned, so no token can be chosen")
    return ids


def _blocks(M: int, V: int, D: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_V, BLOCK_D) for M masked slots of ``dtype`` inputs."""
    if interpreting():
        # The interpreter pays a fixed cost per tl op and per program whatever the block size:
        # few, large blocks (up to Triton's 2**20 elements per tensor).
        block_v = min(max(triton.next_power_of_2(V), 16), 1024)
        block_m = min(max(triton.next_power_of_2(M), 16), 2**20 // block_v)
        return block_m, block_v, min(max(triton.next_power_of_2(D), 16), 64)
    # fp32/fp64 tiles take twice or four times the shared memory and registers of 16-bit ones (ptxas
    # reports spills and, for fp64, over 227 KiB of shared memory with BLOCK_D 64 and 3 stages).
    block_d = 32 if dtype in (torch.float32, torch.float64) else 64
    return min(max(triton.next_power_of_2(M), 16), 64), 128, block_d


def _split_count(m_blocks: int, v_blocks: int, device: torch.device) -> int:
    """Vocabulary splits so that about two programs per SM run, each over at least 4 blocks of ids
    (at most 64 splits: the merge holds all of a slot's partials at once)."""
    if device.type != "cuda" or interpreting():
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    want = triton.cdiv(2 * _sm_count(index), m_blocks)
    return max(1, min(want, v_blocks // 4, 64))


def mask_predict_update_triton(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    scores: Tensor,
    mask: int,
    banned: Sequence[int],
    *,
    splits: int | None = None,
    blocks: tuple[int, int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Fill every ``<mask>`` slot with its best allowed token and that token's log-probability, in place.

    Same contract as ``janus.ops.mask_predict_update_ref``; the logits are never stored. Finding the
    masked slots costs one device-to-host sync, as in the reference.

    Args:
        hidden: (R, L, D) final decoder states, fp16, bf16, fp32 or fp64, any strides.
        weight: (V, D) output projection, the dtype of ``hidden``, any strides.
        tokens: int64 (R, L) canvases, any strides; updated at the slots equal to ``mask``.
        scores: float (R, L), any strides; updated at the same slots (written in its own dtype).
        mask: the ``<mask>`` id.
        banned: ids never chosen; they still count in the normalisation. Each in [0, V).
        splits: vocabulary ranges run by separate programs and merged afterwards (default: enough
            programs to fill the GPU; 1 on the CPU and under the interpreter).
        blocks: (BLOCK_M, BLOCK_V, BLOCK_D), powers of two >= 16 (default: chosen from the sizes).
    Returns:
        (tokens, scores), the same tensors.
    Raises:
        ValueError: shapes, dtypes or devices that do not fit, a banned id outside [0, V), every id
            banned, or bad ``splits`` / ``blocks``. Nothing is written then.
    """
    ids = _check(hidden, weight, tokens, scores, banned)
    if splits is not None and splits < 1:
        raise ValueError(f"mask_predict_update: splits must be >= 1, got {splits}")
    if blocks is not None and (len(blocks) != 3 or any(b < 16 or b & (b - 1) for b in blocks)):
        raise ValueError(f"mask_predict_update: blocks must be three powers of two >= 16, got {blocks}")
    R, L, D = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    slots = (tokens == mask).reshape(-1).nonzero().squeeze(1)  # (M,) flat indices r * L + t
    M = slots.numel()
    if M == 0:
        return tokens, scores

    block_m, block_v, block_d = blocks or _blocks(M, V, D, hidden.dtype)
    m_blocks, v_blocks = triton.cdiv(M, block_m), triton.cdiv(V, block_v)
    n = min(splits or _split_count(m_blocks, v_blocks, device), v_blocks)
    # Whole blocks per split, and no empty split (the merge needs a logit from each).
    v_per_split = triton.cdiv(v_blocks, n) * block_v
    n = triton.cdiv(V, v_per_split)
    final = n == 1
    if final:
        part = [slots] * 4  # not read
    else:
        part = [torch.empty(n, M, dtype=dt, device=device) for dt in (torch.float32,) * 3 + (torch.int32,)]
    dot_fp32 = interpreting() or hidden.dtype in (torch.float32, torch.float64)

    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _mask_predict_update_kernel[(m_blocks, n)](
            hidden, weight, slots, _banned_mask(ids, V, device), tokens, scores, *part,
            M, V, D, L, v_per_split,
            *hidden.stride(), *weight.stride(), *tokens.stride(), *scores.stride(),
            FINAL=final, DOT_FP32=dot_fp32, BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_D=block_d,
            num_warps=4 if block_m <= 32 else 8, num_stages=2 if dot_fp32 else 3,
        )  # fmt: skip
        if not final:
            combine_m = 64
            _combine_kernel[(triton.cdiv(M, combine_m),)](
                slots, tokens, scores, *part, M, L, n, *tokens.stride(), *scores.stride(),
                BLOCK_M=combine_m, BLOCK_S=triton.next_power_of_2(n),
            )  # fmt: skip
    return tokens, scores
