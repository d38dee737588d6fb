// Tokenizer: llama2.c tokenizer.bin and the GGUF vocabulary of the shared
// stories260K model give identical encodings ("Zoo" = 1 410 469 347 as in
// the README), decoding round-trips arbitrary bytes, the merge rule matches a
// naive reimplementation of llama2.c's loop, and corrupt files are rejected
// with clear messages.
#include "lutra/format/tokenizer.h"

#include <cstring>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "lutra/format/gguf.h"
#include "lutra/format/gguf_writer.h"
#include "lutra/format/mapped_file.h"
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
  CHECK(load(build("gpt2", 5, 1, 1)).status().message() ==
        "tokenizer: tokenizer.ggml.model 'gpt2' is not supported (only 'llama', SentencePiece "
        "BPE)");
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

}  // namespace
}  // namespace lutra
