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
#include <string>

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

namespace ggml_internal {

// Indexed by type id; name == nullptr for ids that no ggml version defines
// (or that were removed, like the 31..33 and 36..38 repacked layouts, which
// never appear in files).
inline const GgmlTypeInfo* TypeTable(uint32_t* count) {
  static const GgmlTypeInfo kInfos[] = {
      {"f32", 1, 4, true},        {"f16", 1, 2, true},       {"q4_0", 32, 18, true},
      {"q4_1", 32, 20, true},     {nullptr, 0, 0, false},    {nullptr, 0, 0, false},
      {"q5_0", 32, 22, true},     {"q5_1", 32, 24, true},    {"q8_0", 32, 34, true},
      {"q8_1", 32, 36, true},     {"q2_K", 256, 84, true},   {"q3_K", 256, 110, true},
      {"q4_K", 256, 144, true},   {"q5_K", 256, 176, true},  {"q6_K", 256, 210, true},
      {"q8_K", 256, 292, true},   {"iq2_xxs", 256, 66, false}, {"iq2_xs", 256, 74, false},
      {"iq3_xxs", 256, 98, false}, {"iq1_s", 256, 50, false}, {"iq4_nl", 32, 18, true},
      {"iq3_s", 256, 110, false}, {"iq2_s", 256, 82, false}, {"iq4_xs", 256, 136, true},
      {"i8", 1, 1, false},        {"i16", 1, 2, false},      {"i32", 1, 4, false},
      {"i64", 1, 8, false},       {"f64", 1, 8, true},       {"iq1_m", 256, 56, false},
      {"bf16", 1, 2, true},       {nullptr, 0, 0, false},    {nullptr, 0, 0, false},
      {nullptr, 0, 0, false},     {"tq1_0", 256, 54, false}, {"tq2_0", 256, 66, false},
      {nullptr, 0, 0, false},     {nullptr, 0, 0, false},    {nullptr, 0, 0, false},
      {"mxfp4", 32, 17, false},
  };
  *count = static_cast<uint32_t>(sizeof(kInfos) / sizeof(kInfos[0]));
  return kInfos;
}

}  // namespace ggml_internal

// Returns nullptr for ids that no ggml version defines.
inline const GgmlTypeInfo* GetGgmlTypeInfo(uint32_t type) {
  uint32_t count = 0;
  const GgmlTypeInfo* infos = ggml_internal::TypeTable(&count);
  if (type >= count || infos[type].name == nullptr) return nullptr;
  return &infos[type];
}

// "f32, f16, q4_0, ..." : the types ConvertToF32 supports, in id order, for
// error messages (built from the table, so it cannot go stale).
inline const std::string& GgmlConvertibleTypeNames() {
  static const std::string names = [] {
    uint32_t count = 0;
    const GgmlTypeInfo* infos = ggml_internal::TypeTable(&count);
    std::string s;
    for (uint32_t i = 0; i < count; ++i) {
      if (infos[i].name == nullptr || !infos[i].to_f32) continue;
      if (!s.empty()) s += ", ";
      s += infos[i].name;
    }
    return s;
  }();
  return names;
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

// fp16 at p (unaligned) as f32 (exact).
inline float LoadF16(const uint8_t* p) { return F32FromF16Bits(LoadU16(p)); }

// Block decoders: one block of `type` at `b` (type_size bytes, unaligned)
// to its block_size floats at y. Each follows llama.cpp's dequantize_row_*
// (ggml-quants.c) operation for operation, in f32: an fp16 scale times small
// integers (exact in f32's 24-bit significand), then at most one rounding
// for the min, `scale * q - min` or `d * q + m`, so the results are
// bit-identical to ggml's (with or without FMA contraction, as the product
// is exact). Combining scales differently (e.g. d * (sc * q)) would still
// be exact, but rounding an intermediate to fp16, or computing the min term
// another way, would not match.

// q5_0 {f16 d; u8 qh[4]; u8 qs[16]}: 5-bit q = low nibble | bit j of qh << 4
// (x[j], j < 16) or high nibble | bit j + 16 of qh << 4 (x[j + 16]);
// x = d * (q - 16).
inline void Q5_0Block(const uint8_t* b, float* y) {
  const float d = LoadF16(b);
  uint32_t qh = 0;
  std::memcpy(&qh, b + 2, 4);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    const int h0 = static_cast<int>((qh >> j) << 4 & 0x10);
    const int h1 = static_cast<int>((qh >> (j + 12)) & 0x10);
    y[j] = static_cast<float>(((qs[j] & 0xF) | h0) - 16) * d;
    y[j + 16] = static_cast<float>(((qs[j] >> 4) | h1) - 16) * d;
  }
}

// q5_1 {f16 d; f16 m; u8 qh[4]; u8 qs[16]}: q as q5_0, x = d * q + m.
inline void Q5_1Block(const uint8_t* b, float* y) {
  const float d = LoadF16(b), m = LoadF16(b + 2);
  uint32_t qh = 0;
  std::memcpy(&qh, b + 4, 4);
  const uint8_t* qs = b + 8;
  for (int j = 0; j < 16; ++j) {
    const int h0 = static_cast<int>((qh >> j) << 4 & 0x10);
    const int h1 = static_cast<int>((qh >> (j + 12)) & 0x10);
    y[j] = static_cast<float>((qs[j] & 0xF) | h0) * d + m;
    y[j + 16] = static_cast<float>((qs[j] >> 4) | h1) * d + m;
  }
}

// q8_0 {f16 d; i8 q[32]}: x = d * q. q8_1 {f16 d; f16 s; i8 q[32]} is the
// same with s = d * sum(q) unused (ggml has no to_float for q8_1; this is
// the obvious one).
inline void Q8Block(const uint8_t* b, const uint8_t* qs, float* y) {
  const float d = LoadF16(b);
  for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(static_cast<int8_t>(qs[j])) * d;
}

// The 16 non-uniform levels of iq4_nl / iq4_xs (ggml's kvalues_iq4nl).
inline const int8_t* Iq4Levels() {
  static const int8_t kLevels[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                     1,    13,   25,  38,  53,  69,  89,  113};
  return kLevels;
}

// 32 weights from 16 bytes of 4-bit indices into Iq4Levels (low nibbles
// x[0..15], high x[16..31]) at scale d (iq4_nl block; iq4_xs sub-block).
inline void Iq4Run(float d, const uint8_t* qs, float* y) {
  const int8_t* levels = Iq4Levels();
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>(levels[qs[j] & 0xF]);
    y[j + 16] = d * static_cast<float>(levels[qs[j] >> 4]);
  }
}

// iq4_xs {f16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128]}: 8 sub-blocks of
// 32; sub-block i has the 6-bit scale ls = nibble i of scales_l | bits
// 2i..2i+1 of scales_h << 4, and weights d * (ls - 32) * level.
inline void Iq4XsBlock(const uint8_t* b, float* y) {
  const float d = LoadF16(b);
  const uint16_t scales_h = LoadU16(b + 2);
  const uint8_t* scales_l = b + 4;
  const uint8_t* qs = b + 8;
  for (int i = 0; i < 8; ++i) {
    const int ls = ((scales_l[i / 2] >> (4 * (i % 2))) & 0xF) | (((scales_h >> (2 * i)) & 3) << 4);
    Iq4Run(d * static_cast<float>(ls - 32), qs + 16 * i, y + 32 * i);
  }
}

// q2_K {u8 scales[16]; u8 qs[64]; f16 d; f16 dmin}: 16 sub-blocks of 16;
// scales[s] = (min << 4) | scale. Output half h (128 weights) reads qs[32h ..
// 32h + 31]: its sub-blocks 2p and 2p + 1 (p = 0..3) take bits 2p..2p+1 of
// qs[l] and of qs[l + 16] (l < 16). x = d * scale * q - dmin * min.
inline void Q2KBlock(const uint8_t* b, float* y) {
  const uint8_t* scales = b;
  const uint8_t* q = b + 16;
  const float d = LoadF16(b + 80), dmin = LoadF16(b + 82);
  int is = 0;
  for (int half = 0; half < 2; ++half, q += 32) {
    for (int shift = 0; shift < 8; shift += 2) {
      for (int k = 0; k < 2; ++k, ++is, y += 16) {
        const float dl = d * static_cast<float>(scales[is] & 0xF);
        const float ml = dmin * static_cast<float>(scales[is] >> 4);
        for (int l = 0; l < 16; ++l) {
          y[l] = dl * static_cast<float>((q[l + 16 * k] >> shift) & 3) - ml;
        }
      }
    }
  }
}

// q3_K {u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}: 16 sub-blocks of 16
// with 6-bit signed scales (stored + 32): low 4 bits are nibble s % 8 of
// scales[0..7] (low nibbles first), high 2 bits are bits 2(s / 4).. of
// scales[8 + s % 4]. Weights as q2_K's 2-bit q, minus 4 where the matching
// hmask bit (bit j of hmask[l], j = 0..7 counting 32-weight runs) is clear:
// x = d * (scale - 32) * (q - 4 * !h).
inline void Q3KBlock(const uint8_t* b, float* y) {
  const uint8_t* hm = b;
  const uint8_t* q = b + 32;
  const uint8_t* sc = b + 96;
  const float d_all = LoadF16(b + 108);
  int is = 0;
  uint8_t m = 1;
  for (int half = 0; half < 2; ++half, q += 32) {
    for (int shift = 0; shift < 8; shift += 2, m = static_cast<uint8_t>(m << 1)) {
      for (int k = 0; k < 2; ++k, ++is, y += 16) {
        const int low = is < 8 ? (sc[is] & 0xF) : (sc[is - 8] >> 4);
        const int high = (sc[8 + is % 4] >> (2 * (is / 4))) & 3;
        const float dl = d_all * static_cast<float>((low | (high << 4)) - 32);
        for (int l = 0; l < 16; ++l) {
          const int v = ((q[l + 16 * k] >> shift) & 3) - ((hm[l + 16 * k] & m) ? 0 : 4);
          y[l] = dl * static_cast<float>(v);
        }
      }
    }
  }
}

// 6-bit scale and min of sub-block j (0..7) of the 12 packed bytes of q4_K
// and q5_K (ggml's get_scale_min_k4): j < 4 in the low 6 bits of bytes j and
// j + 4; j >= 4 from the nibbles of byte j + 4 and the top 2 bits of bytes
// j - 4 and j.
inline void ScaleMinK4(int j, const uint8_t* q, int* sc, int* mn) {
  if (j < 4) {
    *sc = q[j] & 63;
    *mn = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// q4_K {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]} and q5_K {f16 d; f16
// dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}: 8 sub-blocks of 32; pair p
// (sub-blocks 2p, 2p + 1) takes the low / high nibbles of qs[32p .. 32p +
// 31], q5_K adding 16 where bit 2p / 2p + 1 of qh[l] is set.
// x = d * scale * q - dmin * min.
template <bool kHigh>
inline void Q45KBlock(const uint8_t* b, float* y) {
  const float d = LoadF16(b), dmin = LoadF16(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* ql = kHigh ? b + 48 : b + 16;
  for (int p = 0; p < 4; ++p, ql += 32) {
    int sc = 0, mn = 0;
    ScaleMinK4(2 * p, scales, &sc, &mn);
    const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(mn);
    ScaleMinK4(2 * p + 1, scales, &sc, &mn);
    const float d2 = d * static_cast<float>(sc), m2 = dmin * static_cast<float>(mn);
    for (int l = 0; l < 32; ++l) {
      int lo = ql[l] & 0xF, hi = ql[l] >> 4;
      if (kHigh) {
        lo += (qh[l] >> (2 * p)) & 1 ? 16 : 0;
        hi += (qh[l] >> (2 * p + 1)) & 1 ? 16 : 0;
      }
      y[64 * p + l] = d1 * static_cast<float>(lo) - m1;
      y[64 * p + 32 + l] = d2 * static_cast<float>(hi) - m2;
    }
  }
}

// q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}: per 128-weight half,
// x[32r + l] (r = 0..3, l < 32) = d * scales[8 half + 2r + l / 16] * (q - 32),
// q = nibble (r / 2) of ql[64 half + 32 (r % 2) + l] | bits 2r..2r+1 of
// qh[32 half + l] << 4. ggml multiplies left to right: (d * scale) * q.
inline void Q6KBlock(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = LoadF16(b + 208);
  for (int half = 0; half < 2; ++half, ql += 64, qh += 32, sc += 8) {
    for (int r = 0; r < 4; ++r) {
      const uint8_t* lo = ql + 32 * (r % 2);
      const int shift = 4 * (r / 2);
      for (int k = 0; k < 2; ++k, y += 16) {  // 16 weights per scale
        const float ds = d * static_cast<float>(sc[2 * r + k]);
        for (int l = 16 * k; l < 16 * k + 16; ++l) {
          const int q = (((lo[l] >> shift) & 0xF) | (((qh[l] >> (2 * r)) & 3) << 4)) - 32;
          y[l - 16 * k] = ds * static_cast<float>(q);
        }
      }
    }
  }
}

// q8_K {f32 d; i8 qs[256]; i16 bsums[16]}: x = d * q (bsums unused).
inline void Q8KBlock(const uint8_t* b, float* y) {
  float d = 0;
  std::memcpy(&d, b, 4);
  for (int j = 0; j < 256; ++j) y[j] = d * static_cast<float>(static_cast<int8_t>(b[4 + j]));
}

// Decodes n / block consecutive blocks of `bytes` bytes each.
template <class Decode>
void ForEachBlock(const uint8_t* src, uint64_t n, uint32_t block, uint32_t bytes, float* dst,
                  const Decode& decode) {
  for (uint64_t i = 0; i < n / block; ++i) decode(src + i * bytes, dst + i * block);
}

}  // namespace ggml_internal

// Converts `n` elements stored as ggml `type` at `src` (unaligned ok) to f32,
// exactly as llama.cpp's to_float does (bit for bit). n must be a multiple of
// the type's block size. Unimplemented for types without a converter (see
// GgmlTypeInfo::to_f32 and GgmlConvertibleTypeNames()).
inline Status ConvertToF32(uint32_t type, const uint8_t* src, uint64_t n, float* dst) {
  const GgmlTypeInfo* info = GetGgmlTypeInfo(type);
  if (info == nullptr) return InvalidArgument("gguf: unknown tensor type id %u", type);
  if (!info->to_f32) {
    return Unimplemented("gguf: unsupported tensor type %s (convertible: %s)", info->name,
                         GgmlConvertibleTypeNames().c_str());
  }
  if (n % info->block_size != 0) {
    return InvalidArgument("gguf: %llu elements of %s is not a multiple of the block size %u",
                           static_cast<unsigned long long>(n), info->name, info->block_size);
  }
  if (n == 0) return Status::Ok();  // dst may be null
  namespace gi = ggml_internal;
  const uint32_t bs = info->block_size, ts = info->type_size;
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32:
      std::memcpy(dst, src, n * sizeof(float));
      break;
    case GgmlType::kF16:
      for (uint64_t i = 0; i < n; ++i) dst[i] = gi::LoadF16(src + 2 * i);
      break;
    case GgmlType::kBF16:
      for (uint64_t i = 0; i < n; ++i) dst[i] = F32FromBF16Bits(gi::LoadU16(src + 2 * i));
      break;
    case GgmlType::kF64:
      for (uint64_t i = 0; i < n; ++i) {
        double v = 0;
        std::memcpy(&v, src + 8 * i, 8);
        dst[i] = static_cast<float>(v);
      }
      break;
    case GgmlType::kQ8_0:
      gi::ForEachBlock(src, n, bs, ts, dst, [](const uint8_t* b, float* y) {
        gi::Q8Block(b, b + 2, y);
      });
      break;
    case GgmlType::kQ8_1:
      gi::ForEachBlock(src, n, bs, ts, dst, [](const uint8_t* b, float* y) {
        gi::Q8Block(b, b + 4, y);
      });
      break;
    case GgmlType::kQ4_0:  // {f16 d; u8 q[16]}: low nibbles are x[0..15], high x[16..31]
      gi::ForEachBlock(src, n, bs, ts, dst, [](const uint8_t* b, float* y) {
        const float d = gi::LoadF16(b);
        for (int j = 0; j < 16; ++j) {
          y[j] = static_cast<float>((b[2 + j] & 0xF) - 8) * d;
          y[j + 16] = static_cast<float>((b[2 + j] >> 4) - 8) * d;
        }
      });
      break;
    case GgmlType::kQ4_1:  // {f16 d; f16 m; u8 q[16]}: x = d * q + m
      gi::ForEachBlock(src, n, bs, ts, dst, [](const uint8_t* b, float* y) {
        const float d = gi::LoadF16(b), m = gi::LoadF16(b + 2);
        for (int j = 0; j < 16; ++j) {
          y[j] = static_cast<float>(b[4 + j] & 0xF) * d + m;
          y[j + 16] = static_cast<float>(b[4 + j] >> 4) * d + m;
        }
      });
      break;
    case GgmlType::kQ5_0:
      gi::ForEachBlock(src, n, bs, ts, dst, gi::Q5_0Block);
      break;
    case GgmlType::kQ5_1:
      gi::ForEachBlock(src, n, bs, ts, dst, gi::Q5_1Block);
      break;
    case GgmlType::kIQ4_NL:  // {f16 d; u8 qs[16]}: x = d * level
      gi::ForEachBlock(src, n, bs, ts, dst, [](const uint8_t* b, float* y) {
        gi::Iq4Run(gi::LoadF16(b), b + 2, y);
      });
      break;
    case GgmlType::kIQ4_XS:
      gi::ForEachBlock(src, n, bs, ts, dst, gi::Iq4XsBlock);
      break;
    case GgmlType::kQ2_K:
      gi::ForEachBlock(src, n, bs, ts, dst, gi::Q2KBlock);
      break;
    case GgmlType::kQ3_K:
      gi::ForEachBlock(src, n, bs, ts, dst, gi::Q3KBlock);
      break;
    case GgmlType::kQ4_K:
      gi::ForEachBlock(src, n, bs, ts, dst, gi::Q45KBlock<false>);
      break;
    case GgmlType::kQ5_K:
      gi::ForEachBlock(src, n, bs, ts, dst, gi::Q45KBlock<true>);
      break;
    case GgmlType::kQ6_K:
      gi::ForEachBlock(src, n, bs, ts, dst, gi::Q6KBlock);
      break;
    case GgmlType::kQ8_K:
      gi::ForEachBlock(src, n, bs, ts, dst, gi::Q8KBlock);
      break;
    default:
      return Unimplemented("gguf: unsupported tensor type %s", info->name);
  }
  return Status::Ok();
}

}  // namespace lutra

#endif  // LUTRA_FORMAT_GGML_TYPES_H_
