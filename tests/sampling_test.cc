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
}

}  // namespace
}  // namespace lutra
