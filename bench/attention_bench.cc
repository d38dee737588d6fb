// Decode attention throughput at the AFM on-device shape (head_dim 128,
// 24 query heads, 8 KV heads), per KV storage type and context length,
// against the single-thread memory read bandwidth measured by this binary.
//
// Decode attention reads every cached K and V row once per token, so its
// roofline is memory bandwidth: the figure of merit is GB/s of KV read and
// its ratio to a STREAM-like read/sum of >= 1 GiB on the same thread.
//
// "cold": one call per layer, rotating through enough layers that the KV
// set (>= 512 MiB) cannot stay in any cache, as in a real forward pass where
// the other layers' weights and caches evict it. "hot": the same layer
// again and again (upper bound; the KV of small contexts stays in L2/L3).
//
// Usage: attention_bench [--quick]   (--quick: fewer repetitions)
// Prints one line per (type, context) and a markdown table.
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "bench/attention_bench.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "bench/bench_util.h"
#include "hwy/highway.h"
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

Status Attend(const KVCache& cache, size_t layer, size_t pos, const float* q,
              size_t num_heads, float* out) {
  return Attention(cache, layer, pos, 1, q, num_heads, out);
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

// Thread CPU time (bench::ThreadCpuNow): on a shared machine wall time
// mostly measures other processes. LUTRA_BENCH_WALL=1 switches to wall time
// for quiet machines.
double Now() {
  static const bool wall = getenv("LUTRA_BENCH_WALL") != nullptr;
  return wall ? bench::Now() : bench::ThreadCpuNow();
}
// Every count of repetitions here is odd: the median is one measured run.
using bench::Median;

volatile float g_sink;

// GB/s of a single-thread read/sum over `bytes` (>= 1 GiB), median of reps.
double MeasureReadBandwidth(size_t bytes, int reps) {
  const size_t n = bytes / sizeof(float);
  hwy::AlignedFreeUniquePtr<float[]> buf = hwy::AllocateAligned<float>(n);
  for (size_t i = 0; i < n; ++i) buf[i] = float(i & 1023);  // touch all pages
  std::vector<double> gbs;
  for (int r = 0; r < reps; ++r) {
    const double t0 = Now();
    g_sink = HWY_DYNAMIC_DISPATCH(SumArray)(buf.get(), n);
    gbs.push_back(double(bytes) / (Now() - t0) * 1e-9);
  }
  return Median(gbs);
}

struct Result {
  double us_cold, us_hot, gbs_cold, gbs_hot;
};

Result BenchDecode(ElementType type, size_t ctx, int reps) {
  const size_t kv_heads = 8, heads = 24, hd = 128;
  KVCacheConfig cfg;
  cfg.num_kv_heads = kv_heads;
  cfg.head_dim = hd;
  cfg.capacity = ctx;
  cfg.type = type;
  const size_t per_layer = ctx * 2 * kv_heads * hd * ElementBytes(type);
  // >= 512 MiB in total, at least 4 layers.
  cfg.num_layers = std::max<size_t>(4, ((size_t{512} << 20) + per_layer - 1) / per_layer);
  StatusOr<KVCache> c = KVCache::Create(cfg);
  bench::Check(c.status());
  KVCache& cache = *c;
  // Fill every layer with random rows (one random chunk, appended again and
  // again: contents do not change the speed, only realistic magnitudes do).
  std::mt19937 rng(123);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const size_t chunk = 256;
  std::vector<float> k(chunk * kv_heads * hd), v(k.size());
  for (float& x : k) x = nd(rng);
  for (float& x : v) x = nd(rng);
  for (size_t l = 0; l < cfg.num_layers; ++l) {
    for (size_t p = 0; p < ctx; p += chunk) {
      const size_t num = std::min(chunk, ctx - p);
      bench::Check(HWY_DYNAMIC_DISPATCH(Append)(cache, l, p, num, k.data(), v.data()));
    }
  }
  std::vector<float> q(heads * hd), out(heads * hd);
  for (float& x : q) x = nd(rng);
  const double bytes = double(cache.BytesPerPosition()) * double(ctx);
  const auto attend = [&](size_t layer) {
    bench::Check(
        HWY_DYNAMIC_DISPATCH(Attend)(cache, layer, ctx - 1, q.data(), heads, out.data()));
  };
  // Cold: sweep all layers per repetition.
  std::vector<double> cold;
  attend(0);
  for (int r = 0; r < reps; ++r) {
    const double t0 = Now();
    for (size_t l = 0; l < cfg.num_layers; ++l) attend(l);
    cold.push_back((Now() - t0) / double(cfg.num_layers));
  }
  // Hot: one layer, repeated calls, batches long enough for the timer.
  std::vector<double> hot;
  const int inner = std::max(1, int(2e6 / bytes));
  for (int r = 0; r < reps; ++r) {
    const double t0 = Now();
    for (int i = 0; i < inner; ++i) attend(0);
    hot.push_back((Now() - t0) / inner);
  }
  Result res;
  res.us_cold = Median(cold) * 1e6;
  res.us_hot = Median(hot) * 1e6;
  res.gbs_cold = bytes / Median(cold) * 1e-9;
  res.gbs_hot = bytes / Median(hot) * 1e-9;
  return res;
}

}  // namespace
}  // namespace lutra

int main(int argc, char** argv) {
  using namespace lutra;
  const bool quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
  const int reps = quick ? 5 : 15;
  printf("target %s; decode attention, head_dim 128, 24 heads, 8 kv heads, 1 thread; "
         "%s time\n",
         HWY_DYNAMIC_DISPATCH(Target)(),
         getenv("LUTRA_BENCH_WALL") ? "wall" : "thread CPU");
  const double bw = MeasureReadBandwidth(size_t{1} << 30, quick ? 5 : 9);
  printf("read bandwidth (1 GiB sum, 1 thread, median): %.2f GB/s\n", bw);
  const ElementType types[] = {ElementType::kF32, ElementType::kF16, ElementType::kBF16, ElementType::kI8};
  const size_t contexts[] = {512, 2048, 8192};
  std::string table =
      "| KV | context | KV bytes/token | cold us/token | cold GB/s | cold / read BW | "
      "hot us/token | hot GB/s |\n|---|---|---|---|---|---|---|---|\n";
  for (ElementType type : types) {
    for (size_t ctx : contexts) {
      const Result r = BenchDecode(type, ctx, reps);
      const double mb = double(ctx) * 2 * 8 * (128 * ElementBytes(type) +
                                               (type == ElementType::kI8 ? 4 : 0)) /
                        (1 << 20);
      printf("%-5s ctx %5zu: cold %8.1f us %6.2f GB/s (%.2f of read BW) | hot %8.1f us "
             "%6.2f GB/s\n",
             ElementTypeName(type), ctx, r.us_cold, r.gbs_cold, r.gbs_cold / bw, r.us_hot,
             r.gbs_hot);
      fflush(stdout);
      char line[256];
      snprintf(line, sizeof(line), "| %s | %zu | %.2f MiB | %.1f | %.2f | %.2f | %.1f | %.2f |\n",
               ElementTypeName(type), ctx, mb, r.us_cold, r.gbs_cold, r.gbs_cold / bw,
               r.us_hot, r.gbs_hot);
      table += line;
    }
  }
  printf("\n%s", table.c_str());
  return 0;
}
#endif  // HWY_ONCE
