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

}  // namespace janus
