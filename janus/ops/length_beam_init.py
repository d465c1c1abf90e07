"""length_beam_init: the l most likely target lengths of each sentence -> mask-predict canvases.

For sentence b with length scores ``s[b, n]`` (n = target length with bos and eos):

    lengths[b*l + i] = the i-th best n in [min_len, max_len[b]] by s[b, n]  (ties: smaller n first)
    tokens[b*l + i]  = [bos, <mask> x (n - 2), eos, pad ...]

When fewer than l lengths are allowed, the remaining candidates repeat clamped
lengths. Scores are compared in their own precision (half and bfloat16 through
an exact widening to fp32); NaN ranks above every number, as in ``torch.sort``.

``length_beam_init_ref`` is the specification, the fallback and the test oracle;
``length_beam_init`` dispatches (janus.ops._dispatch) between:

- "cuda": ``torch.ops.janus.length_beam_init`` (csrc/cuda/length_beam_init.cu), CUDA
  tensors with at most ``CUDA_MAX_COLUMNS`` length classes;
- "cpp": the same op's CPU kernel (csrc/cpu/length_beam_init.cpp), CPU tensors;
- "reference": ``length_beam_init_ref``.

Force one with ``JANUS_BACKEND_LENGTH_BEAM_INIT=cuda|cpp|reference``.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from janus import _ext
from janus.ops._dispatch import Backend, Verdict, all_on_cpu, all_on_cuda, compiled, register_op

# Most length classes the CUDA kernel takes (csrc/cuda/length_beam_init.cu, kMaxColumns).
CUDA_MAX_COLUMNS = 4096


def length_beam_init_ref(
    length_scores: Tensor,
    beam: int,
    min_len: int,
    max_len: Union[int, Tensor],
    bos: int,
    eos: int,
    mask: int,
    pad: int,
) -> tuple[Tensor, Tensor]:
    """Reference implementation.

    Args:
        length_scores: float (B, C), score of target length n = column index (with bos, eos).
        beam: l >= 1 candidates per sentence.
        min_len: smallest allowed n (>= 2: bos and eos).
        max_len: largest allowed n, an int or int64 (B,) per sentence; capped at C - 1.
        bos, eos, mask, pad: special ids.
    Returns:
        tokens int64 (B*l, Lmax) with Lmax the longest chosen n, and lengths int64 (B*l,);
        the candidates of sentence b are rows b*l .. b*l + l - 1, best first.
    """
    if length_scores.dim() != 2:
        raise ValueError(f"length_scores must be (B, C), got shape {tuple(length_scores.shape)}")
    B, C = length_scores.shape
    if beam < 1:
        raise ValueError(f"beam={beam} must be >= 1")
    if min_len < 2 or min_len > C - 1:
        raise ValueError(f"min_len={min_len} must be in [2, {C - 1}] (a canvas holds bos and eos)")
    dev = length_scores.device
    hi = torch.as_tensor(max_len, device=dev).expand(B).clamp(min_len, C - 1)  # (B,)
    n = torch.arange(C, device=dev)
    allowed = (n[None, :] >= min_len) & (n[None, :] <= hi[:, None])  # (B, C)
    exact = length_scores.dtype if length_scores.dtype == torch.float64 else torch.float32  # no fp64 rounding
    scores = torch.where(allowed, length_scores.to(exact), float("-inf"))
    # A stable descending sort keeps equal scores in index order: the smaller length first. A second
    # stable sort puts every allowed length (even one scored -inf) before the disallowed ones.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    first = torch.sort((~allowed.gather(1, order)).to(torch.int8), dim=1, stable=True).indices
    order = order.gather(1, first)[:, :beam]  # (B, min(l, C))
    if order.shape[1] < beam:
        order = torch.cat([order, order[:, -1:].expand(B, beam - order.shape[1])], 1)
    lengths = torch.minimum(order.clamp_min(min_len), hi[:, None]).reshape(-1).long()  # (B*l,)
    return canvases(lengths, bos=bos, eos=eos, mask=mask, pad=pad), lengths


def canvases(lengths: Tensor, *, bos: int, eos: int, mask: int, pad: int) -> Tensor:
    """All-``<mask>`` canvases [bos, mask x (L-2), eos, pad ...] of lengths L (int64 (R,)): int64 (R, max L)."""
    L = int(lengths.max()) if lengths.numel() else 2
    col = torch.arange(L, device=lengths.device)[None, :]
    tokens = torch.where(col < lengths[:, None] - 1, mask, pad)
    tokens = torch.where(col == lengths[:, None] - 1, eos, tokens)
    tokens[:, 0] = bos
    return tokens.long()


def _length_beam_init_fake(
    length_scores: Tensor, beam: int, min_len: int, max_len: Tensor, bos: int, eos: int, mask: int, pad: int
) -> tuple[Tensor, Tensor]:
    # The canvas width is the longest chosen length: it depends on the scores.
    rows = length_scores.shape[0] * beam
    width = torch.library.get_ctx().new_dynamic_size(min=2)
    lengths = length_scores.new_empty((rows,), dtype=torch.int64)
    return length_scores.new_empty((rows, width), dtype=torch.int64), lengths


@_ext.when_loaded  # registering a fake needs the C++ schema (csrc/ops.cpp) to exist
def _register_fake() -> None:
    torch.library.register_fake("janus::length_beam_init", _length_beam_init_fake)


def _length_beam_init_compiled(
    length_scores: Tensor,
    beam: int,
    min_len: int,
    max_len: Union[int, Tensor],
    bos: int,
    eos: int,
    mask: int,
    pad: int,
) -> tuple[Tensor, Tensor]:
    if not isinstance(max_len, Tensor):
        max_len = torch.tensor(max_len, dtype=torch.int64)  # a CPU scalar: read on the host, even by the CUDA kernel
    return torch.ops.janus.length_beam_init(length_scores, beam, min_len, max_len, bos, eos, mask, pad)


def _fits_cuda_kernel(length_scores: Tensor, *args, **kwargs) -> Verdict:
    ok, why = all_on_cuda(length_scores, *args, **kwargs)
    if ok and length_scores.dim() == 2 and length_scores.shape[1] > CUDA_MAX_COLUMNS:
        return False, f"{length_scores.shape[1]} length classes exceed the CUDA kernel's {CUDA_MAX_COLUMNS}"
    return ok, why


LENGTH_BEAM_INIT = register_op(
    "length_beam_init",
    [
        Backend(
            "cuda",
            _length_beam_init_compiled,
            available=compiled("length_beam_init", "cuda"),
            supports=_fits_cuda_kernel,
        ),
        Backend("cpp", _length_beam_init_compiled, available=compiled("length_beam_init", "cpu"), supports=all_on_cpu),
        Backend("reference", length_beam_init_ref),
    ],
)


def length_beam_init(
    length_scores: Tensor,
    beam: int,
    min_len: int,
    max_len: Union[int, Tensor],
    bos: int,
    eos: int,
    mask: int,
    pad: int,
) -> tuple[Tensor, Tensor]:
    """Top-``beam`` target lengths per sentence and their all-``<mask>`` canvases.

    Same contract as ``length_beam_init_ref``, on the fastest available backend.

    Args:
        length_scores: float, double, half or bfloat16 (B, C): score of target length n = column n.
        beam: l >= 1 candidates per sentence.
        min_len: smallest allowed n, in [2, C - 1].
        max_len: largest allowed n: an int, or int64 (B,) on the scores' device; capped at C - 1.
        bos, eos, mask, pad: special ids.
    Returns:
        tokens int64 (B*l, longest chosen n) and lengths int64 (B*l,), on the scores' device;
        sentence b's candidates are rows b*l .. b*l + l - 1, best first.
    Raises:
        ValueError: a bad shape, beam or min_len (every backend).
    """
    return LENGTH_BEAM_INIT(length_scores, beam, min_len, max_len, bos, eos, mask, pad)
