// Per-token elementwise and row operations of a Llama-style transformer
// besides the matrix products: RMSNorm, rotary position embedding (RoPE),
// SwiGLU, softmax, residual add / scale, and the vectorized exp they share
// with attention-inl.h.
//
// Per-target code: include after hwy/highway.h (and, for dynamic dispatch,
// from a .cc that includes hwy/foreach_target.h). All sizes are in elements;
// no pointer needs alignment. Unless stated otherwise `out` may alias an
// input (the kernels read each vector before writing it), so in-place use
// such as RMSNorm(x, w, n, eps, x) is allowed.

// Plain (target-independent) declarations: defined once, outside the
// per-target re-inclusion guard, so that every target and plain callers
// (dispatch wrappers) share one RopeMode type.
#ifndef LUTRA_OPS_PLAIN_TYPES_H_
#define LUTRA_OPS_PLAIN_TYPES_H_
#include <stddef.h>
namespace lutra {

// Which elements of a head form the rotated pairs (i.e. the checkpoint's
// q/k weight row order). Pair p (p < head_dim / 2) rotates by the angle
// pos * base^(-2p / head_dim) in both modes.
//  kAdjacent: pairs (2p, 2p + 1). llama2.c's run.c (`rope` loop over
//    i += 2, freq = 1 / 10000^(head_dim_i / head_size)), Meta's original
//    Llama (complex view of adjacent pairs), and GGUF "llama" models as
//    written by llama.cpp's converter (it permutes q/k rows of HF checkpoints
//    back to this order; llama.cpp calls it LLAMA_ROPE_TYPE_NORM).
//  kNeoX: pairs (p, p + head_dim / 2). HF transformers' rotate_half, GPT-NeoX,
//    and GGUF archs with LLAMA_ROPE_TYPE_NEOX (e.g. qwen2, phi3, gemma).
enum class RopeMode { kAdjacent = 0, kNeoX = 1 };

// Largest head_dim RoPE accepts: its cos/sin tables live on the stack.
constexpr size_t kRopeMaxHeadDim = 1024;

}  // namespace lutra
#endif  // LUTRA_OPS_PLAIN_TYPES_H_

// Re-inclusion guard: once per target when foreach_target.h is used.
#if defined(LUTRA_OPS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LUTRA_OPS_INL_H_
#undef LUTRA_OPS_INL_H_
#else
#define LUTRA_OPS_INL_H_
#endif

#include <stddef.h>

#include <cmath>

#include "hwy/highway.h"
#include "lutra/base/status.h"

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// ---------------------------------------------------------------------------
// Exp

// e^x per lane, relative error < 2 ulp over the whole float range.
// x < -87.3 returns exactly 0 (so masked attention scores of -inf or -1e30
// contribute nothing) and x > 88.3 saturates to e^88.3 ~ 2.2e38 (finite, so
// silu(-100) = -100 / (1 + e^100) stays a tiny number instead of NaN).
// Cephes-style: x = n ln2 + r with |r| <= ln2/2, e^r by a degree-6
// polynomial, 2^n by writing n into the exponent field.
template <class DF, class V = hn::Vec<DF>>
HWY_INLINE V Exp(DF df, V x) {
  const hn::RebindToSigned<DF> di;
  const V kLo = hn::Set(df, -87.3f);
  const V kHi = hn::Set(df, 88.3f);
  const auto underflow = hn::Lt(x, kLo);
  x = hn::Min(hn::Max(x, kLo), kHi);
  const V n = hn::Round(hn::Mul(x, hn::Set(df, 1.44269504088896341f)));
  // ln2 split in a part exact in float (few mantissa bits) and the rest, so
  // that x - n * ln2 loses no precision.
  V r = hn::NegMulAdd(n, hn::Set(df, 0.693359375f), x);
  r = hn::NegMulAdd(n, hn::Set(df, -2.12194440e-4f), r);
  V p = hn::Set(df, 1.9875691500e-4f);
  p = hn::MulAdd(p, r, hn::Set(df, 1.3981999507e-3f));
  p = hn::MulAdd(p, r, hn::Set(df, 8.3334519073e-3f));
  p = hn::MulAdd(p, r, hn::Set(df, 4.1665795894e-2f));
  p = hn::MulAdd(p, r, hn::Set(df, 1.6666665459e-1f));
  p = hn::MulAdd(p, r, hn::Set(df, 5.0000001201e-1f));
  p = hn::MulAdd(p, hn::Mul(r, r), hn::Add(r, hn::Set(df, 1.0f)));
  // n is in [-126, 127], so n + 127 is a valid biased exponent.
  const auto bits = hn::ShiftLeft<23>(
      hn::Add(hn::ConvertTo(di, n), hn::Set(di, 127)));
  const V result = hn::Mul(p, hn::BitCast(df, bits));
  return hn::IfThenZeroElse(underflow, result);
}

// ---------------------------------------------------------------------------
// RMSNorm

// out[i] = x[i] * weight[i] / sqrt(mean_j(x[j]^2) + eps), i < size.
// x, weight, out: `size` floats; out may alias x (in-place normalization of
// the residual stream's copy). The sum of squares is accumulated in f32 with
// two vector accumulators: for the model widths of interest (<= 16K) the
// relative error of the mean stays ~size * eps_f32, far below the bf16/f16
// precision of the weights it feeds.
template <class DF>
HWY_INLINE void RMSNorm(DF df, const float* x, const float* weight, size_t size,
                        float eps, float* out) {
  using V = hn::Vec<DF>;
  const size_t N = hn::Lanes(df);
  V sum0 = hn::Zero(df), sum1 = hn::Zero(df);
  size_t i = 0;
  for (; i + 2 * N <= size; i += 2 * N) {
    const V a = hn::LoadU(df, x + i), b = hn::LoadU(df, x + i + N);
    sum0 = hn::MulAdd(a, a, sum0);
    sum1 = hn::MulAdd(b, b, sum1);
  }
  for (; i < size; i += N) {
    const V a = hn::LoadN(df, x + i, size - i);  // zero past the end
    sum0 = hn::MulAdd(a, a, sum0);
  }
  const float ss = hn::ReduceSum(df, hn::Add(sum0, sum1));
  const float mean = size == 0 ? 0.0f : ss / static_cast<float>(size);
  const V inv = hn::Set(df, 1.0f / std::sqrt(mean + eps));
  for (i = 0; i + N <= size; i += N) {
    const V w = hn::LoadU(df, weight + i);
    hn::StoreU(hn::Mul(hn::Mul(hn::LoadU(df, x + i), inv), w), df, out + i);
  }
  if (i < size) {
    const size_t rem = size - i;
    const V w = hn::LoadN(df, weight + i, rem);
    hn::StoreN(hn::Mul(hn::Mul(hn::LoadN(df, x + i, rem), inv), w), df, out + i,
               rem);
  }
}

HWY_INLINE void RMSNorm(const float* x, const float* weight, size_t size,
                        float eps, float* out) {
  RMSNorm(hn::ScalableTag<float>(), x, weight, size, eps, out);
}

// ---------------------------------------------------------------------------
// RoPE

// Rotates x[t][h][:] (num_tokens x num_heads x head_dim floats, row-major,
// in place) for absolute positions first_pos + t: pair p (p < head_dim / 2,
// laid out as `mode` says) turns by the angle (first_pos + t) * inv_freq[p].
// Use it for q (num_heads) and k (num_kv_heads) separately; decode is
// num_tokens = 1. inv_freq (head_dim / 2 values) is where a model's RoPE
// variant lives: base^(-2p / head_dim) for plain RoPE, divided by Llama 3's
// per-pair factors or a linear scaling factor (see RopeInverseFrequencies in
// lutra/format/llama_model.h).
// The angle is computed in double: at pos ~ 8K an f32 angle would already be
// off by ~5e-4 rad. cos/sin are computed once per token and shared by all
// heads, then applied with vector FMAs.
// Errors: head_dim odd, zero or > kRopeMaxHeadDim; an inv_freq value that is
// negative or not finite.
template <class DF>
HWY_INLINE Status RoPE(DF df, float* HWY_RESTRICT x, size_t num_tokens,
                       size_t num_heads, size_t head_dim, size_t first_pos,
                       const double* HWY_RESTRICT inv_freq, RopeMode mode) {
  if (head_dim == 0 || head_dim % 2 != 0 || head_dim > kRopeMaxHeadDim) {
    return InvalidArgument("RoPE: head_dim = %zu, need an even value in [2, %zu]",
                           head_dim, kRopeMaxHeadDim);
  }
  const size_t half = head_dim / 2;
  for (size_t p = 0; p < half; ++p) {
    if (!(inv_freq[p] >= 0.0 && inv_freq[p] < HUGE_VAL)) {
      return InvalidArgument("RoPE: inv_freq[%zu] = %g, need a finite value >= 0", p,
                             inv_freq[p]);
    }
  }
  using V = hn::Vec<DF>;
  const size_t N = hn::Lanes(df);
  // kAdjacent: per-lane tables c[2p] = c[2p+1] = cos, s[2p] = -sin,
  // s[2p+1] = +sin, so out = x * c + Reverse2(x) * s.
  // kNeoX: c[p] = cos, s[p] = sin for p < half.
  HWY_ALIGN float c[kRopeMaxHeadDim];
  HWY_ALIGN float s[kRopeMaxHeadDim];
  for (size_t t = 0; t < num_tokens; ++t) {
    const double pos = static_cast<double>(first_pos + t);
    for (size_t p = 0; p < half; ++p) {
      const double angle = pos * inv_freq[p];
      const float cs = static_cast<float>(std::cos(angle));
      const float sn = static_cast<float>(std::sin(angle));
      if (mode == RopeMode::kAdjacent) {
        c[2 * p] = c[2 * p + 1] = cs;
        s[2 * p] = -sn;
        s[2 * p + 1] = sn;
      } else {
        c[p] = cs;
        s[p] = sn;
      }
    }
    float* row = x + t * num_heads * head_dim;
    for (size_t h = 0; h < num_heads; ++h) {
      float* v = row + h * head_dim;
      if (mode == RopeMode::kAdjacent) {
        // Vectors hold whole pairs because N and head_dim are even; a tail
        // of LoadN also ends on a pair boundary (head_dim - i is even).
        for (size_t i = 0; i < head_dim; i += N) {
          const size_t n = HWY_MIN(N, head_dim - i);
          const V xv = hn::LoadN(df, v + i, n);
          const V r = hn::MulAdd(xv, hn::LoadN(df, c + i, n),
                                 hn::Mul(hn::Reverse2(df, xv), hn::LoadN(df, s + i, n)));
          hn::StoreN(r, df, v + i, n);
        }
      } else {
        for (size_t i = 0; i < half; i += N) {
          const size_t n = HWY_MIN(N, half - i);
          const V x0 = hn::LoadN(df, v + i, n);
          const V x1 = hn::LoadN(df, v + half + i, n);
          const V cv = hn::LoadN(df, c + i, n);
          const V sv = hn::LoadN(df, s + i, n);
          hn::StoreN(hn::NegMulAdd(x1, sv, hn::Mul(x0, cv)), df, v + i, n);
          hn::StoreN(hn::MulAdd(x0, sv, hn::Mul(x1, cv)), df, v + half + i, n);
        }
      }
    }
  }
  return Status();
}

// Plain RoPE with `base` (10000 for Llama 1/2 and llama2.c, 500000 for
// Llama 3): inv_freq[p] = base^(-2p / head_dim), in double.
// Errors: as above, and base <= 0.
template <class DF>
HWY_INLINE Status RoPE(DF df, float* HWY_RESTRICT x, size_t num_tokens,
                       size_t num_heads, size_t head_dim, size_t first_pos,
                       float base, RopeMode mode) {
  if (head_dim == 0 || head_dim % 2 != 0 || head_dim > kRopeMaxHeadDim) {
    return InvalidArgument("RoPE: head_dim = %zu, need an even value in [2, %zu]",
                           head_dim, kRopeMaxHeadDim);
  }
  if (!(base > 0.0f)) {
    return InvalidArgument("RoPE: base = %g, need base > 0", double(base));
  }
  double inv_freq[kRopeMaxHeadDim / 2];
  for (size_t p = 0; p < head_dim / 2; ++p) {
    inv_freq[p] = std::pow(static_cast<double>(base),
                           -2.0 * static_cast<double>(p) / static_cast<double>(head_dim));
  }
  return RoPE(df, x, num_tokens, num_heads, head_dim, first_pos, inv_freq, mode);
}

HWY_INLINE Status RoPE(float* HWY_RESTRICT x, size_t num_tokens, size_t num_heads,
                       size_t head_dim, size_t first_pos, float base,
                       RopeMode mode) {
  return RoPE(hn::ScalableTag<float>(), x, num_tokens, num_heads, head_dim,
              first_pos, base, mode);
}
HWY_INLINE Status RoPE(float* HWY_RESTRICT x, size_t num_tokens, size_t num_heads,
                       size_t head_dim, size_t first_pos,
                       const double* HWY_RESTRICT inv_freq, RopeMode mode) {
  return RoPE(hn::ScalableTag<float>(), x, num_tokens, num_heads, head_dim,
              first_pos, inv_freq, mode);
}

// ---------------------------------------------------------------------------
// SwiGLU

// out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + e^-gate[i]) * up[i].
// gate, up, out: `size` floats (the FFN hidden width); out may alias gate or
// up. Relative error a few ulp (Exp plus one division).
template <class DF>
HWY_INLINE void SwiGLU(DF df, const float* gate, const float* up, size_t size,
                       float* out) {
  using V = hn::Vec<DF>;
  const size_t N = hn::Lanes(df);
  const V one = hn::Set(df, 1.0f);
  for (size_t i = 0; i < size; i += N) {
    const size_t n = HWY_MIN(N, size - i);
    const V g = hn::LoadN(df, gate + i, n);
    const V u = hn::LoadN(df, up + i, n);
    const V silu = hn::Div(g, hn::Add(one, Exp(df, hn::Neg(g))));
    hn::StoreN(hn::Mul(silu, u), df, out + i, n);
  }
}

HWY_INLINE void SwiGLU(const float* gate, const float* up, size_t size,
                       float* out) {
  SwiGLU(hn::ScalableTag<float>(), gate, up, size, out);
}

// ---------------------------------------------------------------------------
// Softmax

// x[i] = e^(x[i] - max) / sum_j e^(x[j] - max), in place, i < size.
// Subtracting the max keeps every exponent <= 0 (no overflow); the sum is
// >= 1 (the max's own term), so the division is safe. size 0 does nothing.
// Returns nothing else; -inf entries become 0 (masking), NaN propagates.
template <class DF>
HWY_INLINE void Softmax(DF df, float* HWY_RESTRICT x, size_t size) {
  if (size == 0) return;
  using V = hn::Vec<DF>;
  const size_t N = hn::Lanes(df);
  V vmax = hn::Set(df, -HUGE_VALF);
  size_t i = 0;
  for (; i + N <= size; i += N) vmax = hn::Max(vmax, hn::LoadU(df, x + i));
  float mx = hn::ReduceMax(df, vmax);
  for (; i < size; ++i) mx = HWY_MAX(mx, x[i]);
  const V m = hn::Set(df, mx);
  V sum = hn::Zero(df);
  for (i = 0; i < size; i += N) {
    const size_t n = HWY_MIN(N, size - i);
    // Lanes past the end would be e^(0 - max) != 0: zero them explicitly.
    const V e = hn::IfThenElseZero(hn::FirstN(df, n),
                                   Exp(df, hn::Sub(hn::LoadN(df, x + i, n), m)));
    sum = hn::Add(sum, e);
    hn::StoreN(e, df, x + i, n);
  }
  const V inv = hn::Set(df, 1.0f / hn::ReduceSum(df, sum));
  for (i = 0; i < size; i += N) {
    const size_t n = HWY_MIN(N, size - i);
    hn::StoreN(hn::Mul(hn::LoadN(df, x + i, n), inv), df, x + i, n);
  }
}

HWY_INLINE void Softmax(float* HWY_RESTRICT x, size_t size) {
  Softmax(hn::ScalableTag<float>(), x, size);
}

// ---------------------------------------------------------------------------
// Residual helpers

// x[i] += y[i] (residual connection). x and y: `size` floats, may not alias.
template <class DF>
HWY_INLINE void AddInPlace(DF df, float* HWY_RESTRICT x,
                           const float* HWY_RESTRICT y, size_t size) {
  const size_t N = hn::Lanes(df);
  for (size_t i = 0; i < size; i += N) {
    const size_t n = HWY_MIN(N, size - i);
    hn::StoreN(hn::Add(hn::LoadN(df, x + i, n), hn::LoadN(df, y + i, n)), df,
               x + i, n);
  }
}
HWY_INLINE void AddInPlace(float* HWY_RESTRICT x, const float* HWY_RESTRICT y,
                           size_t size) {
  AddInPlace(hn::ScalableTag<float>(), x, y, size);
}

// x[i] *= scale.
template <class DF>
HWY_INLINE void ScaleInPlace(DF df, float* HWY_RESTRICT x, float scale,
                             size_t size) {
  const size_t N = hn::Lanes(df);
  const hn::Vec<DF> s = hn::Set(df, scale);
  for (size_t i = 0; i < size; i += N) {
    const size_t n = HWY_MIN(N, size - i);
    hn::StoreN(hn::Mul(hn::LoadN(df, x + i, n), s), df, x + i, n);
  }
}
HWY_INLINE void ScaleInPlace(float* HWY_RESTRICT x, float scale, size_t size) {
  ScaleInPlace(hn::ScalableTag<float>(), x, scale, size);
}

}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#endif  // LUTRA_OPS_INL_H_
