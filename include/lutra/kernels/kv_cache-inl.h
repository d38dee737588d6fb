// Writing K and V rows into a KVCache (kv_cache.h), converting f32 to the
// cache's storage type with SIMD: f16, bf16 (round to nearest even), or int8
// with one symmetric scale per (position, kv head).
//
// Per-target code: include after hwy/highway.h (and, for dynamic dispatch,
// from a .cc that includes hwy/foreach_target.h).

// Re-inclusion guard: once per target when foreach_target.h is used.
#if defined(LUTRA_KV_CACHE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LUTRA_KV_CACHE_INL_H_
#undef LUTRA_KV_CACHE_INL_H_
#else
#define LUTRA_KV_CACHE_INL_H_
#endif

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "hwy/highway.h"
#include "lutra/base/status.h"
#include "lutra/kernels/kv_cache.h"

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

namespace detail {

// Converts one row of n floats to f16 or bf16 (DemoteTo rounds to nearest
// even; values beyond the f16 range become +-inf, as a scalar cast would).
template <class DF, typename T>
HWY_INLINE void StoreRowHalf(DF df, const float* HWY_RESTRICT src, size_t n,
                             T* HWY_RESTRICT dst) {
  const hn::Rebind<T, DF> dh;
  const size_t N = hn::Lanes(df);
  size_t i = 0;
  for (; i + N <= n; i += N) {
    hn::StoreU(hn::DemoteTo(dh, hn::LoadU(df, src + i)), dh, dst + i);
  }
  if (i < n) {
    hn::StoreN(hn::DemoteTo(dh, hn::LoadN(df, src + i, n - i)), dh, dst + i,
               n - i);
  }
}

// Quantizes one row of n floats to int8: scale = max|x| / 127 and
// q = round(x / scale), so |x - q * scale| <= scale / 2 = max|x| / 254.
// Symmetric (no zero point) because K and V rows are centred near zero and
// the dequantized dot product stays one FMA per element. An all-zero row
// stores scale 0 and zeros. Returns the scale.
template <class DF>
HWY_INLINE float StoreRowInt8(DF df, const float* HWY_RESTRICT src, size_t n,
                              int8_t* HWY_RESTRICT dst) {
  using V = hn::Vec<DF>;
  const hn::Rebind<int8_t, DF> d8;
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
    // |x * inv| <= 127 up to rounding; DemoteTo saturates, so no overflow.
    const auto q = hn::NearestInt(hn::Mul(hn::LoadN(df, src + i, m), inv));
    hn::StoreN(hn::DemoteTo(d8, q), d8, dst + i, m);
  }
  return max_abs / 127.0f;
}

// Writes one row (head_dim floats) into row `slot` of a head's storage.
template <class DF>
HWY_INLINE void StoreKVRow(DF df, KVType type, const float* HWY_RESTRICT src,
                           size_t head_dim, uint8_t* head_rows, float* scales,
                           size_t slot) {
  switch (type) {
    case KVType::kF32:
      memcpy(head_rows + slot * head_dim * sizeof(float), src,
             head_dim * sizeof(float));
      break;
    case KVType::kF16:
      StoreRowHalf(df, src, head_dim,
                   reinterpret_cast<hwy::float16_t*>(head_rows) + slot * head_dim);
      break;
    case KVType::kBF16:
      StoreRowHalf(df, src, head_dim,
                   reinterpret_cast<hwy::bfloat16_t*>(head_rows) + slot * head_dim);
      break;
    case KVType::kInt8:
      scales[slot] = StoreRowInt8(
          df, src, head_dim, reinterpret_cast<int8_t*>(head_rows) + slot * head_dim);
      break;
  }
}

}  // namespace detail

// Appends positions pos .. pos + num_tokens - 1 to `layer`.
// k, v: [num_tokens][num_kv_heads][head_dim] f32, row-major (the layout of
// the K and V projections' outputs, already RoPE-rotated for k).
// pos must equal cache.end(layer): appends are contiguous; call
// cache.Truncate(pos) first to rewrite. In ring mode the oldest positions
// are overwritten in place (no reallocation, no shifting); when num_tokens
// exceeds the capacity only the last `capacity` positions are written.
// Errors (the cache is unchanged): see KVCache::BeginAppend; k or v null
// with num_tokens > 0.
template <class DF>
HWY_INLINE Status AppendKV(DF df, KVCache& cache, size_t layer, size_t pos,
                           size_t num_tokens, const float* HWY_RESTRICT k,
                           const float* HWY_RESTRICT v) {
  if (num_tokens != 0 && (k == nullptr || v == nullptr)) {
    return InvalidArgument("AppendKV: k or v is null for %zu positions",
                           num_tokens);
  }
  size_t first = 0;
  LUTRA_RETURN_IF_ERROR(cache.BeginAppend(layer, pos, num_tokens, &first));
  const size_t kvh = cache.num_kv_heads();
  const size_t hd = cache.head_dim();
  for (size_t p = first; p < pos + num_tokens; ++p) {
    const size_t slot = cache.Slot(p);
    const size_t row = (p - pos) * kvh * hd;
    for (size_t h = 0; h < kvh; ++h) {
      detail::StoreKVRow(df, cache.type(), k + row + h * hd, hd,
                         cache.K(layer, h), cache.KScales(layer, h), slot);
      detail::StoreKVRow(df, cache.type(), v + row + h * hd, hd,
                         cache.V(layer, h), cache.VScales(layer, h), slot);
    }
  }
  return Status();
}

HWY_INLINE Status AppendKV(KVCache& cache, size_t layer, size_t pos,
                           size_t num_tokens, const float* HWY_RESTRICT k,
                           const float* HWY_RESTRICT v) {
  return AppendKV(hn::ScalableTag<float>(), cache, layer, pos, num_tokens, k, v);
}

}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#endif  // LUTRA_KV_CACHE_INL_H_
