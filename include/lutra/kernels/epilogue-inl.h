// The fused matmul epilogue (matmul.h Epilogue), applied by GEMV, GEMM and
// f32-weight matvecs alike, in the documented order:
//   y[m, n] = fma(scale, D[m, n], (raw[m, n] + bias[n]) + residual[m, n])
// where raw = W x in f32 and D[m, n] = B_n . (A x_m) (unscaled; A x comes
// from matmul_input-inl.h LoraAx). residual may alias y: every element is read
// before it is written.
//
// ApplyEpilogue is the one vector pass that combines the terms. The LoRA dot
// products D come from one of two helpers, chosen by how often a B row is
// used: LoraRowDots (one dot per B row: GEMV and f32 matvecs, where each row
// is used once) or LoraPanel (B^T of a panel of rows in f32, so that D is a
// vector FMA over outputs: GEMM, where each row serves M tokens).
// FinishRows = LoraRowDots + ApplyEpilogue for a chunk of raw values, and
// EpilogueChunk collects a row run's raw values into such chunks, so that the
// GEMV hot loop only stores one float per row.
//
// Per-target code: include after hwy/highway.h (see dot-inl.h).
//
// Entry points (namespace lutra::HWY_NAMESPACE):
//   struct EpilogueArgs;  EpilogueArgs EpilogueArgsOf(const PreparedInput&, size_t ldy);
//   void ApplyEpilogue(df, const EpilogueArgs& e, size_t m, size_t n0, size_t n,
//                      const float* raw, const float* dots, float* y_row);
//   void LoraRowDots(const LoraDelta& lora, const float* ax, size_t n0, size_t n,
//                    float* dots);
//   class LoraPanel;  (Init, Dots)
//   void FinishRows(df, const EpilogueArgs& e, size_t m, size_t n0, size_t n,
//                   const float* raw, float* y_row);     n <= kEpilogueChunk
//   class EpilogueChunk;  (Start, Push, Flush)

#if defined(LUTRA_EPILOGUE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LUTRA_EPILOGUE_INL_H_
#undef LUTRA_EPILOGUE_INL_H_
#else
#define LUTRA_EPILOGUE_INL_H_
#endif

#include <stddef.h>
#include <stdint.h>

#include <vector>

#include "hwy/cache_control.h"
#include "hwy/highway.h"
#include "lutra/base/element-inl.h"  // LoadNAsF32
#include "lutra/format/lora.h"
#include "lutra/format/palette.h"
#include "lutra/kernels/dot-inl.h"
#include "lutra/kernels/matmul.h"

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// What the epilogue reads for output (m, n) of an M x N result.
struct EpilogueArgs {
  const float* bias = nullptr;      // N floats, or null
  const float* residual = nullptr;  // M x N at residual_stride, or null
  size_t residual_stride = 0;
  const LoraDelta* lora = nullptr;  // every token's delta; null: no LoRA term
  const float* lora_ax = nullptr;   // M x lora->rank: A x per token
  // Instead of lora: token m's delta at token_lora[m] (rank 0: none), its A x
  // at lora_ax + m * lora_ax_stride.
  const LoraDelta* token_lora = nullptr;
  size_t lora_ax_stride = 0;

  // Token m's delta (null: no LoRA term) and its A x.
  const LoraDelta* LoraOf(size_t m) const {
    if (token_lora == nullptr) return lora;
    return token_lora[m].rank != 0 ? &token_lora[m] : nullptr;
  }
  const float* AxOf(size_t m) const {
    return lora_ax + m * (token_lora != nullptr ? lora_ax_stride : lora->rank);
  }
};

// The epilogue of a prepared input whose output rows are ldy floats apart.
HWY_INLINE EpilogueArgs EpilogueArgsOf(const PreparedInput& in, size_t ldy) {
  EpilogueArgs e;
  e.bias = in.epilogue.bias;
  e.residual = in.epilogue.residual;
  e.residual_stride = in.epilogue.residual_stride ? in.epilogue.residual_stride : ldy;
  if (in.has_lora) {
    if (in.token_lora.empty()) {
      e.lora = &in.lora;
    } else {
      e.token_lora = in.token_lora.data();
      e.lora_ax_stride = in.lora_ax_stride;
    }
    e.lora_ax = in.lora_ax.data();
  }
  return e;
}

// y_row[n0 + j] = fma(scale, dots[j], (raw[j] + bias[n0 + j]) + residual)
// for j < n, token m (residual[m * residual_stride + n0 + j]); absent terms
// are skipped, and dots is read only when token m has a delta. raw may be
// y_row + n0 (in place), and residual may alias y_row: each vector of them is
// loaded before the same elements are stored.
template <class DF>
HWY_INLINE void ApplyEpilogue(DF df, const EpilogueArgs& e, size_t m, size_t n0, size_t n,
                              const float* raw, const float* dots, float* y_row) {
  using VF = hn::Vec<DF>;
  const size_t NF = hn::Lanes(df);
  const float* bias = e.bias ? e.bias + n0 : nullptr;
  const float* res = e.residual ? e.residual + m * e.residual_stride + n0 : nullptr;
  const LoraDelta* lora = e.LoraOf(m);
  if (lora == nullptr) dots = nullptr;
  const VF scale = hn::Set(df, lora ? lora->scale : 0.0f);
  float* out = y_row + n0;
  const auto one = [&](size_t j, size_t cnt) HWY_ATTR {
    VF v = hn::LoadN(df, raw + j, cnt);
    if (bias) v = hn::Add(v, hn::LoadN(df, bias + j, cnt));
    if (res) v = hn::Add(v, hn::LoadN(df, res + j, cnt));
    if (dots) v = hn::MulAdd(hn::LoadN(df, dots + j, cnt), scale, v);
    hn::StoreN(v, df, out + j, cnt);
  };
  size_t j = 0;
  for (; j + NF <= n; j += NF) one(j, NF);
  if (j < n) one(j, n - j);
}

namespace detail {

#if LUTRA_HAVE_SUMS_OF_FOUR
// LoraRowDots for B rows of T (rank elements each, from b): rows four at a
// time, each row's products summed per lane over its vectors in order, then
// the four rows' sums in one SumsOfFour (zeros past n). A row's dot thus
// has the same bits whichever rows share its group: every chunking of the
// outputs (GEMV, the few-token GEMM, any thread split) agrees.
template <typename T>
HWY_INLINE void RowDotsOfFour(const T* HWY_RESTRICT b, size_t rank, const float* HWY_RESTRICT ax,
                              size_t n, float* HWY_RESTRICT dots) {
  const hn::ScalableTag<float> df;
  using VF = hn::Vec<decltype(df)>;
  const size_t NF = hn::Lanes(df);
  const auto row = [&](size_t j) HWY_ATTR {
    VF acc = hn::Zero(df);
    if (j >= n) return acc;
    const T* HWY_RESTRICT r = b + j * rank;
    for (size_t k = 0; k < rank; k += NF) {
      const size_t c = HWY_MIN(NF, rank - k);
      acc = hn::MulAdd(LoadNAsF32(df, r + k, c), hn::LoadN(df, ax + k, c), acc);
    }
    return acc;
  };
  for (size_t j = 0; j < n; j += 4) {
    const VF sums = SumsOfFour(df, row(j), row(j + 1), row(j + 2), row(j + 3));
    hn::StoreN(sums, df, dots + j, HWY_MIN(size_t{4}, n - j));
  }
}
#endif

}  // namespace detail

// dots[j] = B_{n0 + j} . ax (rank floats) for j < n: one dot product per B
// row, for callers that use each row once.
// - The B rows of the next n outputs are prefetched: callers walk the rows
//   in order, a chunk at a time between runs of the matmul's own loads, and
//   without it each chunk's B rows came from DRAM on demand (a rank-16 f16
//   adapter on every projection cost a 4-bit AFM decode step 27 %, for 3 %
//   more bytes). The last chunk prefetches past B's end, which is harmless
//   (a prefetch never faults); its addresses are computed as integers, as
//   pointer arithmetic past an array's end is undefined.
// - Four rows share one reduction (RowDotsOfFour) where the target has
//   SumsOfFour: one ReduceSum per row cost about as much as the rest of the
//   epilogue.
HWY_INLINE void LoraRowDots(const LoraDelta& lora, const float* HWY_RESTRICT ax, size_t n0,
                            size_t n, float* HWY_RESTRICT dots) {
  const size_t rank = lora.rank;
  const size_t row_bytes = rank * ElementBytes(lora.type);
  const uint8_t* b = static_cast<const uint8_t*>(lora.b) + n0 * row_bytes;
  const uintptr_t next = reinterpret_cast<uintptr_t>(b) + n * row_bytes;
  for (size_t off = 0; off < n * row_bytes; off += 64) {
    hwy::Prefetch(reinterpret_cast<const uint8_t*>(next + off));
  }
#if LUTRA_HAVE_SUMS_OF_FOUR
  switch (lora.type) {
    case ElementType::kF16:
      return detail::RowDotsOfFour(reinterpret_cast<const hwy::float16_t*>(b), rank, ax, n, dots);
    case ElementType::kBF16:
      return detail::RowDotsOfFour(reinterpret_cast<const hwy::bfloat16_t*>(b), rank, ax, n,
                                   dots);
    default:
      return detail::RowDotsOfFour(reinterpret_cast<const float*>(b), rank, ax, n, dots);
  }
#else
  for (size_t j = 0; j < n; ++j) dots[j] = TypedDot(lora.type, b + j * row_bytes, ax, rank);
#endif
}

// B^T of output rows [n0, n0 + n) in f32 (rank x NR, zero past n), built once
// per panel so that each token's dots are NR-wide vector FMAs: for callers
// that use each B row for many tokens. NR is a multiple of the f32 lanes.
class LoraPanel {
 public:
  void Init(const LoraDelta& lora, size_t n0, size_t n, size_t NR) {
    rank_ = lora.rank;  // <= kMaxLoraRank (ValidateLora)
    nr_ = NR;           // 2 f32 vectors <= kMaxNR
    if (!kFixed) heap_.resize(rank_ * NR);
    float* bt = Storage();
    for (size_t j = 0; j < NR; ++j) {
      for (size_t k = 0; k < rank_; ++k) {
        bt[k * NR + j] = j < n ? LoadElement(lora.b, lora.type, (n0 + j) * rank_ + k) : 0.0f;
      }
    }
  }
  // dots[j] = sum_k ax[k] * B_{n0 + j, k} for j < NR, summed in order of k.
  template <class DF>
  HWY_INLINE void Dots(DF df, const float* HWY_RESTRICT ax, float* HWY_RESTRICT dots) const {
    const size_t NF = hn::Lanes(df);
    for (size_t j = 0; j < nr_; j += NF) {
      hn::Vec<DF> d = hn::Zero(df);
      for (size_t k = 0; k < rank_; ++k) {
        d = hn::MulAdd(hn::Set(df, ax[k]), hn::LoadU(df, Storage() + k * nr_ + j), d);
      }
      hn::StoreU(d, df, dots + j);
    }
  }

 private:
  // A fixed buffer (8 KiB on AVX-512, 32 KiB for 2048-bit SVE): no
  // allocation per GemmRows call; wider targets (RVV) use the heap.
  static constexpr size_t kMaxNR = 2 * hn::MaxLanes(hn::ScalableTag<float>());
  static constexpr bool kFixed = kMaxNR <= 128;
  const float* Storage() const { return kFixed ? fixed_ : heap_.data(); }
  float* Storage() { return kFixed ? fixed_ : heap_.data(); }
  size_t rank_ = 0, nr_ = 0;
  float fixed_[kFixed ? kMaxLoraRank * kMaxNR : 1];
  std::vector<float> heap_;
};

// Outputs per FinishRows call: a few vectors, small enough for the stack.
constexpr size_t kEpilogueChunk = 32;

// The epilogue of token m's outputs [n0, n0 + n) (n <= kEpilogueChunk) from
// their raw values, with LoraRowDots. Out of line: called once per chunk from
// hot loops that should not grow by its code.
template <class DF>
HWY_NOINLINE void FinishRows(DF df, const EpilogueArgs& e, size_t m, size_t n0, size_t n,
                             const float* raw, float* y_row) {
  HWY_ALIGN float dots[kEpilogueChunk];
  if (const LoraDelta* lora = e.LoraOf(m)) LoraRowDots(*lora, e.AxOf(m), n0, n, dots);
  ApplyEpilogue(df, e, m, n0, n, raw, dots, y_row);
}

// Raw values of consecutive outputs n0, n0 + 1, ... of token 0, finished
// (FinishRows) per chunk of kEpilogueChunk and at Flush.
class EpilogueChunk {
 public:
  HWY_INLINE void Start(size_t n0) {
    n0_ = n0;
    count_ = 0;
  }
  // Appends the raw value of the next output.
  HWY_INLINE void Push(const EpilogueArgs& e, float raw, float* y) {
    raw_[count_++] = raw;
    if (count_ == kEpilogueChunk) Flush(e, y);
  }
  // Finishes the outputs appended so far.
  HWY_INLINE void Flush(const EpilogueArgs& e, float* y) {
    if (count_ != 0) FinishRows(hn::ScalableTag<float>(), e, 0, n0_, count_, raw_, y);
    n0_ += count_;
    count_ = 0;
  }

 private:
  size_t n0_ = 0, count_ = 0;
  float raw_[kEpilogueChunk];
};

}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#endif  // LUTRA_EPILOGUE_INL_H_
