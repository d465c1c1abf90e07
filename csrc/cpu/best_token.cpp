// janus::best_token on CPU: for every row of fp32 logits (R, V), the id of its largest logit among the
// ids not banned (ties: the smaller id) and that id's log-probability under the softmax of the whole
// row, banned ids included. The reduction of one mask-predict pass (janus/ops/mask_predict_update.py,
// backend "cpp"): the reference forms log_softmax of the row, sets the banned ids to -inf and takes the
// max, four or five passes over the logits in torch ops; this reads each row twice while it is in cache:
//   1. the maximum and the first id holding it, 16 lanes at a time (each lane keeps its first maximum,
//      then the smallest id among the lanes holding the row's maximum);
//   2. the sum of exp(z - max) (lanes flushed into double every 256 columns, as loss_terms.cpp).
// When the maximum's id is banned (the model's favourite is <eos> or <pad>), one more scalar pass finds
// the best allowed id. Score = (z[id] - max) - log(sum): log_softmax's rounding.
//
// Rows holding a NaN or +inf (or only -inf) have no finite log-softmax: like the reference, whose every
// log-probability is then NaN, the score is NaN and the id the smallest allowed one. Rows run in parallel
// (at::parallel_for), each by one thread in one order: results do not depend on the thread count.

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

struct Row {
  float score;
  int64_t id;
};

JANUS_INLINE bool is_banned(int64_t id, const std::vector<int64_t>& banned) {
  return std::find(banned.begin(), banned.end(), id) != banned.end();
}

JANUS_INLINE int64_t first_allowed(int64_t V, const std::vector<int64_t>& banned) {
  int64_t id = 0;
  while (id < V && is_banned(id, banned)) ++id;
  return id;
}

JANUS_CLONES Row best_of_row(const float* z, int64_t V, const std::vector<int64_t>& banned) {
  // 1. Maximum, its first id, and whether the row holds a NaN or +inf.
  vf vmax = splat<vf>(-kInf), vbad = {};
  vi vidx = {};
  vi iota;
  for (int i = 0; i < kLanes; ++i) iota[i] = i;
  float smax = -kInf;
  int64_t sidx = -1;
  bool sbad = false;
  int64_t v = 0;
  for (; v + kLanes <= V; v += kLanes) {
    const vf x = load(vf{}, z + v);
    const vi gt = x > vmax;
    vmax = gt ? x : vmax;
    vidx = gt ? (iota + static_cast<int32_t>(v)) : vidx;
    vbad += x - x;  // NaN once a NaN or an infinity went by (a compare for NaN would not vectorise)
  }
  for (; v < V; ++v) {
    const float x = z[v];
    if (x > smax) smax = x, sidx = v;
    sbad |= (x != x) || (x == kInf);
  }
  float mx = smax;
  float bad = 0.0f;
  for (int i = 0; i < kLanes; ++i) mx = max_of(mx, vmax[i]), bad += vbad[i];
  if (bad != bad) {  // an infinity or a NaN: only NaN and +inf leave the row without a log-softmax
    for (int64_t c = 0; c < V - V % kLanes; ++c) sbad |= (z[c] != z[c]) || (z[c] == kInf);
  }
  if (sbad || mx == -kInf) return {std::numeric_limits<float>::quiet_NaN(), first_allowed(V, banned)};
  int64_t id = V;
  for (int i = 0; i < kLanes; ++i) {
    if (vmax[i] == mx) id = std::min<int64_t>(id, vidx[i]);  // lanes never written hold -inf < mx
  }
  if (smax == mx) id = std::min(id, sidx);

  // 2. log(sum exp(z - max)).
  const float log_sum = static_cast<float>(std::log(sum_exp_below(z, V, mx)));

  // 3. The best allowed id, when the maximum's is banned.
  if (is_banned(id, banned)) {
    float best = -kInf;
    id = first_allowed(V, banned);
    for (int64_t c = 0; c < V; ++c) {
      if (z[c] > best && !is_banned(c, banned)) best = z[c], id = c;
    }
    if (id >= V) return {std::numeric_limits<float>::quiet_NaN(), 0};  // every id banned (refused below)
  }
  return {(z[id] - mx) - log_sum, id};
}

std::tuple<at::Tensor, at::Tensor> best_token_cpu(const at::Tensor& logits, at::IntArrayRef banned_ids) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "best_token: logits must be (rows, V), got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.scalar_type() == at::kFloat, "best_token: logits must be float32, got ",
                    logits.scalar_type());
  const int64_t R = logits.size(0), V = logits.size(1);
  std::vector<int64_t> banned(banned_ids.begin(), banned_ids.end());
  for (int64_t b : banned) {
    TORCH_CHECK_VALUE(b >= 0 && b < V, "best_token: banned id ", b, " is outside the vocabulary [0, ", V, ")");
  }
  std::sort(banned.begin(), banned.end());
  banned.erase(std::unique(banned.begin(), banned.end()), banned.end());
  TORCH_CHECK_VALUE(R == 0 || static_cast<int64_t>(banned.size()) < V, "best_token: every one of the ", V,
                    " ids is banned");
  const at::Tensor z = logits.contiguous();
  at::Tensor scores = at::empty({R}, logits.options());
  at::Tensor ids = at::empty({R}, logits.options().dtype(at::kLong));
  const float* zp = z.data_ptr<float>();
  float* sp = scores.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const Row row = best_of_row(zp + r * V, V, banned);
      sp[r] = row.score;
      ip[r] = row.id;
    }
  });
  return {scores, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(janus, CPU, m) { m.impl("best_token", &best_token_cpu); }

}  // namespace janus

#endif  // JANUS_VECTOR_LANES
