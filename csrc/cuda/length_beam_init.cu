// length_beam_init on CUDA: the `beam` best target lengths of each sentence and
// their all-<mask> canvases. Specification: length_beam_init_ref in
// janus/ops/length_beam_init.py; the order is length_first (decode_order.h).
//
// 1. one thread block per sentence, C <= kMaxColumns length classes: stage the
//    row's scores (widened to acc_t) in shared memory; each thread ranks its
//    allowed lengths n in [min_len, hi]: rank(n) = number of allowed m with
//    length_first(m, n). The order is strict and total, so the ranks are
//    0..allowed-1 exactly once and length n goes to candidate rank(n) when
//    rank(n) < beam; candidates past the allowed range take the reference's
//    clamped fill (length_beam_fill). O(C^2 / threads) comparisons per sentence;
// 2. the canvas width is the longest chosen length: a max and one
//    device-to-host copy (the output's shape depends on the scores);
// 3. one grid-stride kernel writes the canvases [bos, mask.., eos, pad..].
// More than kMaxColumns length classes are refused with an error; the Python
// dispatch sends them to the CPU kernel or the reference instead.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/max.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/MaybeOwned.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "common.h"
#include "decode_order.h"

namespace janus {
namespace {

constexpr int64_t kMaxColumns = 4096;  // janus/ops/length_beam_init.py CUDA_MAX_COLUMNS
constexpr int kWarp = 32;
constexpr int kCanvasThreads = 256;

// max_len: a per-sentence device array (per_sentence), one device entry, or none (host value cap).
template <typename S, typename M>
__global__ void choose_lengths_kernel(const S* __restrict__ scores, int64_t columns, int64_t beam, int64_t min_len,
                                      const M* __restrict__ max_len, bool per_sentence, int64_t cap,
                                      int64_t* __restrict__ lengths) {
  using A = acc_t<S>;
  extern __shared__ unsigned char shared[];
  A* key = reinterpret_cast<A*>(shared);
  const int64_t b = blockIdx.x;
  const S* row = scores + b * columns;
  for (int64_t n = threadIdx.x; n < columns; n += blockDim.x) key[n] = static_cast<A>(row[n]);
  __syncthreads();

  if (max_len != nullptr) cap = static_cast<int64_t>(max_len[per_sentence ? b : 0]);
  const int64_t hi = min(max(cap, min_len), columns - 1);
  const int64_t allowed = hi - min_len + 1;
  int64_t* out = lengths + b * beam;
  for (int64_t n = min_len + threadIdx.x; n <= hi; n += blockDim.x) {
    const A kn = key[n];
    int64_t rank = 0;
    for (int64_t m = min_len; m <= hi && rank < beam; ++m) rank += length_first(key[m], m, kn, n);
    if (rank < beam) out[rank] = n;
  }
  for (int64_t i = allowed + threadIdx.x; i < beam; i += blockDim.x) {
    out[i] = length_beam_fill(i, allowed, min_len, hi, columns);
  }
}

__global__ void canvas_kernel(const int64_t* __restrict__ lengths, int64_t rows, int64_t width, int64_t bos,
                              int64_t eos, int64_t mask, int64_t pad, int64_t* __restrict__ tokens) {
  const int64_t total = rows * width;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t col = i % width;
    const int64_t n = lengths[i / width];
    tokens[i] = col == 0 ? bos : col < n - 1 ? mask : col == n - 1 ? eos : pad;
  }
}

std::tuple<at::Tensor, at::Tensor> length_beam_init_cuda(const at::Tensor& length_scores, int64_t beam,
                                                         int64_t min_len, const at::Tensor& max_len, int64_t bos,
                                                         int64_t eos, int64_t mask, int64_t pad) {
  check_length_beam_args(length_scores, beam, min_len, max_len);
  const int64_t sentences = length_scores.size(0);
  const int64_t columns = length_scores.size(1);
  TORCH_CHECK(length_scores.is_cuda(), "janus::length_beam_init: length_scores must be a CUDA tensor here, got ",
              length_scores.device());
  // A one-entry max_len may stay on the host (read there); per-sentence caps live on the scores' device.
  TORCH_CHECK(max_len.device() == length_scores.device() || (max_len.is_cpu() && max_len.numel() == 1),
              "janus::length_beam_init: max_len must be on ", length_scores.device(),
              " (or be a one-entry CPU tensor), got ", max_len.device());
  TORCH_CHECK_VALUE(columns <= kMaxColumns, "janus::length_beam_init: the CUDA kernel takes at most ", kMaxColumns,
                    " length classes, got ", columns, "; use the CPU op or janus.ops.length_beam_init_ref");
  TORCH_CHECK_VALUE(sentences <= int64_t{0x7fffffff}, "janus::length_beam_init: at most 2^31 - 1 sentences, got ",
                    sentences);

  const c10::cuda::CUDAGuard guard(length_scores.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = sentences * beam;
  at::Tensor lengths = at::empty({rows}, length_scores.options().dtype(at::kLong));
  if (rows == 0) return {at::empty({0, 2}, lengths.options()), lengths};

  // 1. The chosen lengths.
  const c10::MaybeOwned<at::Tensor> scores = length_scores.expect_contiguous();
  const bool on_host = max_len.is_cpu();
  const int64_t host_cap = on_host ? index_at(*max_len.expect_contiguous(), 0) : 0;
  const c10::MaybeOwned<at::Tensor> caps = max_len.expect_contiguous();
  const int threads =
      static_cast<int>(std::min<int64_t>(std::max<int64_t>((columns + kWarp - 1) / kWarp, 1) * kWarp, 1024));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores->scalar_type(), "length_beam_init_cuda", [&] {
    const size_t smem = static_cast<size_t>(columns) * sizeof(acc_t<scalar_t>);
    visit_int_dtype(caps->scalar_type(), [&](auto cap_tag) {
      using M = decltype(cap_tag);
      choose_lengths_kernel<scalar_t, M><<<static_cast<unsigned>(sentences), threads, smem, stream>>>(
          scores->const_data_ptr<scalar_t>(), columns, beam, min_len, on_host ? nullptr : caps->const_data_ptr<M>(),
          max_len.numel() != 1, host_cap, lengths.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });

  // 2. The width: the output's shape depends on the data, so this is one sync.
  const int64_t width = at::max(lengths).item<int64_t>();

  // 3. The canvases.
  at::Tensor tokens = at::empty({rows, width}, lengths.options());
  const int64_t blocks = std::min<int64_t>((rows * width + kCanvasThreads - 1) / kCanvasThreads, 65535);
  canvas_kernel<<<static_cast<unsigned>(blocks), kCanvasThreads, 0, stream>>>(
      lengths.const_data_ptr<int64_t>(), rows, width, bos, eos, mask, pad, tokens.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {tokens, lengths};
}

}  // namespace

TORCH_LIBRARY_IMPL(janus, CUDA, m) { m.impl("length_beam_init", &length_beam_init_cuda); }

}  // namespace janus
