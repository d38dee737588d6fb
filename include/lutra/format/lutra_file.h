// .lutra model files: a Llama-style model whose weight matrices are f32 or
// palettized (palette.h), written once (e.g. lutra-generate --save) and then
// mapped and used in place: reading copies and converts no weight.
//
// The container is GGUF v3 (gguf.h reads and validates it, gguf_writer.h
// writes it) with general.alignment 64, so every tensor's data starts 64-byte
// aligned in the mapped file. docs/format.md (".lutra files") is the full
// contract; in short:
//   metadata  general.architecture = "lutra", general.alignment = 64,
//             lutra.format_version = 1 (2 when any version-2 item below is
//             present), lutra.{dim, hidden_dim, n_layers,
//             n_heads, n_kv_heads, head_dim, vocab_size, seq_len} (u32),
//             lutra.rope_theta, lutra.norm_eps (f32), lutra.tied_embedding
//             (bool), version 2 only when not the default:
//             lutra.rope_layout (string "half_split"; absent: adjacent
//             pairs), lutra.rope_freq_factors (f32 array of head_dim / 2
//             frequency divisors, Llama 3.x), lutra.rope_linear_factor (f32,
//             positions divided by it),
//             optionally the vocabulary as GGUF tokenizer.ggml.* keys,
//             and per palettized matrix NAME
//             lutra.palette.NAME = [rows, cols, bits, group_rows, codebook]
//             (u64 array; codebook is the ElementType: 0 f16, 1 bf16, 2 f32),
//             and optionally lutra.quantization (string): how the weights
//             were made (method, calibration tokens, budget; free text for
//             people, never parsed; the per-tensor map is the palette keys).
//   tensors   palettized: NAME.indices (I8 [index_bytes], the packed indices
//             as raw bytes) and NAME.codebooks (F16/BF16/F32 [num_groups *
//             2^bits]); f32: NAME.weight (F32, ne [cols, rows]); the norms
//             blk.N.attn_norm.weight, blk.N.ffn_norm.weight and
//             output_norm.weight (F32 [dim]); version 2: the optional
//             biases blk.N.{attn_q, attn_k, attn_v}.bias (F32 [q_dim] /
//             [kv_dim]).
//   NAME      token_embd, blk.N.{attn_q, attn_k, attn_v, attn_output,
//             ffn_gate, ffn_down, ffn_up}, and output unless tied (a tied head
//             is token_embd, stored once).
// RoPE rotates whole heads (rope_dim = head_dim), adjacent pairs unless
// lutra.rope_layout says otherwise. A version-1 reader refuses version-2
// files instead of running them without their biases or RoPE variant.
//
// Reading validates before it trusts or allocates: the container (gguf.h:
// every count, offset and size against the file size), the format version,
// each hyper-parameter <= 2^24 and the config invariants (ValidateConfig),
// n_layers against the number of tensors present, and per matrix the shape
// the config implies, bits in {1, 2, 3, 4, 6, 8}, 1 <= group_rows <=
// max(rows, 2^20) (above rows: one group, as palette.h allows), a known
// codebook type, tensor types and byte sizes exactly as the palette
// shape implies, f32 data 4-byte aligned; a vocabulary must have vocab_size
// tokens. A bad file gives a Status naming the key or tensor, never a crash.
//
// Plain header; no exceptions.
#ifndef LUTRA_LUTRA_FILE_H_
#define LUTRA_LUTRA_FILE_H_

#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lutra/base/status.h"
#include "lutra/format/gguf.h"
#include "lutra/format/gguf_writer.h"
#include "lutra/format/llama_model.h"
#include "lutra/format/palette.h"
#include "lutra/format/tokenizer.h"

namespace lutra {

// The newest version written and read; files that need nothing of version 2
// are still written as version 1, so that older readers keep reading them.
inline constexpr uint32_t kLutraFormatVersion = 2;

// One weight matrix W, rows (outputs) x cols (inputs), y = W x: f32 or
// palettized. A view: the memory belongs to the caller (or a LutraFile).
struct LutraMatrix {
  size_t rows = 0, cols = 0;
  const float* f32 = nullptr;  // row-major rows x cols; null when palettized
  PaletteView palette;         // valid when f32 == nullptr

  bool palettized() const { return f32 == nullptr; }
  // Bytes of weight storage (indices + codebooks, or floats).
  size_t bytes() const {
    return palettized() ? palette.shape.total_bytes() : rows * cols * sizeof(float);
  }
};

struct LutraLayerWeights {
  const float* attn_norm = nullptr;  // [dim]
  LutraMatrix wq, wk, wv, wo;        // q_dim x dim, kv_dim x dim (x2), dim x q_dim
  const float* ffn_norm = nullptr;   // [dim]
  LutraMatrix w1, w2, w3;            // gate hidden x dim, down dim x hidden, up hidden x dim
  const float* bq = nullptr;         // [q_dim] or null (version 2)
  const float* bk = nullptr;         // [kv_dim] or null
  const float* bv = nullptr;         // [kv_dim] or null
};

// What a .lutra file holds, as views.
struct LutraWeights {
  ModelConfig config;  // tied_embedding: `output` is `token_embedding`
  LutraMatrix token_embedding;            // vocab_size x dim
  std::vector<LutraLayerWeights> layers;  // n_layers
  const float* final_norm = nullptr;      // [dim]
  LutraMatrix output;                     // vocab_size x dim (unused by the writer when tied)
  std::string quantization;  // lutra.quantization, "" = absent (see the top of this file)
};

// The f32 weights of a llama2.c or GGUF model (llama_model.h) as
// LutraWeights, e.g. to save them as a .lutra file. Views into `f32`.
inline LutraWeights LutraWeightsFromF32(const ModelWeightsF32& f32) {
  const ModelConfig& c = f32.config;
  const auto matrix = [](const float* p, int rows, int cols) {
    LutraMatrix m;
    m.rows = size_t(rows), m.cols = size_t(cols), m.f32 = p;
    return m;
  };
  LutraWeights w;
  w.config = c;
  w.token_embedding = matrix(f32.token_embedding, c.vocab_size, c.dim);
  w.layers.resize(f32.layers.size());
  for (size_t l = 0; l < f32.layers.size(); ++l) {
    const LayerWeightsF32& s = f32.layers[l];
    LutraLayerWeights& d = w.layers[l];
    d.attn_norm = s.attn_norm, d.ffn_norm = s.ffn_norm;
    d.wq = matrix(s.wq, c.q_dim(), c.dim);
    d.wk = matrix(s.wk, c.kv_dim(), c.dim);
    d.wv = matrix(s.wv, c.kv_dim(), c.dim);
    d.wo = matrix(s.wo, c.dim, c.q_dim());
    d.w1 = matrix(s.w1, c.hidden_dim, c.dim);
    d.w2 = matrix(s.w2, c.dim, c.hidden_dim);
    d.w3 = matrix(s.w3, c.hidden_dim, c.dim);
    d.bq = s.bq, d.bk = s.bk, d.bv = s.bv;
  }
  w.final_norm = f32.final_norm;
  w.output = matrix(f32.classifier, c.vocab_size, c.dim);
  return w;
}

// A read .lutra file: the weights are views into `gguf`'s bytes, which keep
// their address when the LutraFile is moved. Move-only.
struct LutraFile {
  LutraWeights weights;
  std::optional<Tokenizer> tokenizer;  // when the file carries a vocabulary
  GgufFile gguf;
};

namespace lutra_file_detail {

// Largest group_rows above a matrix's rows a file may state. One group
// either way; 2^20 is lutra-generate's --group limit, so every file it wrote
// still loads, while a hostile value near 2^64 is refused.
inline constexpr uint64_t kMaxGroupRows = uint64_t{1} << 20;

// A matrix of LutraWeights with its tensor name stem and the shape its config
// implies, and a norm with its tensor name.
struct MatrixSlot {
  std::string name;
  size_t rows, cols;
  LutraMatrix* matrix;
};
struct NormSlot {
  std::string name;
  const float** norm;
};
// An optional bias (version 2) with its tensor name and length.
struct BiasSlot {
  std::string name;
  size_t size;
  const float** bias;
};

// The optional biases of `w`'s layers (w.layers as for Slots).
inline std::vector<BiasSlot> BiasSlots(LutraWeights& w) {
  std::vector<BiasSlot> out;
  const size_t q = size_t(w.config.q_dim()), kv = size_t(w.config.kv_dim());
  for (size_t l = 0; l < w.layers.size(); ++l) {
    LutraLayerWeights& y = w.layers[l];
    const std::string p = "blk." + std::to_string(l) + ".";
    out.push_back({p + "attn_q.bias", q, &y.bq});
    out.push_back({p + "attn_k.bias", kv, &y.bk});
    out.push_back({p + "attn_v.bias", kv, &y.bv});
  }
  return out;
}

// lutra.rope_layout's value for the half-split layout (the only one stored).
inline constexpr const char* kHalfSplitName = "half_split";

// Every matrix and norm of `w`, in the order the file stores them (the head
// only when untied). w.layers must hold config.n_layers layers.
inline void Slots(LutraWeights& w, std::vector<MatrixSlot>* mats, std::vector<NormSlot>* norms) {
  const ModelConfig& c = w.config;
  const size_t dim = size_t(c.dim), hid = size_t(c.hidden_dim), q = size_t(c.q_dim()),
               kv = size_t(c.kv_dim()), vocab = size_t(c.vocab_size);
  mats->push_back({"token_embd", vocab, dim, &w.token_embedding});
  for (size_t l = 0; l < w.layers.size(); ++l) {
    LutraLayerWeights& y = w.layers[l];
    const std::string p = "blk." + std::to_string(l) + ".";
    mats->insert(mats->end(), {{p + "attn_q", q, dim, &y.wq},
                               {p + "attn_k", kv, dim, &y.wk},
                               {p + "attn_v", kv, dim, &y.wv},
                               {p + "attn_output", dim, q, &y.wo},
                               {p + "ffn_gate", hid, dim, &y.w1},
                               {p + "ffn_down", dim, hid, &y.w2},
                               {p + "ffn_up", hid, dim, &y.w3}});
    norms->push_back({p + "attn_norm.weight", &y.attn_norm});
    norms->push_back({p + "ffn_norm.weight", &y.ffn_norm});
  }
  norms->push_back({"output_norm.weight", &w.final_norm});
  if (!c.tied_embedding) mats->push_back({"output", vocab, dim, &w.output});
}

// The u32 hyper-parameters in the order written: key and ModelConfig field.
struct HyperParameter {
  const char* key;
  int ModelConfig::*field;
};
inline constexpr HyperParameter kHyperParameters[] = {
    {"lutra.dim", &ModelConfig::dim},               {"lutra.hidden_dim", &ModelConfig::hidden_dim},
    {"lutra.n_layers", &ModelConfig::n_layers},     {"lutra.n_heads", &ModelConfig::n_heads},
    {"lutra.n_kv_heads", &ModelConfig::n_kv_heads}, {"lutra.head_dim", &ModelConfig::head_dim},
    {"lutra.vocab_size", &ModelConfig::vocab_size}, {"lutra.seq_len", &ModelConfig::seq_len}};

// The vocabulary as GGUF tokenizer.ggml.* keys (SentencePiece "llama", which
// spells spaces as U+2581, or byte-level "gpt2" with its merges).
inline void AddTokenizer(const Tokenizer& tok, GgufWriter& g) {
  if (tok.byte_level()) {
    std::vector<std::string> pieces;
    std::vector<int32_t> types;
    for (int i = 0; i < tok.vocab_size(); ++i) {
      pieces.push_back(tok.piece(i));
      types.push_back(int32_t(tok.type(i)));
    }
    g.AddString("tokenizer.ggml.model", "gpt2");
    g.AddString("tokenizer.ggml.pre", PreTokenizerName(tok.pre_tokenizer()));
    g.AddStringArray("tokenizer.ggml.tokens", pieces);
    g.AddI32Array("tokenizer.ggml.token_type", types);
    g.AddStringArray("tokenizer.ggml.merges", tok.Merges());
    g.AddU32("tokenizer.ggml.bos_token_id", uint32_t(tok.bos_id()));
    g.AddU32("tokenizer.ggml.eos_token_id", uint32_t(tok.eos_id()));
    g.AddU32("tokenizer.ggml.unknown_token_id", uint32_t(tok.unk_id()));
    g.AddBool("tokenizer.ggml.add_bos_token", tok.add_bos_token());
    return;
  }
  std::vector<std::string> pieces;
  std::vector<float> scores;
  std::vector<int32_t> types;
  for (int i = 0; i < tok.vocab_size(); ++i) {
    std::string piece;
    for (char ch : tok.piece(i)) {
      if (ch == ' ') {
        piece += "\xE2\x96\x81";
      } else {
        piece += ch;
      }
    }
    pieces.push_back(std::move(piece));
    scores.push_back(tok.score(i));
    types.push_back(int32_t(tok.type(i)));
  }
  // The tokenizer keeps no getter for its dummy-prefix flag: a lone "x"
  // decodes with a leading space exactly when Encode adds the prefix.
  StatusOr<std::vector<int>> x = tok.Encode("x", /*add_bos=*/false);
  StatusOr<std::string> text = x.ok() ? tok.DecodeAll(*x) : StatusOr<std::string>(x.status());
  const bool space_prefix = text.ok() && !text->empty() && (*text)[0] == ' ';
  g.AddString("tokenizer.ggml.model", "llama");
  g.AddStringArray("tokenizer.ggml.tokens", pieces);
  g.AddF32Array("tokenizer.ggml.scores", scores);
  g.AddI32Array("tokenizer.ggml.token_type", types);
  g.AddU32("tokenizer.ggml.bos_token_id", uint32_t(tok.bos_id()));
  g.AddU32("tokenizer.ggml.eos_token_id", uint32_t(tok.eos_id()));
  g.AddU32("tokenizer.ggml.unknown_token_id", uint32_t(tok.unk_id()));
  g.AddBool("tokenizer.ggml.add_space_prefix", space_prefix);
}

// Reads lutra.palette.NAME for a matrix the config makes rows x cols. Every
// value is range-checked as int64 before it is narrowed.
inline StatusOr<PaletteShape> ReadPaletteShape(const GgufReader& g, const std::string& name,
                                               size_t rows, size_t cols) {
  const std::string key = "lutra.palette." + name;
  StatusOr<std::vector<int64_t>> v = g.GetIntArray(key);
  if (!v.ok()) {
    return DataLoss("%s, expected [rows, cols, bits, group_rows, codebook]",
                    v.status().message().c_str());
  }
  if (v->size() != 5) {
    return DataLoss("%s has %zu values, expected 5 [rows, cols, bits, group_rows, codebook]",
                    key.c_str(), v->size());
  }
  const int64_t r = (*v)[0], c = (*v)[1], bits = (*v)[2], group = (*v)[3], cb = (*v)[4];
  if (r != int64_t(rows) || c != int64_t(cols)) {
    return DataLoss("%s is %lld x %lld, the config implies %zu x %zu", name.c_str(),
                    (long long)r, (long long)c, rows, cols);
  }
  if (bits < 1 || bits > 8 || !IsValidPaletteBits(int(bits))) {
    return DataLoss("%s: bits = %lld, need one of 1, 2, 3, 4, 6, 8", name.c_str(),
                    (long long)bits);
  }
  if (group < 1 || uint64_t(group) > std::max<uint64_t>(rows, kMaxGroupRows)) {
    return DataLoss("%s: group_rows = %lld, need 1 <= group_rows <= max(rows %zu, 2^20)",
                    name.c_str(), (long long)group, rows);
  }
  if (cb < 0 || cb > 2) {
    return DataLoss("%s: codebook type %lld, need 0 (f16), 1 (bf16) or 2 (f32)", name.c_str(),
                    (long long)cb);
  }
  PaletteShape sh;
  sh.rows = rows, sh.cols = cols, sh.bits = int(bits), sh.group_rows = size_t(group);
  sh.codebook = ElementType(cb);
  const Status valid = sh.Validate();
  if (!valid.ok()) return DataLoss("%s: %s", name.c_str(), valid.message().c_str());
  return sh;
}

// Resolves the tensors of palettized matrix `name` to a view of the file.
inline StatusOr<PaletteView> ReadPalette(const GgufReader& g, const std::string& name,
                                         const PaletteShape& sh) {
  StatusOr<const GgufTensorInfo*> idx = g.GetTensor(name + ".indices");
  if (!idx.ok()) return idx.status();
  StatusOr<const GgufTensorInfo*> cbt = g.GetTensor(name + ".codebooks");
  if (!cbt.ok()) return cbt.status();
  const uint32_t want_cb = ElementTypeToGgml(sh.codebook);
  if ((*idx)->type != uint32_t(GgmlType::kI8) || (*cbt)->type != want_cb) {
    return DataLoss("%s: tensor types %s/%s, expected i8 indices and %s codebooks",
                    name.c_str(), (*idx)->type_name(), (*cbt)->type_name(),
                    ElementTypeName(sh.codebook));
  }
  StatusOr<PaletteView> view = PaletteView::Make(sh, (*idx)->data, size_t((*idx)->n_bytes),
                                                 (*cbt)->data, size_t((*cbt)->n_bytes));
  if (!view.ok()) return DataLoss("%s: %s", name.c_str(), view.status().message().c_str());
  return view;
}

inline bool AlignedForFloats(const uint8_t* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(float) == 0;
}

}  // namespace lutra_file_detail

// True if `g` is a .lutra file (it has lutra.format_version) rather than
// another GGUF file (a llama model, a LoRA adapter).
inline bool IsLutraFile(const GgufReader& g) {
  return g.Find("lutra.format_version") != nullptr;
}

// Adds the metadata and tensors of `weights` and `tokenizer` (null: none)
// to `writer`, in the layout at the top of this file. The tensors are views:
// the weights must stay valid until the writer's last Finish/WriteFile.
// Errors (InvalidArgument, nothing added): a config that fails
// ValidateConfig, has a hyper-parameter above 2^24 or RoPE other than
// adjacent pairs of whole heads; layers.size() != n_layers; a matrix whose
// shape is not the one the config implies, or with null data; a null norm;
// a tokenizer with another vocabulary size. A palette whose group_rows
// exceeds both its rows and 2^20 is stored with group_rows = rows (the same
// single group), so every file written reads back.
inline Status AddLutraFile(const LutraWeights& weights, const Tokenizer* tokenizer,
                           GgufWriter* writer) {
  using namespace lutra_file_detail;
  const ModelConfig& c = weights.config;
  LUTRA_RETURN_IF_ERROR(ValidateConfig(c).WithContext("lutra writer"));
  for (const HyperParameter& h : kHyperParameters) {
    if (uint32_t(c.*h.field) > kMaxConfigValue) {
      return InvalidArgument("lutra writer: %s = %d exceeds 2^24", h.key, c.*h.field);
    }
  }
  if (c.rope_dim != c.head_dim) {
    return InvalidArgument("lutra writer: the format stores RoPE over whole heads only "
                           "(rope_dim %d, head_dim %d)", c.rope_dim, c.head_dim);
  }
  if (weights.layers.size() != size_t(c.n_layers)) {
    return InvalidArgument("lutra writer: %zu layers, the config has n_layers = %d",
                           weights.layers.size(), c.n_layers);
  }
  if (tokenizer != nullptr && tokenizer->vocab_size() != c.vocab_size) {
    return InvalidArgument("lutra writer: the tokenizer has %d tokens, vocab_size is %d",
                           tokenizer->vocab_size(), c.vocab_size);
  }
  LutraWeights w = weights;  // views only: cheap, and gives Slots its pointers
  std::vector<MatrixSlot> mats;
  std::vector<NormSlot> norms;
  Slots(w, &mats, &norms);
  for (const MatrixSlot& s : mats) {
    const LutraMatrix& m = *s.matrix;
    const PaletteShape& sh = m.palette.shape;
    if (m.rows != s.rows || m.cols != s.cols ||
        (m.palettized() && (sh.rows != s.rows || sh.cols != s.cols))) {
      return InvalidArgument("lutra writer: %s is %zu x %zu, the config implies %zu x %zu",
                             s.name.c_str(), m.rows, m.cols, s.rows, s.cols);
    }
    if (m.palettized()) {
      LUTRA_RETURN_IF_ERROR(sh.Validate().WithContext("lutra writer: " + s.name));
      if (m.palette.indices == nullptr || m.palette.codebooks == nullptr) {
        return InvalidArgument("lutra writer: %s has no data", s.name.c_str());
      }
    }
  }
  for (const NormSlot& n : norms) {
    if (*n.norm == nullptr) return InvalidArgument("lutra writer: %s is null", n.name.c_str());
  }
  std::vector<BiasSlot> biases = BiasSlots(w);
  biases.erase(std::remove_if(biases.begin(), biases.end(),
                              [](const BiasSlot& b) { return *b.bias == nullptr; }),
               biases.end());
  const bool half_split = c.rope_layout == RopeLayout::kHalfSplit;
  const bool version2 = !biases.empty() || half_split || !c.rope_freq_factors.empty() ||
                        c.rope_linear_factor != 1.0f;

  GgufWriter& g = *writer;
  g.AddString("general.architecture", "lutra");
  g.AddU32("general.alignment", 64);
  g.AddU32("lutra.format_version", version2 ? 2 : 1);
  for (const HyperParameter& h : kHyperParameters) g.AddU32(h.key, uint32_t(c.*h.field));
  g.AddF32("lutra.rope_theta", c.rope_theta);
  g.AddF32("lutra.norm_eps", c.norm_eps);
  g.AddBool("lutra.tied_embedding", c.tied_embedding);
  if (half_split) g.AddString("lutra.rope_layout", kHalfSplitName);
  if (!c.rope_freq_factors.empty()) g.AddF32Array("lutra.rope_freq_factors", c.rope_freq_factors);
  if (c.rope_linear_factor != 1.0f) g.AddF32("lutra.rope_linear_factor", c.rope_linear_factor);
  if (!weights.quantization.empty()) g.AddString("lutra.quantization", weights.quantization);
  if (tokenizer != nullptr) AddTokenizer(*tokenizer, g);
  for (const MatrixSlot& s : mats) {
    const LutraMatrix& m = *s.matrix;
    if (m.palettized()) {
      PaletteShape sh = m.palette.shape;
      if (sh.group_rows > std::max<uint64_t>(sh.rows, kMaxGroupRows)) sh.group_rows = sh.rows;
      const uint64_t meta[5] = {sh.rows, sh.cols, uint64_t(sh.bits), sh.group_rows,
                                uint64_t(sh.codebook)};
      g.AddArray("lutra.palette." + s.name, GgufValueType::kU64, meta, 5);
      g.AddTensorView(s.name + ".indices", GgmlType::kI8, {sh.index_bytes()}, m.palette.indices,
                      sh.index_bytes());
      const GgmlType cb = GgmlType(ElementTypeToGgml(sh.codebook));
      g.AddTensorView(s.name + ".codebooks", cb, {sh.num_groups() * sh.num_entries()},
                      m.palette.codebooks, sh.codebook_bytes());
    } else {
      g.AddTensorView(s.name + ".weight", GgmlType::kF32, {m.cols, m.rows}, m.f32,
                      m.rows * m.cols * sizeof(float));
    }
  }
  for (const NormSlot& n : norms) {
    g.AddTensorView(n.name, GgmlType::kF32, {uint64_t(c.dim)}, *n.norm,
                    size_t(c.dim) * sizeof(float));
  }
  for (const BiasSlot& b : biases) {
    g.AddTensorView(b.name, GgmlType::kF32, {uint64_t(b.size)}, *b.bias, b.size * sizeof(float));
  }
  return Status::Ok();
}

// Writes `weights` and `tokenizer` (null: none) as a .lutra file at `path`,
// streaming the weights without another copy. Errors: AddLutraFile's, and
// the file system's.
inline Status WriteLutraFile(const LutraWeights& weights, const Tokenizer* tokenizer,
                             const std::string& path) {
  GgufWriter g(3);
  LUTRA_RETURN_IF_ERROR(AddLutraFile(weights, tokenizer, &g));
  return g.WriteFile(path);
}

// Reads a .lutra file from a parsed GGUF file (kept in the result), validated
// as the top of this file describes. Errors name the file, then the key or
// tensor: NotFound for a missing key or tensor, Unimplemented for another
// format version, DataLoss for any other bad value.
inline StatusOr<LutraFile> ReadLutraFile(GgufFile file) {
  using namespace lutra_file_detail;
  LutraFile out;
  out.gguf = std::move(file);
  const GgufReader& g = out.gguf.reader();
  const std::string context = out.gguf.file().path() + ": lutra";
  const auto fail = [&](const Status& s) { return s.WithContext(context); };
  StatusOr<uint32_t> version = g.GetU32("lutra.format_version");
  if (!version.ok()) return fail(version.status());
  if (*version < 1 || *version > kLutraFormatVersion) {
    return fail(Unimplemented("format version %u, this build reads 1 to %u", *version,
                              kLutraFormatVersion));
  }
  ModelConfig& c = out.weights.config;
  for (const HyperParameter& h : kHyperParameters) {
    StatusOr<uint32_t> v = g.GetU32(h.key);
    if (!v.ok()) return fail(v.status());
    // The limit every loader shares (llama_model.h), on the u32 before it
    // is narrowed to int.
    if (*v > kMaxConfigValue) return fail(DataLoss("%s = %u is implausibly large", h.key, *v));
    c.*h.field = int(*v);
  }
  StatusOr<float> theta = g.GetF32("lutra.rope_theta");
  if (!theta.ok()) return fail(theta.status());
  StatusOr<float> eps = g.GetF32("lutra.norm_eps");
  if (!eps.ok()) return fail(eps.status());
  StatusOr<bool> tied = g.GetBool("lutra.tied_embedding");
  if (!tied.ok()) return fail(tied.status());
  c.rope_theta = *theta, c.norm_eps = *eps, c.tied_embedding = *tied;
  c.rope_dim = c.head_dim;
  c.rope_layout = RopeLayout::kAdjacentPairs;
  if (g.Find("lutra.rope_layout") != nullptr) {
    StatusOr<std::string_view> layout = g.GetString("lutra.rope_layout");
    if (!layout.ok()) return fail(layout.status());
    if (*layout != kHalfSplitName) {
      return fail(DataLoss("lutra.rope_layout = '%s', expected '%s'",
                           gguf_internal::Printable(*layout).c_str(), kHalfSplitName));
    }
    c.rope_layout = RopeLayout::kHalfSplit;
  }
  if (g.Find("lutra.rope_freq_factors") != nullptr) {
    StatusOr<std::vector<float>> f = g.GetF32Array("lutra.rope_freq_factors");
    if (!f.ok()) return fail(f.status());
    c.rope_freq_factors = std::move(*f);
  }
  StatusOr<float> linear = g.GetF32("lutra.rope_linear_factor", 1.0f);
  if (!linear.ok()) return fail(linear.status());
  c.rope_linear_factor = *linear;
  const Status valid = ValidateConfig(c);
  if (!valid.ok()) return fail(DataLoss("%s", valid.message().c_str()));
  // Bound n_layers by what the file holds before allocating per layer
  // (token_embd and output_norm are outside the layers).
  const Status layers = CheckLayerCount(uint64_t(c.n_layers), g.tensors().size(),
                                        kMinTensorsPerLayer, 2, "n_layers");
  if (!layers.ok()) return fail(layers);
  out.weights.layers.resize(size_t(c.n_layers));
  std::vector<MatrixSlot> mats;
  std::vector<NormSlot> norms;
  Slots(out.weights, &mats, &norms);

  for (const MatrixSlot& s : mats) {
    LutraMatrix& m = *s.matrix;
    m.rows = s.rows, m.cols = s.cols;
    if (g.Find("lutra.palette." + s.name) != nullptr) {
      StatusOr<PaletteShape> sh = ReadPaletteShape(g, s.name, s.rows, s.cols);
      if (!sh.ok()) return fail(sh.status());
      StatusOr<PaletteView> view = ReadPalette(g, s.name, *sh);
      if (!view.ok()) return fail(view.status());
      m.palette = *view;
      continue;
    }
    StatusOr<const GgufTensorInfo*> t = g.GetTensor(s.name + ".weight");
    if (!t.ok()) return fail(t.status());
    const GgufTensorInfo& ti = **t;
    if (ti.type != uint32_t(GgmlType::kF32) || ti.n_dims != 2 || ti.ne[0] != s.cols ||
        ti.ne[1] != s.rows || !AlignedForFloats(ti.data)) {
      return fail(DataLoss("tensor %s.weight is %s %s, expected aligned f32 [%zu, %zu]",
                           s.name.c_str(), ti.type_name(), ti.ShapeString().c_str(), s.cols,
                           s.rows));
    }
    m.f32 = reinterpret_cast<const float*>(ti.data);
  }
  if (c.tied_embedding) out.weights.output = out.weights.token_embedding;
  for (const NormSlot& n : norms) {
    StatusOr<const GgufTensorInfo*> t = g.GetTensor(n.name);
    if (!t.ok()) return fail(t.status());
    const GgufTensorInfo& ti = **t;
    if (ti.type != uint32_t(GgmlType::kF32) || ti.n_elements != uint64_t(c.dim) ||
        !AlignedForFloats(ti.data)) {
      return fail(DataLoss("tensor %s is %s %s, expected aligned f32 [%d]", n.name.c_str(),
                           ti.type_name(), ti.ShapeString().c_str(), c.dim));
    }
    *n.norm = reinterpret_cast<const float*>(ti.data);
  }
  for (const BiasSlot& b : BiasSlots(out.weights)) {
    const GgufTensorInfo* ti = g.FindTensor(b.name);
    if (ti == nullptr) continue;  // optional
    if (ti->type != uint32_t(GgmlType::kF32) || ti->n_dims != 1 || ti->ne[0] != b.size ||
        !AlignedForFloats(ti->data)) {
      return fail(DataLoss("tensor %s is %s %s, expected aligned f32 [%zu]", b.name.c_str(),
                           ti->type_name(), ti->ShapeString().c_str(), b.size));
    }
    *b.bias = reinterpret_cast<const float*>(ti->data);
  }
  if (g.Find("tokenizer.ggml.tokens") != nullptr) {
    StatusOr<Tokenizer> t = Tokenizer::FromGguf(g);
    if (!t.ok()) return fail(t.status());
    if (t->vocab_size() != c.vocab_size) {
      return fail(DataLoss("the vocabulary has %d tokens, vocab_size is %d", t->vocab_size(),
                           c.vocab_size));
    }
    out.tokenizer = std::move(*t);
  }
  if (g.Find("lutra.quantization") != nullptr) {
    StatusOr<std::string_view> q = g.GetString("lutra.quantization");
    if (!q.ok()) return fail(q.status());
    out.weights.quantization = std::string(*q);
  }
  return out;
}

// Opens (maps) and reads the .lutra file at `path`.
inline StatusOr<LutraFile> ReadLutraFile(const std::string& path) {
  StatusOr<GgufFile> file = GgufFile::Open(path);
  if (!file.ok()) return file.status();
  return ReadLutraFile(std::move(*file));
}

}  // namespace lutra

#endif  // LUTRA_LUTRA_FILE_H_
