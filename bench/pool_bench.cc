// ThreadPool::ParallelFor overhead in a decode-step pattern: back-to-back
// parallel calls (one per matmul, ~180 per token on a Llama) with short
// single-threaded work (norms, attention, sampling) in between.
//
//   pool_bench [--threads T] [--reps R]
//
// Each row runs `kCalls` calls of T equal tasks of `work` us of arithmetic,
// with `gap` us of work on the calling thread before each call, and reports
// the median time per call beyond the work itself (the pool's overhead:
// wake-up, hand-out, join). Compare pools by building this file against
// each thread_pool.h and alternating runs (docs/benchmarks.md).
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "bench/bench_util.h"
#include "lutra/base/thread_pool.h"

namespace lutra {
namespace bench {
namespace {

constexpr size_t kCalls = 180;

// Arithmetic the compiler cannot drop: `iters` steps of an LCG.
uint64_t Spin(uint64_t iters, uint64_t seed) {
  uint64_t x = seed;
  for (uint64_t i = 0; i < iters; ++i) x = x * 6364136223846793005ull + 1442695040888963407ull;
  return x;
}

// LCG steps per microsecond on this core.
double ItersPerMicro() {
  const uint64_t iters = 20 * 1000 * 1000;
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    const double t0 = ThreadCpuNow();
    volatile uint64_t sink = Spin(iters, rep);
    (void)sink;
    const double dt = ThreadCpuNow() - t0;
    best = std::max(best, double(iters) / (dt * 1e6));
  }
  return best;
}

}  // namespace
}  // namespace bench
}  // namespace lutra

int main(int argc, char** argv) {
  using namespace lutra::bench;
  size_t threads = 2, reps = 15;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--threads")) {
      threads = strtoul(argv[i + 1], nullptr, 10);
    } else if (!strcmp(argv[i], "--reps")) {
      reps = strtoul(argv[i + 1], nullptr, 10);
    } else {
      fprintf(stderr, "usage: pool_bench [--threads T] [--reps R]\n");
      return 1;
    }
  }
  const double per_us = ItersPerMicro();
  lutra::ThreadPool pool(threads);
  std::vector<uint64_t> sink(threads * 8);
  printf("threads %zu, %zu calls per step, median of %zu steps\n", threads, kCalls, reps);
  printf("%8s %8s %14s %12s\n", "work_us", "gap_us", "overhead_us", "step_ms");
  for (double work : {2.0, 20.0, 200.0}) {
    for (double gap : {0.0, 10.0}) {
      const uint64_t work_iters = uint64_t(work * per_us), gap_iters = uint64_t(gap * per_us);
      std::vector<double> steps;
      for (size_t rep = 0; rep < reps + 1; ++rep) {
        const double t0 = Now();
        for (size_t call = 0; call < kCalls; ++call) {
          sink[0] += Spin(gap_iters, call);
          pool.ParallelFor(threads, [&](size_t task, size_t) {
            sink[task * 8] += Spin(work_iters, task);
          });
        }
        if (rep > 0) steps.push_back(Now() - t0);  // the first one warms up
      }
      const double step = Median(steps);
      const double overhead = step / kCalls - (work + gap) * 1e-6;
      printf("%8.0f %8.0f %14.2f %12.3f\n", work, gap, overhead * 1e6, step * 1e3);
    }
  }
  return sink[0] == 42 ? 1 : 0;
}
