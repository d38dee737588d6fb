// Sampling: argmax, temperature, top-k, top-p vs. an independent double
// reference distribution, checked by a chi-square bound on the observed
// frequencies with fixed seeds. Sampling is scalar (same result on every
// SIMD target by construction), so this test runs once.
#include "lutra/runtime/sampling.h"

#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "tests/test_util.h"

namespace lutra {
namespace {

// Reference: softmax(logits / T), restricted to the top_k most probable
// (ties: lower index first), then to the shortest prefix with mass >= top_p,
// renormalized.
std::vector<double> RefDistribution(const std::vector<float>& logits,
                                    const SamplingConfig& c) {
  const size_t n = logits.size();
  std::vector<double> p(n);
  double mx = -HUGE_VAL;
  for (float l : logits) mx = std::max(mx, double(l));
  double sum = 0.0;
  for (size_t i = 0; i < n; ++i) sum += (p[i] = std::exp((logits[i] - mx) / c.temperature));
  for (double& x : p) x /= sum;
  std::vector<size_t> idx(n);
  for (size_t i = 0; i < n; ++i) idx[i] = i;
  std::stable_sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return p[a] > p[b]; });
  size_t keep = (c.top_k == 0 || c.top_k > n) ? n : c.top_k;
  double mass = 0.0;
  for (size_t j = 0; j < keep; ++j) mass += p[idx[j]];
  if (c.top_p < 1.0f) {
    double cum = 0.0;
    for (size_t j = 0; j < keep; ++j) {
      cum += p[idx[j]];
      if (cum >= c.top_p * mass) {
        keep = j + 1;
        break;
      }
    }
  }
  std::vector<double> out(n, 0.0);
  double kept = 0.0;
  for (size_t j = 0; j < keep; ++j) kept += p[idx[j]];
  for (size_t j = 0; j < keep; ++j) out[idx[j]] = p[idx[j]] / kept;
  return out;
}

// Draws `draws` samples and returns the chi-square statistic against the
// reference, its degrees of freedom, and whether any sample fell outside
// the reference's support.
struct ChiSquare {
  double stat = 0.0;
  size_t dof = 0;
  size_t outside = 0;
};
ChiSquare Draw(const std::vector<float>& logits, const SamplingConfig& c,
               size_t draws) {
  StatusOr<Sampler> s = Sampler::Create(logits.size(), c);
  REQUIRE(s.ok());
  std::vector<double> ref = RefDistribution(logits, c);
  std::vector<size_t> counts(logits.size(), 0);
  for (size_t i = 0; i < draws; ++i) ++counts[s->Sample(logits.data())];
  ChiSquare r;
  size_t support = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    if (ref[i] == 0.0) {
      r.outside += counts[i];
      continue;
    }
    ++support;
    const double expected = ref[i] * double(draws);
    r.stat += (double(counts[i]) - expected) * (double(counts[i]) - expected) / expected;
  }
  r.dof = support - 1;
  // The sampler's own Probabilities() must equal the reference.
  std::vector<float> probs(logits.size());
  s->Probabilities(logits.data(), probs.data());
  for (size_t i = 0; i < logits.size(); ++i) CHECK(std::abs(probs[i] - ref[i]) < 1e-6);
  return r;
}

TEST_CASE("Sampling frequencies match the reference distribution", "[sampling]") {
  test::Rng rng(31);
  // 40 tokens, logits spread so that top-k / top-p cut in the middle.
  std::vector<float> logits = rng.GaussianVector(40, 1.5f);
  logits[7] = logits[8];  // a tie, broken by index
  struct Case {
    float temperature;
    size_t top_k;
    float top_p;
  };
  const Case cases[] = {{1.0f, 0, 1.0f},  {0.7f, 0, 1.0f},  {1.5f, 0, 1.0f},
                        {1.0f, 5, 1.0f},  {1.0f, 1, 1.0f},  {1.0f, 0, 0.9f},
                        {0.8f, 0, 0.5f},  {1.0f, 10, 0.8f}, {1.0f, 40, 1.0f},
                        {1.0f, 100, 0.95f}};
  uint64_t seed = 1;
  for (const Case& cs : cases) {
    SamplingConfig c;
    c.temperature = cs.temperature;
    c.top_k = cs.top_k;
    c.top_p = cs.top_p;
    c.seed = seed++;
    const ChiSquare r = Draw(logits, c, 40000);
    INFO("T=" << cs.temperature << " top_k=" << cs.top_k << " top_p=" << cs.top_p
              << ": chi2=" << r.stat << " dof=" << r.dof);
    CHECK(r.outside == 0);
    // Mean dof, sd sqrt(2 dof): 5 sd plus a constant is exceeded with
    // probability < 1e-5 by a correct sampler (the seed is fixed anyway),
    // while a wrong temperature or cut gives chi2 in the thousands.
    CHECK(r.stat <= double(r.dof) + 5.0 * std::sqrt(2.0 * double(r.dof)) + 10.0);
  }
  // The bound can fail: sampling at T=1 judged against T=0.7 frequencies.
  SamplingConfig wrong;
  wrong.seed = 5;
  StatusOr<Sampler> s = Sampler::Create(logits.size(), wrong);
  REQUIRE(s.ok());
  SamplingConfig other = wrong;
  other.temperature = 0.7f;
  const std::vector<double> ref = RefDistribution(logits, other);
  std::vector<size_t> counts(logits.size(), 0);
  for (int i = 0; i < 40000; ++i) ++counts[s->Sample(logits.data())];
  double stat = 0.0;
  for (size_t i = 0; i < logits.size(); ++i) {
    const double e = ref[i] * 40000;
    stat += (counts[i] - e) * (counts[i] - e) / e;
  }
  CHECK(stat > 39 + 5 * std::sqrt(78.0) + 10);
}

TEST_CASE("Greedy, determinism and edge cases", "[sampling]") {
  std::vector<float> logits = {0.5f, 3.0f, -1.0f, 3.0f, 2.9f};
  CHECK(ArgMax(logits.data(), logits.size()) == 1);  // first of equal maxima
  SamplingConfig greedy;
  greedy.temperature = 0.0f;
  StatusOr<Sampler> g = Sampler::Create(logits.size(), greedy);
  REQUIRE(g.ok());
  for (int i = 0; i < 5; ++i) CHECK(g->Sample(logits.data()) == 1);
  // Same seed, same sequence; different seed, different sequence.
  test::Rng rng(8);
  std::vector<float> l = rng.GaussianVector(1000);
  SamplingConfig c;
  c.seed = 42;
  c.top_p = 0.95f;
  StatusOr<Sampler> a = Sampler::Create(l.size(), c), b = Sampler::Create(l.size(), c);
  c.seed = 43;
  StatusOr<Sampler> d = Sampler::Create(l.size(), c);
  REQUIRE((a.ok() && b.ok() && d.ok()));
  size_t same_ab = 0, same_ad = 0;
  for (int i = 0; i < 200; ++i) {
    const size_t ta = a->Sample(l.data());
    same_ab += ta == b->Sample(l.data());
    same_ad += ta == d->Sample(l.data());
  }
  CHECK(same_ab == 200);
  CHECK(same_ad < 50);
  // The RNG stream is fixed (reproducible across platforms and releases).
  SamplerRng r(0);
  const uint64_t first = r.NextU64();
  SamplerRng r2(0);
  CHECK(r2.NextU64() == first);
  for (int i = 0; i < 1000; ++i) {
    const double u = r.NextDouble();
    CHECK((u >= 0.0 && u < 1.0));
  }
  // -inf and NaN logits are never drawn; all -inf falls back to argmax.
  std::vector<float> masked = {-HUGE_VALF, 1.0f, NAN, 1.0f, -HUGE_VALF};
  StatusOr<Sampler> m = Sampler::Create(masked.size(), SamplingConfig());
  REQUIRE(m.ok());
  for (int i = 0; i < 500; ++i) {
    const size_t t = m->Sample(masked.data());
    CHECK((t == 1 || t == 3));
  }
  std::vector<float> all_masked(4, -HUGE_VALF);
  StatusOr<Sampler> am = Sampler::Create(4, SamplingConfig());
  REQUIRE(am.ok());
  CHECK(am->Sample(all_masked.data()) == 0);
  // A single token vocabulary.
  StatusOr<Sampler> one = Sampler::Create(1, SamplingConfig());
  REQUIRE(one.ok());
  const float single = 0.3f;
  CHECK(one->Sample(&single) == 0);
}

TEST_CASE("Sampling config errors", "[sampling]") {
  SamplingConfig c;
  c.temperature = -1.0f;
  CHECK(Sampler::Create(10, c).status().code() == StatusCode::kInvalidArgument);
  c.temperature = NAN;
  CHECK(!Sampler::Create(10, c).ok());
  c.temperature = 1.0f;
  c.top_p = 0.0f;
  const Status st = Sampler::Create(10, c).status();
  CHECK(st.code() == StatusCode::kInvalidArgument);
  CHECK(st.message().find("top_p") != std::string::npos);
  c.top_p = 1.5f;
  CHECK(!Sampler::Create(10, c).ok());
  c.top_p = 1.0f;
  CHECK(!Sampler::Create(0, c).ok());
  CHECK(Sampler::Create(10, c).ok());
  c.min_p = 1.5f;
  CHECK(Sampler::Create(10, c).status().message().find("min_p") != std::string::npos);
  c.min_p = -0.1f;
  CHECK(!Sampler::Create(10, c).ok());
  c.min_p = 0.05f;
  c.repeat_penalty = 0.0f;
  CHECK(Sampler::Create(10, c).status().message().find("repeat_penalty") != std::string::npos);
  c.repeat_penalty = NAN;
  CHECK(!Sampler::Create(10, c).ok());
  c.repeat_penalty = 1.1f;
  CHECK(Sampler::Create(10, c).ok());
}

// Probabilities() of a 4-token vocabulary under `c`, after Accept()ing
// `history`.
std::vector<float> Probs(const std::vector<float>& logits, const SamplingConfig& c,
                         const std::vector<int>& history = {}) {
  StatusOr<Sampler> s = Sampler::Create(logits.size(), c);
  REQUIRE(s.ok());
  for (int t : history) s->Accept(t);
  std::vector<float> p(logits.size());
  s->Probabilities(logits.data(), p.data());
  return p;
}

void CheckProbs(const std::vector<float>& actual, const std::vector<double>& expected) {
  REQUIRE(actual.size() == expected.size());
  for (size_t i = 0; i < actual.size(); ++i) {
    INFO("token " << i << ": " << actual[i] << " vs " << expected[i]);
    CHECK(std::abs(double(actual[i]) - expected[i]) < 1e-6);
  }
}

TEST_CASE("min-p keeps tokens within min_p of the most probable, before temperature",
          "[sampling]") {
  // Probabilities 4 : 2 : 1 : 0.5 (of 7.5) at temperature 1.
  const std::vector<float> logits = {std::log(4.0f), std::log(2.0f), 0.0f, std::log(0.5f)};
  SamplingConfig c;
  CheckProbs(Probs(logits, c), {4 / 7.5, 2 / 7.5, 1 / 7.5, 0.5 / 7.5});
  c.min_p = 0.3f;  // 1/4 < 0.3 <= 2/4: the first two
  CheckProbs(Probs(logits, c), {2 / 3.0, 1 / 3.0, 0.0, 0.0});
  c.min_p = 0.2f;  // 1/8 < 0.2 <= 1/4: three
  CheckProbs(Probs(logits, c), {4 / 7.0, 2 / 7.0, 1 / 7.0, 0.0});
  c.min_p = 1.0f;  // only the most probable
  CheckProbs(Probs(logits, c), {1.0, 0.0, 0.0, 0.0});
  // Temperature 2 flattens to 2 : sqrt 2 : 1 : sqrt 0.5, but the set kept by
  // min-p 0.3 is still the untempered one (llama.cpp applies it first).
  c.min_p = 0.3f;
  c.temperature = 2.0f;
  const double r2 = std::sqrt(2.0);
  CheckProbs(Probs(logits, c), {2 / (2 + r2), r2 / (2 + r2), 0.0, 0.0});
  // After top-p: 0.6 of the mass needs the first two (4/7.5 = 0.53 < 0.6),
  // and min-p 0.6 then drops the second (2/4 < 0.6).
  c.temperature = 1.0f;
  c.top_p = 0.6f;
  c.min_p = 0.0f;
  CheckProbs(Probs(logits, c), {2 / 3.0, 1 / 3.0, 0.0, 0.0});
  c.min_p = 0.6f;
  CheckProbs(Probs(logits, c), {1.0, 0.0, 0.0, 0.0});
  // Sampling draws only from the kept set.
  c.top_p = 1.0f;
  c.min_p = 0.3f;
  c.seed = 5;
  StatusOr<Sampler> s = Sampler::Create(logits.size(), c);
  REQUIRE(s.ok());
  size_t counts[4] = {0, 0, 0, 0};
  for (int i = 0; i < 3000; ++i) ++counts[s->Sample(logits.data())];
  CHECK(counts[2] == 0);
  CHECK(counts[3] == 0);
  CHECK(counts[0] > 1800);  // 2/3 of 3000 = 2000, sd 26
  CHECK(counts[0] < 2200);
}

TEST_CASE("Repetition penalty: divide positive, multiply negative logits of recent tokens",
          "[sampling]") {
  const std::vector<float> logits = {2.0f, -1.0f, 1.0f, 0.5f};
  const std::vector<float> before = logits;
  auto softmax = [](std::vector<double> l) {
    double sum = 0.0;
    for (double& x : l) sum += (x = std::exp(x));
    for (double& x : l) x /= sum;
    return l;
  };
  SamplingConfig c;
  c.repeat_penalty = 2.0f;
  // Tokens 0 and 1 seen (0 twice, penalized once): logits 1, -2, 1, 0.5.
  CheckProbs(Probs(logits, c, {0, 1, 0}), softmax({1.0, -2.0, 1.0, 0.5}));
  CHECK(logits == before);  // the caller's logits are not modified
  // No history, or penalty 1: unchanged.
  CheckProbs(Probs(logits, c), softmax({2.0, -1.0, 1.0, 0.5}));
  c.repeat_penalty = 1.0f;
  CheckProbs(Probs(logits, c, {0, 1}), softmax({2.0, -1.0, 1.0, 0.5}));
  // Only the last repeat_last_n tokens count: after 0, 1, 2, 3, 1 with a
  // window of 2, tokens 3 and 1.
  c.repeat_penalty = 2.0f;
  c.repeat_last_n = 2;
  CheckProbs(Probs(logits, c, {0, 1, 2, 3, 1}), softmax({2.0, -2.0, 1.0, 0.25}));
  c.repeat_last_n = 0;  // off
  CheckProbs(Probs(logits, c, {0, 1}), softmax({2.0, -1.0, 1.0, 0.5}));
  // Greedy sees the penalty too: 2/4 = 0.5 < 1, so token 2 wins.
  c.repeat_last_n = 64;
  c.repeat_penalty = 4.0f;
  c.temperature = 0.0f;
  StatusOr<Sampler> g = Sampler::Create(logits.size(), c);
  REQUIRE(g.ok());
  CHECK(g->Sample(logits.data()) == 0);
  g->Accept(0);
  CHECK(g->Sample(logits.data()) == 2);
  g->Accept(-1);  // ignored, as are ids past the vocabulary
  g->Accept(4);
  CHECK(g->Sample(logits.data()) == 2);
}

}  // namespace
}  // namespace lutra
