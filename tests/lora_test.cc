// Tests of LoRA adapters: the fused GEMV epilogue against a scalar reference
// on every target (all projections, f16 and bf16 factors, several ranks and
// bit widths), switching adapters between calls, the adapter file format
// (round trip, llama.cpp-style files, rejection of bad files with the tensor
// named) and the accuracy-recovery adapter.
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

// The fused epilogue is the same code at every index width: the kernels are
// compiled for the widths these tests use only (kernels/matmul.h), which
// cut this file's compile time by a third (350 s -> 237 s on the 2-core
// host); gemv_test and gemm_test cover every width.
// This binary links no other lutra object, so the macro is the same in all
// of its code.
#define LUTRA_KERNEL_BITS ((1 << 2) | (1 << 3) | (1 << 4))

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tests/lora_test.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "lutra/format/lora.h"
#include "lutra/format/lora_file.h"
#include "lutra/kernels/gemm-inl.h"
#include "lutra/kernels/gemv-inl.h"
#include "lutra/quantize/recovery.h"
#include "lutra/runtime/lora_manager.h"
#include "tests/support/random_weights.h"
#include "tests/test_util.h"

#ifndef LUTRA_LORA_TEST_ONCE_
#define LUTRA_LORA_TEST_ONCE_
namespace lutra {
namespace lora_test {

// An adapter with random factors on every projection of every layer.
inline Adapter RandomAdapter(const std::string& name, const BaseShapes& base, size_t rank,
                             ElementType type, float scale, test::Rng& rng) {
  StatusOr<Adapter> a = test::RandomAdapter(name, base, rank, type, scale, 0.1f, rng);
  REQUIRE(a.ok());
  return std::move(a).value();
}

// Reference y = W_hat x (+ s B (A x)) in double, with a per-element
// tolerance: f32 rounding of the dot (K terms) plus that of the LoRA terms.
struct Reference {
  std::vector<double> y, tol;
};
inline Reference ReferenceOutput(const PaletteView& w, const float* x,
                                 const LoraFactors* lora) {
  const size_t N = w.shape.rows, K = w.shape.cols;
  Reference ref;
  ref.y.resize(N);
  ref.tol.resize(N);
  std::vector<float> row(K);
  const double norm_x = test::L2Norm(x, K);
  std::vector<double> ax;
  double ax_tol = 0.0, norm_ax = 0.0;
  if (lora) {
    ax.resize(lora->rank());
    for (size_t r = 0; r < lora->rank(); ++r) {
      double sum = 0.0, norm_a = 0.0;
      for (size_t k = 0; k < K; ++k) {
        sum += double(lora->A(r, k)) * x[k];
        norm_a += double(lora->A(r, k)) * lora->A(r, k);
      }
      ax[r] = sum;
      norm_ax += sum * sum;
      ax_tol = std::max(ax_tol, test::DotTolerance(K, std::sqrt(norm_a), norm_x));
    }
    norm_ax = std::sqrt(norm_ax);
  }
  for (size_t n = 0; n < N; ++n) {
    DequantizeRow(w, n, row.data());
    double sum = 0.0;
    for (size_t k = 0; k < K; ++k) sum += double(row[k]) * x[k];
    double tol = test::DotTolerance(K, test::L2Norm(row.data(), K), norm_x);
    if (lora) {
      double delta = 0.0, norm_b = 0.0;
      for (size_t r = 0; r < lora->rank(); ++r) {
        delta += double(lora->B(n, r)) * ax[r];
        norm_b += double(lora->B(n, r)) * lora->B(n, r);
      }
      norm_b = std::sqrt(norm_b);
      sum += double(lora->scale()) * delta;
      // B's dot over rank terms, A x's error propagated through B, the add.
      tol += std::abs(lora->scale()) *
             (test::DotTolerance(lora->rank(), norm_b, norm_ax) +
              norm_b * std::sqrt(double(lora->rank())) * ax_tol);
      tol += 4.0 * 1.2e-7 * std::abs(sum);
    }
    ref.y[n] = sum;
    ref.tol[n] = tol;
  }
  return ref;
}

// A tiny base with odd sizes: dim 67, hidden 131, q 67, kv 35, 2 layers.
inline BaseShapes OddBase() { return BaseShapes::Llama(2, 67, 131, 67, 35); }

}  // namespace lora_test
}  // namespace lutra
#endif  // LUTRA_LORA_TEST_ONCE_

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {

// y = W x + s B (A x) through the GEMV epilogue equals the scalar reference
// for every projection shape, f16 and bf16 factors, ranks 1, 5, 16, and
// bit widths 2, 3, 4; in the exact (kF32) precision directly, and in the
// int8 precision as the difference with and without the adapter (the
// epilogue adds the delta in f32 whatever the precision of W x).
void TestFusedGemvEpilogue() {
  using namespace lora_test;
  test::Rng rng(11);
  const BaseShapes base = OddBase();
  for (ElementType type : {ElementType::kF16, ElementType::kBF16}) {
    for (size_t rank : {1, 5, 16}) {
      const Adapter adapter = RandomAdapter("a", base, rank, type, 0.75f, rng);
      for (Projection p : kAllProjections) {
        const int bits = rank == 1 ? 2 : rank == 5 ? 3 : 4;
        const PaletteMatrix w =
            test::RandomGaussianPalette(rng, base.Rows(p), base.Cols(p), bits, 0.05f);
        const PreparedPalette pw = PreparedPalette::Make(w.view()).value();
        const std::vector<float> x = rng.GaussianVector(base.Cols(p));
        const LoraFactors* f = adapter.FindFactors(1, p);
        REQUIRE(f != nullptr);
        REQUIRE(adapter.Find(1, p) == &f->delta());
        const size_t N = base.Rows(p);
        INFO("projection " << ProjectionName(p) << " type " << ElementTypeName(type)
                           << " rank " << rank << " bits " << bits);
        Epilogue ep;
        ep.lora = adapter.Find(1, p);
        MatmulOptions exact;
        exact.precision = MatmulPrecision::kF32;
        std::vector<float> y(N);
        REQUIRE(Gemv(pw, x.data(), x.size(), ep, y.data(), N, nullptr, exact).ok());
        const Reference ref = ReferenceOutput(w.view(), x.data(), f);
        test::ExpectClose(y.data(), ref.y.data(), ref.tol.data(), N, "fused gemv f32");

        // Int8: (W x + delta) - (W x) == delta.
        std::vector<float> with(N), without(N);
        REQUIRE(Gemv(pw, x.data(), x.size(), ep, with.data(), N).ok());
        REQUIRE(Gemv(pw, x.data(), x.size(), Epilogue(), without.data(), N).ok());
        const Reference base_ref = ReferenceOutput(w.view(), x.data(), nullptr);
        std::vector<float> diff(N);
        std::vector<double> delta(N), tol(N);
        for (size_t n = 0; n < N; ++n) {
          diff[n] = with[n] - without[n];
          delta[n] = ref.y[n] - base_ref.y[n];
          // LoRA rounding plus the f32 rounding of the final add and subtract.
          tol[n] = (ref.tol[n] - base_ref.tol[n]) + 4.0 * 1.2e-7 * std::abs(with[n]) + 1e-30;
        }
        test::ExpectClose(diff.data(), delta.data(), tol.data(), N, "lora delta int8");
      }
    }
  }
}

// The same through the GEMM epilogue (prefill): M token rows at a row stride
// larger than K, every projection, f16 and bf16, each token row checked
// against the scalar reference; int8 precision as the with/without
// difference.
void TestFusedGemmEpilogue() {
  using namespace lora_test;
  test::Rng rng(13);
  const BaseShapes base = OddBase();
  for (ElementType type : {ElementType::kF16, ElementType::kBF16}) {
    const size_t rank = type == ElementType::kF16 ? 16 : 7;
    const Adapter adapter = RandomAdapter("g", base, rank, type, -1.25f, rng);
    for (Projection p : kAllProjections) {
      for (size_t M : {1, 3, 8}) {
        const size_t N = base.Rows(p), K = base.Cols(p), ldx = K + 3, ldy = N + 1;
        const PaletteMatrix w = test::RandomGaussianPalette(rng, N, K, 4, 0.05f);
        const PreparedPalette pw = PreparedPalette::Make(w.view()).value();
        const std::vector<float> X = rng.GaussianVector(M * ldx);
        const LoraFactors* f = adapter.FindFactors(0, p);
        INFO("gemm projection " << ProjectionName(p) << " type " << ElementTypeName(type)
                                << " M " << M);
        Epilogue ep;
        ep.lora = adapter.Find(0, p);
        MatmulOptions exact;
        exact.precision = MatmulPrecision::kF32;
        std::vector<float> Y(M * ldy), with(M * ldy), without(M * ldy);
        REQUIRE(Gemm(pw, X.data(), M, ldx, ep, Y.data(), ldy, nullptr, exact).ok());
        REQUIRE(Gemm(pw, X.data(), M, ldx, ep, with.data(), ldy).ok());
        REQUIRE(Gemm(pw, X.data(), M, ldx, Epilogue(), without.data(), ldy).ok());
        for (size_t m = 0; m < M; ++m) {
          const Reference ref = ReferenceOutput(w.view(), X.data() + m * ldx, f);
          test::ExpectClose(Y.data() + m * ldy, ref.y.data(), ref.tol.data(), N,
                            "fused gemm f32");
          const Reference base_ref = ReferenceOutput(w.view(), X.data() + m * ldx, nullptr);
          std::vector<float> diff(N);
          std::vector<double> delta(N), tol(N);
          for (size_t n = 0; n < N; ++n) {
            diff[n] = with[m * ldy + n] - without[m * ldy + n];
            delta[n] = ref.y[n] - base_ref.y[n];
            tol[n] = (ref.tol[n] - base_ref.tol[n]) +
                     4.0 * 1.2e-7 * std::abs(with[m * ldy + n]) + 1e-30;
          }
          test::ExpectClose(diff.data(), delta.data(), tol.data(), N, "lora delta gemm int8");
        }
      }
    }
  }
}

// Switching adapters between calls on the same prepared weights and the same
// scratch input gives each adapter's own reference output (no state leaks
// from one call to the next), also when the adapters come from the manager.
void TestSwitchAdapters() {
  using namespace lora_test;
  test::Rng rng(12);
  const BaseShapes base = OddBase();
  auto a1 = std::make_shared<const Adapter>(RandomAdapter("one", base, 16, ElementType::kF16, 1.0f, rng));
  auto a2 = std::make_shared<const Adapter>(RandomAdapter("two", base, 8, ElementType::kBF16, 2.0f, rng));
  AdapterManager manager(a1->bytes() + a2->bytes());
  REQUIRE(manager.Register("one", [a1] { return StatusOr<AdapterManager::AdapterPtr>(a1); }).ok());
  REQUIRE(manager.Register("two", [a2] { return StatusOr<AdapterManager::AdapterPtr>(a2); }).ok());
  const Projection p = Projection::kW2;  // dim x hidden
  const PaletteMatrix w =
      test::RandomGaussianPalette(rng, base.Rows(p), base.Cols(p), 4, 0.05f);
  const PreparedPalette pw = PreparedPalette::Make(w.view()).value();
  const size_t N = base.Rows(p);
  PreparedInput scratch;
  MatmulOptions exact;
  exact.precision = MatmulPrecision::kF32;
  const char* order[] = {"one", "two", "", "two", "one", "", "one"};
  for (int step = 0; step < 7; ++step) {
    const std::vector<float> x = rng.GaussianVector(base.Cols(p));
    AdapterManager::AdapterPtr adapter;
    if (order[step][0] != '\0') adapter = manager.Get(order[step]).value();
    Epilogue ep;
    ep.lora = adapter ? adapter->Find(0, p) : nullptr;
    std::vector<float> y(N);
    REQUIRE(Gemv(pw, x.data(), x.size(), ep, y.data(), N, nullptr, exact, &scratch).ok());
    const Reference ref =
        ReferenceOutput(w.view(), x.data(), adapter ? adapter->FindFactors(0, p) : nullptr);
    INFO("step " << step << " adapter '" << order[step] << "'");
    test::ExpectClose(y.data(), ref.y.data(), ref.tol.data(), N, "switched adapter");
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lutra {
HWY_EXPORT(TestFusedGemvEpilogue);
HWY_EXPORT(TestSwitchAdapters);
HWY_EXPORT(TestFusedGemmEpilogue);

namespace {

TEST_CASE("Fused GEMV LoRA epilogue matches W x + s B (A x) on every target") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestFusedGemvEpilogue)(); });
}

TEST_CASE("Fused GEMM LoRA epilogue matches the reference for every token") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestFusedGemmEpilogue)(); });
}

TEST_CASE("Switching adapters between calls gives each adapter's output") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestSwitchAdapters)(); });
}

TEST_CASE("Adapter validates targets and shapes") {
  const BaseShapes base = lora_test::OddBase();
  Adapter a = Adapter::Create("x", base).value();
  std::vector<float> fa(4 * 67, 0.1f), fb(35 * 4, 0.1f);
  CHECK(a.AddF32(0, Projection::kK, 4, fa.data(), fb.data(), 1.0f).ok());
  CHECK(a.Find(0, Projection::kK) != nullptr);
  CHECK(a.Find(0, Projection::kQ) == nullptr);
  CHECK(a.Find(7, Projection::kK) == nullptr);
  // Duplicate, out-of-range layer, bad rank, element counts, non-finite.
  CHECK(a.AddF32(0, Projection::kK, 4, fa.data(), fb.data(), 1.0f).message().find("twice") !=
        std::string::npos);
  CHECK(a.AddF32(2, Projection::kK, 4, fa.data(), fb.data(), 1.0f).message().find("layer 2") !=
        std::string::npos);
  CHECK(!a.AddFactors(1, Projection::kK, 0, fa.data(), 0, fb.data(), 0, ElementType::kF32,
                      ElementType::kF16, 1.0f).ok());
  CHECK(!a.AddFactors(1, Projection::kK, kMaxLoraRank + 1, fa.data(), 0, fb.data(), 0,
                      ElementType::kF32, ElementType::kF16, 1.0f).ok());
  const Status wrong = a.AddFactors(1, Projection::kK, 4, fa.data(), 4 * 66, fb.data(), 35 * 4,
                                    ElementType::kF32, ElementType::kF16, 1.0f, "my.tensor");
  CHECK(wrong.message().find("my.tensor") != std::string::npos);
  CHECK(wrong.message().find("4 x 67") != std::string::npos);
  fa[7] = INFINITY;
  CHECK(a.AddF32(1, Projection::kK, 4, fa.data(), fb.data(), 1.0f).message().find("element 7") !=
        std::string::npos);
  fa[7] = 0.1f;
  CHECK(!a.AddF32(1, Projection::kK, 4, fa.data(), fb.data(), NAN).ok());
  // f16 saturates instead of overflowing; bf16 keeps the range.
  fa[0] = 1e6f;
  REQUIRE(a.AddF32(1, Projection::kK, 4, fa.data(), fb.data(), 1.0f).ok());
  CHECK(a.FindFactors(1, Projection::kK)->A(0, 0) == 65504.0f);
  CHECK(a.num_targets() == 2);
  // The scalar reference apply: y += s B (A x) for a batch of 2 rows.
  {
    const LoraFactors* f = a.FindFactors(0, Projection::kK);
    test::Rng rng(7);
    const std::vector<float> x = rng.GaussianVector(2 * 67);
    std::vector<float> y(2 * 35, 1.0f);
    LoraReferenceApply(*f, x.data(), 2, y.data());
    for (size_t m = 0; m < 2; ++m) {
      for (size_t n = 0; n < 35; ++n) {
        double want = 0.0;
        for (size_t r = 0; r < 4; ++r) {
          double ax = 0.0;
          for (size_t k = 0; k < 67; ++k) ax += double(f->A(r, k)) * x[m * 67 + k];
          want += double(f->B(n, r)) * ax;
        }
        CHECK(std::abs(y[m * 35 + n] - (1.0 + want)) <= 1e-5 * (1.0 + std::abs(want)));
      }
    }
  }
  CHECK(a.bytes() > 2 * (4 * 67 + 35 * 4) * 2);
  CHECK(!BaseShapes().Validate().ok());
}

// ---------------------------------------------------------------------------
// Files

// A GGUF file from parts, for hand-made (llama.cpp-style or broken) files.
struct TensorSpec {
  std::string name;
  std::vector<uint64_t> ne;
  uint32_t type;  // ggml type id
  std::vector<uint8_t> data;
};
std::vector<uint8_t> BuildGguf(const std::vector<std::pair<std::string, std::string>>& strings,
                               const std::vector<std::pair<std::string, float>>& floats,
                               const std::vector<TensorSpec>& tensors) {
  GgufWriter out(3);
  for (const auto& kv : strings) out.AddString(kv.first, kv.second);
  for (const auto& kv : floats) out.AddF32(kv.first, kv.second);
  for (const TensorSpec& t : tensors) {
    out.AddTensor(t.name, static_cast<GgmlType>(t.type), t.ne, t.data.data(), t.data.size());
  }
  auto bytes = out.Finish();
  REQUIRE(bytes.ok());
  return std::move(bytes).value();
}

std::vector<uint8_t> F32Bytes(const std::vector<float>& v) {
  std::vector<uint8_t> b(v.size() * 4);
  memcpy(b.data(), v.data(), b.size());
  return b;
}

// stories260K-like base: dim 64, hidden 172, q 64, kv 32, 5 layers.
BaseShapes StoriesBase() { return BaseShapes::Llama(5, 64, 172, 64, 32); }

TEST_CASE("Adapter file round trip keeps bits, scales, names") {
  test::Rng rng(21);
  const BaseShapes base = StoriesBase();
  Adapter a = Adapter::Create("my-task", base).value();
  a.set_kind("task");
  // Mixed ranks, types and scales on a subset of layers.
  const struct { size_t layer; Projection p; size_t rank; ElementType type; float scale; } spec[] = {
      {0, Projection::kQ, 16, ElementType::kF16, 1.0f},
      {0, Projection::kW2, 8, ElementType::kBF16, 0.5f},
      {3, Projection::kV, 16, ElementType::kF16, 2.0f},
      {4, Projection::kW3, 1, ElementType::kF32, 1.0f}};
  for (const auto& s : spec) {
    const auto fa = rng.GaussianVector(s.rank * base.Cols(s.p), 0.1f);
    const auto fb = rng.GaussianVector(base.Rows(s.p) * s.rank, 0.1f);
    REQUIRE(a.AddF32(s.layer, s.p, s.rank, fa.data(), fb.data(), s.scale, s.type).ok());
  }
  const std::string path = test::TempPath("roundtrip.gguf");
  REQUIRE(SaveAdapter(path, a).ok());
  auto loaded = LoadAdapter(path, base);
  REQUIRE(loaded.ok());
  const Adapter& b = **loaded;
  CHECK(b.name() == "my-task");
  CHECK(b.kind() == "task");
  REQUIRE(b.num_targets() == a.num_targets());
  for (const auto& s : spec) {
    const LoraFactors* fa = a.FindFactors(s.layer, s.p);
    const LoraFactors* fb = b.FindFactors(s.layer, s.p);
    REQUIRE(fb != nullptr);
    INFO("layer " << s.layer << " " << ProjectionName(s.p));
    CHECK(fb->rank() == s.rank);
    CHECK(fb->scale() == s.scale);
    // f32 factors in the file are stored as f16 by default on load.
    const ElementType want = s.type == ElementType::kF32 ? ElementType::kF16 : s.type;
    CHECK(fb->type() == want);
    if (s.type != ElementType::kF32) {
      CHECK(memcmp(fa->a(), fb->a(), fa->a_elements() * 2) == 0);
      CHECK(memcmp(fa->b(), fb->b(), fa->b_elements() * 2) == 0);
    }
  }
  CHECK(b.Find(1, Projection::kQ) == nullptr);
  // Through the manager: registered by file, loaded on first use.
  AdapterManager manager(size_t{1} << 20);
  REQUIRE(manager.RegisterFile("task", path, base).ok());
  REQUIRE(manager.RegisterFile("wrong-base", path, BaseShapes::Llama(4, 64, 172, 64, 32)).ok());
  auto from_manager = manager.Get("task");
  REQUIRE(from_manager.ok());
  CHECK((*from_manager)->name() == "task");
  CHECK((*from_manager)->num_targets() == 4);
  const auto wrong_base = manager.Get("wrong-base");
  CHECK(wrong_base.status().message().find("is for layer 4, the base model has 4 layers") !=
        std::string::npos);
  // User scale multiplies; the name can be overridden.
  LoadAdapterOptions opt;
  opt.scale = 0.5f;
  opt.name = "renamed";
  opt.f32_storage = ElementType::kF32;
  auto scaled = LoadAdapter(path, base, opt);
  REQUIRE(scaled.ok());
  CHECK((*scaled)->name() == "renamed");
  CHECK((*scaled)->FindFactors(3, Projection::kV)->scale() == 1.0f);
  CHECK((*scaled)->FindFactors(4, Projection::kW3)->type() == ElementType::kF32);
  // A different base model is rejected, naming the tensor.
  const auto other = LoadAdapter(path, BaseShapes::Llama(5, 64, 176, 64, 32));
  REQUIRE(!other.ok());
  CHECK(other.status().message().find("blk.0.ffn_down.weight.lora_a") != std::string::npos);
  remove(path.c_str());
}

TEST_CASE("llama.cpp GGUF LoRA adapters load with alpha / rank scaling") {
  test::Rng rng(22);
  const BaseShapes base = StoriesBase();
  const size_t r = 4;
  const auto qa = rng.GaussianVector(r * 64);    // ne [64, 4]
  const auto qb = rng.GaussianVector(64 * r);    // ne [4, 64]
  const auto da = rng.GaussianVector(r * 172);   // ffn_down: K = 172
  const auto db = rng.GaussianVector(64 * r);
  // lora_b before lora_a, like some converters write them.
  const std::vector<TensorSpec> tensors = {
      {"blk.2.attn_q.weight.lora_b", {r, 64}, 0, F32Bytes(qb)},
      {"blk.2.attn_q.weight.lora_a", {64, r}, 0, F32Bytes(qa)},
      {"blk.4.ffn_down.weight.lora_a", {172, r}, 0, F32Bytes(da)},
      {"blk.4.ffn_down.weight.lora_b", {r, 64}, 0, F32Bytes(db)}};
  const auto bytes = BuildGguf({{"general.architecture", "llama"},
                                {"general.type", "adapter"},
                                {"adapter.type", "lora"}},
                               {{"adapter.lora.alpha", 8.0f}}, tensors);
  LoadAdapterOptions opt;
  opt.f32_storage = ElementType::kF32;  // keep f32: exact comparison below
  auto a = ParseAdapterBytes(bytes.data(), bytes.size(), base, opt, "llama.gguf");
  REQUIRE(a.ok());
  CHECK(a->num_targets() == 2);
  const LoraFactors* q = a->FindFactors(2, Projection::kQ);
  REQUIRE(q != nullptr);
  CHECK(q->scale() == 2.0f);  // alpha 8 / rank 4
  CHECK(q->A(1, 5) == qa[1 * 64 + 5]);
  CHECK(q->B(7, 3) == qb[7 * r + 3]);
  const LoraFactors* d = a->FindFactors(4, Projection::kW2);
  REQUIRE(d != nullptr);
  CHECK(d->A(3, 171) == da[3 * 172 + 171]);
  // No alpha: scale 1.
  const auto no_alpha = BuildGguf({{"general.type", "adapter"}, {"adapter.type", "lora"}}, {},
                                  tensors);
  auto b = ParseAdapterBytes(no_alpha.data(), no_alpha.size(), base);
  REQUIRE(b.ok());
  CHECK(b->FindFactors(2, Projection::kQ)->scale() == 1.0f);
  CHECK(b->FindFactors(2, Projection::kQ)->type() == ElementType::kF16);
}

TEST_CASE("Bad adapter files are rejected with the tensor named") {
  test::Rng rng(23);
  const BaseShapes base = StoriesBase();
  const size_t r = 4;
  auto good = [&](std::vector<TensorSpec> t,
                  std::vector<std::pair<std::string, std::string>> kv = {
                      {"general.type", "adapter"}, {"adapter.type", "lora"}}) {
    return BuildGguf(kv, {{"adapter.lora.alpha", 4.0f}}, t);
  };
  const TensorSpec qa = {"blk.1.attn_q.weight.lora_a", {64, r}, 0, F32Bytes(rng.GaussianVector(r * 64))};
  const TensorSpec qb = {"blk.1.attn_q.weight.lora_b", {r, 64}, 0, F32Bytes(rng.GaussianVector(r * 64))};
  auto parse = [&](const std::vector<uint8_t>& bytes) {
    return ParseAdapterBytes(bytes.data(), bytes.size(), base, LoadAdapterOptions(), "bad.gguf");
  };
  auto expect_error = [&](const std::vector<uint8_t>& bytes, const std::string& needle) {
    const auto a = parse(bytes);
    INFO("expecting an error containing '" << needle << "'");
    REQUIRE(!a.ok());
    INFO("got: " << a.status().message());
    CHECK(a.status().message().find(needle) != std::string::npos);
  };
  REQUIRE(parse(good({qa, qb})).ok());

  // Truncated anywhere: header, metadata, tensor infos, data.
  const auto full = good({qa, qb});
  for (size_t cut : {size_t{0}, size_t{3}, size_t{10}, size_t{30}, size_t{100}, size_t{200},
                     full.size() / 2, full.size() - 1}) {
    const std::vector<uint8_t> part(full.begin(), full.begin() + cut);
    INFO("truncated to " << cut << " of " << full.size() << " bytes");
    CHECK(!parse(part).ok());
  }
  // Wrong shapes: each error names the tensor and the shape it needs.
  TensorSpec wide = qa;
  wide.ne = {65, r};
  wide.data = F32Bytes(rng.GaussianVector(r * 65));
  expect_error(good({wide, qb}), "'blk.1.attn_q.weight.lora_a' has shape [65, 4]");
  TensorSpec rank_mismatch = qb;
  rank_mismatch.ne = {r + 1, 64};
  rank_mismatch.data = F32Bytes(rng.GaussianVector((r + 1) * 64));
  expect_error(good({qa, rank_mismatch}), "'blk.1.attn_q.weight.lora_b' has shape [5, 64]");
  TensorSpec three_d = qa;
  three_d.ne = {64, r, 1};
  expect_error(good({three_d, qb}), "'blk.1.attn_q.weight.lora_a' has 3 dimensions");
  // Wrong types: quantized / integer factors.
  TensorSpec int_type = qa;
  int_type.type = 26;  // i32
  expect_error(good({int_type, qb}), "'blk.1.attn_q.weight.lora_a' has type");
  // Missing partner, duplicates, layers and targets the base does not have.
  expect_error(good({qa}), "has no matching 'blk.1.attn_q.weight.lora_b'");
  TensorSpec layer9a = qa, layer9b = qb;
  layer9a.name = "blk.9.attn_q.weight.lora_a";
  layer9b.name = "blk.9.attn_q.weight.lora_b";
  expect_error(good({layer9a, layer9b}), "'blk.9.attn_q.weight.lora_a' is for layer 9");
  TensorSpec out_a = qa;
  out_a.name = "output.weight.lora_a";
  expect_error(good({out_a, qb}), "'output.weight.lora_a' adapts 'output'");
  TensorSpec odd = qa;
  odd.name = "blk.1.attn_q.weight.lora_c";
  expect_error(good({odd, qb}), "'blk.1.attn_q.weight.lora_c' is not a LoRA factor");
  // Header keys.
  expect_error(good({qa, qb}, {{"general.type", "model"}, {"adapter.type", "lora"}}),
               "general.type is 'model'");
  expect_error(good({qa, qb}, {{"general.type", "adapter"}, {"adapter.type", "cvec"}}),
               "adapter.type is 'cvec'");
  expect_error(good({}), "no LoRA tensors");
  // Non-finite values name the tensor.
  TensorSpec nan_b = qb;
  const float nan = std::nanf("");
  memcpy(nan_b.data.data() + 4 * 9, &nan, 4);
  expect_error(good({qa, nan_b}), "blk.1.attn_q.weight: B element 9 is not finite");
  // A missing file.
  const auto missing = LoadAdapter(test::TempPath("does_not_exist.gguf"), base);
  CHECK(missing.status().code() == StatusCode::kNotFound);
}

// ---------------------------------------------------------------------------
// Recovery adapter

// W = W_hat + L with L of rank 3: the recovery adapter must find L (up to
// f16 rounding of the factors), so W_hat + B A ~= W.
TEST_CASE("Recovery adapter recovers a planted low-rank residual") {
  test::Rng rng(31);
  const BaseShapes base = lora_test::OddBase();
  const Projection p = Projection::kW1;  // 131 x 67
  const size_t N = base.Rows(p), K = base.Cols(p);
  const PaletteMatrix q = test::RandomGaussianPalette(rng, N, K, 2, 0.05f);
  std::vector<float> w(N * K);
  REQUIRE(Dequantize(q.view(), w.data(), w.size()).ok());
  const auto u = rng.GaussianVector(N * 3, 0.02f), v = rng.GaussianVector(3 * K, 0.02f);
  for (size_t n = 0; n < N; ++n) {
    for (size_t k = 0; k < K; ++k) {
      for (size_t t = 0; t < 3; ++t) w[n * K + k] += u[n * 3 + t] * v[t * K + k];
    }
  }
  RecoveryOptions opt;
  opt.rank = 3;
  std::vector<RecoveryMatrixStats> stats;
  auto adapter = BuildRecoveryAdapter(base, {{0, p, w.data(), q.view()}}, opt, &stats);
  REQUIRE(adapter.ok());
  CHECK(adapter->kind() == "recovery");
  REQUIRE(stats.size() == 1);
  INFO("error before " << stats[0].rel_error_quantized << " after " << stats[0].rel_error_recovered);
  CHECK(stats[0].rel_error_quantized > 1e-3);
  CHECK(stats[0].rel_error_recovered < 1e-3 * stats[0].rel_error_quantized + 1e-5);
  // Independently: W_hat + s B A vs W element by element.
  const LoraFactors* f = adapter->FindFactors(0, p);
  REQUIRE(f != nullptr);
  double err = 0.0, norm = 0.0;
  std::vector<float> row(K);
  for (size_t n = 0; n < N; ++n) {
    DequantizeRow(q.view(), n, row.data());
    for (size_t k = 0; k < K; ++k) {
      double ba = 0.0;
      for (size_t t = 0; t < f->rank(); ++t) ba += double(f->B(n, t)) * f->A(t, k);
      const double e = w[n * K + k] - (row[k] + f->scale() * ba);
      err += e * e;
      norm += double(w[n * K + k]) * w[n * K + k];
    }
  }
  CHECK(std::abs(std::sqrt(err / norm) - stats[0].rel_error_recovered) <= 1e-6);
}

TEST_CASE("Recovery error falls as rank grows; alternating rounds do not hurt") {
  test::Rng rng(32);
  const BaseShapes base = BaseShapes::Llama(1, 96, 160, 96, 48);
  const Projection p = Projection::kW2;  // 96 x 160
  const size_t N = base.Rows(p), K = base.Cols(p);
  std::vector<float> w(N * K);
  for (float& x : w) x = rng.HeavyTailed(0.02f);
  PalettizeOptions popt;
  popt.bits = 2;
  const PaletteMatrix q = Palettize(w.data(), N, K, popt).value();
  double prev = 1e30;
  for (size_t rank : {1, 4, 16, 32}) {
    RecoveryOptions opt;
    opt.rank = rank;
    std::vector<RecoveryMatrixStats> st;
    REQUIRE(BuildRecoveryAdapter(base, {{0, p, w.data(), q.view()}}, opt, &st).ok());
    INFO("rank " << rank << " error " << st[0].rel_error_recovered << " previous " << prev);
    CHECK(st[0].rel_error_recovered < prev);
    CHECK(st[0].rel_error_recovered < st[0].rel_error_quantized);
    prev = st[0].rel_error_recovered;
  }
  RecoveryOptions alt;
  alt.rank = 8;
  alt.palettize = popt;
  alt.rounds = 0;
  auto r0 = BuildRecoveryAdapterAlternating(base, {{0, p, w.data(), PaletteView()}}, alt);
  REQUIRE(r0.ok());
  alt.rounds = 2;
  auto r2 = BuildRecoveryAdapterAlternating(base, {{0, p, w.data(), PaletteView()}}, alt);
  REQUIRE(r2.ok());
  REQUIRE(r2->requantized.size() == 1);
  INFO("round 0 " << r0->stats[0].rel_error_recovered << " rounds 2 "
                  << r2->stats[0].rel_error_recovered << " best round "
                  << r2->stats[0].best_round);
  CHECK(r2->stats[0].rel_error_recovered <= r0->stats[0].rel_error_recovered);
  // Deterministic across thread counts.
  RecoveryOptions one;
  one.rank = 4;
  one.threads = 1;
  RecoveryOptions four = one;
  four.threads = 4;
  std::vector<RecoveryTarget> targets = {{0, p, w.data(), q.view()}};
  auto t1 = BuildRecoveryAdapter(base, targets, one);
  auto t4 = BuildRecoveryAdapter(base, targets, four);
  REQUIRE(t1.ok());
  REQUIRE(t4.ok());
  CHECK(memcmp(t1->target(0).a(), t4->target(0).a(), t1->target(0).a_elements() * 2) == 0);
  // Bad input.
  RecoveryOptions bad;
  bad.rank = 0;
  CHECK(!BuildRecoveryAdapter(base, targets, bad).ok());
  std::vector<RecoveryTarget> wrong = {{0, Projection::kW1, w.data(), q.view()}};
  CHECK(BuildRecoveryAdapter(base, wrong, RecoveryOptions()).status().message().find(
            "base shape is 160 x 96") != std::string::npos);
}

}  // namespace
}  // namespace lutra
#endif  // HWY_ONCE
