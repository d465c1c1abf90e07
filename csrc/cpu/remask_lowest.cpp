// remask_lowest on CPU: per row, the counts[r] lowest-scoring tokens that are
// not pad, bos or eos become <mask> with score 0, in place. Specification:
// remask_lowest_ref in janus/ops/remask_lowest.py; the order is remask_first
// (decode_order.h): lower score first, ties to the smaller position, NaN last.
//
// 1. (check) parallel over rows: count each row's re-maskable tokens;
// 2. (check) serial: the first row whose count is out of range raises, before
//    anything is written (so a bad call leaves both tensors as they were);
// 3. parallel over rows: gather the re-maskable positions in a buffer owned by
//    the thread's chunk (no per-row allocation), select the counts[r] first by
//    the order (nth_element: linear on average), write them. Without check, a
//    count is clamped into [0, re-maskable tokens of its row].
//
// tokens and scores may be any strided 2-D views: they are written through
// their strides, so the caller's tensors are updated wherever they live.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/MaybeOwned.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "decode_order.h"

namespace janus {
namespace {

// Rows per parallel chunk: about this many tokens. Waking a second thread costs tens of
// microseconds here, more than a decoding batch (192 x 64 tokens: ~35 us) takes on one.
constexpr int64_t kGrainElements = int64_t{1} << 15;

struct Canvas {
  int64_t rows, length;
  int64_t token_stride[2], score_stride[2];
  int64_t pad, bos, eos;
};

template <typename T>
void count_remaskable(const T* tokens, const Canvas& c, int64_t* available) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(c.length, 1));
  at::parallel_for(0, c.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = tokens + r * c.token_stride[0];
      int64_t n = 0;
      for (int64_t p = 0; p < c.length; ++p) {
        n += remaskable(static_cast<int64_t>(row[p * c.token_stride[1]]), c.pad, c.bos, c.eos);
      }
      available[r] = n;
    }
  });
}

template <typename T, typename S, typename K>
void remask_rows(T* tokens, S* scores, const K* counts, const Canvas& c, int64_t mask) {
  using A = acc_t<S>;
  struct Slot {
    A key;
    int64_t position;
  };
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(c.length, 1));
  at::parallel_for(0, c.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<Slot> slots(static_cast<size_t>(c.length));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t want = static_cast<int64_t>(counts[r]);
      if (want <= 0) continue;
      T* row = tokens + r * c.token_stride[0];
      S* score = scores + r * c.score_stride[0];
      // The keys are gathered next to their positions: the selection then reads one contiguous buffer.
      int64_t n = 0;
      for (int64_t p = 0; p < c.length; ++p) {
        if (remaskable(static_cast<int64_t>(row[p * c.token_stride[1]]), c.pad, c.bos, c.eos)) {
          slots[n++] = Slot{static_cast<A>(score[p * c.score_stride[1]]), p};
        }
      }
      const int64_t k = std::min(want, n);
      if (k < n) {
        std::nth_element(slots.begin(), slots.begin() + k, slots.begin() + n, [](const Slot& x, const Slot& y) {
          return remask_first(x.key, x.position, y.key, y.position);
        });
      }
      for (int64_t i = 0; i < k; ++i) {
        row[slots[i].position * c.token_stride[1]] = static_cast<T>(mask);
        score[slots[i].position * c.score_stride[1]] = S(0);
      }
    }
  });
}

void remask_lowest_cpu(at::Tensor& tokens, at::Tensor& scores, const at::Tensor& counts, int64_t mask, int64_t pad,
                       int64_t bos, int64_t eos, bool check) {
  check_remask_args(tokens, scores, counts);
  TORCH_CHECK(tokens.device().is_cpu() && scores.device().is_cpu() && counts.device().is_cpu(),
              "janus::remask_lowest: tokens, scores and counts must be CPU tensors here, got ", tokens.device(), ", ",
              scores.device(), " and ", counts.device());

  const Canvas c{tokens.size(0), tokens.size(1), {tokens.stride(0), tokens.stride(1)},
                 {scores.stride(0), scores.stride(1)}, pad, bos, eos};
  if (c.rows == 0) return;  // (rows of length 0 still have their counts checked)
  const c10::MaybeOwned<at::Tensor> k = counts.expect_contiguous();

  visit_int_dtype(tokens.scalar_type(), [&](auto token_tag) {
    using T = decltype(token_tag);
    visit_int_dtype(k->scalar_type(), [&](auto count_tag) {
      using K = decltype(count_tag);
      T* tok = tokens.mutable_data_ptr<T>();
      const K* cnt = k->const_data_ptr<K>();
      // 1. + 2. Every count is checked before any row is written.
      if (check) {
        std::vector<int64_t> available(static_cast<size_t>(c.rows));
        count_remaskable(tok, c, available.data());
        for (int64_t r = 0; r < c.rows; ++r) {
          check_remask_count(r, static_cast<int64_t>(cnt[r]), available[r]);
        }
      }
      // 3. Select and write.
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "remask_lowest_cpu", [&] {
        remask_rows(tok, scores.mutable_data_ptr<scalar_t>(), cnt, c, mask);
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(janus, CPU, m) { m.impl("remask_lowest", &remask_lowest_cpu); }

}  // namespace janus
