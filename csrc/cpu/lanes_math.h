// Math on the 16-lane vectors of vector_lanes.h, written once for one float and for 16 (the tail of a
// row runs the same formulas in scalars), shared by the CPU kernels that reduce rows of logits
// (loss_terms.cpp, best_token.cpp). Everything is JANUS_INLINE so that each target_clones clone of a
// kernel compiles it for its own instruction set.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/vector_lanes.h"

#ifdef JANUS_VECTOR_LANES

// The column bodies are lambdas: inlined too, so that each clone compiles them for its own target.
#define JANUS_BODY __attribute__((always_inline))

namespace janus {
namespace lanes {

template <typename L>
JANUS_INLINE L splat(float x) {
  if constexpr (sizeof(L) == sizeof(float)) {
    return x;
  } else {
    return L{} + x;
  }
}

JANUS_INLINE float max_of(float a, float b) { return a > b ? a : b; }
JANUS_INLINE vf max_of(vf a, vf b) { return a > b ? a : b; }
// Lane sums in double: one lane may hold the row's largest term, which would swallow the others' in fp32.
JANUS_INLINE double hsum(vf x) {
  double s = 0.0;
  for (int i = 0; i < kLanes; ++i) s += x[i];
  return s;
}
JANUS_INLINE float hmax(float x) { return x; }
JANUS_INLINE float hmax(vf x) {
  float m = x[0];
  for (int i = 1; i < kLanes; ++i) m = max_of(m, x[i]);
  return m;
}

// Whether some lane of x exceeds t (x without NaN): the lanes' maximum in four folds, not 15 extractions.
JANUS_INLINE bool any_above(vf x, float t) {
  x = max_of(x, __builtin_shuffle(x, vi{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}));
  x = max_of(x, __builtin_shuffle(x, vi{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11}));
  x = max_of(x, __builtin_shuffle(x, vi{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}));
  x = max_of(x, __builtin_shuffle(x, vi{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}));
  return x[0] > t;
}

JANUS_INLINE int32_t to_int(float x) { return static_cast<int32_t>(x); }
JANUS_INLINE vi to_int(vf x) { return __builtin_convertvector(x, vi); }
JANUS_INLINE float from_bits(int32_t i) {
  float x;
  std::memcpy(&x, &i, sizeof x);
  return x;
}
JANUS_INLINE vf from_bits(vi i) {
  vf x;
  std::memcpy(&x, &i, sizeof x);
  return x;
}

// exp(x) for x <= 0 (log-probabilities and their differences from a row maximum): x is clamped
// below at -87 (exp(-87) ~ 1.6e-38, the smallest normal float's order, where the reference's
// exp is as good as 0 for every sum here), then x = n ln2 + r with |r| <= ln2 / 2,
// exp(r) by its Taylor polynomial of degree 7 (truncation 5e-9) and 2^n from the exponent bits.
template <typename L>
JANUS_INLINE L exp_neg(L x) {
  x = max_of(x, splat<L>(-87.0f));
  const L round = splat<L>(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const L n = (x * splat<L>(1.44269504f) + round) - round;
  L r = x - n * splat<L>(0.693359375f);
  r = r - n * splat<L>(-2.12194440e-4f);
  L p = splat<L>(1.98412698e-4f);
  p = p * r + splat<L>(1.38888889e-3f);
  p = p * r + splat<L>(8.33333333e-3f);
  p = p * r + splat<L>(4.16666667e-2f);
  p = p * r + splat<L>(1.66666667e-1f);
  p = p * r + splat<L>(0.5f);
  p = p * r + splat<L>(1.0f);
  p = p * r + splat<L>(1.0f);
  return p * from_bits((to_int(n) + 127) << 23);
}

// Applies body(lane_tag, v) to every column: 16 at a time, then the tail one by one.
template <typename Body>
JANUS_INLINE void for_columns(int64_t V, Body&& body) {
  int64_t v = 0;
  for (; v + kLanes <= V; v += kLanes) body(vf{}, v);
  for (; v < V; ++v) body(0.0f, v);
}

// The same for a body that sums into lanes: flush() after every kBlock columns and at the end moves
// the lane sums into double, so that each fp32 sum runs over 16 terms per lane (a row of 8000 columns
// summed lane by lane in fp32 would lose up to ~500 ulp; this keeps it near torch's pairwise sums).
constexpr int64_t kBlock = 16 * kLanes;
template <typename Body, typename Flush>
JANUS_INLINE void sum_columns(int64_t V, Body&& body, Flush&& flush) {
  int64_t v = 0;
  while (v + kLanes <= V) {
    const int64_t stop = std::min(v + kBlock, V - V % kLanes);
    for (; v < stop; v += kLanes) body(vf{}, v);
    flush();
  }
  for (; v < V; ++v) body(0.0f, v);
  flush();
}

// sum over the columns of exp(z[v] - mx), mx >= every z[v] (the row's maximum): fp32 lanes flushed into
// double every kBlock columns (sum_columns), the tail in double.
template <typename In>
JANUS_INLINE double sum_exp_below(const In* z, int64_t V, float mx) {
  vf vexp = {};
  double sexp = 0.0;
  double sum_exp = 0.0;
  sum_columns(
      V,
      [&](auto tag, int64_t v) JANUS_BODY {
        using L = decltype(tag);
        const L e = exp_neg(load(tag, z + v) - splat<L>(mx));
        if constexpr (sizeof(L) == sizeof(float)) {
          sexp += e;
        } else {
          vexp += e;
        }
      },
      [&]() JANUS_BODY {
        sum_exp += hsum(vexp) + sexp;
        vexp = vf{}, sexp = 0.0;
      });
  return sum_exp;
}

}  // namespace lanes
}  // namespace janus

#endif  // JANUS_VECTOR_LANES
