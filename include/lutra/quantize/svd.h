// Truncated SVD of dense f32 matrices: randomized range finder (Halko,
// Martinsson & Tropp 2011) with power iterations, finished by a one-sided
// Jacobi SVD of the small projected matrix.
//
// Used offline (adapter building, not decode): the accuracy-recovery adapter
// approximates each quantization residual W - W_hat by its best rank-r
// factors. Plain scalar C++ in double precision: a 3072 x 8192 matrix at
// rank 16 costs a few GFLOP, seconds, and precision matters more than speed
// here because the residual's spectrum is flat-ish and we want the true top
// singular directions.
//
// Determinism: the Gaussian sketch comes from a self-contained generator
// (SplitMix64 + Box-Muller), not std::normal_distribution, whose output is
// implementation-defined; the same seed gives the same factors on every
// platform and standard library (up to libm's last-bit differences).
#ifndef LUTRA_SVD_H_
#define LUTRA_SVD_H_

#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "lutra/base/status.h"

namespace lutra {

// Deterministic Gaussian source for the sketch. SplitMix64 has a full 2^64
// period and passes BigCrush; Box-Muller turns two uniforms into a normal.
class SvdRng {
 public:
  explicit SvdRng(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in (0, 1]: never 0, so log() below is finite.
  double Uniform() { return (static_cast<double>(Next() >> 11) + 1.0) * 0x1.0p-53; }
  double Gaussian() {
    const double u1 = Uniform(), u2 = Uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

 private:
  uint64_t state_;
};

// Orthonormalizes the columns of y (row-major rows x cols, in place) by
// classical Gram-Schmidt applied twice ("CGS2"), which is as accurate as
// Householder QR for the thin matrices of the range finder (cols << rows) and
// simpler. A column that is (numerically) in the span of the previous ones is
// set to zero instead of being normalized noise, so rank-deficient input
// yields zero singular values rather than spurious directions.
inline void OrthonormalizeColumns(double* y, size_t rows, size_t cols) {
  std::vector<double> proj(cols);
  for (size_t j = 0; j < cols; ++j) {
    double norm0 = 0.0;
    for (size_t i = 0; i < rows; ++i) norm0 += y[i * cols + j] * y[i * cols + j];
    norm0 = std::sqrt(norm0);
    for (int pass = 0; pass < 2; ++pass) {
      std::fill(proj.begin(), proj.end(), 0.0);
      for (size_t i = 0; i < rows; ++i) {
        const double* row = y + i * cols;
        for (size_t k = 0; k < j; ++k) proj[k] += row[k] * row[j];
      }
      for (size_t i = 0; i < rows; ++i) {
        double* row = y + i * cols;
        double sum = 0.0;
        for (size_t k = 0; k < j; ++k) sum += proj[k] * row[k];
        row[j] -= sum;
      }
    }
    double norm = 0.0;
    for (size_t i = 0; i < rows; ++i) norm += y[i * cols + j] * y[i * cols + j];
    norm = std::sqrt(norm);
    // Relative test: what is left after projection is rounding noise.
    const bool dependent = !(norm > 1e-10 * norm0) || norm == 0.0;
    const double inv = dependent ? 0.0 : 1.0 / norm;
    for (size_t i = 0; i < rows; ++i) y[i * cols + j] *= inv;
  }
}

// One-sided (Hestenes) Jacobi SVD. x holds `cols` column vectors of length
// `len`, stored column after column (x[j * len + i] is element i of column
// j). On return the columns are mutually orthogonal: x = U diag(sigma), with
// v (cols x cols, row-major, v[i * cols + j]) the accumulated rotations, so
// that the input X0 = x_out * v^T = U diag(sigma) v^T. sigma[j] = |column j|.
// Columns are NOT sorted. Pairwise rotations converge quadratically; we stop
// when every pair is orthogonal to 1e-15 relative or after 60 sweeps.
// Jacobi is chosen over forming X^T X and an eigensolver because it works on
// X directly and so keeps small singular values accurate.
inline void JacobiSvdColumns(double* x, size_t len, size_t cols, double* v,
                             double* sigma) {
  for (size_t i = 0; i < cols * cols; ++i) v[i] = 0.0;
  for (size_t i = 0; i < cols; ++i) v[i * cols + i] = 1.0;
  for (int sweep = 0; sweep < 60; ++sweep) {
    bool rotated = false;
    for (size_t p = 0; p + 1 < cols; ++p) {
      for (size_t q = p + 1; q < cols; ++q) {
        double* xp = x + p * len;
        double* xq = x + q * len;
        double alpha = 0.0, beta = 0.0, gamma = 0.0;
        for (size_t i = 0; i < len; ++i) {
          alpha += xp[i] * xp[i];
          beta += xq[i] * xq[i];
          gamma += xp[i] * xq[i];
        }
        if (gamma == 0.0 || std::abs(gamma) <= 1e-15 * std::sqrt(alpha * beta)) continue;
        rotated = true;
        const double zeta = (beta - alpha) / (2.0 * gamma);
        const double t = (zeta >= 0.0 ? 1.0 : -1.0) /
                         (std::abs(zeta) + std::sqrt(1.0 + zeta * zeta));
        const double c = 1.0 / std::sqrt(1.0 + t * t);
        const double s = c * t;
        for (size_t i = 0; i < len; ++i) {
          const double a = xp[i], b = xq[i];
          xp[i] = c * a - s * b;
          xq[i] = s * a + c * b;
        }
        for (size_t i = 0; i < cols; ++i) {
          const double a = v[i * cols + p], b = v[i * cols + q];
          v[i * cols + p] = c * a - s * b;
          v[i * cols + q] = s * a + c * b;
        }
      }
    }
    if (!rotated) break;
  }
  for (size_t j = 0; j < cols; ++j) {
    double n = 0.0;
    for (size_t i = 0; i < len; ++i) n += x[j * len + i] * x[j * len + i];
    sigma[j] = std::sqrt(n);
  }
}

struct SvdOptions {
  size_t rank = 16;          // r: singular triplets to return (clamped to min(M, N))
  size_t oversample = 8;     // extra sketch columns: accuracy of the top r
  int power_iterations = 2;  // q: sharpens a slowly decaying spectrum (error ~ (s_{r+1}/s_r)^(2q+1))
  uint64_t seed = 0x5EEDu;   // Gaussian sketch seed (deterministic)
};

// M ~= U diag(s) Vt with U rows x rank, Vt rank x cols, s descending.
struct TruncatedSvd {
  size_t rows = 0, cols = 0, rank = 0;
  std::vector<float> u;   // rows x rank, row-major, orthonormal columns
  std::vector<float> s;   // rank, descending, >= 0
  std::vector<float> vt;  // rank x cols, row-major, orthonormal rows
};

namespace svd_detail {

// Sorts the triplets by descending sigma: order[k] = column of the k-th largest.
inline std::vector<size_t> DescendingOrder(const std::vector<double>& sigma) {
  std::vector<size_t> order(sigma.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return sigma[a] > sigma[b]; });
  return order;
}

inline Status CheckInput(const float* m, size_t rows, size_t cols, size_t rank) {
  if (m == nullptr) return InvalidArgument("svd: null matrix");
  if (rows == 0 || cols == 0) {
    return InvalidArgument("svd: shape %zu x %zu, need rows >= 1 and cols >= 1", rows, cols);
  }
  if (rank == 0) return InvalidArgument("svd: rank = 0, need rank >= 1");
  for (size_t i = 0; i < rows * cols; ++i) {
    if (!std::isfinite(m[i])) {
      return InvalidArgument("svd: element (%zu, %zu) is not finite", i / cols, i % cols);
    }
  }
  return Status::Ok();
}

}  // namespace svd_detail

// Exact SVD (all min(rows, cols) triplets, truncated to `rank`) of a
// row-major rows x cols matrix by one-sided Jacobi on its columns. Cost
// O(sweeps * rows * cols^2): for tests and small matrices (<= a few hundred
// columns); large matrices use RandomizedSvd.
inline StatusOr<TruncatedSvd> ExactSvd(const float* m, size_t rows, size_t cols,
                                       size_t rank) {
  LUTRA_RETURN_IF_ERROR(svd_detail::CheckInput(m, rows, cols, rank));
  // Work on the side with fewer vectors: Jacobi on the columns of M (or of
  // M^T when cols > rows) needs min(rows, cols)^2 pair rotations.
  const bool transpose = cols > rows;
  const size_t len = transpose ? cols : rows;   // vector length
  const size_t n = transpose ? rows : cols;     // number of vectors
  std::vector<double> x(len * n), v(n * n), sigma(n);
  for (size_t i = 0; i < rows; ++i) {
    for (size_t j = 0; j < cols; ++j) {
      // Column j of M, or column i of M^T (= row i of M).
      if (transpose) {
        x[i * len + j] = m[i * cols + j];
      } else {
        x[j * len + i] = m[i * cols + j];
      }
    }
  }
  JacobiSvdColumns(x.data(), len, n, v.data(), sigma.data());
  const std::vector<size_t> order = svd_detail::DescendingOrder(sigma);
  TruncatedSvd out;
  out.rows = rows;
  out.cols = cols;
  out.rank = std::min(rank, n);
  out.u.assign(rows * out.rank, 0.0f);
  out.s.assign(out.rank, 0.0f);
  out.vt.assign(out.rank * cols, 0.0f);
  for (size_t k = 0; k < out.rank; ++k) {
    const size_t j = order[k];
    const double sg = sigma[j];
    out.s[k] = static_cast<float>(sg);
    const double inv = sg > 0.0 ? 1.0 / sg : 0.0;
    // Not transposed: M = X V^T with X = U S, so U = x_j / s_j, Vt row = v col.
    // Transposed: M^T = X V^T, so M = V S U_x^T: U = v col, Vt row = x_j / s_j.
    for (size_t i = 0; i < rows; ++i) {
      out.u[i * out.rank + k] = static_cast<float>(
          transpose ? v[i * n + j] : x[j * len + i] * inv);
    }
    for (size_t c = 0; c < cols; ++c) {
      out.vt[k * cols + c] = static_cast<float>(
          transpose ? x[j * len + c] * inv : v[c * n + j]);
    }
  }
  return out;
}

// Randomized truncated SVD of a row-major rows x cols f32 matrix:
//   Y = M Omega (Omega cols x l Gaussian, l = rank + oversample), Q = qr(Y);
//   power iterations: Q = qr(M qr(M^T Q)), re-orthonormalizing each time so
//   that round-off does not collapse Q onto the top singular vector;
//   B = Q^T M (l x cols); B = Ub S Vt by Jacobi; U = Q Ub.
// Cost ~ 2 * rows * cols * l * (2 q + 2) flops in double, plus O((rows +
// cols) l^2). Deterministic for a given options.seed. Returns min(rank,
// rows, cols) triplets sorted by descending singular value.
inline StatusOr<TruncatedSvd> RandomizedSvd(const float* m, size_t rows, size_t cols,
                                            const SvdOptions& options) {
  LUTRA_RETURN_IF_ERROR(svd_detail::CheckInput(m, rows, cols, options.rank));
  if (options.power_iterations < 0) {
    return InvalidArgument("svd: power_iterations = %d, need >= 0", options.power_iterations);
  }
  const size_t rank = std::min(options.rank, std::min(rows, cols));
  const size_t l = std::min(rank + options.oversample, std::min(rows, cols));

  // Y = M Omega, Omega drawn row by row (cols x l).
  std::vector<double> omega(cols * l);
  SvdRng rng(options.seed);
  for (double& w : omega) w = rng.Gaussian();
  std::vector<double> q(rows * l, 0.0);   // rows x l
  std::vector<double> z(cols * l, 0.0);   // cols x l
  // out (rows x l) = M * in (cols x l); loop order keeps the inner loop on a
  // contiguous row of `in` and of `out`.
  auto mul = [&](const std::vector<double>& in, std::vector<double>& out) {
    std::fill(out.begin(), out.end(), 0.0);
    for (size_t i = 0; i < rows; ++i) {
      double* o = out.data() + i * l;
      const float* mr = m + i * cols;
      for (size_t k = 0; k < cols; ++k) {
        const double mk = mr[k];
        if (mk == 0.0) continue;
        const double* in_row = in.data() + k * l;
        for (size_t j = 0; j < l; ++j) o[j] += mk * in_row[j];
      }
    }
  };
  // out (cols x l) = M^T * in (rows x l).
  auto mul_t = [&](const std::vector<double>& in, std::vector<double>& out) {
    std::fill(out.begin(), out.end(), 0.0);
    for (size_t i = 0; i < rows; ++i) {
      const double* in_row = in.data() + i * l;
      const float* mr = m + i * cols;
      for (size_t k = 0; k < cols; ++k) {
        const double mk = mr[k];
        if (mk == 0.0) continue;
        double* o = out.data() + k * l;
        for (size_t j = 0; j < l; ++j) o[j] += mk * in_row[j];
      }
    }
  };
  mul(omega, q);
  OrthonormalizeColumns(q.data(), rows, l);
  for (int it = 0; it < options.power_iterations; ++it) {
    mul_t(q, z);
    OrthonormalizeColumns(z.data(), cols, l);
    mul(z, q);
    OrthonormalizeColumns(q.data(), rows, l);
  }
  // B^T = M^T Q (cols x l): stored column after column it is exactly the
  // layout JacobiSvdColumns wants (l vectors of length cols).
  mul_t(q, z);
  std::vector<double> bt(l * cols);
  for (size_t k = 0; k < cols; ++k) {
    for (size_t j = 0; j < l; ++j) bt[j * cols + k] = z[k * l + j];
  }
  // B^T = X V^T with X = Ux S  =>  B = V S Ux^T, M ~= Q B = (Q V) S Ux^T.
  std::vector<double> v(l * l), sigma(l);
  JacobiSvdColumns(bt.data(), cols, l, v.data(), sigma.data());
  const std::vector<size_t> order = svd_detail::DescendingOrder(sigma);

  TruncatedSvd out;
  out.rows = rows;
  out.cols = cols;
  out.rank = rank;
  out.u.assign(rows * rank, 0.0f);
  out.s.assign(rank, 0.0f);
  out.vt.assign(rank * cols, 0.0f);
  for (size_t k = 0; k < rank; ++k) {
    const size_t j = order[k];
    out.s[k] = static_cast<float>(sigma[j]);
    const double inv = sigma[j] > 0.0 ? 1.0 / sigma[j] : 0.0;
    for (size_t c = 0; c < cols; ++c) {
      out.vt[k * cols + c] = static_cast<float>(bt[j * cols + c] * inv);
    }
    for (size_t i = 0; i < rows; ++i) {
      double sum = 0.0;
      for (size_t t = 0; t < l; ++t) sum += q[i * l + t] * v[t * l + j];
      out.u[i * rank + k] = static_cast<float>(sum);
    }
  }
  return out;
}

}  // namespace lutra

#endif  // LUTRA_SVD_H_
