// End-to-end codebook tuning (engine.h "End-to-end codebook tuning",
// docs/quality.md): knowledge distillation of a palettized model from its
// f32 source on the calibration text, with the codebook entries as the only
// trainable parameters (lutra/quantize/codebook_tune.h) and optionally the
// RMSNorm weights.
//
// The forward and backward passes here are plain loops over dense weights
// (auto-vectorised, templated on float / double so that a test can check
// the gradient against finite differences in double). They mirror Forward
// (engine.cc) for sequences that start at position 0: same RoPE tables
// (RopeInverseFrequencies, cos/sin rounded to float as ops-inl.h does), same
// GQA head mapping (query head h reads kv head h / (n_heads / n_kv_heads)),
// same 1/sqrt(head_dim) score scale.
#include <math.h>
#include <string.h>

#include <algorithm>
#include <chrono>
#include <type_traits>
#include <vector>

#include "examples/engine.h"
#include "lutra/dispatch.h"
#include "lutra/quantize/codebook_tune.h"

namespace lutra {
namespace engine {

namespace {

// ----------------------------------------------------------------------------
// Dense linear algebra (row-major; W is N x K, rows are output channels)

template <typename T>
T Dot(const T* a, const T* b, size_t n) {
  // Eight independent sums so that the compiler vectorises without
  // reassociating (no -ffast-math needed).
  T s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (size_t j = 0; j < 8; ++j) s[j] += a[i + j] * b[i + j];
  }
  T tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + tail;
}

// Root mean square of v's elements (0 for an empty v).
float Rms(const std::vector<float>& v) {
  double s = 0.0;
  for (float x : v) s += double(x) * x;
  return float(std::sqrt(s / double(std::max<size_t>(v.size(), 1))));
}

// y[i] += alpha * x[i], i < n.
template <typename T>
void Axpy(T alpha, const T* x, size_t n, T* y) {
  for (size_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// out (cols x rows) = in (rows x cols)^T.
template <typename T>
void Transpose(const T* in, size_t rows, size_t cols, std::vector<T>& out) {
  out.resize(rows * cols);
  for (size_t r = 0; r < rows; ++r) {
    for (size_t c = 0; c < cols; ++c) out[c * rows + r] = in[r * cols + c];
  }
}

// The three products of a linear layer. In float they run on the engine's
// SIMD f32 GEMM (dispatch::MatMulF32, Y = X W^T), the backward ones on
// transposed copies (O(size) next to the O(n size) product); in double
// (gradient checks) as plain loops.

// y (n x N) = x (n x K) W^T.
template <typename T>
void MatMul(const T* x, size_t n, size_t K, const T* w, size_t N, T* y) {
  if constexpr (std::is_same_v<T, float>) {
    dispatch::MatMulF32(w, N, K, x, n, y, nullptr);
  } else {
    for (size_t t = 0; t < n; ++t) {
      for (size_t j = 0; j < N; ++j) y[t * N + j] = Dot(x + t * K, w + j * K, K);
    }
  }
}

// dx (n x K) += dy (n x N) W.
template <typename T>
void MatMulBackX(const T* dy, size_t n, size_t N, const T* w, size_t K, T* dx) {
  if constexpr (std::is_same_v<T, float>) {
    std::vector<float> wt, tmp(n * K);
    Transpose(w, N, K, wt);
    dispatch::MatMulF32(wt.data(), K, N, dy, n, tmp.data(), nullptr);
    for (size_t i = 0; i < n * K; ++i) dx[i] += tmp[i];
  } else {
    for (size_t t = 0; t < n; ++t) {
      for (size_t j = 0; j < N; ++j) Axpy(dy[t * N + j], w + j * K, K, dx + t * K);
    }
  }
}

// dW (N x K) += dy^T (N x n) x (n x K).
template <typename T>
void MatMulBackW(const T* dy, size_t n, size_t N, const T* x, size_t K, T* dw) {
  if constexpr (std::is_same_v<T, float>) {
    std::vector<float> dyt, xt, tmp(N * K);
    Transpose(dy, n, N, dyt);
    Transpose(x, n, K, xt);
    dispatch::MatMulF32(xt.data(), K, n, dyt.data(), N, tmp.data(), nullptr);
    for (size_t i = 0; i < N * K; ++i) dw[i] += tmp[i];
  } else {
    for (size_t j = 0; j < N; ++j) {
      for (size_t t = 0; t < n; ++t) Axpy(dy[t * N + j], x + t * K, K, dw + j * K);
    }
  }
}

// One LoRA target's factors as f32: a (rank x cols), b (rows x rank).
void FactorsF32(const LoraFactors& f, std::vector<float>* a, std::vector<float>* b) {
  a->clear(), b->clear();
  for (size_t r = 0; r < f.rank(); ++r) {
    for (size_t k = 0; k < f.cols(); ++k) a->push_back(f.A(r, k));
  }
  for (size_t n = 0; n < f.rows(); ++n) {
    for (size_t r = 0; r < f.rank(); ++r) b->push_back(f.B(n, r));
  }
}

// w (rows x cols) += scale * b (rows x rank) a (rank x cols): the dense
// form of what the LoRA epilogue adds (lora.h).
template <typename T>
void AddLowRank(const std::vector<float>& a, const std::vector<float>& b, size_t rank,
                size_t rows, size_t cols, float scale, T* w) {
  for (size_t n = 0; n < rows; ++n) {
    for (size_t r = 0; r < rank; ++r) {
      const T s = T(scale) * T(b[n * rank + r]);
      for (size_t k = 0; k < cols; ++k) w[n * cols + k] += s * T(a[r * cols + k]);
    }
  }
}

// ----------------------------------------------------------------------------
// The network: dense parameters and the forward/backward passes

// Parameters, in DistillationLoss's order: Model::Matrices() (the
// embedding, per layer q k v o w1 w2 w3, an untied head), then per layer
// attn_norm and ffn_norm, then final_norm.
template <typename T>
struct Net {
  ModelConfig c;
  size_t n_mats = 0;
  bool tied = false;
  std::vector<std::vector<T>> p;
  std::vector<const float*> bq, bk, bv;  // per layer, may be null (f32, fixed)

  size_t Mat(int l, int j) const { return 1 + 7 * size_t(l) + size_t(j); }
  size_t Head() const { return tied ? 0 : n_mats - 1; }
  size_t AttnNorm(int l) const { return n_mats + 2 * size_t(l); }
  size_t FfnNorm(int l) const { return n_mats + 2 * size_t(l) + 1; }
  size_t FinalNorm() const { return n_mats + 2 * size_t(c.n_layers); }
};

enum { kQ = 0, kK, kV, kO, kW1, kW2, kW3 };

Status CheckAdapter(const Adapter* adapter, const ModelConfig& c) {
  if (adapter->base() == AdapterShapes(c)) return Status();
  return InvalidArgument("tuning: the adapter was made for another model shape");
}

// The dense network of `m`, its layer projections plus `adapter`'s scale
// B A where it has factors (may be null).
template <typename T>
StatusOr<Net<T>> MakeNet(const Model& m, const Adapter* adapter = nullptr) {
  LUTRA_RETURN_IF_ERROR(CheckSupported(m.config));
  Net<T> net;
  net.c = m.config;
  const std::vector<const Linear*> mats = m.Matrices();
  const size_t per = 1 + 7 * size_t(m.config.n_layers);
  if (mats.size() != per && mats.size() != per + 1) {
    return InvalidArgument("tuning: %zu matrices for %d layers", mats.size(), m.config.n_layers);
  }
  net.n_mats = mats.size();
  net.tied = mats.size() == per;
  std::vector<float> row;
  for (const Linear* w : mats) {
    std::vector<T> d(w->rows * w->cols);
    row.resize(w->cols);
    for (size_t r = 0; r < w->rows; ++r) {
      const float* src = w->f32 + r * w->cols;
      if (w->palettized()) {
        dispatch::DequantizeRow(w->palette, r, row.data());
        src = row.data();
      }
      std::copy(src, src + w->cols, d.begin() + r * w->cols);
    }
    net.p.push_back(std::move(d));
  }
  const size_t dim = size_t(m.config.dim);
  for (const LayerWeights& l : m.weights.layers) {
    net.p.emplace_back(l.attn_norm, l.attn_norm + dim);
    net.p.emplace_back(l.ffn_norm, l.ffn_norm + dim);
    net.bq.push_back(l.bq), net.bk.push_back(l.bk), net.bv.push_back(l.bv);
  }
  net.p.emplace_back(m.weights.final_norm, m.weights.final_norm + dim);
  if (adapter != nullptr) {
    LUTRA_RETURN_IF_ERROR(CheckAdapter(adapter, m.config));
    std::vector<float> a, b;
    for (size_t l = 0; l < size_t(m.config.n_layers); ++l) {
      for (size_t j = 0; j < kNumProjections; ++j) {
        const LoraFactors* f = adapter->FindFactors(l, kAllProjections[j]);
        if (f == nullptr) continue;
        FactorsF32(*f, &a, &b);
        AddLowRank(a, b, f->rank(), f->rows(), f->cols(), f->scale(),
                   net.p[net.Mat(int(l), int(j))].data());
      }
    }
  }
  return net;
}

// What the backward pass needs of one sequence's forward pass.
template <typename T>
struct Acts {
  struct Layer {
    std::vector<T> xin, r1, xa;  // residual in (n x dim), 1/rms (n), normed (n x dim)
    std::vector<T> q, k, v;      // after bias and RoPE
    std::vector<T> prob;         // n_heads x n x n softmax weights (j <= i)
    std::vector<T> o;            // attention output, n x q_dim
    std::vector<T> xmid, r2, xf; // residual after attention, 1/rms, normed
    std::vector<T> a, b, hm;     // gate, up, SiLU(gate) * up: n x hidden
  };
  size_t n = 0;
  std::vector<Layer> layers;
  std::vector<T> xfinal, rf, xn, logits;
  std::vector<float> cos, sin;  // n x head_dim / 2
  // Backward scratch.
  std::vector<T> dx, dxb, dh, dq, dk, dv, dp;
};

// out (n x dim) = x * w / rms(x) per row; inv_rms (n).
template <typename T>
void RmsNorm(const T* x, const T* w, size_t n, size_t dim, float eps, T* inv_rms, T* out) {
  for (size_t t = 0; t < n; ++t) {
    const T* xr = x + t * dim;
    const T r = T(1) / std::sqrt(Dot(xr, xr, dim) / T(dim) + T(eps));
    inv_rms[t] = r;
    for (size_t i = 0; i < dim; ++i) out[t * dim + i] = xr[i] * w[i] * r;
  }
}

// dx += d(out)/dx^T dy, dw += d(out)/dw^T dy for out = RmsNorm(x, w).
template <typename T>
void RmsNormBack(const T* x, const T* w, const T* inv_rms, const T* dy, size_t n, size_t dim,
                 T* dx, T* dw) {
  for (size_t t = 0; t < n; ++t) {
    const T* xr = x + t * dim;
    const T* g = dy + t * dim;
    const T r = inv_rms[t];
    T s = 0;
    for (size_t i = 0; i < dim; ++i) s += g[i] * w[i] * xr[i];
    const T coef = s * r * r * r / T(dim);
    for (size_t i = 0; i < dim; ++i) {
      dx[t * dim + i] += g[i] * w[i] * r - xr[i] * coef;
      if (dw != nullptr) dw[i] += g[i] * xr[i] * r;
    }
  }
}

// Rotates n tokens x heads x head_dim in place by the angles of positions
// 0..n-1 (sign = +1), or by their negatives (sign = -1, the backward pass:
// a rotation's transpose is its inverse).
template <typename T>
void Rope(const ModelConfig& c, const Acts<T>& a, T* x, size_t n, size_t heads, T sign) {
  const size_t hd = size_t(c.head_dim), half = hd / 2;
  const bool adjacent = c.rope_layout == RopeLayout::kAdjacentPairs;
  for (size_t t = 0; t < n; ++t) {
    for (size_t h = 0; h < heads; ++h) {
      T* v = x + (t * heads + h) * hd;
      for (size_t p = 0; p < half; ++p) {
        const T cs = T(a.cos[t * half + p]), sn = sign * T(a.sin[t * half + p]);
        T& x0 = adjacent ? v[2 * p] : v[p];
        T& x1 = adjacent ? v[2 * p + 1] : v[p + half];
        const T y0 = x0 * cs - x1 * sn, y1 = x0 * sn + x1 * cs;
        x0 = y0, x1 = y1;
      }
    }
  }
}

template <typename T>
T Silu(T a) {
  return a / (T(1) + std::exp(-a));
}

template <typename T>
void Resize(Acts<T>& a, const ModelConfig& c, size_t n) {
  const size_t dim = c.dim, q = c.q_dim(), kv = c.kv_dim(), hid = c.hidden_dim;
  a.n = n;
  a.layers.resize(c.n_layers);
  for (typename Acts<T>::Layer& l : a.layers) {
    l.xin.resize(n * dim), l.r1.resize(n), l.xa.resize(n * dim);
    l.q.resize(n * q), l.k.resize(n * kv), l.v.resize(n * kv);
    l.prob.resize(size_t(c.n_heads) * n * n), l.o.resize(n * q);
    l.xmid.resize(n * dim), l.r2.resize(n), l.xf.resize(n * dim);
    l.a.resize(n * hid), l.b.resize(n * hid), l.hm.resize(n * hid);
  }
  a.xfinal.resize(n * dim), a.rf.resize(n), a.xn.resize(n * dim);
  a.logits.resize(n * size_t(c.vocab_size));
  const std::vector<double> inv_freq = RopeInverseFrequencies(c);
  const size_t half = size_t(c.head_dim) / 2;
  a.cos.resize(n * half), a.sin.resize(n * half);
  for (size_t t = 0; t < n; ++t) {
    for (size_t p = 0; p < half; ++p) {
      const double angle = double(t) * inv_freq[p];
      a.cos[t * half + p] = float(std::cos(angle));  // rounded as ops-inl.h RoPE
      a.sin[t * half + p] = float(std::sin(angle));
    }
  }
}

// Logits of tokens[0..n) at positions 0..n-1 into a.logits.
template <typename T>
void ForwardPass(const Net<T>& net, const int* tokens, size_t n, Acts<T>& a) {
  const ModelConfig& c = net.c;
  const size_t dim = c.dim, qd = c.q_dim(), kvd = c.kv_dim(), hid = c.hidden_dim;
  const size_t hd = c.head_dim, heads = c.n_heads, group = size_t(c.n_heads / c.n_kv_heads);
  const T scale = T(1) / std::sqrt(T(hd));
  if (a.n != n) Resize(a, c, n);
  std::vector<T> x(n * dim), tmp(n * dim);
  for (size_t t = 0; t < n; ++t) {
    std::copy_n(&net.p[0][size_t(tokens[t]) * dim], dim, &x[t * dim]);
  }
  for (int l = 0; l < c.n_layers; ++l) {
    typename Acts<T>::Layer& L = a.layers[l];
    L.xin = x;
    RmsNorm(x.data(), net.p[net.AttnNorm(l)].data(), n, dim, c.norm_eps, L.r1.data(),
            L.xa.data());
    MatMul(L.xa.data(), n, dim, net.p[net.Mat(l, kQ)].data(), qd, L.q.data());
    MatMul(L.xa.data(), n, dim, net.p[net.Mat(l, kK)].data(), kvd, L.k.data());
    MatMul(L.xa.data(), n, dim, net.p[net.Mat(l, kV)].data(), kvd, L.v.data());
    const std::pair<const float*, std::pair<T*, size_t>> biases[] = {
        {net.bq[l], {L.q.data(), qd}}, {net.bk[l], {L.k.data(), kvd}},
        {net.bv[l], {L.v.data(), kvd}}};
    for (const auto& b : biases) {
      if (b.first == nullptr) continue;
      const size_t width = b.second.second;
      for (size_t t = 0; t < n; ++t) {
        for (size_t i = 0; i < width; ++i) b.second.first[t * width + i] += T(b.first[i]);
      }
    }
    Rope(c, a, L.q.data(), n, heads, T(1));
    Rope(c, a, L.k.data(), n, size_t(c.n_kv_heads), T(1));
    std::fill(L.o.begin(), L.o.end(), T(0));
    for (size_t h = 0; h < heads; ++h) {
      const size_t g = h / group;
      for (size_t i = 0; i < n; ++i) {
        const T* qi = &L.q[i * qd + h * hd];
        T* pr = &L.prob[(h * n + i) * n];
        T mx = -HUGE_VAL;
        for (size_t j = 0; j <= i; ++j) {
          pr[j] = Dot(qi, &L.k[j * kvd + g * hd], hd) * scale;
          mx = std::max(mx, pr[j]);
        }
        T sum = 0;
        for (size_t j = 0; j <= i; ++j) sum += (pr[j] = std::exp(pr[j] - mx));
        const T inv = T(1) / sum;
        T* oi = &L.o[i * qd + h * hd];
        for (size_t j = 0; j <= i; ++j) {
          pr[j] *= inv;
          Axpy(pr[j], &L.v[j * kvd + g * hd], hd, oi);
        }
      }
    }
    MatMul(L.o.data(), n, qd, net.p[net.Mat(l, kO)].data(), dim, tmp.data());
    for (size_t i = 0; i < n * dim; ++i) x[i] += tmp[i];
    L.xmid = x;
    RmsNorm(x.data(), net.p[net.FfnNorm(l)].data(), n, dim, c.norm_eps, L.r2.data(),
            L.xf.data());
    MatMul(L.xf.data(), n, dim, net.p[net.Mat(l, kW1)].data(), hid, L.a.data());
    MatMul(L.xf.data(), n, dim, net.p[net.Mat(l, kW3)].data(), hid, L.b.data());
    for (size_t i = 0; i < n * hid; ++i) L.hm[i] = Silu(L.a[i]) * L.b[i];
    MatMul(L.hm.data(), n, hid, net.p[net.Mat(l, kW2)].data(), dim, tmp.data());
    for (size_t i = 0; i < n * dim; ++i) x[i] += tmp[i];
  }
  a.xfinal = x;
  RmsNorm(x.data(), net.p[net.FinalNorm()].data(), n, dim, c.norm_eps, a.rf.data(), a.xn.data());
  MatMul(a.xn.data(), n, dim, net.p[net.Head()].data(), size_t(c.vocab_size), a.logits.data());
}

// Sum over the n positions of KL(P_teacher || softmax(logits)), in double;
// dlogits (n x vocab) = weight * d(sum)/d(logits) = weight * (q - p).
// teacher_logp: log-probabilities (n x vocab), renormalised here so that
// the gradient is exact for the distribution they describe.
template <typename T>
double KlAndGradient(const T* logits, const float* teacher_logp, size_t n, size_t vocab,
                     double weight, T* dlogits) {
  double total = 0.0;
  std::vector<double> p(vocab);
  for (size_t t = 0; t < n; ++t) {
    const T* z = logits + t * vocab;
    const float* lp = teacher_logp + t * vocab;
    double zmax = -HUGE_VAL, pmax = -HUGE_VAL;
    for (size_t i = 0; i < vocab; ++i) zmax = std::max(zmax, double(z[i]));
    for (size_t i = 0; i < vocab; ++i) pmax = std::max(pmax, double(lp[i]));
    double zsum = 0.0, psum = 0.0;
    for (size_t i = 0; i < vocab; ++i) zsum += std::exp(double(z[i]) - zmax);
    for (size_t i = 0; i < vocab; ++i) psum += (p[i] = std::exp(double(lp[i]) - pmax));
    const double zlse = zmax + std::log(zsum), plse = pmax + std::log(psum);
    for (size_t i = 0; i < vocab; ++i) {
      const double pi = p[i] / psum;
      const double lq = double(z[i]) - zlse;
      if (pi > 0.0) total += pi * ((double(lp[i]) - plse) - lq);
      if (dlogits != nullptr) dlogits[t * vocab + i] = T(weight * (std::exp(lq) - pi));
    }
  }
  return total;
}

// Adds the gradient of the loss whose logits gradient is dlogits (n x vocab)
// to grads (parameters' shapes). Uses a's forward state.
template <typename T>
void BackwardPass(const Net<T>& net, const int* tokens, Acts<T>& a, const T* dlogits,
                  std::vector<std::vector<T>>& grads) {
  const ModelConfig& c = net.c;
  const size_t n = a.n;
  const size_t dim = c.dim, qd = c.q_dim(), kvd = c.kv_dim(), hid = c.hidden_dim;
  const size_t hd = c.head_dim, heads = c.n_heads, group = size_t(c.n_heads / c.n_kv_heads);
  const T scale = T(1) / std::sqrt(T(hd));
  a.dx.assign(n * dim, T(0));
  a.dxb.assign(n * dim, T(0));
  // Head and final norm.
  MatMulBackW(dlogits, n, size_t(c.vocab_size), a.xn.data(), dim, grads[net.Head()].data());
  MatMulBackX(dlogits, n, size_t(c.vocab_size), net.p[net.Head()].data(), dim, a.dxb.data());
  RmsNormBack(a.xfinal.data(), net.p[net.FinalNorm()].data(), a.rf.data(), a.dxb.data(), n, dim,
              a.dx.data(), grads[net.FinalNorm()].data());
  for (int l = c.n_layers - 1; l >= 0; --l) {
    typename Acts<T>::Layer& L = a.layers[l];
    // FFN: x_out = x_mid + W2 (SiLU(W1 xf) * W3 xf); dx holds d/dx_out.
    a.dh.assign(n * hid, T(0));
    MatMulBackW(a.dx.data(), n, dim, L.hm.data(), hid, grads[net.Mat(l, kW2)].data());
    MatMulBackX(a.dx.data(), n, dim, net.p[net.Mat(l, kW2)].data(), hid, a.dh.data());
    std::vector<T> db(n * hid);
    for (size_t i = 0; i < n * hid; ++i) {
      const T s = T(1) / (T(1) + std::exp(-L.a[i]));
      db[i] = a.dh[i] * L.a[i] * s;                          // d/d(up)
      a.dh[i] = a.dh[i] * L.b[i] * s * (T(1) + L.a[i] * (T(1) - s));  // d/d(gate)
    }
    MatMulBackW(a.dh.data(), n, hid, L.xf.data(), dim, grads[net.Mat(l, kW1)].data());
    MatMulBackW(db.data(), n, hid, L.xf.data(), dim, grads[net.Mat(l, kW3)].data());
    std::fill(a.dxb.begin(), a.dxb.end(), T(0));
    MatMulBackX(a.dh.data(), n, hid, net.p[net.Mat(l, kW1)].data(), dim, a.dxb.data());
    MatMulBackX(db.data(), n, hid, net.p[net.Mat(l, kW3)].data(), dim, a.dxb.data());
    RmsNormBack(L.xmid.data(), net.p[net.FfnNorm(l)].data(), L.r2.data(), a.dxb.data(), n, dim,
                a.dx.data(), grads[net.FfnNorm(l)].data());

    // Attention: x_mid = x_in + Wo o.
    std::vector<T> dout(n * qd, T(0));
    MatMulBackW(a.dx.data(), n, dim, L.o.data(), qd, grads[net.Mat(l, kO)].data());
    MatMulBackX(a.dx.data(), n, dim, net.p[net.Mat(l, kO)].data(), qd, dout.data());
    a.dq.assign(n * qd, T(0));
    a.dk.assign(n * kvd, T(0));
    a.dv.assign(n * kvd, T(0));
    a.dp.resize(n);
    for (size_t h = 0; h < heads; ++h) {
      const size_t g = h / group;
      for (size_t i = 0; i < n; ++i) {
        const T* doi = &dout[i * qd + h * hd];
        const T* pr = &L.prob[(h * n + i) * n];
        T sum = 0;
        for (size_t j = 0; j <= i; ++j) {
          a.dp[j] = Dot(doi, &L.v[j * kvd + g * hd], hd);
          sum += pr[j] * a.dp[j];
          Axpy(pr[j], doi, hd, &a.dv[j * kvd + g * hd]);
        }
        T* dqi = &a.dq[i * qd + h * hd];
        const T* qi = &L.q[i * qd + h * hd];
        for (size_t j = 0; j <= i; ++j) {
          const T ds = pr[j] * (a.dp[j] - sum) * scale;
          Axpy(ds, &L.k[j * kvd + g * hd], hd, dqi);
          Axpy(ds, qi, hd, &a.dk[j * kvd + g * hd]);
        }
      }
    }
    Rope(c, a, a.dq.data(), n, heads, T(-1));
    Rope(c, a, a.dk.data(), n, size_t(c.n_kv_heads), T(-1));
    MatMulBackW(a.dq.data(), n, qd, L.xa.data(), dim, grads[net.Mat(l, kQ)].data());
    MatMulBackW(a.dk.data(), n, kvd, L.xa.data(), dim, grads[net.Mat(l, kK)].data());
    MatMulBackW(a.dv.data(), n, kvd, L.xa.data(), dim, grads[net.Mat(l, kV)].data());
    std::fill(a.dxb.begin(), a.dxb.end(), T(0));
    MatMulBackX(a.dq.data(), n, qd, net.p[net.Mat(l, kQ)].data(), dim, a.dxb.data());
    MatMulBackX(a.dk.data(), n, kvd, net.p[net.Mat(l, kK)].data(), dim, a.dxb.data());
    MatMulBackX(a.dv.data(), n, kvd, net.p[net.Mat(l, kV)].data(), dim, a.dxb.data());
    RmsNormBack(L.xin.data(), net.p[net.AttnNorm(l)].data(), L.r1.data(), a.dxb.data(), n, dim,
                a.dx.data(), grads[net.AttnNorm(l)].data());
  }
  // Embedding rows (the same matrix as the head when tied).
  for (size_t t = 0; t < n; ++t) {
    Axpy(T(1), &a.dx[t * dim], dim, &grads[0][size_t(tokens[t]) * dim]);
  }
}

// Log-softmax of each row of logits (n x vocab), in place.
void LogSoftmaxRows(float* logits, size_t n, size_t vocab) {
  for (size_t t = 0; t < n; ++t) {
    float* z = logits + t * vocab;
    const float mx = *std::max_element(z, z + vocab);
    double sum = 0.0;
    for (size_t i = 0; i < vocab; ++i) sum += std::exp(double(z[i] - mx));
    const float lse = mx + float(std::log(sum));
    for (size_t i = 0; i < vocab; ++i) z[i] -= lse;
  }
}

Status CheckTokens(const ModelConfig& c, const int* tokens, size_t n) {
  if (n == 0 || n > size_t(c.seq_len)) {
    return InvalidArgument("tuning: %zu tokens, need 1..%d (the context length)", n, c.seq_len);
  }
  for (size_t t = 0; t < n; ++t) {
    if (tokens[t] < 0 || tokens[t] >= c.vocab_size) {
      return OutOfRange("tuning: token %d outside the vocabulary (%d)", tokens[t], c.vocab_size);
    }
  }
  return Status();
}

template <typename T>
StatusOr<std::vector<float>> LogitsT(const Model& model, const int* tokens, size_t n,
                                     const Adapter* adapter) {
  LUTRA_RETURN_IF_ERROR(CheckTokens(model.config, tokens, n));
  StatusOr<Net<T>> net = MakeNet<T>(model, adapter);
  if (!net.ok()) return net.status();
  Acts<T> a;
  ForwardPass(*net, tokens, n, a);
  return std::vector<float>(a.logits.begin(), a.logits.end());
}

template <typename T>
StatusOr<double> LossT(const Model& model, const int* tokens, size_t n, const float* teacher,
                       std::vector<std::vector<double>>* grads) {
  LUTRA_RETURN_IF_ERROR(CheckTokens(model.config, tokens, n));
  StatusOr<Net<T>> net = MakeNet<T>(model);
  if (!net.ok()) return net.status();
  const size_t vocab = size_t(model.config.vocab_size);
  std::vector<float> logp(teacher, teacher + n * vocab);
  LogSoftmaxRows(logp.data(), n, vocab);
  Acts<T> a;
  ForwardPass(*net, tokens, n, a);
  std::vector<T> dlogits(n * vocab);
  const double kl = KlAndGradient(a.logits.data(), logp.data(), n, vocab, 1.0 / double(n),
                                  dlogits.data());
  if (grads != nullptr) {
    std::vector<std::vector<T>> g;
    for (const std::vector<T>& p : net->p) g.emplace_back(p.size(), T(0));
    BackwardPass(*net, tokens, a, dlogits.data(), g);
    grads->clear();
    for (const std::vector<T>& v : g) grads->emplace_back(v.begin(), v.end());
  }
  return kl / double(n);
}

// splitmix64: the minibatch order (the same on every platform).
uint64_t SplitMix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The f32 storage vector of `m` that holds [p, p + n), or null.
float* OwnedF32(Model& m, const float* p, size_t n) {
  for (std::vector<float>& v : m.f32_storage) {
    if (p >= v.data() && p + n <= v.data() + v.size()) return v.data() + (p - v.data());
  }
  return nullptr;
}

}  // namespace

StatusOr<std::vector<float>> TrainingLogits(const Model& model, const int* tokens, size_t n,
                                            bool f64, const Adapter* adapter) {
  return f64 ? LogitsT<double>(model, tokens, n, adapter)
             : LogitsT<float>(model, tokens, n, adapter);
}

StatusOr<double> DistillationLoss(const Model& model, const int* tokens, size_t n,
                                  const float* teacher_logits, bool f64,
                                  std::vector<std::vector<double>>* grads) {
  return f64 ? LossT<double>(model, tokens, n, teacher_logits, grads)
             : LossT<float>(model, tokens, n, teacher_logits, grads);
}

StatusOr<TuneReport> TuneCodebooks(const Model& f32_model, Model& m, const std::vector<int>& calib,
                                   const TuneOptions& o) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point t0 = Clock::now();
  const ModelConfig& c = m.config;
  const ModelConfig& fc = f32_model.config;
  if (c.dim != fc.dim || c.n_layers != fc.n_layers || c.vocab_size != fc.vocab_size ||
      c.hidden_dim != fc.hidden_dim || c.n_heads != fc.n_heads ||
      c.n_kv_heads != fc.n_kv_heads || c.head_dim != fc.head_dim) {
    return InvalidArgument("tuning: the f32 and palettized models differ in shape");
  }
  for (const Linear* w : f32_model.Matrices()) {
    if (w->palettized()) return InvalidArgument("tuning: the reference model must be f32");
  }
  if (o.segment < 2 || o.batch == 0 || !(o.lr > 0.0f)) {
    return InvalidArgument("tuning: segment %zu (need >= 2), batch %zu (need >= 1), lr %g",
                           o.segment, o.batch, double(o.lr));
  }
  const size_t seg = std::min(o.segment, size_t(c.seq_len));
  // Sequences: consecutive runs of `seg` tokens, each from position 0; a
  // last run shorter than 2 tokens is dropped. The steps train on `text`;
  // the KL reported is on the calibration text.
  using Seqs = std::vector<std::pair<size_t, size_t>>;  // (start, length)
  const auto split = [&](const std::vector<int>& t, const char* what) -> StatusOr<Seqs> {
    Seqs out;
    for (size_t s = 0; s + 2 <= t.size(); s += seg) out.push_back({s, std::min(seg, t.size() - s)});
    if (out.empty()) return InvalidArgument("tuning: the %s has < 2 tokens", what);
    for (const auto& s : out) LUTRA_RETURN_IF_ERROR(CheckTokens(c, &t[s.first], s.second));
    return out;
  };
  const std::vector<int>& text = o.train_text != nullptr ? *o.train_text : calib;
  StatusOr<Seqs> seqs_or =
      split(text, o.train_text != nullptr ? "training text" : "calibration text");
  if (!seqs_or.ok()) return seqs_or.status();
  const Seqs& seqs = *seqs_or;
  StatusOr<Seqs> report_seqs = split(calib, "calibration text");
  if (!report_seqs.ok()) return report_seqs.status();

  StatusOr<Net<float>> student = MakeNet<float>(m);
  if (!student.ok()) return student.status();
  const size_t vocab = size_t(c.vocab_size);
  const size_t threads = o.pool != nullptr ? o.pool->NumThreads() : 1;
  const auto parallel = [&](size_t tasks, const auto& fn) {
    if (o.pool != nullptr) {
      o.pool->ParallelFor(tasks, fn);
    } else {
      for (size_t i = 0; i < tasks; ++i) fn(i, 0);
    }
  };
  std::vector<Acts<float>> acts(threads);

  // Teacher log-probabilities: computed once and kept when they fit in
  // max_teacher_bytes, else recomputed for each batch (a third more work
  // per step).
  StatusOr<Net<float>> ref = MakeNet<float>(f32_model);
  if (!ref.ok()) return ref.status();
  const bool keep_teacher = double(text.size()) * double(vocab) * 4.0 <= double(o.max_teacher_bytes);
  std::vector<std::vector<float>> teacher(seqs.size());
  const auto teacher_logp = [&](const std::vector<int>& t, const std::pair<size_t, size_t>& s,
                                Acts<float>& a, std::vector<float>& out) {
    ForwardPass(*ref, &t[s.first], s.second, a);
    out.assign(a.logits.begin(), a.logits.end());
    LogSoftmaxRows(out.data(), s.second, vocab);
  };
  if (keep_teacher) {
    parallel(seqs.size(),
             [&](size_t i, size_t thread) { teacher_logp(text, seqs[i], acts[thread], teacher[i]); });
  }
  size_t positions = 0;
  for (const auto& s : *report_seqs) positions += s.second;
  // Mean KL of the student over the calibration text's sequences.
  const bool reuse_teacher = keep_teacher && &text == &calib;
  std::vector<double> seq_kl(report_seqs->size());
  const auto mean_kl = [&]() {
    parallel(report_seqs->size(), [&](size_t i, size_t thread) {
      Acts<float>& a = acts[thread];
      const auto& s = (*report_seqs)[i];
      std::vector<float> computed;
      if (!reuse_teacher) teacher_logp(calib, s, a, computed);
      const std::vector<float>& lp = reuse_teacher ? teacher[i] : computed;
      ForwardPass(*student, &calib[s.first], s.second, a);
      seq_kl[i] = KlAndGradient<float>(a.logits.data(), lp.data(), s.second, vocab, 0.0, nullptr);
    });
    double sum = 0.0;
    for (double k : seq_kl) sum += k;
    return sum / double(positions);
  };

  // Trainable tensors: codebooks of the matrices at <= 4 bits (6 and 8
  // bits are left as k-means made them, as GPTQ leaves them: docs/quality.md),
  // and the norms on request.
  const std::vector<Linear*> mats = m.MutableMatrices();
  std::vector<int> tuner_of(student->p.size(), -1);
  std::vector<CodebookTuner> tuners;
  std::vector<PaletteMatrix*> stores;
  for (size_t i = 0; i < mats.size(); ++i) {
    if (!mats[i]->palettized() || mats[i]->palette.shape.bits > 4) continue;
    PaletteMatrix* owner = nullptr;
    for (PaletteMatrix& pm : m.palettes) {
      if (pm.view().indices == mats[i]->palette.indices) owner = &pm;
    }
    if (owner == nullptr) {
      return InvalidArgument("tuning: matrix %zu is not owned by the model (mapped file?)", i);
    }
    StatusOr<CodebookTuner> t = CodebookTuner::Create(mats[i]->palette);
    if (!t.ok()) return t.status();
    if (o.index_lr > 0.0f) t->EnableIndexTuning();
    tuner_of[i] = int(tuners.size());
    tuners.push_back(std::move(*t));
    stores.push_back(owner);
  }
  std::vector<size_t> norm_ids;
  std::vector<Adam> norm_adam;
  std::vector<float> norm_scale;
  // Norms only alongside codebooks: an 8-bit model stays as k-means made it.
  if (o.norms && !tuners.empty()) {
    for (size_t t = student->n_mats; t < student->p.size(); ++t) {
      norm_ids.push_back(t);
      norm_adam.emplace_back(student->p[t].size());
      norm_scale.push_back(Rms(student->p[t]));
    }
  }
  // The adapter trained along: per adapted matrix, f32 copies of its
  // factors with their Adam states, and the dense W_hat; the student's
  // matrix is W_hat + scale B A.
  struct Factors {
    size_t layer, proj, t, rank, rows, cols;
    float scale;
    ElementType type;
    std::vector<float> a, b, base, ga, gb;  // A: rank x cols, B: rows x rank
    Adam adam_a, adam_b;
    float rms_a = 0.0f, rms_b = 0.0f;
  };
  std::vector<Factors> lora;
  std::vector<int> lora_of(student->p.size(), -1);
  if (o.adapter != nullptr) {
    LUTRA_RETURN_IF_ERROR(CheckAdapter(o.adapter, c));
    for (size_t l = 0; l < size_t(c.n_layers); ++l) {
      for (size_t j = 0; j < kNumProjections; ++j) {
        const LoraFactors* f = o.adapter->FindFactors(l, kAllProjections[j]);
        if (f == nullptr) continue;
        Factors F{l, j, student->Mat(int(l), int(j)), f->rank(), f->rows(), f->cols(),
                  f->scale(), f->type(), {}, {}, {}, {}, {}, Adam(f->a_elements()),
                  Adam(f->b_elements())};
        FactorsF32(*f, &F.a, &F.b);
        F.rms_a = Rms(F.a), F.rms_b = Rms(F.b);
        F.base = student->p[F.t];
        F.ga.resize(F.a.size()), F.gb.resize(F.b.size());
        lora_of[F.t] = int(lora.size());
        lora.push_back(std::move(F));
      }
    }
  }
  // student->p[t] = W_hat + scale B A.
  const auto apply_lora = [&](const Factors& F) {
    float* w = student->p[F.t].data();
    std::copy(F.base.begin(), F.base.end(), w);
    AddLowRank(F.a, F.b, F.rank, F.rows, F.cols, F.scale, w);
  };
  for (const Factors& F : lora) apply_lora(F);

  TuneReport report;
  report.matrices = tuners.size();
  report.tokens = text.size();
  report.kl_before = mean_kl();
  if (tuners.empty() && norm_ids.empty() && lora.empty()) {
    report.kl_after = report.kl_before;
    report.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    return report;
  }

  // Gradients per batch slot (summed in slot order: the result does not
  // depend on the thread count).
  const size_t slots = std::min(o.batch, seqs.size());
  std::vector<std::vector<std::vector<float>>> grads(slots);
  for (auto& g : grads) {
    for (const std::vector<float>& p : student->p) g.emplace_back(p.size(), 0.0f);
  }
  std::vector<std::vector<float>> dlogits(slots);
  std::vector<size_t> order(seqs.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  uint64_t rng = o.seed;
  size_t next = order.size();  // reshuffle at the first step
  std::vector<size_t> batch(slots);
  for (size_t step = 0; step < o.steps; ++step) {
    for (size_t b = 0; b < slots; ++b) {
      if (next == order.size()) {
        for (size_t i = order.size() - 1; i > 0; --i) {
          std::swap(order[i], order[SplitMix(rng) % (i + 1)]);
        }
        next = 0;
      }
      batch[b] = order[next++];
    }
    size_t batch_positions = 0;
    for (size_t b : batch) batch_positions += seqs[b].second;
    const double weight = 1.0 / double(batch_positions);
    parallel(slots, [&](size_t b, size_t thread) {
      Acts<float>& a = acts[thread];
      const auto& s = seqs[batch[b]];
      for (std::vector<float>& g : grads[b]) std::fill(g.begin(), g.end(), 0.0f);
      std::vector<float> computed;
      if (!keep_teacher) teacher_logp(text, s, a, computed);
      const std::vector<float>& lp = keep_teacher ? teacher[batch[b]] : computed;
      ForwardPass(*student, &text[s.first], s.second, a);
      dlogits[b].resize(s.second * vocab);
      KlAndGradient<float>(a.logits.data(), lp.data(), s.second, vocab, weight,
                           dlogits[b].data());
      BackwardPass(*student, &text[s.first], a, dlogits[b].data(), grads[b]);
    });
    for (size_t b = 1; b < slots; ++b) {
      for (size_t t = 0; t < grads[0].size(); ++t) {
        for (size_t i = 0; i < grads[0][t].size(); ++i) grads[0][t][i] += grads[b][t][i];
      }
    }
    // Cosine decay: large steps first, then settle.
    const float lr =
        o.lr * float(0.5 * (1.0 + std::cos(3.14159265358979323846 * double(step) / double(o.steps))));
    for (size_t t = 0; t < student->n_mats; ++t) {
      Factors* F = lora_of[t] < 0 ? nullptr : &lora[size_t(lora_of[t])];
      if (F != nullptr) {
        // dL/dA = scale B^T dW, dL/dB = scale dW A^T, at the factors the
        // forward pass used (before either moves).
        const float* dw = grads[0][t].data();
        std::fill(F->ga.begin(), F->ga.end(), 0.0f);
        for (size_t n = 0; n < F->rows; ++n) {
          for (size_t r = 0; r < F->rank; ++r) {
            F->gb[n * F->rank + r] = F->scale * Dot(dw + n * F->cols, &F->a[r * F->cols], F->cols);
            Axpy(F->scale * F->b[n * F->rank + r], dw + n * F->cols, F->cols,
                 &F->ga[r * F->cols]);
          }
        }
        const float adapter_lr = lr / o.lr * o.adapter_lr;
        F->adam_a.Step(F->ga.data(), adapter_lr * F->rms_a, F->a.data());
        F->adam_b.Step(F->gb.data(), adapter_lr * F->rms_b, F->b.data());
      }
      if (tuner_of[t] >= 0) {
        CodebookTuner& tu = tuners[size_t(tuner_of[t])];
        tu.Step(grads[0][t].data(), lr);
        // The latents' rate follows the same cosine, scaled to index_lr.
        if (tu.tunes_indices()) tu.StepIndices(grads[0][t].data(), lr / o.lr * o.index_lr);
        tu.Dequantize(F != nullptr ? F->base.data() : student->p[t].data());
      }
      if (F != nullptr) apply_lora(*F);
    }
    for (size_t k = 0; k < norm_ids.size(); ++k) {
      norm_adam[k].Step(grads[0][norm_ids[k]].data(), lr * norm_scale[k],
                        student->p[norm_ids[k]].data());
    }
  }
  // Round to the stored codebook type, so that the KL reported is the
  // stored model's.
  for (size_t t = 0; t < student->n_mats; ++t) {
    if (tuner_of[t] < 0) continue;
    CodebookTuner& tu = tuners[size_t(tuner_of[t])];
    for (float& e : tu.mutable_entries()) e = RoundToElementType(e, tu.shape().codebook);
    tu.Dequantize(lora_of[t] >= 0 ? lora[size_t(lora_of[t])].base.data() : student->p[t].data());
  }
  for (Factors& F : lora) {
    for (float& e : F.a) e = RoundToElementType(e, F.type);
    for (float& e : F.b) e = RoundToElementType(e, F.type);
    apply_lora(F);
  }
  report.kl_after = mean_kl();
  report.steps = o.steps;
  for (const CodebookTuner& tu : tuners) {
    if (!tu.tunes_indices()) continue;
    report.changed_indices += tu.ChangedIndices();
    report.indices += tu.shape().rows * tu.shape().cols;
  }
  if (o.adapter != nullptr) {
    StatusOr<Adapter> a = Adapter::Create(o.adapter->name(), o.adapter->base());
    if (!a.ok()) return a.status();
    a->set_kind(o.adapter->kind());
    for (const Factors& F : lora) {
      LUTRA_RETURN_IF_ERROR(a->AddF32(F.layer, kAllProjections[F.proj], F.rank, F.a.data(),
                                      F.b.data(), F.scale, F.type));
    }
    report.adapter = std::make_shared<const Adapter>(std::move(*a));
  }
  // Write back: codebooks, norms, then the kernels' tables.
  for (size_t k = 0; k < tuners.size(); ++k) LUTRA_RETURN_IF_ERROR(tuners[k].Store(stores[k]));
  const size_t dim = size_t(c.dim);
  for (size_t t : norm_ids) {
    const size_t k = t - student->n_mats;
    const float* p = k == size_t(2 * c.n_layers) ? m.weights.final_norm
                     : k % 2 == 0 ? m.weights.layers[k / 2].attn_norm
                                  : m.weights.layers[k / 2].ffn_norm;
    float* dst = OwnedF32(m, p, dim);
    if (dst == nullptr) return InvalidArgument("tuning: norm weights not owned by the model");
    std::copy(student->p[t].begin(), student->p[t].end(), dst);
  }
  m.weights.embedding.prepared = nullptr;
  m.weights.output.prepared = nullptr;
  for (LayerWeights& l : m.weights.layers) {
    for (Linear* w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w1, &l.w2, &l.w3}) w->prepared = nullptr;
  }
  m.prepared.clear();
  LUTRA_RETURN_IF_ERROR(m.Prepare());
  report.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return report;
}

}  // namespace engine
}  // namespace lutra
