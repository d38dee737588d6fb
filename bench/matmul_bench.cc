// Palettized GEMV / GEMM throughput against this machine's own measured
// limits, all in one run (so the ratios are measured under the same load):
// - read bandwidth: a STREAM-like sum over a >= 1 GiB buffer, 1 and 2 threads;
// - f32 FMA, bf16 dot and int8 dot peaks of one core (register-resident);
// - GEMV at 4096x4096 and 14336x4096 for bits 2/3/4/6/8, 1 and 2 threads,
//   cache-cold (each call uses the next of enough matrices to cover
//   >= 256 MiB, so weights come from DRAM): us per call, GB/s of packed bytes
//   and the ratio to the measured bandwidth;
// - 2-bit against 4-bit GEMV weights per second, with the calls of the two
//   widths interleaved so that both see the same bandwidth;
// - GEMM at M = 16, 64, 512: GFLOP/s, ratio to the f32 FMA peak, and the
//   speedup over M GEMV calls;
// - GEMV with a fused rank-16 LoRA delta: overhead over plain GEMV;
// - rows per codebook G = 1 and 4 against G = 16 at 4096x4096: GEMV (bits 2
//   and 4, cache-cold) and GEMM (M = 16, 64), the three G's calls interleaved;
// - small-M GEMM (M = 1, 2, 4, 8, 16, 32) against one GEMV, interleaved,
//   cache-cold, 1 and 2 threads (issue 15).
// Every figure is the median of repetitions. Usage:
//   matmul_bench [--quick] [--gemv-only] [--groups-only] [--small-m-only]
//                [--kernels-only] [--prefill-only] [--rows=4096|14336]
//   (--quick: fewer repetitions and smaller buffers, a smoke test only;
//   --groups-only: just the rows-per-codebook section, no bandwidth runs;
//   --small-m-only: just the small-M sections, int8 and f32 paths;
//   --kernels-only: the few-token against the panel kernel up to kGemmSmallM;
//   --prefill-only: GEMM at M = 64, 128, 512, 1 and 2 threads, against the
//   int8 dot peak)
// Dispatches dynamically to the best target of this CPU.
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "bench/matmul_bench.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "bench/bench_util.h"
#include "hwy/highway.h"
#include "hwy/targets.h"
#include "lutra/base/thread_pool.h"
#include "lutra/format/palette.h"
#include "lutra/kernels/gemm-inl.h"
#include "lutra/kernels/gemv-inl.h"
#include "lutra/kernels/matmul.h"

#ifndef LUTRA_MATMUL_BENCH_SHARED_
#define LUTRA_MATMUL_BENCH_SHARED_
namespace lutra {
namespace bench {

// One set of matrices covering >= min_bytes of packed weights, all views over
// one shared random buffer (any byte is a valid index for every width when K
// is a multiple of the block width, as here).
struct MatrixSet {
  std::vector<PreparedPalette> mats;
  std::vector<std::vector<uint16_t>> codebooks;
  size_t bytes_per_matrix = 0;
};

}  // namespace bench
}  // namespace lutra
#endif  // LUTRA_MATMUL_BENCH_SHARED_

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Sum of the u64 words of [p, p + n) (n multiple of 4096), read as
// `streams` equal segments in lockstep, each software-prefetched `prefetch`
// bytes ahead (0 = hardware prefetch only): the read stream that GEMV cannot
// beat. Several streams and software prefetch matter on machines where one
// plain sequential stream does not saturate DRAM (GEMV itself reads 4 runs of
// rows at once and prefetches the next row), so the bench reports the best
// of these variants as "the" bandwidth.
uint64_t SumWords(const uint8_t* HWY_RESTRICT p, size_t n, size_t streams, size_t prefetch) {
  const hn::ScalableTag<uint64_t> d;
  const size_t N = hn::Lanes(d);
  const uint64_t* w = reinterpret_cast<const uint64_t*>(p);
  const size_t words = n / 8;
  const size_t seg = words / streams / (2 * N) * (2 * N);
  const size_t step_bytes = 2 * N * 8;
  auto s0 = hn::Zero(d), s1 = hn::Zero(d);
  for (size_t i = 0; i < seg; i += 2 * N) {
    for (size_t k = 0; k < streams; ++k) {
      const uint64_t* q = w + k * seg + i;
      if (prefetch != 0 && i * 8 + prefetch < seg * 8) {
        for (size_t b = 0; b < step_bytes; b += 64) {
          hwy::Prefetch(reinterpret_cast<const uint8_t*>(q) + prefetch + b);
        }
      }
      s0 = hn::Add(s0, hn::LoadU(d, q));
      s1 = hn::Add(s1, hn::LoadU(d, q + N));
    }
  }
  return hn::ReduceSum(d, hn::Add(s0, s1));
}

// Register-resident peak loops: kAcc independent chains of `iters` ops.
// Returns the number of operations (FLOP or int8 ops) performed; `sink`
// keeps the results alive.
double F32FmaLoop(size_t iters, float* sink) {
  const hn::ScalableTag<float> df;
  constexpr size_t kAcc = 12;
  hn::Vec<decltype(df)> acc[kAcc];
  for (size_t i = 0; i < kAcc; ++i) acc[i] = hn::Set(df, sink[i]);
  const auto a = hn::Set(df, sink[20]), b = hn::Set(df, sink[21]);
  for (size_t it = 0; it < iters; ++it) {
    for (size_t i = 0; i < kAcc; ++i) acc[i] = hn::MulAdd(a, acc[i], b);
  }
  for (size_t i = 1; i < kAcc; ++i) acc[0] = hn::Add(acc[0], acc[i]);
  sink[0] = hn::ReduceSum(df, acc[0]);
  return 2.0 * double(kAcc) * double(iters) * double(hn::Lanes(df));
}

double Bf16DotLoop(size_t iters, float* sink) {
  const hn::ScalableTag<float> df;
  const hn::Repartition<hwy::bfloat16_t, decltype(df)> dbf;
  constexpr size_t kAcc = 12;
  hn::Vec<decltype(df)> acc[kAcc], acc2[kAcc];
  for (size_t i = 0; i < kAcc; ++i) {
    acc[i] = hn::Set(df, sink[i]);
    acc2[i] = hn::Zero(df);
  }
  const auto a = hn::Set(dbf, hwy::BF16FromF32(sink[20]));
  const auto b = hn::Set(dbf, hwy::BF16FromF32(sink[21]));
  for (size_t it = 0; it < iters; ++it) {
    for (size_t i = 0; i < kAcc; ++i) acc[i] = hn::ReorderWidenMulAccumulate(df, a, b, acc[i], acc2[i]);
  }
  for (size_t i = 1; i < kAcc; ++i) acc[0] = hn::Add(acc[0], hn::Add(acc[i], acc2[i]));
  sink[0] = hn::ReduceSum(df, hn::Add(acc[0], acc2[0]));
  return 2.0 * 2.0 * double(kAcc) * double(iters) * double(hn::Lanes(df));
}

double I8DotLoop(size_t iters, float* sink) {
  const hn::ScalableTag<int32_t> di;
  const hn::Repartition<uint8_t, decltype(di)> du8;
  const hn::Repartition<int8_t, decltype(di)> di8;
  constexpr size_t kAcc = 12;
  hn::Vec<decltype(di)> acc[kAcc];
  for (size_t i = 0; i < kAcc; ++i) acc[i] = hn::Set(di, static_cast<int32_t>(sink[i]));
  // The kernels' product of u8 codes and i8 activations (CodeDot), with the
  // codes' magnitude shared as in the kernels. b changes every iteration so
  // that the compiler cannot hoist the multiplies out of the loop (one add
  // per kAcc products).
  const auto a = hn::Set(du8, static_cast<uint8_t>(sink[20] + 3));
  const auto mag = CodeMagnitude(a);
  auto b = hn::Set(di8, static_cast<int8_t>(sink[21] + 5));
  const auto one = hn::Set(di8, int8_t{1});
  for (size_t it = 0; it < iters; ++it) {
    for (size_t i = 0; i < kAcc; ++i) acc[i] = CodeDot(di, a, mag, b, acc[i]);
    b = hn::Xor(b, one);
  }
  for (size_t i = 1; i < kAcc; ++i) acc[0] = hn::Add(acc[0], acc[i]);
  sink[0] = static_cast<float>(hn::ReduceSum(di, acc[0]));
  return 2.0 * 4.0 * double(kAcc) * double(iters) * double(hn::Lanes(di));
}

Status RunGemv(const PreparedPalette& w, const float* x, const Epilogue& ep, float* y,
               ThreadPool* pool, int precision, PreparedInput* scratch) {
  MatmulOptions opt;
  opt.precision = static_cast<MatmulPrecision>(precision);
  return Gemv(w, x, w.shape().cols, ep, y, w.shape().rows, pool, opt, scratch);
}

Status RunGemm(const PreparedPalette& w, const float* X, size_t M, float* Y, ThreadPool* pool,
               int precision, PreparedInput* scratch) {
  MatmulOptions opt;
  opt.precision = static_cast<MatmulPrecision>(precision);
  return Gemm(w, X, M, w.shape().cols, Epilogue(), Y, w.shape().rows, pool, opt, scratch);
}

// Seconds for Y = X W^T (M <= kGemmSmallM int8 tokens, 4-bit weights)
// through the few-token kernel (few) or the panel kernel: the two kernels
// between which GemmRows chooses by M (kGemmSmallM). Preparing X is not
// timed.
double TimeGemmKernel(const PreparedPalette& w, const float* X, size_t M, bool few, float* Y,
                      PreparedInput* in, GemmScratch* scratch) {
  bench::Check(PrepareGemmInput(w, X, M, w.shape().cols, Epilogue(), MatmulOptions(), in));
  const size_t N = w.shape().rows;
  const double t0 = bench::Now();
  if (few) {
    detail::FewTokensRowsI8<4>(w, *in, 0, N, Y, N);
  } else {
    detail::GemmRowsImpl<4>(w, *in, 0, N, Y, N, scratch);
  }
  return bench::Now() - t0;
}

}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lutra {
namespace bench {

HWY_EXPORT(SumWords);
HWY_EXPORT(F32FmaLoop);
HWY_EXPORT(Bf16DotLoop);
HWY_EXPORT(I8DotLoop);
HWY_EXPORT(RunGemv);
HWY_EXPORT(RunGemm);
HWY_EXPORT(TimeGemmKernel);

// Seconds to sum one chunk of `chunk` bytes at `offset` of buf with
// `threads` threads (each sums its own half).
double TimeChunk(const std::vector<uint8_t>& buf, size_t offset, size_t chunk, ThreadPool& pool,
                 size_t threads, size_t streams, size_t prefetch) {
  static std::vector<uint64_t> sums(8);
  const double t0 = Now();
  pool.ParallelFor(threads, [&](size_t task, size_t) {
    const RowRange rr = SplitRows(chunk, threads, task, 4096);
    sums[task] += HWY_DYNAMIC_DISPATCH(SumWords)(buf.data() + offset + rr.begin, rr.size(),
                                                 streams, prefetch);
  });
  return Now() - t0;
}

// Median read bandwidth in bytes/s over `passes` passes through all of buf,
// timed per chunk of `chunk` bytes. The machine is shared: a long timed
// interval almost always includes time descheduled, so the bandwidth (like
// each GEMV call) is timed in pieces of the size of one weight matrix and
// the median is reported.
double ReadBandwidth(const std::vector<uint8_t>& buf, ThreadPool& pool, size_t threads,
                     int passes, size_t streams, size_t prefetch,
                     size_t chunk = size_t{8} << 20) {
  std::vector<double> rates;
  for (int pass = 0; pass < passes; ++pass) {
    for (size_t off = 0; off + chunk <= buf.size(); off += chunk) {
      rates.push_back(double(chunk) / TimeChunk(buf, off, chunk, pool, threads, streams, prefetch));
    }
  }
  return Median(rates);
}

template <class Fn>
double PeakOps(Fn fn) {
  std::vector<float> sink(32, 1.0f);
  fn(1000, sink.data());  // warm up
  std::vector<double> rates;
  for (int rep = 0; rep < 5; ++rep) {
    const size_t iters = 4000000;
    const double t0 = Now();
    const double ops = fn(iters, sink.data());
    rates.push_back(ops / (Now() - t0));
  }
  return Median(rates);
}

MatrixSet MakeSet(const std::vector<uint8_t>& random, size_t N, size_t K, int bits,
                  size_t min_bytes, size_t group_rows = 16) {
  MatrixSet set;
  PaletteShape shape;
  shape.rows = N;
  shape.cols = K;
  shape.bits = bits;
  shape.group_rows = group_rows;
  shape.codebook = ElementType::kF16;
  const size_t ib = shape.index_bytes();
  set.bytes_per_matrix = shape.total_bytes();
  const size_t count = std::max<size_t>(2, (min_bytes + ib - 1) / ib);
  std::mt19937 rng(bits);
  for (size_t i = 0; i < count; ++i) {
    const size_t offset = (i * ib) % (random.size() - ib + 1);
    std::vector<uint16_t> cb(shape.num_groups() * shape.num_entries());
    for (uint16_t& e : cb) {
      const float v = std::normal_distribution<float>(0.0f, 0.05f)(rng);
      e = hwy::BitCastScalar<uint16_t>(hwy::F16FromF32(v));
    }
    set.codebooks.push_back(std::move(cb));
    StatusOr<PaletteView> v = PaletteView::Make(shape, random.data() + offset, ib,
                                                set.codebooks.back().data(),
                                                shape.codebook_bytes());
    Check(v.status());
    StatusOr<PreparedPalette> p = PreparedPalette::Make(v.value());
    Check(p.status());
    set.mats.push_back(std::move(p.value()));
  }
  return set;
}

// Seconds for one GEMV call y = W x (+ ep).
double TimeGemvCall(const PreparedPalette& w, const std::vector<float>& x, const Epilogue& ep,
                    std::vector<float>& y, ThreadPool* pool, int precision,
                    PreparedInput* scratch) {
  const double t0 = Now();
  Check(HWY_DYNAMIC_DISPATCH(RunGemv)(w, x.data(), ep, y.data(), pool, precision, scratch));
  return Now() - t0;
}

// Median seconds per GEMV call, rotating through the set.
double TimeGemv(const MatrixSet& set, ThreadPool* pool, const Epilogue& ep, int precision,
                int passes) {
  const PaletteShape& s = set.mats[0].shape();
  std::vector<float> x(s.cols), y(s.rows);
  std::mt19937 rng(1);
  for (float& f : x) f = std::normal_distribution<float>()(rng);
  PreparedInput scratch;
  std::vector<double> times;
  for (int pass = 0; pass < passes; ++pass) {
    for (const PreparedPalette& w : set.mats) {
      times.push_back(TimeGemvCall(w, x, ep, y, pool, precision, &scratch));
    }
  }
  return Median(times);
}

// Seconds for one GEMM call Y = X W^T (X: M x K).
double TimeGemmCall(const PreparedPalette& w, const std::vector<float>& X, size_t M,
                    std::vector<float>& Y, ThreadPool* pool, PreparedInput* scratch,
                    int precision = 0) {
  const double t0 = Now();
  Check(HWY_DYNAMIC_DISPATCH(RunGemm)(w, X.data(), M, Y.data(), pool, precision, scratch));
  return Now() - t0;
}

// M x K activations of the GEMM rows (the same for every caller).
std::vector<float> GemmInput(size_t M, size_t K) {
  std::vector<float> X(M * K);
  std::mt19937 rng(2);
  for (float& f : X) f = std::normal_distribution<float>()(rng);
  return X;
}

double TimeGemm(const MatrixSet& set, size_t M, ThreadPool* pool, int reps) {
  const PaletteShape& s = set.mats[0].shape();
  const std::vector<float> X = GemmInput(M, s.cols);
  std::vector<float> Y(M * s.rows);
  PreparedInput scratch;
  std::vector<double> times;
  for (int rep = 0; rep < reps; ++rep) {
    times.push_back(TimeGemmCall(set.mats[rep % set.mats.size()], X, M, Y, pool, &scratch));
  }
  return Median(times);
}

// Median seconds per call of each of `variants` call sequences, measured
// interleaved so that load changes of this shared machine hit all of them
// alike: each of `rounds` rounds makes `calls` steps, and each step times one
// call of every variant back to back, the first variant rotating by round.
// time(v, c) times call c (0, 1, ... over all rounds) of variant v.
template <class Fn>
std::vector<double> InterleavedMedians(size_t variants, size_t calls, int rounds,
                                       const Fn& time) {
  std::vector<std::vector<double>> times(variants);
  for (int round = 0; round < rounds; ++round) {
    for (size_t i = 0; i < calls; ++i) {
      for (size_t k = 0; k < variants; ++k) {
        const size_t v = (k + size_t(round)) % variants;
        times[v].push_back(time(v, size_t(round) * calls + i));
      }
    }
  }
  std::vector<double> medians;
  for (const std::vector<double>& t : times) medians.push_back(Median(t));
  return medians;
}

// 2-bit against 4-bit: the memory bandwidth of this (shared) machine moves
// by 20 % between the GEMV table's rows, so the weights-per-second ratio is
// measured with the two widths' calls interleaved in the same rounds. The
// 4-bit set reads its own random bytes, so no call finds the other set's
// bytes in cache. Runs last: it leaves the page state of the machine changed
// (on this VM a later single-stream measurement ran 2x slower after it).
void CompareTwoAndFourBits(const std::vector<uint8_t>& random, size_t set_bytes, int passes,
                           size_t only_rows, ThreadPool& pool2) {
  const size_t kMiB = size_t{1} << 20;
  printf("\n## 2-bit vs 4-bit GEMV, calls interleaved (cache-cold, int8 path)\n\n");
  printf("Each round alternates one 2-bit and one 4-bit call (order swapped every round),\n"
         "%d rounds over >= %zu MiB per width; medians.\n\n", passes, set_bytes / kMiB);
  printf("| N x K | threads | 2-bit us/call | 4-bit us/call | 2-bit Gweights/s | "
         "4-bit Gweights/s | 2-bit / 4-bit weights/s |\n");
  printf("|---|---|---|---|---|---|---|\n");
  {
    const std::vector<uint8_t> random_b = RandomBytes(random.size(), 13);
    for (size_t N : {size_t{4096}, size_t{14336}}) {
      if (only_rows != 0 && N != only_rows) continue;
      const MatrixSet set2 = MakeSet(random, N, 4096, 2, set_bytes);
      const MatrixSet set4 = MakeSet(random_b, N, 4096, 4, set_bytes);
      std::vector<float> x(4096), y(N);
      for (size_t c = 0; c < x.size(); ++c) x[c] = float(c % 7) - 3.0f;
      PreparedInput scratch;
      for (size_t threads : {size_t{1}, size_t{2}}) {
        ThreadPool* pool = threads == 1 ? nullptr : &pool2;
        const MatrixSet* sets[2] = {&set2, &set4};
        const size_t calls = std::max(set2.mats.size(), set4.mats.size());
        const std::vector<double> t =
            InterleavedMedians(2, calls, passes, [&](size_t v, size_t c) {
              const std::vector<PreparedPalette>& mats = sets[v]->mats;
              return TimeGemvCall(mats[c % mats.size()], x, Epilogue(), y, pool, 0, &scratch);
            });
        const double t2 = t[0], t4 = t[1];
        const double weights = double(N) * 4096;
        printf("| %zux4096 | %zu | %.1f | %.1f | %.2f | %.2f | **%.2fx** |\n", N, threads,
               t2 * 1e6, t4 * 1e6, weights / t2 / 1e9, weights / t4 / 1e9, t4 / t2);
        fflush(stdout);
      }
    }
  }
}

// Rows per codebook (issue 14): G = 1 and 4 against G = 16 at 4096x4096,
// 1 thread, int8 path. GEMV (bits 2, 4) is cache-cold like the GEMV table;
// GEMM (4-bit, M = 16, 64) rotates over the same matrices. The three G's
// calls are interleaved (InterleavedMedians). All sets of one width view the
// same random bytes, so G's call c uses matrix (c + v n / 3) mod n of its
// set: no call finds the weights of the one before it in cache.
void CompareGroupSizes(const std::vector<uint8_t>& random, size_t set_bytes, int passes,
                       bool quick) {
  const size_t kMiB = size_t{1} << 20;
  const size_t kG[] = {1, 4, 16};
  constexpr size_t kNumG = 3;
  const size_t N = 4096, K = 4096;
  const int gemm_calls = quick ? 5 : 30;
  printf("\n## Rows per codebook G, 4096x4096, int8 path, 1 thread, calls interleaved\n\n");
  printf("GEMV: cache-cold, %d rounds over >= %zu MiB per G; GEMM: %d calls per G;\n"
         "every step times one call of each G (first G rotating by round); medians.\n\n",
         passes, set_bytes / kMiB, gemm_calls);
  printf("| call | bits | G=1 us/call | G=4 us/call | G=16 us/call | G=1 / G=16 | "
         "G=4 / G=16 |\n");
  printf("|---|---|---|---|---|---|---|\n");
  for (int bits : {2, 4}) {
    std::vector<MatrixSet> sets;
    for (size_t G : kG) sets.push_back(MakeSet(random, N, K, bits, set_bytes, G));
    const size_t n = sets[0].mats.size();
    const auto matrix = [&](size_t v, size_t c) -> const PreparedPalette& {
      return sets[v].mats[(c + v * n / kNumG) % n];
    };
    const auto report = [&](const std::string& call, const std::vector<double>& t) {
      printf("| %s | %d | %.1f | %.1f | %.1f | **%.3f** | %.3f |\n", call.c_str(), bits,
             t[0] * 1e6, t[1] * 1e6, t[2] * 1e6, t[0] / t[2], t[1] / t[2]);
      fflush(stdout);
    };
    PreparedInput scratch[kNumG];
    std::vector<float> x(K), y(N);
    for (size_t c = 0; c < K; ++c) x[c] = float(c % 7) - 3.0f;
    report("GEMV", InterleavedMedians(kNumG, n, passes, [&](size_t v, size_t c) {
             return TimeGemvCall(matrix(v, c), x, Epilogue(), y, nullptr, 0, &scratch[v]);
           }));
    if (bits != 4) continue;
    for (size_t M : {size_t{16}, size_t{64}}) {
      const std::vector<float> X = GemmInput(M, K);
      std::vector<float> Y(M * N);
      report("GEMM M=" + std::to_string(M),
             InterleavedMedians(kNumG, 1, gemm_calls, [&](size_t v, size_t c) {
               return TimeGemmCall(matrix(v, c), X, M, Y, nullptr, &scratch[v]);
             }));
    }
  }
}

// Seconds of CPU time used by this process (all threads).
double CpuNow() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// Small-M GEMM (issue 15: speculative verification) against one GEMV, at
// 4096x4096 4-bit, cache-cold, 1 and 2 threads. Per row of the table, the
// GEMV and every M's GEMM calls are interleaved (InterleavedMedians), each
// on its own cold matrix, so the ratios compare calls under the same load.
void CompareSmallM(const std::vector<uint8_t>& random, size_t set_bytes, int passes,
                   ThreadPool& pool2, int precision) {
  const size_t kMiB = size_t{1} << 20;
  const size_t N = 4096, K = 4096;
  const size_t kM[] = {1, 2, 4, 8, 16, 32};
  constexpr size_t kNumM = 6;
  const MatrixSet set = MakeSet(random, N, K, 4, set_bytes);
  const size_t n = set.mats.size();
  printf("\n## Small-M GEMM vs one GEMV, 4096x4096 4-bit, %s path, cache-cold\n\n",
         MatmulPrecisionName(static_cast<MatmulPrecision>(precision)));
  printf("M = 1 is Gemv; M >= 2 is Gemm. Every step times one call of each M back to back\n"
         "(first M rotating by round), each on its own matrix of >= %zu MiB; %d rounds;\n"
         "medians. GFLOP/s = 2 M N K / time.\n\n", set_bytes / kMiB, passes);
  printf("Wall time overstates calls that outlast a scheduler time slice when the machine\n"
         "is loaded, so each call's process CPU time / threads is reported too.\n\n");
  printf("| M | threads | us/call | x one GEMV | GFLOP/s | CPU us/call | CPU x one GEMV |\n"
         "|---|---|---|---|---|---|---|\n");
  std::vector<std::vector<float>> X;
  for (size_t M : kM) X.push_back(GemmInput(M, K));
  std::vector<float> Y(kM[kNumM - 1] * N);
  PreparedInput scratch[kNumM];
  for (size_t threads : {size_t{1}, size_t{2}}) {
    ThreadPool* pool = threads == 1 ? nullptr : &pool2;
    std::vector<std::vector<double>> cpu(kNumM);
    const std::vector<double> t = InterleavedMedians(kNumM, n, passes, [&](size_t v, size_t c) {
      const PreparedPalette& w = set.mats[(c + v * n / kNumM) % n];
      const double c0 = CpuNow();
      const double wall = kM[v] == 1
                              ? TimeGemvCall(w, X[v], Epilogue(), Y, pool, precision, &scratch[v])
                              : TimeGemmCall(w, X[v], kM[v], Y, pool, &scratch[v], precision);
      cpu[v].push_back((CpuNow() - c0) / double(threads));
      return wall;
    });
    const double cpu1 = Median(cpu[0]);
    for (size_t v = 0; v < kNumM; ++v) {
      const double tc = Median(cpu[v]);
      printf("| %zu | %zu | %.1f | **%.2fx** | %.1f | %.1f | **%.2fx** |\n", kM[v], threads,
             t[v] * 1e6, t[v] / t[0], 2.0 * double(kM[v]) * N * K / t[v] / 1e9, tc * 1e6,
             tc / cpu1);
    }
    fflush(stdout);
  }
}

// The few-token kernel against the panel kernel at M up to kGemmSmallM (the
// choice kGemmSmallM makes), 4096 rows x K = 3072, 4096, 8192, 4-bit,
// cache-cold, 1 thread: per row of the table the two kernels' calls
// alternate (InterleavedMedians), each on its own cold matrix.
void CompareGemmKernels(const std::vector<uint8_t>& random, size_t set_bytes, int passes) {
  printf("\n## Few-token vs panel kernel, 4096 rows, 4-bit, int8, cache-cold, 1 thread\n\n");
  printf("| K | M | few-token us | panel us | few-token GOP/s | panel GOP/s | panel / few-token |\n"
         "|---|---|---|---|---|---|---|\n");
  const size_t N = 4096;
  for (size_t K : {size_t{3072}, size_t{4096}, size_t{8192}}) {
    const MatrixSet set = MakeSet(random, N, K, 4, set_bytes);
    const size_t n = set.mats.size();
    for (size_t M : {size_t{16}, size_t{32}, kGemmSmallM}) {
      const std::vector<float> X = GemmInput(M, K);
      std::vector<float> Y(M * N);
      PreparedInput in[2];
      GemmScratch scratch;
      const std::vector<double> t = InterleavedMedians(2, n, passes, [&](size_t v, size_t c) {
        return HWY_DYNAMIC_DISPATCH(TimeGemmKernel)(set.mats[(c + v * n / 2) % n], X.data(), M,
                                                    v == 0, Y.data(), &in[v], &scratch);
      });
      const double ops = 2.0 * double(M) * N * K;
      printf("| %zu | %zu | %.0f | %.0f | %.0f | %.0f | **%.2fx** |\n", K, M, t[0] * 1e6,
             t[1] * 1e6, ops / t[0] / 1e9, ops / t[1] / 1e9, t[1] / t[0]);
      fflush(stdout);
    }
  }
}

// Prefill GEMM (the panel kernel above kGemmSmallM, the few-token kernel at
// or below it) against the int8 dot peak: issue 17's "prefill GEMM nearer
// the int8 peak at M = 64..512, 1 and 2 threads". 4-bit, 4096 rows, K of
// the AFM shape's projections (3072) and its FFN down projection (8192);
// matrices rotate over the set as in TimeGemm. The 2-thread share is of
// twice the 1-core peak.
void ComparePrefillGemm(const std::vector<uint8_t>& random, size_t set_bytes, ThreadPool& pool2) {
  const double i8 = PeakOps(HWY_DYNAMIC_DISPATCH(I8DotLoop));
  printf("## Prefill GEMM against the int8 dot peak (%.0f GOP/s per core), 4096 rows, 4-bit\n\n",
         i8 / 1e9);
  printf("| K | M | threads | ms/call | GOP/s (2MNK) | share of the int8 peak |\n"
         "|---|---|---|---|---|---|\n");
  const size_t N = 4096;
  for (size_t K : {size_t{3072}, size_t{8192}}) {
    const MatrixSet set = MakeSet(random, N, K, 4, set_bytes);
    for (size_t M : {size_t{64}, size_t{128}, size_t{512}}) {
      for (size_t threads : {size_t{1}, size_t{2}}) {
        const double t = TimeGemm(set, M, threads == 1 ? nullptr : &pool2, M == 512 ? 5 : 9);
        const double ops = 2.0 * double(M) * N * K / t;
        printf("| %zu | %zu | %zu | %.2f | %.0f | %.0f %% |\n", K, M, threads, t * 1e3, ops / 1e9,
               100.0 * ops / (i8 * double(threads)));
        fflush(stdout);
      }
    }
  }
}

int Main(int argc, char** argv) {
  bool quick = false, gemv_only = false, groups_only = false, small_m_only = false;
  bool kernels_only = false, prefill_only = false;
  size_t only_rows = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--quick") quick = true;
    if (arg == "--gemv-only") gemv_only = true;
    if (arg == "--groups-only") groups_only = true;
    if (arg == "--small-m-only") small_m_only = true;
    if (arg == "--kernels-only") kernels_only = true;
    if (arg == "--prefill-only") prefill_only = true;
    if (arg.rfind("--rows=", 0) == 0) only_rows = std::stoul(arg.substr(7));
  }
  const size_t kMiB = size_t{1} << 20;
  const size_t bw_bytes = quick ? 256 * kMiB : 1024 * kMiB;
  const size_t set_bytes = quick ? 96 * kMiB : 256 * kMiB;
  const int passes = quick ? 3 : 5;
  printf("# lutra matmul_bench%s\n", quick ? " --quick (NOT cache-cold-sized; smoke test)" : "");
  printf("target: %s, hardware threads: %u\n\n",
         hwy::TargetName(hwy::DispatchedTarget()), std::thread::hardware_concurrency());
  if (groups_only) {
    CompareGroupSizes(RandomBytes(set_bytes + 64 * kMiB, 7), set_bytes, passes, quick);
    return 0;
  }
  if (kernels_only) {
    CompareGemmKernels(RandomBytes(set_bytes + 64 * kMiB, 7), set_bytes, passes);
    return 0;
  }
  ThreadPool pool1(1), pool2(2);
  if (prefill_only) {
    ComparePrefillGemm(RandomBytes(set_bytes + 64 * kMiB, 7), set_bytes, pool2);
    return 0;
  }
  if (small_m_only) {
    const std::vector<uint8_t> random = RandomBytes(set_bytes + 64 * kMiB, 7);
    CompareSmallM(random, set_bytes, passes, pool2, 0);
    CompareSmallM(random, set_bytes, passes, pool2, 1);
    return 0;
  }

  // Bandwidth: the best stream count first, then (below) samples interleaved
  // with each GEMV measurement, so that both see the same machine load.
  const std::vector<uint8_t> big = RandomBytes(bw_bytes, 11);
  ReadBandwidth(big, pool1, 1, 1, 1, 0);  // warm up
  printf("## Machine limits (median)\n\n");
  printf("| measure | value |\n|---|---|\n");
  size_t best_streams = 1, best_prefetch = 0;
  double best_bw = 0.0;
  for (size_t prefetch : {size_t{0}, size_t{1024}, size_t{4096}}) {
    for (size_t streams : {size_t{1}, size_t{2}, size_t{4}, size_t{8}}) {
      const double b1 = ReadBandwidth(big, pool1, 1, 2, streams, prefetch);
      printf("| read bandwidth, 1 thread, %zu stream(s), software prefetch %zu B ahead | "
             "%.2f GB/s |\n",
             streams, prefetch, b1 / 1e9);
      if (b1 > best_bw) {
        best_bw = b1;
        best_streams = streams;
        best_prefetch = prefetch;
      }
    }
  }
  const double bw1 = ReadBandwidth(big, pool1, 1, 3, best_streams, best_prefetch);
  const double bw2 = ReadBandwidth(big, pool2, 2, 3, best_streams, best_prefetch);
  printf("| **read bandwidth, 1 thread** (best variant: %zu streams, prefetch %zu B; 3 passes "
         "over %zu MiB, median of 8 MiB pieces) | **%.2f GB/s** |\n",
         best_streams, best_prefetch, bw_bytes / kMiB, bw1 / 1e9);
  printf("| **read bandwidth, 2 threads** | **%.2f GB/s** |\n", bw2 / 1e9);
  const double fma = PeakOps(HWY_DYNAMIC_DISPATCH(F32FmaLoop));
  const double bf16 = PeakOps(HWY_DYNAMIC_DISPATCH(Bf16DotLoop));
  const double i8 = PeakOps(HWY_DYNAMIC_DISPATCH(I8DotLoop));
  printf("| f32 FMA peak, 1 core | %.1f GFLOP/s |\n", fma / 1e9);
  printf("| bf16 dot peak (ReorderWidenMulAccumulate), 1 core | %.1f GFLOP/s |\n", bf16 / 1e9);
  printf("| int8 dot peak (CodeDot: the kernels' u8 code x i8 product), 1 core | %.1f GOP/s |\n\n",
         i8 / 1e9);

  // Random index bytes shared by every matrix set.
  const std::vector<uint8_t> random = RandomBytes(set_bytes + 64 * kMiB, 7);

  printf("## GEMV, cache-cold (rotating over >= %zu MiB of weights), int8 path\n\n",
         set_bytes / kMiB);
  printf("Each row: %d passes over the matrices; before each GEMV call, the same number of\n"
         "bytes is summed from the bandwidth buffer with the same threads, so\n"
         "ratio = median GEMV GB/s / median bandwidth of those interleaved pieces.\n\n", passes);
  printf("| N x K | bits | threads | us/call | GB/s packed | bandwidth GB/s (same rounds) | ratio | Gweights/s |\n");
  printf("|---|---|---|---|---|---|---|---|\n");
  for (size_t N : {size_t{4096}, size_t{14336}}) {
    if (only_rows != 0 && N != only_rows) continue;
    for (int bits : {2, 3, 4, 6, 8}) {
      const MatrixSet set = MakeSet(random, N, 4096, bits, set_bytes);
      for (size_t threads : {size_t{1}, size_t{2}}) {
        ThreadPool* pool = threads == 1 ? nullptr : &pool2;
        std::vector<double> bws, ts;
        const PaletteShape& shp = set.mats[0].shape();
        std::vector<float> x(shp.cols), y(shp.rows);
        for (size_t c = 0; c < x.size(); ++c) x[c] = float(c % 7) - 3.0f;
        PreparedInput scratch;
        const size_t chunk = set.bytes_per_matrix / 4096 * 4096;
        size_t off = 0;
        // Per round: for every matrix, one bandwidth piece of the matrix's
        // size, then one GEMV call on that matrix (both cache-cold).
        for (int round = 0; round < passes; ++round) {
          for (const PreparedPalette& w : set.mats) {
            if (off + chunk > big.size()) off = 0;
            const double tb = TimeChunk(big, off, chunk, threads == 1 ? pool1 : pool2,
                                        threads, best_streams, best_prefetch);
            off += chunk;
            bws.push_back(double(chunk) / tb);
            ts.push_back(TimeGemvCall(w, x, Epilogue(), y, pool, 0, &scratch));
          }
        }
        const double t = Median(ts), bw = Median(bws);
        const double gbs = set.bytes_per_matrix / t;
        const double gw = double(N) * 4096 / t;
        printf("| %zux4096 | %d | %zu | %.1f | %.2f | %.2f | %.0f%% | %.2f |\n", N, bits,
               threads, t * 1e6, gbs / 1e9, bw / 1e9, 100.0 * gbs / bw, gw / 1e9);
        fflush(stdout);
      }
    }
  }

  if (gemv_only) {
    CompareTwoAndFourBits(random, set_bytes, passes, only_rows, pool2);
    return 0;
  }
  // Compute ceiling: one matrix repeated (cache-resident), no DRAM limit.
  printf("\nCache-hot ceiling (one 4096x1024 matrix, repeated; not a bandwidth figure):");
  for (int bits : {2, 4, 8}) {
    MatrixSet set = MakeSet(random, 4096, 1024, bits, 0);
    set.mats.resize(1);
    const double t = TimeGemv(set, nullptr, Epilogue(), 0, 200);
    printf(" %d-bit %.1f GB/s (%.1f Gweights/s);", bits, set.bytes_per_matrix / t / 1e9,
           4096.0 * 1024 / t / 1e9);
  }
  printf("\n");
  printf("\n");

  {
    const MatrixSet set = MakeSet(random, 4096, 4096, 4, set_bytes);
    const double t32 = TimeGemv(set, nullptr, Epilogue(), 1, passes);
    printf("Exact f32 path (MatmulPrecision::kF32), 4096x4096 4-bit, 1 thread: %.1f us/call "
           "(%.2f GB/s)\n\n", t32 * 1e6, set.bytes_per_matrix / t32 / 1e9);

    // LoRA rank 16 overhead.
    const size_t rank = 16, K = 4096, N = 4096;
    std::vector<hwy::float16_t> A(rank * K), B(N * rank);
    std::mt19937 rng(3);
    for (auto& a : A) a = hwy::F16FromF32(std::normal_distribution<float>(0, 0.05f)(rng));
    for (auto& b : B) b = hwy::F16FromF32(std::normal_distribution<float>(0, 0.05f)(rng));
    LoraDelta lora;
    lora.a = A.data();
    lora.b = B.data();
    lora.rank = rank;
    lora.type = ElementType::kF16;
    lora.scale = 0.5f;
    Epilogue ep;
    ep.lora = &lora;
    // Plain and LoRA calls alternate (order swapped every pass) so that load
    // changes affect both; the LoRA call uses the matrix half a set away, so
    // neither finds the other's weights in cache.
    std::vector<double> t;
    {
      std::vector<float> x(K), y(N);
      for (size_t c = 0; c < K; ++c) x[c] = float(c % 7) - 3.0f;
      PreparedInput scratch[2];
      const Epilogue eps[2] = {Epilogue(), ep};
      const size_t n = set.mats.size();
      t = InterleavedMedians(2, n, passes, [&](size_t v, size_t c) {
        return TimeGemvCall(set.mats[(c + v * n / 2) % n], x, eps[v], y, nullptr, 0,
                            &scratch[v]);
      });
    }
    const double tp = t[0], tl = t[1];
    printf("## GEMV + fused rank-16 LoRA (f16 A, B), 4096x4096 4-bit, 1 thread\n\n");
    printf("plain %.1f us, with LoRA %.1f us: overhead %.1f%%\n\n", tp * 1e6, tl * 1e6,
           100.0 * (tl / tp - 1.0));

    printf("## GEMM (prefill), 4096x4096 4-bit, int8 path, 1 thread\n\n");
    printf("| M | ms/call | GFLOP/s (2MNK) | x f32 FMA peak | speedup over M GEMVs |\n");
    printf("|---|---|---|---|---|\n");
    for (size_t M : {size_t{16}, size_t{64}, size_t{512}}) {
      const int reps = M == 512 ? (quick ? 2 : 5) : (quick ? 5 : 15);
      const double t = TimeGemm(set, M, nullptr, reps);
      const double flops = 2.0 * double(M) * N * K / t;
      // M GEMV calls on the same (rotating) weights.
      const double tv = TimeGemv(set, nullptr, Epilogue(), 0, 1) * double(M);
      printf("| %zu | %.2f | %.1f | %.2f | %.1fx |\n", M, t * 1e3, flops / 1e9, flops / fma,
             tv / t);
      fflush(stdout);
    }
    printf("\nGEMM M=512, 2 threads: ");
    const double t2 = TimeGemm(set, 512, &pool2, quick ? 2 : 3);
    printf("%.1f GFLOP/s\n", 2.0 * 512 * N * K / t2 / 1e9);
  }
  CompareSmallM(random, set_bytes, passes, pool2, 0);
  CompareGroupSizes(random, set_bytes, passes, quick);
  CompareTwoAndFourBits(random, set_bytes, passes, only_rows, pool2);
  return 0;
}

}  // namespace bench
}  // namespace lutra

int main(int argc, char** argv) { return lutra::bench::Main(argc, argv); }
#endif  // HWY_ONCE
