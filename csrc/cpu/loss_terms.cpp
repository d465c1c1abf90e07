// loss_terms on CPU: every term of the JANUS loss over one chunk of stacked logits
// [a (AR rows); b (P_NAR rows); c (P_AUX rows)] and d loss / d logits, in one pass per
// row group. Specification: loss_terms_ref in janus/ops/loss_terms.py (JANUS.md
// section 3): label-smoothed CE and NLL of every row, the three SKL terms of each
// masked row j with its AR row pairs[j] and with the other masked stream, and their
// closed-form gradients
//     d ls / d z            = p - (1 - eps) onehot(y) - eps / V
//     d SKL(x, y) / d z_x   = (p_x (l_x - l_y - KL(x || y)) + p_x - p_y) / 2.
//
// The reference streams a dozen (rows, V) fp32 tensors through memory; here a row
// group (one AR row and the masked rows paired with it, which are contiguous because
// pairs is sorted) is read from the logits a few times while it sits in the cache:
//   1. per row: max and sum of the logits, then sum of exp -> log-sum-exp, CE, NLL;
//   2. per masked row j: p_b, p_c into the group's buffers and the six KL sums;
//   3. (gradients) d z_b, d z_c written in the output dtype, d z_a accumulated in an
//      fp32 buffer and written once after the group's last j.
// Groups run in parallel (at::parallel_for); every sum is kept per row and reduced
// serially in double at the end, so the result does not depend on the thread count.
//
// Arithmetic: fp32, 16 lanes per step in GCC/Clang vector types (one AVX-512 register,
// two AVX2 or four SSE ones), the tail of a row in scalars with the same formulas; exp is
// a degree-7 polynomial after range reduction (relative error below 2e-7); bf16 in and
// out (round to nearest even). On x86-64 the kernels are compiled for AVX-512, AVX2 and
// the baseline, picked at load time (target_clones). Without GCC/Clang vector types the
// op is not compiled and the reference runs.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/lanes_math.h"
#include "cpu/vector_lanes.h"

#ifdef JANUS_VECTOR_LANES

namespace janus {
namespace {

using namespace lanes;

// -- the problem ---------------------------------------------------------------------------------
struct Problem {
  int64_t V, r, mb, mc, m;  // columns; rows of a, b, c; masked rows (max(mb, mc))
  const int64_t* targets;   // (r + mb + mc,), clamped into [0, V)
  const float* keep;        // (r + mb + mc,) 0/1
  const int64_t* pairs;     // (m,) sorted AR row of each masked row, or nullptr
  float eps;
  float s[7];  // LossScales: ar, nar, aux, skl_ar_nar, skl_ar_aux, skl_nar_aux, skl_grad_ar
  bool need_grad;
  // Results per row / per masked row, reduced serially afterwards.
  double* ls;   // (rows,) label-smoothed CE
  double* nll;  // (rows,)
  double* skl;  // (m, 3): SKL(a, b), SKL(a, c), SKL(b, c) of each masked row, times its keep
};

// A row's log-sum-exp as max + log(sum exp(z - max)), the two kept apart: log p = (z - max) - log_sum
// rounds like torch.log_softmax, where folding them into one float first would cost up to an ulp of
// the maximum in every log-probability.
struct Lse {
  float max, log_sum;
};

template <typename L, typename In>
JANUS_INLINE L log_prob(L tag, const In* z, const Lse& lse) {
  return (load(tag, z) - splat<L>(lse.max)) - splat<L>(lse.log_sum);
}

// 1. Log-sum-exp of a row, and its label-smoothed CE and NLL into the problem's per-row slots.
template <typename In>
JANUS_INLINE Lse row_stats(const Problem& P, const In* z, int64_t row) {
  const int64_t V = P.V;
  vf vmax = splat<vf>(-std::numeric_limits<float>::infinity()), vsum = {}, vbad = {};
  float smax = -std::numeric_limits<float>::infinity(), sbad = 0.0f;
  double ssum = 0.0;
  double sum_z = 0.0;
  sum_columns(
      V,
      [&](auto tag, int64_t v) JANUS_BODY {
        using L = decltype(tag);
        const L x = load(tag, z + v);
        if constexpr (sizeof(L) == sizeof(float)) {
          smax = max_of(smax, x), ssum += x, sbad += x - x;
        } else {
          vmax = max_of(vmax, x), vsum += x, vbad += x - x;
        }
      },
      [&]() JANUS_BODY {
        sum_z += hsum(vsum) + ssum;
        vsum = vf{}, ssum = 0.0;
      });
  const float mx = max_of(hmax(vmax), smax);
  const double sum_exp = sum_exp_below(z, V, mx);
  const float bad = static_cast<float>(hsum(vbad)) + sbad;  // 0, or NaN for a row with NaN or inf
  const Lse lse{mx, static_cast<float>(std::log(sum_exp)) + bad};
  const float nll = -log_prob(0.0f, z + P.targets[row], lse);
  const double mean_lp = (sum_z / static_cast<double>(V) - lse.max) - lse.log_sum;
  P.nll[row] = nll;
  P.ls[row] = (1.0 - P.eps) * nll - P.eps * mean_lp;
  return lse;
}

// p = exp(z - lse) into buf.
template <typename In>
JANUS_INLINE void probs(int64_t V, const In* z, const Lse& lse, float* buf) {
  for_columns(V, [&](auto tag, int64_t v) JANUS_BODY { store(buf + v, exp_neg(log_prob(tag, z + v, lse))); });
}

// Writes a row's fp32 gradient acc to out, converting to Out once, with the one-hot share of its
// target (target_shift) taken off in fp32 first.
template <typename Out>
JANUS_INLINE void write_row(int64_t V, const float* acc, Out* out, int64_t target, float target_shift) {
  for_columns(V, [&](auto tag, int64_t v) JANUS_BODY { store(out + v, load(tag, acc + v)); });
  store(out + target, acc[target] - target_shift);
}

// One group: AR row `a` (or -1) and the masked rows [lo, hi) paired with it.
struct Buffers {
  std::vector<float> pa, pb, pc, ga, gb, gc;
  explicit Buffers(int64_t V) : pa(V), pb(V), pc(V), ga(V), gb(V), gc(V) {}
};

template <typename In, typename Out>
JANUS_INLINE void run_group(const Problem& P, const In* logits, Out* grad, int64_t a, int64_t lo, int64_t hi,
                            Buffers& B) {
  const int64_t V = P.V, r = P.r, mb = P.mb, mc = P.mc;
  const bool has_a = a >= 0, has_b = mb > 0, has_c = mc > 0;
  const float eps_v = P.eps / static_cast<float>(V);
  float* pa = B.pa.data();
  float* pb = B.pb.data();
  float* pc = B.pc.data();
  float* ga = B.ga.data();
  const In* za = has_a ? logits + a * V : nullptr;
  Lse lse_a{};
  float rs_a = 0.0f;
  if (has_a) {
    lse_a = row_stats(P, za, a);
    rs_a = P.s[0] * P.keep[a];
    probs(V, za, lse_a, pa);
    if (P.need_grad) {
      for_columns(V, [&](auto tag, int64_t v) JANUS_BODY {
        using L = decltype(tag);
        store(ga + v, splat<L>(rs_a) * (load(tag, pa + v) - splat<L>(eps_v)));
      });
    }
  }
  for (int64_t j = lo; j < hi; ++j) {
    const int64_t rb = r + j, rc = r + mb + j;
    const In* zb = has_b ? logits + rb * V : nullptr;
    const In* zc = has_c ? logits + rc * V : nullptr;
    const Lse lse_b = has_b ? row_stats(P, zb, rb) : Lse{};
    const Lse lse_c = has_c ? row_stats(P, zc, rc) : Lse{};
    // 2. p_b, p_c and the six KL sums: KL(x || y) = sum p_x (l_x - l_y).
    vf v_ab = {}, v_ba = {}, v_ac = {}, v_ca = {}, v_bc = {}, v_cb = {};
    double s_ab = 0, s_ba = 0, s_ac = 0, s_ca = 0, s_bc = 0, s_cb = 0;
    double kl[6] = {0, 0, 0, 0, 0, 0};  // KL(a||b), KL(b||a), KL(a||c), KL(c||a), KL(b||c), KL(c||b)
    sum_columns(
        V,
        [&](auto tag, int64_t v) JANUS_BODY {
          using L = decltype(tag);
          L la = {}, lb = {}, lc = {}, qa = {}, qb = {}, qc = {};
          if (has_a) la = log_prob(tag, za + v, lse_a), qa = load(tag, pa + v);
          if (has_b) lb = log_prob(tag, zb + v, lse_b), qb = exp_neg(lb), store(pb + v, qb);
          if (has_c) lc = log_prob(tag, zc + v, lse_c), qc = exp_neg(lc), store(pc + v, qc);
          L ab = {}, ba = {}, ac = {}, ca = {}, bc = {}, cb = {};
          if (has_a && has_b) ab = qa * (la - lb), ba = qb * (lb - la);
          if (has_a && has_c) ac = qa * (la - lc), ca = qc * (lc - la);
          if (has_b && has_c) bc = qb * (lb - lc), cb = qc * (lc - lb);
          if constexpr (sizeof(L) == sizeof(float)) {
            s_ab += ab, s_ba += ba, s_ac += ac, s_ca += ca, s_bc += bc, s_cb += cb;
          } else {
            v_ab += ab, v_ba += ba, v_ac += ac, v_ca += ca, v_bc += bc, v_cb += cb;
          }
        },
        [&]() JANUS_BODY {
          vf* lanes[6] = {&v_ab, &v_ba, &v_ac, &v_ca, &v_bc, &v_cb};
          double* tails[6] = {&s_ab, &s_ba, &s_ac, &s_ca, &s_bc, &s_cb};
          for (int t = 0; t < 6; ++t) {
            kl[t] += hsum(*lanes[t]) + *tails[t];
            *lanes[t] = vf{}, *tails[t] = 0.0;
          }
        });
    const float kl_ab = static_cast<float>(kl[0]), kl_ba = static_cast<float>(kl[1]);
    const float kl_ac = static_cast<float>(kl[2]), kl_ca = static_cast<float>(kl[3]);
    const float kl_bc = static_cast<float>(kl[4]), kl_cb = static_cast<float>(kl[5]);
    const float mkeep = P.keep[has_b ? rb : rc];
    double* skl = P.skl + 3 * j;
    skl[0] = 0.5 * (kl[0] + kl[1]) * mkeep;
    skl[1] = 0.5 * (kl[2] + kl[3]) * mkeep;
    skl[2] = 0.5 * (kl[4] + kl[5]) * mkeep;
    if (!P.need_grad) continue;
    // 3. Gradients. w_xy = scale / 2 per masked row (0 for an ignored one); the AR side's share
    //    of an SKL gradient is further scaled by skl_grad_ar.
    const float w_ab = (has_a && has_b) ? 0.5f * P.s[3] * mkeep : 0.0f;
    const float w_ac = (has_a && has_c) ? 0.5f * P.s[4] * mkeep : 0.0f;
    const float w_bc = (has_b && has_c) ? 0.5f * P.s[5] * mkeep : 0.0f;
    const float rs_b = has_b ? P.s[1] * P.keep[rb] : 0.0f, rs_c = has_c ? P.s[2] * P.keep[rc] : 0.0f;
    const float ga_ab = w_ab * P.s[6], ga_ac = w_ac * P.s[6];
    float* gb = B.gb.data();
    float* gc = B.gc.data();
    for_columns(V, [&](auto tag, int64_t v) JANUS_BODY {
      using L = decltype(tag);
      L la = {}, lb = {}, lc = {}, qa = {}, qb = {}, qc = {};
      if (has_a) la = log_prob(tag, za + v, lse_a), qa = load(tag, pa + v);
      if (has_b) lb = log_prob(tag, zb + v, lse_b), qb = load(tag, pb + v);
      if (has_c) lc = log_prob(tag, zc + v, lse_c), qc = load(tag, pc + v);
      const L one = splat<L>(1.0f);
      if (has_b) {
        L g = splat<L>(rs_b) * (qb - splat<L>(eps_v));
        if (has_a) g += splat<L>(w_ab) * (qb * (lb - la - splat<L>(kl_ba) + one) - qa);
        if (has_c) g += splat<L>(w_bc) * (qb * (lb - lc - splat<L>(kl_bc) + one) - qc);
        store(gb + v, g);
      }
      if (has_c) {
        L g = splat<L>(rs_c) * (qc - splat<L>(eps_v));
        if (has_a) g += splat<L>(w_ac) * (qc * (lc - la - splat<L>(kl_ca) + one) - qa);
        if (has_b) g += splat<L>(w_bc) * (qc * (lc - lb - splat<L>(kl_cb) + one) - qb);
        store(gc + v, g);
      }
      if (has_a && (ga_ab != 0.0f || ga_ac != 0.0f)) {
        L g = load(tag, ga + v);
        if (has_b) g += splat<L>(ga_ab) * (qa * (la - lb - splat<L>(kl_ab) + one) - qb);
        if (has_c) g += splat<L>(ga_ac) * (qa * (la - lc - splat<L>(kl_ac) + one) - qc);
        store(ga + v, g);
      }
    });
    if (has_b) write_row(V, gb, grad + rb * V, P.targets[rb], (1.0f - P.eps) * rs_b);
    if (has_c) write_row(V, gc, grad + rc * V, P.targets[rc], (1.0f - P.eps) * rs_c);
  }
  if (has_a && P.need_grad) write_row(V, ga, grad + a * V, P.targets[a], (1.0f - P.eps) * rs_a);
}

// Groups [begin, end): AR rows with their masked ranges when pairs are given, else the AR rows
// alone, then each masked row alone.
template <typename In, typename Out>
JANUS_INLINE void run_groups(const Problem& P, const void* logits, void* grad, int64_t begin, int64_t end) {
  Buffers B(P.V);
  const In* z = static_cast<const In*>(logits);
  Out* g = static_cast<Out*>(grad);
  for (int64_t i = begin; i < end; ++i) {
    if (i < P.r) {
      int64_t lo = 0, hi = 0;
      if (P.pairs != nullptr) {
        lo = std::lower_bound(P.pairs, P.pairs + P.m, i) - P.pairs;
        hi = std::lower_bound(P.pairs + lo, P.pairs + P.m, i + 1) - P.pairs;
      }
      run_group(P, z, g, i, lo, hi, B);
    } else {
      const int64_t j = i - P.r;
      run_group(P, z, g, -1, j, j + 1, B);
    }
  }
}

JANUS_CLONES void groups_f32_f32(const Problem& P, const void* z, void* g, int64_t b, int64_t e) {
  run_groups<float, float>(P, z, g, b, e);
}
JANUS_CLONES void groups_bf16_bf16(const Problem& P, const void* z, void* g, int64_t b, int64_t e) {
  run_groups<bf16_raw, bf16_raw>(P, z, g, b, e);
}
JANUS_CLONES void groups_bf16_f32(const Problem& P, const void* z, void* g, int64_t b, int64_t e) {
  run_groups<bf16_raw, float>(P, z, g, b, e);
}
JANUS_CLONES void groups_f32_bf16(const Problem& P, const void* z, void* g, int64_t b, int64_t e) {
  run_groups<float, bf16_raw>(P, z, g, b, e);
}

bool is_supported(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16; }

std::tuple<at::Tensor, at::Tensor> loss_terms_cpu(const at::Tensor& logits, at::IntArrayRef counts,
                                                  const at::Tensor& targets, const at::Tensor& keep,
                                                  const std::optional<at::Tensor>& pairs, double eps,
                                                  at::ArrayRef<double> scales, bool need_grad,
                                                  at::ScalarType grad_dtype) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "janus::loss_terms: logits must be (rows, V), got shape ", logits.sizes());
  TORCH_CHECK(is_supported(logits.scalar_type()), "janus::loss_terms (CPU): logits must be float32 or bfloat16, got ",
              logits.scalar_type(), " (the reference, janus.ops.loss_terms.loss_terms_ref, takes float64)");
  TORCH_CHECK(is_supported(grad_dtype), "janus::loss_terms (CPU): grad_dtype must be float32 or bfloat16, got ",
              grad_dtype);
  TORCH_CHECK_VALUE(counts.size() == 3, "janus::loss_terms: counts must be (r, m_b, m_c), got ", counts);
  TORCH_CHECK_VALUE(scales.size() == 7, "janus::loss_terms: scales must hold the 7 LossScales fields, got ",
                    scales.size());
  const int64_t rows = logits.size(0), V = logits.size(1);
  const int64_t r = counts[0], mb = counts[1], mc = counts[2];
  TORCH_CHECK_VALUE(r >= 0 && mb >= 0 && mc >= 0 && r + mb + mc == rows,
                    "janus::loss_terms: counts ", counts, " must be >= 0 and add up to the ", rows, " logit rows");
  TORCH_CHECK_VALUE(mb == 0 || mc == 0 || mb == mc,
                    "janus::loss_terms: the two masked streams must have as many rows, got ", mb, " and ", mc);
  TORCH_CHECK_VALUE(V > 0, "janus::loss_terms: logits have no columns");
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == rows && targets.scalar_type() == at::kLong,
                    "janus::loss_terms: targets must be int64 (", rows, ",), got ", targets.scalar_type(), " ",
                    targets.sizes());
  TORCH_CHECK_VALUE(keep.dim() == 1 && keep.size(0) == rows && keep.scalar_type() == at::kFloat,
                    "janus::loss_terms (CPU): keep must be float32 (", rows, ",), got ", keep.scalar_type(), " ",
                    keep.sizes());
  const int64_t m = std::max(mb, mc);
  const bool paired = pairs.has_value() && r > 0 && m > 0;
  for (const at::Tensor* t : {&logits, &targets, &keep}) {
    TORCH_CHECK(t->device().is_cpu(), "janus::loss_terms (CPU): every tensor must be on the CPU");
  }
  const at::Tensor z = logits.contiguous(), y = targets.contiguous(), k = keep.contiguous();
  at::Tensor pr;
  if (paired) {
    pr = pairs->contiguous();
    TORCH_CHECK_VALUE(pr.dim() == 1 && pr.size(0) == m && pr.scalar_type() == at::kLong,
                      "janus::loss_terms: pairs must be int64 (", m, ",), got ", pr.scalar_type(), " ", pr.sizes());
    const int64_t* p = pr.const_data_ptr<int64_t>();
    for (int64_t j = 0; j < m; ++j) {
      TORCH_CHECK_INDEX(p[j] >= 0 && p[j] < r, "janus::loss_terms: pairs[", j, "] = ", p[j],
                        " is not an AR row of the chunk [0, ", r, ")");
      TORCH_CHECK_VALUE(j == 0 || p[j] >= p[j - 1], "janus::loss_terms (CPU): pairs must be sorted, but pairs[", j,
                        "] = ", p[j], " < pairs[", j - 1, "] = ", p[j - 1]);
    }
  }
  const int64_t* yt = y.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK_INDEX(yt[i] >= 0 && yt[i] < V, "janus::loss_terms: targets[", i, "] = ", yt[i],
                      " is outside [0, ", V, ") (clamp ignored rows to 0 and give them keep 0)");
  }

  std::vector<double> ls(rows), nll(rows), skl(3 * m, 0.0);
  Problem P{};
  P.V = V, P.r = r, P.mb = mb, P.mc = mc, P.m = m;
  P.targets = yt, P.keep = k.const_data_ptr<float>(), P.pairs = paired ? pr.const_data_ptr<int64_t>() : nullptr;
  P.eps = static_cast<float>(eps);
  for (int i = 0; i < 7; ++i) P.s[i] = static_cast<float>(scales[i]);
  P.need_grad = need_grad;
  P.ls = ls.data(), P.nll = nll.data(), P.skl = skl.data();

  at::Tensor grad = at::empty({need_grad ? rows : 0, V}, logits.options().dtype(grad_dtype));
  const bool in_bf16 = z.scalar_type() == at::kBFloat16, out_bf16 = grad_dtype == at::kBFloat16;
  auto* run = in_bf16 ? (out_bf16 ? groups_bf16_bf16 : groups_bf16_f32) : (out_bf16 ? groups_f32_bf16 : groups_f32_f32);
  const int64_t groups = r + (paired ? 0 : m);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / V);
  const void* zp = z.const_data_ptr();
  void* gp = need_grad ? grad.data_ptr() : nullptr;
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) { run(P, zp, gp, begin, end); });

  // Serial reduction in the TERMS order of janus/ops/janus_loss.py:
  // ar, nar, aux, skl_ar_nar, skl_ar_aux, skl_nar_aux, ar_nll, nar_nll, aux_nll.
  double acc[9] = {0};
  const float* kp = P.keep;
  const int64_t bounds[4] = {0, r, r + mb, r + mb + mc};
  for (int s = 0; s < 3; ++s) {
    for (int64_t i = bounds[s]; i < bounds[s + 1]; ++i) {
      acc[s] += ls[i] * kp[i];
      acc[6 + s] += nll[i] * kp[i];
    }
  }
  for (int64_t j = 0; j < m; ++j) {
    for (int t = 0; t < 3; ++t) acc[3 + t] += skl[3 * j + t];
  }
  at::Tensor sums = at::empty({9}, logits.options().dtype(at::kFloat));
  float* out = sums.data_ptr<float>();
  for (int t = 0; t < 9; ++t) out[t] = static_cast<float>(acc[t]);
  return {sums, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(janus, CPU, m) { m.impl("loss_terms", &loss_terms_cpu); }

}  // namespace janus

#endif  // JANUS_VECTOR_LANES
