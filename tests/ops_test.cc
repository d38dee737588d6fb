// RMSNorm, RoPE (both pairings), SwiGLU, softmax, Exp and the residual
// helpers vs. double-precision scalar references, on every target.
#include <stddef.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tests/ops_test.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "lutra/kernels/ops-inl.h"
#include "tests/test_util.h"

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace {

constexpr double kEps = 1.1920929e-7;  // FLT_EPSILON

void TestExp() {
  const hn::ScalableTag<float> df;
  const size_t N = hn::Lanes(df);
  std::vector<float> x, y(N);
  for (double v = -87.0; v <= 88.0; v += 0.0371) x.push_back(float(v));
  for (float v : {0.0f, -0.0f, 1e-8f, -1e-8f, 0.5f, -0.5f, 1.0f, 88.0f, -87.0f}) {
    x.push_back(v);
  }
  double worst = 0.0;
  for (size_t i = 0; i < x.size(); i += N) {
    const size_t n = std::min(N, x.size() - i);
    hn::StoreN(Exp(df, hn::LoadN(df, x.data() + i, n)), df, y.data(), n);
    for (size_t j = 0; j < n; ++j) {
      const double ref = std::exp(double(x[i + j]));
      const double rel = std::abs(y[j] - ref) / ref;
      worst = std::max(worst, rel);
    }
  }
  INFO("Exp worst relative error " << worst << " on " << test::CurrentTargetName());
  CHECK(worst < 4 * kEps);
  // Underflow to exactly 0 (attention masking relies on it), saturation.
  const float big[4] = {-HUGE_VALF, -1e30f, -88.0f, 200.0f};
  for (float b : big) {
    hn::StoreN(Exp(df, hn::Set(df, b)), df, y.data(), 1);
    if (b < 0) {
      CHECK(y[0] == 0.0f);
    } else {
      CHECK(std::isfinite(y[0]));
      CHECK(y[0] > 1e38f);
    }
  }
}

void TestRMSNorm() {
  test::Rng rng(11);
  for (size_t n : test::SweepSizes()) {
    for (float eps : {1e-5f, 1e-6f}) {
      std::vector<float> x = rng.GaussianVector(n, 3.0f);
      std::vector<float> w = rng.GaussianVector(n);
      std::vector<float> out(n);
      double ss = 0.0;
      for (float v : x) ss += double(v) * v;
      const double inv = 1.0 / std::sqrt(ss / double(n) + eps);
      std::vector<double> ref(n), tol(n);
      for (size_t i = 0; i < n; ++i) {
        ref[i] = double(x[i]) * w[i] * inv;
        // n * eps relative error of the mean (f32 sum), 4 eps for the rest.
        tol[i] = std::abs(ref[i]) * (double(n + 4) * kEps) + 1e-30;
      }
      RMSNorm(x.data(), w.data(), n, eps, out.data());
      test::ExpectClose(out.data(), ref.data(), tol.data(), n,
                        "RMSNorm n=" + std::to_string(n));
      // In place.
      RMSNorm(x.data(), w.data(), n, eps, x.data());
      test::ExpectClose(x.data(), ref.data(), tol.data(), n, "RMSNorm in place");
    }
  }
  // All-zero input with eps > 0 gives zeros, not NaN.
  std::vector<float> z(17, 0.0f), w(17, 1.0f);
  RMSNorm(z.data(), w.data(), 17, 1e-5f, z.data());
  for (float v : z) CHECK(v == 0.0f);
}

// Reference RoPE in double: pair p = (2p, 2p+1) or (p, p + half).
void RoPERef(const float* x, size_t heads, size_t hd, size_t pos, double base,
             RopeMode mode, double* out) {
  const size_t half = hd / 2;
  for (size_t h = 0; h < heads; ++h) {
    for (size_t p = 0; p < half; ++p) {
      const double angle = double(pos) * std::pow(base, -2.0 * double(p) / double(hd));
      const size_t i0 = mode == RopeMode::kAdjacent ? 2 * p : p;
      const size_t i1 = mode == RopeMode::kAdjacent ? 2 * p + 1 : p + half;
      const double a = x[h * hd + i0], b = x[h * hd + i1];
      out[h * hd + i0] = a * std::cos(angle) - b * std::sin(angle);
      out[h * hd + i1] = a * std::sin(angle) + b * std::cos(angle);
    }
  }
}

void TestRoPE() {
  test::Rng rng(5);
  const size_t dims[] = {2, 4, 6, 8, 10, 18, 32, 34, 64, 80, 96, 128, 256};
  for (RopeMode mode : {RopeMode::kAdjacent, RopeMode::kNeoX}) {
    for (size_t hd : dims) {
      for (size_t heads : {size_t{1}, size_t{3}}) {
        for (float base : {10000.0f, 500000.0f}) {
          const size_t T = 3, first = 8190;  // large positions
          std::vector<float> x = rng.GaussianVector(T * heads * hd);
          std::vector<float> y = x;
          REQUIRE(RoPE(y.data(), T, heads, hd, first, base, mode).ok());
          std::vector<double> ref(heads * hd);
          for (size_t t = 0; t < T; ++t) {
            RoPERef(x.data() + t * heads * hd, heads, hd, first + t, base, mode,
                    ref.data());
            // Each output is a 2-term rotation: a few eps of the pair's norm.
            std::vector<double> tol(heads * hd);
            for (size_t i = 0; i < heads * hd; ++i) {
              tol[i] = 8 * kEps * (std::abs(x[t * heads * hd + i]) + 3.0);
            }
            test::ExpectClose(y.data() + t * heads * hd, ref.data(), tol.data(),
                              heads * hd,
                              std::string(mode == RopeMode::kAdjacent ? "adjacent" : "neox") +
                                  " hd=" + std::to_string(hd));
          }
        }
      }
    }
  }
  // The two modes are the same rotation under the permutation that
  // llama.cpp's converter applies to q/k rows: NeoX(x) = P^-1 Adjacent(P x)
  // with P moving element p -> 2p and p + half -> 2p + 1.
  const size_t hd = 64, half = 32;
  std::vector<float> x = rng.GaussianVector(hd), px(hd);
  for (size_t p = 0; p < half; ++p) {
    px[2 * p] = x[p];
    px[2 * p + 1] = x[p + half];
  }
  REQUIRE(RoPE(x.data(), 1, 1, hd, 123, 10000.0f, RopeMode::kNeoX).ok());
  REQUIRE(RoPE(px.data(), 1, 1, hd, 123, 10000.0f, RopeMode::kAdjacent).ok());
  for (size_t p = 0; p < half; ++p) {
    CHECK(std::abs(px[2 * p] - x[p]) <= 1e-5f);
    CHECK(std::abs(px[2 * p + 1] - x[p + half]) <= 1e-5f);
  }
  // Position 0 is the identity.
  std::vector<float> z = rng.GaussianVector(2 * 80), z0 = z;
  REQUIRE(RoPE(z.data(), 1, 2, 80, 0, 10000.0f, RopeMode::kAdjacent).ok());
  for (size_t i = 0; i < z.size(); ++i) CHECK(z[i] == z0[i]);
  // A frequency table (scaled RoPE: Llama 3 factors, linear scaling): the
  // plain table gives the base form's bits, a scaled one the rotation by
  // pos * inv_freq[p].
  for (RopeMode mode : {RopeMode::kAdjacent, RopeMode::kNeoX}) {
    const size_t thd = 18, theads = 3, tpos = 77;
    std::vector<double> inv(thd / 2);
    for (size_t p = 0; p < thd / 2; ++p) inv[p] = std::pow(500000.0, -2.0 * double(p) / thd);
    const std::vector<float> x0 = rng.GaussianVector(theads * thd);
    std::vector<float> a = x0, b = x0;
    REQUIRE(RoPE(a.data(), 1, theads, thd, tpos, 500000.0f, mode).ok());
    REQUIRE(RoPE(b.data(), 1, theads, thd, tpos, inv.data(), mode).ok());
    CHECK(a == b);
    // Scaled: every frequency divided by 4 is position / 4 (4 * 77 = 308).
    for (double& f : inv) f /= 4.0;
    std::vector<float> c = x0, d = x0;
    REQUIRE(RoPE(c.data(), 1, theads, thd, 4 * tpos, inv.data(), mode).ok());
    REQUIRE(RoPE(d.data(), 1, theads, thd, tpos, 500000.0f, mode).ok());
    for (size_t i = 0; i < c.size(); ++i) CHECK(std::abs(c[i] - d[i]) <= 1e-5f);
    inv[1] = -1.0;
    CHECK(RoPE(c.data(), 1, theads, thd, 0, inv.data(), mode).code() ==
          StatusCode::kInvalidArgument);
  }
  // Errors.
  CHECK(RoPE(z.data(), 1, 1, 7, 0, 10000.0f, RopeMode::kAdjacent).code() ==
        StatusCode::kInvalidArgument);
  CHECK(RoPE(z.data(), 1, 1, 0, 0, 10000.0f, RopeMode::kNeoX).code() ==
        StatusCode::kInvalidArgument);
  CHECK(RoPE(z.data(), 1, 1, 2048, 0, 10000.0f, RopeMode::kNeoX).code() ==
        StatusCode::kInvalidArgument);
  CHECK(RoPE(z.data(), 1, 1, 8, 0, 0.0f, RopeMode::kNeoX).code() ==
        StatusCode::kInvalidArgument);
}

void TestSwiGLU() {
  test::Rng rng(9);
  for (size_t n : test::SweepSizes()) {
    std::vector<float> g = rng.GaussianVector(n, 4.0f), u = rng.GaussianVector(n);
    if (n > 4) {
      g[0] = -100.0f;  // e^100 saturates: result ~0, not NaN
      g[1] = 100.0f;
      g[2] = 0.0f;
    }
    std::vector<float> out(n);
    std::vector<double> ref(n), tol(n);
    for (size_t i = 0; i < n; ++i) {
      const double x = g[i];
      ref[i] = x / (1.0 + std::exp(-x)) * u[i];
      tol[i] = 8 * kEps * std::abs(ref[i]) + 1e-30;
    }
    SwiGLU(g.data(), u.data(), n, out.data());
    test::ExpectClose(out.data(), ref.data(), tol.data(), n, "SwiGLU n=" + std::to_string(n));
    SwiGLU(g.data(), u.data(), n, g.data());  // out aliases gate
    test::ExpectClose(g.data(), ref.data(), tol.data(), n, "SwiGLU in place");
  }
}

void TestSoftmax() {
  test::Rng rng(13);
  for (size_t n : test::SweepSizes()) {
    std::vector<float> x = rng.GaussianVector(n, 5.0f);
    if (n > 3) x[1] = -HUGE_VALF;  // masked entry
    double mx = -HUGE_VAL;
    for (float v : x) mx = std::max(mx, double(v));
    double sum = 0.0;
    std::vector<double> ref(n), tol(n);
    for (size_t i = 0; i < n; ++i) sum += (ref[i] = std::exp(double(x[i]) - mx));
    for (size_t i = 0; i < n; ++i) {
      ref[i] /= sum;
      // Exp's 2 ulp, the f32 sum (n eps relative), the final product.
      tol[i] = ref[i] * double(n + 8) * kEps + 1e-30;
    }
    Softmax(x.data(), n);
    test::ExpectClose(x.data(), ref.data(), tol.data(), n, "Softmax n=" + std::to_string(n));
    if (n > 3) CHECK(x[1] == 0.0f);
  }
  Softmax(static_cast<float*>(nullptr), 0);  // no-op
}

void TestResidual() {
  test::Rng rng(17);
  for (size_t n : test::SweepSizes(300)) {
    std::vector<float> x = rng.GaussianVector(n), y = rng.GaussianVector(n);
    std::vector<float> x0 = x;
    AddInPlace(x.data(), y.data(), n);
    for (size_t i = 0; i < n; ++i) CHECK(x[i] == x0[i] + y[i]);
    ScaleInPlace(x.data(), 0.5f, n);
    for (size_t i = 0; i < n; ++i) CHECK(x[i] == (x0[i] + y[i]) * 0.5f);
  }
}

}  // namespace
}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lutra {
HWY_EXPORT(TestExp);
HWY_EXPORT(TestRMSNorm);
HWY_EXPORT(TestRoPE);
HWY_EXPORT(TestSwiGLU);
HWY_EXPORT(TestSoftmax);
HWY_EXPORT(TestResidual);

TEST_CASE("Exp accuracy, underflow and saturation", "[ops]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestExp)(); });
}
TEST_CASE("RMSNorm matches reference", "[ops]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestRMSNorm)(); });
}
TEST_CASE("RoPE adjacent and NeoX match reference", "[ops]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestRoPE)(); });
}
TEST_CASE("SwiGLU matches reference", "[ops]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestSwiGLU)(); });
}
TEST_CASE("Softmax matches reference", "[ops]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestSoftmax)(); });
}
TEST_CASE("AddInPlace and ScaleInPlace", "[ops]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestResidual)(); });
}
}  // namespace lutra
#endif  // HWY_ONCE
