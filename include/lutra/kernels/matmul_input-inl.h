// Activation preparation shared by GEMV (gemv-inl.h) and GEMM (gemm-inl.h):
// once per call, token rows x are rearranged into the decode's position order
// (lut_decode-inl.h PositionColumn), quantized to i8 per block of positions
// (kInt8) or copied (kF32), and the LoRA epilogue's A x is computed. The
// result, a PreparedInput (matmul.h), is then read by any number of row
// calls from any threads.
//
// Per-target code: include after hwy/highway.h (see dot-inl.h). An input is
// valid only for the matrix and the SIMD target that prepared it
// (CheckInput).
//
// Entry points (namespace lutra::HWY_NAMESPACE):
//   Status PrepareGemmInput(const PreparedPalette& w, const float* X, size_t M,
//                           size_t ldx, const Epilogue& ep,
//                           const MatmulOptions& opt, PreparedInput* in);
//   Status PrepareGemvInput(const PreparedPalette& w, const float* x,
//                           size_t x_size, const Epilogue& ep,
//                           const MatmulOptions& opt, PreparedInput* in);
//   void LoraAx(const LoraDelta& lora, const float* X, size_t M, size_t ldx,
//               size_t K, float* ax);
//   Status detail::CheckInput(const PreparedPalette& w, const PreparedInput& in,
//                             const char* caller);

#if defined(LUTRA_MATMUL_INPUT_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LUTRA_MATMUL_INPUT_INL_H_
#undef LUTRA_MATMUL_INPUT_INL_H_
#else
#define LUTRA_MATMUL_INPUT_INL_H_
#endif

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <vector>

#include "hwy/highway.h"
#include "lutra/base/status.h"
#include "lutra/format/lora.h"
#include "lutra/format/palette.h"
#include "lutra/kernels/dot-inl.h"
#include "lutra/kernels/lut_decode-inl.h"
#include "lutra/kernels/matmul.h"

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

namespace detail {

// Quantization blocks span about this many positions (a whole number of
// units): int32 sums per block stay far from overflow (256 * 255 * 127) and
// an activation outlier only coarsens the scale of its own block.
constexpr size_t kBlockPositions = 256;

// Tokens per group of the few-token kernel (gemm-inl.h FewTokensRowsI8), at
// most: each token keeps an i32 and an f32 accumulator in registers, so
// 16-register targets (x86 before AVX-512) take 4 tokens per pass over a
// row and the others 8.
#if HWY_ARCH_X86 && HWY_TARGET > HWY_AVX3
constexpr size_t kFewTokens = 4;
#else
constexpr size_t kFewTokens = 8;
#endif
// A group's activations (tokens x positions bytes) are read once per row of
// a chunk of rows, so they should stay in L1: at K = 8192, groups of 8
// tokens (64 KiB) ran at 180-230 GOP/s and groups of 4 at 400-425 on a Zen 5
// core (48 KiB L1d); at K = 4096, 8 tokens ran at 515 and 4 at 420.
constexpr size_t kFewTokensGroupBytes = 32 * 1024;

// Tokens per group for token rows of `positions` int8 activations.
HWY_INLINE size_t FewTokensPerGroup(size_t positions) {
  return HWY_MAX(size_t{1}, HWY_MIN(kFewTokens, kFewTokensGroupBytes / positions));
}

// Fills in->xq_groups and in->xscale_groups (matmul.h) from xq and xscale.
HWY_INLINE void GroupFewTokens(PreparedInput* in) {
  const size_t M = in->rows, P = in->geometry.positions(), nb = in->num_blocks;
  const size_t L = hn::Lanes(DecodeTag());
  const size_t group = FewTokensPerGroup(P);
  in->xq_groups.resize(M * P);
  in->xscale_groups.resize(M * nb);
  for (size_t t0 = 0; t0 < M; t0 += group) {
    const size_t m = HWY_MIN(group, M - t0);
    int8_t* HWY_RESTRICT xg = in->xq_groups.data() + t0 * P;
    float* HWY_RESTRICT sg = in->xscale_groups.data() + t0 * nb;
    for (size_t t = 0; t < m; ++t) {
      const int8_t* HWY_RESTRICT x = in->xq.data() + (t0 + t) * P;
      for (size_t c = 0; c < P / L; ++c) memcpy(xg + (c * m + t) * L, x + c * L, L);
      for (size_t b = 0; b < nb; ++b) sg[b * m + t] = in->xscale[(t0 + t) * nb + b];
    }
  }
}

// PreparedInput::units_per_block as a compile-time constant where the vector
// length is one (0 on scalable targets). A full block's unit loop then has a
// constant trip count and unrolls: at 2 units per block (4-bit, AVX-512) the
// loop's bookkeeping (bounds, the next block's start) was about 30 scalar
// instructions per 4-8 vpdpbusd; dropping it made the few-token kernel at
// M = 2 1.5x and 4-bit GEMV 1.35x faster from L2 (docs/gemv.md, session
// 17).
template <int kBits>
constexpr size_t FixedUnitsPerBlock() {
#if HWY_HAVE_SCALABLE
  return 0;
#else
  return HWY_MAX(size_t{1}, kBlockPositions / (hn::MaxLanes(DecodeTag()) *
                                               PaletteFormat<kBits>::kRunsPerBlock));
#endif
}

template <int kBits>
HWY_INLINE void SetGeometry(const PaletteShape& shape, PreparedInput* in) {
  const UnitGeometry& g = in->geometry = UnitGeometryFor<kBits>(shape);
  in->units_per_block = HWY_MAX(size_t{1}, kBlockPositions / g.unit_positions);
  HWY_DASSERT(FixedUnitsPerBlock<kBits>() == 0 ||
              FixedUnitsPerBlock<kBits>() == in->units_per_block);
  in->num_blocks = (g.num_units + in->units_per_block - 1) / in->units_per_block;
  const size_t runs = g.positions() / 16;
  in->run_col.resize(runs);
  for (size_t t = 0; t < runs; ++t) {
    in->run_col[t] = static_cast<uint32_t>(PositionColumn<kBits>(g, t * 16));
  }
}

// Gathers positions [p0, p0 + n) of token row x (K columns) into out, zero
// for columns >= K. n and p0 are multiples of 16.
HWY_INLINE void GatherPositions(const PreparedInput& in, const float* HWY_RESTRICT x,
                                size_t p0, size_t n, float* HWY_RESTRICT out) {
  const size_t K = in.cols;
  for (size_t t = 0; t < n / 16; ++t) {
    const size_t c0 = in.run_col[p0 / 16 + t];
    const size_t valid = c0 >= K ? 0 : HWY_MIN(size_t{16}, K - c0);
    if (valid) memcpy(out + 16 * t, x + c0, valid * sizeof(float));
    for (size_t j = valid; j < 16; ++j) out[16 * t + j] = 0.0f;
  }
}

// The int8 path's summation order, shared by GEMV and the small-M GEMM so
// that both give the same bits (matmul.h, bit-exact contract). Per row and
// token, an f32 vector accf accumulates, block by block, lane l's exact i32
// sum of the block's 4-position quads l (positions p with p % L in
// [4l, 4l + 4), L = DecodeTag lanes) times the block's activation scale;
// the dot product is ReduceSum(accf) after the last block, and RawI8 turns
// it into W x.
template <class DF, class VI, class VF = hn::Vec<DF>>
HWY_INLINE VF AddBlockSum(DF df, VI block_sum, float xscale, VF accf) {
  return hn::MulAdd(hn::ConvertTo(df, block_sum), hn::Set(df, xscale), accf);
}

// W x of one output row of group g from its dot product of u8 codes and i8
// activations: w ~= lo + step * q, so W x = step * dot + lo * sum(x). An
// explicit fma: the same rounding in every caller (the compiler would
// contract a * b + c differently per inlined copy).
HWY_INLINE float RawI8(const PreparedPalette& w, size_t g, float dot, float xsum) {
  return std::fma(w.step(g), dot, w.lo(g) * xsum);
}

// A run of consecutive rows whose codebook group is tracked incrementally
// (GEMV, few-token GEMM): a 64-bit division per row costs as much as a
// tenth of a short row.
struct RowStream {
  size_t row, group, group_end;  // group of `row`; first row of the next group
  HWY_INLINE void Init(size_t r, size_t G) {
    row = r;
    group = r / G;
    group_end = (group + 1) * G;
  }
  HWY_INLINE void Next(size_t G) {
    if (++row >= group_end) {
      ++group;
      group_end += G;
    }
  }
};

// The i32 lanes (those of DecodeTag) that token t's accumulators of block b
// start from: the code-bias correction (CodeDot), or zero without a bias.
template <class DI32>
HWY_INLINE hn::Vec<DI32> BlockStart(DI32 di32, const PreparedInput& in, size_t t, size_t b) {
  if (kCodeBias == 0) return hn::Zero(di32);
  return hn::LoadU(di32, in.xcorr.data() + (t * in.num_blocks + b) * hn::Lanes(di32));
}

// Checks that `in` was prepared for w by this target.
HWY_INLINE Status CheckInput(const PreparedPalette& w, const PreparedInput& in,
                             const char* caller) {
  if (in.weights != &w || in.bits != w.shape().bits || in.cols != w.shape().cols) {
    return InvalidArgument("%s: input was prepared for another matrix", caller);
  }
  if (in.geometry.lanes != hn::Lanes(DecodeTag())) {
    return InvalidArgument("%s: input was prepared by another SIMD target (%zu lanes, need %zu)",
                           caller, in.geometry.lanes, hn::Lanes(DecodeTag()));
  }
  // Targets of the same width may differ in their code bias (CodeDot).
  if (in.precision == MatmulPrecision::kInt8 && kCodeBias != 0 &&
      (in.xqsum.size() != in.rows * in.num_blocks ||
       in.xcorr.size() != in.xqsum.size() * hn::Lanes(hn::Repartition<int32_t, DecodeTag>()))) {
    return InvalidArgument("%s: input was prepared by another SIMD target (no code-bias sums)",
                           caller);
  }
  return Status::Ok();
}

}  // namespace detail

// ax[m * rank + k] = A_k . X_m (A row k, rank x K of lora.type) for the M
// token rows X_m = X + m * ldx (K floats each): the first half of the LoRA
// epilogue (epilogue-inl.h applies scale * B (A x)), once per call.
HWY_INLINE void LoraAx(const LoraDelta& lora, const float* HWY_RESTRICT X, size_t M,
                       size_t ldx, size_t K, float* HWY_RESTRICT ax) {
  const size_t rank = lora.rank;
  const size_t a_row_bytes = K * ElementBytes(lora.type);
  for (size_t m = 0; m < M; ++m) {
    for (size_t k = 0; k < rank; ++k) {
      ax[m * rank + k] = TypedDot(
          lora.type, static_cast<const uint8_t*>(lora.a) + k * a_row_bytes, X + m * ldx, K);
    }
  }
}

namespace detail {

// Checks the epilogue's LoRA delta(s) for M tokens before anything is
// prepared.
HWY_INLINE Status CheckLora(const Epilogue& ep, size_t M) {
  if (ep.lora != nullptr && ep.token_lora != nullptr) {
    return InvalidArgument("matmul: the epilogue sets both lora and token_lora; set one");
  }
  if (ep.lora != nullptr) return ValidateLora(*ep.lora);
  if (ep.token_lora == nullptr) return Status::Ok();
  for (size_t m = 0; m < M; ++m) {
    if (ep.token_lora[m] == nullptr) continue;
    const Status s = ValidateLora(*ep.token_lora[m]);
    if (!s.ok()) return InvalidArgument("matmul: token %zu's %s", m, s.message().c_str());
  }
  return Status::Ok();
}

// The LoRA half of a preparation (after CheckLora): copies the delta(s)
// into in and computes A x of the M token rows X (row m at X + m * ldx, K
// floats). A token list whose entries are all the same delta (or all null)
// is stored as one delta, so that such calls run exactly as with ep.lora.
HWY_INLINE void PrepareLora(const Epilogue& ep, const float* HWY_RESTRICT X, size_t M,
                            size_t ldx, size_t K, PreparedInput* in) {
  in->epilogue.lora = nullptr;  // kernels read in->lora / in->token_lora
  in->epilogue.token_lora = nullptr;
  in->token_lora.clear();
  const LoraDelta* one = ep.lora;
  bool mixed = false;
  if (ep.token_lora != nullptr) {
    one = ep.token_lora[0];
    for (size_t m = 1; m < M; ++m) mixed = mixed || ep.token_lora[m] != one;
  }
  in->has_lora = one != nullptr || mixed;
  if (!mixed) {
    if (one == nullptr) return;
    in->lora = *one;
    in->lora_ax_stride = one->rank;
    in->lora_ax.resize(M * one->rank);
    LoraAx(*one, X, M, ldx, K, in->lora_ax.data());
    return;
  }
  size_t stride = 0;
  for (size_t m = 0; m < M; ++m) {
    if (ep.token_lora[m] != nullptr) stride = HWY_MAX(stride, ep.token_lora[m]->rank);
  }
  in->token_lora.assign(M, LoraDelta());  // rank 0: no delta
  in->lora_ax_stride = stride;
  in->lora_ax.resize(M * stride);
  for (size_t m = 0; m < M; ++m) {
    if (ep.token_lora[m] == nullptr) continue;
    in->token_lora[m] = *ep.token_lora[m];
    LoraAx(*ep.token_lora[m], X + m * ldx, 1, ldx, K, in->lora_ax.data() + m * stride);
  }
}

}  // namespace detail

// Prepares M token rows X (row m at X + m * ldx, K floats each; ldx >= K)
// for GemvRows (M = 1) / GemmRows against w. The epilogue's pointers are
// stored and must stay valid until the row calls return. Cost
// O(M * (K + rank * K)).
HWY_INLINE Status PrepareGemmInput(const PreparedPalette& w, const float* HWY_RESTRICT X,
                                   size_t M, size_t ldx, const Epilogue& ep,
                                   const MatmulOptions& opt, PreparedInput* in) {
  const PaletteShape& shape = w.shape();
  if (in == nullptr) return InvalidArgument("matmul: null PreparedInput");
  if (shape.rows == 0 || w.view().indices == nullptr) {
    return InvalidArgument("matmul: weights are empty (use PreparedPalette::Make)");
  }
  const size_t K = shape.cols;
  if (X == nullptr) return InvalidArgument("matmul: null activations");
  if (M == 0) return InvalidArgument("matmul: M = 0 token rows, need M >= 1");
  if (ldx < K) return InvalidArgument("matmul: row stride %zu < K = %zu", ldx, K);
  if (opt.precision != MatmulPrecision::kInt8 && opt.precision != MatmulPrecision::kF32) {
    return InvalidArgument("matmul: unknown precision %d", static_cast<int>(opt.precision));
  }
  if (!KernelPrecisionEnabled(opt.precision)) {
    return Unimplemented("matmul: %s kernels are not compiled in this build "
                         "(LUTRA_KERNEL_PRECISIONS)", MatmulPrecisionName(opt.precision));
  }
  LUTRA_RETURN_IF_ERROR(detail::CheckLora(ep, M));

  in->precision = opt.precision;
  in->bits = shape.bits;
  in->cols = K;
  in->rows = M;
  in->weights = &w;
  in->epilogue = ep;
  in->has_lora = false;  // until PrepareLora, after the activations
  LUTRA_RETURN_IF_ERROR(WithKernelBits(shape.bits, "matmul", [&](auto bits) HWY_ATTR {
    detail::SetGeometry<decltype(bits)::value>(shape, in);
  }));
  const size_t P = in->geometry.positions();
  const size_t block = in->units_per_block * in->geometry.unit_positions;
  const hn::ScalableTag<float> df;
  const hn::RebindToSigned<decltype(df)> di32;
  const hn::Rebind<int8_t, decltype(di32)> di8;
  const size_t NF = hn::Lanes(df);

  if (opt.precision == MatmulPrecision::kF32) {
    in->xf.resize(M * P);
    for (size_t m = 0; m < M; ++m) {
      detail::GatherPositions(*in, X + m * ldx, 0, P, in->xf.data() + m * P);
    }
  } else {
    in->xq.resize(M * P);
    in->xscale.resize(M * in->num_blocks);
    in->xsum.resize(M);
    // The code-bias corrections (lut_decode-inl.h CodeDot) in the lanes of
    // the decode's i32 accumulators.
    const hn::Repartition<int32_t, DecodeTag> dci32;
    const hn::Repartition<int8_t, DecodeTag> dci8;
    const DecodeTag dcu8;
    in->xcorr.resize(kCodeBias != 0 ? M * in->num_blocks * hn::Lanes(dci32) : 0);
    in->xqsum.resize(kCodeBias != 0 ? M * in->num_blocks : 0);
    in->gather.resize(block);  // reused: no allocation once large enough
    std::vector<float>& tmp = in->gather;
    for (size_t m = 0; m < M; ++m) {
      double total = 0.0;
      for (size_t b = 0; b < in->num_blocks; ++b) {
        const size_t p0 = b * block;
        const size_t n = HWY_MIN(block, P - p0);  // multiple of 16 >= NF
        detail::GatherPositions(*in, X + m * ldx, p0, n, tmp.data());
        auto vmax = hn::Zero(df);
        for (size_t i = 0; i < n; i += NF) vmax = hn::Max(vmax, hn::Abs(hn::LoadU(df, &tmp[i])));
        const float amax = hn::ReduceMax(df, vmax);
        const float scale = amax / 127.0f;
        const auto inv = hn::Set(df, amax > 0.0f ? 127.0f / amax : 0.0f);
        auto vsum = hn::Zero(di32);
        int8_t* HWY_RESTRICT q = in->xq.data() + m * P + p0;
        for (size_t i = 0; i < n; i += NF) {
          const auto qi = hn::NearestInt(hn::Mul(hn::LoadU(df, &tmp[i]), inv));
          vsum = hn::Add(vsum, qi);
          hn::StoreU(hn::DemoteTo(di8, qi), di8, q + i);
        }
        const int32_t block_sum = hn::ReduceSum(di32, vsum);
        in->xscale[m * in->num_blocks + b] = scale;
        if (kCodeBias != 0) {
          const size_t mb = m * in->num_blocks + b;
          in->xqsum[mb] = kCodeBias * block_sum;
          // n is a multiple of L: blocks are whole units.
          auto corr = hn::Zero(dci32);
          for (size_t i = 0; i < n; i += hn::Lanes(dcu8)) {
            corr = hn::SumOfMulQuadAccumulate(dci32, hn::Set(dcu8, kCodeBias),
                                              hn::LoadU(dci8, q + i), corr);
          }
          hn::StoreU(corr, dci32, in->xcorr.data() + mb * hn::Lanes(dci32));
        }
        total += double(scale) * double(block_sum);
      }
      in->xsum[m] = static_cast<float>(total);
    }
    if (M >= 2 && M <= kGemmSmallM) detail::GroupFewTokens(in);
  }
  detail::PrepareLora(ep, X, M, ldx, K, in);
  return Status::Ok();
}

// PrepareGemmInput(w, X, from.rows, ldx, ep, opt, in) for `from`, an input
// this target prepared from the same X and precision for a matrix with w's
// bits and columns (another matrix of a GemmGroup): the activations'
// positions and quantization depend only on those, so they are copied, not
// computed again (M = 5, K = 3072: 7.9 µs per preparation, on one thread
// before the row tasks start). The LoRA half (A x) is w's own.
HWY_INLINE Status PrepareGemmInputFrom(const PreparedInput& from, const PreparedPalette& w,
                                       const float* HWY_RESTRICT X, size_t ldx,
                                       const Epilogue& ep, PreparedInput* in) {
  if (in == nullptr || in == &from) {
    return InvalidArgument("matmul: the PreparedInput to fill is null or the one to copy");
  }
  if (from.weights == nullptr || from.bits != w.shape().bits || from.cols != w.shape().cols) {
    return InvalidArgument("matmul: the input to copy was prepared for %d-bit rows of %zu "
                           "columns, not %d-bit rows of %zu",
                           from.bits, from.cols, w.shape().bits, w.shape().cols);
  }
  if (X == nullptr) return InvalidArgument("matmul: null activations");
  LUTRA_RETURN_IF_ERROR(detail::CheckLora(ep, from.rows));
  in->precision = from.precision;
  in->bits = from.bits;
  in->cols = from.cols;
  in->rows = from.rows;
  in->geometry = from.geometry;
  in->units_per_block = from.units_per_block;
  in->num_blocks = from.num_blocks;
  in->run_col = from.run_col;
  in->xq = from.xq;
  in->xscale = from.xscale;
  in->xq_groups = from.xq_groups;
  in->xscale_groups = from.xscale_groups;
  in->xsum = from.xsum;
  in->xcorr = from.xcorr;
  in->xqsum = from.xqsum;
  in->xf = from.xf;
  in->weights = &w;
  in->epilogue = ep;
  detail::PrepareLora(ep, X, from.rows, ldx, from.cols, in);
  return Status::Ok();
}

// Single token (GEMV): x has x_size == K floats.
HWY_INLINE Status PrepareGemvInput(const PreparedPalette& w, const float* HWY_RESTRICT x,
                                   size_t x_size, const Epilogue& ep,
                                   const MatmulOptions& opt, PreparedInput* in) {
  if (x_size != w.shape().cols) {
    return InvalidArgument("gemv: x has %zu floats, K = %zu", x_size, w.shape().cols);
  }
  return PrepareGemmInput(w, x, 1, x_size, ep, opt, in);
}

}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#endif  // LUTRA_MATMUL_INPUT_INL_H_
