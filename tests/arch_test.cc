// Today's small-model architectures end to end: GGUF files written with
// lutra's GGUF writer from small random-weight models (Llama 3.x with
// freq_base 500000 and rope_freqs.weight, Qwen2 with q/k/v biases, tied
// embeddings and half-split RoPE, a SmolLM2-like tied llama, linear RoPE
// scaling), loaded through the engine and compared, prefill and decode,
// with the scalar reference forward (tests/support/reference_llama.h);
// then palettized at 8 bits and round-tripped through .lutra files; and
// the variants that are not supported refused with a message naming them.
#include <math.h>

#include <algorithm>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "examples/engine.h"
#include "lutra/format/gguf.h"
#include "lutra/format/gguf_writer.h"
#include "lutra/format/llama_model.h"
#include "tests/support/reference_llama.h"
#include "tests/support/rng.h"
#include "tests/test_util.h"

namespace lutra {
namespace engine {
namespace {

// A random-weight model in Hugging Face's layout: the q/k rows of each head
// in rotate-half order (pairs (i, i + head_dim / 2)), as qwen2 GGUFs keep
// them. Matrices row-major [out, in].
struct HfModel {
  ModelConfig c;  // shape, rope_theta, norm_eps, tied_embedding
  std::vector<float> embd, output, final_norm;
  struct Layer {
    std::vector<float> attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3, bq, bk, bv;
  };
  std::vector<Layer> layers;
};

ModelConfig Shape(int dim, int heads, int kv_heads, float theta, bool tied) {
  ModelConfig c;
  c.dim = dim, c.n_heads = heads, c.n_kv_heads = kv_heads, c.head_dim = dim / heads;
  c.rope_dim = c.head_dim, c.hidden_dim = 2 * dim, c.n_layers = 2, c.vocab_size = 96;
  c.seq_len = 32, c.rope_theta = theta, c.norm_eps = 1e-5f, c.tied_embedding = tied;
  return c;
}

// Weights like a 1/sqrt(fan_in) init, norms near 1, biases large enough to
// matter (Qwen2's k biases are large in trained models too).
HfModel RandomModel(const ModelConfig& c, bool biases, uint64_t seed) {
  test::Rng rng(seed);
  const auto matrix = [&](int rows, int cols) {
    return rng.GaussianVector(size_t(rows) * cols, 1.0f / sqrtf(float(cols)));
  };
  const auto norm = [&](int n) { return rng.UniformVector(size_t(n), 0.8f, 1.2f); };
  HfModel m;
  m.c = c;
  m.embd = rng.GaussianVector(size_t(c.vocab_size) * c.dim);
  if (!c.tied_embedding) m.output = matrix(c.vocab_size, c.dim);
  m.final_norm = norm(c.dim);
  m.layers.resize(c.n_layers);
  for (HfModel::Layer& l : m.layers) {
    l.attn_norm = norm(c.dim), l.ffn_norm = norm(c.dim);
    l.wq = matrix(c.q_dim(), c.dim), l.wk = matrix(c.kv_dim(), c.dim);
    l.wv = matrix(c.kv_dim(), c.dim), l.wo = matrix(c.dim, c.q_dim());
    l.w1 = matrix(c.hidden_dim, c.dim), l.w2 = matrix(c.dim, c.hidden_dim);
    l.w3 = matrix(c.hidden_dim, c.dim);
    if (biases) {
      l.bq = rng.GaussianVector(size_t(c.q_dim()), 0.5f);
      l.bk = rng.GaussianVector(size_t(c.kv_dim()), 0.5f);
      l.bv = rng.GaussianVector(size_t(c.kv_dim()), 0.5f);
    }
  }
  return m;
}

// llama.cpp's convert_hf_to_gguf `permute` for the llama architecture: in
// each head, rows [half 0 | half 1] become interleaved pairs (new row
// 2i + j is old row j * head_dim / 2 + i). A bias is a matrix of one column.
std::vector<float> PermuteToAdjacent(const std::vector<float>& w, int heads, int head_dim) {
  if (w.empty()) return w;
  const size_t cols = w.size() / (size_t(heads) * head_dim);
  std::vector<float> out(w.size());
  for (int h = 0; h < heads; ++h) {
    for (int i = 0; i < head_dim / 2; ++i) {
      for (int j = 0; j < 2; ++j) {
        const size_t from = size_t(h) * head_dim + size_t(j) * (head_dim / 2) + i;
        const size_t to = size_t(h) * head_dim + 2 * size_t(i) + j;
        std::copy(w.begin() + from * cols, w.begin() + (from + 1) * cols, out.begin() + to * cols);
      }
    }
  }
  return out;
}

// How to write a GGUF file from an HfModel.
struct FileOptions {
  std::string arch = "llama";     // llama: q/k rows and biases permuted as llama.cpp does
  std::vector<float> rope_freqs;  // rope_freqs.weight when not empty
  std::string scaling_type;       // ARCH.rope.scaling.type when not empty
  float scaling_factor = 0.0f;    // ARCH.rope.scaling.factor when not 0
  int rope_dim = 0;               // ARCH.rope.dimension_count when > 0
  std::string extra_tensor;       // an F32 [dim] tensor the forward pass does not read
  bool short_bias = false;        // blk.0.attn_k.bias one element short
};

std::string WriteGguf(const HfModel& m, const FileOptions& o, const std::string& name) {
  const ModelConfig& c = m.c;
  const bool permute = o.arch == "llama";
  const std::string a = o.arch + ".";
  GgufWriter g;
  g.AddString("general.architecture", o.arch);
  g.AddU32(a + "context_length", uint32_t(c.seq_len));
  g.AddU32(a + "embedding_length", uint32_t(c.dim));
  g.AddU32(a + "feed_forward_length", uint32_t(c.hidden_dim));
  g.AddU32(a + "block_count", uint32_t(c.n_layers));
  g.AddU32(a + "attention.head_count", uint32_t(c.n_heads));
  g.AddU32(a + "attention.head_count_kv", uint32_t(c.n_kv_heads));
  g.AddF32(a + "attention.layer_norm_rms_epsilon", c.norm_eps);
  g.AddF32(a + "rope.freq_base", c.rope_theta);
  if (o.rope_dim > 0) g.AddU32(a + "rope.dimension_count", uint32_t(o.rope_dim));
  if (!o.scaling_type.empty()) g.AddString(a + "rope.scaling.type", o.scaling_type);
  if (o.scaling_factor != 0.0f) g.AddF32(a + "rope.scaling.factor", o.scaling_factor);
  const auto add = [&](const std::string& tensor, const std::vector<float>& v, uint64_t in) {
    if (v.empty()) return;
    if (in == v.size()) {
      g.AddTensorF32(tensor, {in}, v.data());
    } else {
      g.AddTensorF32(tensor, {in, v.size() / in}, v.data());
    }
  };
  const uint64_t dim = c.dim, hid = c.hidden_dim, q = c.q_dim();
  add("token_embd.weight", m.embd, dim);
  add("output_norm.weight", m.final_norm, dim);
  add("output.weight", m.output, dim);
  if (!o.rope_freqs.empty()) add("rope_freqs.weight", o.rope_freqs, o.rope_freqs.size());
  if (!o.extra_tensor.empty()) add(o.extra_tensor, m.final_norm, dim);
  for (int l = 0; l < c.n_layers; ++l) {
    const HfModel::Layer& y = m.layers[l];
    const std::string p = "blk." + std::to_string(l) + ".";
    const auto qk = [&](const std::vector<float>& w, int heads) {
      return permute ? PermuteToAdjacent(w, heads, c.head_dim) : w;
    };
    std::vector<float> bk = qk(y.bk, c.n_kv_heads);
    if (o.short_bias && l == 0) bk.pop_back();
    add(p + "attn_norm.weight", y.attn_norm, dim);
    add(p + "attn_q.weight", qk(y.wq, c.n_heads), dim);
    add(p + "attn_k.weight", qk(y.wk, c.n_kv_heads), dim);
    add(p + "attn_v.weight", y.wv, dim);
    add(p + "attn_output.weight", y.wo, q);
    add(p + "attn_q.bias", qk(y.bq, c.n_heads), qk(y.bq, c.n_heads).size());
    add(p + "attn_k.bias", bk, bk.size());
    add(p + "attn_v.bias", y.bv, y.bv.size());
    add(p + "ffn_norm.weight", y.ffn_norm, dim);
    add(p + "ffn_gate.weight", y.w1, dim);
    add(p + "ffn_down.weight", y.w2, hid);
    add(p + "ffn_up.weight", y.w3, dim);
  }
  const std::string path = test::TempPath(name);
  const Status s = g.WriteFile(path);
  REQUIRE(s.ok());
  return path;
}

Model Open(const std::string& path, const LoadOptions& o = LoadOptions()) {
  StatusOr<Model> m = OpenModel(path, o);
  INFO(m.status().message());
  REQUIRE(m.ok());
  return std::move(*m);
}

// A fixed prompt: kPrefill tokens in one batch, then kDecode single steps.
constexpr size_t kPrefill = 6, kDecode = 4;
const std::vector<int> kTokens = {1, 17, 42, 5, 88, 63, 30, 9, 71, 2};

// Logits of every position of kTokens: the prefill batch (GEMM path) with
// all_logits, then one token at a time (GEMV path).
std::vector<std::vector<float>> EngineLogits(const Model& model) {
  StatusOr<RunState> s = MakeRunState(model.config, kPrefill);
  REQUIRE(s.ok());
  const size_t vocab = size_t(model.config.vocab_size);
  std::vector<std::vector<float>> out;
  StatusOr<const float*> l = Forward(model, *s, kTokens.data(), kPrefill, 0, true);
  REQUIRE(l.ok());
  for (size_t i = 0; i < kPrefill; ++i) out.emplace_back(*l + i * vocab, *l + (i + 1) * vocab);
  for (size_t i = kPrefill; i < kPrefill + kDecode; ++i) {
    l = Forward(model, *s, &kTokens[i], 1, i);
    REQUIRE(l.ok());
    out.emplace_back(*l, *l + vocab);
  }
  return out;
}

// The scalar reference on the weights the library loader reads from `path`.
std::vector<std::vector<float>> ReferenceLogits(const std::string& path) {
  StatusOr<ModelWeightsF32> w = LoadGgufModel(path);
  REQUIRE(w.ok());
  test::ReferenceLlama ref(*w);
  std::vector<std::vector<float>> out;
  for (size_t i = 0; i < kPrefill + kDecode; ++i) out.push_back(ref.Forward(kTokens[i], int(i)));
  return out;
}

// The largest relative L2 distance ||a - b|| / ||b|| over positions.
double MaxRelativeError(const std::vector<std::vector<float>>& a,
                        const std::vector<std::vector<float>>& b) {
  REQUIRE(a.size() == b.size());
  double worst = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    REQUIRE(a[i].size() == b[i].size());
    double d = 0.0;
    for (size_t j = 0; j < a[i].size(); ++j) d += double(a[i][j] - b[i][j]) * (a[i][j] - b[i][j]);
    worst = std::max(worst, sqrt(d) / test::L2Norm(b[i]));
  }
  return worst;
}

// The engine and the reference sum dot products of at most 2 * dim terms in
// different orders, in f32: each logit differs by a few ulp of the sums'
// magnitudes, so relative to the logits' norm 1e-4 is ample (measured:
// ~1e-6), while every mistake checked below moves them by more than 1e-2.
constexpr double kF32Tolerance = 1e-4;
constexpr double kWrongVariant = 1e-2;

void ExpectMatchesReference(const Model& model, const std::string& path) {
  const double err = MaxRelativeError(EngineLogits(model), ReferenceLogits(path));
  INFO("relative L2 error vs the reference: " << err);
  CHECK(err < kF32Tolerance);
}

// Llama 3's "llama3" RoPE scaling as llama.cpp's converter bakes it into
// rope_freqs.weight: a divisor of each pair's frequency.
std::vector<float> Llama3Factors(float theta, int head_dim, float factor, float low_freq_factor,
                                 float high_freq_factor, float old_context) {
  const double low_wavelen = old_context / low_freq_factor;
  const double high_wavelen = old_context / high_freq_factor;
  std::vector<float> out;
  for (int i = 0; i < head_dim; i += 2) {
    const double freq = 1.0 / pow(double(theta), double(i) / head_dim);
    const double wavelen = 2 * M_PI / freq;
    if (wavelen < high_wavelen) {
      out.push_back(1.0f);
    } else if (wavelen > low_wavelen) {
      out.push_back(factor);
    } else {
      const double smooth =
          (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
      out.push_back(float(1.0 / ((1.0 - smooth) / factor + smooth)));
    }
  }
  return out;
}

// HF transformers' _compute_llama3_parameters: the scaled inverse
// frequencies themselves.
std::vector<double> HfLlama3InvFreq(float theta, int head_dim, double factor,
                                    double low_freq_factor, double high_freq_factor,
                                    double old_context) {
  std::vector<double> out;
  for (int i = 0; i < head_dim; i += 2) {
    const double inv_freq = 1.0 / pow(double(theta), double(i) / head_dim);
    const double wavelen = 2 * M_PI / inv_freq;
    double scaled = wavelen > old_context / low_freq_factor ? inv_freq / factor : inv_freq;
    const double smooth =
        (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
    const bool medium = !(wavelen < old_context / high_freq_factor) &&
                        !(wavelen > old_context / low_freq_factor);
    if (medium) scaled = (1 - smooth) * scaled / factor + smooth * scaled;
    out.push_back(scaled);
  }
  return out;
}

uint32_t FileVersion(const std::string& path) {
  StatusOr<GgufFile> f = GgufFile::Open(path);
  REQUIRE(f.ok());
  StatusOr<uint32_t> v = f->reader().GetU32("lutra.format_version");
  REQUIRE(v.ok());
  return *v;
}

TEST_CASE("Llama 3.x: freq_base 500000 and rope_freqs.weight factors", "[arch]") {
  const ModelConfig shape = Shape(64, 4, 2, 500000.0f, /*tied=*/false);
  const HfModel hf = RandomModel(shape, /*biases=*/false, 31);
  // Llama 3.2's scaling parameters (factor 32, low 1, high 4) with the
  // original context shrunk from 8192 to 64 positions, so that at this
  // head_dim every kind of pair occurs (wavelengths 2 pi: kept, 32:
  // smoothed, >= 167: divided by 32) and the factors matter within a
  // 10-token prompt.
  FileOptions o;
  o.rope_freqs = Llama3Factors(500000.0f, shape.head_dim, 32.0f, 1.0f, 4.0f, 64.0f);
  REQUIRE(o.rope_freqs.size() == 8);
  CHECK(o.rope_freqs[0] == 1.0f);
  CHECK((o.rope_freqs[1] > 1.0f && o.rope_freqs[1] < 32.0f));
  CHECK(o.rope_freqs[2] == 32.0f);
  const std::string path = WriteGguf(hf, o, "llama3.gguf");
  Model model = Open(path);
  const ModelConfig& c = model.config;
  CHECK(c.rope_theta == 500000.0f);
  CHECK(c.rope_layout == RopeLayout::kAdjacentPairs);
  CHECK(c.rope_freq_factors == o.rope_freqs);
  CHECK(!c.tied_embedding);
  // The factors are HF's llama3 frequencies: theta^(-2i/d) / factor_i.
  const std::vector<double> ours = RopeInverseFrequencies(c);
  const std::vector<double> hf_freq = HfLlama3InvFreq(500000.0f, 16, 32.0, 1.0, 4.0, 64.0);
  REQUIRE(ours.size() == hf_freq.size());
  for (size_t i = 0; i < ours.size(); ++i) CHECK(fabs(ours[i] / hf_freq[i] - 1.0) < 1e-6);

  ExpectMatchesReference(model, path);
  // Ignoring the factors would be caught.
  const std::vector<std::vector<float>> logits = EngineLogits(model);
  model.config.rope_freq_factors.clear();
  CHECK(MaxRelativeError(EngineLogits(model), logits) > kWrongVariant);
  model.config.rope_freq_factors = o.rope_freqs;

  // .lutra round trip (f32): the factors travel, the logits are identical.
  const std::string saved = test::TempPath("llama3.lutra");
  REQUIRE(SaveLutraModel(model, nullptr, saved).ok());
  CHECK(FileVersion(saved) == 2);
  const Model loaded = Open(saved);
  CHECK(loaded.config.rope_freq_factors == o.rope_freqs);
  CHECK(loaded.config.rope_theta == 500000.0f);
  CHECK(EngineLogits(loaded) == logits);
}

TEST_CASE("Qwen2: q/k/v biases, tied embeddings, half-split RoPE", "[arch]") {
  ModelConfig shape = Shape(64, 4, 2, 1000000.0f, /*tied=*/true);
  shape.norm_eps = 1e-6f;
  const HfModel hf = RandomModel(shape, /*biases=*/true, 32);
  FileOptions o;
  o.arch = "qwen2";
  const std::string path = WriteGguf(hf, o, "qwen2.gguf");
  Model model = Open(path);
  const ModelConfig& c = model.config;
  CHECK(c.rope_layout == RopeLayout::kHalfSplit);
  CHECK(c.tied_embedding);
  CHECK(c.rope_theta == 1000000.0f);
  CHECK(c.norm_eps == 1e-6f);
  for (const LayerWeights& l : model.weights.layers) {
    CHECK((l.bq != nullptr && l.bk != nullptr && l.bv != nullptr));
  }
  ExpectMatchesReference(model, path);
  const std::vector<std::vector<float>> logits = EngineLogits(model);

  // The same HF weights as llama.cpp converts them for the llama
  // architecture (q/k rows and biases permuted to adjacent pairs) give the
  // same logits: this pins the half-split layout of qwen2 files
  // independently of the reference, which follows the loaded config.
  FileOptions as_llama;
  const std::string llama_path = WriteGguf(hf, as_llama, "qwen2-as-llama.gguf");
  const Model permuted = Open(llama_path);
  CHECK(permuted.config.rope_layout == RopeLayout::kAdjacentPairs);
  CHECK(MaxRelativeError(EngineLogits(permuted), logits) < kF32Tolerance);
  // Either mistake would be caught: adjacent pairs on qwen2's rows, or no biases.
  model.config.rope_layout = RopeLayout::kAdjacentPairs;
  CHECK(MaxRelativeError(EngineLogits(model), logits) > kWrongVariant);
  model.config.rope_layout = RopeLayout::kHalfSplit;
  std::vector<LayerWeights> with_biases = model.weights.layers;
  for (LayerWeights& l : model.weights.layers) l.bq = l.bk = l.bv = nullptr;
  CHECK(MaxRelativeError(EngineLogits(model), logits) > kWrongVariant);
  model.weights.layers = with_biases;

  // Palettized at 8 bits: the biases are copied (f32), the layout kept, and
  // the logits stay close to the f32 model's (a smoke test; quality has its
  // own tests).
  LoadOptions p8;
  p8.bits = 8;
  p8.calibrate = false;
  StatusOr<Model> pal = PalettizeModel(model, p8);
  REQUIRE(pal.ok());
  CHECK(pal->config.rope_layout == RopeLayout::kHalfSplit);
  CHECK(pal->weights.embedding.palettized());
  for (size_t l = 0; l < pal->weights.layers.size(); ++l) {
    const LayerWeights& a = pal->weights.layers[l];
    const LayerWeights& b = model.weights.layers[l];
    REQUIRE(a.bq != nullptr);
    CHECK(a.bq != b.bq);  // a copy: the palettized model stands alone
    CHECK(std::equal(a.bk, a.bk + c.kv_dim(), b.bk));
  }
  const std::vector<std::vector<float>> pal_logits = EngineLogits(*pal);
  const double pal_err = MaxRelativeError(pal_logits, logits);
  INFO("8-bit relative L2 error: " << pal_err);
  CHECK(pal_err < 0.05);

  // .lutra round trip of the palettized model: biases and layout travel
  // (format version 2), the logits are identical.
  const std::string saved = test::TempPath("qwen2-q8.lutra");
  REQUIRE(SaveLutraModel(*pal, nullptr, saved).ok());
  CHECK(FileVersion(saved) == 2);
  const Model loaded = Open(saved);
  CHECK(loaded.config.rope_layout == RopeLayout::kHalfSplit);
  CHECK(loaded.config.tied_embedding);
  CHECK(loaded.weights.layers[1].bv != nullptr);
  CHECK(EngineLogits(loaded) == pal_logits);
}

TEST_CASE("SmolLM2-like: llama architecture, tied embeddings, GQA 3:1", "[arch]") {
  // SmolLM2-135M: 9 heads over 3 KV heads, rope_theta 100000, tied head.
  const ModelConfig shape = Shape(48, 3, 1, 100000.0f, /*tied=*/true);
  const HfModel hf = RandomModel(shape, /*biases=*/false, 33);
  const std::string path = WriteGguf(hf, FileOptions(), "smollm2.gguf");
  const Model model = Open(path);
  CHECK(model.config.tied_embedding);
  CHECK(model.config.rope_theta == 100000.0f);
  CHECK(model.config.n_kv_heads == 1);
  CHECK(model.config.rope_freq_factors.empty());
  ExpectMatchesReference(model, path);
  // Nothing of format version 2 is needed: older readers still read it.
  const std::string saved = test::TempPath("smollm2.lutra");
  REQUIRE(SaveLutraModel(model, nullptr, saved).ok());
  CHECK(FileVersion(saved) == 1);
  CHECK(EngineLogits(Open(saved)) == EngineLogits(model));
}

TEST_CASE("Linear RoPE scaling divides positions; type none ignores the factor", "[arch]") {
  const ModelConfig shape = Shape(64, 4, 2, 10000.0f, /*tied=*/true);
  const HfModel hf = RandomModel(shape, /*biases=*/false, 34);
  FileOptions o;
  o.scaling_type = "linear";
  o.scaling_factor = 4.0f;
  const std::string path = WriteGguf(hf, o, "linear.gguf");
  const Model model = Open(path);
  CHECK(model.config.rope_linear_factor == 4.0f);
  ExpectMatchesReference(model, path);
  const std::string saved = test::TempPath("linear.lutra");
  REQUIRE(SaveLutraModel(model, nullptr, saved).ok());
  CHECK(Open(saved).config.rope_linear_factor == 4.0f);
  // No type key: llama.cpp's default is linear.
  o.scaling_type.clear();
  CHECK(Open(WriteGguf(hf, o, "linear-default.gguf")).config.rope_linear_factor == 4.0f);
  o.scaling_type = "none";
  const Model plain = Open(WriteGguf(hf, o, "none.gguf"));
  CHECK(plain.config.rope_linear_factor == 1.0f);
  CHECK(MaxRelativeError(EngineLogits(plain), EngineLogits(model)) > kWrongVariant);
}

TEST_CASE(".lutra version-2 items are validated on read", "[arch]") {
  const ModelConfig shape = Shape(48, 3, 1, 100000.0f, /*tied=*/true);
  const HfModel hf = RandomModel(shape, /*biases=*/false, 36);
  StatusOr<ModelWeightsF32> f32 = LoadGgufModel(WriteGguf(hf, FileOptions(), "v2.gguf"));
  REQUIRE(f32.ok());
  const LutraWeights w = LutraWeightsFromF32(*f32);
  // A writer with the model's items plus one bad extra.
  const auto read = [&](const std::function<void(GgufWriter&)>& extra) {
    GgufWriter g(3);
    REQUIRE(AddLutraFile(w, nullptr, &g).ok());
    extra(g);
    StatusOr<std::vector<uint8_t>> bytes = g.Finish();
    REQUIRE(bytes.ok());
    StatusOr<GgufFile> file = GgufFile::FromMapped(MappedFile::FromBuffer(*bytes, "x.lutra"));
    REQUIRE(file.ok());
    return ReadLutraFile(std::move(*file)).status();
  };
  CHECK(read([](GgufWriter&) {}).ok());
  Status s = read([](GgufWriter& g) { g.AddString("lutra.rope_layout", "interleaved"); });
  CHECK(s.code() == StatusCode::kDataLoss);
  CHECK(test::Contains(s.message(), "lutra.rope_layout = 'interleaved', expected 'half_split'"));
  s = read([](GgufWriter& g) { g.AddF32Array("lutra.rope_freq_factors", {1.0f, 2.0f}); });
  CHECK(test::Contains(s.message(), "2 rope_freq_factors, need rope_dim / 2 = 8"));
  s = read([](GgufWriter& g) { g.AddF32("lutra.rope_linear_factor", -1.0f); });
  CHECK(test::Contains(s.message(), "rope_linear_factor -1 must be finite and > 0"));
  const std::vector<float> bias(15, 0.5f);
  s = read([&](GgufWriter& g) { g.AddTensorF32("blk.1.attn_k.bias", {15}, bias.data()); });
  CHECK(s.code() == StatusCode::kDataLoss);
  CHECK(test::Contains(s.message(), "tensor blk.1.attn_k.bias is f32 [15], expected aligned f32 [16]"));
}

TEST_CASE("Unsupported architectures and RoPE variants are refused by name", "[arch]") {
  const ModelConfig shape = Shape(64, 4, 2, 10000.0f, /*tied=*/true);
  const HfModel hf = RandomModel(shape, /*biases=*/true, 35);
  const auto error = [&](const FileOptions& o, const std::string& name) {
    StatusOr<Model> m = OpenModel(WriteGguf(hf, o, name), LoadOptions());
    REQUIRE(!m.ok());
    return m.status();
  };
  FileOptions o;
  o.arch = "phi3";
  Status s = error(o, "phi3.gguf");
  CHECK(s.code() == StatusCode::kUnimplemented);
  CHECK(test::Contains(s.message(), "architecture 'phi3' is not supported"));

  o = FileOptions();
  o.arch = "qwen2";
  o.scaling_type = "yarn";
  o.scaling_factor = 4.0f;
  s = error(o, "yarn.gguf");
  CHECK(s.code() == StatusCode::kUnimplemented);
  CHECK(test::Contains(s.message(), "qwen2.rope.scaling.type = 'yarn' is not supported"));

  o = FileOptions();
  o.arch = "qwen2";
  o.extra_tensor = "blk.0.attn_output.bias";
  s = error(o, "extra.gguf");
  CHECK(s.code() == StatusCode::kUnimplemented);
  CHECK(test::Contains(s.message(), "tensor 'blk.0.attn_output.bias' is not used"));

  o = FileOptions();
  o.rope_freqs = {1.0f, 2.0f, 3.0f};
  s = error(o, "short-freqs.gguf");
  CHECK(s.code() == StatusCode::kDataLoss);
  CHECK(test::Contains(s.message(), "rope_freqs.weight has shape [3], expected [rope_dim / 2 = 8]"));

  o = FileOptions();
  o.rope_freqs.assign(8, 0.0f);
  s = error(o, "zero-freqs.gguf");
  CHECK(test::Contains(s.message(), "rope_freq_factors[0] = 0 must be finite and > 0"));

  o = FileOptions();
  o.short_bias = true;
  s = error(o, "short-bias.gguf");
  CHECK(s.code() == StatusCode::kDataLoss);
  CHECK(test::Contains(s.message(), "'blk.0.attn_k.bias' has shape [31], expected [32]"));

  o = FileOptions();
  o.rope_dim = 8;  // half of head_dim: partial RoPE
  s = error(o, "partial.gguf");
  CHECK(s.code() == StatusCode::kUnimplemented);
  CHECK(test::Contains(s.message(), "partial RoPE (rope_dim 8 != head_dim 16)"));
}

}  // namespace
}  // namespace engine
}  // namespace lutra
