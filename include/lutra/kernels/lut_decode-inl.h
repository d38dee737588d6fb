// SIMD decode of palettized weight rows (format: format/palette.h,
// PaletteFormat, and docs/format.md): the one decode path shared by GEMV,
// GEMM and anything else that reads the packed format, in the spirit of
// gemma.cpp's DecompressAndCall.
//
// A weight row is consumed in *units* of one packed block per 128-bit lane
// (L/16 consecutive blocks, L = u8 lanes of DecodeTag). DecodeUnit hands the
// caller, for each unit, PaletteFormat<b>::kRunsPerBlock vectors of u8
// codebook indices ("sub-vectors") together with their *position* in the
// unit; the kernels multiply them with activations that were rearranged once
// per call into the same position order (PositionColumn), so the decode never
// has to move bytes across 128-bit blocks. Sub-vector s holds, in 128-bit
// lane i, byte j, column c0 + i * C + 16 s + j (C = kBlockCols, c0 = the
// unit's first column); its positions are s * L + 16 i + j.
// - One plane (b = 1, 2, 4, 8): a unit is one vector of L bytes; sub-vector s
//   is field s of every byte.
// - Two planes (b = 3, 6): a unit is 3L bytes, regrouped by
//   DeinterleaveBlocks3 into one vector per 16-byte part of the blocks (two
//   low chunks, one high chunk); sub-vector s ORs a low field and a high one.
// The last unit of a row may be partial: bytes past the row read as 0 (index
// 0), multiplied by activations that are 0 there.
//
// Per-target code: include after hwy/highway.h (see dot-inl.h). Entry points
// (namespace lutra::HWY_NAMESPACE):
//   DecodeTag, UnitBytes<b>(d), UnitGeometryFor<b>(shape),
//   PositionColumn<b>(geometry, pos)        the position order
//   DecodeUnit<b>(d, p, avail, fn(s, idx))  unit -> u8 index vectors
//   LutU8<b, D>, DecodeLookupUnit<b>(d, lut, p, avail, fn(s, codes))
//                                           unit -> u8 codes (int8 path)
//   kCodeBias, CodeMagnitude(codes), CodeDot(di32, codes, mag, x, acc)
//                                           codes times i8 activations
//   LookupF32(df, table, entries, idx)      f32 codebook lookup (f32 path)

#if defined(LUTRA_LUT_DECODE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LUTRA_LUT_DECODE_INL_H_
#undef LUTRA_LUT_DECODE_INL_H_
#else
#define LUTRA_LUT_DECODE_INL_H_
#endif

#include <stddef.h>
#include <stdint.h>

#include <utility>

#include "hwy/highway.h"
#include "lutra/format/palette.h"
#include "lutra/kernels/matmul.h"  // UnitGeometry

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// u8 descriptor of a decode unit: full vectors for every width.
using DecodeTag = hn::ScalableTag<uint8_t>;

// Packed bytes consumed per unit: one block per 128-bit lane (L = lanes of d).
template <int kBits, class D>
HWY_INLINE size_t UnitBytes(D d) {
  return hn::Lanes(d) / 16 * PaletteFormat<kBits>::kBlockBytes;
}

// Geometry of the units of one row of `shape` on the current target.
template <int kBits>
HWY_INLINE UnitGeometry UnitGeometryFor(const PaletteShape& shape) {
  using F = PaletteFormat<kBits>;
  UnitGeometry g;
  g.lanes = hn::Lanes(DecodeTag());
  g.sub_vectors = F::kRunsPerBlock;
  g.unit_positions = g.lanes * g.sub_vectors;
  g.unit_bytes = UnitBytes<kBits>(DecodeTag());
  const size_t blocks_per_unit = g.lanes / 16;
  const size_t blocks = shape.padded_cols() / F::kBlockCols;
  g.num_units = (blocks + blocks_per_unit - 1) / blocks_per_unit;
  return g;
}

// Column of the first of the 16 consecutive positions starting at `pos`
// (pos % 16 == 0): positions come in runs of 16 consecutive columns.
// May return a column >= padded K for the zero tail of the last unit.
template <int kBits>
HWY_INLINE size_t PositionColumn(const UnitGeometry& g, size_t pos) {
  const size_t cols_per_chunk = PaletteFormat<kBits>::kBlockCols;
  const size_t u = pos / g.unit_positions;
  const size_t rem = pos % g.unit_positions;
  const size_t s = rem / g.lanes, block = (rem % g.lanes) / 16;
  return u * (g.lanes / 16) * cols_per_chunk + block * cols_per_chunk + 16 * s;
}

// Returns v through an empty asm statement that "modifies" it, so that the
// compiler keeps v in one register and cannot see where it came from. Two
// uses (x86 with GCC or Clang; other compilers and architectures get v
// unchanged):
// - LoadedOnce, below.
// - Loop-carried accumulators of a blocked loop (GEMM's MicroKernelI8):
//   GCC 12 gave each `acc = vpdpbusd(acc, ...)` of such a loop two register
//   copies (in and out), 24 moves per 12 dot products, until the
//   accumulators passed through here once per iteration (docs/gemv.md).
template <class V>
HWY_INLINE V Opaque(V v) {
#if HWY_ARCH_X86 && (HWY_COMPILER_GCC || HWY_COMPILER_CLANG) && \
    HWY_TARGET != HWY_EMU128 && HWY_TARGET != HWY_SCALAR
  asm("" : "+v"(v.raw));
#endif
  return v;
}

// Returns v, kept in a register. The decode uses each loaded vector several
// times (once per field or table part), and compilers fold the load into
// every use as a memory operand. In the int8 GEMV, whose 4 software-
// prefetched row streams come from DRAM, those repeated accesses to lines
// still arriving cost a third of the cache-cold 4-bit speed on AVX3_ZEN4 (an
// A/B of the two forms of this header in a scratch harness; matmul_bench's
// 4-bit figure rose with it, docs/gemv.md). Opaque forces one load.
template <class V>
HWY_INLINE V LoadedOnce(V v) {
  return Opaque(v);
}

// Field of width kW starting at bit kShift of every byte.
template <int kShift, int kW, class D>
HWY_INLINE hn::Vec<D> Field(D d, hn::Vec<D> v) {
  const hn::Repartition<uint16_t, D> d16;
  if constexpr (kW == 8) return v;
  const auto mask = hn::Set(d, static_cast<uint8_t>((1u << kW) - 1u));
  if (kShift == 0) return hn::And(v, mask);
  // 16-bit shift: bits of the neighbouring byte shifted in are masked off.
  return hn::And(hn::BitCast(d, hn::ShiftRight<kShift>(hn::BitCast(d16, v))), mask);
}

// Loads the unit of L/16 consecutive 48-byte blocks at p (bytes past `avail`
// read as 0) and regroups its 16-byte parts: part k (0, 1, 2) of block i
// goes to 128-bit block i of *out[k]. The 3L bytes are loaded as three full
// vectors and permuted as u64 lanes with two-table lookups; the index
// vectors do not depend on p, so callers' loops hoist them.
template <class D>
HWY_INLINE void DeinterleaveBlocks3(D d, const uint8_t* HWY_RESTRICT p, size_t avail,
                                    hn::Vec<D>* HWY_RESTRICT a, hn::Vec<D>* HWY_RESTRICT b,
                                    hn::Vec<D>* HWY_RESTRICT h) {
  const size_t L = hn::Lanes(d);
  hn::Vec<D> v0, v1, v2;
  if (avail >= 3 * L) {
    v0 = LoadedOnce(hn::LoadU(d, p));
    v1 = LoadedOnce(hn::LoadU(d, p + L));
    v2 = LoadedOnce(hn::LoadU(d, p + 2 * L));
  } else {
    v0 = hn::LoadN(d, p, HWY_MIN(avail, L));
    v1 = avail > L ? hn::LoadN(d, p + L, HWY_MIN(avail - L, L)) : hn::Zero(d);
    v2 = avail > 2 * L ? hn::LoadN(d, p + 2 * L, avail - 2 * L) : hn::Zero(d);
  }
  if (L == 16) {  // one block per unit: the loads are the parts
    *a = v0;
    *b = v1;
    *h = v2;
    return;
  }
  const hn::Repartition<uint64_t, D> d64;
  using V64 = hn::Vec<decltype(d64)>;
  const size_t N = hn::Lanes(d64);
  const V64 w0 = hn::BitCast(d64, v0), w1 = hn::BitCast(d64, v1), w2 = hn::BitCast(d64, v2);
  // Output u64 lane k of part `part` is lane 6 (k / 2) + 2 part + (k % 2) of
  // the concatenation w0 | w1 | w2 (3N lanes): from (w0, w1) when below 2N,
  // else from (w1, w2) at that position minus N.
  const V64 k = hn::Iota(d64, 0);
  const V64 pair = hn::ShiftRight<1>(k);  // 6 * pair = 4 * pair + 2 * pair
  const V64 base = hn::Add(hn::Add(hn::ShiftLeft<2>(pair), hn::ShiftLeft<1>(pair)),
                           hn::And(k, hn::Set(d64, 1)));
  const V64 vN = hn::Set(d64, N);
  const auto part = [&](uint64_t which) HWY_ATTR {
    const V64 pos = hn::Add(base, hn::Set(d64, 2 * which));
    const auto low = hn::Lt(pos, hn::Add(vN, vN));
    // Positions below N are not used from (w1, w2); clamp them into range.
    const V64 pos_hi = hn::IfThenElseZero(hn::Ge(pos, vN), hn::Sub(pos, vN));
    const V64 lo =
        hn::TwoTablesLookupLanes(d64, w0, w1, hn::IndicesFromVec(d64, hn::IfThenElseZero(low, pos)));
    const V64 hi = hn::TwoTablesLookupLanes(d64, w1, w2, hn::IndicesFromVec(d64, pos_hi));
    return hn::BitCast(d, hn::IfThenElse(low, lo, hi));
  };
  *a = part(0);
  *b = part(1);
  *h = part(2);
}

// Index vector of run kS of a unit (kS < kRunsPerBlock), from the unit's
// parts: for one plane, field kS of every byte of `a` (the loaded vector);
// for two planes, field kS % F (F = fields per low byte) of low part a
// (kS < F) or b, OR'd with field kS of high part h shifted above the low bits.
template <int kBits, size_t kS, class D>
HWY_INLINE hn::Vec<D> RunIndices(D d, hn::Vec<D> a, hn::Vec<D> b, hn::Vec<D> h) {
  using F = PaletteFormat<kBits>;
  if constexpr (!F::kTwoPlanes) {
    (void)b;
    (void)h;
    return Field<kS * kBits, kBits>(d, a);
  } else {
    constexpr size_t kFields = 8 / F::kLowBits;
    const hn::Vec<D> low = Field<(kS % kFields) * F::kLowBits, F::kLowBits>(d, kS < kFields ? a : b);
    const hn::Vec<D> high = Field<kS * F::kHighBits, F::kHighBits>(d, h);
    return hn::Or(low, hn::ShiftLeft<F::kLowBits>(high));
  }
}

template <int kBits, class D, class Fn, size_t... kS>
HWY_INLINE void CallRuns(D d, hn::Vec<D> a, hn::Vec<D> b, hn::Vec<D> h, const Fn& fn,
                         std::index_sequence<kS...>) {
  (fn(kS, RunIndices<kBits, kS>(d, a, b, h)), ...);  // in order of kS
}

// Decodes one unit of a packed row starting at p: calls fn(s, idx) for
// s < PaletteFormat<kBits>::kRunsPerBlock in order, idx = u8 codebook indices
// of positions s * L .. s * L + L - 1 of the unit. `avail` = bytes of the row
// from p (a unit loads at most min(avail, UnitBytes) bytes, so nothing past
// the row is read).
template <int kBits, class D, class Fn>
HWY_INLINE void DecodeUnit(D d, const uint8_t* HWY_RESTRICT p, size_t avail,
                           const Fn& fn) {
  using V = hn::Vec<D>;
  using Runs = std::make_index_sequence<PaletteFormat<kBits>::kRunsPerBlock>;
  if constexpr (PaletteFormat<kBits>::kTwoPlanes) {
    V a, b, h;
    DeinterleaveBlocks3(d, p, avail, &a, &b, &h);
    CallRuns<kBits>(d, a, b, h, fn, Runs());
  } else {
    const size_t L = hn::Lanes(d);
    const V v = LoadedOnce(avail >= L ? hn::LoadU(d, p) : hn::LoadN(d, p, avail));
    CallRuns<kBits>(d, v, v, v, fn, Runs());
  }
}

// How the int8 path multiplies u8 codes q (codebook entries on a 256-level
// grid, matmul.h) by i8 activations x in [-127, 127]: CodeDot adds, to each
// i32 lane, the sum of its 4 bytes' products. Where the hardware has no u8 x
// i8 dot product, Highway emulates SumOfMulQuadAccumulate by splitting both
// operands into i16 halves (9 ops per vector on AVX2). With signed codes
// s = q - 128 (kCodeBias) it takes 5: |s| x (x with the sign of s) in
// pmaddubsw (pairs stay within i16: 2 * 128 * 127 < 2^15, so it never
// saturates), pmaddwd by 1 to i32, add. SVE has a native i8 x i8 svdot but
// emulates u8 x i8 with two. Since sum(q x) = sum(s x) + 128 sum(x), the
// kernels start each block's i32 accumulators at 128 x their activation
// sums (PreparedInput::xcorr / xqsum), so every i32 sum, and every output
// bit, is the same as with unsigned codes.
// LutU8 returns codes already biased (q ^ kCodeBias); callers pass them and
// CodeMagnitude(codes), computed once per weight vector, to CodeDot.
#if HWY_ARCH_X86 && HWY_TARGET >= HWY_AVX2 && HWY_TARGET <= HWY_SSSE3
#define LUTRA_CODE_DOT_SIGN 1
#define LUTRA_CODE_DOT_SDOT 0
#elif HWY_TARGET_IS_SVE
#define LUTRA_CODE_DOT_SIGN 0
#define LUTRA_CODE_DOT_SDOT 1
#else
#define LUTRA_CODE_DOT_SIGN 0
#define LUTRA_CODE_DOT_SDOT 0
#endif
constexpr uint8_t kCodeBias = (LUTRA_CODE_DOT_SIGN || LUTRA_CODE_DOT_SDOT) ? 0x80 : 0;
// Whether CodeDot's accumulator depends on its previous value through one
// integer add only (the products are independent of it), so that a single
// accumulation chain does not stall, unlike a dot-product instruction's
// multi-cycle latency.
constexpr bool kCodeDotAddsLast = LUTRA_CODE_DOT_SIGN;

// What CodeDot needs of a code vector besides the codes: |s| where codes are
// signed (shared by every activation vector the codes meet), else unused.
template <class V>
HWY_INLINE V CodeMagnitude(V codes) {
#if LUTRA_CODE_DOT_SIGN
  const hn::DFromV<V> d;
  const hn::RebindToSigned<decltype(d)> di8;
  return hn::BitCast(d, hn::Abs(hn::BitCast(di8, codes)));
#else
  return codes;
#endif
}

// acc + per i32 lane, the sum over its 4 bytes of code * x (codes from LutU8,
// mag = CodeMagnitude(codes)).
template <class DI32, class VU8, class VI8>
HWY_INLINE hn::Vec<DI32> CodeDot(DI32 di32, VU8 codes, VU8 mag, VI8 x, hn::Vec<DI32> acc) {
#if LUTRA_CODE_DOT_SIGN
  const hn::Repartition<int8_t, DI32> di8;
  const hn::Repartition<int16_t, DI32> di16;
  // Where a code is 0 its magnitude is too, so the undefined lane is harmless.
  const auto sx = hn::IfNegativeThenNegOrUndefIfZero(hn::BitCast(di8, codes), x);
  const auto pairs = hn::SatWidenMulPairwiseAdd(di16, mag, sx);
  return hn::Add(acc, hn::WidenMulPairwiseAdd(di32, pairs, hn::Set(di16, int16_t{1})));
#elif LUTRA_CODE_DOT_SDOT
  (void)mag;
  const hn::Repartition<int8_t, DI32> di8;
  return hn::SumOfMulQuadAccumulate(di32, hn::BitCast(di8, codes), x, acc);
#else
  (void)mag;
  return hn::SumOfMulQuadAccumulate(di32, codes, x, acc);
#endif
}
#undef LUTRA_CODE_DOT_SIGN
#undef LUTRA_CODE_DOT_SDOT

// Byte lookup in a table of 2^kBits u8 entries (one codebook group), loaded
// once per row; lookups return the entry ^ kCodeBias (CodeDot's codes).
// b <= 4: one 16-byte table broadcast to every 128-bit block,
// looked up with TableLookupBytes (pshufb / tbl) inside each block. b = 6, 8:
// TableLookupLanes / TwoTablesLookupLanes (vpermb / vpermi2b on AVX3_ZEN4)
// over pieces of 2L entries, selected by the index's high bits.
//
// On SVE (and RVV) vectors are sizeless types that cannot be class members,
// so there the object keeps the table pointer and loads the table vectors
// in Lookup (L1-resident: one 16-byte broadcast load for b <= 4); elsewhere
// it keeps them in registers. Both compute the same lookup.
#if HWY_TARGET_IS_SVE || HWY_TARGET == HWY_RVV
#define LUTRA_LUT_SIZELESS 1
#else
#define LUTRA_LUT_SIZELESS 0
#endif
template <int kBits, class D>
class LutU8 {
  static constexpr size_t kEntries = size_t{1} << kBits;
  // Up to 16 vectors of 16 lanes (b = 8 on 128-bit targets).
  static constexpr size_t kMaxTables = kBits <= 4 ? 1 : kEntries / 16;

 public:
  using V = hn::Vec<D>;
  // User-provided, so that it is compiled for this target: the implicit
  // constructor would not be, and GCC then refuses to inline NEON's
  // always-inline Vec128() into it ("target specific option mismatch").
  HWY_INLINE LutU8() {}
  // `table` has max(16, 2^kBits) bytes.
  HWY_INLINE void Init(D d, const uint8_t* HWY_RESTRICT table) {
    if constexpr (kBits > 4) {
      const size_t L = hn::Lanes(d);
      // One table vector (vpermb) when L >= 2^b, else an even number of
      // L-entry vectors: L is a power of two >= 16.
      num_ = L >= kEntries ? 1 : HWY_MIN(kMaxTables, kEntries / L);
    }
#if LUTRA_LUT_SIZELESS
    (void)d;
    table_ = table;
#else
    for (size_t i = 0; i < num_; ++i) t_[i] = hn::Xor(Table(d, table, i), hn::Set(d, kCodeBias));
#endif
    if constexpr (kBits == 2) {
#if LUTRA_LUT_SIZELESS
      // Nibble tables: a 4-bit nibble holds two 2-bit fields; pair_[0] maps
      // it to the entry of its low field, pair_[1] to that of its high field.
      for (size_t i = 0; i < 16; ++i) {
        pair_[0][i] = static_cast<uint8_t>(table[i & 3] ^ kCodeBias);
        pair_[1][i] = static_cast<uint8_t>(table[i >> 2] ^ kCodeBias);
      }
#else
      // The same nibble tables built in registers: this runs once per row,
      // and bytes stored one by one then reloaded as a vector would stall on
      // store forwarding for longer than a short row takes to multiply.
      const V nib = hn::And(hn::Iota(d, 0), hn::Set(d, 15));  // i % 16 per block
      const V three = hn::Set(d, 3);
      const V t16 = t_[0];  // the table, broadcast to every block
      const hn::Repartition<uint16_t, D> d16;
      p_[0] = hn::TableLookupBytes(t16, hn::And(nib, three));
      p_[1] = hn::TableLookupBytes(
          t16, hn::And(hn::BitCast(d, hn::ShiftRight<2>(hn::BitCast(d16, nib))), three));
#endif
    }
  }
  // b = 2 only: codes of field `which` (0 = low, 1 = high) of each 4-bit
  // nibble in `nibbles` (values < 16).
  HWY_INLINE V LookupPair(D d, size_t which, V nibbles) const {
#if LUTRA_LUT_SIZELESS
    return hn::TableLookupBytes(hn::LoadDup128(d, pair_[which]), nibbles);
#else
    (void)d;
    return hn::TableLookupBytes(p_[which], nibbles);
#endif
  }
  HWY_INLINE V Lookup(D d, V idx) const {
    if constexpr (kBits <= 4) {
      return hn::TableLookupBytes(T(d, 0), idx);
    } else {
      const size_t L = hn::Lanes(d);
      if (num_ == 1) return hn::TableLookupLanes(T(d, 0), hn::IndicesFromVec(d, idx));
      // Pieces of 2L entries: lookup of the low bits, select by the high bits.
      const V lowmask = hn::Set(d, static_cast<uint8_t>(2 * L - 1));
      const V lo = hn::And(idx, lowmask);
      V result = hn::TwoTablesLookupLanes(d, T(d, 0), T(d, 1), hn::IndicesFromVec(d, lo));
      for (size_t i = 2; i + 1 < num_; i += 2) {
        const V piece = hn::TwoTablesLookupLanes(d, T(d, i), T(d, i + 1), hn::IndicesFromVec(d, lo));
        const auto in_piece = hn::Ge(idx, hn::Set(d, static_cast<uint8_t>(i * L)));
        result = hn::IfThenElse(in_piece, piece, result);
      }
      return result;
    }
  }

 private:
  // Table vector i of `table` (i < num_).
  static HWY_INLINE V Table(D d, const uint8_t* HWY_RESTRICT table, size_t i) {
    if constexpr (kBits <= 4) {
      (void)i;
      return hn::LoadDup128(d, table);
    } else {
      if (hn::Lanes(d) >= kEntries) return hn::LoadN(d, table, kEntries);  // zero past 2^b
      return hn::LoadU(d, table + i * hn::Lanes(d));
    }
  }
#if LUTRA_LUT_SIZELESS
  HWY_INLINE V T(D d, size_t i) const {
    return hn::Xor(Table(d, table_, i), hn::Set(d, kCodeBias));
  }
  const uint8_t* table_ = nullptr;
#else
  HWY_INLINE V T(D d, size_t i) const {
    (void)d;
    return t_[i];
  }
  V t_[kMaxTables];
  V p_[2];  // b = 2: nibble tables
#endif
  size_t num_ = 1;
#if LUTRA_LUT_SIZELESS
  HWY_ALIGN uint8_t pair_[2][16];  // b = 2: nibble tables
#endif
};

// Decodes the unit at p straight to u8 codes of the group's table (the int8
// path): calls fn(s, codes) for each sub-vector s, in the position order of
// DecodeUnit. For b = 2 a 4-bit nibble (two fields) indexes two
// 16-entry tables, so the four fields of a byte cost two masks and four
// byte shuffles instead of seven shift/mask operations and four shuffles.
template <int kBits, class D, class Fn>
HWY_INLINE void DecodeLookupUnit(D d, const LutU8<kBits, D>& lut, const uint8_t* HWY_RESTRICT p,
                                 size_t avail, const Fn& fn) {
  if constexpr (kBits == 2) {
    const size_t L = hn::Lanes(d);
    const hn::Vec<D> v = LoadedOnce(avail >= L ? hn::LoadU(d, p) : hn::LoadN(d, p, avail));
    const hn::Vec<D> lo = Field<0, 4>(d, v), hi = Field<4, 4>(d, v);
    fn(0, lut.LookupPair(d, 0, lo));
    fn(1, lut.LookupPair(d, 1, lo));
    fn(2, lut.LookupPair(d, 0, hi));
    fn(3, lut.LookupPair(d, 1, hi));
  } else {
    DecodeUnit<kBits>(d, p, avail,
                      [&](size_t s, hn::Vec<D> idx) HWY_ATTR { fn(s, lut.Lookup(d, idx)); });
  }
}
#undef LUTRA_LUT_SIZELESS

// f32 codebook lookup of i32 indices (exact path). `table` has
// max(16, 2^b) floats. 16-entry tables fit one or two f32 vectors on 512- and
// 256-bit targets (vpermps / vpermt2ps); otherwise gather.
template <class DF, class VI>
HWY_INLINE hn::Vec<DF> LookupF32(DF df, const float* HWY_RESTRICT table, size_t entries,
                                 VI idx) {
  const size_t N = hn::Lanes(df);
  if (entries <= 16 && N == 16) {
    return hn::TableLookupLanes(hn::LoadU(df, table), hn::IndicesFromVec(df, idx));
  }
  if (entries <= 16 && N == 8) {
    return hn::TwoTablesLookupLanes(df, hn::LoadU(df, table), hn::LoadU(df, table + 8),
                                    hn::IndicesFromVec(df, idx));
  }
  return hn::GatherIndex(df, table, idx);
}

// The f32 weights of quarter q (< 4) of a vector of u8 indices stored at idx
// (one DecodeUnit sub-vector: f32 lanes = u8 lanes / 4), i.e. of its
// positions q * NF .. q * NF + NF - 1, looked up in `table` (LookupF32).
template <class DF>
HWY_INLINE hn::Vec<DF> LookupF32Quarter(DF df, const float* HWY_RESTRICT table, size_t entries,
                                        const uint8_t* HWY_RESTRICT idx, size_t q) {
  const hn::RebindToSigned<DF> di32;
  const hn::Rebind<uint8_t, decltype(di32)> d8q;
  const auto vi = hn::PromoteTo(di32, hn::LoadU(d8q, idx + q * hn::Lanes(df)));
  return LookupF32(df, table, entries, vi);
}

}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#endif  // LUTRA_LUT_DECODE_INL_H_
