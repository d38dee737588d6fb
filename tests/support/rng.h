// Seeded random data for tests and benchmarks (no test framework needed, so
// bench/ can include it too).
#ifndef LUTRA_TESTS_SUPPORT_RNG_H_
#define LUTRA_TESTS_SUPPORT_RNG_H_

#include <stddef.h>
#include <stdint.h>

#include <random>
#include <vector>

namespace lutra {
namespace test {

// Deterministic data. Seeds are explicit so a failure can be replayed.
class Rng {
 public:
  explicit Rng(uint64_t seed) : gen_(seed) {}
  float Gaussian(float stddev = 1.0f) {
    return std::normal_distribution<float>(0.0f, stddev)(gen_);
  }
  float Uniform(float lo, float hi) {
    return std::uniform_real_distribution<float>(lo, hi)(gen_);
  }
  // Student-t with 3 degrees of freedom: heavy tails, like real LLM weights.
  float HeavyTailed(float scale = 1.0f) {
    return scale * std::student_t_distribution<float>(3.0f)(gen_);
  }
  uint64_t Bits() { return gen_(); }
  size_t Below(size_t n) { return static_cast<size_t>(gen_() % n); }
  std::vector<float> GaussianVector(size_t n, float stddev = 1.0f) {
    std::vector<float> v(n);
    for (float& x : v) x = Gaussian(stddev);
    return v;
  }
  std::vector<float> UniformVector(size_t n, float lo, float hi) {
    std::vector<float> v(n);
    for (float& x : v) x = Uniform(lo, hi);
    return v;
  }
  std::mt19937_64& engine() { return gen_; }

 private:
  std::mt19937_64 gen_;
};

}  // namespace test
}  // namespace lutra

#endif  // LUTRA_TESTS_SUPPORT_RNG_H_
