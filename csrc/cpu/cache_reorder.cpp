// cache_reorder on CPU: a beam step's reordering of its key/value cache, in place. Specification:
// cache_reorder_ref in janus/ops/cache_reorder.py.
//
//   cache[a, n, b, :length, :] = old cache[a, order[n], b, :length, :]   for every n with order[n] != n
//
// A beam step keeps about half its hypotheses where they were; the others take a copy of another's cache.
// Only those rows and only the columns in use move: their sources are copied aside first (a source may be
// overwritten by an earlier move), then written, one memcpy of `length` columns per (a, b), no allocation
// beyond that scratch. torch's index_select / index_copy_ on the narrowed view do the same work in ~30 us of
// a ~0.7 ms beam-5 step of the small preset (one thread); this takes a few.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace janus {
namespace {

void cache_reorder_cpu(at::Tensor& cache, at::IntArrayRef order, int64_t length) {
  // 1. Arguments.
  TORCH_CHECK_VALUE(cache.dim() == 5 && cache.device().is_cpu(),
                    "janus::cache_reorder: cache must be a 5-dim (A, N, B, C, E) CPU tensor, got ", cache.sizes(),
                    " on ", cache.device());
  const int64_t A = cache.size(0), N = cache.size(1), B = cache.size(2), C = cache.size(3), E = cache.size(4);
  TORCH_CHECK_VALUE(cache.stride(4) == 1 && (C <= 1 || cache.stride(3) == E),
                    "janus::cache_reorder: each (a, n, b) slab of columns must be contiguous (strides ",
                    cache.strides(), ")");
  TORCH_CHECK_VALUE(static_cast<int64_t>(order.size()) == N, "janus::cache_reorder: order has ", order.size(),
                    " entries for the cache's ", N, " rows");
  TORCH_CHECK_VALUE(0 <= length && length <= C, "janus::cache_reorder: length=", length, " is outside [0, ", C, "]");
  std::vector<int64_t> moved;
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK_VALUE(0 <= order[n] && order[n] < N, "janus::cache_reorder: order[", n, "]=", order[n],
                      " is not a row of the cache's ", N);
    if (order[n] != n) moved.push_back(n);
  }
  if (moved.empty() || length == 0 || A == 0 || B == 0 || E == 0) return;
  // 2. The moved rows' sources aside, then into place.
  const int64_t bytes = length * E * cache.element_size();
  const int64_t es = cache.element_size();
  char* base = static_cast<char*>(cache.data_ptr());
  auto slab = [&](int64_t a, int64_t n, int64_t b) {
    return base + (a * cache.stride(0) + n * cache.stride(1) + b * cache.stride(2)) * es;
  };
  std::vector<char> scratch(static_cast<size_t>(moved.size() * A * B * bytes));
  char* s = scratch.data();
  for (int64_t n : moved) {
    for (int64_t a = 0; a < A; ++a) {
      for (int64_t b = 0; b < B; ++b, s += bytes) std::memcpy(s, slab(a, order[n], b), bytes);
    }
  }
  s = scratch.data();
  for (int64_t n : moved) {
    for (int64_t a = 0; a < A; ++a) {
      for (int64_t b = 0; b < B; ++b, s += bytes) std::memcpy(slab(a, n, b), s, bytes);
    }
  }
}

}  // namespace
}  // namespace janus

TORCH_LIBRARY_IMPL(janus, CPU, m) { m.impl("cache_reorder", &janus::cache_reorder_cpu); }
