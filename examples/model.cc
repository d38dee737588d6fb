// Building a Model: synthetic weights, palettizing, and the engine's view of
// the model files the library reads and writes (lutra/format/llama_model.h,
// lutra/format/lutra_file.h). See engine.h.
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "examples/engine.h"
#include "lutra/format/gguf.h"
#include "lutra/format/llama_model.h"
#include "lutra/format/lora_file.h"
#include "lutra/format/lutra_file.h"
#include "lutra/format/mapped_file.h"
#include "lutra/quantize/gptq.h"
#include "lutra/quantize/mixed_bits.h"
#include "lutra/quantize/palettize.h"
#include "lutra/quantize/recovery.h"
#include "lutra/quantize/sensitivity.h"

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

// Heap bytes of the kernels' tables of one palettized matrix, as
// PreparedPalette::Make allocates them: per group max(16, 2^b) f32 and u8
// entries and two affine floats.
uint64_t PreparedBytes(const PaletteShape& sh) {
  return uint64_t(sh.num_groups()) * (std::max<uint64_t>(16, sh.num_entries()) * 5 + 8);
}

// Heap bytes of a palettized copy of `src` at the widths `o` asks for
// (LoadOptions::max_memory_bytes): indices, codebooks and tables, plus the
// f32 norms and biases. --mixed is estimated at its budget of bits per
// weight (codebooks included) with tables at its smallest G.
uint64_t PalettizedBytes(const Model& src, const LoadOptions& o) {
  const ModelConfig& c = src.config;
  double total = 4.0 * (2.0 * c.n_layers + 1.0) * c.dim +
                 4.0 * c.n_layers * (double(c.q_dim()) + 2.0 * c.kv_dim());
  size_t group = o.group;
  if (o.mixed_bits > 0.0 && !o.groups.empty()) {
    group = *std::min_element(o.groups.begin(), o.groups.end());
  }
  for (const Linear* w : src.Matrices()) {
    PaletteShape sh;
    sh.rows = w->rows, sh.cols = w->cols, sh.group_rows = std::max<size_t>(group, 1);
    sh.codebook = o.codebook;
    sh.bits = o.mixed_bits > 0.0 ? 8 : o.bits;
    if (!sh.Validate().ok()) continue;  // PalettizeModel reports it
    if (o.mixed_bits > 0.0) {
      total += double(w->rows) * double(w->cols) * o.mixed_bits / 8.0 + double(PreparedBytes(sh));
    } else {
      total += double(sh.total_bytes()) + double(PreparedBytes(sh));
    }
  }
  return total >= 1.8e19 ? ~uint64_t{0} : uint64_t(total);
}

}  // namespace

std::vector<const Linear*> Model::Matrices() const {
  std::vector<const Linear*> out;
  for (Linear* w : const_cast<Model*>(this)->MutableMatrices()) out.push_back(w);
  return out;
}

std::vector<Linear*> Model::MutableMatrices() {
  std::vector<Linear*> out;
  out.push_back(&weights.embedding);
  for (LayerWeights& l : weights.layers) {
    for (Linear* w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w1, &l.w2, &l.w3}) out.push_back(w);
  }
  if (!IsTied(*this)) out.push_back(&weights.output);
  return out;
}

// The order of LayerWeights' matrices in Matrices() (also lora.h's
// Projection order), with their GGUF-style names and the kind of their
// input (engine.h InputSite).
static const char* const kLayerMatrixNames[7] = {"attn_q", "attn_k", "attn_v", "attn_output",
                                                 "ffn_gate", "ffn_down", "ffn_up"};
static const char* const kLayerMatrixInputs[7] = {"attn_in", "attn_in", "attn_in", "attn_out",
                                                  "ffn_in", "ffn_mid", "ffn_in"};

std::vector<std::string> Model::MatrixNames() const {
  std::vector<std::string> out = {"token_embd"};
  for (size_t l = 0; l < weights.layers.size(); ++l) {
    for (const char* name : kLayerMatrixNames) out.push_back("blk." + std::to_string(l) + "." + name);
  }
  if (!IsTied(*this)) out.push_back("output");
  return out;
}

std::vector<std::string> Model::MatrixInputSites() const {
  // A tied embedding is also the head, whose input is what the KL sees.
  const bool tied = IsTied(*this);
  std::vector<std::string> out = {tied ? InputSite(-1, "") : std::string()};
  for (size_t l = 0; l < weights.layers.size(); ++l) {
    for (const char* kind : kLayerMatrixInputs) out.push_back(InputSite(int(l), kind));
  }
  if (!tied) out.push_back(InputSite(-1, ""));
  return out;
}

size_t Model::WeightBytes() const {
  size_t bytes = 0;
  for (const Linear* w : Matrices()) bytes += w->bytes();
  // RMSNorm weights: two per layer plus the final one, f32; q/k/v biases.
  bytes += (2 * size_t(config.n_layers) + 1) * size_t(config.dim) * sizeof(float);
  for (const LayerWeights& l : weights.layers) {
    if (l.bq) bytes += size_t(config.q_dim()) * sizeof(float);
    if (l.bk) bytes += size_t(config.kv_dim()) * sizeof(float);
    if (l.bv) bytes += size_t(config.kv_dim()) * sizeof(float);
  }
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
  // The whole model is heap: check the budget before filling billions of weights.
  double heap = 4.0 * double(num_norms) * c.dim;
  for (const Spec& s : specs) {
    PaletteShape sh;
    sh.rows = s.rows, sh.cols = s.cols, sh.bits = s.bits, sh.group_rows = o.group;
    sh.codebook = o.codebook;
    heap += s.bits == 0 || !sh.Validate().ok()
                ? 4.0 * double(s.rows) * double(s.cols)
                : double(sh.total_bytes()) + double(PreparedBytes(sh));
  }
  m.heap_bytes = heap >= 1.8e19 ? ~size_t{0} : size_t(heap);
  LUTRA_RETURN_IF_ERROR(CheckMemoryBudget(m.heap_bytes, o.max_memory_bytes,
                                          "synthetic model '" + shape + "'"));
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

// E[x^2] of `site`'s inputs as palettizer / recovery column weights; empty
// when there are no statistics for it or they are all zero (a dead input:
// unweighted then).
std::vector<float> ColumnImportance(const CalibrationStats* stats, const std::string& site) {
  const ActivationMoments* am = stats && !site.empty() ? stats->Find(site) : nullptr;
  if (am == nullptr) return {};
  std::vector<float> h = am->SecondMoments();
  double sum = 0.0;
  for (float v : h) sum += v;
  if (!(sum > 0.0)) h.clear();
  return h;
}

// One matrix's palettization: width and rows per codebook.
struct TensorPlan {
  int bits = 0;
  size_t group_rows = 0;
};

// A shallow copy of `src` (views only) in which matrix `t` (Matrices()
// order) is `q`, for measuring that tensor's effect alone.
StatusOr<Model> WithMatrix(const Model& src, size_t t, const PaletteMatrix& q) {
  Model m;
  m.config = src.config;
  m.weights = src.weights;
  const bool tied = IsTied(src);
  Linear* w = m.MutableMatrices()[t];
  w->f32 = nullptr;
  w->palette = q.view();
  w->prepared = nullptr;
  if (tied && t == 0) m.weights.output = m.weights.embedding;
  LUTRA_RETURN_IF_ERROR(m.Prepare());
  return m;
}

// Each matrix's (bits, G) in Model::Matrices() order: uniform for --bits;
// for --mixed the allocator's choice (lutra/quantize/mixed_bits.h) that
// minimizes the predicted error within the budget, each tensor's error
// weighted by its input's E[x^2] (h, may be empty: unweighted) and, with
// measured sensitivity, scaled by its KL per unit error on `calib`.
// Appends the per-tensor table to *table and a summary to *summary.
StatusOr<std::vector<TensorPlan>> PlanTensors(const Model& src, const LoadOptions& o,
                                              const std::vector<std::vector<float>>& h,
                                              const std::vector<int>& calib, size_t threads,
                                              ThreadPool* pool, std::string* table,
                                              std::string* summary) {
  const std::vector<const Linear*> mats = src.Matrices();
  const std::vector<std::string> names = src.MatrixNames();
  if (o.mixed_bits <= 0.0) {
    std::vector<TensorPlan> plan(mats.size(), TensorPlan{o.bits, o.group});
    char buf[96];
    snprintf(buf, sizeof(buf), "uniform %d-bit, G %zu", o.bits, o.group);
    *summary += buf;
    return plan;
  }
  std::vector<MixedBitsTensor> tensors(mats.size());
  for (size_t i = 0; i < mats.size(); ++i) {
    tensors[i].name = names[i];
    tensors[i].data = mats[i]->f32;
    tensors[i].rows = mats[i]->rows;
    tensors[i].cols = mats[i]->cols;
    tensors[i].column_importance = h[i].empty() ? nullptr : h[i].data();
  }
  const bool measure =
      !calib.empty() && (o.sensitivity == Sensitivity::kMeasured ||
                         (o.sensitivity == Sensitivity::kAuto && src.MatrixWeights() <= 100000000));
  std::vector<TensorSensitivity> sens;
  if (measure) {
    // KL on (at most) the first context window of the calibration text,
    // exact kernels so that only the weights differ.
    const std::vector<int> tokens(
        calib.begin(), calib.begin() + std::min(calib.size(), std::min<size_t>(256, src.config.seq_len)));
    if (tokens.size() < 2) return InvalidArgument("sensitivity: calibration text under 2 tokens");
    PalettizeOptions probe;
    probe.bits = 3;
    probe.group_rows = 16;
    probe.codebook = o.codebook;
    probe.threads = threads;
    TensorKlFn kl = [&](size_t t, const PaletteMatrix& q) -> StatusOr<double> {
      StatusOr<Model> test = WithMatrix(src, t, q);
      if (!test.ok()) return test.status();
      StatusOr<EvalResult> r = Evaluate(src, *test, tokens, 64, pool, MatmulPrecision::kF32);
      if (!r.ok()) return r.status();
      return r->mean_kl;
    };
    std::function<void(size_t, size_t)> progress;
    if (o.progress && isatty(2)) {
      progress = [](size_t done, size_t total) {
        fprintf(stderr, "\rmeasuring sensitivity: tensor %zu/%zu", done, total);
        if (done == total) fprintf(stderr, "\n");
      };
    }
    StatusOr<std::vector<TensorSensitivity>> s = MeasureSensitivity(tensors, probe, kl, progress);
    if (!s.ok()) return s.status();
    sens = std::move(*s);
    for (size_t i = 0; i < tensors.size(); ++i) tensors[i].importance = sens[i].scale;
  }
  MixedBitsOptions mo;
  mo.target_bits = o.mixed_bits;
  mo.allowed_bits = {2, 3, 4, 6, 8};
  mo.allowed_groups = o.groups;
  // Estimates on 256 sampled rows above 100 M weights (the allocation is
  // then ~4 minutes of the AFM shape's ~7 on 2 cores), else 512.
  mo.sample_rows = src.MatrixWeights() <= 100000000 ? 512 : 256;
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
  std::vector<TensorPlan> out;
  for (const TensorBits& t : plan->tensors) out.push_back(TensorPlan{t.bits, t.group_rows});
  char buf[256];
  snprintf(buf, sizeof(buf), "mixed %.3g bits/weight (%s sensitivity), widths 2/3/4/6/8, G per tensor",
           o.mixed_bits, measure ? "measured" : "weighted-error");
  *summary += buf;
  *table += plan->ToString();
  if (measure) {
    *table += "sensitivity: output KL with only this tensor at 3 bits, G 16 (calibration text)\n";
    for (size_t i = 0; i < sens.size(); ++i) {
      snprintf(buf, sizeof(buf), "%-24s KL %.4e  weighted error %.4e  KL/error %.4e\n",
               names[i].c_str(), sens[i].kl, sens[i].weighted_error, sens[i].scale);
      *table += buf;
    }
    snprintf(buf, sizeof(buf), "predicted KL (sum of measured sensitivity x weighted error): %.4f\n",
             plan->total_error);
    *table += buf;
  }
  return out;
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
  if (o.mixed_bits != 0.0 && !(o.mixed_bits >= 1.0 && o.mixed_bits <= 32.0)) {
    return InvalidArgument("--mixed %g: the budget must be within 1..32 bits per weight",
                           o.mixed_bits);
  }
  if (o.mixed_bits == 0.0 && !IsValidPaletteBits(o.bits)) {
    return InvalidArgument("palettize: bits = %d, need one of 1, 2, 3, 4, 6, 8", o.bits);
  }
  for (size_t g : o.mixed_bits > 0.0 ? o.groups : std::vector<size_t>{o.group}) {
    if (g == 0 || g > (size_t{1} << 20)) {
      return InvalidArgument("palettize: rows per codebook G = %zu, need 1 <= G <= 2^20", g);
    }
  }
  // The copy comes on top of the source's heap (both live until the caller
  // drops the source): refuse it before any k-means or allocation.
  const uint64_t copy_bytes = PalettizedBytes(src, o);
  LUTRA_RETURN_IF_ERROR(CheckMemoryBudget(uint64_t(src.heap_bytes) + copy_bytes,
                                          o.max_memory_bytes,
                                          "palettizing (the f32 model and its palettized copy)"));
  Model m;
  m.config = src.config;
  m.tokenizer = src.tokenizer;
  m.heap_bytes = size_t(copy_bytes);
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
  // So are the q/k/v biases (qwen2): added after the palettized products.
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& sl = src.weights.layers[l];
    LayerWeights& dl = m.weights.layers[l];
    const std::pair<const float*, const float**> biases[] = {
        {sl.bq, &dl.bq}, {sl.bk, &dl.bk}, {sl.bv, &dl.bv}};
    const size_t sizes[] = {size_t(c.q_dim()), size_t(c.kv_dim()), size_t(c.kv_dim())};
    for (size_t b = 0; b < 3; ++b) {
      if (biases[b].first == nullptr) continue;
      m.f32_storage.emplace_back(biases[b].first, biases[b].first + sizes[b]);
      *biases[b].second = m.f32_storage.back().data();
    }
  }

  const std::vector<const Linear*> mats = src.Matrices();
  for (const Linear* w : mats) {
    if (w->palettized()) return InvalidArgument("palettize: model is already palettized");
  }
  // Destination of each source matrix, in Model::Matrices() order (the
  // output slot too when the source's head is untied).
  std::vector<Linear*> dst = m.MutableMatrices();
  if (mats.size() > dst.size()) dst.push_back(&m.weights.output);

  // Calibration: E[x^2] of every matrix input on the calibration text. GPTQ
  // (sequential, below) where every input's K x K Gram matrix would fit in
  // 1 GiB of doubles: beyond that its O(K^2) work per row is too slow too.
  const double gram_bytes =
      8.0 * (double(c.n_layers) * (2.0 * c.dim * double(c.dim) + double(c.q_dim()) * c.q_dim() +
                                   double(c.hidden_dim) * c.hidden_dim) +
             double(c.dim) * c.dim);
  const size_t max_k = size_t(std::max({c.dim, c.q_dim(), c.hidden_dim}));
  const bool use_gptq = o.calibrate && o.gptq && gram_bytes <= double(1 << 30) &&
                        max_k <= ActivationMoments::kMaxGramCols;
  ThreadPool pool(threads);
  using Clock = std::chrono::steady_clock;
  const auto seconds_since = [](Clock::time_point t) {
    return std::chrono::duration<double>(Clock::now() - t).count();
  };
  const Clock::time_point t_calib = Clock::now();
  std::vector<int> calib;
  std::vector<std::vector<float>> h(mats.size());
  const std::vector<std::string> sites = src.MatrixInputSites();
  const std::vector<std::string> names = src.MatrixNames();
  if (o.calibrate) {
    if (o.calib_text.empty()) {
      // Codebook tuning (below) fits the output on this text, and on few
      // tokens it fits the text rather than the model (docs/quality.md):
      // where it runs, kTuneCalibTokens.
      const bool tunes = o.tune_steps != 0 && (o.mixed_bits > 0.0 || o.bits <= 4) &&
                         src.MatrixWeights() <= kTuneAutoMaxWeights;
      StatusOr<std::vector<int>> t =
          SampleTokens(src, o.calib_tokens != 0                    ? o.calib_tokens
                            : tunes                                ? kTuneCalibTokens
                            : src.MatrixWeights() <= 100000000 ? 2048
                                                                   : 64,
                       src.tokenizer ? src.tokenizer->bos_id() : o.calib_bos,
                       o.calib_seed, &pool);
      if (!t.ok()) return t.status();
      calib = std::move(*t);
    } else {
      calib = o.calib_text;
    }
    StatusOr<CalibrationStats> stats = Calibrate(src, calib, 64, &pool);
    if (!stats.ok()) return stats.status();
    m.calibration = std::make_shared<const CalibrationStats>(std::move(*stats));
    for (size_t i = 0; i < mats.size(); ++i) h[i] = ColumnImportance(m.calibration.get(), sites[i]);
  }
  const double calib_s = seconds_since(t_calib);
  const Clock::time_point t_plan = Clock::now();
  std::string summary;
  StatusOr<std::vector<TensorPlan>> plan =
      PlanTensors(src, o, h, calib, threads, &pool, &m.quantization_table, &summary);
  if (!plan.ok()) return plan.status();

  const double plan_s = seconds_since(t_plan);
  const Clock::time_point t_pal = Clock::now();
  size_t total_weights = 0, done_weights = 0;
  for (const Linear* w : mats) total_weights += w->rows * w->cols;
  ProgressBar bar;

  // Stages in forward order: the embedding, then per layer the matrices
  // reading each input site, then an untied head. With GPTQ the stages run
  // sequentially: each one's inputs are captured from the model quantized so
  // far (`part`) and its matrices aimed at the f32 outputs
  // (gptq.h AsymmetricTarget), so that each layer corrects the error of the
  // layers before it instead of adding to it.
  struct Stage {
    std::vector<size_t> tensors;
    int layer;  // -1: the embedding or head (capture the whole model)
  };
  std::vector<Stage> stages = {{{0}, -1}};
  for (int l = 0; l < c.n_layers; ++l) {
    const size_t b = 1 + 7 * size_t(l);  // Matrices() order: q k v o w1 w2 w3
    stages.push_back({{b, b + 1, b + 2}, l});
    stages.push_back({{b + 3}, l});
    stages.push_back({{b + 4, b + 6}, l});
    stages.push_back({{b + 5}, l});
  }
  if (mats.size() > 1 + 7 * size_t(c.n_layers)) stages.push_back({{mats.size() - 1}, -1});
  std::map<std::string, std::vector<float>> x_f32;
  Model part;  // `src` with the matrices quantized so far (views)
  if (use_gptq) {
    StatusOr<std::map<std::string, std::vector<float>>> x = CaptureInputs(src, calib, 64, &pool);
    if (!x.ok()) return x.status();
    x_f32 = std::move(*x);
    part.config = src.config;
    part.weights = src.weights;
  }
  std::vector<PaletteMatrix> results(mats.size());
  for (const Stage& stage : stages) {
    std::map<std::string, std::vector<float>> x_part;
    const bool capture = use_gptq && stage.tensors[0] != 0 &&
                         std::any_of(stage.tensors.begin(), stage.tensors.end(),
                                     [&](size_t i) { return (*plan)[i].bits <= 4; });
    if (capture) {
      StatusOr<std::map<std::string, std::vector<float>>> x =
          CaptureInputs(part, calib, 64, &pool, stage.layer);
      if (!x.ok()) return x.status();
      x_part = std::move(*x);
    }
    for (size_t i : stage.tensors) {
      const Linear& w = *mats[i];
      const std::string context = "palettize " + names[i];
      PalettizeOptions po;
      po.bits = (*plan)[i].bits;
      po.group_rows = (*plan)[i].group_rows;
      po.codebook = o.codebook;
      po.threads = threads;
      // Activation weighting and error feedback pay at low widths; at 6 and
      // 8 bits plain k-means is already close, and either one moved a
      // near-tie of the 8-bit greedy stories260K text (docs/quality.md).
      const bool low = po.bits <= 4;
      po.column_importance = h[i].empty() || !low ? nullptr : h[i].data();
      const float* target = w.f32;
      std::vector<float> w_star;
      std::vector<double> gram;
      const auto xf = use_gptq && low ? x_f32.find(sites[i]) : x_f32.end();
      const auto xp = x_part.find(sites[i]);
      if (xf != x_f32.end() && xp != x_part.end() && xf->second.size() == xp->second.size()) {
        LUTRA_RETURN_IF_ERROR(AsymmetricTarget(w.f32, w.rows, w.cols, xf->second.data(),
                                               xp->second.data(), xf->second.size() / w.cols,
                                               GptqOptions().asymmetric_damp, &w_star, &gram)
                                  .WithContext(context));
        target = w_star.data();
      } else if (xf != x_f32.end()) {
        // The embedding / head: the first stage, its f32 inputs as they are.
        StatusOr<ActivationMoments> moments = ActivationMoments::Create(w.cols, true);
        if (!moments.ok()) return moments.status().WithContext(context);
        LUTRA_RETURN_IF_ERROR(
            moments->Add(xf->second.data(), xf->second.size() / w.cols).WithContext(context));
        gram = moments->Gram();
      }
      if (o.progress) {
        const size_t before = done_weights, size = w.rows * w.cols;
        po.progress = [&, before, size, i](size_t groups_done, size_t groups) {
          const double f = double(before + size * groups_done / std::max<size_t>(groups, 1)) /
                           double(total_weights);
          bar.Show(f, i, mats.size());
        };
      }
      StatusOr<PaletteMatrix> pm = Palettize(target, w.rows, w.cols, po);
      if (!pm.ok()) return pm.status().WithContext(context);
      if (!gram.empty()) {
        LUTRA_RETURN_IF_ERROR(
            GptqRefine(target, gram.data(), GptqOptions(), &*pm).WithContext(context));
      }
      results[i] = std::move(*pm);
      done_weights += w.rows * w.cols;
      if (use_gptq) {
        Linear* pl = part.MutableMatrices()[i];
        pl->f32 = nullptr;
        pl->palette = results[i].view();
        pl->prepared = nullptr;
        if (i == 0 && mats.size() == 1 + 7 * size_t(c.n_layers)) {
          part.weights.output = part.weights.embedding;  // tied head
        }
      }
    }
    if (use_gptq) LUTRA_RETURN_IF_ERROR(part.Prepare());
  }
  m.palettes.reserve(mats.size());
  for (size_t i = 0; i < mats.size(); ++i) {
    Linear& out = *dst[i];
    out.rows = mats[i]->rows, out.cols = mats[i]->cols, out.f32 = nullptr;
    out.palette = results[i].view();
    m.palettes.push_back(std::move(results[i]));
  }
  if (o.progress && isatty(2)) {
    bar.Show(1.0, mats.size(), mats.size());
    fprintf(stderr, "\n");
  }
  // Tied head: the output is the (palettized) embedding itself.
  if (dst.back() != &m.weights.output) m.weights.output = m.weights.embedding;
  char buf[160];
  if (o.calibrate) {
    snprintf(buf, sizeof(buf), "; activation-weighted k-means%s, calibrated on %zu tokens (%s)",
             use_gptq ? " + sequential GPTQ" : "", calib.size(),
             o.calib_text.empty() ? "sampled from the f32 model" : "given text");
  } else {
    snprintf(buf, sizeof(buf), "; plain k-means, no calibration");
  }
  m.quantization = "lutra palettization: " + summary + buf;
  snprintf(buf, sizeof(buf), "time: calibration %.1f s, allocation %.1f s, palettization %.1f s\n",
           calib_s, plan_s, seconds_since(t_pal));
  m.quantization_table += buf;
  LUTRA_RETURN_IF_ERROR(m.Prepare());

  // End-to-end codebook tuning against the f32 model on the calibration
  // text (tune.cc): fits what the per-layer steps above cannot see, how the
  // layers' errors add up at the output.
  // By default only on models up to kTuneAutoMaxWeights and with at least
  // kTuneMinTokens of text: on a few hundred tokens it fits the text, not
  // the model (and the unit tests that calibrate on few tokens stay fast).
  const bool small = src.MatrixWeights() <= kTuneAutoMaxWeights;
  const int steps =
      o.tune_steps >= 0 ? o.tune_steps
      : o.tune_always || (small && calib.size() >= kTuneMinTokens)
          ? TuneDefaultSteps(src.MatrixWeights())
          : 0;
  // The recovery adapter starts from the SVD of the residual; tuning then
  // trains it with the codebooks, so each fits what the other leaves.
  if (o.recover_rank > 0) {
    StatusOr<std::shared_ptr<const Adapter>> a =
        BuildRecoveryAdapter(src, m, o.recover_rank, threads, o.recover_targets);
    if (!a.ok()) return a.status().WithContext("palettize");
    m.recovery = std::move(*a);
  }
  if (o.calibrate && steps > 0) {
    TuneOptions to;
    to.steps = size_t(steps);
    to.norms = o.tune_norms;
    to.pool = &pool;
    to.adapter = m.recovery.get();
    if (!o.tune_indices) to.index_lr = 0.0f;
    // Where the calibration text was sampled, the steps train on fresh
    // samples, each sequence seen once: repeated sequences were fitted
    // better than the model's distribution (docs/quality.md). A text the
    // user gave is all there is, and is cycled.
    std::vector<int> fresh;
    const Clock::time_point t_fresh = Clock::now();
    if (o.calib_text.empty() &&
        (o.tune_fresh > 0 || (o.tune_fresh < 0 && src.MatrixWeights() <= kTuneAutoMaxWeights))) {
      // Seeds far from the calibration text's (seed + sequence number).
      StatusOr<std::vector<int>> t =
          SampleTokens(src, to.steps * to.batch * to.segment,
                       src.tokenizer ? src.tokenizer->bos_id() : o.calib_bos,
                       o.calib_seed + (uint64_t{1} << 40), &pool);
      if (!t.ok()) return t.status();
      fresh = std::move(*t);
      to.train_text = &fresh;
    }
    const double fresh_s = seconds_since(t_fresh);
    StatusOr<TuneReport> r = TuneCodebooks(src, m, calib, to);
    if (!r.ok()) return r.status().WithContext("palettize");
    if (r->adapter) m.recovery = r->adapter;
    snprintf(buf, sizeof(buf),
             "; codebooks%s%s tuned end to end (KL distillation, %zu steps on %zu %s tokens)",
             o.tune_indices ? (o.tune_norms ? ", indices" : " and indices") : "",
             o.tune_norms ? " and norms" : "", r->steps, r->tokens,
             fresh.empty() ? "calibration" : "freshly sampled");
    if (r->matrices > 0 || o.tune_norms) m.quantization += buf;
    snprintf(buf, sizeof(buf),
             "tuning: %zu matrices, calibration KL %.4f -> %.4f, %zu steps, %.1f s",
             r->matrices, r->kl_before, r->kl_after, r->steps, r->seconds);
    m.quantization_table += buf;
    if (!fresh.empty()) {
      snprintf(buf, sizeof(buf), " on %zu fresh tokens (sampled in %.1f s)", fresh.size(),
               fresh_s);
      m.quantization_table += buf;
    }
    if (r->indices > 0) {
      snprintf(buf, sizeof(buf), ", %zu of %zu indices moved", r->changed_indices, r->indices);
      m.quantization_table += buf;
    }
    if (r->adapter) {
      snprintf(buf, sizeof(buf), ", recovery adapter (%zu matrices) trained along",
               r->adapter->num_targets());
      m.quantization_table += buf;
    }
    m.quantization_table += "\n";
  } else if (o.calibrate && o.tune_steps < 0 && !o.tune_always) {
    m.quantization_table += small ? "tuning: skipped, calibration text under 2048 tokens\n"
                                  : "tuning: skipped above 2 M matrix weights "
                                    "(--tune-steps N forces it)\n";
  }
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
    d.bq = s.bq, d.bk = s.bk, d.bv = s.bv;
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
    d.bq = s.bq, d.bk = s.bk, d.bv = s.bv;
  }
  w.final_norm = m.weights.final_norm;
  w.output = m.weights.output;
  w.quantization = m.quantization;
  return w;
}

// A mapped .lutra file as a Model (palettized at load only if it is f32).
// `heap` bytes are already spent (the file, when read into memory).
StatusOr<Model> FromLutraFile(LutraFile file, const LoadOptions& o, uint64_t heap) {
  const std::string path = file.gguf.file().path();
  std::shared_ptr<const Tokenizer> tokenizer;
  if (file.tokenizer) tokenizer = std::make_shared<const Tokenizer>(std::move(*file.tokenizer));
  // The views stay valid when the file moves into the shared storage.
  const LutraWeights weights = file.weights;
  StatusOr<Model> m = FromWeights(weights, std::make_shared<LutraFile>(std::move(file)));
  if (!m.ok()) return m.status().WithContext(path);
  m->tokenizer = tokenizer;
  m->quantization = weights.quantization;
  if (o.seq_len > 0) m->config.seq_len = o.seq_len;
  // The kernels' tables are the only large heap a mapped .lutra needs.
  for (const Linear* w : m->Matrices()) {
    if (w->palettized()) heap += PreparedBytes(w->palette.shape);
  }
  LUTRA_RETURN_IF_ERROR(CheckMemoryBudget(heap, o.max_memory_bytes,
                                          path + ": loading (the file when read into memory, "
                                                 "the kernels' tables)"));
  m->heap_bytes = size_t(heap);
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
  // Mapped, or read into memory (--no-mmap) within the budget.
  StatusOr<MappedFile> file = MappedFile::Open(
      path, o.use_mmap ? MappedFile::Mode::kMapOrRead : MappedFile::Mode::kRead,
      o.max_memory_bytes);
  if (!file.ok()) return file.status();
  uint64_t heap = file->is_mapped() ? 0 : file->size();
  StatusOr<ModelWeightsF32> weights = Status();
  std::shared_ptr<const Tokenizer> tokenizer;
  if (file->size() >= 4 && memcmp(file->data(), "GGUF", 4) == 0) {
    StatusOr<GgufFile> gguf = GgufFile::FromMapped(std::move(*file));
    if (!gguf.ok()) return gguf.status();
    if (IsLutraFile(gguf->reader())) {
      StatusOr<LutraFile> lutra = ReadLutraFile(std::move(*gguf));
      if (!lutra.ok()) return lutra.status();
      return FromLutraFile(std::move(*lutra), o, heap);
    }
    // Tensors that are not f32 become f32 on the heap: check before any is
    // converted (the config and layer count are checked first, so a hostile
    // count gets its own message).
    StatusOr<ModelConfig> config = ReadGgufLlamaConfig(gguf->reader());
    if (!config.ok()) return config.status().WithContext(path);
    heap += GgufConvertedBytes(gguf->reader());
    LUTRA_RETURN_IF_ERROR(CheckMemoryBudget(heap, o.max_memory_bytes,
                                            path + ": loading (the file when read into "
                                                   "memory, tensors converted to f32)"));
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
  model->heap_bytes = size_t(heap);
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
                                                              size_t rank, size_t threads,
                                                              uint32_t projections) {
  if ((projections & ((1u << kNumProjections) - 1)) == 0) {
    return InvalidArgument("recovery: no projection to adapt");
  }
  if (f32_model.config.n_layers != palettized.config.n_layers ||
      f32_model.config.dim != palettized.config.dim) {
    return InvalidArgument("recovery: the f32 and palettized models differ in shape");
  }
  std::vector<RecoveryTarget> targets;
  // Activation weighting (recovery.h) from the palettized model's calibration.
  std::vector<std::vector<float>> h(kNumProjections * size_t(f32_model.config.n_layers));
  for (int l = 0; l < f32_model.config.n_layers; ++l) {
    const LayerWeights& w = f32_model.weights.layers[l];
    const LayerWeights& q = palettized.weights.layers[l];
    const Linear* ws[kNumProjections] = {&w.wq, &w.wk, &w.wv, &w.wo, &w.w1, &w.w2, &w.w3};
    const Linear* qs[kNumProjections] = {&q.wq, &q.wk, &q.wv, &q.wo, &q.w1, &q.w2, &q.w3};
    for (size_t p = 0; p < kNumProjections; ++p) {
      if ((projections >> p & 1) == 0) continue;
      if (ws[p]->palettized() || !qs[p]->palettized()) {
        return InvalidArgument("recovery: needs f32 originals and palettized copies");
      }
      RecoveryTarget t;
      t.layer = size_t(l);
      t.projection = kAllProjections[p];
      t.weights = ws[p]->f32;
      t.quantized = qs[p]->palette;
      std::vector<float>& hp = h[size_t(l) * kNumProjections + p];
      hp = ColumnImportance(palettized.calibration.get(), InputSite(l, kLayerMatrixInputs[p]));
      if (!hp.empty()) t.column_importance = hp.data();
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
