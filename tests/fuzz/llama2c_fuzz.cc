// libFuzzer harness: llama2.c checkpoints (lutra/format/llama_model.h).
// Loads the bytes as a checkpoint and reads every weight the loader points
// at, with the extents its config states.
#include <stddef.h>
#include <stdint.h>

#include <utility>
#include <vector>

#include "lutra/format/llama_model.h"
#include "lutra/format/mapped_file.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // Header only, as lutra-generate's format sniffing sees it.
  lutra::fuzz::Use(lutra::ReadLlama2cConfig(data, size).ok());
  lutra::MappedFile file =
      lutra::MappedFile::FromBuffer(std::vector<uint8_t>(data, data + size), "fuzz.bin");
  lutra::StatusOr<lutra::ModelWeightsF32> w = lutra::LoadLlama2cModel(std::move(file));
  if (!w.ok()) return 0;
  lutra::fuzz::TouchModelWeights(*w);
  return 0;
}
