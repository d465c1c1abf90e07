// janus::skinny_linear on CPU tensors: out = x @ weight^T (+ bias) for a few rows of x, reading the
// weight once.
//
// An incremental decoder step multiplies 1-24 rows (greedy: a content and a query row per sentence;
// beam search: twice the beam) by every weight matrix of the model, tens of MB in all, which do not
// stay in any cache from one step to the next. A BLAS sgemm at these shapes (weight as the transposed
// operand) costs about one pass over the weight per few input rows; this kernel streams each weight
// row from memory once whatever the number of rows, and prefetches the rows it reads next, so a step
// costs about one pass over the model's weights: memory bound, as it should be.
//
// Layout: x (M, K) and weight (N, K) row-major (the nn.Linear parameter as it is), or the weight packed in panels (N /
// 16, K, 16) (janus.ops.skinny_linear.pack_panels: the panel tiles of skinny_gemm.h, no lane sums; out then has all N
// columns, bias N entries), both float32 or both bfloat16, or float32 x with a bfloat16 weight; bias (N,) in the
// weight's dtype or absent; out (M, N) in x's dtype (bf16: round to nearest even). Products and sums in fp32: per
// output, 16 lanes of K/16 fused multiply-adds in order, then the lanes' sum in a fixed tree, then the K tail, then the
// bias (the BLAS sums in another order: results agree to rounding, not bit for bit). Work is tiled by up to 16
// accumulators (skinny_gemm.h: 4 x 4, 5 x 3 or 8 x 2 input by weight rows); an output's sum does not depend on its
// tile, so a row's result does not depend on the other rows of x. The weight's rows are split across threads; every
// output is computed by one thread in one order, so results do not depend on the thread count either.
//
// Float32 x whose values are all bf16 (a bf16 model's hidden states widened, for fp32 logits) by bf16 panels: on
// a CPU with AVX512_BF16, the same sums on its bf16 dot-product instruction (skinny_gemm.h), at twice the rate.
//
// Compiled for AVX-512, AVX2 and the baseline (target_clones) with GCC on x86-64, GCC/Clang vector
// types elsewhere; on other compilers the op is not compiled and F.linear runs.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/vector_lanes.h"

#ifdef JANUS_VECTOR_LANES

#include "cpu/skinny_gemm.h"

namespace janus {
namespace {

using namespace skinny;

// Rows per chunk of a panel product (see skinny_linear_cpu).
constexpr int64_t kPanelChunk = 512;

at::Tensor skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() == 2 && (weight.dim() == 2 || weight.dim() == 3),
                    "janus::skinny_linear: x must be (M, K) and weight (N, K) or panels (N / 16, K, 16), got ",
                    x.sizes(), " and ", weight.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16,
              "janus::skinny_linear (CPU): x must be float32 or bfloat16, got ", dt);
  // Weight-only bf16: float32 rows by bfloat16 weights give float32 outputs.
  const bool mixed = dt == at::kFloat && weight.scalar_type() == at::kBFloat16;
  TORCH_CHECK(weight.scalar_type() == dt || mixed, "janus::skinny_linear: weight (", weight.scalar_type(),
              ") must have x's dtype (", dt, "), or be bfloat16 with float32 x");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(),
              "janus::skinny_linear (CPU): tensors must be on the CPU");
  // A 3-dim weight is packed in panels (N / 16, K, 16) (janus.ops.skinny_linear.pack_panels).
  const bool panels = weight.dim() == 3;
  TORCH_CHECK_VALUE(!panels || weight.size(2) == lanes::kLanes, "janus::skinny_linear: a packed weight must be (N / ",
                    lanes::kLanes, ", K, ", lanes::kLanes, "), got ", weight.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = panels ? weight.size(0) * lanes::kLanes : weight.size(0);
  const int64_t wK = weight.size(1);
  TORCH_CHECK_VALUE(wK == K, "janus::skinny_linear: x has ", K, " columns, weight ", wK);
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == N && b.scalar_type() == weight.scalar_type() && b.device().is_cpu(),
                      "janus::skinny_linear: bias must be (", N, ",) of the weight's dtype on the CPU, got ",
                      b.scalar_type(), " ", b.sizes());
  }
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const at::Tensor w = weight.contiguous();
  // The input rows in fp32, read K/16 times per weight row pair: widened once.
  const at::Tensor xf = dt == at::kFloat ? x.contiguous() : x.to(at::kFloat).contiguous();
  Problem P{M, N, K, xf.const_data_ptr<float>(), w.const_data_ptr(), b.defined() ? b.const_data_ptr() : nullptr,
            out.data_ptr()};
  if (panels) {
    // Rows that are bf16 values (a bf16 model's hidden states, widened for fp32 logits): the same sums on the
    // bf16 dot-product instruction (skinny_gemm.h's bf16_pairs), twice the multiply-adds of the FMAs.
    const bool dot = mixed && K % 2 == 0 && bf16_dot() && bf16_valued(P.x, M * K);
    std::vector<uint32_t> pairs(dot ? static_cast<size_t>(M * K / 2) : 0);
    if (dot) bf16_pairs(P.x, M * K / 2, pairs.data());
    auto* run = mixed ? panels_bf16_f32 : dt == at::kFloat ? panels_f32 : panels_bf16;
    const auto* wb = static_cast<const bf16_raw*>(P.w);
    const auto* bb = static_cast<const bf16_raw*>(P.b);
    const int64_t grain = panel_grain(K, w.element_size()), row_bytes = N * out.element_size();
    // Many rows (a batch's re-ranking pass: every float32 row comes here, JanusModel.project) run in chunks of
    // kPanelChunk, each over every panel, so that a chunk's inputs stay in cache while the panels stream by; a
    // row's sums do not depend on its chunk. At 2048 rows of (8000, 128) this and torch's GEMM take about as long
    // (46.7 and 43.9 ms, 2 threads), the first touch of the 65 MB output most of either.
    for (int64_t r0 = 0; r0 < M; r0 += kPanelChunk) {
      const int64_t m = std::min(kPanelChunk, M - r0);
      Problem C = P;
      C.M = m;
      C.x = P.x + r0 * K;
      C.out = static_cast<char*>(P.out) + r0 * row_bytes;
      if (dot) {
        const Bf16Rows rows{nullptr, pairs.data() + r0 * K / 2};
        auto* o = static_cast<float*>(C.out);
        at::parallel_for(0, N / lanes::kLanes, grain,
                         [&](int64_t p0, int64_t p1) { bf16_panels(rows, m, K, wb, N, bb, o, p0, p1); });
      } else {
        at::parallel_for(0, N / lanes::kLanes, grain, [&](int64_t p0, int64_t p1) { run(C, p0, p1); });
      }
    }
    return out;
  }
  auto* run = mixed ? block_bf16_f32 : dt == at::kFloat ? block_f32 : block_bf16;
  at::parallel_for(0, N, block_grain(K, w.element_size()), [&](int64_t n0, int64_t n1) { run(P, n0, n1); });
  return out;
}

}  // namespace
}  // namespace janus

TORCH_LIBRARY_IMPL(janus, CPU, m) { m.impl("skinny_linear", &janus::skinny_linear_cpu); }

namespace janus {
bool cpu_bf16_dot() { return skinny::bf16_dot(); }
}  // namespace janus

#else

namespace janus {
bool cpu_bf16_dot() { return false; }
}  // namespace janus

#endif  // JANUS_VECTOR_LANES
