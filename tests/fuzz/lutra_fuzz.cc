// libFuzzer harness: .lutra model files (lutra/format/lutra_file.h) plus one
// decode step of the example engine (examples/engine.h). The bytes are read
// from memory first (ReadLutraFile); what that accepts is also opened the
// way lutra-generate opens it (OpenModel maps the file: the engine has no
// in-memory entry point, so the input goes through a per-process temporary
// file) and runs one token through Forward.
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <string>
#include <utility>
#include <vector>

#include "examples/engine.h"
#include "lutra/format/gguf.h"
#include "lutra/format/lutra_file.h"
#include "lutra/format/mapped_file.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

// Context length the model runs with (LoadOptions::seq_len): the KV cache
// is seq_len x layers x kv_dim, so a header claiming a huge context costs
// nothing. Weights are used in place from the file, whose size libFuzzer's
// -max_len bounds, so one exec stays in the milliseconds.
constexpr int kSeqLen = 8;

const std::string& TempPath() {
  static const std::string path = [] {
    const char* dir = getenv("TMPDIR");
    return std::string(dir && *dir ? dir : "/tmp") + "/lutra_fuzz_" +
           std::to_string(static_cast<long>(getpid())) + ".lutra";
  }();
  return path;
}

bool WriteFile(const std::string& path, const uint8_t* data, size_t size) {
  FILE* f = fopen(path.c_str(), "wb");
  if (f == nullptr) return false;
  const bool ok = fwrite(data, 1, size, f) == size;
  return fclose(f) == 0 && ok;
}

void DecodeStep(const lutra::engine::Model& model) {
  const lutra::ModelConfig& c = model.config;
  lutra::StatusOr<lutra::engine::RunState> state = lutra::engine::MakeRunState(c, /*max_batch=*/1);
  if (!state.ok()) return;
  const int token = 1 % c.vocab_size;
  lutra::StatusOr<const float*> logits = lutra::engine::Forward(model, *state, &token, 1, /*pos=*/0);
  if (!logits.ok()) return;
  lutra::fuzz::TouchBytes(*logits, static_cast<size_t>(c.vocab_size) * sizeof(float));
  if (model.tokenizer) {
    lutra::StatusOr<std::vector<int>> ids = model.tokenizer->Encode("Hello world", false);
    if (ids.ok()) lutra::fuzz::Use(model.tokenizer->DecodeAll(*ids).ok());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  {
    lutra::StatusOr<lutra::GgufFile> gguf = lutra::GgufFile::FromMapped(
        lutra::MappedFile::FromBuffer(std::vector<uint8_t>(data, data + size), "fuzz.lutra"));
    if (!gguf.ok() || !lutra::IsLutraFile(gguf->reader())) return 0;
    lutra::StatusOr<lutra::LutraFile> file = lutra::ReadLutraFile(std::move(*gguf));
    if (!file.ok()) return 0;
  }
  const std::string& path = TempPath();
  if (!WriteFile(path, data, size)) {
    fprintf(stderr, "lutra_fuzz: cannot write %s\n", path.c_str());
    abort();  // the harness's own environment, not the library's input
  }
  lutra::engine::LoadOptions options;
  options.seq_len = kSeqLen;
  options.calibrate = false;
  lutra::StatusOr<lutra::engine::Model> model = lutra::engine::OpenModel(path, options);
  unlink(path.c_str());  // the mapping stays valid after unlink
  if (!model.ok()) return 0;
  DecodeStep(*model);
  return 0;
}
