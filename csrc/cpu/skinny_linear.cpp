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
// Layout: x (M, K) and weight (N, K) row-major (the nn.Linear parameter as it is: no copy, no
// repacking), both float32 or both bfloat16; bias (N,) in their dtype or absent; out (M, N) in their
// dtype (bf16: round to nearest even). Products and sums in fp32: per output, 16 lanes of K/16 fused
// multiply-adds in order, then the lanes' sum in a fixed tree, then the K tail, then the bias (the
// BLAS sums in another order: results agree to rounding, not bit for bit). Work is tiled by 4 weight
// rows x up to 4 input rows; an output's sum does not depend on its tile, so a row's result does not
// depend on the other rows of x. The weight's rows are split across threads; every output is computed
// by one thread in one order, so results do not depend on the thread count either.
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

namespace janus {
namespace {

using namespace lanes;

// A tile: kGroup input rows by kRows weight rows, 16 accumulators.
constexpr int kGroup = 4;
constexpr int kRows = 4;

JANUS_INLINE vf load(const float* p) { return lanes::load(vf{}, p); }
JANUS_INLINE vf load(const bf16_raw* p) { return lanes::load(vf{}, p); }
template <typename T>
JANUS_INLINE float load1(const T* p) {
  return lanes::load(0.0f, p);
}
template <typename T>
JANUS_INLINE void store1(T* p, float x) {
  lanes::store(p, x);
}

struct Problem {
  int64_t M, N, K;
  const float* x;  // (M, K) fp32 (bf16 inputs are widened once, into a scratch copy)
  const void* w;   // (N, K) T
  const void* b;   // (N,) T or null
  void* out;       // (M, N) T
};

// fold<W>(x, y): the 32 lanes of (x, y) in blocks of 2W, each block's two halves added into W lanes.
// Over a tree of 16 accumulators, fold<8>, <4>, <2> and <1> leave in lane i the sum of accumulator i's
// 16 lanes: 15 folds for 16 sums, in place of 16 x 15 dependent scalar additions.
template <int W>
JANUS_INLINE vf fold(vf x, vf y) {
  // lo: the first W lanes of every block of 2W; hi: the last W (indices into the 32 lanes of x, y).
  static_assert(W == 8 || W == 4 || W == 2 || W == 1, "fold<W>: W is 8, 4, 2 or 1");
  if constexpr (W == 8) {
    const vi lo = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    return __builtin_shuffle(x, y, lo) + __builtin_shuffle(x, y, lo + 8);
  } else if constexpr (W == 4) {
    const vi lo = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    return __builtin_shuffle(x, y, lo) + __builtin_shuffle(x, y, lo + 4);
  } else if constexpr (W == 2) {
    const vi lo = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
    return __builtin_shuffle(x, y, lo) + __builtin_shuffle(x, y, lo + 2);
  } else {
    const vi lo = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    return __builtin_shuffle(x, y, lo) + __builtin_shuffle(x, y, lo + 1);
  }
}

// Lane sums of 16 accumulators, as one vector (lane i: accumulator i).
JANUS_INLINE vf lane_sums16(const vf* a) {
  vf l1[8], l2[4], l3[2];
  for (int i = 0; i < 8; ++i) l1[i] = fold<8>(a[2 * i], a[2 * i + 1]);
  for (int i = 0; i < 4; ++i) l2[i] = fold<4>(l1[2 * i], l1[2 * i + 1]);
  for (int i = 0; i < 2; ++i) l3[i] = fold<2>(l2[2 * i], l2[2 * i + 1]);
  return fold<1>(l3[0], l3[1]);
}

// One tile: outputs [n, n + J) of input rows [r0, r0 + G), each weight row read once for the G rows,
// G * J accumulators (at most 16: with the J weight vectors and one input vector, 21 of AVX-512's 32
// registers), their lane sums in one tree. `next` is the weight row where the thread's next tile
// starts, or null: its J rows are prefetched alongside, so that the memory is read ahead of the
// arithmetic (without it, a tile of many input rows waits on each weight line it reads).
template <typename T, int G, int J>
JANUS_INLINE void tile(const Problem& P, int64_t r0, int64_t n, const T* next) {
  static_assert(G * J <= kLanes, "tile: at most 16 accumulators");
  const int64_t K = P.K, K16 = K / kLanes * kLanes;
  const T* w0 = static_cast<const T*>(P.w) + n * K;
  const T* B = static_cast<const T*>(P.b);
  T* O = static_cast<T*>(P.out);
  const float* X = P.x + r0 * K;
  vf acc[kLanes];
  for (int a = 0; a < kLanes; ++a) acc[a] = vf{};
  for (int64_t k = 0; k < K16; k += kLanes) {
    vf u[J];
    for (int j = 0; j < J; ++j) u[j] = load(w0 + j * K + k);
    if (next != nullptr) {
      for (int j = 0; j < J; ++j) __builtin_prefetch(next + j * K + k, 0, 3);
    }
    for (int g = 0; g < G; ++g) {
      const vf xv = load(X + g * K + k);
      for (int j = 0; j < J; ++j) acc[g * J + j] += u[j] * xv;
    }
  }
  float sums[kLanes];
  const vf s16 = lane_sums16(acc);
  std::memcpy(sums, &s16, sizeof s16);
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < J; ++j) {
      float s = sums[g * J + j];
      for (int64_t k = K16; k < K; ++k) s += load1(w0 + j * K + k) * X[g * K + k];
      if (B != nullptr) s += load1(B + n + j);
      store1(O + (r0 + g) * P.N + n + j, s);
    }
  }
}

// The tile of input rows [r0, r0 + kGroup), or of the fewer left: each count its own accumulator layout.
template <typename T, int J>
JANUS_INLINE void tile_rows(const Problem& P, int64_t r0, int64_t n, const T* next) {
  switch (std::min<int64_t>(kGroup, P.M - r0)) {
    case 1: tile<T, 1, J>(P, r0, n, next); break;
    case 2: tile<T, 2, J>(P, r0, n, next); break;
    case 3: tile<T, 3, J>(P, r0, n, next); break;
    default: tile<T, 4, J>(P, r0, n, next); break;
  }
}

// Outputs [n0, n1): kRows weight rows at a time, for all input rows (groups of kGroup), so a weight
// row comes from memory once, for the first group, and from the L1 cache for the others; the next
// block's rows are prefetched during the first group's tile.
template <typename T>
JANUS_INLINE void run_block(const Problem& P, int64_t n0, int64_t n1) {
  const T* W = static_cast<const T*>(P.w);
  for (int64_t n = n0; n < n1; n += kRows) {
    const T* next = n + 2 * kRows <= n1 ? W + (n + kRows) * P.K : nullptr;
    for (int64_t r0 = 0; r0 < P.M; r0 += kGroup) {
      const T* ahead = r0 == 0 ? next : nullptr;
      if (n + kRows <= n1) {
        tile_rows<T, kRows>(P, r0, n, ahead);
      } else {
        for (int64_t m = n; m < n1; ++m) tile_rows<T, 1>(P, r0, m, nullptr);  // the last rows, one at a time
      }
    }
  }
}

JANUS_CLONES void block_f32(const Problem& P, int64_t n0, int64_t n1) { run_block<float>(P, n0, n1); }
JANUS_CLONES void block_bf16(const Problem& P, int64_t n0, int64_t n1) { run_block<bf16_raw>(P, n0, n1); }

at::Tensor skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() == 2 && weight.dim() == 2, "janus::skinny_linear: x must be (M, K) and weight (N, K), got ",
                    x.sizes(), " and ", weight.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "janus::skinny_linear (CPU): x must be float32 or bfloat16, got ",
              dt);
  TORCH_CHECK(weight.scalar_type() == dt, "janus::skinny_linear: weight (", weight.scalar_type(),
              ") must have x's dtype (", dt, ")");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "janus::skinny_linear (CPU): tensors must be on the CPU");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == K, "janus::skinny_linear: x has ", K, " columns, weight ", weight.size(1));
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == N && b.scalar_type() == dt && b.device().is_cpu(),
                      "janus::skinny_linear: bias must be (", N, ",) of x's dtype on the CPU, got ", b.scalar_type(),
                      " ", b.sizes());
  }
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const at::Tensor w = weight.contiguous();
  // The input rows in fp32, read K/16 times per weight row pair: widened once.
  const at::Tensor xf = dt == at::kFloat ? x.contiguous() : x.to(at::kFloat).contiguous();
  Problem P{M, N, K, xf.const_data_ptr<float>(), w.const_data_ptr(), b.defined() ? b.const_data_ptr() : nullptr,
            out.data_ptr()};
  auto* run = dt == at::kFloat ? block_f32 : block_bf16;
  // Blocks of whole tiles of weight rows, about 64 KB of weight each at least.
  const int64_t grain =
      std::max<int64_t>(kRows, (int64_t{1} << 16) / std::max<int64_t>(1, K * w.element_size()) / kRows * kRows);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { run(P, n0, n1); });
  return out;
}

}  // namespace
}  // namespace janus

TORCH_LIBRARY_IMPL(janus, CPU, m) { m.impl("skinny_linear", &janus::skinny_linear_cpu); }

#endif  // JANUS_VECTOR_LANES
