// GEMV over palettized weights vs. a scalar reference (dequantize, multiply
// in double), on every target: every bit width x codebook type x precision x
// epilogue, odd shapes, and row ranges that split groups and 4-row blocks.
// Also the shared epilogue applier (epilogue-inl.h) alone, and WithBits.
#include <stddef.h>

#include <array>
#include <cmath>
#include <string>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tests/gemv_test.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "lutra/kernels/epilogue-inl.h"
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

// The epilogue applier alone vs. a scalar reference in double: both ways of
// getting the LoRA dots (LoraRowDots via FinishRows, LoraPanel), every LoRA
// type and several ranks, odd counts and offsets (vector tails), token m > 0
// with a residual stride, residual aliasing the output, raw in place, and
// outputs outside the range left untouched.
void TestEpilogueApplier() {
  test::Rng rng(11);
  const hn::ScalableTag<float> df;
  const size_t NR = 2 * hn::Lanes(df);
  const size_t M = 2, N = 103, stride = N + 3;
  const ElementType types[] = {ElementType::kF16, ElementType::kBF16, ElementType::kF32};
  size_t variant = 0;
  for (ElementType type : types) {
    for (size_t rank : {size_t{1}, size_t{5}, size_t{16}, size_t{64}}) {
      for (int terms = 0; terms < 8; ++terms) {  // bit 0 bias, 1 residual, 2 LoRA
        for (int mode = 0; mode < 3; ++mode) {  // 0 FinishRows, 1 in place, 2 LoraPanel
          ++variant;
          const bool use_bias = terms & 1, use_res = terms & 2, use_lora = terms & 4;
          const size_t m = variant % M;
          const size_t n0 = rng.Below(N), n = 1 + rng.Below(N - n0);  // [n0, n0 + n)
          const std::vector<float> bias = rng.GaussianVector(N);
          const std::vector<float> raw = rng.GaussianVector(N);
          const std::vector<float> ax = rng.GaussianVector(rank);
          const test::LoraFactors lora = test::RandomLora(rng, N, 1, rank, type);
          std::vector<float> Y = rng.GaussianVector(M * stride);  // also the residual
          const std::vector<float> before = Y;
          EpilogueArgs e;
          if (use_bias) e.bias = bias.data();
          if (use_res) {
            e.residual = Y.data();  // aliases the output
            e.residual_stride = stride;
          }
          std::vector<float> ax_all(M * rank, 0.0f);
          std::copy(ax.begin(), ax.end(), ax_all.begin() + m * rank);
          if (use_lora) {
            e.lora = &lora.delta;
            e.lora_ax = ax_all.data();
          }
          float* y_row = Y.data() + m * stride;
          // In place: the raw values start out in the output itself (the
          // residual is then those raw values, as LoraApplyT never has one).
          if (mode == 1) std::copy(raw.begin() + n0, raw.begin() + n0 + n, y_row + n0);
          for (size_t j = 0; j < n;) {
            if (mode == 2) {
              const size_t nr = HWY_MIN(NR, n - j);
              LoraPanel panel;
              std::vector<float> dots(NR);
              panel.Init(lora.delta, n0 + j, nr, NR);
              panel.Dots(df, ax.data(), dots.data());
              ApplyEpilogue(df, e, m, n0 + j, nr, raw.data() + n0 + j, dots.data(), y_row);
              j += nr;
            } else {
              const size_t c = HWY_MIN(kEpilogueChunk, n - j);
              const float* r = mode == 1 ? y_row + n0 + j : raw.data() + n0 + j;
              FinishRows(df, e, m, n0 + j, c, r, y_row);
              j += c;
            }
          }
          std::vector<double> expected(n), tol(n);
          for (size_t j = 0; j < n; ++j) {
            const size_t col = n0 + j;
            const double v = raw[col];
            double sum = v, mag = std::abs(v);
            if (use_bias) {
              sum += bias[col];
              mag += std::abs(bias[col]);
            }
            if (use_res) {
              const double r = mode == 1 ? raw[col] : before[m * stride + col];
              sum += r;
              mag += std::abs(r);
            }
            if (use_lora) {
              for (size_t k = 0; k < rank; ++k) {
                const double t = double(lora.delta.scale) * lora.bf[col * rank + k] * ax[k];
                sum += t;
                mag += std::abs(t);
              }
            }
            expected[j] = sum;
            tol[j] = test::RoundingTol(0, rank, mag);
          }
          const std::string what = "epilogue type=" + std::string(ElementTypeName(type)) +
                                   " rank=" + std::to_string(rank) + " terms=" +
                                   std::to_string(terms) + " mode=" + std::to_string(mode) +
                                   " m=" + std::to_string(m) + " n0=" + std::to_string(n0) +
                                   " n=" + std::to_string(n);
          INFO(what);
          test::ExpectClose(y_row + n0, expected.data(), tol.data(), n, what);
          // Nothing outside [n0, n0 + n) of row m is written.
          for (size_t i = 0; i < M * stride; ++i) {
            if (i < m * stride + n0 || i >= m * stride + n0 + n) CHECK(Y[i] == before[i]);
          }
        }
      }
    }
  }
}

// LoraRowDots gives each row the same bits whichever chunk it is computed
// in (rows share reductions four at a time, SumsOfFour): one call over N
// rows against one call per row and calls over odd chunks. GEMV, the
// few-token GEMM and every thread split rely on it for bit-equal outputs.
void TestLoraRowDotsChunking() {
  test::Rng rng(12);
  const size_t N = 37;
  for (ElementType type : {ElementType::kF16, ElementType::kBF16, ElementType::kF32}) {
    for (size_t rank : {size_t{1}, size_t{3}, size_t{16}, size_t{17}, size_t{64}}) {
      const test::LoraFactors lora = test::RandomLora(rng, N, 1, rank, type);
      const std::vector<float> ax = rng.GaussianVector(rank);
      std::vector<float> all(N), one(N), odd(N);
      LoraRowDots(lora.delta, ax.data(), 0, N, all.data());
      for (size_t j = 0; j < N; ++j) LoraRowDots(lora.delta, ax.data(), j, 1, &one[j]);
      for (size_t j = 0; j < N;) {
        const size_t len = 1 + rng.Below(7);  // (HWY_MIN evaluates twice)
        const size_t n = HWY_MIN(N - j, len);
        LoraRowDots(lora.delta, ax.data(), j, n, &odd[j]);
        j += n;
      }
      INFO("type " << ElementTypeName(type) << " rank " << rank << " on "
                   << test::CurrentTargetName());
      size_t differ = 0;
      for (size_t j = 0; j < N; ++j) {
        differ += !test::SameBits(all[j], one[j]) || !test::SameBits(all[j], odd[j]);
        double want = 0.0, mag = 0.0;
        for (size_t k = 0; k < rank; ++k) {
          want += double(lora.bf[j * rank + k]) * ax[k];
          mag += std::abs(double(lora.bf[j * rank + k]) * ax[k]);
        }
        CHECK(std::abs(all[j] - want) <= test::RoundingTol(0, rank, mag));
      }
      CHECK(differ == 0);
    }
  }
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
HWY_EXPORT(TestEpilogueApplier);
HWY_EXPORT(TestLoraRowDotsChunking);

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
TEST_CASE("Epilogue applier matches scalar reference", "[gemv][epilogue]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestEpilogueApplier)(); });
}

TEST_CASE("LoRA row dots do not depend on the chunking", "[gemv][epilogue][lora]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestLoraRowDotsChunking)(); });
}
TEST_CASE("WithBits passes each valid width as a constant and rejects others", "[palette]") {
  for (int bits : {1, 2, 3, 4, 6, 8}) {
    int seen = 0;
    const Status s = WithBits(bits, [&](auto b) {
      constexpr int kBits = decltype(b)::value;
      std::array<uint8_t, kBits> compile_time{};  // kBits is a constant
      using F = PaletteFormat<kBits>;
      static_assert(F::kBlockBytes * 8 == F::kBlockCols * kBits, "block size");
      static_assert(F::kLowBits + F::kHighBits == kBits, "planes");
      seen = static_cast<int>(compile_time.size());
    });
    CHECK(s.ok());
    CHECK(seen == bits);
  }
  for (int bits : {-1, 0, 5, 7, 9, 16}) {
    bool called = false;
    const Status s = WithBits(bits, [&](auto) { called = true; });
    CHECK(!s.ok());
    CHECK(!called);
    CHECK(s.code() == StatusCode::kInvalidArgument);
    CHECK(s.message().find("bits = " + std::to_string(bits)) != std::string::npos);
    CHECK(!IsValidPaletteBits(bits));
    CHECK(PaletteBlockCols(bits) == 0);
  }
  // fn's own Status comes back.
  const Status inner = WithBits(3, [](auto) { return InvalidArgument("inner %d", 3); });
  CHECK(inner.message() == "inner 3");
}
}  // namespace lutra
#endif  // HWY_ONCE
