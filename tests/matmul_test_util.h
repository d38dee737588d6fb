// Shared helpers of gemv_test.cc and gemm_test.cc: random palettized
// matrices (tests/support/random_weights.h), activations, LoRA factors, and
// the scalar references (dequantize, then multiply in double) with error
// bounds derived from the inputs.
#ifndef LUTRA_TESTS_MATMUL_TEST_UTIL_H_
#define LUTRA_TESTS_MATMUL_TEST_UTIL_H_

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "hwy/base.h"
#include "lutra/format/palette.h"
#include "lutra/kernels/matmul.h"
#include "tests/support/random_weights.h"
#include "tests/test_util.h"

namespace lutra {
namespace test {

// Activations with an outlier, like real LLM hidden states.
inline std::vector<float> RandomActivations(Rng& rng, size_t n) {
  std::vector<float> x = rng.GaussianVector(n);
  if (n > 3) x[n / 3] *= 20.0f;
  return x;
}

// LoRA factor storage of one type.
struct LoraFactors {
  std::vector<uint8_t> a, b;      // raw storage of `type`
  std::vector<float> af, bf;      // the same values as f32 (exact)
  LoraDelta delta;
};

inline void StoreTyped(ElementType type, float v, uint8_t* p, float* exact) {
  if (type == ElementType::kF16) {
    const hwy::float16_t h = hwy::F16FromF32(v);
    memcpy(p, &h, 2);
    *exact = hwy::F32FromF16(h);
  } else if (type == ElementType::kBF16) {
    const hwy::bfloat16_t h = hwy::BF16FromF32(v);
    memcpy(p, &h, 2);
    *exact = hwy::F32FromBF16(h);
  } else {
    memcpy(p, &v, 4);
    *exact = v;
  }
}

inline LoraFactors RandomLora(Rng& rng, size_t N, size_t K, size_t rank, ElementType type) {
  LoraFactors f;
  const size_t bytes = ElementBytes(type);
  f.a.resize(rank * K * bytes);
  f.b.resize(N * rank * bytes);
  f.af.resize(rank * K);
  f.bf.resize(N * rank);
  for (size_t i = 0; i < rank * K; ++i) StoreTyped(type, rng.Gaussian(0.05f), &f.a[i * bytes], &f.af[i]);
  for (size_t i = 0; i < N * rank; ++i) StoreTyped(type, rng.Gaussian(0.05f), &f.b[i * bytes], &f.bf[i]);
  f.delta.a = f.a.data();
  f.delta.b = f.b.data();
  f.delta.rank = rank;
  f.delta.type = type;
  f.delta.scale = 0.5f;
  return f;
}

// Reference of one output row r for token x (K floats, row wrow of the
// dequantized matrix): the exact value in double, and a tolerance for the
// kernel's f32 path (rounding of every term, any summation order).
// `residual` points at this output's residual value (or is null).
struct RefRow {
  double value;
  double tol;
};

// Epilogue terms in double; adds their magnitudes to *mag.
inline double ReferenceEpilogue(size_t r, const float* x, size_t K, const Epilogue& ep,
                                const float* residual, const LoraFactors* lora, double* mag) {
  double sum = 0.0;
  if (ep.bias) {
    sum += ep.bias[r];
    *mag += std::abs(ep.bias[r]);
  }
  if (residual) {
    sum += *residual;
    *mag += std::abs(*residual);
  }
  if (lora) {
    const size_t rank = lora->delta.rank;
    for (size_t k = 0; k < rank; ++k) {
      double ax = 0.0, ax_mag = 0.0;
      for (size_t c = 0; c < K; ++c) {
        ax += double(lora->af[k * K + c]) * x[c];
        ax_mag += std::abs(double(lora->af[k * K + c]) * x[c]);
      }
      const double bk = lora->bf[r * rank + k];
      sum += double(lora->delta.scale) * bk * ax;
      *mag += std::abs(double(lora->delta.scale) * bk) * ax_mag;
    }
  }
  return sum;
}

inline double RoundingTol(size_t K, size_t rank, double mag) {
  const double eps = 1.1920929e-7;
  return 1e-30 + 4.0 * double(K + rank + 8) * eps * mag;
}

inline RefRow ReferenceRow(const PaletteView& v, const float* wrow, size_t r, const float* x,
                           const Epilogue& ep, const float* residual,
                           const LoraFactors* lora) {
  const size_t K = v.shape.cols;
  double sum = 0.0, mag = 0.0;
  for (size_t c = 0; c < K; ++c) {
    sum += double(wrow[c]) * x[c];
    mag += std::abs(double(wrow[c]) * x[c]);
  }
  sum += ReferenceEpilogue(r, x, K, ep, residual, lora, &mag);
  return {sum, RoundingTol(K, lora ? lora->delta.rank : 0, mag)};
}

// The int8 path's quantized activations of token m as per-column values:
// xhat[c] = xscale * xq and the scale sx[c] of c's block, read from the
// PreparedInput through its documented position -> column map (run_col).
inline void QuantizedActivations(const PreparedInput& in, size_t m, std::vector<double>* xhat,
                                 std::vector<double>* sx) {
  const size_t K = in.cols, P = in.geometry.positions();
  const size_t block = in.units_per_block * in.geometry.unit_positions;
  xhat->assign(K, 0.0);
  sx->assign(K, 0.0);
  std::vector<int> seen(K, 0);
  bool padding_zero = true;
  for (size_t p = 0; p < P; ++p) {
    const size_t c = in.run_col[p / 16] + p % 16;
    const double scale = in.xscale[m * in.num_blocks + p / block];
    const int q = in.xq[m * P + p];
    if (c < K) {
      (*xhat)[c] = scale * q;
      (*sx)[c] = scale;
      ++seen[c];
    } else {
      padding_zero &= q == 0;  // padding positions hold zero activations
    }
  }
  CHECK(padding_zero);
  // The positions are a permutation of the columns.
  CHECK(std::count(seen.begin(), seen.end(), 1) == static_cast<ptrdiff_t>(K));
}

// Emulation of the int8 path for output row r: sum_c w^_c x^_c in double with
// w^ = lo + step * q from the prepared u8 table (plus the epilogue), and the
// kernel's tolerance (f32 rounding only: its integer sums are exact).
// Also checks the documented bound of the int8 path against the exact value:
// |emulation - exact| <= sum_c (sx_c / 2)(|w_c| + step / 2) + (step / 2) sum_c |x_c|.
inline RefRow Int8ReferenceRow(const PreparedPalette& pw, const float* wrow, size_t r,
                               const float* x, const std::vector<double>& xhat,
                               const std::vector<double>& sx, const Epilogue& ep,
                               const float* residual, const LoraFactors* lora) {
  const PaletteView& v = pw.view();
  const size_t K = v.shape.cols;
  const size_t g = r / v.shape.group_rows;
  const double lo = pw.lo(g), step = pw.step(g);
  const uint8_t* table = pw.table_u8(g);
  double sum = 0.0, mag = 0.0, exact = 0.0, bound = 0.0;
  bool codes_ok = true;
  for (size_t c = 0; c < K; ++c) {
    const double what = lo + step * table[v.index(r, c)];
    codes_ok &= std::abs(what - wrow[c]) <= 0.5 * step * 1.0001 + 1e-6 * std::abs(wrow[c]);
    sum += what * xhat[c];
    mag += (std::abs(lo) + step * table[v.index(r, c)]) * std::abs(xhat[c]);
    exact += double(wrow[c]) * x[c];
    bound += 0.5 * sx[c] * (std::abs(wrow[c]) + 0.5 * step) + 0.5 * step * std::abs(x[c]);
  }
  CHECK(codes_ok);  // |w^ - w| <= step / 2
  CHECK(std::abs(sum - exact) <= 1.0001 * bound + 1e-12);
  sum += ReferenceEpilogue(r, x, K, ep, residual, lora, &mag);
  return {sum, RoundingTol(K, lora ? lora->delta.rank : 0, mag)};
}

// Bitwise equality of two floats (the GEMM/GEMV bit-exact contract; unlike
// ==, distinguishes -0 from +0 and compares NaNs by payload).
inline bool SameBits(float a, float b) {
  uint32_t ua, ub;
  memcpy(&ua, &a, 4);
  memcpy(&ub, &b, 4);
  return ua == ub;
}

}  // namespace test
}  // namespace lutra

#endif  // LUTRA_TESTS_MATMUL_TEST_UTIL_H_
