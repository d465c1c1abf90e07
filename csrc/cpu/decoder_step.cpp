// janus::decoder_step on CPU: every decoder layer of one incremental inference pass over a few rows, in one
// call (float32, or bfloat16 weights and caches with float32 activations between the products).
//
// A step of a small model is overhead, not arithmetic: the `small` preset's decoder step (3 layers of width
// 128, two rows) is about 0.7 MFLOP, yet torch runs it as ~60 operator calls of 5-15 us each from Python
// (0.9 ms on one thread of this CPU, about 90% of it dispatch, allocation and the framework around each
// kernel). Here the same layers run as plain loops over preallocated buffers: the products through the
// skinny_linear tiles (each weight row read once for all rows), attention over the cached keys/values by
// runs of rows that see the same columns (each run's keys transposed once and read for all its rows: a canvas'
// rows, an AR step's two rows, every row of a sentence's beams in cross-attention) and heads, the post-norm
// residuals in place.
//
// Per layer (JANUS.md section 2's decoder in its inference form; rows (N, R, D), the first C of each
// hypothesis being content rows):
//   1. q, k, v = x Wqkv^T + bqkv for every row; the content rows' keys/values are written into the layer's
//      self-attention cache at columns[n, j];
//   2. row r of hypothesis n attends to cache columns [spans[n, r, 0], spans[n, r, 1]) (every row of an AR
//      pass sees a prefix of the columns, a canvas row its canvas' columns: JANUS.md sections 2 and 4),
//      x = LN1(x + (attention) Wo^T + bo);
//   3. cross-attention over the source positions s of sentence n / g with keep[n / g, s] (g = N / B rows per
//      sentence: beams), x = LN2(x + ...);
//   4. x = LN3(x + relu(x W1^T + b1) W2^T + b2).
// Without cross-attention keys/values (empty lists) the layers are the encoder's: steps 1, 2 and 4 (every row a
// content row; each sentence's rows see its real source positions), 12 weights per layer.
// Softmax in fp32 with the maximum subtracted; layer norm with the biased variance, as torch's. Sums run in
// another order than torch's kernels: results agree to fp32 rounding, not bit for bit. Each output is
// computed by one thread in one order, so results depend on neither the thread count nor the other rows.
//
// `outputs` (optional, bool (N, R)): the rows whose final states the caller reads. In the last layer the other rows
// only write their keys/values (step 1): attention, norms, cross-attention and feed-forward run on the rows read,
// which come out the same bits as without `outputs`; the others come out zero. A mask-predict pass reads its masked
// rows, an AR pass its query rows: a greedy step's content row, half of a verification's rows, and on average
// 45% of a T=10 canvas' rows skip 12 of the last layer's 14 D^2 multiply-adds a row (F = 4D, the small preset's).
//
// Weights: 18 tensors per layer, in this order: Wqkv (3D, D), bqkv (3D), Wo (D, D), bo, LN1 weight, LN1 bias,
// cross Wq (D, D), cross bq, cross Wo (D, D), cross bo, LN2 weight, LN2 bias, W1 (F, D), b1 (F), W2 (D, F),
// b2 (D), LN3 weight, LN3 bias; all contiguous, of x's dtype (as the caches and the cross keys/values). The
// encoder's 12: the first 6, then W1, b1, W2, b2, LN2 weight, LN2 bias.
//
// bfloat16: the weights, caches and cross keys/values are read as bf16; a product multiplies the rows rounded to
// bf16 (as torch's bf16 layers do) by the bf16 weights, exact products summed in fp32, on the CPU's bf16
// dot-product instruction where it has one (skinny_gemm.h: twice the fp32 multiply-adds, the same sums bit for
// bit as the other CPUs' widened FMAs); the rows between products, attention and norms stay in fp32 (rounded to
// bf16 where a key/value is written to the cache and at the output). So a bf16 pass reads half the bytes of a
// float32 one, multiplies up to twice as fast, and is closer to the fp32 result than torch's bf16 layers, which
// round every intermediate.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/vector_lanes.h"

#ifdef JANUS_VECTOR_LANES

#include "cpu/lanes_math.h"
#include "cpu/skinny_gemm.h"

namespace janus {
namespace {

// A layer's weights: how many, and where its feed-forward's start (W1, b1, W2, b2, its norm's weight and bias).
struct LayerLayout {
  int64_t per, ffn;
};
// The decoder's layers (cross-attention lists given) or the encoder's (none).
constexpr LayerLayout layout(bool cross) { return cross ? LayerLayout{18, 12} : LayerLayout{12, 6}; }

// A (B, H, S, dk) keys or values tensor of element type T with unit stride in dk (the cross-attention's are
// transposed views).
template <typename T>
struct Heads {
  const T* data;
  int64_t sb, sh, ss;
  const T* at(int64_t b, int64_t h, int64_t s) const { return data + b * sb + h * sh + s * ss; }
};

template <typename T>
Heads<T> heads_of(const at::Tensor& t) {
  return {static_cast<const T*>(t.const_data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

// One attention problem: rows, each of H heads of width dk, its query at q + row * ldq + h * dk, its output at
// out + row * D + h * dk; which keys/values (k, v) and columns a row sees, its RowRun says.
template <typename T>
struct Attention {
  int64_t H, dk, D, ldq;
  const float* q;
  Heads<T> k, v;
  float* out;
};

template <typename T>
JANUS_INLINE float at1(const T* p) {
  return lanes::load(0.0f, p);
}

// Rows [r0, r1) of the N * R rows that see the same columns [first, width) of the same keys/values: those of
// hypothesis `src` (self-attention: consecutive rows of one hypothesis with one span, as a canvas' rows or an AR
// step's content and query rows) or of sentence `src` (cross-attention: every row of its g hypotheses), where
// keep[s] (null: every column).
struct RowRun {
  int64_t r0, r1, src, first, width;
  const bool* keep;
};

// At most this many rows per run (a task of the parallel loop, with one head).
constexpr int64_t kRunRows = 32;
// Rows whose scores one register block computes.
constexpr int kBlock = 8;

std::vector<RowRun> self_runs(int64_t N, int64_t R, const int64_t* spans) {
  std::vector<RowRun> runs;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t r = 0; r < R;) {
      const int64_t* s = spans + 2 * (n * R + r);
      int64_t e = r + 1;
      while (e < R && e - r < kRunRows && spans[2 * (n * R + e)] == s[0] && spans[2 * (n * R + e) + 1] == s[1]) ++e;
      runs.push_back({n * R + r, n * R + e, n, s[0], s[1], nullptr});
      r = e;
    }
  }
  return runs;
}

// The cross-attention runs of hypotheses [n0, n1) (R rows each, g per sentence), rows counted from n0's first: each
// sentence's rows among them, kRunRows at a time.
std::vector<RowRun> cross_runs(int64_t n0, int64_t n1, int64_t g, int64_t R, int64_t S, const bool* keep) {
  std::vector<RowRun> runs;
  for (int64_t b = n0 / g; b * g < n1; ++b) {
    const int64_t r0 = (std::max(n0, b * g) - n0) * R, r1 = (std::min(n1, (b + 1) * g) - n0) * R;
    for (int64_t r = r0; r < r1; r += kRunRows) runs.push_back({r, std::min(r + kRunRows, r1), b, 0, S, keep + b * S});
  }
  return runs;
}

// The scaled scores of G rows against the keys of a run, held transposed: kt (dk, Wp), column j of the run at
// kt[d * Wp + j], zero past its width. Each score is one chain of multiply-adds over d in order, 16 columns at a
// time: a row's scores depend on neither the other rows of its block nor the block size.
template <int G>
JANUS_INLINE void block_scores(const float* const* q, int64_t dk, const float* kt, int64_t Wp, float scale, float* p) {
  for (int64_t j0 = 0; j0 < Wp; j0 += lanes::kLanes) {
    lanes::vf acc[G];
    for (int g = 0; g < G; ++g) acc[g] = lanes::vf{};
    for (int64_t d = 0; d < dk; ++d) {
      const lanes::vf k = lanes::load(lanes::vf{}, kt + d * Wp + j0);
      for (int g = 0; g < G; ++g) acc[g] += q[g][d] * k;
    }
    for (int g = 0; g < G; ++g) lanes::store(p + g * Wp + j0, acc[g] * scale);
  }
}

// o[0 .. dk) += w * v[0 .. dk).
template <typename T>
JANUS_INLINE void axpy(float* o, float w, const T* v, int64_t dk) {
  int64_t d = 0;
  for (; d + lanes::kLanes <= dk; d += lanes::kLanes) {
    const lanes::vf r = lanes::load(lanes::vf{}, o + d) + w * lanes::load(lanes::vf{}, v + d);
    lanes::store(o + d, r);
  }
  for (; d < dk; ++d) o[d] += w * at1(v + d);
}

// The weighted values of rows [r, r + G) (o = sum over the run's columns j in order of p[j] / total * v[j], columns
// of weight 0 skipped): accumulators in registers, dk a multiple of 16 (DV vectors), each value vector read once
// for the G rows. Each row's sums are the same chain as `axpy`'s, whatever G.
template <typename T, int G, int DV>
JANUS_INLINE void block_values(const Attention<T>& A, const RowRun& run, int64_t h, int64_t r, const float* p,
                               int64_t Wp, const float* total) {
  lanes::vf acc[G][DV];
  for (int g = 0; g < G; ++g) {
    for (int u = 0; u < DV; ++u) acc[g][u] = lanes::vf{};
  }
  const int64_t W = run.width - run.first;
  for (int64_t j = 0; j < W; ++j) {
    const T* v = A.v.at(run.src, h, run.first + j);
    lanes::vf vv[DV];
    for (int u = 0; u < DV; ++u) vv[u] = lanes::load(lanes::vf{}, v + u * lanes::kLanes);
    for (int g = 0; g < G; ++g) {
      const float w = p[g * Wp + j];
      if (w == 0.0f) continue;
      const float x = w / total[g];
      for (int u = 0; u < DV; ++u) acc[g][u] = acc[g][u] + x * vv[u];
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int u = 0; u < DV; ++u) lanes::store(A.out + (r + g) * A.D + h * A.dk + u * lanes::kLanes, acc[g][u]);
  }
}

// Rows [r, r + G) in register blocks of G (DV vectors each), the last block smaller.
template <typename T, int G, int DV>
JANUS_INLINE void values_of(const Attention<T>& A, const RowRun& run, int64_t h, int64_t r, int n, const float* p,
                            int64_t Wp, const float* total) {
  int g = 0;
  for (; g + G <= n; g += G) block_values<T, G, DV>(A, run, h, r + g, p + g * Wp, Wp, total + g);
  for (; g < n; ++g) block_values<T, 1, DV>(A, run, h, r + g, p + g * Wp, Wp, total + g);
}

// The weighted values of a block's n rows (scores p (n, Wp) after their softmax, totals `total`).
template <typename T>
JANUS_INLINE void values(const Attention<T>& A, const RowRun& run, int64_t h, int64_t r, int n, const float* p,
                         int64_t Wp, const float* total) {
  switch (A.dk) {
    case 16: values_of<T, 8, 1>(A, run, h, r, n, p, Wp, total); return;
    case 32: values_of<T, 8, 2>(A, run, h, r, n, p, Wp, total); return;
    case 64: values_of<T, 4, 4>(A, run, h, r, n, p, Wp, total); return;
    case 128: values_of<T, 2, 8>(A, run, h, r, n, p, Wp, total); return;
    default: break;
  }
  for (int g = 0; g < n; ++g) std::fill(A.out + (r + g) * A.D + h * A.dk, A.out + (r + g) * A.D + (h + 1) * A.dk, 0.0f);
  const int64_t W = run.width - run.first;
  for (int64_t j = 0; j < W; ++j) {
    const T* v = A.v.at(run.src, h, run.first + j);
    for (int g = 0; g < n; ++g) {
      const float w = p[g * Wp + j];
      if (w == 0.0f) continue;
      axpy(A.out + (r + g) * A.D + h * A.dk, w / total[g], v, A.dk);
    }
  }
}

// Head h of the rows of one run. The run's keys are transposed once (into kt) for all its rows; the scores come
// kBlock rows at a time, each row's softmax on its own, and the weighted values column by column for the block's
// rows (each value vector read once for them). Scratch: kt (dk * Wp), p ((kBlock + 1) * Wp).
template <typename T>
JANUS_INLINE void attend_run(const Attention<T>& A, const RowRun& run, int64_t h, float* kt, float* p) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(A.dk));
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t dk = A.dk, first = run.first, W = run.width - first;
  const int64_t Wp = (W + lanes::kLanes - 1) / lanes::kLanes * lanes::kLanes;
  // The keys transposed, zero past W; `on` 1 at the columns a row may see, 0 at the masked ones and past W.
  for (int64_t d = 0; d < dk; ++d) {
    float* row = kt + d * Wp;
    for (int64_t j = 0; j < W; ++j) row[j] = at1(A.k.at(run.src, h, first + j) + d);
    std::fill(row + W, row + Wp, 0.0f);
  }
  float* on = p + kBlock * Wp;
  for (int64_t j = 0; j < Wp; ++j) on[j] = j < W && (run.keep == nullptr || run.keep[first + j]) ? 1.0f : 0.0f;
  for (int64_t r = run.r0; r < run.r1; r += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, run.r1 - r));
    const float* q[kBlock];
    for (int g = 0; g < n; ++g) q[g] = A.q + (r + g) * A.ldq + h * dk;
    switch (n) {
      case 1: block_scores<1>(q, dk, kt, Wp, scale, p); break;
      case 2: block_scores<2>(q, dk, kt, Wp, scale, p); break;
      case 3: block_scores<3>(q, dk, kt, Wp, scale, p); break;
      case 4: block_scores<4>(q, dk, kt, Wp, scale, p); break;
      case 5: block_scores<5>(q, dk, kt, Wp, scale, p); break;
      case 6: block_scores<6>(q, dk, kt, Wp, scale, p); break;
      case 7: block_scores<7>(q, dk, kt, Wp, scale, p); break;
      default: block_scores<8>(q, dk, kt, Wp, scale, p); break;
    }
    // Each row's softmax, 16 columns at a time: the masked columns at -inf for the maximum, then exp(score - max)
    // with the masked ones exactly 0, and their sum (a row with no column to see gets all weights 0).
    float total[kBlock];
    for (int g = 0; g < n; ++g) {
      float* pr = p + g * Wp;
      lanes::vf top = lanes::splat<lanes::vf>(ninf);
      for (int64_t j0 = 0; j0 < Wp; j0 += lanes::kLanes) {
        const lanes::vf x = lanes::load(lanes::vf{}, pr + j0);
        top = lanes::max_of(top, lanes::load(lanes::vf{}, on + j0) != 0.0f ? x : lanes::splat<lanes::vf>(ninf));
      }
      const float m = lanes::hmax(top);
      lanes::vf sum{};
      for (int64_t j0 = 0; j0 < Wp; j0 += lanes::kLanes) {
        const lanes::vf x = lanes::load(lanes::vf{}, pr + j0) - lanes::splat<lanes::vf>(m);
        const lanes::vf e = m == ninf ? lanes::vf{} : lanes::exp_neg(x) * lanes::load(lanes::vf{}, on + j0);
        lanes::store(pr + j0, e);
        sum += e;
      }
      total[g] = static_cast<float>(lanes::hsum(sum));
    }
    // The weighted sum of the values, columns in order for every row.
    values(A, run, h, r, n, p, Wp, total);
  }
}

template <typename T>
JANUS_INLINE void attend_runs(const Attention<T>& A, const std::vector<RowRun>& runs, int64_t i0, int64_t i1) {
  int64_t Wp = lanes::kLanes;
  for (int64_t i = i0; i < i1; ++i) {
    const RowRun& run = runs[i / A.H];
    Wp = std::max(Wp, (run.width - run.first + lanes::kLanes - 1) / lanes::kLanes * lanes::kLanes);
  }
  std::vector<float> kt(static_cast<size_t>(A.dk * Wp)), p(static_cast<size_t>((kBlock + 1) * Wp));
  for (int64_t i = i0; i < i1; ++i) attend_run(A, runs[i / A.H], i % A.H, kt.data(), p.data());
}

JANUS_CLONES void attend_f32(const Attention<float>& A, const std::vector<RowRun>& runs, int64_t i0, int64_t i1) {
  attend_runs(A, runs, i0, i1);
}
JANUS_CLONES void attend_bf16(const Attention<lanes::bf16_raw>& A, const std::vector<RowRun>& runs, int64_t i0,
                              int64_t i1) {
  attend_runs(A, runs, i0, i1);
}

// Every head of every run; a task is one head of one run (or a few where they are small).
template <typename T>
void attend(const Attention<T>& A, const std::vector<RowRun>& runs) {
  const int64_t items = static_cast<int64_t>(runs.size()) * A.H;
  int64_t work = 0;
  for (const RowRun& run : runs) work += (run.r1 - run.r0) * (run.width - run.first);
  // About 32k multiply-adds of scores and sums per task: a step's few rows stay on the calling thread.
  const int64_t per_item = std::max<int64_t>(1, 2 * A.dk * work / std::max<int64_t>(1, items / A.H));
  at::parallel_for(0, items, std::max<int64_t>(1, (int64_t{1} << 15) / per_item), [&](int64_t i0, int64_t i1) {
    if constexpr (std::is_same_v<T, float>) {
      attend_f32(A, runs, i0, i1);
    } else {
      attend_bf16(A, runs, i0, i1);
    }
  });
}

// x = LN(x + y) row by row (M, D), torch's layer norm: biased variance, eps inside the square root. The mean and
// variance are sums of 16 lanes (added in double) where D is a multiple of 16, else in order.
template <typename T>
JANUS_INLINE void norm_rows(float* x, const float* y, int64_t M, int64_t D, const T* w, const T* b, float eps) {
  using lanes::vf;
  const bool vec = D % lanes::kLanes == 0;
  for (int64_t m = 0; m < M; ++m) {
    float* r = x + m * D;
    const float* u = y + m * D;
    float mean = 0.0f, var = 0.0f;
    if (vec) {
      vf s{};
      for (int64_t d = 0; d < D; d += lanes::kLanes) {
        const vf a = lanes::load(vf{}, r + d) + lanes::load(vf{}, u + d);
        lanes::store(r + d, a);
        s += a;
      }
      mean = static_cast<float>(lanes::hsum(s)) / static_cast<float>(D);
      vf q{};
      for (int64_t d = 0; d < D; d += lanes::kLanes) {
        const vf c = lanes::load(vf{}, r + d) - mean;
        q += c * c;
      }
      var = static_cast<float>(lanes::hsum(q));
    } else {
      for (int64_t d = 0; d < D; ++d) {
        r[d] += u[d];
        mean += r[d];
      }
      mean /= static_cast<float>(D);
      for (int64_t d = 0; d < D; ++d) var += (r[d] - mean) * (r[d] - mean);
    }
    const float inv = 1.0f / std::sqrt(var / static_cast<float>(D) + eps);
    if (vec) {
      for (int64_t d = 0; d < D; d += lanes::kLanes) {
        const vf o = (lanes::load(vf{}, r + d) - mean) * inv * lanes::load(vf{}, w + d) + lanes::load(vf{}, b + d);
        lanes::store(r + d, o);
      }
    } else {
      for (int64_t d = 0; d < D; ++d) r[d] = (r[d] - mean) * inv * at1(w + d) + at1(b + d);
    }
  }
}

JANUS_CLONES void add_norm_f32(float* x, const float* y, int64_t M, int64_t D, const float* w, const float* b,
                               float eps) {
  norm_rows(x, y, M, D, w, b, eps);
}
JANUS_CLONES void add_norm_bf16(float* x, const float* y, int64_t M, int64_t D, const lanes::bf16_raw* w,
                                const lanes::bf16_raw* b, float eps) {
  norm_rows(x, y, M, D, w, b, eps);
}

template <typename T>
void add_norm(float* x, const float* y, int64_t M, int64_t D, const T* w, const T* b, float eps) {
  if constexpr (std::is_same_v<T, float>) {
    add_norm_f32(x, y, M, D, w, b, eps);
  } else {
    add_norm_bf16(x, y, M, D, w, b, eps);
  }
}

// out (M, N) = x (M, K) W^T + b through the tiles of W's layout: (N, K) row-major or panels (N / 16, K, 16).
template <typename T>
void product(const float* x, int64_t M, int64_t K, const at::Tensor& w, int64_t N, const T* b, float* out) {
  const T* wp = static_cast<const T*>(w.const_data_ptr());
  if (w.dim() == 3) {
    skinny::panel_gemm<T>(x, M, K, wp, N, b, out);
  } else {
    skinny::skinny_gemm<T>(x, M, K, wp, N, b, out);
  }
}

// The shape of a pass: N hypotheses of R rows (the first C content rows), width D, H heads, feed-forward width F,
// g hypotheses per sentence, S source positions.
struct Shape {
  int64_t N, R, C, D, H, F, g, S;
};

// A pass' scratch rows: q/k/v, attention outputs, a product's outputs, the feed-forward's hidden rows.
struct Scratch {
  std::vector<float> qkv, att, tmp, ffn;
  Scratch(int64_t M, int64_t D, int64_t F)
      : qkv(static_cast<size_t>(M * 3 * D)), att(static_cast<size_t>(M * D)), tmp(static_cast<size_t>(M * D)),
        ffn(static_cast<size_t>(M * F)) {}
};

// The parts of runs within rows [a, b).
std::vector<RowRun> within(const std::vector<RowRun>& runs, int64_t a, int64_t b) {
  std::vector<RowRun> out;
  for (RowRun run : runs) {
    run.r0 = std::max(run.r0, a);
    run.r1 = std::min(run.r1, b);
    if (run.r0 < run.r1) out.push_back(run);
  }
  return out;
}

// The last layer's rows whose output is read (`need`), moved to the front of a thread's range [a, b) in order, with
// the attention runs renumbered to match: only their keys/values are needed of the other rows, and those are in the
// cache by then. A row's sums do not depend on where it sits, so its output is the same bits as without `need`.
struct Compacted {
  bool active = false;
  std::vector<int64_t> rows;  // the rows kept, ascending (counted as the pass' rows are)
  std::vector<RowRun> own, source;
};

std::vector<RowRun> renumbered(const std::vector<RowRun>& runs, const std::vector<int64_t>& before, int64_t a) {
  std::vector<RowRun> out;
  for (RowRun run : runs) {
    run.r0 = a + before[run.r0 - a];
    run.r1 = a + before[run.r1 - a];
    if (run.r0 < run.r1) out.push_back(run);
  }
  return out;
}

// Rows [a, b) of the states x (relative to a) and of the queries (the first D of each 3D row of qkv, absolute):
// kept rows moved to a, a + 1, ... (each to a place at or before its own, so in ascending order nothing unread
// is overwritten).
Compacted compact(const bool* need, int64_t a, int64_t b, float* x, float* qkv, int64_t D,
                  const std::vector<RowRun>& own, const std::vector<RowRun>& source) {
  Compacted c;
  std::vector<int64_t> before(static_cast<size_t>(b - a + 1), 0);  // kept rows among [a, a + i)
  for (int64_t i = a; i < b; ++i) {
    before[i - a + 1] = before[i - a] + (need[i] ? 1 : 0);
    if (need[i]) c.rows.push_back(i);
  }
  if (static_cast<int64_t>(c.rows.size()) == b - a) return c;
  c.active = true;
  for (int64_t k = 0; k < static_cast<int64_t>(c.rows.size()); ++k) {
    const int64_t i = c.rows[k];
    if (i == a + k) continue;
    std::memcpy(x + k * D, x + (i - a) * D, sizeof(float) * D);
    std::memcpy(qkv + (a + k) * 3 * D, qkv + i * 3 * D, sizeof(float) * D);
  }
  c.own = renumbered(own, before, a);
  c.source = renumbered(source, before, a);
  return c;
}

// compact's inverse for the states: each kept row back in its place (descending: each moves to a place at or after
// its own), the others zero.
void expand(const Compacted& c, int64_t a, int64_t b, float* x, int64_t D) {
  int64_t k = static_cast<int64_t>(c.rows.size()) - 1;
  for (int64_t i = b - 1; i >= a; --i) {
    float* dst = x + (i - a) * D;
    if (k >= 0 && c.rows[k] == i) {
      if (i != a + k) std::memcpy(dst, x + k * D, sizeof(float) * D);
      --k;
    } else {
      std::fill(dst, dst + D, 0.0f);
    }
  }
}

// Every layer over rows [a, b) of hypotheses [n0, n1) of the pass, in place: h, spans, columns, the scratch and the
// runs (own: self-attention, source: cross-attention) start at hypothesis n0's first row; rows are counted from
// there. Weights, caches and cross keys/values are of type T. A row needs the other rows of its hypothesis only
// through the keys/values they write into the cache, so after writing its rows' ones each layer calls `sync`
// (a barrier where other threads write the rest; nothing where [a, b) holds whole hypotheses).
template <typename T, typename Sync>
void layer_rows(const Shape& P, int64_t n0, int64_t a, int64_t b, float* h, const int64_t* columns, const bool* need,
                const std::vector<RowRun>& own, const std::vector<RowRun>& source, Scratch& s,
                at::TensorList self_k, at::TensorList self_v, at::TensorList cross_k, at::TensorList cross_v,
                at::TensorList weights, float eps, Sync sync) {
  const int64_t R = P.R, C = P.C, D = P.D, H = P.H, F = P.F;
  const int64_t dk = D / H, L = static_cast<int64_t>(self_k.size());
  const bool cross = !cross_k.empty();
  const auto [per, f] = layout(cross);
  float *qkv = s.qkv.data(), *att = s.att.data(), *tmp = s.tmp.data() + a * D, *ffn = s.ffn.data() + a * F;
  float* x = h + a * D;
  int64_t M = b - a;  // the rows the layer's work after the keys/values runs on (fewer in the last, with `need`)
  Compacted kept;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = weights.data() + per * l;
    auto ptr = [&](int64_t i) { return static_cast<const T*>(w[i].const_data_ptr()); };
    // Self-attention: project, write the content rows' keys/values, attend to the visible cache columns.
    product<T>(x, M, D, w[0], 3 * D, ptr(1), qkv + a * 3 * D);
    const auto ks = self_k[l].strides(), vs = self_v[l].strides();
    T* kc = static_cast<T*>(self_k[l].data_ptr()) + n0 * ks[0];
    T* vc = static_cast<T*>(self_v[l].data_ptr()) + n0 * vs[0];
    for (int64_t i = a; i < b; ++i) {
      const int64_t n = i / R, j = i % R;
      if (j >= C) continue;
      const float* src = qkv + i * 3 * D;
      const int64_t col = columns[n * C + j];
      for (int64_t hd = 0; hd < H; ++hd) {
        T* kd = kc + n * ks[0] + hd * ks[1] + col * ks[2];
        T* vd = vc + n * vs[0] + hd * vs[1] + col * vs[2];
        for (int64_t d = 0; d < dk; ++d) {
          lanes::store(kd + d, src[D + hd * dk + d]);
          lanes::store(vd + d, src[2 * D + hd * dk + d]);
        }
      }
    }
    sync();
    if (l == L - 1 && need != nullptr) {
      kept = compact(need, a, b, x, qkv, D, own, source);
      M = static_cast<int64_t>(kept.rows.size());
    }
    const std::vector<RowRun>& own_l = kept.active ? kept.own : own;
    const std::vector<RowRun>& source_l = kept.active ? kept.source : source;
    const Heads<T> sk{kc, ks[0], ks[1], ks[2]}, sv{vc, vs[0], vs[1], vs[2]};
    attend<T>({H, dk, D, 3 * D, qkv, sk, sv, att}, own_l);
    product<T>(att + a * D, M, D, w[2], D, ptr(3), tmp);
    add_norm<T>(x, tmp, M, D, ptr(4), ptr(5), eps);
    if (cross) {  // cross-attention over the source
      product<T>(x, M, D, w[6], D, ptr(7), qkv + a * 3 * D);
      // the queries at the rows' own offsets with stride D (the q/k/v rows' first D columns are not read again)
      float* q = qkv + a * 3 * D - a * D;
      attend<T>({H, dk, D, D, q, heads_of<T>(cross_k[l]), heads_of<T>(cross_v[l]), att}, source_l);
      product<T>(att + a * D, M, D, w[8], D, ptr(9), tmp);
      add_norm<T>(x, tmp, M, D, ptr(10), ptr(11), eps);
    }
    // Feed-forward.
    product<T>(x, M, D, w[f], F, ptr(f + 1), ffn);
    for (int64_t i = 0; i < M * F; ++i) ffn[i] = std::max(ffn[i], 0.0f);
    product<T>(ffn, M, F, w[f + 2], D, ptr(f + 3), tmp);
    add_norm<T>(x, tmp, M, D, ptr(f + 4), ptr(f + 5), eps);
  }
  if (kept.active) expand(kept, a, b, x, D);
}

// Every layer over the fp32 rows of hypotheses [n0, n1) of the pass (h, spans and columns: the pass' own, whole):
// on the calling thread, or (team > 1, OpenMP) as rows [t M / T, (t + 1) M / T) on thread t of a team of T, a
// barrier per layer once the keys/values are written. The hypotheses' rows see nothing of the others' (their own
// cache rows, their sentence's source), so ranges of them can run on their own.
template <typename T>
void run_layers(const Shape& P, int64_t n0, int64_t n1, int64_t team, float* h, const int64_t* spans,
                const int64_t* columns, const bool* keep, const bool* need, at::TensorList self_k,
                at::TensorList self_v, at::TensorList cross_k, at::TensorList cross_v, at::TensorList weights,
                float eps) {
  const int64_t N = n1 - n0, R = P.R, M = N * R;
  Scratch s(M, P.D, P.F);
  // The runs of rows sharing their keys/values and columns: the same in every layer.
  const std::vector<RowRun> own = self_runs(N, R, spans + n0 * R * 2);
  const bool cross = !cross_k.empty();
  const std::vector<RowRun> source = cross ? cross_runs(n0, n1, P.g, R, P.S, keep) : std::vector<RowRun>{};
  float* x = h + n0 * R * P.D;
  const int64_t* cols = columns + n0 * P.C;
  const bool* wanted = need != nullptr ? need + n0 * R : nullptr;
#ifdef _OPENMP
  if (team > 1) {
#pragma omp parallel num_threads(static_cast<int>(team))
    {
      const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
      const int64_t a = M * t / nt, b = M * (t + 1) / nt;
      layer_rows<T>(P, n0, a, b, x, cols, wanted, within(own, a, b), within(source, a, b), s, self_k, self_v,
                    cross_k, cross_v, weights, eps, [] {
#pragma omp barrier
                    });
    }
    return;
  }
#endif
  layer_rows<T>(P, n0, 0, M, x, cols, wanted, own, source, s, self_k, self_v, cross_k, cross_v, weights, eps,
                [] {});
}

// How a pass uses the threads. Split product by product (skinny::panel_gemm) and attention by attention (attend),
// a pass hands work to the other threads ~24 times, ~2 us each, and the products of a few rows are one task or two,
// so a beam step or a verification ran mostly on one thread. Instead, where it has several hypotheses, a range of
// whole hypotheses per thread runs every layer (their rows see nothing of the other hypotheses'). Measured on the
// 2-core EPYC, `small`-preset decoder passes of N hypotheses x R rows (AR verification rows, 12 cached columns),
// us a pass, split by products / by hypotheses, 7 interleaved rounds: 5 x 2 (a beam step) 258 / 210, 2 x 10 411 /
// 332, 5 x 10 870 / 768, 32 x 2 867 / 771, 64 x 2 2090 / 1619, 6 x 26 2502 / 2262, 32 x 10 4612 / 4322, 96 x 26
// 37826 / 34670; but 3 x 26 1284 / 1474 (two hypotheses against one). So: every pass of at most kSplitRows rows,
// and larger ones whose hypotheses share out within an eighth of evenly.
constexpr int64_t kSplitRows = 64;

bool split_by_hypotheses(int64_t N, int64_t R, int64_t threads) {
  if (threads < 2 || N < 2 || at::in_parallel_region()) return false;
  if (N * R <= kSplitRows) return true;
  const int64_t share = (N + threads - 1) / threads;
  return 8 * N >= 7 * share * threads;
}

// Otherwise a pass of at least kRowSplitRows rows runs as one range of rows per thread (run_layers' team: a
// barrier per layer, where each product and attention handed work over). Measured as above, us a pass, split by
// products / by rows: 1 x 4 159 / 138, 1 x 10 (a speculative verification) 261 / 216 (12 rounds), 1 x 26 626 /
// 490, 3 x 26 1581 / 1174, 1 x 60 1323 / 1098 (7 rounds); but 1 x 2 (a greedy step) 114 / 126. Passes that split
// by hypotheses are faster that way: 5 x 2 287 / 299 by rows, 32 x 2 873 / 952, 6 x 26 2338 / 2541.
constexpr int64_t kRowSplitRows = 4;

bool split_by_rows(int64_t M, int64_t threads) {
#ifdef _OPENMP
  return threads > 1 && M >= kRowSplitRows && !at::in_parallel_region();
#else
  (void)M;
  (void)threads;
  return false;
#endif
}

void check_matrix(const at::Tensor& t, int64_t rows, int64_t cols, const char* what, int64_t layer, at::ScalarType dt) {
  TORCH_CHECK_VALUE(t.scalar_type() == dt && t.is_contiguous() && t.device().is_cpu(),
                    "janus::decoder_step: layer ", layer, " ", what, " must be a contiguous ", dt,
                    " CPU tensor (x's dtype), got ",
                    t.scalar_type(), t.is_contiguous() ? "" : " (not contiguous)");
  // A matrix may come packed in panels (rows / 16, cols, 16) (janus.ops.skinny_linear.pack_panels).
  const int64_t L = lanes::kLanes;
  const bool ok = cols < 0 ? (t.dim() == 1 && t.size(0) == rows)
                           : (t.dim() == 2 && t.size(0) == rows && t.size(1) == cols) ||
                                 (t.dim() == 3 && rows % L == 0 && t.size(0) == rows / L && t.size(1) == cols &&
                                  t.size(2) == L);
  TORCH_CHECK_VALUE(ok, "janus::decoder_step: layer ", layer, " ", what, " has shape ", t.sizes(), ", expected (",
                    rows, cols < 0 ? "" : ", ", cols < 0 ? std::string() : std::to_string(cols), ")",
                    cols < 0 ? std::string() : " or its panels (" + std::to_string(rows / L) + ", " +
                                                   std::to_string(cols) + ", " + std::to_string(L) + ")");
}

void check_heads(const at::Tensor& t, int64_t n, int64_t H, int64_t dk, const char* what, int64_t layer,
                 at::ScalarType dt) {
  TORCH_CHECK_VALUE(t.scalar_type() == dt && t.device().is_cpu() && t.dim() == 4 && t.size(0) == n &&
                        t.size(1) == H && t.size(3) == dk && t.stride(3) == 1,
                    "janus::decoder_step: layer ", layer, " ", what, " must be ", dt, " (", n, ", ", H, ", columns, ",
                    dk, ") on the CPU with unit stride in its last dim, got ", t.scalar_type(), " ", t.sizes(),
                    " strides ", t.strides());
}

at::Tensor decoder_step_cpu(const at::Tensor& x, int64_t num_content, const at::Tensor& spans,
                            const at::Tensor& columns, at::TensorList self_k, at::TensorList self_v,
                            at::TensorList cross_k, at::TensorList cross_v, const at::Tensor& keep,
                            at::TensorList weights, int64_t n_heads, double eps,
                            const std::optional<at::Tensor>& outputs) {
  // 1. Arguments.
  const auto dt = x.scalar_type();
  TORCH_CHECK_VALUE(x.dim() == 3 && (dt == at::kFloat || dt == at::kBFloat16) && x.device().is_cpu(),
                    "janus::decoder_step: x must be float32 or bfloat16 (N, R, D) on the CPU, got ", dt, " ",
                    x.sizes());
  const int64_t N = x.size(0), R = x.size(1), D = x.size(2), L = static_cast<int64_t>(self_k.size());
  const int64_t C = num_content;
  TORCH_CHECK_VALUE(n_heads >= 1 && D % n_heads == 0, "janus::decoder_step: n_heads=", n_heads,
                    " does not divide the width ", D);
  const int64_t H = n_heads, dk = D / H;
  TORCH_CHECK_VALUE(C >= 0 && C <= R, "janus::decoder_step: num_content=", C, " must be in [0, ", R, "]");
  // Empty cross-attention lists: the encoder's layers (see the top of this file).
  const bool cross = !(cross_k.empty() && cross_v.empty());
  const auto [per, f] = layout(cross);
  const int64_t NC = cross ? L : 0;
  TORCH_CHECK_VALUE(static_cast<int64_t>(self_v.size()) == L && static_cast<int64_t>(cross_k.size()) == NC &&
                        static_cast<int64_t>(cross_v.size()) == NC &&
                        static_cast<int64_t>(weights.size()) == per * L,
                    "janus::decoder_step: ", L, " layers need ", L, " of each cache list (the cross lists empty for "
                    "an encoder) and ", per * L, " weights, got ", self_v.size(), ", ", cross_k.size(), ", ",
                    cross_v.size(), " and ", weights.size());
  TORCH_CHECK_VALUE(keep.dim() == 2 && keep.scalar_type() == at::kBool && keep.device().is_cpu(),
                    "janus::decoder_step: keep must be bool (B, S) on the CPU, got ", keep.scalar_type(), " ",
                    keep.sizes());
  const int64_t B = keep.size(0), S = keep.size(1);
  TORCH_CHECK_VALUE(B >= 1 && N % B == 0, "janus::decoder_step: ", N, " hypotheses do not split evenly over ", B,
                    " sentences");
  TORCH_CHECK_VALUE(spans.scalar_type() == at::kLong && spans.dim() == 3 && spans.size(0) == N &&
                        spans.size(1) == R && spans.size(2) == 2 && spans.device().is_cpu(),
                    "janus::decoder_step: spans must be int64 (", N, ", ", R, ", 2), got ", spans.scalar_type(), " ",
                    spans.sizes());
  TORCH_CHECK_VALUE(columns.scalar_type() == at::kLong && columns.dim() == 2 && columns.size(0) == N &&
                        columns.size(1) == C && columns.device().is_cpu(),
                    "janus::decoder_step: columns must be int64 (", N, ", ", C, "), got ", columns.scalar_type(),
                    " ", columns.sizes());
  const bool some = outputs.has_value() && outputs->defined();
  TORCH_CHECK_VALUE(!some || (outputs->scalar_type() == at::kBool && outputs->dim() == 2 && outputs->size(0) == N &&
                              outputs->size(1) == R && outputs->device().is_cpu()),
                    "janus::decoder_step: outputs must be bool (", N, ", ", R, ") on the CPU, got ",
                    outputs->scalar_type(), " ", outputs->sizes());  // the message is built on failure alone
  const at::Tensor lim = spans.contiguous(), cols = columns.contiguous(), kp = keep.contiguous();
  const at::Tensor out_rows = some ? outputs->contiguous() : at::Tensor();
  int64_t cap = -1;
  for (int64_t l = 0; l < L; ++l) {
    check_heads(self_k[l], N, H, dk, "self_k", l, dt);
    check_heads(self_v[l], N, H, dk, "self_v", l, dt);
    if (cross) {
      check_heads(cross_k[l], B, H, dk, "cross_k", l, dt);
      check_heads(cross_v[l], B, H, dk, "cross_v", l, dt);
    }
    TORCH_CHECK_VALUE(self_v[l].size(2) == self_k[l].size(2) && (cap < 0 || self_k[l].size(2) == cap),
                      "janus::decoder_step: layer ", l, ": cache widths ", self_k[l].size(2), "/",
                      self_v[l].size(2), " must agree across layers");
    TORCH_CHECK_VALUE(!cross || (cross_k[l].size(2) == S && cross_v[l].size(2) == S), "janus::decoder_step: layer ",
                      l, ": source widths ", cross ? cross_k[l].size(2) : 0, "/", cross ? cross_v[l].size(2) : 0,
                      " must agree with keep's ", S);
    cap = self_k[l].size(2);
  }
  const int64_t* lp = lim.const_data_ptr<int64_t>();
  const int64_t* cp = cols.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N * R; ++i) {
    TORCH_CHECK_VALUE(0 <= lp[2 * i] && lp[2 * i] < lp[2 * i + 1] && lp[2 * i + 1] <= cap,
                      "janus::decoder_step: spans[", i / R, ", ", i % R, "]=[", lp[2 * i], ", ", lp[2 * i + 1],
                      ") must be a non-empty range of the cache's ", cap, " columns");
  }
  for (int64_t i = 0; i < N * C; ++i) {
    TORCH_CHECK_VALUE(cp[i] >= 0 && cp[i] < cap, "janus::decoder_step: columns[", i / C, ", ", i % C, "]=", cp[i],
                      " is outside the cache's ", cap, " columns");
  }
  const int64_t F = L ? weights[f + 1].size(0) : 0;  // b1 (F,): W1 may be packed
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = weights.data() + per * l;
    check_matrix(w[0], 3 * D, D, "Wqkv", l, dt);
    check_matrix(w[1], 3 * D, -1, "bqkv", l, dt);
    check_matrix(w[2], D, D, "Wo", l, dt);
    if (cross) {
      check_matrix(w[6], D, D, "cross Wq", l, dt);
      check_matrix(w[8], D, D, "cross Wo", l, dt);
      for (int i : {7, 9, 10, 11}) check_matrix(w[i], D, -1, "bias or norm", l, dt);
    }
    check_matrix(w[f], F, D, "W1", l, dt);
    check_matrix(w[f + 1], F, -1, "b1", l, dt);
    check_matrix(w[f + 2], D, F, "W2", l, dt);
    for (int64_t i : {int64_t{3}, int64_t{4}, int64_t{5}, f + 3, f + 4, f + 5}) {
      check_matrix(w[i], D, -1, "bias or norm", l, dt);
    }
  }

  // 2. The layers, in fp32 rows over buffers allocated once per call.
  at::Tensor h = dt == at::kFloat ? x.contiguous().clone() : x.to(at::kFloat).contiguous();
  const bool* keep_p = kp.const_data_ptr<bool>();
  const bool* need_p = some ? out_rows.const_data_ptr<bool>() : nullptr;
  const float e = static_cast<float>(eps);
  const Shape P{N, R, C, D, H, F, N / B, S};
  float* hp = h.data_ptr<float>();
  auto run = [&](int64_t n0, int64_t n1, int64_t team) {
    if (dt == at::kFloat) {
      run_layers<float>(P, n0, n1, team, hp, lp, cp, keep_p, need_p, self_k, self_v, cross_k, cross_v, weights, e);
    } else {
      run_layers<lanes::bf16_raw>(P, n0, n1, team, hp, lp, cp, keep_p, need_p, self_k, self_v, cross_k, cross_v,
                                  weights, e);
    }
  };
  const int64_t threads = at::get_num_threads();
  if (split_by_hypotheses(N, R, threads)) {
    // Each thread runs every layer over its share of the hypotheses (the products and attention inside run on it).
    at::parallel_for(0, N, (N + threads - 1) / threads, [&](int64_t n0, int64_t n1) { run(n0, n1, 1); });
  } else {
    run(0, N, split_by_rows(N * R, threads) ? threads : 1);
  }
  at::Tensor out = dt == at::kFloat ? h : h.to(dt);
  return out;
}

}  // namespace
}  // namespace janus

TORCH_LIBRARY_IMPL(janus, CPU, m) { m.impl("decoder_step", &janus::decoder_step_cpu); }

#endif  // JANUS_VECTOR_LANES
