// Random weights for tests and benchmarks: palettized matrices (one way of
// drawing them: codebooks group by group, then uniform indices row by row,
// with the codebook values the caller's concern) and LoRA adapters. No test
// framework needed: bench/ includes it too.
#ifndef LUTRA_TESTS_SUPPORT_RANDOM_WEIGHTS_H_
#define LUTRA_TESTS_SUPPORT_RANDOM_WEIGHTS_H_

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <string>
#include <utility>
#include <vector>

#include "lutra/format/lora.h"
#include "lutra/format/palette.h"
#include "tests/support/rng.h"

namespace lutra {
namespace test {

// A random matrix of `shape`: entry(g, e) for every codebook entry, in group
// order, then every index uniform in [0, num_entries), row by row. A shape
// that cannot be allocated is a bug in the caller: it aborts with the reason.
template <class DrawEntry>  // float(size_t group, size_t entry)
PaletteMatrix RandomPalette(const PaletteShape& shape, Rng& rng, DrawEntry&& entry) {
  StatusOr<PaletteMatrix> m = PaletteMatrix::Allocate(shape);
  if (!m.ok()) {
    fprintf(stderr, "RandomPalette: %s\n", m.status().message().c_str());
    abort();
  }
  PaletteMatrix mat = std::move(m).value();
  const size_t E = shape.num_entries();
  for (size_t g = 0; g < shape.num_groups(); ++g) {
    for (size_t e = 0; e < E; ++e) mat.set_entry(g, e, entry(g, e));
  }
  std::vector<uint8_t> idx(shape.cols);
  for (size_t r = 0; r < shape.rows; ++r) {
    for (uint8_t& i : idx) i = static_cast<uint8_t>(rng.Below(E));
    PackRow(shape, idx.data(), mat.mutable_row(r));
  }
  return mat;
}

// N x K at `bits`, groups of G rows, `type` codebooks that look like real
// weights: heavy-tailed entries around a small per-group offset. Group 1 (if
// any) is constant, to cover a codebook whose step is 0.
inline PaletteMatrix RandomPalette(Rng& rng, size_t N, size_t K, int bits, size_t G,
                                   ElementType type) {
  const PaletteShape shape{N, K, bits, G, type};  // rows, cols, bits, group_rows, codebook
  float offset = 0.0f;
  return RandomPalette(shape, rng, [&](size_t g, size_t e) {
    if (e == 0) offset = rng.Uniform(-0.02f, 0.02f);
    return g == 1 ? 0.03f : offset + rng.HeavyTailed(0.05f);
  });
}

// N x K at `bits`, groups of 16 rows, f16 codebooks of Gaussian entries with
// `stddev` (for tests whose checks do not depend on realistic codebooks, and
// benchmarks, whose speed does not depend on the values).
inline PaletteMatrix RandomGaussianPalette(Rng& rng, size_t N, size_t K, int bits,
                                           float stddev) {
  const PaletteShape shape{N, K, bits, 16, ElementType::kF16};
  return RandomPalette(shape, rng, [&](size_t, size_t) { return rng.Gaussian(stddev); });
}

// An adapter for `base` with rank-`rank` factors on every projection of
// every layer, stored as `type` with `scale`: A (rank x K) then B (N x rank)
// of N(0, stddev^2) values, layer by layer in kAllProjections order.
inline StatusOr<Adapter> RandomAdapter(const std::string& name, const BaseShapes& base,
                                       size_t rank, ElementType type, float scale, float stddev,
                                       Rng& rng) {
  StatusOr<Adapter> a = Adapter::Create(name, base);
  if (!a.ok()) return a.status();
  for (size_t l = 0; l < base.num_layers; ++l) {
    for (Projection p : kAllProjections) {
      const std::vector<float> fa = rng.GaussianVector(rank * base.Cols(p), stddev);
      const std::vector<float> fb = rng.GaussianVector(base.Rows(p) * rank, stddev);
      const Status s = a->AddF32(l, p, rank, fa.data(), fb.data(), scale, type);
      if (!s.ok()) return s;
    }
  }
  return a;
}

}  // namespace test
}  // namespace lutra

#endif  // LUTRA_TESTS_SUPPORT_RANDOM_WEIGHTS_H_
