// libFuzzer harness: GGUF metadata and tensors (lutra/format/gguf.h).
// Parses the bytes, reads every key through each typed getter and converts
// every small enough tensor to f32.
#include <stddef.h>
#include <stdint.h>

#include <string_view>
#include <vector>

#include "lutra/format/gguf.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

using lutra::GgufReader;
using lutra::GgufTensorInfo;
using lutra::fuzz::Use;

// Tensors above this many elements are checked row by row (first and last
// row) instead of whole, so one exec stays fast.
constexpr uint64_t kMaxWholeTensor = uint64_t{1} << 16;

void ReadMetadata(const GgufReader& g) {
  for (const lutra::GgufKeyValue& kv : g.metadata()) {
    const std::string_view key = kv.key;
    // Each getter either converts or returns a typed error; both are fine.
    Use(g.GetInt(key).ok());
    Use(g.GetU32(key, 7).ok());
    Use(g.GetI32(key).ok());
    Use(g.GetU64(key).ok());
    Use(g.GetF32(key).ok());
    Use(g.GetF64(key, 0.5).ok());
    Use(g.GetBool(key).ok());
    auto s = g.GetString(key);
    if (s.ok()) lutra::fuzz::TouchBytes(s->data(), s->size());
    if (kv.value.type == lutra::GgufValueType::kArray) {
      auto strings = g.GetStringArray(key);
      if (strings.ok()) {
        for (std::string_view v : *strings) lutra::fuzz::TouchBytes(v.data(), v.size());
      }
      Use(g.GetF32Array(key).ok());
      Use(g.GetIntArray(key).ok());
      Use(g.GetArray(key).ok());
    }
    Use(g.Find(key) != nullptr);
  }
  Use(g.Find("general.architecture") != nullptr);
}

void ReadTensors(const GgufReader& g) {
  std::vector<float> row;
  for (const GgufTensorInfo& t : g.tensors()) {
    Use(g.GetTensor(t.name).ok());
    lutra::fuzz::TouchBytes(t.data, static_cast<size_t>(t.n_bytes));
    if (!lutra::CheckConvertibleToF32(t).ok()) continue;
    if (t.n_elements <= kMaxWholeTensor) {
      Use(lutra::TensorToF32(t).ok());
    } else if (t.row_length() <= kMaxWholeTensor) {
      row.resize(static_cast<size_t>(t.row_length()));
      Use(lutra::TensorRowToF32(t, 0, row.data()).ok());
      Use(lutra::TensorRowToF32(t, t.n_rows() - 1, row.data()).ok());
    }
    Use(lutra::TensorRowToF32(t, t.n_rows(), nullptr).ok());  // out of range
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  lutra::StatusOr<GgufReader> g = GgufReader::Parse(data, size);
  if (!g.ok()) return 0;
  ReadMetadata(*g);
  ReadTensors(*g);
  return 0;
}
