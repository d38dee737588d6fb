// Tokenizer: llama2.c tokenizer.bin and the GGUF vocabulary of the shared
// stories260K model give identical encodings ("Zoo" = 1 410 469 347 as in
// the README), decoding round-trips arbitrary bytes, the merge rule matches a
// naive reimplementation of llama2.c's loop, and corrupt files are rejected
// with clear messages. Byte-level BPE on a small synthetic vocabulary: merge
// ranks, pre-tokenizer splits, special tokens, byte fallback, decoding and
// merge-list validation (the real vocabularies are in vocab_test.cc).
#include "lutra/format/tokenizer.h"

#include <cstring>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "lutra/format/gguf.h"
#include "lutra/format/gguf_writer.h"
#include "lutra/format/lutra_file.h"
#include "lutra/format/mapped_file.h"
#include "lutra/format/pretokenizer.h"
#include "tests/test_util.h"

namespace lutra {
namespace {

using test::Contains;

// Texts covering ASCII, spaces, newlines, multi-byte UTF-8 (2, 3, 4 bytes),
// invalid UTF-8 (lone continuation, truncated lead, 0xFF), NUL and controls.
std::vector<std::string> Texts() {
  return {"Zoo",
          "",
          " ",
          "  two leading spaces",
          "Once upon a time, there was a little girl named Lily.",
          "She said, \"Hi!\"\nThen\tshe left...\n\n",
          "caf\xC3\xA9 na\xC3\xAFve \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x98\x80!",
          std::string("nul\0byte", 8),
          "\x80\x80 lone continuation, truncated lead \xE6\x97, bad \xFF\xFE",
          "\x01\x02\x7F",
          "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"};
}

// llama2.c's encode() loop written independently (vector of strings, pieces
// compared by text), used to check Tokenizer::Encode's merges.
std::vector<int> NaiveEncode(const Tokenizer& t, const std::string& text) {
  std::vector<int> ids = {t.bos_id()};
  if (!text.empty()) ids.push_back(t.Lookup(" "));
  for (size_t i = 0; i < text.size();) {
    size_t len = 1;
    while (i + len < text.size() && len < 4 && (static_cast<uint8_t>(text[i + len]) & 0xC0) == 0x80) {
      ++len;
    }
    const int id = t.Lookup(text.substr(i, len));
    if (id >= 0) {
      ids.push_back(id);
    } else {
      for (size_t b = 0; b < len; ++b) {
        char name[8];
        std::snprintf(name, sizeof(name), "<0x%02X>", static_cast<uint8_t>(text[i + b]));
        int byte_id = -1;
        for (int v = 0; v < t.vocab_size(); ++v) {
          if (t.piece(v) == name) byte_id = v;
        }
        ids.push_back(byte_id);
      }
    }
    i += len;
  }
  for (;;) {
    float best = -1e10f;
    int best_id = -1;
    size_t best_i = 0;
    for (size_t i = 0; i + 1 < ids.size(); ++i) {
      if (t.type(ids[i]) != TokenType::kNormal || t.type(ids[i + 1]) != TokenType::kNormal) continue;
      const int id = t.Lookup(t.piece(ids[i]) + t.piece(ids[i + 1]));
      if (id >= 0 && t.score(id) > best) {
        best = t.score(id);
        best_id = id;
        best_i = i;
      }
    }
    if (best_id < 0) break;
    ids[best_i] = best_id;
    ids.erase(ids.begin() + static_cast<ptrdiff_t>(best_i) + 1);
  }
  return ids;
}

struct Tokenizers {
  Tokenizer bin, gguf;
};

bool LoadShared(Tokenizers* out) {
  const std::string dir = test::SharedModelsDir();
  if (dir.empty()) return false;
  StatusOr<Tokenizer> bin = Tokenizer::FromLlama2cFile(dir + "/tok512.bin", 512);
  INFO(bin.status().message());
  REQUIRE(bin.ok());
  StatusOr<GgufFile> g = GgufFile::Open(dir + "/stories260K.gguf");
  REQUIRE(g.ok());
  StatusOr<Tokenizer> gg = Tokenizer::FromGguf(g->reader());
  INFO(gg.status().message());
  REQUIRE(gg.ok());
  out->bin = std::move(*bin);
  out->gguf = std::move(*gg);
  return true;
}

TEST_CASE("Tokenizer: 'Zoo' encodes as in llama2.c, from both sources") {
  Tokenizers t;
  if (!LoadShared(&t)) SKIP("shared models not found (../shared/models)");
  for (const Tokenizer* tok : {&t.bin, &t.gguf}) {
    CHECK(tok->vocab_size() == 512);
    CHECK(tok->bos_id() == 1);
    CHECK(tok->eos_id() == 2);
    CHECK(tok->unk_id() == 0);
    StatusOr<std::vector<int>> ids = tok->Encode("Zoo");
    REQUIRE(ids.ok());
    CHECK(*ids == std::vector<int>{1, 410, 469, 347});
    CHECK(*tok->Encode("Zoo", /*add_bos=*/false, /*add_eos=*/true) ==
          std::vector<int>{410, 469, 347, 2});
    CHECK(*tok->DecodeAll(*ids) == "Zoo");
    CHECK(tok->piece(410) == " ");
    CHECK(tok->piece(347) == "oo");
    CHECK(tok->type(3) == TokenType::kByte);
    CHECK(tok->type(1) == TokenType::kControl);
    CHECK(*tok->Decode(-1, 3 + 0x0A) == "\n");  // <0x0A>
    CHECK(tok->Decode(1, 1)->empty());           // control tokens print nothing
    CHECK(*tok->Decode(-1, 259) == " t");        // the leading space stays...
    CHECK(*tok->Decode(1, 259) == "t");          // ...except right after BOS
    StatusOr<std::string_view> bad = tok->Decode(-1, 512);
    REQUIRE(!bad.ok());
    CHECK(bad.status().message() == "tokenizer: token 512 out of range [0, 512)");
    CHECK(!tok->Decode(-1, -1).ok());
  }
  CHECK(t.bin.Encode("")->size() == 1);  // just BOS: no dummy prefix for empty text
}

TEST_CASE("Tokenizer: both sources agree, round-trip, and match the naive merge loop") {
  Tokenizers t;
  if (!LoadShared(&t)) SKIP("shared models not found (../shared/models)");
  // The two vocabularies are identical except the control pieces' text
  // (llama2.c "\n<s>\n" vs GGUF "<s>"), which Encode never produces.
  for (int id = 3; id < 512; ++id) {
    INFO("token " << id);
    CHECK(t.bin.piece(id) == t.gguf.piece(id));
    CHECK(t.bin.score(id) == t.gguf.score(id));
    CHECK(t.bin.type(id) == t.gguf.type(id));
  }
  std::vector<std::string> texts = Texts();
  // The README's known-good story too.
  const std::string story =
      "Zoo was a little girl named Lily. She loved to play outside in the park. One day, she "
      "saw a big, red ball. She wanted to play with it, but she didn't want to play with";
  texts.push_back(story);
  test::Rng rng(5);
  for (int i = 0; i < 30; ++i) {  // random bytes, biased towards ASCII letters
    std::string s;
    const size_t n = rng.Below(40);
    for (size_t j = 0; j < n; ++j) {
      s.push_back(rng.Below(3) ? static_cast<char>('a' + rng.Below(26))
                               : static_cast<char>(rng.Bits()));
    }
    texts.push_back(s);
  }
  for (const std::string& text : texts) {
    INFO("text '" << text << "'");
    StatusOr<std::vector<int>> a = t.bin.Encode(text);
    StatusOr<std::vector<int>> b = t.gguf.Encode(text);
    REQUIRE(a.ok());
    REQUIRE(b.ok());
    CHECK(*a == *b);
    CHECK(*a == NaiveEncode(t.bin, text));
    for (int id : *a) {
      CHECK(id >= 0);
      CHECK(id < 512);
    }
    CHECK(*t.bin.DecodeAll(*a) == text);
    CHECK(*t.gguf.DecodeAll(*b) == text);
  }
  // Long texts (the heap merge order must equal the naive rescan's).
  std::string long_text;
  for (int i = 0; i < 12; ++i) long_text += story + (i % 3 ? " " : "\n");
  for (int i = 0; i < 200; ++i) long_text.push_back(static_cast<char>('a' + rng.Below(3)));
  const std::vector<int> long_ids = *t.bin.Encode(long_text);
  CHECK(long_ids == NaiveEncode(t.bin, long_text));
  CHECK(*t.bin.DecodeAll(long_ids) == long_text);
  // Merging really happens: a common sentence is far shorter than its bytes.
  CHECK(t.bin.Encode(story)->size() < story.size() / 2);
}

// tokenizer.bin bytes for a vocabulary (llama2.c layout).
std::vector<uint8_t> Llama2cTokenizerBytes(const std::vector<std::string>& pieces,
                                           const std::vector<float>& scores, int32_t max_len) {
  std::vector<uint8_t> out(4);
  std::memcpy(out.data(), &max_len, 4);
  for (size_t i = 0; i < pieces.size(); ++i) {
    const int32_t len = static_cast<int32_t>(pieces[i].size());
    const size_t at = out.size();
    out.resize(at + 8 + pieces[i].size());
    std::memcpy(out.data() + at, &scores[i], 4);
    std::memcpy(out.data() + at + 4, &len, 4);
    std::memcpy(out.data() + at + 8, pieces[i].data(), pieces[i].size());
  }
  return out;
}

TEST_CASE("Tokenizer: merges by highest score, first pair on ties, byte fallback") {
  // unk, bos, eos, 3 byte tokens, then pieces.
  std::vector<std::string> pieces = {"<unk>", "<s>", "</s>", "<0x61>", "<0x62>", "<0xC3>",
                                     " ",     "a",   "b",    "ab",     " a",     "aa"};
  std::vector<float> scores = {0, 0, 0, 0, 0, 0, -1, -2, -3, -4, -5, -4};
  StatusOr<Tokenizer> t = Tokenizer::FromVocab(pieces, scores, {}, 1, 2, 0);
  REQUIRE(t.ok());
  CHECK(t->type(3) == TokenType::kByte);
  CHECK(t->type(0) == TokenType::kUnknown);
  // " ab": candidates " a" (-5) and "ab" (-4): "ab" wins.
  CHECK(*t->Encode("ab") == std::vector<int>{1, 6, 9});
  // "aaa": " a" (-5), "aa" (-4) at 1 and 2: tie -> leftmost pair (a,a) at 1.
  CHECK(*t->Encode("aaa", false) == std::vector<int>{6, 11, 7});
  // "é" (C3 A9): no piece; C3 has a byte token, A9 does not -> unknown.
  CHECK(*t->Encode("\xC3\xA9", false) == std::vector<int>{6, 5, 0});
  // Byte tokens never merge even if the concatenation exists as a piece.
  CHECK(t->Lookup("<0x61>") == -1);
  // Without an unknown token the same text is an error naming the byte.
  StatusOr<Tokenizer> nounk = Tokenizer::FromVocab(pieces, scores, {}, 1, 2, -1);
  REQUIRE(nounk.ok());
  StatusOr<std::vector<int>> e = nounk->Encode("\xC3\xA9", false);
  REQUIRE(!e.ok());
  CHECK(e.status().message() ==
        "tokenizer: byte 0xA9 at offset 1 has no token and no unknown token");
  // add_space_prefix = false (GGUF tokenizer.ggml.add_space_prefix).
  StatusOr<Tokenizer> nospace = Tokenizer::FromVocab(pieces, scores, {}, 1, 2, 0, false);
  CHECK(*nospace->Encode("ab", false) == std::vector<int>{9});
  // llama2.c files round-trip through the parser.
  StatusOr<Tokenizer> parsed = Tokenizer::FromLlama2cBytes(
      Llama2cTokenizerBytes(pieces, scores, 6).data(),
      Llama2cTokenizerBytes(pieces, scores, 6).size(), 12);
  REQUIRE(parsed.ok());
  CHECK(*parsed->Encode("aaa") == *t->Encode("aaa"));
}

TEST_CASE("Tokenizer: FromVocab rejects inconsistent vocabularies") {
  CHECK(Tokenizer::FromVocab({}, {}, {}, -1, -1, -1).status().message() ==
        "tokenizer: empty vocabulary");
  CHECK(Tokenizer::FromVocab({"a", "b"}, {0}, {}, -1, -1, -1).status().message() ==
        "tokenizer: 1 scores for 2 tokens");
  CHECK(Tokenizer::FromVocab({"a"}, {0}, {TokenType::kNormal, TokenType::kNormal}, -1, -1, -1)
            .status()
            .message() == "tokenizer: 2 token types for 1 tokens");
  CHECK(Tokenizer::FromVocab({"a"}, {0}, {}, 5, -1, -1).status().message() ==
        "tokenizer: bos token id 5 out of range [0, 1)");
  CHECK(Tokenizer::FromVocab({"<0xZZ>"}, {0}, {TokenType::kByte}, -1, -1, -1)
            .status()
            .message() == "tokenizer: byte token 0 is '<0xZZ>', expected <0xXX>");
  StatusOr<Tokenizer> nobos = Tokenizer::FromVocab({" ", "a"}, {0, 0}, {}, -1, -1, -1);
  REQUIRE(nobos.ok());
  CHECK(nobos->Encode("a").status().message() ==
        "tokenizer: BOS requested but vocabulary has none");
  CHECK(nobos->Encode("a", false, true).status().message() ==
        "tokenizer: EOS requested but vocabulary has none");
  StatusOr<Tokenizer> nospace = Tokenizer::FromVocab({"a"}, {0}, {}, -1, -1, -1);
  CHECK(nospace->Encode("a", false).status().message() ==
        "tokenizer: no ' ' piece for the dummy prefix");
}

TEST_CASE("Tokenizer: corrupt tokenizer.bin files are rejected") {
  const std::vector<std::string> pieces = {"<unk>", "\n<s>\n", "\n</s>\n", " ", "a", "ab"};
  const std::vector<float> scores = {0, 0, 0, -1, -2, -3};
  const std::vector<uint8_t> good = Llama2cTokenizerBytes(pieces, scores, 6);
  REQUIRE(Tokenizer::FromLlama2cBytes(good.data(), good.size(), 6).ok());
  REQUIRE(Tokenizer::FromLlama2cBytes(good.data(), good.size(), 0)->vocab_size() == 6);
  // Every truncation fails when the vocabulary size is known.
  for (size_t n = 0; n < good.size(); ++n) {
    std::vector<uint8_t> b(good.begin(), good.begin() + static_cast<ptrdiff_t>(n));
    StatusOr<Tokenizer> t = Tokenizer::FromLlama2cBytes(b.data(), b.size(), 6);
    INFO("prefix " << n << ": " << t.status().message());
    REQUIRE(!t.ok());
    CHECK(t.status().code() == StatusCode::kDataLoss);
    CHECK(t.status().message().rfind("tokenizer: ", 0) == 0);
  }
  CHECK(Tokenizer::FromLlama2cBytes(good.data(), 2, 6).status().message() ==
        "tokenizer: truncated at offset 0 reading max_token_length (need 4 bytes, 2 left)");
  CHECK(Tokenizer::FromLlama2cBytes(good.data(), good.size() - 1, 6).status().message() ==
        "tokenizer: truncated at offset 70 reading token 5 bytes (need 2 bytes, 1 left)");
  // Without a known size, a cut inside a token still fails.
  CHECK(!Tokenizer::FromLlama2cBytes(good.data(), good.size() - 1, 0).ok());
  // More tokens requested than the file can hold: fails before allocating.
  CHECK(Tokenizer::FromLlama2cBytes(good.data(), good.size(), 1 << 30).status().message() ==
        "tokenizer: file of 72 bytes cannot hold 1073741824 tokens (at least 8 bytes each)");
  // Fewer tokens than the file holds: trailing bytes are reported.
  CHECK(Tokenizer::FromLlama2cBytes(good.data(), good.size(), 5).status().message() ==
        "tokenizer: 10 unexpected bytes after 5 tokens");
  std::vector<uint8_t> b = good;
  const int32_t bad_max = -1;
  std::memcpy(b.data(), &bad_max, 4);
  CHECK(Tokenizer::FromLlama2cBytes(b.data(), b.size(), 6).status().message() ==
        "tokenizer: max_token_length -1 is not in [1, 1048576]");
  b = good;
  const int32_t huge = 0x7FFFFFFF;  // token 0's length
  std::memcpy(b.data() + 8, &huge, 4);
  CHECK(Tokenizer::FromLlama2cBytes(b.data(), b.size(), 6).status().message() ==
        "tokenizer: token 0 has length 2147483647, not in [0, max_token_length 6]");
  CHECK(Tokenizer::FromLlama2cBytes(good.data(), good.size(), -3).status().message() ==
        "tokenizer: vocab_size -3 < 0");
  StatusOr<Tokenizer> missing = Tokenizer::FromLlama2cFile("/nonexistent/tok.bin", 512);
  CHECK(missing.status().code() == StatusCode::kNotFound);
  CHECK(Contains(missing.status().message(), "open '/nonexistent/tok.bin'"));
}

TEST_CASE("Tokenizer: GGUF vocabulary errors") {
  const auto build = [](const std::string& model, size_t n_scores, int32_t bad_type,
                        uint32_t bos) {
    GgufWriter w;
    w.AddString("tokenizer.ggml.model", model);
    w.AddStringArray("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "\xE2\x96\x81", "a"});
    w.AddF32Array("tokenizer.ggml.scores", std::vector<float>(n_scores, 0.0f));
    w.AddI32Array("tokenizer.ggml.token_type", {2, 3, 3, 1, bad_type});
    w.AddU32("tokenizer.ggml.bos_token_id", bos);
    return *w.Finish();
  };
  const auto load = [](const std::vector<uint8_t>& bytes) {
    StatusOr<GgufReader> g = GgufReader::Parse(bytes.data(), bytes.size());
    REQUIRE(g.ok());
    return Tokenizer::FromGguf(*g);
  };
  StatusOr<Tokenizer> ok = load(build("llama", 5, 1, 1));
  REQUIRE(ok.ok());
  CHECK(ok->piece(3) == " ");  // U+2581 becomes a space
  CHECK(*ok->Encode("a") == std::vector<int>{1, 3, 4});
  CHECK(load(build("bert", 5, 1, 1)).status().message() ==
        "tokenizer: tokenizer.ggml.model 'bert' is not supported (only 'llama', SentencePiece "
        "BPE, and 'gpt2', byte-level BPE)");
  CHECK(load(build("gpt2", 5, 1, 1)).status().message() ==
        "gguf: missing key 'tokenizer.ggml.merges'");
  CHECK(load(build("llama", 4, 1, 1)).status().message() == "tokenizer: 4 scores for 5 tokens");
  CHECK(load(build("llama", 5, 9, 1)).status().message() ==
        "tokenizer: tokenizer.ggml.token_type[4] = 9 is not in [1, 6]");
  CHECK(load(build("llama", 5, 1, 77)).status().message() ==
        "tokenizer: tokenizer.ggml.bos_token_id = 77 is out of range for 5 tokens");
  StatusOr<Tokenizer> nobos = load(build("llama", 5, 1, 0xFFFFFFFFu));  // "none"
  REQUIRE(nobos.ok());
  CHECK(nobos->bos_id() == -1);
  GgufWriter w;
  const std::vector<uint8_t> empty = *w.Finish();
  StatusOr<GgufReader> g = GgufReader::Parse(empty.data(), empty.size());
  REQUIRE(g.ok());
  CHECK(Tokenizer::FromGguf(*g).status().message() == "gguf: missing key 'tokenizer.ggml.model'");
}


std::string Hex(const std::string& s) {
  std::string out;
  char buf[4];
  for (unsigned char c : s) {
    std::snprintf(buf, sizeof(buf), "%02X ", c);
    out += buf;
  }
  return out;
}

// Byte-level vocabulary: the 256 alphabet characters (id = byte), then
// 256 "<|endoftext|>" (control), 257 "<user>" (user-defined), 258 "ab",
// 259 "bc", 260 "abc", 261 "Ġa" (" a"), 262 "bca" (reached by no merge).
std::vector<std::string> BytePieces() {
  std::vector<std::string> pieces;
  for (int b = 0; b < 256; ++b) {
    std::string c;
    AppendUtf8(ByteToCodePoint(static_cast<uint8_t>(b)), &c);
    pieces.push_back(c);
  }
  for (const char* p : {"<|endoftext|>", "<user>", "ab", "bc", "abc", "\xC4\xA0" "a", "bca"}) {
    pieces.push_back(p);
  }
  return pieces;
}
std::vector<TokenType> ByteTypes() {
  std::vector<TokenType> types(263, TokenType::kNormal);
  types[256] = TokenType::kControl;
  types[257] = TokenType::kUserDefined;
  return types;
}
StatusOr<Tokenizer> ByteLevel(const std::vector<std::string_view>& merges,
                              PreTokenizerSpec pre = {PreTokenizer::kGpt2, false},
                              std::vector<std::string> pieces = BytePieces(), int unk = -1) {
  return Tokenizer::FromBpeVocab(std::move(pieces), ByteTypes(), merges, pre, 256, 256, unk);
}

TEST_CASE("Tokenizer: byte-level BPE merges by rank") {
  CHECK(ByteToCodePoint(' ') == 0x120);  // 'Ġ'
  CHECK(ByteToCodePoint('\n') == 0x10A);  // 'Ċ'
  CHECK(ByteToCodePoint('a') == 'a');
  for (int b = 0; b < 256; ++b) CHECK(CodePointToByte(ByteToCodePoint(b)) == b);
  CHECK(CodePointToByte(0x2581) == -1);

  StatusOr<Tokenizer> t = ByteLevel({"a b", "b c", "ab c", "\xC4\xA0 a"});
  INFO(t.status().message());
  REQUIRE(t.ok());
  CHECK(t->byte_level());
  CHECK(!t->add_bos_token());
  CHECK(t->Lookup(" a") == 261);  // raw bytes, not the alphabet
  // "a b" (rank 0) before "b c" (rank 1), then "ab c".
  CHECK(*t->Encode("abc", false) == std::vector<int>{260});
  // No dummy prefix; " a" and " abc" are chunks of the gpt-2 split, and in
  // " abc" "a b" (rank 0) wins over "Ġ a" (rank 3).
  CHECK(*t->Encode("a a", false) == std::vector<int>{'a', 261});
  CHECK(*t->Encode("a abc", false) == std::vector<int>{'a', ' ', 260});
  CHECK(*t->Encode("abc", true, true) == std::vector<int>{256, 260, 256});
  // With "b c" ranked first, "abc" ends as a + bc ("a bc" is no merge).
  StatusOr<Tokenizer> swapped = ByteLevel({"b c", "a b", "ab c"});
  REQUIRE(swapped.ok());
  CHECK(*swapped->Encode("abc", false) == std::vector<int>{'a', 259});
  // Llama 3's ignore_merges: a chunk that is a piece is taken whole.
  StatusOr<Tokenizer> l3 = ByteLevel({"b c"}, {PreTokenizer::kLlama3, true});
  REQUIRE(l3.ok());
  CHECK(*l3->Encode("bca", false) == std::vector<int>{262});
  StatusOr<Tokenizer> l3m = ByteLevel({"b c"}, {PreTokenizer::kLlama3, false});
  CHECK(*l3m->Encode("bca", false) == std::vector<int>{259, 'a'});
  // Decoding maps the alphabet back to bytes; no space is dropped after BOS.
  CHECK(*t->Decode(256, 261) == " a");
  CHECK(*t->Decode(-1, ' ') == " ");
  CHECK(*t->Decode(-1, 256) == "");
  CHECK(*t->Decode(-1, 257) == "<user>");
  CHECK(t->Decode(-1, 263).status().code() == StatusCode::kOutOfRange);
}

TEST_CASE("Tokenizer: special tokens are cut out before tokenizing") {
  StatusOr<Tokenizer> t = ByteLevel({"a b"});
  REQUIRE(t.ok());
  // User-defined pieces always; control pieces only with parse_special.
  CHECK(*t->Encode("ab<user>b", false) == std::vector<int>{258, 257, 'b'});
  CHECK(*t->Encode("<user><user>", false) == std::vector<int>{257, 257});
  const std::string eot = "x<|endoftext|>";
  CHECK(*t->Encode(eot, false, false, true) == std::vector<int>{'x', 256});
  const std::vector<int> plain = *t->Encode(eot, false);
  CHECK(plain.size() == eot.size());  // one byte token each (no merges apply)
  CHECK(*t->DecodeAll(plain) == eot);

  // SentencePiece: user-defined "<u>" is cut out, and the text after it gets
  // the dummy prefix again (llama.cpp's is_prev_special).
  const std::vector<std::string> pieces = {"<unk>", "<s>", "</s>", " ", "a", "b", " a", "<u>"};
  const std::vector<float> scores = {0, 0, 0, -1, -2, -3, -4, 0};
  std::vector<TokenType> types(8, TokenType::kNormal);
  types[0] = TokenType::kUnknown;
  types[1] = types[2] = TokenType::kControl;
  types[7] = TokenType::kUserDefined;
  StatusOr<Tokenizer> spm = Tokenizer::FromVocab(pieces, scores, types, 1, 2, 0);
  REQUIRE(spm.ok());
  CHECK(*spm->Encode("a<u>b", false) == std::vector<int>{6, 7, 3, 5});
  CHECK(*spm->Encode("<s>a", false, false, true) == std::vector<int>{1, 6});
  CHECK(*spm->Encode("a", false) == std::vector<int>{6});
}

TEST_CASE("Tokenizer: byte-level fallback and arbitrary bytes") {
  // Without a piece for byte 'x': the unknown token, else an error.
  std::vector<std::string> pieces = BytePieces();
  pieces['x'] = "xx";
  StatusOr<Tokenizer> nounk = ByteLevel({}, {PreTokenizer::kGpt2, false}, pieces);
  REQUIRE(nounk.ok());
  CHECK(nounk->Encode("ax", false).status().message() ==
        "tokenizer: byte 0x78 at offset 1 has no token and no unknown token");
  StatusOr<Tokenizer> unk = ByteLevel({}, {PreTokenizer::kGpt2, false}, pieces, 256);
  REQUIRE(unk.ok());
  CHECK(*unk->Encode("ax", false) == std::vector<int>{'a', 256});

  // Any bytes (invalid UTF-8 included) with every pre-tokenizer: the chunks
  // cover the text and decoding gives the text back.
  const PreTokenizer kinds[] = {PreTokenizer::kDefault,      PreTokenizer::kGpt2,
                                PreTokenizer::kLlama3,       PreTokenizer::kQwen2,
                                PreTokenizer::kDeepseekLlm,  PreTokenizer::kDeepseekCoder,
                                PreTokenizer::kFalcon,       PreTokenizer::kStarcoder,
                                PreTokenizer::kBloom,        PreTokenizer::kViking};
  const char* alphabet[] = {"a", "b", "c", " ", "\n", "\r", "\t", "'s", "1", "9", "!", "$",
                            "\xC3\xBC", "\xE4\xB8\x80", "\xE3\x80\x80", "\xF0\x9F\xA6\x99",
                            "\xE2\x80\xA8", "\x80", "\xFF", "\xE4\xB8", "<user>", "\xCC\x81"};
  test::Rng rng(7);
  for (const PreTokenizer kind : kinds) {
    StatusOr<Tokenizer> t = ByteLevel({"a b", "b c", "ab c", "\xC4\xA0 a"}, {kind, false});
    REQUIRE(t.ok());
    for (int iter = 0; iter < 200; ++iter) {
      std::string text;
      const size_t len = rng.Below(24);
      for (size_t i = 0; i < len; ++i) text += alphabet[rng.Below(sizeof(alphabet) / sizeof(alphabet[0]))];
      INFO("pre-tokenizer " << static_cast<int>(kind) << " text " << Hex(text));
      const std::vector<size_t> ends = PreTokenize(kind, text);
      REQUIRE(ends.empty() == text.empty());
      for (size_t i = 0; i < ends.size(); ++i) CHECK((i == 0 ? 0 : ends[i - 1]) < ends[i]);
      if (!ends.empty()) CHECK(ends.back() == text.size());
      StatusOr<std::vector<int>> ids = t->Encode(text, false);
      REQUIRE(ids.ok());
      CHECK(*t->DecodeAll(*ids) == text);
    }
  }
}

TEST_CASE("Tokenizer: pre-tokenizer splits") {
  const auto split = [](PreTokenizer kind, const std::string& text) {
    std::vector<std::string> out;
    size_t begin = 0;
    for (size_t end : PreTokenize(kind, text)) {
      out.push_back(text.substr(begin, end - begin));
      begin = end;
    }
    return out;
  };
  using V = std::vector<std::string>;
  const std::string text = "Hello world 12345 I'M\n\n  x  ";
  // Checked against Python's `regex` module running llama.cpp's regexes.
  CHECK(split(PreTokenizer::kGpt2, text) ==
        V{"Hello", " world", " 12345", " I", "'", "M", "\n\n ", " x", "  "});
  CHECK(split(PreTokenizer::kLlama3, text) ==
        V{"Hello", " world", " ", "123", "45", " I", "'M", "\n\n", " ", " x", "  "});
  CHECK(split(PreTokenizer::kQwen2, text) == V{"Hello", " world", " ", "1", "2", "3", "4", "5",
                                              " I", "'M", "\n\n", " ", " x", "  "});
  CHECK(split(PreTokenizer::kDefault, "a+b=12345, ok?") ==
        V{"a", "+", "b", "=", "123", "45", ",", " ok", "?"});
  // deepseek-llm: U+3000 is \s, not a member of the class range U+3000..U+3002.
  CHECK(split(PreTokenizer::kDeepseekLlm,
              "F\xC3\xBChrer 3.14 ok!!  \n\xE4\xB8\xAD\xE6\x96\x87 \xE3\x80\x80") ==
        V{"F", "\xC3\xBC", "hrer", " ", "3", ".", "14", " ok", "!!", "  ", "\n",
          "\xE4\xB8\xAD\xE6\x96\x87", " \xE3\x80\x80"});
}

TEST_CASE("Tokenizer: byte-level vocabulary errors") {
  CHECK(ByteLevel({"a zz"}).status().message() ==
        "tokenizer: tokenizer.ggml.merges[0] = 'a zz': 'zz' is not in the vocabulary");
  CHECK(ByteLevel({"a b", "c a"}).status().message() ==
        "tokenizer: tokenizer.ggml.merges[1] = 'c a': 'ca' is not in the vocabulary");
  CHECK(ByteLevel({"abc"}).status().message() ==
        "tokenizer: tokenizer.ggml.merges[0] = 'abc' is not two pieces separated by a space");
  CHECK(ByteLevel({""}).status().code() == StatusCode::kDataLoss);
  StatusOr<PreTokenizerSpec> bad = PreTokenizerFromName("llama4");
  REQUIRE(!bad.ok());
  CHECK(Contains(bad.status().message(),
                 "tokenizer: tokenizer.ggml.pre 'llama4' is not supported (supported: default, "));
  CHECK(PreTokenizerFromName("")->kind == PreTokenizer::kDefault);
  CHECK(PreTokenizerFromName("llama-bpe")->ignore_merges);
  CHECK(PreTokenizerFromName("smollm")->kind == PreTokenizer::kStarcoder);

  // Through GGUF metadata.
  const auto build = [](const std::string& pre, bool merges) {
    GgufWriter w;
    w.AddString("tokenizer.ggml.model", "gpt2");
    if (!pre.empty()) w.AddString("tokenizer.ggml.pre", pre);
    w.AddStringArray("tokenizer.ggml.tokens", BytePieces());
    std::vector<int32_t> types;
    for (TokenType type : ByteTypes()) types.push_back(static_cast<int32_t>(type));
    w.AddI32Array("tokenizer.ggml.token_type", types);
    if (merges) w.AddStringArray("tokenizer.ggml.merges", {"a b", "b c", "ab c"});
    w.AddU32("tokenizer.ggml.bos_token_id", 256);
    return *w.Finish();
  };
  const auto load = [](const std::vector<uint8_t>& bytes) {
    StatusOr<GgufReader> g = GgufReader::Parse(bytes.data(), bytes.size());
    REQUIRE(g.ok());
    return Tokenizer::FromGguf(*g);
  };
  StatusOr<Tokenizer> ok = load(build("", true));
  INFO(ok.status().message());
  REQUIRE(ok.ok());
  CHECK(ok->pre_tokenizer().kind == PreTokenizer::kDefault);
  CHECK(ok->bos_id() == 256);
  CHECK(ok->eos_id() == -1);
  CHECK(*ok->Encode("abc") == std::vector<int>{256, 260});
  StatusOr<Tokenizer> llama3 = load(build("llama-bpe", true));
  REQUIRE(llama3.ok());
  CHECK(llama3->add_bos_token());
  CHECK(load(build("nope", true)).status().code() == StatusCode::kUnimplemented);
  // A .lutra file stores the vocabulary with the same keys; reading it back
  // gives the same tokenizer.
  for (const PreTokenizerSpec pre : {PreTokenizerSpec{PreTokenizer::kLlama3, true},
                                     PreTokenizerSpec{PreTokenizer::kQwen2, false}}) {
    StatusOr<Tokenizer> t = ByteLevel({"b c", "a b", "ab c"}, pre);
    REQUIRE(t.ok());
    GgufWriter w;
    lutra_file_detail::AddTokenizer(*t, w);  // what WriteLutraFile writes
    StatusOr<Tokenizer> back = load(*w.Finish());
    INFO(back.status().message());
    REQUIRE(back.ok());
    CHECK(back->pre_tokenizer().kind == pre.kind);
    CHECK(back->pre_tokenizer().ignore_merges == pre.ignore_merges);
    CHECK(back->Merges() == std::vector<std::string>{"b c", "a b", "ab c"});
    CHECK(back->add_bos_token() == t->add_bos_token());
    for (const char* text : {"abc bca", "a<user>b", "x 12345"}) {
      CHECK(*back->Encode(text) == *t->Encode(text));
    }
  }
  CHECK(load(build("gpt-2", false)).status().message() ==
        "gguf: missing key 'tokenizer.ggml.merges'");
}

}  // namespace
}  // namespace lutra
