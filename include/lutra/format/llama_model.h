// Llama-architecture model files -> a neutral config and f32 weight views.
//
// Two sources, one result (ModelWeightsF32):
//  - llama2.c checkpoints ("legacy" export version 0): 7 int32 header
//    {dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len}
//    (vocab_size < 0: the classifier is not shared with the embedding), then
//    f32 arrays in this order: token_embedding [vocab, dim], rms_att
//    [layers, dim], wq [layers, dim, dim], wk/wv [layers, kv_dim, dim], wo
//    [layers, dim, dim], rms_ffn [layers, dim], w1 [layers, hidden, dim], w2
//    [layers, dim, hidden], w3 [layers, hidden, dim], rms_final [dim],
//    freq_cis_real/imag [seq_len, head_dim / 2] (skipped), wcls [vocab, dim]
//    when unshared. The file size must match the header exactly.
//  - GGUF files with general.architecture = "llama" (Llama 1-3.x, SmolLM2,
//    Mistral-style) or "qwen2" (Qwen2 / Qwen2.5) (see gguf.h): ARCH.*
//    hyper-parameters and tensors token_embd, blk.N.{attn_norm, attn_q,
//    attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_down, ffn_up},
//    optionally blk.N.{attn_q, attn_k, attn_v}.bias (qwen2's q/k/v biases),
//    output_norm, output (absent: tied to token_embd), and optionally
//    rope_freqs.weight (Llama 3.x's RoPE frequency factors). Any other tensor
//    is refused: the forward pass would ignore it. F32 tensors are used in
//    place; other types are converted to f32 on load.
//
// Layout of every matrix: row-major [out, in] (out rows of `in` floats), so
// y = W x is y[r] = dot(W + r * in, x). llama2.c stores this directly; GGUF's
// ne = {in, out} is the same bytes.
//
// RoPE and the Q/K row order: llama2.c and GGUF "llama" rotate adjacent pairs
// (2i, 2i+1) of each head (ggml's "normal" rope that llama.cpp uses for the
// llama architecture), and their Q/K rows are in that order: llama.cpp's HF
// converter permutes HF's rotate-half rows back to the original interleaved
// order, and llama2.c-converted GGUFs (stories260K.gguf) store the
// checkpoint's rows unchanged — verified bit-identical to stories260K.bin.
// GGUF "qwen2" keeps HF's row order (llama.cpp's converter does not permute
// it) and rotates halves (i, i + d/2): ggml's NeoX rope. No permutation is
// applied on load; ModelConfig::rope_layout says which pairing the rows use.
// See docs/model-files.md.
#ifndef LUTRA_LLAMA_MODEL_H_
#define LUTRA_LLAMA_MODEL_H_

#include <stddef.h>
#include <stdint.h>

#include <cmath>
#include <cstring>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "lutra/base/status.h"
#include "lutra/format/gguf.h"
#include "lutra/format/mapped_file.h"
#include "lutra/format/tokenizer.h"

namespace lutra {

// How RoPE pairs the dimensions of a head.
enum class RopeLayout {
  kAdjacentPairs,  // (2i, 2i+1): llama2.c, Meta's original, GGUF "llama"
  kHalfSplit,      // (i, i + d/2): HF rotate_half, GPT-NeoX, GGUF "qwen2"
};

// Hyper-parameters of a Llama-style decoder, independent of the file format.
struct ModelConfig {
  int dim = 0;         // residual stream width (embedding length)
  int hidden_dim = 0;  // FFN inner width
  int n_layers = 0;
  int n_heads = 0;     // query heads
  int n_kv_heads = 0;  // key/value heads (GQA: n_heads % n_kv_heads == 0)
  int head_dim = 0;    // per head; dim / n_heads for both sources here
  int vocab_size = 0;
  int seq_len = 0;     // trained context length (llama2.c seq_len, GGUF context_length)
  float rope_theta = 10000.0f;  // RoPE base: angle = pos * theta^(-2i / rope_dim)
  int rope_dim = 0;             // rotated dims per head (== head_dim here)
  RopeLayout rope_layout = RopeLayout::kAdjacentPairs;
  // RoPE frequency scaling: pair i's frequency theta^(-2i / rope_dim) is
  // divided by rope_freq_factors[i] (rope_dim / 2 values; empty: none) and by
  // rope_linear_factor. Llama 3.x's "llama3" scaling is baked into the
  // factors (GGUF rope_freqs.weight); linear scaling ("linear",
  // ARCH.rope.scaling.factor) divides positions, i.e. every frequency.
  std::vector<float> rope_freq_factors;
  float rope_linear_factor = 1.0f;
  float norm_eps = 1e-5f;       // RMSNorm epsilon
  bool tied_embedding = false;  // classifier is the token embedding

  int q_dim() const { return n_heads * head_dim; }
  int kv_dim() const { return n_kv_heads * head_dim; }
};

// ---------------------------------------------------------------------------
// Checks every loader shares (docs/reliability.md). A count read from a file
// is trusted only after it passed these, before anything is sized by it.

// Largest value of any ModelConfig count (dim, n_layers, vocab_size,
// seq_len, ...) a file may state: far beyond any model (the largest
// vocabularies are ~2^18, contexts ~2^20), and small enough that products of
// two stay far from overflow.
inline constexpr uint32_t kMaxConfigValue = uint32_t{1} << 24;

// Fails unless a file with `tensors` tensors can hold `n_layers` layers of at
// least `tensors_per_layer` tensors each plus `other_tensors` outside the
// layers. `field` names the key that stated n_layers ("llama.block_count").
// Called before the loaders size anything by n_layers, so a hostile count
// is refused instead of allocated.
inline Status CheckLayerCount(uint64_t n_layers, uint64_t tensors, uint64_t tensors_per_layer,
                              uint64_t other_tensors, const char* field) {
  uint64_t needed = 0;
  if (!CheckedMul(n_layers, tensors_per_layer, &needed) ||
      !CheckedAdd(needed, other_tensors, &needed) || needed > tensors) {
    return DataLoss("%s = %llu needs at least %llu tensors, the file has %llu", field,
                    static_cast<unsigned long long>(n_layers),
                    static_cast<unsigned long long>(needed),
                    static_cast<unsigned long long>(tensors));
  }
  return Status::Ok();
}

// Tensors a Llama layer has at least, in every format: two norms and seven
// matrices (palettized .lutra matrices have two tensors each).
inline constexpr uint64_t kMinTensorsPerLayer = 9;

// Checks the invariants a forward pass relies on, and the hard limit
// kMaxConfigValue on every count; messages name the field.
inline Status ValidateConfig(const ModelConfig& c) {
  const struct { const char* name; int value; } fields[] = {
      {"dim", c.dim},           {"hidden_dim", c.hidden_dim}, {"n_layers", c.n_layers},
      {"n_heads", c.n_heads},   {"n_kv_heads", c.n_kv_heads}, {"head_dim", c.head_dim},
      {"vocab_size", c.vocab_size}, {"seq_len", c.seq_len},   {"rope_dim", c.rope_dim}};
  for (const auto& f : fields) {
    if (f.value <= 0) return InvalidArgument("model config: %s = %d, must be > 0", f.name, f.value);
    if (uint32_t(f.value) > kMaxConfigValue) {
      return InvalidArgument("model config: %s = %d exceeds the limit 2^24", f.name, f.value);
    }
  }
  if (c.n_heads % c.n_kv_heads != 0) {
    return InvalidArgument("model config: n_heads %d is not a multiple of n_kv_heads %d",
                           c.n_heads, c.n_kv_heads);
  }
  if (int64_t{c.n_heads} * c.head_dim > INT32_MAX) {
    return InvalidArgument("model config: n_heads %d * head_dim %d overflows", c.n_heads,
                           c.head_dim);
  }
  if (c.rope_dim > c.head_dim || c.rope_dim % 2 != 0) {
    return InvalidArgument("model config: rope_dim %d must be even and <= head_dim %d",
                           c.rope_dim, c.head_dim);
  }
  if (!(c.rope_theta > 0.0f) || !(c.norm_eps > 0.0f) || !(c.norm_eps < 1.0f)) {
    return InvalidArgument("model config: rope_theta %g must be > 0 and norm_eps %g in (0, 1)",
                           static_cast<double>(c.rope_theta), static_cast<double>(c.norm_eps));
  }
  if (!(c.rope_linear_factor > 0.0f && c.rope_linear_factor < 1e30f)) {
    return InvalidArgument("model config: rope_linear_factor %g must be finite and > 0",
                           static_cast<double>(c.rope_linear_factor));
  }
  if (!c.rope_freq_factors.empty() && c.rope_freq_factors.size() != size_t(c.rope_dim / 2)) {
    return InvalidArgument("model config: %zu rope_freq_factors, need rope_dim / 2 = %d",
                           c.rope_freq_factors.size(), c.rope_dim / 2);
  }
  for (size_t i = 0; i < c.rope_freq_factors.size(); ++i) {
    const float f = c.rope_freq_factors[i];
    if (!(f > 0.0f && f < 1e30f)) {
      return InvalidArgument("model config: rope_freq_factors[%zu] = %g must be finite and > 0",
                             i, static_cast<double>(f));
    }
  }
  return Status::Ok();
}

// The angular frequency of each RoPE pair (rope_dim / 2 values, in double):
// theta^(-2i / rope_dim) / rope_freq_factors[i] / rope_linear_factor, so
// that pair i of the token at `pos` turns by pos * result[i]. Without
// scaling this is bit-identical to the plain-theta kernel (ops-inl.h RoPE).
inline std::vector<double> RopeInverseFrequencies(const ModelConfig& c) {
  const size_t half = c.rope_dim > 0 ? size_t(c.rope_dim / 2) : 0;
  std::vector<double> f(half);
  for (size_t i = 0; i < half; ++i) {
    f[i] = std::pow(static_cast<double>(c.rope_theta),
                    -2.0 * static_cast<double>(i) / static_cast<double>(c.rope_dim));
    if (i < c.rope_freq_factors.size()) f[i] /= static_cast<double>(c.rope_freq_factors[i]);
    if (c.rope_linear_factor != 1.0f) f[i] /= static_cast<double>(c.rope_linear_factor);
  }
  return f;
}

// One transformer block; every pointer is row-major [out, in] (or a vector).
struct LayerWeightsF32 {
  const float* attn_norm = nullptr;  // [dim]
  const float* wq = nullptr;         // [q_dim, dim]
  const float* wk = nullptr;         // [kv_dim, dim]
  const float* wv = nullptr;         // [kv_dim, dim]
  const float* wo = nullptr;         // [dim, q_dim]
  const float* ffn_norm = nullptr;   // [dim]
  const float* w1 = nullptr;         // gate [hidden_dim, dim]
  const float* w2 = nullptr;         // down [dim, hidden_dim]
  const float* w3 = nullptr;         // up   [hidden_dim, dim]
  // Optional biases added after the projection (null: none; qwen2 has them).
  const float* bq = nullptr;         // [q_dim]
  const float* bk = nullptr;         // [kv_dim]
  const float* bv = nullptr;         // [kv_dim]
};

// f32 weights of a whole model. The pointers refer either into `file` (f32
// tensors used in place) or into `converted` (tensors converted on load);
// both keep their addresses when the object is moved. Move-only.
struct ModelWeightsF32 {
  ModelConfig config;
  const float* token_embedding = nullptr;  // [vocab_size, dim]
  std::vector<LayerWeightsF32> layers;     // n_layers
  const float* final_norm = nullptr;       // [dim]
  const float* classifier = nullptr;       // [vocab_size, dim]; == token_embedding if tied

  // Storage (do not modify while the pointers above are in use).
  MappedFile file;
  std::vector<std::vector<float>> converted;
};

namespace model_internal {

// Product of three factors, or DataLoss when it overflows.
inline Status CheckedCount(const uint64_t (&dims)[3], uint64_t* out, const char* what) {
  uint64_t n = 1;
  for (uint64_t f : dims) {
    if (!CheckedMul(n, f, &n)) return DataLoss("llama2c: size of %s overflows", what);
  }
  *out = n;
  return Status::Ok();
}

// Returns p as float* if suitably aligned for in-place use, else nullptr.
inline const float* AlignedFloats(const uint8_t* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(float) == 0
             ? reinterpret_cast<const float*>(p)
             : nullptr;
}

}  // namespace model_internal

// Parses and validates a llama2.c header (the first 28 bytes) against the
// total file size. Errors: DataLoss naming the field or the size mismatch.
inline StatusOr<ModelConfig> ReadLlama2cConfig(const uint8_t* data, size_t size) {
  ByteReader r(data, size, "llama2c");
  int32_t h[7] = {0, 0, 0, 0, 0, 0, 0};
  static const char* const kNames[7] = {"dim",        "hidden_dim", "n_layers", "n_heads",
                                        "n_kv_heads", "vocab_size", "seq_len"};
  for (int i = 0; i < 7; ++i) {
    LUTRA_RETURN_IF_ERROR(r.Read(&h[i], std::string("header field ") + kNames[i]));
    // llama2.c's export version >= 1 starts with magic "ak42" (0x616b3432).
    if (i == 0 && static_cast<uint32_t>(h[0]) == 0x616b3432u) {
      return Unimplemented("llama2c: this is a versioned export (magic 'ak42'); only the "
                           "legacy version 0 format (export.py --version 0) is supported");
    }
  }
  ModelConfig c;
  c.dim = h[0];
  c.hidden_dim = h[1];
  c.n_layers = h[2];
  c.n_heads = h[3];
  c.n_kv_heads = h[4];
  c.tied_embedding = h[5] > 0;
  c.vocab_size = h[5] == INT32_MIN ? 0 : (h[5] < 0 ? -h[5] : h[5]);
  c.seq_len = h[6];
  for (int i = 0; i < 7; ++i) {
    if (h[i] == 0 || (i != 5 && h[i] < 0) || (i == 5 && c.vocab_size <= 0)) {
      return DataLoss("llama2c: header %s = %d is invalid (dim %d, hidden_dim %d, n_layers %d, "
                      "n_heads %d, n_kv_heads %d, vocab_size %d, seq_len %d)",
                      kNames[i], h[i], h[0], h[1], h[2], h[3], h[4], h[5], h[6]);
    }
  }
  if (c.dim % c.n_heads != 0) {
    return DataLoss("llama2c: dim %d is not a multiple of n_heads %d", c.dim, c.n_heads);
  }
  c.head_dim = c.dim / c.n_heads;
  c.rope_dim = c.head_dim;
  c.rope_theta = 10000.0f;
  c.norm_eps = 1e-5f;
  c.rope_layout = RopeLayout::kAdjacentPairs;
  if (c.n_kv_heads > c.n_heads || c.head_dim % 2 != 0) {
    return DataLoss("llama2c: n_kv_heads %d > n_heads %d or odd head_dim %d", c.n_kv_heads,
                    c.n_heads, c.head_dim);
  }
  Status s = ValidateConfig(c);
  if (!s.ok()) return DataLoss("llama2c: %s", s.message().c_str());
  return c;
}

// Loads a llama2.c checkpoint held in `file` (kept alive in the result).
inline StatusOr<ModelWeightsF32> LoadLlama2cModel(MappedFile file) {
  StatusOr<ModelConfig> config = ReadLlama2cConfig(file.data(), file.size());
  if (!config.ok()) return config.status().WithContext(file.path());
  const ModelConfig& c = *config;
  const uint64_t dim = c.dim, hid = c.hidden_dim, L = c.n_layers, V = c.vocab_size,
                 kv = c.kv_dim(), q = c.q_dim(), S = c.seq_len, hs = c.head_dim;
  // Element counts in file order. Three int32 factors can exceed 2^64 only
  // in adversarial headers, which CheckedCount rejects.
  struct Part {
    const char* name;
    uint64_t dims[3];
  };
  const Part parts[] = {
      {"token_embedding", {1, V, dim}}, {"rms_att", {1, L, dim}},  {"wq", {L, q, dim}},
      {"wk", {L, kv, dim}},             {"wv", {L, kv, dim}},      {"wo", {L, dim, q}},
      {"rms_ffn", {1, L, dim}},         {"w1", {L, hid, dim}},     {"w2", {L, dim, hid}},
      {"w3", {L, hid, dim}},            {"rms_final", {1, 1, dim}}, {"freq_cis", {2, S, hs / 2}},
      {"wcls", {1, c.tied_embedding ? 0 : V, dim}},
  };
  constexpr size_t kParts = sizeof(parts) / sizeof(parts[0]);
  uint64_t offsets[kParts + 1];
  offsets[0] = 28;
  for (size_t i = 0; i < kParts; ++i) {
    uint64_t n = 0, bytes = 0;
    LUTRA_RETURN_IF_ERROR(model_internal::CheckedCount(parts[i].dims, &n, parts[i].name));
    if (!CheckedMul(n, 4, &bytes) || !CheckedAdd(offsets[i], bytes, &offsets[i + 1])) {
      return DataLoss("%s: llama2c: size of %s overflows", file.path().c_str(), parts[i].name);
    }
  }
  if (offsets[kParts] != file.size()) {
    return DataLoss(
        "%s: llama2c: file size %zu does not match the %llu bytes implied by the header (dim %d, "
        "hidden_dim %d, n_layers %d, n_heads %d, n_kv_heads %d, vocab_size %d%s, seq_len %d)",
        file.path().c_str(), file.size(), static_cast<unsigned long long>(offsets[kParts]),
        c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size,
        c.tied_embedding ? " shared" : " unshared", c.seq_len);
  }
  ModelWeightsF32 w;
  w.config = c;
  w.file = std::move(file);
  const float* base = model_internal::AlignedFloats(w.file.data());
  if (base == nullptr) {
    // Only possible for FromBuffer data with odd alignment: copy once.
    w.converted.emplace_back(w.file.size() / 4);
    std::memcpy(w.converted.back().data(), w.file.data(), w.converted.back().size() * 4);
    base = w.converted.back().data();
  }
  const auto at = [&](size_t part) { return base + offsets[part] / 4; };
  w.token_embedding = at(0);
  w.layers.resize(c.n_layers);
  for (uint64_t l = 0; l < L; ++l) {
    LayerWeightsF32& y = w.layers[l];
    y.attn_norm = at(1) + l * dim;
    y.wq = at(2) + l * q * dim;
    y.wk = at(3) + l * kv * dim;
    y.wv = at(4) + l * kv * dim;
    y.wo = at(5) + l * dim * q;
    y.ffn_norm = at(6) + l * dim;
    y.w1 = at(7) + l * hid * dim;
    y.w2 = at(8) + l * dim * hid;
    y.w3 = at(9) + l * hid * dim;
  }
  w.final_norm = at(10);
  w.classifier = c.tied_embedding ? w.token_embedding : at(12);
  return w;
}

inline StatusOr<ModelWeightsF32> LoadLlama2cModel(const std::string& path) {
  StatusOr<MappedFile> file = MappedFile::Open(path);
  if (!file.ok()) return file.status();
  return LoadLlama2cModel(std::move(*file));
}

// Reads the hyper-parameters of a GGUF "llama" or "qwen2" file (keys
// ARCH.*, the same names for both). vocab_size comes from token_embd's shape
// (checked against ARCH.vocab_size when present). RoPE scaling: type absent
// or "linear" divides positions by ARCH.rope.scaling.factor (or the older
// ARCH.rope.scale_linear) when set, "none" ignores the factor (as llama.cpp
// does); Llama 3's "llama3" scaling comes as rope_freqs.weight, F32
// [rope_dim / 2] frequency divisors; any other type (yarn, longrope, ...) is
// refused.
inline StatusOr<ModelConfig> ReadGgufLlamaConfig(const GgufReader& g) {
  StatusOr<std::string_view> arch = g.GetString("general.architecture");
  if (!arch.ok()) return arch.status();
  ModelConfig c;
  if (*arch == "llama") {
    c.rope_layout = RopeLayout::kAdjacentPairs;  // llama.cpp permuted q/k rows for this
  } else if (*arch == "qwen2") {
    c.rope_layout = RopeLayout::kHalfSplit;      // HF row order, ggml NeoX rope
  } else {
    return Unimplemented("gguf: architecture '%s' is not supported (only 'llama' and 'qwen2')",
                         gguf_internal::Printable(*arch).c_str());
  }
  const std::string a(*arch);
  const auto key = [&a](const char* name) { return a + "." + name; };
  const struct { const char* key; int* out; bool required; } ints[] = {
      {"embedding_length", &c.dim, true},
      {"feed_forward_length", &c.hidden_dim, true},
      {"block_count", &c.n_layers, true},
      {"attention.head_count", &c.n_heads, true},
      {"attention.head_count_kv", &c.n_kv_heads, false},
      {"context_length", &c.seq_len, true},
  };
  for (const auto& f : ints) {
    StatusOr<uint32_t> v = f.required ? g.GetU32(key(f.key)) : g.GetU32(key(f.key), 0);
    if (!v.ok()) return v.status();
    if (*v > kMaxConfigValue) {
      return DataLoss("gguf: %s = %u exceeds the limit 2^24", key(f.key).c_str(), *v);
    }
    *f.out = static_cast<int>(*v);
  }
  if (c.n_kv_heads == 0) c.n_kv_heads = c.n_heads;  // no GQA
  if (c.n_heads <= 0 || c.dim % c.n_heads != 0) {
    return DataLoss("gguf: %s %d is not a multiple of head_count %d",
                    key("embedding_length").c_str(), c.dim, c.n_heads);
  }
  StatusOr<uint32_t> key_len = g.GetU32(key("attention.key_length"),
                                        static_cast<uint32_t>(c.dim / c.n_heads));
  if (!key_len.ok()) return key_len.status();
  StatusOr<uint32_t> value_len = g.GetU32(key("attention.value_length"), *key_len);
  if (!value_len.ok()) return value_len.status();
  if (*key_len != *value_len || *key_len > (1u << 16)) {
    return Unimplemented("gguf: attention key_length %u != value_length %u (unsupported)",
                         *key_len, *value_len);
  }
  c.head_dim = static_cast<int>(*key_len);
  StatusOr<uint32_t> rope_dim = g.GetU32(key("rope.dimension_count"),
                                         static_cast<uint32_t>(c.head_dim));
  if (!rope_dim.ok()) return rope_dim.status();
  c.rope_dim = static_cast<int>(*rope_dim > (1u << 16) ? (1u << 16) : *rope_dim);
  StatusOr<float> theta = g.GetF32(key("rope.freq_base"), 10000.0f);
  if (!theta.ok()) return theta.status();
  c.rope_theta = *theta;
  StatusOr<float> eps = g.GetF32(key("attention.layer_norm_rms_epsilon"), 1e-5f);
  if (!eps.ok()) return eps.status();
  c.norm_eps = *eps;
  // RoPE scaling changes the rotation angles: what is not implemented is
  // refused rather than run with silently wrong logits.
  StatusOr<std::string_view> scaling = g.GetString(key("rope.scaling.type"), "linear");
  if (!scaling.ok()) return scaling.status();
  if (*scaling != "none" && *scaling != "linear") {
    return Unimplemented("gguf: %s = '%s' is not supported (only none, linear, and llama3 "
                         "factors as rope_freqs.weight)",
                         key("rope.scaling.type").c_str(),
                         gguf_internal::Printable(*scaling).c_str());
  }
  StatusOr<float> factor = g.GetF32(key("rope.scaling.factor"), 0.0f);
  if (factor.ok() && *factor == 0.0f) factor = g.GetF32(key("rope.scale_linear"), 0.0f);
  if (!factor.ok()) return factor.status();
  if (*scaling == "linear" && *factor != 0.0f) {
    if (!(*factor > 0.0f && *factor < 1e30f)) {
      return DataLoss("gguf: RoPE scaling factor %g must be finite and > 0",
                      static_cast<double>(*factor));
    }
    c.rope_linear_factor = *factor;
  }
  if (const GgufTensorInfo* rf = g.FindTensor("rope_freqs.weight")) {
    if (rf->n_dims != 1 || rf->ne[0] != static_cast<uint64_t>(c.rope_dim / 2)) {
      return DataLoss("gguf: rope_freqs.weight has shape %s, expected [rope_dim / 2 = %d]",
                      rf->ShapeString().c_str(), c.rope_dim / 2);
    }
    StatusOr<std::vector<float>> f = TensorToF32(*rf);
    if (!f.ok()) return f.status().WithContext("gguf: rope_freqs.weight");
    c.rope_freq_factors = std::move(*f);
  }
  StatusOr<const GgufTensorInfo*> emb = g.GetTensor("token_embd.weight");
  if (!emb.ok()) return emb.status();
  if ((*emb)->n_dims != 2 || (*emb)->ne[0] != static_cast<uint64_t>(c.dim) ||
      (*emb)->ne[1] > static_cast<uint64_t>(INT32_MAX)) {
    return DataLoss("gguf: token_embd.weight has shape %s, expected [%d, vocab_size]",
                    (*emb)->ShapeString().c_str(), c.dim);
  }
  c.vocab_size = static_cast<int>((*emb)->ne[1]);
  StatusOr<uint32_t> vocab = g.GetU32(key("vocab_size"), static_cast<uint32_t>(c.vocab_size));
  if (!vocab.ok()) return vocab.status();
  if (*vocab != static_cast<uint32_t>(c.vocab_size)) {
    return DataLoss("gguf: %s %u != token_embd.weight rows %d", key("vocab_size").c_str(),
                    *vocab, c.vocab_size);
  }
  c.tied_embedding = g.FindTensor("output.weight") == nullptr;
  Status s = ValidateConfig(c);
  if (!s.ok()) return DataLoss("gguf: %s", s.message().c_str());
  return c;
}

// Heap bytes LoadGgufModel allocates for `g`'s tensors: each tensor that is
// not f32, or not 4-byte aligned in memory, is converted to f32
// (saturating at 2^64 - 1; n_elements is bounded by the file size already).
inline uint64_t GgufConvertedBytes(const GgufReader& g) {
  uint64_t total = 0;
  for (const GgufTensorInfo& t : g.tensors()) {
    if (t.type == static_cast<uint32_t>(GgmlType::kF32) &&
        model_internal::AlignedFloats(t.data) != nullptr) {
      continue;
    }
    uint64_t bytes = 0;
    if (!CheckedMul(t.n_elements, sizeof(float), &bytes) || !CheckedAdd(total, bytes, &total)) {
      return ~uint64_t{0};
    }
  }
  return total;
}

// Loads a GGUF llama or qwen2 model; `file` is kept alive in the result.
// max_bytes (0: no limit) bounds the f32 conversions (GgufConvertedBytes),
// checked before any is made.
inline StatusOr<ModelWeightsF32> LoadGgufModel(GgufFile file, uint64_t max_bytes = 0) {
  const GgufReader& g = file.reader();
  StatusOr<ModelConfig> config = ReadGgufLlamaConfig(g);
  if (!config.ok()) return config.status().WithContext(file.file().path());
  const Status budget =
      CheckMemoryBudget(GgufConvertedBytes(g), max_bytes, "gguf: converting tensors to f32");
  if (!budget.ok()) return budget.WithContext(file.file().path());
  ModelWeightsF32 w;
  w.config = *config;
  const ModelConfig& c = w.config;
  // Resolves a tensor of the expected ggml shape {in, out} (or {n} for a
  // vector) to f32: in place when it is f32 and aligned, else converted.
  // Optional tensors that are absent leave *dst null.
  std::vector<std::vector<float>> converted;
  std::set<std::string, std::less<>> used = {"rope_freqs.weight"};  // read by ReadGgufLlamaConfig
  const auto get = [&](const std::string& name, uint64_t in, uint64_t out, const float** dst,
                       bool optional = false) -> Status {
    if (optional && g.FindTensor(name) == nullptr) return Status::Ok();
    StatusOr<const GgufTensorInfo*> t = g.GetTensor(name);
    if (!t.ok()) return t.status();
    used.insert(name);
    const GgufTensorInfo& ti = **t;
    const uint32_t want_dims = out == 0 ? 1 : 2;
    if (ti.n_dims != want_dims || ti.ne[0] != in || (out != 0 && ti.ne[1] != out)) {
      return DataLoss("gguf: tensor '%s' has shape %s, expected [%llu%s%s]", name.c_str(),
                      ti.ShapeString().c_str(), static_cast<unsigned long long>(in),
                      out ? ", " : "", out ? std::to_string(out).c_str() : "");
    }
    if (ti.type == static_cast<uint32_t>(GgmlType::kF32)) {
      if (const float* p = model_internal::AlignedFloats(ti.data)) {
        *dst = p;
        return Status::Ok();
      }
    }
    StatusOr<std::vector<float>> f = TensorToF32(ti);
    if (!f.ok()) return f.status();
    converted.push_back(std::move(*f));
    *dst = converted.back().data();  // heap buffer: stable across moves
    return Status::Ok();
  };
  const uint64_t dim = c.dim, hid = c.hidden_dim, q = c.q_dim(), kv = c.kv_dim(),
                 V = c.vocab_size;
  Status s = get("token_embd.weight", dim, V, &w.token_embedding);
  if (s.ok()) s = get("output_norm.weight", dim, 0, &w.final_norm);
  if (s.ok()) {
    if (c.tied_embedding) {
      w.classifier = w.token_embedding;
    } else {
      s = get("output.weight", dim, V, &w.classifier);
    }
  }
  // Each layer has two norms and seven matrices (token_embd and output_norm
  // are outside them): a block_count the tensors cannot back is refused
  // before anything is sized by it.
  if (s.ok()) {
    const char* block_count = c.rope_layout == RopeLayout::kHalfSplit ? "qwen2.block_count"
                                                                       : "llama.block_count";
    s = CheckLayerCount(uint64_t(c.n_layers), g.tensors().size(), kMinTensorsPerLayer, 2,
                        block_count)
            .WithContext("gguf");
  }
  if (s.ok()) w.layers.resize(c.n_layers);
  for (int l = 0; l < c.n_layers && s.ok(); ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    LayerWeightsF32& y = w.layers[l];
    s = get(p + "attn_norm.weight", dim, 0, &y.attn_norm);
    if (s.ok()) s = get(p + "attn_q.weight", dim, q, &y.wq);
    if (s.ok()) s = get(p + "attn_k.weight", dim, kv, &y.wk);
    if (s.ok()) s = get(p + "attn_v.weight", dim, kv, &y.wv);
    if (s.ok()) s = get(p + "attn_output.weight", q, dim, &y.wo);
    if (s.ok()) s = get(p + "ffn_norm.weight", dim, 0, &y.ffn_norm);
    if (s.ok()) s = get(p + "ffn_gate.weight", dim, hid, &y.w1);
    if (s.ok()) s = get(p + "ffn_down.weight", hid, dim, &y.w2);
    if (s.ok()) s = get(p + "ffn_up.weight", dim, hid, &y.w3);
    if (s.ok()) s = get(p + "attn_q.bias", q, 0, &y.bq, /*optional=*/true);
    if (s.ok()) s = get(p + "attn_k.bias", kv, 0, &y.bk, /*optional=*/true);
    if (s.ok()) s = get(p + "attn_v.bias", kv, 0, &y.bv, /*optional=*/true);
  }
  // A tensor the forward pass does not read (an output bias, q/k norms of
  // another architecture, ...) would silently change nothing: refuse.
  for (const GgufTensorInfo& t : g.tensors()) {
    if (!s.ok()) break;
    if (used.count(t.name) == 0) {
      s = Unimplemented("gguf: tensor '%s' is not used by lutra's %s forward pass "
                        "(unsupported model variant)",
                        gguf_internal::Printable(t.name).c_str(),
                        c.rope_layout == RopeLayout::kHalfSplit ? "qwen2" : "llama");
    }
  }
  if (!s.ok()) return s.WithContext(file.file().path());
  w.converted = std::move(converted);
  w.file = std::move(file).ReleaseFile();
  return w;
}

inline StatusOr<ModelWeightsF32> LoadGgufModel(const std::string& path) {
  StatusOr<GgufFile> file = GgufFile::Open(path);
  if (!file.ok()) return file.status();
  return LoadGgufModel(std::move(*file));
}

// Loads either format, chosen by the file's first bytes ("GGUF" or not).
inline StatusOr<ModelWeightsF32> LoadModel(const std::string& path) {
  StatusOr<MappedFile> file = MappedFile::Open(path);
  if (!file.ok()) return file.status();
  if (file->size() >= 4 && std::memcmp(file->data(), "GGUF", 4) == 0) {
    StatusOr<GgufFile> g = GgufFile::FromMapped(std::move(*file));
    if (!g.ok()) return g.status();
    return LoadGgufModel(std::move(*g));
  }
  return LoadLlama2cModel(std::move(*file));
}

// Weights plus the matching tokenizer: from a GGUF file's own vocabulary, or
// from a llama2.c tokenizer.bin (required for .bin checkpoints; for GGUF a
// non-empty tokenizer_path overrides the embedded vocabulary).
struct ModelAndTokenizer {
  ModelWeightsF32 weights;
  Tokenizer tokenizer;
};

inline StatusOr<ModelAndTokenizer> LoadModelAndTokenizer(const std::string& model_path,
                                                         const std::string& tokenizer_path) {
  StatusOr<MappedFile> file = MappedFile::Open(model_path);
  if (!file.ok()) return file.status();
  ModelAndTokenizer out;
  const bool is_gguf = file->size() >= 4 && std::memcmp(file->data(), "GGUF", 4) == 0;
  if (is_gguf) {
    StatusOr<GgufFile> g = GgufFile::FromMapped(std::move(*file));
    if (!g.ok()) return g.status();
    if (tokenizer_path.empty()) {
      StatusOr<Tokenizer> t = Tokenizer::FromGguf(g->reader());
      if (!t.ok()) return t.status().WithContext(model_path);
      out.tokenizer = std::move(*t);
    }
    StatusOr<ModelWeightsF32> w = LoadGgufModel(std::move(*g));
    if (!w.ok()) return w.status();
    out.weights = std::move(*w);
  } else {
    if (tokenizer_path.empty()) {
      return InvalidArgument("%s: a llama2.c checkpoint needs a tokenizer file",
                             model_path.c_str());
    }
    StatusOr<ModelWeightsF32> w = LoadLlama2cModel(std::move(*file));
    if (!w.ok()) return w.status();
    out.weights = std::move(*w);
  }
  if (!tokenizer_path.empty()) {
    StatusOr<Tokenizer> t =
        Tokenizer::FromLlama2cFile(tokenizer_path, out.weights.config.vocab_size);
    if (!t.ok()) return t.status();
    out.tokenizer = std::move(*t);
  }
  if (out.tokenizer.vocab_size() != out.weights.config.vocab_size) {
    return DataLoss("%s: tokenizer has %d tokens, model vocab_size is %d", model_path.c_str(),
                    out.tokenizer.vocab_size(), out.weights.config.vocab_size);
  }
  return out;
}

}  // namespace lutra

#endif  // LUTRA_LLAMA_MODEL_H_
