// Element types: the one home of lutra's storage types (f16, bf16, f32,
// int8) -- the enum, sizes, names and the scalar conversions to and from
// f32. Codebooks, LoRA factors, GGUF tensors and KV cache rows all convert
// through these functions; the SIMD loads and stores with the same results
// are in element-inl.h. (gemma.cpp calls this idea CompressTraits.)
//
// Conversion contract, the same for the scalar and the vector paths:
//  - widening to f32 is exact for every input (f16 subnormals included;
//    NaN stays NaN; element-inl.h notes Highway's one vector exception, f16
//    Inf/NaN on x86 targets without F16C);
//  - narrowing from f32 rounds to nearest, ties to even. IEEE narrowing
//    (F16BitsFromF32, and the vector stores) turns f16 overflow into +-Inf,
//    as a C cast does: GGUF tensors and KV cache rows store that. Storage
//    rounding (RoundToElementType, StoreElement), which codebooks and LoRA
//    factors use, saturates f16 at +-65504 instead, so that a stored weight
//    is never infinite. bf16 has f32's range and never saturates;
//  - int8 holds integers: narrowing rounds to nearest even and saturates to
//    [-128, 127]; a scale, where there is one, is the caller's (the KV cache
//    keeps one per row).
//
// Plain header: no Highway targets (hwy/base.h only: Highway's scalar f16/bf16
// rounding, which the vector stores of element-inl.h match bit for bit).
#ifndef LUTRA_BASE_ELEMENT_H_
#define LUTRA_BASE_ELEMENT_H_

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmath>

#include "hwy/base.h"

namespace lutra {

// Element type of codebook entries, LoRA factors and KV cache rows. Values
// are part of the file formats (docs/format.md). kI8 is only valid where
// a scale comes with it: the KV cache (codebooks and LoRA factors reject it,
// see IsFloatElement).
enum class ElementType : uint8_t {
  kF16 = 0,   // IEEE binary16
  kBF16 = 1,  // bfloat16: the top half of an f32
  kF32 = 2,
  kI8 = 3,    // int8 with a caller-kept scale
};

// Bytes of one element; 0 for a value outside the enum.
inline size_t ElementBytes(ElementType type) {
  switch (type) {
    case ElementType::kF16:
    case ElementType::kBF16:
      return 2;
    case ElementType::kF32:
      return 4;
    case ElementType::kI8:
      return 1;
  }
  return 0;
}

// True for f16, bf16 and f32: the types that hold values on their own
// (codebooks and LoRA factors accept only these).
inline bool IsFloatElement(ElementType type) {
  return type == ElementType::kF16 || type == ElementType::kBF16 ||
         type == ElementType::kF32;
}

// "f16", "bf16", "f32", "int8"; "invalid" outside the enum.
inline const char* ElementTypeName(ElementType type) {
  switch (type) {
    case ElementType::kF16:
      return "f16";
    case ElementType::kBF16:
      return "bf16";
    case ElementType::kF32:
      return "f32";
    case ElementType::kI8:
      return "int8";
  }
  return "invalid";
}

// The inverse of ElementTypeName: sets *type and returns true for "f16",
// "bf16", "f32" or "int8", else returns false.
inline bool ElementTypeFromName(const char* name, ElementType* type) {
  static constexpr ElementType kAll[] = {ElementType::kF16, ElementType::kBF16,
                                         ElementType::kF32, ElementType::kI8};
  for (ElementType t : kAll) {
    if (strcmp(name, ElementTypeName(t)) == 0) {
      *type = t;
      return true;
    }
  }
  return false;
}

// ---------------------------------------------------------------------------
// Widening: exact.

// IEEE binary16 bits -> f32, exact for every input (subnormals, inf, NaN
// payloads). Branch-free bit arithmetic instead of hwy::F32FromF16, whose
// portable path costs ~14 ns per value without F16C: this one is ~1 ns and
// auto-vectorizes, which matters when a multi-GB f16 model is converted on
// load. Exponent and mantissa move to f32 positions and a multiply by 2^112
// rebiases the exponent (15 -> 127), which also normalizes f16 subnormals
// exactly; all-ones exponents (inf/NaN) are patched separately.
inline float F32FromF16Bits(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;
  float magnitude;
  const uint32_t shifted = em << 13;
  memcpy(&magnitude, &shifted, 4);
  magnitude *= 5.192296858534828e33f;  // 2^112
  uint32_t bits;
  memcpy(&bits, &magnitude, 4);
  if (em >= 0x7C00u) bits = shifted | 0x7F800000u;  // inf, NaN (payload kept)
  bits |= sign;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// bfloat16 bits -> f32 (exact: bf16 is the top half of an f32).
inline float F32FromBF16Bits(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// ---------------------------------------------------------------------------
// Narrowing: round to nearest even.

// f32 -> IEEE binary16 bits; beyond +-65504 (after rounding) becomes +-Inf,
// NaN stays NaN. The same bits as the vector stores (element-inl.h).
inline uint16_t F16BitsFromF32(float v) {
  return hwy::BitCastScalar<uint16_t>(hwy::F16FromF32(v));
}

// f32 -> bfloat16 bits; NaN stays NaN.
inline uint16_t BF16BitsFromF32(float v) {
  return hwy::BitCastScalar<uint16_t>(hwy::BF16FromF32(v));
}

// v clamped to f16's finite range [-65504, 65504]; NaN stays NaN.
inline float SaturateToF16(float v) {
  if (v > 65504.0f) return 65504.0f;
  if (v < -65504.0f) return -65504.0f;
  return v;
}

// v rounded to nearest even and saturated to [-128, 127]; NaN becomes 0.
inline int8_t I8FromF32(float v) {
  if (!(v == v)) return 0;
  const float r = std::nearbyint(v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v));
  return static_cast<int8_t>(r);
}

// Storage rounding: v rounded to the nearest value representable in `type`
// and returned as f32, exactly what StoreElement stores. f16 saturates at
// +-65504 (see the contract above); int8 rounds to an integer in
// [-128, 127]. NaN stays NaN (int8: 0).
inline float RoundToElementType(float v, ElementType type) {
  switch (type) {
    case ElementType::kF16:
      return F32FromF16Bits(F16BitsFromF32(SaturateToF16(v)));
    case ElementType::kBF16:
      return F32FromBF16Bits(BF16BitsFromF32(v));
    case ElementType::kF32:
      return v;
    case ElementType::kI8:
      return static_cast<float>(I8FromF32(v));
  }
  return v;
}

// ---------------------------------------------------------------------------
// Elements of arrays. `data` needs no alignment (memcpy), so it may point
// into an mmap.

// Element i of an array of `type` as f32: a codebook entry (flat index
// g * 2^b + e), a LoRA factor element, a KV cache element (int8: the integer,
// unscaled). 0 for a type outside the enum.
inline float LoadElement(const void* data, ElementType type, size_t i) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  switch (type) {
    case ElementType::kF16:
    case ElementType::kBF16: {
      uint16_t bits16;
      memcpy(&bits16, p + 2 * i, 2);
      return type == ElementType::kF16 ? F32FromF16Bits(bits16) : F32FromBF16Bits(bits16);
    }
    case ElementType::kF32: {
      float f;
      memcpy(&f, p + 4 * i, 4);
      return f;
    }
    case ElementType::kI8:
      return static_cast<float>(static_cast<int8_t>(p[i]));
  }
  return 0.0f;
}

// Writes element i of an array of `type`: v with storage rounding
// (RoundToElementType; f16 saturates). Nothing for a type outside the enum.
inline void StoreElement(void* data, ElementType type, size_t i, float v) {
  uint8_t* p = static_cast<uint8_t*>(data);
  switch (type) {
    case ElementType::kF16:
    case ElementType::kBF16: {
      const uint16_t bits16 = type == ElementType::kF16 ? F16BitsFromF32(SaturateToF16(v))
                                                        : BF16BitsFromF32(v);
      memcpy(p + 2 * i, &bits16, 2);
      return;
    }
    case ElementType::kF32:
      memcpy(p + 4 * i, &v, 4);
      return;
    case ElementType::kI8:
      p[i] = static_cast<uint8_t>(I8FromF32(v));
      return;
  }
}

}  // namespace lutra

#endif  // LUTRA_BASE_ELEMENT_H_
