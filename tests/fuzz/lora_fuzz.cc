// libFuzzer harness: LoRA adapter files (lutra/format/lora_file.h), parse ->
// serialize -> parse. Whatever the loader accepts, SerializeAdapter must
// write and the loader must read back to the same adapter: the same
// targets, factors (bit for bit) and scales.
#include <stddef.h>
#include <stdint.h>

#include <cstring>

#include "lutra/format/lora.h"
#include "lutra/format/lora_file.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

// The base model the adapters are checked against. make_seeds.cc writes
// the seed adapters for the same shapes (keep the two in step).
lutra::BaseShapes FuzzBase() {
  return lutra::BaseShapes::Llama(/*num_layers=*/2, /*dim=*/16, /*hidden_dim=*/48,
                                  /*q_dim=*/16, /*kv_dim=*/8);
}

bool SameFactors(const lutra::LoraFactors& x, const lutra::LoraFactors& y) {
  if (x.layer() != y.layer() || x.projection() != y.projection() || x.rows() != y.rows() ||
      x.cols() != y.cols() || x.rank() != y.rank() || x.type() != y.type()) {
    return false;
  }
  const size_t es = lutra::ElementBytes(x.type());
  return std::memcmp(x.a(), y.a(), x.a_elements() * es) == 0 &&
         std::memcmp(x.b(), y.b(), x.b_elements() * es) == 0;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const lutra::BaseShapes base = FuzzBase();
  // f32 storage: F32 tensors are kept bit for bit, so the round trip is exact.
  lutra::LoadAdapterOptions options;
  options.f32_storage = lutra::ElementType::kF32;
  lutra::StatusOr<lutra::Adapter> first = lutra::ParseAdapterBytes(data, size, base, options);
  if (!first.ok()) return 0;
  for (size_t i = 0; i < first->num_targets(); ++i) {
    const lutra::LoraFactors& f = first->target(i);
    LUTRA_FUZZ_CHECK(first->FindFactors(f.layer(), f.projection()) == &f);
    lutra::fuzz::TouchBytes(f.a(), f.a_elements() * lutra::ElementBytes(f.type()));
    lutra::fuzz::TouchBytes(f.b(), f.b_elements() * lutra::ElementBytes(f.type()));
  }
  lutra::StatusOr<std::vector<uint8_t>> bytes = lutra::SerializeAdapter(*first);
  // An accepted adapter has at least one target, so it can be saved.
  if (!bytes.ok()) {
    fprintf(stderr, "SerializeAdapter: %s\n", bytes.status().message().c_str());
  }
  LUTRA_FUZZ_CHECK(bytes.ok());
  lutra::StatusOr<lutra::Adapter> second =
      lutra::ParseAdapterBytes(bytes->data(), bytes->size(), base, options);
  if (!second.ok()) {
    fprintf(stderr, "reloading the saved adapter: %s\n", second.status().message().c_str());
  }
  LUTRA_FUZZ_CHECK(second.ok());
  LUTRA_FUZZ_CHECK(second->num_targets() == first->num_targets());
  LUTRA_FUZZ_CHECK(second->name() == first->name());
  LUTRA_FUZZ_CHECK(second->kind() == first->kind());
  for (size_t i = 0; i < first->num_targets(); ++i) {
    const lutra::LoraFactors& x = first->target(i);
    const lutra::LoraFactors* y = second->FindFactors(x.layer(), x.projection());
    LUTRA_FUZZ_CHECK(y != nullptr && SameFactors(x, *y));
    // Bit-exact: SerializeAdapter promises alpha / r reproduces each scale.
    const float sx = x.scale(), sy = y->scale();
    LUTRA_FUZZ_CHECK(std::memcmp(&sx, &sy, sizeof(float)) == 0);
  }
  return 0;
}
