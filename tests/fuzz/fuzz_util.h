// Helpers shared by the libFuzzer harnesses in this directory (built by
// cmake/fuzz.sh, not by the test build).
//
// A harness feeds the bytes to one of the library's in-memory readers and
// exercises whatever it returns. The library must answer bad input with a
// Status; anything else (a sanitizer report, an abort, a leak, a timeout,
// an allocation over -malloc_limit_mb) is a finding. Harnesses stop with
// LUTRA_FUZZ_CHECK only where the library broke a promise it makes (e.g. a
// round trip that does not reproduce its input).
#ifndef LUTRA_TESTS_FUZZ_FUZZ_UTIL_H_
#define LUTRA_TESTS_FUZZ_FUZZ_UTIL_H_

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <string_view>
#include <vector>

#include "lutra/format/llama_model.h"

// A broken invariant: print it and trap, so libFuzzer saves the input.
#define LUTRA_FUZZ_CHECK(cond)                                                 \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "%s:%d: LUTRA_FUZZ_CHECK failed: %s\n", __FILE__,        \
              __LINE__, #cond);                                                \
      __builtin_trap();                                                        \
    }                                                                          \
  } while (0)

namespace lutra::fuzz {

// Keeps the optimizer from dropping reads whose only purpose is to let the
// sanitizers see them.
template <class T>
inline void Use(const T& value) {
  asm volatile("" : : "r"(&value) : "memory");
}

// Reads every byte of [p, p + n) so ASan checks the whole span.
inline void TouchBytes(const void* p, size_t n) {
  const uint8_t* b = static_cast<const uint8_t*>(p);
  uint8_t x = 0;
  for (size_t i = 0; i < n; ++i) x ^= b[i];
  Use(x);
}

// Reads every weight a loader returned, with the extents its config
// states: a pointer must cover them (ASan reports the first byte outside).
inline void TouchModelWeights(const ModelWeightsF32& w) {
  const ModelConfig& c = w.config;
  LUTRA_FUZZ_CHECK(ValidateConfig(c).ok());
  LUTRA_FUZZ_CHECK(w.layers.size() == static_cast<size_t>(c.n_layers));
  const size_t dim = c.dim, hid = c.hidden_dim, V = c.vocab_size;
  const size_t q = c.q_dim(), kv = c.kv_dim();
  const auto floats = [](const float* p, size_t n) {
    if (p != nullptr) TouchBytes(p, n * sizeof(float));
  };
  floats(w.token_embedding, V * dim);
  floats(w.classifier, V * dim);
  floats(w.final_norm, dim);
  for (const LayerWeightsF32& l : w.layers) {
    floats(l.attn_norm, dim);
    floats(l.ffn_norm, dim);
    floats(l.wq, q * dim);
    floats(l.wk, kv * dim);
    floats(l.wv, kv * dim);
    floats(l.wo, dim * q);
    floats(l.w1, hid * dim);
    floats(l.w2, dim * hid);
    floats(l.w3, hid * dim);
    floats(l.bq, q);
    floats(l.bk, kv);
    floats(l.bv, kv);
  }
}

// Texts the tokenizer harnesses encode: ASCII, multi-byte UTF-8, invalid
// UTF-8, control characters and special-token spellings.
inline std::vector<std::string_view> SampleTexts() {
  // Invalid UTF-8 and an embedded NUL (hence the explicit length).
  static constexpr char kInvalid[] = "\xff\xfe\x80 \xc3 nul\0byte";
  return {"",
          " ",
          "Hello world",
          "Once upon a time, there was a little girl.\n\n  tabs\tand   spaces",
          "caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x98\x80 123 4567",
          std::string_view(kInvalid, sizeof(kInvalid) - 1),
          "<s></s><unk><|endoftext|><|im_start|>"};
}

}  // namespace lutra::fuzz

#endif  // LUTRA_TESTS_FUZZ_FUZZ_UTIL_H_
