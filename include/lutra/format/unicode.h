// Unicode helpers for tokenizers: UTF-8 decoding that never fails, the
// general category class of a code point (generated table, see
// unicode_tables.h and cmake/gen_unicode_tables.py) and White_Space.
//
// Plain header; no exceptions.
#ifndef LUTRA_FORMAT_UNICODE_H_
#define LUTRA_FORMAT_UNICODE_H_

#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <string>
#include <string_view>

#include "lutra/format/unicode_tables.h"

namespace lutra {

// Collapsed general category: the classes the pre-tokenizer regexes test.
enum class UnicodeClass : uint8_t {
  kUnassigned = 0,  // Cn
  kLetter = 1,      // \p{L}: Lu Ll Lt Lm Lo
  kNumber = 2,      // \p{N}: Nd Nl No
  kPunctuation = 3, // \p{P}
  kMark = 4,        // \p{M}
  kSymbol = 5,      // \p{S}
  kSeparator = 6,   // \p{Z}
  kOther = 7,       // \p{C} except Cn: controls, format, private use, surrogates
};

// Stands for a byte that does not start a valid UTF-8 sequence (see
// DecodeUtf8); it is not a code point, so it has no class or property.
inline constexpr uint32_t kInvalidCodePoint = 0xFFFFFFFFu;

inline UnicodeClass ClassOf(uint32_t cp) {
  if (cp > 0x10FFFF) return UnicodeClass::kUnassigned;
  // Last run starting at or before cp.
  const uint32_t* end = kUnicodeClassStarts + kUnicodeClassRuns;
  const size_t i = static_cast<size_t>(std::upper_bound(kUnicodeClassStarts, end, cp) -
                                       kUnicodeClassStarts) - 1;
  return static_cast<UnicodeClass>(kUnicodeClassValues[i]);
}

// Unicode's White_Space property (PropList.txt), which is what `\s` means in
// llama.cpp's pre-tokenizers (it maps every non-ASCII White_Space code point
// to '\v' before std::regex sees it).
inline bool IsWhitespace(uint32_t cp) {
  if (cp < 0x80) return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20;
  return cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) ||
         cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}
inline bool IsLetter(uint32_t cp) { return ClassOf(cp) == UnicodeClass::kLetter; }
inline bool IsNumber(uint32_t cp) { return ClassOf(cp) == UnicodeClass::kNumber; }

// Decodes the UTF-8 sequence at s[0, n) (n >= 1) into *cp and returns its
// length. Anything that is not a valid, shortest-form sequence of a scalar
// value (stray continuation byte, truncated or overlong sequence, surrogate,
// > U+10FFFF) is one byte long with *cp = kInvalidCodePoint, so every byte
// string splits into units that concatenate back to it.
inline size_t DecodeUtf8(const char* s, size_t n, uint32_t* cp) {
  const uint8_t b0 = static_cast<uint8_t>(s[0]);
  *cp = kInvalidCodePoint;
  if (b0 < 0x80) {
    *cp = b0;
    return 1;
  }
  size_t len;
  uint32_t v, min;
  if ((b0 & 0xE0) == 0xC0) {
    len = 2, v = b0 & 0x1F, min = 0x80;
  } else if ((b0 & 0xF0) == 0xE0) {
    len = 3, v = b0 & 0x0F, min = 0x800;
  } else if ((b0 & 0xF8) == 0xF0) {
    len = 4, v = b0 & 0x07, min = 0x10000;
  } else {
    return 1;
  }
  if (len > n) return 1;
  for (size_t i = 1; i < len; ++i) {
    const uint8_t b = static_cast<uint8_t>(s[i]);
    if ((b & 0xC0) != 0x80) return 1;
    v = (v << 6) | (b & 0x3F);
  }
  if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) return 1;
  *cp = v;
  return len;
}

// Appends the UTF-8 encoding of the scalar value cp (<= U+10FFFF).
inline void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace lutra

#endif  // LUTRA_FORMAT_UNICODE_H_
