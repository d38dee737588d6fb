// Tokenizer against llama.cpp's tokenizer test suite (../shared/vocab, see
// its README): for each vocab-only GGUF, every one of the 46 test inputs is
// encoded without BOS/EOS and without parsing special tokens, and must give
// exactly the ids of the .out file (produced upstream by the Hugging Face
// tokenizer of that model). Decoding the ids must give the input back.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "lutra/format/gguf.h"
#include "lutra/format/tokenizer.h"

namespace lutra {
namespace {

// ../shared/vocab next to the shared models, or "" when absent.
std::string VocabDir() {
#ifdef LUTRA_SHARED_MODELS_DIR
  const std::string dir = std::string(LUTRA_SHARED_MODELS_DIR) + "/../vocab";
  if (std::ifstream(dir + "/ggml-vocab-gpt-2.gguf").good()) return dir;
#endif
  return std::string();
}

bool ReadAll(const std::string& path, std::string* out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  std::ostringstream ss;
  ss << f.rdbuf();
  *out = ss.str();
  return true;
}

// Tests are the bytes before each separator (the file ends with one).
std::vector<std::string> SplitInputs(const std::string& raw) {
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> out;
  size_t pos = 0;
  for (;;) {
    const size_t m = raw.find(sep, pos);
    if (m == std::string::npos) break;
    out.push_back(raw.substr(pos, m - pos));
    pos = m + sep.size();
  }
  return out;
}

// One line of ids per test.
std::vector<std::vector<int>> ParseOutputs(const std::string& raw) {
  std::vector<std::vector<int>> out;
  std::istringstream lines(raw);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream ids(line);
    std::vector<int> v;
    int id;
    while (ids >> id) v.push_back(id);
    out.push_back(v);
  }
  return out;
}

std::string Ids(const std::vector<int>& v) {
  std::string s;
  for (int id : v) s += " " + std::to_string(id);
  return s;
}

std::string Escaped(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else {
      out.push_back(static_cast<char>(c));
    }
  }
  return out;
}

TEST_CASE("Tokenizer: llama.cpp vocab test suite, every id") {
  const std::string dir = VocabDir();
  if (dir.empty()) SKIP("../shared/vocab not found");
  std::vector<std::string> names = {"gpt-2",        "llama-spm", "phi-3", "falcon",
                                    "starcoder",    "deepseek-llm", "refact"};
  if (std::getenv("LUTRA_TEST_QUICK") != nullptr) {
    // Under ASan/qemu: one byte-level and one SentencePiece vocabulary.
    names = {"gpt-2", "phi-3"};
    std::printf("[vocab] LUTRA_TEST_QUICK: only gpt-2 and phi-3\n");
  }
  for (const std::string& name : names) {
    INFO("vocab " << name);
    const std::string base = dir + "/ggml-vocab-" + name + ".gguf";
    StatusOr<GgufFile> file = GgufFile::Open(base);
    REQUIRE(file.ok());
    StatusOr<Tokenizer> tok = Tokenizer::FromGguf(file->reader());
    INFO(tok.status().message());
    REQUIRE(tok.ok());
    std::string inp, outp;
    REQUIRE(ReadAll(base + ".inp", &inp));
    REQUIRE(ReadAll(base + ".out", &outp));
    const std::vector<std::string> inputs = SplitInputs(inp);
    const std::vector<std::vector<int>> expected = ParseOutputs(outp);
    REQUIRE(inputs.size() == 46);
    REQUIRE(expected.size() == inputs.size());
    size_t passed = 0, round_trips = 0, ids = 0;
    std::string first_mismatch;
    for (size_t i = 0; i < inputs.size(); ++i) {
      StatusOr<std::vector<int>> got =
          tok->Encode(inputs[i], /*add_bos=*/false, /*add_eos=*/false, /*parse_special=*/false);
      REQUIRE(got.ok());
      ids += expected[i].size();
      if (*got == expected[i]) {
        ++passed;
      } else if (first_mismatch.empty()) {
        first_mismatch = "test " + std::to_string(i) + " \"" + Escaped(inputs[i]) +
                         "\"\n  expected" + Ids(expected[i]) + "\n  got     " + Ids(*got);
      }
      // SentencePiece decodes the dummy-prefix space too.
      StatusOr<std::string> text = tok->DecodeAll(*got);
      REQUIRE(text.ok());
      const std::string want =
          (tok->byte_level() || inputs[i].empty()) ? inputs[i] : " " + inputs[i];
      if (*text == want) ++round_trips;
    }
    std::printf("[vocab] %-13s %2zu/%zu tests match (%zu ids), %2zu/%zu round-trip\n",
                name.c_str(),
                passed, inputs.size(), ids, round_trips, inputs.size());
    if (!first_mismatch.empty()) std::printf("  first mismatch: %s\n", first_mismatch.c_str());
    // parse_special turns the text of a control token into that token, and
    // only then.
    const int eot = tok->eos_id();
    if (tok->byte_level() && eot >= 0 && tok->type(eot) == TokenType::kControl) {
      const std::string text = "Hello" + tok->piece(eot);
      const std::vector<int> parsed = *tok->Encode(text, false, false, /*parse_special=*/true);
      const std::vector<int> plain = *tok->Encode(text, false);
      CHECK(parsed.back() == eot);
      CHECK(std::find(plain.begin(), plain.end(), eot) == plain.end());
      CHECK(*tok->DecodeAll(plain) == text);
    }
    CHECK(passed == inputs.size());
    CHECK(round_trips == inputs.size());
  }
}

}  // namespace
}  // namespace lutra
