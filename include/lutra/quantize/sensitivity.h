// Tensor sensitivity: how much the model's output distribution moves per
// unit of a tensor's weight error, measured, so that the mixed allocation
// (mixed_bits.h) spends bits where the output needs them.
//
// With calibration, a tensor's weighted error e_t = sum_n sum_k h_k (w - w')^2
// (h = E[x^2] of its input, calibration.h) estimates E||(W - W') x||^2 at
// that tensor's output. How much of that reaches the logits differs by
// tensor: an error in the last layers or the head is not diluted by the
// residual stream, one in a value projection is averaged by attention. To
// second order the output KL is a sum of per-tensor terms, each proportional
// to that tensor's output error, so one measurement per tensor gives its
// factor:
//   s_t = KL(model with only tensor t palettized at the probe) / e_t(probe),
// and the allocator minimizes sum_t s_t e_t(b_t, G_t), i.e. the predicted
// KL. The probe is a mid width (3 bits) so that the KL is well above
// round-off yet still in the small-perturbation (quadratic) regime.
//
// Cost: one palettization and one model evaluation per tensor; the caller
// supplies the evaluation (it owns the forward pass). docs/quality.md
// checks that the predicted KL of whole plans tracks the measured one.
//
// Plain header (scalar C++).
#ifndef LUTRA_QUANTIZE_SENSITIVITY_H_
#define LUTRA_QUANTIZE_SENSITIVITY_H_

#include <stddef.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "lutra/base/status.h"
#include "lutra/quantize/mixed_bits.h"
#include "lutra/quantize/palettize.h"

namespace lutra {

struct TensorSensitivity {
  double kl = 0.0;              // measured output KL with only this tensor at the probe
  double weighted_error = 0.0;  // its column-weighted squared error at the probe
  double scale = 0.0;           // kl / weighted_error: MixedBitsTensor::importance
};

// Returns the output KL (nats per position, >= 0) of the model in which only
// tensor `t` is replaced by `q`.
using TensorKlFn = std::function<StatusOr<double>(size_t t, const PaletteMatrix& q)>;

// Palettizes each tensor alone with `probe` (its column_importance taken
// from the tensor) and measures the KL through `kl`. Scales are floored at
// 1e-6 of the largest so that no tensor is "free" because its probe KL was
// lost in round-off. Deterministic when `kl` is.
inline StatusOr<std::vector<TensorSensitivity>> MeasureSensitivity(
    const std::vector<MixedBitsTensor>& tensors, PalettizeOptions probe, const TensorKlFn& kl,
    const std::function<void(size_t done, size_t total)>& progress = nullptr) {
  if (tensors.empty()) return InvalidArgument("sensitivity: no tensors");
  if (!kl) return InvalidArgument("sensitivity: no KL function");
  std::vector<TensorSensitivity> out(tensors.size());
  double max_scale = 0.0;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const MixedBitsTensor& ten = tensors[t];
    probe.column_importance = ten.column_importance;
    PalettizeStats st;
    StatusOr<PaletteMatrix> q = Palettize(ten.data, ten.rows, ten.cols, probe, &st);
    if (!q.ok()) return q.status().WithContext("sensitivity: tensor '" + ten.name + "'");
    StatusOr<double> d = kl(t, *q);
    if (!d.ok()) return d.status().WithContext("sensitivity: tensor '" + ten.name + "'");
    if (!std::isfinite(*d)) {
      return InvalidArgument("sensitivity: tensor '%s': KL is %g", ten.name.c_str(), *d);
    }
    out[t].kl = std::max(0.0, *d);
    out[t].weighted_error = st.weighted_sq_error;
    out[t].scale = st.weighted_sq_error > 0.0 ? out[t].kl / st.weighted_sq_error : 0.0;
    max_scale = std::max(max_scale, out[t].scale);
    if (progress) progress(t + 1, tensors.size());
  }
  for (TensorSensitivity& s : out) s.scale = std::max(s.scale, 1e-6 * max_scale);
  if (!(max_scale > 0.0)) {
    for (TensorSensitivity& s : out) s.scale = 1.0;  // nothing measurable: plain weighted error
  }
  return out;
}

}  // namespace lutra

#endif  // LUTRA_QUANTIZE_SENSITIVITY_H_
