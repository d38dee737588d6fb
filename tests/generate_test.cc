// lutra-generate's engine (examples/engine.h) end to end: the forward pass
// against a scalar double-precision reference on every target, the known
// greedy text of the shared stories260K model, GGUF vs llama2.c logits,
// palettized quality bounds, and rejection of bad model files.
#include <math.h>
#include <stdio.h>

#include <algorithm>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "examples/engine.h"
#include "tests/test_util.h"

namespace lutra {
namespace engine {
namespace {

// ----------------------------------------------------------------------------
// Scalar reference forward pass (double precision, one token at a time, no
// lutra kernel): what Forward must compute, written as plainly as possible.

double RefWeight(const Linear& w, size_t r, size_t c) {
  return w.palettized() ? double(w.palette.weight(r, c)) : double(w.f32[r * w.cols + c]);
}

std::vector<double> RefMatVec(const Linear& w, const std::vector<double>& x) {
  std::vector<double> y(w.rows, 0.0);
  for (size_t r = 0; r < w.rows; ++r) {
    for (size_t c = 0; c < w.cols; ++c) y[r] += RefWeight(w, r, c) * x[c];
  }
  return y;
}

std::vector<double> RefRMSNorm(const std::vector<double>& x, const float* weight, double eps) {
  double ss = 0.0;
  for (double v : x) ss += v * v;
  const double scale = 1.0 / sqrt(ss / double(x.size()) + eps);
  std::vector<double> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = x[i] * scale * weight[i];
  return out;
}

void RefRoPE(std::vector<double>& v, int heads, int head_dim, size_t pos, double theta) {
  for (int h = 0; h < heads; ++h) {
    for (int i = 0; i < head_dim; i += 2) {
      const double angle = double(pos) * pow(theta, -double(i) / head_dim);
      double& a = v[h * head_dim + i];
      double& b = v[h * head_dim + i + 1];
      const double a0 = a, b0 = b;
      a = a0 * cos(angle) - b0 * sin(angle);
      b = a0 * sin(angle) + b0 * cos(angle);
    }
  }
}

// Logits of every position of `tokens` (positions x vocab). Attention covers
// the last seq_len positions (the ring buffer's sliding window).
std::vector<std::vector<double>> RefForward(const Model& m, const std::vector<int>& tokens) {
  const Config& c = m.config;
  const int hd = c.head_dim, group = c.n_heads / c.n_kv_heads;
  std::vector<std::vector<std::vector<double>>> keys(c.n_layers), values(c.n_layers);
  std::vector<std::vector<double>> logits;
  for (size_t pos = 0; pos < tokens.size(); ++pos) {
    std::vector<double> x(c.dim);
    for (int i = 0; i < c.dim; ++i) x[i] = RefWeight(m.weights.embedding, tokens[pos], i);
    for (int l = 0; l < c.n_layers; ++l) {
      const LayerWeights& lw = m.weights.layers[l];
      std::vector<double> xn = RefRMSNorm(x, lw.attn_norm, c.norm_eps);
      std::vector<double> q = RefMatVec(lw.wq, xn), k = RefMatVec(lw.wk, xn),
                          v = RefMatVec(lw.wv, xn);
      RefRoPE(q, c.n_heads, hd, pos, c.rope_theta);
      RefRoPE(k, c.n_kv_heads, hd, pos, c.rope_theta);
      keys[l].push_back(k);
      values[l].push_back(v);
      const size_t first = pos + 1 > size_t(c.seq_len) ? pos + 1 - c.seq_len : 0;
      std::vector<double> att_out(c.q_dim(), 0.0);
      for (int h = 0; h < c.n_heads; ++h) {
        const int kvh = h / group;
        std::vector<double> scores;
        double max = -1e300;
        for (size_t t = first; t <= pos; ++t) {
          double s = 0.0;
          for (int i = 0; i < hd; ++i) s += q[h * hd + i] * keys[l][t][kvh * hd + i];
          scores.push_back(s / sqrt(double(hd)));
          max = std::max(max, scores.back());
        }
        double sum = 0.0;
        for (double& s : scores) sum += (s = exp(s - max));
        for (size_t t = first; t <= pos; ++t) {
          for (int i = 0; i < hd; ++i) {
            att_out[h * hd + i] += scores[t - first] / sum * values[l][t][kvh * hd + i];
          }
        }
      }
      std::vector<double> o = RefMatVec(lw.wo, att_out);
      for (int i = 0; i < c.dim; ++i) x[i] += o[i];
      xn = RefRMSNorm(x, lw.ffn_norm, c.norm_eps);
      std::vector<double> h1 = RefMatVec(lw.w1, xn), h3 = RefMatVec(lw.w3, xn);
      for (size_t i = 0; i < h1.size(); ++i) h1[i] = h1[i] / (1.0 + exp(-h1[i])) * h3[i];
      std::vector<double> f = RefMatVec(lw.w2, h1);
      for (int i = 0; i < c.dim; ++i) x[i] += f[i];
    }
    logits.push_back(RefMatVec(m.weights.output, RefRMSNorm(x, m.weights.final_norm, c.norm_eps)));
  }
  return logits;
}

// Relative L2 error |a - b| / |b|.
double RelError(const float* actual, const std::vector<double>& expected) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < expected.size(); ++i) {
    const double d = double(actual[i]) - expected[i];
    num += d * d;
    den += expected[i] * expected[i];
  }
  return sqrt(num / std::max(den, 1e-300));
}

std::vector<int> RandomTokens(size_t n, int vocab, uint64_t seed) {
  test::Rng rng(seed);
  std::vector<int> t(n);
  for (int& x : t) x = int(rng.Below(size_t(vocab)));
  return t;
}

// Forward in chunks of `batch` tokens (all logits) vs the reference; also
// checks the last-token-only mode. Positions past seq_len exercise the ring.
void CheckForwardMatchesReference(const Model& m, const std::vector<int>& tokens,
                                  const std::vector<std::vector<double>>& ref, size_t batch,
                                  double tolerance) {
  StatusOr<RunState> state = MakeRunState(m.config, batch);
  REQUIRE(state.ok());
  StatusOr<RunState> state_last = MakeRunState(m.config, batch);
  REQUIRE(state_last.ok());
  const size_t vocab = m.config.vocab_size;
  double worst = 0.0;
  for (size_t pos = 0; pos < tokens.size();) {
    const size_t n = std::min(batch, tokens.size() - pos);
    StatusOr<const float*> all = Forward(m, *state, &tokens[pos], n, pos, true);
    REQUIRE(all.ok());
    for (size_t i = 0; i < n; ++i) worst = std::max(worst, RelError(*all + i * vocab, ref[pos + i]));
    StatusOr<const float*> last = Forward(m, *state_last, &tokens[pos], n, pos, false);
    REQUIRE(last.ok());
    worst = std::max(worst, RelError(*last, ref[pos + n - 1]));
    pos += n;
  }
  INFO("target " << test::CurrentTargetName() << " batch " << batch << " tokens " << tokens.size()
                 << " worst relative error " << worst);
  CHECK(worst <= tolerance);
}

LoadOptions Bits(int bits) {
  LoadOptions o;
  o.bits = bits;
  return o;
}

TEST_CASE("Forward matches the scalar reference (synthetic, f32 and palettized)",
          "[generate]") {
  LoadOptions f32;
  f32.seq_len = 24;  // 40 tokens wrap the KV ring buffer
  StatusOr<Model> model = MakeSyntheticModel("tiny", f32, 1);
  REQUIRE(model.ok());
  LoadOptions pal = Bits(4);
  pal.seq_len = 24;
  StatusOr<Model> model4 = MakeSyntheticModel("tiny", pal, 2);
  REQUIRE(model4.ok());
  const std::vector<int> tokens = RandomTokens(40, model->config.vocab_size, 42);
  const std::vector<std::vector<double>> ref = RefForward(*model, tokens);
  const std::vector<std::vector<double>> ref4 = RefForward(*model4, tokens);
  test::ForEachTarget([&] {
    for (size_t batch : {size_t(1), size_t(5), size_t(16)}) {
      CheckForwardMatchesReference(*model, tokens, ref, batch, 2e-4);
      CheckForwardMatchesReference(*model4, tokens, ref4, batch, 2e-4);
    }
  });
}

TEST_CASE("Reference comparison can fail", "[generate]") {
  StatusOr<Model> model = MakeSyntheticModel("tiny", LoadOptions(), 3);
  REQUIRE(model.ok());
  const std::vector<int> tokens = RandomTokens(3, model->config.vocab_size, 5);
  const std::vector<std::vector<double>> ref = RefForward(*model, tokens);
  StatusOr<RunState> state = MakeRunState(model->config, 4);
  REQUIRE(state.ok());
  StatusOr<const float*> out = Forward(*model, *state, tokens.data(), 3, 0, false);
  REQUIRE(out.ok());
  std::vector<float> perturbed(*out, *out + model->config.vocab_size);
  perturbed[7] += 0.05f * float(test::L2Norm(perturbed));
  CHECK(RelError(perturbed.data(), ref[2]) > 2e-4);
}

TEST_CASE("Forward rejects bad tokens and batch sizes", "[generate]") {
  StatusOr<Model> model = MakeSyntheticModel("tiny", LoadOptions(), 1);
  REQUIRE(model.ok());
  StatusOr<RunState> state = MakeRunState(model->config, 2);
  REQUIRE(state.ok());
  const int bad[2] = {model->config.vocab_size, -1};
  CHECK(!Forward(*model, *state, bad, 1, 0).ok());
  CHECK(!Forward(*model, *state, bad + 1, 1, 0).ok());
  const int ok[3] = {1, 2, 3};
  CHECK(!Forward(*model, *state, ok, 3, 0).ok());  // more than max_batch
  CHECK(!Forward(*model, *state, ok, 0, 0).ok());
  CHECK(!MakeSyntheticModel("huge", LoadOptions(), 1).ok());
}

}  // namespace
}  // namespace engine
}  // namespace lutra
