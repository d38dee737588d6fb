// The scalar reference Llama of the tests and benchmarks, and the metrics
// that compare two models' next-token distributions.
//
// ReferenceLlama is llama2.c's run.c transcribed: the same loop order and the
// same f32 arithmetic, one token at a time, with its own KV cache, plus what
// today's small models add to it: q/k/v biases and half-split RoPE (qwen2),
// RoPE frequency factors (Llama 3.x) and linear RoPE scaling. It is what
// the SIMD engine, the file loaders and the quantized models are checked
// against, so it stays plain and readable top to bottom and is never
// optimized. It needs no test framework: bench/ includes it too.
#ifndef LUTRA_TESTS_SUPPORT_REFERENCE_LLAMA_H_
#define LUTRA_TESTS_SUPPORT_REFERENCE_LLAMA_H_

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "lutra/format/llama_model.h"
#include "lutra/format/lora.h"  // Projection
#include "lutra/quantize/quality.h"

namespace lutra {
namespace test {

// The matrix of projection p in layer L (row-major [out, in]), to read or
// to replace.
inline const float*& LayerMatrix(LayerWeightsF32& L, Projection p) {
  switch (p) {
    case Projection::kQ: return L.wq;
    case Projection::kK: return L.wk;
    case Projection::kV: return L.wv;
    case Projection::kO: return L.wo;
    case Projection::kW1: return L.w1;
    case Projection::kW2: return L.w2;
    case Projection::kW3: break;
  }
  return L.w3;
}
inline const float* LayerMatrix(const LayerWeightsF32& L, Projection p) {
  LayerWeightsF32 copy = L;
  return LayerMatrix(copy, p);
}

class ReferenceLlama {
 public:
  // Runs `w` (which must outlive this) for positions [0, max_positions)
  // (0: config.seq_len). A non-empty `layers` (one per layer) replaces
  // w.layers, e.g. with dequantized matrices; the embedding, final norm and
  // classifier always come from `w`. RoPE must cover whole heads
  // (rope_dim == head_dim); anything else aborts.
  explicit ReferenceLlama(const ModelWeightsF32& w, std::vector<LayerWeightsF32> layers = {},
                          int max_positions = 0)
      : w_(w),
        c_(w.config),
        layers_(layers.empty() ? w.layers : std::move(layers)),
        max_pos_(max_positions > 0 ? max_positions : c_.seq_len) {
    if (c_.rope_dim != c_.head_dim || layers_.size() != size_t(c_.n_layers) ||
        (!c_.rope_freq_factors.empty() && c_.rope_freq_factors.size() != size_t(c_.head_dim / 2))) {
      Fail("RoPE over whole heads, head_dim / 2 frequency factors and one entry per layer");
    }
    const size_t kv_dim = size_t(c_.kv_dim());
    key_cache_.assign(size_t(c_.n_layers) * max_pos_ * kv_dim, 0.0f);
    value_cache_ = key_cache_;
  }

  // Logits (vocab_size) of `token` at position `pos`. Positions run in order
  // 0, 1, ...: each writes its keys and values into the cache.
  std::vector<float> Forward(int token, int pos) {
    if (token < 0 || token >= c_.vocab_size || pos < 0 || pos >= max_pos_) {
      Fail("a token below vocab_size and a position below max_positions");
    }
    const int dim = c_.dim, hs = c_.head_dim, kv_dim = c_.kv_dim(), q_dim = c_.q_dim();
    const int kv_mul = c_.n_heads / c_.n_kv_heads;
    std::vector<float> x(w_.token_embedding + size_t(token) * dim,
                         w_.token_embedding + size_t(token + 1) * dim);
    std::vector<float> xb(std::max(dim, q_dim)), xb2(dim), q(q_dim), hb(c_.hidden_dim),
        hb2(c_.hidden_dim), att(pos + 1);
    for (int l = 0; l < c_.n_layers; ++l) {
      const LayerWeightsF32& L = layers_[l];
      // Attention: q, k, v of the normed input; k and v go to the cache.
      RmsNorm(xb.data(), x.data(), L.attn_norm, dim);
      float* k = KeyAt(l, pos);
      float* v = ValueAt(l, pos);
      MatMul(q.data(), xb.data(), L.wq, dim, q_dim);
      MatMul(k, xb.data(), L.wk, dim, kv_dim);
      MatMul(v, xb.data(), L.wv, dim, kv_dim);
      AddBias(q.data(), L.bq, q_dim);
      AddBias(k, L.bk, kv_dim);
      AddBias(v, L.bv, kv_dim);
      // RoPE: rotate pair p of every head of q and k by pos * freq_p, with
      // freq_p = theta^(-2p / hs) / factor_p / linear factor. Pair p is
      // (2p, 2p + 1) (adjacent, llama2.c) or (p, p + hs / 2) (half-split).
      const bool half_split = c_.rope_layout == RopeLayout::kHalfSplit;
      for (int i = 0; i < q_dim; i += 2) {
        const int head = i / hs, p = (i % hs) / 2;
        float freq = 1.0f / powf(c_.rope_theta, (2 * p) / static_cast<float>(hs));
        if (!c_.rope_freq_factors.empty()) freq /= c_.rope_freq_factors[p];
        if (c_.rope_linear_factor != 1.0f) freq /= c_.rope_linear_factor;
        const float val = pos * freq;
        const float fcr = cosf(val), fci = sinf(val);
        const int i0 = head * hs + (half_split ? p : 2 * p);
        const int i1 = head * hs + (half_split ? p + hs / 2 : 2 * p + 1);
        const int rotn = i < kv_dim ? 2 : 1;  // k is narrower than q under GQA
        for (int r = 0; r < rotn; ++r) {
          float* vec = r == 0 ? q.data() : k;
          const float v0 = vec[i0], v1 = vec[i1];
          vec[i0] = v0 * fcr - v1 * fci;
          vec[i1] = v0 * fci + v1 * fcr;
        }
      }
      // Each query head attends to every cached position of its KV head.
      for (int h = 0; h < c_.n_heads; ++h) {
        const float* qh = q.data() + h * hs;
        for (int t = 0; t <= pos; ++t) {
          const float* kt = KeyAt(l, t) + (h / kv_mul) * hs;
          float score = 0.0f;
          for (int i = 0; i < hs; ++i) score += qh[i] * kt[i];
          att[t] = score / sqrtf(static_cast<float>(hs));
        }
        Softmax(att.data(), pos + 1);
        float* out = xb.data() + h * hs;
        std::fill(out, out + hs, 0.0f);
        for (int t = 0; t <= pos; ++t) {
          const float* vt = ValueAt(l, t) + (h / kv_mul) * hs;
          for (int i = 0; i < hs; ++i) out[i] += att[t] * vt[i];
        }
      }
      MatMul(xb2.data(), xb.data(), L.wo, q_dim, dim);
      for (int i = 0; i < dim; ++i) x[i] += xb2[i];
      // FFN: w2(silu(w1 x) * w3 x) of the normed input.
      RmsNorm(xb.data(), x.data(), L.ffn_norm, dim);
      MatMul(hb.data(), xb.data(), L.w1, dim, c_.hidden_dim);
      MatMul(hb2.data(), xb.data(), L.w3, dim, c_.hidden_dim);
      for (int i = 0; i < c_.hidden_dim; ++i) {
        float val = hb[i];
        val *= 1.0f / (1.0f + expf(-val));
        hb[i] = val * hb2[i];
      }
      MatMul(xb.data(), hb.data(), L.w2, c_.hidden_dim, dim);
      for (int i = 0; i < dim; ++i) x[i] += xb[i];
    }
    RmsNorm(x.data(), x.data(), w_.final_norm, dim);
    std::vector<float> logits(c_.vocab_size);
    MatMul(logits.data(), x.data(), w_.classifier, dim, c_.vocab_size);
    return logits;
  }

 private:
  // Cache layout: [layer][position][kv_dim].
  float* KeyAt(int l, int pos) {
    return &key_cache_[(size_t(l) * max_pos_ + pos) * size_t(c_.kv_dim())];
  }
  float* ValueAt(int l, int pos) {
    return &value_cache_[(size_t(l) * max_pos_ + pos) * size_t(c_.kv_dim())];
  }

  void RmsNorm(float* o, const float* x, const float* weight, int size) const {
    float ss = 0.0f;
    for (int j = 0; j < size; ++j) ss += x[j] * x[j];
    ss /= size;
    ss += c_.norm_eps;
    ss = 1.0f / sqrtf(ss);
    for (int j = 0; j < size; ++j) o[j] = weight[j] * (ss * x[j]);
  }
  static void Softmax(float* x, int size) {
    float max_val = x[0];
    for (int i = 1; i < size; ++i) max_val = std::max(max_val, x[i]);
    float sum = 0.0f;
    for (int i = 0; i < size; ++i) {
      x[i] = expf(x[i] - max_val);
      sum += x[i];
    }
    for (int i = 0; i < size; ++i) x[i] /= sum;
  }
  // x (n) += bias (n), unless bias is null.
  static void AddBias(float* x, const float* bias, int n) {
    if (bias == nullptr) return;
    for (int i = 0; i < n; ++i) x[i] += bias[i];
  }
  // W (d, n) row-major [out, in] @ x (n) -> xout (d).
  static void MatMul(float* xout, const float* x, const float* w, int n, int d) {
    for (int i = 0; i < d; ++i) {
      float val = 0.0f;
      for (int j = 0; j < n; ++j) val += w[size_t(i) * n + j] * x[j];
      xout[i] = val;
    }
  }
  [[noreturn]] static void Fail(const char* needs) {
    fprintf(stderr, "ReferenceLlama needs %s\n", needs);
    abort();
  }

  const ModelWeightsF32& w_;
  ModelConfig c_;
  std::vector<LayerWeightsF32> layers_;
  int max_pos_;
  std::vector<float> key_cache_, value_cache_;
};

// ---------------------------------------------------------------------------
// Comparing next-token distributions

// The distribution softmax(logits) in double: exp(l - max) / sum.
inline std::vector<double> SoftmaxF64(const float* logits, size_t n) {
  double max = -HUGE_VAL;
  for (size_t i = 0; i < n; ++i) max = std::max(max, double(logits[i]));
  std::vector<double> p(n);
  double sum = 0.0;
  for (size_t i = 0; i < n; ++i) sum += (p[i] = std::exp(double(logits[i]) - max));
  for (double& v : p) v /= sum;
  return p;
}
inline std::vector<double> SoftmaxF64(const std::vector<float>& logits) {
  return SoftmaxF64(logits.data(), logits.size());
}

// The greedy token of a logits vector (lutra::ArgmaxLogit, quantize/quality.h).
inline int Argmax(const std::vector<float>& logits) {
  return int(ArgmaxLogit(logits.data(), logits.size()));
}

}  // namespace test
}  // namespace lutra

#endif  // LUTRA_TESTS_SUPPORT_REFERENCE_LLAMA_H_
