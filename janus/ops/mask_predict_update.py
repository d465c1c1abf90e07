"""mask_predict_update: one mask-predict pass's new tokens and scores at the masked slots.

For every slot (r, t) with tokens[r, t] == mask:

    logp = log_softmax(hidden[r, t] @ weight.T)           (fp32, over the whole vocabulary)
    tokens[r, t] = argmax_{v not banned} logp[v]           (ties: the smaller id)
    scores[r, t] = logp[tokens[r, t]]

Banned ids are never chosen but still count in the normalisation. Only the masked
slots are projected: the logits of the other rows are never formed. Unmasked slots
are left untouched; works in place and returns its inputs.

``mask_predict_update_ref`` is the specification, the fallback and the test oracle;
``mask_predict_update`` dispatches (janus.ops._dispatch) between:

- "triton": ``janus.kernels.mask_predict_update`` (kernels/mask_predict_update.py), CUDA
  tensors: one fused kernel that streams over the vocabulary with an online log-sum-exp
  and argmax, so that the (slots, V) logits never reach memory (imported on first call).
  Its fp16/bf16 logits stay in fp32 where the reference rounds them to the inputs' dtype,
  so the two may pick different tokens at near-ties;
- "blocked": ``mask_predict_update_blocked``, CPU tensors: the reference's computation in blocks of
  masked rows whose fp32 logits take about 8 MB, each reduced to its log-sum-exp and best allowed
  token while in cache, so that the (slots, V) log-probabilities (and the reference's copy of them
  with the banned ids set to -inf) are never formed. Memory, measured (peak RSS growth of one call,
  ``benchmarks/kernels.py``'s case: 6,176 masked slots, V = 32000, D = 512): 1,484 MiB for the
  reference, none beyond the inputs' for this backend; time 1.48 s against 1.56 s (2 threads; the
  product is most of it). In a batch-32 mask-predict decode of the iwslt preset the time is the
  same as the reference's (its calls are small: one per group of canvases). Scores are the best
  logit minus the log-sum-exp, where the reference subtracts the maximum first: equal to rounding;
- "cpp": ``mask_predict_update_cpp``, CPU tensors with the compiled ops: blocked's products, each
  block reduced by ``torch.ops.janus.best_token`` (csrc/cpu/best_token.cpp: two passes over a row,
  where torch's log-sum-exp, fill and max take five). Scores as blocked's, to rounding;
- both CPU backends, given ``panels`` (the model's packed output projection, ``JanusModel.output_panels``)
  and float32 inputs, multiply each block of masked rows on the skinny_linear
  kernel's panel tiles: at the small preset's (8000, 128) 0.4-0.7x torch's GEMM time from 8 to 512 rows
  (janus/ops/skinny_linear.py). A mask-predict decode of the shipped model (T=10, l=3) took 0.74-0.78x the
  time at batch 1 and 0.71-0.82x at batch 32 (64 test sentences, two runs each against the code before, same
  outputs). Bfloat16 inputs and panels likewise, the rows widened: fp32 logits of the bf16 products (torch's
  bf16 GEMM rounds them to bf16, ~0.06 apart at magnitude 10), on the CPU's bf16 dot-product instruction where
  it has one, which at (8000, 128) took 0.29 / 0.66 / 0.98 / 1.14x torch's bf16 GEMM time at 8 / 32 / 128 /
  512 rows, at (10000, 512) 0.37 / 0.66 / 0.74 / 0.97x (2 threads, the 2-core EPYC). A slot's sums do not
  depend on the other rows there, so its result is the same in any batch;
- "reference": ``mask_predict_update_ref``, which forms the logits of the masked slots.

Force one with ``JANUS_BACKEND_MASK_PREDICT_UPDATE=triton|cpp|blocked|reference``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from janus import _ext
from janus.ops._dispatch import Backend, Verdict, all_on_cpu, all_on_cuda, compiled, register_op, triton_available
from janus.ops.skinny_linear import kernel_ready as skinny_kernel_ready
from janus.ops.skinny_linear import skinny_linear_checked

# fp32 logits per block of "blocked" (8 MB: 262 masked rows at V = 8000, 65 at V = 32000), small enough
# to stay in a CPU's cache between the product and the reductions, large enough for an efficient product.
_BLOCK_BYTES = 1 << 23

# (log-probability, id) of each row's best allowed token: float32 (m,), int64 (m,).
Reduced = tuple[Tensor, Tensor]


def mask_predict_update_ref(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    scores: Tensor,
    mask: int,
    banned: Sequence[int],
    *,
    panels: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Reference implementation.

    Args:
        hidden: (R, L, D) final decoder states of the canvas rows (any float dtype).
        weight: (V, D) output projection (the shared embedding).
        tokens: int64 (R, L) canvases, updated in place at the masked slots.
        scores: float (R, L), updated in place at the masked slots.
        mask: the ``<mask>`` id.
        banned: ids never chosen (e.g. pad, bos, eos, mask); their probability still counts
            in the normalisation.
        panels: ignored here (a packed copy of ``weight`` that the CPU backends multiply with).
    Returns:
        (tokens, scores), the same tensors.
    """
    slots = (tokens == mask).reshape(-1).nonzero().squeeze(1)  # (M,)
    if slots.numel() == 0:
        return tokens, scores
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, slots)  # (M, D)
    logp = F.log_softmax(F.linear(h, weight).float(), dim=-1)  # (M, V)
    choice = logp.clone() if banned else logp
    if banned:
        choice[:, list(banned)] = float("-inf")
    best, tok = choice.max(dim=-1)
    tokens.view(-1).index_copy_(0, slots, tok)
    scores.view(-1).index_copy_(0, slots, best.to(scores.dtype))
    return tokens, scores


def _blocked(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    scores: Tensor,
    mask: int,
    reduce: Callable[[Tensor], Reduced],
    panels: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """The masked slots' products in blocks of about _BLOCK_BYTES of fp32 logits, each block turned into
    (log-probability, id) of its rows' best allowed token by ``reduce`` while in cache. Float32 blocks are
    multiplied by ``panels`` (``pack_panels(weight)``) when given, through the skinny_linear kernel (bfloat16 blocks
    widened to float32 rows first: their logits in fp32, not rounded to bf16)."""
    slots = (tokens == mask).reshape(-1).nonzero().squeeze(1)  # (M,)
    M = slots.numel()
    if M == 0:
        return tokens, scores
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, slots)  # (M, D)
    V = weight.shape[0]
    step = max(16, _BLOCK_BYTES // (4 * V))
    use_panels = (
        panels is not None
        and h.dtype == weight.dtype == panels.dtype
        and h.dtype in (torch.float32, torch.bfloat16)
        and skinny_kernel_ready()
    )
    best = torch.empty(M, dtype=torch.float32, device=h.device)
    tok = torch.empty(M, dtype=torch.long, device=h.device)
    for r in range(0, M, step):
        # The block's logits in fp32 (a copy for low-precision inputs, else the product itself), reduced.
        if use_panels:  # bf16 rows widened: fp32 logits of the bf16 products (the kernel's bf16 dot products)
            logits = skinny_linear_checked(h[r : r + step].float(), panels, None)[:, :V]  # panels past V are zero
        else:
            logits = F.linear(h[r : r + step], weight).float()  # (m, V)
        best[r : r + step], tok[r : r + step] = reduce(logits)
    tokens.view(-1).index_copy_(0, slots, tok)
    scores.view(-1).index_copy_(0, slots, best.to(scores.dtype))
    return tokens, scores


def mask_predict_update_blocked(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    scores: Tensor,
    mask: int,
    banned: Sequence[int],
    *,
    panels: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``mask_predict_update_ref`` in blocks of masked rows (see the module docstring); same contract."""
    ban = torch.tensor(sorted(set(banned)), dtype=torch.long, device=hidden.device) if banned else None

    def reduce(logits: Tensor) -> Reduced:
        # The normaliser over the whole vocabulary, banned ids included; then the best allowed id (ties: the
        # smaller) and its log-probability.
        lse = torch.logsumexp(logits, dim=-1)
        if ban is not None:
            logits.index_fill_(1, ban, float("-inf"))
        top, ids = logits.max(dim=-1)
        return top.sub_(lse), ids

    return _blocked(hidden, weight, tokens, scores, mask, reduce, panels)


def mask_predict_update_cpp(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    scores: Tensor,
    mask: int,
    banned: Sequence[int],
    *,
    panels: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``mask_predict_update_blocked`` with each block reduced by ``torch.ops.janus.best_token`` (csrc/cpu/
    best_token.cpp: two passes over each row); same contract."""
    ban = sorted(set(banned))
    reduce = lambda logits: torch.ops.janus.best_token(logits, ban)  # noqa: E731
    return _blocked(hidden, weight, tokens, scores, mask, reduce, panels)


def _best_token_fake(logits: Tensor, banned: list[int]) -> tuple[Tensor, Tensor]:
    return logits.new_empty(logits.shape[:1]), logits.new_empty(logits.shape[:1], dtype=torch.long)


@_ext.when_loaded  # registering a fake needs the C++ schema (csrc/ops.cpp) to exist
def _register_fake() -> None:
    torch.library.register_fake("janus::best_token", _best_token_fake)


def _mask_predict_update_triton(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    scores: Tensor,
    mask: int,
    banned: Sequence[int],
    *,
    panels: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    from janus.kernels.mask_predict_update import mask_predict_update_triton  # imports triton: first call only

    return mask_predict_update_triton(hidden, weight, tokens, scores, mask, banned)


def _fits_triton_kernel(*args, **kwargs) -> Verdict:
    ok, why = all_on_cuda(*args, **kwargs)
    hidden, weight = (list(args[:2]) + [None, None])[:2]
    if ok and isinstance(hidden, Tensor) and isinstance(weight, Tensor) and hidden.dtype != weight.dtype:
        return False, f"hidden ({hidden.dtype}) and weight ({weight.dtype}) differ in dtype"
    return ok, why


MASK_PREDICT_UPDATE = register_op(
    "mask_predict_update",
    [
        Backend("triton", _mask_predict_update_triton, available=triton_available, supports=_fits_triton_kernel),
        Backend("cpp", mask_predict_update_cpp, available=compiled("best_token", "cpu"), supports=all_on_cpu),
        Backend("blocked", mask_predict_update_blocked, supports=all_on_cpu),
        Backend("reference", mask_predict_update_ref),
    ],
)


def mask_predict_update(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    scores: Tensor,
    mask: int,
    banned: Sequence[int],
    *,
    panels: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Fill every ``<mask>`` slot with its best allowed token and that token's log-probability.

    Same contract as ``mask_predict_update_ref``, on the fastest available backend.

    Args:
        hidden: (R, L, D) final decoder states of the canvas rows: fp16, bf16, fp32 or fp64, any strides.
        weight: (V, D) output projection (the shared embedding), the dtype of ``hidden``.
        tokens: int64 (R, L) canvases, updated in place at the slots equal to ``mask``.
        scores: float (R, L) (fp32 normally), updated in place at the same slots, in its own dtype.
        mask: the ``<mask>`` id.
        banned: ids never chosen (e.g. pad, bos, eos, mask), each in [0, V); their probability
            still counts in the normalisation.
        panels: optional ``janus.ops.skinny_linear.pack_panels(weight)`` (``JanusModel.output_panels``): the
            CPU backends multiply float32 rows by it through the skinny_linear kernel's panel tiles, 1.2-2.5x
            faster than torch's GEMM at these shapes, its sums in another order (to fp32 rounding; the same
            for every row whatever the batch). It must hold ``weight``'s values.
    Returns:
        (tokens, scores), the same tensors. At every masked slot the best allowed id (ties: the
        smaller id) and its log-probability, computed in fp32; every other slot is unchanged.
    """
    return MASK_PREDICT_UPDATE(hidden, weight, tokens, scores, mask, banned, panels=panels)
