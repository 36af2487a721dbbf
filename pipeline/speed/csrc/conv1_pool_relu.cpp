// LeNet's first stage, relu(max_pool2d(conv1(x), 2)), as one CPU kernel, and its backward.
//
// conv1 has one input channel and six output channels. torch runs it as three ops: a oneDNN
// convolution, a channels-last max-pool whose six channels are too few to vectorise, and a
// ReLU; their backward zero-fills and scatters a gradient of the full 28x28 conv output and
// runs oneDNN's weight-gradient kernel over it. Here the image's even and odd columns are
// split once, so that the conv outputs at even and at odd columns are contiguous vectors and
// the 2x2 pool is lane-wise; the 28x28 output is never stored. The forward saves, per pooled
// value, which window position won (max_pool2d's rule: the first maximum, NaN wins) or that
// ReLU's output was not positive; the backward computes the weight and bias gradients from
// that and the input alone. Values are torch's up to the order of float additions.
//
// Blocking: a vector holds L pooled columns of one row (LeNet's 14 need one 16-lane vector, or
// two 8-lane ones); the four window positions of G channels accumulate together, 4G vectors,
// all six channels where 32 registers hold them (AVX-512), three at a time in 16 (AVX2).
//
// Built by pipeline/kernels_build.py with torch.utils.cpp_extension, once per variant (vec.h);
// registered as torch.ops.LENET_NS.*.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "vec.h"

namespace {

using lenet::cdiv, lenet::L, lenet::load, lenet::pool_relu, lenet::R, lenet::vf, lenet::vi;

constexpr int C = 6;          // conv1's output channels
constexpr int MAXW = 32;      // the widest input row the kernels take
constexpr int RW = 24 + L;    // floats per deinterleaved input row (zero padded for the loads)
// Channels whose four window positions accumulate together: 4G accumulators, two input
// vectors and a weight within the register budget.
constexpr int G = 4 * C + 3 <= R ? C : C / 2;

// The image's even and odd columns as two rows of RW floats each: conv outputs at even and at
// odd columns then read contiguous vectors, and the 2x2 pool is lane-wise. The rows' padding
// (zeros, for the loads past the image) is zeroed once, with the buffers: every image of a
// call writes the same columns.
inline void deinterleave(const float* x, int H, int W, float* xe, float* xo) {
  for (int r = 0; r < H; ++r) {
    const float* xr = x + r * W;
    float *er = xe + r * RW, *orow = xo + r * RW;
    for (int j = 0; j < W / 2; ++j) {
      er[j] = xr[2 * j];
      orow[j] = xr[2 * j + 1];
    }
    if (W % 2) er[W / 2] = xr[W - 1];
  }
}

// Inputs of the conv outputs at even (se) and odd (so) columns for kernel column kw.
template <int KW>
inline void sources(const float* re, const float* ro, vf& se, vf& so) {
  if (KW % 2 == 0) {
    se = load(re + KW / 2);
    so = load(ro + KW / 2);
  } else {
    se = load(ro + KW / 2);
    so = load(re + (KW + 1) / 2);
  }
}

template <int K>
struct Kernel {
  // y [Hp, Wp, C] = relu(2x2 max-pool(conv(x) + b)); code: window position 0..3 of the
  // maximum (row-major, the first one), or 4 where relu's output is not positive.
  static void forward(const float* x, int H, int W, const float* w, const float* b, float* xe,
                      float* xo, float* y, uint8_t* code) {
    const int Hp = (H - K + 1) / 2, Wp = (W - K + 1) / 2, nb = cdiv(Wp, L);
    deinterleave(x, H, W, xe, xo);
    for (int i2 = 0; i2 < Hp; ++i2)
      for (int cb = 0; cb < nb; ++cb)
        for (int g = 0; g < C; g += G) {
          vf cand[4][G];
          for (int r = 0; r < 2; ++r) {
            vf* E = cand[2 * r];
            vf* O = cand[2 * r + 1];
            for (int c = 0; c < G; ++c) E[c] = O[c] = vf{} + b[g + c];
            for (int kh = 0; kh < K; ++kh) {
              const float* re = xe + (2 * i2 + r + kh) * RW + cb * L;
              const float* ro = xo + (2 * i2 + r + kh) * RW + cb * L;
              step<0>(re, ro, w + g * K * K + kh * K, E, O);
            }
          }
          const int lanes = std::min(L, Wp - cb * L);
          for (int c = 0; c < G; ++c) {
            vf out;
            vi cd;
            pool_relu(cand[0][c], cand[1][c], cand[2][c], cand[3][c], out, cd);
            for (int j = 0; j < lanes; ++j) {
              const int at = (i2 * Wp + cb * L + j) * C + g + c;
              y[at] = out[j];
              code[at] = static_cast<uint8_t>(cd[j]);
            }
          }
        }
  }

  template <int KW>
  static inline void step(const float* re, const float* ro, const float* wrow, vf* E, vf* O) {
    if constexpr (KW < K) {
      vf se, so;
      sources<KW>(re, ro, se, so);
      for (int c = 0; c < G; ++c) {
        const float wv = wrow[c * K * K + KW];
        E[c] += wv * se;
        O[c] += wv * so;
      }
      step<KW + 1>(re, ro, wrow, E, O);
    }
  }

  // Adds this image's weight gradient to A [C, K*K] and bias gradient to B [C] (per lane).
  // G_ [C, Hp, nb, 4]: scratch for the gradient of the conv output at each window position.
  static void backward(const float* x, int H, int W, const float* gy, const uint8_t* code,
                       float* xe, float* xo, vf* G_, vf* A, vf* B) {
    const int Hp = (H - K + 1) / 2, Wp = (W - K + 1) / 2, nb = cdiv(Wp, L);
    deinterleave(x, H, W, xe, xo);
    for (int i2 = 0; i2 < Hp; ++i2)
      for (int cb = 0; cb < nb; ++cb) {
        const int lanes = std::min(L, Wp - cb * L);
        for (int c = 0; c < C; ++c) {
          vf g = vf{};
          vi cd = vi{} + 4;
          for (int j = 0; j < lanes; ++j) {
            const int at = (i2 * Wp + cb * L + j) * C + c;
            g[j] = gy[at];
            cd[j] = code[at];
          }
          vf* Gc = G_ + ((c * Hp + i2) * nb + cb) * 4;
          for (int q = 0; q < 4; ++q) Gc[q] = (cd == q) ? g : vf{};
          B[c] += (cd < 4) ? g : vf{};
        }
      }
    for (int c = 0; c < C; ++c) {
      for (int kh = 0; kh < K; ++kh) {
        vf acc[2][K] = {};  // from the even and the odd columns: two chains of FMAs
        for (int i2 = 0; i2 < Hp; ++i2)
          for (int cb = 0; cb < nb; ++cb) {
            const vf* Gc = G_ + ((c * Hp + i2) * nb + cb) * 4;
            for (int r = 0; r < 2; ++r) {
              const float* re = xe + (2 * i2 + r + kh) * RW + cb * L;
              const float* ro = xo + (2 * i2 + r + kh) * RW + cb * L;
              bstep<0>(re, ro, Gc[2 * r], Gc[2 * r + 1], acc);
            }
          }
        for (int kw = 0; kw < K; ++kw) A[(c * K + kh) * K + kw] += acc[0][kw] + acc[1][kw];
      }
    }
  }

  template <int KW>
  static inline void bstep(const float* re, const float* ro, vf GE, vf GO, vf (*acc)[K]) {
    if constexpr (KW < K) {
      vf se, so;
      sources<KW>(re, ro, se, so);
      acc[0][KW] += GE * se;
      acc[1][KW] += GO * so;
      bstep<KW + 1>(re, ro, GE, GO, acc);
    }
  }
};

template <int K>
bool shape_ok(const at::Tensor& x, const at::Tensor& w) {
  return w.size(0) == C && w.size(2) == K && w.size(3) == K && x.size(3) <= MAXW;
}

void check(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 4 && x.size(1) == 1 && x.scalar_type() == at::kFloat,
              "conv1_pool_relu: x must be float32 [N, 1, H, W]");
  TORCH_CHECK(w.dim() == 4 && w.size(1) == 1 && w.scalar_type() == at::kFloat,
              "conv1_pool_relu: w must be float32 [6, 1, K, K]");
  TORCH_CHECK(shape_ok<5>(x, w) || shape_ok<3>(x, w),
              "conv1_pool_relu: needs 6 output channels, a 3x3 or 5x5 kernel and W <= 32");
}

template <int K>
std::tuple<at::Tensor, at::Tensor> forward_k(const at::Tensor& x, const at::Tensor& w,
                                             const at::Tensor& b) {
  const int64_t N = x.size(0);
  const int H = x.size(2), W = x.size(3), Hp = (H - K + 1) / 2, Wp = (W - K + 1) / 2;
  auto y = at::empty({N, C, Hp, Wp}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto code = at::empty({N, Hp, Wp, C}, x.options().dtype(at::kByte));
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  uint8_t* cp = code.data_ptr<uint8_t>();
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> xe(H * RW, 0.f), xo(H * RW, 0.f);  // zero padded
    for (int64_t n = n0; n < n1; ++n)
      Kernel<K>::forward(xp + n * H * W, H, W, wp, bp, xe.data(), xo.data(),
                            yp + n * Hp * Wp * C, cp + n * Hp * Wp * C);
  });
  return {y, code};
}

template <int K>
std::tuple<at::Tensor, at::Tensor> backward_k(const at::Tensor& gy, const at::Tensor& code,
                                              const at::Tensor& x) {
  const int64_t N = x.size(0);
  const int H = x.size(2), W = x.size(3), Hp = (H - K + 1) / 2, Wp = (W - K + 1) / 2;
  const float* xp = x.data_ptr<float>();
  const float* gp = gy.data_ptr<float>();
  const uint8_t* cp = code.data_ptr<uint8_t>();
  // Images split into T fixed chunks, each with its own partial sums: the result depends on
  // the thread count only, not on which thread ran which chunk.
  const int64_t T = std::min<int64_t>(at::get_num_threads(), N);
  std::vector<vf> part(T * C * K * K, vf{}), partb(T * C, vf{});
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> xe(H * RW, 0.f), xo(H * RW, 0.f);  // zero padded
    std::vector<vf> G(C * Hp * cdiv(Wp, L) * 4);
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t n = t * N / T; n < (t + 1) * N / T; ++n)
        Kernel<K>::backward(xp + n * H * W, H, W, gp + n * Hp * Wp * C,
                               cp + n * Hp * Wp * C, xe.data(), xo.data(), G.data(),
                               part.data() + t * C * K * K, partb.data() + t * C);
  });
  // In the layout of LeNet's channels-last weight, as DDP's gradient buckets expect.
  auto gw = at::empty({C, 1, K, K}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  gw.zero_();
  auto gb = at::zeros({C}, x.options());
  float *gwp = gw.data_ptr<float>(), *gbp = gb.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    for (int e = 0; e < C * K * K; ++e)
      for (int j = 0; j < L; ++j) gwp[e] += part[t * C * K * K + e][j];
    for (int c = 0; c < C; ++c)
      for (int j = 0; j < L; ++j) gbp[c] += partb[t * C + c][j];
  }
  return {gw, gb};
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x_, const at::Tensor& w_,
                                           const at::Tensor& b_) {
  check(x_, w_);
  auto x = x_.contiguous();
  auto w = w_.contiguous();
  auto b = b_.contiguous();
  return w.size(2) == 5 ? forward_k<5>(x, w, b) : forward_k<3>(x, w, b);
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& gy_, const at::Tensor& code,
                                            const at::Tensor& x_, int64_t K) {
  auto gy = gy_.contiguous(at::MemoryFormat::ChannelsLast);
  auto x = x_.contiguous();
  return K == 5 ? backward_k<5>(gy, code, x) : backward_k<3>(gy, code, x);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(LENET_NS, m) {
  m.def("conv1_pool_relu(Tensor x, Tensor w, Tensor b) -> (Tensor, Tensor)");
  m.def("conv1_pool_relu_backward(Tensor gy, Tensor code, Tensor x, int K) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(LENET_NS, CPU, m) {
  m.impl("conv1_pool_relu", forward);
  m.impl("conv1_pool_relu_backward", backward);
}
