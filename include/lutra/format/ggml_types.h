// ggml tensor element types, as GGUF files store them: the type ids, their
// block layouts (GgmlTypeInfo), the mapping to lutra's ElementType, and the
// conversion of a run of elements to f32 (ConvertToF32), i.e. the
// dequantization of llama.cpp's block formats.
//
// One home for what a type id means, so that the GGUF reader (gguf.h), the
// writer (gguf_writer.h) and the model loaders agree, and a newly supported
// quantization touches this file only. A quantized row is a whole number of
// blocks: `type_size` bytes hold `block_size` consecutive elements.
//
// Plain header: no Highway targets, no exceptions.
#ifndef LUTRA_FORMAT_GGML_TYPES_H_
#define LUTRA_FORMAT_GGML_TYPES_H_

#include <stddef.h>
#include <stdint.h>

#include <cstring>

#include "lutra/base/element.h"
#include "lutra/base/status.h"

namespace lutra {

// Tensor element types (ggml_type ids as stored in GGUF).
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kIQ2_XXS = 16,
  kIQ2_XS = 17,
  kIQ3_XXS = 18,
  kIQ1_S = 19,
  kIQ4_NL = 20,
  kIQ3_S = 21,
  kIQ2_S = 22,
  kIQ4_XS = 23,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kIQ1_M = 29,
  kBF16 = 30,
  kTQ1_0 = 34,
  kTQ2_0 = 35,
  kMXFP4 = 39,
};

// Name and storage of a ggml type: `type_size` bytes hold `block_size`
// consecutive elements of a row (rows are whole blocks).
struct GgmlTypeInfo {
  const char* name;
  uint32_t block_size = 0;
  uint32_t type_size = 0;
  bool to_f32;  // ConvertToF32 supports it
};

// Returns nullptr for ids that no ggml version defines (or that were removed,
// like the 31..33 and 36..38 repacked layouts, which never appear in files).
inline const GgmlTypeInfo* GetGgmlTypeInfo(uint32_t type) {
  static const GgmlTypeInfo kInfos[] = {
      {"f32", 1, 4, true},        {"f16", 1, 2, true},       {"q4_0", 32, 18, true},
      {"q4_1", 32, 20, true},     {nullptr, 0, 0, false},    {nullptr, 0, 0, false},
      {"q5_0", 32, 22, false},    {"q5_1", 32, 24, false},   {"q8_0", 32, 34, true},
      {"q8_1", 32, 36, false},    {"q2_K", 256, 84, false},  {"q3_K", 256, 110, false},
      {"q4_K", 256, 144, false},  {"q5_K", 256, 176, false}, {"q6_K", 256, 210, false},
      {"q8_K", 256, 292, false},  {"iq2_xxs", 256, 66, false}, {"iq2_xs", 256, 74, false},
      {"iq3_xxs", 256, 98, false}, {"iq1_s", 256, 50, false}, {"iq4_nl", 32, 18, false},
      {"iq3_s", 256, 110, false}, {"iq2_s", 256, 82, false}, {"iq4_xs", 256, 136, false},
      {"i8", 1, 1, false},        {"i16", 1, 2, false},      {"i32", 1, 4, false},
      {"i64", 1, 8, false},       {"f64", 1, 8, true},       {"iq1_m", 256, 56, false},
      {"bf16", 1, 2, true},       {nullptr, 0, 0, false},    {nullptr, 0, 0, false},
      {nullptr, 0, 0, false},     {"tq1_0", 256, 54, false}, {"tq2_0", 256, 66, false},
      {nullptr, 0, 0, false},     {nullptr, 0, 0, false},    {nullptr, 0, 0, false},
      {"mxfp4", 32, 17, false},
  };
  if (type >= sizeof(kInfos) / sizeof(kInfos[0]) || kInfos[type].name == nullptr) {
    return nullptr;
  }
  return &kInfos[type];
}

inline const char* GgmlTypeName(uint32_t type) {
  const GgmlTypeInfo* info = GetGgmlTypeInfo(type);
  return info ? info->name : "unknown";
}

// The ggml type id (as GGUF stores it) of an ElementType: f32, f16, bf16, i8.
inline uint32_t ElementTypeToGgml(ElementType t) {
  switch (t) {
    case ElementType::kF16:
      return static_cast<uint32_t>(GgmlType::kF16);
    case ElementType::kBF16:
      return static_cast<uint32_t>(GgmlType::kBF16);
    case ElementType::kI8:
      return static_cast<uint32_t>(GgmlType::kI8);
    case ElementType::kF32:
      break;
  }
  return static_cast<uint32_t>(GgmlType::kF32);
}

// The ElementType of ggml type `ggml` into *t; false for the types that are
// not one (quantized blocks, f64, wider integers, unknown ids).
inline bool GgmlToElementType(uint32_t ggml, ElementType* t) {
  switch (static_cast<GgmlType>(ggml)) {
    case GgmlType::kF32: *t = ElementType::kF32; return true;
    case GgmlType::kF16: *t = ElementType::kF16; return true;
    case GgmlType::kBF16: *t = ElementType::kBF16; return true;
    case GgmlType::kI8: *t = ElementType::kI8; return true;
    default: return false;
  }
}

namespace ggml_internal {

// Little-endian u16 at p (unaligned).
inline uint16_t LoadU16(const uint8_t* p) {
  uint16_t v = 0;
  std::memcpy(&v, p, 2);
  return v;
}

}  // namespace ggml_internal

// Converts `n` elements stored as ggml `type` at `src` (unaligned ok) to f32.
// n must be a multiple of the type's block size. Unimplemented for types
// without a converter (see GgmlTypeInfo::to_f32).
inline Status ConvertToF32(uint32_t type, const uint8_t* src, uint64_t n, float* dst) {
  const GgmlTypeInfo* info = GetGgmlTypeInfo(type);
  if (info == nullptr) return InvalidArgument("gguf: unknown tensor type id %u", type);
  if (!info->to_f32) {
    return Unimplemented("gguf: unsupported tensor type %s (convertible: f32, f16, bf16, "
                         "f64, q8_0, q4_0, q4_1)", info->name);
  }
  if (n % info->block_size != 0) {
    return InvalidArgument("gguf: %llu elements of %s is not a multiple of the block size %u",
                           static_cast<unsigned long long>(n), info->name, info->block_size);
  }
  if (n == 0) return Status::Ok();  // dst may be null
  using ggml_internal::LoadU16;
  const auto half = [](const uint8_t* p) { return F32FromF16Bits(LoadU16(p)); };
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32:
      std::memcpy(dst, src, n * sizeof(float));
      break;
    case GgmlType::kF16:
      for (uint64_t i = 0; i < n; ++i) dst[i] = half(src + 2 * i);
      break;
    case GgmlType::kBF16:
      for (uint64_t i = 0; i < n; ++i) dst[i] = F32FromBF16Bits(LoadU16(src + 2 * i));
      break;
    case GgmlType::kF64:
      for (uint64_t i = 0; i < n; ++i) {
        double v = 0;
        std::memcpy(&v, src + 8 * i, 8);
        dst[i] = static_cast<float>(v);
      }
      break;
    case GgmlType::kQ8_0:  // {f16 d; i8 q[32]}: x = d * q
      for (uint64_t b = 0; b < n / 32; ++b) {
        const uint8_t* blk = src + 34 * b;
        const float d = half(blk);
        for (int j = 0; j < 32; ++j) dst[32 * b + j] = d * static_cast<int8_t>(blk[2 + j]);
      }
      break;
    case GgmlType::kQ4_0:  // {f16 d; u8 q[16]}: low nibbles are x[0..15], high x[16..31]
      for (uint64_t b = 0; b < n / 32; ++b) {
        const uint8_t* blk = src + 18 * b;
        const float d = half(blk);
        for (int j = 0; j < 16; ++j) {
          dst[32 * b + j] = d * static_cast<float>((blk[2 + j] & 0xF) - 8);
          dst[32 * b + j + 16] = d * static_cast<float>((blk[2 + j] >> 4) - 8);
        }
      }
      break;
    case GgmlType::kQ4_1:  // {f16 d; f16 m; u8 q[16]}: x = d * q + m
      for (uint64_t b = 0; b < n / 32; ++b) {
        const uint8_t* blk = src + 20 * b;
        const float d = half(blk), m = half(blk + 2);
        for (int j = 0; j < 16; ++j) {
          dst[32 * b + j] = d * static_cast<float>(blk[4 + j] & 0xF) + m;
          dst[32 * b + j + 16] = d * static_cast<float>(blk[4 + j] >> 4) + m;
        }
      }
      break;
    default:
      return Unimplemented("gguf: unsupported tensor type %s", info->name);
  }
  return Status::Ok();
}

}  // namespace lutra

#endif  // LUTRA_FORMAT_GGML_TYPES_H_
