// libFuzzer harness: llama2.c tokenizer.bin (Tokenizer::FromLlama2cBytes)
// plus Encode/Decode. The bytes are the tokenizer file; when it parses, the
// sample texts and the file's own last bytes (as text) are encoded, decoded
// back, and every token is decoded once.
#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <string_view>
#include <vector>

#include "lutra/format/tokenizer.h"
#include "tests/fuzz/fuzz_util.h"

using lutra::fuzz::Use;

// Bytes of the input also used as text to encode (its tail).
constexpr size_t kTextBytes = 64;
// Tokens decoded one by one, so a 1 M-token vocabulary stays fast.
constexpr int kMaxDecoded = 4096;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  lutra::StatusOr<lutra::Tokenizer> t = lutra::Tokenizer::FromLlama2cBytes(data, size);
  if (!t.ok()) return 0;
  // The exact-count path (vocab_size from a model header) agrees with the
  // read-to-the-end one, and refuses one token more.
  const int vocab = t->vocab_size();
  lutra::StatusOr<lutra::Tokenizer> exact = lutra::Tokenizer::FromLlama2cBytes(data, size, vocab);
  LUTRA_FUZZ_CHECK(exact.ok() && exact->vocab_size() == vocab);
  LUTRA_FUZZ_CHECK(!lutra::Tokenizer::FromLlama2cBytes(data, size, vocab + 1).ok());
  std::vector<std::string_view> texts = lutra::fuzz::SampleTexts();
  const size_t tail = std::min(size, kTextBytes);
  texts.emplace_back(reinterpret_cast<const char*>(data + size - tail), tail);
  for (std::string_view text : texts) {
    for (bool special : {false, true}) {
      // BOS/EOS may be missing from a tiny vocabulary: an error, not a crash.
      lutra::StatusOr<std::vector<int>> ids = t->Encode(text, /*add_bos=*/true,
                                                        /*add_eos=*/special, special);
      if (!ids.ok()) continue;
      for (int id : *ids) LUTRA_FUZZ_CHECK(id >= 0 && id < t->vocab_size());
      Use(t->DecodeAll(*ids).ok());
    }
  }
  const int n = std::min(t->vocab_size(), kMaxDecoded);
  for (int id = -1; id <= n; ++id) {
    lutra::StatusOr<std::string_view> s = t->Decode(1, id);
    if (s.ok()) lutra::fuzz::TouchBytes(s->data(), s->size());
  }
  return 0;
}
