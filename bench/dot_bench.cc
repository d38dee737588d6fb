// Placeholder benchmark: f32 dot product throughput (static dispatch to the
// compiler's baseline target; real benchmarks dispatch dynamically).
#include <vector>

#include <benchmark/benchmark.h>

#include "hwy/highway.h"
#include "lutra/kernels/dot-inl.h"

static void BM_Dot(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  std::vector<float> a(n, 1.0f), b(n, 1.0f);
  for (auto _ : state) {
    benchmark::DoNotOptimize(lutra::HWY_NAMESPACE::Dot(a.data(), b.data(), n));
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(n) * 8);
}
BENCHMARK(BM_Dot)->Arg(4096)->Arg(65536);
BENCHMARK_MAIN();
