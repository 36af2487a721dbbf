// Vector helpers shared by the fused conv -> max-pool -> ReLU kernels.
//
// GCC/Clang vector extensions, as wide as the instruction set the build is for:
// pipeline/kernels_build.py compiles one library per variant, each with its ISA flags and
// these macros:
//   LENET_LANES  float lanes of one register: 16 (AVX-512), 8 (AVX2), 4 (portable: SSE, NEON)
//   LENET_REGS   vector registers the kernels' blocking may keep live: 32 (AVX-512), 16 (AVX2)
//   LENET_NS     the torch.ops namespace the variant registers its ops in (lenet_avx2, ...)
// Everything here has internal linkage: variants loaded into one process never share a symbol.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#ifndef LENET_LANES
#define LENET_LANES 4
#endif
#ifndef LENET_REGS
#define LENET_REGS 16
#endif
#ifndef LENET_NS
#define LENET_NS lenet_portable
#endif

namespace lenet {
namespace {

constexpr int L = LENET_LANES;  // lanes
constexpr int R = LENET_REGS;   // register budget
typedef float vf __attribute__((vector_size(L * 4)));
typedef int32_t vi __attribute__((vector_size(L * 4)));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }

// relu(max of the 2x2 window) lane by lane, from the window's four values in row-major order,
// by max_pool2d's rule (the first maximum wins; NaN wins) and relu's (NaN stays NaN). code is
// the winning position 0..3, or 4 where relu's output is not positive: no gradient flows there.
inline void pool_relu(vf v0, vf v1, vf v2, vf v3, vf& out, vi& code) {
  const vf cand[4] = {v0, v1, v2, v3};
  vf m = vf{} - std::numeric_limits<float>::infinity();
  vi k = vi{};
  for (int q = 0; q < 4; ++q) {
    const vi take = (cand[q] > m) | (cand[q] != cand[q]);
    m = take ? cand[q] : m;
    k = take ? (vi{} + q) : k;
  }
  out = ((m > 0) | (m != m)) ? m : vf{};
  code = (out > 0) ? k : (vi{} + 4);
}

}  // namespace
}  // namespace lenet
