// Mixed-precision bit allocator (mixed_bits.h): budget, optimality against
// brute force and uniform assignments, sampling estimates, bad input.
//
// Scalar C++ (no per-target code), so these tests run once.
#include "lutra/quantize/mixed_bits.h"

#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "lutra/format/palette.h"
#include "lutra/quantize/palettize.h"
#include "tests/test_util.h"

namespace lutra {
namespace {

using test::Contains;

// A small llama-like model: per layer q, k, v, o (D x D), gate, up (H x D),
// down (D x H), plus an embedding. Difficulty varies: some tensors are
// Gaussian (easy), some heavy-tailed with outliers (hard), scales differ.
struct FakeModel {
  std::vector<std::vector<float>> data;
  std::vector<MixedBitsTensor> tensors;
};

FakeModel MakeModel(size_t layers, size_t D, size_t H, uint64_t seed) {
  test::Rng rng(seed);
  FakeModel m;
  std::vector<std::pair<std::string, std::pair<size_t, size_t>>> specs;
  specs.push_back({"embed", {4 * D, D}});
  for (size_t l = 0; l < layers; ++l) {
    const std::string p = "layer" + std::to_string(l) + ".";
    specs.push_back({p + "q", {D, D}});
    specs.push_back({p + "k", {D, D}});
    specs.push_back({p + "v", {D, D}});
    specs.push_back({p + "o", {D, D}});
    specs.push_back({p + "gate", {H, D}});
    specs.push_back({p + "up", {H, D}});
    specs.push_back({p + "down", {D, H}});
  }
  m.data.resize(specs.size());
  for (size_t t = 0; t < specs.size(); ++t) {
    const size_t rows = specs[t].second.first, cols = specs[t].second.second;
    std::vector<float>& d = m.data[t];
    d.resize(rows * cols);
    const float scale = 0.01f * float(1 + t % 4);
    const int kind = static_cast<int>(t % 3);  // 0 gaussian, 1 heavy, 2 heavy + outliers
    for (float& x : d) {
      x = kind == 0 ? rng.Gaussian(scale) : rng.HeavyTailed(scale);
      if (kind == 2 && rng.Below(200) == 0) x *= 20.0f;
    }
  }
  for (size_t t = 0; t < specs.size(); ++t) {
    MixedBitsTensor ten;
    ten.name = specs[t].first;
    ten.data = m.data[t].data();
    ten.rows = specs[t].second.first;
    ten.cols = specs[t].second.second;
    m.tensors.push_back(ten);
  }
  return m;
}

void CheckPlanConsistent(const MixedBitsPlan& plan, const MixedBitsOptions& opt,
                         const std::vector<MixedBitsTensor>& tensors) {
  size_t bytes = 0, weights = 0;
  double err = 0.0;
  REQUIRE(plan.tensors.size() == tensors.size());
  for (size_t t = 0; t < tensors.size(); ++t) {
    const TensorBits& tb = plan.tensors[t];
    CHECK(tb.name == tensors[t].name);
    PaletteShape s;
    s.rows = tensors[t].rows;
    s.cols = tensors[t].cols;
    s.bits = tb.bits;
    s.group_rows = opt.group_rows;
    s.codebook = opt.codebook;
    CHECK(tb.bytes == s.total_bytes());  // exact bytes, codebooks included
    CHECK(tb.bits_per_weight == s.bits_per_weight());
    CHECK(tb.num_weights == s.rows * s.cols);
    bytes += tb.bytes;
    weights += tb.num_weights;
    err += tb.error;
  }
  CHECK(plan.total_bytes == bytes);
  CHECK(plan.total_weights == weights);
  CHECK(std::abs(plan.total_error - err) <= 1e-12 * err);
  CHECK(plan.achieved_bits == 8.0 * double(bytes) / double(weights));
  CHECK(plan.total_bytes <= plan.budget_bytes);
  CHECK(plan.achieved_bits <= opt.target_bits);
}

// Naive split that ignores errors: the widest width for tensors in the given
// order (file order or reversed) while the budget still has room for every
// remaining tensor at the narrowest width. Candidates list widths ascending.
double NaiveError(const MixedBitsPlan& plan, bool reverse) {
  const size_t T = plan.tensors.size();
  auto at = [&](size_t i) -> const TensorCandidates& {
    return plan.tensors[reverse ? T - 1 - i : i].candidates;
  };
  size_t rest_min = 0;
  for (size_t i = 0; i < T; ++i) rest_min += at(i).bytes[0];
  size_t used = 0;
  double err = 0.0;
  for (size_t i = 0; i < T; ++i) {
    const TensorCandidates& c = at(i);
    rest_min -= c.bytes[0];
    const size_t wide = c.bits.size() - 1;
    const size_t o = used + c.bytes[wide] + rest_min <= plan.budget_bytes ? wide : 0;
    used += c.bytes[o];
    err += c.error[o];
  }
  CHECK(used <= plan.budget_bytes);  // the baseline itself is feasible
  return err;
}

TEST_CASE("Allocator meets the budget and beats uniform assignments") {
  FakeModel model = MakeModel(3, 128, 256, 21);
  MixedBitsOptions opt;
  opt.allowed_bits = {2, 3, 4};
  opt.sample_rows = 0;  // exact errors here; sampling is tested separately
  auto cands = EstimateTensorErrors(model.tensors, opt);
  REQUIRE(cands.ok());

  // Restricts the {2,3,4} candidates to a subset of widths (as if estimated
  // with that allowed set; saves palettizing again).
  auto subset = [&](const std::vector<int>& allowed) {
    std::vector<TensorCandidates> out = *cands;
    for (TensorCandidates& c : out) {
      TensorCandidates keep = c;
      keep.bits.clear();
      keep.bytes.clear();
      keep.error.clear();
      keep.group_rows.clear();
      for (size_t o = 0; o < c.bits.size(); ++o) {
        if (std::find(allowed.begin(), allowed.end(), c.bits[o]) != allowed.end()) {
          keep.bits.push_back(c.bits[o]);
          keep.bytes.push_back(c.bytes[o]);
          keep.error.push_back(c.error[o]);
          keep.group_rows.push_back(c.group_rows[o]);
        }
      }
      c = keep;
    }
    return out;
  };
  // Uniform 3 bits is the reference at its own budget.
  auto uniform3 = SolveBitAllocation(subset({3}), 3.2);
  REQUIRE(uniform3.ok());
  const double target = uniform3->achieved_bits;

  for (const std::vector<int>& allowed : {std::vector<int>{2, 4}, std::vector<int>{2, 3, 4}}) {
    opt.allowed_bits = allowed;
    opt.target_bits = target;
    auto plan = SolveBitAllocation(subset(allowed), target);
    REQUIRE(plan.ok());
    INFO(plan->ToString());
    CheckPlanConsistent(*plan, opt, model.tensors);
    CHECK(plan->achieved_bits >= target - 0.05);
    std::printf("[mixed_bits] allowed %zu widths: %.4f bpw (target %.4f), error %.4e vs "
                "uniform 3-bit %.4e (%.1f%% less)\n",
                allowed.size(), plan->achieved_bits, target, plan->total_error,
                uniform3->total_error, 100.0 * (1.0 - plan->total_error / uniform3->total_error));
    CHECK(plan->total_error < uniform3->total_error);

    // Naive splits that ignore errors must lose at the same budget.
    CHECK(plan->total_error < NaiveError(*plan, false));
    CHECK(plan->total_error < NaiveError(*plan, true));
  }

  // A sweep of targets: always within budget and within 0.05 below it.
  for (double t : {2.1, 2.5, 3.0, 3.5, 3.9}) {
    auto plan = SolveBitAllocation(*cands, t);  // cands hold {2,3,4}
    REQUIRE(plan.ok());
    INFO("target " << t << "\n" << plan->ToString());
    CHECK(plan->total_bytes <= plan->budget_bytes);
    CHECK(plan->achieved_bits <= t);
    CHECK(plan->achieved_bits >= t - 0.05);
  }
}

// The solver against exhaustive search on small random instances (convex and
// non-convex error curves).
TEST_CASE("Allocator solver is near the brute-force optimum") {
  test::Rng rng(22);
  const size_t T = 7;
  double worst = 1.0;
  for (int trial = 0; trial < 40; ++trial) {
    std::vector<TensorCandidates> cands(T);
    for (size_t t = 0; t < T; ++t) {
      TensorCandidates& c = cands[t];
      c.name = "t" + std::to_string(t);
      c.num_weights = 1000 * (1 + rng.Below(20));
      const double hard = rng.Uniform(0.1f, 10.0f);
      for (int b : {2, 3, 4}) {
        c.bits.push_back(b);
        c.bytes.push_back(c.num_weights * size_t(b) / 8 + 64);
        c.error.push_back(hard * double(c.num_weights) * std::pow(4.0, -b) *
                          rng.Uniform(0.7f, 1.3f));
      }
      c.sum_sq = double(c.num_weights);
    }
    const double target = rng.Uniform(2.3f, 3.8f);
    auto plan = SolveBitAllocation(cands, target);
    REQUIRE(plan.ok());
    CHECK(plan->total_bytes <= plan->budget_bytes);
    // Exhaustive: 3^7 = 2187 assignments.
    double best = std::numeric_limits<double>::infinity();
    size_t combos = 1;
    for (size_t t = 0; t < T; ++t) combos *= 3;
    for (size_t code = 0; code < combos; ++code) {
      size_t x = code, bytes = 0;
      double err = 0.0;
      for (size_t t = 0; t < T; ++t) {
        bytes += cands[t].bytes[x % 3];
        err += cands[t].error[x % 3];
        x /= 3;
      }
      if (bytes <= plan->budget_bytes) best = std::min(best, err);
    }
    CHECK(plan->total_error >= best * (1 - 1e-12));
    worst = std::max(worst, plan->total_error / best);
  }
  std::printf("[mixed_bits] worst solver/optimum error ratio over 40 instances: %.4f\n", worst);
  CHECK(worst <= 1.001);
}

TEST_CASE("Allocator sampling estimates the full error") {
  FakeModel model = MakeModel(1, 64, 1024, 23);  // gate/up have 1024 rows
  MixedBitsOptions opt;
  opt.sample_rows = 0;
  auto full = EstimateTensorErrors(model.tensors, opt);
  opt.sample_rows = 256;
  auto sampled = EstimateTensorErrors(model.tensors, opt);
  REQUIRE(full.ok());
  REQUIRE(sampled.ok());
  for (size_t t = 0; t < full->size(); ++t) {
    const TensorCandidates& f = (*full)[t];
    const TensorCandidates& s = (*sampled)[t];
    CHECK(f.bytes == s.bytes);  // bytes are always exact
    for (size_t o = 0; o < f.error.size(); ++o) {
      INFO(f.name << " bits " << f.bits[o] << " full " << f.error[o] << " sampled " << s.error[o]);
      CHECK(std::abs(s.error[o] - f.error[o]) <= 0.25 * f.error[o]);
    }
  }
}

TEST_CASE("Allocator edge targets and importance") {
  FakeModel model = MakeModel(1, 64, 96, 24);
  MixedBitsOptions opt;
  opt.allowed_bits = {2, 4, 6};
  opt.target_bits = 100.0;  // everything at the widest width
  auto plan = AllocateBits(model.tensors, opt);
  REQUIRE(plan.ok());
  for (const TensorBits& tb : plan->tensors) CHECK(tb.bits == 6);
  // Exactly the all-2-bit size is feasible; one byte less is not.
  auto cands = EstimateTensorErrors(model.tensors, opt);
  REQUIRE(cands.ok());
  size_t min_bytes = 0, weights = 0;
  for (const TensorCandidates& c : *cands) {
    min_bytes += c.bytes[0];
    weights += c.num_weights;
  }
  const double min_bits = 8.0 * double(min_bytes) / double(weights);
  auto low = SolveBitAllocation(*cands, min_bits + 1e-9);
  REQUIRE(low.ok());
  for (const TensorBits& tb : low->tensors) CHECK(tb.bits == 2);
  auto too_low = SolveBitAllocation(*cands, min_bits - 0.01);
  CHECK(!too_low.ok());
  CHECK(Contains(too_low.status().message(), "is below the minimum"));

  // Per-tensor widths: the embedding pinned at 6 bits, the rest allocated.
  {
    std::vector<MixedBitsTensor> pinned = model.tensors;
    pinned[0].allowed_bits = {6};
    MixedBitsOptions po;
    po.target_bits = 6.0;
    auto p = AllocateBits(pinned, po);
    INFO(p.status().message());
    REQUIRE(p.ok());
    CHECK(p->tensors[0].bits == 6);
    CHECK(p->tensors[0].candidates.bits == std::vector<int>{6});
    CHECK(p->tensors[1].candidates.bits == std::vector<int>{2, 4});
    CHECK(p->achieved_bits <= 6.0);
    pinned[0].allowed_bits = {6, 7};
    auto bad = AllocateBits(pinned, po);
    REQUIRE(!bad.ok());
    CHECK(Contains(bad.status().message(), "tensor 'embed': mixed bits: allowed_bits contains 7"));
  }

  // A tensor whose error counts 1000x gets the bits.
  opt.allowed_bits = {2, 4};
  opt.target_bits = 2.8;
  model.tensors[3].importance = 1000.0;
  auto imp = AllocateBits(model.tensors, opt);
  REQUIRE(imp.ok());
  CHECK(imp->tensors[3].bits == 4);
}

// Real weights: the stories260K llama2.c checkpoint (shared test models).
// Layout after the 7-int32 header: embedding (vocab x dim), rms_att (L x dim),
// wq (L x dim x dim), wk, wv (L x kv_dim x dim), wo (L x dim x dim), rms_ffn,
// w1 (L x hidden x dim), w2 (L x dim x hidden), w3 (L x hidden x dim), ...
TEST_CASE("Allocator on the stories260K weights") {
  const std::string dir = test::SharedModelsDir();
  if (dir.empty()) SKIP("shared models not found (../shared/models)");
  std::FILE* f = std::fopen((dir + "/stories260K.bin").c_str(), "rb");
  REQUIRE(f != nullptr);
  int32_t hdr[7];
  REQUIRE(std::fread(hdr, 4, 7, f) == 7);
  const size_t dim = hdr[0], hidden = hdr[1], L = hdr[2], heads = hdr[3], kv_heads = hdr[4];
  const size_t vocab = static_cast<size_t>(std::abs(hdr[5]));
  const size_t kv_dim = dim * kv_heads / heads;
  REQUIRE(dim == 64);
  std::vector<float> all(1 << 20);
  const size_t n = std::fread(all.data(), 4, all.size(), f);
  std::fclose(f);
  size_t off = 0;
  std::vector<MixedBitsTensor> tensors;
  auto take = [&](const std::string& name, size_t layers, size_t rows, size_t cols, bool add) {
    for (size_t l = 0; l < layers; ++l) {
      REQUIRE(off + rows * cols <= n);
      if (add) {
        MixedBitsTensor t;
        t.name = name + (layers > 1 ? std::to_string(l) : "");
        t.data = all.data() + off;
        t.rows = rows;
        t.cols = cols;
        tensors.push_back(t);
      }
      off += rows * cols;
    }
  };
  take("embed", 1, vocab, dim, true);
  take("rms_att", L, 1, dim, false);
  take("wq", L, dim, dim, true);
  take("wk", L, kv_dim, dim, true);
  take("wv", L, kv_dim, dim, true);
  take("wo", L, dim, dim, true);
  take("rms_ffn", L, 1, dim, false);
  take("w1", L, hidden, dim, true);
  take("w2", L, dim, hidden, true);
  take("w3", L, hidden, dim, true);

  MixedBitsOptions opt;
  opt.allowed_bits = {2, 4};
  opt.target_bits = 3.5;
  auto plan = AllocateBits(tensors, opt);
  REQUIRE(plan.ok());
  INFO(plan->ToString());
  CheckPlanConsistent(*plan, opt, tensors);
  CHECK(plan->achieved_bits >= 3.45);
  double min_snr4 = 300.0, min_snr2 = 300.0;
  for (const TensorBits& tb : plan->tensors) {
    const TensorCandidates& c = tb.candidates;
    min_snr2 = std::min(min_snr2, 10.0 * std::log10(c.sum_sq / c.error[0]));
    min_snr4 = std::min(min_snr4, 10.0 * std::log10(c.sum_sq / c.error[1]));
  }
  const double naive[2] = {NaiveError(*plan, false), NaiveError(*plan, true)};
  std::printf("[mixed_bits] stories260K: %zu tensors, %.4f bpw (target 3.5), error %.4e vs "
              "naive %.4e / %.4e; per-tensor SNR >= %.2f dB at 2 bits, %.2f dB at 4 bits\n",
              tensors.size(), plan->achieved_bits, plan->total_error, naive[0], naive[1],
              min_snr2, min_snr4);
  CHECK(plan->total_error < naive[0]);
  CHECK(plan->total_error < naive[1]);
  CHECK(min_snr2 >= 6.5);  // measured 7.09
  CHECK(min_snr4 >= 17.5);  // measured 18.58
}

TEST_CASE("Allocator rejects bad input with a clear message") {
  FakeModel model = MakeModel(1, 32, 48, 25);
  MixedBitsOptions opt;
  auto msg = [&](const std::vector<MixedBitsTensor>& t, const MixedBitsOptions& o) {
    auto r = AllocateBits(t, o);
    CHECK(!r.ok());
    return r.status().message();
  };
  opt.allowed_bits = {};
  CHECK(Contains(msg(model.tensors, opt), "allowed_bits is empty"));
  opt.allowed_bits = {2, 5};
  CHECK(Contains(msg(model.tensors, opt), "allowed_bits contains 5"));
  opt.allowed_bits = {2, 4, 2};
  CHECK(Contains(msg(model.tensors, opt), "lists 2 twice"));
  opt.allowed_bits = {2, 4};
  CHECK(Contains(msg({}, opt), "no tensors"));
  opt.target_bits = std::nan("");
  CHECK(Contains(msg(model.tensors, opt), "target_bits = nan"));
  opt.target_bits = 3.0;
  std::vector<MixedBitsTensor> bad = model.tensors;
  bad[2].data = nullptr;
  CHECK(Contains(msg(bad, opt), "tensor 'layer0.k'"));
  CHECK(Contains(msg(bad, opt), "weights pointer is null"));
  bad = model.tensors;
  model.data[4][7] = std::numeric_limits<float>::infinity();
  CHECK(Contains(msg(bad, opt), "tensor 'layer0.o': palettize: weight (0, 7) is infinite"));
  model.data[4][7] = 0.0f;
  bad[1].rows = 0;
  CHECK(Contains(msg(bad, opt), "tensor 'layer0.q'"));
  bad = model.tensors;
  bad[0].importance = -1.0;
  CHECK(Contains(msg(bad, opt), "importance = -1"));
}

}  // namespace
}  // namespace lutra
