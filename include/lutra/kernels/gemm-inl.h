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
//   activations are broadcast and multiplied with vpdpbusd
//   (SumOfMulQuadAccumulate) into MR x 2 i32 accumulators, converted to f32
//   per quantization block.
// - kF32: the tile holds exact f32 weights; dot products per (token, row).
//
// Both paths finish each token's panel row with the shared epilogue
// (epilogue-inl.h ApplyEpilogue, LoRA through a per-panel B^T: LoraPanel).
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
#include <vector>

#include "hwy/aligned_allocator.h"
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
  const LoraPanel* lora = nullptr;  // B^T of the panel's rows (or null)
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
  const size_t L = hn::Lanes(d);
  const PaletteShape& shape = w.shape();
  const size_t row_bytes = shape.row_bytes();
  const size_t unit_bytes = UnitBytes<kBits>(d);
  const size_t UP = in.geometry.unit_positions, P = in.geometry.positions();
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
            for (size_t k = 0; k < L; ++k) o[k] = table[buf[k]];
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
  if (p.lora != nullptr) p.lora->Dots(df, e.lora_ax + m * e.lora->rank, dots);
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
// The kMR x 2 accumulators are named variables (token i uses a<i>0/a<i>1 and
// f<i>0/f<i>1; those of tokens >= kMR are dead code), not arrays, because SVE
// vectors are sizeless types that cannot form arrays.
template <size_t kMR>
HWY_INLINE void MicroKernelI8(const PreparedInput& in, const EpilogueArgs& e, const Panel& p,
                              size_t m, float* Y, size_t ldy) {
  const hn::ScalableTag<int32_t> di32;
  const hn::Repartition<uint8_t, decltype(di32)> du8;
  const hn::Repartition<int8_t, decltype(di32)> di8;
  const hn::Repartition<float, decltype(di32)> df;
  using VI = hn::Vec<decltype(di32)>;
  using VF = hn::Vec<decltype(df)>;
  const size_t NF = hn::Lanes(df);
  const size_t NR = 2 * NF;
  const size_t P = in.geometry.positions();
  const size_t block_quads = in.units_per_block * in.geometry.unit_positions / 4;
  const size_t num_quads = P / 4;
  const uint8_t* HWY_RESTRICT tile = p.tile;
  static_assert(kMR >= 1 && kMR <= 6, "MicroKernelI8 handles 1 to 6 tokens");
  const int8_t* xq[kMR];
  for (size_t i = 0; i < kMR; ++i) xq[i] = in.xq.data() + (m + i) * P;
  VF f00 = hn::Zero(df), f01 = f00, f10 = f00, f11 = f00, f20 = f00, f21 = f00;
  VF f30 = f00, f31 = f00, f40 = f00, f41 = f00, f50 = f00, f51 = f00;
  for (size_t b = 0, q = 0; b < in.num_blocks; ++b) {
    VI a00 = hn::Zero(di32), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
    VI a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
    const size_t q_end = HWY_MIN(q + block_quads, num_quads);
    for (; q < q_end; ++q) {
      const auto w0 = hn::LoadU(du8, tile + q * NR * 4);
      const auto w1 = hn::LoadU(du8, tile + q * NR * 4 + NF * 4);
      // Token i's 4 activation bytes times both weight vectors.
      const auto token = [&](size_t i, VI& acc0, VI& acc1) HWY_ATTR {
        int32_t x4;
        memcpy(&x4, xq[i] + q * 4, 4);
        const auto xb = hn::BitCast(di8, hn::Set(di32, x4));
        acc0 = hn::SumOfMulQuadAccumulate(di32, w0, xb, acc0);
        acc1 = hn::SumOfMulQuadAccumulate(di32, w1, xb, acc1);
      };
      token(0, a00, a01);
      if constexpr (kMR > 1) token(1, a10, a11);
      if constexpr (kMR > 2) token(2, a20, a21);
      if constexpr (kMR > 3) token(3, a30, a31);
      if constexpr (kMR > 4) token(4, a40, a41);
      if constexpr (kMR > 5) token(5, a50, a51);
    }
    // Token i's block sums, scaled by its block scale, into f32.
    const auto scale = [&](size_t i, VI acc0, VI acc1, VF& f0, VF& f1) HWY_ATTR {
      const VF sx = hn::Set(df, in.xscale[(m + i) * in.num_blocks + b]);
      f0 = hn::MulAdd(hn::ConvertTo(df, acc0), sx, f0);
      f1 = hn::MulAdd(hn::ConvertTo(df, acc1), sx, f1);
    };
    scale(0, a00, a01, f00, f01);
    if constexpr (kMR > 1) scale(1, a10, a11, f10, f11);
    if constexpr (kMR > 2) scale(2, a20, a21, f20, f21);
    if constexpr (kMR > 3) scale(3, a30, a31, f30, f31);
    if constexpr (kMR > 4) scale(4, a40, a41, f40, f41);
    if constexpr (kMR > 5) scale(5, a50, a51, f50, f51);
  }
  StorePanelRow(df, in, e, p, m, f00, f01, Y, ldy);
  if constexpr (kMR > 1) StorePanelRow(df, in, e, p, m + 1, f10, f11, Y, ldy);
  if constexpr (kMR > 2) StorePanelRow(df, in, e, p, m + 2, f20, f21, Y, ldy);
  if constexpr (kMR > 3) StorePanelRow(df, in, e, p, m + 3, f30, f31, Y, ldy);
  if constexpr (kMR > 4) StorePanelRow(df, in, e, p, m + 4, f40, f41, Y, ldy);
  if constexpr (kMR > 5) StorePanelRow(df, in, e, p, m + 5, f50, f51, Y, ldy);
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
    if (in.has_lora) {
      lora.Init(in.lora, n, p.nr, NR);
      p.lora = &lora;
    }
    if (KernelPrecisionEnabled(MatmulPrecision::kF32) && f32) {  // LUTRA_KERNEL_PRECISIONS
      DecodePanelF32<kBits>(w, in, n, p.nr, NR, rows);
      for (size_t m = 0; m < M; ++m) {
        const float* x = in.xf.data() + m * P;
        for (size_t j = 0; j < p.nr; ++j) raw[j] = Dot(df, rows + j * P, x, P);
        FinishPanelRow(df, e, p, m, raw, Y, ldy);
      }
      continue;
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
  return WithKernelBits(in.bits, "gemm", [&](auto bits) HWY_ATTR {
    detail::GemmRowsImpl<decltype(bits)::value>(w, in, n0, n1, Y, ldy, scratch);
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
