// Writing K and V rows into a KVCache (kv_cache.h), converting f32 to the
// cache's storage type with SIMD (element-inl.h): f16, bf16 (round to
// nearest even; f16 overflow becomes +-inf, as a scalar cast), or int8 with
// one symmetric scale per (position, kv head) (QuantizeRowI8).
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
#include "lutra/base/element-inl.h"
#include "lutra/base/status.h"
#include "lutra/kernels/kv_cache.h"

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

namespace detail {

// Writes one row (head_dim floats) into row `slot` of a head's storage.
template <class DF>
HWY_INLINE void StoreKVRow(DF df, ElementType type, const float* HWY_RESTRICT src,
                           size_t head_dim, uint8_t* head_rows, float* scales,
                           size_t slot) {
  const size_t i = slot * head_dim;  // the row's first element
  switch (type) {
    case ElementType::kF32:
      StoreRowFromF32(df, src, head_dim, reinterpret_cast<float*>(head_rows) + i);
      break;
    case ElementType::kF16:
      StoreRowFromF32(df, src, head_dim, reinterpret_cast<hwy::float16_t*>(head_rows) + i);
      break;
    case ElementType::kBF16:
      StoreRowFromF32(df, src, head_dim, reinterpret_cast<hwy::bfloat16_t*>(head_rows) + i);
      break;
    case ElementType::kI8:
      scales[slot] = QuantizeRowI8(df, src, head_dim, reinterpret_cast<int8_t*>(head_rows) + i);
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
