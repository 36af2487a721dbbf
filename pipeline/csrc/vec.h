// Vector helpers shared by the fused conv -> max-pool -> ReLU kernels.
//
// GCC/Clang vector extensions: 16 float lanes, compiled to AVX-512, AVX2 or SSE instructions
// by the flags pipeline/kernels.py picks for the CPU.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

namespace lenet {

constexpr int L = 16;  // lanes
typedef float vf __attribute__((vector_size(L * 4)));
typedef int32_t vi __attribute__((vector_size(L * 4)));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

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

}  // namespace lenet
