// Small helpers shared by the janus ops (host code only).

#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace janus {

// Calls fn with a value of the C++ type that matches an int32 / int64 dtype
// (callers check the dtype first).
template <typename Fn>
decltype(auto) visit_int_dtype(at::ScalarType dtype, Fn&& fn) {
  if (dtype == at::kInt) {
    return fn(int32_t{});
  }
  return fn(int64_t{});
}

inline bool is_index_dtype(at::ScalarType dtype) { return dtype == at::kInt || dtype == at::kLong; }

inline bool is_score_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

// Reads one entry of an int32/int64 tensor's host memory (contiguous 1-D).
inline int64_t index_at(const at::Tensor& t, int64_t i) {
  return t.scalar_type() == at::kInt ? static_cast<int64_t>(t.const_data_ptr<int32_t>()[i])
                                     : t.const_data_ptr<int64_t>()[i];
}

// Shape and dtype checks shared by the CPU and CUDA kernels of one op (each checks devices itself).
inline void check_length_beam_args(const at::Tensor& length_scores, int64_t beam, int64_t min_len,
                                   const at::Tensor& max_len) {
  TORCH_CHECK_VALUE(length_scores.dim() == 2, "janus::length_beam_init: length_scores must be (B, C), got shape ",
                    length_scores.sizes());
  const int64_t sentences = length_scores.size(0), columns = length_scores.size(1);
  TORCH_CHECK_VALUE(beam >= 1, "janus::length_beam_init: beam=", beam, " must be >= 1");
  TORCH_CHECK_VALUE(min_len >= 2 && min_len <= columns - 1, "janus::length_beam_init: min_len=", min_len,
                    " must be in [2, ", columns - 1, "] (a canvas holds bos and eos; length_scores has ", columns,
                    " columns)");
  TORCH_CHECK(is_score_dtype(length_scores.scalar_type()),
              "janus::length_beam_init: length_scores must be float, double, half or bfloat16, got ",
              length_scores.scalar_type());
  TORCH_CHECK(is_index_dtype(max_len.scalar_type()), "janus::length_beam_init: max_len must be int32 or int64, got ",
              max_len.scalar_type());
  // A scalar (or one entry, broadcast) caps every sentence; otherwise one entry per sentence.
  TORCH_CHECK_VALUE(max_len.dim() <= 1 && (max_len.numel() == 1 || max_len.numel() == sentences),
                    "janus::length_beam_init: max_len must be a scalar or hold one entry per sentence (", sentences,
                    ",), got shape ", max_len.sizes());
}

inline void check_remask_args(const at::Tensor& tokens, const at::Tensor& scores, const at::Tensor& counts) {
  TORCH_CHECK_VALUE(tokens.dim() == 2 && tokens.sizes() == scores.sizes() && counts.dim() == 1 &&
                        counts.size(0) == tokens.size(0),
                    "janus::remask_lowest: tokens ", tokens.sizes(), " and scores ", scores.sizes(),
                    " must be (R, L) and counts ", counts.sizes(), " must be (R,)");
  TORCH_CHECK(is_index_dtype(tokens.scalar_type()), "janus::remask_lowest: tokens must be int32 or int64, got ",
              tokens.scalar_type());
  TORCH_CHECK(is_score_dtype(scores.scalar_type()),
              "janus::remask_lowest: scores must be float, double, half or bfloat16, got ", scores.scalar_type());
  TORCH_CHECK(is_index_dtype(counts.scalar_type()), "janus::remask_lowest: counts must be int32 or int64, got ",
              counts.scalar_type());
}

// A re-mask count must lie in [0, the number of tokens of its row other than pad/bos/eos].
inline void check_remask_count(int64_t row, int64_t want, int64_t available) {
  TORCH_CHECK_VALUE(want >= 0 && want <= available, "janus::remask_lowest: counts[", row, "]=", want,
                    " is outside [0, ", available, "], the number of non-special tokens of row ", row);
}

}  // namespace janus
