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

TORCH_LIBRARY(janus, m) {
  // out[b] = [bos?] + flat[offsets[index[b]] : offsets[index[b] + 1]] + [eos?] + [pad ...]
  // flat int32|int64 [T], offsets int32|int64 [N + 1], index int32|int64 [B] -> int64 [B, L].
  m.set_python_module("janus.ops.pad_batch");
  m.def("pad_batch(Tensor flat, Tensor offsets, Tensor index, int pad, int bos, int eos) -> Tensor");
}
