// libFuzzer harness: GGUF model loading (lutra/format/llama_model.h) and
// GGUF vocabularies (Tokenizer::FromGguf: SentencePiece "llama" and
// byte-level BPE "gpt2" with its pre-tokenizers). Seeds: stories260K.gguf
// and llama.cpp's vocabulary GGUFs (../shared/vocab, cut down by
// make_seeds.cc).
#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <string_view>
#include <utility>
#include <vector>

#include "lutra/format/gguf.h"
#include "lutra/format/llama_model.h"
#include "lutra/format/mapped_file.h"
#include "lutra/format/tokenizer.h"
#include "tests/fuzz/fuzz_util.h"

using lutra::fuzz::Use;

namespace {

constexpr int kMaxDecoded = 4096;

void FuzzVocabulary(const lutra::GgufReader& g) {
  lutra::StatusOr<lutra::Tokenizer> t = lutra::Tokenizer::FromGguf(g);
  if (!t.ok()) return;
  for (std::string_view text : lutra::fuzz::SampleTexts()) {
    for (bool special : {false, true}) {
      const bool bos = special && t->bos_id() >= 0, eos = special && t->eos_id() >= 0;
      lutra::StatusOr<std::vector<int>> ids = t->Encode(text, bos, eos, special);
      if (!ids.ok()) continue;
      for (int id : *ids) LUTRA_FUZZ_CHECK(id >= 0 && id < t->vocab_size());
      Use(t->DecodeAll(*ids).ok());
    }
  }
  const int n = std::min(t->vocab_size(), kMaxDecoded);
  for (int id = 0; id < n; ++id) {
    lutra::StatusOr<std::string_view> s = t->Decode(t->bos_id(), id);
    if (s.ok()) lutra::fuzz::TouchBytes(s->data(), s->size());
  }
}

void FuzzWeights(lutra::GgufFile file) {
  lutra::StatusOr<lutra::ModelWeightsF32> w = lutra::LoadGgufModel(std::move(file));
  if (!w.ok()) return;
  lutra::fuzz::TouchModelWeights(*w);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  lutra::StatusOr<lutra::GgufFile> file = lutra::GgufFile::FromMapped(
      lutra::MappedFile::FromBuffer(std::vector<uint8_t>(data, data + size), "fuzz.gguf"));
  if (!file.ok()) return 0;
  FuzzVocabulary(file->reader());
  Use(lutra::ReadGgufLlamaConfig(file->reader()).ok());
  FuzzWeights(std::move(*file));
  return 0;
}
