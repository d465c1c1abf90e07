// 16 fp32 lanes in GCC/Clang vector types, shared by the CPU kernels that vectorise by hand
// (loss_terms.cpp, skinny_linear.cpp): the types, float / bf16 loads and stores, and the
// target_clones attribute that compiles a kernel for AVX-512, AVX2 and the baseline (picked at
// load time). Only with GCC or Clang: the kernels that include it compile to nothing elsewhere,
// and their ops fall back to the references.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) || defined(__clang__)
#define JANUS_VECTOR_LANES 1

#if defined(__x86_64__) && !defined(__clang__)
#define JANUS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define JANUS_CLONES
#endif
#define JANUS_INLINE inline __attribute__((always_inline))

namespace janus {
namespace lanes {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
using bf16_raw = uint16_t;

// The same code for one float and for 16: load(L{}, p) reads one or 16 values, widened to fp32.
JANUS_INLINE float load(float, const float* p) { return *p; }
JANUS_INLINE vf load(vf, const float* p) {
  vf x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
JANUS_INLINE float load(float, const bf16_raw* p) {
  const uint32_t u = static_cast<uint32_t>(*p) << 16;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}
JANUS_INLINE vf load(vf, const bf16_raw* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  const vu u = __builtin_convertvector(h, vu) << 16;
  vf x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// x rounded to bf16, to nearest even, NaN kept NaN (as c10::BFloat16): its fp32 bits with the low 16 cleared.
JANUS_INLINE uint32_t bf16_rounded(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return std::isnan(x) ? 0x7FC00000u : (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
}
JANUS_INLINE vu bf16_rounded(vf x) {
  vu u;
  std::memcpy(&u, &x, sizeof u);
  const vu nan = (vu)(x != x);
  return (((u + 0x7FFFu + ((u >> 16) & 1u)) & ~nan) | ((vu{} + 0x7FC00000u) & nan)) & 0xFFFF0000u;
}

JANUS_INLINE void store(float* p, float x) { *p = x; }
JANUS_INLINE void store(float* p, vf x) { std::memcpy(p, &x, sizeof x); }
JANUS_INLINE void store(bf16_raw* p, float x) { *p = static_cast<bf16_raw>(bf16_rounded(x) >> 16); }
JANUS_INLINE void store(bf16_raw* p, vf x) {
  const vh h = __builtin_convertvector(bf16_rounded(x) >> 16, vh);
  std::memcpy(p, &h, sizeof h);
}

}  // namespace lanes
}  // namespace janus

#endif  // defined(__GNUC__) || defined(__clang__)
