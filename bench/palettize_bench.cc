// Palettizer throughput (weights per second) per index width and thread count
// on a heavy-tailed (Student-t, 3 dof) 4096 x 4096 matrix, plus the SNR
// reached. The palettizer is scalar C++, so there is no per-target dispatch.
//
// Plain main() harness (Google Benchmark is linked but not used: one
// palettization takes ~0.1-2 s, and a table of medians is easier to read):
//   ./build-x/bench/palettize_bench                     # all widths, 1 and 2 threads
//   ./build-x/bench/palettize_bench --bits 2,4 --threads 1,2,4 --reps 5
//   ./build-x/bench/palettize_bench --rows 1024 --cols 4096 --init companded
// Reports the median wall time of --reps runs (the machine may be shared) and
// the median process CPU time (all threads), which is less sensitive to other
// load: on a busy machine compare Mweights per CPU-second, not wall speedups.
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <ctime>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "lutra/quantize/palettize.h"

namespace {

std::vector<long> ParseList(const char* s) {
  std::vector<long> out;
  while (*s) {
    char* end;
    out.push_back(strtol(s, &end, 10));
    if (end == s) break;
    s = *end == ',' ? end + 1 : end;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  size_t rows = 4096, cols = 4096;
  int reps = 3;
  std::vector<long> bits = {1, 2, 3, 4, 6, 8}, threads = {1, 2};
  lutra::PalettizeInit init = lutra::PalettizeInit::kOptimal;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--rows") {
      rows = strtoul(argv[i + 1], nullptr, 10);
    } else if (a == "--cols") {
      cols = strtoul(argv[i + 1], nullptr, 10);
    } else if (a == "--reps") {
      reps = std::max(1, atoi(argv[i + 1]));
    } else if (a == "--bits") {
      bits = ParseList(argv[i + 1]);
    } else if (a == "--threads") {
      threads = ParseList(argv[i + 1]);
    } else if (a == "--init") {
      const std::string v = argv[i + 1];
      init = v == "quantile"    ? lutra::PalettizeInit::kQuantile
             : v == "kmeans++"  ? lutra::PalettizeInit::kKMeansPlusPlus
             : v == "companded" ? lutra::PalettizeInit::kCompanded
                                : lutra::PalettizeInit::kOptimal;
    } else {
      fprintf(stderr, "unknown flag %s\n", a.c_str());
      return 2;
    }
  }

  std::vector<float> w(rows * cols);
  std::mt19937_64 rng(1);
  std::student_t_distribution<float> dist(3.0f);
  for (float& x : w) x = 0.02f * dist(rng);

  printf("palettize %zu x %zu, G = 16, f16 codebooks, init %d, median of %d runs\n", rows, cols,
         static_cast<int>(init), reps);
  printf("%4s %7s %10s %14s %9s %10s %16s %9s %8s\n", "bits", "threads", "median_s",
         "Mweights/s", "speedup", "cpu_s", "Mweights/cpu_s", "SNR_dB", "bpw");
  for (long b : bits) {
    double t1 = 0.0;
    for (long t : threads) {
      lutra::PalettizeOptions opt;
      opt.bits = static_cast<int>(b);
      opt.threads = static_cast<size_t>(t);
      opt.init = init;
      std::vector<double> times, cpu;
      lutra::PalettizeStats st;
      double bpw = 0.0;
      for (int r = 0; r < reps; ++r) {
        const std::clock_t cpu_start = std::clock();
        const double start = lutra::bench::Now();
        auto m = lutra::Palettize(w.data(), rows, cols, opt, &st);
        const double stop = lutra::bench::Now();
        cpu.push_back(double(std::clock() - cpu_start) / CLOCKS_PER_SEC);
        lutra::bench::Check(m.status(), "palettize failed");
        bpw = m->shape().bits_per_weight();
        times.push_back(stop - start);
      }
      const double med = lutra::bench::Median(times);
      const double med_cpu = lutra::bench::Median(cpu);
      if (t == threads.front()) t1 = med;
      printf("%4ld %7ld %10.3f %14.1f %8.2fx %10.3f %16.1f %9.2f %8.4f\n", b, t, med,
             double(rows * cols) / med * 1e-6, t1 / med, med_cpu,
             double(rows * cols) / med_cpu * 1e-6, st.snr_db(), bpw);
      fflush(stdout);
    }
  }
  return 0;
}
