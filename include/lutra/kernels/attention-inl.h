// Grouped-query attention over a KVCache (kv_cache.h) for decode (one query
// token) and prefill (T query tokens, causal), with online (streaming)
// softmax, an optional sliding window, and ring-buffer wrap-around.
//
// Per-target code: include after hwy/highway.h (and, for dynamic dispatch,
// from a .cc that includes hwy/foreach_target.h).
//
// How it works (why it is fast): query head h uses kv head h / g, where
// g = num_heads / num_kv_heads. The kernel walks one kv head's rows in
// blocks of kBlock positions; for every block it computes the scores of all
// query rows that share the kv head (the g heads of every query token in a
// tile), so each K and V row is read from memory once per group, not g times.
// Softmax is streamed (flash-decoding style): per query row a running max m,
// running sum l and an unnormalized output accumulator (kept in `out`
// itself), rescaled by e^(m_old - m_new) when the max grows. No T x T (or
// T x context) score matrix exists; the only scratch is a kBlock-sized score
// tile per row on the stack. int8 rows are dequantized on the fly (their
// scales multiply the score and the softmax weight, not every element).

// Plain (target-independent) declarations, defined once.
#ifndef LUTRA_ATTENTION_PLAIN_TYPES_H_
#define LUTRA_ATTENTION_PLAIN_TYPES_H_
#include <stddef.h>
namespace lutra {

struct AttentionOptions {
  // 0: no window; a query at position p attends all held positions <= p
  // (at most `capacity`). w > 0: only positions in [p - w + 1, p].
  size_t window = 0;
  // Multiplier of q.k; 0 means 1 / sqrt(head_dim) (Llama).
  float scale = 0.0f;
};

}  // namespace lutra
#endif  // LUTRA_ATTENTION_PLAIN_TYPES_H_

// Re-inclusion guard: once per target when foreach_target.h is used.
#if defined(LUTRA_ATTENTION_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LUTRA_ATTENTION_INL_H_
#undef LUTRA_ATTENTION_INL_H_
#else
#define LUTRA_ATTENTION_INL_H_
#endif

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmath>

#include "hwy/cache_control.h"
#include "hwy/highway.h"
#include "lutra/base/element-inl.h"
#include "lutra/base/status.h"
#include "lutra/kernels/kv_cache.h"
#include "lutra/kernels/ops-inl.h"

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

namespace detail {

// Key positions per block: the score tile of one row (kBlock floats) stays
// in registers/L1, and a block of K rows (<= 32 x 128 x 4 bytes = 16 KiB)
// stays in L1 while every query row of the group reads it.
constexpr size_t kAttnBlock = 32;
// Query rows whose dot products share one load of a K (or V) vector. Named
// accumulators (not arrays of vectors, which scalable targets forbid).
constexpr size_t kAttnRowsPerPass = 4;
// Query rows per tile (tokens x heads of a group) that share one walk over
// the keys. Bounds the on-stack row state.
constexpr size_t kAttnMaxTileRows = 64;

// State of one query row (one query head of one token).
struct AttnRow {
  const float* q;  // head_dim
  float* out;      // head_dim: unnormalized accumulator, then the result
  size_t lo, hi;   // attended positions [lo, hi]
  float m, l;      // running max and running sum of e^(s - m)
  float corr;      // rescale factor of `out` pending for this block
};

// scores[r * kAttnBlock + t] = q_r . k_t for t < nb, r < kNR (raw dots).
// krows: nb rows of head_dim elements of T, the cache's element type (float,
// float16_t, bfloat16_t or int8_t; element-inl.h loads them as f32).
template <size_t kNR, class DF, typename T>
HWY_INLINE void BlockScores(DF df, const AttnRow* rows, const T* HWY_RESTRICT krows,
                            size_t head_dim, size_t nb,
                            float* HWY_RESTRICT scores) {
  using V = hn::Vec<DF>;
  const size_t N = hn::Lanes(df);
  const float* q0 = rows[0].q;
  const float* q1 = rows[kNR > 1 ? 1 : 0].q;
  const float* q2 = rows[kNR > 2 ? 2 : 0].q;
  const float* q3 = rows[kNR > 3 ? 3 : 0].q;
  for (size_t t = 0; t < nb; ++t) {
    const T* kr = krows + t * head_dim;
    V s0 = hn::Zero(df), s1 = hn::Zero(df), s2 = hn::Zero(df), s3 = hn::Zero(df);
    size_t i = 0;
    for (; i + N <= head_dim; i += N) {
      const V k = LoadAsF32(df, kr + i);  // int8: unscaled
      s0 = hn::MulAdd(hn::LoadU(df, q0 + i), k, s0);
      if (kNR > 1) s1 = hn::MulAdd(hn::LoadU(df, q1 + i), k, s1);
      if (kNR > 2) s2 = hn::MulAdd(hn::LoadU(df, q2 + i), k, s2);
      if (kNR > 3) s3 = hn::MulAdd(hn::LoadU(df, q3 + i), k, s3);
    }
    if (i < head_dim) {
      const size_t n = head_dim - i;
      const V k = LoadNAsF32(df, kr + i, n);  // zero past the end
      s0 = hn::MulAdd(hn::LoadN(df, q0 + i, n), k, s0);
      if (kNR > 1) s1 = hn::MulAdd(hn::LoadN(df, q1 + i, n), k, s1);
      if (kNR > 2) s2 = hn::MulAdd(hn::LoadN(df, q2 + i, n), k, s2);
      if (kNR > 3) s3 = hn::MulAdd(hn::LoadN(df, q3 + i, n), k, s3);
    }
    scores[t] = hn::ReduceSum(df, s0);
    if (kNR > 1) scores[kAttnBlock + t] = hn::ReduceSum(df, s1);
    if (kNR > 2) scores[2 * kAttnBlock + t] = hn::ReduceSum(df, s2);
    if (kNR > 3) scores[3 * kAttnBlock + t] = hn::ReduceSum(df, s3);
  }
}

// out_r = out_r * corr_r + sum_t w[r * kAttnBlock + t] * v_t for r < kNR.
// vrows: nb rows of head_dim elements; w already includes int8 V scales.
template <size_t kNR, class DF, typename T>
HWY_INLINE void BlockAccumulateV(DF df, AttnRow* rows, const T* HWY_RESTRICT vrows,
                                 size_t head_dim, size_t nb,
                                 const float* HWY_RESTRICT w) {
  using V = hn::Vec<DF>;
  const size_t N = hn::Lanes(df);
  float* o0 = rows[0].out;
  float* o1 = rows[kNR > 1 ? 1 : 0].out;
  float* o2 = rows[kNR > 2 ? 2 : 0].out;
  float* o3 = rows[kNR > 3 ? 3 : 0].out;
  const V c0 = hn::Set(df, rows[0].corr);
  const V c1 = hn::Set(df, rows[kNR > 1 ? 1 : 0].corr);
  const V c2 = hn::Set(df, rows[kNR > 2 ? 2 : 0].corr);
  const V c3 = hn::Set(df, rows[kNR > 3 ? 3 : 0].corr);
  for (size_t i = 0; i < head_dim; i += N) {
    const size_t n = HWY_MIN(N, head_dim - i);
    const bool full = n == N;
    V a0 = hn::Mul(hn::LoadN(df, o0 + i, n), c0);
    V a1 = kNR > 1 ? hn::Mul(hn::LoadN(df, o1 + i, n), c1) : a0;
    V a2 = kNR > 2 ? hn::Mul(hn::LoadN(df, o2 + i, n), c2) : a0;
    V a3 = kNR > 3 ? hn::Mul(hn::LoadN(df, o3 + i, n), c3) : a0;
    for (size_t t = 0; t < nb; ++t) {
      const T* vr = vrows + t * head_dim + i;
      const V v = full ? LoadAsF32(df, vr) : LoadNAsF32(df, vr, n);
      a0 = hn::MulAdd(hn::Set(df, w[t]), v, a0);
      if (kNR > 1) a1 = hn::MulAdd(hn::Set(df, w[kAttnBlock + t]), v, a1);
      if (kNR > 2) a2 = hn::MulAdd(hn::Set(df, w[2 * kAttnBlock + t]), v, a2);
      if (kNR > 3) a3 = hn::MulAdd(hn::Set(df, w[3 * kAttnBlock + t]), v, a3);
    }
    hn::StoreN(a0, df, o0 + i, n);
    if (kNR > 1) hn::StoreN(a1, df, o1 + i, n);
    if (kNR > 2) hn::StoreN(a2, df, o2 + i, n);
    if (kNR > 3) hn::StoreN(a3, df, o3 + i, n);
  }
}

// Online-softmax update of one row for the block of positions
// [p0, p0 + nb): turns the raw dots in s[0, nb) into weights
// e^(score - m_new) (times the V scale for int8), zero outside [lo, hi],
// updates m and l, and sets row.corr = e^(m_old - m_new) for `out`.
// Precondition: the row attends at least one position of the block.
template <class DF>
HWY_INLINE void BlockSoftmax(DF df, AttnRow& row, size_t p0, size_t nb,
                             float scale, const float* kscale,
                             const float* vscale, float* HWY_RESTRICT s) {
  using V = hn::Vec<DF>;
  const size_t N = hn::Lanes(df);
  // Attended indices within the block: [a, b).
  const size_t a = row.lo > p0 ? row.lo - p0 : 0;
  const size_t b = HWY_MIN(nb, row.hi + 1 - p0);
  const V vscale_all = hn::Set(df, scale);
  V vmax = hn::Set(df, -HUGE_VALF);
  for (size_t i = a; i < b; i += N) {
    const size_t n = HWY_MIN(N, b - i);
    V x = hn::Mul(hn::LoadN(df, s + i, n), vscale_all);
    if (kscale != nullptr) x = hn::Mul(x, hn::LoadN(df, kscale + i, n));
    hn::StoreN(x, df, s + i, n);
    vmax = hn::Max(vmax, hn::IfThenElse(hn::FirstN(df, n), x, hn::Set(df, -HUGE_VALF)));
  }
  const float m_new = HWY_MAX(row.m, hn::ReduceMax(df, vmax));
  // row.m = -inf before the first block: corr = e^-inf = 0 and out is 0.
  row.corr = std::exp(row.m - m_new);
  row.m = m_new;
  const V vm = hn::Set(df, m_new);
  V sum = hn::Zero(df);
  for (size_t i = 0; i < a; ++i) s[i] = 0.0f;
  for (size_t i = a; i < b; i += N) {
    const size_t n = HWY_MIN(N, b - i);
    const V e = hn::IfThenElseZero(hn::FirstN(df, n),
                                   Exp(df, hn::Sub(hn::LoadN(df, s + i, n), vm)));
    sum = hn::Add(sum, e);
    hn::StoreN(vscale != nullptr ? hn::Mul(e, hn::LoadN(df, vscale + i, n)) : e,
               df, s + i, n);
  }
  for (size_t i = b; i < nb; ++i) s[i] = 0.0f;
  row.l = row.l * row.corr + hn::ReduceSum(df, sum);
}

// Attention of rows[0, num_rows) (all sharing kv head `kv_head`) over the
// union of their position ranges.
template <typename T, class DF>
HWY_NOINLINE void AttendKVHead(DF df, const KVCache& cache, size_t layer,
                               size_t kv_head, AttnRow* rows, size_t num_rows,
                               float scale) {
  const size_t hd = cache.head_dim();
  const size_t cap = cache.capacity();
  const T* K = reinterpret_cast<const T*>(cache.K(layer, kv_head));
  const T* Vr = reinterpret_cast<const T*>(cache.V(layer, kv_head));
  const float* ks = cache.KScales(layer, kv_head);  // null unless int8
  const float* vs = cache.VScales(layer, kv_head);
  size_t klo = rows[0].lo, khi = rows[0].hi;
  for (size_t r = 0; r < num_rows; ++r) {
    klo = HWY_MIN(klo, rows[r].lo);
    khi = HWY_MAX(khi, rows[r].hi);
    memset(rows[r].out, 0, hd * sizeof(float));
    rows[r].m = -HUGE_VALF;
    rows[r].l = 0.0f;
  }
  HWY_ALIGN float scores[kAttnRowsPerPass * kAttnBlock];
  for (size_t p0 = klo; p0 <= khi;) {
    const size_t slot = p0 % cap;
    // A block never crosses the ring's wrap, so its rows are contiguous.
    const size_t nb = HWY_MIN(HWY_MIN(kAttnBlock, khi + 1 - p0), cap - slot);
    const T* kb = K + slot * hd;
    const T* vb = Vr + slot * hd;
    const float* ksb = ks ? ks + slot : nullptr;
    const float* vsb = vs ? vs + slot : nullptr;
    if (sizeof(T) > 1) {
      // Prefetch the next block's K and V rows while this block computes:
      // with f16/bf16/f32 rows decode waits on memory, and the hardware
      // prefetcher alone leaves the core idle (measured +16% GB/s on cold
      // f16 caches). int8 rows carry 4x fewer bytes per FMA, so decode is
      // compute-bound there and the extra instructions cost ~10%: skipped.
      const size_t next = p0 + nb;
      if (next <= khi) {
        const size_t nslot = next % cap;
        const size_t nnb = HWY_MIN(HWY_MIN(kAttnBlock, khi + 1 - next), cap - nslot);
        const uint8_t* kn = reinterpret_cast<const uint8_t*>(K + nslot * hd);
        const uint8_t* vn = reinterpret_cast<const uint8_t*>(Vr + nslot * hd);
        const size_t bytes = nnb * hd * sizeof(T);
        for (size_t off = 0; off < bytes; off += 64) {
          hwy::Prefetch(kn + off);
          hwy::Prefetch(vn + off);
        }
      }
    }
    for (size_t r0 = 0; r0 < num_rows; r0 += kAttnRowsPerPass) {
      const size_t nr = HWY_MIN(kAttnRowsPerPass, num_rows - r0);
      AttnRow* pass = rows + r0;
      // Skip a pass whose rows all miss this block (causal prefill tiles).
      bool any = false;
      for (size_t r = 0; r < nr; ++r) {
        any |= pass[r].lo < p0 + nb && pass[r].hi >= p0;
      }
      if (!any) continue;
      switch (nr) {
        case 1: BlockScores<1>(df, pass, kb, hd, nb, scores); break;
        case 2: BlockScores<2>(df, pass, kb, hd, nb, scores); break;
        case 3: BlockScores<3>(df, pass, kb, hd, nb, scores); break;
        default: BlockScores<4>(df, pass, kb, hd, nb, scores); break;
      }
      for (size_t r = 0; r < nr; ++r) {
        float* s = scores + r * kAttnBlock;
        if (pass[r].lo < p0 + nb && pass[r].hi >= p0) {
          BlockSoftmax(df, pass[r], p0, nb, scale, ksb, vsb, s);
        } else {
          pass[r].corr = 1.0f;
          for (size_t t = 0; t < nb; ++t) s[t] = 0.0f;
        }
      }
      switch (nr) {
        case 1: BlockAccumulateV<1>(df, pass, vb, hd, nb, scores); break;
        case 2: BlockAccumulateV<2>(df, pass, vb, hd, nb, scores); break;
        case 3: BlockAccumulateV<3>(df, pass, vb, hd, nb, scores); break;
        default: BlockAccumulateV<4>(df, pass, vb, hd, nb, scores); break;
      }
    }
    p0 += nb;
  }
  for (size_t r = 0; r < num_rows; ++r) {
    // l >= 1: the row's own maximum contributes e^0.
    ScaleInPlace(df, rows[r].out, 1.0f / rows[r].l, hd);
  }
}

template <typename T, class DF>
HWY_INLINE void AttentionT(DF df, const KVCache& cache, size_t layer, size_t pos,
                           size_t num_tokens, const float* HWY_RESTRICT q,
                           size_t num_heads, float* HWY_RESTRICT out,
                           size_t window, float scale) {
  const size_t hd = cache.head_dim();
  const size_t num_kv = cache.num_kv_heads();
  const size_t g = num_heads / num_kv;
  const size_t start = cache.start(layer);
  // Tile: tt tokens x gh heads of one group share one walk over the keys.
  const size_t gh = HWY_MIN(g, kAttnMaxTileRows);
  const size_t tt = HWY_MAX(size_t{1}, kAttnMaxTileRows / gh);
  AttnRow rows[kAttnMaxTileRows];
  for (size_t kvh = 0; kvh < num_kv; ++kvh) {
    for (size_t t0 = 0; t0 < num_tokens; t0 += tt) {
      const size_t nt = HWY_MIN(tt, num_tokens - t0);
      for (size_t j0 = 0; j0 < g; j0 += gh) {
        const size_t nj = HWY_MIN(gh, g - j0);
        size_t n = 0;
        for (size_t t = t0; t < t0 + nt; ++t) {
          const size_t p = pos + t;
          const size_t wlo = p + 1 >= window ? p + 1 - window : 0;
          for (size_t j = j0; j < j0 + nj; ++j) {
            const size_t head = kvh * g + j;
            AttnRow& row = rows[n++];
            row.q = q + (t * num_heads + head) * hd;
            row.out = out + (t * num_heads + head) * hd;
            row.lo = HWY_MAX(start, wlo);
            row.hi = p;
          }
        }
        AttendKVHead<T>(df, cache, layer, kvh, rows, n, scale);
      }
    }
  }
}

}  // namespace detail

// Causal grouped-query attention of num_tokens query tokens at absolute
// positions pos .. pos + num_tokens - 1 against layer `layer` of the cache.
// Decode: num_tokens = 1, pos = cache.end(layer) - 1. Prefill: append the T
// positions' K/V first (AppendKV), then call with num_tokens = T.
//  q:   [num_tokens][num_heads][head_dim] f32 (RoPE already applied)
//  out: [num_tokens][num_heads][head_dim] f32, must not overlap q.
// Query head h uses kv head h / (num_heads / num_kv_heads). Token at position
// p attends the held positions in [p - W + 1, p], W = min(window or inf,
// capacity), i.e. [max(start(layer), p - W + 1), p].
// Errors: layer out of range; num_heads not a positive multiple of
// num_kv_heads; a query position not held (pos < start or pos + num_tokens >
// end); a prefill chunk whose own appends already overwrote (ring wrap)
// positions its first query needs -- split it so that
// max(0, pos + 1 - W) >= end(layer) - capacity, i.e. chunks of at most
// capacity - W + 1 tokens once the ring is full (decode always satisfies it).
template <class DF>
HWY_INLINE Status Attention(DF df, const KVCache& cache, size_t layer, size_t pos,
                            size_t num_tokens, const float* HWY_RESTRICT q,
                            size_t num_heads, float* HWY_RESTRICT out,
                            const AttentionOptions& options = AttentionOptions()) {
  if (cache.num_layers() == 0 || cache.head_dim() == 0) {
    return InvalidArgument("Attention: cache not created");
  }
  if (layer >= cache.num_layers()) {
    return OutOfRange("Attention: layer %zu, cache has %zu layers", layer,
                      cache.num_layers());
  }
  const size_t num_kv = cache.num_kv_heads();
  if (num_heads == 0 || num_heads % num_kv != 0) {
    return InvalidArgument(
        "Attention: num_heads = %zu is not a positive multiple of the cache's "
        "num_kv_heads = %zu",
        num_heads, num_kv);
  }
  if (num_tokens == 0) return Status();
  if (q == nullptr || out == nullptr) {
    return InvalidArgument("Attention: q or out is null");
  }
  const size_t start = cache.start(layer), end = cache.end(layer);
  if (pos < start || pos + num_tokens > end) {
    return OutOfRange(
        "Attention: query positions [%zu, %zu) but layer %zu holds [%zu, %zu); "
        "append the K/V of the query positions first",
        pos, pos + num_tokens, layer, start, end);
  }
  const size_t cap = cache.capacity();
  const size_t window =
      options.window == 0 ? cap : HWY_MIN(options.window, cap);
  const size_t needed = pos + 1 >= window ? pos + 1 - window : 0;
  if (end > cap && needed < end - cap) {
    return OutOfRange(
        "Attention: the query at position %zu needs positions from %zu on, but "
        "the ring buffer (capacity %zu) now holds layer %zu only from %zu "
        "(overwritten by this chunk's own appends); use prefill chunks of at "
        "most %zu tokens",
        pos, needed, cap, layer, end - cap, cap - window + 1);
  }
  const float scale = options.scale != 0.0f
                          ? options.scale
                          : 1.0f / std::sqrt(static_cast<float>(cache.head_dim()));
  switch (cache.type()) {
    case ElementType::kF32:
      detail::AttentionT<float>(df, cache, layer, pos, num_tokens, q, num_heads,
                                out, window, scale);
      break;
    case ElementType::kF16:
      detail::AttentionT<hwy::float16_t>(df, cache, layer, pos, num_tokens, q,
                                         num_heads, out, window, scale);
      break;
    case ElementType::kBF16:
      detail::AttentionT<hwy::bfloat16_t>(df, cache, layer, pos, num_tokens, q,
                                          num_heads, out, window, scale);
      break;
    case ElementType::kI8:
      detail::AttentionT<int8_t>(df, cache, layer, pos, num_tokens, q,
                                 num_heads, out, window, scale);
      break;
  }
  return Status();
}

HWY_INLINE Status Attention(const KVCache& cache, size_t layer, size_t pos,
                            size_t num_tokens, const float* HWY_RESTRICT q,
                            size_t num_heads, float* HWY_RESTRICT out,
                            const AttentionOptions& options = AttentionOptions()) {
  return Attention(hn::ScalableTag<float>(), cache, layer, pos, num_tokens, q,
                   num_heads, out, options);
}

}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#endif  // LUTRA_ATTENTION_INL_H_
