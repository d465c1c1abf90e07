"""skinny_linear: ``x @ weight.T + bias`` for a few rows of x, the GEMM of an incremental decoder step.

A decoder step multiplies a few rows (greedy: a content and a query row per sentence; beam search:
twice the beam) by every weight matrix of the model: bound by reading the weights for a large model,
by the arithmetic's overheads for a small one. The "cpp" kernel (csrc/cpu/skinny_gemm.h) reads each
weight row once for all the rows, with fp32 products and sums and bf16 weights widened in registers,
in one of two layouts:

- the weight as it is, (N, K) row-major: tiles of up to 16 accumulators (4 input rows by 4 weight rows
  up to 4 rows, 5 by 3 or 8 by 2 up to 16, 4 by 4 past that), each output's 16 lanes summed in a tree
  at the end, the weight rows prefetched four tiles ahead into L2;
- its panels (``pack_panels``: (N / 16, K, 16), panel p holding outputs 16p .. 16p + 15 with K
  outermost, a packed copy): tiles that broadcast one input element against 16 outputs, no lane sums
  (a tree per output costs as much as the products where K is 128), each output a chain of fused
  multiply-adds over k in blocks of 128, the panels streamed in order. The model packs its decoder's
  matrices (``JanusModel.fused_weights``) and its embedding for the step projections.

BLAS GEMMs at these shapes grow with the row count (the weight is read again, from cache or not, per
few rows). Measured by ``benchmarks/kernels.py --case skinny_linear --skinny-rows 1,2,5,10`` on a
2-core AVX-512 AMD EPYC, 2 threads (``benchmarks/results/kernels_cpu_skinny_panels.json``; ms, the
median of 300 calls), one product of M rows by what a decoder step reads: iwslt, (38720, 512), 79 MB in
fp32; small, the shipped model, (11840, 128), 6 MB:

    rows M                    1       2       5       10
    iwslt fp32  torch       6.89   15.05   12.20   15.55
                rows        1.89    1.80    1.67    3.18
                panels      1.01    1.66    1.49    2.42
    iwslt bf16  torch       2.10    2.26    2.60    3.30
                rows        0.60    0.73    1.55    2.99
                panels      0.60    0.72    1.24    2.48
    small fp32  torch       0.18    0.41    0.32    0.44
                rows        0.07    0.11    0.17    0.34
                panels      0.05    0.05    0.09    0.15
    small bf16  torch       0.14    0.15    0.19    0.26
                rows        0.08    0.10    0.19    0.37
                panels      0.06    0.07    0.11    0.20

Hence the model calls it (``janus.model.infer_linear``) for inference rows up to ``MAX_ROWS`` of the
dtype: 16 in fp32 (a beam of 5 at batch 1 is 10 rows, greedy at batch 8 is 16), and 8 in bf16, where
torch's bf16 GEMM catches up at about 10 rows (on a 2-core Intel Xeon with AMX, oneDNN's bf16 GEMM was
flat in the rows at 1.9 ms, and the kernel a gain at 1-2 rows only). A row-major weight only from
``MIN_WEIGHT`` elements: a small one (the 128-wide layers of the ``small`` preset: 16-65k elements) is
in cache whatever the row count, and the row-major tiles' fixed cost loses (one thread, M = 1 / 5 / 10 /
16 rows, us, kernel / torch: 128 x 128 27/12, 31/7, 41/24, 49/26; 384 x 128 30/21, 44/20, 72/44,
105/65), while from 512 x 512 (262k) on the two are level or the kernel ahead. Those small layers reach
the panel tiles through ``janus.ops.decoder_step`` instead, in one call per pass.

A float32 x with a bfloat16 weight (and bias) gives float32 outputs, the weight widened in registers:
a bf16 model's step logits (``JanusModel.project``), which rounded to bf16 would be ~0.06 apart at
magnitude 10. Either layout's sum of an output does not depend on the tile, the other rows or the thread
count; the two layouts sum in different orders (results agree to fp32 rounding, not bit for bit).

``skinny_linear_ref`` (``F.linear``, panels unpacked) is the specification and the fallback;
``skinny_linear`` dispatches (janus.ops._dispatch) between:

- "cpp": ``torch.ops.janus.skinny_linear`` (csrc/cpu/skinny_linear.cpp), CPU tensors, x and weight
  both float32 or both bfloat16, or float32 x with a bfloat16 weight;
- "reference": ``skinny_linear_ref``, anything ``F.linear`` takes.

Force one with ``JANUS_BACKEND_SKINNY_LINEAR=cpp|reference``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from janus import _ext
from janus.ops._dispatch import Backend, Verdict, all_on_cpu, compiled, register_op

# Rows up to which the kernel beats torch's GEMM, by dtype (measured above).
MAX_ROWS = {torch.float32: 16, torch.bfloat16: 8}
# The panel tiles against torch's GEMM on a packed weight (``panel_rows``). In float32 they run at ~185 GFLOP/s
# on the 2-core EPYC from 8 rows to 1024 (the FMA units' peak), torch's GEMM at 60-150 (ms, 2 threads, the
# vocabulary products of the small and iwslt presets, (8000, 128) and (10000, 512)); past 512 rows the two are
# level (the kernel runs chunks of 512 rows; at 2048 the output's first touch is most of either's time):
#
#     rows M                 8      32      64     128     262     512    1024    2048
#     (8000, 128)   torch  0.27    0.74    1.31    2.25    4.27    7.23   13.86   42.47
#                   panels 0.11    0.33    0.64    1.30    2.92    5.67   11.31   42.72
#     (10000, 512)  torch  2.41    4.77    7.00   11.64   17.06   29.80   56.56  132.10
#                   panels 0.41    1.63    3.34    6.56   12.69   24.76   62.69  126.06
#
# In bfloat16 torch's GEMM (AVX512_BF16) overtakes them from 8-16 rows where they widen bf16 to fp32. Float32
# rows that hold bf16 values (a bf16 model's hidden states, widened for fp32 logits) by bf16 panels run on the
# CPU's bf16 dot-product instruction where it has one (the same sums; csrc/cpu/skinny_gemm.h): ms, 2 threads,
# the 2-core EPYC, against the widened tiles and torch's bf16 GEMM (bf16 logits):
#
#     rows M                     1       5       8      32     128     512
#     (8000, 128)   dot      0.019   0.032   0.045   0.182   0.925    3.74
#                   widened  0.038   0.071   0.133   0.472    2.03    7.01
#                   torch    0.080   0.108   0.124   0.276   0.947    3.27
#     (10000, 512)  dot      0.085   0.140   0.218   0.854    3.41    13.1
#                   widened  0.173   0.372   0.568    1.95    7.58    33.2
#                   torch    0.299   0.487   0.597    1.30    4.63    13.5
# Whether the CPU has AMX tiles, on which oneDNN's bf16 GEMMs (torch's bf16 layers) outrun the kernels past a few rows.
CPU_AMX = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def panel_rows(dtype: torch.dtype) -> int:
    """Rows up to which ``JanusModel.project`` multiplies inference rows of ``dtype`` on the packed embedding (0:
    never): every float32 row (their logits then never depend on how many rows share a call); bfloat16 rows
    widened to fp32 logits, every row where the CPU's bf16 dot products run them and it has no AMX (whose bf16
    GEMMs are faster past a few rows), else 8."""
    if dtype == torch.float32:
        return 1 << 62
    if dtype == torch.bfloat16:
        return 1 << 62 if cpu_bf16_dot() and not CPU_AMX else 8
    return 0


# Weights (elements) from which it does (measured above).
MIN_WEIGHT = 1 << 18


# Outputs per panel of a packed weight (``pack_panels``): one AVX-512 vector of float32.
PANEL = 16


def pack_panels(weight: Tensor) -> Tensor:
    """A weight (N, K) packed for the kernel's panel tiles: (ceil(N / 16), K, 16), panel p holding outputs
    [16p, 16p + 16) with K outermost, the rows past N zero. A copy, in the weight's dtype and device."""
    N, K = weight.shape
    P = -(-N // PANEL)
    if P * PANEL != N:
        weight = torch.cat([weight, weight.new_zeros(P * PANEL - N, K)])
    return weight.reshape(P, PANEL, K).transpose(1, 2).contiguous()


def unpack_panels(panels: Tensor) -> Tensor:
    """The (16 P, K) weight of panels (P, K, 16) (zero rows past the packed weight's N included)."""
    P, K, _ = panels.shape
    return panels.transpose(1, 2).reshape(P * PANEL, K)


def skinny_linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Reference: ``F.linear(x, weight, bias)``.

    Args:
        x: (..., K) input rows.
        weight: (N, K), as an nn.Linear's, or its panels (P, K, 16) (``pack_panels``), which give all 16 P
            outputs (those past the packed weight's N are the bias's, or 0; the caller keeps the first N).
        bias: (N,) or None, of the weight's dtype (16 P entries with panels).
    Returns:
        (..., N) in x's dtype. A bfloat16 weight with float32 x (weight-only bf16) gives float32 outputs,
        the products and sums in float32.
    """
    if weight.dim() == 3:
        weight = unpack_panels(weight)
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
        bias = bias.to(x.dtype) if bias is not None else None
    return F.linear(x, weight, bias)


def _skinny_linear_fake(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    n = weight.shape[0] * PANEL if weight.dim() == 3 else weight.shape[0]
    return x.new_empty((x.shape[0], n))


@_ext.when_loaded  # registering a fake needs the C++ schema (csrc/ops.cpp) to exist
def _register_fake() -> None:
    torch.library.register_fake("janus::skinny_linear", _skinny_linear_fake)


def _skinny_linear_cpp(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.janus.skinny_linear(flat, weight, bias)
    return out.view(*x.shape[:-1], out.shape[1])


_DTYPES = (torch.float32, torch.bfloat16)


def _fits_cpp(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Verdict:
    ok, why = all_on_cpu(x, weight, bias)
    if not ok:
        return ok, why
    mixed = x.dtype == torch.float32 and weight.dtype == torch.bfloat16
    if (
        x.dtype not in _DTYPES
        or (weight.dtype != x.dtype and not mixed)
        or (bias is not None and bias.dtype != weight.dtype)
    ):
        return False, (
            f"x {x.dtype}, weight {weight.dtype}: the kernel takes float32 or bfloat16, all alike, "
            "or float32 x with a bfloat16 weight and bias"
        )
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return False, "the kernel has no backward (inference only: run under torch.no_grad)"
    packed = weight.dim() == 3 and weight.shape[2] == PANEL
    if x.dim() < 1 or (weight.dim() != 2 and not packed) or weight.shape[1] != x.shape[-1]:
        return False, f"shapes {tuple(x.shape)} and {tuple(weight.shape)} do not multiply"
    return True, ""


SKINNY_LINEAR = register_op(
    "skinny_linear",
    [
        Backend("cpp", _skinny_linear_cpp, available=compiled("skinny_linear", "cpu"), supports=_fits_cpp),
        Backend("reference", skinny_linear_ref),
    ],
)


@functools.cache
def cpu_bf16_dot() -> bool:
    """Whether the CPU kernels' bf16 products (``decoder_step`` of a bf16 model, and float32 rows of bf16 values
    by bf16 panels here) run on the CPU's bf16 dot-product instruction (AVX512_BF16's vdpbf16ps, twice the fp32
    multiply-adds, the same sums): the compiled ops loaded, the CPU has it, JANUS_CPU_BF16_DOT is not "0"
    (read once per process, as the kernel reads it)."""
    if _ext.load() is None or not hasattr(torch.ops.janus, "cpu_bf16_dot"):
        return False
    return bool(torch.ops.janus.cpu_bf16_dot())


def kernel_ready() -> bool:
    """Whether the "cpp" kernel may run: compiled and loaded, and JANUS_BACKEND_SKINNY_LINEAR (or
    JANUS_BACKEND) does not force another backend."""
    return SKINNY_LINEAR.may_use("cpp")


def skinny_linear_checked(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``skinny_linear`` for arguments the caller has checked to suit the kernel (CPU tensors of one dtype,
    float32 or bfloat16, or float32 x with a bfloat16 weight and bias, and no autograd): the per-call
    argument checks of the dispatch skipped (about 7 us of a 14 us call at a decoder step's shapes),
    forcing by JANUS_BACKEND_SKINNY_LINEAR kept."""
    if SKINNY_LINEAR.may_use("cpp"):
        return _skinny_linear_cpp(x, weight, bias)
    return SKINNY_LINEAR(x, weight, bias)


def skinny_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ weight.T + bias`` on the fastest available backend (see the module docstring).

    Same contract as ``skinny_linear_ref``; the "cpp" backend sums in another order than torch's BLAS,
    so results agree to fp32 rounding (bf16: to one rounding of the output), not bit for bit.
    """
    return SKINNY_LINEAR(x, weight, bias)
