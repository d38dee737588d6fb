// SIMD loads and stores of element arrays (element.h) as f32 vectors: the
// vector half of the element-type home. Kernels read f16/bf16/int8 rows and
// factors through LoadAsF32 / LoadNAsF32 and write them through
// StoreFromF32 / StoreRowFromF32 / QuantizeRowI8, with the contract of
// element.h, bit-identical to its scalar functions:
//  - widening is exact (= F32FromF16Bits, F32FromBF16Bits), with one
//    exception that is Highway's: targets without a native f16 conversion
//    (x86 SSE2, SSSE3, SSE4: no F16C) emulate it and widen f16 Inf and NaN
//    (exponent 31) to finite values 65536..131008. Every finite f16 is exact
//    everywhere; AVX2 and later are exact for all inputs;
//  - narrowing rounds to nearest even with IEEE overflow (f16 beyond +-65504
//    becomes +-Inf: = F16BitsFromF32, BF16BitsFromF32);
//  - int8 rounds to nearest even and saturates to [-128, 127] (= I8FromF32;
//    NaN inputs give an unspecified integer).
//
// Element pointers are typed: T is one of float, hwy::float16_t,
// hwy::bfloat16_t, int8_t (ElementType kF32, kF16, kBF16, kI8). A kernel
// switches on the ElementType once, outside its loops, and instantiates its
// loop for T. No alignment is needed anywhere.
//
// Per-target code: include after hwy/highway.h (and, for dynamic dispatch,
// from a .cc that includes hwy/foreach_target.h).

// Re-inclusion guard: once per target when foreach_target.h is used.
#if defined(LUTRA_BASE_ELEMENT_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LUTRA_BASE_ELEMENT_INL_H_
#undef LUTRA_BASE_ELEMENT_INL_H_
#else
#define LUTRA_BASE_ELEMENT_INL_H_
#endif

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "hwy/highway.h"
#include "lutra/base/element.h"

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

namespace detail {

template <typename T>
constexpr bool IsHalf() {
  return hwy::IsSame<T, hwy::float16_t>() || hwy::IsSame<T, hwy::bfloat16_t>();
}

template <typename T>
constexpr bool IsElement() {
  return hwy::IsSame<T, float>() || IsHalf<T>() || hwy::IsSame<T, int8_t>();
}

// f32 lanes -> bf16 lanes, rounded to nearest even as BF16BitsFromF32
// (element.h) rounds, subnormals included; NaN stays NaN. Integer rounding
// instead of DemoteTo, because the native conversion (AVX3_ZEN4 and
// AVX3_SPR: vcvtneps2bf16) treats subnormal inputs as zero, where the
// scalar rounding keeps them (element_test found it on a Zen 4 host).
template <class DF>
HWY_INLINE hn::Vec<hn::Rebind<hwy::bfloat16_t, DF>> DemoteToBF16(DF df, hn::Vec<DF> v) {
  const hn::RebindToUnsigned<DF> du;
  const hn::Rebind<uint16_t, DF> du16;
  const hn::Rebind<hwy::bfloat16_t, DF> dbf;
  const auto bits = hn::BitCast(du, v);
  const auto odd = hn::And(hn::ShiftRight<16>(bits), hn::Set(du, 1u));
  const auto rounded = hn::ShiftRight<16>(hn::Add(hn::Add(bits, hn::Set(du, 0x7FFFu)), odd));
  // A NaN is truncated and made quiet instead: rounding could carry its
  // mantissa into the exponent (Inf) or past the sign (0).
  const auto nan = hn::Or(hn::ShiftRight<16>(bits), hn::Set(du, 0x0040u));
  const auto out = hn::IfThenElse(hn::RebindMask(du, hn::IsNaN(v)), nan, rounded);
  (void)df;
  return hn::BitCast(dbf, hn::DemoteTo(du16, out));
}

// Narrows f32 lanes to the 16-bit element type T.
template <typename T, class DF>
HWY_INLINE hn::Vec<hn::Rebind<T, DF>> DemoteToHalf(DF df, hn::Vec<DF> v) {
  if constexpr (hwy::IsSame<T, hwy::bfloat16_t>()) {
    return DemoteToBF16(df, v);
  } else {
    return hn::DemoteTo(hn::Rebind<T, DF>(), v);
  }
}

}  // namespace detail

// Returns elements p[0, Lanes(df)) as f32. int8: the integers, unscaled.
template <class DF, typename T>
HWY_INLINE hn::Vec<DF> LoadAsF32(DF df, const T* HWY_RESTRICT p) {
  static_assert(detail::IsElement<T>(), "T: float, float16_t, bfloat16_t or int8_t");
  if constexpr (hwy::IsSame<T, float>()) {
    return hn::LoadU(df, p);
  } else if constexpr (hwy::IsSame<T, int8_t>()) {
    const hn::RebindToSigned<DF> di;
    return hn::ConvertTo(df, hn::PromoteTo(di, hn::LoadU(hn::Rebind<int8_t, DF>(), p)));
  } else {
    return hn::PromoteTo(df, hn::LoadU(hn::Rebind<T, DF>(), p));
  }
}

// Returns elements p[0, min(n, Lanes(df))) as f32, zero in the lanes past
// n; reads nothing past p[n - 1]. The tail of a row.
template <class DF, typename T>
HWY_INLINE hn::Vec<DF> LoadNAsF32(DF df, const T* HWY_RESTRICT p, size_t n) {
  static_assert(detail::IsElement<T>(), "T: float, float16_t, bfloat16_t or int8_t");
  if constexpr (hwy::IsSame<T, float>()) {
    return hn::LoadN(df, p, n);
  } else if constexpr (hwy::IsSame<T, int8_t>()) {
    const hn::RebindToSigned<DF> di;
    return hn::ConvertTo(df, hn::PromoteTo(di, hn::LoadN(hn::Rebind<int8_t, DF>(), p, n)));
  } else {
    return hn::PromoteTo(df, hn::LoadN(hn::Rebind<T, DF>(), p, n));
  }
}

// Stores the Lanes(df) lanes of v to p[0, Lanes(df)) as T (rounding above).
template <class DF, typename T>
HWY_INLINE void StoreFromF32(hn::Vec<DF> v, DF df, T* HWY_RESTRICT p) {
  static_assert(detail::IsElement<T>(), "T: float, float16_t, bfloat16_t or int8_t");
  if constexpr (hwy::IsSame<T, float>()) {
    hn::StoreU(v, df, p);
  } else if constexpr (hwy::IsSame<T, int8_t>()) {
    // NearestInt is round-half-even; DemoteTo saturates to [-128, 127].
    const hn::Rebind<int8_t, DF> d8;
    hn::StoreU(hn::DemoteTo(d8, hn::NearestInt(v)), d8, p);
  } else {
    const hn::Rebind<T, DF> dh;
    hn::StoreU(detail::DemoteToHalf<T>(df, v), dh, p);
  }
}

// Stores the first min(n, Lanes(df)) lanes of v to p as T; writes nothing
// past p[n - 1].
template <class DF, typename T>
HWY_INLINE void StoreNFromF32(hn::Vec<DF> v, DF df, T* HWY_RESTRICT p, size_t n) {
  static_assert(detail::IsElement<T>(), "T: float, float16_t, bfloat16_t or int8_t");
  if constexpr (hwy::IsSame<T, float>()) {
    hn::StoreN(v, df, p, n);
  } else if constexpr (hwy::IsSame<T, int8_t>()) {
    const hn::Rebind<int8_t, DF> d8;
    hn::StoreN(hn::DemoteTo(d8, hn::NearestInt(v)), d8, p, n);
  } else {
    const hn::Rebind<T, DF> dh;
    hn::StoreN(detail::DemoteToHalf<T>(df, v), dh, p, n);
  }
}

// Converts a row of n floats to T: dst[i] = src[i] rounded as above. f32 is
// a plain copy.
template <class DF, typename T>
HWY_INLINE void StoreRowFromF32(DF df, const float* HWY_RESTRICT src, size_t n,
                                T* HWY_RESTRICT dst) {
  if constexpr (hwy::IsSame<T, float>()) {
    memcpy(dst, src, n * sizeof(float));
  } else {
    const size_t N = hn::Lanes(df);
    size_t i = 0;
    for (; i + N <= n; i += N) StoreFromF32(hn::LoadU(df, src + i), df, dst + i);
    if (i < n) StoreNFromF32(hn::LoadN(df, src + i, n - i), df, dst + i, n - i);
  }
}

// Quantizes a row of n floats to int8 with one symmetric scale:
// scale = max|x| / 127 and dst[i] = I8FromF32(x[i] * (127 / max|x|)), so
// |x - q * scale| <= scale / 2 = max|x| / 254 (plus f32 rounding of the
// product). Symmetric (no zero point) because K and V rows are centred near
// zero and a dequantized dot product stays one FMA per element. An all-zero
// row (or one with NaN) stores zeros and scale 0. Returns the scale.
template <class DF>
HWY_INLINE float QuantizeRowI8(DF df, const float* HWY_RESTRICT src, size_t n,
                               int8_t* HWY_RESTRICT dst) {
  using V = hn::Vec<DF>;
  const size_t N = hn::Lanes(df);
  V vmax = hn::Zero(df);
  for (size_t i = 0; i < n; i += N) {
    vmax = hn::Max(vmax, hn::Abs(hn::LoadN(df, src + i, HWY_MIN(N, n - i))));
  }
  const float max_abs = hn::ReduceMax(df, vmax);
  if (!(max_abs > 0.0f)) {  // zero row (or NaN input: store zeros, scale 0)
    memset(dst, 0, n);
    return 0.0f;
  }
  const V inv = hn::Set(df, 127.0f / max_abs);
  for (size_t i = 0; i < n; i += N) {
    const size_t m = HWY_MIN(N, n - i);
    // |x * inv| <= 127 up to rounding; the store saturates, so no overflow.
    StoreNFromF32(hn::Mul(hn::LoadN(df, src + i, m), inv), df, dst + i, m);
  }
  return max_abs / 127.0f;
}

}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#endif  // LUTRA_BASE_ELEMENT_INL_H_
