// KVCache bookkeeping (ring indexing, append, truncate, memory use, errors)
// and the SIMD row conversions of AppendKV vs. scalar references, on every
// target.
#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tests/kv_cache_test.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "lutra/kernels/kv_cache-inl.h"
#include "lutra/kernels/kv_cache.h"
#include "tests/test_util.h"

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace {

KVCacheConfig Config(size_t layers, size_t kv_heads, size_t head_dim, size_t cap,
                     ElementType type, bool ring = true) {
  KVCacheConfig c;
  c.num_layers = layers;
  c.num_kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.capacity = cap;
  c.type = type;
  c.ring = ring;
  return c;
}

// Every stored row equals the scalar conversion of its source: f16/bf16
// bit-exact (both round to nearest even), int8 within max|x| / 254 and with
// the documented scale.
void TestConversions() {
  test::Rng rng(21);
  const ElementType types[] = {ElementType::kF32, ElementType::kF16, ElementType::kBF16, ElementType::kI8};
  for (ElementType type : types) {
    for (size_t hd : test::SweepSizes(300)) {
      const size_t kvh = 3, T = 5;
      StatusOr<KVCache> c = KVCache::Create(Config(2, kvh, hd, 4, type));
      REQUIRE(c.ok());
      std::vector<float> k = rng.GaussianVector(T * kvh * hd, 3.0f);
      std::vector<float> v = rng.GaussianVector(T * kvh * hd, 0.5f);
      if (hd > 3) {
        k[1] = 0.0f;
        k[2] = -1e-9f;  // tiny values, f16 subnormal range
        v[0] = 70000.0f;  // beyond f16's max: inf, as the scalar cast
      }
      // Zero row: int8 scale 0, all zeros.
      std::fill(k.begin() + hd, k.begin() + 2 * hd, 0.0f);
      REQUIRE(AppendKV(*c, 1, 0, T, k.data(), v.data()).ok());
      CHECK(c->start(1) == 1);  // 5 positions into capacity 4
      CHECK(c->end(1) == 5);
      CHECK(c->end(0) == 0);
      std::vector<float> row(hd);
      for (size_t p = 1; p < T; ++p) {
        for (size_t h = 0; h < kvh; ++h) {
          for (int kv = 0; kv < 2; ++kv) {
            const float* src = (kv == 0 ? k : v).data() + (p * kvh + h) * hd;
            c->DecodeRow(1, kv, h, p, row.data());
            INFO(ElementTypeName(type) << " hd=" << hd << " pos=" << p << " head=" << h
                                  << " kv=" << kv << " on " << test::CurrentTargetName());
            if (type == ElementType::kI8) {
              float mx = 0.0f;
              for (size_t i = 0; i < hd; ++i) mx = std::max(mx, std::abs(src[i]));
              const float scale = (kv == 0 ? c->KScales(1, h) : c->VScales(1, h))[c->Slot(p)];
              CHECK(scale == mx / 127.0f);
              size_t bad = 0;
              for (size_t i = 0; i < hd; ++i) {
                // Half a quantization step, plus f32 rounding of x * 127/max.
                bad += std::abs(row[i] - src[i]) > mx * (1.0f / 254 + 1e-6f);
              }
              CHECK(bad == 0);
            } else {
              size_t bad = 0;
              for (size_t i = 0; i < hd; ++i) {
                float expected = src[i];
                if (type == ElementType::kF16) {
                  expected = hwy::F32FromF16(hwy::F16FromF32(src[i]));
                } else if (type == ElementType::kBF16) {
                  expected = hwy::F32FromBF16(hwy::BF16FromF32(src[i]));
                }
                bad += !(row[i] == expected);
              }
              CHECK(bad == 0);
            }
          }
        }
      }
    }
  }
}

void TestBookkeeping() {
  const size_t hd = 8, kvh = 2, cap = 6;
  for (ElementType type : {ElementType::kF32, ElementType::kI8}) {
    StatusOr<KVCache> c = KVCache::Create(Config(3, kvh, hd, cap, type));
    REQUIRE(c.ok());
    std::vector<float> kv(30 * kvh * hd, 1.0f);  // up to 30 positions per append
    // Per layer positions; appends must be contiguous.
    REQUIRE(AppendKV(*c, 0, 0, 4, kv.data(), kv.data()).ok());
    CHECK((c->start(0) == 0 && c->end(0) == 4));
    Status st = AppendKV(*c, 0, 5, 1, kv.data(), kv.data());
    CHECK(st.code() == StatusCode::kInvalidArgument);
    CHECK(st.message().find("next position is 4") != std::string::npos);
    CHECK(c->end(0) == 4);  // unchanged on error
    // Ring: positions past capacity overwrite the oldest.
    REQUIRE(AppendKV(*c, 0, 4, 5, kv.data(), kv.data()).ok());
    CHECK((c->start(0) == 3 && c->end(0) == 9));
    CHECK(c->Slot(9) == 3);
    // More than capacity in one append keeps the last `capacity`.
    REQUIRE(AppendKV(*c, 0, 9, 20, kv.data(), kv.data()).ok());
    CHECK((c->start(0) == 23 && c->end(0) == 29));
    // Truncate: every layer; not beyond a layer's end; not below its start.
    REQUIRE(AppendKV(*c, 1, 0, 3, kv.data(), kv.data()).ok());
    REQUIRE(AppendKV(*c, 2, 0, 3, kv.data(), kv.data()).ok());
    st = c->Truncate(5);  // layer 1 ends at 3
    CHECK(st.code() == StatusCode::kOutOfRange);
    CHECK(c->end(0) == 29);  // nothing changed
    REQUIRE(AppendKV(*c, 1, 3, 26, kv.data(), kv.data()).ok());
    REQUIRE(AppendKV(*c, 2, 3, 26, kv.data(), kv.data()).ok());
    st = c->Truncate(20);  // positions < 23 were overwritten
    CHECK(st.code() == StatusCode::kOutOfRange);
    CHECK(st.message().find("overwrote") != std::string::npos);
    REQUIRE(c->Truncate(25).ok());
    for (size_t l = 0; l < 3; ++l) CHECK((c->start(l) == 23 && c->end(l) == 25));
    // Re-append after truncation: the ring start follows.
    REQUIRE(AppendKV(*c, 0, 25, 5, kv.data(), kv.data()).ok());
    CHECK((c->start(0) == 24 && c->end(0) == 30));
    REQUIRE(c->Truncate(0).ok());  // always allowed: reset
    for (size_t l = 0; l < 3; ++l) CHECK((c->start(l) == 0 && c->end(l) == 0));
    // Layer out of range, null rows.
    CHECK(AppendKV(*c, 3, 0, 1, kv.data(), kv.data()).code() == StatusCode::kOutOfRange);
    CHECK(AppendKV(*c, 0, 0, 1, nullptr, kv.data()).code() ==
          StatusCode::kInvalidArgument);
    CHECK(AppendKV(*c, 0, 0, 0, nullptr, nullptr).ok());  // nothing to append
  }
  // Fixed capacity: appending past it is an error, the cache unchanged.
  StatusOr<KVCache> f = KVCache::Create(Config(1, kvh, hd, cap, ElementType::kF16, false));
  REQUIRE(f.ok());
  std::vector<float> kv(10 * kvh * hd, 1.0f);
  REQUIRE(AppendKV(*f, 0, 0, 5, kv.data(), kv.data()).ok());
  Status st = AppendKV(*f, 0, 5, 2, kv.data(), kv.data());
  CHECK(st.code() == StatusCode::kOutOfRange);
  CHECK(st.message().find("fixed capacity 6") != std::string::npos);
  CHECK(f->end(0) == 5);
  CHECK(AppendKV(*f, 0, 5, 1, kv.data(), kv.data()).ok());
  // Empty cache.
  KVCache empty;
  CHECK(!AppendKV(empty, 0, 0, 1, kv.data(), kv.data()).ok());
}

void TestMemoryAndConfig() {
  // f16: layers x K,V x kv heads x capacity x head_dim x 2 bytes, no padding.
  StatusOr<KVCache> c = KVCache::Create(Config(2, 8, 128, 512, ElementType::kF16));
  REQUIRE(c.ok());
  CHECK(c->MemoryBytes() == size_t{2} * 2 * 8 * 512 * 128 * 2);
  CHECK(c->BytesPerPosition() == size_t{2} * 8 * 128 * 2);
  StatusOr<KVCache> q = KVCache::Create(Config(2, 8, 128, 512, ElementType::kI8));
  REQUIRE(q.ok());
  // int8 rows plus one f32 scale per (layer, K|V, head, slot).
  CHECK(q->MemoryBytes() == size_t{2} * 2 * 8 * 512 * 128 + size_t{2} * 2 * 8 * 512 * 4);
  CHECK(q->BytesPerPosition() == size_t{2} * 8 * (128 + 4));
  // Rows of every head start 64-byte aligned, even for odd sizes.
  StatusOr<KVCache> odd = KVCache::Create(Config(2, 3, 7, 5, ElementType::kBF16));
  REQUIRE(odd.ok());
  for (size_t l = 0; l < 2; ++l) {
    for (size_t h = 0; h < 3; ++h) {
      CHECK(reinterpret_cast<uintptr_t>(odd->K(l, h)) % 64 == 0);
      CHECK(reinterpret_cast<uintptr_t>(odd->V(l, h)) % 64 == 0);
    }
  }
  CHECK(odd->KScales(0, 0) == nullptr);
  // Invalid configurations.
  CHECK(KVCache::Create(Config(0, 1, 8, 8, ElementType::kF32)).status().code() ==
        StatusCode::kInvalidArgument);
  CHECK(KVCache::Create(Config(1, 1, 0, 8, ElementType::kF32)).status().code() ==
        StatusCode::kInvalidArgument);
  CHECK(KVCache::Create(Config(1, 1, 8, 0, ElementType::kF32)).status().code() ==
        StatusCode::kInvalidArgument);
  CHECK(KVCache::Create(Config(1, 1, 8, 8, static_cast<ElementType>(9))).status().code() ==
        StatusCode::kInvalidArgument);
  CHECK(KVCache::Create(Config(1000, 1000, 1000, 1000000, ElementType::kF32))
            .status()
            .code() == StatusCode::kResourceExhausted);
  CHECK(std::string(ElementTypeName(ElementType::kI8)) == "int8");
  CHECK(ElementBytes(ElementType::kBF16) == 2);
}

}  // namespace
}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lutra {
HWY_EXPORT(TestConversions);
HWY_EXPORT(TestBookkeeping);
HWY_EXPORT(TestMemoryAndConfig);

TEST_CASE("AppendKV conversions match scalar references", "[kv_cache]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestConversions)(); });
}
TEST_CASE("KVCache ring, append, truncate and errors", "[kv_cache]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestBookkeeping)(); });
}
TEST_CASE("KVCache memory use and config validation", "[kv_cache]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestMemoryAndConfig)(); });
}
}  // namespace lutra
#endif  // HWY_ONCE
