// Dot products of f32 vectors: the building block of attention scores and of
// the reference paths that other kernels are measured against; and TypedDot,
// the same for one f16/bf16/f32 operand (LoRA factors: A x and B (A x)).
//
// Entry points (namespace lutra::HWY_NAMESPACE):
//   float Dot([df,] const float* a, const float* b, size_t num);
//   float TypedDot([df,] ElementType type, const void* a, const float* x, size_t n);
//   V SumsOfFour(d, a, b, c, e);  (fixed-size targets: LUTRA_HAVE_SUMS_OF_FOUR)
//
// Per-target code: include after hwy/highway.h (and, for dynamic dispatch,
// from a .cc that includes hwy/foreach_target.h). See docs/design.md.

// Re-inclusion guard: once per target when foreach_target.h is used.
#if defined(LUTRA_DOT_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LUTRA_DOT_INL_H_
#undef LUTRA_DOT_INL_H_
#else
#define LUTRA_DOT_INL_H_
#endif

#include <stddef.h>

#include "hwy/highway.h"
#include "lutra/base/element-inl.h"  // LoadAsF32 / LoadNAsF32
#include "lutra/base/element.h"      // ElementType

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Returns sum_i a[i] * b[i] for i < num, accumulated in f32.
// a and b need no alignment; num may be 0 and need not be a multiple of the
// vector length (the tail is loaded with LoadN, never read past `num`).
// Four independent accumulators hide FMA latency; the result therefore
// differs from a sequential sum by rounding only (|err| <= ~num * eps * |a||b|).
template <class DF>
HWY_INLINE float Dot(DF df, const float* HWY_RESTRICT a,
                     const float* HWY_RESTRICT b, size_t num) {
  using V = hn::Vec<DF>;
  const size_t N = hn::Lanes(df);
  V sum0 = hn::Zero(df), sum1 = hn::Zero(df);
  V sum2 = hn::Zero(df), sum3 = hn::Zero(df);
  size_t i = 0;
  for (; i + 4 * N <= num; i += 4 * N) {
    sum0 = hn::MulAdd(hn::LoadU(df, a + i), hn::LoadU(df, b + i), sum0);
    sum1 = hn::MulAdd(hn::LoadU(df, a + i + N), hn::LoadU(df, b + i + N), sum1);
    sum2 = hn::MulAdd(hn::LoadU(df, a + i + 2 * N), hn::LoadU(df, b + i + 2 * N),
                      sum2);
    sum3 = hn::MulAdd(hn::LoadU(df, a + i + 3 * N), hn::LoadU(df, b + i + 3 * N),
                      sum3);
  }
  for (; i + N <= num; i += N) {
    sum0 = hn::MulAdd(hn::LoadU(df, a + i), hn::LoadU(df, b + i), sum0);
  }
  if (i < num) {
    // LoadN zero-fills lanes past the end, so they add nothing.
    sum1 = hn::MulAdd(hn::LoadN(df, a + i, num - i), hn::LoadN(df, b + i, num - i),
                      sum1);
  }
  sum0 = hn::Add(hn::Add(sum0, sum1), hn::Add(sum2, sum3));
  return hn::ReduceSum(df, sum0);
}

// Convenience overload with the widest f32 descriptor of the target.
HWY_INLINE float Dot(const float* HWY_RESTRICT a, const float* HWY_RESTRICT b,
                     size_t num) {
  return Dot(hn::ScalableTag<float>(), a, b, num);
}

namespace detail {

// sum_i a[i] * x[i] for 16-bit a (f16 or bf16), each widened exactly to f32
// (element-inl.h), in two accumulators.
template <class DF, typename T>
HWY_INLINE float HalfDot(DF df, const T* HWY_RESTRICT a, const float* HWY_RESTRICT x,
                         size_t n) {
  const size_t N = hn::Lanes(df);
  hn::Vec<DF> sum0 = hn::Zero(df), sum1 = hn::Zero(df);
  size_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    sum0 = hn::MulAdd(LoadAsF32(df, a + i), hn::LoadU(df, x + i), sum0);
    sum1 = hn::MulAdd(LoadAsF32(df, a + i + N), hn::LoadU(df, x + i + N), sum1);
  }
  for (; i < n; i += N) {
    const size_t m = HWY_MIN(N, n - i);
    sum0 = hn::MulAdd(LoadNAsF32(df, a + i, m), hn::LoadN(df, x + i, m), sum0);
  }
  return hn::ReduceSum(df, hn::Add(sum0, sum1));
}

}  // namespace detail

// Returns sum_i a[i] * x[i] (i < n) with a of `type` (f16, bf16 or f32,
// unaligned), widened exactly to f32 and accumulated in f32. Used for A x
// (n = K) and for rows of B (n = rank) in the LoRA epilogue.
template <class DF>
HWY_INLINE float TypedDot(DF df, ElementType type, const void* HWY_RESTRICT a,
                          const float* HWY_RESTRICT x, size_t n) {
  switch (type) {
    case ElementType::kF16:
      return detail::HalfDot(df, static_cast<const hwy::float16_t*>(a), x, n);
    case ElementType::kBF16:
      return detail::HalfDot(df, static_cast<const hwy::bfloat16_t*>(a), x, n);
    default:
      return Dot(df, static_cast<const float*>(a), x, n);
  }
}

HWY_INLINE float TypedDot(ElementType type, const void* HWY_RESTRICT a,
                          const float* HWY_RESTRICT x, size_t n) {
  return TypedDot(hn::ScalableTag<float>(), type, a, x, n);
}

// SumsOfFour needs fixed-size vectors of at least 4 lanes of 32 bits: not
// SVE (even its fixed-size targets), RVV or HWY_SCALAR. Set per target (this
// file is included once per target; other headers test the macro).
#undef LUTRA_HAVE_SUMS_OF_FOUR
#if HWY_TARGET_IS_SVE || HWY_TARGET == HWY_RVV || HWY_HAVE_SCALABLE || HWY_TARGET == HWY_SCALAR
#define LUTRA_HAVE_SUMS_OF_FOUR 0
#else
#define LUTRA_HAVE_SUMS_OF_FOUR 1
#endif

#if LUTRA_HAVE_SUMS_OF_FOUR
// [sum(a), sum(b), sum(c), sum(e)] in lanes 0..3 of every 128-bit block, for
// four vectors of 32-bit lanes (i32 or f32): four horizontal sums in one
// shuffle network of 11 instructions on AVX-512, where four ReduceSums take
// about 32. Each lane of the result adds only its own vector's lanes, in an
// order that does not depend on the other three (floating-point addition
// commutes), so a vector's sum has the same bits whichever vectors (or
// zeros) it is grouped with.
template <class D, class V = hn::Vec<D>>
HWY_INLINE V SumsOfFour(D d, V a, V b, V c, V e) {
  static_assert(sizeof(hn::TFromD<D>) == 4, "32-bit lanes");
  const hn::Repartition<uint64_t, D> d64;
  const auto a64 = hn::BitCast(d64, a), b64 = hn::BitCast(d64, b);
  const auto c64 = hn::BitCast(d64, c), e64 = hn::BitCast(d64, e);
  // Per 128-bit block: ac = [a0 + a2, a1 + a3, c0 + c2, c1 + c3], be alike.
  const V ac = hn::Add(hn::BitCast(d, hn::InterleaveLower(d64, a64, c64)),
                       hn::BitCast(d, hn::InterleaveUpper(d64, a64, c64)));
  const V be = hn::Add(hn::BitCast(d, hn::InterleaveLower(d64, b64, e64)),
                       hn::BitCast(d, hn::InterleaveUpper(d64, b64, e64)));
  V x = hn::Add(hn::InterleaveEven(d, ac, be), hn::InterleaveOdd(d, ac, be));
  // Then over the blocks: every block ends with the four totals.
  if (hn::Lanes(d) >= 8) x = hn::Add(x, hn::SwapAdjacentBlocks(x));
  if (hn::Lanes(d) >= 16) x = hn::Add(x, hn::ReverseBlocks(d, x));
  return x;
}
#endif  // LUTRA_HAVE_SUMS_OF_FOUR

}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#endif  // LUTRA_DOT_INL_H_
