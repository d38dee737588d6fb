// Speculative decoding: the prompt-lookup drafter and the acceptance rule of
// lutra/runtime/speculative.h alone, then GenerateSpeculative
// (examples/engine.h) on the shared stories260K model: greedy output token
// for token that of Generate for every drafter and precision path, rollback
// at the ring's capacity, and bad input.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "examples/engine.h"
#include "lutra/dispatch.h"
#include "lutra/runtime/sampling.h"
#include "lutra/runtime/speculative.h"
#include "tests/support/random_weights.h"
#include "tests/test_util.h"

namespace lutra {
namespace {

// ----------------------------------------------------------------------------
// Prompt lookup

std::vector<int> Lookup(const std::vector<int>& text, size_t ngram, size_t max_draft) {
  std::vector<int> draft = {-1};  // appended to, not replaced
  const size_t n = PromptLookupDraft(text.data(), text.size(), ngram, max_draft, &draft);
  REQUIRE(draft.size() == n + 1);
  return std::vector<int>(draft.begin() + 1, draft.end());
}

TEST_CASE("Prompt lookup drafts what followed the last n-gram", "[speculative]") {
  // "5 6" recurs: the tokens after its earlier occurrence are drafted.
  CHECK(Lookup({1, 5, 6, 7, 8, 9, 5, 6}, 3, 4) == std::vector<int>({7, 8, 9, 5}));
  CHECK(Lookup({1, 5, 6, 7, 8, 9, 5, 6}, 3, 2) == std::vector<int>({7, 8}));
  // Longer n-grams win over shorter ones: "3 4" (after 2) beats the later
  // lone "4".
  CHECK(Lookup({2, 3, 4, 10, 4, 11, 2, 3, 4}, 3, 1) == std::vector<int>({10}));
  CHECK(Lookup({2, 3, 4, 10, 4, 11, 2, 3, 4}, 1, 1) == std::vector<int>({11}));
  // The most recent occurrence of the same n-gram wins.
  CHECK(Lookup({7, 1, 7, 2, 7}, 1, 1) == std::vector<int>({2}));
  // The draft stops at the end of the text, and may run into the tail.
  CHECK(Lookup({4, 4, 4}, 2, 8) == std::vector<int>({4}));
  CHECK(Lookup({9, 4, 4}, 1, 8) == std::vector<int>({4}));
  // Nothing recurs; degenerate sizes.
  CHECK(Lookup({1, 2, 3, 4}, 3, 4).empty());
  CHECK(Lookup({1}, 3, 4).empty());
  CHECK(Lookup({}, 3, 4).empty());
  CHECK(Lookup({5, 5}, 0, 4).empty());
  CHECK(Lookup({5, 5}, 2, 0).empty());
}

// ----------------------------------------------------------------------------
// Acceptance rule

// Pearson's chi-square of `counts` against probabilities `p` over `draws`;
// bins with expected count < 5 are merged into one.
double ChiSquare(const std::vector<size_t>& counts, const std::vector<double>& p, size_t draws,
                 size_t* dof) {
  double chi = 0.0, small_expected = 0.0, small_observed = 0.0;
  size_t bins = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    const double e = p[i] * double(draws);
    if (e < 5.0) {
      small_expected += e;
      small_observed += double(counts[i]);
      continue;
    }
    chi += (double(counts[i]) - e) * (double(counts[i]) - e) / e;
    ++bins;
  }
  if (small_expected >= 5.0) {
    chi += (small_observed - small_expected) * (small_observed - small_expected) / small_expected;
    ++bins;
  } else {
    // Too rare to test by count: such tokens must at least stay rare.
    CHECK(small_observed <= 5.0 + 10.0 * small_expected);
  }
  *dof = bins > 0 ? bins - 1 : 0;
  return chi;
}

// Upper 1e-6 tail of chi-square with `dof` degrees of freedom
// (Wilson-Hilferty; z = 4.75): a correct rule fails once in a million seeds.
double ChiSquareBound(size_t dof) {
  const double k = double(std::max<size_t>(dof, 1));
  const double h = 2.0 / (9.0 * k);
  return k * std::pow(1.0 - h + 4.75 * std::sqrt(h), 3.0);
}

// Draws `draws` tokens from q (nullptr: always `point`), runs the acceptance
// rule and checks the output against p: chi-square, and the acceptance rate
// against its expectation sum_i min(p_i, q_i).
void CheckPreservesTarget(const std::vector<float>& p, const std::vector<float>* q,
                          size_t point, size_t draws, uint64_t seed) {
  const size_t n = p.size();
  SamplerRng rng(seed);
  std::vector<double> residual;
  std::vector<size_t> counts(n, 0);
  size_t accepted = 0;
  for (size_t d = 0; d < draws; ++d) {
    const size_t x = q != nullptr ? SampleFrom(q->data(), n, rng) : point;
    const SpeculativeVerdict v =
        SpeculativeAccept(p.data(), q != nullptr ? q->data() : nullptr, n, x, rng, &residual);
    // Plain ifs: a check per draw would be a million Catch2 assertions.
    if (v.token >= n || (v.accepted && v.token != x)) {
      FAIL("draw " << d << ": token " << v.token << " accepted " << v.accepted << " draft " << x);
    }
    accepted += v.accepted ? 1 : 0;
    ++counts[v.token];
  }
  std::vector<double> pd(p.begin(), p.end());
  size_t dof = 0;
  const double chi = ChiSquare(counts, pd, draws, &dof);
  double expected_rate = 0.0;
  for (size_t i = 0; i < n; ++i) {
    expected_rate += std::min(double(p[i]), q != nullptr ? double((*q)[i]) : (i == point ? 1.0 : 0.0));
  }
  expected_rate = std::min(expected_rate, 1.0);  // float rounding may pass 1
  const double rate = double(accepted) / double(draws);
  INFO("chi-square " << chi << " with " << dof << " dof (bound " << ChiSquareBound(dof)
                     << "), acceptance " << rate << " expected " << expected_rate);
  CHECK(chi < ChiSquareBound(dof));
  // Binomial: 6 standard deviations.
  CHECK(std::fabs(rate - expected_rate) <=
        6.0 * std::sqrt(expected_rate * (1.0 - expected_rate) / double(draws)) + 1e-6);
  for (size_t i = 0; i < n; ++i) {
    if (p[i] == 0.0f) CHECK(counts[i] == 0);
  }
}

std::vector<float> Normalized(std::vector<float> w) {
  double s = 0.0;
  for (float x : w) s += x;
  for (float& x : w) x = float(x / s);
  return w;
}

TEST_CASE("Speculative sampling preserves the target distribution", "[speculative]") {
  const size_t draws = getenv("LUTRA_TEST_QUICK") != nullptr ? 40000 : 200000;
  const std::vector<float> p = Normalized({0.30f, 0.25f, 0.0f, 0.15f, 0.12f, 0.10f, 0.08f});
  SECTION("draft q differs from p, with q > 0 where p = 0 and the reverse") {
    const std::vector<float> q = Normalized({0.05f, 0.40f, 0.20f, 0.0f, 0.15f, 0.10f, 0.10f});
    CheckPreservesTarget(p, &q, 0, draws, 1);
  }
  SECTION("q == p: every draft accepted") {
    CheckPreservesTarget(p, &p, 0, draws, 2);
  }
  SECTION("point-mass drafts (prompt lookup), likely and impossible tokens") {
    CheckPreservesTarget(p, nullptr, 0, draws, 3);
    CheckPreservesTarget(p, nullptr, 2, draws, 4);  // p = 0: always rejected
    CheckPreservesTarget(p, nullptr, 6, draws, 5);
  }
  SECTION("the same seed gives the same verdicts") {
    const std::vector<float> q = Normalized({0.05f, 0.40f, 0.20f, 0.0f, 0.15f, 0.10f, 0.10f});
    std::vector<double> residual;
    for (int rep = 0; rep < 2; ++rep) {
      SamplerRng a(7), b(7);
      for (int i = 0; i < 100; ++i) {
        const size_t x = SampleFrom(q.data(), q.size(), a);
        CHECK(x == SampleFrom(q.data(), q.size(), b));
        const SpeculativeVerdict va = SpeculativeAccept(p.data(), q.data(), p.size(), x, a, &residual);
        const SpeculativeVerdict vb = SpeculativeAccept(p.data(), q.data(), p.size(), x, b, &residual);
        CHECK(va.accepted == vb.accepted);
        CHECK(va.token == vb.token);
      }
    }
  }
}

// ----------------------------------------------------------------------------
// The engine on stories260K

using engine::Forward;
using engine::Generate;
using engine::GenerateSpeculative;
using engine::GenerateStats;
using engine::LoadOptions;
using engine::MakeRunState;
using engine::Model;
using engine::RunState;
using engine::SpeculativeOptions;

std::string SharedPath(const char* name) { return test::SharedModelsDir() + "/" + name; }

#define LUTRA_REQUIRE_SHARED_MODELS()                                              \
  if (test::SharedModelsDir().empty()) {                                           \
    SKIP("shared models not found (set LUTRA_SHARED_MODELS_DIR, see README.md)");  \
  }

// stories260K: f32, palettized at 4 bits (the target of the int8 path) and
// at 2 bits (self-draft), loaded once. Uncalibrated palettes: calibrating
// costs time and the identity does not depend on quality.
struct Models {
  Model f32, q4, q2;
  std::shared_ptr<const Tokenizer> tok;
};

const Models& Stories(int seq_len = 0) {
  static std::unique_ptr<Models> cached[2];
  std::unique_ptr<Models>& m = cached[seq_len != 0 ? 1 : 0];
  if (m) return *m;
  m = std::make_unique<Models>();
  LoadOptions o;
  o.seq_len = seq_len;
  m->f32 = OpenModel(SharedPath("stories260K.bin"), o).value();
  m->tok = engine::LoadTokenizer(SharedPath("tok512.bin"), m->f32).value();
  for (int bits : {4, 2}) {
    LoadOptions q = o;
    q.bits = bits;
    q.calibrate = false;
    (bits == 4 ? m->q4 : m->q2) = engine::PalettizeModel(m->f32, q).value();
  }
  return *m;
}

// One generation's tokens and stats.
struct Run {
  std::vector<int> tokens;
  GenerateStats stats;
  Status status;
};

Run Greedy(const Model& model, MatmulPrecision precision, const std::vector<int>& prompt,
           size_t steps, const SpeculativeOptions* spec, const Model* draft = nullptr,
           float temperature = 0.0f, size_t batch = 8) {
  Run r;
  RunState state = MakeRunState(model.config, batch).value();
  state.precision = precision;
  SamplingConfig sc;
  sc.temperature = temperature;
  sc.seed = 11;
  Sampler sampler = Sampler::Create(model.config.vocab_size, sc).value();
  const auto on_token = [&](int, int t) { r.tokens.push_back(t); };
  if (spec == nullptr) {
    r.status = Generate(model, state, prompt, steps, sampler, {1, 2}, on_token, &r.stats);
    return r;
  }
  SpeculativeOptions s = *spec;
  RunState draft_state;
  if (draft != nullptr) {
    draft_state = MakeRunState(draft->config, batch).value();
    draft_state.precision = precision;
    s.draft_model = draft;
    s.draft_state = &draft_state;
  }
  r.status = GenerateSpeculative(model, state, prompt, steps, sampler, {1, 2}, on_token,
                                 &r.stats, s);
  return r;
}

// A drafter: options and the draft model (null: none).
struct Drafter {
  const char* name;
  SpeculativeOptions spec;
  const Model* draft;
};

// Prompt lookup of up to k tokens, and self-draft at 2 bits of k tokens.
std::vector<Drafter> Drafters(const Models& m, size_t k) {
  Drafter lookup{"lookup", {}, nullptr};
  lookup.spec.lookup = k;
  Drafter self{"self-draft 2 bits", {}, &m.q2};
  self.spec.draft_max = k;
  return {lookup, self};
}

// Prompts that stories260K continues by repeating itself.
std::vector<std::vector<int>> Prompts(const Tokenizer& tok) {
  std::vector<std::vector<int>> out;
  for (const char* text : {"Lily and Ben", "Once upon a time, there was a dog. The dog"}) {
    out.push_back(tok.Encode(text, true).value());
  }
  return out;
}

// Whether each row of a batched Forward (all logits) equals, bit for bit,
// the logits of the same tokens run one at a time: what greedy identity
// rests on. Returns the first difference found, "" when none.
std::string BatchedRowsDiffer(const Model& model, MatmulPrecision precision,
                              const std::vector<int>& tokens, size_t batch) {
  const size_t vocab = model.config.vocab_size;
  RunState one = MakeRunState(model.config, 1).value();
  RunState many = MakeRunState(model.config, batch).value();
  one.precision = many.precision = precision;
  std::vector<float> single(tokens.size() * vocab);
  for (size_t i = 0; i < tokens.size(); ++i) {
    const float* l = Forward(model, one, &tokens[i], 1, i).value();
    std::copy(l, l + vocab, single.begin() + i * vocab);
  }
  // The first token alone, then the rest in batches: each row of a batch
  // at positions > 0, as the verify pass runs.
  Forward(model, many, &tokens[0], 1, 0).value();
  for (size_t done = 1; done < tokens.size();) {
    const size_t n = std::min(batch, tokens.size() - done);
    const float* l = Forward(model, many, &tokens[done], n, done, true).value();
    for (size_t i = 0; i < n * vocab; ++i) {
      const float want = single[done * vocab + i];
      if (memcmp(&l[i], &want, sizeof(float)) != 0) {
        return "position " + std::to_string(done + i / vocab) + " (row " +
               std::to_string(i / vocab) + " of a batch of " + std::to_string(n) +
               "), token " + std::to_string(i % vocab) + ": batched " + std::to_string(l[i]) +
               ", single " + std::to_string(want);
      }
    }
    done += n;
  }
  return "";
}

// The paths greedy identity is required on.
struct Path {
  const char* name;
  const Model* model;
  MatmulPrecision precision;
};

std::vector<Path> Paths(const Models& m) {
  return {{"f32 weights", &m.f32, MatmulPrecision::kF32},
          {"4-bit, --precision f32", &m.q4, MatmulPrecision::kF32},
          {"4-bit, --precision int8", &m.q4, MatmulPrecision::kInt8}};
}

// Greedy speculative output is Generate's, for each drafter, on `path`.
void CheckGreedyIdentity(const Models& m, const Path& path) {
  INFO("path: " << path.name);
  const size_t steps = getenv("LUTRA_TEST_QUICK") != nullptr ? 60 : 120;
  size_t drafted = 0, accepted = 0;
  for (const std::vector<int>& prompt : Prompts(*m.tok)) {
    const Run plain = Greedy(*path.model, path.precision, prompt, steps, nullptr);
    REQUIRE(plain.status.ok());
    // Lookup, self-draft (2 bits) and another model as the draft (the f32
    // one for palettized targets, 4 bits for the f32 target).
    std::vector<Drafter> drafters = Drafters(m, 4);
    drafters.push_back(drafters.back());
    drafters.back().name = "another draft model";
    drafters.back().draft = path.model == &m.f32 ? &m.q4 : &m.f32;
    for (const Drafter& d : drafters) {
      INFO("drafter: " << d.name << ", prompt of " << prompt.size() << " tokens");
      const Run spec = Greedy(*path.model, path.precision, prompt, steps, &d.spec, d.draft);
      REQUIRE(spec.status.ok());
      CHECK(spec.tokens == plain.tokens);
      CHECK(spec.stats.generated_tokens == plain.stats.generated_tokens);
      CHECK(spec.stats.positions == plain.stats.positions);
      CHECK(spec.stats.stop_token == plain.stats.stop_token);
      CHECK(spec.stats.accepted_tokens <= spec.stats.drafted_tokens);
      CHECK(spec.stats.decode_forwards <= plain.stats.decode_forwards);
      drafted += spec.stats.drafted_tokens;
      accepted += spec.stats.accepted_tokens;
    }
  }
  // The drafters did draft, and the target took some of it.
  CHECK(drafted > 0);
  CHECK(accepted > 0);
}

// Whether dispatch::Gemm's rows equal dispatch::Gemv's results bit for bit
// on one 4-bit matrix (layer 0's wq) at `precision`: the kernel-level
// reason when a batched Forward differs. "" or what differs.
std::string GemmRowsDiffer(const Models& m, MatmulPrecision precision) {
  const engine::Linear& w = m.q4.weights.layers[0].wq;
  const size_t batch = 4;
  std::vector<float> x(batch * w.cols), gemm(batch * w.rows), gemv(w.rows);
  test::Rng rng(5);
  for (float& v : x) v = rng.Uniform(-1.0f, 1.0f);
  REQUIRE(dispatch::Gemm(*w.prepared, x.data(), batch, nullptr, precision, gemm.data(), nullptr,
                         nullptr).ok());
  double worst = 0.0;
  size_t differing = 0;
  for (size_t i = 0; i < batch; ++i) {
    REQUIRE(dispatch::Gemv(*w.prepared, &x[i * w.cols], nullptr, precision, gemv.data(), nullptr,
                           nullptr).ok());
    for (size_t r = 0; r < w.rows; ++r) {
      const double d = std::fabs(double(gemm[i * w.rows + r]) - double(gemv[r]));
      differing += d != 0.0 ? 1 : 0;
      worst = std::max(worst, d);
    }
  }
  if (differing == 0) return "";
  char text[128];
  snprintf(text, sizeof(text), "%s Gemm rows vs Gemv: %zu of %zu outputs differ, by up to %.3g",
           MatmulPrecisionName(precision), differing, batch * w.rows, worst);
  return text;
}

// Identity of the batched rows (kernels, then the whole Forward) and of the
// greedy output on `path`, on every target.
// Under LUTRA_TEST_QUICK (qemu, the sanitizers) the greedy runs go on the
// first (best) target only: the drafting and rollback logic is the same on
// every target, and what differs per target, the batched rows' bits, is
// checked on each. Under qemu's five aarch64 targets the greedy runs took
// 240 of speculative_test's 330 s (514 s in the aarch64 stage's parallel
// ctest, its longest test); with this, the test takes half the CPU time
// (329 s -> 169 s).
void CheckPath(const Models& m, const Path& path) {
  const std::vector<int> tokens =
      m.tok->Encode("Once upon a time, there was a big dog", true).value();
  const bool quick = getenv("LUTRA_TEST_QUICK") != nullptr;
  bool first = true;
  test::ForEachTarget([&] {
    INFO(path.name);
    if (path.model != &m.f32) CHECK(GemmRowsDiffer(m, path.precision) == "");
    for (size_t batch : {2, 5, 8}) {
      INFO("batch " << batch);
      CHECK(BatchedRowsDiffer(*path.model, path.precision, tokens, batch) == "");
    }
    if (first || !quick) CheckGreedyIdentity(m, path);
    first = false;
  });
}

TEST_CASE("Greedy speculative output equals plain greedy: f32 weights",
          "[speculative][shared]") {
  LUTRA_REQUIRE_SHARED_MODELS();
  CheckPath(Stories(), Paths(Stories())[0]);
}

TEST_CASE("Greedy speculative output equals plain greedy: 4-bit, --precision f32",
          "[speculative][shared]") {
  LUTRA_REQUIRE_SHARED_MODELS();
  CheckPath(Stories(), Paths(Stories())[1]);
}

// The int8 path rests on the int8 Gemm (num <= kGemmSmallM) giving each row
// the int8 Gemv's result bit for bit (the small-M path's contract,
// kernels/matmul.h): otherwise the last bits differ (GemmRowsDiffer reports
// how many outputs and by how much) and flip near-ties of the greedy argmax.
TEST_CASE("Greedy speculative output equals plain greedy: 4-bit, --precision int8",
          "[speculative][shared]") {
  LUTRA_REQUIRE_SHARED_MODELS();
  CheckPath(Stories(), Paths(Stories())[2]);
}

TEST_CASE("Drafting stops at the ring's capacity; decoding then wraps as Generate does",
          "[speculative][shared]") {
  LUTRA_REQUIRE_SHARED_MODELS();
  const Models& m = Stories(48);  // a 48-position ring, generation to 120
  const std::vector<int> prompt = m.tok->Encode("Lily and Ben", true).value();
  const Run plain = Greedy(m.f32, MatmulPrecision::kF32, prompt, 120, nullptr);
  REQUIRE(plain.status.ok());
  for (const Drafter& d : Drafters(m, 6)) {
    const Run spec = Greedy(m.f32, MatmulPrecision::kF32, prompt, 120, &d.spec, d.draft);
    INFO(d.name << ": " << spec.status.message());
    REQUIRE(spec.status.ok());
    CHECK(spec.tokens == plain.tokens);
    CHECK(spec.stats.positions == plain.stats.positions);
    CHECK(spec.stats.drafted_tokens > 0);
  }
}

TEST_CASE("A second call continues the caches (a chat turn) as Generate does",
          "[speculative][shared]") {
  LUTRA_REQUIRE_SHARED_MODELS();
  const Models& m = Stories();
  const std::vector<int> turn1 = m.tok->Encode("Lily and Ben", true).value();
  const std::vector<int> turn2 = m.tok->Encode("Tom had a ball.", false).value();
  const size_t vocab = m.f32.config.vocab_size;
  for (const Drafter& d : Drafters(m, 4)) {
    INFO(d.name);
    std::vector<int> out[2];
    for (int speculative = 0; speculative < 2; ++speculative) {
      RunState state = MakeRunState(m.f32.config, 8).value();
      RunState draft_state = MakeRunState(m.q2.config, 8).value();
      state.precision = draft_state.precision = MatmulPrecision::kF32;
      SpeculativeOptions spec = d.spec;
      spec.draft_model = d.draft;
      spec.draft_state = &draft_state;
      Sampler sampler = Sampler::Create(vocab, SamplingConfig{0.0f}).value();
      size_t pos = 0;
      for (const std::vector<int>* turn : {&turn1, &turn2}) {
        GenerateStats st;
        const auto on_token = [&](int, int t) { out[speculative].push_back(t); };
        const Status s =
            speculative ? GenerateSpeculative(m.f32, state, *turn, pos + turn->size() + 40,
                                              sampler, {}, on_token, &st, spec, pos)
                        : Generate(m.f32, state, *turn, pos + turn->size() + 40, sampler, {},
                                   on_token, &st, pos);
        REQUIRE(s.ok());
        pos = st.positions;
        CHECK(state.cache.end(0) == pos);
        if (speculative && d.draft != nullptr) CHECK(draft_state.cache.end(0) == pos);
      }
    }
    CHECK(out[1] == out[0]);
  }
}

TEST_CASE("Speculative sampling runs and its verdicts follow the target on real logits",
          "[speculative][shared]") {
  LUTRA_REQUIRE_SHARED_MODELS();
  const Models& m = Stories();
  const size_t vocab = m.f32.config.vocab_size;
  // p and q: the processed (temperature 0.8, top-k 40) next-token
  // distributions of the f32 target and its 2-bit self-draft after a prompt.
  const std::vector<int> prompt = m.tok->Encode("Once upon a time, there was a", true).value();
  SamplingConfig sc;
  sc.temperature = 0.8f;
  sc.top_k = 40;
  Sampler sampler = Sampler::Create(vocab, sc).value();
  std::vector<float> p(vocab), q(vocab);
  for (const Model* model : {&m.f32, &m.q2}) {
    RunState s = MakeRunState(model->config, prompt.size()).value();
    s.precision = MatmulPrecision::kF32;
    const float* l = Forward(*model, s, prompt.data(), prompt.size(), 0).value();
    sampler.Probabilities(l, (model == &m.f32 ? p : q).data());
  }
  CheckPreservesTarget(p, &q, 0, getenv("LUTRA_TEST_QUICK") != nullptr ? 20000 : 60000, 9);

  // End to end at temperature > 0: both drafters run, stats add up.
  for (const Drafter& d : Drafters(m, 4)) {
    const Run r = Greedy(m.f32, MatmulPrecision::kF32, prompt, 120, &d.spec, d.draft,
                         /*temperature=*/0.8f);
    INFO(d.name);
    REQUIRE(r.status.ok());
    CHECK(r.stats.generated_tokens > 0);
    CHECK(r.stats.accepted_tokens <= r.stats.drafted_tokens);
    CHECK(r.stats.generated_tokens - 1 <= r.stats.decode_forwards + r.stats.accepted_tokens);
  }
}

// End to end: in a 3-token generation the second token comes from the first
// verify pass (self-draft at 2 bits drafts it, the acceptance rule keeps or
// replaces it). Grouped by the first token, its frequencies over many seeds
// must follow the target's processed distribution after prompt + first.
TEST_CASE("Speculative sampling on stories260K keeps the target's distribution",
          "[speculative][shared]") {
  LUTRA_REQUIRE_SHARED_MODELS();
  const Models& m = Stories();
  const size_t vocab = m.f32.config.vocab_size;
  const std::vector<int> prompt = m.tok->Encode("Once upon a time, there was a", true).value();
  const size_t runs = getenv("LUTRA_TEST_QUICK") != nullptr ? 150 : 600;
  SamplingConfig sc;
  sc.temperature = 1.0f;
  sc.top_k = 5;  // few bins: the counts per bin stay large
  RunState state = MakeRunState(m.f32.config, 16).value();
  RunState draft_state = MakeRunState(m.q2.config, 16).value();
  state.precision = draft_state.precision = MatmulPrecision::kF32;
  SpeculativeOptions spec;
  spec.draft_model = &m.q2;
  spec.draft_state = &draft_state;
  std::map<int, std::vector<size_t>> second;  // first token -> counts of the second
  size_t drafted = 0, accepted = 0;
  for (size_t run = 0; run < runs; ++run) {
    sc.seed = run;
    spec.seed = 1000 + run;
    Sampler sampler = Sampler::Create(vocab, sc).value();
    std::vector<int> out;
    GenerateStats st;
    const Status s = GenerateSpeculative(m.f32, state, prompt, prompt.size() + 2, sampler, {},
                                         [&](int, int t) { out.push_back(t); }, &st, spec);
    if (!s.ok() || out.size() != 3) FAIL(s.message() << ", " << out.size() << " tokens");
    std::vector<size_t>& counts = second[out[0]];
    counts.resize(vocab);
    ++counts[out[1]];
    drafted += st.drafted_tokens;
    accepted += st.accepted_tokens;
  }
  CHECK(drafted == runs);  // one draft per run, some kept, some replaced
  CHECK(accepted > 0);
  CHECK(accepted < drafted);
  double chi = 0.0;
  size_t dof = 0, groups = 0;
  for (const auto& [first, counts] : second) {
    size_t n = 0;
    for (size_t c : counts) n += c;
    if (n < 60) continue;
    std::vector<int> text = prompt;
    text.push_back(first);
    const float* l = Forward(m.f32, state, text.data(), text.size(), 0).value();
    std::vector<float> p(vocab);
    Sampler sampler = Sampler::Create(vocab, sc).value();
    sampler.Probabilities(l, p.data());
    size_t d = 0;
    chi += ChiSquare(counts, std::vector<double>(p.begin(), p.end()), n, &d);
    dof += d;
    ++groups;
  }
  INFO(groups << " first tokens, chi-square " << chi << " with " << dof << " dof, bound "
              << ChiSquareBound(dof));
  CHECK(groups > 0);
  CHECK(chi < ChiSquareBound(dof));
}

// ----------------------------------------------------------------------------
// Several sequences decoded together (GenerateBatch, ForwardBatch)

// Each sequence of one GenerateBatch call gets the tokens and counts that
// Generate gives it alone: prompts of different lengths (so sequences end
// at different steps), two adapters of different ranks and types mixed
// with none (none, A, B, A, none: one pass per matrix, with a LoRA delta per
// token) and, when `temperature` > 0, a sampler per sequence with its own
// seed.
void CheckBatchMatchesAlone(const Model& model, MatmulPrecision precision, float temperature) {
  const Models& m = Stories();
  test::Rng rng(21);
  const std::shared_ptr<const Adapter> adapter = std::make_shared<const Adapter>(
      test::RandomAdapter("a", engine::AdapterShapes(model.config), 3, ElementType::kF16, 0.5f,
                          0.05f, rng)
          .value());
  const char* texts[] = {"Lily and Ben", "Once upon a time, there was a dog. The dog", "Tom",
                         "The sun was hot and the cat", "Mom said"};
  const std::shared_ptr<const Adapter> adapter_b = std::make_shared<const Adapter>(
      test::RandomAdapter("b", engine::AdapterShapes(model.config), 5, ElementType::kBF16, 0.7f,
                          0.05f, rng)
          .value());
  const Adapter* adapters[] = {nullptr, adapter.get(), adapter_b.get(), adapter.get(), nullptr};
  const size_t n = 5;
  // Generate's `steps` per sequence; the third ends when its prompt does.
  const std::vector<size_t> limits = {70, 90, 2, 60, 75};
  std::vector<std::vector<int>> prompts;
  for (const char* t : texts) prompts.push_back(m.tok->Encode(t, true).value());
  SamplingConfig sc;
  sc.temperature = temperature;
  // Alone: Generate per prompt.
  std::vector<std::vector<int>> alone(n);
  std::vector<GenerateStats> alone_stats(n);
  for (size_t i = 0; i < n; ++i) {
    RunState state = MakeRunState(model.config, 8).value();
    state.precision = precision;
    state.adapter = adapters[i];
    sc.seed = 100 + i;
    Sampler sampler = Sampler::Create(model.config.vocab_size, sc).value();
    REQUIRE(Generate(model, state, prompts[i], limits[i], sampler, {1, 2},
                     [&](int, int t) { alone[i].push_back(t); }, &alone_stats[i])
                .ok());
  }
  // Together.
  RunState batch = engine::MakeBatchState(model.config, n).value();
  batch.precision = precision;
  std::vector<RunState> states;
  std::vector<Sampler> samplers;
  for (size_t i = 0; i < n; ++i) {
    states.push_back(MakeRunState(model.config, 8).value());
    states.back().precision = precision;
    states.back().adapter = adapters[i];
    sc.seed = 100 + i;
    samplers.push_back(Sampler::Create(model.config.vocab_size, sc).value());
  }
  std::vector<RunState*> seqs;
  std::vector<Sampler*> sampler_ptrs;
  for (size_t i = 0; i < n; ++i) {
    seqs.push_back(&states[i]);
    sampler_ptrs.push_back(&samplers[i]);
  }
  std::vector<std::vector<int>> together(n);
  std::vector<GenerateStats> stats;
  const Status s = engine::GenerateBatch(
      model, batch, seqs, prompts, sampler_ptrs, limits, {1, 2},
      [&](size_t i, int, int t) { together[i].push_back(t); }, &stats);
  INFO(s.message());
  REQUIRE(s.ok());
  REQUIRE(stats.size() == n);
  std::set<size_t> lengths;
  for (size_t i = 0; i < n; ++i) {
    INFO("sequence " << i);
    CHECK(together[i] == alone[i]);
    CHECK(stats[i].generated_tokens == alone_stats[i].generated_tokens);
    CHECK(stats[i].decode_forwards == alone_stats[i].decode_forwards);
    CHECK(stats[i].positions == alone_stats[i].positions);
    CHECK(stats[i].stop_token == alone_stats[i].stop_token);
    lengths.insert(alone_stats[i].decode_forwards);
  }
  CHECK(lengths.size() > 1);  // the sequences left the batch at different steps
}

TEST_CASE("Batched decoding of several sequences equals each decoded alone",
          "[speculative][batch][shared]") {
  LUTRA_REQUIRE_SHARED_MODELS();
  const Models& m = Stories();
  for (const Path& path : Paths(m)) {
    INFO(path.name);
    CheckBatchMatchesAlone(*path.model, path.precision, 0.0f);
  }
  INFO("sampling, temperature 0.8");
  CheckBatchMatchesAlone(m.q4, MatmulPrecision::kInt8, 0.8f);
  // The int8 rows rest on the small-M GEMM: every target.
  test::ForEachTarget([&] { CheckBatchMatchesAlone(m.q4, MatmulPrecision::kInt8, 0.0f); });
}

TEST_CASE("Batched decoding rejects bad input", "[speculative][batch][shared]") {
  LUTRA_REQUIRE_SHARED_MODELS();
  const Models& m = Stories();
  RunState batch = MakeRunState(m.f32.config, 2).value();
  RunState a = MakeRunState(m.f32.config, 1).value();
  RunState b = MakeRunState(m.f32.config, 1).value();
  const int tokens[3] = {1, 1, 1};
  RunState* same[2] = {&a, &a};
  StatusOr<const float*> r = engine::ForwardBatch(m.f32, batch, same, tokens, 2);
  CHECK(test::Contains(r.status().message(), "same state"));
  RunState* three[3] = {&a, &b, &batch};
  r = engine::ForwardBatch(m.f32, batch, three, tokens, 3);
  CHECK(test::Contains(r.status().message(), "max_batch"));
  b.precision = MatmulPrecision::kF32;
  RunState* two[2] = {&a, &b};
  r = engine::ForwardBatch(m.f32, batch, two, tokens, 2);
  CHECK(test::Contains(r.status().message(), "precision"));
  b.precision = a.precision;
  const int bad[2] = {1, 100000};
  r = engine::ForwardBatch(m.f32, batch, two, bad, 2);
  CHECK(test::Contains(r.status().message(), "vocabulary"));
  // A state made for another model.
  ModelConfig other = m.f32.config;
  other.seq_len /= 2;
  RunState c = MakeRunState(other, 1).value();
  RunState* mixed[2] = {&a, &c};
  r = engine::ForwardBatch(m.f32, batch, mixed, tokens, 2);
  CHECK(test::Contains(r.status().message(), "different model config"));
  // Nothing was appended by the failed calls.
  CHECK(a.cache.end(0) == 0);
  CHECK(b.cache.end(0) == 0);
  // GenerateBatch: one prompt and one sampler per sequence.
  Sampler sampler = Sampler::Create(m.f32.config.vocab_size, SamplingConfig()).value();
  const Status s = engine::GenerateBatch(m.f32, batch, {&a, &b}, {{1, 410}}, {&sampler}, {20},
                                         {}, nullptr, nullptr);
  CHECK(test::Contains(s.message(), "one of each per sequence"));
}

TEST_CASE("Speculative decoding rejects bad input", "[speculative][shared]") {
  LUTRA_REQUIRE_SHARED_MODELS();
  const Models& m = Stories();
  const std::vector<int> prompt = {1, 410};
  SpeculativeOptions none;  // lookup 0 and no draft model
  Run r = Greedy(m.f32, MatmulPrecision::kF32, prompt, 20, &none);
  CHECK(test::Contains(r.status.message(), "exactly one drafter"));
  SpeculativeOptions both;
  both.lookup = 4;
  r = Greedy(m.f32, MatmulPrecision::kF32, prompt, 20, &both, &m.q2);
  CHECK(test::Contains(r.status.message(), "exactly one drafter"));
  // A draft model with another vocabulary: both sizes named.
  // (stories260K with its vocabulary size changed: the check comes before
  // any forward pass.)
  Model other = OpenModel(SharedPath("stories260K.bin"), LoadOptions()).value();
  other.config.vocab_size = 300;
  SpeculativeOptions draft;
  r = Greedy(m.f32, MatmulPrecision::kF32, prompt, 20, &draft, &other);
  INFO(r.status.message());
  CHECK(test::Contains(r.status.message(), std::to_string(other.config.vocab_size) + " tokens"));
  CHECK(test::Contains(r.status.message(), std::to_string(m.f32.config.vocab_size)));
  // Verifying needs a batch of at least 2.
  SpeculativeOptions lookup;
  lookup.lookup = 4;
  r = Greedy(m.f32, MatmulPrecision::kF32, prompt, 20, &lookup, nullptr, 0.0f, /*batch=*/1);
  CHECK(test::Contains(r.status.message(), "max_batch"));
}

}  // namespace
}  // namespace lutra
