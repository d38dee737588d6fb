// Plain C++ entry points to lutra kernels with dynamic dispatch.
//
// This is the pattern an engine uses to ship one binary for every CPU: the
// kernels are compiled once per Highway target in dispatch.cc (the only file
// that includes hwy/foreach_target.h), and each call below jumps to the best
// target of the running CPU. Callers include only this plain header.
//
// Layout conventions: matrices are row-major, sizes are in elements, a batch
// of M activation vectors of length K is M contiguous rows (M x K).
#ifndef LUTRA_EXAMPLES_DISPATCH_H_
#define LUTRA_EXAMPLES_DISPATCH_H_

#include <stddef.h>
#include <stdint.h>

#include "lutra/palette.h"

namespace lutra {
namespace dispatch {

// sum_i a[i] * b[i], see lutra/dot-inl.h.
float Dot(const float* a, const float* b, size_t num);

// y[r] = sum_c w[r * cols + c] * x[c] for r < rows: the f32 reference matvec
// (one Dot per row). TEMP: single-threaded until lutra/thread_pool.h lands.
void MatVecF32(const float* w, size_t rows, size_t cols, const float* x, float* y);

// Y (batch x rows) = X (batch x cols) * W^T, W rows x cols: the f32 GEMM
// used for prefill, built from Dot.
void MatMulF32(const float* w, size_t rows, size_t cols, const float* x,
               size_t batch, float* y);

// y (rows) = W x for a palettized W (docs/format.md): the decode GEMV.
// TEMP scalar (DequantizeRow + Dot) until lutra/gemv-inl.h lands.
void MatVecPalette(const PaletteView& w, const float* x, float* y);

// Y (batch x rows) = X (batch x cols) W^T for a palettized W: the prefill GEMM.
// TEMP scalar until lutra/gemm-inl.h lands.
void MatMulPalette(const PaletteView& w, const float* x, size_t batch, float* y);

// out (cols floats) = row r of a palettized W: the embedding lookup.
void DequantizeRow(const PaletteView& w, size_t r, float* out);

// out[i] = x[i] * weight[i] / sqrt(mean(x^2) + eps). out may alias x.
void RMSNorm(const float* x, const float* weight, size_t num, float eps, float* out);

// Rotates each of `num_heads` consecutive heads of `head_dim` floats in place
// by position `pos`: pairs (2i, 2i+1) by angle pos * theta^(-2i / head_dim),
// the llama2.c / GGUF "normal" RoPE layout.
void RoPE(float* vec, size_t num_heads, size_t head_dim, size_t pos, float theta);

// gate[i] = silu(gate[i]) * up[i]: the SwiGLU of the Llama FFN.
void SwiGLU(float* gate, const float* up, size_t num);

// x[i] += y[i]: residual connection.
void AddTo(float* x, const float* y, size_t num);

// In-place softmax over num values.
void Softmax(float* x, size_t num);

// Name of the Highway target these calls run on, e.g. "AVX3_ZEN4".
const char* TargetName();

}  // namespace dispatch
}  // namespace lutra

#endif  // LUTRA_EXAMPLES_DISPATCH_H_
