// Tests of the truncated SVD (include/lutra/quantize/svd.h): exact Jacobi SVD against
// planted spectra, randomized SVD recovering planted low-rank matrices,
// Eckart-Young optimality as the rank grows, determinism and bad input.
// Plain scalar code: no per-target dispatch needed.
#include "lutra/quantize/svd.h"

#include <cmath>
#include <cstring>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "tests/test_util.h"

namespace lutra {
namespace {

// Random rows x k matrix with orthonormal columns (row-major).
std::vector<double> RandomOrthonormal(size_t rows, size_t k, test::Rng& rng) {
  std::vector<double> q(rows * k);
  for (double& x : q) x = rng.Gaussian();
  OrthonormalizeColumns(q.data(), rows, k);
  return q;
}

// M = U diag(s) V^T with random orthonormal U (rows x k) and V (cols x k).
std::vector<float> Planted(size_t rows, size_t cols, const std::vector<double>& s,
                           test::Rng& rng) {
  const size_t k = s.size();
  const std::vector<double> u = RandomOrthonormal(rows, k, rng);
  const std::vector<double> v = RandomOrthonormal(cols, k, rng);
  std::vector<float> m(rows * cols);
  for (size_t i = 0; i < rows; ++i) {
    for (size_t j = 0; j < cols; ++j) {
      double sum = 0.0;
      for (size_t t = 0; t < k; ++t) sum += u[i * k + t] * s[t] * v[j * k + t];
      m[i * cols + j] = static_cast<float>(sum);
    }
  }
  return m;
}

// ||M - U diag(s) Vt||_F for the first `rank` triplets.
double ResidualNorm(const std::vector<float>& m, const TruncatedSvd& svd, size_t rank) {
  double sum = 0.0;
  for (size_t i = 0; i < svd.rows; ++i) {
    for (size_t j = 0; j < svd.cols; ++j) {
      double approx = 0.0;
      for (size_t t = 0; t < rank; ++t) {
        approx += double(svd.u[i * svd.rank + t]) * svd.s[t] * svd.vt[t * svd.cols + j];
      }
      const double e = m[i * svd.cols + j] - approx;
      sum += e * e;
    }
  }
  return std::sqrt(sum);
}

double FrobeniusNorm(const std::vector<float>& m) { return test::L2Norm(m); }

// max |U^T U - I| over the columns of a rows x rank row-major matrix.
double OrthonormalityError(const std::vector<float>& u, size_t rows, size_t rank,
                           bool columns) {
  double worst = 0.0;
  for (size_t a = 0; a < rank; ++a) {
    for (size_t b = 0; b < rank; ++b) {
      double dot = 0.0;
      for (size_t i = 0; i < rows; ++i) {
        dot += columns ? double(u[i * rank + a]) * u[i * rank + b]
                       : double(u[a * rows + i]) * u[b * rows + i];
      }
      worst = std::max(worst, std::abs(dot - (a == b ? 1.0 : 0.0)));
    }
  }
  return worst;
}

TEST_CASE("ExactSvd recovers a planted spectrum, both orientations") {
  test::Rng rng(1);
  for (const auto& shape : {std::pair<size_t, size_t>{23, 13}, {13, 23}, {17, 17}, {1, 9},
                            {9, 1}}) {
    const size_t rows = shape.first, cols = shape.second;
    const size_t k = std::min(rows, cols);
    std::vector<double> s(k);
    for (size_t t = 0; t < k; ++t) s[t] = 10.0 / (1.0 + t);  // distinct, decaying
    const std::vector<float> m = Planted(rows, cols, s, rng);
    auto svd = ExactSvd(m.data(), rows, cols, k);
    REQUIRE(svd.ok());
    INFO("shape " << rows << " x " << cols);
    REQUIRE(svd->rank == k);
    for (size_t t = 0; t < k; ++t) CHECK(std::abs(svd->s[t] - s[t]) <= 1e-5 * s[0]);
    CHECK(ResidualNorm(m, *svd, k) <= 1e-5 * FrobeniusNorm(m));
    CHECK(OrthonormalityError(svd->u, rows, k, /*columns=*/true) <= 1e-5);
    CHECK(OrthonormalityError(svd->vt, cols, k, /*columns=*/false) <= 1e-5);
  }
}

TEST_CASE("RandomizedSvd recovers a planted low-rank residual") {
  test::Rng rng(2);
  // Odd sizes, both orientations; rank-8 signal plus noise 1e-4 of it.
  for (const auto& shape : {std::pair<size_t, size_t>{97, 65}, {65, 129}, {172, 64}}) {
    const size_t rows = shape.first, cols = shape.second;
    const std::vector<double> s = {9, 8, 7, 5, 4, 3, 2, 1};
    std::vector<float> m = Planted(rows, cols, s, rng);
    const double signal = FrobeniusNorm(m);
    for (float& x : m) x += rng.Gaussian(static_cast<float>(1e-4 * signal / std::sqrt(double(rows * cols))));
    SvdOptions opt;
    opt.rank = 8;
    auto svd = RandomizedSvd(m.data(), rows, cols, opt);
    REQUIRE(svd.ok());
    INFO("shape " << rows << " x " << cols);
    for (size_t t = 0; t < 8; ++t) CHECK(std::abs(svd->s[t] - s[t]) <= 1e-3 * s[0]);
    // Only the noise is left (~1e-4 of the signal).
    CHECK(ResidualNorm(m, *svd, 8) <= 3e-4 * signal);
    CHECK(OrthonormalityError(svd->u, rows, 8, true) <= 1e-5);
    CHECK(OrthonormalityError(svd->vt, cols, 8, false) <= 1e-5);
  }
}

TEST_CASE("RandomizedSvd error falls with rank and is near Eckart-Young") {
  // Heavy-tailed random matrix, like a quantization residual: flat-ish
  // spectrum, the hard case for randomized SVD.
  test::Rng rng(3);
  const size_t rows = 120, cols = 75;
  std::vector<float> m(rows * cols);
  for (float& x : m) x = rng.HeavyTailed(0.01f);
  auto exact = ExactSvd(m.data(), rows, cols, cols);
  REQUIRE(exact.ok());
  double prev = FrobeniusNorm(m);
  for (size_t r : {1, 2, 4, 8, 16, 32}) {
    SvdOptions opt;
    opt.rank = r;
    opt.power_iterations = 3;
    auto svd = RandomizedSvd(m.data(), rows, cols, opt);
    REQUIRE(svd.ok());
    const double err = ResidualNorm(m, *svd, r);
    double optimal = 0.0;  // sqrt(sum_{k >= r} s_k^2): the best possible
    for (size_t k = r; k < cols; ++k) optimal += double(exact->s[k]) * exact->s[k];
    optimal = std::sqrt(optimal);
    INFO("rank " << r << " error " << err << " optimal " << optimal << " previous " << prev);
    CHECK(err < prev);
    CHECK(err >= optimal * (1.0 - 1e-5));  // cannot beat the optimum
    CHECK(err <= optimal * 1.02);          // within 2% of it
    // The top singular values match the exact ones closely.
    CHECK(std::abs(svd->s[0] - exact->s[0]) <= 1e-2 * exact->s[0]);
    prev = err;
  }
}

TEST_CASE("RandomizedSvd is deterministic and handles rank deficiency") {
  test::Rng rng(4);
  const std::vector<float> m = Planted(50, 40, {3.0, 2.0, 1.0}, rng);
  SvdOptions opt;
  opt.rank = 10;  // more than the true rank 3
  auto a = RandomizedSvd(m.data(), 50, 40, opt);
  auto b = RandomizedSvd(m.data(), 50, 40, opt);
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  CHECK(std::memcmp(a->u.data(), b->u.data(), a->u.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(a->vt.data(), b->vt.data(), a->vt.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(a->s.data(), b->s.data(), a->s.size() * sizeof(float)) == 0);
  for (float x : a->u) CHECK(std::isfinite(x));
  for (float x : a->vt) CHECK(std::isfinite(x));
  CHECK(std::abs(a->s[0] - 3.0f) <= 1e-5f);
  CHECK(std::abs(a->s[2] - 1.0f) <= 1e-5f);
  for (size_t t = 3; t < 10; ++t) CHECK(a->s[t] <= 1e-5f);
  CHECK(ResidualNorm(m, *a, 10) <= 1e-5 * FrobeniusNorm(m));
  // Rank above min(rows, cols) is clamped, zero matrix gives zero factors.
  std::vector<float> zero(6 * 4, 0.0f);
  opt.rank = 16;
  auto z = RandomizedSvd(zero.data(), 6, 4, opt);
  REQUIRE(z.ok());
  CHECK(z->rank == 4);
  for (float x : z->s) CHECK(x == 0.0f);
  for (float x : z->u) CHECK(std::isfinite(x));
}

TEST_CASE("SVD rejects bad input with a message") {
  std::vector<float> m(12, 1.0f);
  SvdOptions opt;
  CHECK(RandomizedSvd(nullptr, 3, 4, opt).status().message().find("null") != std::string::npos);
  CHECK(!RandomizedSvd(m.data(), 0, 4, opt).ok());
  CHECK(!ExactSvd(m.data(), 3, 0, 2).ok());
  opt.rank = 0;
  CHECK(RandomizedSvd(m.data(), 3, 4, opt).status().message().find("rank") != std::string::npos);
  opt.rank = 2;
  opt.power_iterations = -1;
  CHECK(!RandomizedSvd(m.data(), 3, 4, opt).ok());
  opt.power_iterations = 1;
  m[5] = std::nanf("");
  const auto bad = RandomizedSvd(m.data(), 3, 4, opt);
  REQUIRE(!bad.ok());
  CHECK(bad.status().code() == StatusCode::kInvalidArgument);
  CHECK(bad.status().message().find("(1, 1)") != std::string::npos);
}

}  // namespace
}  // namespace lutra
