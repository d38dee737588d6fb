// Grouped-query attention over a KVCache (kv_cache.h) for decode (one query
// token) and prefill (T query tokens, causal), with online (streaming)
// softmax, an optional sliding window, ring-buffer wrap-around, and split-KV
// over a thread pool.
//
// Per-target code: include after hwy/highway.h (and, for dynamic dispatch,
// from a .cc that includes hwy/foreach_target.h).
//
// How it works (why it is fast): query head h uses kv head h / g, where
// g = num_heads / num_kv_heads. The positions are cut into chunks of
// kv_chunk (256) positions by absolute position, and each chunk into blocks
// that end at multiples of 32, at the ring's wrap and at the chunk's end.
// For every block the kernel computes the scores of all query rows that
// share the kv head (the g heads of every query token of a tile), so each K
// and V row is read from memory once per group, not g times, and prefetches
// the rows four blocks ahead into L2. Softmax is streamed per chunk: per
// query row a running max m, running sum l and an unnormalized output,
// rescaled by e^(m_old - m_new) when the max grows. Chunks give partial
// results (m, l, out) that are merged in increasing chunk order
// (flash-decoding). Decode runs the (kv head, chunk) pairs in parallel and
// merges afterwards; prefill runs (kv head, query tile) groups in parallel,
// each merging its chunks as it goes. No T x T (or T x context) score matrix
// exists: the scratch is a 4 x 32 score tile on the stack plus one partial
// row per (row, chunk) in decode. int8 K rows meet q quantized to int8 in
// an integer dot product (ScoresI8: vpdpbusd where there is one); int8 V
// rows are converted to f32 for the V update; their scales multiply the
// score and the softmax weight, not every element. Where a pass's query
// rows fit the registers (AVX-512, g = 3 rows of 128 dims: GQA decode),
// both the rows and their outputs stay in registers for the whole block
// (ScoresInRegisters, AccumulateVInRegisters), with the same bits as the
// general path.
//
// Determinism (other code relies on it): every output element is the same
// sequence of floating-point operations whatever the thread count and
// whatever other queries share the call. Block and chunk boundaries depend
// on positions only; per (row, key) and per (row, output lane) the FMA
// chains run in a fixed order; a query's own range of positions (not its
// tile's) drives its softmax lanes; keys a row does not attend get weight 0,
// which leaves its sums unchanged exactly (for finite V).

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
  // Split-KV chunk in positions; 0 means the default (256). Positions are
  // cut into chunks [c * kv_chunk, (c + 1) * kv_chunk) by absolute position,
  // each chunk's partial softmax is computed on its own (in parallel in
  // decode) and the chunks are merged in increasing order. The result
  // depends on kv_chunk but never on the thread count or on num_tokens.
  size_t kv_chunk = 0;
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

#include <algorithm>
#include <cmath>
#include <vector>

#include "hwy/aligned_allocator.h"
#include "hwy/cache_control.h"
#include "hwy/highway.h"
#include "lutra/base/element-inl.h"
#include "lutra/base/status.h"
#include "lutra/base/thread_pool.h"
#include "lutra/kernels/dot-inl.h"  // SumsOfFour
#include "lutra/kernels/kv_cache.h"
#include "lutra/kernels/lut_decode-inl.h"  // CodeDot: int8 KV's integer q.k
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
// Default split-KV chunk (AttentionOptions::kv_chunk), in positions.
constexpr size_t kAttnDefaultChunk = 256;

// Blocks ahead that decode prefetches, into L2: 4 x 32 rows of K and V
// (64 KiB of f16 at head_dim 128) stay well within L2 and cover the memory
// latency; measured on attention_bench (Zen 3): distance 1 into L1 0.42, 4
// into L2 0.48 of the read bandwidth, none 0.41.
constexpr size_t kAttnPrefetchBlocks = 4;

// ScoresInRegisters and AccumulateVInRegisters hold rows in arrays of vectors,
// which need sized vector types: not SVE (even its fixed-size targets) or
// RVV (the reason lut_decode-inl.h has LUTRA_LUT_SIZELESS).
#if HWY_TARGET_IS_SVE || HWY_TARGET == HWY_RVV || HWY_HAVE_SCALABLE
#define LUTRA_ATTN_ROWS_IN_REGISTERS 0
#else
#define LUTRA_ATTN_ROWS_IN_REGISTERS 1
#endif

// Prefetch into L2 (not L1: the blocks ahead would evict the current one).
HWY_INLINE void PrefetchL2(const uint8_t* p) {
#if HWY_COMPILER_GCC  // also clang
  __builtin_prefetch(p, 0, 2);
#else
  hwy::Prefetch(p);
#endif
}

// State of one query row (one query head of one token) within one chunk.
struct AttnRow {
  const float* q;  // head_dim
  float* out;      // head_dim: the chunk's unnormalized accumulator
  size_t lo, hi;   // attended positions [lo, hi]
  float m, l;      // running max and running sum of e^(s - m)
  float corr;      // rescale factor of `out` pending for this block
  // int8 KV only (QuantizeQueryRows): q as int8 (QuantizeRowI8), zero past
  // head_dim up to a whole u8 vector; q ~= q8 * q8_scale. The raw score is
  // (CodeDot sum - q8_bias) * q8_scale (ScoresI8).
  const int8_t* q8;
  float q8_scale;
  int32_t q8_bias;
};

#if LUTRA_ATTN_ROWS_IN_REGISTERS
// Vectors of head_dim per row that BlockScores and BlockAccumulateV keep in
// registers (ScoresInRegisters, AccumulateVInRegisters): kNR x this <= 24
// of AVX-512's 32 registers (12 of 16 elsewhere).
template <size_t kNR>
constexpr size_t RegisterRowVectors() {
  return (HWY_ARCH_X86 && HWY_TARGET > HWY_AVX3 ? 12 : 24) / kNR;
}

// Whether kNR rows of head_dim fit those registers as whole vectors (3 rows
// of 128 dims on AVX-512: GQA decode with g = 3).
template <size_t kNR, class DF>
HWY_INLINE bool RowsFitRegisters(DF df, size_t head_dim) {
  const size_t N = hn::Lanes(df);
  return head_dim % N == 0 && head_dim / N <= RegisterRowVectors<kNR>();
}

// BlockScores with the kNR query rows (kS vectors each: all of head_dim) in
// registers, one key at a time. Loading q for every FMA (two keys per
// pass, q from L1) made the K pass load-bound: 32 vector loads per key
// where this core issues one per cycle; here a key is kS loads. Each score
// is the same FMA chain over head_dim and the same ReduceSum as there.
template <size_t kNR, size_t kS, class DF, typename T, class Prefetch>
HWY_INLINE void ScoresInRegisters(DF df, const AttnRow* rows, const T* HWY_RESTRICT krows,
                                  size_t head_dim, size_t t0, size_t t1,
                                  float* HWY_RESTRICT scores, const Prefetch& prefetch) {
  using V = hn::Vec<DF>;
  const size_t N = hn::Lanes(df);
  V q[kNR][kS];  // fixed-size vectors: an array the compiler keeps in registers
  HWY_UNROLL(4)
  for (size_t r = 0; r < kNR; ++r) {
    HWY_UNROLL(24)
    for (size_t j = 0; j < kS; ++j) q[r][j] = hn::LoadU(df, rows[r].q + j * N);
  }
  for (size_t t = t0; t < t1; ++t) {
    prefetch(t);
    const T* HWY_RESTRICT k = krows + t * head_dim;
    V acc[kNR];
    HWY_UNROLL(4)
    for (size_t r = 0; r < kNR; ++r) acc[r] = hn::Zero(df);
    HWY_UNROLL(24)
    for (size_t j = 0; j < kS; ++j) {
      const V x = LoadAsF32(df, k + j * N);
      HWY_UNROLL(4)
      for (size_t r = 0; r < kNR; ++r) acc[r] = hn::MulAdd(q[r][j], x, acc[r]);
    }
    HWY_UNROLL(4)
    for (size_t r = 0; r < kNR; ++r) scores[r * kAttnBlock + t] = hn::ReduceSum(df, acc[r]);
  }
}

// ScoresInRegisters with kS = s (1 <= s <= RegisterRowVectors<kNR>()) a
// constant.
template <size_t kNR, size_t kS = 1, class DF, typename T, class Prefetch>
HWY_INLINE void ScoresInRegistersN(size_t s, DF df, const AttnRow* rows,
                                   const T* HWY_RESTRICT krows, size_t head_dim, size_t t0,
                                   size_t t1, float* HWY_RESTRICT scores,
                                   const Prefetch& prefetch) {
  if constexpr (kS < RegisterRowVectors<kNR>()) {
    if (s > kS) {
      return ScoresInRegistersN<kNR, kS + 1>(s, df, rows, krows, head_dim, t0, t1, scores,
                                             prefetch);
    }
  }
  ScoresInRegisters<kNR, kS>(df, rows, krows, head_dim, t0, t1, scores, prefetch);
}
#endif  // LUTRA_ATTN_ROWS_IN_REGISTERS

// int8 KV: q.k in integers. Each query row is quantized like a cached row
// (QuantizeRowI8: one symmetric scale, |q - q8 * q8_scale| <= max|q| / 254),
// and the dot of q8 with a key's int8 row is exact in i32 (CodeDot, i.e.
// vpdpbusd on VNNI). Dequantizing every key element to f32 for 3 x 8 FMAs
// per key (head_dim 128, g = 3) and a ReduceSum per row made the K pass
// half of int8 decode attention's time (docs/attention.md).
// Because the sums are exact, any order of accumulation and reduction gives
// the same bits: the paths below (4 keys at a time with a transposed
// reduction, or one key with ReduceSum) agree, as the determinism contract
// needs. CodeDot multiplies u8 codes (biased by kCodeBias) by i8 values; a
// key byte k is passed as the code of k + 128, so each sum is
// sum(k q8) + 128 sum(q8) where kCodeBias is 0, and sum(k q8) where it is
// 0x80: q8_bias removes the difference.

// Grows a per-thread scratch buffer of n elements of T, one per T (kept
// between calls: no allocation per decode step once warm), and returns it,
// aligned to HWY_ALIGNMENT: the partial outputs (float) and quantized query
// rows (int8_t) in them are loaded and stored a vector at a time (head_dim
// is a multiple of the vector length in practice), and a 64-byte access that
// spans two cache lines costs two.
template <typename T>
inline T* AttnScratch(size_t n) {
  static thread_local hwy::AlignedVector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// Sets q8, q8_scale and q8_bias of rows[0, num_rows) from their q.
template <class DF>
HWY_INLINE void QuantizeQueryRows(DF df, AttnRow* rows, size_t num_rows, size_t head_dim) {
  const hn::Repartition<uint8_t, DF> du8;
  const size_t L8 = hn::Lanes(du8);
  const size_t stride = (head_dim + L8 - 1) / L8 * L8;
  int8_t* buf = AttnScratch<int8_t>(num_rows * stride);
  for (size_t r = 0; r < num_rows; ++r) {
    int8_t* q8 = buf + r * stride;
    rows[r].q8 = q8;
    rows[r].q8_scale = QuantizeRowI8(df, rows[r].q, head_dim, q8);
    memset(q8 + head_dim, 0, stride - head_dim);
    int32_t sum = 0;
    for (size_t i = 0; i < head_dim; ++i) sum += q8[i];
    rows[r].q8_bias = kCodeBias == 0 ? 128 * sum : 0;
  }
}

// scores[r * kAttnBlock + t] = q_r . k_t for t in [t0, t1), r < kNR (raw
// dots, as BlockScores's), in integers (above). krows: the block's int8
// rows of head_dim bytes.
template <size_t kNR, class DF, class Prefetch>
HWY_INLINE void ScoresI8(DF df, const AttnRow* rows, const int8_t* HWY_RESTRICT krows,
                         size_t head_dim, size_t t0, size_t t1, float* HWY_RESTRICT scores,
                         const Prefetch& prefetch) {
  (void)df;  // only the 4-key path converts to f32 in vectors
  const hn::RebindToSigned<DF> di32;
  const hn::Repartition<int8_t, DF> di8;
  const hn::Repartition<uint8_t, DF> du8;
  const size_t L8 = hn::Lanes(du8);
  const auto flip = hn::Set(du8, static_cast<uint8_t>(0x80 ^ kCodeBias));
  // Key bytes [i, i + L8) of row k as codes; zero past head_dim, where q8 is
  // zero too (so the last row of the cache is not read past its end).
  const auto codes_at = [&](const int8_t* k, size_t i) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(k) + i;
    return hn::Xor(i + L8 <= head_dim ? hn::LoadU(du8, p) : hn::LoadN(du8, p, head_dim - i),
                   flip);
  };
  const auto q8_at = [&](size_t r, size_t i) { return hn::Load(di8, rows[r].q8 + i); };
  size_t t = t0;
#if LUTRA_ATTN_ROWS_IN_REGISTERS
  // Four keys at a time where their 4 x kNR accumulators fit the registers
  // (AVX-512, NEON; kNR <= 2 on 16-register targets): the four sums of a row
  // are reduced together, a third of four ReduceSums' shuffles, and stored
  // as one 4-lane vector.
  if constexpr (4 * kNR + 4 <= RegisterRowVectors<1>()) {
    using VI = hn::Vec<decltype(di32)>;
    for (; t + 4 <= t1; t += 4) {
      VI acc[kNR][4];
      HWY_UNROLL(4)
      for (size_t r = 0; r < kNR; ++r) {
        HWY_UNROLL(4)
        for (size_t u = 0; u < 4; ++u) acc[r][u] = hn::Zero(di32);
      }
      HWY_UNROLL(4)
      for (size_t u = 0; u < 4; ++u) prefetch(t + u);
      // Key by key, each row front to back: reading the four rows' first
      // vectors, then their second ones, defeated the hardware prefetcher
      // (1.6x slower from DRAM).
      HWY_UNROLL(4)
      for (size_t u = 0; u < 4; ++u) {
        for (size_t i = 0; i < head_dim; i += L8) {
          const auto codes = codes_at(krows + (t + u) * head_dim, i);
          const auto mag = CodeMagnitude(codes);
          HWY_UNROLL(4)
          for (size_t r = 0; r < kNR; ++r) {
            acc[r][u] = CodeDot(di32, codes, mag, q8_at(r, i), acc[r][u]);
          }
        }
      }
      HWY_UNROLL(4)
      for (size_t r = 0; r < kNR; ++r) {
        // The four keys' sums in lanes 0..3.
        const VI x = SumsOfFour(di32, acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
        const auto dots = hn::ConvertTo(df, hn::Sub(x, hn::Set(di32, rows[r].q8_bias)));
        hn::StoreN(hn::Mul(dots, hn::Set(df, rows[r].q8_scale)), df, scores + r * kAttnBlock + t,
                   4);
      }
    }
  }
#endif
  for (; t < t1; ++t) {
    prefetch(t);
    const int8_t* k = krows + t * head_dim;
    auto a0 = hn::Zero(di32), a1 = hn::Zero(di32), a2 = hn::Zero(di32), a3 = hn::Zero(di32);
    for (size_t i = 0; i < head_dim; i += L8) {
      const auto codes = codes_at(k, i);
      const auto mag = CodeMagnitude(codes);
      a0 = CodeDot(di32, codes, mag, q8_at(0, i), a0);
      if (kNR > 1) a1 = CodeDot(di32, codes, mag, q8_at(kNR > 1 ? 1 : 0, i), a1);
      if (kNR > 2) a2 = CodeDot(di32, codes, mag, q8_at(kNR > 2 ? 2 : 0, i), a2);
      if (kNR > 3) a3 = CodeDot(di32, codes, mag, q8_at(kNR > 3 ? 3 : 0, i), a3);
    }
    // The same int -> f32 conversion and product as the vector path.
    const auto score = [&](size_t r, hn::Vec<decltype(di32)> acc) {
      return static_cast<float>(hn::ReduceSum(di32, acc) - rows[r].q8_bias) * rows[r].q8_scale;
    };
    scores[t] = score(0, a0);
    if (kNR > 1) scores[kAttnBlock + t] = score(kNR > 1 ? 1 : 0, a1);
    if (kNR > 2) scores[2 * kAttnBlock + t] = score(kNR > 2 ? 2 : 0, a2);
    if (kNR > 3) scores[3 * kAttnBlock + t] = score(kNR > 3 ? 3 : 0, a3);
  }
}

// scores[r * kAttnBlock + t] = q_r . k_t for t in [t0, t1), r < kNR (raw
// dots). krows: the block's rows of head_dim elements of T, the cache's
// element type (float, float16_t or bfloat16_t; element-inl.h loads them as
// f32; int8_t rows go to ScoresI8). Two keys per iteration give 2 * kNR independent FMA chains
// (one chain per row is latency-bound). Each score is the same sequence of
// FMAs over head_dim whatever t0, t1 and kNR are: the determinism contract
// of Attention rests on that.
template <size_t kNR, class DF, typename T>
HWY_INLINE void BlockScores(DF df, const AttnRow* rows, const T* HWY_RESTRICT krows,
                            size_t head_dim, size_t t0, size_t t1,
                            float* HWY_RESTRICT scores, const uint8_t* kpf,
                            const uint8_t* vpf, size_t pf_rows) {
  using V = hn::Vec<DF>;
  const size_t N = hn::Lanes(df);
  const size_t row_bytes = head_dim * sizeof(T);
  // Prefetches row t of a later block's K and V (pf_rows = 0: none),
  // spread over this block's keys: a burst of prefetches at the block start
  // stalls on the fill buffers.
  const auto prefetch = [&](size_t t) {
    if (t >= pf_rows) return;
    for (size_t off = 0; off < row_bytes; off += 64) {
      PrefetchL2(kpf + t * row_bytes + off);
      PrefetchL2(vpf + t * row_bytes + off);
    }
  };
  // int8 rows: in integers. The f32 body below stays in this function (and
  // is compiled, unused, for int8): moving it into a function of its own
  // that took the prefetch lambda, or making int8 an overload with a
  // prefetch functor, each slowed one type's decode attention by 10-20 %
  // in measurements (docs/attention.md).
  if constexpr (hwy::IsSame<T, int8_t>()) {
    ScoresI8<kNR>(df, rows, krows, head_dim, t0, t1, scores, prefetch);
    return;
  }
#if LUTRA_ATTN_ROWS_IN_REGISTERS
  // The query rows in registers when they fit (3 rows x 128 dims on
  // AVX-512, as for AccumulateVInRegisters).
  if (RowsFitRegisters<kNR>(df, head_dim)) {
    ScoresInRegistersN<kNR>(head_dim / N, df, rows, krows, head_dim, t0, t1, scores, prefetch);
    return;
  }
#endif
  const float* q0 = rows[0].q;
  const float* q1 = rows[kNR > 1 ? 1 : 0].q;
  const float* q2 = rows[kNR > 2 ? 2 : 0].q;
  const float* q3 = rows[kNR > 3 ? 3 : 0].q;
  size_t t = t0;
  for (; t + 2 <= t1; t += 2) {
    prefetch(t);
    prefetch(t + 1);
    const T* ka = krows + t * head_dim;
    const T* kb = ka + head_dim;
    V a0 = hn::Zero(df), a1 = hn::Zero(df), a2 = hn::Zero(df), a3 = hn::Zero(df);
    V b0 = hn::Zero(df), b1 = hn::Zero(df), b2 = hn::Zero(df), b3 = hn::Zero(df);
    size_t i = 0;
    for (; i + N <= head_dim; i += N) {
      const V k0 = LoadAsF32(df, ka + i);
      const V k1 = LoadAsF32(df, kb + i);
      V q = hn::LoadU(df, q0 + i);
      a0 = hn::MulAdd(q, k0, a0);
      b0 = hn::MulAdd(q, k1, b0);
      if (kNR > 1) {
        q = hn::LoadU(df, q1 + i);
        a1 = hn::MulAdd(q, k0, a1);
        b1 = hn::MulAdd(q, k1, b1);
      }
      if (kNR > 2) {
        q = hn::LoadU(df, q2 + i);
        a2 = hn::MulAdd(q, k0, a2);
        b2 = hn::MulAdd(q, k1, b2);
      }
      if (kNR > 3) {
        q = hn::LoadU(df, q3 + i);
        a3 = hn::MulAdd(q, k0, a3);
        b3 = hn::MulAdd(q, k1, b3);
      }
    }
    if (i < head_dim) {
      const size_t n = head_dim - i;
      const V k0 = LoadNAsF32(df, ka + i, n);  // zero past the end
      const V k1 = LoadNAsF32(df, kb + i, n);
      V q = hn::LoadN(df, q0 + i, n);
      a0 = hn::MulAdd(q, k0, a0);
      b0 = hn::MulAdd(q, k1, b0);
      if (kNR > 1) {
        q = hn::LoadN(df, q1 + i, n);
        a1 = hn::MulAdd(q, k0, a1);
        b1 = hn::MulAdd(q, k1, b1);
      }
      if (kNR > 2) {
        q = hn::LoadN(df, q2 + i, n);
        a2 = hn::MulAdd(q, k0, a2);
        b2 = hn::MulAdd(q, k1, b2);
      }
      if (kNR > 3) {
        q = hn::LoadN(df, q3 + i, n);
        a3 = hn::MulAdd(q, k0, a3);
        b3 = hn::MulAdd(q, k1, b3);
      }
    }
    scores[t] = hn::ReduceSum(df, a0);
    scores[t + 1] = hn::ReduceSum(df, b0);
    if (kNR > 1) scores[kAttnBlock + t] = hn::ReduceSum(df, a1);
    if (kNR > 1) scores[kAttnBlock + t + 1] = hn::ReduceSum(df, b1);
    if (kNR > 2) scores[2 * kAttnBlock + t] = hn::ReduceSum(df, a2);
    if (kNR > 2) scores[2 * kAttnBlock + t + 1] = hn::ReduceSum(df, b2);
    if (kNR > 3) scores[3 * kAttnBlock + t] = hn::ReduceSum(df, a3);
    if (kNR > 3) scores[3 * kAttnBlock + t + 1] = hn::ReduceSum(df, b3);
  }
  if (t < t1) {  // the odd key: the same per-score chain as above
    prefetch(t);
    const T* ka = krows + t * head_dim;
    V a0 = hn::Zero(df), a1 = hn::Zero(df), a2 = hn::Zero(df), a3 = hn::Zero(df);
    size_t i = 0;
    for (; i + N <= head_dim; i += N) {
      const V k0 = LoadAsF32(df, ka + i);
      a0 = hn::MulAdd(hn::LoadU(df, q0 + i), k0, a0);
      if (kNR > 1) a1 = hn::MulAdd(hn::LoadU(df, q1 + i), k0, a1);
      if (kNR > 2) a2 = hn::MulAdd(hn::LoadU(df, q2 + i), k0, a2);
      if (kNR > 3) a3 = hn::MulAdd(hn::LoadU(df, q3 + i), k0, a3);
    }
    if (i < head_dim) {
      const size_t n = head_dim - i;
      const V k0 = LoadNAsF32(df, ka + i, n);
      a0 = hn::MulAdd(hn::LoadN(df, q0 + i, n), k0, a0);
      if (kNR > 1) a1 = hn::MulAdd(hn::LoadN(df, q1 + i, n), k0, a1);
      if (kNR > 2) a2 = hn::MulAdd(hn::LoadN(df, q2 + i, n), k0, a2);
      if (kNR > 3) a3 = hn::MulAdd(hn::LoadN(df, q3 + i, n), k0, a3);
    }
    scores[t] = hn::ReduceSum(df, a0);
    if (kNR > 1) scores[kAttnBlock + t] = hn::ReduceSum(df, a1);
    if (kNR > 2) scores[2 * kAttnBlock + t] = hn::ReduceSum(df, a2);
    if (kNR > 3) scores[3 * kAttnBlock + t] = hn::ReduceSum(df, a3);
  }
}

// o[r] += sum_{k < kNK} w[r][t + k] * v_k for r < kNR: one group of kNK <= 4
// keys whose rows start at v (head_dim elements each), FMAs in key order.
template <size_t kNK, size_t kNR, class DF, typename T>
HWY_INLINE void AccumulateVKeys(DF df, float* const* o, const T* HWY_RESTRICT v,
                                size_t head_dim, const float* const* w, size_t t) {
  using V = hn::Vec<DF>;
  const size_t N = hn::Lanes(df);
  const T* v0p = v;
  const T* v1p = v + (kNK > 1 ? head_dim : 0);
  const T* v2p = v + (kNK > 2 ? 2 * head_dim : 0);
  const T* v3p = v + (kNK > 3 ? 3 * head_dim : 0);
  // The group's weights, per row (4 x kNR vectors: registers on AVX-512).
  const auto wv = [&](size_t r, size_t k) {
    return hn::Set(df, w[r < kNR ? r : 0][t + (k < kNK ? k : 0)]);
  };
  const V w00 = wv(0, 0), w01 = wv(0, 1), w02 = wv(0, 2), w03 = wv(0, 3);
  const V w10 = wv(1, 0), w11 = wv(1, 1), w12 = wv(1, 2), w13 = wv(1, 3);
  const V w20 = wv(2, 0), w21 = wv(2, 1), w22 = wv(2, 2), w23 = wv(2, 3);
  const V w30 = wv(3, 0), w31 = wv(3, 1), w32 = wv(3, 2), w33 = wv(3, 3);
  // a + w_k * x_k over the group's keys, in t order.
  const auto fma = [&](V a, V x0, V x1, V x2, V x3, V c0, V c1, V c2, V c3) {
    a = hn::MulAdd(c0, x0, a);
    if (kNK > 1) a = hn::MulAdd(c1, x1, a);
    if (kNK > 2) a = hn::MulAdd(c2, x2, a);
    if (kNK > 3) a = hn::MulAdd(c3, x3, a);
    return a;
  };
  // Output vectors i .. i + n of every row (n = N: the whole vectors, which
  // load and store unmasked; masked loads and stores throughout made the
  // pass twice as slow; n < N: the last, partial one).
  const auto step = [&](size_t i, size_t n) {
    const bool full = n == N;
    const auto load = [&](const T* p) { return full ? LoadAsF32(df, p) : LoadNAsF32(df, p, n); };
    const V x0 = load(v0p + i);
    const V x1 = kNK > 1 ? load(v1p + i) : x0;
    const V x2 = kNK > 2 ? load(v2p + i) : x0;
    const V x3 = kNK > 3 ? load(v3p + i) : x0;
    const auto update = [&](float* p, V c0, V c1, V c2, V c3) {
      const V a = fma(full ? hn::LoadU(df, p) : hn::LoadN(df, p, n), x0, x1, x2, x3, c0, c1, c2, c3);
      if (full) {
        hn::StoreU(a, df, p);
      } else {
        hn::StoreN(a, df, p, n);
      }
    };
    update(o[0] + i, w00, w01, w02, w03);
    if (kNR > 1) update(o[kNR > 1 ? 1 : 0] + i, w10, w11, w12, w13);
    if (kNR > 2) update(o[kNR > 2 ? 2 : 0] + i, w20, w21, w22, w23);
    if (kNR > 3) update(o[kNR > 3 ? 3 : 0] + i, w30, w31, w32, w33);
  };
  size_t i = 0;
  for (; i + N <= head_dim; i += N) step(i, N);
  if (i < head_dim) step(i, head_dim - i);
}

#if LUTRA_ATTN_ROWS_IN_REGISTERS
// BlockAccumulateV with all kNR x kS output vectors (kS = head_dim / N) in
// registers for the whole block: each V row is loaded once and feeds kNR
// FMAs per vector, and no output is loaded or stored per key
// (AccumulateVKeys loads and stores each once per four keys: a third of the
// V pass's instructions, and store-to-load chains). The same chain per
// output lane: Mul by corr, then FMAs in t order.
template <size_t kNR, size_t kS, class DF, typename T>
HWY_INLINE void AccumulateVInRegisters(DF df, AttnRow* rows, const T* HWY_RESTRICT vrows,
                                       size_t head_dim, size_t t0, size_t t1,
                                       const float* HWY_RESTRICT w) {
  using V = hn::Vec<DF>;
  const size_t N = hn::Lanes(df);
  V o[kNR][kS];  // fixed-size vectors: an array the compiler keeps in registers
  HWY_UNROLL(4)
  for (size_t r = 0; r < kNR; ++r) {
    const V c = hn::Set(df, rows[r].corr);
    HWY_UNROLL(24)
    for (size_t j = 0; j < kS; ++j) o[r][j] = hn::Mul(hn::LoadU(df, rows[r].out + j * N), c);
  }
  for (size_t t = t0; t < t1; ++t) {
    const T* HWY_RESTRICT v = vrows + t * head_dim;
    HWY_UNROLL(24)
    for (size_t j = 0; j < kS; ++j) {
      const V x = LoadAsF32(df, v + j * N);
      HWY_UNROLL(4)
      for (size_t r = 0; r < kNR; ++r) {
        o[r][j] = hn::MulAdd(hn::Set(df, w[r * kAttnBlock + t]), x, o[r][j]);
      }
    }
  }
  HWY_UNROLL(4)
  for (size_t r = 0; r < kNR; ++r) {
    HWY_UNROLL(24)
    for (size_t j = 0; j < kS; ++j) hn::StoreU(o[r][j], df, rows[r].out + j * N);
  }
}

// AccumulateVInRegisters with kS = s (1 <= s <= RegisterRowVectors<kNR>())
// a constant.
template <size_t kNR, size_t kS = 1, class DF, typename T>
HWY_INLINE void AccumulateVInRegistersN(size_t s, DF df, AttnRow* rows,
                                        const T* HWY_RESTRICT vrows, size_t head_dim, size_t t0,
                                        size_t t1, const float* HWY_RESTRICT w) {
  if constexpr (kS < RegisterRowVectors<kNR>()) {
    if (s > kS) {
      return AccumulateVInRegistersN<kNR, kS + 1>(s, df, rows, vrows, head_dim, t0, t1, w);
    }
  }
  AccumulateVInRegisters<kNR, kS>(df, rows, vrows, head_dim, t0, t1, w);
}
#endif  // LUTRA_ATTN_ROWS_IN_REGISTERS

// out_r = out_r * corr_r + sum_{t in [t0, t1)} w[r * kAttnBlock + t] * v_t
// for r < kNR. vrows: the block's rows of head_dim elements; w already
// includes int8 V scales. Keys go in groups of four (AccumulateVKeys): each
// V row is read once, front to back, and each out vector is loaded and
// stored once per group. Walking the block in stripes of a cache line down
// its 32 rows instead (the previous kernel) read at half the bandwidth of a
// sequential walk, from L2 as from DRAM, and held decode attention at a
// third of the read bandwidth (docs/attention.md). Each output lane is the
// same chain (Mul by corr, then FMAs in t order) whatever kNR and the
// grouping are, and a weight of exactly 0 leaves it unchanged (finite V).
template <size_t kNR, class DF, typename T>
HWY_INLINE void BlockAccumulateV(DF df, AttnRow* rows, const T* HWY_RESTRICT vrows,
                                 size_t head_dim, size_t t0, size_t t1,
                                 const float* HWY_RESTRICT w) {
#if LUTRA_ATTN_ROWS_IN_REGISTERS
  // All outputs in registers (AccumulateVInRegisters) when the rows fit
  // (RowsFitRegisters). Decode attention from DRAM, f16: 23.3 -> 18.4 ns per
  // position and kv head on AVX3_ZEN4 (docs/attention.md). Slices of a row
  // would read each V row in stripes, which on AVX2 (4 vectors per slice)
  // cost 1.27x against AccumulateVKeys; so other shapes keep that.
  if (RowsFitRegisters<kNR>(df, head_dim)) {
    AccumulateVInRegistersN<kNR>(head_dim / hn::Lanes(df), df, rows, vrows, head_dim, t0, t1, w);
    return;
  }
#endif
  float* o[kNR];
  const float* wr[kNR];
  for (size_t r = 0; r < kNR; ++r) {
    o[r] = rows[r].out;
    wr[r] = w + r * kAttnBlock;
    ScaleInPlace(df, o[r], rows[r].corr, head_dim);
  }
  size_t t = t0;
  for (; t + 4 <= t1; t += 4) {
    AccumulateVKeys<4, kNR>(df, o, vrows + t * head_dim, head_dim, wr, t);
  }
  switch (t1 - t) {
    case 3: AccumulateVKeys<3, kNR>(df, o, vrows + t * head_dim, head_dim, wr, t); break;
    case 2: AccumulateVKeys<2, kNR>(df, o, vrows + t * head_dim, head_dim, wr, t); break;
    case 1: AccumulateVKeys<1, kNR>(df, o, vrows + t * head_dim, head_dim, wr, t); break;
    default: break;
  }
}

// Online-softmax update of one row for the block of positions
// [p0, p0 + nb): turns the raw dots in s[0, nb) into weights
// e^(score - m_new) (times the V scale for int8), zero outside [lo, hi],
// updates m and l, and sets row.corr = e^(m_old - m_new) for `out`.
// The vectors start at the row's first attended position, so the lanes (and
// the sum) do not depend on where the block starts.
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
  // Explicit fma: no contraction choice left to the compiler.
  row.l = std::fma(row.l, row.corr, hn::ReduceSum(df, sum));
}

// Attention of rows[0, num_rows) (all sharing kv head `kv_head`) over the
// positions of chunk [c_lo, c_hi) that they attend: each row's out, m and l
// become that chunk's partial result (out unnormalized; m = -inf, l = 0 and
// out = 0 for a row that attends nothing in the chunk).
// Blocks end at absolute boundaries (multiples of kAttnBlock, of the
// capacity: the ring's wrap, and the chunk's end), so a row meets the same
// blocks whichever other rows share the call.
template <typename T, class DF>
HWY_NOINLINE void AttendChunk(DF df, const KVCache& cache, size_t layer,
                              size_t kv_head, AttnRow* rows, size_t num_rows,
                              float scale, size_t c_lo, size_t c_hi) {
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
  if constexpr (hwy::IsSame<T, int8_t>()) QuantizeQueryRows(df, rows, num_rows, hd);
  const size_t rows_hi = khi;
  klo = HWY_MAX(klo, c_lo);
  khi = HWY_MIN(khi, c_hi - 1);
  // End (exclusive) of the block that starts at p.
  const auto block_end = [&](size_t p) {
    const size_t e = HWY_MIN(p - p % kAttnBlock + kAttnBlock, p - p % cap + cap);
    return HWY_MIN(HWY_MIN(e, c_hi), khi + 1);
  };
  HWY_ALIGN float scores[kAttnRowsPerPass * kAttnBlock];
  for (size_t p0 = klo; p0 <= khi;) {
    const size_t p1 = block_end(p0);
    const size_t nb = p1 - p0;
    const size_t slot = p0 % cap;  // rows [slot, slot + nb) are contiguous
    const T* kb = K + slot * hd;
    const T* vb = Vr + slot * hd;
    const float* ksb = ks ? ks + slot : nullptr;
    const float* vsb = vs ? vs + slot : nullptr;
    size_t pf_rows = 0;
    const uint8_t* kpf = nullptr;
    const uint8_t* vpf = nullptr;
    if (p0 + kAttnPrefetchBlocks * kAttnBlock <= rows_hi) {
      // Rows kAttnPrefetchBlocks blocks ahead, by slot (wrapping like the
      // ring; the next chunk's when near this chunk's end: usually the
      // next task of this thread).
      const size_t pslot = (p0 + kAttnPrefetchBlocks * kAttnBlock) % cap;
      kpf = reinterpret_cast<const uint8_t*>(K + pslot * hd);
      vpf = reinterpret_cast<const uint8_t*>(Vr + pslot * hd);
      pf_rows = HWY_MIN(kAttnBlock, cap - pslot);
    }
    for (size_t r0 = 0; r0 < num_rows; r0 += kAttnRowsPerPass) {
      const size_t nr = HWY_MIN(kAttnRowsPerPass, num_rows - r0);
      AttnRow* pass = rows + r0;
      // Keys [t0, t1) of the block that some row of the pass attends; skip
      // the pass if none (causal prefill tiles).
      size_t t0 = nb, t1 = 0;
      for (size_t r = 0; r < nr; ++r) {
        if (pass[r].lo < p1 && pass[r].hi >= p0) {
          t0 = HWY_MIN(t0, pass[r].lo > p0 ? pass[r].lo - p0 : 0);
          t1 = HWY_MAX(t1, HWY_MIN(nb, pass[r].hi + 1 - p0));
        }
      }
      if (t0 >= t1) continue;
      switch (nr) {
        case 1: BlockScores<1>(df, pass, kb, hd, t0, t1, scores, kpf, vpf, pf_rows); break;
        case 2: BlockScores<2>(df, pass, kb, hd, t0, t1, scores, kpf, vpf, pf_rows); break;
        case 3: BlockScores<3>(df, pass, kb, hd, t0, t1, scores, kpf, vpf, pf_rows); break;
        default: BlockScores<4>(df, pass, kb, hd, t0, t1, scores, kpf, vpf, pf_rows); break;
      }
      pf_rows = 0;  // the first pass prefetches for all
      for (size_t r = 0; r < nr; ++r) {
        float* s = scores + r * kAttnBlock;
        if (pass[r].lo < p1 && pass[r].hi >= p0) {
          BlockSoftmax(df, pass[r], p0, nb, scale, ksb, vsb, s);
        } else {
          pass[r].corr = 1.0f;
          for (size_t t = 0; t < nb; ++t) s[t] = 0.0f;
        }
      }
      switch (nr) {
        case 1: BlockAccumulateV<1>(df, pass, vb, hd, t0, t1, scores); break;
        case 2: BlockAccumulateV<2>(df, pass, vb, hd, t0, t1, scores); break;
        case 3: BlockAccumulateV<3>(df, pass, vb, hd, t0, t1, scores); break;
        default: BlockAccumulateV<4>(df, pass, vb, hd, t0, t1, scores); break;
      }
    }
    p0 = p1;
  }
}

// Folds a chunk's partial result (po, pm, pl) into a row's running result
// (out, m, l), flash-decoding style. Chunks are merged in increasing order
// starting from out = 0, m = -inf, l = 0; a chunk the row does not attend
// (pm = -inf) is skipped.
template <class DF>
HWY_INLINE void MergeChunk(DF df, float* HWY_RESTRICT out, float& m, float& l,
                           const float* HWY_RESTRICT po, float pm, float pl,
                           size_t head_dim) {
  if (pm == -HUGE_VALF) return;
  const size_t N = hn::Lanes(df);
  const float m_new = HWY_MAX(m, pm);
  const float a = std::exp(m - m_new);  // 0 for the first chunk
  const float b = std::exp(pm - m_new);
  const hn::Vec<DF> va = hn::Set(df, a), vb = hn::Set(df, b);
  for (size_t i = 0; i < head_dim; i += N) {
    const size_t n = HWY_MIN(N, head_dim - i);
    const auto o = hn::Mul(hn::LoadN(df, out + i, n), va);
    hn::StoreN(hn::MulAdd(hn::LoadN(df, po + i, n), vb, o), df, out + i, n);
  }
  l = std::fma(pl, b, l * a);
  m = m_new;
}

// Runs fn(task) for task < n on `pool` (inline when null).
template <class Fn>
void AttnParallel(ThreadPool* pool, size_t n, const Fn& fn) {
  if (pool == nullptr) {
    for (size_t i = 0; i < n; ++i) fn(i);
  } else {
    pool->ParallelFor(n, [&](size_t task, size_t) { fn(task); });
  }
}

template <typename T, class DF>
HWY_INLINE void AttentionT(DF df, const KVCache& cache, size_t layer, size_t pos,
                           size_t num_tokens, const float* HWY_RESTRICT q,
                           size_t num_heads, float* HWY_RESTRICT out,
                           size_t window, float scale, size_t chunk,
                           ThreadPool* pool) {
  const size_t hd = cache.head_dim();
  const size_t num_kv = cache.num_kv_heads();
  const size_t g = num_heads / num_kv;
  const size_t start = cache.start(layer);
  // Groups: tt tokens x gh heads of one kv head share one walk over the keys.
  const size_t gh = HWY_MIN(g, kAttnMaxTileRows);
  const size_t tt = HWY_MAX(size_t{1}, kAttnMaxTileRows / gh);
  const size_t num_tiles = (num_tokens + tt - 1) / tt;
  const size_t num_sub = (g + gh - 1) / gh;
  const size_t num_groups = num_kv * num_tiles * num_sub;
  const size_t max_rows = HWY_MIN(num_tokens, tt) * gh;
  // Fills rows (out = the final output rows) of group gi; returns the count.
  const auto fill = [&](size_t gi, AttnRow* rows) {
    const size_t kvh = gi / (num_tiles * num_sub);
    const size_t t0 = (gi / num_sub) % num_tiles * tt;
    const size_t j0 = gi % num_sub * gh;
    const size_t nt = HWY_MIN(tt, num_tokens - t0), nj = HWY_MIN(gh, g - j0);
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
    return n;
  };
  // Rows' lo and hi grow with the token: the first row starts the group's
  // range, the last ends it.
  const auto chunks = [&](const AttnRow* rows, size_t n, size_t* c0, size_t* c1) {
    *c0 = rows[0].lo / chunk;
    *c1 = rows[n - 1].hi / chunk + 1;
  };
  const auto finish = [&](AttnRow* rows, size_t n, const float* l) {
    // l >= 1: each row's own maximum contributes e^0.
    for (size_t r = 0; r < n; ++r) ScaleInPlace(df, rows[r].out, 1.0f / l[r], hd);
  };
  const size_t threads = pool == nullptr ? 1 : pool->NumThreads();
  if (threads > 1 && num_tokens * num_heads <= kAttnMaxTileRows) {
    // Split-KV (decode, short verify batches; num_groups <= 64 here): one
    // task per (group, chunk) writes its partial result, then each group
    // merges its chunks in increasing order, the same merges as below.
    size_t first[kAttnMaxTileRows + 1], cfirst[kAttnMaxTileRows];
    first[0] = 0;
    for (size_t gi = 0; gi < num_groups; ++gi) {
      AttnRow rows[kAttnMaxTileRows];
      size_t c0, c1;
      chunks(rows, fill(gi, rows), &c0, &c1);
      cfirst[gi] = c0;
      first[gi + 1] = first[gi] + (c1 - c0);
    }
    const size_t num_tasks = first[num_groups];
    // Per task: max_rows partial rows, then (m, l) per row.
    const size_t stride = max_rows * (hd + 2);
    float* parts = AttnScratch<float>(num_tasks * stride);
    pool->ParallelFor(num_tasks, [&](size_t task, size_t) {
      const size_t gi = static_cast<size_t>(
          std::upper_bound(first, first + num_groups + 1, task) - first - 1);
      AttnRow rows[kAttnMaxTileRows];
      const size_t n = fill(gi, rows);
      float* p = parts + task * stride;
      for (size_t r = 0; r < n; ++r) rows[r].out = p + r * hd;
      const size_t c = cfirst[gi] + (task - first[gi]);
      AttendChunk<T>(df, cache, layer, gi / (num_tiles * num_sub), rows, n, scale,
                     c * chunk, (c + 1) * chunk);
      float* ml = p + max_rows * hd;
      for (size_t r = 0; r < n; ++r) {
        ml[2 * r] = rows[r].m;
        ml[2 * r + 1] = rows[r].l;
      }
    });
    const auto merge = [&](size_t gi) {
      AttnRow rows[kAttnMaxTileRows];
      float m[kAttnMaxTileRows], l[kAttnMaxTileRows];
      const size_t n = fill(gi, rows);
      for (size_t r = 0; r < n; ++r) {
        memset(rows[r].out, 0, hd * sizeof(float));
        m[r] = -HUGE_VALF;
        l[r] = 0.0f;
      }
      for (size_t task = first[gi]; task < first[gi + 1]; ++task) {
        const float* p = parts + task * stride;
        const float* ml = p + max_rows * hd;
        for (size_t r = 0; r < n; ++r) {
          MergeChunk(df, rows[r].out, m[r], l[r], p + r * hd, ml[2 * r], ml[2 * r + 1], hd);
        }
      }
      finish(rows, n, l);
    };
    // The merge reads num_tasks * stride floats: on this thread unless that
    // is large enough to pay for waking the pool again.
    const bool parallel_merge = num_tasks * stride >= (size_t{1} << 17);
    AttnParallel(parallel_merge ? pool : nullptr, num_groups, merge);
    return;
  }
  // Sequential chunks per group; groups in parallel.
  AttnParallel(threads > 1 ? pool : nullptr, num_groups, [&](size_t gi) {
    AttnRow rows[kAttnMaxTileRows], part[kAttnMaxTileRows];
    float m[kAttnMaxTileRows], l[kAttnMaxTileRows];
    const size_t n = fill(gi, rows);
    float* buf = AttnScratch<float>(n * hd);
    for (size_t r = 0; r < n; ++r) {
      memset(rows[r].out, 0, hd * sizeof(float));
      m[r] = -HUGE_VALF;
      l[r] = 0.0f;
      part[r] = rows[r];
      part[r].out = buf + r * hd;
    }
    size_t c0, c1;
    chunks(rows, n, &c0, &c1);
    const size_t kvh = gi / (num_tiles * num_sub);
    for (size_t c = c0; c < c1; ++c) {
      AttendChunk<T>(df, cache, layer, kvh, part, n, scale, c * chunk, (c + 1) * chunk);
      for (size_t r = 0; r < n; ++r) {
        MergeChunk(df, rows[r].out, m[r], l[r], part[r].out, part[r].m, part[r].l, hd);
      }
    }
    finish(rows, n, l);
  });
}

}  // namespace detail

// Causal grouped-query attention of num_tokens query tokens at absolute
// positions pos .. pos + num_tokens - 1 against layer `layer` of the cache.
// Decode: num_tokens = 1, pos = cache.end(layer) - 1. Prefill: append the T
// positions' K/V first (AppendKV), then call with num_tokens = T.
//  q:   [num_tokens][num_heads][head_dim] f32 (RoPE already applied)
//  out: [num_tokens][num_heads][head_dim] f32, must not overlap q.
// pool (may be null): decode splits the context into chunks over its
// threads; prefill splits (kv head, query tile) groups over them.
// Determinism: the output of a query at position p is bit-identical for any
// pool (null, 1, 2, ... threads) and whether it is computed alone
// (num_tokens = 1) or as a row of a larger call (speculative verification,
// prefill), given the same cache contents, window, scale and kv_chunk.
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
                            const AttentionOptions& options = AttentionOptions(),
                            ThreadPool* pool = nullptr) {
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
  const size_t chunk =
      options.kv_chunk == 0 ? detail::kAttnDefaultChunk : options.kv_chunk;
  const float scale = options.scale != 0.0f
                          ? options.scale
                          : 1.0f / std::sqrt(static_cast<float>(cache.head_dim()));
  switch (cache.type()) {
    case ElementType::kF32:
      detail::AttentionT<float>(df, cache, layer, pos, num_tokens, q, num_heads,
                                out, window, scale, chunk, pool);
      break;
    case ElementType::kF16:
      detail::AttentionT<hwy::float16_t>(df, cache, layer, pos, num_tokens, q,
                                         num_heads, out, window, scale, chunk, pool);
      break;
    case ElementType::kBF16:
      detail::AttentionT<hwy::bfloat16_t>(df, cache, layer, pos, num_tokens, q,
                                          num_heads, out, window, scale, chunk, pool);
      break;
    case ElementType::kI8:
      detail::AttentionT<int8_t>(df, cache, layer, pos, num_tokens, q,
                                 num_heads, out, window, scale, chunk, pool);
      break;
  }
  return Status();
}

HWY_INLINE Status Attention(const KVCache& cache, size_t layer, size_t pos,
                            size_t num_tokens, const float* HWY_RESTRICT q,
                            size_t num_heads, float* HWY_RESTRICT out,
                            const AttentionOptions& options = AttentionOptions(),
                            ThreadPool* pool = nullptr) {
  return Attention(hn::ScalableTag<float>(), cache, layer, pos, num_tokens, q,
                   num_heads, out, options, pool);
}

}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#undef LUTRA_ATTN_ROWS_IN_REGISTERS
#endif  // LUTRA_ATTENTION_INL_H_
