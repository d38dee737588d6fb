// Options, epilogue and prepared-operand types of the palettized GEMV/GEMM
// kernels. Plain header: no per-target code. The per-target functions are in
// kernels/matmul_input-inl.h (PrepareGemvInput / PrepareGemmInput: activation
// preparation), kernels/gemv-inl.h (GemvRows, Gemv), kernels/gemm-inl.h
// (GemmRows, Gemm) and kernels/epilogue-inl.h (the fused epilogue).
//
// Call sequence:
//   PreparedPalette w = PreparedPalette::Make(view).value();  // once, at load
//   PreparedInput in;                                         // reusable scratch
//   PrepareGemvInput(w, x, K, epilogue, options, &in);        // once per call
//   GemvRows(w, in, r0, r1, y);   // from any number of threads, disjoint ranges
// or the one-shot Gemv(...)/Gemm(...) wrappers with an optional ThreadPool.
//
// Two precisions (MatmulOptions::precision):
// - kInt8 (default, fast): each group's codebook is stored once as u8 with an
//   affine map w ~= lo_g + step_g * q (step_g = (max - min) / 255), x is
//   quantized per call to i8 with one f32 scale per block of positions
//   (|x| max / 127), and u8 x i8 dot products accumulate exactly in i32 per
//   block (VNNI vpdpbusd where available). Error of one output y_r, ignoring
//   f32 rounding:  |err| <= (sx_max / 2) * sum_c (|w_rc| + step_g / 2)
//                           + (step_g / 2) * sum_c |x_c|,
//   with sx_max = max|x| / 127 (every block scale is <= sx_max).
// - kF32 (reference precision): exact codebook values (f16/bf16 widen
//   exactly to f32) times f32 x, accumulated in f32: error is f32 rounding
//   only (<= ~K * eps * |w_r| |x|).
//
// Bit-exact contract (speculative decoding's greedy identity rests on it):
// on one SIMD target and precision, token row m of Gemm / GemmRows with
// M <= kGemmSmallM token rows is bit-identical to Gemv / GemvRows on row m
// alone, with the same epilogue - so it does not depend on M, on the other
// rows, or on how output channels are split across threads or calls. The
// kF32 path keeps this for every M. Above kGemmSmallM the int8 path switches
// to the panel kernel (prefill), whose f32 summation order differs: its
// results agree with GEMV to rounding only. Different targets (AVX2 vs
// AVX-512, ...) may differ from each other by rounding.
#ifndef LUTRA_MATMUL_H_
#define LUTRA_MATMUL_H_

#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

#include "hwy/aligned_allocator.h"
#include "lutra/base/status.h"
#include "lutra/format/lora.h"  // LoraDelta: the epilogue's LoRA view
#include "lutra/format/palette.h"

namespace lutra {

// Fused epilogue, applied in this order to each output element:
//   y = W x  [+ bias[n]]  [+ residual]  [+ lora->scale * B (A x)]
// Null members are skipped. GEMV: bias and residual have N floats. GEMM:
// bias has N floats (broadcast over tokens), residual is M x N at
// residual_stride floats per token row (0 means the output's stride).
// residual may alias the output (in-place residual add); each element is
// read before it is written. Arithmetic (kernels/epilogue-inl.h), in f32:
//   y = fma(lora->scale, B_n . (A x), (W x + bias[n]) + residual).
// token_lora gives each token its own delta instead of `lora` (set at most
// one of them): token m's is token_lora[m], null for none, M entries. Token
// m's outputs are then those of the same call with lora = token_lora[m] and
// token m alone (bit for bit wherever the contract above holds), so one pass
// over W serves a batch of sequences with different adapters.
struct Epilogue {
  const float* bias = nullptr;
  const float* residual = nullptr;
  size_t residual_stride = 0;  // GEMM only
  const LoraDelta* lora = nullptr;
  const LoraDelta* const* token_lora = nullptr;
};

enum class MatmulPrecision : uint8_t {
  kInt8 = 0,  // u8 codebook x i8 activations, i32 dot products (default)
  kF32 = 1,   // exact codebook values, f32 activations and FMA
};

inline const char* MatmulPrecisionName(MatmulPrecision p) {
  return p == MatmulPrecision::kF32 ? "f32" : "int8";
}

// Largest token count M for which the int8 GEMM runs the few-token kernel
// (kernels/gemm-inl.h: weights streamed once, GEMV's summation order per
// token) and therefore matches GEMV bit for bit. Up to 64 tokens that kernel
// is faster than the panel kernel (docs/gemv.md, session 13).
constexpr size_t kGemmSmallM = 64;

// Row ranges that are multiples of this keep GEMV's 4-row steps whole
// (kernels/gemv-inl.h GemvRowsI8); any range is correct.
constexpr size_t kGemvRangeAlignment = 4;

struct MatmulOptions {
  MatmulPrecision precision = MatmulPrecision::kInt8;
};

// Compile-time selection of what the GEMV/GEMM kernels instantiate, to cut
// compile time and binary size (docs/mobile.md has the figures). Define
// before including any kernel header (CMake: LUTRA_BITS, LUTRA_PRECISIONS):
//   LUTRA_KERNEL_BITS: bit b set = b-bit indices (default: 1, 2, 3, 4, 6, 8),
//     e.g. (1 << 2) | (1 << 4) for 2- and 4-bit models only;
//   LUTRA_KERNEL_PRECISIONS: bit 0 = kInt8, bit 1 = kF32 (default: both).
// Preparing an input for a disabled width or precision returns
// Unimplemented naming the macro; palettizing, files and the scalar helpers
// keep every width.
#ifndef LUTRA_KERNEL_BITS
#define LUTRA_KERNEL_BITS ((1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 6) | (1 << 8))
#endif
#ifndef LUTRA_KERNEL_PRECISIONS
#define LUTRA_KERNEL_PRECISIONS 3
#endif
constexpr bool KernelBitsEnabled(int bits) {
  return bits >= 1 && bits <= 8 && ((LUTRA_KERNEL_BITS) >> bits & 1) != 0;
}
constexpr bool KernelPrecisionEnabled(MatmulPrecision p) {
  return ((LUTRA_KERNEL_PRECISIONS) >> static_cast<int>(p) & 1) != 0;
}

// WithBits (format/palette.h) for the kernels: calls fn only for the widths
// LUTRA_KERNEL_BITS enables, so that only those are instantiated.
template <class Fn>
Status WithKernelBits(int bits, const char* caller, const Fn& fn) {
  return WithBits(bits, [&](auto b) -> Status {
    if constexpr (KernelBitsEnabled(decltype(b)::value)) {
      if constexpr (std::is_void_v<decltype(fn(b))>) {
        fn(b);
        return Status::Ok();
      } else {
        return fn(b);
      }
    } else {
      return Unimplemented("%s: %d-bit kernels are not compiled in this build (LUTRA_KERNEL_BITS)",
                           caller, bits);
    }
  });
}

// A palettized matrix plus the small per-group tables the kernels read
// instead of the stored codebooks: an f32 copy (exact path) and an affine u8
// copy (int8 path). Built once when the weight is loaded; it does not copy
// the indices, so the view's memory (e.g. an mmap) must outlive it.
// Movable; tables are ~ (num_groups * 2^b * 5) bytes.
class PreparedPalette {
 public:
  PreparedPalette() = default;

  static StatusOr<PreparedPalette> Make(const PaletteView& view) {
    LUTRA_RETURN_IF_ERROR(view.shape.Validate());
    if (view.indices == nullptr || view.codebooks == nullptr) {
      return InvalidArgument("prepare palette: view has null %s",
                             view.indices == nullptr ? "indices" : "codebooks");
    }
    PreparedPalette p;
    p.view_ = view;
    const size_t E = view.shape.num_entries();
    // At least 16 entries so that b <= 4 tables load as one 128-bit block.
    p.stride_ = std::max<size_t>(16, E);
    const size_t groups = view.shape.num_groups();
    p.f32_.assign(groups * p.stride_, 0.0f);
    p.u8_.assign(groups * p.stride_, 0);
    p.affine_.assign(2 * groups, 0.0f);
    for (size_t g = 0; g < groups; ++g) {
      float* t = &p.f32_[g * p.stride_];
      float lo = 0.0f, hi = 0.0f;
      for (size_t e = 0; e < E; ++e) {
        t[e] = view.entry(g, e);
        if (!std::isfinite(t[e])) {
          return InvalidArgument("prepare palette: group %zu entry %zu is not finite",
                                 g, e);
        }
        lo = e == 0 ? t[e] : std::min(lo, t[e]);
        hi = e == 0 ? t[e] : std::max(hi, t[e]);
      }
      // Affine u8 code: w ~= lo + step * q, q in [0, 255]; |error| <= step/2.
      const float step = (hi - lo) / 255.0f;
      p.affine_[2 * g] = step;
      p.affine_[2 * g + 1] = lo;
      for (size_t e = 0; e < E; ++e) {
        const float q = step > 0.0f ? std::nearbyint((t[e] - lo) / step) : 0.0f;
        p.u8_[g * p.stride_ + e] = static_cast<uint8_t>(std::min(255.0f, std::max(0.0f, q)));
      }
    }
    return p;
  }

  const PaletteView& view() const { return view_; }
  const PaletteShape& shape() const { return view_.shape; }
  // Entries per table row: max(16, 2^b); entries past 2^b are 0.
  size_t table_stride() const { return stride_; }
  const float* table_f32(size_t group) const { return &f32_[group * stride_]; }
  const uint8_t* table_u8(size_t group) const { return &u8_[group * stride_]; }
  float step(size_t group) const { return affine_[2 * group]; }
  float lo(size_t group) const { return affine_[2 * group + 1]; }
  // The group's {step, lo}, next to each other (one cache line to prefetch).
  const float* affine(size_t group) const { return &affine_[2 * group]; }

 private:
  PaletteView view_;
  size_t stride_ = 16;
  std::vector<float> f32_;
  std::vector<uint8_t> u8_;
  std::vector<float> affine_;  // per group: step, lo
};

// How one packed row is consumed by the SIMD decode on one target
// (kernels/lut_decode-inl.h UnitGeometryFor): units of one packed block per
// 128-bit lane, each yielding sub_vectors vectors of `lanes` indices.
struct UnitGeometry {
  size_t lanes = 0;           // L: u8 lanes of one decoded vector
  size_t sub_vectors = 0;     // index vectors per unit (PaletteFormat::kRunsPerBlock)
  size_t unit_positions = 0;  // L * sub_vectors
  size_t unit_bytes = 0;      // packed bytes consumed per unit
  size_t num_units = 0;       // per row
  // Positions per row: num_units * unit_positions (>= padded K).
  size_t positions() const { return num_units * unit_positions; }
};

// Activations (M >= 1 token rows) prepared for one call against one
// PreparedPalette: rearranged into the kernels' position order (which
// depends on the SIMD target and the bit width), quantized (kInt8) or copied
// (kF32), plus A*x of the LoRA epilogue. Filled by PrepareGemvInput /
// PrepareGemmInput (kernels/matmul_input-inl.h) of the same target that then
// runs GemvRows / GemmRows; keep one per thread-of-control and reuse it to
// avoid reallocations. Fields are read by the kernels; callers treat them as
// opaque.
struct PreparedInput {
  MatmulPrecision precision = MatmulPrecision::kInt8;
  int bits = 0;
  size_t cols = 0;          // K
  size_t rows = 0;          // M tokens
  UnitGeometry geometry;    // of the weights' rows on the preparing target
  size_t units_per_block = 0;     // decode units per quantization block
  size_t num_blocks = 0;          // quantization blocks per token row
  std::vector<uint32_t> run_col;  // first column of each 16-position run
  // The token rows that the kernels load a vector at a time are aligned to
  // HWY_ALIGNMENT (positions() is a multiple of the vector length): with
  // std::vector's 16-byte alignment a 64-byte load of an AVX-512 kernel
  // could span two cache lines, and the few-token kernel, which loads each
  // token's activations once per code vector, ran up to 1.6x slower at M = 8
  // depending on where malloc put the buffer.
  hwy::AlignedVector<int8_t> xq;  // rows x positions (kInt8)
  std::vector<float> xscale;      // rows x num_blocks (kInt8)
  // The few-token kernel's copy of xq and xscale (kInt8, 2 <= rows <=
  // kGemmSmallM; gemm-inl.h): tokens in groups of FewTokensPerGroup(
  // positions) (matmul_input-inl.h; the last one may be smaller), each group
  // at token row t0 of the copy, with its m tokens interleaved per code
  // vector (vector c of token t0 + t at (c * m + t) * lanes of DecodeTag) and
  // per block (scale of block b at b * m + t).
  hwy::AlignedVector<int8_t> xq_groups;
  std::vector<float> xscale_groups;
  std::vector<float> xsum;        // rows: sum_b xscale * sum(xq in block)
  // Where the kernels' codes are biased (kCodeBias, lut_decode-inl.h), the
  // i32 values their block accumulators start from: kCodeBias times, per
  // token and block, the sum of xq over each i32 lane's quads (xcorr: rows x
  // num_blocks x i32 lanes of DecodeTag) and over the whole block (xqsum:
  // rows x num_blocks; the GEMM panel's lanes are rows). Empty otherwise.
  hwy::AlignedVector<int32_t> xcorr;
  std::vector<int32_t> xqsum;
  hwy::AlignedVector<float> xf;   // rows x positions (kF32)
  // A x per token (unscaled): token m's at m * rank (`lora`), or at
  // m * lora_ax_stride (token_lora; the largest of their ranks).
  std::vector<float> lora_ax;
  size_t lora_ax_stride = 0;
  std::vector<float> gather;      // one quantization block of f32 (kInt8 preparation)
  // The caller's bias and residual pointers (which must stay valid until the
  // row calls return); epilogue.lora and .token_lora are null: the kernels
  // read `lora` (one delta for every token) or `token_lora` (one per token,
  // rank 0 for none; empty when every token has the same), copies of the
  // caller's LoraDeltas (whose factors must stay valid likewise). has_lora:
  // some token has a delta.
  Epilogue epilogue;
  LoraDelta lora;
  std::vector<LoraDelta> token_lora;
  bool has_lora = false;
  const PreparedPalette* weights = nullptr;  // the matrix this was prepared for

  PreparedInput() = default;
  // Not copyable: the buffers are large and meant to be reused in place.
  PreparedInput(const PreparedInput&) = delete;
  PreparedInput& operator=(const PreparedInput&) = delete;
  PreparedInput(PreparedInput&&) = default;
  PreparedInput& operator=(PreparedInput&&) = default;
};

// Per-thread working memory of GemmRows (kernels/gemm-inl.h): decoded weight
// panels and their per-row affine factors. Pass one per thread (e.g. indexed
// by ParallelFor's thread argument) to make repeated calls allocation-free;
// buffers only grow. Without one, GemmRows allocates per call.
class GemmScratch {
 public:
  // An aligned array of at least n T in slot `slot` (< kSlots); contents are
  // unspecified. Grows (reallocates) only when n exceeds the slot's size.
  template <class T>
  T* Array(size_t slot, size_t n) {
    const size_t bytes = n * sizeof(T);
    if (bytes > size_[slot]) {
      buf_[slot] = hwy::AllocateAligned<uint8_t>(bytes);
      size_[slot] = buf_[slot] ? bytes : 0;
    }
    return reinterpret_cast<T*>(buf_[slot].get());
  }
  static constexpr size_t kSlots = 4;

 private:
  hwy::AlignedFreeUniquePtr<uint8_t[]> buf_[kSlots];
  size_t size_[kSlots] = {};
};

}  // namespace lutra

#endif  // LUTRA_MATMUL_H_
