// length_beam_init on CPU: the `beam` best target lengths of each sentence and
// their all-<mask> canvases. Specification: length_beam_init_ref in
// janus/ops/length_beam_init.py; the order is length_first (decode_order.h).
//
//   lengths[b*beam + i] = the i-th best n in [min_len, hi_b] by length_scores[b, n]
//   tokens[b*beam + i]  = [bos, mask x (n - 2), eos, pad ...]     (width: the longest n)
//   hi_b = clamp(max_len[b], min_len, C - 1)
//
// 1. parallel over sentences: a partial sort of the allowed lengths in a buffer
//    owned by the thread's chunk (one allocation per chunk, none per sentence);
//    candidates past the allowed range are the reference's clamped fill;
// 2. the width is the longest chosen length (a serial O(B*beam) max);
// 3. parallel over candidates: each canvas row is written once.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/MaybeOwned.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "common.h"
#include "decode_order.h"

namespace janus {
namespace {

// Sentences per parallel chunk: about this many length classes (see cpu/remask_lowest.cpp).
constexpr int64_t kGrainElements = int64_t{1} << 15;

template <typename S, typename M>
void choose_lengths(const S* scores, int64_t sentences, int64_t columns, int64_t beam, int64_t min_len,
                    const M* max_len, bool per_sentence, int64_t* lengths) {
  using A = acc_t<S>;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(columns, 1));
  at::parallel_for(0, sentences, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order(static_cast<size_t>(columns));
    for (int64_t b = begin; b < end; ++b) {
      const S* row = scores + b * columns;
      const int64_t cap = static_cast<int64_t>(max_len[per_sentence ? b : 0]);
      const int64_t hi = std::min(std::max(cap, min_len), columns - 1);
      const int64_t allowed = hi - min_len + 1;
      const int64_t top = std::min(beam, allowed);
      for (int64_t i = 0; i < allowed; ++i) order[i] = min_len + i;
      std::partial_sort(order.begin(), order.begin() + top, order.begin() + allowed, [row](int64_t x, int64_t y) {
        return length_first(static_cast<A>(row[x]), x, static_cast<A>(row[y]), y);
      });
      int64_t* out = lengths + b * beam;
      std::copy(order.begin(), order.begin() + top, out);
      for (int64_t i = top; i < beam; ++i) out[i] = length_beam_fill(i, allowed, min_len, hi, columns);
    }
  });
}

void write_canvases(const int64_t* lengths, int64_t rows, int64_t width, int64_t bos, int64_t eos, int64_t mask,
                    int64_t pad, int64_t* tokens) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(width, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t* row = tokens + r * width;
      const int64_t n = lengths[r];
      row[0] = bos;
      std::fill(row + 1, row + n - 1, mask);
      row[n - 1] = eos;
      std::fill(row + n, row + width, pad);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> length_beam_init_cpu(const at::Tensor& length_scores, int64_t beam,
                                                        int64_t min_len, const at::Tensor& max_len, int64_t bos,
                                                        int64_t eos, int64_t mask, int64_t pad) {
  check_length_beam_args(length_scores, beam, min_len, max_len);
  TORCH_CHECK(length_scores.device().is_cpu() && max_len.device().is_cpu(),
              "janus::length_beam_init: length_scores and max_len must be CPU tensors here, got ",
              length_scores.device(), " and ", max_len.device());
  const int64_t sentences = length_scores.size(0);
  const int64_t columns = length_scores.size(1);

  const int64_t rows = sentences * beam;
  at::Tensor lengths = at::empty({rows}, length_scores.options().dtype(at::kLong));
  const c10::MaybeOwned<at::Tensor> scores = length_scores.expect_contiguous();
  const c10::MaybeOwned<at::Tensor> caps = max_len.expect_contiguous();
  const bool per_sentence = max_len.numel() != 1;
  int64_t* len = lengths.mutable_data_ptr<int64_t>();

  // 1. The chosen lengths.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores->scalar_type(), "length_beam_init_cpu", [&] {
    visit_int_dtype(caps->scalar_type(), [&](auto cap_tag) {
      using M = decltype(cap_tag);
      choose_lengths(scores->const_data_ptr<scalar_t>(), sentences, columns, beam, min_len,
                     caps->const_data_ptr<M>(), per_sentence, len);
    });
  });

  // 2. + 3. Canvases as wide as the longest candidate (2 when there is none, like the reference).
  const int64_t width = rows > 0 ? *std::max_element(len, len + rows) : 2;
  at::Tensor tokens = at::empty({rows, width}, lengths.options());
  write_canvases(len, rows, width, bos, eos, mask, pad, tokens.mutable_data_ptr<int64_t>());
  return {tokens, lengths};
}

}  // namespace

TORCH_LIBRARY_IMPL(janus, CPU, m) { m.impl("length_beam_init", &length_beam_init_cpu); }

}  // namespace janus
