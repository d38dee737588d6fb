// Codebook tuning's model-independent half (quantize/codebook_tune.h): the
// dense-to-entry gradient reduction against a brute-force sum, Adam
// converging on a least-squares fit, rounding to the stored type, and
// input validation. Scalar C++ (no per-target code), so these tests run once.
#include "lutra/quantize/codebook_tune.h"

#include <stddef.h>
#include <stdint.h>

#include <cmath>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "lutra/format/palette.h"

namespace lutra {
namespace {

// Small LCG: reproducible inputs.
struct Rng {
  uint64_t s;
  float Uniform() {  // [-1, 1)
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return float(int32_t(s >> 32)) / 2147483648.0f;
  }
  uint32_t Below(uint32_t n) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return uint32_t(s >> 33) % n;
  }
};

// A random palettized matrix (random indices and entries).
PaletteMatrix RandomPalette(size_t rows, size_t cols, int bits, size_t group, ElementType type,
                            Rng& rng) {
  PaletteShape shape;
  shape.rows = rows, shape.cols = cols, shape.bits = bits, shape.group_rows = group;
  shape.codebook = type;
  StatusOr<PaletteMatrix> pm = PaletteMatrix::Allocate(shape);
  REQUIRE(pm.ok());
  for (size_t r = 0; r < rows; ++r) {
    for (size_t c = 0; c < cols; ++c) pm->set_index(r, c, rng.Below(uint32_t(1) << bits));
  }
  for (size_t g = 0; g < shape.num_groups(); ++g) {
    for (size_t e = 0; e < shape.num_entries(); ++e) pm->set_entry(g, e, 0.1f * rng.Uniform());
  }
  return std::move(*pm);
}

TEST_CASE("CodebookTuner dequantizes like the view and reduces gradients per entry") {
  Rng rng{7};
  const struct {
    size_t rows, cols;
    int bits;
    size_t group;
  } shapes[] = {{5, 37, 3, 2}, {16, 64, 4, 16}, {17, 33, 2, 4}, {3, 130, 4, 1}, {9, 20, 8, 16}};
  for (const auto& s : shapes) {
    PaletteMatrix pm = RandomPalette(s.rows, s.cols, s.bits, s.group, ElementType::kF16, rng);
    const PaletteView v = pm.view();
    StatusOr<CodebookTuner> t = CodebookTuner::Create(v);
    REQUIRE(t.ok());
    std::vector<float> w(s.rows * s.cols);
    t->Dequantize(w.data());
    for (size_t r = 0; r < s.rows; ++r) {
      for (size_t c = 0; c < s.cols; ++c) REQUIRE(w[r * s.cols + c] == v.weight(r, c));
    }
    // Brute force: d/d entry(g, j) of sum(grad_w * W) is the sum of grad_w
    // over the weights that read that entry.
    std::vector<float> gw(s.rows * s.cols);
    for (float& x : gw) x = rng.Uniform();
    std::vector<float> ge(v.shape.num_groups() * v.shape.num_entries());
    t->ReduceGradient(gw.data(), ge.data());
    for (size_t g = 0; g < v.shape.num_groups(); ++g) {
      for (size_t j = 0; j < v.shape.num_entries(); ++j) {
        double want = 0.0;
        for (size_t r = 0; r < s.rows; ++r) {
          for (size_t c = 0; c < s.cols; ++c) {
            if (r / s.group == g && v.index(r, c) == j) want += gw[r * s.cols + c];
          }
        }
        CHECK(std::fabs(ge[g * v.shape.num_entries() + j] - want) <= 1e-5 * (1.0 + std::fabs(want)));
      }
    }
  }
}

TEST_CASE("CodebookTuner's Adam fits the entries of a least-squares target") {
  Rng rng{11};
  // Target: the same indices with other entries; the loss 0.5 ||W - T||^2
  // has gradient W - T, and its minimum (per entry, the mean of the targets
  // that read it) is the other codebook itself.
  PaletteMatrix pm = RandomPalette(12, 40, 3, 4, ElementType::kF16, rng);
  PaletteMatrix target = RandomPalette(12, 40, 3, 4, ElementType::kF32, rng);
  for (size_t r = 0; r < 12; ++r) {
    for (size_t c = 0; c < 40; ++c) target.set_index(r, c, pm.view().index(r, c));
  }
  std::vector<float> t(12 * 40);
  for (size_t r = 0; r < 12; ++r) {
    for (size_t c = 0; c < 40; ++c) t[r * 40 + c] = target.view().weight(r, c);
  }
  StatusOr<CodebookTuner> tu = CodebookTuner::Create(pm.view());
  REQUIRE(tu.ok());
  std::vector<float> w(t.size()), g(t.size());
  const auto loss = [&]() {
    tu->Dequantize(w.data());
    double l = 0.0;
    for (size_t i = 0; i < w.size(); ++i) l += 0.5 * double(w[i] - t[i]) * (w[i] - t[i]);
    return l;
  };
  const double before = loss();
  for (int step = 0; step < 1500; ++step) {
    tu->Dequantize(w.data());
    for (size_t i = 0; i < w.size(); ++i) g[i] = w[i] - t[i];
    tu->Step(g.data(), 0.01f * float(1500 - step) / 1500.0f);
  }
  const double after = loss();
  INFO("loss " << before << " -> " << after);
  CHECK(after < 1e-4 * before);

  // Store rounds to the matrix's codebook type (f16) and keeps the indices.
  REQUIRE(tu->Store(&pm).ok());
  const PaletteView v = pm.view();
  for (size_t g2 = 0; g2 < v.shape.num_groups(); ++g2) {
    for (size_t e = 0; e < v.shape.num_entries(); ++e) {
      const float want = tu->entries()[g2 * v.shape.num_entries() + e];
      CHECK(v.entry(g2, e) == RoundToElementType(want, ElementType::kF16));
    }
  }
  for (size_t r = 0; r < 12; ++r) {
    for (size_t c = 0; c < 40; ++c) CHECK(v.index(r, c) == target.view().index(r, c));
  }
}

TEST_CASE("Index tuning moves weights to the entry their gradient points at") {
  Rng rng{19};
  // Target: the same codebooks with other (random) indices. The loss
  // 0.5 ||W - T||^2 cannot be fitted by the entries alone; with index tuning
  // the latents walk to the target weights and each index becomes the
  // target's (the entries are distinct, so the nearest entry is unique).
  for (int bits : {2, 4}) {
    INFO("bits " << bits);
    const size_t rows = 6, cols = 45, group = 2;
    PaletteMatrix pm = RandomPalette(rows, cols, bits, group, ElementType::kF32, rng);
    const PaletteShape& sh = pm.shape();
    for (size_t g = 0; g < sh.num_groups(); ++g) {  // spaced entries, 0.05 apart
      for (size_t e = 0; e < sh.num_entries(); ++e) pm.set_entry(g, e, 0.05f * float(e) - 0.3f);
    }
    std::vector<uint8_t> want(rows * cols);
    std::vector<float> t(rows * cols);
    for (size_t r = 0; r < rows; ++r) {
      for (size_t c = 0; c < cols; ++c) {
        want[r * cols + c] = uint8_t(rng.Below(uint32_t(1) << bits));
        t[r * cols + c] = pm.view().entry(r / group, want[r * cols + c]);
      }
    }
    StatusOr<CodebookTuner> tu = CodebookTuner::Create(pm.view());
    REQUIRE(tu.ok());
    tu->EnableIndexTuning();
    REQUIRE(tu->tunes_indices());
    CHECK(tu->ChangedIndices() == 0);
    std::vector<float> w(t.size()), g(t.size());
    for (int step = 0; step < 400; ++step) {
      tu->Dequantize(w.data());
      for (size_t i = 0; i < w.size(); ++i) g[i] = w[i] - t[i];
      // Latents only (lr 0 for the entries): the codebook stays the target's.
      tu->Step(g.data(), 0.0f);
      tu->StepIndices(g.data(), 0.04f * float(400 - step) / 400.0f);
    }
    size_t moved = 0;
    for (size_t i = 0; i < want.size(); ++i) moved += pm.view().index(i / cols, i % cols) != want[i];
    CHECK(tu->ChangedIndices() == moved);
    // Store packs the new indices.
    REQUIRE(tu->Store(&pm).ok());
    for (size_t r = 0; r < rows; ++r) {
      for (size_t c = 0; c < cols; ++c) CHECK(pm.view().index(r, c) == want[r * cols + c]);
    }
  }
}

TEST_CASE("Adam: unused parameters stay put, steps are about lr") {
  Adam adam(3);
  float p[3] = {1.0f, 2.0f, 3.0f};
  const float g[3] = {0.5f, 0.0f, -1e-6f};
  adam.Step(g, 0.1f, p);
  // The first step is lr * sign(grad) (bias-corrected m / sqrt(v) = +-1),
  // whatever the gradient's scale.
  CHECK(std::fabs(p[0] - 0.9f) < 1e-5f);
  CHECK(p[1] == 2.0f);
  CHECK(std::fabs(p[2] - 3.1f) < 1e-3f);
  CHECK(adam.steps() == 1);
}

TEST_CASE("CodebookTuner rejects bad input") {
  PaletteView empty;
  CHECK(!CodebookTuner::Create(empty).ok());
  Rng rng{3};
  PaletteMatrix a = RandomPalette(4, 16, 4, 2, ElementType::kF16, rng);
  PaletteMatrix b = RandomPalette(4, 16, 4, 4, ElementType::kF16, rng);
  StatusOr<CodebookTuner> t = CodebookTuner::Create(a.view());
  REQUIRE(t.ok());
  const Status s = t->Store(&b);
  CHECK(!s.ok());
  CHECK(s.message().find("another shape") != std::string::npos);
}

}  // namespace
}  // namespace lutra
