// pad_batch on CPU: gather ragged sentences from a flat id array into a padded
// int64 batch. Specification: pad_batch_ref in janus/ops/pad_batch.py.
//
//   out[b] = [bos?] + flat[offsets[index[b]] : offsets[index[b] + 1]] + [eos?] + [pad ...]
//
// Two passes: a serial pass over the B gathered rows validates every span and
// finds the widest (O(B), so errors are raised from the calling thread), then a
// parallel pass writes each row exactly once. No per-row allocation.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/MaybeOwned.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common.h"

namespace janus {
namespace {

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "janus::pad_batch: ", name, " must be a CPU tensor, got device ", t.device(),
              "; move it with .cpu() or use the reference backend (JANUS_BACKEND_PAD_BATCH=reference)");
  TORCH_CHECK(t.dim() == 1, "janus::pad_batch: ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(is_index_dtype(t.scalar_type()), "janus::pad_batch: ", name,
              " must be int32 or int64, got ", t.scalar_type());
}

template <typename F, typename O, typename I>
at::Tensor pad_batch_impl(const at::Tensor& flat, const at::Tensor& offsets, const at::Tensor& index, int64_t pad,
                          int64_t bos, int64_t eos) {
  const F* src = flat.const_data_ptr<F>();
  const O* off = offsets.const_data_ptr<O>();
  const I* idx = index.const_data_ptr<I>();
  const int64_t total = flat.numel();
  const int64_t sentences = offsets.numel() - 1;
  const int64_t rows = index.numel();
  const int64_t head = bos >= 0 ? 1 : 0;

  // 1. Validate the gathered spans and find the longest one.
  int64_t longest = 0;
  for (int64_t b = 0; b < rows; ++b) {
    const int64_t i = static_cast<int64_t>(idx[b]);
    TORCH_CHECK(i >= 0 && i < sentences, "janus::pad_batch: index[", b, "] = ", i, " is out of range: offsets has ",
                sentences + 1, " entries, so valid sentence indices are 0..", sentences - 1);
    const int64_t start = static_cast<int64_t>(off[i]);
    const int64_t end = static_cast<int64_t>(off[i + 1]);
    TORCH_CHECK(start <= end, "janus::pad_batch: offsets must be non-decreasing, but offsets[", i, "] = ", start,
                " > offsets[", i + 1, "] = ", end, " (sentence ", i, ", requested by index[", b, "])");
    TORCH_CHECK(start >= 0 && end <= total, "janus::pad_batch: sentence ", i, " spans flat[", start, ":", end,
                "], outside flat of length ", total, "; offsets must lie in [0, flat.numel()]");
    longest = std::max(longest, end - start);
  }
  const int64_t width = longest + head + (eos >= 0 ? 1 : 0);

  // 2. Write every row once: [bos] tokens [eos] pad...
  at::Tensor out = at::empty({rows, width}, flat.options().dtype(at::kLong));
  int64_t* dst = out.mutable_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(width, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t i = static_cast<int64_t>(idx[b]);
      const int64_t start = static_cast<int64_t>(off[i]);
      const int64_t n = static_cast<int64_t>(off[i + 1]) - start;
      int64_t* row = dst + b * width;
      int64_t col = 0;
      if (bos >= 0) row[col++] = bos;
      std::copy(src + start, src + start + n, row + col);
      col += n;
      if (eos >= 0) row[col++] = eos;
      std::fill(row + col, row + width, pad);
    }
  });
  return out;
}

at::Tensor pad_batch_cpu(const at::Tensor& flat, const at::Tensor& offsets, const at::Tensor& index, int64_t pad,
                         int64_t bos, int64_t eos) {
  check_input(flat, "flat");
  check_input(offsets, "offsets");
  check_input(index, "index");
  TORCH_CHECK(offsets.numel() >= 1, "janus::pad_batch: offsets must hold N + 1 >= 1 entries, got an empty tensor");
  // Strided views are accepted like in the reference; the copy happens only for them.
  const c10::MaybeOwned<at::Tensor> f = flat.expect_contiguous();
  const c10::MaybeOwned<at::Tensor> o = offsets.expect_contiguous();
  const c10::MaybeOwned<at::Tensor> x = index.expect_contiguous();
  return visit_int_dtype(f->scalar_type(), [&](auto f_tag) {
    return visit_int_dtype(o->scalar_type(), [&](auto o_tag) {
      return visit_int_dtype(x->scalar_type(), [&](auto x_tag) {
        using F = decltype(f_tag);
        using O = decltype(o_tag);
        using I = decltype(x_tag);
        return pad_batch_impl<F, O, I>(*f, *o, *x, pad, bos, eos);
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(janus, CPU, m) { m.impl("pad_batch", &pad_batch_cpu); }

}  // namespace janus
