// SentencePiece-style BPE tokenizer of Llama 1/2 models, as llama2.c runs it.
//
// Sources:
//  - llama2.c tokenizer.bin: int32 max_token_length, then per token
//    f32 score, int32 byte length, bytes (no terminator). The file does not
//    store the vocabulary size; it is the model's vocab_size (or "until EOF").
//  - GGUF metadata (see gguf.h): tokenizer.ggml.tokens / scores / token_type,
//    bos/eos/unknown ids, add_space_prefix; "▁" (U+2581) in pieces is the space.
//
// Encode follows llama2.c's run.c exactly (that is what the reference outputs
// were produced with): optional BOS; a " " dummy-prefix token when the text is
// non-empty; each UTF-8 code point (at most 4 bytes) looked up as a piece,
// else emitted as <0xXX> byte-fallback tokens; then repeatedly merge the
// adjacent pair whose concatenation is a piece with the highest score (first
// such pair on ties; scores <= -1e10 never merge); optional EOS.
// Decode: a piece's text, with the leading space stripped right after BOS,
// <0xXX> tokens as the raw byte, and control tokens (BOS/EOS/unknown) as "".
//
// Plain header; no exceptions; errors are Status.
#ifndef LUTRA_TOKENIZER_H_
#define LUTRA_TOKENIZER_H_

#include <stddef.h>
#include <stdint.h>

#include <cstring>
#include <queue>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "lutra/base/status.h"
#include "lutra/format/gguf.h"
#include "lutra/format/mapped_file.h"

namespace lutra {

// SentencePiece token kinds (the values of GGUF tokenizer.ggml.token_type).
enum class TokenType : int32_t {
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,  // BOS, EOS: never produced by Encode, decode to ""
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6,  // <0xXX> byte fallback
};

class Tokenizer {
 public:
  Tokenizer() = default;

  // Builds from parallel arrays. `pieces` hold the text with spaces as ' '
  // (not U+2581). types may be empty: then ids bos/eos/unk are control/unknown,
  // pieces spelled exactly "<0xXX>" (two hex digits) are bytes and
  // all others normal (the llama2.c convention). Ids < 0 mean "none".
  static StatusOr<Tokenizer> FromVocab(std::vector<std::string> pieces,
                                       std::vector<float> scores,
                                       std::vector<TokenType> types, int bos_id,
                                       int eos_id, int unk_id,
                                       bool add_space_prefix = true) {
    const size_t n = pieces.size();
    if (n == 0) return InvalidArgument("tokenizer: empty vocabulary");
    if (n > static_cast<size_t>(INT32_MAX)) {
      return InvalidArgument("tokenizer: vocabulary of %zu tokens is too large", n);
    }
    if (scores.size() != n) {
      return InvalidArgument("tokenizer: %zu scores for %zu tokens", scores.size(), n);
    }
    if (!types.empty() && types.size() != n) {
      return InvalidArgument("tokenizer: %zu token types for %zu tokens", types.size(), n);
    }
    const int ids[3] = {bos_id, eos_id, unk_id};
    const char* names[3] = {"bos", "eos", "unknown"};
    for (int i = 0; i < 3; ++i) {
      if (ids[i] >= static_cast<int64_t>(n)) {
        return InvalidArgument("tokenizer: %s token id %d out of range [0, %zu)", names[i],
                               ids[i], n);
      }
    }
    Tokenizer t;
    t.pieces_ = std::move(pieces);
    t.scores_ = std::move(scores);
    t.bos_id_ = bos_id < 0 ? -1 : bos_id;
    t.eos_id_ = eos_id < 0 ? -1 : eos_id;
    t.unk_id_ = unk_id < 0 ? -1 : unk_id;
    t.add_space_prefix_ = add_space_prefix;
    if (types.empty()) {
      types.assign(n, TokenType::kNormal);
      for (size_t i = 0; i < n; ++i) {
        if (ParseBytePiece(t.pieces_[i]) >= 0) types[i] = TokenType::kByte;
      }
      if (t.unk_id_ >= 0) types[t.unk_id_] = TokenType::kUnknown;
      if (t.bos_id_ >= 0) types[t.bos_id_] = TokenType::kControl;
      if (t.eos_id_ >= 0) types[t.eos_id_] = TokenType::kControl;
    }
    t.types_ = std::move(types);
    for (int& b : t.byte_tokens_) b = -1;
    t.decoded_.resize(n);
    t.lookup_.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      const int id = static_cast<int>(i);
      switch (t.types_[i]) {
        case TokenType::kByte: {
          const int byte = ParseBytePiece(t.pieces_[i]);
          if (byte < 0) {
            return InvalidArgument("tokenizer: byte token %d is '%s', expected <0xXX>", id,
                                   Printable(t.pieces_[i]).c_str());
          }
          if (t.byte_tokens_[byte] < 0) t.byte_tokens_[byte] = id;
          t.decoded_[i] = std::string(1, static_cast<char>(byte));
          break;
        }
        case TokenType::kControl:
        case TokenType::kUnknown:
        case TokenType::kUnused:
          break;  // decode to "", never matched by Encode
        case TokenType::kNormal:
        case TokenType::kUserDefined:
        default:
          t.decoded_[i] = t.pieces_[i];
          // First id wins for duplicate pieces (deterministic; real
          // vocabularies have none).
          t.lookup_.emplace(t.pieces_[i], id);
          break;
      }
    }
    return t;
  }

  // Parses a llama2.c tokenizer.bin held in memory. vocab_size > 0 reads
  // exactly that many tokens (llama2.c takes it from the model header) and
  // fails when the file holds fewer or more; 0 reads until the end.
  // BOS = 1, EOS = 2, unknown = 0 (llama2.c's fixed ids).
  static StatusOr<Tokenizer> FromLlama2cBytes(const uint8_t* data, size_t size,
                                              int vocab_size = 0) {
    if (vocab_size < 0) {
      return InvalidArgument("tokenizer: vocab_size %d < 0", vocab_size);
    }
    ByteReader r(data, size, "tokenizer");
    int32_t max_len = 0;
    LUTRA_RETURN_IF_ERROR(r.Read(&max_len, "max_token_length"));
    if (max_len <= 0 || max_len > (1 << 20)) {
      return DataLoss("tokenizer: max_token_length %d is not in [1, 1048576]", max_len);
    }
    std::vector<std::string> pieces;
    std::vector<float> scores;
    // Each token needs at least 8 bytes, which bounds the reservation.
    const size_t cap = r.remaining() / 8;
    const size_t expect = vocab_size > 0 ? static_cast<size_t>(vocab_size) : cap;
    if (vocab_size > 0 && expect > cap) {
      return DataLoss(
          "tokenizer: file of %zu bytes cannot hold %d tokens (at least 8 bytes each)", size,
          vocab_size);
    }
    pieces.reserve(expect);
    scores.reserve(expect);
    while (vocab_size > 0 ? pieces.size() < expect : r.remaining() > 0) {
      const size_t id = pieces.size();
      float score = 0;
      int32_t len = 0;
      const std::string what = "token " + std::to_string(id);
      LUTRA_RETURN_IF_ERROR(r.Read(&score, what + " score"));
      LUTRA_RETURN_IF_ERROR(r.Read(&len, what + " length"));
      if (len < 0 || len > max_len) {
        return DataLoss("tokenizer: token %zu has length %d, not in [0, max_token_length %d]",
                        id, len, max_len);
      }
      const uint8_t* bytes = nullptr;
      LUTRA_RETURN_IF_ERROR(r.Take(static_cast<uint64_t>(len), &bytes, what + " bytes"));
      pieces.emplace_back(reinterpret_cast<const char*>(bytes), static_cast<size_t>(len));
      scores.push_back(score);
    }
    if (r.remaining() != 0) {
      return DataLoss("tokenizer: %zu unexpected bytes after %zu tokens", r.remaining(),
                      pieces.size());
    }
    const int n = static_cast<int>(pieces.size());
    return FromVocab(std::move(pieces), std::move(scores), {}, n > 1 ? 1 : -1,
                     n > 2 ? 2 : -1, n > 0 ? 0 : -1);
  }

  // Reads a llama2.c tokenizer.bin file; see FromLlama2cBytes.
  static StatusOr<Tokenizer> FromLlama2cFile(const std::string& path, int vocab_size = 0) {
    StatusOr<MappedFile> file = MappedFile::Open(path);
    if (!file.ok()) return file.status();
    StatusOr<Tokenizer> t = FromLlama2cBytes(file->data(), file->size(), vocab_size);
    if (!t.ok()) return t.status().WithContext(path);
    return t;
  }

  // Reads the vocabulary from GGUF metadata. Only tokenizer.ggml.model
  // "llama" (SentencePiece BPE with scores) is supported; "gpt2"-style
  // byte-level BPE (Llama 3) is Unimplemented.
  static StatusOr<Tokenizer> FromGguf(const GgufReader& gguf) {
    StatusOr<std::string_view> model = gguf.GetString("tokenizer.ggml.model");
    if (!model.ok()) return model.status();
    if (*model != "llama") {
      return Unimplemented(
          "tokenizer: tokenizer.ggml.model '%s' is not supported (only 'llama', "
          "SentencePiece BPE)",
          std::string(*model).c_str());
    }
    StatusOr<std::vector<std::string_view>> tokens =
        gguf.GetStringArray("tokenizer.ggml.tokens");
    if (!tokens.ok()) return tokens.status();
    StatusOr<std::vector<float>> scores = gguf.GetF32Array("tokenizer.ggml.scores");
    if (!scores.ok()) return scores.status();
    std::vector<TokenType> types;
    if (gguf.Find("tokenizer.ggml.token_type") != nullptr) {
      StatusOr<std::vector<int64_t>> raw = gguf.GetIntArray("tokenizer.ggml.token_type");
      if (!raw.ok()) return raw.status();
      types.reserve(raw->size());
      for (size_t i = 0; i < raw->size(); ++i) {
        const int64_t v = (*raw)[i];
        if (v < 1 || v > 6) {
          return DataLoss("tokenizer: tokenizer.ggml.token_type[%zu] = %lld is not in [1, 6]",
                          i, static_cast<long long>(v));
        }
        types.push_back(static_cast<TokenType>(v));
      }
    }
    const int64_t kNone = -1;
    int64_t ids[3];
    const char* keys[3] = {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                           "tokenizer.ggml.unknown_token_id"};
    const int64_t defaults[3] = {1, 2, 0};  // SentencePiece Llama defaults
    for (int i = 0; i < 3; ++i) {
      StatusOr<int64_t> v = gguf.GetInt(keys[i], defaults[i]);
      if (!v.ok()) return v.status();
      // 0xFFFFFFFF (u32 -1) is how writers spell "no such token".
      ids[i] = (*v < 0 || *v >= static_cast<int64_t>(tokens->size())) ? kNone : *v;
      if (*v >= static_cast<int64_t>(tokens->size()) && *v != 0xFFFFFFFFll) {
        return DataLoss("tokenizer: %s = %lld is out of range for %zu tokens", keys[i],
                        static_cast<long long>(*v), tokens->size());
      }
    }
    StatusOr<bool> space = gguf.GetBool("tokenizer.ggml.add_space_prefix", true);
    if (!space.ok()) return space.status();
    std::vector<std::string> pieces;
    pieces.reserve(tokens->size());
    for (std::string_view tok : *tokens) pieces.push_back(ReplaceSpaceMarker(tok));
    return FromVocab(std::move(pieces), std::move(*scores), std::move(types),
                     static_cast<int>(ids[0]), static_cast<int>(ids[1]),
                     static_cast<int>(ids[2]), *space);
  }

  int vocab_size() const { return static_cast<int>(pieces_.size()); }
  int bos_id() const { return bos_id_; }  // -1 when none
  int eos_id() const { return eos_id_; }
  int unk_id() const { return unk_id_; }
  // Raw piece text (spaces as ' '), score and type. Precondition: 0 <= id < vocab_size.
  const std::string& piece(int id) const { return pieces_[id]; }
  float score(int id) const { return scores_[id]; }
  TokenType type(int id) const { return types_[id]; }
  // Id of a piece that Encode may produce, or -1.
  int Lookup(std::string_view piece) const {
    auto it = lookup_.find(std::string(piece));
    return it == lookup_.end() ? -1 : it->second;
  }

  // Tokenizes `text` (UTF-8; invalid bytes go through byte fallback).
  // Errors only when a byte has neither a piece nor a <0xXX> token and the
  // vocabulary has no unknown token, or BOS/EOS is requested but absent.
  StatusOr<std::vector<int>> Encode(std::string_view text, bool add_bos = true,
                                    bool add_eos = false) const {
    std::vector<int> tokens;
    tokens.reserve(text.size() + 3);
    if (add_bos) {
      if (bos_id_ < 0) return InvalidArgument("tokenizer: BOS requested but vocabulary has none");
      tokens.push_back(bos_id_);
    }
    if (add_space_prefix_ && !text.empty()) {
      const int space = Lookup(" ");
      if (space < 0) return InvalidArgument("tokenizer: no ' ' piece for the dummy prefix");
      tokens.push_back(space);
    }
    // One code point (lead byte + up to 3 continuation bytes) at a time, as
    // llama2.c does; a lone continuation byte is its own unit.
    size_t i = 0;
    while (i < text.size()) {
      size_t len = 1;
      while (i + len < text.size() && len < 4 &&
             (static_cast<uint8_t>(text[i + len]) & 0xC0) == 0x80) {
        ++len;
      }
      const int id = Lookup(text.substr(i, len));
      if (id >= 0) {
        tokens.push_back(id);
      } else {
        for (size_t b = 0; b < len; ++b) {
          const int byte_id = byte_tokens_[static_cast<uint8_t>(text[i + b])];
          if (byte_id >= 0) {
            tokens.push_back(byte_id);
          } else if (unk_id_ >= 0) {
            tokens.push_back(unk_id_);
          } else {
            return InvalidArgument(
                "tokenizer: byte 0x%02X at offset %zu has no token and no unknown token",
                static_cast<unsigned>(static_cast<uint8_t>(text[i + b])), i + b);
          }
        }
      }
      i += len;
    }
    // Greedy merges in llama2.c's order: repeatedly the adjacent pair whose
    // concatenation is a piece with the highest score (leftmost on ties;
    // scores <= -1e10 or NaN never merge). llama2.c rescans all pairs after
    // each merge (O(n^2) lookups); here a heap of candidate pairs over a
    // linked list of symbols gives the same sequence of merges in
    // O(n log n): symbols never reorder, so "leftmost" is "smallest original
    // index", and a candidate whose sides changed since it was pushed is
    // skipped when popped. Only pieces Encode may produce take part (byte and
    // control tokens never merge, as in SentencePiece).
    const size_t n = tokens.size();
    constexpr size_t kNone = ~size_t{0};
    std::vector<size_t> next(n), prev(n);
    for (size_t k = 0; k < n; ++k) {
      next[k] = k + 1 < n ? k + 1 : kNone;
      prev[k] = k == 0 ? kNone : k - 1;
    }
    struct Candidate {
      float score;
      size_t left;
      int left_id, right_id, merged;
    };
    const auto lower = [](const Candidate& a, const Candidate& b) {
      return a.score < b.score || (a.score == b.score && a.left > b.left);
    };
    std::priority_queue<Candidate, std::vector<Candidate>, decltype(lower)> heap(lower);
    std::string pair;
    const auto consider = [&](size_t left) {
      const size_t right = next[left];
      if (right == kNone) return;
      const int a = tokens[left], b = tokens[right];
      if (!Mergeable(a) || !Mergeable(b)) return;
      pair.assign(pieces_[a]);
      pair.append(pieces_[b]);
      const int id = Lookup(pair);
      if (id >= 0 && scores_[id] > -1e10f) heap.push({scores_[id], left, a, b, id});
    };
    for (size_t k = 0; k + 1 < n; ++k) consider(k);
    std::vector<bool> alive(n, true);
    while (!heap.empty()) {
      const Candidate c = heap.top();
      heap.pop();
      const size_t right = next[c.left];
      if (!alive[c.left] || right == kNone || tokens[c.left] != c.left_id ||
          tokens[right] != c.right_id) {
        continue;  // stale: a side was merged away since this was pushed
      }
      tokens[c.left] = c.merged;
      alive[right] = false;
      next[c.left] = next[right];
      if (next[right] != kNone) prev[next[right]] = c.left;
      if (prev[c.left] != kNone) consider(prev[c.left]);
      consider(c.left);
    }
    size_t out = 0;
    for (size_t k = 0; k < n; ++k) {
      if (alive[k]) tokens[out++] = tokens[k];
    }
    tokens.resize(out);
    if (add_eos) {
      if (eos_id_ < 0) return InvalidArgument("tokenizer: EOS requested but vocabulary has none");
      tokens.push_back(eos_id_);
    }
    return tokens;
  }

  // Text of `token` when it follows `prev_token` (pass -1 for none): the
  // leading space is dropped right after BOS, byte tokens become that raw
  // byte, control/unknown/unused tokens are "". The bytes are not sanitized:
  // a byte token may be half of a UTF-8 sequence or a control character.
  StatusOr<std::string_view> Decode(int prev_token, int token) const {
    if (token < 0 || token >= vocab_size()) {
      return OutOfRange("tokenizer: token %d out of range [0, %d)", token, vocab_size());
    }
    std::string_view s = decoded_[token];
    if (prev_token >= 0 && prev_token == bos_id_ && !s.empty() && s[0] == ' ' &&
        types_[token] != TokenType::kByte) {
      s.remove_prefix(1);
    }
    return s;
  }

  // Concatenated Decode of a sequence (each token decoded after its predecessor).
  StatusOr<std::string> DecodeAll(const std::vector<int>& tokens) const {
    std::string out;
    int prev = -1;
    for (int t : tokens) {
      StatusOr<std::string_view> s = Decode(prev, t);
      if (!s.ok()) return s.status();
      out.append(s->data(), s->size());
      prev = t;
    }
    return out;
  }

  // "<0xXX>" -> XX (0..255), anything else -> -1.
  static int ParseBytePiece(std::string_view s) {
    if (s.size() != 6 || s.compare(0, 3, "<0x") != 0 || s[5] != '>') return -1;
    int v = 0;
    for (int i = 3; i < 5; ++i) {
      const char c = s[i];
      int d = 0;
      if (c >= '0' && c <= '9') {
        d = c - '0';
      } else if (c >= 'A' && c <= 'F') {
        d = c - 'A' + 10;
      } else if (c >= 'a' && c <= 'f') {
        d = c - 'a' + 10;
      } else {
        return -1;
      }
      v = v * 16 + d;
    }
    return v;
  }

 private:
  bool Mergeable(int id) const {
    const TokenType t = types_[id];
    return t == TokenType::kNormal || t == TokenType::kUserDefined;
  }

  // SentencePiece writes spaces as U+2581 (UTF-8 E2 96 81).
  static std::string ReplaceSpaceMarker(std::string_view s) {
    std::string out;
    out.reserve(s.size());
    for (size_t i = 0; i < s.size(); ++i) {
      if (i + 2 < s.size() && static_cast<uint8_t>(s[i]) == 0xE2 &&
          static_cast<uint8_t>(s[i + 1]) == 0x96 && static_cast<uint8_t>(s[i + 2]) == 0x81) {
        out.push_back(' ');
        i += 2;
      } else {
        out.push_back(s[i]);
      }
    }
    return out;
  }

  // For error messages: at most 32 bytes, non-printable as \xNN.
  static std::string Printable(std::string_view s) {
    std::string out;
    for (size_t i = 0; i < s.size() && i < 32; ++i) {
      const unsigned char c = static_cast<unsigned char>(s[i]);
      if (c >= 0x20 && c < 0x7F) {
        out.push_back(static_cast<char>(c));
      } else {
        char buf[8];
        std::snprintf(buf, sizeof(buf), "\\x%02X", c);
        out += buf;
      }
    }
    return out;
  }

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::vector<TokenType> types_;
  std::vector<std::string> decoded_;
  std::unordered_map<std::string, int> lookup_;
  int byte_tokens_[256] = {};
  int bos_id_ = -1, eos_id_ = -1, unk_id_ = -1;
  bool add_space_prefix_ = true;
};

}  // namespace lutra

#endif  // LUTRA_TOKENIZER_H_
