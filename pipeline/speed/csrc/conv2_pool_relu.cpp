// LeNet's second stage, relu(max_pool2d(conv2(x), 2)), as one CPU kernel, and its backward.
//
// conv2 maps 6 channels to 16: vectors over the 16 outputs of a position (one 16-lane vector,
// two 8-lane ones). The forward computes the four positions of each 2x2 window together (each
// weight vector loaded once for the four) and keeps only the pooled value and which position
// won; the output is written in the plain NCHW layout that flatten and fc1 read as it is. The
// backward walks the pooled positions once per output channel, holding that channel's weight
// rows and their gradient in registers (all K rows where 32 registers hold them, one row a
// pass in 16): each gradient that survives ReLU flows to the one winning position only, where
// it adds to the input gradient (channels-last, what conv1's backward reads) and to the weight
// gradient; torch instead fills the full 10x10 gradient and runs a dense backward over it.
// Values are torch's up to the order of float additions.
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

using lenet::cdiv, lenet::L, lenet::load, lenet::pool_relu, lenet::R, lenet::store, lenet::vf,
    lenet::vi;

constexpr int CI = 6, CO = 16;  // conv2's channels
constexpr int PAD = 2 * L;      // floats after a row segment that loads may read
// Forward: output vectors per group (the four window positions of OV vectors accumulate
// together, with OV weight vectors and a broadcast input), and P partial sums of each where
// the registers allow (more independent chains of multiply-adds for the FMA units).
constexpr int OV = 4 * (CO / L) + CO / L + 2 <= R ? CO / L : 2;
constexpr int P = 8 * OV + OV + 2 <= R ? 2 : 1;

template <int K>
struct Conv2 {
  static constexpr int SEG = K * CI;         // one kernel row of an input patch: K columns x 6
  static constexpr int SV = cdiv(SEG, L);    // vectors that cover it
  // Backward: kernel rows whose weights and weight gradient stay in registers in one pass.
  static constexpr int KB = 2 * K * SV + 4 <= R ? K : 1;

  // Wv[((kh*K + kw)*CI + c)*CO + o] = w[o, c, kh, kw]: vectors over the outputs o.
  static void forward(const float* x, int H, int W, const float* Wv, const float* b, float* y,
                      uint8_t* code) {
    const int Hp = (H - K + 1) / 2, Wp = (W - K + 1) / 2, rs = W * CI;
    for (int i2 = 0; i2 < Hp; ++i2) {
      for (int j2 = 0; j2 < Wp; ++j2) {
        const float* p0 = x + (2 * i2) * rs + (2 * j2) * CI;  // window position 0's patch
        uint8_t* cp = code + (i2 * Wp + j2) * CO;
        for (int og = 0; og < CO; og += OV * L) {
          vf acc[P][4][OV] = {};
          for (int v = 0; v < OV; ++v)
            for (int q = 0; q < 4; ++q) acc[0][q][v] = load(b + og + v * L);
          for (int kh = 0; kh < K; ++kh) {
            const float* r0 = p0 + kh * rs;
            const float* r1 = r0 + rs;
            auto& a = acc[kh % P];
            const float* wk = Wv + kh * SEG * CO + og;
            for (int e = 0; e < SEG; ++e) {  // e = kw*CI + c
              const float x0 = r0[e], x1 = r0[e + CI], x2 = r1[e], x3 = r1[e + CI];
              for (int v = 0; v < OV; ++v) {
                const vf wv = load(wk + e * CO + v * L);
                a[0][v] += wv * x0;
                a[1][v] += wv * x1;
                a[2][v] += wv * x2;
                a[3][v] += wv * x3;
              }
            }
          }
          for (int v = 0; v < OV; ++v) {
            for (int p = 1; p < P; ++p)
              for (int q = 0; q < 4; ++q) acc[0][q][v] += acc[p][q][v];
            vf out;
            vi cd;
            pool_relu(acc[0][0][v], acc[0][1][v], acc[0][2][v], acc[0][3][v], out, cd);
            for (int j = 0; j < L; ++j) {
              const int o = og + v * L + j;
              y[(o * Hp + i2) * Wp + j2] = out[j];  // NCHW: flatten reads it as it is
              cp[o] = static_cast<uint8_t>(cd[j]);
            }
          }
        }
      }
    }
  }

  // gx (zeroed, padded) += input gradient; GW [CO][K][SV*L] += weight gradient (per kh row
  // segment); GB += bias gradient. Wk[(o*K + kh)*SV*L + e] = w[o, c, kh, kw], e = kw*CI + c.
  // at, gs [Hp*Wp]: scratch for the positions a channel's gradient flows to, and how much.
  static void backward(const float* x, int H, int W, const float* gy, const uint8_t* code,
                       const float* Wk, float* gx, float* GW, float* GB, int* at, float* gs) {
    const int Hp = (H - K + 1) / 2, Wp = (W - K + 1) / 2, rs = W * CI;
    for (int o = 0; o < CO; ++o) {
      float gb = 0.f;
      if constexpr (KB == K) {
        // All the channel's kernel rows in registers: one walk over the pooled positions.
        Rows rows(GW, Wk, o, 0);
        for (int i2 = 0; i2 < Hp; ++i2)
          for (int j2 = 0; j2 < Wp; ++j2) {
            const int q = code[(i2 * Wp + j2) * CO + o];
            if (q > 3) continue;  // relu's gradient is zero here
            const float g = gy[(o * Hp + i2) * Wp + j2];
            gb += g;
            rows.flow(x, gx, (2 * i2 + (q >> 1)) * rs + (2 * j2 + (q & 1)) * CI, rs, g);
          }
        rows.save(GW, o, 0);
      } else {
        // KB rows a pass: the positions the gradient survives ReLU at are listed once, without
        // branches (whether ReLU cut is data: a branch on it mispredicts), for every pass.
        int n = 0;
        for (int i2 = 0; i2 < Hp; ++i2)
          for (int j2 = 0; j2 < Wp; ++j2) {
            const int q = code[(i2 * Wp + j2) * CO + o];
            const float g = gy[(o * Hp + i2) * Wp + j2];
            at[n] = (2 * i2 + (q >> 1)) * rs + (2 * j2 + (q & 1)) * CI;
            gs[n] = g;
            gb += q <= 3 ? g : 0.f;
            n += q <= 3;
          }
        for (int k0 = 0; k0 < K; k0 += KB) {
          Rows rows(GW, Wk, o, k0);
          for (int i = 0; i < n; ++i) rows.flow(x, gx, at[i] + k0 * rs, rs, gs[i]);
          rows.save(GW, o, k0);
        }
      }
      GB[o] += gb;
    }
  }

  // KB kernel rows of one output channel, from row k0: weights and weight gradient in
  // registers.
  struct Rows {
    vf gw[KB][SV], wk[KB][SV];
    Rows(const float* GW, const float* Wk, int o, int k0) {
      for (int kh = 0; kh < KB; ++kh)
        for (int s = 0; s < SV; ++s) {
          gw[kh][s] = load(GW + ((o * K + k0 + kh) * SV + s) * L);
          wk[kh][s] = load(Wk + ((o * K + k0 + kh) * SV + s) * L);
        }
    }
    // The gradient g of the conv output whose patch (these rows of it) starts at x + off.
    inline void flow(const float* x, float* gx, int off, int rs, float g) {
      for (int kh = 0; kh < KB; ++kh) {
        const float* xr = x + off + kh * rs;
        float* gxr = gx + off + kh * rs;
        for (int s = 0; s < SV; ++s) {
          gw[kh][s] += g * load(xr + s * L);
          store(gxr + s * L, load(gxr + s * L) + g * wk[kh][s]);
        }
      }
    }
    void save(float* GW, int o, int k0) const {
      for (int kh = 0; kh < KB; ++kh)
        for (int s = 0; s < SV; ++s) store(GW + ((o * K + k0 + kh) * SV + s) * L, gw[kh][s]);
    }
  };
};

template <int K>
std::tuple<at::Tensor, at::Tensor> forward_k(const at::Tensor& x, const at::Tensor& w,
                                             const at::Tensor& b) {
  const int64_t N = x.size(0);
  const int H = x.size(2), W = x.size(3), Hp = (H - K + 1) / 2, Wp = (W - K + 1) / 2;
  // w is [CO, CI, K, K]; Wv[((kh*K + kw)*CI + c)*CO + o]
  auto wt = w.permute({2, 3, 1, 0}).contiguous();  // [K, K, CI, CO]
  const float* Wv = wt.data_ptr<float>();
  const float* bias = b.data_ptr<float>();
  auto y = at::empty({N, CO, Hp, Wp}, x.options());
  auto code = at::empty({N, Hp, Wp, CO}, x.options().dtype(at::kByte));
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  uint8_t* cpp = code.data_ptr<uint8_t>();
  const int64_t img = int64_t(H) * W * CI;
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> xl(img + PAD, 0.f);  // padded: the last row's loads stay inside
    for (int64_t n = n0; n < n1; ++n) {
      std::memcpy(xl.data(), xp + n * img, sizeof(float) * img);
      Conv2<K>::forward(xl.data(), H, W, Wv, bias, yp + n * CO * Hp * Wp,
                        cpp + n * Hp * Wp * CO);
    }
  });
  return {y, code};
}

template <int K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_k(const at::Tensor& gy,
                                                          const at::Tensor& code,
                                                          const at::Tensor& x,
                                                          const at::Tensor& w) {
  constexpr int SV = Conv2<K>::SV, SEG = Conv2<K>::SEG;
  const int64_t N = x.size(0);
  const int H = x.size(2), W = x.size(3), Hp = (H - K + 1) / 2, Wp = (W - K + 1) / 2;
  auto wt = w.permute({0, 2, 3, 1}).contiguous();  // [CO, K, K, CI]: rows of SEG floats
  std::vector<float> Wk(CO * K * SV * L, 0.f);
  const float* wtp = wt.data_ptr<float>();
  for (int o = 0; o < CO; ++o)
    for (int kh = 0; kh < K; ++kh)
      std::memcpy(&Wk[(o * K + kh) * SV * L], wtp + (o * K + kh) * SEG, sizeof(float) * SEG);
  auto gx = at::empty({N, CI, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float* xp = x.data_ptr<float>();
  const float* gp = gy.data_ptr<float>();
  const uint8_t* cp = code.data_ptr<uint8_t>();
  float* gxp = gx.data_ptr<float>();
  const int64_t img = int64_t(H) * W * CI;
  const int64_t T = std::min<int64_t>(at::get_num_threads(), N);
  const int64_t gws = CO * K * SV * L;
  std::vector<float> part(T * gws, 0.f), partb(T * CO, 0.f);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> xl(img + PAD, 0.f), gl(img + PAD), gs(Hp * Wp);
    std::vector<int> at(Hp * Wp);
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t n = t * N / T; n < (t + 1) * N / T; ++n) {
        std::memcpy(xl.data(), xp + n * img, sizeof(float) * img);
        std::fill(gl.begin(), gl.end(), 0.f);
        Conv2<K>::backward(xl.data(), H, W, gp + n * CO * Hp * Wp, cp + n * Hp * Wp * CO,
                           Wk.data(), gl.data(), part.data() + t * gws, partb.data() + t * CO,
                           at.data(), gs.data());
        std::memcpy(gxp + n * img, gl.data(), sizeof(float) * img);
      }
  });
  auto gw = at::empty({CO, CI, K, K}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  gw.zero_();
  auto gb = at::zeros({CO}, x.options());
  float* gwp = gw.data_ptr<float>();  // memory [CO, K, K, CI]
  float* gbp = gb.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    for (int o = 0; o < CO; ++o) {
      for (int kh = 0; kh < K; ++kh)
        for (int e = 0; e < SEG; ++e)
          gwp[(o * K + kh) * SEG + e] += part[t * gws + (o * K + kh) * SV * L + e];
      gbp[o] += partb[t * CO + o];
    }
  }
  return {gx, gw, gb};
}

void check(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 4 && x.size(1) == CI && x.scalar_type() == at::kFloat,
              "conv2_pool_relu: x must be float32 [N, 6, H, W]");
  TORCH_CHECK(w.dim() == 4 && w.size(0) == CO && w.size(1) == CI && w.size(2) == w.size(3) &&
                  (w.size(2) == 3 || w.size(2) == 5) && w.scalar_type() == at::kFloat,
              "conv2_pool_relu: w must be float32 [16, 6, K, K] with K 3 or 5");
  TORCH_CHECK(x.size(2) >= w.size(2) + 1 && x.size(3) >= w.size(3) + 1,
              "conv2_pool_relu: the input is smaller than one pooled window");
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x_, const at::Tensor& w_,
                                           const at::Tensor& b_) {
  check(x_, w_);
  auto x = x_.contiguous(at::MemoryFormat::ChannelsLast);
  auto b = b_.contiguous();
  return w_.size(2) == 5 ? forward_k<5>(x, w_, b) : forward_k<3>(x, w_, b);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& gy_,
                                                        const at::Tensor& code,
                                                        const at::Tensor& x_,
                                                        const at::Tensor& w_) {
  check(x_, w_);
  auto gy = gy_.contiguous();
  auto x = x_.contiguous(at::MemoryFormat::ChannelsLast);
  return w_.size(2) == 5 ? backward_k<5>(gy, code, x, w_) : backward_k<3>(gy, code, x, w_);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(LENET_NS, m) {
  m.def("conv2_pool_relu(Tensor x, Tensor w, Tensor b) -> (Tensor, Tensor)");
  m.def(
      "conv2_pool_relu_backward(Tensor gy, Tensor code, Tensor x, Tensor w) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(LENET_NS, CPU, m) {
  m.impl("conv2_pool_relu", forward);
  m.impl("conv2_pool_relu_backward", backward);
}
