// Calibration statistics: what the inputs of each linear layer look like on
// representative text, so that quantization can spend its precision where
// the activations are large.
//
// For a linear layer y = W x, the output error of a quantized W_hat is
//   E ||(W - W_hat) x||^2 = sum_n (w_n - w_hat_n)^T H (w_n - w_hat_n),
// with H = E[x x^T] the input's second-moment (Gram) matrix. Its diagonal
// h_k = E[x_k^2] already captures the dominant effect in transformers (a few
// input channels carry much larger activations than the rest), and
// minimizing sum_k h_k (w_k - w_hat_k)^2 is what the palettizer does with
// PalettizeOptions::column_importance.
//
// What is kept, and why: one ActivationMoments per *input site*, not per
// matrix (wq, wk and wv read the same normalized x, w1 and w3 too), holding
// the K per-column sums of x_k^2 in double (8 bytes per column). On the AFM
// shape (dim 3072, FFN 8192, 26 layers) that is 26 x (3 x 3072 + 8192) + 3072
// columns = 3.6 MB, independent of the number of calibration tokens. The
// full K x K Gram matrix (for GPTQ, gptq.h) is kept only on request
// (keep_gram) and only for K <= kMaxGramCols: at the AFM shape it would be
// 26 x (3 x 3072^2 + 8192^2) doubles = 20 GB, more than the 4-bit model
// itself. The engine's sequential GPTQ forms Gram matrices per stage from
// captured inputs instead (docs/quality.md); the diagonal is always here.
//
// Plain header (scalar C++). Accumulation is O(rows x K) per call (O(rows x
// K^2) with a Gram matrix), negligible next to the forward pass producing x.
#ifndef LUTRA_QUANTIZE_CALIBRATION_H_
#define LUTRA_QUANTIZE_CALIBRATION_H_

#include <stddef.h>
#include <stdint.h>

#include <map>
#include <string>
#include <vector>

#include "lutra/base/status.h"

namespace lutra {

// Second moments of one input site: rows are tokens, cols the K inputs.
class ActivationMoments {
 public:
  // Largest K for which a Gram matrix may be kept (K^2 doubles = 128 MiB).
  static constexpr size_t kMaxGramCols = 4096;

  static StatusOr<ActivationMoments> Create(size_t cols, bool keep_gram = false) {
    if (cols == 0) return InvalidArgument("calibration: an input site with 0 columns");
    if (keep_gram && cols > kMaxGramCols) {
      return InvalidArgument("calibration: a Gram matrix of %zu columns (limit %zu)", cols,
                             kMaxGramCols);
    }
    ActivationMoments m;
    m.cols_ = cols;
    m.sum_sq_.assign(cols, 0.0);
    if (keep_gram) m.gram_.assign(cols * cols, 0.0);
    return m;
  }

  // Adds `rows` rows of x (row-major, row stride `cols()`). Non-finite
  // activations are an error (the model diverged; the statistics would be
  // meaningless), reported with their position.
  Status Add(const float* x, size_t rows) {
    for (size_t r = 0; r < rows; ++r) {
      const float* row = x + r * cols_;
      for (size_t k = 0; k < cols_; ++k) {
        const double v = row[k];
        if (!(v - v == 0.0)) {
          return InvalidArgument("calibration: activation (%zu, %zu) is not finite", r, k);
        }
        sum_sq_[k] += v * v;
      }
      if (!gram_.empty()) {
        for (size_t i = 0; i < cols_; ++i) {
          const double xi = row[i];
          double* g = gram_.data() + i * cols_;
          for (size_t j = 0; j < cols_; ++j) g[j] += xi * double(row[j]);
        }
      }
    }
    rows_ += rows;
    return Status::Ok();
  }

  size_t cols() const { return cols_; }
  size_t rows() const { return rows_; }
  bool has_gram() const { return !gram_.empty(); }

  // h_k = E[x_k^2] over the rows seen (all 0 before any row), as the
  // palettizer's column_importance wants it.
  std::vector<float> SecondMoments() const {
    std::vector<float> h(cols_, 0.0f);
    if (rows_ == 0) return h;
    for (size_t k = 0; k < cols_; ++k) h[k] = static_cast<float>(sum_sq_[k] / double(rows_));
    return h;
  }
  // E[x x^T], K x K row-major; empty without keep_gram.
  std::vector<double> Gram() const {
    std::vector<double> g = gram_;
    for (double& v : g) v = rows_ ? v / double(rows_) : 0.0;
    return g;
  }

 private:
  size_t cols_ = 0;
  size_t rows_ = 0;
  std::vector<double> sum_sq_;
  std::vector<double> gram_;
};

// Moments of every input site of a model, by name (the engine names them
// "blk.L.attn_in", "blk.L.attn_out", "blk.L.ffn_in", "blk.L.ffn_mid",
// "output_in"), plus how much text produced them.
class CalibrationStats {
 public:
  explicit CalibrationStats(bool keep_gram = false) : keep_gram_(keep_gram) {}

  // Adds rows x cols activations to `site` (created on first use; a site's
  // cols must not change).
  Status Add(const std::string& site, const float* x, size_t rows, size_t cols) {
    auto it = sites_.find(site);
    if (it == sites_.end()) {
      StatusOr<ActivationMoments> m =
          ActivationMoments::Create(cols, keep_gram_ && cols <= ActivationMoments::kMaxGramCols);
      if (!m.ok()) return m.status().WithContext(site);
      it = sites_.emplace(site, std::move(*m)).first;
    } else if (it->second.cols() != cols) {
      return InvalidArgument("calibration: site %s has %zu columns, got %zu", site.c_str(),
                             it->second.cols(), cols);
    }
    return it->second.Add(x, rows).WithContext(site);
  }

  // Null when the site was never seen.
  const ActivationMoments* Find(const std::string& site) const {
    auto it = sites_.find(site);
    return it == sites_.end() ? nullptr : &it->second;
  }
  size_t num_sites() const { return sites_.size(); }

  // Tokens of calibration text run through the model (set by the caller).
  size_t tokens = 0;

 private:
  bool keep_gram_;
  std::map<std::string, ActivationMoments> sites_;
};

}  // namespace lutra

#endif  // LUTRA_QUANTIZE_CALIBRATION_H_
