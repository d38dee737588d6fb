// Dynamic dispatch of lutra kernels: compiled once per Highway target.
// See dispatch.h for why, and docs/design.md for static dispatch instead.
#include "examples/dispatch.h"

#include <math.h>

#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "examples/dispatch.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "lutra/dot-inl.h"

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace {

float DotT(const float* a, const float* b, size_t num) { return Dot(a, b, num); }

void MatVecF32T(const float* w, size_t rows, size_t cols, const float* x, float* y) {
  for (size_t r = 0; r < rows; ++r) y[r] = Dot(w + r * cols, x, cols);
}

void MatMulF32T(const float* w, size_t rows, size_t cols, const float* x,
                size_t batch, float* y) {
  for (size_t m = 0; m < batch; ++m) {
    for (size_t r = 0; r < rows; ++r) y[m * rows + r] = Dot(w + r * cols, x + m * cols, cols);
  }
}

}  // namespace
}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include "hwy/targets.h"

namespace lutra {
namespace dispatch {

HWY_EXPORT(DotT);
HWY_EXPORT(MatVecF32T);
HWY_EXPORT(MatMulF32T);

float Dot(const float* a, const float* b, size_t num) {
  return HWY_DYNAMIC_DISPATCH(DotT)(a, b, num);
}

void MatVecF32(const float* w, size_t rows, size_t cols, const float* x, float* y) {
  HWY_DYNAMIC_DISPATCH(MatVecF32T)(w, rows, cols, x, y);
}

void MatMulF32(const float* w, size_t rows, size_t cols, const float* x,
               size_t batch, float* y) {
  HWY_DYNAMIC_DISPATCH(MatMulF32T)(w, rows, cols, x, batch, y);
}

// TEMP scalar: replaced by lutra/gemv-inl.h when it lands.
void MatVecPalette(const PaletteView& w, const float* x, float* y) {
  std::vector<float> row(w.shape.cols);
  for (size_t r = 0; r < w.shape.rows; ++r) {
    lutra::DequantizeRow(w, r, row.data());
    y[r] = Dot(row.data(), x, w.shape.cols);
  }
}

// TEMP scalar: replaced by lutra/gemm-inl.h when it lands.
void MatMulPalette(const PaletteView& w, const float* x, size_t batch, float* y) {
  std::vector<float> row(w.shape.cols);
  for (size_t r = 0; r < w.shape.rows; ++r) {
    lutra::DequantizeRow(w, r, row.data());
    for (size_t m = 0; m < batch; ++m) {
      y[m * w.shape.rows + r] = Dot(row.data(), x + m * w.shape.cols, w.shape.cols);
    }
  }
}

void DequantizeRow(const PaletteView& w, size_t r, float* out) {
  lutra::DequantizeRow(w, r, out);
}

// TEMP scalar: replaced by lutra/ops-inl.h RMSNorm when it lands.
void RMSNorm(const float* x, const float* weight, size_t num, float eps, float* out) {
  double ss = 0.0;
  for (size_t i = 0; i < num; ++i) ss += double(x[i]) * x[i];
  const float scale = 1.0f / sqrtf(float(ss / double(num)) + eps);
  for (size_t i = 0; i < num; ++i) out[i] = weight[i] * (scale * x[i]);
}

// TEMP scalar: replaced by lutra/ops-inl.h RoPE when it lands.
void RoPE(float* vec, size_t num_heads, size_t head_dim, size_t pos, float theta) {
  for (size_t h = 0; h < num_heads; ++h) {
    float* v = vec + h * head_dim;
    for (size_t i = 0; i < head_dim; i += 2) {
      const float freq = 1.0f / powf(theta, float(i) / float(head_dim));
      const float angle = float(pos) * freq;
      const float c = cosf(angle), s = sinf(angle);
      const float v0 = v[i], v1 = v[i + 1];
      v[i] = v0 * c - v1 * s;
      v[i + 1] = v0 * s + v1 * c;
    }
  }
}

// TEMP scalar: replaced by lutra/ops-inl.h SwiGLU when it lands.
void SwiGLU(float* gate, const float* up, size_t num) {
  for (size_t i = 0; i < num; ++i) {
    const float g = gate[i];
    gate[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

// TEMP scalar: replaced by lutra/ops-inl.h when it lands.
void AddTo(float* x, const float* y, size_t num) {
  for (size_t i = 0; i < num; ++i) x[i] += y[i];
}

// TEMP scalar: replaced by lutra/ops-inl.h Softmax when it lands.
void Softmax(float* x, size_t num) {
  float max = x[0];
  for (size_t i = 1; i < num; ++i) max = x[i] > max ? x[i] : max;
  float sum = 0.0f;
  for (size_t i = 0; i < num; ++i) {
    x[i] = expf(x[i] - max);
    sum += x[i];
  }
  for (size_t i = 0; i < num; ++i) x[i] /= sum;
}

const char* TargetName() {
  // The dispatch table picks the best of the targets this binary was built
  // for among those the CPU supports: the lowest set bit of the intersection
  // (Highway orders better targets first, with smaller bit values).
  const int64_t targets = hwy::SupportedTargets() & HWY_TARGETS;
  return hwy::TargetName(targets & ~(targets - 1));
}

}  // namespace dispatch
}  // namespace lutra
#endif  // HWY_ONCE
