// GEMM over palettized weights vs. a scalar reference (dequantize, multiply
// in double), on every target: every bit width x codebook type x precision x
// epilogue, M = 1..33 and the panel kernel's first M, strided X / Y, and
// channel ranges that split panels
// and groups.
#include <stddef.h>
#include <stdlib.h>

#include <cmath>
#include <string>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tests/gemm_test.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "lutra/kernels/gemm-inl.h"
#include "lutra/kernels/gemv-inl.h"
#include "tests/matmul_test_util.h"
#include "tests/test_util.h"

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace {

struct Case {
  size_t N, K, G;
  int bits;
  ElementType type;
  MatmulPrecision precision;
  size_t M;
  int epilogue;  // 0 none, 1 bias, 2 residual (aliasing Y), 3 LoRA, 4 all
};

void RunCase(test::Rng& rng, const Case& c) {
  const size_t N = c.N, K = c.K, M = c.M;
  PaletteMatrix mat = test::RandomPalette(rng, N, K, c.bits, c.G, c.type);
  const PaletteView v = mat.view();
  StatusOr<PreparedPalette> pw = PreparedPalette::Make(v);
  REQUIRE(pw.ok());
  std::vector<float> w(N * K);
  REQUIRE(Dequantize(v, w.data(), w.size()).ok());
  const size_t ldx = K + 3, ldy = N + 5;
  std::vector<float> X(M * ldx, 1e30f);  // padding must not be read
  for (size_t m = 0; m < M; ++m) {
    const std::vector<float> x = test::RandomActivations(rng, K);
    std::copy(x.begin(), x.end(), X.begin() + m * ldx);
  }
  const std::vector<float> bias = rng.GaussianVector(N);
  std::vector<float> Y(M * ldy, -777.0f), residual_copy;
  test::LoraFactors lora;
  Epilogue ep;
  if (c.epilogue == 1 || c.epilogue == 4) ep.bias = bias.data();
  if (c.epilogue == 2 || c.epilogue == 4) {
    for (size_t i = 0; i < M * ldy; ++i) Y[i] = rng.Gaussian();
    residual_copy = Y;
    ep.residual = Y.data();  // in place; residual_stride 0 = ldy
  }
  if (c.epilogue == 3 || c.epilogue == 4) {
    lora = test::RandomLora(rng, N, K, 1 + rng.Below(64),
                            static_cast<ElementType>(rng.Below(3)));
    ep.lora = &lora.delta;
  }
  MatmulOptions opt;
  opt.precision = c.precision;
  PreparedInput in;
  REQUIRE(PrepareGemmInput(pw.value(), X.data(), M, ldx, ep, opt, &in).ok());
  const size_t a = rng.Below(N + 1);
  REQUIRE(GemmRows(pw.value(), in, 0, a, Y.data(), ldy).ok());
  REQUIRE(GemmRows(pw.value(), in, a, N, Y.data(), ldy).ok());

  const std::string what = "gemm M=" + std::to_string(M) + " N=" + std::to_string(N) +
                           " K=" + std::to_string(K) + " G=" + std::to_string(c.G) +
                           " bits=" + std::to_string(c.bits) + " codebook=" +
                           ElementTypeName(c.type) + " precision=" +
                           MatmulPrecisionName(c.precision) + " epilogue=" +
                           std::to_string(c.epilogue) + " split=" + std::to_string(a);
  INFO(what);
  const test::LoraFactors* lp = (c.epilogue == 3 || c.epilogue == 4) ? &lora : nullptr;
  std::vector<double> xhat, sx;
  for (size_t m = 0; m < M; ++m) {
    const float* x = X.data() + m * ldx;
    if (c.precision == MatmulPrecision::kInt8) test::QuantizedActivations(in, m, &xhat, &sx);
    std::vector<double> expected(N), tol(N);
    for (size_t r = 0; r < N; ++r) {
      const float* res = residual_copy.empty() ? nullptr : &residual_copy[m * ldy + r];
      const test::RefRow ref =
          c.precision == MatmulPrecision::kInt8
              ? test::Int8ReferenceRow(pw.value(), &w[r * K], r, x, xhat, sx, ep, res, lp)
              : test::ReferenceRow(v, &w[r * K], r, x, ep, res, lp);
      expected[r] = ref.value;
      tol[r] = ref.tol;
    }
    test::ExpectClose(Y.data() + m * ldy, expected.data(), tol.data(), N,
                      what + " token " + std::to_string(m));
    // Stride padding is untouched.
    for (size_t r = N; r < ldy; ++r) {
      CHECK(Y[m * ldy + r] == (residual_copy.empty() ? -777.0f : residual_copy[m * ldy + r]));
    }
  }
}

void TestGemmAllFormats() {
  test::Rng rng(77);
  const int all_bits[] = {1, 2, 3, 4, 6, 8};
  const ElementType types[] = {ElementType::kF16, ElementType::kBF16, ElementType::kF32};
  const size_t Ms[] = {1, 2, 3, 5, 7, 13, kGemmSmallM + 5};
  size_t variant = 0;
  for (int bits : all_bits) {
    for (ElementType type : types) {
      for (MatmulPrecision precision : {MatmulPrecision::kInt8, MatmulPrecision::kF32}) {
        ++variant;
        Case c;
        const size_t shape = variant % 3;
        c.N = shape == 0 ? 37 : shape == 1 ? 70 : 9;
        c.K = shape == 0 ? 100 : shape == 1 ? 300 : 1031;
        c.G = shape == 0 ? 16 : shape == 1 ? 5 : 9;
        c.bits = bits;
        c.type = type;
        c.precision = precision;
        c.M = Ms[variant % 7];
        c.epilogue = static_cast<int>(variant % 5);
        RunCase(rng, c);
      }
    }
  }
}

// Every M in 1..33 (the few-token kernel's groups) and the panel kernel's
// first 2 * kGemmMR (micro-kernel remainders) for the fast path.
void TestGemmAllM() {
  test::Rng rng(78);
  for (size_t M = 1; M <= kGemmSmallM + 2 * detail::kGemmMR; M = M == 33 ? kGemmSmallM + 1 : M + 1) {
    Case c{45, 130, 16, M % 2 ? 4 : 2, ElementType::kF16, MatmulPrecision::kInt8, M,
           static_cast<int>(M % 5)};
    RunCase(rng, c);
  }
}

// GEMM agrees with M calls of GEMV (same quantization of each token).
void TestGemmMatchesGemv() {
  test::Rng rng(79);
  const size_t N = 50, K = 200, M = 9;
  PaletteMatrix mat = test::RandomPalette(rng, N, K, 4, 16, ElementType::kF16);
  StatusOr<PreparedPalette> pw = PreparedPalette::Make(mat.view());
  REQUIRE(pw.ok());
  std::vector<float> X(M * K);
  for (float& f : X) f = rng.Gaussian();
  std::vector<float> Y(M * N), y(N);
  ThreadPool pool(2);
  REQUIRE(Gemm(pw.value(), X.data(), M, K, Epilogue(), Y.data(), N, &pool).ok());
  for (size_t m = 0; m < M; ++m) {
    REQUIRE(Gemv(pw.value(), X.data() + m * K, K, Epilogue(), y.data(), N).ok());
    for (size_t r = 0; r < N; ++r) {
      CHECK(std::abs(Y[m * N + r] - y[r]) <= 1e-5f * (1.0f + std::abs(y[r])));
    }
  }
}

// The bit-exact contract (matmul.h): token row m of GEMM(M) is GEMV's result
// on row m alone, bit for bit, for M <= kGemmSmallM (int8) and every M (f32),
// whatever the channel split; every width, odd N, K with tails, every
// epilogue. Above kGemmSmallM the int8 panel kernel agrees to rounding only.
void TestGemmBitExactGemv() {
  test::Rng rng(81);
  const bool quick = getenv("LUTRA_TEST_QUICK") != nullptr;
  const int all_bits[] = {1, 2, 3, 4, 6, 8};
  // N, K, G. K = 4500: the few-token kernel's groups hold fewer tokens than
  // kFewTokens on 32-register targets (7: FewTokensPerGroup).
  const size_t shapes[4][3] = {{37, 300, 5}, {53, 1031, 16}, {9, 100, 1}, {11, 4500, 4}};
  ThreadPool pool(2);
  size_t variant = 0;
  // Every M up to 33 (every remainder of up to five token groups), then a
  // few up to the panel kernel's first.
  for (size_t M = 1; M <= kGemmSmallM + 1; ++M) {
    if (M > 33 && M != 47 && M < kGemmSmallM) continue;
    if (quick && M > 3 && M != 8 && M != 17 && M != kGemmSmallM && M != kGemmSmallM + 1) continue;
    for (int bits : all_bits) {
      for (MatmulPrecision precision : {MatmulPrecision::kInt8, MatmulPrecision::kF32}) {
        ++variant;
        const size_t* sh = shapes[variant % 4];
        const size_t N = sh[0], K = sh[1];
        PaletteMatrix mat = test::RandomPalette(rng, N, K, bits, sh[2], ElementType::kF16);
        StatusOr<PreparedPalette> pw = PreparedPalette::Make(mat.view());
        REQUIRE(pw.ok());
        const PreparedPalette& w = pw.value();
        std::vector<float> X(M * K);
        for (size_t m = 0; m < M; ++m) {
          const std::vector<float> x = test::RandomActivations(rng, K);
          std::copy(x.begin(), x.end(), X.begin() + m * K);
        }
        const int epilogue = static_cast<int>(variant % 5);  // as in Case
        const std::vector<float> bias = rng.GaussianVector(N), residual = rng.GaussianVector(M * N);
        test::LoraFactors lora;
        Epilogue ep;
        if (epilogue == 1 || epilogue == 4) ep.bias = bias.data();
        if (epilogue == 2 || epilogue == 4) ep.residual = residual.data();
        if (epilogue == 3 || epilogue == 4) {
          lora = test::RandomLora(rng, N, K, 1 + rng.Below(40),
                                  static_cast<ElementType>(rng.Below(3)));
          ep.lora = &lora.delta;
        }
        MatmulOptions opt;
        opt.precision = precision;
        // GEMM twice: two GemmRows calls split at a random channel, and the
        // one-shot Gemm over 2 threads.
        std::vector<float> Y(M * N), Y2(M * N), y(N);
        PreparedInput in;
        REQUIRE(PrepareGemmInput(w, X.data(), M, K, ep, opt, &in).ok());
        const size_t a = rng.Below(N + 1);
        REQUIRE(GemmRows(w, in, 0, a, Y.data(), N).ok());
        REQUIRE(GemmRows(w, in, a, N, Y.data(), N).ok());
        REQUIRE(Gemm(w, X.data(), M, K, ep, Y2.data(), N, &pool, opt).ok());
        const bool exact = precision == MatmulPrecision::kF32 || M <= kGemmSmallM;
        INFO("M=" << M << " N=" << N << " K=" << K << " bits=" << bits << " precision="
                  << MatmulPrecisionName(precision) << " epilogue=" << epilogue
                  << " split=" << a << " target=" << test::CurrentTargetName());
        size_t mismatches = 0;
        for (size_t m = 0; m < M; ++m) {
          Epilogue ep1 = ep;
          if (ep.residual) ep1.residual = residual.data() + m * N;
          REQUIRE(Gemv(w, X.data() + m * K, K, ep1, y.data(), N, nullptr, opt).ok());
          for (size_t r = 0; r < N; ++r) {
            const float g = Y[m * N + r];
            if (exact) {
              mismatches += !test::SameBits(g, y[r]) || !test::SameBits(Y2[m * N + r], y[r]);
            } else {
              mismatches += !(std::abs(g - y[r]) <= 1e-4f * (1.0f + std::abs(y[r])));
            }
          }
        }
        CHECK(mismatches == 0);
      }
    }
  }
}

// A LoRA delta per token (Epilogue::token_lora: batched decoding of
// sequences with different adapters): token m's row equals its GEMV with
// ep.lora = its own delta (or none), bit for bit where the contract holds
// (matmul.h), and so does a second matrix of the same width prepared from
// the first input (PrepareGemmInputFrom, as a GemmGroup does). A list of one
// delta repeated equals ep.lora. Every width, both precisions, the
// few-token and the panel kernel, two threads.
void TestGemmPerTokenLora() {
  test::Rng rng(81);
  ThreadPool pool(2);
  const size_t N = 45, K = 300;
  size_t variant = 0;
  for (int bits : {1, 2, 3, 4, 6, 8}) {
    for (MatmulPrecision precision : {MatmulPrecision::kInt8, MatmulPrecision::kF32}) {
      for (size_t M : {size_t{2}, size_t{5}, size_t{17}, kGemmSmallM + 3}) {
        ++variant;
        PaletteMatrix mat = test::RandomPalette(rng, N, K, bits, 5, ElementType::kF16);
        PaletteMatrix mat2 = test::RandomPalette(rng, N, K, bits, 3, ElementType::kBF16);
        StatusOr<PreparedPalette> pw = PreparedPalette::Make(mat.view());
        StatusOr<PreparedPalette> pw2 = PreparedPalette::Make(mat2.view());
        REQUIRE((pw.ok() && pw2.ok()));
        std::vector<float> X(M * K);
        for (size_t m = 0; m < M; ++m) {
          const std::vector<float> x = test::RandomActivations(rng, K);
          std::copy(x.begin(), x.end(), X.begin() + m * K);
        }
        // Two adapters of different ranks and types, and tokens without.
        const test::LoraFactors a = test::RandomLora(rng, N, K, 1 + rng.Below(20),
                                                     static_cast<ElementType>(rng.Below(3)));
        const test::LoraFactors b = test::RandomLora(rng, N, K, 21 + rng.Below(40),
                                                     static_cast<ElementType>(rng.Below(3)));
        std::vector<const LoraDelta*> list(M);
        for (size_t m = 0; m < M; ++m) {
          const size_t pick = (m + variant) % 3;
          list[m] = pick == 0 ? nullptr : pick == 1 ? &a.delta : &b.delta;
        }
        const std::vector<float> bias = rng.GaussianVector(N);
        Epilogue ep;
        if (variant % 2) ep.bias = bias.data();
        ep.token_lora = list.data();
        MatmulOptions opt;
        opt.precision = precision;
        std::vector<float> Y(M * N), Y2(M * N), Y3(M * N), y(N);
        PreparedInput in, in2;
        REQUIRE(PrepareGemmInput(pw.value(), X.data(), M, K, ep, opt, &in).ok());
        const size_t split = rng.Below(N + 1);
        REQUIRE(GemmRows(pw.value(), in, 0, split, Y.data(), N).ok());
        REQUIRE(GemmRows(pw.value(), in, split, N, Y.data(), N).ok());
        REQUIRE(Gemm(pw.value(), X.data(), M, K, ep, Y2.data(), N, &pool, opt).ok());
        REQUIRE(PrepareGemmInputFrom(in, pw2.value(), X.data(), K, ep, &in2).ok());
        REQUIRE(GemmRows(pw2.value(), in2, 0, N, Y3.data(), N).ok());
        const bool exact = precision == MatmulPrecision::kF32 || M <= kGemmSmallM;
        INFO("M=" << M << " bits=" << bits << " precision=" << MatmulPrecisionName(precision)
                  << " ranks " << a.delta.rank << "/" << b.delta.rank << " split=" << split
                  << " target=" << test::CurrentTargetName());
        size_t mismatches = 0;
        const auto compare = [&](const float* got, const float* want) {
          for (size_t r = 0; r < N; ++r) {
            mismatches += exact ? !test::SameBits(got[r], want[r])
                                : !(std::abs(got[r] - want[r]) <= 1e-4f * (1.0f + std::abs(want[r])));
          }
        };
        for (size_t m = 0; m < M; ++m) {
          Epilogue one;
          one.bias = ep.bias;
          one.lora = list[m];
          REQUIRE(Gemv(pw.value(), X.data() + m * K, K, one, y.data(), N, nullptr, opt).ok());
          compare(&Y[m * N], y.data());
          compare(&Y2[m * N], y.data());
          REQUIRE(Gemv(pw2.value(), X.data() + m * K, K, one, y.data(), N, nullptr, opt).ok());
          compare(&Y3[m * N], y.data());
        }
        CHECK(mismatches == 0);
        // One delta repeated: exactly the ep.lora call (its panel path too).
        std::fill(list.begin(), list.end(), &b.delta);
        Epilogue uniform;
        uniform.bias = ep.bias;
        uniform.lora = &b.delta;
        REQUIRE(Gemm(pw.value(), X.data(), M, K, ep, Y.data(), N, &pool, opt).ok());
        REQUIRE(Gemm(pw.value(), X.data(), M, K, uniform, Y2.data(), N, &pool, opt).ok());
        size_t differ = 0;
        for (size_t i = 0; i < M * N; ++i) differ += !test::SameBits(Y[i], Y2[i]);
        CHECK(differ == 0);
      }
    }
  }
}

void TestGemmErrors() {
  test::Rng rng(80);
  const size_t N = 8, K = 40, M = 3;
  PaletteMatrix mat = test::RandomPalette(rng, N, K, 4, 4, ElementType::kF16);
  StatusOr<PreparedPalette> pw = PreparedPalette::Make(mat.view());
  REQUIRE(pw.ok());
  std::vector<float> X(M * K, 1.0f), Y(M * N);
  PreparedInput in;
  CHECK(!PrepareGemmInput(pw.value(), X.data(), 0, K, Epilogue(), MatmulOptions(), &in).ok());
  CHECK(!PrepareGemmInput(pw.value(), X.data(), M, K - 1, Epilogue(), MatmulOptions(), &in).ok());
  REQUIRE(PrepareGemmInput(pw.value(), X.data(), M, K, Epilogue(), MatmulOptions(), &in).ok());
  CHECK(!GemmRows(pw.value(), in, 0, N, Y.data(), N - 1).ok());
  CHECK(!GemmRows(pw.value(), in, 5, 4, Y.data(), N).ok());
  CHECK(!GemmRows(pw.value(), in, 0, N + 1, Y.data(), N).ok());
  CHECK(!GemmRows(pw.value(), in, 0, N, nullptr, N).ok());
  CHECK(!GemvRows(pw.value(), in, 0, N, Y.data()).ok());  // M = 3 input
  // Per-token LoRA: not together with ep.lora, and each delta is checked
  // (the message names the token).
  test::LoraFactors lora = test::RandomLora(rng, N, K, 3, ElementType::kF32);
  LoraDelta bad = lora.delta;
  bad.rank = kMaxLoraRank + 1;
  const LoraDelta* list[M] = {&lora.delta, nullptr, &bad};
  Epilogue ep;
  ep.token_lora = list;
  const Status s = PrepareGemmInput(pw.value(), X.data(), M, K, ep, MatmulOptions(), &in);
  CHECK(!s.ok());
  CHECK(s.message().find("token 2") != std::string::npos);
  list[2] = &lora.delta;
  ep.lora = &lora.delta;
  CHECK(!PrepareGemmInput(pw.value(), X.data(), M, K, ep, MatmulOptions(), &in).ok());
  ep.lora = nullptr;
  CHECK(PrepareGemmInput(pw.value(), X.data(), M, K, ep, MatmulOptions(), &in).ok());
}

// The extremes of the int8 path's product: codebooks of only -1 and +1 give
// u8 codes 0 and 255 (biased codes -128 and 127, CodeDot), and activations
// of one magnitude quantize to -127 and 127, so pairs of products reach
// 2 * 128 * 127. Any i16 step that could saturate (e.g. pmaddubsw of the
// unbiased codes, up to 2 * 255 * 127) would be far off the exact integer
// emulation. GEMV, the few-token and small-M GEMMs and the panel GEMM, every
// width.
void TestExtremeCodes() {
  test::Rng rng(21);
  const size_t N = 40, K = 300;
  for (int bits : {1, 2, 3, 4, 6, 8}) {
    PaletteMatrix mat = test::RandomPalette(rng, N, K, bits, 8, ElementType::kF16);
    const size_t entries = mat.view().shape.num_entries();
    for (size_t g = 0; g < mat.view().shape.num_groups(); ++g) {
      for (size_t e = 0; e < entries; ++e) mat.set_entry(g, e, (e + g) % 2 ? 1.0f : -1.0f);
    }
    StatusOr<PreparedPalette> pw = PreparedPalette::Make(mat.view());
    REQUIRE(pw.ok());
    for (size_t g = 0; g < mat.view().shape.num_groups(); ++g) {
      for (size_t e = 0; e < HWY_MIN(entries, size_t{2}); ++e) {
        const uint8_t q = pw.value().table_u8(g)[e];
        REQUIRE((q == 0 || q == 255));
      }
    }
    std::vector<float> w(N * K);
    REQUIRE(Dequantize(mat.view(), w.data(), w.size()).ok());
    for (size_t M : {size_t{1}, size_t{3}, size_t{12}, size_t{40}, kGemmSmallM + 8}) {
      // Runs of one sign, so that pairs of equal products occur.
      std::vector<float> X(M * K);
      for (size_t i = 0; i < X.size(); ++i) X[i] = (i / 3 + M) % 2 ? 0.5f : -0.5f;
      std::vector<float> Y(M * N);
      PreparedInput in;
      REQUIRE(PrepareGemmInput(pw.value(), X.data(), M, K, Epilogue(), MatmulOptions(), &in).ok());
      if (M == 1) {
        REQUIRE(GemvRows(pw.value(), in, 0, N, Y.data()).ok());
      } else {
        REQUIRE(GemmRows(pw.value(), in, 0, N, Y.data(), N).ok());
      }
      for (size_t m = 0; m < M; ++m) {
        std::vector<double> xhat, sx;
        test::QuantizedActivations(in, m, &xhat, &sx);
        for (size_t r = 0; r < N; ++r) {
          const test::RefRow ref = test::Int8ReferenceRow(pw.value(), &w[r * K], r, &X[m * K], xhat,
                                                          sx, Epilogue(), nullptr, nullptr);
          CHECK(std::abs(Y[m * N + r] - ref.value) <= ref.tol);
        }
      }
    }
  }
}

}  // namespace
}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lutra {
HWY_EXPORT(TestGemmAllFormats);
HWY_EXPORT(TestExtremeCodes);
HWY_EXPORT(TestGemmAllM);
HWY_EXPORT(TestGemmMatchesGemv);
HWY_EXPORT(TestGemmErrors);
HWY_EXPORT(TestGemmPerTokenLora);
HWY_EXPORT(TestGemmBitExactGemv);

TEST_CASE("GEMM matches scalar reference for every format and epilogue", "[gemm]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestGemmAllFormats)(); });
}
TEST_CASE("GEMM for every M in 1..33 and the panel's first", "[gemm]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestGemmAllM)(); });
}
TEST_CASE("GEMM equals GEMV per token", "[gemm]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestGemmMatchesGemv)(); });
}
TEST_CASE("GEMM rows are GEMV's bits for M <= kGemmSmallM", "[gemm]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestGemmBitExactGemv)(); });
}
TEST_CASE("int8 products at the extremes of codes and activations", "[gemm][gemv]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestExtremeCodes)(); });
}
TEST_CASE("GEMM with a LoRA delta per token equals each token's GEMV", "[gemm][lora]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestGemmPerTokenLora)(); });
}
TEST_CASE("GEMM rejects bad input", "[gemm]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestGemmErrors)(); });
}
}  // namespace lutra
#endif  // HWY_ONCE
