// Shared test helpers: per-target runs, seeded data, shape sweeps and
// reference comparisons with tolerances scaled by the inputs' norms.
//
// Usage in a test .cc (see dot_test.cc for a complete example):
//   per-target body `void TestFoo()` inside lutra::HWY_NAMESPACE,
//   then under HWY_ONCE:  HWY_EXPORT(TestFoo);
//   TEST_CASE("Foo") { test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestFoo)(); }); }
#ifndef LUTRA_TESTS_TEST_UTIL_H_
#define LUTRA_TESTS_TEST_UTIL_H_

#include <stddef.h>
#include <stdint.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "hwy/targets.h"
#include "tests/support/rng.h"

namespace lutra {
namespace test {

// Name of the target ForEachTarget is running now ("best" outside of it).
inline const char*& CurrentTargetNameRef() {
  static const char* name = "best";
  return name;
}
inline const char* CurrentTargetName() { return CurrentTargetNameRef(); }

// Runs `body()` once for every Highway target that this CPU supports and this
// binary was compiled for, with dynamic dispatch pinned to that target, so
// HWY_DYNAMIC_DISPATCH inside `body` calls the target under test. Every
// failure is tagged with the target's name (Catch2 INFO), and one line per
// test case lists the targets it ran on.
template <class Body>
void ForEachTarget(const Body& body) {
  const std::vector<int64_t> targets = hwy::SupportedAndGeneratedTargets();
  REQUIRE(!targets.empty());
  std::string ran;
  for (int64_t target : targets) {
    hwy::SetSupportedTargetsForTest(target);
    CurrentTargetNameRef() = hwy::TargetName(target);
    INFO("Highway target " << hwy::TargetName(target));
    body();
    ran += std::string(" ") + hwy::TargetName(target);
  }
  hwy::SetSupportedTargetsForTest(0);  // back to the best target
  CurrentTargetNameRef() = "best";
  const auto& name = Catch::getResultCapture().getCurrentTestName();
  std::printf("[targets] %s:%s\n", name.c_str(), ran.c_str());
}

// Sizes that exercise every code path of a vectorized loop: below one vector
// (1..15 covers one f32 vector on every target up to 512 bits), exact
// multiples, one past and one short of them, primes, and a few large ones.
inline std::vector<size_t> SweepSizes(size_t max = 4099) {
  const size_t all[] = {1,  2,  3,   4,   5,   7,   8,   9,   11,  13,  15,
                        16, 17, 31,  32,  33,  47,  63,  64,  65,  97,  127,
                        128, 129, 255, 256, 257, 509, 1000, 1024, 1031, 4096,
                        4099};
  std::vector<size_t> out;
  for (size_t n : all) {
    if (n <= max) out.push_back(n);
  }
  return out;
}

inline double L2Norm(const float* v, size_t n) {
  double sum = 0.0;
  for (size_t i = 0; i < n; ++i) sum += double(v[i]) * double(v[i]);
  return std::sqrt(sum);
}
inline double L2Norm(const std::vector<float>& v) { return L2Norm(v.data(), v.size()); }

// Rounding-error bound of an f32 dot product of length n (any summation
// order): n * eps * |a| * |b|, with a small absolute floor for n = 0.
inline double DotTolerance(size_t n, double norm_a, double norm_b) {
  const double eps = 1.1920929e-7;  // FLT_EPSILON
  return 1e-30 + 2.0 * double(n + 1) * eps * norm_a * norm_b;
}

// Compares each actual[i] with expected[i] against tol[i] (or one tolerance
// for all) and reports the worst element with the target name on failure.
inline void ExpectClose(const float* actual, const double* expected,
                        const double* tol, size_t n, const std::string& what) {
  size_t worst = 0;
  double worst_ratio = 0.0;
  bool finite = true;
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(actual[i])) finite = false;
    const double ratio = std::abs(double(actual[i]) - expected[i]) / tol[i];
    if (!(ratio <= worst_ratio)) {  // also catches NaN
      worst_ratio = ratio;
      worst = i;
    }
  }
  INFO(what << " on " << CurrentTargetName() << ": worst element " << worst
            << " actual " << (n ? actual[worst] : 0.0f) << " expected "
            << (n ? expected[worst] : 0.0) << " tolerance " << (n ? tol[worst] : 0.0)
            << " (error/tolerance " << worst_ratio << ")");
  CHECK(finite);
  CHECK(worst_ratio <= 1.0);
}
inline void ExpectClose(const float* actual, const double* expected, double tol,
                        size_t n, const std::string& what) {
  std::vector<double> tols(n, tol);
  ExpectClose(actual, expected, tols.data(), n, what);
}

// Signal-to-noise ratio in dB of an approximation, for reporting distortion.
inline double SnrDb(const float* approx, const float* exact, size_t n) {
  double signal = 0.0, noise = 0.0;
  for (size_t i = 0; i < n; ++i) {
    signal += double(exact[i]) * exact[i];
    const double e = double(approx[i]) - exact[i];
    noise += e * e;
  }
  if (noise == 0.0) return 300.0;
  return 10.0 * std::log10(signal / noise);
}

// Directory of the shared test models (../shared/models from the project
// root), or empty when absent; tests that need it SKIP with a message.
inline std::string SharedModelsDir() {
#ifdef LUTRA_SHARED_MODELS_DIR
  const std::string dir = LUTRA_SHARED_MODELS_DIR;
  std::FILE* f = std::fopen((dir + "/stories260K.bin").c_str(), "rb");
  if (f) {
    std::fclose(f);
    return dir;
  }
#endif
  return std::string();
}

// The bytes of the file at `path` (empty when it cannot be read).
inline std::vector<char> ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}

// A folder of the shared models directory (e.g. "ktest"), or empty when it
// or the shared models are absent.
inline std::string SharedModelsSubdir(const std::string& name) {
  const std::string models = SharedModelsDir();
  if (models.empty()) return std::string();
  const std::string dir = models + "/" + name;
  return std::filesystem::is_directory(dir) ? dir : std::string();
}

// Whether `needle` occurs in `haystack` (status messages in CHECKs).
inline bool Contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// A path in the temporary directory ($TMPDIR, else /tmp) that no other test
// program uses: "lutra_test_<pid>_<name>". The file is removed when the
// program exits, so a failing test leaves nothing behind.
inline std::string TempPath(const std::string& name) {
  struct Files {
    std::vector<std::string> paths;
    ~Files() {
      for (const std::string& p : paths) std::remove(p.c_str());
    }
  };
  static Files files;
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("lutra_test_" + std::to_string(getpid()) + "_" + name))
                               .string();
  files.paths.push_back(path);
  return path;
}

}  // namespace test
}  // namespace lutra

#endif  // LUTRA_TESTS_TEST_UTIL_H_
