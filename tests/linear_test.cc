// lutra::Linear (lutra/linear.h) through the dispatch library: the same bits
// as the free Gemv/Gemm for any row split and any scheduler, clear errors,
// and no heap allocation per Prepare/Run once it is made (a counting global
// operator new, plus malloc itself outside sanitizer builds, which also
// catches the aligned buffers Highway allocates).
#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "lutra/base/thread_pool.h"
#include "lutra/dispatch.h"
#include "lutra/linear.h"
#include "lutra/quantize/palettize.h"
#include "tests/support/rng.h"
#include "tests/test_util.h"

// ---- Allocation counting ---------------------------------------------------
// operator delete frees what operator new got from malloc; GCC, seeing both
// inlined, would warn about a new/free mismatch.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
namespace {
std::atomic<size_t> g_allocations{0};
}  // namespace

void* operator new(size_t n) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  std::abort();  // test binary only: out of memory
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define LUTRA_TEST_COUNT_MALLOC 0  // the sanitizers own malloc
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define LUTRA_TEST_COUNT_MALLOC 0
#endif
#endif
#ifndef LUTRA_TEST_COUNT_MALLOC
#if defined(__GLIBC__)
#define LUTRA_TEST_COUNT_MALLOC 1
#else
#define LUTRA_TEST_COUNT_MALLOC 0
#endif
#endif

#if LUTRA_TEST_COUNT_MALLOC
// glibc lets the executable interpose malloc; free stays glibc's.
extern "C" void* __libc_malloc(size_t n);
extern "C" void* malloc(size_t n) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_malloc(n);
}
#endif

namespace lutra {
namespace {

struct Matrix {
  PaletteMatrix palette;
  std::vector<float> a, b;  // LoRA factors: rank x K, N x rank
  LoraDelta lora;
};

Matrix MakeMatrix(size_t N, size_t K, int bits, size_t rank, uint64_t seed) {
  test::Rng rng(seed);
  const std::vector<float> w = rng.GaussianVector(N * K);
  PalettizeOptions opt;
  opt.bits = bits;
  Matrix m;
  StatusOr<PaletteMatrix> p = Palettize(w.data(), N, K, opt);
  REQUIRE(p.ok());
  m.palette = std::move(p).value();
  m.a = rng.GaussianVector(rank * K, 0.1f);
  m.b = rng.GaussianVector(N * rank, 0.1f);
  m.lora.a = m.a.data();
  m.lora.b = m.b.data();
  m.lora.rank = rank;
  m.lora.type = ElementType::kF32;
  m.lora.scale = 0.5f;
  return m;
}

// Linear over num_tasks ranges of the engine's own scheduler (here: a
// ThreadPool behind the hook) equals the one-shot dispatch::Gemv/Gemm bits,
// on every target the library and the CPU have (ForEachTarget pins the
// dispatch layer's choice).
void CheckLinearMatchesFreeFunctions() {
  const size_t N = 77, K = 300, rank = 3;
  const Matrix m = MakeMatrix(N, K, 4, rank, 7);
  test::Rng rng(11);
  const std::vector<float> x = rng.GaussianVector(5 * K), bias = rng.GaussianVector(N);
  ThreadPool pool(3);
  for (MatmulPrecision prec : {MatmulPrecision::kInt8, MatmulPrecision::kF32}) {
    LinearOptions opt;
    opt.precision = prec;
    opt.max_tokens = 5;
    opt.max_threads = 3;
    opt.max_lora_rank = rank;
    StatusOr<Linear> fc = Linear::Make(m.palette.view(), opt);
    REQUIRE(fc.ok());
    for (size_t M : {size_t{1}, size_t{2}, size_t{5}}) {
      INFO("precision " << MatmulPrecisionName(prec) << " M " << M << " on "
                        << dispatch::ActiveTarget());
      Epilogue ep;
      ep.bias = bias.data();
      ep.lora = &m.lora;
      std::vector<float> want(M * N), got(M * N, -1.0f);
      PreparedInput scratch;
      const Status s = M == 1 ? dispatch::Gemv(fc->weights(), x.data(), &m.lora, prec, want.data(),
                                               nullptr, &scratch)
                              : dispatch::Gemm(fc->weights(), x.data(), M, &m.lora, prec,
                                               want.data(), nullptr, &scratch);
      REQUIRE(s.ok());
      // dispatch::Gemv/Gemm have no bias argument: add it as the epilogue does
      // (y = (Wx + bias) + lora), so compare with the bias-free Linear too.
      REQUIRE(fc->Prepare(x.data(), M, Epilogue{nullptr, nullptr, 0, &m.lora}).ok());
      for (size_t tasks : {size_t{1}, size_t{2}, size_t{7}}) {
        std::fill(got.begin(), got.end(), -1.0f);
        REQUIRE(fc->RunParallel(got.data(), tasks, [&](size_t n, const auto& fn) {
                    pool.ParallelFor(n, fn);
                  }).ok());
        CHECK(got == want);
      }
      // Ranges need not be aligned; one call per range on this thread.
      std::fill(got.begin(), got.end(), -1.0f);
      for (size_t r0 = 0; r0 < N; r0 += 13) {
        REQUIRE(fc->Run(r0, std::min(N, r0 + 13), got.data(), 1).ok());
      }
      CHECK(got == want);
      // With the bias: only the bias term differs.
      REQUIRE(fc->Prepare(x.data(), M, ep).ok());
      REQUIRE(fc->RunParallel(got.data(), &pool).ok());
      size_t far = 0;
      for (size_t i = 0; i < M * N; ++i) {
        const float d = got[i] - want[i] - bias[i % N];
        if (d > 1e-4f || d < -1e-4f) ++far;
      }
      CHECK(far == 0);
    }
  }
}

TEST_CASE("linear: equals dispatch Gemv/Gemm for any split and M") {
  test::ForEachTarget(CheckLinearMatchesFreeFunctions);
}

// dispatch::GemmGroup (q/k/v in one parallel region) equals one
// dispatch::Gemv/Gemm per matrix, bit for bit: mixed widths and row counts
// that split unevenly, two jobs of one width (the second copies the first's
// quantized input, PrepareGemmInputFrom, and adds its own LoRA), LoRA on
// some jobs only, M on GEMV, the few-token, the small-M and the panel path,
// no pool and pools of 2 and 3 threads.
void CheckGroupMatchesSeparateCalls() {
  const size_t K = 200;
  Matrix q = MakeMatrix(61, K, 4, 2, 21), k = MakeMatrix(18, K, 2, 0, 22),
         v = MakeMatrix(18, K, 3, 0, 23), u = MakeMatrix(35, K, 2, 3, 25);
  StatusOr<PreparedPalette> pq = PreparedPalette::Make(q.palette.view());
  StatusOr<PreparedPalette> pk = PreparedPalette::Make(k.palette.view());
  StatusOr<PreparedPalette> pv = PreparedPalette::Make(v.palette.view());
  StatusOr<PreparedPalette> pu = PreparedPalette::Make(u.palette.view());
  REQUIRE((pq.ok() && pk.ok() && pv.ok() && pu.ok()));
  constexpr size_t kJobs = 4;
  const PreparedPalette* w[kJobs] = {&*pq, &*pk, &*pv, &*pu};
  const LoraDelta* lora[kJobs] = {&q.lora, nullptr, nullptr, &u.lora};
  test::Rng rng(31);
  const std::vector<float> x = rng.GaussianVector((kGemmSmallM + 8) * K);
  ThreadPool pool2(2), pool3(3);
  for (MatmulPrecision prec : {MatmulPrecision::kInt8, MatmulPrecision::kF32}) {
    for (size_t M : {size_t{1}, size_t{3}, size_t{12}, size_t{40}, kGemmSmallM + 8}) {
      std::vector<float> want[kJobs], got[kJobs];
      for (size_t j = 0; j < kJobs; ++j) {
        const size_t N = w[j]->shape().rows;
        want[j].assign(M * N, 0.0f);
        PreparedInput in;
        REQUIRE((M == 1 ? dispatch::Gemv(*w[j], x.data(), lora[j], prec, want[j].data(), nullptr,
                                         &in)
                        : dispatch::Gemm(*w[j], x.data(), M, lora[j], prec, want[j].data(),
                                         nullptr, &in))
                    .ok());
      }
      for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &pool2, &pool3}) {
        INFO("precision " << MatmulPrecisionName(prec) << " M " << M << " threads "
                          << (pool ? pool->NumThreads() : 1) << " on "
                          << dispatch::ActiveTarget());
        PreparedInput in[kJobs];
        std::vector<GemmScratch> scratch(3);
        dispatch::GroupJob jobs[kJobs];
        for (size_t j = 0; j < kJobs; ++j) {
          got[j].assign(want[j].size(), -1.0f);
          jobs[j] = dispatch::GroupJob{w[j], lora[j], got[j].data(), &in[j]};
        }
        REQUIRE(dispatch::GemmGroup(jobs, kJobs, x.data(), M, prec, pool, scratch.data()).ok());
        for (size_t j = 0; j < kJobs; ++j) CHECK(got[j] == want[j]);
      }
    }
  }
  // A job whose columns differ from the first is refused, naming both.
  Matrix wide = MakeMatrix(8, K + 1, 4, 0, 24);
  StatusOr<PreparedPalette> pw = PreparedPalette::Make(wide.palette.view());
  REQUIRE(pw.ok());
  std::vector<float> y(64);
  PreparedInput in[2];
  const dispatch::GroupJob bad[2] = {{w[1], nullptr, y.data(), &in[0]},
                                     {&*pw, nullptr, y.data(), &in[1]}};
  const Status s = dispatch::GemmGroup(bad, 2, x.data(), 1, MatmulPrecision::kInt8, &pool2,
                                       nullptr);
  CHECK(!s.ok());
  CHECK(s.message().find("201 columns") != std::string::npos);
}

TEST_CASE("linear: dispatch GemmGroup equals one call per matrix") {
  test::ForEachTarget(CheckGroupMatchesSeparateCalls);
}

TEST_CASE("linear: RangeAlignment is 4 for GEMV and one panel for GEMM") {
  const Matrix m = MakeMatrix(40, 64, 2, 1, 3);
  LinearOptions opt;
  opt.max_tokens = 3;
  StatusOr<Linear> fc = Linear::Make(m.palette.view(), opt);
  REQUIRE(fc.ok());
  std::vector<float> x(3 * 64, 1.0f);
  REQUIRE(fc->Prepare(x.data(), 1, Epilogue()).ok());
  CHECK(fc->RangeAlignment() == 4);
  REQUIRE(fc->Prepare(x.data(), 3, Epilogue()).ok());
  CHECK(fc->RangeAlignment() == dispatch::GemmRangeAlignment());
  CHECK(fc->RangeAlignment() % 4 == 0);
}

TEST_CASE("linear: errors are Status, not crashes") {
  const Matrix m = MakeMatrix(20, 48, 3, 2, 5);
  LinearOptions opt;
  opt.max_tokens = 2;
  opt.max_threads = 2;
  CHECK(!Linear::Make(m.palette.view(), LinearOptions{MatmulPrecision::kInt8, 0, 1, 0}).ok());
  CHECK(!Linear::Make(PaletteView(), opt).ok());
  StatusOr<Linear> fc = Linear::Make(m.palette.view(), opt);
  REQUIRE(fc.ok());
  std::vector<float> x(3 * 48, 1.0f), y(3 * 20);
  CHECK(!fc->Run(0, 20, y.data()).ok());  // before Prepare
  CHECK(fc->Prepare(x.data(), 3, Epilogue()).code() == StatusCode::kInvalidArgument);
  Epilogue ep;
  ep.lora = &m.lora;  // rank 2 > max_lora_rank 0
  CHECK(!fc->Prepare(x.data(), 1, ep).ok());
  REQUIRE(fc->Prepare(x.data(), 2, Epilogue()).ok());
  CHECK(!fc->Run(0, 20, y.data(), 2).ok());   // thread >= max_threads
  CHECK(!fc->Run(5, 21, y.data(), 0).ok());   // past N
  CHECK(fc->Run(0, 20, y.data(), 1).ok());
  Linear empty;
  CHECK(!empty.Prepare(x.data(), 1, Epilogue()).ok());
  CHECK(!empty.RunParallel(y.data(), nullptr).ok());
}

void CheckNoAllocation() {
  const size_t N = 96, K = 520, rank = 4;
  const Matrix m = MakeMatrix(N, K, 4, rank, 9);
  test::Rng rng(13);
  const std::vector<float> x = rng.GaussianVector(8 * K), bias = rng.GaussianVector(N);
  std::vector<float> y(8 * N);
  ThreadPool pool(2);
  for (MatmulPrecision prec : {MatmulPrecision::kInt8, MatmulPrecision::kF32}) {
    LinearOptions opt;
    opt.precision = prec;
    opt.max_tokens = 8;
    opt.max_threads = 2;
    opt.max_lora_rank = rank;
    StatusOr<Linear> made = Linear::Make(m.palette.view(), opt);
    REQUIRE(made.ok());
    Linear& fc = *made;
    Epilogue ep;
    ep.bias = bias.data();
    ep.lora = &m.lora;
    bool all_ok = true;
    const size_t before = g_allocations.load();
    for (int rep = 0; rep < 3; ++rep) {
      for (size_t M : {size_t{1}, size_t{8}, size_t{3}}) {
        all_ok &= fc.Prepare(x.data(), M, rep == 1 ? Epilogue() : ep).ok();
        all_ok &= fc.RunParallel(y.data(), &pool).ok();
        all_ok &= fc.Run(0, N, y.data(), 1).ok();
      }
    }
    const size_t allocations = g_allocations.load() - before;
    INFO("precision " << MatmulPrecisionName(prec) << " counting malloc "
                      << LUTRA_TEST_COUNT_MALLOC);
    CHECK(all_ok);
    CHECK(allocations == 0);
  }
}

TEST_CASE("linear: no heap allocation per Prepare or Run") {
  test::ForEachTarget(CheckNoAllocation);
  // The counter counts: a vector allocates.
  const size_t before = g_allocations.load();
  std::vector<float> v(10);
  CHECK(g_allocations.load() > before);
}

// Not a check: prints the GEMM-vs-GEMV contract figures of docs/design.md.
//   build/tests/linear_test "[.contract]"
TEST_CASE("linear: GEMM of M tokens vs M GEMVs (figures)", "[.contract]") {
  const size_t N = 512, K = 1024;
  for (int bits : {2, 4}) {
    const Matrix m = MakeMatrix(N, K, bits, 1, 21);
    StatusOr<PreparedPalette> pw = PreparedPalette::Make(m.palette.view());
    REQUIRE(pw.ok());
    for (MatmulPrecision prec : {MatmulPrecision::kInt8, MatmulPrecision::kF32}) {
      for (size_t M : {size_t{2}, size_t{8}, size_t{64}}) {
        test::Rng rng(M);
        const std::vector<float> x = rng.GaussianVector(M * K);
        std::vector<float> gemv(M * N), gemm(M * N);
        PreparedInput in;
        for (size_t t = 0; t < M; ++t) {
          REQUIRE(dispatch::Gemv(*pw, x.data() + t * K, nullptr, prec, gemv.data() + t * N,
                                 nullptr, &in).ok());
        }
        REQUIRE(dispatch::Gemm(*pw, x.data(), M, nullptr, prec, gemm.data(), nullptr, &in).ok());
        double max_diff = 0.0, max_y = 0.0;
        size_t same = 0;
        for (size_t i = 0; i < M * N; ++i) {
          max_diff = std::max(max_diff, double(std::fabs(gemv[i] - gemm[i])));
          max_y = std::max(max_y, double(std::fabs(gemv[i])));
          same += gemv[i] == gemm[i];
        }
        std::printf("%s %d-bit %s M=%zu: max|GEMM - GEMV| = %.3g = %.2g * max|y|, "
                    "%zu of %zu outputs bit-identical\n",
                    dispatch::ActiveTarget(), bits, MatmulPrecisionName(prec), M, max_diff,
                    max_diff / max_y, same, M * N);
      }
    }
  }
}

}  // namespace
}  // namespace lutra
