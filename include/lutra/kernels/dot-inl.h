// Dot products of f32 vectors: the building block of attention scores and of
// the reference paths that other kernels are measured against.
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

}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#endif  // LUTRA_DOT_INL_H_
