// GPTQ-style error feedback for palettized weights: re-chooses the indices
// of an existing palettization (codebooks fixed) so that the *output* error
// E||(W - W_hat) x||^2 = sum_n e_n^T H e_n is small, with H = E[x x^T] the
// input's Gram matrix (calibration.h, keep_gram).
//
// Plain nearest-entry assignment rounds each weight on its own. GPTQ
// (Frantar et al. 2022) rounds the columns of a row in order and, after
// each, moves the rounding error onto the columns not yet rounded, in the
// proportions that cancel it best under H: with U the upper Cholesky
// factor of H^-1,
//   e = (w_j - q_j) / U_jj,   w_k -= e U_jk  for k > j.
// Here q_j is the nearest entry of the row's (fixed) codebook, as in GPTVQ
// and SqueezeLLM-style LUT quantization; the codebooks come from the
// activation-weighted k-means (palettize.h) of the original weights.
// H is damped by `damp` x mean(diag H) so that the inverse exists.
//
// AsymmetricTarget (bottom) serves sequential quantization: quantizing a
// model layer by layer, it aims each matrix at the f32 model's outputs from
// the partly quantized model's inputs, so errors do not compound. The
// engine's PalettizeModel (examples/model.cc) runs the two together;
// docs/quality.md measures each step.
//
// Cost O(N K^2 / 2) multiply-adds plus O(K^3) for the factorization, and
// K^2 doubles of memory: meant for models whose Gram matrices fit (the
// calibration keeps them only for K <= ActivationMoments::kMaxGramCols).
// Deterministic; rows are independent.
//
// Plain header (scalar C++).
#ifndef LUTRA_QUANTIZE_GPTQ_H_
#define LUTRA_QUANTIZE_GPTQ_H_

#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "lutra/base/status.h"
#include "lutra/format/palette.h"
#include "lutra/quantize/kmeans_1d.h"

namespace lutra {

namespace gptq_detail {

// In-place Cholesky A = L L^T of the K x K symmetric positive definite A
// (lower triangle written; upper ignored). False if A is not positive
// definite.
inline bool Cholesky(std::vector<double>& a, size_t K) {
  for (size_t j = 0; j < K; ++j) {
    double d = a[j * K + j];
    for (size_t k = 0; k < j; ++k) d -= a[j * K + k] * a[j * K + k];
    if (!(d > 0.0)) return false;
    d = std::sqrt(d);
    a[j * K + j] = d;
    for (size_t i = j + 1; i < K; ++i) {
      double s = a[i * K + j];
      for (size_t k = 0; k < j; ++k) s -= a[i * K + k] * a[j * K + k];
      a[i * K + j] = s / d;
    }
  }
  return true;
}

// U, upper triangular, with U^T U = H^-1 (GPTQ's factor): H^-1 from the
// Cholesky factor of H, then the Cholesky factor of H^-1.
inline Status InverseCholeskyUpper(std::vector<double> h, size_t K, std::vector<double>* u) {
  if (!Cholesky(h, K)) return InvalidArgument("gptq: the damped Gram matrix is not positive definite");
  // Linv = L^-1 (lower).
  std::vector<double> linv(K * K, 0.0);
  for (size_t j = 0; j < K; ++j) {
    linv[j * K + j] = 1.0 / h[j * K + j];
    for (size_t i = j + 1; i < K; ++i) {
      double s = 0.0;
      for (size_t k = j; k < i; ++k) s -= h[i * K + k] * linv[k * K + j];
      linv[i * K + j] = s / h[i * K + i];
    }
  }
  // Hinv = Linv^T Linv, then its upper Cholesky factor U (Hinv = U^T U) is
  // the transpose of the lower factor.
  std::vector<double> hinv(K * K, 0.0);
  for (size_t i = 0; i < K; ++i) {
    for (size_t j = 0; j <= i; ++j) {
      double s = 0.0;
      for (size_t k = i; k < K; ++k) s += linv[k * K + i] * linv[k * K + j];
      hinv[i * K + j] = hinv[j * K + i] = s;
    }
  }
  // Hinv = L L^T (lower Cholesky), so U = L^T is upper with U^T U = Hinv.
  std::vector<double> c = hinv;
  if (!Cholesky(c, K)) return InvalidArgument("gptq: H^-1 is not positive definite");
  u->assign(K * K, 0.0);
  for (size_t i = 0; i < K; ++i) {
    for (size_t j = 0; j <= i; ++j) (*u)[j * K + i] = c[i * K + j];  // U = L_hinv^T
  }
  return Status::Ok();
}

}  // namespace gptq_detail

struct GptqOptions {
  // H + damp * mean(diag H) * I. GPTQ's usual 0.01 leans harder on the
  // calibration text: on stories260K 0.3 gave 16 % lower KL on held-out text
  // and 4-6 % on sampled text at 3 and 4 bits (docs/quality.md); more pulls
  // toward plain rounding.
  double damp = 0.3;
  // AsymmetricTarget's regularization, relative to mean(diag H~): it pulls
  // W* toward W where the calibration text does not determine it. At 0.01
  // W* moved 10-30% from W and fit the calibration text but not held-out
  // text on stories260K; 1 kept most of the gain (docs/quality.md).
  double asymmetric_damp = 1.0;
  // Round columns in order of decreasing E[x_k^2] (GPTQ's "act order").
  bool act_order = true;
};

// Re-assigns the indices of `q` (a palettization of the N x K row-major w;
// its codebooks stay) by GPTQ error feedback, for the output error
// sum_n e_n^T H e_n under the K x K Gram matrix `gram`. The new assignment
// is kept only if it lowers that error (a least-squares refit of the
// codebooks under H was tried too: it fit the calibration text but raised
// the held-out KL on stories260K, docs/quality.md). Reports the error
// before and after in *before / *after when non-null.
inline Status GptqRefine(const float* w, const double* gram, const GptqOptions& opt,
                         PaletteMatrix* q, double* before = nullptr, double* after = nullptr) {
  const PaletteShape shape = q->shape();
  const size_t N = shape.rows, K = shape.cols, E = shape.num_entries();
  if (w == nullptr || gram == nullptr) return InvalidArgument("gptq: null weights or Gram matrix");
  if (!(opt.damp > 0.0) || !std::isfinite(opt.damp)) {
    return InvalidArgument("gptq: damp = %g, need a finite value > 0", opt.damp);
  }
  double mean_diag = 0.0;
  for (size_t k = 0; k < K; ++k) mean_diag += gram[k * K + k];
  mean_diag /= double(K);
  if (!(mean_diag > 0.0) || !std::isfinite(mean_diag)) {
    return InvalidArgument("gptq: the Gram matrix has no positive diagonal");
  }
  // Column order: by decreasing E[x_k^2] with act_order (the columns that
  // matter most are rounded first, while the most columns remain to absorb
  // their error), else as stored. U is computed in that order.
  std::vector<size_t> perm(K);
  for (size_t k = 0; k < K; ++k) perm[k] = k;
  if (opt.act_order) {
    std::stable_sort(perm.begin(), perm.end(), [&](size_t a, size_t b) {
      return gram[a * K + a] > gram[b * K + b];
    });
  }
  std::vector<double> h(K * K);
  for (size_t i = 0; i < K; ++i) {
    for (size_t j = 0; j < K; ++j) h[i * K + j] = gram[perm[i] * K + perm[j]];
  }
  for (size_t k = 0; k < K; ++k) h[k * K + k] += opt.damp * mean_diag;
  std::vector<double> u;
  LUTRA_RETURN_IF_ERROR(gptq_detail::InverseCholeskyUpper(std::move(h), K, &u));

  // Codebooks as stored (ascending, palettize.h) and the current indices.
  const PaletteView v = q->view();
  const size_t groups = shape.num_groups();
  std::vector<double> cb(groups * E);
  for (size_t g = 0; g < groups; ++g) {
    for (size_t e = 0; e < E; ++e) cb[g * E + e] = v.entry(g, e);
  }
  std::vector<uint8_t> idx(N * K), nidx(N * K);
  for (size_t n = 0; n < N; ++n) UnpackRow(shape, v.indices + n * shape.row_bytes(), &idx[n * K]);
  // Output error sum_n e_n^T H e_n of an assignment.
  std::vector<double> err(K);
  const auto total_error = [&](const std::vector<uint8_t>& ix) {
    double s = 0.0;
    for (size_t n = 0; n < N; ++n) {
      const double* c = &cb[(n / shape.group_rows) * E];
      for (size_t k = 0; k < K; ++k) err[k] = double(w[n * K + k]) - c[ix[n * K + k]];
      for (size_t i = 0; i < K; ++i) {
        double t = 0.0;
        for (size_t j = 0; j < K; ++j) t += gram[i * K + j] * err[j];
        s += err[i] * t;
      }
    }
    return s;
  };
  // Error feedback: round the columns in `perm` order to the nearest entry,
  // moving each rounding error onto the columns not yet rounded.
  std::vector<double> mids(E), row(K);
  for (size_t n = 0; n < N; ++n) {
    const double* c = &cb[(n / shape.group_rows) * E];
    for (size_t e = 0; e + 1 < E; ++e) mids[e] = 0.5 * (c[e] + c[e + 1]);
    mids[E - 1] = std::numeric_limits<double>::infinity();
    for (size_t k = 0; k < K; ++k) row[k] = w[n * K + perm[k]];  // permuted
    for (size_t j = 0; j < K; ++j) {
      const uint32_t i = kmeans_1d::Nearest(mids.data(), E, row[j]);
      nidx[n * K + perm[j]] = static_cast<uint8_t>(i);
      const double e = (row[j] - c[i]) / u[j * K + j];
      const double* uj = u.data() + j * K;
      for (size_t k = j + 1; k < K; ++k) row[k] -= e * uj[k];
    }
  }
  const double start = total_error(idx), refined = total_error(nidx);
  if (refined < start) {
    for (size_t n = 0; n < N; ++n) PackRow(shape, &nidx[n * K], q->mutable_row(n));
  }
  if (before) *before = start;
  if (after) *after = std::min(start, refined);
  return Status::Ok();
}

// Asymmetric calibration: when the matrix's inputs in the partly quantized
// model (x~, rows of x_tilde) differ from the f32 model's (x, rows of x)
// because earlier layers are already quantized, the best matrix for the
// *f32* output is not W but the least-squares
//   W* = argmin E||W x - W* x~||^2 = W C (H~ + damp mean(diag H~) I)^-1,
//   C = E[x x~^T],  H~ = E[x~ x~^T],
// which corrects upstream quantization error instead of compounding it.
// Quantizing W* under H~ (GptqRefine) then minimizes E||W x - W_hat x~||^2.
// x, x_tilde: T x K row-major (the same T tokens). Writes W* (N x K) to
// *target and H~ (K x K) to *gram_tilde. Cost O(T K^2 + K^3 + N K^2).
inline Status AsymmetricTarget(const float* w, size_t N, size_t K, const float* x,
                               const float* x_tilde, size_t T, double damp,
                               std::vector<float>* target, std::vector<double>* gram_tilde) {
  if (w == nullptr || x == nullptr || x_tilde == nullptr || T == 0 || N == 0 || K == 0) {
    return InvalidArgument("gptq: asymmetric target needs weights and T >= 1 activation rows");
  }
  if (!(damp > 0.0) || !std::isfinite(damp)) {
    return InvalidArgument("gptq: damp = %g, need a finite value > 0", damp);
  }
  std::vector<double> h(K * K, 0.0), c(K * K, 0.0);
  for (size_t t = 0; t < T; ++t) {
    const float* xt = x + t * K;
    const float* qt = x_tilde + t * K;
    for (size_t i = 0; i < K; ++i) {
      const double qi = qt[i], xi = xt[i];
      double* hi = h.data() + i * K;
      double* ci = c.data() + i * K;
      for (size_t j = 0; j < K; ++j) {
        hi[j] += qi * double(qt[j]);
        ci[j] += xi * double(qt[j]);
      }
    }
  }
  double mean_diag = 0.0;
  for (size_t i = 0; i < K * K; ++i) h[i] /= double(T), c[i] /= double(T);
  for (size_t k = 0; k < K; ++k) mean_diag += h[k * K + k];
  mean_diag /= double(K);
  if (!(mean_diag > 0.0) || !std::isfinite(mean_diag)) {
    return InvalidArgument("gptq: the quantized model's inputs are all zero or not finite");
  }
  *gram_tilde = h;
  for (size_t k = 0; k < K; ++k) {
    h[k * K + k] += damp * mean_diag;
    c[k * K + k] += damp * mean_diag;
  }
  if (!gptq_detail::Cholesky(h, K)) {
    return InvalidArgument("gptq: the damped Gram matrix is not positive definite");
  }
  // M = C (H~ + damp)^-1, row by row: (H~ + damp) m_i = c_i^T (symmetric),
  // solved with the Cholesky factor L (forward then backward substitution).
  std::vector<double> m(K * K);
  std::vector<double> y(K);
  for (size_t i = 0; i < K; ++i) {
    const double* ci = c.data() + i * K;
    for (size_t r = 0; r < K; ++r) {
      double v = ci[r];
      for (size_t k = 0; k < r; ++k) v -= h[r * K + k] * y[k];
      y[r] = v / h[r * K + r];
    }
    for (size_t r = K; r-- > 0;) {
      double v = y[r];
      for (size_t k = r + 1; k < K; ++k) v -= h[k * K + r] * m[i * K + k];
      m[i * K + r] = v / h[r * K + r];
    }
  }
  target->assign(N * K, 0.0f);
  std::vector<double> row(K);
  for (size_t n = 0; n < N; ++n) {
    std::fill(row.begin(), row.end(), 0.0);
    for (size_t i = 0; i < K; ++i) {
      const double wi = w[n * K + i];
      if (wi == 0.0) continue;
      const double* mi = m.data() + i * K;
      for (size_t j = 0; j < K; ++j) row[j] += wi * mi[j];
    }
    for (size_t j = 0; j < K; ++j) (*target)[n * K + j] = static_cast<float>(row[j]);
  }
  return Status::Ok();
}

}  // namespace lutra

#endif  // LUTRA_QUANTIZE_GPTQ_H_
