// LoRA adapter files: one format for lutra's own adapters and llama.cpp's.
//
// An adapter file is a GGUF file laid out exactly as llama.cpp's
// convert_lora_to_gguf.py writes it (docs/lora.md has the full contract):
//   general.type = "adapter", adapter.type = "lora",
//   adapter.lora.alpha (f32; 0 or absent = no alpha scaling),
//   per adapted matrix "blk.<L>.<stem>.weight" two tensors:
//     "<...>.weight.lora_a": ggml ne = [K, r]  (A, r rows of K: row-major r x K)
//     "<...>.weight.lora_b": ggml ne = [r, N]  (B, N rows of r: row-major N x r)
//   stems attn_q, attn_k, attn_v, attn_output, ffn_gate (w1), ffn_down (w2),
//   ffn_up (w3); element types F32, F16 or BF16.
// Scale per target, as llama.cpp computes it: alpha / r when alpha != 0,
// else 1; times the user's scale (`--lora FILE:SCALE`).
// lutra adds optional keys that llama.cpp ignores: general.name,
// lutra.lora.kind ("task" or "recovery") and lutra.lora.scales (f32 array,
// one per lora_a tensor in file order) when a target's scale is not
// alpha / r. So lutra's adapters load in llama.cpp and llama.cpp's in lutra.
//
// Why GGUF: the container's own validation (counts, offsets, sizes, types,
// alignment: gguf.h's reader) comes for free, tensors are mmap-able, and
// existing adapters work unchanged.
//
// Validation on load: every tensor must be a lora_a/lora_b of a target
// projection in a layer the base model has, in pairs, 2-D, of a supported
// type, with shapes matching the base (errors name the tensor and both
// shapes); all values finite. The factors are copied into the Adapter (the
// file can be closed), so Adapter::bytes() is the memory it costs.
#ifndef LUTRA_LORA_FILE_H_
#define LUTRA_LORA_FILE_H_

#include <stddef.h>
#include <stdint.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lutra/base/status.h"
#include "lutra/format/gguf.h"
#include "lutra/format/gguf_writer.h"
#include "lutra/format/lora.h"
#include "lutra/format/mapped_file.h"

namespace lutra {

struct LoadAdapterOptions {
  float scale = 1.0f;       // user scale, multiplies each target's scale
  std::string name;         // empty: general.name, else the file name
  // Storage of factors given as F32 in the file (f16 halves the memory and
  // is what the epilogue is fastest with). F16/BF16 tensors keep their type.
  ElementType f32_storage = ElementType::kF16;
};

namespace lora_file_detail {

// Splits "blk.<L>.<stem>.weight.lora_<x>" into L, stem and x ('a' or 'b').
inline bool ParseLoraName(const std::string& name, size_t* layer, std::string* stem,
                          char* which) {
  const std::string kA = ".weight.lora_a", kB = ".weight.lora_b";
  std::string base;
  if (name.size() > kA.size() && name.compare(name.size() - kA.size(), kA.size(), kA) == 0) {
    *which = 'a';
  } else if (name.size() > kB.size() &&
             name.compare(name.size() - kB.size(), kB.size(), kB) == 0) {
    *which = 'b';
  } else {
    return false;
  }
  base = name.substr(0, name.size() - kA.size());  // "blk.<L>.<stem>"
  if (base.compare(0, 4, "blk.") != 0) {
    *layer = SIZE_MAX;  // not a per-layer tensor (token_embd, output, ...)
    *stem = base;
    return true;
  }
  size_t i = 4, l = 0;
  if (i >= base.size() || base[i] < '0' || base[i] > '9') return false;
  for (; i < base.size() && base[i] >= '0' && base[i] <= '9'; ++i) {
    l = l * 10 + static_cast<size_t>(base[i] - '0');
    if (l > (size_t{1} << 20)) return false;
  }
  if (i >= base.size() || base[i] != '.') return false;
  *layer = l;
  *stem = base.substr(i + 1);
  return true;
}

}  // namespace lora_file_detail

// Builds an Adapter from a parsed GGUF adapter file (`source` names it in
// errors), validated against `base` (see the top of this file).
inline StatusOr<Adapter> ParseAdapter(const GgufReader& gguf, const BaseShapes& base,
                                      const LoadAdapterOptions& options,
                                      const std::string& source) {
  using namespace lora_file_detail;
  const char* src = source.c_str();
  // Header keys. A wrong type of a present key is an error, not a default.
  StatusOr<std::string_view> general_type = gguf.GetString("general.type", "");
  if (!general_type.ok()) return general_type.status().WithContext(source);
  if (*general_type != "adapter") {
    return InvalidArgument("%s: general.type is '%s', a LoRA adapter file has 'adapter'", src,
                           std::string(*general_type).c_str());
  }
  StatusOr<std::string_view> adapter_type = gguf.GetString("adapter.type", "");
  if (!adapter_type.ok()) return adapter_type.status().WithContext(source);
  if (*adapter_type != "lora") {
    return Unimplemented("%s: adapter.type is '%s', only 'lora' is supported", src,
                         std::string(*adapter_type).c_str());
  }
  StatusOr<float> alpha = gguf.GetF32("adapter.lora.alpha", 0.0f);
  if (!alpha.ok()) return alpha.status().WithContext(source);
  if (!std::isfinite(*alpha)) return InvalidArgument("%s: adapter.lora.alpha is not finite", src);
  if (!std::isfinite(options.scale)) return InvalidArgument("%s: user scale is not finite", src);
  std::vector<float> scales;
  if (gguf.Find("lutra.lora.scales") != nullptr) {
    StatusOr<std::vector<float>> s = gguf.GetF32Array("lutra.lora.scales");
    if (!s.ok()) return s.status().WithContext(source);
    scales = std::move(s).value();
  }
  StatusOr<std::string_view> kind = gguf.GetString("lutra.lora.kind", "task");
  if (!kind.ok()) return kind.status().WithContext(source);
  StatusOr<std::string_view> general_name = gguf.GetString("general.name", "");
  if (!general_name.ok()) return general_name.status().WithContext(source);

  std::string name = options.name;
  if (name.empty()) name = std::string(*general_name);
  if (name.empty()) {
    const size_t slash = source.find_last_of('/');
    name = slash == std::string::npos ? source : source.substr(slash + 1);
  }
  StatusOr<Adapter> created = Adapter::Create(name, base);
  if (!created.ok()) return created.status();
  Adapter adapter = std::move(created).value();
  adapter.set_kind(std::string(*kind));

  // Pair up the tensors: key = (layer, projection), in lora_a file order.
  struct Pair {
    const GgufTensorInfo* a = nullptr;
    const GgufTensorInfo* b = nullptr;
    size_t layer = 0;
    Projection p = Projection::kQ;
  };
  std::vector<Pair> pairs;
  std::map<std::pair<size_t, int>, size_t> index;  // -> pairs index
  // lora_b tensors seen before their lora_a: resolved after the loop.
  for (const GgufTensorInfo& t : gguf.tensors()) {
    const std::string tname(t.name);
    size_t layer;
    std::string stem;
    char which;
    if (!ParseLoraName(tname, &layer, &stem, &which)) {
      return InvalidArgument("%s: tensor '%s' is not a LoRA factor (need "
                             "blk.<layer>.<projection>.weight.lora_a or .lora_b)",
                             src, gguf_internal::Printable(tname).c_str());
    }
    Projection p;
    if (layer == SIZE_MAX || !ProjectionFromGgufName(stem, &p)) {
      return Unimplemented("%s: tensor '%s' adapts '%s', lutra adapts only attn_q, attn_k, "
                           "attn_v, attn_output, ffn_gate, ffn_down and ffn_up",
                           src, gguf_internal::Printable(tname).c_str(),
                           gguf_internal::Printable(stem).c_str());
    }
    if (layer >= base.num_layers) {
      return InvalidArgument("%s: tensor '%s' is for layer %zu, the base model has %zu layers",
                             src, tname.c_str(), layer, base.num_layers);
    }
    ElementType wt;
    if (!GgmlToElementType(t.type, &wt) || !IsFloatElement(wt)) {
      return Unimplemented("%s: tensor '%s' has type %s, LoRA factors must be f32, f16 or bf16",
                           src, tname.c_str(), t.type_name());
    }
    const auto key = std::make_pair(layer, static_cast<int>(p));
    auto it = index.find(key);
    if (it == index.end()) {
      it = index.emplace(key, pairs.size()).first;
      pairs.push_back(Pair());
      pairs.back().layer = layer;
      pairs.back().p = p;
    }
    Pair& pair = pairs[it->second];
    const GgufTensorInfo*& slot = which == 'a' ? pair.a : pair.b;
    if (slot != nullptr) return InvalidArgument("%s: tensor '%s' appears twice", src, tname.c_str());
    slot = &t;
  }
  if (pairs.empty()) return InvalidArgument("%s: adapter has no LoRA tensors", src);
  if (!scales.empty() && scales.size() != pairs.size()) {
    return InvalidArgument("%s: lutra.lora.scales has %zu entries for %zu adapted matrices", src,
                           scales.size(), pairs.size());
  }
  for (size_t i = 0; i < pairs.size(); ++i) {
    const Pair& pair = pairs[i];
    const std::string stem = std::string("blk.") + std::to_string(pair.layer) + "." +
                             ProjectionGgufName(pair.p) + ".weight";
    if (pair.a == nullptr || pair.b == nullptr) {
      return InvalidArgument("%s: tensor '%s.lora_%c' has no matching '%s.lora_%c'", src,
                             stem.c_str(), pair.a ? 'a' : 'b', stem.c_str(), pair.a ? 'b' : 'a');
    }
    const GgufTensorInfo& a = *pair.a;
    const GgufTensorInfo& b = *pair.b;
    const size_t N = base.Rows(pair.p), K = base.Cols(pair.p);
    if (a.n_dims != 2 || b.n_dims != 2) {
      const GgufTensorInfo& bad = a.n_dims != 2 ? a : b;
      return InvalidArgument("%s: tensor '%s' has %u dimensions %s, need 2", src,
                             std::string(bad.name).c_str(), bad.n_dims,
                             bad.ShapeString().c_str());
    }
    const uint64_t rank = a.ne[1];
    if (a.ne[0] != K || rank == 0 || rank > kMaxLoraRank) {
      return InvalidArgument("%s: tensor '%s' has shape %s, base %s is %zu x %zu so it needs "
                             "[%zu, r] with r in 1..%zu",
                             src, std::string(a.name).c_str(), a.ShapeString().c_str(),
                             ProjectionGgufName(pair.p), N, K, K, kMaxLoraRank);
    }
    if (b.ne[0] != rank || b.ne[1] != N) {
      return InvalidArgument("%s: tensor '%s' has shape %s, base %s is %zu x %zu and lora_a "
                             "has rank %llu, so it needs [%llu, %zu]",
                             src, std::string(b.name).c_str(), b.ShapeString().c_str(),
                             ProjectionGgufName(pair.p), N, K,
                             static_cast<unsigned long long>(rank),
                             static_cast<unsigned long long>(rank), N);
    }
    const size_t r = static_cast<size_t>(rank);
    float scale = scales.empty() ? (*alpha != 0.0f ? *alpha / float(r) : 1.0f) : scales[i];
    scale *= options.scale;
    ElementType ta = ElementType::kF32, tb = ElementType::kF32;
    GgmlToElementType(a.type, &ta);
    GgmlToElementType(b.type, &tb);
    Status s;
    if (ta == tb) {
      const ElementType store = ta == ElementType::kF32 ? options.f32_storage : ta;
      s = adapter.AddFactors(pair.layer, pair.p, r, a.data, r * K, b.data, N * r, ta, store,
                             scale, stem);
    } else {
      // Mixed types: widen both (exactly) to f32, then store as one type.
      std::vector<float> fa(r * K), fb(N * r);
      for (size_t j = 0; j < fa.size(); ++j) fa[j] = LoadElement(a.data, ta, j);
      for (size_t j = 0; j < fb.size(); ++j) fb[j] = LoadElement(b.data, tb, j);
      s = adapter.AddFactors(pair.layer, pair.p, r, fa.data(), fa.size(), fb.data(), fb.size(),
                             ElementType::kF32, options.f32_storage, scale, stem);
    }
    if (!s.ok()) return s.WithContext(source);
  }
  return adapter;
}

// Reads, validates and copies an adapter file (see the top of this file).
// Errors name the file and, for tensor problems, the tensor.
inline StatusOr<std::shared_ptr<const Adapter>> LoadAdapter(
    const std::string& path, const BaseShapes& base,
    const LoadAdapterOptions& options = LoadAdapterOptions()) {
  StatusOr<GgufFile> file = GgufFile::Open(path);
  if (!file.ok()) return file.status();
  StatusOr<Adapter> adapter = ParseAdapter(file->reader(), base, options, path);
  if (!adapter.ok()) return adapter.status();
  return std::shared_ptr<const Adapter>(std::make_shared<Adapter>(std::move(adapter).value()));
}

// Same from bytes in memory (`name` for messages).
inline StatusOr<Adapter> ParseAdapterBytes(const uint8_t* data, size_t size,
                                           const BaseShapes& base,
                                           const LoadAdapterOptions& options = LoadAdapterOptions(),
                                           const std::string& name = "<memory>") {
  StatusOr<GgufReader> reader = GgufReader::Parse(data, size);
  if (!reader.ok()) return reader.status().WithContext(name);
  return ParseAdapter(*reader, base, options, name);
}

// The adapter as GGUF bytes (see the top of this file): llama.cpp-compatible
// tensors, adapter.lora.alpha = scale * rank of the first target (so that
// alpha / r reproduces it), lutra.lora.scales when any target differs.
// When scale * rank is not a finite float (|scale| near FLT_MAX) alpha is
// written as 0 and every scale goes to lutra.lora.scales: the file reads
// back with exactly the adapter's scales rather than an infinite alpha the
// loader refuses (llama.cpp, which ignores lutra.lora.scales, would use 1).
inline StatusOr<std::vector<uint8_t>> SerializeAdapter(const Adapter& adapter) {
  using namespace lora_file_detail;
  const size_t n = adapter.num_targets();
  if (n == 0) {
    return InvalidArgument("lora: adapter '%s' has no targets to save", adapter.name().c_str());
  }
  const LoraFactors& first = adapter.target(0);
  float alpha = first.scale() * float(first.rank());
  if (!std::isfinite(alpha)) alpha = 0.0f;
  bool uniform = true;
  std::vector<float> scales(n);
  for (size_t i = 0; i < n; ++i) {
    const LoraFactors& f = adapter.target(i);
    scales[i] = f.scale();
    // Exact float comparison with what the loader computes from alpha
    // (alpha / r, or 1 for alpha 0, e.g. a scale of 0).
    const float loaded = alpha != 0.0f ? alpha / float(f.rank()) : 1.0f;
    if (loaded != f.scale()) uniform = false;
  }
  GgufWriter out(3);
  out.AddString("general.architecture", "llama");
  out.AddString("general.type", "adapter");
  out.AddString("general.name", adapter.name());
  out.AddString("adapter.type", "lora");
  out.AddF32("adapter.lora.alpha", alpha);
  out.AddString("lutra.lora.kind", adapter.kind());
  if (!uniform) out.AddF32Array("lutra.lora.scales", scales);
  for (size_t i = 0; i < n; ++i) {
    const LoraFactors& f = adapter.target(i);
    const std::string stem = std::string("blk.") + std::to_string(f.layer()) + "." +
                             ProjectionGgufName(f.projection()) + ".weight";
    const GgmlType type = static_cast<GgmlType>(ElementTypeToGgml(f.type()));
    const size_t es = ElementBytes(f.type());
    // ggml order: ne[0] is the contiguous dimension.
    out.AddTensor(stem + ".lora_a", type, {f.cols(), f.rank()}, f.a(), f.a_elements() * es);
    out.AddTensor(stem + ".lora_b", type, {f.rank(), f.rows()}, f.b(), f.b_elements() * es);
  }
  return out.Finish();
}

// Writes the adapter to `path` (via a temporary file renamed into place, so
// a reader never sees a half-written adapter).
inline Status SaveAdapter(const std::string& path, const Adapter& adapter) {
  StatusOr<std::vector<uint8_t>> bytes = SerializeAdapter(adapter);
  if (!bytes.ok()) return bytes.status();
  const std::string tmp = path + ".tmp";
  FILE* f = fopen(tmp.c_str(), "wb");
  if (f == nullptr) return NotFound("lora: cannot create '%s': %s", tmp.c_str(), strerror(errno));
  const size_t wrote = fwrite(bytes->data(), 1, bytes->size(), f);
  const bool closed = fclose(f) == 0;
  if (wrote != bytes->size() || !closed) {
    remove(tmp.c_str());
    return DataLoss("lora: writing '%s' failed after %zu of %zu bytes", tmp.c_str(), wrote,
                    bytes->size());
  }
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    remove(tmp.c_str());
    return DataLoss("lora: cannot rename '%s' to '%s': %s", tmp.c_str(), path.c_str(),
                    strerror(errno));
  }
  return Status::Ok();
}

}  // namespace lutra

#endif  // LUTRA_LORA_FILE_H_
