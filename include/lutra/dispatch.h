// Plain C++ entry points to lutra kernels with dynamic dispatch: the
// lutra::dispatch library (CMake target lutra::dispatch, built from
// src/dispatch.cc).
//
// An engine that ships one binary for every CPU links lutra::dispatch and
// includes only this plain header: no Highway macros, no per-target code of
// its own. The kernels are compiled once per Highway target in
// src/dispatch.cc (the only file that includes hwy/foreach_target.h), and
// each call below jumps to the best target of the running CPU, chosen on the
// first call. CMake options: LUTRA_DISPATCH_DISABLED_TARGETS and
// LUTRA_DISPATCH_COMPILE_OPTIONS pick the targets compiled,
// LUTRA_BITS / LUTRA_PRECISIONS the kernels instantiated (README).
// For a matmul that owns its weights and scratch, see lutra/linear.h.
//
// Layout conventions: matrices are row-major, sizes are in elements, a batch
// of M activation vectors of length K is M contiguous rows (M x K).
#ifndef LUTRA_DISPATCH_H_
#define LUTRA_DISPATCH_H_

#include <stddef.h>
#include <stdint.h>

#include "lutra/base/status.h"
#include "lutra/base/thread_pool.h"
#include "lutra/format/llama_model.h"  // RopeLayout
#include "lutra/format/palette.h"
#include "lutra/kernels/kv_cache.h"
#include "lutra/kernels/matmul.h"
#include "lutra/quantize/palettize.h"

namespace lutra {
namespace dispatch {

// sum_i a[i] * b[i], see lutra/kernels/dot-inl.h.
float Dot(const float* a, const float* b, size_t num);

// y[r] = sum_c w[r * cols + c] * x[c] for r < rows: the f32 reference
// matvec, one lutra Dot per row, rows split over `pool` (may be null).
void MatVecF32(const float* w, size_t rows, size_t cols, const float* x, float* y,
               ThreadPool* pool);

// Y (batch x rows) = X (batch x cols) W^T, W rows x cols: the f32 GEMM for
// prefill, built from Dot (each weight row is read once for all tokens).
void MatMulF32(const float* w, size_t rows, size_t cols, const float* x, size_t batch,
               float* y, ThreadPool* pool);

// y (rows) = W x [+ lora] for a palettized W: the decode GEMV
// (lutra/kernels/gemv-inl.h). scratch is reused between calls (one per caller).
Status Gemv(const PreparedPalette& w, const float* x, const LoraDelta* lora,
            MatmulPrecision precision, float* y, ThreadPool* pool, PreparedInput* scratch);

// Y (batch x rows) = X (batch x cols) W^T [+ lora]: the prefill GEMM
// (lutra/kernels/gemm-inl.h).
Status Gemm(const PreparedPalette& w, const float* x, size_t batch, const LoraDelta* lora,
            MatmulPrecision precision, float* y, ThreadPool* pool, PreparedInput* scratch);

// Gemm with a LoRA delta per token: token m's is token_lora[m] (null: none;
// `batch` entries; lutra/kernels/matmul.h Epilogue::token_lora). Each token's
// row is its Gemm with that delta alone (bit for bit up to kGemmSmallM
// tokens), in one pass over W: batched decoding of sequences with different
// adapters.
Status GemmPerTokenLora(const PreparedPalette& w, const float* x, size_t batch,
                        const LoraDelta* const* token_lora, MatmulPrecision precision, float* y,
                        ThreadPool* pool, PreparedInput* scratch);

// One matrix of a GemmGroup: Y (batch x w->shape().rows) = X W^T [+ lora],
// its input prepared into *in (kept by the caller and reused between calls).
// token_lora instead of lora: a delta per token, as in GemmPerTokenLora.
struct GroupJob {
  const PreparedPalette* w = nullptr;
  const LoraDelta* lora = nullptr;  // may be null
  float* y = nullptr;
  PreparedInput* in = nullptr;
  const LoraDelta* const* token_lora = nullptr;  // batch entries, or null
};

// Several matmuls that read the same X (batch x cols): q/k/v, or gate/up.
// Each job's input is prepared once, then ONE parallel region over `pool`
// gives every thread an aligned, equal slice of every job's rows, so the
// pool wakes once instead of num_jobs times (issue 17: a decode step paid
// 7 wake-ups per layer). Each job's Y is bitwise equal to its own Gemv
// (batch = 1) or Gemm call: the kernels' results do not depend on the row
// split. scratch: one GemmScratch per pool thread, for batch > 1 (null:
// allocated per call). All jobs must have X's cols.
Status GemmGroup(const GroupJob* jobs, size_t num_jobs, const float* x, size_t batch,
                 MatmulPrecision precision, ThreadPool* pool, GemmScratch* scratch);

// The two steps of Gemv/Gemm, for engines that split rows over their own
// threads (lutra/kernels/matmul.h "Call sequence"; lutra/linear.h wraps
// them). PrepareGemm prepares M token rows X (row m at X + m * ldx) with the
// epilogue into *in, once per call; then GemvRows (M = 1) or GemmRows fill
// output channels [n0, n1) of Y (M x N at ldy floats per token), from any
// number of threads with disjoint ranges. GemmRows takes one GemmScratch per
// thread (null: allocated per call). Ranges starting at multiples of
// GemvRangeAlignment() / GemmRangeAlignment() are fastest (any range is
// correct).
Status PrepareGemm(const PreparedPalette& w, const float* X, size_t M, size_t ldx,
                   const Epilogue& epilogue, const MatmulOptions& options, PreparedInput* in);
Status GemvRows(const PreparedPalette& w, const PreparedInput& in, size_t n0, size_t n1,
                float* y);
Status GemmRows(const PreparedPalette& w, const PreparedInput& in, size_t n0, size_t n1,
                float* Y, size_t ldy, GemmScratch* scratch);
// 4: GemvRows walks rows in blocks of 4.
size_t GemvRangeAlignment();
// Output channels per GEMM panel on the active target (2 f32 vectors).
size_t GemmRangeAlignment();

// Palettizing and dequantizing are plain code (lutra/quantize/palettize.h,
// lutra/format/palette.h): the same on every target.
using ::lutra::Palettize;

// Y (batch x rows) += lora.scale * B (A X) for f32 weights, whose matvec has
// no fused epilogue: A is rank x cols, B rows x rank (f32/f16/bf16), ax is
// scratch of lora.rank floats. The palettized kernels' epilogue
// (lutra/kernels/epilogue-inl.h), so it rounds as they do.
void LoraApply(const LoraDelta& lora, const float* x, size_t batch, size_t rows, size_t cols,
               float* ax, float* y);

// out (cols floats) = row r of a palettized W: the embedding lookup.
void DequantizeRow(const PaletteView& w, size_t r, float* out);

// out[i] = x[i] * weight[i] / sqrt(mean(x^2) + eps). out may alias x.
// lutra/kernels/ops-inl.h RMSNorm.
void RMSNorm(const float* x, const float* weight, size_t num, float eps, float* out);

// Rotates x (num_tokens x num_heads x head_dim, in place) for positions
// first_pos..: pair p of each head turns by pos * inv_freq[p] (head_dim / 2
// values, lutra::RopeInverseFrequencies), the pairs laid out as `layout`
// says (adjacent: llama2.c / GGUF "llama"; half-split: GGUF "qwen2").
// lutra/kernels/ops-inl.h RoPE.
Status RoPE(float* x, size_t num_tokens, size_t num_heads, size_t head_dim, size_t first_pos,
            const double* inv_freq, RopeLayout layout);

// out[i] = silu(gate[i]) * up[i]; out may alias gate. lutra/kernels/ops-inl.h SwiGLU.
void SwiGLU(const float* gate, const float* up, size_t num, float* out);

// x[i] += y[i]: residual connection. lutra/kernels/ops-inl.h AddInPlace.
void AddTo(float* x, const float* y, size_t num);

// In-place softmax over num values. lutra/kernels/ops-inl.h Softmax.
void Softmax(float* x, size_t num);

// Appends K/V rows (num_tokens x kv_heads x head_dim f32 each) at positions
// pos.. of `layer`; pos must be cache.end(layer). lutra/kernels/kv_cache-inl.h.
Status AppendKV(KVCache& cache, size_t layer, size_t pos, size_t num_tokens, const float* k,
                const float* v);

// Causal GQA attention of num_tokens queries (num_tokens x num_heads x
// head_dim) at positions pos.. over the cache; out has q's shape. pool (may
// be null) splits the context (decode) or the heads x query tiles (prefill)
// over its threads; the result does not depend on it.
// lutra/kernels/attention-inl.h Attention.
Status Attention(const KVCache& cache, size_t layer, size_t pos, size_t num_tokens,
                 const float* q, size_t num_heads, float* out, ThreadPool* pool = nullptr);

// Name of the Highway target these calls run on, e.g. "AVX3_ZEN4": the
// best of the targets compiled into the library that the CPU supports.
const char* ActiveTarget();
// The same (the name the example engine has always used).
const char* TargetName();

}  // namespace dispatch
}  // namespace lutra

#endif  // LUTRA_DISPATCH_H_
