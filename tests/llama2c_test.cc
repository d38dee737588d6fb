// Model loaders (llama_model.h): llama2.c checkpoints and GGUF llama files.
//
// - stories260K.bin and stories260K.gguf give the same config and the same
//   weights (bit-identical: the GGUF's Q/K rows are NOT permuted relative to
//   the .bin, see docs/model-files.md), and a scalar llama2.c forward pass
//   (adjacent-pair RoPE) gives the same logits from both and reproduces the
//   README's known-good greedy story.
// - GGUF re-encodings of the same weights (f16, bf16, q8_0, q4_0) load and
//   stay close to the f32 logits.
// - Every tensor of a synthetic checkpoint lands where llama2.c puts it
//   (shared and unshared classifier), and corrupt/mismatched files of both
//   formats are rejected with messages naming the problem.
#include "lutra/format/llama_model.h"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "lutra/format/gguf_writer.h"
#include "lutra/format/tokenizer.h"
#include "tests/support/reference_llama.h"
#include "tests/test_util.h"

namespace lutra {
namespace {

using test::Contains;

// The scalar reference forward pass (llama2.c's run.c, adjacent-pair RoPE).
using test::Argmax;
using test::ReferenceLlama;

// ---------------------------------------------------------------------------
// Helpers

size_t TensorFloats(const ModelConfig& c, const char* which) {
  const size_t dim = c.dim, hid = c.hidden_dim, q = c.q_dim(), kv = c.kv_dim();
  const std::string w = which;
  if (w == "wq") return q * dim;
  if (w == "wk" || w == "wv") return kv * dim;
  if (w == "wo") return dim * q;
  if (w == "w1" || w == "w2" || w == "w3") return hid * dim;
  return dim;  // norms
}

// Largest |a - b| over every weight of two models with the same config.
double MaxWeightDiff(const ModelWeightsF32& a, const ModelWeightsF32& b) {
  const ModelConfig& c = a.config;
  double worst = 0.0;
  const auto cmp = [&](const float* x, const float* y, size_t n) {
    for (size_t i = 0; i < n; ++i) worst = std::max(worst, std::fabs(double(x[i]) - y[i]));
  };
  const size_t vd = size_t(c.vocab_size) * c.dim;
  cmp(a.token_embedding, b.token_embedding, vd);
  cmp(a.classifier, b.classifier, vd);
  cmp(a.final_norm, b.final_norm, c.dim);
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeightsF32 &x = a.layers[l], &y = b.layers[l];
    cmp(x.attn_norm, y.attn_norm, c.dim);
    cmp(x.ffn_norm, y.ffn_norm, c.dim);
    cmp(x.wq, y.wq, TensorFloats(c, "wq"));
    cmp(x.wk, y.wk, TensorFloats(c, "wk"));
    cmp(x.wv, y.wv, TensorFloats(c, "wv"));
    cmp(x.wo, y.wo, TensorFloats(c, "wo"));
    cmp(x.w1, y.w1, TensorFloats(c, "w1"));
    cmp(x.w2, y.w2, TensorFloats(c, "w2"));
    cmp(x.w3, y.w3, TensorFloats(c, "w3"));
  }
  return worst;
}

// Options for writing a GGUF llama model from f32 weights.
struct GgufModelOptions {
  GgmlType type = GgmlType::kF32;   // for matrices whose rows are whole blocks
  bool write_output = true;         // false: tied classifier
  std::string skip_tensor;          // omit this tensor
  std::string arch = "llama";
  bool rope_scaling = false;
  int block_count_delta = 0;
  uint64_t bad_k_rows = 0;          // nonzero: wrong shape for blk.0.attn_k
  bool permute_qk = false;          // apply llama.cpp's HF->GGUF Q/K row permutation
};

// llama.cpp's convert `permute(w, n_head)`: within each head, rows
// [half 0 | half 1] become interleaved pairs: new row h*hd + 2i + j takes
// old row h*hd + j*hd/2 + i.
std::vector<float> PermuteRows(const float* w, int n_head, int rows, int cols) {
  const int hd = rows / n_head;
  std::vector<float> out(size_t(rows) * cols);
  for (int h = 0; h < n_head; ++h) {
    for (int i = 0; i < hd / 2; ++i) {
      for (int j = 0; j < 2; ++j) {
        const float* src = w + size_t(h * hd + j * (hd / 2) + i) * cols;
        std::copy(src, src + cols, out.begin() + size_t(h * hd + 2 * i + j) * cols);
      }
    }
  }
  return out;
}

std::vector<uint8_t> WriteGgufModel(const ModelWeightsF32& w, const GgufModelOptions& o) {
  const ModelConfig& c = w.config;
  GgufWriter g;
  g.AddString("general.architecture", o.arch);
  g.AddU32("llama.context_length", static_cast<uint32_t>(c.seq_len));
  g.AddU32("llama.embedding_length", static_cast<uint32_t>(c.dim));
  g.AddU32("llama.feed_forward_length", static_cast<uint32_t>(c.hidden_dim));
  g.AddU32("llama.block_count", static_cast<uint32_t>(c.n_layers + o.block_count_delta));
  g.AddU32("llama.attention.head_count", static_cast<uint32_t>(c.n_heads));
  g.AddU32("llama.attention.head_count_kv", static_cast<uint32_t>(c.n_kv_heads));
  g.AddF32("llama.attention.layer_norm_rms_epsilon", c.norm_eps);
  g.AddF32("llama.rope.freq_base", c.rope_theta);
  if (o.rope_scaling) g.AddString("llama.rope.scaling.type", "yarn");
  const auto add = [&](const std::string& name, uint64_t in, uint64_t out, const float* data) {
    if (name == o.skip_tensor) return;
    std::vector<uint64_t> ne = {in};
    if (out) ne.push_back(out);
    const GgmlTypeInfo* info = GetGgmlTypeInfo(static_cast<uint32_t>(o.type));
    // Vectors stay f32 and rows that are not whole blocks fall back to f16,
    // as llama.cpp's quantizer does.
    GgmlType t = o.type;
    if (!out) t = GgmlType::kF32;
    else if (in % info->block_size != 0) t = GgmlType::kF16;
    g.AddTensorF32(name, ne, data, t);
  };
  const uint64_t dim = c.dim, hid = c.hidden_dim, q = c.q_dim(), kv = c.kv_dim();
  add("token_embd.weight", dim, c.vocab_size, w.token_embedding);
  add("output_norm.weight", dim, 0, w.final_norm);
  if (o.write_output) add("output.weight", dim, c.vocab_size, w.classifier);
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    const LayerWeightsF32& L = w.layers[l];
    add(p + "attn_norm.weight", dim, 0, L.attn_norm);
    std::vector<float> pq, pk;
    if (o.permute_qk) {
      pq = PermuteRows(L.wq, c.n_heads, c.q_dim(), c.dim);
      pk = PermuteRows(L.wk, c.n_kv_heads, c.kv_dim(), c.dim);
    }
    add(p + "attn_q.weight", dim, q, o.permute_qk ? pq.data() : L.wq);
    add(p + "attn_k.weight", dim, l == 0 && o.bad_k_rows ? o.bad_k_rows : kv,
        o.permute_qk ? pk.data() : L.wk);
    add(p + "attn_v.weight", dim, kv, L.wv);
    add(p + "attn_output.weight", q, dim, L.wo);
    add(p + "ffn_norm.weight", dim, 0, L.ffn_norm);
    add(p + "ffn_gate.weight", dim, hid, L.w1);
    add(p + "ffn_down.weight", hid, dim, L.w2);
    add(p + "ffn_up.weight", dim, hid, L.w3);
  }
  StatusOr<std::vector<uint8_t>> bytes = g.Finish();
  INFO(bytes.status().message());
  REQUIRE(bytes.ok());
  return std::move(*bytes);
}

StatusOr<ModelWeightsF32> LoadGgufBytes(std::vector<uint8_t> bytes) {
  StatusOr<GgufFile> f = GgufFile::FromMapped(MappedFile::FromBuffer(std::move(bytes), "mem.gguf"));
  if (!f.ok()) return f.status();
  return LoadGgufModel(std::move(*f));
}

// A synthetic llama2.c checkpoint whose every float is its own index in the
// weights area (so a misplaced pointer is visible), optionally unshared.
std::vector<uint8_t> SyntheticLlama2c(const int32_t (&h)[7], size_t floats) {
  std::vector<uint8_t> b(28 + 4 * floats);
  std::memcpy(b.data(), h, 28);
  for (size_t i = 0; i < floats; ++i) {
    const float f = static_cast<float>(i);
    std::memcpy(b.data() + 28 + 4 * i, &f, 4);
  }
  return b;
}

// ---------------------------------------------------------------------------
// Tests on the shared model files

struct Shared {
  ModelWeightsF32 bin, gguf;
  Tokenizer tok;
};

bool LoadShared(Shared* s) {
  const std::string dir = test::SharedModelsDir();
  if (dir.empty()) return false;
  StatusOr<ModelWeightsF32> bin = LoadLlama2cModel(dir + "/stories260K.bin");
  INFO(bin.status().message());
  REQUIRE(bin.ok());
  StatusOr<ModelWeightsF32> gguf = LoadGgufModel(dir + "/stories260K.gguf");
  INFO(gguf.status().message());
  REQUIRE(gguf.ok());
  StatusOr<Tokenizer> tok = Tokenizer::FromLlama2cFile(dir + "/tok512.bin", 512);
  REQUIRE(tok.ok());
  s->bin = std::move(*bin);
  s->gguf = std::move(*gguf);
  s->tok = std::move(*tok);
  return true;
}

TEST_CASE("Model: stories260K .bin and .gguf give the same config and weights") {
  Shared s;
  if (!LoadShared(&s)) SKIP("shared models not found (../shared/models)");
  const ModelConfig &a = s.bin.config, &b = s.gguf.config;
  CHECK(a.dim == 64);
  CHECK(a.hidden_dim == 172);
  CHECK(a.n_layers == 5);
  CHECK(a.n_heads == 8);
  CHECK(a.n_kv_heads == 4);
  CHECK(a.head_dim == 8);
  CHECK(a.rope_dim == 8);
  CHECK(a.vocab_size == 512);
  CHECK(a.seq_len == 512);
  CHECK(a.tied_embedding);
  CHECK(a.rope_layout == RopeLayout::kAdjacentPairs);
  CHECK(a.rope_theta == 10000.0f);
  CHECK(a.norm_eps == 1e-5f);
  CHECK(s.bin.classifier == s.bin.token_embedding);
  CHECK(s.bin.converted.empty());  // f32 used in place
  CHECK(s.bin.file.is_mapped());
  // GGUF: same shape, context_length 2048, separate (equal-valued) output.weight.
  CHECK(b.dim == a.dim);
  CHECK(b.hidden_dim == a.hidden_dim);
  CHECK(b.n_layers == a.n_layers);
  CHECK(b.n_heads == a.n_heads);
  CHECK(b.n_kv_heads == a.n_kv_heads);
  CHECK(b.head_dim == a.head_dim);
  CHECK(b.vocab_size == a.vocab_size);
  CHECK(b.seq_len == 2048);
  CHECK(!b.tied_embedding);
  CHECK(b.rope_theta == a.rope_theta);
  CHECK(b.norm_eps == a.norm_eps);
  CHECK(b.rope_layout == a.rope_layout);
  CHECK(s.gguf.converted.empty());
  // The finding: no Q/K permutation between the two files (max diff 0).
  CHECK(MaxWeightDiff(s.bin, s.gguf) == 0.0);
}

TEST_CASE("Model: same logits from .bin and .gguf, and the README's greedy story") {
  Shared s;
  if (!LoadShared(&s)) SKIP("shared models not found (../shared/models)");
  ReferenceLlama ref_bin(s.bin), ref_gguf(s.gguf);
  std::vector<int> prompt = *s.tok.Encode("Zoo");
  REQUIRE(prompt == std::vector<int>{1, 410, 469, 347});
  std::vector<int> tokens = {prompt[0]};
  int token = prompt[0];
  double worst = 0.0;
  for (int pos = 0; pos < 60; ++pos) {
    const std::vector<float> la = ref_bin.Forward(token, pos);
    const std::vector<float> lb = ref_gguf.Forward(token, pos);
    for (size_t i = 0; i < la.size(); ++i) {
      worst = std::max(worst, std::fabs(double(la[i]) - lb[i]) / (1.0 + std::fabs(la[i])));
    }
    const int next = pos + 1 < static_cast<int>(prompt.size()) ? prompt[pos + 1] : Argmax(la);
    if (next == 1) break;
    tokens.push_back(next);
    token = next;
  }
  CHECK(worst <= 1e-6);
  StatusOr<std::string> text = s.tok.DecodeAll(tokens);
  REQUIRE(text.ok());
  CHECK(*text ==
        "Zoo was a little girl named Lily. She loved to play outside in the park. One day, she "
        "saw a big, red ball. She wanted to play with it, but she didn't want to play with");
}

TEST_CASE("Model: GGUF f16/bf16/q8_0/q4_0 re-encodings load close to f32") {
  Shared s;
  if (!LoadShared(&s)) SKIP("shared models not found (../shared/models)");
  ReferenceLlama ref(s.bin);
  const std::vector<float> want = ref.Forward(410, 0);
  struct Case { GgmlType type; double max_weight_diff; double min_snr_db; };
  // Weight bounds: |w| < ~1.5 here; f16 rounds at 2^-11 relative, bf16 2^-8;
  // q8_0 steps are amax/127, q4_0 steps amax/8 per block of 32.
  // Measured: f16 73.5 dB, bf16 56.2 dB, q8_0 48.1 dB, q4_0 17.3 dB (max
  // weight diff 4.8e-4, 3.9e-3, 7.2e-3, 0.13); bounds leave ~10 dB margin.
  const Case cases[] = {{GgmlType::kF32, 0.0, 200.0},
                        {GgmlType::kF16, 1e-3, 60.0},
                        {GgmlType::kBF16, 1e-2, 45.0},
                        {GgmlType::kQ8_0, 2e-2, 38.0},
                        {GgmlType::kQ4_0, 0.5, 10.0}};
  for (const Case& cs : cases) {
    INFO("type " << GgmlTypeName(static_cast<uint32_t>(cs.type)));
    GgufModelOptions o;
    o.type = cs.type;
    StatusOr<ModelWeightsF32> w = LoadGgufBytes(WriteGgufModel(s.bin, o));
    INFO(w.status().message());
    REQUIRE(w.ok());
    CHECK(w->converted.empty() == (cs.type == GgmlType::kF32));
    const double diff = MaxWeightDiff(s.bin, *w);
    CHECK(diff <= cs.max_weight_diff);
    ReferenceLlama r(*w);
    const std::vector<float> got = r.Forward(410, 0);
    const double snr = test::SnrDb(got.data(), want.data(), got.size());
    INFO("max weight diff " << diff << ", logits SNR " << snr << " dB");
    CHECK(snr >= cs.min_snr_db);
  }
  // The logits check is sensitive to the Q/K row order: a GGUF whose Q/K rows
  // were permuted the way llama.cpp's HF converter does (i.e. a file that
  // would need un-permuting) gives clearly different logits from position 1
  // on (at position 0 RoPE is the identity and attention has one key).
  {
    GgufModelOptions o;
    o.permute_qk = true;
    StatusOr<ModelWeightsF32> w = LoadGgufBytes(WriteGgufModel(s.bin, o));
    REQUIRE(w.ok());
    ReferenceLlama r(*w), r0(s.bin);
    r.Forward(410, 0);
    r0.Forward(410, 0);
    const std::vector<float> got = r.Forward(469, 1), exact = r0.Forward(469, 1);
    const double snr = test::SnrDb(got.data(), exact.data(), got.size());
    INFO("permuted Q/K: logits SNR " << snr << " dB");
    CHECK(snr < 30.0);
  }
  // Tied: no output.weight -> classifier is the token embedding.
  GgufModelOptions tied;
  tied.write_output = false;
  StatusOr<ModelWeightsF32> t = LoadGgufBytes(WriteGgufModel(s.bin, tied));
  REQUIRE(t.ok());
  CHECK(t->config.tied_embedding);
  CHECK(t->classifier == t->token_embedding);
}

TEST_CASE("Model: LoadModel / LoadModelAndTokenizer pick the format by magic") {
  const std::string dir = test::SharedModelsDir();
  if (dir.empty()) SKIP("shared models not found (../shared/models)");
  for (const char* name : {"stories260K.bin", "stories260K.gguf"}) {
    INFO(name);
    StatusOr<ModelWeightsF32> w = LoadModel(dir + "/" + name);
    REQUIRE(w.ok());
    CHECK(w->config.dim == 64);
    const bool gguf = Contains(name, ".gguf");
    StatusOr<ModelAndTokenizer> mt =
        LoadModelAndTokenizer(dir + "/" + name, gguf ? "" : dir + "/tok512.bin");
    INFO(mt.status().message());
    REQUIRE(mt.ok());
    CHECK(*mt->tokenizer.Encode("Zoo") == std::vector<int>{1, 410, 469, 347});
    CHECK(mt->weights.config.vocab_size == 512);
  }
  // A GGUF with an explicit tokenizer.bin uses that file.
  CHECK(LoadModelAndTokenizer(dir + "/stories260K.gguf", dir + "/tok512.bin").ok());
  StatusOr<ModelAndTokenizer> no_tok = LoadModelAndTokenizer(dir + "/stories260K.bin", "");
  CHECK(Contains(no_tok.status().message(), "a llama2.c checkpoint needs a tokenizer file"));
  // Model and tokenizer swapped: the tokenizer path is not a tokenizer of 512 tokens.
  StatusOr<ModelAndTokenizer> swapped =
      LoadModelAndTokenizer(dir + "/stories260K.bin", dir + "/stories260K.bin");
  REQUIRE(!swapped.ok());
  CHECK(Contains(swapped.status().message(), "tokenizer: "));
  StatusOr<ModelWeightsF32> tok_as_model = LoadModel(dir + "/tok512.bin");
  REQUIRE(!tok_as_model.ok());
  CHECK(Contains(tok_as_model.status().message(), "tok512.bin: llama2c: "));
  CHECK(LoadModel(dir + "/missing.bin").status().code() == StatusCode::kNotFound);
}

TEST_CASE("Model: random header corruption of the real files never crashes") {
  const std::string dir = test::SharedModelsDir();
  if (dir.empty()) SKIP("shared models not found (../shared/models)");
  StatusOr<MappedFile> gguf = MappedFile::Open(dir + "/stories260K.gguf");
  StatusOr<MappedFile> bin = MappedFile::Open(dir + "/stories260K.bin");
  StatusOr<MappedFile> tok = MappedFile::Open(dir + "/tok512.bin");
  REQUIRE(gguf.ok());
  REQUIRE(bin.ok());
  REQUIRE(tok.ok());
  const std::vector<uint8_t> g0(gguf->data(), gguf->data() + gguf->size());
  const std::vector<uint8_t> b0(bin->data(), bin->data() + bin->size());
  const std::vector<uint8_t> t0(tok->data(), tok->data() + tok->size());
  test::Rng rng(2024);
  int loaded = 0, rejected = 0;
  for (int iter = 0; iter < 60; ++iter) {  // ~2 s under ASan
    // GGUF: flip bytes in the header/metadata/tensor-info region (14152 bytes).
    std::vector<uint8_t> g = g0;
    for (int f = 0; f < 3; ++f) g[rng.Below(14152)] ^= static_cast<uint8_t>(1 + rng.Below(255));
    StatusOr<GgufFile> file = GgufFile::FromMapped(MappedFile::FromBuffer(std::move(g)));
    if (file.ok()) {
      StatusOr<Tokenizer> t = Tokenizer::FromGguf(file->reader());
      if (t.ok()) (void)t->Encode("Zoo was here");
      StatusOr<ModelWeightsF32> w = LoadGgufModel(std::move(*file));
      w.ok() ? ++loaded : ++rejected;
    } else {
      ++rejected;
    }
    // llama2.c: flip header bytes (sizes must then mismatch or be rejected).
    std::vector<uint8_t> b = b0;
    b[rng.Below(28)] ^= static_cast<uint8_t>(1 + rng.Below(255));
    StatusOr<ModelWeightsF32> w = LoadLlama2cModel(MappedFile::FromBuffer(std::move(b)));
    CHECK(!w.ok());
    // tokenizer.bin: flip anywhere.
    std::vector<uint8_t> tb = t0;
    tb[rng.Below(tb.size())] ^= static_cast<uint8_t>(1 + rng.Below(255));
    StatusOr<Tokenizer> t = Tokenizer::FromLlama2cBytes(tb.data(), tb.size(), 512);
    if (t.ok()) {
      const std::vector<int> ids = *t->Encode("Zoo was here");
      CHECK(t->DecodeAll(ids).ok());
    }
  }
  INFO("gguf loaded " << loaded << ", rejected " << rejected);
  CHECK(rejected > 0);
}

// ---------------------------------------------------------------------------
// Synthetic llama2.c checkpoints

TEST_CASE("llama2c: every tensor is where llama2.c reads it (shared and unshared)") {
  for (bool shared : {true, false}) {
    INFO((shared ? "shared classifier" : "unshared classifier"));
    const int dim = 8, hid = 12, L = 2, H = 2, KV = 1, V = 10, S = 4, hs = dim / H;
    const int32_t h[7] = {dim, hid, L, H, KV, shared ? V : -V, S};
    const size_t kv = KV * hs;
    // llama2.c's memory_map_weights order and sizes.
    const size_t sizes[] = {size_t(V) * dim, size_t(L) * dim, L * dim * size_t(dim),
                            L * kv * dim,    L * kv * dim,    L * dim * size_t(dim),
                            size_t(L) * dim, L * size_t(hid) * dim, L * size_t(hid) * dim,
                            L * size_t(hid) * dim, size_t(dim), size_t(S) * hs / 2,
                            size_t(S) * hs / 2, shared ? 0 : size_t(V) * dim};
    size_t start[14], total = 0;
    for (int i = 0; i < 14; ++i) {
      start[i] = total;
      total += sizes[i];
    }
    StatusOr<ModelWeightsF32> w =
        LoadLlama2cModel(MappedFile::FromBuffer(SyntheticLlama2c(h, total)));
    INFO(w.status().message());
    REQUIRE(w.ok());
    const ModelConfig& c = w->config;
    CHECK(c.tied_embedding == shared);
    CHECK(c.vocab_size == V);
    CHECK(c.head_dim == hs);
    CHECK(c.kv_dim() == int(kv));
    const auto idx = [](const float* p) { return static_cast<size_t>(*p); };
    CHECK(idx(w->token_embedding) == start[0]);
    CHECK(idx(w->token_embedding + 3 * dim) == start[0] + 3 * dim);  // row 3 = token 3
    for (int l = 0; l < L; ++l) {
      const LayerWeightsF32& y = w->layers[l];
      CHECK(idx(y.attn_norm) == start[1] + l * dim);
      CHECK(idx(y.wq) == start[2] + l * dim * dim);
      CHECK(idx(y.wk) == start[3] + l * kv * dim);
      CHECK(idx(y.wv) == start[4] + l * kv * dim);
      CHECK(idx(y.wo) == start[5] + l * dim * dim);
      CHECK(idx(y.ffn_norm) == start[6] + l * dim);
      CHECK(idx(y.w1) == start[7] + l * hid * dim);
      CHECK(idx(y.w2) == start[8] + l * dim * hid);
      CHECK(idx(y.w3) == start[9] + l * hid * dim);
    }
    CHECK(idx(w->final_norm) == start[10]);
    if (shared) {
      CHECK(w->classifier == w->token_embedding);
    } else {
      CHECK(idx(w->classifier) == start[13]);
    }
  }
}

TEST_CASE("llama2c: corrupt and mismatched checkpoints are rejected") {
  const int32_t good_h[7] = {8, 12, 2, 2, 1, 10, 4};
  // 10*8 + 2*8 + 2*64 + 2*32 + 2*32 + 2*64 + 2*8 + 3*2*96 + 8 + 2*4*2
  const size_t floats = 80 + 16 + 128 + 64 + 64 + 128 + 16 + 576 + 8 + 16;
  const std::vector<uint8_t> good = SyntheticLlama2c(good_h, floats);
  REQUIRE(LoadLlama2cModel(MappedFile::FromBuffer(good)).ok());
  // Every truncation, and one byte too many.
  for (size_t n = 0; n <= good.size() + 1; ++n) {
    if (n == good.size()) continue;
    std::vector<uint8_t> b(n, 0);
    if (n != 0) std::memcpy(b.data(), good.data(), std::min(n, good.size()));
    StatusOr<ModelWeightsF32> w = LoadLlama2cModel(MappedFile::FromBuffer(b, "cut.bin"));
    INFO("size " << n << ": " << w.status().message());
    REQUIRE(!w.ok());
    CHECK(w.status().code() == StatusCode::kDataLoss);
    CHECK(w.status().message().rfind("cut.bin: llama2c: ", 0) == 0);
  }
  const auto load = [&](const int32_t (&h)[7]) {
    std::vector<uint8_t> b = good;
    std::memcpy(b.data(), h, 28);
    return LoadLlama2cModel(MappedFile::FromBuffer(b, "x.bin")).status();
  };
  CHECK(load({8, 12, 2, 2, 1, -10, 4}).message() ==
        "x.bin: llama2c: file size 4412 does not match the 4732 bytes implied by the header (dim "
        "8, hidden_dim 12, n_layers 2, n_heads 2, n_kv_heads 1, vocab_size 10 unshared, seq_len 4)");
  CHECK(Contains(load({0, 12, 2, 2, 1, 10, 4}).message(), "llama2c: header dim = 0 is invalid"));
  CHECK(Contains(load({8, -12, 2, 2, 1, 10, 4}).message(),
                 "llama2c: header hidden_dim = -12 is invalid"));
  CHECK(Contains(load({8, 12, 2, 2, 1, 0, 4}).message(), "header vocab_size = 0 is invalid"));
  CHECK(Contains(load({8, 12, 2, 2, 1, INT32_MIN, 4}).message(),
                 "header vocab_size = -2147483648 is invalid"));
  CHECK(Contains(load({8, 12, 2, 3, 1, 10, 4}).message(),
                 "llama2c: dim 8 is not a multiple of n_heads 3"));
  CHECK(Contains(load({8, 12, 2, 2, 4, 10, 4}).message(), "n_kv_heads 4 > n_heads 2"));
  CHECK(Contains(load({8, 12, 2, 8, 8, 10, 4}).message(), "odd head_dim 1"));
  CHECK(Contains(load({8, 12, 2, 4, 3, 10, 4}).message(),
                 "n_heads 4 is not a multiple of n_kv_heads 3"));
  // Huge dimensions: sizes overflow or exceed the file, never a crash.
  const Status huge = load({1 << 30, INT32_MAX, INT32_MAX, 2, 2, INT32_MAX, INT32_MAX});
  CHECK(huge.code() == StatusCode::kDataLoss);
  CHECK(Contains(huge.message(), "dim = 1073741824 exceeds the limit 2^24"));
  CHECK(Contains(load({1 << 16, 1 << 16, 1 << 10, 1 << 8, 1 << 8, 1 << 16, 1 << 16}).message(),
                 "does not match the"));
  // Versioned exports (magic "ak42").
  std::vector<uint8_t> v1 = good;
  std::memcpy(v1.data(), "24ka", 4);  // 0x616b3432 little-endian
  const Status ak = LoadLlama2cModel(MappedFile::FromBuffer(v1)).status();
  CHECK(ak.code() == StatusCode::kUnimplemented);
  CHECK(Contains(ak.message(), "versioned export (magic 'ak42')"));
}

TEST_CASE("GGUF llama: missing, misshapen and unsupported contents are named") {
  // A small model from the synthetic checkpoint (dim 64 so q8_0 applies).
  const int32_t h[7] = {64, 96, 2, 4, 2, 40, 8};
  const size_t floats = 40 * 64 + 2 * 64 + 2 * 64 * 64 + 2 * 32 * 64 * 2 + 2 * 64 * 64 +
                        2 * 64 + 3 * 2 * 96 * 64 + 64 + 2 * 8 * 8;
  StatusOr<ModelWeightsF32> base = LoadLlama2cModel(MappedFile::FromBuffer(SyntheticLlama2c(h, floats)));
  INFO(base.status().message());
  REQUIRE(base.ok());
  {
    StatusOr<ModelWeightsF32> w = LoadGgufBytes(WriteGgufModel(*base, GgufModelOptions()));
    REQUIRE(w.ok());
    CHECK(MaxWeightDiff(*base, *w) == 0.0);
  }
  const auto error = [&](const GgufModelOptions& o) {
    StatusOr<ModelWeightsF32> w = LoadGgufBytes(WriteGgufModel(*base, o));
    REQUIRE(!w.ok());
    return w.status();
  };
  GgufModelOptions o;
  o.skip_tensor = "blk.1.ffn_up.weight";
  Status s = error(o);
  CHECK(s.code() == StatusCode::kNotFound);
  CHECK(s.message() == "mem.gguf: gguf: no tensor 'blk.1.ffn_up.weight'");
  o = GgufModelOptions();
  o.skip_tensor = "token_embd.weight";
  CHECK(error(o).message() == "mem.gguf: gguf: no tensor 'token_embd.weight'");
  o = GgufModelOptions();
  o.bad_k_rows = 64;
  CHECK(error(o).message() ==
        "mem.gguf: gguf: tensor 'blk.0.attn_k.weight' has shape [64, 64], expected [64, 32]");
  o = GgufModelOptions();
  o.arch = "gpt2";
  s = error(o);
  CHECK(s.code() == StatusCode::kUnimplemented);
  CHECK(s.message() == "mem.gguf: gguf: architecture 'gpt2' is not supported (only 'llama' and 'qwen2')");
  o = GgufModelOptions();
  o.rope_scaling = true;
  CHECK(Contains(error(o).message(), "llama.rope.scaling.type = 'yarn' is not supported"));
  o = GgufModelOptions();
  o.block_count_delta = 1;  // claims 3 blocks, has 2: refused before sizing by it
  CHECK(error(o).message() ==
        "mem.gguf: gguf: llama.block_count = 3 needs at least 29 tensors, the file has 21");

  // Hyper-parameter keys: missing, wrong type, inconsistent.
  const auto with_kv = [&](const std::string& key, int32_t value, bool as_string) {
    GgufWriter g;
    g.AddString("general.architecture", "llama");
    const char* keys[] = {"llama.context_length", "llama.embedding_length",
                          "llama.feed_forward_length", "llama.block_count",
                          "llama.attention.head_count"};
    const uint32_t vals[] = {8, 64, 96, 2, 4};
    for (int i = 0; i < 5; ++i) {
      if (key == keys[i]) {
        if (value < 0) continue;  // omit
        if (as_string) g.AddString(key, "x"); else g.AddU32(key, static_cast<uint32_t>(value));
      } else {
        g.AddU32(keys[i], vals[i]);
      }
    }
    std::vector<float> emb(64 * 40, 0.0f);
    g.AddTensorF32("token_embd.weight", {64, 40}, emb.data());
    std::vector<uint8_t> bytes = *g.Finish();
    StatusOr<GgufReader> r = GgufReader::Parse(bytes.data(), bytes.size());
    REQUIRE(r.ok());
    return ReadGgufLlamaConfig(*r).status();
  };
  CHECK(with_kv("llama.block_count", -1, false).message() ==
        "gguf: missing key 'llama.block_count'");
  CHECK(with_kv("llama.block_count", 0, true).message() ==
        "gguf: key 'llama.block_count' has type string, expected an integer");
  CHECK(with_kv("llama.attention.head_count", 0, false).message() ==
        "gguf: llama.embedding_length 64 is not a multiple of head_count 0");
  CHECK(with_kv("llama.attention.head_count", 3, false).message() ==
        "gguf: llama.embedding_length 64 is not a multiple of head_count 3");
  CHECK(with_kv("llama.embedding_length", 32, false).message() ==
        "gguf: token_embd.weight has shape [64, 40], expected [32, vocab_size]");
  CHECK(with_kv("llama.block_count", 0, false).message() ==
        "gguf: model config: n_layers = 0, must be > 0");
  CHECK(with_kv("llama.context_length", 2, false).ok());

  // LoadModelAndTokenizer: the embedded vocabulary must match vocab_size.
  {
    const std::string path = test::TempPath("vocab.gguf");
    for (int n_tokens : {40, 39}) {
      GgufWriter g;
      g.AddString("general.architecture", "llama");
      g.AddU32("llama.context_length", 8);
      g.AddU32("llama.embedding_length", 64);
      g.AddU32("llama.feed_forward_length", 96);
      g.AddU32("llama.block_count", 2);
      g.AddU32("llama.attention.head_count", 4);
      g.AddU32("llama.attention.head_count_kv", 2);
      g.AddString("tokenizer.ggml.model", "llama");
      std::vector<std::string> tokens = {"<unk>", "<s>", "</s>", "\xE2\x96\x81"};
      while (static_cast<int>(tokens.size()) < n_tokens) {
        tokens.push_back(std::string(1, static_cast<char>('a' + tokens.size() % 26)) +
                         std::to_string(tokens.size()));
      }
      g.AddStringArray("tokenizer.ggml.tokens", tokens);
      g.AddF32Array("tokenizer.ggml.scores", std::vector<float>(tokens.size(), 0.0f));
      // The synthetic weights, copied tensor by tensor (views, no copies).
      const std::vector<uint8_t> weights_only = WriteGgufModel(*base, GgufModelOptions());
      StatusOr<GgufReader> src = GgufReader::Parse(weights_only.data(), weights_only.size());
      REQUIRE(src.ok());
      for (const GgufTensorInfo& t : src->tensors()) {
        std::vector<uint64_t> ne(t.ne, t.ne + t.n_dims);
        g.AddTensorView(std::string(t.name), t.ggml_type(), ne, t.data, t.n_bytes);
      }
      REQUIRE(g.WriteFile(path).ok());
      StatusOr<ModelAndTokenizer> mt = LoadModelAndTokenizer(path, "");
      if (n_tokens == 40) {
        INFO(mt.status().message());
        REQUIRE(mt.ok());
        CHECK(mt->tokenizer.vocab_size() == 40);
        CHECK(MaxWeightDiff(*base, mt->weights) == 0.0);
      } else {
        REQUIRE(!mt.ok());
        CHECK(mt.status().message() ==
              path + ": tokenizer has 39 tokens, model vocab_size is 40");
      }
    }
    std::remove(path.c_str());
  }

  // A tensor type without a converter (iq2_xxs) is recognised and named.
  GgufWriter g;
  g.AddString("general.architecture", "llama");
  g.AddU32("llama.context_length", 8);
  g.AddU32("llama.embedding_length", 256);
  g.AddU32("llama.feed_forward_length", 256);
  g.AddU32("llama.block_count", 1);
  g.AddU32("llama.attention.head_count", 2);
  std::vector<uint8_t> iq2(66 * 4, 0);
  g.AddTensor("token_embd.weight", GgmlType::kIQ2_XXS, {256, 4}, iq2.data(), iq2.size());
  StatusOr<ModelWeightsF32> w = LoadGgufBytes(*g.Finish());
  REQUIRE(!w.ok());
  CHECK(w.status().code() == StatusCode::kUnimplemented);
  CHECK(Contains(w.status().message(),
                 "unsupported tensor type iq2_xxs for tensor 'token_embd.weight'"));
}

}  // namespace
}  // namespace lutra
