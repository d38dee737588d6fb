// GEMV y = W x over palettized weights (decode: lut_decode-inl.h) for one
// token (decode), with the fused epilogue (epilogue-inl.h: bias, residual,
// LoRA delta) and a caller-given row range so that callers split rows across
// threads. The activation preparation it shares with GEMM is in
// matmul_input-inl.h; types and the precision contract are in matmul.h.
//
// Per-target code: include after hwy/highway.h (see dot-inl.h).
//
// Public entry points (namespace lutra::HWY_NAMESPACE):
//   Status PrepareGemvInput(const PreparedPalette& w, const float* x,
//                           size_t x_size, const Epilogue& ep,
//                           const MatmulOptions& opt, PreparedInput* in);
//                                                  (matmul_input-inl.h)
//   Status GemvRows(const PreparedPalette& w, const PreparedInput& in,
//                   size_t r0, size_t r1, float* y);
//   Status Gemv(const PreparedPalette& w, const float* x, size_t x_size,
//               const Epilogue& ep, float* y, size_t y_size,
//               ThreadPool* pool = nullptr, const MatmulOptions& opt = {},
//               PreparedInput* scratch = nullptr);

#if defined(LUTRA_GEMV_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LUTRA_GEMV_INL_H_
#undef LUTRA_GEMV_INL_H_
#else
#define LUTRA_GEMV_INL_H_
#endif

#include <stddef.h>
#include <stdint.h>

#include <cmath>

#include "hwy/cache_control.h"
#include "hwy/highway.h"
#include "lutra/base/status.h"
#include "lutra/base/thread_pool.h"
#include "lutra/format/palette.h"
#include "lutra/kernels/epilogue-inl.h"
#include "lutra/kernels/lut_decode-inl.h"
#include "lutra/kernels/matmul.h"
#include "lutra/kernels/matmul_input-inl.h"

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

namespace detail {

// i32 accumulation chains per row in the int8 GEMV. b <= 2 decodes are
// compute-bound (one shuffle and one dot product per 64 weights, plus field
// masks), so they keep one chain per row: fewer instructions and registers
// (with two, GCC spills the activations on AVX-512), and since the chain
// restarts every block (one unit per block at b = 2) its latency overlaps
// across blocks. Wider codes are bandwidth-bound; there two chains per row
// (even and odd sub-vectors) measured faster cache-cold: fewer dependent dot
// products wait on each late load, so the core keeps issuing loads.
// Where CodeDot ends in a plain add (kCodeDotAddsLast: x86 without VNNI,
// 16 vector registers), one chain suffices and a second one spilled the 4
// rows' accumulators and tables to the stack.
template <int kBits>
constexpr int ChainsI8() {
  return (kBits <= 2 || kCodeDotAddsLast) ? 1 : 2;
}

// How many rows ahead, within its run, the int8 GEMV prefetches each row's
// bytes (GemvRowsI8 walks 4 runs of consecutive rows; at K = 4096 a 4-bit
// row is 2 KiB). Two rows ahead against one, matmul_bench --gemv-only,
// 4096 x 4096 and 14336 x 4096, two alternating runs each on a Zen 4 core:
// 2-bit 18 % faster on 1 thread and 5 % on 2, 6-bit 3 %, 3- and 8-bit
// unchanged, but 4-bit 17 % slower on 1 thread and 5 % on 2.
template <int kBits>
constexpr size_t GemvPrefetchRows() {
  return kBits == 4 ? 1 : 2;
}

// Accumulates one decode unit of a row (at p, `avail` bytes of the row from
// there) times activations xu into the row's chains: sub-vector s goes to
// `odd` when there are two chains and s is odd, else to `even`.
template <int kBits, class D, class VI>
HWY_INLINE void RowUnitI8(D d, const LutU8<kBits, D>& lut, const uint8_t* HWY_RESTRICT p,
                          size_t avail, const int8_t* HWY_RESTRICT xu, VI& even, VI& odd) {
  const hn::Repartition<int8_t, D> di8;
  const hn::Repartition<int32_t, D> di32;
  const size_t L = hn::Lanes(d);
  DecodeLookupUnit<kBits>(d, lut, p, avail, [&](size_t s, hn::Vec<D> codes) HWY_ATTR {
    VI& acc = (ChainsI8<kBits>() == 2 && (s & 1)) ? odd : even;
    acc = CodeDot(di32, codes, CodeMagnitude(codes), hn::LoadU(di8, xu + s * L), acc);
  });
}

// What BlockI8 reads: kRows rows with their tables, and the activations.
template <int kBits, size_t kRows, class D>
struct BlockArgsI8 {
  const uint8_t* const* rows;
  const LutU8<kBits, D>* lut;
  const int8_t* xq;
  const PreparedInput* in;  // the token's (BlockStart)
  size_t row_bytes, units_per_block;
  bool prefetch;
};

// Accumulates quantization block b of kRows rows into accf0..3:
// accf_i += xscale * (sum over the block's units of q_w * q_x). kFull: every
// unit of the block lies wholly inside the row, so the decode's bounds check
// folds away. This is the hot loop, written as a function of plain values
// and references (not a lambda capturing the accumulators, which GCC kept
// copying between registers): 2-bit rows have one unit per block, so the
// per-block work is a large share of theirs.
template <bool kFull, int kBits, size_t kRows, class D, class VF>
HWY_INLINE void BlockI8(D d, const BlockArgsI8<kBits, kRows, D>& a, size_t b, size_t num_units,
                        float xscale, VF& accf0, VF& accf1, VF& accf2, VF& accf3) {
  const hn::Repartition<int32_t, D> di32;
  const hn::Repartition<float, D> df;
  using VI = hn::Vec<decltype(di32)>;
  const size_t unit_bytes = UnitBytes<kBits>(d);
  const size_t UP = hn::Lanes(d) * PaletteFormat<kBits>::kRunsPerBlock;
  // Chains per row: ChainsI8 (odd* stay zero with one chain). The even
  // chains start at the block's code-bias correction (CodeDot).
  const VI start = BlockStart(di32, *a.in, 0, b);
  VI acc0 = start, acc1 = start, acc2 = start, acc3 = start;
  VI odd0 = hn::Zero(di32), odd1 = hn::Zero(di32), odd2 = hn::Zero(di32), odd3 = hn::Zero(di32);
  // A constant unit count where it measured faster cache-cold (matmul_bench
  // --gemv-only, 1 thread, alternating runs: 3-bit 6-7 %, 4-bit 4-6 %, 6-bit
  // 1-3 % faster; 2- and 8-bit 2-4 % slower, so they keep the runtime count).
  constexpr size_t kFixedUpb =
      kBits == 3 || kBits == 4 || kBits == 6 ? FixedUnitsPerBlock<kBits>() : 0;
  const size_t upb = kFull && kFixedUpb != 0 ? kFixedUpb : a.units_per_block;
  const size_t u0 = b * upb;
  const size_t u_end = kFull ? u0 + upb : HWY_MIN(u0 + upb, num_units);
  for (size_t u = u0; u < u_end; ++u) {
    const size_t off = u * unit_bytes;
    const int8_t* HWY_RESTRICT xu = a.xq + u * UP;
    const size_t avail = kFull ? unit_bytes : a.row_bytes - off;
    if (a.prefetch) {
      for (size_t i = 0; i < kRows; ++i) {
        for (size_t pb = 0; pb < unit_bytes; pb += 64) {
          hwy::Prefetch(a.rows[i] + GemvPrefetchRows<kBits>() * a.row_bytes + off + pb);
        }
      }
    }
    RowUnitI8<kBits>(d, a.lut[0], a.rows[0] + off, avail, xu, acc0, odd0);
    if constexpr (kRows == 4) {
      RowUnitI8<kBits>(d, a.lut[1], a.rows[1] + off, avail, xu, acc1, odd1);
      RowUnitI8<kBits>(d, a.lut[2], a.rows[2] + off, avail, xu, acc2, odd2);
      RowUnitI8<kBits>(d, a.lut[3], a.rows[3] + off, avail, xu, acc3, odd3);
    }
  }
  accf0 = AddBlockSum(df, hn::Add(acc0, odd0), xscale, accf0);
  if constexpr (kRows == 4) {
    accf1 = AddBlockSum(df, hn::Add(acc1, odd1), xscale, accf1);
    accf2 = AddBlockSum(df, hn::Add(acc2, odd2), xscale, accf2);
    accf3 = AddBlockSum(df, hn::Add(acc3, odd3), xscale, accf3);
  }
}

// Int8 path: dots[i] = sum_b xscale[b] * (sum over block b of q_w * q_x) for
// the kRows rows row_idx[i] (each with its own group table groups[i]).
// Rows are interleaved so that the i32 accumulation chains are independent
// and every activation vector is loaded once for kRows rows. kRows is 1 or
// 4; the accumulators are named variables, not arrays, because SVE vectors
// are sizeless types that cannot form arrays.
// When `prefetch` is set, the same byte offsets of the row
// GemvPrefetchRows<kBits>() after each row (the rows of one of GemvRowsI8's
// next steps) are prefetched one unit at a time, which hides the DRAM
// latency.
// Callers track groups incrementally: a 64-bit division per row costs as
// much as a tenth of a short row.
template <int kBits, size_t kRows>
HWY_INLINE void DotRowsI8(const PreparedPalette& w, const PreparedInput& in,
                          const size_t* HWY_RESTRICT row_idx,
                          const size_t* HWY_RESTRICT groups, bool prefetch,
                          float* HWY_RESTRICT dots) {
  using D = DecodeTag;
  const D d;
  const hn::Repartition<float, D> df;
  using VF = hn::Vec<decltype(df)>;
  const size_t row_bytes = w.shape().row_bytes();
  const size_t unit_bytes = UnitBytes<kBits>(d);

  static_assert(kRows == 1 || kRows == 4, "DotRowsI8 handles 1 or 4 rows");
  const uint8_t* rows[kRows];
  LutU8<kBits, D> lut[kRows];
  for (size_t i = 0; i < kRows; ++i) {
    rows[i] = w.view().row(row_idx[i]);
    lut[i].Init(d, w.table_u8(groups[i]));
  }
  VF accf0 = hn::Zero(df), accf1 = hn::Zero(df), accf2 = hn::Zero(df), accf3 = hn::Zero(df);
  const int8_t* HWY_RESTRICT xq = in.xq.data();
  const float* HWY_RESTRICT xscale = in.xscale.data();
  const size_t num_units = in.geometry.num_units, units_per_block = in.units_per_block;
  const size_t num_blocks = in.num_blocks;
  // Blocks made of full units only (all but possibly the last) decode
  // without bounds checks; the remaining block's last unit may be partial.
  const size_t full_blocks = (row_bytes / unit_bytes) / units_per_block;
  const BlockArgsI8<kBits, kRows, D> args{rows, lut, xq, &in, row_bytes, units_per_block,
                                           prefetch};
  size_t b = 0;
  for (; b < full_blocks; ++b) {
    BlockI8<true>(d, args, b, num_units, xscale[b], accf0, accf1, accf2, accf3);
  }
  for (; b < num_blocks; ++b) {
    BlockI8<false>(d, args, b, num_units, xscale[b], accf0, accf1, accf2, accf3);
  }
  dots[0] = hn::ReduceSum(df, accf0);
  if constexpr (kRows == 4) {
    dots[1] = hn::ReduceSum(df, accf1);
    dots[2] = hn::ReduceSum(df, accf2);
    dots[3] = hn::ReduceSum(df, accf3);
  }
}

// Rows [r0, r1) are split into kRows = 4 equal runs that are walked in
// lockstep: each step computes one row of every run. Each run is then one
// sequential address stream (row r + 1 follows row r in memory), which the
// hardware prefetchers follow, whereas 4 adjacent rows per step would give 4
// short interleaved streams per page. The remainder rows go one at a time.
// Each run's raw values are finished (epilogue) per chunk of rows.
template <int kBits>
HWY_NOINLINE void GemvRowsI8(const PreparedPalette& w, const PreparedInput& in, size_t r0,
                             size_t r1, float* y) {
  const size_t G = w.shape().group_rows;
  const EpilogueArgs e = EpilogueArgsOf(in, 0);
  const float xsum = in.xsum[0];
  constexpr size_t kRows = 4;
  const auto raw = [&](size_t g, float dot) { return RawI8(w, g, dot, xsum); };
  const size_t run = (r1 - r0) / kRows;
  RowStream st[kRows];
  EpilogueChunk chunk[kRows];
  for (size_t i = 0; i < kRows; ++i) {
    st[i].Init(r0 + i * run, G);
    chunk[i].Start(r0 + i * run);
  }
  size_t rows[kRows], groups[kRows];
  float dots[kRows];
  for (size_t j = 0; j < run; ++j) {
    for (size_t i = 0; i < kRows; ++i) {
      rows[i] = st[i].row;
      groups[i] = st[i].group;
    }
    // The tables of the next step's rows: at one row per group (G = 1) they
    // are a stream of their own that the hardware prefetchers did not cover
    // (G = 1 GEMV was 5-10 % slower than G = 16 cache-cold without this).
    if (j + 1 < run) {
      for (size_t i = 0; i < kRows; ++i) {
        const size_t gn = st[i].row + 1 >= st[i].group_end ? st[i].group + 1 : st[i].group;
        hwy::Prefetch(w.table_u8(gn));
        hwy::Prefetch(w.affine(gn));
      }
    }
    // Prefetch only within this call's range: other threads own the rest.
    DotRowsI8<kBits, kRows>(w, in, rows, groups, j + GemvPrefetchRows<kBits>() < run, dots);
    for (size_t i = 0; i < kRows; ++i) {
      chunk[i].Push(e, raw(groups[i], dots[i]), y);
      st[i].Next(G);
    }
  }
  for (size_t i = 0; i < kRows; ++i) chunk[i].Flush(e, y);
  RowStream tail;
  tail.Init(r0 + kRows * run, G);
  chunk[0].Start(tail.row);
  for (; tail.row < r1; tail.Next(G)) {
    DotRowsI8<kBits, 1>(w, in, &tail.row, &tail.group, false, dots);
    chunk[0].Push(e, raw(tail.group, dots[0]), y);
  }
  chunk[0].Flush(e, y);
}

// Exact path: returns sum_c table_f32[idx_c] * x_c for row r over the
// positions of token row xf (f32, position order).
template <int kBits>
HWY_INLINE float DotRowF32(const PreparedPalette& w, const PreparedInput& in, size_t r,
                           const float* HWY_RESTRICT xf) {
  using D = DecodeTag;
  const D d;
  const hn::Repartition<float, D> df;
  using VF = hn::Vec<decltype(df)>;
  const size_t L = hn::Lanes(d);
  const size_t NF = hn::Lanes(df);  // L / 4
  const PaletteShape& shape = w.shape();
  const size_t row_bytes = shape.row_bytes();
  const size_t unit_bytes = UnitBytes<kBits>(d);
  const size_t UP = in.geometry.unit_positions;
  const size_t E = shape.num_entries();
  const float* HWY_RESTRICT table = w.table_f32(r / shape.group_rows);
  const uint8_t* row = w.view().row(r);
  HWY_ALIGN uint8_t idx_buf[hn::MaxLanes(d)];
  // Named accumulators, not an array: SVE vectors are sizeless types.
  VF acc0 = hn::Zero(df), acc1 = hn::Zero(df), acc2 = hn::Zero(df), acc3 = hn::Zero(df);
  for (size_t u = 0; u < in.geometry.num_units; ++u) {
    const size_t off = u * unit_bytes;
    const float* HWY_RESTRICT xu = xf + u * UP;
    DecodeUnit<kBits>(d, row + off, row_bytes - off, [&](size_t s, hn::Vec<D> idx) HWY_ATTR {
      hn::Store(idx, d, idx_buf);
      // Quarter q of the index vector times the matching activations.
      const auto quarter = [&](size_t q, VF& acc) HWY_ATTR {
        acc = hn::MulAdd(LookupF32Quarter(df, table, E, idx_buf, q),
                         hn::LoadU(df, xu + s * L + q * NF), acc);
      };
      quarter(0, acc0);
      quarter(1, acc1);
      quarter(2, acc2);
      quarter(3, acc3);
    });
  }
  return hn::ReduceSum(df, hn::Add(hn::Add(acc0, acc1), hn::Add(acc2, acc3)));
}

template <int kBits>
HWY_NOINLINE void GemvRowsF32(const PreparedPalette& w, const PreparedInput& in, size_t r0,
                              size_t r1, float* y) {
  const EpilogueArgs e = EpilogueArgsOf(in, 0);
  EpilogueChunk chunk;
  chunk.Start(r0);
  for (size_t r = r0; r < r1; ++r) chunk.Push(e, DotRowF32<kBits>(w, in, r, in.xf.data()), y);
  chunk.Flush(e, y);
}

}  // namespace detail

// Computes y[r] for r in [r0, r1) (0 <= r0 <= r1 <= N) from an input made by
// PrepareGemvInput on this target; y has N floats and only y[r0..r1) is
// written. Single-threaded; any number of threads may call it concurrently
// with disjoint row ranges (ranges need not align to groups or to 4 rows).
HWY_INLINE Status GemvRows(const PreparedPalette& w, const PreparedInput& in, size_t r0,
                           size_t r1, float* y) {
  LUTRA_RETURN_IF_ERROR(detail::CheckInput(w, in, "gemv"));
  if (in.rows != 1) return InvalidArgument("gemv: input has %zu token rows, need 1", in.rows);
  if (r0 > r1 || r1 > w.shape().rows) {
    return InvalidArgument("gemv: row range [%zu, %zu) not within [0, %zu)", r0, r1,
                           w.shape().rows);
  }
  if (r0 == r1) return Status::Ok();
  if (y == nullptr) return InvalidArgument("gemv: null output");
  const bool f32 = in.precision == MatmulPrecision::kF32;
  return WithKernelBits(in.bits, "gemv", [&](auto bits) HWY_ATTR {
    constexpr int kBits = decltype(bits)::value;
    // Only the precisions LUTRA_KERNEL_PRECISIONS enables are instantiated
    // (PrepareGemvInput refuses the others).
    if (f32) {
      if constexpr (KernelPrecisionEnabled(MatmulPrecision::kF32)) {
        detail::GemvRowsF32<kBits>(w, in, r0, r1, y);
      }
    } else {
      if constexpr (KernelPrecisionEnabled(MatmulPrecision::kInt8)) {
        detail::GemvRowsI8<kBits>(w, in, r0, r1, y);
      }
    }
  });
}

// One-shot y = W x (+ epilogue): prepares x (into *scratch when given, to
// reuse its buffers) and splits the rows over `pool` (nullptr = this thread)
// in ranges of whole 4-row blocks. y_size must be N.
HWY_INLINE Status Gemv(const PreparedPalette& w, const float* HWY_RESTRICT x, size_t x_size,
                       const Epilogue& ep, float* y, size_t y_size,
                       ThreadPool* pool = nullptr, const MatmulOptions& opt = MatmulOptions(),
                       PreparedInput* scratch = nullptr) {
  const size_t N = w.shape().rows;
  if (y == nullptr || y_size != N) {
    return InvalidArgument("gemv: output has %zu floats, N = %zu", y ? y_size : size_t{0}, N);
  }
  PreparedInput local;
  PreparedInput* in = scratch ? scratch : &local;
  LUTRA_RETURN_IF_ERROR(PrepareGemvInput(w, x, x_size, ep, opt, in));
  return ParallelForRows(pool, N, kGemvRangeAlignment,
                         [&](RowRange rr) { return GemvRows(w, *in, rr.begin, rr.end, y); });
}

}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#endif  // LUTRA_GEMV_INL_H_
