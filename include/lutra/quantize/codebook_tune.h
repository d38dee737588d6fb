// End-to-end codebook tuning: the model-independent half.
//
// A palettized matrix is W[r][c] = codebook[r / G][idx[r][c]]. With the
// indices fixed, W is linear in the codebook entries, so any loss L that is
// differentiable in the dense weights is differentiable in the entries:
//   dL/dc[g][j] = sum of dL/dW[r][c] over the rows r of group g and the
//                 columns c with idx[r][c] == j.
// Training the entries against the f32 model's output (knowledge
// distillation, examples/tune.cc) fits what the per-layer methods of
// palettize.h / gptq.h cannot see: how the errors of all layers add up at the
// model's output. The model's forward/backward lives with the engine; this
// header holds what does not depend on the model: the gradient reduction from
// dense weights to entries, and Adam over the entries (kept in f32 while
// training, rounded to the stored codebook type by Store). Optionally the
// indices move too (EnableIndexTuning: straight-through latents).
//
// Plain header: scalar C++, offline (load / conversion time).
#ifndef LUTRA_QUANTIZE_CODEBOOK_TUNE_H_
#define LUTRA_QUANTIZE_CODEBOOK_TUNE_H_

#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "lutra/base/element.h"
#include "lutra/base/status.h"
#include "lutra/format/palette.h"

namespace lutra {

// Adam (Kingma & Ba) over a flat vector of parameters; the caller passes
// the step size each step (e.g. scaled to the parameters' magnitude and
// decayed). Deterministic: no randomness, fixed loop order.
class Adam {
 public:
  static constexpr float kBeta1 = 0.9f;
  static constexpr float kBeta2 = 0.999f;

  explicit Adam(size_t size = 0) : m_(size, 0.0f), v_(size, 0.0f) {}
  size_t size() const { return m_.size(); }
  size_t steps() const { return t_; }

  // params[i] -= lr * m_hat / (sqrt(v_hat) + eps), i < size(). eps is
  // relative to the largest |grad| seen so far, so that the update does not
  // depend on the loss's scale (a parameter that never gets a gradient
  // never moves).
  void Step(const float* grad, float lr, float* params) {
    ++t_;
    for (size_t i = 0; i < m_.size(); ++i) {
      max_abs_grad_ = std::fmax(max_abs_grad_, std::fabs(grad[i]));
    }
    const double c1 = 1.0 - std::pow(double(kBeta1), double(t_));
    const double c2 = 1.0 - std::pow(double(kBeta2), double(t_));
    const float eps = 1e-8f * max_abs_grad_ + 1e-30f;
    for (size_t i = 0; i < m_.size(); ++i) {
      m_[i] = kBeta1 * m_[i] + (1.0f - kBeta1) * grad[i];
      v_[i] = kBeta2 * v_[i] + (1.0f - kBeta2) * grad[i] * grad[i];
      const float m_hat = float(m_[i] / c1);
      const float v_hat = float(v_[i] / c2);
      params[i] -= lr * m_hat / (std::sqrt(v_hat) + eps);
    }
  }

 private:
  std::vector<float> m_, v_;
  size_t t_ = 0;
  float max_abs_grad_ = 0.0f;
};

// One palettized matrix's codebooks as trainable f32 parameters, its
// indices unpacked once (rows x cols bytes).
class CodebookTuner {
 public:
  // Copies the view's entries (as f32) and indices. Errors: an invalid or
  // empty view.
  static StatusOr<CodebookTuner> Create(const PaletteView& view) {
    LUTRA_RETURN_IF_ERROR(view.shape.Validate());
    if (view.indices == nullptr || view.codebooks == nullptr) {
      return InvalidArgument("codebook tuning: the palette view has no storage");
    }
    CodebookTuner t;
    t.shape_ = view.shape;
    const size_t rows = view.shape.rows, cols = view.shape.cols;
    const size_t entries = view.shape.num_groups() * view.shape.num_entries();
    t.entries_.resize(entries);
    for (size_t i = 0; i < entries; ++i) {
      t.entries_[i] = LoadElement(view.codebooks, view.shape.codebook, i);
    }
    t.indices_.resize(rows * cols);
    for (size_t r = 0; r < rows; ++r) UnpackRow(view.shape, view.row(r), &t.indices_[r * cols]);
    double sum = 0.0;
    for (float e : t.entries_) sum += double(e) * e;
    t.scale_ = float(std::sqrt(sum / double(entries)));
    t.adam_ = Adam(entries);
    return t;
  }

  const PaletteShape& shape() const { return shape_; }
  // groups x 2^b entries, group-major (palette.h), f32.
  const std::vector<float>& entries() const { return entries_; }
  std::vector<float>& mutable_entries() { return entries_; }
  // RMS of the entries at Create: the unit of the learning rate.
  float scale() const { return scale_; }

  // w (rows x cols, row-major) = the dense matrix of the current entries.
  void Dequantize(float* w) const {
    const size_t cols = shape_.cols, e = shape_.num_entries();
    for (size_t r = 0; r < shape_.rows; ++r) {
      const float* cb = &entries_[(r / shape_.group_rows) * e];
      const uint8_t* idx = &indices_[r * cols];
      float* out = w + r * cols;
      for (size_t c = 0; c < cols; ++c) out[c] = cb[idx[c]];
    }
  }

  // grad_entries (groups x 2^b) = the gradient w.r.t. the entries of a loss
  // whose gradient w.r.t. the dense weights is grad_w (rows x cols).
  // Summed in double: a group of G rows x K columns adds up to millions of
  // terms of both signs.
  void ReduceGradient(const float* grad_w, float* grad_entries) const {
    const size_t cols = shape_.cols, e = shape_.num_entries();
    std::vector<double> acc(e);
    for (size_t g = 0; g < shape_.num_groups(); ++g) {
      std::fill(acc.begin(), acc.end(), 0.0);
      const size_t r_end = std::min(shape_.rows, (g + 1) * shape_.group_rows);
      for (size_t r = g * shape_.group_rows; r < r_end; ++r) {
        const uint8_t* idx = &indices_[r * cols];
        const float* gw = grad_w + r * cols;
        for (size_t c = 0; c < cols; ++c) acc[idx[c]] += gw[c];
      }
      for (size_t j = 0; j < e; ++j) grad_entries[g * e + j] = float(acc[j]);
    }
  }

  // One Adam step on the entries from the dense gradient; lr is relative to
  // scale().
  void Step(const float* grad_w, float lr) {
    grad_.resize(entries_.size());
    ReduceGradient(grad_w, grad_.data());
    adam_.Step(grad_.data(), lr * scale_, entries_.data());
  }

  // Index tuning (straight-through estimator, as in quantization-aware
  // training): each weight gets a latent f32 value, started at its current
  // entry so that no index moves at first. StepIndices moves the latents
  // along the dense gradient and re-picks each index as the entry of its
  // group nearest to the latent, so a weight whose gradient keeps pushing
  // it past the midpoint to a neighbouring entry changes index.
  void EnableIndexTuning() {
    latent_.resize(indices_.size());
    Dequantize(latent_.data());
    start_indices_ = indices_;
    latent_adam_ = Adam(latent_.size());
  }
  bool tunes_indices() const { return !latent_.empty(); }
  // One Adam step on the latents (lr relative to scale()), then the
  // nearest-entry indices. Ties keep the lower entry: deterministic. A
  // linear scan, not kmeans_1d::Nearest: that binary search needs ascending
  // entries, and Adam may move tuned entries past each other.
  void StepIndices(const float* grad_w, float lr) {
    latent_adam_.Step(grad_w, lr * scale_, latent_.data());
    const size_t cols = shape_.cols, e = shape_.num_entries();
    for (size_t r = 0; r < shape_.rows; ++r) {
      const float* cb = &entries_[(r / shape_.group_rows) * e];
      for (size_t c = 0; c < cols; ++c) {
        const float v = latent_[r * cols + c];
        uint8_t best = 0;
        float best_d = std::fabs(v - cb[0]);
        for (size_t j = 1; j < e; ++j) {
          const float d = std::fabs(v - cb[j]);
          if (d < best_d) best_d = d, best = uint8_t(j);
        }
        indices_[r * cols + c] = best;
      }
    }
  }
  // How many indices differ from those at EnableIndexTuning.
  size_t ChangedIndices() const {
    size_t n = 0;
    for (size_t i = 0; i < start_indices_.size(); ++i) n += indices_[i] != start_indices_[i];
    return n;
  }

  // Writes the entries, rounded to the matrix's codebook type, into `out`
  // (same shape), and the indices where they were tuned.
  Status Store(PaletteMatrix* out) const {
    const PaletteShape& s = out->shape();
    if (s.rows != shape_.rows || s.cols != shape_.cols || s.bits != shape_.bits ||
        s.group_rows != shape_.group_rows || s.codebook != shape_.codebook) {
      return InvalidArgument("codebook tuning: storing into a matrix of another shape");
    }
    const size_t e = shape_.num_entries();
    for (size_t i = 0; i < entries_.size(); ++i) out->set_entry(i / e, i % e, entries_[i]);
    if (tunes_indices()) {
      for (size_t r = 0; r < shape_.rows; ++r) {
        PackRow(shape_, &indices_[r * shape_.cols], out->mutable_row(r));
      }
    }
    return Status();
  }

 private:
  PaletteShape shape_;
  std::vector<float> entries_;
  std::vector<uint8_t> indices_;
  std::vector<float> grad_;
  float scale_ = 0.0f;
  Adam adam_;
  // Index tuning: latents (rows x cols) and the indices they started from.
  std::vector<float> latent_;
  std::vector<uint8_t> start_indices_;
  Adam latent_adam_;
};

}  // namespace lutra

#endif  // LUTRA_QUANTIZE_CODEBOOK_TUNE_H_
