// Calibration-aware quantization (issue 14): calibration statistics against
// a direct computation, measured sensitivity driving the allocator, the
// allocator's choice of G, GPTQ error feedback and the activation-weighted
// recovery fit, and their clear errors on bad input.
//
// Scalar C++ (no per-target code), so these tests run once.
#include "lutra/quantize/calibration.h"

#include <stddef.h>
#include <stdint.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "lutra/base/element.h"
#include "lutra/format/lora.h"
#include "lutra/format/palette.h"
#include "lutra/quantize/gptq.h"
#include "lutra/quantize/mixed_bits.h"
#include "lutra/quantize/palettize.h"
#include "lutra/quantize/recovery.h"
#include "lutra/quantize/sensitivity.h"
#include "tests/test_util.h"

namespace lutra {
namespace {

using test::Contains;

std::vector<float> Gaussian(size_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

TEST_CASE("Calibration moments equal a direct computation") {
  const size_t K = 13, rows = 37;
  std::vector<float> x = Gaussian(rows * K, 1);
  for (size_t r = 0; r < rows; ++r) x[r * K + 3] *= 10.0f;  // one outlier channel
  CalibrationStats stats(/*keep_gram=*/true);
  // In two calls, as Forward adds batches.
  REQUIRE(stats.Add("site", x.data(), 20, K).ok());
  REQUIRE(stats.Add("site", x.data() + 20 * K, rows - 20, K).ok());
  const ActivationMoments* m = stats.Find("site");
  REQUIRE(m != nullptr);
  CHECK(stats.Find("other") == nullptr);
  CHECK(m->rows() == rows);
  REQUIRE(m->has_gram());
  const std::vector<float> h = m->SecondMoments();
  const std::vector<double> g = m->Gram();
  for (size_t i = 0; i < K; ++i) {
    double direct = 0.0;
    for (size_t r = 0; r < rows; ++r) direct += double(x[r * K + i]) * x[r * K + i];
    direct /= double(rows);
    CHECK(std::abs(h[i] - direct) <= 1e-6 * direct);
    for (size_t j = 0; j < K; ++j) {
      double gij = 0.0;
      for (size_t r = 0; r < rows; ++r) gij += double(x[r * K + i]) * x[r * K + j];
      gij /= double(rows);
      CHECK(std::abs(g[i * K + j] - gij) <= 1e-12 * (1.0 + std::abs(gij)));
    }
  }
  CHECK(h[3] > 50.0f * h[0]);  // the outlier channel stands out
  // Without keep_gram only the diagonal is kept.
  CalibrationStats diag;
  REQUIRE(diag.Add("site", x.data(), rows, K).ok());
  CHECK_FALSE(diag.Find("site")->has_gram());
  CHECK(diag.Find("site")->Gram().empty());
}

TEST_CASE("Calibration rejects bad input with a clear message") {
  CalibrationStats stats;
  std::vector<float> x(8, 1.0f);
  REQUIRE(stats.Add("a", x.data(), 2, 4).ok());
  Status s = stats.Add("a", x.data(), 1, 8);
  CHECK(Contains(s.message(), "site a has 4 columns, got 8"));
  x[5] = std::numeric_limits<float>::quiet_NaN();
  s = stats.Add("b", x.data(), 2, 4);
  CHECK(Contains(s.message(), "activation (1, 1) is not finite"));
  CHECK(Contains(stats.Add("c", x.data(), 1, 0).message(), "0 columns"));
  CHECK(Contains(ActivationMoments::Create(ActivationMoments::kMaxGramCols + 1, true)
                     .status()
                     .message(),
                 "Gram matrix of 4097 columns"));
}

// Two identical tensors; `kl` makes tensor 1 a hundred times more sensitive
// than tensor 0. Measured sensitivity must give tensor 1 more bits, and
// without it the allocator treats them alike.
TEST_CASE("Measured sensitivity gives a sensitive tensor more bits") {
  const size_t N = 64, K = 256;
  const std::vector<float> w = Gaussian(N * K, 7);
  std::vector<MixedBitsTensor> tensors(2);
  for (size_t t = 0; t < 2; ++t) {
    tensors[t].name = "t" + std::to_string(t);
    tensors[t].data = w.data();
    tensors[t].rows = N;
    tensors[t].cols = K;
  }
  const double factor[2] = {1e-4, 1e-2};
  TensorKlFn kl = [&](size_t t, const PaletteMatrix& q) -> StatusOr<double> {
    StatusOr<PalettizeStats> st = MeasurePaletteError(q.view(), w.data());
    if (!st.ok()) return st.status();
    return factor[t] * st->sq_error;
  };
  PalettizeOptions probe;
  probe.bits = 3;
  StatusOr<std::vector<TensorSensitivity>> sens = MeasureSensitivity(tensors, probe, kl);
  REQUIRE(sens.ok());
  CHECK(std::abs((*sens)[1].scale / (*sens)[0].scale - 100.0) < 1e-6);
  MixedBitsOptions mo;
  mo.target_bits = 3.3;
  mo.allowed_bits = {2, 3, 4};
  StatusOr<MixedBitsPlan> alike = AllocateBits(tensors, mo);
  REQUIRE(alike.ok());
  for (size_t t = 0; t < 2; ++t) tensors[t].importance = (*sens)[t].scale;
  StatusOr<MixedBitsPlan> plan = AllocateBits(tensors, mo);
  REQUIRE(plan.ok());
  CHECK(plan->tensors[1].bits > plan->tensors[0].bits);
  CHECK(plan->achieved_bits <= 3.3);
  CHECK(std::abs(alike->tensors[1].bits - alike->tensors[0].bits) <= 1);
  // A KL function that fails stops the measurement with its message.
  TensorKlFn bad = [](size_t, const PaletteMatrix&) -> StatusOr<double> {
    return InvalidArgument("no model");
  };
  CHECK(Contains(MeasureSensitivity(tensors, probe, bad).status().message(), "no model"));
}

// At K = 4096 a per-row codebook costs 16 x 16 / 4096 = 1/16 bit per weight
// at 4 bits, so with a budget above 4.06 the allocator should take G = 1 for
// rows of different scales (which one shared codebook fits badly).
TEST_CASE("Allocator chooses G per tensor, codebooks counted") {
  const size_t N = 32, K = 4096;
  std::vector<float> w = Gaussian(N * K, 11);
  for (size_t r = 0; r < N; ++r) {
    const float scale = std::pow(2.0f, float(r % 8) - 4.0f);
    for (size_t c = 0; c < K; ++c) w[r * K + c] *= scale;
  }
  std::vector<MixedBitsTensor> tensors(1);
  tensors[0].name = "w";
  tensors[0].data = w.data();
  tensors[0].rows = N;
  tensors[0].cols = K;
  MixedBitsOptions mo;
  mo.allowed_bits = {4};
  mo.allowed_groups = {1, 2, 4, 8, 16};
  mo.target_bits = 4.07;
  StatusOr<MixedBitsPlan> plan = AllocateBits(tensors, mo);
  REQUIRE(plan.ok());
  CHECK(plan->tensors[0].group_rows == 1);
  CHECK(plan->tensors[0].candidates.bits.size() == 5);
  mo.target_bits = 4.005;  // only G = 16 fits (4 + 16 x 16 / (16 x 4096) = 4.0039)
  plan = AllocateBits(tensors, mo);
  REQUIRE(plan.ok());
  CHECK(plan->tensors[0].group_rows == 16);
  mo.allowed_groups = {4, 0};
  CHECK(Contains(AllocateBits(tensors, mo).status().message(), "G = 0"));
  mo.allowed_groups = {4, 4};
  CHECK(Contains(AllocateBits(tensors, mo).status().message(), "lists 4 twice"));
  mo.allowed_groups = {16};
  mo.allowed_bits = {2};
  mo.target_bits = 0.5;
  CHECK(Contains(AllocateBits(tensors, mo).status().message(), "below the minimum"));
}

// Inputs with strongly correlated channels: error feedback must lower the
// output error sum_n e^T H e well below nearest-entry rounding.
TEST_CASE("GPTQ error feedback lowers the output error") {
  const size_t N = 24, K = 96, T = 512;
  const std::vector<float> w = Gaussian(N * K, 3);
  // x = A z with a random mixing A: a full, correlated Gram matrix.
  const std::vector<float> z = Gaussian(T * K, 4), a = Gaussian(K * K, 5, 0.3f);
  std::vector<float> x(T * K, 0.0f);
  for (size_t t = 0; t < T; ++t) {
    for (size_t i = 0; i < K; ++i) {
      float s = z[t * K + i];
      for (size_t j = 0; j < K; ++j) s += a[i * K + j] * z[t * K + j];
      x[t * K + i] = s;
    }
  }
  CalibrationStats stats(true);
  REQUIRE(stats.Add("x", x.data(), T, K).ok());
  const std::vector<double> gram = stats.Find("x")->Gram();
  const std::vector<float> h = stats.Find("x")->SecondMoments();
  for (int bits : {2, 4}) {
    PalettizeOptions po;
    po.bits = bits;
    po.group_rows = 8;
    po.column_importance = h.data();
    StatusOr<PaletteMatrix> q = Palettize(w.data(), N, K, po);
    REQUIRE(q.ok());
    double before = 0.0, after = 0.0;
    REQUIRE(GptqRefine(w.data(), gram.data(), GptqOptions(), &*q, &before, &after).ok());
    INFO("bits " << bits << ": output error " << before << " -> " << after);
    CHECK(after < 0.8 * before);
    // The reported error is the matrix's: recompute it from the result.
    double check = 0.0;
    std::vector<float> row(K);
    std::vector<double> e(K);
    for (size_t n = 0; n < N; ++n) {
      DequantizeRow(q->view(), n, row.data());
      for (size_t k = 0; k < K; ++k) e[k] = double(w[n * K + k]) - row[k];
      for (size_t i = 0; i < K; ++i) {
        for (size_t j = 0; j < K; ++j) check += e[i] * gram[i * K + j] * e[j];
      }
    }
    CHECK(std::abs(check - after) <= 1e-6 * after);
  }
  PalettizeOptions po;
  StatusOr<PaletteMatrix> q = Palettize(w.data(), N, K, po);
  REQUIRE(q.ok());
  GptqOptions bad;
  bad.damp = 0.0;
  CHECK(Contains(GptqRefine(w.data(), gram.data(), bad, &*q).message(), "damp = 0"));
  std::vector<double> zero(K * K, 0.0);
  CHECK(Contains(GptqRefine(w.data(), zero.data(), GptqOptions(), &*q).message(),
                 "no positive diagonal"));
}

// AsymmetricTarget: with the f32 model's own inputs it returns W; with
// inputs perturbed by "upstream" error it returns a W* whose outputs on the
// perturbed inputs are closer to the f32 outputs than W's are.
TEST_CASE("Asymmetric target corrects upstream error") {
  const size_t N = 16, K = 24, T = 400;
  const std::vector<float> w = Gaussian(N * K, 21);
  const std::vector<float> x = Gaussian(T * K, 22);
  std::vector<float> x_tilde = x;
  const std::vector<float> noise = Gaussian(T * K, 23, 0.3f);
  for (size_t t = 0; t < T; ++t) {
    for (size_t k = 0; k < K; ++k) {
      // A systematic distortion (mixing of neighbours, a gain) plus noise.
      x_tilde[t * K + k] = 0.8f * x[t * K + k] + 0.3f * x[t * K + (k + 1) % K] + noise[t * K + k];
    }
  }
  const auto output_error = [&](const std::vector<float>& v, const std::vector<float>& in) {
    double sum = 0.0;
    for (size_t t = 0; t < T; ++t) {
      for (size_t n = 0; n < N; ++n) {
        double ref = 0.0, got = 0.0;
        for (size_t k = 0; k < K; ++k) {
          ref += double(w[n * K + k]) * x[t * K + k];
          got += double(v[n * K + k]) * in[t * K + k];
        }
        sum += (ref - got) * (ref - got);
      }
    }
    return sum;
  };
  std::vector<float> target;
  std::vector<double> gram;
  REQUIRE(AsymmetricTarget(w.data(), N, K, x.data(), x.data(), T, 1.0, &target, &gram).ok());
  for (size_t i = 0; i < N * K; ++i) CHECK(std::abs(target[i] - w[i]) <= 1e-4f);
  CHECK(gram.size() == K * K);
  REQUIRE(AsymmetricTarget(w.data(), N, K, x.data(), x_tilde.data(), T, 0.01, &target, &gram)
              .ok());
  const double plain = output_error(w, x_tilde), corrected = output_error(target, x_tilde);
  INFO("output error on the perturbed inputs: W " << plain << ", W* " << corrected);
  CHECK(corrected < 0.7 * plain);  // the noise part cannot be undone
  std::vector<float> zero(T * K, 0.0f);
  CHECK(Contains(AsymmetricTarget(w.data(), N, K, x.data(), zero.data(), T, 1.0, &target, &gram)
                     .message(),
                 "all zero"));
  CHECK(Contains(AsymmetricTarget(w.data(), N, K, x.data(), x.data(), T, 0.0, &target, &gram)
                     .message(),
                 "damp = 0"));
}

// The recovery adapter fit in the h-weighted norm beats the plain fit in
// that norm (what reaches the output) when a few input channels dominate.
TEST_CASE("Recovery adapter fits the activation-weighted residual") {
  const size_t L = 1, D = 64, H = 96;
  const BaseShapes base = BaseShapes::Llama(L, D, H, D, D);
  const size_t N = base.Rows(Projection::kQ), K = base.Cols(Projection::kQ);
  const std::vector<float> w = Gaussian(N * K, 9);
  std::vector<float> h(K, 1.0f);
  for (size_t k = 0; k < K; k += 8) h[k] = 400.0f;  // outlier channels
  PalettizeOptions po;
  po.bits = 2;
  StatusOr<PaletteMatrix> q = Palettize(w.data(), N, K, po);
  REQUIRE(q.ok());
  const auto weighted_residual = [&](const Adapter& a) {
    const LoraDelta* d = a.Find(0, Projection::kQ);
    std::vector<float> row(K);
    double sum = 0.0;
    for (size_t n = 0; n < N; ++n) {
      DequantizeRow(q->view(), n, row.data());
      for (size_t k = 0; k < K; ++k) {
        double ba = 0.0;
        for (size_t r = 0; r < d->rank; ++r) {
          ba += double(LoadElement(d->b, d->type, n * d->rank + r)) *
                LoadElement(d->a, d->type, r * K + k);
        }
        const double e = double(w[n * K + k]) - row[k] - d->scale * ba;
        sum += h[k] * e * e;
      }
    }
    return sum;
  };
  RecoveryOptions ro;
  ro.rank = 8;
  RecoveryTarget t;
  t.projection = Projection::kQ;
  t.weights = w.data();
  t.quantized = q->view();
  StatusOr<Adapter> plain = BuildRecoveryAdapter(base, {t}, ro);
  REQUIRE(plain.ok());
  t.column_importance = h.data();
  StatusOr<Adapter> weighted = BuildRecoveryAdapter(base, {t}, ro);
  REQUIRE(weighted.ok());
  const double e_plain = weighted_residual(*plain), e_weighted = weighted_residual(*weighted);
  INFO("weighted residual: plain fit " << e_plain << ", weighted fit " << e_weighted);
  CHECK(e_weighted < 0.9 * e_plain);
  std::vector<float> zero(K, 0.0f);
  t.column_importance = zero.data();
  CHECK(Contains(BuildRecoveryAdapter(base, {t}, ro).status().message(), "not all 0"));
}

}  // namespace
}  // namespace lutra
