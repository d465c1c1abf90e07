// The tiles of janus::skinny_linear (see skinny_linear.cpp for the method): out = x @ weight^T (+ bias)
// for a few rows of x, each weight row read once for all of them. Shared with decoder_step.cpp, whose
// fused decoder layers run their products through skinny_gemm below. Include after vector_lanes.h,
// inside `#ifdef JANUS_VECTOR_LANES`.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/vector_lanes.h"

// The bf16 dot-product instruction (AVX512_BF16's vdpbf16ps: 32 bf16 products summed into 16 fp32 lanes, twice
// the multiply-adds of an fp32 FMA), compiled where the compiler has it and used where the CPU does.
#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 10))
#define JANUS_BF16_DOT 1
#include <immintrin.h>
#endif

namespace janus {
namespace skinny {
// Internal linkage: each kernel file including this header gets its own copy (and target clones).
namespace {

using namespace lanes;

// A tile: kGroup input rows by kRows weight rows, 16 accumulators.
constexpr int kGroup = 4;
constexpr int kRows = 4;
// Weight rows are prefetched kAhead tiles ahead, into L2 (not L1): measured on an AVX-512 AMD EPYC, 2 threads,
// (2, 512) x (1536, 512)^T streamed from memory: 85 us against 116 for the next tile into L1 (37 and 27 GB/s),
// level at 10 rows (170 us, where the arithmetic bounds it).
constexpr int kAhead = 4;

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
  void* out;       // (M, N) O (T, or fp32 for decoder_step's bf16 weights)
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
// registers), their lane sums in one tree. `next` is the first weight row of the thread's tile kAhead
// tiles on, or null: its J rows are prefetched alongside, so that the memory is read ahead of the
// arithmetic (without it, a tile of many input rows waits on each weight line it reads).
template <typename T, int G, int J, typename O = T>
JANUS_INLINE void tile(const Problem& P, int64_t r0, int64_t n, const T* next) {
  static_assert(G * J <= kLanes, "tile: at most 16 accumulators");
  const int64_t K = P.K, K16 = K / kLanes * kLanes;
  const T* w0 = static_cast<const T*>(P.w) + n * K;
  const T* B = static_cast<const T*>(P.b);
  O* Out = static_cast<O*>(P.out);
  const float* X = P.x + r0 * K;
  vf acc[kLanes];
  for (int a = 0; a < kLanes; ++a) acc[a] = vf{};
  for (int64_t k = 0; k < K16; k += kLanes) {
    vf u[J];
    for (int j = 0; j < J; ++j) u[j] = load(w0 + j * K + k);
    if (next != nullptr) {
      for (int j = 0; j < J; ++j) __builtin_prefetch(next + j * K + k, 0, 1);
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
      store1(Out + (r0 + g) * P.N + n + j, s);
    }
  }
}

// The tile of input rows [r0, r0 + G), or of the fewer left: each count its own accumulator layout.
template <typename T, int G, int J, typename O = T>
JANUS_INLINE void tile_rows(const Problem& P, int64_t r0, int64_t n, const T* next) {
  const int64_t left = P.M - r0;
  if (left >= G) {
    tile<T, G, J, O>(P, r0, n, next);
  } else if constexpr (G > 1) {
    switch (left) {
      case 1: tile<T, 1, J, O>(P, r0, n, next); break;
      case 2: if constexpr (G > 2) tile<T, 2, J, O>(P, r0, n, next); break;
      case 3: if constexpr (G > 3) tile<T, 3, J, O>(P, r0, n, next); break;
      case 4: if constexpr (G > 4) tile<T, 4, J, O>(P, r0, n, next); break;
      case 5: if constexpr (G > 5) tile<T, 5, J, O>(P, r0, n, next); break;
      case 6: if constexpr (G > 6) tile<T, 6, J, O>(P, r0, n, next); break;
      case 7: if constexpr (G > 7) tile<T, 7, J, O>(P, r0, n, next); break;
      default: break;
    }
  }
}

// Outputs [n0, n1): J weight rows at a time, for all input rows (groups of G), so a weight row comes from
// memory once, for the first group, and from the L1 cache for the others; the rows kAhead tiles on are
// prefetched during the first group's tile.
template <typename T, int G, int J, typename O = T>
JANUS_INLINE void run_block(const Problem& P, int64_t n0, int64_t n1) {
  const T* W = static_cast<const T*>(P.w);
  for (int64_t n = n0; n < n1; n += J) {
    const T* next = n + (kAhead + 1) * J <= n1 ? W + (n + kAhead * J) * P.K : nullptr;
    for (int64_t r0 = 0; r0 < P.M; r0 += G) {
      const T* ahead = r0 == 0 ? next : nullptr;
      if (n + J <= n1) {
        tile_rows<T, G, J, O>(P, r0, n, ahead);
      } else {
        for (int64_t m = n; m < n1; ++m) tile_rows<T, G, 1, O>(P, r0, m, nullptr);  // the last rows, one at a time
      }
    }
  }
}

// The tiling of M input rows, measured (2 threads of an AVX-512 AMD EPYC, fp32, the weight streamed from
// memory; us, this plan against 4 x 4 tiles throughout): up to 4 rows one group of 4 x 4 tiles; 5 to 16 rows
// 5 x 3 tiles for a multiple of 5 (a beam of 5 is 10 rows: 132 against 157-167 for 1536 x 512, 82 against
// 98-101 for 512 x 1024) and 8 x 2 tiles otherwise (12 rows: 150 against 183-187); past 16 rows, whose fp32
// inputs outgrow L1 (re-read from L2 once per tile), 4 x 4 tiles again, which re-read them half as often
// (64 rows: 622-627 against 717-737, 370-373 against 462-507).
template <typename T, typename O = T>
JANUS_INLINE void run_rows(const Problem& P, int64_t n0, int64_t n1) {
  if (P.M <= kGroup || P.M > 16) {
    run_block<T, kGroup, kRows, O>(P, n0, n1);
  } else if (P.M % 5 == 0) {
    run_block<T, 5, 3, O>(P, n0, n1);
  } else {
    run_block<T, 8, 2, O>(P, n0, n1);
  }
}

[[maybe_unused]] JANUS_CLONES void block_f32(const Problem& P, int64_t n0, int64_t n1) { run_rows<float>(P, n0, n1); }
[[maybe_unused]] JANUS_CLONES void block_bf16(const Problem& P, int64_t n0, int64_t n1) {
  run_rows<bf16_raw>(P, n0, n1);
}
// bf16 weights and bias, fp32 outputs (decoder_step keeps its activations in fp32).
[[maybe_unused]] JANUS_CLONES void block_bf16_f32(const Problem& P, int64_t n0, int64_t n1) {
  run_rows<bf16_raw, float>(P, n0, n1);
}

// A panel tile's sums run in blocks of this many k, the blocks' sums added in order: one chain of K
// multiply-adds rounds like K terms (at K = 512, three times the error of torch's GEMM), blocks of 128 like
// 128 + K / 128.
constexpr int64_t kPanelBlock = 128;

// Panels: a weight (N, K) packed as (N / 16, K, 16), panel p holding outputs [16p, 16p + 16) K-major
// (janus.ops.skinny_linear.pack_panels). A panel tile broadcasts one input element at a time against a vector of 16
// outputs, so an output's sum is a chain of fused multiply-adds in k order (in blocks of kPanelBlock), stored as it is:
// no lane sums. Where K is small (the 128-wide layers of the `small` preset: 8 vectors of K per weight row) the
// row-major tiles above spend as much on their lane-sum trees as on the products; measured in
// janus.ops.skinny_linear's docstring. The sum does not depend on the tile either: a row's result depends on
// neither the other rows nor the thread count.
template <typename T, int G, int J, typename O = T>
JANUS_INLINE void panel_tile(const Problem& P, int64_t r0, int64_t p) {
  static_assert(G * J + J <= 30, "panel_tile: accumulators and weight vectors fit AVX-512's 32 registers");
  const int64_t K = P.K;
  const T* W = static_cast<const T*>(P.w) + p * K * kLanes;
  const T* B = static_cast<const T*>(P.b);
  O* Out = static_cast<O*>(P.out);
  const float* X = P.x + r0 * K;
  vf total[G][J];
  for (int64_t k0 = 0; k0 < K; k0 += kPanelBlock) {
    const int64_t k1 = std::min(K, k0 + kPanelBlock);
    vf acc[G][J];
    for (int g = 0; g < G; ++g) {
      for (int j = 0; j < J; ++j) acc[g][j] = vf{};
    }
    for (int64_t k = k0; k < k1; ++k) {
      vf u[J];
      for (int j = 0; j < J; ++j) u[j] = load(W + (j * K + k) * kLanes);
      for (int g = 0; g < G; ++g) {
        const vf xv = vf{} + X[g * K + k];
        for (int j = 0; j < J; ++j) acc[g][j] += u[j] * xv;
      }
    }
    for (int g = 0; g < G; ++g) {
      for (int j = 0; j < J; ++j) total[g][j] = k0 == 0 ? acc[g][j] : total[g][j] + acc[g][j];
    }
  }
  for (int j = 0; j < J; ++j) {
    const vf bias = B != nullptr ? load(B + (p + j) * kLanes) : vf{};
    for (int g = 0; g < G; ++g) lanes::store(Out + (r0 + g) * P.N + (p + j) * kLanes, total[g][j] + bias);
  }
}

// The panel tile of input rows [r0, r0 + G), or of the fewer left.
template <typename T, int G, int J, typename O = T>
JANUS_INLINE void panel_rows(const Problem& P, int64_t r0, int64_t p) {
  const int64_t left = P.M - r0;
  if (left >= G) {
    panel_tile<T, G, J, O>(P, r0, p);
  } else if constexpr (G > 1) {
    switch (left) {
      case 1: panel_tile<T, 1, J, O>(P, r0, p); break;
      case 2: if constexpr (G > 2) panel_tile<T, 2, J, O>(P, r0, p); break;
      case 3: if constexpr (G > 3) panel_tile<T, 3, J, O>(P, r0, p); break;
      case 4: if constexpr (G > 4) panel_tile<T, 4, J, O>(P, r0, p); break;
      case 5: if constexpr (G > 5) panel_tile<T, 5, J, O>(P, r0, p); break;
      default: break;
    }
  }
}

// Panels [p0, p1): J at a time for all input rows (groups of G), the J panels read from memory for the first
// group and from cache for the others.
template <typename T, int G, int J, typename O = T>
JANUS_INLINE void panel_block(const Problem& P, int64_t p0, int64_t p1) {
  int64_t p = p0;
  for (; p + J <= p1; p += J) {
    for (int64_t r0 = 0; r0 < P.M; r0 += G) panel_rows<T, G, J, O>(P, r0, p);
  }
  for (; p < p1; ++p) {
    for (int64_t r0 = 0; r0 < P.M; r0 += G) panel_rows<T, G, 1, O>(P, r0, p);
  }
}

// Rows per group and panels per tile by the row count: about 24 accumulators where the rows allow (enough
// independent chains to hide the multiply-add latency), a beam of 5's ten rows as two groups of 5.
template <typename T, typename O = T>
JANUS_INLINE void run_panels(const Problem& P, int64_t p0, int64_t p1) {
  switch (P.M) {
    case 1: panel_block<T, 1, 8, O>(P, p0, p1); break;
    case 2: panel_block<T, 2, 6, O>(P, p0, p1); break;
    case 3: panel_block<T, 3, 6, O>(P, p0, p1); break;
    case 4: panel_block<T, 4, 4, O>(P, p0, p1); break;
    default:
      if (P.M % 5 == 0) {
        panel_block<T, 5, 4, O>(P, p0, p1);
      } else {
        panel_block<T, 6, 4, O>(P, p0, p1);
      }
  }
}

[[maybe_unused]] JANUS_CLONES void panels_f32(const Problem& P, int64_t p0, int64_t p1) {
  run_panels<float>(P, p0, p1);
}
[[maybe_unused]] JANUS_CLONES void panels_bf16(const Problem& P, int64_t p0, int64_t p1) {
  run_panels<bf16_raw>(P, p0, p1);
}
[[maybe_unused]] JANUS_CLONES void panels_bf16_f32(const Problem& P, int64_t p0, int64_t p1) {
  run_panels<bf16_raw, float>(P, p0, p1);
}

// bf16 products in decoder_step: the rows are rounded to bf16 (to nearest, ties to even, as torch's bf16 layers
// round theirs) and multiplied by the bf16 weights, each product exact in fp32, summed in fp32 in k order. On a
// CPU with AVX512_BF16 the panel tiles take the rounded rows as pairs (x[k], x[k + 1]) and the weight's panel
// rows k and k + 1 interleaved into pairs (one permutation of a 64-byte load), and one vdpbf16ps adds both
// products to each lane, the one of k first, each addition rounded as a fused multiply-add: the same sums, bit
// for bit, as the other CPUs' tiles, which widen the rounded rows and weights and run two FMAs (measured on the
// AVX-512 AMD EPYC; the instruction treats subnormal inputs and results as 0, the FMAs do not).

// out[i] = x[i] rounded to bf16 (lanes::bf16_rounded, as the kernels' bf16 stores round), as fp32 (i < n).
[[maybe_unused]] JANUS_CLONES void round_to_bf16(const float* x, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vu r = bf16_rounded(load(x + i));
    std::memcpy(out + i, &r, sizeof r);
  }
  for (; i < n; ++i) {
    const uint32_t r = bf16_rounded(x[i]);
    std::memcpy(out + i, &r, sizeof r);
  }
}

// out[j] = the bf16 of x[2j] in the high half, of x[2j + 1] in the low half (j < pairs): the pairs of a row
// as vdpbf16ps takes them (its odd element first).
[[maybe_unused]] JANUS_CLONES void bf16_pairs(const float* x, int64_t pairs, uint32_t* out) {
  const vu even = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  int64_t j = 0;
  for (; j + kLanes <= pairs; j += kLanes) {
    const vu a = bf16_rounded(load(x + 2 * j)), b = bf16_rounded(load(x + 2 * j + kLanes));
    const vu p = __builtin_shuffle(a, b, even) | (__builtin_shuffle(a, b, even + 1) >> 16);
    std::memcpy(out + j, &p, sizeof p);
  }
  for (; j < pairs; ++j) out[j] = bf16_rounded(x[2 * j]) | (bf16_rounded(x[2 * j + 1]) >> 16);
}

#ifdef JANUS_BF16_DOT
#define JANUS_DOT __attribute__((target("avx512f,avx512bw,avx512bf16")))
#define JANUS_DOT_INLINE JANUS_DOT inline __attribute__((always_inline))

// A panel product whose rows are bf16 pairs (bf16_pairs: K / 2 per row; K even), bf16 panels, fp32 outputs.
struct PairProblem {
  int64_t M, N, K;
  const uint32_t* x;
  const bf16_raw* w;
  const bf16_raw* b;
  float* out;
};

// panel_tile's outputs and sums (blocks of kPanelBlock k, bias last) by vdpbf16ps, two k a step.
template <int G, int J>
JANUS_DOT_INLINE void dot_tile(const PairProblem& P, int64_t r0, int64_t p) {
  static_assert(G * J + J <= 29, "dot_tile: accumulators, weight pairs and the permutation fit 32 registers");
  // Lane pair i of a loaded panel rows k, k + 1 (32 bf16: row k's 16, then row k + 1's): (row k + 1, row k) of
  // output i, so that vdpbf16ps takes row k's product first.
  alignas(64) static const uint16_t kPairs[32] = {16, 0, 17, 1, 18, 2, 19, 3, 20, 4, 21, 5, 22, 6, 23, 7,
                                                  24, 8, 25, 9, 26, 10, 27, 11, 28, 12, 29, 13, 30, 14, 31, 15};
  const __m512i order = _mm512_load_si512(kPairs);
  const int64_t K = P.K, K2 = K / 2;
  const bf16_raw* W = P.w + p * K * kLanes;
  const uint32_t* X = P.x + r0 * K2;
  __m512 total[G][J];
  for (int64_t k0 = 0; k0 < K; k0 += kPanelBlock) {
    const int64_t k1 = std::min(K, k0 + kPanelBlock);
    __m512 acc[G][J];
    for (int g = 0; g < G; ++g) {
      for (int j = 0; j < J; ++j) acc[g][j] = _mm512_setzero_ps();
    }
    for (int64_t k = k0; k < k1; k += 2) {
      __m512bh u[J];
      for (int j = 0; j < J; ++j) {
        u[j] = (__m512bh)_mm512_permutexvar_epi16(order, _mm512_loadu_si512(W + (j * K + k) * kLanes));
      }
      for (int g = 0; g < G; ++g) {
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(X[g * K2 + k / 2]));
        for (int j = 0; j < J; ++j) acc[g][j] = _mm512_dpbf16_ps(acc[g][j], u[j], xv);
      }
    }
    for (int g = 0; g < G; ++g) {
      for (int j = 0; j < J; ++j) total[g][j] = k0 == 0 ? acc[g][j] : _mm512_add_ps(total[g][j], acc[g][j]);
    }
  }
  for (int j = 0; j < J; ++j) {
    const __m512 bias = P.b != nullptr ? (__m512)load(P.b + (p + j) * kLanes) : _mm512_setzero_ps();
    for (int g = 0; g < G; ++g) {
      _mm512_storeu_ps(P.out + (r0 + g) * P.N + (p + j) * kLanes, _mm512_add_ps(total[g][j], bias));
    }
  }
}

template <int G, int J>
JANUS_DOT_INLINE void dot_rows(const PairProblem& P, int64_t r0, int64_t p) {
  const int64_t left = P.M - r0;
  if (left >= G) {
    dot_tile<G, J>(P, r0, p);
  } else if constexpr (G > 1) {
    switch (left) {
      case 1: dot_tile<1, J>(P, r0, p); break;
      case 2: if constexpr (G > 2) dot_tile<2, J>(P, r0, p); break;
      case 3: if constexpr (G > 3) dot_tile<3, J>(P, r0, p); break;
      case 4: if constexpr (G > 4) dot_tile<4, J>(P, r0, p); break;
      case 5: if constexpr (G > 5) dot_tile<5, J>(P, r0, p); break;
      default: break;
    }
  }
}

template <int G, int J>
JANUS_DOT_INLINE void dot_block(const PairProblem& P, int64_t p0, int64_t p1) {
  int64_t p = p0;
  for (; p + J <= p1; p += J) {
    for (int64_t r0 = 0; r0 < P.M; r0 += G) dot_rows<G, J>(P, r0, p);
  }
  for (; p < p1; ++p) {
    for (int64_t r0 = 0; r0 < P.M; r0 += G) dot_rows<G, 1>(P, r0, p);
  }
}

// Panels [p0, p1) of a pair product, tiled as run_panels tiles.
[[maybe_unused]] JANUS_DOT void dot_panels(const PairProblem& P, int64_t p0, int64_t p1) {
  switch (P.M) {
    case 1: dot_block<1, 8>(P, p0, p1); break;
    case 2: dot_block<2, 6>(P, p0, p1); break;
    case 3: dot_block<3, 6>(P, p0, p1); break;
    case 4: dot_block<4, 4>(P, p0, p1); break;
    default:
      if (P.M % 5 == 0) {
        dot_block<5, 4>(P, p0, p1);
      } else {
        dot_block<6, 4>(P, p0, p1);
      }
  }
}
#endif  // JANUS_BF16_DOT

// Whether bf16 panel products run on vdpbf16ps: compiled, the CPU has it, and JANUS_CPU_BF16_DOT is not "0"
// (read once per process; the tests compare both paths).
inline bool bf16_dot() {
#ifdef JANUS_BF16_DOT
  static const bool on = [] {
    const char* env = std::getenv("JANUS_CPU_BF16_DOT");
    if (env != nullptr && std::strcmp(env, "0") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return on;
#else
  return false;
#endif
}

// The rows of a bf16 product as its tiles take them, in `buf`: pairs for vdpbf16ps (bf16_dot, K even), else
// rounded to bf16 as fp32.
struct Bf16Rows {
  const float* rounded = nullptr;
  const uint32_t* pairs = nullptr;
};
inline Bf16Rows bf16_rows(const float* x, int64_t M, int64_t K, bool panels, std::vector<uint32_t>& buf) {
  if (panels && K % 2 == 0 && bf16_dot()) {
    buf.resize(static_cast<size_t>(M * K / 2));
    bf16_pairs(x, M * K / 2, buf.data());
    return {nullptr, buf.data()};
  }
  buf.resize(static_cast<size_t>(M * K));
  float* r = reinterpret_cast<float*>(buf.data());
  round_to_bf16(x, M * K, r);
  return {r, nullptr};
}

// Whether every x[i] (i < n) is a bf16 value (its low 16 bits zero): fp32 rows widened from bf16, whose product
// with bf16 weights the pairs path computes bit for bit as the widened FMAs do.
[[maybe_unused]] JANUS_CLONES bool bf16_valued(const float* x, int64_t n) {
  vu low = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    vu u;
    std::memcpy(&u, x + i, sizeof u);
    low |= u & 0xFFFFu;
  }
  uint32_t any = 0;
  for (int l = 0; l < kLanes; ++l) any |= low[l];
  for (; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, sizeof u);
    any |= u & 0xFFFFu;
  }
  return any == 0;
}

// Panels [p0, p1) of x (M, K) @ w^T + b, bf16 weights, x given by bf16_rows.
inline void bf16_panels(const Bf16Rows& x, int64_t M, int64_t K, const bf16_raw* w, int64_t N, const bf16_raw* b,
                        float* out, int64_t p0, int64_t p1) {
#ifdef JANUS_BF16_DOT
  if (x.pairs != nullptr) {
    dot_panels(PairProblem{M, N, K, x.pairs, w, b, out}, p0, p1);
    return;
  }
#endif
  panels_bf16_f32(Problem{M, N, K, x.rounded, w, b, out}, p0, p1);
}

// A thread's scratch for the rows of its bf16 products.
inline std::vector<uint32_t>& bf16_scratch() {
  thread_local std::vector<uint32_t> buf;
  return buf;
}

// Blocks of whole tiles of weight rows (a multiple of every tiling's 4, 3 and 2 weight rows), about 64 KB of
// weight each at least, split across threads.
constexpr int64_t kGrainRows = 24;
inline int64_t block_grain(int64_t K, int64_t element_size) {
  return std::max<int64_t>(kGrainRows,
                           (int64_t{1} << 16) / std::max<int64_t>(1, K * element_size) / kGrainRows * kGrainRows);
}
// Panels per task: about 64 KB of weight, and a multiple of 24, which every panel tiling's 8, 6 or 4 panels
// divide.
inline int64_t panel_grain(int64_t K, int64_t element_size) {
  return std::max<int64_t>(kGrainRows, (int64_t{1} << 16) / std::max<int64_t>(1, K * element_size * kLanes) /
                                           kGrainRows * kGrainRows);
}

// out (M, N) = x (M, K) @ w (N, K)^T + b (N,) (b may be null): x and out fp32, w and b T (float or bf16_raw),
// row-major, contiguous.
// bf16 weights: the rows rounded to bf16 first (see bf16_rows).
template <typename T>
inline void skinny_gemm(const float* x, int64_t M, int64_t K, const T* w, int64_t N, const T* b, float* out) {
  if (M == 0 || N == 0) return;
  if constexpr (!std::is_same_v<T, float>) x = bf16_rows(x, M, K, false, bf16_scratch()).rounded;
  const Problem P{M, N, K, x, w, b, out};
  auto* run = std::is_same_v<T, float> ? block_f32 : block_bf16_f32;
  at::parallel_for(0, N, block_grain(K, sizeof(T)), [&](int64_t n0, int64_t n1) { run(P, n0, n1); });
}

// Input rows per task where a product has many (a mask-predict pass over whole canvases): a multiple of the
// panel tilings' 5 and 6 rows.
constexpr int64_t kRowGrain = 60;
// Multiply-adds from which a product too narrow to split by panels (fewer than two tasks' worth) is split by
// rows instead, in two tasks of a multiple of 6 rows: a task then has ~5 us of arithmetic or more, against
// ~2 us of handing it to the second thread. On the 2-core EPYC, the small preset's decoder_step (its products
// 128, 384 or 512 wide: one task of panels each) over mask-predict canvases of 2 x 20 and 3 x 20 rows took
// 0.81x and 0.80x the time (811 -> 658 and 1183 -> 919-974 us), its encoder over 20 and 40 source tokens
// 0.91x and 0.82x; passes of 2-10 rows (AR steps) and over 60 rows are as before.
constexpr int64_t kRowSplitWork = int64_t{1} << 20;

// The same product with the weight packed in panels (N / 16, K, 16) (N a multiple of 16). A few rows split the
// panels across threads; more than kRowGrain rows split the rows, each task over every panel (the narrow
// products of a small model have too few panels to split: 128 outputs are 8), and so do fewer rows of a
// product too narrow for two tasks of panels where they hold kRowSplitWork multiply-adds.
// bf16 weights: the rows rounded to bf16 (bf16_rows), each task's by its own thread where the rows are split.
template <typename T>
inline void panel_gemm(const float* x, int64_t M, int64_t K, const T* w, int64_t N, const T* b, float* out) {
  if (M == 0 || N == 0) return;
  constexpr bool bf16 = !std::is_same_v<T, float>;
  const int64_t panels = N / kLanes, grain = panel_grain(K, sizeof(T));
  int64_t rows = M > kRowGrain ? kRowGrain : 0;
  if (!rows && panels < 2 * grain && M >= 12 && M * K * N >= kRowSplitWork) rows = (M + 11) / 12 * 6;
  if (rows) {
    at::parallel_for(0, M, rows, [&](int64_t r0, int64_t r1) {
      if constexpr (bf16) {
        const Bf16Rows xr = bf16_rows(x + r0 * K, r1 - r0, K, true, bf16_scratch());
        bf16_panels(xr, r1 - r0, K, w, N, b, out + r0 * N, 0, panels);
      } else {
        panels_f32(Problem{r1 - r0, N, K, x + r0 * K, w, b, out + r0 * N}, 0, panels);
      }
    });
    return;
  }
  if constexpr (bf16) {
    const Bf16Rows xr = bf16_rows(x, M, K, true, bf16_scratch());
    at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) { bf16_panels(xr, M, K, w, N, b, out, p0, p1); });
  } else {
    const Problem P{M, N, K, x, w, b, out};
    at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) { panels_f32(P, p0, p1); });
  }
}

}  // namespace
}  // namespace skinny
}  // namespace janus
