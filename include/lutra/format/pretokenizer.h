// Pre-tokenizers of byte-level BPE vocabularies (GGUF tokenizer.ggml.pre),
// and GPT-2's byte <-> character map.
//
// A pre-tokenizer is a list of regexes applied in order, as llama.cpp's
// llm_tokenizer_bpe does: each regex splits every current chunk into its
// matches and the unmatched text between them (both kept as chunks), with
// leftmost-first alternation and backtracking as in ECMAScript/PCRE, and `$`
// / lookahead seeing the end of the chunk as the end of the text. BPE then
// merges inside each final chunk only.
//
// The regexes are not run by a regex engine (std::regex has no \p{..} and is
// slow); each one is a hand-written matcher over code points, with \p{L},
// \p{N}, \p{P} from the generated category table (unicode_tables.h) and \s
// the White_Space property. Where llama.cpp runs a regex without \p{..}
// through std::wregex it first replaces every non-ASCII White_Space code
// point by '\v'; those matchers (deepseek-llm's letter, punctuation and CJK
// classes, bloom's class) do the same, so e.g. U+3000 counts as \s and not as
// a member of the class range "　-。".
//
// Bytes that are not valid UTF-8 are units of their own that no class
// contains (llama.cpp turns them into U+FFFD, a symbol, which no class here
// contains either), so the chunks always concatenate back to the input.
//
// Plain header; no exceptions.
#ifndef LUTRA_FORMAT_PRETOKENIZER_H_
#define LUTRA_FORMAT_PRETOKENIZER_H_

#include <stddef.h>
#include <stdint.h>

#include <string>
#include <string_view>
#include <vector>

#include "lutra/base/status.h"
#include "lutra/format/unicode.h"

namespace lutra {

// Regex lists, named after the llama.cpp pre-tokenizer type that uses them.
enum class PreTokenizer : uint8_t {
  kDefault,        // [\p{P}\$\+<=>\^~\|]+, gpt-2, \p{N}+, [0-9][0-9][0-9]
  kGpt2,           // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)
  kLlama3,         // (?i:'s|..)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
                   //   \s*[\r\n]+|\s+(?!\S)|\s+
  kQwen2,          // as kLlama3 with \p{N} (single digits)
  kDeepseekLlm,    // [\r\n], \s?[cased letters]+, \s?[ASCII/fullwidth punct.]+, \s+$, [CJK]+, \p{N}+
  kDeepseekCoder,  // [\r\n], \s?\p{L}+, \s?\p{P}+, [CJK]+, \p{N}
  kFalcon,         // [\p{P}\$\+<=>\^~\|`]+, gpt-2, [0-9][0-9][0-9]
  kStarcoder,      // \p{N}, gpt-2
  kBloom,          // " ?[^(\s|.,!?…。，、।۔،)]+"
  kViking,         // kBloom's regex, \p{N}
};

struct PreTokenizerSpec {
  PreTokenizer kind = PreTokenizer::kDefault;
  // llama.cpp's tokenizer_ignore_merges (Llama 3): a chunk that is itself a
  // token is emitted as that token without running the merges.
  bool ignore_merges = false;
};

namespace pretokenizer_internal {

struct NamedPreTokenizer {
  const char* name;
  PreTokenizerSpec spec;
};

// llama.cpp's tokenizer.ggml.pre names (build 4748) whose regexes are
// implemented here; the first name of each spec is the one written out.
inline constexpr NamedPreTokenizer kPreTokenizerNames[] = {
    {"default", {PreTokenizer::kDefault, false}},
    {"llama3", {PreTokenizer::kLlama3, true}},
    {"llama-v3", {PreTokenizer::kLlama3, true}},
    {"llama-bpe", {PreTokenizer::kLlama3, true}},
    {"falcon3", {PreTokenizer::kLlama3, true}},
    {"dbrx", {PreTokenizer::kLlama3, false}},
    {"smaug-bpe", {PreTokenizer::kLlama3, false}},
    {"chatglm-bpe", {PreTokenizer::kLlama3, false}},
    {"qwen2", {PreTokenizer::kQwen2, false}},
    {"stablelm2", {PreTokenizer::kQwen2, false}},
    {"megrez", {PreTokenizer::kQwen2, false}},
    {"deepseek-r1-qwen", {PreTokenizer::kQwen2, false}},
    {"deepseek-llm", {PreTokenizer::kDeepseekLlm, false}},
    {"deepseek-coder", {PreTokenizer::kDeepseekCoder, false}},
    {"falcon", {PreTokenizer::kFalcon, false}},
    {"gpt-2", {PreTokenizer::kGpt2, false}},
    {"phi-2", {PreTokenizer::kGpt2, false}},
    {"mpt", {PreTokenizer::kGpt2, false}},
    {"olmo", {PreTokenizer::kGpt2, false}},
    {"jais", {PreTokenizer::kGpt2, false}},
    {"roberta-bpe", {PreTokenizer::kGpt2, false}},
    {"gigachat", {PreTokenizer::kGpt2, false}},
    {"jina-es", {PreTokenizer::kGpt2, false}},
    {"jina-de", {PreTokenizer::kGpt2, false}},
    {"jina-v1-en", {PreTokenizer::kGpt2, false}},
    {"jina-v2-es", {PreTokenizer::kGpt2, false}},
    {"jina-v2-de", {PreTokenizer::kGpt2, false}},
    {"jina-v2-code", {PreTokenizer::kGpt2, false}},
    {"starcoder", {PreTokenizer::kStarcoder, false}},
    {"refact", {PreTokenizer::kStarcoder, false}},
    {"command-r", {PreTokenizer::kStarcoder, false}},
    {"smollm", {PreTokenizer::kStarcoder, false}},
    {"codeshell", {PreTokenizer::kStarcoder, false}},
    {"exaone", {PreTokenizer::kStarcoder, false}},
    {"minerva-7b", {PreTokenizer::kStarcoder, false}},
    {"poro-chat", {PreTokenizer::kBloom, false}},
    {"bloom", {PreTokenizer::kBloom, false}},
    {"gpt3-finnish", {PreTokenizer::kBloom, false}},
    {"viking", {PreTokenizer::kViking, false}},
};

}  // namespace pretokenizer_internal

// Maps a tokenizer.ggml.pre value to its regexes. An absent or empty value is
// "default". Unknown names are an error (llama.cpp refuses them too):
// guessing would silently produce other ids than the model was trained with.
inline StatusOr<PreTokenizerSpec> PreTokenizerFromName(std::string_view name) {
  using pretokenizer_internal::kPreTokenizerNames;
  if (name.empty()) return PreTokenizerSpec{};
  for (const auto& e : kPreTokenizerNames) {
    if (name == e.name) return e.spec;
  }
  std::string known;
  for (const auto& e : kPreTokenizerNames) {
    if (!known.empty()) known += ", ";
    known += e.name;
  }
  return Unimplemented("tokenizer: tokenizer.ggml.pre '%s' is not supported (supported: %s)",
                       std::string(name).c_str(), known.c_str());
}

// A tokenizer.ggml.pre value that PreTokenizerFromName maps back to `spec`
// (for writing a vocabulary out).
inline const char* PreTokenizerName(PreTokenizerSpec spec) {
  for (const auto& e : pretokenizer_internal::kPreTokenizerNames) {
    if (e.spec.kind == spec.kind && e.spec.ignore_merges == spec.ignore_merges) return e.name;
  }
  return "default";  // unreachable: every spec has a name
}

namespace pretokenizer_internal {

// One regex of a pre-tokenizer.
enum class Rule : uint8_t {
  kGpt2,
  kLlama3,
  kQwen2,
  kPunctSymbols,      // [\p{P}\$\+<=>\^~\|]+ (default)
  kPunctSymbolsTick,  // [\p{P}\$\+<=>\^~\|`]+ (falcon)
  kNumbers,           // \p{N}+
  kNumber,            // \p{N}
  kThreeDigits,       // [0-9][0-9][0-9]
  kNewline,           // [\r\n]
  kDeepseekLetters,   // \s?[A-Za-zµÀ-ÖØ-öø-ƺ...]+ (std::wregex)
  kDeepseekPunct,     // \s?[!-/:-~！-／：-～‘-‟　-。]+ (std::wregex)
  kTrailingSpace,     // \s+$ (std::wregex)
  kCjk,               // [一-龥ࠀ-一가-퟿]+ (std::wregex)
  kSpaceLetters,      // \s?\p{L}+
  kSpacePunct,        // \s?\p{P}+
  kBloom,             // " ?[^(\s|.,!?…。，、।۔،)]+" (std::wregex)
};

// Code points of the text; the matchers see only [.., end) of the chunk.
struct Cursor {
  const uint32_t* cp;
  size_t end;
  uint32_t at(size_t i) const { return i < end ? cp[i] : kInvalidCodePoint; }
  bool in(size_t i) const { return i < end; }
  bool ws(size_t i) const { return i < end && IsWhitespace(cp[i]); }
  bool letter(size_t i) const { return i < end && IsLetter(cp[i]); }
  bool number(size_t i) const { return i < end && IsNumber(cp[i]); }
  bool punct(size_t i) const {
    return i < end && !IsWhitespace(cp[i]) && ClassOf(cp[i]) == UnicodeClass::kPunctuation;
  }
  // [^\s\p{L}\p{N}]
  bool other(size_t i) const {
    return i < end && !IsWhitespace(cp[i]) && !IsLetter(cp[i]) && !IsNumber(cp[i]);
  }
  // The code point as std::wregex sees it in llama.cpp: non-ASCII
  // White_Space replaced by '\v' (which only \s matches).
  uint32_t wide(size_t i) const {
    const uint32_t c = at(i);
    return (c > 0x7F && c != kInvalidCodePoint && IsWhitespace(c)) ? 0x0B : c;
  }
};

inline bool InRanges(uint32_t c, const uint32_t (*ranges)[2], size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (c >= ranges[i][0] && c <= ranges[i][1]) return true;
  }
  return false;
}

// deepseek-llm's letter class, from its tokenizer.json: the cased letters
// (Lu, Ll, Lt) of some Unicode version. Written as code points because the
// literal characters are not NFC-stable (U+1F7D, U+1FBE, U+1FD3, U+1FDB,
// U+2126, U+212A would normalize to other code points and reverse ranges).
inline bool DeepseekLetter(uint32_t c) {
  static constexpr uint32_t kRanges[][2] = {
      {0x41, 0x5A},       {0x61, 0x7A},       {0xB5, 0xB5},       {0xC0, 0xD6},
      {0xD8, 0xF6},       {0xF8, 0x1BA},      {0x1BC, 0x1BF},     {0x1C4, 0x293},
      {0x295, 0x2AF},     {0x370, 0x373},     {0x376, 0x377},     {0x37B, 0x37D},
      {0x37F, 0x37F},     {0x386, 0x386},     {0x388, 0x38A},     {0x38C, 0x38C},
      {0x38E, 0x3A1},     {0x3A3, 0x3F5},     {0x3F7, 0x481},     {0x48A, 0x52F},
      {0x531, 0x556},     {0x10A0, 0x10C5},   {0x13A0, 0x13F5},   {0x13F8, 0x13FD},
      {0x1C90, 0x1CBA},   {0x1CBD, 0x1CBF},   {0x1D00, 0x1D2B},   {0x1D6B, 0x1D77},
      {0x1D79, 0x1D9A},   {0x1E00, 0x1F15},   {0x1F18, 0x1F1D},   {0x1F20, 0x1F45},
      {0x1F48, 0x1F4D},   {0x1F50, 0x1F57},   {0x1F59, 0x1F59},   {0x1F5B, 0x1F5B},
      {0x1F5D, 0x1F5D},   {0x1F5F, 0x1F7D},   {0x1F80, 0x1FB4},   {0x1FB6, 0x1FBC},
      {0x1FBE, 0x1FBE},   {0x1FC2, 0x1FC4},   {0x1FC6, 0x1FCC},   {0x1FD0, 0x1FD3},
      {0x1FD6, 0x1FDB},   {0x1FE0, 0x1FEC},   {0x1FF2, 0x1FF4},   {0x1FF6, 0x1FFC},
      {0x2102, 0x2102},   {0x2107, 0x2107},   {0x210A, 0x2113},   {0x2115, 0x2115},
      {0x2119, 0x211D},   {0x2124, 0x2124},   {0x2126, 0x2126},   {0x2128, 0x2128},
      {0x212A, 0x212D},   {0x212F, 0x2134},   {0x2139, 0x2139},   {0x213C, 0x213F},
      {0x2145, 0x2149},   {0x214E, 0x214E},   {0x2183, 0x2184},   {0x2C00, 0x2C7B},
      {0x2C7E, 0x2CE4},   {0x2CEB, 0x2CEE},   {0x2CF2, 0x2CF3},   {0xA640, 0xA66D},
      {0xA680, 0xA69B},   {0xA722, 0xA76F},   {0xA771, 0xA787},   {0xA78B, 0xA78E},
      {0xAB70, 0xABBF},   {0xFB00, 0xFB06},   {0xFB13, 0xFB17},   {0xFF21, 0xFF3A},
      {0xFF41, 0xFF5A},   {0x10400, 0x1044F}, {0x104B0, 0x104D3}, {0x104D8, 0x104FB},
      {0x10C80, 0x10CB2}, {0x10CC0, 0x10CF2}, {0x118A0, 0x118DF}, {0x1E900, 0x1E943},
  };
  return InRanges(c, kRanges, sizeof(kRanges) / sizeof(kRanges[0]));
}

// [!-/:-~！-／：-～‘-‟　-。]
inline bool DeepseekPunct(uint32_t c) {
  static constexpr uint32_t kRanges[][2] = {{0x21, 0x2F},     {0x3A, 0x7E},     {0xFF01, 0xFF0F},
                                            {0xFF1A, 0xFF5E}, {0x2018, 0x201F}, {0x3000, 0x3002}};
  return InRanges(c, kRanges, sizeof(kRanges) / sizeof(kRanges[0]));
}

// [一-龥ࠀ-一가-퟿]
inline bool Cjk(uint32_t c) {
  return (c >= 0x4E00 && c <= 0x9FA5) || (c >= 0x0800 && c <= 0x4E00) ||
         (c >= 0xAC00 && c <= 0xD7FF);
}

// [^(\s|.,!?…。，、।۔،)] without the \s part (tested separately).
inline bool BloomExcluded(uint32_t c) {
  switch (c) {
    case '(': case '|': case '.': case ',': case '!': case '?': case ')':
    case 0x2026: case 0x3002: case 0xFF0C: case 0x3001: case 0x0964: case 0x06D4: case 0x060C:
      return true;
    default:
      return false;
  }
}

inline size_t Contraction(const Cursor& c, size_t pos, bool any_case) {
  if (c.at(pos) != '\'') return 0;
  const auto lower = [&](size_t i) -> uint32_t {
    const uint32_t v = c.at(i);
    return (any_case && v >= 'A' && v <= 'Z') ? v + 32 : v;
  };
  const uint32_t a = lower(pos + 1);
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
  const uint32_t b = lower(pos + 2);
  if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  return 0;
}

// Length of the whitespace run at pos.
inline size_t SpaceRun(const Cursor& c, size_t pos) {
  size_t i = pos;
  while (c.ws(i)) ++i;
  return i - pos;
}

// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)
inline size_t MatchGpt2(const Cursor& c, size_t pos) {
  if (size_t n = Contraction(c, pos, false)) return n;
  const size_t p = pos + (c.at(pos) == ' ' ? 1 : 0);
  size_t i = p;
  if (c.letter(p)) {
    while (c.letter(i)) ++i;
    return i - pos;
  }
  if (c.number(p)) {
    while (c.number(i)) ++i;
    return i - pos;
  }
  if (c.other(p)) {
    while (c.other(i)) ++i;
    return i - pos;
  }
  // \s+(?!\S): the whole run at the end of the chunk, else all but its last
  // code point (which is followed by \S); a single one followed by \S fails.
  const size_t n = SpaceRun(c, pos);
  if (n == 0) return 0;
  if (!c.in(pos + n)) return n;
  return n - 1;
}

// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max_digits}|
// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
inline size_t MatchLlama3(const Cursor& c, size_t pos, size_t max_digits) {
  if (size_t n = Contraction(c, pos, true)) return n;
  const uint32_t first = c.at(pos);
  if (first != '\r' && first != '\n' && !c.number(pos) &&
      (c.letter(pos) || c.letter(pos + 1))) {
    size_t i = pos + 1;
    while (c.letter(i)) ++i;
    return i - pos;
  }
  if (c.number(pos)) {
    size_t i = pos;
    while (c.number(i) && i - pos < max_digits) ++i;
    return i - pos;
  }
  const size_t p = pos + (first == ' ' ? 1 : 0);
  if (c.other(p)) {
    size_t i = p;
    while (c.other(i)) ++i;
    while (c.at(i) == '\r' || c.at(i) == '\n') ++i;
    return i - pos;
  }
  // \s*[\r\n]+: up to the last newline of the whitespace run.
  const size_t n = SpaceRun(c, pos);
  size_t last_newline = 0;
  for (size_t i = pos; i < pos + n; ++i) {
    if (c.at(i) == '\r' || c.at(i) == '\n') last_newline = i + 1;
  }
  if (last_newline != 0) return last_newline - pos;
  // \s+(?!\S), then \s+.
  if (n > 1 && c.in(pos + n)) return n - 1;
  return n;
}

inline bool PunctSymbol(const Cursor& c, size_t i, bool tick) {
  if (!c.in(i)) return false;
  const uint32_t v = c.at(i);
  if (v == '$' || v == '+' || v == '<' || v == '=' || v == '>' || v == '^' || v == '~' ||
      v == '|' || (tick && v == '`')) {
    return true;
  }
  return c.punct(i);
}

// Length of the match of `rule` at pos (0: none).
inline size_t Match(Rule rule, const Cursor& c, size_t pos) {
  size_t i = pos;
  switch (rule) {
    case Rule::kGpt2:
      return MatchGpt2(c, pos);
    case Rule::kLlama3:
      return MatchLlama3(c, pos, 3);
    case Rule::kQwen2:
      return MatchLlama3(c, pos, 1);
    case Rule::kPunctSymbols:
    case Rule::kPunctSymbolsTick:
      while (PunctSymbol(c, i, rule == Rule::kPunctSymbolsTick)) ++i;
      return i - pos;
    case Rule::kNumbers:
      while (c.number(i)) ++i;
      return i - pos;
    case Rule::kNumber:
      return c.number(pos) ? 1 : 0;
    case Rule::kThreeDigits:
      for (; i < pos + 3; ++i) {
        if (!c.in(i) || c.at(i) < '0' || c.at(i) > '9') return 0;
      }
      return 3;
    case Rule::kNewline:
      return (c.at(pos) == '\r' || c.at(pos) == '\n') ? 1 : 0;
    case Rule::kDeepseekLetters:
    case Rule::kDeepseekPunct:
    case Rule::kCjk:
    case Rule::kBloom: {
      // Optional leading \s (a space for bloom), then one or more of the class.
      const auto member = [&](size_t k) {
        if (!c.in(k)) return false;
        const uint32_t w = c.wide(k);
        switch (rule) {
          case Rule::kDeepseekLetters:
            return DeepseekLetter(w);
          case Rule::kDeepseekPunct:
            return DeepseekPunct(w);
          case Rule::kCjk:
            return Cjk(w);
          default:
            return !IsWhitespace(c.at(k)) && !BloomExcluded(w);
        }
      };
      if (rule == Rule::kDeepseekLetters || rule == Rule::kDeepseekPunct) {
        if (c.ws(i) && member(i + 1)) ++i;
      } else if (rule == Rule::kBloom) {
        if (c.at(i) == ' ' && member(i + 1)) ++i;
      }
      while (member(i)) ++i;
      return i - pos;  // the optional \s is taken only before a member
    }
    case Rule::kSpaceLetters:
    case Rule::kSpacePunct: {
      const auto member = [&](size_t k) {
        return rule == Rule::kSpaceLetters ? c.letter(k) : c.punct(k);
      };
      if (c.ws(i) && member(i + 1)) ++i;
      while (member(i)) ++i;
      return i - pos;  // the optional \s is taken only before a member
    }
    case Rule::kTrailingSpace:
      break;  // handled by Split
  }
  return 0;
}

// The regexes of `kind`, in the order they run.
struct RuleList {
  Rule rules[6];
  size_t size;
};
inline RuleList Rules(PreTokenizer kind) {
  switch (kind) {
    case PreTokenizer::kDefault:
      return {{Rule::kPunctSymbols, Rule::kGpt2, Rule::kNumbers, Rule::kThreeDigits}, 4};
    case PreTokenizer::kGpt2:
      return {{Rule::kGpt2}, 1};
    case PreTokenizer::kLlama3:
      return {{Rule::kLlama3}, 1};
    case PreTokenizer::kQwen2:
      return {{Rule::kQwen2}, 1};
    case PreTokenizer::kDeepseekLlm:
      return {{Rule::kNewline, Rule::kDeepseekLetters, Rule::kDeepseekPunct,
               Rule::kTrailingSpace, Rule::kCjk, Rule::kNumbers},
              6};
    case PreTokenizer::kDeepseekCoder:
      return {{Rule::kNewline, Rule::kSpaceLetters, Rule::kSpacePunct, Rule::kCjk, Rule::kNumber},
              5};
    case PreTokenizer::kFalcon:
      return {{Rule::kPunctSymbolsTick, Rule::kGpt2, Rule::kThreeDigits}, 3};
    case PreTokenizer::kStarcoder:
      return {{Rule::kNumber, Rule::kGpt2}, 2};
    case PreTokenizer::kBloom:
      return {{Rule::kBloom}, 1};
    case PreTokenizer::kViking:
      return {{Rule::kBloom, Rule::kNumber}, 2};
  }
  return {{}, 0};
}

}  // namespace pretokenizer_internal

// Splits `text` into chunks with the regexes of `kind`; returns the byte
// offsets where chunks end (ascending, the last one text.size(); empty for
// empty text). The chunks cover the text exactly.
inline std::vector<size_t> PreTokenize(PreTokenizer kind, std::string_view text) {
  using namespace pretokenizer_internal;
  std::vector<uint32_t> cps;
  std::vector<size_t> offsets;  // byte offset of each code point, then text.size()
  cps.reserve(text.size());
  offsets.reserve(text.size() + 1);
  for (size_t i = 0; i < text.size();) {
    uint32_t cp;
    const size_t len = DecodeUtf8(text.data() + i, text.size() - i, &cp);
    cps.push_back(cp);
    offsets.push_back(i);
    i += len;
  }
  offsets.push_back(text.size());
  std::vector<size_t> ends;  // chunk ends in code points
  if (!cps.empty()) ends.push_back(cps.size());
  const RuleList rules = Rules(kind);
  std::vector<size_t> next;
  for (size_t r = 0; r < rules.size; ++r) {
    next.clear();
    size_t begin = 0;
    for (const size_t end : ends) {
      const Cursor c{cps.data(), end};
      if (rules.rules[r] == Rule::kTrailingSpace) {
        // \s+$: the leftmost match starts where the trailing run does.
        size_t t = end;
        while (t > begin && IsWhitespace(cps[t - 1])) --t;
        if (t > begin && t < end) next.push_back(t);
        next.push_back(end);
        begin = end;
        continue;
      }
      size_t last = begin;  // end of the previous match
      for (size_t pos = begin; pos < end;) {
        const size_t n = Match(rules.rules[r], c, pos);
        if (n == 0) {
          ++pos;
          continue;
        }
        if (pos > last) next.push_back(pos);
        pos += n;
        next.push_back(pos);
        last = pos;
      }
      if (last < end) next.push_back(end);
      begin = end;
    }
    ends.swap(next);
  }
  for (size_t& e : ends) e = offsets[e];
  return ends;
}

// GPT-2's byte-level alphabet: byte b is written as one code point, itself
// for the printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') and
// U+0100 + k for the k-th other byte in ascending order (so ' ' -> 'Ġ'
// U+0120, '\n' -> 'Ċ' U+010A). Vocabulary pieces and merges are stored in
// this form. Code points used: U+0021..U+0143.
struct ByteLevelAlphabet {
  uint32_t to_cp[256];
  int16_t to_byte[0x144];  // -1: not in the alphabet

  static const ByteLevelAlphabet& Get() {
    static const ByteLevelAlphabet kAlphabet = Make();
    return kAlphabet;
  }

 private:
  static ByteLevelAlphabet Make() {
    ByteLevelAlphabet a;
    for (int16_t& v : a.to_byte) v = -1;
    uint32_t k = 0;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      a.to_cp[b] = printable ? b : 0x100 + k++;
      a.to_byte[a.to_cp[b]] = static_cast<int16_t>(b);
    }
    return a;
  }
};

inline uint32_t ByteToCodePoint(uint8_t b) { return ByteLevelAlphabet::Get().to_cp[b]; }

// Inverse of ByteToCodePoint: the byte, or -1 for a code point outside the
// alphabet.
inline int CodePointToByte(uint32_t cp) {
  return cp < 0x144 ? ByteLevelAlphabet::Get().to_byte[cp] : -1;
}

// Byte-level piece (UTF-8 of alphabet code points) -> raw bytes; false when a
// code point is outside the alphabet or the piece is not valid UTF-8.
inline bool DecodeByteLevel(std::string_view piece, std::string* out) {
  out->clear();
  for (size_t i = 0; i < piece.size();) {
    uint32_t cp;
    i += DecodeUtf8(piece.data() + i, piece.size() - i, &cp);
    const int b = CodePointToByte(cp);
    if (b < 0) return false;
    out->push_back(static_cast<char>(b));
  }
  return true;
}

}  // namespace lutra

#endif  // LUTRA_FORMAT_PRETOKENIZER_H_
