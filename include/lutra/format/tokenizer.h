// Tokenizers of GGUF / llama2.c vocabularies: SentencePiece-style BPE
// (Llama 1/2, tokenizer.ggml.model "llama") and byte-level BPE (GPT-2, Llama 3,
// Qwen2, ...: tokenizer.ggml.model "gpt2").
//
// Sources:
//  - llama2.c tokenizer.bin: int32 max_token_length, then per token
//    f32 score, int32 byte length, bytes (no terminator). The file does not
//    store the vocabulary size; it is the model's vocab_size (or "until EOF").
//  - GGUF metadata (see gguf.h): tokenizer.ggml.tokens / scores / token_type,
//    bos/eos/unknown ids, add_space_prefix; "▁" (U+2581) in pieces is the space.
//    Byte-level BPE: tokenizer.ggml.merges ("left right", rank = index) and
//    tokenizer.ggml.pre (the pre-tokenizer, see pretokenizer.h).
//
// Special tokens: before either tokenizer runs, USER_DEFINED pieces are cut
// out of the raw text verbatim (longest piece first, as llama.cpp and Hugging
// Face do), and CONTROL/UNKNOWN pieces too when the caller asks
// (parse_special); each becomes its token and the text between them is
// tokenized normally.
//
// SentencePiece Encode follows llama2.c's run.c exactly (that is what the
// reference outputs were produced with, and it agrees with llama.cpp): a " "
// dummy-prefix token when the text is non-empty (per text fragment that
// starts the text or follows a special token); each UTF-8 code point (at most
// 4 bytes) looked up as a piece, else emitted as <0xXX> byte-fallback tokens;
// then repeatedly merge the adjacent pair whose concatenation is a piece with
// the highest score (first such pair on ties; scores <= -1e10 never merge).
// Decode: a piece's text, with the leading space stripped right after BOS,
// <0xXX> tokens as the raw byte, and control tokens (BOS/EOS/unknown) as "".
//
// Byte-level BPE Encode (llama.cpp's llm_tokenizer_bpe): split the text with
// the pre-tokenizer's regexes; in each chunk, every byte is one symbol (the
// token of its GPT-2 alphabet character); repeatedly merge the adjacent pair
// with the lowest merge rank (leftmost on ties). No dummy prefix. Decode maps
// the alphabet back to bytes (Ġ -> ' '); USER_DEFINED pieces are raw text.
//
// Plain header; no exceptions; errors are Status.
#ifndef LUTRA_TOKENIZER_H_
#define LUTRA_TOKENIZER_H_

#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <cstdio>
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
#include "lutra/format/pretokenizer.h"

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
    StatusOr<Tokenizer> started =
        Start(std::move(pieces), std::move(types), bos_id, eos_id, unk_id, /*byte_pieces=*/true);
    if (!started.ok()) return started.status();
    if (scores.size() != n) {
      return InvalidArgument("tokenizer: %zu scores for %zu tokens", scores.size(), n);
    }
    Tokenizer& t = *started;
    t.scores_ = std::move(scores);
    t.add_space_prefix_ = add_space_prefix;
    LUTRA_RETURN_IF_ERROR(t.IndexPieces());
    return started;
  }

  // Builds a byte-level BPE tokenizer from parallel arrays as GGUF stores
  // them: normal pieces in GPT-2's byte alphabet ("Ġthe"), control and
  // user-defined pieces as raw text ("<|endoftext|>"). types may be empty
  // (bos/eos control, unk unknown, all others normal). merges[r] is
  // "left right", the merge of rank r; both sides and their concatenation
  // must be pieces (a repeated pair keeps its first rank). Ids < 0 mean "none".
  static StatusOr<Tokenizer> FromBpeVocab(std::vector<std::string> pieces,
                                          std::vector<TokenType> types,
                                          const std::vector<std::string_view>& merges,
                                          PreTokenizerSpec pre, int bos_id, int eos_id,
                                          int unk_id) {
    const size_t n = pieces.size();
    StatusOr<Tokenizer> started =
        Start(std::move(pieces), std::move(types), bos_id, eos_id, unk_id, /*byte_pieces=*/false);
    if (!started.ok()) return started.status();
    Tokenizer& t = *started;
    t.byte_level_ = true;
    t.pre_ = pre;
    t.add_space_prefix_ = false;
    // llama.cpp's default: BOS only for Llama 3's pre-tokenizer.
    t.add_bos_token_ = pre.kind == PreTokenizer::kLlama3 && pre.ignore_merges;
    t.scores_.assign(n, 0.0f);
    // Pieces as stored, for the merges and the alphabet (first id wins).
    std::unordered_map<std::string_view, int> ids;
    ids.reserve(n);
    for (size_t i = 0; i < n; ++i) ids.emplace(t.pieces_[i], static_cast<int>(i));
    for (int b = 0; b < 256; ++b) {
      std::string c;
      AppendUtf8(ByteToCodePoint(static_cast<uint8_t>(b)), &c);
      auto it = ids.find(c);
      if (it != ids.end()) t.byte_tokens_[b] = it->second;
    }
    LUTRA_RETURN_IF_ERROR(t.IndexPieces());
    if (merges.size() > static_cast<size_t>(INT32_MAX)) {
      return InvalidArgument("tokenizer: %zu merges are too many", merges.size());
    }
    t.merges_.reserve(merges.size());
    for (size_t r = 0; r < merges.size(); ++r) {
      const std::string_view m = merges[r];
      const size_t space = m.size() > 1 ? m.find(' ', 1) : std::string_view::npos;
      if (space == std::string_view::npos) {
        return DataLoss("tokenizer: tokenizer.ggml.merges[%zu] = '%s' is not two pieces "
                        "separated by a space", r, Printable(m).c_str());
      }
      const std::string_view left = m.substr(0, space), right = m.substr(space + 1);
      const std::string merged = std::string(left) + std::string(right);
      const std::string_view parts[3] = {left, right, merged};
      int part_ids[3];
      for (int k = 0; k < 3; ++k) {
        auto it = ids.find(parts[k]);
        if (it == ids.end()) {
          return DataLoss("tokenizer: tokenizer.ggml.merges[%zu] = '%s': '%s' is not in the "
                          "vocabulary", r, Printable(m).c_str(), Printable(parts[k]).c_str());
        }
        part_ids[k] = it->second;
      }
      t.merges_.emplace(PairKey(part_ids[0], part_ids[1]),
                        Merge{static_cast<int>(r), part_ids[2]});
    }
    return started;
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

  // Reads the vocabulary from GGUF metadata: tokenizer.ggml.model "llama"
  // (SentencePiece BPE with scores) or "gpt2" (byte-level BPE with merges
  // and the pre-tokenizer named by tokenizer.ggml.pre; absent = "default").
  static StatusOr<Tokenizer> FromGguf(const GgufReader& gguf) {
    StatusOr<std::string_view> model = gguf.GetString("tokenizer.ggml.model");
    if (!model.ok()) return model.status();
    const bool spm = *model == "llama";
    if (!spm && *model != "gpt2") {
      return Unimplemented(
          "tokenizer: tokenizer.ggml.model '%s' is not supported (only 'llama', "
          "SentencePiece BPE, and 'gpt2', byte-level BPE)",
          std::string(*model).c_str());
    }
    StatusOr<std::vector<std::string_view>> tokens =
        gguf.GetStringArray("tokenizer.ggml.tokens");
    if (!tokens.ok()) return tokens.status();
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
    // SentencePiece Llama defaults; byte-level vocabularies have no fixed ids.
    const int64_t spm_defaults[3] = {1, 2, 0};
    for (int i = 0; i < 3; ++i) {
      StatusOr<int64_t> v = gguf.GetInt(keys[i], spm ? spm_defaults[i] : kNone);
      if (!v.ok()) return v.status();
      // 0xFFFFFFFF (u32 -1) is how writers spell "no such token".
      ids[i] = (*v < 0 || *v >= static_cast<int64_t>(tokens->size())) ? kNone : *v;
      if (*v >= static_cast<int64_t>(tokens->size()) && *v != 0xFFFFFFFFll) {
        return DataLoss("tokenizer: %s = %lld is out of range for %zu tokens", keys[i],
                        static_cast<long long>(*v), tokens->size());
      }
    }
    std::vector<std::string> pieces;
    pieces.reserve(tokens->size());
    StatusOr<Tokenizer> t = Tokenizer();
    if (spm) {
      StatusOr<std::vector<float>> scores = gguf.GetF32Array("tokenizer.ggml.scores");
      if (!scores.ok()) return scores.status();
      StatusOr<bool> space = gguf.GetBool("tokenizer.ggml.add_space_prefix", true);
      if (!space.ok()) return space.status();
      for (std::string_view tok : *tokens) pieces.push_back(ReplaceSpaceMarker(tok));
      t = FromVocab(std::move(pieces), std::move(*scores), std::move(types),
                    static_cast<int>(ids[0]), static_cast<int>(ids[1]),
                    static_cast<int>(ids[2]), *space);
    } else {
      StatusOr<std::vector<std::string_view>> merges =
          gguf.GetStringArray("tokenizer.ggml.merges");
      if (!merges.ok()) return merges.status();
      StatusOr<std::string_view> pre_name = gguf.GetString("tokenizer.ggml.pre", "");
      if (!pre_name.ok()) return pre_name.status();
      StatusOr<PreTokenizerSpec> pre = PreTokenizerFromName(*pre_name);
      if (!pre.ok()) return pre.status();
      for (std::string_view tok : *tokens) pieces.emplace_back(tok);
      t = FromBpeVocab(std::move(pieces), std::move(types), *merges, *pre,
                       static_cast<int>(ids[0]), static_cast<int>(ids[1]),
                       static_cast<int>(ids[2]));
    }
    if (!t.ok()) return t.status();
    StatusOr<bool> add_bos = gguf.GetBool("tokenizer.ggml.add_bos_token", t->add_bos_token_);
    if (!add_bos.ok()) return add_bos.status();
    t->add_bos_token_ = *add_bos;
    return t;
  }

  int vocab_size() const { return static_cast<int>(pieces_.size()); }
  int bos_id() const { return bos_id_; }  // -1 when none
  int eos_id() const { return eos_id_; }
  int unk_id() const { return unk_id_; }
  // Byte-level BPE (tokenizer.ggml.model "gpt2") rather than SentencePiece.
  bool byte_level() const { return byte_level_; }
  PreTokenizerSpec pre_tokenizer() const { return pre_; }
  // Whether the model expects a BOS at the start of a prompt
  // (tokenizer.ggml.add_bos_token; true for SentencePiece and Llama 3 when
  // absent). Encode does not read it: callers pass add_bos.
  bool add_bos_token() const { return add_bos_token_; }
  // Byte-level merges as GGUF stores them ("left right", lowest rank first).
  std::vector<std::string> Merges() const {
    std::vector<std::pair<int, uint64_t>> by_rank;
    by_rank.reserve(merges_.size());
    for (const auto& m : merges_) by_rank.emplace_back(m.second.rank, m.first);
    std::sort(by_rank.begin(), by_rank.end());
    std::vector<std::string> out;
    out.reserve(by_rank.size());
    for (const auto& m : by_rank) {
      out.push_back(pieces_[m.second >> 32] + " " + pieces_[m.second & 0xFFFFFFFFu]);
    }
    return out;
  }
  // Raw piece text (spaces as ' '; byte-level pieces as stored, "Ġthe"),
  // score and type. Precondition: 0 <= id < vocab_size.
  const std::string& piece(int id) const { return pieces_[id]; }
  float score(int id) const { return scores_[id]; }
  TokenType type(int id) const { return types_[id]; }
  // Id of a normal or user-defined piece with this text (for byte-level
  // vocabularies: these raw bytes, " the"), or -1.
  int Lookup(std::string_view piece) const {
    auto it = lookup_.find(std::string(piece));
    return it == lookup_.end() ? -1 : it->second;
  }

  // Tokenizes `text` (UTF-8; invalid bytes go through byte fallback).
  // USER_DEFINED pieces in the text always become their token; with
  // parse_special, CONTROL and UNKNOWN pieces ("<|endoftext|>", "<s>") too.
  // Errors only when a byte has no token and the vocabulary has no unknown
  // token, or BOS/EOS is requested but absent.
  StatusOr<std::vector<int>> Encode(std::string_view text, bool add_bos = true,
                                    bool add_eos = false, bool parse_special = false) const {
    std::vector<int> tokens;
    tokens.reserve(text.size() + 3);
    if (add_bos) {
      if (bos_id_ < 0) return InvalidArgument("tokenizer: BOS requested but vocabulary has none");
      tokens.push_back(bos_id_);
    }
    // SentencePiece adds the dummy prefix to the text at the start and after
    // each special token (llama.cpp's is_prev_special).
    bool after_special = true;
    for (const Fragment& f : Partition(text, parse_special)) {
      if (f.id >= 0) {
        tokens.push_back(f.id);
        after_special = true;
        continue;
      }
      const std::string_view part = text.substr(f.begin, f.size);
      LUTRA_RETURN_IF_ERROR(byte_level_ ? EncodeBpe(part, f.begin, &tokens)
                                        : EncodeSpm(part, f.begin,
                                                    add_space_prefix_ && after_special,
                                                    &tokens));
      after_special = false;
    }
    if (add_eos) {
      if (eos_id_ < 0) return InvalidArgument("tokenizer: EOS requested but vocabulary has none");
      tokens.push_back(eos_id_);
    }
    return tokens;
  }

  // Text of `token` when it follows `prev_token` (pass -1 for none): for
  // SentencePiece the leading space is dropped right after BOS; byte tokens
  // become that raw byte, byte-level pieces their bytes ("Ġ" -> ' '),
  // user-defined pieces their text, control/unknown/unused tokens "". The
  // bytes are not sanitized: a token may be part of a UTF-8 sequence or a
  // control character, so stream by concatenating bytes.
  StatusOr<std::string_view> Decode(int prev_token, int token) const {
    if (token < 0 || token >= vocab_size()) {
      return OutOfRange("tokenizer: token %d out of range [0, %d)", token, vocab_size());
    }
    std::string_view s = decoded_[token];
    if (!byte_level_ && prev_token >= 0 && prev_token == bos_id_ && !s.empty() &&
        s[0] == ' ' && types_[token] != TokenType::kByte) {
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
  struct Merge {
    int rank;
    int result;
  };
  // A piece of the text to encode, or a special token cut out of it.
  struct Fragment {
    size_t begin, size;
    int id;  // >= 0: this special token; -1: text
  };

  static uint64_t PairKey(int left, int right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }

  // Checks what both vocabulary kinds share and fills in pieces, types (the
  // defaults when empty; "<0xXX>" pieces are bytes only if byte_pieces), the
  // special ids and the special-token list.
  static StatusOr<Tokenizer> Start(std::vector<std::string> pieces, std::vector<TokenType> types,
                                   int bos_id, int eos_id, int unk_id, bool byte_pieces) {
    const size_t n = pieces.size();
    if (n == 0) return InvalidArgument("tokenizer: empty vocabulary");
    if (n > static_cast<size_t>(INT32_MAX)) {
      return InvalidArgument("tokenizer: vocabulary of %zu tokens is too large", n);
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
    t.bos_id_ = bos_id < 0 ? -1 : bos_id;
    t.eos_id_ = eos_id < 0 ? -1 : eos_id;
    t.unk_id_ = unk_id < 0 ? -1 : unk_id;
    if (types.empty()) {
      types.assign(n, TokenType::kNormal);
      for (size_t i = 0; byte_pieces && i < n; ++i) {
        if (ParseBytePiece(t.pieces_[i]) >= 0) types[i] = TokenType::kByte;
      }
      if (t.unk_id_ >= 0) types[t.unk_id_] = TokenType::kUnknown;
      if (t.bos_id_ >= 0) types[t.bos_id_] = TokenType::kControl;
      if (t.eos_id_ >= 0) types[t.eos_id_] = TokenType::kControl;
    }
    t.types_ = std::move(types);
    for (int& b : t.byte_tokens_) b = -1;
    // Special pieces, longest first (ties by id, so the order is
    // deterministic): llama.cpp cuts each one out of the text in this order.
    for (size_t i = 0; i < n; ++i) {
      const TokenType type = t.types_[i];
      if ((type == TokenType::kControl || type == TokenType::kUnknown ||
           type == TokenType::kUserDefined) &&
          !t.pieces_[i].empty()) {
        t.specials_.push_back(static_cast<int>(i));
      }
    }
    std::stable_sort(t.specials_.begin(), t.specials_.end(), [&t](int a, int b) {
      return t.pieces_[a].size() > t.pieces_[b].size();
    });
    return t;
  }

  // Fills decoded_, lookup_ and the <0xXX> byte tokens from pieces_ and
  // types_ (byte_level_ set first; for byte-level vocabularies the alphabet's
  // byte_tokens_ too, which <0xXX> pieces do not override).
  Status IndexPieces() {
    const size_t n = pieces_.size();
    decoded_.resize(n);
    lookup_.reserve(n);
    std::string raw;
    for (size_t i = 0; i < n; ++i) {
      const int id = static_cast<int>(i);
      const std::string& piece = pieces_[i];
      switch (types_[i]) {
        case TokenType::kByte:
          LUTRA_RETURN_IF_ERROR(AddByteToken(id));
          break;
        case TokenType::kControl:
        case TokenType::kUnknown:
        case TokenType::kUnused:
          break;  // decode to "", never matched by Encode
        case TokenType::kNormal:
        case TokenType::kUserDefined:
        default:
          if (!byte_level_) {
            decoded_[i] = piece;
            // First id wins for duplicate pieces (deterministic; real
            // vocabularies have none).
            lookup_.emplace(piece, id);
          } else {
            // Normal pieces are in the byte alphabet, user-defined ones raw
            // text; a normal piece outside the alphabet cannot come out of
            // Encode and decodes to its own text.
            const bool alphabet = DecodeByteLevel(piece, &raw);
            const bool user = types_[i] == TokenType::kUserDefined;
            decoded_[i] = (alphabet && !user) ? raw : piece;
            if (alphabet) lookup_.emplace(raw, id);
          }
          break;
      }
    }
    return Status();
  }

  // Registers <0xXX> byte token `id`.
  Status AddByteToken(int id) {
    const int byte = ParseBytePiece(pieces_[id]);
    if (byte < 0) {
      return InvalidArgument("tokenizer: byte token %d is '%s', expected <0xXX>", id,
                             Printable(pieces_[id]).c_str());
    }
    if (byte_tokens_[byte] < 0) byte_tokens_[byte] = id;
    decoded_[id] = std::string(1, static_cast<char>(byte));
    return Status();
  }

  // Cuts the special pieces out of `text` as llama.cpp's
  // tokenizer_st_partition does: for each piece, longest first, every
  // non-overlapping occurrence (leftmost first) inside a remaining text
  // fragment becomes that token. User-defined pieces always, control and
  // unknown ones only with parse_special. Empty text gives no fragments.
  std::vector<Fragment> Partition(std::string_view text, bool parse_special) const {
    std::vector<Fragment> frags;
    if (text.empty()) return frags;
    frags.push_back({0, text.size(), -1});
    std::vector<Fragment> next;
    for (const int id : specials_) {
      if (!parse_special && types_[id] != TokenType::kUserDefined) continue;
      const std::string& s = pieces_[id];
      if (text.find(s) == std::string_view::npos) continue;  // the common case
      next.clear();
      for (const Fragment& f : frags) {
        if (f.id >= 0) {
          next.push_back(f);
          continue;
        }
        const size_t end = f.begin + f.size;
        const std::string_view window = text.substr(0, end);
        size_t pos = f.begin;
        for (;;) {
          const size_t m = window.find(s, pos);
          if (m == std::string_view::npos) break;
          if (m > pos) next.push_back({pos, m - pos, -1});
          next.push_back({m, s.size(), id});
          pos = m + s.size();
        }
        if (pos < end) next.push_back({pos, end - pos, -1});
      }
      frags.swap(next);
    }
    return frags;
  }

  // Applies merges to (*tokens)[first, end) in place until none applies:
  // repeatedly the adjacent pair with the highest priority, the leftmost on
  // ties. pair(a, b, &priority, &merged) says whether a and b merge.
  // Rescanning all pairs after each merge (llama2.c) is O(n^2) lookups; a
  // heap of candidate pairs over a linked list of symbols gives the same
  // sequence of merges in O(n log n): symbols never reorder, so "leftmost" is
  // "smallest original index", and a candidate whose sides changed since it
  // was pushed is skipped when popped.
  template <class PairFn>
  static void MergePairs(std::vector<int>* tokens, size_t first, const PairFn& pair) {
    int* sym = tokens->data() + first;
    const size_t n = tokens->size() - first;
    constexpr size_t kNone = ~size_t{0};
    std::vector<size_t> next(n), prev(n);
    for (size_t k = 0; k < n; ++k) {
      next[k] = k + 1 < n ? k + 1 : kNone;
      prev[k] = k == 0 ? kNone : k - 1;
    }
    struct Candidate {
      double priority;
      size_t left;
      int left_id, right_id, merged;
    };
    const auto lower = [](const Candidate& a, const Candidate& b) {
      return a.priority < b.priority || (a.priority == b.priority && a.left > b.left);
    };
    std::priority_queue<Candidate, std::vector<Candidate>, decltype(lower)> heap(lower);
    const auto consider = [&](size_t left) {
      const size_t right = next[left];
      if (right == kNone) return;
      double priority = 0;
      int merged = -1;
      if (pair(sym[left], sym[right], &priority, &merged)) {
        heap.push({priority, left, sym[left], sym[right], merged});
      }
    };
    for (size_t k = 0; k + 1 < n; ++k) consider(k);
    std::vector<bool> alive(n, true);
    while (!heap.empty()) {
      const Candidate c = heap.top();
      heap.pop();
      const size_t right = next[c.left];
      if (!alive[c.left] || right == kNone || sym[c.left] != c.left_id ||
          sym[right] != c.right_id) {
        continue;  // stale: a side was merged away since this was pushed
      }
      sym[c.left] = c.merged;
      alive[right] = false;
      next[c.left] = next[right];
      if (next[right] != kNone) prev[next[right]] = c.left;
      if (prev[c.left] != kNone) consider(prev[c.left]);
      consider(c.left);
    }
    size_t out = 0;
    for (size_t k = 0; k < n; ++k) {
      if (alive[k]) sym[out++] = sym[k];
    }
    tokens->resize(first + out);
  }

  // SentencePiece: appends the tokens of `text` (which starts at byte
  // `offset` of the caller's text, for messages), after a dummy-prefix " "
  // token if `prefix`.
  Status EncodeSpm(std::string_view text, size_t offset, bool prefix,
                   std::vector<int>* tokens) const {
    const size_t first = tokens->size();
    if (prefix) {
      const int space = Lookup(" ");
      if (space < 0) return InvalidArgument("tokenizer: no ' ' piece for the dummy prefix");
      tokens->push_back(space);
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
        tokens->push_back(id);
      } else {
        for (size_t b = 0; b < len; ++b) {
          LUTRA_RETURN_IF_ERROR(PushByte(static_cast<uint8_t>(text[i + b]), offset + i + b,
                                         tokens));
        }
      }
      i += len;
    }
    // Only pieces Encode may produce take part (byte and control tokens never
    // merge, as in SentencePiece); scores <= -1e10 or NaN never merge.
    std::string joined;
    MergePairs(tokens, first, [&](int a, int b, double* priority, int* merged) {
      if (!Mergeable(a) || !Mergeable(b)) return false;
      joined.assign(pieces_[a]);
      joined.append(pieces_[b]);
      const int id = Lookup(joined);
      if (id < 0 || !(scores_[id] > -1e10f)) return false;
      *priority = scores_[id];
      *merged = id;
      return true;
    });
    return Status();
  }

  // Byte-level BPE: appends the tokens of `text` (at byte `offset` of the
  // caller's text).
  Status EncodeBpe(std::string_view text, size_t offset, std::vector<int>* tokens) const {
    size_t begin = 0;
    for (const size_t end : PreTokenize(pre_.kind, text)) {
      const std::string_view chunk = text.substr(begin, end - begin);
      const size_t chunk_offset = offset + begin;
      begin = end;
      if (pre_.ignore_merges) {
        const int id = Lookup(chunk);
        if (id >= 0) {
          tokens->push_back(id);
          continue;
        }
      }
      const size_t first = tokens->size();
      for (size_t i = 0; i < chunk.size(); ++i) {
        const uint8_t byte = static_cast<uint8_t>(chunk[i]);
        if (byte_tokens_[byte] >= 0) {
          tokens->push_back(byte_tokens_[byte]);
        } else {
          LUTRA_RETURN_IF_ERROR(PushByte(byte, chunk_offset + i, tokens));
        }
      }
      MergePairs(tokens, first, [&](int a, int b, double* priority, int* merged) {
        auto it = merges_.find(PairKey(a, b));
        if (it == merges_.end()) return false;
        *priority = -static_cast<double>(it->second.rank);  // lowest rank first
        *merged = it->second.result;
        return true;
      });
    }
    return Status();
  }

  // Byte fallback: the byte's token, else the unknown token, else an error.
  Status PushByte(uint8_t byte, size_t offset, std::vector<int>* tokens) const {
    if (byte_tokens_[byte] >= 0) {
      tokens->push_back(byte_tokens_[byte]);
    } else if (unk_id_ >= 0) {
      tokens->push_back(unk_id_);
    } else {
      return InvalidArgument(
          "tokenizer: byte 0x%02X at offset %zu has no token and no unknown token",
          static_cast<unsigned>(byte), offset);
    }
    return Status();
  }

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
  int byte_tokens_[256] = {};  // <0xXX> tokens; byte-level: the alphabet's
  int bos_id_ = -1, eos_id_ = -1, unk_id_ = -1;
  bool add_space_prefix_ = true;
  bool add_bos_token_ = true;
  bool byte_level_ = false;
  PreTokenizerSpec pre_;
  std::vector<int> specials_;  // control/unknown/user-defined, longest first
  std::unordered_map<uint64_t, Merge> merges_;  // PairKey(left, right)
};

}  // namespace lutra

#endif  // LUTRA_TOKENIZER_H_
