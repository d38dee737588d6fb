// GEMM Y = X W^T over palettized weights for M tokens (prefill), with the
// same fused epilogue as GEMV and a caller-given range of output channels so
// that callers split panels across threads.
//
// Each panel of NR weight rows is decoded once (lut_decode-inl.h) into a
// small tile - NR rows x all K positions, i.e. NR * K bytes, L2-resident; never
// a dequantized copy of the matrix - and reused for all M tokens by a
// register-blocked micro-kernel:
// - kInt8: the tile holds u8 codes laid out [K/4][NR][4], so one vector load
//   gives 4 consecutive positions of NR/2 rows; each token's 4 i8
//   activations are broadcast and multiplied (CodeDot: vpdpbusd where the
//   target has it) into MR x 2 i32 accumulators, converted to f32 per
//   quantization block.
// - kF32: the tile holds exact f32 weights; dot products per (token, row).
//
// kInt8 finishes each token's panel row with the shared epilogue
// (epilogue-inl.h ApplyEpilogue, LoRA through a per-panel B^T: LoraPanel);
// kF32 with GEMV's FinishRows.
//
// For M <= kGemmSmallM int8 tokens (speculative verification, short
// batches) GemmRows runs FewTokensRowsI8 instead: GEMV's row loop, with
// each code vector multiplied by a group of tokens' activations while it is
// in a register, and GEMV's summation order and epilogue per token, so every
// token's outputs are GEMV's bits (the contract in matmul.h).
//
// Per-target code: include after hwy/highway.h (see dot-inl.h).
//
// Public entry points (namespace lutra::HWY_NAMESPACE):
//   Status PrepareGemmInput(const PreparedPalette& w, const float* X, size_t M,
//                           size_t ldx, const Epilogue& ep,
//                           const MatmulOptions& opt, PreparedInput* in);
//                                                  (matmul_input-inl.h)
//   size_t GemmRangeAlignment();  // output channels per panel on this target
//   Status GemmRows(const PreparedPalette& w, const PreparedInput& in,
//                   size_t n0, size_t n1, float* Y, size_t ldy);
//   Status Gemm(const PreparedPalette& w, const float* X, size_t M, size_t ldx,
//               const Epilogue& ep, float* Y, size_t ldy,
//               ThreadPool* pool = nullptr, const MatmulOptions& opt = {},
//               PreparedInput* scratch = nullptr);

#if defined(LUTRA_GEMM_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LUTRA_GEMM_INL_H_
#undef LUTRA_GEMM_INL_H_
#else
#define LUTRA_GEMM_INL_H_
#endif

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "hwy/aligned_allocator.h"
#include "hwy/cache_control.h"
#include "hwy/highway.h"
#include "lutra/base/status.h"
#include "lutra/base/thread_pool.h"
#include "lutra/format/palette.h"
#include "lutra/kernels/dot-inl.h"
#include "lutra/kernels/epilogue-inl.h"
#include "lutra/kernels/lut_decode-inl.h"
#include "lutra/kernels/matmul.h"
#include "lutra/kernels/matmul_input-inl.h"

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

namespace detail {

// Token rows per micro-kernel call: MR x 2 vectors of i32 plus as many f32
// accumulators must fit the register file (32 on AVX-512, 16 elsewhere).
#if HWY_ARCH_X86 && HWY_TARGET > HWY_AVX3
constexpr size_t kGemmMR = 3;
#else
constexpr size_t kGemmMR = 6;
#endif

// Output rows per panel: two i32 vectors.
HWY_INLINE size_t PanelRows() { return 2 * hn::Lanes(hn::ScalableTag<int32_t>()); }

// Per-panel data shared by the micro-kernel calls of one panel.
struct Panel {
  size_t n = 0;    // first output row
  size_t nr = 0;   // valid rows (<= PanelRows())
  const uint8_t* tile = nullptr;  // [positions / 4][NR][4] u8 codes
  const float* step = nullptr;    // NR (0 past nr)
  const float* lo = nullptr;      // NR
  // B^T of the panel's rows; null without LoRA or with a delta per token
  // (FinishPanelRow then takes each token's LoraRowDots).
  const LoraPanel* lora = nullptr;
};

// Decodes rows [n, n + nr) into the interleaved u8 tile (rows past nr = 0).
template <int kBits>
HWY_NOINLINE void DecodePanelU8(const PreparedPalette& w, const PreparedInput& in, size_t n,
                                size_t nr, size_t NR, uint8_t* HWY_RESTRICT tile) {
  using D = DecodeTag;
  const D d;
  const size_t L = hn::Lanes(d);
  const PaletteShape& shape = w.shape();
  const size_t row_bytes = shape.row_bytes();
  const size_t unit_bytes = UnitBytes<kBits>(d);
  const size_t UP = in.geometry.unit_positions;
  HWY_ALIGN uint8_t buf[hn::MaxLanes(D())];
  for (size_t j = 0; j < NR; ++j) {
    if (j >= nr) {
      for (size_t q = 0; q < in.geometry.positions() / 4; ++q) memset(tile + (q * NR + j) * 4, 0, 4);
      continue;
    }
    const size_t r = n + j;
    LutU8<kBits, D> lut;
    lut.Init(d, w.table_u8(r / shape.group_rows));
    const uint8_t* row = w.view().row(r);
    for (size_t u = 0; u < in.geometry.num_units; ++u) {
      const size_t off = u * unit_bytes;
      DecodeLookupUnit<kBits>(d, lut, row + off, row_bytes - off,
                              [&](size_t s, hn::Vec<D> codes) HWY_ATTR {
        hn::Store(codes, d, buf);
        const size_t q0 = (u * UP + s * L) / 4;
        for (size_t k = 0; k < L / 4; ++k) memcpy(tile + ((q0 + k) * NR + j) * 4, buf + 4 * k, 4);
      });
    }
  }
}

// Decodes rows [n, n + nr) into exact f32 rows (positions order), zero rows
// past nr.
template <int kBits>
HWY_NOINLINE void DecodePanelF32(const PreparedPalette& w, const PreparedInput& in, size_t n,
                                 size_t nr, size_t NR, float* HWY_RESTRICT rows) {
  using D = DecodeTag;
  const D d;
  const hn::Repartition<float, D> df;
  const size_t L = hn::Lanes(d), NF = hn::Lanes(df);
  const PaletteShape& shape = w.shape();
  const size_t row_bytes = shape.row_bytes();
  const size_t unit_bytes = UnitBytes<kBits>(d);
  const size_t UP = in.geometry.unit_positions, P = in.geometry.positions();
  const size_t E = shape.num_entries();
  HWY_ALIGN uint8_t buf[hn::MaxLanes(D())];
  for (size_t j = 0; j < NR; ++j) {
    float* HWY_RESTRICT out = rows + j * P;
    if (j >= nr) {
      for (size_t p = 0; p < P; ++p) out[p] = 0.0f;
      continue;
    }
    const size_t r = n + j;
    const float* table = w.table_f32(r / shape.group_rows);
    const uint8_t* row = w.view().row(r);
    for (size_t u = 0; u < in.geometry.num_units; ++u) {
      const size_t off = u * unit_bytes;
      DecodeUnit<kBits>(
          d, row + off, row_bytes - off, [&](size_t s, hn::Vec<D> idx) HWY_ATTR {
            hn::Store(idx, d, buf);
            float* o = out + u * UP + s * L;
            for (size_t q = 0; q < L / NF; ++q) {
              hn::StoreU(LookupF32Quarter(df, table, E, buf, q), df, o + q * NF);
            }
          });
    }
  }
}

// Writes token m's outputs Y[m, n .. n + nr) of panel p from their raw
// values raw[0 .. nr) (W x in f32), through the shared epilogue.
template <class DF>
HWY_INLINE void FinishPanelRow(DF df, const EpilogueArgs& e, const Panel& p, size_t m,
                               const float* raw, float* Y, size_t ldy) {
  HWY_ALIGN float dots[2 * hn::MaxLanes(DF())];
  if (p.lora != nullptr) {
    p.lora->Dots(df, e.AxOf(m), dots);
  } else if (const LoraDelta* lora = e.LoraOf(m)) {
    LoraRowDots(*lora, e.AxOf(m), p.n, p.nr, dots);  // a delta per token
  }
  ApplyEpilogue(df, e, m, p.n, p.nr, raw, dots, Y + m * ldy);
}

// Int8 path: raw = step * acc + lo * xsum[m] for one token m, where acc holds
// the panel's two vectors of f32 dot products, then FinishPanelRow.
template <class DF, class VF = hn::Vec<DF>>
HWY_INLINE void StorePanelRow(DF df, const PreparedInput& in, const EpilogueArgs& e,
                              const Panel& p, size_t m, VF acc0, VF acc1,
                              float* Y, size_t ldy) {
  const size_t NF = hn::Lanes(df);
  HWY_ALIGN float raw[2 * hn::MaxLanes(DF())];
  const VF xs = hn::Set(df, in.xsum[m]);
  hn::Store(hn::MulAdd(acc0, hn::LoadU(df, p.step), hn::Mul(hn::LoadU(df, p.lo), xs)), df, raw);
  hn::Store(hn::MulAdd(acc1, hn::LoadU(df, p.step + NF), hn::Mul(hn::LoadU(df, p.lo + NF), xs)),
            df, raw + NF);
  FinishPanelRow(df, e, p, m, raw, Y, ldy);
}

// Int8 micro-kernel: tokens [m, m + kMR) x the panel's NR rows.
// The kMR x 2 i32 accumulators of a quantization block are named variables
// (token i uses a<i>0/a<i>1; those of tokens >= kMR are dead code), not
// arrays, because SVE vectors are sizeless types that cannot form arrays.
// Each block's sums are scaled into f32 totals kept in L1 (`total`), not in
// registers: they are touched once per block, and keeping them in registers
// as well made GCC 12 spill or copy the i32 accumulators in the inner loop.
template <size_t kMR>
HWY_INLINE void MicroKernelI8(const PreparedInput& in, const EpilogueArgs& e, const Panel& p,
                              size_t m, float* Y, size_t ldy) {
  const hn::ScalableTag<int32_t> di32;
  const hn::Repartition<uint8_t, decltype(di32)> du8;
  const hn::Repartition<int8_t, decltype(di32)> di8;
  const hn::Repartition<float, decltype(di32)> df;
  using VI = hn::Vec<decltype(di32)>;
  const size_t NF = hn::Lanes(df);
  const size_t NR = 2 * NF;
  const size_t P = in.geometry.positions();
  const size_t block_quads = in.units_per_block * in.geometry.unit_positions / 4;
  const size_t num_quads = P / 4;
  const uint8_t* HWY_RESTRICT tile = p.tile;
  static_assert(kMR >= 1 && kMR <= 6, "MicroKernelI8 handles 1 to 6 tokens");
  const int8_t* xq[kMR];
  for (size_t i = 0; i < kMR; ++i) xq[i] = in.xq.data() + (m + i) * P;
  // total[(2 * i + h) * NF ..]: token i's f32 dot products of panel half h.
  HWY_ALIGN float total[kMR * 2 * hn::MaxLanes(decltype(df)())];
  hn::Vec<decltype(df)> zero = hn::Zero(df);
  for (size_t v = 0; v < 2 * kMR; ++v) hn::Store(zero, df, total + v * NF);
  for (size_t b = 0, q = 0; b < in.num_blocks; ++b) {
    // Token i's accumulators start at its block's code-bias correction
    // (CodeDot; every lane is a row, so all lanes get the block's sum).
    const auto start = [&](size_t i) HWY_ATTR {
      return kCodeBias != 0 ? hn::Set(di32, in.xqsum[(m + i) * in.num_blocks + b])
                            : hn::Zero(di32);
    };
    VI a00 = start(0), a01 = a00;
    VI a10 = kMR > 1 ? start(1) : a00, a11 = a10, a20 = kMR > 2 ? start(2) : a00, a21 = a20;
    VI a30 = kMR > 3 ? start(3) : a00, a31 = a30, a40 = kMR > 4 ? start(4) : a00, a41 = a40;
    VI a50 = kMR > 5 ? start(5) : a00, a51 = a50;
    const size_t q_end = HWY_MIN(q + block_quads, num_quads);
    for (; q < q_end; ++q) {
      const auto w0 = LoadedOnce(hn::LoadU(du8, tile + q * NR * 4));
      const auto w1 = LoadedOnce(hn::LoadU(du8, tile + q * NR * 4 + NF * 4));
      const auto m0 = CodeMagnitude(w0), m1 = CodeMagnitude(w1);
      // Token i's 4 activation bytes times both weight vectors.
      const auto token = [&](size_t i, VI& acc0, VI& acc1) HWY_ATTR {
        int32_t x4;
        memcpy(&x4, xq[i] + q * 4, 4);
        const auto xb = hn::BitCast(di8, hn::Set(di32, x4));
        acc0 = Opaque(CodeDot(di32, w0, m0, xb, acc0));
        acc1 = Opaque(CodeDot(di32, w1, m1, xb, acc1));
      };
      token(0, a00, a01);
      if constexpr (kMR > 1) token(1, a10, a11);
      if constexpr (kMR > 2) token(2, a20, a21);
      if constexpr (kMR > 3) token(3, a30, a31);
      if constexpr (kMR > 4) token(4, a40, a41);
      if constexpr (kMR > 5) token(5, a50, a51);
    }
    // Token i's block sums, scaled by its block scale, into its f32 totals.
    const auto scale = [&](size_t i, VI acc0, VI acc1) HWY_ATTR {
      const auto sx = hn::Set(df, in.xscale[(m + i) * in.num_blocks + b]);
      float* t = total + 2 * i * NF;
      hn::Store(hn::MulAdd(hn::ConvertTo(df, acc0), sx, hn::Load(df, t)), df, t);
      hn::Store(hn::MulAdd(hn::ConvertTo(df, acc1), sx, hn::Load(df, t + NF)), df, t + NF);
    };
    scale(0, a00, a01);
    if constexpr (kMR > 1) scale(1, a10, a11);
    if constexpr (kMR > 2) scale(2, a20, a21);
    if constexpr (kMR > 3) scale(3, a30, a31);
    if constexpr (kMR > 4) scale(4, a40, a41);
    if constexpr (kMR > 5) scale(5, a50, a51);
  }
  for (size_t i = 0; i < kMR; ++i) {
    StorePanelRow(df, in, e, p, m + i, hn::Load(df, total + 2 * i * NF),
                  hn::Load(df, total + (2 * i + 1) * NF), Y, ldy);
  }
}

// ---------------------------------------------------------------------------
// Few-token int8 path (M <= kGemmSmallM: speculative verification, short
// batches). The panel kernel above is built for large M: its decode into a
// transposed tile costs as much as M = 16 GEMVs' worth of dot products. Here
// the weights are read once in GEMV's layout, one row at a time (the rows
// form one sequential stream, prefetched kFewTokensPrefetchRows ahead), and
// each decoded code vector is multiplied, while it is in a register, by the
// activations of a group of tokens (FewTokensPerGroup, matmul_input-inl.h:
// at most kFewTokens; PreparedInput::xq_groups holds each group's tokens
// interleaved per code vector, so that the group's loads are one stream at
// small constant offsets). More tokens than a group take further passes
// over each chunk of rows, which is in L2 by then. Per (row, token) the i32
// quad sums, AddBlockSum, ReduceSum and RawI8 are GEMV's and the epilogue is
// GEMV's FinishRows, so every token's outputs are GEMV's bits (matmul.h).

// How far ahead FewTokensRowsI8 prefetches, in rows. It reads one row at a
// time, so its rows form one sequential stream; one row ahead (2 KiB at
// K = 4096, 4-bit: GEMV's distance, but GEMV reads four rows at once) is
// shorter than the memory latency. Four rows ahead measured 8-13 % faster
// at M = 2 and 4, 1 and 2 threads (matmul_bench --small-m-only, Zen 4;
// 2 and 8 rows were in between, M = 8 unchanged).
constexpr size_t kFewTokensPrefetchRows = 4;

// Forces a lambda inline (GCC, Clang). The few-token kernel's block lambda
// is called from two loops (whole and partial blocks); GCC left it out of
// line for some token counts, and those ran 3-12x slower.
#if HWY_COMPILER_GCC || HWY_COMPILER_CLANG
#define LUTRA_LAMBDA_INLINE __attribute__((always_inline))
#else
#define LUTRA_LAMBDA_INLINE
#endif

// What one row's dot products with one token group read.
struct FewTokensGroup {
  const int8_t* xq;      // code vector c of token t at (c * kM + t) * L
  const float* xscale;   // block b of token t at b * kM + t
  size_t t0;             // the group's first token (BlockStart)
};

// dots[t] = the int8 dot product (GEMV's DotRowsI8 order) of `row` (its
// group table in lut) with token g.t0 + t, t < kM. The same byte offsets of
// the row at `ahead` are prefetched one unit at a time (`ahead` = `row`
// where nothing is to be fetched: one instantiation per kM, not two, kept
// GCC from spilling the 8-token loops of the 3- and 6-bit widths).
// The f32 block sums are named registers, not an array (SVE vectors are
// sizeless types); with 16 vector registers kFewTokens is 4 so that they,
// the i32 sums, the table and the codes fit. Blocks of full units (all but
// possibly the last) take no bounds checks and, on fixed-width targets, a
// constant unit count (FixedUnitsPerBlock), as GEMV's BlockI8.
template <int kBits, size_t kM, class D>
HWY_INLINE void FewTokensRowDots(D d, const LutU8<kBits, D>& lut, const uint8_t* HWY_RESTRICT row,
                                 const uint8_t* ahead, size_t row_bytes,
                                 const PreparedInput& in, const FewTokensGroup& g,
                                 float* HWY_RESTRICT dots) {
  static_assert(kM >= 1 && kM <= kFewTokens, "1 to kFewTokens tokens");
  const hn::Repartition<int32_t, D> di32;
  const hn::Repartition<int8_t, D> di8;
  const hn::Repartition<float, D> df;
  using VI = hn::Vec<decltype(di32)>;
  using VF = hn::Vec<decltype(df)>;
  const size_t L = hn::Lanes(d);
  const size_t unit_bytes = UnitBytes<kBits>(d), unit_step = in.geometry.sub_vectors * kM * L;
  const size_t upb = in.units_per_block, num_units = in.geometry.num_units;
  VF f0 = hn::Zero(df), f1 = f0, f2 = f0, f3 = f0, f4 = f0, f5 = f0, f6 = f0, f7 = f0;
  const int8_t* HWY_RESTRICT xu = g.xq;
  constexpr size_t kFixedUpb = FixedUnitsPerBlock<kBits>();
  const size_t full_blocks = (row_bytes / unit_bytes) / upb;
  // Block b; kFull (a std::integral_constant): all its units are whole.
  const auto block = [&](auto full, size_t b) HWY_ATTR LUTRA_LAMBDA_INLINE {
    constexpr bool kFull = decltype(full)::value;
    // Token t's block starts at its code-bias correction (CodeDot).
    const auto start = [&](size_t t) HWY_ATTR { return BlockStart(di32, in, g.t0 + t, b); };
    VI a0 = start(0), a1 = kM > 1 ? start(1) : a0, a2 = kM > 2 ? start(2) : a0;
    VI a3 = kM > 3 ? start(3) : a0, a4 = kM > 4 ? start(4) : a0, a5 = kM > 5 ? start(5) : a0;
    VI a6 = kM > 6 ? start(6) : a0, a7 = kM > 7 ? start(7) : a0;
    const size_t units = kFull ? (kFixedUpb != 0 ? kFixedUpb : upb)
                               : HWY_MIN((b + 1) * upb, num_units) - b * upb;
    for (size_t k = 0; k < units; ++k, xu += unit_step) {
      const size_t off = (b * upb + k) * unit_bytes;
      for (size_t pb = 0; pb < unit_bytes; pb += 64) hwy::Prefetch(ahead + off + pb);
      DecodeLookupUnit<kBits>(d, lut, row + off, kFull ? unit_bytes : row_bytes - off,
                              [&](size_t s, hn::Vec<D> codes) HWY_ATTR {
        const auto mag = CodeMagnitude(codes);
        const int8_t* HWY_RESTRICT x = xu + s * kM * L;
        a0 = CodeDot(di32, codes, mag, hn::Load(di8, x), a0);
        if constexpr (kM > 1) a1 = CodeDot(di32, codes, mag, hn::Load(di8, x + L), a1);
        if constexpr (kM > 2) a2 = CodeDot(di32, codes, mag, hn::Load(di8, x + 2 * L), a2);
        if constexpr (kM > 3) a3 = CodeDot(di32, codes, mag, hn::Load(di8, x + 3 * L), a3);
        if constexpr (kM > 4) a4 = CodeDot(di32, codes, mag, hn::Load(di8, x + 4 * L), a4);
        if constexpr (kM > 5) a5 = CodeDot(di32, codes, mag, hn::Load(di8, x + 5 * L), a5);
        if constexpr (kM > 6) a6 = CodeDot(di32, codes, mag, hn::Load(di8, x + 6 * L), a6);
        if constexpr (kM > 7) a7 = CodeDot(di32, codes, mag, hn::Load(di8, x + 7 * L), a7);
      });
    }
    const float* HWY_RESTRICT s = g.xscale + b * kM;
    f0 = AddBlockSum(df, a0, s[0], f0);
    if constexpr (kM > 1) f1 = AddBlockSum(df, a1, s[1], f1);
    if constexpr (kM > 2) f2 = AddBlockSum(df, a2, s[2], f2);
    if constexpr (kM > 3) f3 = AddBlockSum(df, a3, s[3], f3);
    if constexpr (kM > 4) f4 = AddBlockSum(df, a4, s[4], f4);
    if constexpr (kM > 5) f5 = AddBlockSum(df, a5, s[5], f5);
    if constexpr (kM > 6) f6 = AddBlockSum(df, a6, s[6], f6);
    if constexpr (kM > 7) f7 = AddBlockSum(df, a7, s[7], f7);
  };
  size_t b = 0;
  for (; b < full_blocks; ++b) block(std::true_type(), b);
  for (; b < in.num_blocks; ++b) block(std::false_type(), b);
  dots[0] = hn::ReduceSum(df, f0);
  if constexpr (kM > 1) dots[1] = hn::ReduceSum(df, f1);
  if constexpr (kM > 2) dots[2] = hn::ReduceSum(df, f2);
  if constexpr (kM > 3) dots[3] = hn::ReduceSum(df, f3);
  if constexpr (kM > 4) dots[4] = hn::ReduceSum(df, f4);
  if constexpr (kM > 5) dots[5] = hn::ReduceSum(df, f5);
  if constexpr (kM > 6) dots[6] = hn::ReduceSum(df, f6);
  if constexpr (kM > 7) dots[7] = hn::ReduceSum(df, f7);
}

// FewTokensRowDots with kM = m (1 <= m <= kFewTokens) as a constant.
template <int kBits, size_t kM = 1, class D>
HWY_INLINE void FewTokensRowDotsN(size_t m, D d, const LutU8<kBits, D>& lut,
                                  const uint8_t* HWY_RESTRICT row, const uint8_t* ahead,
                                  size_t row_bytes, const PreparedInput& in,
                                  const FewTokensGroup& g, float* HWY_RESTRICT dots) {
  if constexpr (kM < kFewTokens) {
    if (m > kM) {
      return FewTokensRowDotsN<kBits, kM + 1>(m, d, lut, row, ahead, row_bytes, in, g, dots);
    }
  }
  FewTokensRowDots<kBits, kM>(d, lut, row, ahead, row_bytes, in, g, dots);
}

// GCC 12 (aarch64) crashed (internal compiler error) in its SLP vectorizer
// and then in ivopts on the small-M kernel for SVE2_128; the loops are
// explicit SIMD already, so those two passes are turned off for it.
#if HWY_COMPILER_GCC_ACTUAL && HWY_ARCH_ARM_A64
#define LUTRA_SMALL_M_ATTR __attribute__((optimize("no-tree-slp-vectorize", "no-ivopts")))
#else
#define LUTRA_SMALL_M_ATTR
#endif

// Outputs [n0, n1) of all M <= kGemmSmallM tokens, int8 path.
template <int kBits>
HWY_NOINLINE LUTRA_SMALL_M_ATTR void FewTokensRowsI8(const PreparedPalette& w,
                                                     const PreparedInput& in, size_t n0,
                                                     size_t n1, float* Y, size_t ldy) {
  using D = DecodeTag;
  const D d;
  const hn::Repartition<float, D> df;
  const size_t M = in.rows, P = in.geometry.positions(), nb = in.num_blocks;
  const size_t G = w.shape().group_rows, row_bytes = w.shape().row_bytes();
  const EpilogueArgs e = EpilogueArgsOf(in, ldy);
  // One token's input is GEMV's; more are interleaved per group.
  const int8_t* const xq = M == 1 ? in.xq.data() : in.xq_groups.data();
  const float* const xscale = M == 1 ? in.xscale.data() : in.xscale_groups.data();
  const size_t group = M == 1 ? 1 : FewTokensPerGroup(P);
  HWY_ALIGN float raw[kGemmSmallM][kEpilogueChunk];
  HWY_ALIGN float dots[kFewTokens];
  RowStream chunk;
  chunk.Init(n0, G);
  for (size_t n = n0; n < n1; n += kEpilogueChunk) {
    const size_t nr = HWY_MIN(kEpilogueChunk, n1 - n);
    // One pass over the chunk's rows per token group: the group's
    // activations (FewTokensPerGroup) stay in L1 for all of its rows, and
    // the rows (kEpilogueChunk x row_bytes) in L2 for the next group's pass.
    RowStream st = chunk;
    for (size_t t0 = 0; t0 < M; t0 += group) {
      const size_t m = HWY_MIN(group, M - t0);
      const FewTokensGroup g{xq + t0 * P, xscale + t0 * nb, t0};
      st = chunk;
      for (size_t j = 0; j < nr; ++j, st.Next(G)) {
        LutU8<kBits, D> lut;
        lut.Init(d, w.table_u8(st.group));
        const uint8_t* row = w.view().row(st.row);
        // Prefetch only within this call's range (other threads own the
        // rest), and only in the first group's pass: later passes find the
        // rows in L2.
        const uint8_t* ahead = t0 == 0 && st.row + kFewTokensPrefetchRows < n1
                                   ? row + kFewTokensPrefetchRows * row_bytes
                                   : row;
        FewTokensRowDotsN<kBits>(m, d, lut, row, ahead, row_bytes, in, g, dots);
        for (size_t t = 0; t < m; ++t) {
          raw[t0 + t][j] = RawI8(w, st.group, dots[t], in.xsum[t0 + t]);
        }
      }
    }
    chunk = st;
    for (size_t t = 0; t < M; ++t) FinishRows(df, e, t, n, nr, raw[t], Y + t * ldy);
  }
}

template <int kBits>
HWY_NOINLINE void GemmRowsImpl(const PreparedPalette& w, const PreparedInput& in, size_t n0,
                               size_t n1, float* Y, size_t ldy, GemmScratch* scratch) {
  const hn::ScalableTag<float> df;
  const size_t NF = hn::Lanes(df);
  const size_t NR = 2 * NF;
  const size_t P = in.geometry.positions(), M = in.rows;
  const size_t G = w.shape().group_rows;
  const bool f32 = in.precision == MatmulPrecision::kF32;
  const EpilogueArgs e = EpilogueArgsOf(in, ldy);
  GemmScratch local;
  GemmScratch& s = scratch ? *scratch : local;
  float* const rows = f32 ? s.Array<float>(0, NR * P) : nullptr;
  uint8_t* const tile = f32 ? nullptr : s.Array<uint8_t>(1, NR * P);
  float* const step = s.Array<float>(2, NR);
  float* const lo = s.Array<float>(3, NR);
  LoraPanel lora;
  HWY_ALIGN float raw[2 * hn::MaxLanes(decltype(df)())];
  for (size_t n = n0; n < n1; n += NR) {
    Panel p;
    p.n = n;
    p.nr = HWY_MIN(NR, n1 - n);
    if (KernelPrecisionEnabled(MatmulPrecision::kF32) && f32) {  // LUTRA_KERNEL_PRECISIONS
      // Dot sums in GEMV's DotRowF32 order, and FinishRows is GEMV's
      // epilogue: every M gives GEMV's bits (matmul.h).
      DecodePanelF32<kBits>(w, in, n, p.nr, NR, rows);
      for (size_t m = 0; m < M; ++m) {
        const float* x = in.xf.data() + m * P;
        for (size_t j = 0; j < p.nr; ++j) raw[j] = Dot(df, rows + j * P, x, P);
        for (size_t c = 0; c < p.nr; c += kEpilogueChunk) {
          FinishRows(df, e, m, n + c, HWY_MIN(kEpilogueChunk, p.nr - c), raw + c, Y + m * ldy);
        }
      }
      continue;
    }
    if (in.has_lora && in.token_lora.empty()) {
      lora.Init(in.lora, n, p.nr, NR);
      p.lora = &lora;
    }
    for (size_t j = 0; j < NR; ++j) {
      const size_t g = (n + j) / G;
      step[j] = j < p.nr ? w.step(g) : 0.0f;
      lo[j] = j < p.nr ? w.lo(g) : 0.0f;
    }
    p.step = step;
    p.lo = lo;
    DecodePanelU8<kBits>(w, in, n, p.nr, NR, tile);
    p.tile = tile;
    size_t m = 0;
    for (; m + kGemmMR <= M; m += kGemmMR) MicroKernelI8<kGemmMR>(in, e, p, m, Y, ldy);
    for (; m < M; ++m) MicroKernelI8<1>(in, e, p, m, Y, ldy);
  }
}

}  // namespace detail

// Output channels per panel on this target (2 f32 vectors): GemmRows ranges
// that start at multiples of it decode no partial panel.
HWY_INLINE size_t GemmRangeAlignment() { return detail::PanelRows(); }

// Computes Y[m, n] for all M tokens and output channels n in [n0, n1)
// (0 <= n0 <= n1 <= N) from an input made by PrepareGemmInput on this target.
// Y is M x N at ldy >= N floats per token row; only columns [n0, n1) are
// written. Single-threaded; threads may call it concurrently with disjoint
// ranges (multiples of GemmRangeAlignment() avoid partial panels), each with
// its own scratch (null: allocated per call).
HWY_INLINE Status GemmRows(const PreparedPalette& w, const PreparedInput& in, size_t n0,
                           size_t n1, float* Y, size_t ldy, GemmScratch* scratch = nullptr) {
  LUTRA_RETURN_IF_ERROR(detail::CheckInput(w, in, "gemm"));
  const size_t N = w.shape().rows;
  if (n0 > n1 || n1 > N) {
    return InvalidArgument("gemm: row range [%zu, %zu) not within [0, %zu)", n0, n1, N);
  }
  if (ldy < N) return InvalidArgument("gemm: output stride %zu < N = %zu", ldy, N);
  const Epilogue& ep = in.epilogue;
  if (ep.residual && ep.residual_stride != 0 && ep.residual_stride < N) {
    return InvalidArgument("gemm: residual stride %zu < N = %zu", ep.residual_stride, N);
  }
  if (n0 == n1) return Status::Ok();
  if (Y == nullptr) return InvalidArgument("gemm: null output");
  const bool small_m = in.precision == MatmulPrecision::kInt8 && in.rows <= kGemmSmallM;
  return WithKernelBits(in.bits, "gemm", [&](auto bits) HWY_ATTR {
    constexpr int kBits = decltype(bits)::value;
    if (small_m) {
      detail::FewTokensRowsI8<kBits>(w, in, n0, n1, Y, ldy);
    } else {
      detail::GemmRowsImpl<kBits>(w, in, n0, n1, Y, ldy, scratch);
    }
  });
}

// One-shot Y = X W^T (+ epilogue) for M tokens: prepares X (into *scratch
// when given) and splits the output channels over `pool` (nullptr = this
// thread) in whole panels.
HWY_INLINE Status Gemm(const PreparedPalette& w, const float* HWY_RESTRICT X, size_t M,
                       size_t ldx, const Epilogue& ep, float* Y, size_t ldy,
                       ThreadPool* pool = nullptr, const MatmulOptions& opt = MatmulOptions(),
                       PreparedInput* scratch = nullptr) {
  const size_t N = w.shape().rows;
  PreparedInput local;
  PreparedInput* in = scratch ? scratch : &local;
  LUTRA_RETURN_IF_ERROR(PrepareGemmInput(w, X, M, ldx, ep, opt, in));
  return ParallelForRows(pool, N, detail::PanelRows(), [&](RowRange rr) {
    return GemmRows(w, *in, rr.begin, rr.end, Y, ldy);
  });
}

}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#endif  // LUTRA_GEMM_INL_H_
