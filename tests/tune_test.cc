// End-to-end codebook tuning (examples/tune.cc): the training forward pass
// against the engine's Forward, its gradient against finite differences,
// tuning lowering the calibration KL of 4-bit stories260K, and a recovery
// adapter trained along.
#include <math.h>
#include <stdlib.h>

#include <algorithm>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "examples/engine.h"
#include "tests/test_util.h"

namespace lutra {
namespace engine {
namespace {

bool Quick() { return getenv("LUTRA_TEST_QUICK") != nullptr; }

struct Lcg {
  uint64_t s;
  float Uniform() {  // [-1, 1)
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return float(int32_t(s >> 32)) / 2147483648.0f;
  }
};

// A tiny random f32 Llama: GQA (4 query heads, 2 kv heads), optional
// untied head and q/k/v biases, either RoPE layout.
Model TinyModel(bool tied, bool biases, RopeLayout layout, uint64_t seed) {
  Model m;
  ModelConfig& c = m.config;
  c.dim = 16, c.hidden_dim = 24, c.n_layers = 2, c.n_heads = 4, c.n_kv_heads = 2;
  c.head_dim = 4, c.rope_dim = 4, c.vocab_size = 32, c.seq_len = 16;
  c.rope_theta = 100.0f, c.norm_eps = 1e-5f, c.rope_layout = layout;
  c.tied_embedding = tied;
  m.f32_storage.reserve(64);  // views point into it: no reallocation
  Lcg rng{seed};
  const auto vec = [&](size_t n, float scale, float offset) {
    m.f32_storage.emplace_back(n);
    for (float& x : m.f32_storage.back()) x = offset + scale * rng.Uniform();
    return m.f32_storage.back().data();
  };
  const auto mat = [&](size_t rows, size_t cols) {
    Linear w;
    w.rows = rows, w.cols = cols, w.f32 = vec(rows * cols, 1.5f / sqrtf(float(cols)), 0.0f);
    return w;
  };
  m.weights.embedding = mat(32, 16);
  m.weights.layers.resize(2);
  for (LayerWeights& l : m.weights.layers) {
    l.attn_norm = vec(16, 0.3f, 1.0f);
    l.ffn_norm = vec(16, 0.3f, 1.0f);
    l.wq = mat(16, 16), l.wk = mat(8, 16), l.wv = mat(8, 16), l.wo = mat(16, 16);
    l.w1 = mat(24, 16), l.w2 = mat(16, 24), l.w3 = mat(24, 16);
    if (biases) l.bq = vec(16, 0.5f, 0.0f), l.bk = vec(8, 0.5f, 0.0f), l.bv = vec(8, 0.5f, 0.0f);
  }
  m.weights.final_norm = vec(16, 0.3f, 1.0f);
  m.weights.output = tied ? m.weights.embedding : mat(32, 16);
  REQUIRE(CheckSupported(c).ok());
  return m;
}

// The writable parameter tensors of a tiny f32 model in DistillationLoss
// order (Matrices(), then per layer attn_norm, ffn_norm, then final_norm).
std::vector<std::pair<float*, size_t>> Params(Model& m) {
  std::vector<std::pair<float*, size_t>> out;
  for (const Linear* w : m.Matrices()) out.push_back({const_cast<float*>(w->f32), w->rows * w->cols});
  const size_t dim = size_t(m.config.dim);
  for (const LayerWeights& l : m.weights.layers) {
    out.push_back({const_cast<float*>(l.attn_norm), dim});
    out.push_back({const_cast<float*>(l.ffn_norm), dim});
  }
  out.push_back({const_cast<float*>(m.weights.final_norm), dim});
  return out;
}

// Largest |a - b| relative to the largest |b|.
double RelativeError(const std::vector<float>& a, const std::vector<float>& b) {
  double err = 0.0, scale = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    err = std::max(err, double(std::fabs(a[i] - b[i])));
    scale = std::max(scale, double(std::fabs(b[i])));
  }
  return err / std::max(scale, 1e-30);
}

// Logits of all positions of tokens[0..n) from the engine's Forward with
// exact kernels.
std::vector<float> EngineLogits(const Model& m, const std::vector<int>& tokens,
                                const Adapter* adapter = nullptr) {
  StatusOr<RunState> s = MakeRunState(m.config, tokens.size());
  REQUIRE(s.ok());
  s->precision = MatmulPrecision::kF32;
  s->adapter = adapter;
  StatusOr<const float*> out = Forward(m, *s, tokens.data(), tokens.size(), 0, true);
  REQUIRE(out.ok());
  return std::vector<float>(*out, *out + tokens.size() * size_t(m.config.vocab_size));
}

TEST_CASE("Training forward pass matches Forward (tiny models, both RoPE layouts)",
          "[tune]") {
  for (bool tied : {true, false}) {
    for (RopeLayout layout : {RopeLayout::kAdjacentPairs, RopeLayout::kHalfSplit}) {
      Model m = TinyModel(tied, !tied, layout, 5);
      const std::vector<int> tokens = {1, 7, 30, 2, 2, 19, 0, 31, 4, 11, 8, 5, 6, 9};
      const std::vector<float> want = EngineLogits(m, tokens);
      StatusOr<std::vector<float>> got = TrainingLogits(m, tokens.data(), tokens.size());
      REQUIRE(got.ok());
      INFO("tied " << tied << " layout " << int(layout));
      CHECK(RelativeError(*got, want) < 1e-4);
    }
  }
}

TEST_CASE("Training gradient matches finite differences (tiny model, double)", "[tune]") {
  for (bool tied : {true, false}) {
    Model m = TinyModel(tied, !tied, tied ? RopeLayout::kAdjacentPairs : RopeLayout::kHalfSplit,
                        9);
    const std::vector<int> tokens = {3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5};
    const size_t n = tokens.size(), vocab = size_t(m.config.vocab_size);
    Lcg rng{21};
    std::vector<float> teacher(n * vocab);
    for (float& z : teacher) z = 3.0f * rng.Uniform();
    std::vector<std::vector<double>> grads;
    StatusOr<double> loss = DistillationLoss(m, tokens.data(), n, teacher.data(), true, &grads);
    REQUIRE(loss.ok());
    CHECK(*loss > 0.0);
    std::vector<std::pair<float*, size_t>> params = Params(m);
    REQUIRE(grads.size() == params.size());
    // The float version of the same gradient.
    std::vector<std::vector<double>> grads32;
    REQUIRE(DistillationLoss(m, tokens.data(), n, teacher.data(), false, &grads32).ok());
    for (size_t t = 0; t < params.size(); ++t) {
      REQUIRE(grads[t].size() == params[t].second);
      double gmax = 0.0;
      for (double g : grads[t]) gmax = std::max(gmax, std::fabs(g));
      CHECK(gmax > 0.0);
      for (size_t i = 0; i < grads[t].size(); ++i) {
        CHECK(std::fabs(grads32[t][i] - grads[t][i]) <= 1e-3 * gmax + 1e-7);
      }
      // A few entries of each tensor, central differences in double.
      for (int k = 0; k < 4; ++k) {
        const size_t i = size_t((rng.Uniform() + 1.0f) * 0.5f * float(params[t].second)) %
                         params[t].second;
        float* p = params[t].first + i;
        const float saved = *p;
        const float hi = saved + 1e-3f, lo = saved - 1e-3f;
        *p = hi;
        const double l_hi = *DistillationLoss(m, tokens.data(), n, teacher.data(), true, nullptr);
        *p = lo;
        const double l_lo = *DistillationLoss(m, tokens.data(), n, teacher.data(), true, nullptr);
        *p = saved;
        const double fd = (l_hi - l_lo) / (double(hi) - double(lo));
        INFO("tied " << tied << " tensor " << t << " entry " << i << ": analytic "
                     << grads[t][i] << " finite difference " << fd);
        CHECK(std::fabs(fd - grads[t][i]) <= 1e-4 * gmax + 1e-8);
      }
    }
  }
}

TEST_CASE("The default step count spends a fixed budget within [300, 2400]", "[tune]") {
  CHECK(TuneDefaultSteps(0) == kTuneMaxSteps);
  CHECK(TuneDefaultSteps(259328) == 2400);  // stories260K
  CHECK(TuneDefaultSteps(1000000) == 640);
  CHECK(TuneDefaultSteps(kTuneAutoMaxWeights) == 320);
  CHECK(TuneDefaultSteps(3000000) == kTuneDefaultSteps);
  CHECK(TuneDefaultSteps(size_t{1} << 40) == kTuneDefaultSteps);
}

TEST_CASE("Tuning lowers the calibration KL of 4-bit stories260K", "[tune][shared]") {
  if (test::SharedModelsDir().empty()) SKIP("shared models not found (LUTRA_SHARED_MODELS_DIR)");
  const std::string dir = test::SharedModelsDir();
  StatusOr<Model> f32 = OpenModel(dir + "/stories260K.bin", LoadOptions());
  REQUIRE(f32.ok());
  // The training pass reproduces Forward on the real model too, palettized
  // (dequantized weights) and f32.
  const std::vector<int> probe = {1, 403, 407, 261, 379, 275, 29, 281, 30, 350, 24, 1, 40};
  LoadOptions o;
  o.bits = 4;
  o.calib_tokens = Quick() ? 64 : 256;
  o.gptq = false;  // faster; tuning starts from whatever palettization
  o.tune_steps = 0;
  StatusOr<Model> q = PalettizeModel(*f32, o, 2);
  REQUIRE(q.ok());
  for (const Model* m : {&*f32, &*q}) {
    StatusOr<std::vector<float>> got = TrainingLogits(*m, probe.data(), probe.size());
    REQUIRE(got.ok());
    CHECK(RelativeError(*got, EngineLogits(*m, probe)) < 1e-4);
  }
  StatusOr<std::vector<int>> calib = SampleTokens(*f32, o.calib_tokens, 1, o.calib_seed);
  REQUIRE(calib.ok());
  const double bpw = q->BitsPerWeight();
  const std::vector<float> before = EngineLogits(*q, probe);
  ThreadPool pool(2);
  TuneOptions to;
  to.steps = Quick() ? 4 : 20;
  to.segment = 128;
  to.lr = 3e-3f;
  to.index_lr = 1e-2f;  // moves indices within 20 steps (none in 4)
  to.pool = &pool;
  StatusOr<TuneReport> r = TuneCodebooks(*f32, *q, *calib, to);
  REQUIRE(r.ok());
  INFO("calibration KL " << r->kl_before << " -> " << r->kl_after << " in " << r->seconds
                         << " s, " << r->changed_indices << " of " << r->indices
                         << " indices moved");
  CHECK(r->matrices == q->Matrices().size());
  CHECK(r->indices == q->MatrixWeights());
  if (!Quick()) CHECK(r->changed_indices > 0);
  CHECK(r->changed_indices < r->indices / 10);
  CHECK(r->kl_after < (Quick() ? 0.99 : 0.8) * r->kl_before);
  CHECK(q->BitsPerWeight() == bpw);
  // The kernels' tables were rebuilt: Forward sees the tuned codebooks.
  CHECK(RelativeError(EngineLogits(*q, probe), before) > 1e-3);
  StatusOr<std::vector<float>> tuned = TrainingLogits(*q, probe.data(), probe.size());
  REQUIRE(tuned.ok());
  CHECK(RelativeError(*tuned, EngineLogits(*q, probe)) < 1e-4);

  // Deterministic, whatever the thread count and whether the teacher's
  // log-probabilities are kept or recomputed per step.
  StatusOr<Model> q2 = PalettizeModel(*f32, o, 1);
  REQUIRE(q2.ok());
  TuneOptions serial = to;
  serial.pool = nullptr;
  serial.max_teacher_bytes = 0;
  StatusOr<TuneReport> r2 = TuneCodebooks(*f32, *q2, *calib, serial);
  REQUIRE(r2.ok());
  CHECK(r2->kl_after == r->kl_after);
  CHECK(EngineLogits(*q2, probe) == EngineLogits(*q, probe));

  // Sampled text does not depend on the thread count (each sequence has
  // its own seed), so neither does the fresh training text.
  // As PalettizeModel does: enough text for each step to see new sequences
  // (under qemu, where sampling is slow, less: the path is what runs there).
  const size_t fresh_tokens = Quick() ? 300 : to.steps * to.batch * to.segment + 100;
  StatusOr<std::vector<int>> other = SampleTokens(*f32, fresh_tokens, 1, 12345, &pool);
  REQUIRE(other.ok());
  StatusOr<std::vector<int>> other1 = SampleTokens(*f32, fresh_tokens, 1, 12345);
  REQUIRE(other1.ok());
  CHECK(*other == *other1);
  CHECK(other->size() == fresh_tokens);
  CHECK(!std::equal(calib->begin(), calib->end(), other->begin()));
  // Training on another text: the KL is still reported on the
  // calibration text (the same before), and falls there too.
  StatusOr<Model> q3 = PalettizeModel(*f32, o, 1);
  REQUIRE(q3.ok());
  TuneOptions fresh = to;
  fresh.train_text = &*other;
  fresh.index_lr = 0.0f;  // index moves fitted to one text need not help another
  StatusOr<TuneReport> r3 = TuneCodebooks(*f32, *q3, *calib, fresh);
  REQUIRE(r3.ok());
  INFO("trained on other text: calibration KL " << r3->kl_before << " -> " << r3->kl_after);
  CHECK(r3->kl_before == r->kl_before);
  CHECK(r3->tokens == other->size());
  CHECK(r3->kl_after != r->kl_after);
  // 4 quick steps move the codebooks but need not help a text they never
  // saw; 20 steps on new text lower its KL.
  CHECK(r3->kl_after != r3->kl_before);
  if (!Quick()) CHECK(r3->kl_after < 0.9 * r3->kl_before);

  // Bad inputs get clear errors.
  const std::vector<int> one = {1};
  CHECK(test::Contains(TuneCodebooks(*f32, *q, one, to).status().message(),
                       "calibration text has < 2 tokens"));
  TuneOptions short_text = to;
  short_text.train_text = &one;
  CHECK(test::Contains(TuneCodebooks(*f32, *q, *calib, short_text).status().message(),
                       "training text has < 2 tokens"));
  CHECK(test::Contains(TuneCodebooks(*q, *q, *calib, to).status().message(), "must be f32"));
  const std::vector<int> bad = {1, 100000};
  CHECK(test::Contains(TuneCodebooks(*f32, *q, bad, to).status().message(), "vocabulary"));
}

TEST_CASE("Tuning trains the recovery adapter with the codebooks (stories260K)",
          "[tune][shared]") {
  if (test::SharedModelsDir().empty()) SKIP("shared models not found (LUTRA_SHARED_MODELS_DIR)");
  const std::string dir = test::SharedModelsDir();
  StatusOr<Model> f32 = OpenModel(dir + "/stories260K.bin", LoadOptions());
  REQUIRE(f32.ok());
  LoadOptions o;
  o.bits = 2;  // a residual worth an adapter
  o.calib_tokens = Quick() ? 64 : 256;
  o.gptq = false;
  o.tune_steps = 0;
  o.recover_rank = 2;
  StatusOr<Model> q = PalettizeModel(*f32, o, 2);
  REQUIRE(q.ok());
  REQUIRE(q->recovery != nullptr);
  const size_t targets = 7 * size_t(q->config.n_layers);
  CHECK(q->recovery->num_targets() == targets);
  // The training pass folds the adapter in as the LoRA epilogue applies it.
  const std::vector<int> probe = {1, 403, 407, 261, 379, 275, 29, 281, 30, 350, 24, 1, 40};
  const std::vector<float> plain = EngineLogits(*q, probe);
  const std::vector<float> svd = EngineLogits(*q, probe, q->recovery.get());
  StatusOr<std::vector<float>> folded =
      TrainingLogits(*q, probe.data(), probe.size(), false, q->recovery.get());
  REQUIRE(folded.ok());
  CHECK(RelativeError(svd, plain) > 1e-3);
  CHECK(RelativeError(*folded, svd) < 1e-4);

  StatusOr<std::vector<int>> calib = SampleTokens(*f32, o.calib_tokens, 1, o.calib_seed);
  REQUIRE(calib.ok());
  ThreadPool pool(2);
  TuneOptions to;
  to.steps = Quick() ? 4 : 20;
  to.segment = 128;
  to.lr = 3e-3f;
  to.adapter_lr = 1e-2f;
  to.pool = &pool;
  TuneOptions no_adapter = to;
  to.adapter = q->recovery.get();
  StatusOr<TuneReport> r = TuneCodebooks(*f32, *q, *calib, to);
  REQUIRE(r.ok());
  INFO("calibration KL with the adapter " << r->kl_before << " -> " << r->kl_after);
  REQUIRE(r->adapter != nullptr);
  CHECK(r->kl_after < (Quick() ? 0.99 : 0.8) * r->kl_before);
  // Same targets, ranks, scales, type and name; other factors.
  const Adapter& a = *r->adapter;
  CHECK(a.name() == q->recovery->name());
  CHECK(a.kind() == q->recovery->kind());
  REQUIRE(a.num_targets() == targets);
  size_t moved = 0;
  for (size_t i = 0; i < targets; ++i) {
    const LoraFactors& f = a.target(i);
    const LoraFactors* g = q->recovery->FindFactors(f.layer(), f.projection());
    REQUIRE(g != nullptr);
    CHECK(f.rank() == g->rank());
    CHECK(f.type() == g->type());
    CHECK(f.scale() == g->scale());
    moved += f.A(0, 0) != g->A(0, 0) || f.B(0, 0) != g->B(0, 0);
  }
  CHECK(moved > targets / 2);
  // The engine runs the tuned base with the trained adapter as tuning saw it.
  StatusOr<std::vector<float>> tuned =
      TrainingLogits(*q, probe.data(), probe.size(), false, r->adapter.get());
  REQUIRE(tuned.ok());
  CHECK(RelativeError(*tuned, EngineLogits(*q, probe, r->adapter.get())) < 1e-4);

  // An adapter of another shape is refused.
  StatusOr<Adapter> other = Adapter::Create("other", BaseShapes::Llama(1, 8, 8, 8, 8));
  REQUIRE(other.ok());
  no_adapter.adapter = &*other;
  CHECK(test::Contains(TuneCodebooks(*f32, *q, *calib, no_adapter).status().message(),
                       "another model shape"));
}

}  // namespace
}  // namespace engine
}  // namespace lutra
