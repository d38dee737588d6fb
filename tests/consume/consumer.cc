// A tiny lutra consumer with static dispatch (compiled for the build's
// baseline target; add -march=... to pick the phone's or server's ISA).
// It runs the README's example: palettize a matrix, then GEMV over it.
#include <cmath>
#include <cstdio>
#include <vector>

#include "hwy/highway.h"
#include "lutra/kernels/gemv-inl.h"  // per-target: after hwy/highway.h
#include "lutra/lutra.h"             // every plain type: Palettize, PreparedPalette, ...

namespace lk = lutra::HWY_NAMESPACE;

int main() {
  const size_t N = 40, K = 100;
  std::vector<float> weights(N * K), x(K), y(N);
  for (size_t i = 0; i < weights.size(); ++i) weights[i] = std::sin(0.37f * i);
  for (size_t k = 0; k < K; ++k) x[k] = std::cos(0.11f * k);

  lutra::PalettizeOptions opt;
  opt.bits = 4;
  lutra::StatusOr<lutra::PaletteMatrix> w = lutra::Palettize(weights.data(), N, K, opt);
  if (!w.ok()) {
    std::fprintf(stderr, "%s\n", w.status().message().c_str());
    return 1;
  }
  auto prepared = lutra::PreparedPalette::Make(w->view());
  if (!prepared.ok()) return 1;
  lutra::Status s = lk::Gemv(*prepared, x.data(), K, lutra::Epilogue(), y.data(), N);
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", s.message().c_str());
    return 1;
  }
  // Compare with the dequantized reference.
  std::vector<float> row(K);
  double max_err = 0.0, max_ref = 0.0;
  for (size_t r = 0; r < N; ++r) {
    lutra::DequantizeRow(w->view(), r, row.data());
    double ref = 0.0;
    for (size_t k = 0; k < K; ++k) ref += double(row[k]) * x[k];
    max_err = std::fmax(max_err, std::fabs(ref - y[r]));
    max_ref = std::fmax(max_ref, std::fabs(ref));
  }
  // Bad input gets a Status, not a crash.
  lutra::Status bad = lk::Gemv(*prepared, x.data(), K - 1, lutra::Epilogue(), y.data(), N);
  const bool ok = max_err <= 0.05 * max_ref && !bad.ok();
  std::printf("consumer (%s): 4-bit GEMV %zux%zu max error %.4f of %.3f; bad shape -> \"%s\" %s\n",
              hwy::TargetName(HWY_TARGET), N, K, max_err, max_ref, bad.message().c_str(),
              ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
