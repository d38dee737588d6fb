// Building a Model: synthetic weights, loading model files, palettizing, and
// saving/mapping .lutra files. See engine.h.
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <string>
#include <vector>

#include "examples/engine.h"
#include "lutra/format/gguf.h"
#include "lutra/format/gguf_writer.h"
#include "lutra/format/llama_model.h"
#include "lutra/format/lora_file.h"
#include "lutra/format/mapped_file.h"
#include "lutra/quantize/mixed_bits.h"
#include "lutra/quantize/palettize.h"
#include "lutra/quantize/recovery.h"

namespace lutra {
namespace engine {

// ----------------------------------------------------------------------------
// Model statistics

namespace {

// A tied output head shares the embedding's storage.
bool IsTied(const Model& m) {
  return m.weights.output.f32 == m.weights.embedding.f32 &&
         m.weights.output.palette.indices == m.weights.embedding.palette.indices;
}

}  // namespace

std::vector<const Linear*> Model::Matrices() const {
  std::vector<const Linear*> out;
  out.push_back(&weights.embedding);
  for (const LayerWeights& l : weights.layers) {
    for (const Linear* w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w1, &l.w2, &l.w3}) {
      out.push_back(w);
    }
  }
  if (!IsTied(*this)) out.push_back(&weights.output);
  return out;
}

size_t Model::WeightBytes() const {
  size_t bytes = 0;
  for (const Linear* w : Matrices()) bytes += w->bytes();
  // RMSNorm weights: two per layer plus the final one, f32.
  bytes += (2 * size_t(config.n_layers) + 1) * size_t(config.dim) * sizeof(float);
  return bytes;
}

size_t Model::MatrixWeights() const {
  size_t n = 0;
  for (const Linear* w : Matrices()) n += w->rows * w->cols;
  return n;
}

double Model::BitsPerWeight() const {
  size_t bytes = 0;
  for (const Linear* w : Matrices()) bytes += w->bytes();
  const size_t n = MatrixWeights();
  return n == 0 ? 0.0 : 8.0 * double(bytes) / double(n);
}

Status Model::Prepare() {
  std::vector<Linear*> all = {&weights.embedding, &weights.output};
  for (LayerWeights& l : weights.layers) {
    for (Linear* w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w1, &l.w2, &l.w3}) all.push_back(w);
  }
  for (Linear* w : all) {
    if (!w->palettized() || w->prepared != nullptr) continue;
    // The tied head is a copy of the embedding's Linear: share its tables.
    if (w == &weights.output && weights.embedding.prepared != nullptr &&
        weights.output.palette.indices == weights.embedding.palette.indices) {
      w->prepared = weights.embedding.prepared;
      continue;
    }
    StatusOr<PreparedPalette> p = PreparedPalette::Make(w->palette);
    if (!p.ok()) return p.status();
    prepared.push_back(std::make_unique<PreparedPalette>(std::move(*p)));
    w->prepared = prepared.back().get();
  }
  return Status();
}

// ----------------------------------------------------------------------------
// Synthetic models

namespace {

// xorshift64*: fast enough to fill billions of weights in seconds.
struct FastRng {
  uint64_t state;
  explicit FastRng(uint64_t seed) : state(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t Next() {
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return state * 0x2545F4914F6CDD1Dull;
  }
  // Uniform in [-1, 1).
  float Symmetric() { return float(int32_t(Next() >> 32)) * (1.0f / 2147483648.0f); }
};

StatusOr<Config> SyntheticConfig(const std::string& shape) {
  Config c;
  if (shape == "tiny") {
    c.dim = 128, c.hidden_dim = 384, c.n_layers = 4, c.n_heads = 4, c.n_kv_heads = 2;
    c.head_dim = 32, c.vocab_size = 512, c.seq_len = 256;
  } else if (shape == "1b") {
    c.dim = 2048, c.hidden_dim = 8192, c.n_layers = 16, c.n_heads = 32, c.n_kv_heads = 8;
    c.head_dim = 64, c.vocab_size = 32000, c.seq_len = 2048;
  } else if (shape == "afm") {
    c.dim = 3072, c.hidden_dim = 8192, c.n_layers = 26, c.n_heads = 24, c.n_kv_heads = 8;
    c.head_dim = 128, c.vocab_size = 49152, c.seq_len = 2048;
  } else {
    // "afm:L" / "1b:L": the same per-layer shape with L layers (benchmarks).
    const size_t colon = shape.find(':');
    if (colon != std::string::npos) {
      StatusOr<Config> base = SyntheticConfig(shape.substr(0, colon));
      const int layers = atoi(shape.c_str() + colon + 1);
      if (base.ok() && layers >= 1 && layers <= 1000) {
        base->n_layers = layers;
        return base;
      }
    }
    return InvalidArgument(
        "synthetic shape '%s': expected tiny, 1b, afm, or <shape>:<layers> (e.g. afm:4)",
        shape.c_str());
  }
  return c;
}

}  // namespace

// Random f32 matrix, uniform with the variance of a 1/sqrt(cols) init.
static Linear RandomF32(Model& m, size_t rows, size_t cols, FastRng& rng) {
  m.f32_storage.emplace_back(rows * cols);
  std::vector<float>& v = m.f32_storage.back();
  const float scale = sqrtf(3.0f / float(cols));
  for (float& x : v) x = scale * rng.Symmetric();
  Linear w;
  w.rows = rows, w.cols = cols, w.f32 = v.data();
  return w;
}

// Random palettized matrix: uniformly random indices, and per group 2^b
// sorted codebook entries spread like a 1/sqrt(cols) init.
static StatusOr<Linear> RandomPalette(Model& m, size_t rows, size_t cols, int bits,
                                      const LoadOptions& o, FastRng& rng) {
  PaletteShape shape;
  shape.rows = rows, shape.cols = cols, shape.bits = bits;
  shape.group_rows = o.group, shape.codebook = o.codebook;
  StatusOr<PaletteMatrix> pm = PaletteMatrix::Allocate(shape);
  if (!pm.ok()) return pm.status();
  uint8_t* idx = pm->mutable_indices();
  for (size_t i = 0; i < shape.index_bytes(); i += 8) {
    const uint64_t r = rng.Next();
    memcpy(idx + i, &r, std::min<size_t>(8, shape.index_bytes() - i));
  }
  // The format wants index 0 in the padding columns.
  for (size_t r = 0; r < rows; ++r) {
    for (size_t c = cols; c < shape.padded_cols(); ++c) pm->set_index(r, c, 0);
  }
  const float scale = sqrtf(3.0f / float(cols));
  std::vector<float> entries(shape.num_entries());
  for (size_t g = 0; g < shape.num_groups(); ++g) {
    for (float& e : entries) e = scale * rng.Symmetric();
    std::sort(entries.begin(), entries.end());
    for (size_t e = 0; e < entries.size(); ++e) pm->set_entry(g, e, entries[e]);
  }
  Linear w;
  w.rows = rows, w.cols = cols, w.f32 = nullptr, w.palette = pm->view();
  m.palettes.push_back(std::move(*pm));
  return w;
}

StatusOr<Model> MakeSyntheticModel(const std::string& shape, const LoadOptions& o,
                                   uint64_t seed) {
  StatusOr<Config> config = SyntheticConfig(shape);
  if (!config.ok()) return config.status();
  Model m;
  m.config = *config;
  if (o.seq_len > 0) m.config.seq_len = o.seq_len;
  const Config& c = m.config;
  LUTRA_RETURN_IF_ERROR(c.Validate());
  FastRng rng(seed);
  // Norm weights near 1, like trained models.
  const size_t num_norms = 2 * size_t(c.n_layers) + 1;
  m.f32_storage.emplace_back(num_norms * c.dim);
  for (float& x : m.f32_storage.back()) x = 1.0f + 0.1f * rng.Symmetric();
  const float* norms = m.f32_storage.back().data();

  // Every matrix in build order: the embedding, then 7 per layer.
  struct Spec {
    Linear* w;
    size_t rows, cols;
    bool ffn;
    int bits;
  };
  std::vector<Spec> specs = {{&m.weights.embedding, size_t(c.vocab_size), size_t(c.dim), false, o.bits}};
  m.weights.layers.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    LayerWeights& lw = m.weights.layers[l];
    lw.attn_norm = norms + (2 * l) * c.dim;
    lw.ffn_norm = norms + (2 * l + 1) * c.dim;
    const size_t dim = c.dim, q = c.q_dim(), kv = c.kv_dim(), hid = c.hidden_dim;
    for (const Spec& s : std::vector<Spec>{{&lw.wq, q, dim, false, o.bits},
                                           {&lw.wk, kv, dim, false, o.bits},
                                           {&lw.wv, kv, dim, false, o.bits},
                                           {&lw.wo, dim, q, false, o.bits},
                                           {&lw.w1, hid, dim, true, o.bits},
                                           {&lw.w2, dim, hid, true, o.bits},
                                           {&lw.w3, hid, dim, true, o.bits}}) {
      specs.push_back(s);
    }
  }
  // A mixed budget without real weights to measure errors on: every matrix
  // at the width below the budget, then whole matrices one width up while the
  // average (codebooks and padding included) stays within it - attention and
  // the embedding first, as the allocator tends to favor them on real models.
  // Widths are powers of two (2/4 for a 3.5 budget, the mixed 2-/4-bit
  // scheme): the 3- and 6-bit kernels are slower per byte (docs/gemv.md).
  if (o.mixed_bits > 0.0) {
    static const int kWidths[] = {1, 2, 4, 8};
    int lo = 1, hi = 2;
    for (size_t i = 0; i + 1 < 4; ++i) {
      if (kWidths[i] <= o.mixed_bits) lo = kWidths[i], hi = kWidths[i + 1];
    }
    auto bytes = [&](const Spec& s, int bits) {
      PaletteShape sh;
      sh.rows = s.rows, sh.cols = s.cols, sh.bits = bits, sh.group_rows = o.group;
      sh.codebook = o.codebook;
      return double(sh.total_bytes());
    };
    double total = 0.0, weights = 0.0;
    for (Spec& s : specs) {
      s.bits = lo;
      total += bytes(s, lo);
      weights += double(s.rows * s.cols);
    }
    const double budget = o.mixed_bits * weights / 8.0;
    for (bool ffn : {false, true}) {
      for (Spec& s : specs) {
        const double extra = bytes(s, hi) - bytes(s, lo);
        if (s.ffn == ffn && total + extra <= budget) {
          s.bits = hi;
          total += extra;
        }
      }
    }
  }
  // Reserve so PaletteMatrix moves never happen mid-build (views stay valid
  // either way, the storage is heap-allocated; this just avoids copies).
  m.palettes.reserve(specs.size());
  m.f32_storage.reserve(specs.size() + 1);
  for (size_t i = 0; i < specs.size(); ++i) {
    const Spec& s = specs[i];
    StatusOr<Linear> w = s.bits == 0 ? StatusOr<Linear>(RandomF32(m, s.rows, s.cols, rng))
                                     : RandomPalette(m, s.rows, s.cols, s.bits, o, rng);
    if (!w.ok()) return w.status();
    *s.w = *w;
    if (o.progress && c.dim >= 1024 && isatty(2) && (i % 7 == 0)) {
      fprintf(stderr, "\rsynthetic %s: layer %zu/%d", shape.c_str(), i / 7, c.n_layers);
    }
  }
  m.weights.output = m.weights.embedding;
  if (o.progress && c.dim >= 1024 && isatty(2)) fprintf(stderr, "\n");
  m.weights.final_norm = norms + 2 * size_t(c.n_layers) * c.dim;
  LUTRA_RETURN_IF_ERROR(m.Prepare());
  return m;
}

// ----------------------------------------------------------------------------
// Palettizing a loaded f32 model

namespace {

// Index width of each matrix (in Model::Matrices() order): uniform, or for a
// --mixed budget the allocator's choice (lutra/quantize/mixed_bits.h) that minimizes
// the total squared weight error within the bits-per-weight budget.
StatusOr<std::vector<int>> PlanBits(const Model& src, const LoadOptions& o, size_t threads) {
  const std::vector<const Linear*> mats = src.Matrices();
  if (o.mixed_bits <= 0.0) return std::vector<int>(mats.size(), o.bits);
  std::vector<MixedBitsTensor> tensors(mats.size());
  for (size_t i = 0; i < mats.size(); ++i) {
    tensors[i].name = "tensor " + std::to_string(i);
    tensors[i].data = mats[i]->f32;
    tensors[i].rows = mats[i]->rows;
    tensors[i].cols = mats[i]->cols;
  }
  MixedBitsOptions mo;
  mo.target_bits = o.mixed_bits;
  // 8-bit tensors only pay off for generous budgets (and their DP-optimal
  // k-means is slow: ~10 ms per group).
  mo.allowed_bits = {2, 3, 4, 6};
  if (o.mixed_bits > 5.0) mo.allowed_bits.push_back(8);
  mo.group_rows = o.group;
  mo.codebook = o.codebook;
  mo.threads = threads;
  if (o.progress && isatty(2)) {
    mo.progress = [](size_t done, size_t total) {
      fprintf(stderr, "\rallocating bits: tensor %zu/%zu", done, total);
      if (done == total) fprintf(stderr, "\n");
    };
  }
  StatusOr<MixedBitsPlan> plan = AllocateBits(tensors, mo);
  if (!plan.ok()) return plan.status().WithContext("--mixed");
  std::vector<int> bits;
  for (const TensorBits& t : plan->tensors) bits.push_back(t.bits);
  return bits;
}

// Progress bar on stderr: "palettizing [#####-----]  50% (12/36 tensors)",
// redrawn in place when the percentage changes, on a terminal only.
class ProgressBar {
 public:
  void Show(double fraction, size_t done, size_t total) {
    const int percent = int(fraction * 100 + 0.5);
    if (percent == last_percent_ || !isatty(2)) return;
    last_percent_ = percent;
    const int width = 30, filled = int(fraction * width + 0.5);
    char bar[width + 1];
    for (int i = 0; i < width; ++i) bar[i] = i < filled ? '#' : '-';
    bar[width] = '\0';
    fprintf(stderr, "\rpalettizing [%s] %3d%% (%zu/%zu tensors)", bar, percent, done, total);
    fflush(stderr);
  }

 private:
  int last_percent_ = -1;
};

}  // namespace

StatusOr<Model> PalettizeModel(const Model& src, const LoadOptions& o, size_t threads) {
  Model m;
  m.config = src.config;
  m.tokenizer = src.tokenizer;
  const Config& c = m.config;
  // Norm weights are tiny and stay f32: copy them so `m` stands alone.
  m.f32_storage.emplace_back((2 * size_t(c.n_layers) + 1) * c.dim);
  float* norms = m.f32_storage.back().data();
  m.weights.layers.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    memcpy(norms + 2 * l * c.dim, src.weights.layers[l].attn_norm, c.dim * sizeof(float));
    memcpy(norms + (2 * l + 1) * c.dim, src.weights.layers[l].ffn_norm, c.dim * sizeof(float));
    m.weights.layers[l].attn_norm = norms + 2 * l * c.dim;
    m.weights.layers[l].ffn_norm = norms + (2 * l + 1) * c.dim;
  }
  memcpy(norms + 2 * size_t(c.n_layers) * c.dim, src.weights.final_norm, c.dim * sizeof(float));
  m.weights.final_norm = norms + 2 * size_t(c.n_layers) * c.dim;

  // Destination of each source matrix, in Model::Matrices() order.
  const std::vector<const Linear*> mats = src.Matrices();
  std::vector<Linear*> dst = {&m.weights.embedding};
  for (LayerWeights& l : m.weights.layers) {
    for (Linear* w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w1, &l.w2, &l.w3}) dst.push_back(w);
  }
  if (mats.size() > dst.size()) dst.push_back(&m.weights.output);
  for (const Linear* w : mats) {
    if (w->palettized()) return InvalidArgument("palettize: model is already palettized");
  }
  StatusOr<std::vector<int>> bits = PlanBits(src, o, threads);
  if (!bits.ok()) return bits.status();

  size_t total_weights = 0, done_weights = 0;
  for (const Linear* w : mats) total_weights += w->rows * w->cols;
  m.palettes.reserve(mats.size());
  ProgressBar bar;
  for (size_t i = 0; i < mats.size(); ++i) {
    const Linear& w = *mats[i];
    PalettizeOptions po;
    po.bits = (*bits)[i];
    po.group_rows = o.group;
    po.codebook = o.codebook;
    po.threads = threads;
    if (o.progress) {
      const size_t before = done_weights, size = w.rows * w.cols;
      po.progress = [&, before, size, i](size_t groups_done, size_t groups) {
        const double f = double(before + size * groups_done / std::max<size_t>(groups, 1)) /
                         double(total_weights);
        bar.Show(f, i, mats.size());
      };
    }
    StatusOr<PaletteMatrix> pm = Palettize(w.f32, w.rows, w.cols, po);
    if (!pm.ok()) return pm.status().WithContext("palettize tensor " + std::to_string(i));
    Linear& out = *dst[i];
    out.rows = w.rows, out.cols = w.cols, out.f32 = nullptr, out.palette = pm->view();
    m.palettes.push_back(std::move(*pm));
    done_weights += w.rows * w.cols;
  }
  if (o.progress && isatty(2)) {
    bar.Show(1.0, mats.size(), mats.size());
    fprintf(stderr, "\n");
  }
  // Tied head: the output is the (palettized) embedding itself.
  if (dst.back() != &m.weights.output) m.weights.output = m.weights.embedding;
  LUTRA_RETURN_IF_ERROR(m.Prepare());
  return m;
}

// ----------------------------------------------------------------------------
// Loading model files

StatusOr<Model> LoadLutraModel(GgufFile file, const LoadOptions& options);

namespace {

// Wraps the reader's f32 views (lutra/format/llama_model.h) as an engine Model that
// keeps the reader's storage (mapped file, converted tensors) alive.
StatusOr<Model> FromF32Weights(ModelWeightsF32 src) {
  const ModelConfig& mc = src.config;
  if (mc.rope_dim != mc.head_dim || mc.rope_layout != RopeLayout::kAdjacentPairs) {
    return Unimplemented("model: partial or half-split RoPE (rope_dim %d, head_dim %d)",
                         mc.rope_dim, mc.head_dim);
  }
  Model m;
  Config& c = m.config;
  c.dim = mc.dim, c.hidden_dim = mc.hidden_dim, c.n_layers = mc.n_layers;
  c.n_heads = mc.n_heads, c.n_kv_heads = mc.n_kv_heads, c.head_dim = mc.head_dim;
  c.vocab_size = mc.vocab_size, c.seq_len = mc.seq_len;
  c.rope_theta = mc.rope_theta, c.norm_eps = mc.norm_eps;
  LUTRA_RETURN_IF_ERROR(c.Validate());
  auto linear = [](const float* p, size_t rows, size_t cols) {
    Linear w;
    w.rows = rows, w.cols = cols, w.f32 = p;
    return w;
  };
  m.weights.embedding = linear(src.token_embedding, c.vocab_size, c.dim);
  m.weights.output = linear(src.classifier, c.vocab_size, c.dim);
  m.weights.final_norm = src.final_norm;
  m.weights.layers.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeightsF32& s = src.layers[l];
    LayerWeights& d = m.weights.layers[l];
    d.attn_norm = s.attn_norm, d.ffn_norm = s.ffn_norm;
    d.wq = linear(s.wq, c.q_dim(), c.dim);
    d.wk = linear(s.wk, c.kv_dim(), c.dim);
    d.wv = linear(s.wv, c.kv_dim(), c.dim);
    d.wo = linear(s.wo, c.dim, c.q_dim());
    d.w1 = linear(s.w1, c.hidden_dim, c.dim);
    d.w2 = linear(s.w2, c.dim, c.hidden_dim);
    d.w3 = linear(s.w3, c.hidden_dim, c.dim);
  }
  m.keep_alive = std::make_shared<ModelWeightsF32>(std::move(src));
  return m;
}

bool IsGguf(const MappedFile& f) { return f.size() >= 4 && memcmp(f.data(), "GGUF", 4) == 0; }

}  // namespace

StatusOr<Model> LoadModel(const std::string& path, const LoadOptions& o, size_t threads) {
  StatusOr<MappedFile> file = MappedFile::Open(path);
  if (!file.ok()) return file.status();
  StatusOr<ModelWeightsF32> weights = Status();
  std::shared_ptr<const Tokenizer> tokenizer;
  if (IsGguf(*file)) {
    StatusOr<GgufFile> gguf = GgufFile::FromMapped(std::move(*file));
    if (!gguf.ok()) return gguf.status();
    if (gguf->reader().Find("lutra.format_version") != nullptr) {
      return LoadLutraModel(std::move(*gguf), o);
    }
    // The vocabulary travels in the metadata; a file without one can still
    // run with --tokenizer.
    if (gguf->reader().Find("tokenizer.ggml.tokens") != nullptr) {
      StatusOr<Tokenizer> t = Tokenizer::FromGguf(gguf->reader());
      if (!t.ok()) return t.status().WithContext(path);
      tokenizer = std::make_shared<const Tokenizer>(std::move(*t));
    }
    weights = LoadGgufModel(std::move(*gguf));
  } else {
    weights = LoadLlama2cModel(std::move(*file));
  }
  if (!weights.ok()) return weights.status();
  StatusOr<Model> model = FromF32Weights(std::move(*weights));
  if (!model.ok()) return model.status().WithContext(path);
  model->tokenizer = tokenizer;
  if (o.seq_len > 0) model->config.seq_len = o.seq_len;
  if (o.bits == 0 && o.mixed_bits == 0.0) return model;
  return PalettizeModel(*model, o, threads);
}

StatusOr<std::shared_ptr<const Tokenizer>> LoadTokenizer(const std::string& path,
                                                         const Model& model) {
  if (path.empty()) {
    if (!model.tokenizer) return NotFound("the model file carries no vocabulary");
    return model.tokenizer;
  }
  StatusOr<Tokenizer> t = Tokenizer::FromLlama2cFile(path, model.config.vocab_size);
  if (!t.ok()) return t.status();
  return std::make_shared<const Tokenizer>(std::move(*t));
}

StatusOr<Tokenizer> ByteTokenizer(int vocab_size) {
  if (vocab_size < 259) {
    return InvalidArgument("byte tokenizer: vocabulary of %d < 259 tokens", vocab_size);
  }
  std::vector<std::string> pieces = {"<unk>", "<s>", "</s>"};
  char buf[32];
  for (int b = 0; b < 256; ++b) {
    snprintf(buf, sizeof(buf), "<0x%02X>", b);
    pieces.push_back(buf);
  }
  for (int i = 259; i < vocab_size; ++i) {
    snprintf(buf, sizeof(buf), " w%d", i);
    pieces.push_back(buf);
  }
  std::vector<float> scores(pieces.size(), 0.0f);
  return Tokenizer::FromVocab(std::move(pieces), std::move(scores), {}, 1, 2, 0,
                              /*add_space_prefix=*/false);
}

// ----------------------------------------------------------------------------
// .lutra model files
//
// A .lutra file is a GGUF v3 container (lutra/format/gguf.h reads and validates it,
// lutra/format/gguf_writer.h writes it), general.alignment 64, so every tensor's
// data starts 64-byte aligned in the mapped file and is used in place:
//   metadata  general.architecture = "lutra", lutra.format_version = 1,
//             lutra.{dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_dim,
//             vocab_size, seq_len} (u32), lutra.rope_theta, lutra.norm_eps (f32),
//             lutra.tied_embedding (bool), the vocabulary as GGUF tokenizer.ggml.*
//             keys, and per palettized matrix NAME
//             lutra.palette.NAME = [rows, cols, bits, group_rows, codebook type]
//             (u64 array; codebook type 0 f16, 1 bf16, 2 f32).
//   tensors   NAME.indices: the packed indices as raw bytes (I8, index_bytes);
//             NAME.codebooks: F16/BF16/F32, num_groups * 2^bits entries;
//             or NAME.weight F32 [cols, rows] for an f32 matrix;
//             norms blk.N.attn_norm.weight, blk.N.ffn_norm.weight,
//             output_norm.weight (F32).
//   NAME      token_embd, blk.N.{attn_q, attn_k, attn_v, attn_output, ffn_gate,
//             ffn_down, ffn_up}, and output when not tied to token_embd
//             (the tied head is the one palettized embedding, stored once).

namespace {

constexpr uint32_t kLutraFormatVersion = 1;

struct NamedLinear {
  std::string name;
  Linear* w;
};
struct NamedNorm {
  std::string name;
  const float** w;
};

// Matrices and norms of `m` with their .lutra names; the head only if untied.
void NameTensors(Model& m, bool tied, std::vector<NamedLinear>* mats,
                 std::vector<NamedNorm>* norms) {
  Weights& w = m.weights;
  mats->push_back({"token_embd", &w.embedding});
  for (size_t l = 0; l < w.layers.size(); ++l) {
    LayerWeights& lw = w.layers[l];
    const std::string p = "blk." + std::to_string(l) + ".";
    for (const NamedLinear& n : std::vector<NamedLinear>{{p + "attn_q", &lw.wq},
                                                         {p + "attn_k", &lw.wk},
                                                         {p + "attn_v", &lw.wv},
                                                         {p + "attn_output", &lw.wo},
                                                         {p + "ffn_gate", &lw.w1},
                                                         {p + "ffn_down", &lw.w2},
                                                         {p + "ffn_up", &lw.w3}}) {
      mats->push_back(n);
    }
    norms->push_back({p + "attn_norm.weight", &lw.attn_norm});
    norms->push_back({p + "ffn_norm.weight", &lw.ffn_norm});
  }
  norms->push_back({"output_norm.weight", &w.final_norm});
  if (!tied) mats->push_back({"output", &w.output});
}

// SentencePiece writes spaces as U+2581 in GGUF vocabularies.
std::string SpaceToMarker(const std::string& piece) {
  std::string out;
  for (char ch : piece) {
    if (ch == ' ') {
      out += "\xE2\x96\x81";
    } else {
      out += ch;
    }
  }
  return out;
}

void AddTokenizer(const Tokenizer& tok, GgufWriter& g) {
  std::vector<std::string> pieces;
  std::vector<float> scores;
  std::vector<int32_t> types;
  for (int i = 0; i < tok.vocab_size(); ++i) {
    pieces.push_back(SpaceToMarker(tok.piece(i)));
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

}  // namespace

Status SaveLutraModel(const Model& model, const Tokenizer* tokenizer, const std::string& path) {
  const Config& c = model.config;
  LUTRA_RETURN_IF_ERROR(c.Validate());
  GgufWriter g(3);
  g.AddString("general.architecture", "lutra");
  g.AddU32("general.alignment", 64);
  g.AddU32("lutra.format_version", kLutraFormatVersion);
  const struct {
    const char* key;
    int value;
  } ints[] = {{"lutra.dim", c.dim},
              {"lutra.hidden_dim", c.hidden_dim},
              {"lutra.n_layers", c.n_layers},
              {"lutra.n_heads", c.n_heads},
              {"lutra.n_kv_heads", c.n_kv_heads},
              {"lutra.head_dim", c.head_dim},
              {"lutra.vocab_size", c.vocab_size},
              {"lutra.seq_len", c.seq_len}};
  for (const auto& kv : ints) g.AddU32(kv.key, uint32_t(kv.value));
  g.AddF32("lutra.rope_theta", c.rope_theta);
  g.AddF32("lutra.norm_eps", c.norm_eps);
  const bool tied = IsTied(model);
  g.AddBool("lutra.tied_embedding", tied);
  if (tokenizer != nullptr) AddTokenizer(*tokenizer, g);

  // The writer keeps pointers (AddTensorView): the weights are streamed to
  // the file without another copy.
  Model& m = const_cast<Model&>(model);  // NameTensors hands out mutable slots; only read here
  std::vector<NamedLinear> mats;
  std::vector<NamedNorm> norms;
  NameTensors(m, tied, &mats, &norms);
  for (const NamedLinear& n : mats) {
    const Linear& w = *n.w;
    if (w.palettized()) {
      const PaletteShape& sh = w.palette.shape;
      const uint64_t meta[5] = {sh.rows, sh.cols, uint64_t(sh.bits), sh.group_rows,
                                uint64_t(sh.codebook)};
      g.AddArray("lutra.palette." + n.name, GgufValueType::kU64, meta, 5);
      g.AddTensorView(n.name + ".indices", GgmlType::kI8, {sh.index_bytes()}, w.palette.indices,
                      sh.index_bytes());
      const GgmlType cb = GgmlType(ElementTypeToGgml(sh.codebook));
      g.AddTensorView(n.name + ".codebooks", cb, {sh.num_groups() * sh.num_entries()},
                      w.palette.codebooks, sh.codebook_bytes());
    } else {
      g.AddTensorView(n.name + ".weight", GgmlType::kF32, {w.cols, w.rows}, w.f32,
                      w.rows * w.cols * sizeof(float));
    }
  }
  for (const NamedNorm& n : norms) {
    g.AddTensorView(n.name, GgmlType::kF32, {uint64_t(c.dim)}, *n.w, c.dim * sizeof(float));
  }
  return g.WriteFile(path);
}

StatusOr<Model> LoadLutraModel(GgufFile file, const LoadOptions& o) {
  auto gguf = std::make_shared<GgufFile>(std::move(file));
  const GgufReader& g = gguf->reader();
  const std::string& path = gguf->file().path();
  auto fail = [&](const Status& s) { return s.WithContext(path + ": lutra"); };
  StatusOr<uint32_t> version = g.GetU32("lutra.format_version");
  if (!version.ok()) return fail(version.status());
  if (*version != kLutraFormatVersion) {
    return fail(Unimplemented("format version %u, this build reads %u", *version,
                              kLutraFormatVersion));
  }
  Model m;
  Config& c = m.config;
  const struct {
    const char* key;
    int* out;
  } ints[] = {{"lutra.dim", &c.dim},           {"lutra.hidden_dim", &c.hidden_dim},
              {"lutra.n_layers", &c.n_layers}, {"lutra.n_heads", &c.n_heads},
              {"lutra.n_kv_heads", &c.n_kv_heads}, {"lutra.head_dim", &c.head_dim},
              {"lutra.vocab_size", &c.vocab_size}, {"lutra.seq_len", &c.seq_len}};
  for (const auto& kv : ints) {
    StatusOr<uint32_t> v = g.GetU32(kv.key);
    if (!v.ok()) return fail(v.status());
    if (*v > (1u << 24)) return fail(DataLoss("%s = %u is implausibly large", kv.key, *v));
    *kv.out = int(*v);
  }
  StatusOr<float> theta = g.GetF32("lutra.rope_theta");
  StatusOr<float> eps = g.GetF32("lutra.norm_eps");
  StatusOr<bool> tied = g.GetBool("lutra.tied_embedding");
  if (!theta.ok() || !eps.ok() || !tied.ok()) {
    return fail(!theta.ok() ? theta.status() : !eps.ok() ? eps.status() : tied.status());
  }
  c.rope_theta = *theta, c.norm_eps = *eps;
  Status valid = c.Validate();
  if (!valid.ok()) return fail(DataLoss("%s", valid.message().c_str()));
  if (!(c.rope_theta > 0.0f) || !(c.norm_eps > 0.0f && c.norm_eps < 1.0f)) {
    return fail(DataLoss("rope_theta %g / norm_eps %g out of range", double(c.rope_theta),
                         double(c.norm_eps)));
  }
  m.weights.layers.resize(c.n_layers);

  // Shapes every matrix must have, in NameTensors order.
  std::vector<NamedLinear> mats;
  std::vector<NamedNorm> norms;
  NameTensors(m, *tied, &mats, &norms);
  std::vector<std::pair<size_t, size_t>> shapes = {{size_t(c.vocab_size), size_t(c.dim)}};
  for (int l = 0; l < c.n_layers; ++l) {
    for (auto rc : std::vector<std::pair<int, int>>{{c.q_dim(), c.dim},
                                                    {c.kv_dim(), c.dim},
                                                    {c.kv_dim(), c.dim},
                                                    {c.dim, c.q_dim()},
                                                    {c.hidden_dim, c.dim},
                                                    {c.dim, c.hidden_dim},
                                                    {c.hidden_dim, c.dim}}) {
      shapes.emplace_back(rc.first, rc.second);
    }
  }
  if (!*tied) shapes.emplace_back(size_t(c.vocab_size), size_t(c.dim));

  for (size_t i = 0; i < mats.size(); ++i) {
    const std::string& name = mats[i].name;
    Linear& w = *mats[i].w;
    w.rows = shapes[i].first, w.cols = shapes[i].second;
    const GgufValue* meta = g.Find("lutra.palette." + name);
    if (meta == nullptr) {  // an f32 matrix
      StatusOr<const GgufTensorInfo*> t = g.GetTensor(name + ".weight");
      if (!t.ok()) return fail(t.status());
      const GgufTensorInfo& ti = **t;
      if (ti.type != uint32_t(GgmlType::kF32) || ti.n_dims != 2 || ti.ne[0] != w.cols ||
          ti.ne[1] != w.rows || reinterpret_cast<uintptr_t>(ti.data) % 4 != 0) {
        return fail(DataLoss("tensor %s.weight is %s %s, expected aligned f32 [%zu, %zu]",
                             name.c_str(), ti.type_name(), ti.ShapeString().c_str(), w.cols,
                             w.rows));
      }
      w.f32 = reinterpret_cast<const float*>(ti.data);
      continue;
    }
    StatusOr<std::vector<int64_t>> v = g.GetIntArray("lutra.palette." + name);
    if (!v.ok()) return fail(v.status());
    if (v->size() != 5) return fail(DataLoss("lutra.palette.%s has %zu values, expected 5",
                                             name.c_str(), v->size()));
    PaletteShape sh;
    sh.rows = size_t((*v)[0]), sh.cols = size_t((*v)[1]), sh.bits = int((*v)[2]);
    sh.group_rows = size_t((*v)[3]);
    const int64_t cb = (*v)[4];
    if (cb < 0 || cb > 2) return fail(DataLoss("%s: codebook type %lld", name.c_str(), (long long)cb));
    sh.codebook = ElementType(cb);
    if (sh.rows != w.rows || sh.cols != w.cols) {
      return fail(DataLoss("%s is %zu x %zu, the config implies %zu x %zu", name.c_str(),
                           sh.rows, sh.cols, w.rows, w.cols));
    }
    Status shape_ok = sh.Validate();
    if (!shape_ok.ok()) return fail(DataLoss("%s: %s", name.c_str(), shape_ok.message().c_str()));
    StatusOr<const GgufTensorInfo*> idx = g.GetTensor(name + ".indices");
    if (!idx.ok()) return fail(idx.status());
    StatusOr<const GgufTensorInfo*> cbt = g.GetTensor(name + ".codebooks");
    if (!cbt.ok()) return fail(cbt.status());
    const uint32_t want_cb = ElementTypeToGgml(sh.codebook);
    if ((*idx)->type != uint32_t(GgmlType::kI8) || (*cbt)->type != want_cb) {
      return fail(DataLoss("%s: tensor types %s/%s, expected i8 indices and %s codebooks",
                           name.c_str(), (*idx)->type_name(), (*cbt)->type_name(),
                           ElementTypeName(sh.codebook)));
    }
    StatusOr<PaletteView> view = PaletteView::Make(sh, (*idx)->data, size_t((*idx)->n_bytes),
                                                   (*cbt)->data, size_t((*cbt)->n_bytes));
    if (!view.ok()) return fail(view.status().WithContext(name));
    w.f32 = nullptr;
    w.palette = *view;
  }
  if (*tied) m.weights.output = m.weights.embedding;
  for (const NamedNorm& n : norms) {
    StatusOr<const GgufTensorInfo*> t = g.GetTensor(n.name);
    if (!t.ok()) return fail(t.status());
    const GgufTensorInfo& ti = **t;
    if (ti.type != uint32_t(GgmlType::kF32) || ti.n_elements != uint64_t(c.dim) ||
        reinterpret_cast<uintptr_t>(ti.data) % 4 != 0) {
      return fail(DataLoss("tensor %s is %s %s, expected aligned f32 [%d]", n.name.c_str(),
                           ti.type_name(), ti.ShapeString().c_str(), c.dim));
    }
    *n.w = reinterpret_cast<const float*>(ti.data);
  }
  if (g.Find("tokenizer.ggml.tokens") != nullptr) {
    StatusOr<Tokenizer> t = Tokenizer::FromGguf(g);
    if (!t.ok()) return fail(t.status());
    m.tokenizer = std::make_shared<const Tokenizer>(std::move(*t));
  }
  m.keep_alive = gguf;
  if (o.seq_len > 0) m.config.seq_len = o.seq_len;
  LUTRA_RETURN_IF_ERROR(m.Prepare());
  if (o.bits != 0 || o.mixed_bits != 0.0) {
    if (m.weights.embedding.palettized()) {
      return InvalidArgument("%s is already palettized: drop --bits/--mixed", path.c_str());
    }
    return PalettizeModel(m, o, 1);
  }
  return m;
}

// ----------------------------------------------------------------------------
// LoRA adapters

BaseShapes AdapterShapes(const Config& c) {
  return BaseShapes::Llama(c.n_layers, c.dim, c.hidden_dim, c.q_dim(), c.kv_dim());
}

StatusOr<std::shared_ptr<const Adapter>> LoadLora(const std::string& path, float scale,
                                                  const Model& model) {
  LoadAdapterOptions o;
  o.scale = scale;
  return LoadAdapter(path, AdapterShapes(model.config), o);
}

StatusOr<std::shared_ptr<const Adapter>> BuildRecoveryAdapter(const Model& f32_model,
                                                              const Model& palettized,
                                                              size_t rank, size_t threads) {
  if (f32_model.config.n_layers != palettized.config.n_layers ||
      f32_model.config.dim != palettized.config.dim) {
    return InvalidArgument("recovery: the f32 and palettized models differ in shape");
  }
  std::vector<RecoveryTarget> targets;
  for (int l = 0; l < f32_model.config.n_layers; ++l) {
    const LayerWeights& w = f32_model.weights.layers[l];
    const LayerWeights& q = palettized.weights.layers[l];
    const Linear* ws[kNumProjections] = {&w.wq, &w.wk, &w.wv, &w.wo, &w.w1, &w.w2, &w.w3};
    const Linear* qs[kNumProjections] = {&q.wq, &q.wk, &q.wv, &q.wo, &q.w1, &q.w2, &q.w3};
    for (size_t p = 0; p < kNumProjections; ++p) {
      if (ws[p]->palettized() || !qs[p]->palettized()) {
        return InvalidArgument("recovery: needs f32 originals and palettized copies");
      }
      RecoveryTarget t;
      t.layer = size_t(l);
      t.projection = kAllProjections[p];
      t.weights = ws[p]->f32;
      t.quantized = qs[p]->palette;
      targets.push_back(t);
    }
  }
  RecoveryOptions o;
  o.rank = rank;
  o.threads = threads;
  StatusOr<Adapter> a = lutra::BuildRecoveryAdapter(AdapterShapes(f32_model.config), targets, o);
  if (!a.ok()) return a.status();
  return std::shared_ptr<const Adapter>(std::make_shared<Adapter>(std::move(*a)));
}

}  // namespace engine
}  // namespace lutra
