// GEMV over palettized weights vs. a scalar reference (dequantize, multiply
// in double), on every target: every bit width x codebook type x precision x
// epilogue, odd shapes, and row ranges that split groups and 4-row blocks.
#include <stddef.h>

#include <cmath>
#include <string>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tests/gemv_test.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "lutra/kernels/gemv-inl.h"
#include "tests/matmul_test_util.h"
#include "tests/test_util.h"

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace {

struct Shape {
  size_t N, K, G;
};

// Epilogue variants: 0 none, 1 bias, 2 residual (aliasing y), 3 LoRA,
// 4 bias + residual + LoRA.
constexpr int kNumEpilogues = 5;

// Checks y[r] for r in [0, N) against the reference: for kF32 the exact
// double result with an f32 rounding tolerance; for kInt8 an emulation of the
// int8 arithmetic (quantized codebook and activations) with an f32 rounding
// tolerance, whose own distance to the exact result is checked against the
// documented bound (Int8ReferenceRow).
void CheckOutput(const PreparedPalette& pw, const std::vector<float>& w,
                 const std::vector<float>& x, const PreparedInput& in, const Epilogue& ep,
                 const std::vector<float>& residual_copy, const test::LoraFactors* lora,
                 const std::vector<float>& y, const std::string& what) {
  const PaletteView& v = pw.view();
  const size_t N = v.shape.rows, K = v.shape.cols;
  std::vector<double> expected(N), tol(N), xhat, sx;
  if (in.precision == MatmulPrecision::kInt8) test::QuantizedActivations(in, 0, &xhat, &sx);
  for (size_t r = 0; r < N; ++r) {
    const float* res = residual_copy.empty() ? nullptr : &residual_copy[r];
    const test::RefRow ref =
        in.precision == MatmulPrecision::kInt8
            ? test::Int8ReferenceRow(pw, &w[r * K], r, x.data(), xhat, sx, ep, res, lora)
            : test::ReferenceRow(v, &w[r * K], r, x.data(), ep, res, lora);
    expected[r] = ref.value;
    tol[r] = ref.tol;
  }
  test::ExpectClose(y.data(), expected.data(), tol.data(), N, what);
}

void TestGemvAllFormats() {
  test::Rng rng(42);
  const Shape shapes[] = {{1, 1, 16}, {5, 17, 1}, {37, 100, 16}, {33, 300, 5},
                          {20, 1031, 20}, {6, 4099, 4}};
  const int all_bits[] = {1, 2, 3, 4, 6, 8};
  const ElementType types[] = {ElementType::kF16, ElementType::kBF16, ElementType::kF32};
  const ElementType lora_types[] = {ElementType::kF16, ElementType::kBF16, ElementType::kF32};
  const size_t lora_ranks[] = {1, 16, 64};
  size_t variant = 0;
  for (const Shape& s : shapes) {
    for (int bits : all_bits) {
      for (ElementType type : types) {
        PaletteMatrix mat = test::RandomPalette(rng, s.N, s.K, bits, s.G, type);
        const PaletteView v = mat.view();
        StatusOr<PreparedPalette> pw = PreparedPalette::Make(v);
        REQUIRE(pw.ok());
        std::vector<float> w(s.N * s.K);
        REQUIRE(Dequantize(v, w.data(), w.size()).ok());
        const std::vector<float> x = test::RandomActivations(rng, s.K);
        const std::vector<float> bias = rng.GaussianVector(s.N);
        for (MatmulPrecision precision : {MatmulPrecision::kInt8, MatmulPrecision::kF32}) {
          ++variant;
          const int epi = static_cast<int>(variant % kNumEpilogues);
          test::LoraFactors lora;
          Epilogue ep;
          std::vector<float> y(s.N, -777.0f), residual_copy;
          if (epi == 1 || epi == 4) ep.bias = bias.data();
          if (epi == 2 || epi == 4) {
            residual_copy = rng.GaussianVector(s.N);
            y = residual_copy;  // in-place residual add
            ep.residual = y.data();
          }
          if (epi == 3 || epi == 4) {
            lora = test::RandomLora(rng, s.N, s.K, lora_ranks[variant % 3],
                                    lora_types[(variant / 3) % 3]);
            ep.lora = &lora.delta;
          }
          MatmulOptions opt;
          opt.precision = precision;
          PreparedInput in;
          REQUIRE(PrepareGemvInput(pw.value(), x.data(), x.size(), ep, opt, &in).ok());
          // Row ranges that split groups and 4-row blocks: [0,a) [a,b) [b,N).
          const size_t a = rng.Below(s.N + 1), b = a + rng.Below(s.N - a + 1);
          REQUIRE(GemvRows(pw.value(), in, 0, a, y.data()).ok());
          REQUIRE(GemvRows(pw.value(), in, a, b, y.data()).ok());
          REQUIRE(GemvRows(pw.value(), in, b, s.N, y.data()).ok());
          const std::string what = "gemv N=" + std::to_string(s.N) + " K=" +
                                   std::to_string(s.K) + " G=" + std::to_string(s.G) +
                                   " bits=" + std::to_string(bits) + " codebook=" +
                                   ElementTypeName(type) + " precision=" +
                                   MatmulPrecisionName(precision) + " epilogue=" +
                                   std::to_string(epi);
          INFO(what);
          CheckOutput(pw.value(), w, x, in, ep, residual_copy,
                      (epi == 3 || epi == 4) ? &lora : nullptr, y, what);
          // A single full-range call gives bit-identical results: the split
          // does not change any row's arithmetic.
          if (epi != 2 && epi != 4) {
            std::vector<float> y2(s.N, 0.0f);
            REQUIRE(GemvRows(pw.value(), in, 0, s.N, y2.data()).ok());
            for (size_t r = 0; r < s.N; ++r) CHECK(y2[r] == y[r]);
          }
        }
      }
    }
  }
}

// The int8 path's accuracy at realistic sizes, reported as SNR against the
// exact result; and the tolerance is tight enough to catch a single wrong
// weight (the test can fail).
void TestGemvAccuracyAndDetection() {
  test::Rng rng(9);
  const size_t N = 64, K = 512;
  for (int bits : {2, 4, 8}) {
    PaletteMatrix mat = test::RandomPalette(rng, N, K, bits, 16, ElementType::kF16);
    const PaletteView v = mat.view();
    StatusOr<PreparedPalette> pw = PreparedPalette::Make(v);
    REQUIRE(pw.ok());
    std::vector<float> w(N * K);
    REQUIRE(Dequantize(v, w.data(), w.size()).ok());
    const std::vector<float> x = test::RandomActivations(rng, K);
    std::vector<float> y(N), exact(N);
    PreparedInput in;
    REQUIRE(PrepareGemvInput(pw.value(), x.data(), K, Epilogue(), MatmulOptions(), &in).ok());
    REQUIRE(GemvRows(pw.value(), in, 0, N, y.data()).ok());
    std::vector<double> xhat, sx;
    test::QuantizedActivations(in, 0, &xhat, &sx);
    size_t detected = 0;
    for (size_t r = 0; r < N; ++r) {
      exact[r] = static_cast<float>(
          test::ReferenceRow(v, &w[r * K], r, x.data(), Epilogue(), nullptr, nullptr).value);
      // Emulation with one weight replaced by another codebook entry, at the
      // outlier column (where the change matters most).
      const size_t c = K / 3, g = r / 16;
      const uint32_t e = v.index(r, c), e2 = (e + 1) % v.shape.num_entries();
      const double dq = pw.value().step(g) *
                        (double(pw.value().table_u8(g)[e2]) - pw.value().table_u8(g)[e]);
      const test::RefRow ref = test::Int8ReferenceRow(pw.value(), &w[r * K], r, x.data(), xhat,
                                                      sx, Epilogue(), nullptr, nullptr);
      detected += std::abs(y[r] - (ref.value + dq * xhat[c])) > ref.tol;
    }
    const double snr = test::SnrDb(y.data(), exact.data(), N);
    std::printf("[gemv] int8 path, %d-bit, N=%zu K=%zu (x with a 20-sigma outlier): "
                "SNR %.1f dB vs exact\n", bits, N, K, snr);
    CHECK(snr > 20.0);
    CHECK(detected > N / 2);
  }
}

void TestGemvThreadPool() {
  test::Rng rng(5);
  const size_t N = 77, K = 333;
  PaletteMatrix mat = test::RandomPalette(rng, N, K, 4, 16, ElementType::kF16);
  StatusOr<PreparedPalette> pw = PreparedPalette::Make(mat.view());
  REQUIRE(pw.ok());
  const std::vector<float> x = test::RandomActivations(rng, K);
  std::vector<float> y1(N), y3(N);
  REQUIRE(Gemv(pw.value(), x.data(), K, Epilogue(), y1.data(), N).ok());
  ThreadPool pool(3);
  PreparedInput scratch;
  REQUIRE(Gemv(pw.value(), x.data(), K, Epilogue(), y3.data(), N, &pool, MatmulOptions(),
               &scratch)
              .ok());
  for (size_t r = 0; r < N; ++r) CHECK(y1[r] == y3[r]);
}

void TestGemvErrors() {
  test::Rng rng(3);
  const size_t N = 8, K = 40;
  PaletteMatrix mat = test::RandomPalette(rng, N, K, 4, 4, ElementType::kF16);
  StatusOr<PreparedPalette> pw = PreparedPalette::Make(mat.view());
  REQUIRE(pw.ok());
  const PreparedPalette& w = pw.value();
  std::vector<float> x(K, 1.0f), y(N);
  PreparedInput in;
  CHECK(!PrepareGemvInput(w, x.data(), K - 1, Epilogue(), MatmulOptions(), &in).ok());
  CHECK(!PrepareGemvInput(w, nullptr, K, Epilogue(), MatmulOptions(), &in).ok());
  CHECK(!PrepareGemvInput(w, x.data(), K, Epilogue(), MatmulOptions(), nullptr).ok());
  LoraDelta bad;
  Epilogue ep;
  ep.lora = &bad;
  const Status s = PrepareGemvInput(w, x.data(), K, ep, MatmulOptions(), &in);
  CHECK(!s.ok());
  CHECK(s.message().find("rank") != std::string::npos);
  bad.rank = 65;
  CHECK(!PrepareGemvInput(w, x.data(), K, ep, MatmulOptions(), &in).ok());
  REQUIRE(PrepareGemvInput(w, x.data(), K, Epilogue(), MatmulOptions(), &in).ok());
  CHECK(!GemvRows(w, in, 3, 2, y.data()).ok());
  CHECK(!GemvRows(w, in, 0, N + 1, y.data()).ok());
  CHECK(!GemvRows(w, in, 0, N, nullptr).ok());
  CHECK(GemvRows(w, in, 2, 2, nullptr).ok());  // empty range writes nothing
  // An input prepared for another matrix is rejected.
  PaletteMatrix other = test::RandomPalette(rng, N, K, 4, 4, ElementType::kF16);
  StatusOr<PreparedPalette> pw2 = PreparedPalette::Make(other.view());
  REQUIRE(pw2.ok());
  CHECK(!GemvRows(pw2.value(), in, 0, N, y.data()).ok());
  CHECK(!Gemv(w, x.data(), K, Epilogue(), y.data(), N - 1).ok());
  CHECK(!PreparedPalette::Make(PaletteView()).ok());
}

}  // namespace
}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lutra {
HWY_EXPORT(TestGemvAllFormats);
HWY_EXPORT(TestGemvAccuracyAndDetection);
HWY_EXPORT(TestGemvThreadPool);
HWY_EXPORT(TestGemvErrors);

TEST_CASE("GEMV matches scalar reference for every format and epilogue", "[gemv]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestGemvAllFormats)(); });
}
TEST_CASE("GEMV int8 accuracy and error detection", "[gemv]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestGemvAccuracyAndDetection)(); });
}
TEST_CASE("GEMV with thread pool equals single thread", "[gemv]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestGemvThreadPool)(); });
}
TEST_CASE("GEMV rejects bad input", "[gemv]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestGemvErrors)(); });
}
}  // namespace lutra
#endif  // HWY_ONCE
