// lutra-generate's engine (examples/engine.h) end to end: the forward pass
// against a scalar double-precision reference on every target, the known
// greedy text of the shared stories260K model, GGUF vs llama2.c logits,
// palettized quality bounds, and rejection of bad model files.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include <map>
#include <utility>

#include "examples/engine.h"
#include "lutra/format/gguf_writer.h"
#include "lutra/format/lora_file.h"
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

// Dense copies of the weights, made once per RefForward (decoding a
// palettized weight per use would dominate the test's run time).
// With a LoRA delta, the dense matrix is W + scale * B A.
using DenseCache = std::map<const Linear*, std::vector<double>>;
const std::vector<double>& DenseWeights(const Linear& w, DenseCache& cache,
                                        const LoraDelta* lora = nullptr) {
  std::vector<double>& dense = cache[&w];
  if (dense.empty()) {
    dense.resize(w.rows * w.cols);
    for (size_t r = 0; r < w.rows; ++r) {
      for (size_t c = 0; c < w.cols; ++c) dense[r * w.cols + c] = RefWeight(w, r, c);
    }
    if (lora != nullptr) {
      for (size_t r = 0; r < w.rows; ++r) {
        for (size_t c = 0; c < w.cols; ++c) {
          double ba = 0.0;
          for (size_t k = 0; k < lora->rank; ++k) {
            ba += double(LoadElement(lora->b, lora->type, r * lora->rank + k)) *
                  double(LoadElement(lora->a, lora->type, k * w.cols + c));
          }
          dense[r * w.cols + c] += double(lora->scale) * ba;
        }
      }
    }
  }
  return dense;
}

std::vector<double> RefMatVec(const Linear& w, const std::vector<double>& x, DenseCache& cache,
                              const LoraDelta* lora = nullptr) {
  const std::vector<double>& dense = DenseWeights(w, cache, lora);
  std::vector<double> y(w.rows, 0.0);
  for (size_t r = 0; r < w.rows; ++r) {
    for (size_t c = 0; c < w.cols; ++c) y[r] += dense[r * w.cols + c] * x[c];
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
std::vector<std::vector<double>> RefForward(const Model& m, const std::vector<int>& tokens,
                                           const Adapter* adapter = nullptr) {
  const ModelConfig& c = m.config;
  const int hd = c.head_dim, group = c.n_heads / c.n_kv_heads;
  std::vector<std::vector<std::vector<double>>> keys(c.n_layers), values(c.n_layers);
  std::vector<std::vector<double>> logits;
  DenseCache dense;
  for (size_t pos = 0; pos < tokens.size(); ++pos) {
    std::vector<double> x(c.dim);
    for (int i = 0; i < c.dim; ++i) x[i] = RefWeight(m.weights.embedding, tokens[pos], i);
    for (int l = 0; l < c.n_layers; ++l) {
      const LayerWeights& lw = m.weights.layers[l];
      auto lora = [&](Projection p) { return adapter ? adapter->Find(l, p) : nullptr; };
      std::vector<double> xn = RefRMSNorm(x, lw.attn_norm, c.norm_eps);
      std::vector<double> q = RefMatVec(lw.wq, xn, dense, lora(Projection::kQ)), k = RefMatVec(lw.wk, xn, dense, lora(Projection::kK)),
                          v = RefMatVec(lw.wv, xn, dense, lora(Projection::kV));
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
      std::vector<double> o = RefMatVec(lw.wo, att_out, dense, lora(Projection::kO));
      for (int i = 0; i < c.dim; ++i) x[i] += o[i];
      xn = RefRMSNorm(x, lw.ffn_norm, c.norm_eps);
      std::vector<double> h1 = RefMatVec(lw.w1, xn, dense, lora(Projection::kW1)), h3 = RefMatVec(lw.w3, xn, dense, lora(Projection::kW3));
      for (size_t i = 0; i < h1.size(); ++i) h1[i] = h1[i] / (1.0 + exp(-h1[i])) * h3[i];
      std::vector<double> f = RefMatVec(lw.w2, h1, dense, lora(Projection::kW2));
      for (int i = 0; i < c.dim; ++i) x[i] += f[i];
    }
    logits.push_back(RefMatVec(m.weights.output, RefRMSNorm(x, m.weights.final_norm, c.norm_eps), dense));
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
                                  MatmulPrecision precision, double tolerance) {
  StatusOr<RunState> state = MakeRunState(m.config, batch);
  REQUIRE(state.ok());
  StatusOr<RunState> state_last = MakeRunState(m.config, batch);
  REQUIRE(state_last.ok());
  state->precision = state_last->precision = precision;
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
  INFO("target " << test::CurrentTargetName() << " batch " << batch << " precision "
                 << MatmulPrecisionName(precision) << " tokens " << tokens.size()
                 << " worst relative error " << worst);
  CHECK(worst <= tolerance);
}

// Palettizing at `bits`, calibrated on 256 sampled tokens (the default 2048
// costs the tests seconds, minutes under qemu, and the bounds here do not
// need it; the calibrated-quality test below uses more). Under qemu and the
// sanitizers (LUTRA_TEST_QUICK) 32 tokens: sampling them runs the f32 model
// token by token, which emulated SVE made the bulk of generate_test's time.
LoadOptions Bits(int bits) {
  LoadOptions o;
  o.bits = bits;
  o.calib_tokens = getenv("LUTRA_TEST_QUICK") != nullptr ? 32 : 256;
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
      CheckForwardMatchesReference(*model, tokens, ref, batch, MatmulPrecision::kF32, 2e-4);
      // Palettized: exact codebook values (f32 path) match to rounding; the
      // int8 path quantizes activations to 8 bits per block and codebooks to
      // u8 steps (matmul.h): measured worst 4.5e-2 over 40 tokens, 4 layers.
      CheckForwardMatchesReference(*model4, tokens, ref4, batch, MatmulPrecision::kF32, 2e-4);
      CheckForwardMatchesReference(*model4, tokens, ref4, batch, MatmulPrecision::kInt8, 8e-2);
    }
  });
}

// A random adapter on every projection of every layer (rank 3, f16).
std::shared_ptr<const Adapter> RandomAdapter(const Model& m, uint64_t seed) {
  test::Rng rng(seed);
  StatusOr<Adapter> a = Adapter::Create("random", AdapterShapes(m.config));
  REQUIRE(a.ok());
  const BaseShapes shapes = AdapterShapes(m.config);
  const size_t rank = 3;
  for (int l = 0; l < m.config.n_layers; ++l) {
    for (Projection p : kAllProjections) {
      const std::vector<float> A = rng.GaussianVector(rank * shapes.Cols(p), 0.05f);
      const std::vector<float> B = rng.GaussianVector(shapes.Rows(p) * rank, 0.05f);
      REQUIRE(a->AddFactors(l, p, rank, A.data(), A.size(), B.data(), B.size(), ElementType::kF32,
                            ElementType::kF16, 0.5f)
                  .ok());
    }
  }
  return std::make_shared<const Adapter>(std::move(*a));
}

TEST_CASE("LoRA adapters: f32 and fused palettized paths match the reference",
          "[generate][lora]") {
  StatusOr<Model> f32 = MakeSyntheticModel("tiny", LoadOptions(), 4);
  StatusOr<Model> q4 = MakeSyntheticModel("tiny", Bits(4), 5);
  REQUIRE((f32.ok() && q4.ok()));
  const std::shared_ptr<const Adapter> adapter = RandomAdapter(*f32, 6);
  const std::vector<int> tokens = RandomTokens(12, f32->config.vocab_size, 7);
  const auto ref = RefForward(*f32, tokens, adapter.get());
  const auto ref4 = RefForward(*q4, tokens, adapter.get());
  const auto plain = RefForward(*f32, tokens);
  test::ForEachTarget([&] {
    for (size_t batch : {size_t(1), size_t(5)}) {
      for (const Model* m : {&*f32, &*q4}) {
        StatusOr<RunState> s = MakeRunState(m->config, batch);
        REQUIRE(s.ok());
        s->precision = MatmulPrecision::kF32;
        s->adapter = adapter.get();
        double worst = 0.0, moved = 0.0;
        for (size_t pos = 0; pos < tokens.size(); pos += batch) {
          const size_t n = std::min(batch, tokens.size() - pos);
          StatusOr<const float*> out = Forward(*m, *s, &tokens[pos], n, pos, true);
          REQUIRE(out.ok());
          for (size_t i = 0; i < n; ++i) {
            const float* row = *out + i * m->config.vocab_size;
            worst = std::max(worst, RelError(row, (m == &*f32 ? ref : ref4)[pos + i]));
            if (m == &*f32) moved = std::max(moved, RelError(row, plain[pos + i]));
          }
        }
        INFO("batch " << batch << (m == &*f32 ? " f32" : " 4-bit") << " worst " << worst);
        CHECK(worst <= 2e-4);
        if (m == &*f32) CHECK(moved > 1e-2);  // the adapter really changes the output
      }
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
  // A run state made for another model is refused, not overrun.
  LoadOptions longer;
  longer.seq_len = 512;
  StatusOr<Model> other = MakeSyntheticModel("tiny", longer, 1);
  REQUIRE(other.ok());
  CHECK(!Forward(*other, *state, ok, 1, 0).ok());
}

// ----------------------------------------------------------------------------
// Shared stories260K model (tests SKIP without ../shared/models)

const char kZooText[] =
    "Zoo was a little girl named Lily. She loved to play outside in the park. One day, she saw "
    "a big, red ball. She wanted to play with it, but she didn't want to play with";

std::string SharedPath(const char* name) { return test::SharedModelsDir() + "/" + name; }

#define LUTRA_REQUIRE_SHARED_MODELS()                                              \
  if (test::SharedModelsDir().empty()) {                                           \
    SKIP("shared models not found (set LUTRA_SHARED_MODELS_DIR, see README.md)");  \
  }

// Greedy text (prompt echoed, as lutra-generate prints it) for `steps` positions.
std::string GreedyText(const Model& m, const Tokenizer& tok, const std::string& prompt,
                       size_t steps, size_t batch = 8,
                       MatmulPrecision precision = MatmulPrecision::kF32) {
  StatusOr<std::vector<int>> tokens = tok.Encode(prompt, true);
  REQUIRE(tokens.ok());
  StatusOr<RunState> state = MakeRunState(m.config, batch);
  REQUIRE(state.ok());
  state->precision = precision;
  StatusOr<std::string> text = tok.DecodeAll(*tokens);
  REQUIRE(text.ok());
  std::string out = *text;
  Sampler sampler = Sampler::Create(m.config.vocab_size, SamplingConfig{0.0f}).value();
  Status s = Generate(m, *state, *tokens, steps, sampler, {tok.bos_id(), tok.eos_id()},
                      [&](int prev, int token) {
                        StatusOr<std::string_view> piece = tok.Decode(prev, token);
                        REQUIRE(piece.ok());
                        out += std::string(*piece);
                      },
                      nullptr);
  REQUIRE(s.ok());
  return out;
}

TEST_CASE("stories260K.bin greedy text matches llama2.c on every target", "[generate][shared]") {
  LUTRA_REQUIRE_SHARED_MODELS();
  StatusOr<Model> model = OpenModel(SharedPath("stories260K.bin"), LoadOptions());
  REQUIRE(model.ok());
  StatusOr<std::shared_ptr<const Tokenizer>> tok = LoadTokenizer(SharedPath("tok512.bin"), *model);
  REQUIRE(tok.ok());
  StatusOr<std::vector<int>> prompt = (*tok)->Encode("Zoo", true);
  REQUIRE(prompt.ok());
  CHECK(*prompt == std::vector<int>({1, 410, 469, 347}));
  test::ForEachTarget([&] {
    // Decode one token at a time (batch 1) and with batched prefill.
    CHECK(GreedyText(*model, **tok, "Zoo", 60, 1) == kZooText);
    CHECK(GreedyText(*model, **tok, "Zoo", 60, 8) == kZooText);
  });
}

TEST_CASE("stories260K.gguf gives the logits of stories260K.bin", "[generate][shared]") {
  LUTRA_REQUIRE_SHARED_MODELS();
  StatusOr<Model> bin = OpenModel(SharedPath("stories260K.bin"), LoadOptions());
  REQUIRE(bin.ok());
  StatusOr<Model> gguf = OpenModel(SharedPath("stories260K.gguf"), LoadOptions());
  REQUIRE(gguf.ok());
  REQUIRE(gguf->tokenizer);  // the vocabulary comes from the GGUF metadata
  StatusOr<std::vector<int>> prompt = gguf->tokenizer->Encode("Zoo", true);
  REQUIRE(prompt.ok());
  CHECK(*prompt == std::vector<int>({1, 410, 469, 347}));
  CHECK(GreedyText(*gguf, *gguf->tokenizer, "Zoo", 60) == kZooText);
  const std::vector<int> tokens = RandomTokens(24, bin->config.vocab_size, 9);
  StatusOr<RunState> s1 = MakeRunState(bin->config, 24), s2 = MakeRunState(gguf->config, 24);
  REQUIRE((s1.ok() && s2.ok()));
  StatusOr<const float*> l1 = Forward(*bin, *s1, tokens.data(), 24, 0, true);
  StatusOr<const float*> l2 = Forward(*gguf, *s2, tokens.data(), 24, 0, true);
  REQUIRE((l1.ok() && l2.ok()));
  const size_t n = 24 * size_t(bin->config.vocab_size);
  const std::vector<double> expected(*l1, *l1 + n);
  CHECK(RelError(*l2, expected) <= 1e-5);
}

// stories260K f32 and palettized at `bits` (cached: palettizing at 8 bits
// with the DP-optimal init is the slow part of this test).
const Model& Stories(int bits) {
  static std::map<int, std::unique_ptr<Model>> cache;
  std::unique_ptr<Model>& m = cache[bits];
  if (!m) {
    StatusOr<Model> f32 = OpenModel(SharedPath("stories260K.bin"), LoadOptions());
    REQUIRE(f32.ok());
    if (bits == 0) {
      m = std::make_unique<Model>(std::move(*f32));
    } else {
      StatusOr<Model> q = PalettizeModel(*f32, Bits(bits), /*threads=*/2);
      REQUIRE(q.ok());
      m = std::make_unique<Model>(std::move(*q));
    }
  }
  return *m;
}

TEST_CASE("8-bit palettized stories260K keeps the f32 greedy text", "[generate][shared]") {
  LUTRA_REQUIRE_SHARED_MODELS();
  const Model* model = &Stories(8);
  StatusOr<std::shared_ptr<const Tokenizer>> tok = LoadTokenizer(SharedPath("tok512.bin"), *model);
  REQUIRE(tok.ok());
  // Exact codebook values (MatmulPrecision::kF32) keep the text. The int8
  // kernels' activation quantization moves a near-tie after ~12 tokens
  // ("play outside in the park" -> "play with her toys"); its quality is
  // bounded by KL in the next test instead.
  test::ForEachTarget([&] {
    CHECK(GreedyText(*model, **tok, "Zoo", 60, 1, MatmulPrecision::kF32) == kZooText);
    CHECK(GreedyText(*model, **tok, "Zoo", 60, 8, MatmulPrecision::kF32) == kZooText);
  });
}

// Quality of palettized stories260K against f32 on its own greedy story.
TEST_CASE("Palettized stories260K: KL divergence bounds", "[generate][shared]") {
  LUTRA_REQUIRE_SHARED_MODELS();
  const Model* f32 = &Stories(0);
  StatusOr<std::shared_ptr<const Tokenizer>> tok = LoadTokenizer(SharedPath("tok512.bin"), *f32);
  REQUIRE(tok.ok());
  StatusOr<std::vector<int>> tokens = (*tok)->Encode(std::string(kZooText) + " the ball.", true);
  REQUIRE(tokens.ok());
  struct Case {
    LoadOptions options;
    double max_kl;
    double min_top1;
    MatmulPrecision precision;
  };
  LoadOptions mixed = Bits(0);
  mixed.mixed_bits = 3.5;
  // stories260K is tiny (dim 64): a 16-row codebook costs 2^b / 64 bits per
  // weight and 3-bit rows pad 64 columns to 128, so 3.5 bits per weight buys
  // mostly 2-bit tensors. Measured (AVX3_ZEN4, f32 / int8 kernels): 8-bit KL
  // 0.0003 / 0.004, 4-bit 0.14 (top-1 0.80), mixed 3.5 0.91 (top-1 0.58),
  // uniform 2-bit 3.8 (top-1 0.09). Bounds leave ~2x headroom.
  const MatmulPrecision kF32 = MatmulPrecision::kF32, kInt8 = MatmulPrecision::kInt8;
  const Case cases[] = {{Bits(8), 0.005, 0.95, kF32},
                        {Bits(8), 0.02, 0.9, kInt8},
                        {Bits(4), 0.3, 0.65, kInt8},
                        {mixed, 1.8, 0.4, kInt8}};
  // Under qemu and the sanitizers (LUTRA_TEST_QUICK) the mixed-bit case and
  // the 2-bit check are skipped: the allocator's measured sensitivities took
  // most of generate_test's time there (minutes under qemu), and they are
  // scalar code that the Release run checks on every x86 target.
  const bool quick = getenv("LUTRA_TEST_QUICK") != nullptr;
  double kl4 = 0.0;
  for (const Case& c : cases) {
    if (quick && c.options.mixed_bits > 0.0) continue;
    const Model* q = nullptr;
    std::unique_ptr<Model> owned;
    if (c.options.bits == 8) {
      q = &Stories(8);
    } else {
      StatusOr<Model> m = PalettizeModel(*f32, c.options, 2);
      REQUIRE(m.ok());
      owned = std::make_unique<Model>(std::move(*m));
      q = owned.get();
    }
    StatusOr<EvalResult> r = Evaluate(*f32, *q, *tokens, 16, nullptr, c.precision);
    REQUIRE(r.ok());
    INFO("bits " << c.options.bits << " mixed " << c.options.mixed_bits << " precision "
                 << MatmulPrecisionName(c.precision) << ": bpw "
                 << q->BitsPerWeight() << " KL " << r->mean_kl << " top-1 " << r->top1_agreement
                 << " ppl " << r->perplexity_reference << " -> " << r->perplexity_test);
    CHECK(r->positions == tokens->size() - 1);
    CHECK(r->mean_kl <= c.max_kl);
    CHECK(r->top1_agreement >= c.min_top1);
    CHECK(r->perplexity_test >= 1.0);
    if (c.options.mixed_bits > 0.0) CHECK(q->BitsPerWeight() <= 3.5);
    if (c.options.bits == 4) kl4 = r->mean_kl;
    if (c.options.bits == 8 && c.precision == kF32) {
      // Perplexities of nearly the same model agree.
      CHECK(std::abs(r->perplexity_test / r->perplexity_reference - 1.0) < 0.02);
    }
  }
  if (quick) return;
  // The measure can fail: 2 bits is clearly worse than 4 bits.
  StatusOr<Model> q2 = PalettizeModel(*f32, Bits(2));
  REQUIRE(q2.ok());
  StatusOr<EvalResult> r2 = Evaluate(*f32, *q2, *tokens, 16);
  REQUIRE(r2.ok());
  INFO("2-bit KL " << r2->mean_kl << " 4-bit KL " << kl4);
  CHECK(r2->mean_kl > 3 * kl4);
  // A model against itself: zero KL, full agreement.
  StatusOr<EvalResult> self = Evaluate(*f32, *f32, *tokens, 16);
  REQUIRE(self.ok());
  CHECK(self->mean_kl < 1e-9);
  CHECK(self->top1_agreement == 1.0);
}

// ----------------------------------------------------------------------------
// Bad files

using test::ReadFile;
using test::TempPath;  // removed when the test program exits

std::string WriteTemp(const std::string& name, const std::vector<char>& bytes) {
  const std::string path = TempPath(name);
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), std::streamsize(bytes.size()));
  return path;
}

void ExpectLoadError(const std::string& path, const char* fragment) {
  StatusOr<Model> m = OpenModel(path, LoadOptions());
  INFO(path << ": " << m.status().message());
  REQUIRE(!m.ok());
  CHECK(m.status().message().find(fragment) != std::string::npos);
}

TEST_CASE("Corrupt, truncated and mismatched files are rejected", "[generate][shared]") {
  ExpectLoadError("does/not/exist.bin", "No such file");
  LUTRA_REQUIRE_SHARED_MODELS();
  const std::vector<char> bin = ReadFile(SharedPath("stories260K.bin"));
  const std::vector<char> gguf = ReadFile(SharedPath("stories260K.gguf"));
  REQUIRE((bin.size() > 1000 && gguf.size() > 1000));
  ExpectLoadError(WriteTemp("trunc.bin", std::vector<char>(bin.begin(), bin.end() - 4)),
                  "file size");
  ExpectLoadError(WriteTemp("empty.bin", {}), "llama2c");
  std::vector<char> bad_header = bin;
  bad_header[4 * 3] = 0, bad_header[4 * 3 + 1] = 0;  // n_heads = 0 (low bytes)
  ExpectLoadError(WriteTemp("header.bin", bad_header), "n_heads");
  ExpectLoadError(WriteTemp("trunc.gguf", std::vector<char>(gguf.begin(), gguf.begin() + 3000)),
                  "gguf");
  ExpectLoadError(WriteTemp("trunc2.gguf", std::vector<char>(gguf.begin(), gguf.end() - 100)),
                  "exceeds");
  // A tokenizer for another vocabulary size, and a model file as tokenizer.
  StatusOr<Model> model = OpenModel(SharedPath("stories260K.bin"), LoadOptions());
  REQUIRE(model.ok());
  const std::vector<char> tok = ReadFile(SharedPath("tok512.bin"));
  const std::string short_tok = WriteTemp("tok.bin", std::vector<char>(tok.begin(), tok.end() - 40));
  CHECK(!LoadTokenizer(short_tok, *model).ok());
  CHECK(!LoadTokenizer(SharedPath("stories260K.bin"), *model).ok());
  CHECK(!LoadTokenizer("", *model).ok());  // llama2.c files carry no vocabulary
}

// Calibration-aware palettization (issue 14) on text that calibration never
// saw (tests/data/heldout_story.txt, written for this test). docs/quality.md
// has the figures at the default 2048 calibration tokens (AVX2 host, int8
// kernels): plain 4-bit KL 0.21, calibrated 0.14; --mixed 4.0 with measured
// sensitivity 0.31 against 0.50 with the weighted error only. The bounds
// leave room for the 1024 tokens used here.
TEST_CASE("Calibrated palettization of stories260K: held-out KL, provenance, errors",
          "[generate][shared]") {
  LUTRA_REQUIRE_SHARED_MODELS();
  const Model& f32 = Stories(0);
  StatusOr<std::shared_ptr<const Tokenizer>> tok = LoadTokenizer(SharedPath("tok512.bin"), f32);
  REQUIRE(tok.ok());
  std::string dir = __FILE__;
  dir = dir.substr(0, dir.rfind('/'));
  const std::vector<char> text = ReadFile(dir + "/data/heldout_story.txt");
  REQUIRE(!text.empty());
  StatusOr<std::vector<int>> tokens = (*tok)->Encode(std::string(text.begin(), text.end()), true);
  REQUIRE(tokens.ok());
  tokens->resize(std::min<size_t>(tokens->size(), 256));
  const auto palettize = [&](LoadOptions o) {
    o.calib_tokens = 1024;
    StatusOr<Model> q = PalettizeModel(f32, o, 2);
    REQUIRE(q.ok());
    return std::move(*q);
  };
  const auto kl = [&](const Model& q) {
    StatusOr<EvalResult> r = Evaluate(f32, q, *tokens, 64);
    REQUIRE(r.ok());
    return r->mean_kl;
  };
  // Under qemu and the sanitizers (cmake/test.sh and test-aarch64.sh set
  // LUTRA_TEST_QUICK) the quality figures, scalar math that the Release run
  // checks, would cost minutes: there only the path runs, on few tokens.
  if (getenv("LUTRA_TEST_QUICK") != nullptr) {
    LoadOptions o = Bits(4);
    o.calib_tokens = 32;
    StatusOr<Model> q = PalettizeModel(f32, o, 2);
    REQUIRE(q.ok());
    CHECK(kl(*q) < 1.0);
    return;
  }
  LoadOptions plain = Bits(4);
  plain.calibrate = false;
  const Model q4 = palettize(Bits(4));
  const double kl4 = kl(q4), kl4_plain = kl(palettize(plain));
  INFO("4-bit KL: plain " << kl4_plain << ", calibrated " << kl4 << " (" << q4.quantization
                          << ")");
  CHECK(kl4 < 0.25);
  CHECK(kl4 < 0.9 * kl4_plain);
  CHECK(test::Contains(q4.quantization, "sequential GPTQ, calibrated on 1024 tokens"));
  LoadOptions mixed = Bits(0);
  mixed.mixed_bits = 4.0;
  const Model qm = palettize(mixed);
  CHECK(test::Contains(qm.quantization, "measured sensitivity"));
  CHECK(qm.BitsPerWeight() <= 4.0);
  mixed.sensitivity = Sensitivity::kWeighted;
  const double measured = kl(qm), weighted = kl(palettize(mixed));
  INFO("--mixed 4.0 KL: measured sensitivity " << measured << ", weighted error " << weighted);
  CHECK(measured < 0.45);
  CHECK(measured < 0.75 * weighted);

  // The recipe travels with a .lutra file.
  const std::string path = test::TempPath("calibrated.lutra");
  REQUIRE(SaveLutraModel(q4, tok->get(), path).ok());
  StatusOr<Model> back = OpenModel(path, LoadOptions());
  REQUIRE(back.ok());
  CHECK(back->quantization == q4.quantization);

  // Bad inputs get clear errors.
  CHECK(test::Contains(Calibrate(f32, {}, 16).status().message(), "calibration text is empty"));
  LoadOptions low;
  low.mixed_bits = 0.5;
  CHECK(test::Contains(PalettizeModel(f32, low).status().message(), "within 1..32"));
  LoadOptions zero_g = mixed;
  zero_g.groups = {4, 0};
  CHECK(test::Contains(PalettizeModel(f32, zero_g).status().message(), "G = 0"));
  LoadOptions bad_bos = Bits(4);
  bad_bos.calib_bos = 100000;
  CHECK(test::Contains(PalettizeModel(f32, bad_bos).status().message(),
                       "BOS token 100000 outside the vocabulary"));
}

TEST_CASE("Recovery adapter lowers the KL of 4-bit stories260K; adapter files load",
          "[generate][shared][lora]") {
  LUTRA_REQUIRE_SHARED_MODELS();
  const Model& f32 = Stories(0);
  StatusOr<Model> q4 = PalettizeModel(f32, Bits(4), 2);
  REQUIRE(q4.ok());
  StatusOr<std::shared_ptr<const Adapter>> rec = BuildRecoveryAdapter(f32, *q4, 8, 2);
  REQUIRE(rec.ok());
  StatusOr<std::shared_ptr<const Tokenizer>> tok = LoadTokenizer(SharedPath("tok512.bin"), f32);
  REQUIRE(tok.ok());
  StatusOr<std::vector<int>> tokens = (*tok)->Encode(kZooText, true);
  REQUIRE(tokens.ok());
  StatusOr<EvalResult> base = Evaluate(f32, *q4, *tokens, 16);
  StatusOr<EvalResult> recovered = Evaluate(f32, *q4, *tokens, 16, nullptr,
                                            MatmulPrecision::kInt8, rec->get());
  REQUIRE((base.ok() && recovered.ok()));
  INFO("KL 4-bit " << base->mean_kl << " + recovery rank 8 " << recovered->mean_kl);
  CHECK(recovered->mean_kl < 0.9 * base->mean_kl);
  // Only the projections asked for (LoadOptions::recover_targets), with
  // the same factors as in the full adapter.
  const uint32_t vo2 = 1u << static_cast<unsigned>(Projection::kV) |
                       1u << static_cast<unsigned>(Projection::kO) |
                       1u << static_cast<unsigned>(Projection::kW2);
  StatusOr<std::shared_ptr<const Adapter>> some = BuildRecoveryAdapter(f32, *q4, 8, 2, vo2);
  REQUIRE(some.ok());
  CHECK((*some)->num_targets() == 3 * size_t(f32.config.n_layers));
  const LoraFactors* w2 = (*some)->FindFactors(1, Projection::kW2);
  const LoraFactors* w2_all = (*rec)->FindFactors(1, Projection::kW2);
  REQUIRE((w2 != nullptr && w2_all != nullptr));
  CHECK(w2->A(0, 3) == w2_all->A(0, 3));
  CHECK((*some)->FindFactors(1, Projection::kQ) == nullptr);
  CHECK(test::Contains(BuildRecoveryAdapter(f32, *q4, 8, 2, 0).status().message(),
                       "no projection"));
  // Saved as a llama.cpp-layout adapter file and loaded back: same logits.
  const std::string path = TempPath("recovery.gguf");
  REQUIRE(SaveAdapter(path, **rec).ok());
  StatusOr<std::shared_ptr<const Adapter>> loaded = LoadLora(path, 1.0f, *q4);
  REQUIRE(loaded.ok());
  StatusOr<EvalResult> again = Evaluate(f32, *q4, *tokens, 16, nullptr, MatmulPrecision::kInt8,
                                        loaded->get());
  REQUIRE(again.ok());
  CHECK(std::abs(again->mean_kl - recovered->mean_kl) < 1e-6);
  // An adapter for another model is refused with a clear error.
  StatusOr<Model> tiny = MakeSyntheticModel("tiny", LoadOptions(), 1);
  REQUIRE(tiny.ok());
  StatusOr<std::shared_ptr<const Adapter>> wrong = LoadLora(path, 1.0f, *tiny);
  REQUIRE(!wrong.ok());
  CHECK(!wrong.status().message().empty());
}

// ----------------------------------------------------------------------------
// .lutra files

// Logits of a few random tokens (batched prefill), for comparing models.
std::vector<float> SomeLogits(const Model& m, MatmulPrecision precision) {
  const std::vector<int> tokens = RandomTokens(6, m.config.vocab_size, 11);
  StatusOr<RunState> s = MakeRunState(m.config, 6);
  REQUIRE(s.ok());
  s->precision = precision;
  StatusOr<const float*> out = Forward(m, *s, tokens.data(), tokens.size(), 0, true);
  REQUIRE(out.ok());
  return std::vector<float>(*out, *out + tokens.size() * m.config.vocab_size);
}

TEST_CASE(".lutra files round-trip and map the weights in place", "[generate]") {
  for (int bits : {0, 3, 4}) {
    LoadOptions o = Bits(bits);
    StatusOr<Model> model = MakeSyntheticModel("tiny", o, 21);
    REQUIRE(model.ok());
    StatusOr<Tokenizer> tok = ByteTokenizer(model->config.vocab_size);
    REQUIRE(tok.ok());
    const std::string path = TempPath("tiny" + std::to_string(bits) + ".lutra");
    REQUIRE(SaveLutraModel(*model, &*tok, path).ok());
    StatusOr<Model> loaded = OpenModel(path, LoadOptions());
    INFO("bits " << bits << ": " << loaded.status().message());
    REQUIRE(loaded.ok());
    CHECK(loaded->palettes.empty());        // no copies: views into the mapping
    CHECK(loaded->f32_storage.empty());
    CHECK(loaded->BitsPerWeight() == model->BitsPerWeight());
    CHECK(SomeLogits(*loaded, MatmulPrecision::kF32) == SomeLogits(*model, MatmulPrecision::kF32));
    REQUIRE(loaded->tokenizer);
    StatusOr<std::vector<int>> a = loaded->tokenizer->Encode("hi there", true);
    StatusOr<std::vector<int>> b = tok->Encode("hi there", true);
    REQUIRE((a.ok() && b.ok()));
    CHECK(*a == *b);
    // Palettizing an already palettized file is refused, not silently redone.
    if (bits != 0) CHECK(!OpenModel(path, Bits(4)).ok());
  }
}

TEST_CASE("stories260K as .lutra: same text, bad files rejected", "[generate][shared]") {
  LUTRA_REQUIRE_SHARED_MODELS();
  const Model& q8 = Stories(8);
  StatusOr<std::shared_ptr<const Tokenizer>> tok = LoadTokenizer(SharedPath("tok512.bin"), q8);
  REQUIRE(tok.ok());
  const std::string path = TempPath("stories8.lutra");
  REQUIRE(SaveLutraModel(q8, tok->get(), path).ok());
  StatusOr<Model> loaded = OpenModel(path, LoadOptions());
  REQUIRE(loaded.ok());
  REQUIRE(loaded->tokenizer);  // the vocabulary travels inside the file
  CHECK(GreedyText(*loaded, *loaded->tokenizer, "Zoo", 60) == kZooText);

  const std::vector<char> bytes = ReadFile(path);
  REQUIRE(bytes.size() > 4096);
  ExpectLoadError(WriteTemp("trunc.lutra", std::vector<char>(bytes.begin(), bytes.end() - 1)),
                  "exceeds");
  ExpectLoadError(WriteTemp("half.lutra", std::vector<char>(bytes.begin(), bytes.begin() + 2000)),
                  "gguf");
  // A palette shape that disagrees with the config: patch lutra.palette.token_embd's
  // bits (third u64 of the array) from 8 to 4.
  const std::string key = "lutra.palette.token_embd";
  auto it = std::search(bytes.begin(), bytes.end(), key.begin(), key.end());
  REQUIRE(it != bytes.end());
  std::vector<char> patched = bytes;
  const size_t bits_at = size_t(it - bytes.begin()) + key.size() + 4 + 4 + 8 + 2 * 8;
  REQUIRE(patched[bits_at] == 8);
  patched[bits_at] = 4;
  ExpectLoadError(WriteTemp("bits.lutra", patched), "token_embd");
}


// ----------------------------------------------------------------------------
// Generation counts and chat continuation (engine), then lutra-generate's
// command line (the built binary, when there is one).

TEST_CASE("Generate: stats count forward passes; continuing the cache equals one run",
          "[generate][shared]") {
  LUTRA_REQUIRE_SHARED_MODELS();
  StatusOr<Model> model = OpenModel(SharedPath("stories260K.bin"), LoadOptions());
  REQUIRE(model.ok());
  StatusOr<std::shared_ptr<const Tokenizer>> tok = LoadTokenizer(SharedPath("tok512.bin"), *model);
  REQUIRE(tok.ok());
  const std::vector<int> a = (*tok)->Encode("Zoo", true).value();
  const std::vector<int> b = (*tok)->Encode(" Then the cat", false).value();
  Sampler greedy = Sampler::Create(model->config.vocab_size, SamplingConfig{0.0f}).value();
  StatusOr<RunState> state = MakeRunState(model->config, 8);
  REQUIRE(state.ok());
  // Turn 1: 10 new tokens; the first comes from the prefill, so 9 passes.
  std::vector<int> first;
  GenerateStats st;
  REQUIRE(Generate(*model, *state, a, a.size() + 9, greedy, {}, [&](int, int t) { first.push_back(t); },
                   &st)
              .ok());
  CHECK(st.prompt_tokens == a.size());
  CHECK(st.generated_tokens == 10);
  CHECK(st.decode_forwards == 9);
  CHECK(st.positions == a.size() + 9);
  CHECK(st.stop_token == -1);
  REQUIRE(first.size() == 10);
  // Turn 2 continues the cache at st.positions (the last token of turn 1
  // was sampled, never fed) ...
  std::vector<int> second;
  GenerateStats st2;
  REQUIRE(Generate(*model, *state, b, st.positions + b.size() + 7, greedy, {},
                   [&](int, int t) { second.push_back(t); }, &st2, st.positions)
              .ok());
  CHECK(st2.prompt_tokens == b.size());
  CHECK(st2.generated_tokens == 8);
  // ... and gives what one run over the whole text gives.
  std::vector<int> whole = a;
  whole.insert(whole.end(), first.begin(), first.end() - 1);
  whole.insert(whole.end(), b.begin(), b.end());
  std::vector<int> once;
  StatusOr<RunState> fresh = MakeRunState(model->config, 8);
  REQUIRE(fresh.ok());
  REQUIRE(Generate(*model, *fresh, whole, whole.size() + 7, greedy, {},
                   [&](int, int t) { once.push_back(t); }, nullptr)
              .ok());
  CHECK(second == once);
  // A stop token ends generation after its forward pass, unreported.
  GenerateStats stopped;
  REQUIRE(Generate(*model, *fresh, a, a.size() + 20, greedy, {first[3]}, nullptr, &stopped).ok());
  CHECK(stopped.stop_token == first[3]);
  CHECK(stopped.generated_tokens == 3);
  CHECK(stopped.decode_forwards == 3);
}

#ifdef LUTRA_GENERATE_BIN
struct CliResult {
  int rc = -1;
  std::string out;  // stdout and stderr together
};

// Runs lutra-generate with `args` (each one shell-quoted).
CliResult RunCli(const std::vector<std::string>& args, const std::string& stdin_text = "") {
  std::string cmd = "'" LUTRA_GENERATE_BIN "'";
  for (const std::string& a : args) {
    std::string q = "'";
    for (char c : a) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
    cmd += " " + q + "'";
  }
  if (!stdin_text.empty()) {
    const std::string in = TempPath("cli_stdin.txt");
    std::ofstream(in, std::ios::binary) << stdin_text;
    cmd += " < '" + in + "'";
  } else {
    cmd += " < /dev/null";
  }
  cmd += " 2>&1";
  CliResult r;
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) r.out.append(buf, n);
  const int status = pclose(p);
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

// SKIPs when the binary cannot run here (e.g. a cross build under qemu).
#define LUTRA_REQUIRE_CLI()                                                       \
  LUTRA_REQUIRE_SHARED_MODELS();                                                  \
  if (RunCli({"--help"}).rc != 0) SKIP("cannot run " LUTRA_GENERATE_BIN);

TEST_CASE("lutra-generate: llama.cpp-style flags give the same greedy text", "[generate][cli]") {
  LUTRA_REQUIRE_CLI();
  const std::string bin = SharedPath("stories260K.bin"), tok = SharedPath("tok512.bin");
  const std::string expected = std::string(kZooText) + "\n";
  // Today's long names: --steps counts positions (4 prompt tokens + 56).
  CliResult old = RunCli({"--model", bin, "--tokenizer", tok, "--temp", "0", "--steps", "60",
                          "--prompt", "Zoo"});
  INFO(old.out);
  CHECK(old.rc == 0);
  CHECK(old.out.compare(0, expected.size(), expected) == 0);
  // -n counts new tokens: 57 of them (the last one sampled, never fed).
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"-m", bin, "--tokenizer", tok, "--temp", "0", "-n", "57", "-p",
                                 "Zoo", "-t", "2", "-c", "512", "-s", "3"},
        std::vector<std::string>{"--model=" + bin, "--tokenizer=" + tok, "--temp=0",
                                 "--n-predict=57", "--prompt=Zoo", "--ctx-size=512",
                                 "--top-k=40", "--top-p=0.5", "--min-p=0.1",
                                 "--repeat-last-n=0", "-ctk", "f16", "-ctv", "f16"}}) {
    CliResult r = RunCli(args);
    INFO(r.out);
    CHECK(r.rc == 0);
    CHECK(r.out.compare(0, expected.size(), expected) == 0);
    CHECK(test::Contains(r.out, "generated 57 tokens, decode 56 tokens at"));
  }
  // -f reads the prompt from a file.
  const std::string prompt_file = TempPath("prompt.txt");
  std::ofstream(prompt_file) << "Zoo\n";
  CliResult f = RunCli({"-m", bin, "--tokenizer", tok, "--temp", "0", "-n", "57", "-f", prompt_file});
  CHECK(f.out.compare(0, expected.size(), expected) == 0);
  // Seed 0 is a seed like any other: two runs agree.
  const std::vector<std::string> seeded = {"-m", bin, "--tokenizer", tok, "-n", "30", "-s", "0"};
  const auto text = [](const std::string& out) { return out.substr(0, out.find("stats:")); };
  const std::string s1 = text(RunCli(seeded).out);
  CHECK(s1.size() > 10);
  CHECK(s1 == text(RunCli(seeded).out));
  // The repeat penalty changes greedy text.
  CliResult rep = RunCli({"-m", bin, "--tokenizer", tok, "--temp", "0", "-n", "57", "-p", "Zoo",
                          "--repeat-penalty", "1.5"});
  CHECK(rep.rc == 0);
  CHECK(rep.out.compare(0, expected.size(), expected) != 0);
}

TEST_CASE("lutra-generate: --lora-scaled FILE S is --lora FILE:S", "[generate][cli][lora]") {
  LUTRA_REQUIRE_CLI();
  // A rank-4 recovery adapter of 2-bit stories260K: large enough a delta to
  // change the greedy text.
  LoadOptions two_bit = Bits(2);
  two_bit.calibrate = false;  // plain k-means: fast, and a large enough residual
  StatusOr<Model> q2 = PalettizeModel(Stories(0), two_bit, 2);
  REQUIRE(q2.ok());
  StatusOr<std::shared_ptr<const Adapter>> rec = BuildRecoveryAdapter(Stories(0), *q2, 4, 2);
  REQUIRE(rec.ok());
  const std::string adapter = TempPath("cli_lora.gguf");
  REQUIRE(SaveAdapter(adapter, **rec).ok());
  const std::vector<std::string> base = {"-m", SharedPath("stories260K.bin"), "--tokenizer",
                                         SharedPath("tok512.bin"), "--temp", "0", "-n", "40",
                                         "-p", "Zoo"};
  const auto run = [&base](std::vector<std::string> extra) {
    extra.insert(extra.begin(), base.begin(), base.end());
    CliResult r = RunCli(extra);
    INFO(r.out);
    CHECK(r.rc == 0);
    CHECK(!test::Contains(r.out, "active: none"));
    return r.out.substr(0, r.out.find("stats:"));
  };
  const std::string scaled = run({"--lora-scaled", adapter, "-3"});
  CHECK(scaled == run({"--lora", adapter + ":-3"}));
  CHECK(scaled == run({"--lora-scaled=" + adapter, "-3"}));
  CHECK(scaled != run({"--lora", adapter}));  // scale 1
}

TEST_CASE("lutra-generate: --save writes the recovery adapter beside the model",
          "[generate][cli][lora]") {
  LUTRA_REQUIRE_CLI();
  const std::vector<std::string> make = {"-m", SharedPath("stories260K.bin"), "--tokenizer",
                                         SharedPath("tok512.bin"), "--bits", "2",
                                         "--recover-rank", "2", "--tune", "off"};
  const std::vector<std::string> greedy = {"--temp", "0", "-n", "30", "-p", "Zoo"};
  const std::string path = TempPath("recovered.lutra");
  std::vector<std::string> save = make;
  save.insert(save.end(), {"--save", path});
  CliResult saved = RunCli(save);
  INFO(saved.out);
  REQUIRE(saved.rc == 0);
  CHECK(test::Contains(saved.out, "saved " + path + ".recovery.gguf"));
  // The saved pair runs as the palettized model with its adapter did.
  std::vector<std::string> direct = make, loaded = {"-m", path, "--lora", path + ".recovery.gguf"};
  direct.insert(direct.end(), greedy.begin(), greedy.end());
  loaded.insert(loaded.end(), greedy.begin(), greedy.end());
  CliResult a = RunCli(direct), b = RunCli(loaded);
  INFO(a.out << "\n---\n" << b.out);
  REQUIRE((a.rc == 0 && b.rc == 0));
  CHECK(test::Contains(a.out, "active: recovery"));
  const auto text = [](const std::string& out) {
    const size_t zoo = out.find("Zoo");
    return zoo == std::string::npos ? "" : out.substr(zoo, out.find("stats:") - zoo);
  };
  CHECK(text(a.out).size() > 10);
  CHECK(text(a.out) == text(b.out));
  // --eval-ref: the saved pair evaluated against its f32 source gives the
  // figures of --eval on the source (palettized in the same run).
  std::vector<std::string> eval_direct = make, eval_saved = {"-m", path, "--lora",
                                                              path + ".recovery.gguf", "--eval-ref",
                                                              SharedPath("stories260K.bin")};
  for (auto* v : {&eval_direct, &eval_saved}) v->insert(v->end(), {"--eval", "--seed", "1"});
  CliResult e1 = RunCli(eval_direct), e2 = RunCli(eval_saved);
  INFO(e1.out << "\n---\n" << e2.out);
  REQUIRE((e1.rc == 0 && e2.rc == 0));
  const auto evals = [](const std::string& out) {
    std::string lines;
    for (size_t at = out.find("eval on"); at != std::string::npos; at = out.find("eval on", at + 1)) {
      lines += out.substr(at, out.find('\n', at) - at) + "\n";
    }
    return lines;
  };
  CHECK(test::Contains(evals(e1.out), "palettized + recovery"));
  CHECK(evals(e1.out) == evals(e2.out));
}

// --parallel N decodes the lines of --prompts-file N at a time, each with
// its own cache and sampler: the texts are those of --parallel 1, greedy and
// sampled (same seed), in line order.
TEST_CASE("lutra-generate: --parallel gives each prompt the text it gets alone",
          "[generate][cli][batch]") {
  LUTRA_REQUIRE_CLI();
  const std::string bin = SharedPath("stories260K.bin"), tok = SharedPath("tok512.bin");
  const std::string prompts = TempPath("parallel_prompts.txt");
  std::ofstream(prompts) << "Lily and Ben\nOnce upon a time, there was a dog\n-\tTom went\n"
                            "The sun was hot\n";
  // The output without its stats lines.
  const auto texts = [](const std::string& out) {
    std::string kept;
    size_t at = 0;
    while (at < out.size()) {
      size_t end = out.find('\n', at);
      end = end == std::string::npos ? out.size() : end + 1;
      if (out.compare(at, 6, "stats:") != 0) kept += out.substr(at, end - at);
      at = end;
    }
    return kept;
  };
  // Runs `extra` with --parallel 1 and 3: same texts; returns the two runs.
  const auto both = [&](const std::vector<std::string>& extra) {
    std::vector<std::string> args = {"-m", bin, "--tokenizer", tok, "--bits", "4", "--tune",
                                     "off", "-n", "30", "--prompts-file", prompts};
    args.insert(args.end(), extra.begin(), extra.end());
    std::pair<CliResult, CliResult> r;
    r.first = RunCli(args);
    args.insert(args.end(), {"--parallel", "3"});
    r.second = RunCli(args);
    INFO(r.first.out);
    INFO(r.second.out);
    REQUIRE(r.first.rc == 0);
    REQUIRE(r.second.rc == 0);
    CHECK(texts(r.first.out).size() > 100);
    CHECK(texts(r.second.out) == texts(r.first.out));
    return r;
  };
  for (const char* temp : {"0", "0.8"}) {
    INFO("--temp " << temp);
    const auto [one, three] = both({"--temp", temp, "-s", "5"});
    // Two batches: three lines, then the last one.
    CHECK(test::Contains(three.out, "stats: parallel 3 sequences, prompts"));
    CHECK(test::Contains(three.out, "stats: parallel 1 sequence, prompts"));
    if (std::string(temp) == "0") {
      CHECK(test::Contains(three.out, "decode 87 tokens in 29 batched steps"));
    }
  }
  // With an adapter: --recover-rank makes the recovery adapter the active
  // one, so the first batch mixes it (lines 1, 2) with none (line 3, "-"):
  // one pass with a LoRA delta per token, and still the texts alone.
  const auto [one, three] = both({"--recover-rank", "2", "--temp", "0"});
  CHECK(test::Contains(one.out, "[adapter: recovery]"));
  CHECK(test::Contains(one.out, "[adapter: none]"));
}

TEST_CASE("lutra-generate: bad input gets clear errors", "[generate][cli]") {
  LUTRA_REQUIRE_CLI();
  const std::string bin = SharedPath("stories260K.bin"), tok = SharedPath("tok512.bin");
  const std::string gguf = SharedPath("stories260K.gguf");
  struct Case {
    std::vector<std::string> args;
    const char* message;
  };
  const std::string text_gguf = TempPath("text.gguf");
  std::ofstream(text_gguf) << "hello, not a model\n";
  const Case cases[] = {
      {{"-m", text_gguf}, "not a GGUF file (bad magic 68 65 6c 6c 'hell'"},
      {{"-m", gguf, "--ctx", "100000000"}, "2^20"},
      {{"-m", bin, "--tokenizer", tok, "-n", "1000", "-p", "Zoo"},
       "exceed the context of 512 positions; use -n -1"},
      {{"-m", gguf, "-n", "5", "--steps", "9"}, "exclusive"},
      {{"-m", gguf, "-ctk", "f16", "-ctv", "q8_0"}, "one element type for keys and values"},
      {{"-m", gguf, "-ctk", "q4_0"}, "q8_0"},
      {{"-m", gguf, "--seed", "-2"}, "-1 (random)"},
      {{"-m", gguf, "--eval=yes"}, "--eval takes no value"},
      {{"-m", gguf, "--top-k"}, "--top-k needs a value"},
      {{"-m", gguf, "--lora-scaled", "x.gguf"}, "needs FILE SCALE"},
      {{"-m", gguf, "--lora-scaled", "missing.gguf", "0.5"}, "missing.gguf"},
      {{"-m", gguf, "-n", "5", "--stats-json", "/nonexistent/dir/s.json"}, "--stats-json"},
      {{"-m", gguf, "--chat"}, "no tokenizer.chat_template"},
      {{"-m", gguf, "--chat", "--chat-template", "gemma"}, "expected chatml, llama3 or llama2"},
      {{"-m", gguf, "-cnv", "--chat-template", "chatml", "-p", "Hi"}, "'<|im_start|>'"},
      {{"-m", bin, "--tokenizer", tok, "-cnv", "-p", "Hi"}, "--chat-template"},
      {{"-m", bin, "--tokenize", "Zoo"}, "give --tokenizer"},
      {{"-m", bin, "--tokenizer", tok, "--bits", "4", "--eval", "--eval-ref", bin},
       "drop --bits/--mixed"},
      {{"-m", bin, "--tokenizer", tok, "--eval-ref", bin}, "already palettized --model .lutra"},
      {{"-m", bin, "--tokenizer", tok, "--bits", "4", "--recover-targets", "v"},
       "needs --recover-rank"},
      {{"-m", bin, "--tokenizer", tok, "--bits", "4", "--recover-rank", "1", "--recover-targets",
        "v,x"},
       "projections from q,k,v,o,w1,w2,w3"},
      {{"-m", gguf, "--parallel", "0"}, "an integer in [1, 64]"},
      {{"-m", gguf, "--parallel", "65"}, "an integer in [1, 64]"},
      {{"-m", gguf, "--parallel", "2", "-p", "Hi"}, "needs --prompts-file"},
      {{"-m", gguf, "--parallel", "2", "--prompts-file", text_gguf, "--lookup", "3"},
       "does not combine with speculation"},
  };
  for (const Case& c : cases) {
    CliResult r = RunCli(c.args);
    INFO(r.out);
    CHECK(r.rc != 0);
    CHECK(test::Contains(r.out, c.message));
    CHECK(!test::Contains(r.out, "Segmentation"));
  }
}

TEST_CASE("lutra-generate: --stats-json holds the stats line's figures", "[generate][cli]") {
  LUTRA_REQUIRE_CLI();
  const std::string json = TempPath("stats.json");
  // -t 1: the default is the number of cores, which varies by machine.
  CliResult r = RunCli({"-m", SharedPath("stories260K.gguf"), "--temp", "0", "-n", "20", "-p",
                        "Zoo", "-t", "1", "--stats-json", json});
  INFO(r.out);
  REQUIRE(r.rc == 0);
  std::ifstream in(json);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  INFO(text);
  CHECK(text.front() == '{');
  for (const char* field :
       {"\"prompt_tokens\": 4,", "\"generated_tokens\": 20,", "\"decode_tokens\": 19,",
        "\"time_to_first_token_ms\": ", "\"ms_per_prompt_token\": ", "\"decode_seconds\": ",
        "\"decode_tokens_per_second\": ", "\"weights_mib\": ", "\"bits_per_weight\": 32.0000",
        "\"adapters_kib\": 0.000", "\"active_adapter\": \"none\"", "\"threads\": 1,",
        "\"target\": \""}) {
    CHECK(test::Contains(text, field));
  }
  CHECK(test::Contains(r.out, "prompt 4 tokens"));
  CHECK(test::Contains(r.out, "generated 20 tokens, decode 19 tokens at"));
}

TEST_CASE("lutra-generate --tokenize on a vocab-only GGUF matches llama.cpp's ids",
          "[generate][cli]") {
  LUTRA_REQUIRE_CLI();
  const std::string vocab = test::SharedModelsDir() + "/../vocab/ggml-vocab-llama-spm.gguf";
  if (!std::filesystem::exists(vocab)) SKIP(vocab + " not found");
  const std::vector<char> inp = ReadFile(vocab + ".inp"), out = ReadFile(vocab + ".out");
  const std::string inputs(inp.begin(), inp.end()), expected_all(out.begin(), out.end());
  const std::string sep = "\n__ggml_vocab_test__\n";
  size_t at = 0, line_at = 0, tests = 0;
  // Every 5th test keeps the process count down; they cover spaces, tabs,
  // newlines, multi-byte text and the empty string.
  for (size_t i = 0; at < inputs.size(); ++i) {
    const size_t end = inputs.find(sep, at);
    REQUIRE(end != std::string::npos);
    const std::string text = inputs.substr(at, end - at);
    const size_t eol = expected_all.find('\n', line_at);
    REQUIRE(eol != std::string::npos);
    const std::string expected_line = expected_all.substr(line_at, eol - line_at);
    at = end + sep.size();
    line_at = eol + 1;
    if (i % 5 != 0 && i != 2) continue;
    const std::string file = TempPath("tokenize.txt");
    std::ofstream(file, std::ios::binary) << text;
    CliResult r = RunCli({"-m", vocab, "--tokenize-file", file});
    REQUIRE(r.rc == 0);
    std::string ids;  // " id id ..." as in the .out file
    for (size_t p = 0; p < r.out.size();) {
      const size_t nl = r.out.find('\n', p);
      ids += " " + r.out.substr(p, nl - p);
      p = nl + 1;
    }
    INFO("test " << i << " '" << text << "'");
    CHECK(ids == expected_line);
    ++tests;
  }
  CHECK(tests >= 10);
  // --tokenize TEXT, and BOS only when asked for.
  CHECK(RunCli({"-m", vocab, "--tokenize", "Hello world"}).out == "15043\n3186\n");
  CHECK(RunCli({"-m", vocab, "--tokenize=Hello world", "--add-bos"}).out == "1\n15043\n3186\n");
}

// A copy of the GGUF model at `from` with tokenizer.chat_template = `jinja`.
std::string WithChatTemplate(const std::string& from, const std::string& name,
                             const std::string& jinja) {
  StatusOr<GgufFile> in = GgufFile::Open(from);
  REQUIRE(in.ok());
  const GgufReader& r = in->reader();
  GgufWriter w;
  for (const GgufKeyValue& kv : r.metadata()) {
    const std::string key(kv.key);
    const GgufValue& v = kv.value;
    auto get = [&v](auto x) {
      std::memcpy(&x, v.data, sizeof(x));
      return x;
    };
    switch (v.type) {
      case GgufValueType::kU8: w.AddU8(key, get(uint8_t())); break;
      case GgufValueType::kI8: w.AddI8(key, get(int8_t())); break;
      case GgufValueType::kU16: w.AddU16(key, get(uint16_t())); break;
      case GgufValueType::kI16: w.AddI16(key, get(int16_t())); break;
      case GgufValueType::kU32: w.AddU32(key, get(uint32_t())); break;
      case GgufValueType::kI32: w.AddI32(key, get(int32_t())); break;
      case GgufValueType::kU64: w.AddU64(key, get(uint64_t())); break;
      case GgufValueType::kI64: w.AddI64(key, get(int64_t())); break;
      case GgufValueType::kF32: w.AddF32(key, get(float())); break;
      case GgufValueType::kF64: w.AddF64(key, get(double())); break;
      case GgufValueType::kBool: w.AddBool(key, get(uint8_t()) != 0); break;
      case GgufValueType::kString: w.AddString(key, std::string(v.str())); break;
      case GgufValueType::kArray:
        if (v.array_type == GgufValueType::kString) {
          const std::vector<std::string_view> views = r.GetStringArray(key).value();
          w.AddStringArray(key, std::vector<std::string>(views.begin(), views.end()));
        } else {
          w.AddArray(key, v.array_type, v.data, v.count);
        }
        break;
    }
  }
  w.AddString("tokenizer.chat_template", jinja);
  for (const GgufTensorInfo& t : r.tensors()) {
    w.AddTensor(std::string(t.name), t.ggml_type(), std::vector<uint64_t>(t.ne, t.ne + t.n_dims),
                t.data, t.n_bytes);
  }
  const std::string path = TempPath(name);
  REQUIRE(w.WriteFile(path).ok());
  return path;
}

TEST_CASE("lutra-generate --chat: one turn with -p, turns from stdin", "[generate][cli]") {
  LUTRA_REQUIRE_CLI();
  const std::string gguf = SharedPath("stories260K.gguf");
  const std::vector<std::string> base = {"-m", gguf, "--chat-template", "llama2", "--temp", "0",
                                         "-n", "12"};
  std::vector<std::string> single = base;
  single.insert(single.end(), {"-cnv", "-p", "Tell me a story", "--system", "Be nice"});
  CliResult one = RunCli(single);
  INFO(one.out);
  CHECK(one.rc == 0);
  CHECK(test::Contains(one.out, "chat: llama2 template\n"));
  CHECK(test::Contains(one.out, "generated 12 tokens"));
  // Two turns from stdin (an empty line is skipped); the second turn
  // prefills only its own tokens.
  std::vector<std::string> loop = base;
  loop.push_back("--chat");
  CliResult two = RunCli(loop, "Hi\n\nOnce upon a time\n");
  INFO(two.out);
  CHECK(two.rc == 0);
  CHECK(test::Contains(two.out, "generated 24 tokens"));
  // Speculation in a chat: greedy replies unchanged over both turns, every
  // turn's drafts counted; --compare (one prompt, rerun) is refused.
  const auto replies = [](const std::string& out) {  // between the chat: and stats: lines
    const size_t from = out.find('\n', out.find("chat:"));
    return out.substr(from, out.find("stats:") - from);
  };
  for (const char* drafter : {"--lookup", "--draft-bits"}) {
    std::vector<std::string> spec = loop;
    spec.insert(spec.end(), {drafter, std::string(drafter) == "--lookup" ? "4" : "8"});
    CliResult sp = RunCli(spec, "Hi\n\nOnce upon a time\n");
    INFO(drafter << ": " << sp.out);
    CHECK(sp.rc == 0);
    CHECK(test::Contains(sp.out, "generated 24 tokens"));
    CHECK(test::Contains(sp.out, "speculative: drafted "));
    CHECK(replies(sp.out) == replies(two.out));
  }
  std::vector<std::string> compare = single;
  compare.insert(compare.end(), {"--lookup", "4", "--compare"});
  CliResult refused = RunCli(compare);
  CHECK(refused.rc != 0);
  CHECK(test::Contains(refused.out, "--compare reruns one prompt"));
  // The family comes from the file's tokenizer.chat_template ...
  const std::string llama2 = WithChatTemplate(
      gguf, "chat_llama2.gguf",
      "{% for message in messages %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' "
      "}}{% endfor %}");
  CliResult detected = RunCli({"-m", llama2, "-cnv", "-p", "Tell me a story", "--temp", "0",
                               "-n", "12"});
  INFO(detected.out);
  CHECK(detected.rc == 0);
  CHECK(test::Contains(detected.out, "chat: llama2 template (from the model)"));
  // ... the same reply as with --chat-template llama2 ...
  std::vector<std::string> forced = base;
  forced.insert(forced.end(), {"-cnv", "-p", "Tell me a story"});
  const std::string forced_reply = replies(RunCli(forced).out);
  CHECK(forced_reply.size() > 10);
  CHECK(forced_reply == replies(detected.out));
  // ... and a template of another family is an error naming it.
  const std::string gemma = WithChatTemplate(
      gguf, "chat_gemma.gguf", "{{ bos_token }}<start_of_turn>user\n{{ content }}<end_of_turn>");
  CliResult unknown = RunCli({"-m", gemma, "-cnv", "-p", "Hi"});
  INFO(unknown.out);
  CHECK(unknown.rc != 0);
  CHECK(test::Contains(unknown.out, "not recognised"));
  CHECK(test::Contains(unknown.out, "<start_of_turn>user\\n{{ content }}"));
  CHECK(test::Contains(unknown.out, "--chat-template chatml|llama3|llama2"));
  CHECK(RunCli({"-m", gemma, "-cnv", "-p", "Hi", "--chat-template", "llama2", "-n", "3"}).rc == 0);
}
#endif  // LUTRA_GENERATE_BIN

}  // namespace
}  // namespace engine
}  // namespace lutra
