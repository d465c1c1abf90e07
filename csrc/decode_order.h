// The orders that the mask-predict ops select by, shared by the CPU and CUDA
// kernels so that both agree with the references in janus/ops/ bit for bit.
//
// Both are strict total orders over (score, index) pairs: equal scores fall back
// to the smaller index, and NaN sorts like torch.sort sorts it (above every
// number), so a selection is unique and deterministic whatever the scores.
//
//   length_first(a, b): length a is a better candidate than length b
//                       (higher score first: torch.sort(descending=True, stable=True));
//   remask_first(a, b): position a is re-masked before position b
//                       (lower score first: torch.sort(stable=True)).
//
// Scores are compared in their own precision, after an exact widening of
// half/bfloat16 to float (see Acc below).

#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace janus {

// The type a score is compared in: float for float/half/bfloat16 (an exact,
// order-preserving widening), double for double.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

template <typename A>
C10_HOST_DEVICE inline bool is_nan(A x) {
  return x != x;
}

template <typename A>
C10_HOST_DEVICE inline bool length_first(A score_a, int64_t a, A score_b, int64_t b) {
  const bool nan_a = is_nan(score_a), nan_b = is_nan(score_b);
  if (nan_a || nan_b) return nan_a && (!nan_b || a < b);
  if (score_a != score_b) return score_a > score_b;
  return a < b;
}

template <typename A>
C10_HOST_DEVICE inline bool remask_first(A score_a, int64_t a, A score_b, int64_t b) {
  const bool nan_a = is_nan(score_a), nan_b = is_nan(score_b);
  if (nan_a || nan_b) return nan_b && (!nan_a || a < b);
  if (score_a != score_b) return score_a < score_b;
  return a < b;
}

// The length of candidate i >= `allowed` of a sentence whose allowed lengths
// [min_len, hi] (allowed = hi - min_len + 1 of them) are fewer than the beam:
// the reference fills the beam with the disallowed lengths in index order,
// clamped into [min_len, hi] (0..min_len-1 -> min_len, then hi+1..C-1 -> hi),
// and repeats the last one past C candidates.
C10_HOST_DEVICE inline int64_t length_beam_fill(int64_t i, int64_t allowed, int64_t min_len, int64_t hi,
                                                int64_t columns) {
  const int64_t j = i - allowed;
  const int64_t above = columns - 1 - hi;  // disallowed lengths past hi
  if (j < min_len) return min_len;
  if (j < min_len + above) return hi;
  return above > 0 ? hi : min_len;
}

// A special id (pad, bos, eos) is never re-masked.
C10_HOST_DEVICE inline bool remaskable(int64_t token, int64_t pad, int64_t bos, int64_t eos) {
  return token != pad && token != bos && token != eos;
}

}  // namespace janus
