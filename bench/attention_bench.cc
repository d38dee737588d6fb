// Attention throughput at the AFM on-device shape (head_dim 128, 24 query
// heads, 8 KV heads), per KV storage type, context length and thread count.
//
// Decode: attention reads every cached K and V row once per token, so its
// roofline is memory bandwidth. The figure of merit is the share of the read
// bandwidth: GB/s of KV read over the GB/s of a STREAM-like read/sum by the
// same number of threads, the two measured alternately in the same run (a
// shared machine drifts), median of the per-repetition ratios. One call per
// layer, rotating through enough layers that the KV set (>= 512 MiB) cannot
// stay in any cache, as in a real forward pass.
//
// Prefill: ms per prompt token of blocked causal attention over a prompt of
// T tokens (all layers' worth of one layer: one call, num_tokens = T).
//
// Timing: the machine this was written on is shared and oversubscribed, so
// by default a call's time is the process CPU time it used divided by the
// thread count, which measures the code while it holds its cores. A
// worker that runs out of tasks polls for the next call (up to 50 us,
// thread_pool.h), and that CPU time counts too, as the wall time would.
// LUTRA_BENCH_WALL=1 switches to wall time for quiet machines.
// Usage: attention_bench [--quick] [--only f16|bf16|int8] [--prefill-only]
//   --quick: fewer repetitions; --only: the decode rows of one KV type;
//   --prefill-only: the prefill rows alone (f16 and int8 KV, and int8's
//   time as a share of f16's in the same run).
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <thread>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "bench/attention_bench.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "bench/bench_util.h"
#include "hwy/highway.h"
#include "lutra/base/thread_pool.h"
#include "lutra/kernels/attention-inl.h"
#include "lutra/kernels/kv_cache-inl.h"
#include "lutra/kernels/kv_cache.h"

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Sum of n floats with 8 independent accumulators (enough loads in flight
// to saturate one core's memory bandwidth).
float SumArray(const float* HWY_RESTRICT p, size_t n) {
  const hn::ScalableTag<float> df;
  const size_t N = hn::Lanes(df);
  auto s0 = hn::Zero(df), s1 = hn::Zero(df), s2 = hn::Zero(df), s3 = hn::Zero(df);
  auto s4 = hn::Zero(df), s5 = hn::Zero(df), s6 = hn::Zero(df), s7 = hn::Zero(df);
  size_t i = 0;
  for (; i + 8 * N <= n; i += 8 * N) {
    s0 = hn::Add(s0, hn::LoadU(df, p + i));
    s1 = hn::Add(s1, hn::LoadU(df, p + i + N));
    s2 = hn::Add(s2, hn::LoadU(df, p + i + 2 * N));
    s3 = hn::Add(s3, hn::LoadU(df, p + i + 3 * N));
    s4 = hn::Add(s4, hn::LoadU(df, p + i + 4 * N));
    s5 = hn::Add(s5, hn::LoadU(df, p + i + 5 * N));
    s6 = hn::Add(s6, hn::LoadU(df, p + i + 6 * N));
    s7 = hn::Add(s7, hn::LoadU(df, p + i + 7 * N));
  }
  float tail = 0.0f;
  for (; i < n; ++i) tail += p[i];
  s0 = hn::Add(hn::Add(hn::Add(s0, s1), hn::Add(s2, s3)),
               hn::Add(hn::Add(s4, s5), hn::Add(s6, s7)));
  return hn::ReduceSum(df, s0) + tail;
}

Status Append(KVCache& cache, size_t layer, size_t pos, size_t num,
              const float* k, const float* v) {
  return AppendKV(cache, layer, pos, num, k, v);
}

Status Attend(const KVCache& cache, size_t layer, size_t pos, size_t num_tokens,
              const float* q, size_t num_heads, float* out, ThreadPool* pool) {
#ifdef LUTRA_BENCH_OLD_ATTENTION  // A/B against a tree without the pool argument
  (void)pool;
  return Attention(cache, layer, pos, num_tokens, q, num_heads, out);
#else
  return Attention(cache, layer, pos, num_tokens, q, num_heads, out, AttentionOptions(), pool);
#endif
}

const char* Target() { return hwy::TargetName(HWY_TARGET); }

}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lutra {
HWY_EXPORT(SumArray);
HWY_EXPORT(Append);
HWY_EXPORT(Attend);
HWY_EXPORT(Target);

namespace {

using bench::Median;

// Seconds of process CPU time (all threads).
double ProcessCpuNow() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// Stopwatch for a call on `threads` threads: wall time, or (default) the
// process CPU time divided by the thread count.
struct Timer {
  explicit Timer(size_t threads) : div(wall ? 1.0 : double(threads)) {}
  double Now() const { return wall ? bench::Now() : ProcessCpuNow() / div; }
  static inline const bool wall = getenv("LUTRA_BENCH_WALL") != nullptr;
  double div;
};

volatile float g_sink;

constexpr size_t kKVHeads = 8, kHeads = 24, kHeadDim = 128;

// Seconds for `pool`'s threads to read/sum buf[0, n) (each its own part).
double TimeRead(const float* buf, size_t n, ThreadPool& pool) {
  const size_t T = pool.NumThreads();
  const Timer timer(T);
  std::vector<float> sums(T);
  const double t0 = timer.Now();
  pool.ParallelFor(T, [&](size_t task, size_t) {
    const RowRange r = SplitRows(n, T, task, 1024);
    sums[task] = HWY_DYNAMIC_DISPATCH(SumArray)(buf + r.begin, r.size());
  });
  const double dt = timer.Now() - t0;
  g_sink = sums[0];
  return dt;
}

// Cache of `ctx` positions per layer and enough layers for >= 512 MiB.
KVCache MakeCache(ElementType type, size_t ctx, size_t min_layers) {
  KVCacheConfig cfg;
  cfg.num_kv_heads = kKVHeads;
  cfg.head_dim = kHeadDim;
  cfg.capacity = ctx;
  cfg.type = type;
  const size_t per_layer = ctx * 2 * kKVHeads * kHeadDim * ElementBytes(type);
  cfg.num_layers =
      std::max<size_t>(min_layers, ((size_t{512} << 20) + per_layer - 1) / per_layer);
  StatusOr<KVCache> c = KVCache::Create(cfg);
  bench::Check(c.status());
  return std::move(*c);
}

// Appends ctx random positions to every layer (one random chunk, appended
// again and again: contents do not change the speed, only realistic
// magnitudes do).
void Fill(KVCache& cache, size_t ctx) {
  std::mt19937 rng(123);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const size_t chunk = 256;
  std::vector<float> k(chunk * kKVHeads * kHeadDim), v(k.size());
  for (float& x : k) x = nd(rng);
  for (float& x : v) x = nd(rng);
  for (size_t l = 0; l < cache.num_layers(); ++l) {
    for (size_t p = 0; p < ctx; p += chunk) {
      const size_t num = std::min(chunk, ctx - p);
      bench::Check(HWY_DYNAMIC_DISPATCH(Append)(cache, l, p, num, k.data(), v.data()));
    }
  }
}

struct DecodeResult {
  double us, gbs, share, bw;  // medians: us/token/layer, KV GB/s, KV / read
};

// Alternates one read-bandwidth measurement (512 MiB) with one sweep of
// decode attention over all layers, `reps` times.
DecodeResult BenchDecode(ElementType type, size_t ctx, ThreadPool& pool, const float* buf,
                         size_t buf_n, int reps) {
  KVCache cache = MakeCache(type, ctx, 4);
  Fill(cache, ctx);
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> q(kHeads * kHeadDim), out(q.size());
  for (float& x : q) x = nd(rng);
  const double bytes = double(cache.BytesPerPosition()) * double(ctx);
  const size_t L = cache.num_layers();
  const Timer timer(pool.NumThreads());
  std::vector<double> us, gbs, share, bw;
  for (int r = -1; r < reps; ++r) {  // r = -1: warm-up
    const double read_gbs = double(buf_n * sizeof(float)) / TimeRead(buf, buf_n, pool) * 1e-9;
    const double t0 = timer.Now();
    for (size_t l = 0; l < L; ++l) {
      bench::Check(HWY_DYNAMIC_DISPATCH(Attend)(cache, l, ctx - 1, 1, q.data(), kHeads,
                                                out.data(), &pool));
    }
    const double dt = (timer.Now() - t0) / double(L);
    if (r < 0) continue;
    us.push_back(dt * 1e6);
    gbs.push_back(bytes / dt * 1e-9);
    share.push_back(bytes / dt * 1e-9 / read_gbs);
    bw.push_back(read_gbs);
  }
  return {Median(us), Median(gbs), Median(share), Median(bw)};
}

// ms per prompt token of causal attention over a T-token prompt.
double BenchPrefill(ElementType type, size_t T, ThreadPool& pool, int reps) {
  KVCache cache = MakeCache(type, T, 1);
  Fill(cache, T);
  std::mt19937 rng(6);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> q(T * kHeads * kHeadDim), out(q.size());
  for (float& x : q) x = nd(rng);
  const Timer timer(pool.NumThreads());
  std::vector<double> ms;
  for (int r = 0; r < reps; ++r) {
    const double t0 = timer.Now();
    bench::Check(HWY_DYNAMIC_DISPATCH(Attend)(cache, 0, 0, T, q.data(), kHeads, out.data(),
                                              &pool));
    ms.push_back((timer.Now() - t0) * 1e3 / double(T));
  }
  return Median(ms);
}

}  // namespace
}  // namespace lutra

int main(int argc, char** argv) {
  using namespace lutra;
  bool quick = false;
  const char* only = nullptr;  // --only TYPE: decode rows of one KV type
  bool prefill_only = false;
  for (int i = 1; i < argc; ++i) {
    if (strcmp(argv[i], "--quick") == 0) quick = true;
    if (strcmp(argv[i], "--prefill-only") == 0) prefill_only = true;
    if (strcmp(argv[i], "--only") == 0 && i + 1 < argc) only = argv[++i];
  }
  const int reps = quick ? 5 : 9;
  printf("target %s; attention, head_dim 128, 24 heads, 8 kv heads; %s; %u cores\n",
         HWY_DYNAMIC_DISPATCH(Target)(),
         Timer::wall ? "wall time" : "process CPU time / threads",
         std::thread::hardware_concurrency());
  const size_t buf_n = (size_t{512} << 20) / sizeof(float);
  hwy::AlignedFreeUniquePtr<float[]> buf = hwy::AllocateAligned<float>(buf_n);
  for (size_t i = 0; i < buf_n; ++i) buf[i] = float(i & 1023);  // touch all pages
  const ElementType types[] = {ElementType::kF16, ElementType::kBF16, ElementType::kI8};
  const size_t contexts[] = {512, 2048, 8192, 32768};
  std::string table =
      "| KV | context | threads | us/token/layer | KV GB/s | read GB/s | share of read BW |\n"
      "|---|---|---|---|---|---|---|\n";
  for (ElementType type : types) {
    if (prefill_only) break;
    if (only != nullptr && strcmp(only, ElementTypeName(type)) != 0) continue;
    for (size_t ctx : contexts) {
      for (size_t threads : {size_t{1}, size_t{2}}) {
        ThreadPool pool(threads);
        const DecodeResult r = BenchDecode(type, ctx, pool, buf.get(), buf_n, reps);
        printf("%-5s ctx %5zu, %zu thr: %8.1f us %6.2f GB/s, read %6.2f GB/s: %.2f\n",
               ElementTypeName(type), ctx, threads, r.us, r.gbs, r.bw, r.share);
        fflush(stdout);
        char line[256];
        snprintf(line, sizeof(line), "| %s | %zu | %zu | %.1f | %.2f | %.2f | %.2f |\n",
                 ElementTypeName(type), ctx, threads, r.us, r.gbs, r.bw, r.share);
        table += line;
      }
    }
  }
  if (!prefill_only) printf("\n%s", table.c_str());
  if (only != nullptr) return 0;
  std::string ptable =
      "| prompt tokens | threads | ms/token, f16 KV | ms/token, int8 KV | int8 / f16 |\n"
      "|---|---|---|---|---|\n";
  for (size_t T : {size_t{64}, size_t{512}, size_t{2048}, size_t{8192}}) {
    for (size_t threads : {size_t{1}, size_t{2}}) {
      ThreadPool pool(threads);
      const int r = T >= 8192 ? 3 : reps;
      const double f16 = BenchPrefill(ElementType::kF16, T, pool, r);
      const double i8 = BenchPrefill(ElementType::kI8, T, pool, r);
      printf("prefill %5zu tokens, %zu thr: %.3f ms/token f16, %.3f int8 (%.2f)\n", T, threads,
             f16, i8, i8 / f16);
      fflush(stdout);
      char line[160];
      snprintf(line, sizeof(line), "| %zu | %zu | %.3f | %.3f | %.2f |\n", T, threads, f16, i8,
               i8 / f16);
      ptable += line;
    }
  }
  printf("\n%s", ptable.c_str());
  return 0;
}
#endif  // HWY_ONCE
