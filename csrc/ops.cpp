// Schemas of every janus op, defined once. Implementations register per device
// in cpu/*.cpp (TORCH_LIBRARY_IMPL(janus, CPU, m)) and cuda/*.cu
// (TORCH_LIBRARY_IMPL(janus, CUDA, m)); fake (meta) implementations are Python
// functions next to each op's reference in janus/ops/<op>.py.
//
// Adding an op:
//   1. its schema below, preceded by set_python_module("janus.ops.<op>") so that
//      torch imports the module holding its fake implementation on demand;
//   2. the kernels in cpu/<op>.cpp and/or cuda/<op>.cu;
//   3. janus/ops/<op>.py: <op>_ref, the fake implementation, a dispatch entry.

#include <torch/library.h>

namespace janus {
bool cpu_bf16_dot();  // cpu/skinny_linear.cpp
}  // namespace janus

TORCH_LIBRARY(janus, m) {
  // out[b] = [bos?] + flat[offsets[index[b]] : offsets[index[b] + 1]] + [eos?] + [pad ...]
  // flat int32|int64 [T], offsets int32|int64 [N + 1], index int32|int64 [B] -> int64 [B, L].
  m.set_python_module("janus.ops.pad_batch");
  m.def("pad_batch(Tensor flat, Tensor offsets, Tensor index, int pad, int bos, int eos) -> Tensor");

  // The `beam` best target lengths per sentence (ties to the shorter) and their canvases
  // [bos, mask x (n - 2), eos, pad ...]; max_len int32|int64 () or [B] caps each sentence.
  // length_scores float|double|half|bfloat16 [B, C] -> tokens int64 [B*beam, longest n], lengths int64 [B*beam].
  m.set_python_module("janus.ops.length_beam_init");
  m.def(
      "length_beam_init(Tensor length_scores, int beam, int min_len, Tensor max_len, int bos, int eos, int mask, "
      "int pad) -> (Tensor, Tensor)");
  // In place: per row, the counts[r] lowest-scoring tokens other than pad/bos/eos become mask, score 0
  // (ties to the smaller position). tokens int32|int64 [R, L], scores floating [R, L], counts int32|int64 [R].
  // check: an out-of-range count raises before anything is written (on CUDA this costs a device sync);
  // without it counts are clamped into range. Returns nothing so that torch.compile can functionalize
  // it; janus.ops.remask_lowest returns the tensors.
  m.set_python_module("janus.ops.remask_lowest");
  m.def(
      "remask_lowest(Tensor(a!) tokens, Tensor(b!) scores, Tensor counts, int mask, int pad, int bos, int eos, "
      "bool check=True) -> ()");

  // Every term of the JANUS loss over one chunk of stacked logits [a; b; c] (counts = rows of each,
  // m_b == m_c when both), and d loss / d logits for a loss gradient of 1 (rows x V in grad_dtype;
  // empty without need_grad). targets int64 [rows] clamped into [0, V), keep float [rows] 0/1, pairs
  // int64 [m] (sorted) the AR row of each masked row or None, scales the 7 LossScales fields.
  // -> sums float [9] in TERMS order, grad.
  m.set_python_module("janus.ops.loss_terms");
  m.def(
      "loss_terms(Tensor logits, int[] counts, Tensor targets, Tensor keep, Tensor? pairs, float eps, float[] scales, "
      "bool need_grad, ScalarType grad_dtype) -> (Tensor, Tensor)");

  // x @ weight^T (+ bias) for a few rows of x, reading the weight once (an incremental decoder step).
  // x float32|bfloat16 [M, K], weight [N, K] and bias [N] (or None) of x's dtype -> [M, N] of x's dtype.
  m.set_python_module("janus.ops.skinny_linear");
  m.def("skinny_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // Whether the CPU kernels' bf16 products run on the bf16 dot-product instruction (AVX512_BF16 here and
  // JANUS_CPU_BF16_DOT not "0"); no tensors: one kernel for every device.
  m.def("cpu_bf16_dot() -> bool", &janus::cpu_bf16_dot);

  // Every decoder layer of one incremental inference pass over a few rows (CPU, float32): x [N, R, D] (the
  // first num_content rows of each hypothesis are content rows, written to its self-attention caches
  // [N, H, W, D/H] at columns int64 [N, num_content]); row r of hypothesis n sees cache columns
  // [spans[n, r, 0], spans[n, r, 1]) (int64 [N, R, 2]) and the source positions where keep (bool [B, S]) holds,
  // through the cross-attention keys/values [B, H, S, D/H] of sentence n / (N / B); weights: 18 per layer
  // (janus.ops.decoder_step.LAYER_WEIGHTS). Empty cross lists: the encoder's layers, 12 weights each
  // (ENCODER_LAYER_WEIGHTS), no cross-attention. outputs (bool [N, R], optional): the rows whose final states are
  // read; the last layer runs the others' keys/values alone and returns them as zeros. -> the final hidden states
  // [N, R, D].
  m.set_python_module("janus.ops.decoder_step");
  m.def(
      "decoder_step(Tensor x, int num_content, Tensor spans, Tensor columns, Tensor(a!)[] self_k, "
      "Tensor(b!)[] self_v, Tensor[] cross_k, Tensor[] cross_v, Tensor keep, Tensor[] weights, int n_heads, "
      "float eps, Tensor? outputs=None) -> Tensor");

  // Per row of logits float32 [R, V]: the id of the largest logit among the ids not in `banned` (ties: the
  // smaller) and its log-probability under the softmax of the whole row -> scores float32 [R], ids int64 [R].
  // The reduction of one mask-predict pass (CPU).
  m.set_python_module("janus.ops.mask_predict_update");
  m.def("best_token(Tensor logits, int[] banned) -> (Tensor, Tensor)");

  // The next-token choice of an AR search step: per row of logits float32 [R, V], the k best ids allowed
  // (not in `banned`; eos not when rules[r] & 1, eos alone when rules[r] & 2; ties: the smaller id) and
  // their log-probabilities under the softmax of the whole row (-inf past the allowed ones), best first;
  // rules uint8 [R] -> scores float32 [R, k], ids int64 [R, k] (CPU).
  m.set_python_module("janus.ops.ar_topk");
  m.def("ar_topk(Tensor logits, int k, int[] banned, int eos, Tensor rules) -> (Tensor, Tensor)");

  // In place, a beam step's key/value cache reorder: cache[a, n, b, :length] = old cache[a, order[n], b, :length]
  // for every row n (the rows that keep their place are not touched). cache [A, N, B, C, E] of any dtype, each
  // (a, n, b) slab of columns contiguous; order int[N] (CPU).
  m.set_python_module("janus.ops.cache_reorder");
  m.def("cache_reorder(Tensor(a!) cache, int[] order, int length) -> ()");
}
