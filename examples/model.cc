// Building a Model: synthetic weights, palettizing, and the engine's view of
// the model files the library reads and writes (lutra/format/llama_model.h,
// lutra/format/lutra_file.h). See engine.h.
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <string>
#include <vector>

#include "examples/engine.h"
#include "lutra/format/gguf.h"
#include "lutra/format/llama_model.h"
#include "lutra/format/lora_file.h"
#include "lutra/format/lutra_file.h"
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

StatusOr<ModelConfig> SyntheticConfig(const std::string& shape) {
  ModelConfig c;
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
      StatusOr<ModelConfig> base = SyntheticConfig(shape.substr(0, colon));
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
  c.rope_dim = c.head_dim;
  c.tied_embedding = true;
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
  StatusOr<ModelConfig> config = SyntheticConfig(shape);
  if (!config.ok()) return config.status();
  Model m;
  m.config = *config;
  if (o.seq_len > 0) m.config.seq_len = o.seq_len;
  const ModelConfig& c = m.config;
  LUTRA_RETURN_IF_ERROR(CheckSupported(c));
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
  const ModelConfig& c = m.config;
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
// Model files

namespace {

Linear ToLinear(const LutraMatrix& m) {
  Linear w;
  static_cast<LutraMatrix&>(w) = m;
  return w;
}

// A Model over the views in `w`; `storage` keeps what they point into alive
// (a mapped .lutra file, the f32 loader's mapping and converted tensors).
StatusOr<Model> FromWeights(const LutraWeights& w, std::shared_ptr<void> storage) {
  Model m;
  m.config = w.config;
  LUTRA_RETURN_IF_ERROR(CheckSupported(m.config));
  m.weights.embedding = ToLinear(w.token_embedding);
  m.weights.layers.resize(w.layers.size());
  for (size_t l = 0; l < w.layers.size(); ++l) {
    const LutraLayerWeights& s = w.layers[l];
    LayerWeights& d = m.weights.layers[l];
    d.attn_norm = s.attn_norm, d.ffn_norm = s.ffn_norm;
    d.wq = ToLinear(s.wq), d.wk = ToLinear(s.wk), d.wv = ToLinear(s.wv), d.wo = ToLinear(s.wo);
    d.w1 = ToLinear(s.w1), d.w2 = ToLinear(s.w2), d.w3 = ToLinear(s.w3);
  }
  m.weights.final_norm = w.final_norm;
  // A tied head is the embedding's Linear, so IsTied and Prepare see one matrix.
  m.weights.output = w.config.tied_embedding ? m.weights.embedding : ToLinear(w.output);
  m.keep_alive = std::move(storage);
  return m;
}

// The views of `m` as a .lutra file stores them.
LutraWeights ToLutraWeights(const Model& m) {
  LutraWeights w;
  w.config = m.config;
  w.config.tied_embedding = IsTied(m);
  w.token_embedding = m.weights.embedding;
  w.layers.resize(m.weights.layers.size());
  for (size_t l = 0; l < w.layers.size(); ++l) {
    const LayerWeights& s = m.weights.layers[l];
    LutraLayerWeights& d = w.layers[l];
    d.attn_norm = s.attn_norm, d.ffn_norm = s.ffn_norm;
    d.wq = s.wq, d.wk = s.wk, d.wv = s.wv, d.wo = s.wo;
    d.w1 = s.w1, d.w2 = s.w2, d.w3 = s.w3;
  }
  w.final_norm = m.weights.final_norm;
  w.output = m.weights.output;
  return w;
}

// A mapped .lutra file as a Model (palettized at load only if it is f32).
StatusOr<Model> FromLutraFile(LutraFile file, const LoadOptions& o) {
  const std::string path = file.gguf.file().path();
  std::shared_ptr<const Tokenizer> tokenizer;
  if (file.tokenizer) tokenizer = std::make_shared<const Tokenizer>(std::move(*file.tokenizer));
  // The views stay valid when the file moves into the shared storage.
  const LutraWeights weights = file.weights;
  StatusOr<Model> m = FromWeights(weights, std::make_shared<LutraFile>(std::move(file)));
  if (!m.ok()) return m.status().WithContext(path);
  m->tokenizer = tokenizer;
  if (o.seq_len > 0) m->config.seq_len = o.seq_len;
  LUTRA_RETURN_IF_ERROR(m->Prepare());
  if (o.bits != 0 || o.mixed_bits != 0.0) {
    if (m->weights.embedding.palettized()) {
      return InvalidArgument("%s is already palettized: drop --bits/--mixed", path.c_str());
    }
    return PalettizeModel(*m, o, 1);
  }
  return m;
}

}  // namespace

StatusOr<Model> OpenModel(const std::string& path, const LoadOptions& o, size_t threads) {
  StatusOr<MappedFile> file = MappedFile::Open(path);
  if (!file.ok()) return file.status();
  StatusOr<ModelWeightsF32> weights = Status();
  std::shared_ptr<const Tokenizer> tokenizer;
  if (file->size() >= 4 && memcmp(file->data(), "GGUF", 4) == 0) {
    StatusOr<GgufFile> gguf = GgufFile::FromMapped(std::move(*file));
    if (!gguf.ok()) return gguf.status();
    if (IsLutraFile(gguf->reader())) {
      StatusOr<LutraFile> lutra = ReadLutraFile(std::move(*gguf));
      if (!lutra.ok()) return lutra.status();
      return FromLutraFile(std::move(*lutra), o);
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
  const LutraWeights views = LutraWeightsFromF32(*weights);
  StatusOr<Model> model =
      FromWeights(views, std::make_shared<ModelWeightsF32>(std::move(*weights)));
  if (!model.ok()) return model.status().WithContext(path);
  model->tokenizer = tokenizer;
  if (o.seq_len > 0) model->config.seq_len = o.seq_len;
  if (o.bits == 0 && o.mixed_bits == 0.0) return model;
  return PalettizeModel(*model, o, threads);
}

Status SaveLutraModel(const Model& model, const Tokenizer* tokenizer, const std::string& path) {
  return WriteLutraFile(ToLutraWeights(model), tokenizer, path);
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
// LoRA adapters

BaseShapes AdapterShapes(const ModelConfig& c) {
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
