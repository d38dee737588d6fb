// Helpers of the plain-main() benchmarks in bench/: clocks, the median of
// repetitions, exiting on an error, and random bytes.
#ifndef LUTRA_BENCH_BENCH_UTIL_H_
#define LUTRA_BENCH_BENCH_UTIL_H_

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <vector>

#include "lutra/base/status.h"

namespace lutra {
namespace bench {

// Wall-clock seconds (steady clock) since an arbitrary origin.
inline double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// CPU seconds of the calling thread: on a shared, oversubscribed machine
// wall time mostly measures other processes, CPU time measures the code
// while it holds the core (memory contention from others still shows).
inline double ThreadCpuNow() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// Median of the repetitions (mean of the middle two for an even count; 0 for
// none): on a shared machine it ignores the runs that were descheduled.
inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0.0 : (n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]));
}

// A benchmark cannot go on after an error: prints "<context>: <message>" and
// exits with status 1.
inline void Check(const Status& s, const char* context = "error") {
  if (!s.ok()) {
    fprintf(stderr, "%s: %s\n", context, s.message().c_str());
    exit(1);
  }
}

// n bytes of a 64-bit Mersenne Twister with `seed` (a tail of n % 8 bytes
// stays zero): distinct pages, so nothing can share or compress them.
inline std::vector<uint8_t> RandomBytes(size_t n, uint64_t seed) {
  std::vector<uint8_t> bytes(n);
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i + 8 <= n; i += 8) {
    const uint64_t v = rng();
    memcpy(&bytes[i], &v, 8);
  }
  return bytes;
}

}  // namespace bench
}  // namespace lutra

#endif  // LUTRA_BENCH_BENCH_UTIL_H_
