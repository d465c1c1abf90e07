// remask_lowest on CUDA: per row, the counts[r] lowest-scoring tokens that are
// not pad, bos or eos become <mask> with score 0, in place. Specification:
// remask_lowest_ref in janus/ops/remask_lowest.py; the order is remask_first
// (decode_order.h): lower score first, ties to the smaller position, NaN last.
//
// One thread block per row, rows of at most kMaxLength tokens:
//   1. stage the row's scores (widened to acc_t) and re-maskable flags in shared
//      memory and count the re-maskable tokens (__syncthreads_count);
//   2. each thread ranks its re-maskable positions p: rank(p) = number of
//      re-maskable q with remask_first(q, p). The order is strict and total, so
//      the ranks are 0..n-1 exactly once and rank(p) < counts[r] selects the
//      same set as the reference's stable sort. O(L^2 / threads) comparisons per
//      row, all in shared memory: 4 per thread at L = 64, 16k at L = 4096;
//   3. write mask / 0 at the selected positions (reads come from shared memory,
//      so the in-place writes cannot race with them).
// Longer rows (L > kMaxLength) are refused with an error; the Python dispatch
// sends them to the CPU kernel or the reference instead.
//
// check = true runs a validation kernel first (one warp per row) that records
// the first row whose count is out of range; the remask kernel then writes
// nothing, and the host reads the flag (one device-to-host sync) to raise a
// ValueError naming the row. check = false clamps counts into range, never syncs.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/MaybeOwned.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common.h"
#include "decode_order.h"

namespace janus {
namespace {

constexpr int64_t kMaxLength = 4096;  // janus/ops/remask_lowest.py CUDA_MAX_LENGTH
constexpr int kWarp = 32;
constexpr int kCheckThreads = 256;

struct Strides {
  int64_t token_row, token_col, score_row, score_col;
};

// 1 (check). The smallest row index whose count is outside [0, re-maskable tokens], into *bad_row.
template <typename T, typename K>
__global__ void check_counts_kernel(const T* __restrict__ tokens, const K* __restrict__ counts, int64_t rows,
                                    int64_t length, int64_t token_row, int64_t token_col, int64_t pad, int64_t bos,
                                    int64_t eos, int64_t* __restrict__ bad_row) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t r = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp; r < rows; r += warps) {
    const T* row = tokens + r * token_row;
    int64_t n = 0;
    for (int64_t base = 0; base < length; base += kWarp) {
      const int64_t p = base + lane;
      const bool ok = p < length && remaskable(static_cast<int64_t>(row[p * token_col]), pad, bos, eos);
      n += __popc(__ballot_sync(0xffffffffu, ok));
    }
    const int64_t want = static_cast<int64_t>(counts[r]);
    if (lane == 0 && (want < 0 || want > n)) {
      atomicMin(reinterpret_cast<unsigned long long*>(bad_row), static_cast<unsigned long long>(r));
    }
  }
}

// 2. + 3. One block per row.
template <typename T, typename S, typename K>
__global__ void remask_kernel(T* __restrict__ tokens, S* __restrict__ scores, const K* __restrict__ counts,
                              int64_t length, Strides st, int64_t mask, int64_t pad, int64_t bos, int64_t eos,
                              const int64_t* __restrict__ bad_row, int64_t rows) {
  using A = acc_t<S>;
  if (bad_row != nullptr && *bad_row < rows) return;  // a count is out of range: write nothing anywhere
  extern __shared__ unsigned char shared[];
  A* key = reinterpret_cast<A*>(shared);
  bool* ok = reinterpret_cast<bool*>(key + length);

  const int64_t r = blockIdx.x;
  T* row = tokens + r * st.token_row;
  S* score = scores + r * st.score_row;

  // 1. Stage the row and count its re-maskable tokens.
  int64_t n = 0;
  for (int64_t base = 0; base < length; base += blockDim.x) {
    const int64_t p = base + threadIdx.x;
    bool eligible = false;
    if (p < length) {
      eligible = remaskable(static_cast<int64_t>(row[p * st.token_col]), pad, bos, eos);
      key[p] = static_cast<A>(score[p * st.score_col]);
      ok[p] = eligible;
    }
    n += __syncthreads_count(eligible);  // also the barrier after the staging
  }
  const int64_t want = static_cast<int64_t>(counts[r]);
  const int64_t k = want < 0 ? 0 : (want > n ? n : want);
  if (k == 0) return;

  // 2. + 3. Rank and write.
  for (int64_t p = threadIdx.x; p < length; p += blockDim.x) {
    if (!ok[p]) continue;
    bool selected = true;
    if (k < n) {
      const A kp = key[p];
      int64_t rank = 0;
      for (int64_t q = 0; q < length && rank < k; ++q) {
        rank += ok[q] && remask_first(key[q], q, kp, p);
      }
      selected = rank < k;
    }
    if (selected) {
      row[p * st.token_col] = static_cast<T>(mask);
      score[p * st.score_col] = static_cast<S>(0);
    }
  }
}

int threads_for(int64_t length) {
  const int64_t warps = (length + kWarp - 1) / kWarp;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(warps, 1) * kWarp, 1024));
}

void remask_lowest_cuda(at::Tensor& tokens, at::Tensor& scores, const at::Tensor& counts, int64_t mask, int64_t pad,
                        int64_t bos, int64_t eos, bool check) {
  check_remask_args(tokens, scores, counts);
  TORCH_CHECK(tokens.is_cuda() && scores.device() == tokens.device() && counts.device() == tokens.device(),
              "janus::remask_lowest: tokens, scores and counts must be on one CUDA device, got ", tokens.device(),
              ", ", scores.device(), " and ", counts.device());
  const int64_t rows = tokens.size(0), length = tokens.size(1);
  TORCH_CHECK_VALUE(length <= kMaxLength, "janus::remask_lowest: the CUDA kernel takes rows of at most ", kMaxLength,
                    " tokens, got ", length, "; use the CPU op or janus.ops.remask_lowest_ref for longer rows");
  TORCH_CHECK_VALUE(rows <= int64_t{0x7fffffff}, "janus::remask_lowest: at most 2^31 - 1 rows, got ", rows);
  if (rows == 0) return;  // (rows of length 0 still have their counts checked)

  const c10::cuda::CUDAGuard guard(tokens.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const c10::MaybeOwned<at::Tensor> k = counts.expect_contiguous();
  const Strides st{tokens.stride(0), tokens.stride(1), scores.stride(0), scores.stride(1)};
  at::Tensor bad_row;
  if (check) bad_row = at::full({1}, rows, counts.options().dtype(at::kLong));

  visit_int_dtype(tokens.scalar_type(), [&](auto token_tag) {
    using T = decltype(token_tag);
    visit_int_dtype(k->scalar_type(), [&](auto count_tag) {
      using K = decltype(count_tag);
      T* tok = tokens.mutable_data_ptr<T>();
      const K* cnt = k->const_data_ptr<K>();
      if (check) {
        const int64_t per_block = kCheckThreads / kWarp;
        const int blocks = static_cast<int>(std::min<int64_t>((rows + per_block - 1) / per_block, 65535));
        check_counts_kernel<T, K><<<blocks, kCheckThreads, 0, stream>>>(
            tok, cnt, rows, length, st.token_row, st.token_col, pad, bos, eos, bad_row.mutable_data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "remask_lowest_cuda", [&] {
        using A = acc_t<scalar_t>;
        const size_t smem = static_cast<size_t>(length) * (sizeof(A) + sizeof(bool));
        remask_kernel<T, scalar_t, K><<<static_cast<unsigned>(rows), threads_for(length), smem, stream>>>(
            tok, scores.mutable_data_ptr<scalar_t>(), cnt, length, st, mask, pad, bos, eos,
            check ? bad_row.const_data_ptr<int64_t>() : nullptr, rows);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });

  if (check) {
    const int64_t bad = bad_row.item<int64_t>();  // the one sync: errors must reach the caller
    if (bad < rows) {
      // The error path: recount the row on the host for the message.
      const at::Tensor row = tokens.select(0, bad).to(at::kCPU, at::kLong).contiguous();
      const int64_t* ids = row.const_data_ptr<int64_t>();
      int64_t n = 0;
      for (int64_t p = 0; p < length; ++p) n += remaskable(ids[p], pad, bos, eos);
      check_remask_count(bad, counts.select(0, bad).item<int64_t>(), n);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(janus, CUDA, m) { m.impl("remask_lowest", &remask_lowest_cuda); }

}  // namespace janus
