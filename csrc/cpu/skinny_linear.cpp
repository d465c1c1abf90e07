// janus::skinny_linear on CPU tensors: out = x @ weight^T (+ bias) for a few rows of x, reading the
// weight once.
//
// An incremental decoder step multiplies 1-24 rows (greedy: a content and a query row per sentence;
// beam search: twice the beam) by every weight matrix of the model, tens of MB in all, which do not
// stay in any cache from one step to the next. A BLAS sgemm at these shapes (weight as the transposed
// operand) costs about one pass over the weight per input row; this kernel streams each weight row
// once for up to kGroup input rows, so a step costs about one pass over the model's weights whatever
// the number of rows: memory bound, as it should be.
//
// Layout: x (M, K) and weight (N, K) row-major (the nn.Linear parameter as it is: no copy, no
// repacking), both float32 or both bfloat16; bias (N,) in their dtype or absent; out (M, N) in their
// dtype (bf16: round to nearest even). Products and sums in fp32: per output, 16 lanes of K/16 fused
// multiply-adds in order, then the lanes' sum, then the bias (the BLAS sums in another order: results
// agree to rounding, not bit for bit). The weight's rows are split across threads; every output is
// computed by one thread in one order, so results do not depend on the thread count.
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

// Input rows per pass over the weight: 12 rows x 2 weight rows = 24 accumulators, with the two weight
// vectors and one input vector 27 of AVX-512's 32 registers.
constexpr int kGroup = 12;

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
JANUS_INLINE float lane_sum(vf v) {
  // A fixed tree: 8 + 8, 4 + 4, 2 + 2, 1 + 1.
  float s[kLanes];
  std::memcpy(s, &v, sizeof s);
  for (int w = kLanes / 2; w >= 1; w /= 2) {
    for (int i = 0; i < w; ++i) s[i] += s[i + w];
  }
  return s[0];
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

// Outputs [n0, n1) of input rows [r0, r0 + G), J weight rows at a time: each weight row read once for
// the G rows, G * J accumulators, their lane sums 16 at a time.
template <typename T, int G, int J>
JANUS_INLINE void rows_block(const Problem& P, int64_t r0, int64_t n0, int64_t n1) {
  constexpr int A = G * J, A16 = (A + kLanes - 1) / kLanes * kLanes;
  const int64_t K = P.K, K16 = K / kLanes * kLanes;
  const T* W = static_cast<const T*>(P.w);
  const T* B = static_cast<const T*>(P.b);
  T* O = static_cast<T*>(P.out);
  const float* X = P.x + r0 * K;
  int64_t n = n0;
  for (; n + J <= n1; n += J) {
    const T* w0 = W + n * K;
    vf acc[A16];
    for (int a = 0; a < A16; ++a) acc[a] = vf{};
    for (int64_t k = 0; k < K16; k += kLanes) {
      vf u[J];
      for (int j = 0; j < J; ++j) u[j] = load(w0 + j * K + k);
      for (int g = 0; g < G; ++g) {
        const vf xv = load(X + g * K + k);
        for (int j = 0; j < J; ++j) acc[g * J + j] += u[j] * xv;
      }
    }
    float sums[A16];
    for (int a = 0; a < A16; a += kLanes) {
      const vf s16 = lane_sums16(acc + a);
      std::memcpy(sums + a, &s16, sizeof s16);
    }
    for (int g = 0; g < G; ++g) {
      for (int j = 0; j < J; ++j) {
        float s = sums[g * J + j];
        for (int64_t k = K16; k < K; ++k) s += load1(w0 + j * K + k) * X[g * K + k];
        if (B != nullptr) s += load1(B + n + j);
        store1(O + (r0 + g) * P.N + n + j, s);
      }
    }
  }
  for (; n < n1; ++n) {  // the last outputs, one at a time
    const T* w0 = W + n * K;
    vf acc[G];
    for (int g = 0; g < G; ++g) acc[g] = vf{};
    for (int64_t k = 0; k < K16; k += kLanes) {
      const vf u0 = load(w0 + k);
      for (int g = 0; g < G; ++g) acc[g] += u0 * load(X + g * K + k);
    }
    for (int g = 0; g < G; ++g) {
      float s = lane_sum(acc[g]);
      for (int64_t k = K16; k < K; ++k) s += load1(w0 + k) * X[g * K + k];
      if (B != nullptr) s += load1(B + n);
      store1(O + (r0 + g) * P.N + n, s);
    }
  }
}

// Weight rows per pass by input rows: G * J accumulators and J weight vectors within 32 registers, and
// G * J a multiple of 16 where it can be (no lane sums of padding).
template <typename T>
JANUS_INLINE void run_block(const Problem& P, int64_t n0, int64_t n1) {
  for (int64_t r0 = 0; r0 < P.M; r0 += kGroup) {
    switch (std::min<int64_t>(kGroup, P.M - r0)) {
      case 1: rows_block<T, 1, 16>(P, r0, n0, n1); break;
      case 2: rows_block<T, 2, 8>(P, r0, n0, n1); break;
      case 3: rows_block<T, 3, 5>(P, r0, n0, n1); break;
      case 4: rows_block<T, 4, 4>(P, r0, n0, n1); break;
      case 5: rows_block<T, 5, 3>(P, r0, n0, n1); break;
      case 6: rows_block<T, 6, 3>(P, r0, n0, n1); break;
      case 7: rows_block<T, 7, 2>(P, r0, n0, n1); break;
      case 8: rows_block<T, 8, 2>(P, r0, n0, n1); break;
      case 9: rows_block<T, 9, 2>(P, r0, n0, n1); break;
      case 10: rows_block<T, 10, 2>(P, r0, n0, n1); break;
      case 11: rows_block<T, 11, 2>(P, r0, n0, n1); break;
      default: rows_block<T, 12, 2>(P, r0, n0, n1); break;
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
  // Blocks of whole weight rows; about 64 KB of weight each, so that every thread gets many.
  const int64_t grain = std::max<int64_t>(2, (int64_t{1} << 16) / std::max<int64_t>(1, K * w.element_size()) / 2 * 2);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { run(P, n0, n1); });
  return out;
}

}  // namespace
}  // namespace janus

TORCH_LIBRARY_IMPL(janus, CPU, m) { m.impl("skinny_linear", &janus::skinny_linear_cpu); }

#endif  // JANUS_VECTOR_LANES
