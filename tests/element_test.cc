// Element types (base/element.h, base/element-inl.h): the scalar conversions
// against independent references (exhaustive where the domain is 16 bits),
// and the vector loads and stores against the scalar path, bit-exact, on
// every target, for odd sizes and tails.
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tests/element_test.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "lutra/base/element-inl.h"
#include "lutra/base/element.h"
#include "tests/test_util.h"

#ifndef LUTRA_TESTS_ELEMENT_TEST_ONCE_
#define LUTRA_TESTS_ELEMENT_TEST_ONCE_
namespace lutra {
namespace element_test {

inline uint32_t Bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
inline float FromBits(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// Same value, or both NaN.
inline bool SameOrBothNaN(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) || Bits(a) == Bits(b);
}

template <typename T>
constexpr ElementType TypeOf() {
  return hwy::IsSame<T, float>()            ? ElementType::kF32
         : hwy::IsSame<T, hwy::float16_t>() ? ElementType::kF16
         : hwy::IsSame<T, hwy::bfloat16_t>() ? ElementType::kBF16
                                             : ElementType::kI8;
}

// f32 inputs that hit every special case of narrowing: zeros, f32 and f16
// subnormals, f16 ties, the f16 range limit (65504, the 65520 tie that
// overflows), int8 ties and limits, infinities and NaN.
inline std::vector<float> EdgeValues() {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> v = {0.0f, -0.0f, 1e-45f, -1e-45f, 1e-40f, 5.9604645e-8f,
                          2.9802322e-8f, 2.9802326e-8f, 6.1035156e-5f, 1.0f, -1.0f,
                          1.00048828125f, 1.00146484375f, 0.1f, -0.3f, 2.5f, 3.5f, -2.5f,
                          126.5f, 127.0f, 127.5f, 128.0f, -128.0f, -128.5f, -129.0f, 300.0f,
                          65504.0f, 65505.0f, 65519.99f, 65520.0f, -65520.0f, 70000.0f,
                          -70000.0f, 1e6f, 3.4028235e38f, -3.4028235e38f, inf, -inf};
  return v;
}

}  // namespace element_test
}  // namespace lutra
#endif  // LUTRA_TESTS_ELEMENT_TEST_ONCE_

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace {
namespace hn = hwy::HWY_NAMESPACE;
using element_test::Bits;
using element_test::SameOrBothNaN;
using element_test::TypeOf;

// Random element bit patterns (NaN and Inf included for the float types).
template <typename T>
std::vector<uint8_t> RandomElements(test::Rng& rng, size_t n) {
  std::vector<uint8_t> bytes(n * sizeof(T));
  for (auto& b : bytes) b = static_cast<uint8_t>(rng.Bits());
  return bytes;
}

// Whether this target widens f16 Inf and NaN exactly. Highway emulates the
// conversion on targets without F16C (x86 SSE2..SSE4) and there maps
// exponent 31 to finite values 65536..131008 (element-inl.h's contract
// excludes them); every target with a native conversion must be exact.
bool WidensF16SpecialsExactly() {
  const hn::ScalableTag<float> df;
  const hwy::float16_t inf[1] = {hwy::float16_t::FromBits(0x7C00)};
  return std::isinf(hn::GetLane(LoadNAsF32(df, inf, 1)));
}

// f16 Inf/NaN bits, which only WidensF16SpecialsExactly targets widen exactly.
bool Skip(ElementType type, const void* data, size_t i) {
  if (type != ElementType::kF16) return false;
  uint16_t h;
  memcpy(&h, static_cast<const uint8_t*>(data) + 2 * i, 2);
  return (h & 0x7C00) == 0x7C00 && !WidensF16SpecialsExactly();
}

// LoadAsF32 / LoadNAsF32 == LoadElement for every lane, and LoadN zeroes
// the lanes past n without reading them (the element after the row is NaN).
template <typename T>
void CheckLoads(test::Rng& rng) {
  const hn::ScalableTag<float> df;
  const size_t N = hn::Lanes(df);
  const ElementType type = TypeOf<T>();
  std::vector<float> lanes(hn::MaxLanes(df));
  for (size_t n : test::SweepSizes(300)) {
    // Element 0 is padding so the row starts misaligned; element n + 1 is a
    // guard (NaN; int8: 100) that a correct tail never loads.
    std::vector<uint8_t> bytes = RandomElements<T>(rng, n + 2);
    StoreElement(bytes.data(), type, n + 1,
                 type == ElementType::kI8 ? 100.0f : std::numeric_limits<float>::quiet_NaN());
    const T* row = reinterpret_cast<const T*>(bytes.data()) + 1;
    size_t bad = 0, i = 0;
    for (; i + N <= n; i += N) {
      hn::StoreU(LoadAsF32(df, row + i), df, lanes.data());
      for (size_t j = 0; j < N; ++j) {
        if (Skip(type, bytes.data(), 1 + i + j)) continue;
        bad += !SameOrBothNaN(lanes[j], LoadElement(bytes.data(), type, 1 + i + j));
      }
    }
    if (i < n) {
      const size_t m = n - i;
      hn::StoreU(LoadNAsF32(df, row + i, m), df, lanes.data());
      for (size_t j = 0; j < N; ++j) {
        if (j < m && Skip(type, bytes.data(), 1 + i + j)) continue;
        const float want = j < m ? LoadElement(bytes.data(), type, 1 + i + j) : 0.0f;
        bad += !SameOrBothNaN(lanes[j], want);
      }
    }
    INFO(ElementTypeName(type) << " n=" << n << " on " << test::CurrentTargetName());
    CHECK(bad == 0);
  }
}

// Source rows: edge values, then Gaussian values of several magnitudes.
std::vector<float> StoreSource(test::Rng& rng, size_t n) {
  const std::vector<float> edge = element_test::EdgeValues();
  std::vector<float> x(n);
  for (size_t i = 0; i < n; ++i) {
    const float scale = (i / 7) % 3 == 0 ? 1.0f : (i / 7) % 3 == 1 ? 300.0f : 1e-6f;
    x[i] = i < edge.size() ? edge[(i * 7) % edge.size()] : rng.Gaussian(scale);
  }
  return x;
}

// The scalar narrowing that the vector store must match bit for bit.
template <typename T>
T ScalarNarrow(float v) {
  if constexpr (hwy::IsSame<T, float>()) {
    return v;
  } else if constexpr (hwy::IsSame<T, hwy::float16_t>()) {
    return hwy::float16_t::FromBits(F16BitsFromF32(v));
  } else if constexpr (hwy::IsSame<T, hwy::bfloat16_t>()) {
    return hwy::bfloat16_t::FromBits(BF16BitsFromF32(v));
  } else {
    return I8FromF32(v);
  }
}

// Stored element i equals the scalar narrowing of x[i] (as f32 values, NaN
// matching NaN; int8 skips NaN inputs, whose vector result is unspecified).
template <typename T>
size_t CountMismatches(const T* got, const float* x, size_t n) {
  size_t bad = 0;
  for (size_t i = 0; i < n; ++i) {
    if (hwy::IsSame<T, int8_t>() && std::isnan(x[i])) continue;
    const T want = ScalarNarrow<T>(x[i]);
    const ElementType type = TypeOf<T>();
    bad += !SameOrBothNaN(LoadElement(got, type, i), LoadElement(&want, type, 0));
  }
  return bad;
}

// StoreFromF32, StoreNFromF32 and StoreRowFromF32 == the scalar narrowing,
// writing nothing past n.
template <typename T>
void CheckStores(test::Rng& rng) {
  const hn::ScalableTag<float> df;
  const size_t N = hn::Lanes(df);
  const ElementType type = TypeOf<T>();
  for (size_t n : test::SweepSizes(300)) {
    std::vector<float> x = StoreSource(rng, n);
    // int8 stores integers: scale the finite values into and just past
    // [-128, 127] so rounding and saturation are both exercised.
    if (type == ElementType::kI8) {
      for (size_t i = element_test::EdgeValues().size(); i < n; ++i) x[i] *= 0.5f;
    }
    const uint8_t kGuard = 0xA5;
    std::vector<uint8_t> out((n + 1) * sizeof(T), kGuard);
    T* dst = reinterpret_cast<T*>(out.data());
    size_t i = 0;
    for (; i + N <= n; i += N) StoreFromF32(hn::LoadU(df, x.data() + i), df, dst + i);
    if (i < n) StoreNFromF32(hn::LoadN(df, x.data() + i, n - i), df, dst + i, n - i);
    size_t guard_bad = 0;
    for (size_t b = n * sizeof(T); b < out.size(); ++b) guard_bad += out[b] != kGuard;

    std::vector<uint8_t> row((n + 1) * sizeof(T), kGuard);
    StoreRowFromF32(df, x.data(), n, reinterpret_cast<T*>(row.data()));
    for (size_t b = n * sizeof(T); b < row.size(); ++b) guard_bad += row[b] != kGuard;

    INFO(ElementTypeName(type) << " n=" << n << " on " << test::CurrentTargetName());
    CHECK(CountMismatches(dst, x.data(), n) == 0);
    CHECK(CountMismatches(reinterpret_cast<const T*>(row.data()), x.data(), n) == 0);
    CHECK(guard_bad == 0);
  }
}

// QuantizeRowI8 == its scalar definition: scale = max|x| / 127 and
// q = I8FromF32(x * (127 / max|x|)), bit-exact; zero rows store zeros and
// scale 0; dequantization is within max|x| / 254 (plus f32 rounding).
void CheckQuantize(test::Rng& rng) {
  const hn::ScalableTag<float> df;
  for (size_t n : test::SweepSizes(300)) {
    for (int zero = 0; zero < 2; ++zero) {
      std::vector<float> x = rng.GaussianVector(n, 2.0f);
      if (zero) std::fill(x.begin(), x.end(), 0.0f);
      if (!zero && n > 2) x[n / 2] = -40.0f;  // a negative extreme
      std::vector<int8_t> q(n + 1, int8_t{99});
      const float scale = QuantizeRowI8(df, x.data(), n, q.data());
      float max_abs = 0.0f;
      for (float v : x) max_abs = std::max(max_abs, std::abs(v));
      INFO("n=" << n << " zero=" << zero << " on " << test::CurrentTargetName());
      CHECK(q[n] == 99);
      if (zero) {
        CHECK(scale == 0.0f);
        size_t nonzero = 0;
        for (size_t i = 0; i < n; ++i) nonzero += q[i] != 0;
        CHECK(nonzero == 0);
        continue;
      }
      CHECK(scale == max_abs / 127.0f);
      const float inv = 127.0f / max_abs;
      size_t bad = 0, far = 0;
      for (size_t i = 0; i < n; ++i) {
        bad += q[i] != I8FromF32(x[i] * inv);
        far += std::abs(float(q[i]) * scale - x[i]) > max_abs * (1.0f / 254 + 1e-6f);
      }
      CHECK(bad == 0);
      CHECK(far == 0);
    }
  }
}

void TestLoads() {
  test::Rng rng(131);
  CheckLoads<float>(rng);
  CheckLoads<hwy::float16_t>(rng);
  CheckLoads<hwy::bfloat16_t>(rng);
  CheckLoads<int8_t>(rng);
}

void TestStores() {
  test::Rng rng(132);
  CheckStores<float>(rng);
  CheckStores<hwy::float16_t>(rng);
  CheckStores<hwy::bfloat16_t>(rng);
  CheckStores<int8_t>(rng);
  CheckQuantize(rng);
}

// Every f16 and bf16 bit pattern widens through the vector path exactly as
// through the scalar one (a full vector at a time, the last one with LoadN);
// f16 Inf/NaN only on targets that convert natively (see Skip).
void TestExhaustiveWidening() {
  const hn::ScalableTag<float> df;
  const size_t N = hn::Lanes(df);
  std::vector<uint16_t> all(65536);
  for (uint32_t b = 0; b < 65536; ++b) all[b] = static_cast<uint16_t>(b);
  std::vector<float> lanes(hn::MaxLanes(df));
  size_t bad = 0;
  for (int bf = 0; bf < 2; ++bf) {
    for (size_t i = 0; i < all.size(); i += N) {
      const size_t m = HWY_MIN(N, all.size() - i);
      if (bf) {
        const auto* p = reinterpret_cast<const hwy::bfloat16_t*>(all.data()) + i;
        hn::StoreU(LoadNAsF32(df, p, m), df, lanes.data());
      } else {
        const auto* p = reinterpret_cast<const hwy::float16_t*>(all.data()) + i;
        hn::StoreU(LoadNAsF32(df, p, m), df, lanes.data());
      }
      for (size_t j = 0; j < m; ++j) {
        const uint16_t h = all[i + j];
        if (!bf && Skip(ElementType::kF16, &h, 0)) continue;
        bad += !SameOrBothNaN(lanes[j], bf ? F32FromBF16Bits(h) : F32FromF16Bits(h));
      }
    }
  }
  INFO("on " << test::CurrentTargetName());
  CHECK(bad == 0);
}

}  // namespace
}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lutra {
namespace {

using element_test::Bits;
using element_test::FromBits;

// Independent reference of binary16 -> f32 from the definition:
// (-1)^s * 2^(e - 15) * (1 + m / 1024), subnormals 2^-14 * (m / 1024).
double F16Reference(uint16_t h) {
  const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  const double sign = s ? -1.0 : 1.0;
  if (e == 0) return sign * std::ldexp(double(m), -24);
  if (e == 31) return m ? std::numeric_limits<double>::quiet_NaN()
                        : sign * std::numeric_limits<double>::infinity();
  return sign * std::ldexp(1024.0 + m, e - 25);
}

// Largest finite magnitude of each type, as f32.
const uint16_t kF16MaxBits = 0x7BFF;

TEST_CASE("Element types: enum values, sizes, names", "[element]") {
  // The values are part of the file formats.
  CHECK(int(ElementType::kF16) == 0);
  CHECK(int(ElementType::kBF16) == 1);
  CHECK(int(ElementType::kF32) == 2);
  CHECK(int(ElementType::kI8) == 3);
  CHECK(ElementBytes(ElementType::kF16) == 2);
  CHECK(ElementBytes(ElementType::kBF16) == 2);
  CHECK(ElementBytes(ElementType::kF32) == 4);
  CHECK(ElementBytes(ElementType::kI8) == 1);
  CHECK(ElementBytes(static_cast<ElementType>(7)) == 0);
  CHECK(std::string(ElementTypeName(ElementType::kF16)) == "f16");
  CHECK(std::string(ElementTypeName(ElementType::kBF16)) == "bf16");
  CHECK(std::string(ElementTypeName(ElementType::kF32)) == "f32");
  CHECK(std::string(ElementTypeName(ElementType::kI8)) == "int8");
  CHECK(std::string(ElementTypeName(static_cast<ElementType>(7))) == "invalid");
  CHECK(IsFloatElement(ElementType::kF16));
  CHECK(IsFloatElement(ElementType::kBF16));
  CHECK(IsFloatElement(ElementType::kF32));
  CHECK(!IsFloatElement(ElementType::kI8));
  CHECK(!IsFloatElement(static_cast<ElementType>(7)));
}

TEST_CASE("Element types: f16 and bf16 widening is exact for all inputs", "[element]") {
  size_t bad = 0;
  for (uint32_t b = 0; b < 65536; ++b) {
    const uint16_t h = static_cast<uint16_t>(b);
    const double want = F16Reference(h);
    const float got = F32FromF16Bits(h);
    if (std::isnan(want)) {
      bad += !std::isnan(got);
    } else {
      bad += double(got) != want || std::signbit(got) != std::signbit(want);
    }
    bad += Bits(F32FromBF16Bits(h)) != (b << 16);
  }
  CHECK(bad == 0);
}

// Narrowing rounds to nearest, ties to even: checked against the
// neighbours of the result, not against another implementation.
TEST_CASE("Element types: f16 narrowing rounds to nearest even", "[element]") {
  size_t bad = 0;
  // Every tie between neighbouring finite f16 values goes to the even one,
  // and the values just beside the tie go to the nearer one.
  for (uint16_t h = 0; h < kF16MaxBits; ++h) {
    const float lo = F32FromF16Bits(h), hi = F32FromF16Bits(uint16_t(h + 1));
    const float mid = (lo + hi) * 0.5f;  // exact: f16 has 11 bits, f32 24
    for (float sign : {1.0f, -1.0f}) {
      const uint16_t s = sign < 0 ? 0x8000 : 0;
      bad += F16BitsFromF32(sign * mid) != ((h & 1) ? uint16_t(h + 1) | s : h | s);
      bad += F16BitsFromF32(sign * std::nextafter(mid, 0.0f)) != (h | s);
      bad += F16BitsFromF32(sign * std::nextafter(mid, 1e9f)) != (uint16_t(h + 1) | s);
      bad += F16BitsFromF32(sign * lo) != (h | s);
    }
  }
  CHECK(bad == 0);
  // IEEE overflow: the tie above 65504 rounds (to even) to Inf.
  CHECK(F16BitsFromF32(65504.0f) == kF16MaxBits);
  CHECK(F16BitsFromF32(65519.99f) == kF16MaxBits);
  CHECK(F16BitsFromF32(65520.0f) == 0x7C00);
  CHECK(F16BitsFromF32(-70000.0f) == 0xFC00);
  CHECK(F16BitsFromF32(std::numeric_limits<float>::infinity()) == 0x7C00);
  CHECK(std::isnan(F32FromF16Bits(F16BitsFromF32(std::numeric_limits<float>::quiet_NaN()))));
  // Below half the smallest subnormal: signed zero.
  CHECK(F16BitsFromF32(1e-9f) == 0x0000);
  CHECK(F16BitsFromF32(-1e-9f) == 0x8000);
}

TEST_CASE("Element types: bf16 narrowing rounds to nearest even", "[element]") {
  test::Rng rng(7);
  size_t bad = 0;
  for (int i = 0; i < 200000; ++i) {
    const uint32_t u = static_cast<uint32_t>(rng.Bits());
    const float v = FromBits(u);
    if (std::isnan(v)) {
      bad += !std::isnan(F32FromBF16Bits(BF16BitsFromF32(v)));
      continue;
    }
    const uint32_t lo = u & 0xFFFF0000u, rest = u & 0xFFFFu;
    // Round the magnitude: up above half, down below, ties to even.
    const bool up = rest > 0x8000u || (rest == 0x8000u && (lo & 0x10000u));
    const uint32_t want = (lo + (up ? 0x10000u : 0u)) >> 16;
    bad += BF16BitsFromF32(v) != want;
  }
  CHECK(bad == 0);
  CHECK(BF16BitsFromF32(1.0f) == 0x3F80);
  CHECK(BF16BitsFromF32(FromBits(0x3F808000u)) == 0x3F80);  // tie, even below
  CHECK(BF16BitsFromF32(FromBits(0x3F818000u)) == 0x3F82);  // tie, even above
  CHECK(BF16BitsFromF32(3.4028235e38f) == 0x7F80);          // overflows to Inf
}

TEST_CASE("Element types: storage rounding saturates f16, int8 rounds to even", "[element]") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(RoundToElementType(1e6f, ElementType::kF16) == 65504.0f);
  CHECK(RoundToElementType(-1e6f, ElementType::kF16) == -65504.0f);
  CHECK(RoundToElementType(65520.0f, ElementType::kF16) == 65504.0f);
  CHECK(RoundToElementType(inf, ElementType::kF16) == 65504.0f);
  CHECK(RoundToElementType(1e6f, ElementType::kBF16) == 999424.0f);
  CHECK(std::isinf(RoundToElementType(inf, ElementType::kBF16)));
  CHECK(RoundToElementType(0.1f, ElementType::kF32) == 0.1f);
  CHECK(std::isnan(RoundToElementType(nan, ElementType::kF16)));
  CHECK(std::isnan(RoundToElementType(nan, ElementType::kBF16)));
  CHECK(RoundToElementType(2.5f, ElementType::kI8) == 2.0f);
  CHECK(RoundToElementType(3.5f, ElementType::kI8) == 4.0f);
  CHECK(RoundToElementType(-2.5f, ElementType::kI8) == -2.0f);
  CHECK(RoundToElementType(-2.6f, ElementType::kI8) == -3.0f);
  CHECK(RoundToElementType(127.5f, ElementType::kI8) == 127.0f);
  CHECK(RoundToElementType(1e9f, ElementType::kI8) == 127.0f);
  CHECK(RoundToElementType(-1e9f, ElementType::kI8) == -128.0f);
  CHECK(RoundToElementType(-inf, ElementType::kI8) == -128.0f);
  CHECK(RoundToElementType(nan, ElementType::kI8) == 0.0f);
  // Storage rounding of f16 is IEEE rounding of the saturated value.
  for (float v : element_test::EdgeValues()) {
    INFO("v=" << v);
    CHECK(RoundToElementType(v, ElementType::kF16) ==
          F32FromF16Bits(F16BitsFromF32(SaturateToF16(v))));
    CHECK(RoundToElementType(v, ElementType::kBF16) == F32FromBF16Bits(BF16BitsFromF32(v)));
  }
}

TEST_CASE("Element types: StoreElement/LoadElement at unaligned offsets", "[element]") {
  test::Rng rng(3);
  const ElementType types[] = {ElementType::kF16, ElementType::kBF16, ElementType::kF32,
                               ElementType::kI8};
  for (ElementType type : types) {
    const size_t n = 37;
    std::vector<uint8_t> buf(1 + n * ElementBytes(type) + 1, 0x5A);
    void* data = buf.data() + 1;  // misaligned for every type wider than a byte
    std::vector<float> x = rng.GaussianVector(n, type == ElementType::kI8 ? 60.0f : 1.0f);
    const std::vector<float> edge = element_test::EdgeValues();
    for (size_t i = 0; i < n && i < edge.size(); i += 3) x[i] = edge[i];
    for (size_t i = 0; i < n; ++i) StoreElement(data, type, i, x[i]);
    size_t bad = 0;
    for (size_t i = 0; i < n; ++i) {
      const float got = LoadElement(data, type, i);
      bad += Bits(got) != Bits(RoundToElementType(x[i], type));
    }
    INFO(ElementTypeName(type));
    CHECK(bad == 0);
    CHECK(buf.front() == 0x5A);
    CHECK(buf.back() == 0x5A);
  }
  // Bytes are little-endian IEEE patterns (the file formats rely on it).
  uint8_t b[4];
  StoreElement(b, ElementType::kF16, 0, 1.0f);
  CHECK((b[0] == 0x00 && b[1] == 0x3C));
  StoreElement(b, ElementType::kBF16, 0, -2.0f);
  CHECK((b[0] == 0x00 && b[1] == 0xC0));
  StoreElement(b, ElementType::kI8, 0, -3.0f);
  CHECK(b[0] == 0xFD);
  CHECK(LoadElement(b, ElementType::kI8, 0) == -3.0f);
  CHECK(LoadElement(b, static_cast<ElementType>(9), 0) == 0.0f);
}

HWY_EXPORT(TestLoads);
HWY_EXPORT(TestStores);
HWY_EXPORT(TestExhaustiveWidening);

TEST_CASE("Element types: vector loads match LoadElement, odd sizes and tails",
          "[element]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestLoads)(); });
}
TEST_CASE("Element types: vector stores match the scalar rounding, no writes past n",
          "[element]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestStores)(); });
}
TEST_CASE("Element types: vector f16/bf16 widening is exact for all inputs", "[element]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestExhaustiveWidening)(); });
}

}  // namespace
}  // namespace lutra
#endif  // HWY_ONCE
