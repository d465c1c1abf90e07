// janus::ar_topk on CPU: the next-token choice of an AR search step (greedy, beam, a speculative
// verification) from the fp32 logits (R, V) of its query rows. Per row, the k best allowed ids (by
// logit, ties: the smaller id) and their log-probabilities under the softmax of the WHOLE row:
//   allowed = every id but `banned`; rules[r] & 1: eos is not allowed either (too few tokens yet);
//   rules[r] & 2: eos alone is allowed (the length limit, or a repetition that must end). Ids that are
//   not allowed, and ids of logit -inf, score -inf; when fewer than k ids score above -inf the list goes
//   on with the smallest such ids, in id order.
// The reference (janus/ops/ar_topk.py) forms log_softmax, sets the ids that are not allowed to -inf and
// ranks all V; torch does that in five or six passes over the logits and a top-k that costs more than
// all of them for a few rows. Here each row is read three times while it is in cache:
//   1. its maximum and whether it holds a NaN or +inf (16 lanes);
//   2. the sum of exp(z - max) (lanes flushed into double, as best_token.cpp);
//   3. the selection: spans of 256 logits, then blocks of 16, compared with the k-th best logit so far (their
//      maximum, in four folds of the lanes), and only the blocks holding a larger one inserted one by one into
//      the sorted list of k.
// Score = (z[id] - max) - log(sum), best_token's rounding.
//
// Rows holding a NaN or +inf (or only -inf) have no finite log-softmax: every score of such a row is NaN
// and its ids are 0 .. k-1. Rows run in parallel (at::parallel_for), each by one thread in one order:
// results do not depend on the thread count.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu/lanes_math.h"
#include "cpu/vector_lanes.h"

#ifdef JANUS_VECTOR_LANES

namespace janus {
namespace {

using namespace lanes;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kNoEos = 1, kOnlyEos = 2;
// The selection tests 16 blocks of 16 logits at once (their lanes' maximum against the k-th best so far) before
// testing them one by one: past the first few hundred columns a row rarely holds a larger one.
constexpr int64_t kSpan = 16 * kLanes;

// The k best (key, id) so far, best first; keys compare first, then the smaller id wins. Ids arrive in
// increasing order, so a newcomer never beats an equal key already in the list.
struct Best {
  float* key;
  int64_t* id;
  int64_t k, n = 0;

  JANUS_INLINE float threshold() const { return n < k ? -kInf : key[k - 1]; }

  JANUS_INLINE void offer(float x, int64_t v) {
    if (n == k) {
      if (!(x > key[k - 1])) return;
      --n;  // the last one drops out
    }
    int64_t at = n;
    while (at > 0 && x > key[at - 1]) {
      key[at] = key[at - 1], id[at] = id[at - 1];
      --at;
    }
    key[at] = x, id[at] = v;
    ++n;
  }
};

JANUS_CLONES void topk_of_row(const float* z, int64_t V, int64_t k, const uint8_t* allowed, int64_t eos, int rule,
                              float* out_score, int64_t* out_id) {
  // 1. The maximum, and whether the row holds a NaN or +inf.
  vf vmax = splat<vf>(-kInf), vbad = {};
  float smax = -kInf;
  bool sbad = false;
  int64_t v = 0;
  for (; v + kLanes <= V; v += kLanes) {
    const vf x = load(vf{}, z + v);
    vmax = max_of(vmax, x);
    vbad += x - x;  // NaN once a NaN or an infinity went by
  }
  for (; v < V; ++v) {
    smax = max_of(smax, z[v]);
    sbad |= (z[v] != z[v]) || (z[v] == kInf);
  }
  float mx = max_of(smax, hmax(vmax));
  float bad = 0.0f;
  for (int i = 0; i < kLanes; ++i) bad += vbad[i];
  if (bad != bad) {  // an infinity or a NaN: only NaN and +inf leave the row without a log-softmax
    for (int64_t c = 0; c < V - V % kLanes; ++c) sbad |= (z[c] != z[c]) || (z[c] == kInf);
  }
  if (sbad || mx == -kInf) {
    for (int64_t j = 0; j < k; ++j) out_score[j] = std::numeric_limits<float>::quiet_NaN(), out_id[j] = j;
    return;
  }
  // 2. log(sum exp(z - max)) over the whole row.
  const float log_sum = static_cast<float>(std::log(sum_exp_below(z, V, mx)));

  // 3. The k best allowed ids; keys of ids that are not allowed are -inf (they fill the list when fewer
  //    than k ids are allowed, smallest first).
  Best best{out_score, out_id, k};
  auto key_of = [&](int64_t c) -> float {
    bool ok = allowed[c];
    if (c == eos) ok = ok && !(rule & kNoEos);
    else if (rule & kOnlyEos) ok = false;
    return ok ? z[c] : -kInf;
  };
  if (rule & kOnlyEos) {  // one candidate: no need to look at the logits
    for (int64_t c = 0; c < V && (best.n < k || c <= eos); ++c) best.offer(key_of(c), c);
  } else {
    const int64_t V16 = V - V % kLanes;
    v = 0;
    while (v < V16) {
      const float thr = best.threshold();
      if (thr > -kInf) {  // a full list: skip the spans, then the blocks, without a larger logit
        if (v % kSpan == 0 && v + kSpan <= V16) {
          vf m = load(vf{}, z + v);
          for (int64_t b = kLanes; b < kSpan; b += kLanes) m = max_of(m, load(vf{}, z + v + b));
          if (!any_above(m, thr)) {
            v += kSpan;
            continue;
          }
        }
        if (!any_above(load(vf{}, z + v), thr)) {
          v += kLanes;
          continue;
        }
      }
      for (int64_t c = v; c < v + kLanes; ++c) best.offer(key_of(c), c);
      v += kLanes;
    }
    for (; v < V; ++v) best.offer(key_of(v), v);
  }
  for (int64_t j = 0; j < k; ++j) {
    out_score[j] = out_score[j] == -kInf ? -kInf : (out_score[j] - mx) - log_sum;
  }
}

std::tuple<at::Tensor, at::Tensor> ar_topk_cpu(const at::Tensor& logits, int64_t k, at::IntArrayRef banned_ids,
                                               int64_t eos, const at::Tensor& rules) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "ar_topk: logits must be (rows, V), got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.scalar_type() == at::kFloat, "ar_topk: logits must be float32, got ",
                    logits.scalar_type());
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= V, "ar_topk: k=", k, " must be in [1, V=", V, "]");
  TORCH_CHECK_VALUE(eos >= 0 && eos < V, "ar_topk: eos id ", eos, " is outside the vocabulary [0, ", V, ")");
  TORCH_CHECK_VALUE(rules.dim() == 1 && rules.size(0) == R, "ar_topk: rules must be (", R, ",), got ",
                    rules.sizes());
  TORCH_CHECK_VALUE(rules.scalar_type() == at::kByte, "ar_topk: rules must be uint8, got ", rules.scalar_type());
  std::vector<uint8_t> allowed(V, 1);
  for (int64_t b : banned_ids) {
    TORCH_CHECK_VALUE(b >= 0 && b < V, "ar_topk: banned id ", b, " is outside the vocabulary [0, ", V, ")");
    allowed[b] = 0;
  }
  const at::Tensor z = logits.contiguous();
  const at::Tensor rl = rules.contiguous();
  at::Tensor scores = at::empty({R, k}, logits.options());
  at::Tensor ids = at::empty({R, k}, logits.options().dtype(at::kLong));
  const float* zp = z.data_ptr<float>();
  const uint8_t* rp = rl.data_ptr<uint8_t>();
  float* sp = scores.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      topk_of_row(zp + r * V, V, k, allowed.data(), eos, rp[r], sp + r * k, ip + r * k);
    }
  });
  return {scores, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(janus, CPU, m) { m.impl("ar_topk", &ar_topk_cpu); }

}  // namespace janus

#endif  // JANUS_VECTOR_LANES
