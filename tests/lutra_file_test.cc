// .lutra files (lutra/format/lutra_file.h): round trips of f32 and palettized
// weights at every bit width, several group sizes and codebook types, tied
// and untied heads, with and without a vocabulary; and rejection, with a
// message naming the problem, of corrupt, truncated and hostile files.
#include "lutra/format/lutra_file.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "tests/test_util.h"

namespace lutra {
namespace {

// Odd sizes on purpose: head_dim 10, kv rows 20 (a partial 16-row group),
// cols 40 and 72 (padded to the 64- and 128-column blocks).
ModelConfig SmallConfig(bool tied) {
  ModelConfig c;
  c.dim = 40, c.hidden_dim = 72, c.n_layers = 2, c.n_heads = 4, c.n_kv_heads = 2;
  c.head_dim = 10, c.rope_dim = 10, c.vocab_size = 300, c.seq_len = 32;
  c.rope_theta = 500000.0f, c.norm_eps = 1e-6f, c.tied_embedding = tied;
  return c;
}

// LutraWeights plus the memory its views point into.
struct TestModel {
  LutraWeights weights;
  std::vector<std::vector<float>> floats;
  std::vector<PaletteMatrix> palettes;
};

struct Recipe {
  // Index width per matrix, cycled in file order; 0: f32.
  std::vector<int> bits = {4};
  size_t group_rows = 16;
  ElementType codebook = ElementType::kF16;
  bool tied = true;
};

TestModel MakeModel(const Recipe& r, uint64_t seed) {
  test::Rng rng(seed);
  TestModel t;
  LutraWeights& w = t.weights;
  w.config = SmallConfig(r.tied);
  const ModelConfig& c = w.config;
  t.floats.reserve(64);
  size_t next = 0;
  auto matrix = [&](size_t rows, size_t cols) {
    LutraMatrix m;
    m.rows = rows, m.cols = cols;
    const int bits = r.bits[next++ % r.bits.size()];
    if (bits == 0) {
      t.floats.push_back(rng.GaussianVector(rows * cols));
      m.f32 = t.floats.back().data();
      return m;
    }
    PaletteShape sh;
    sh.rows = rows, sh.cols = cols, sh.bits = bits, sh.group_rows = r.group_rows;
    sh.codebook = r.codebook;
    StatusOr<PaletteMatrix> pm = PaletteMatrix::Allocate(sh);
    REQUIRE(pm.ok());
    for (size_t i = 0; i < rows; ++i) {
      for (size_t j = 0; j < cols; ++j) pm->set_index(i, j, uint32_t(rng.Below(sh.num_entries())));
    }
    for (size_t g = 0; g < sh.num_groups(); ++g) {
      for (size_t e = 0; e < sh.num_entries(); ++e) pm->set_entry(g, e, rng.Gaussian());
    }
    m.palette = pm->view();
    t.palettes.push_back(std::move(*pm));  // heap storage: the view stays valid
    return m;
  };
  auto norm = [&]() {
    t.floats.push_back(rng.UniformVector(size_t(c.dim), 0.5f, 1.5f));
    return static_cast<const float*>(t.floats.back().data());
  };
  const size_t dim = c.dim, hid = c.hidden_dim, q = c.q_dim(), kv = c.kv_dim();
  w.token_embedding = matrix(size_t(c.vocab_size), dim);
  w.layers.resize(size_t(c.n_layers));
  for (LutraLayerWeights& l : w.layers) {
    l.attn_norm = norm();
    l.ffn_norm = norm();
    l.wq = matrix(q, dim), l.wk = matrix(kv, dim), l.wv = matrix(kv, dim);
    l.wo = matrix(dim, q);
    l.w1 = matrix(hid, dim), l.w2 = matrix(dim, hid), l.w3 = matrix(hid, dim);
  }
  w.final_norm = norm();
  w.output = r.tied ? w.token_embedding : matrix(size_t(c.vocab_size), dim);
  return t;
}

// Untied, with the index widths `bits` cycled over the matrices in file order.
TestModel UntiedModel(std::vector<int> bits, uint64_t seed) {
  Recipe r;
  r.bits = std::move(bits);
  r.tied = false;
  return MakeModel(r, seed);
}

// A SentencePiece-style vocabulary of `n` tokens: <unk> <s> </s>, the 256
// byte tokens, then words with spaces (stored as U+2581 in the file).
Tokenizer MakeTokenizer(int n, bool add_space_prefix) {
  std::vector<std::string> pieces = {"<unk>", "<s>", "</s>"};
  char buf[32];
  for (int b = 0; b < 256; ++b) {
    snprintf(buf, sizeof(buf), "<0x%02X>", b);
    pieces.push_back(buf);
  }
  const char* words[] = {" ", " hi", " there", "th", "er", "e", " t", "ere"};
  const int kWords = int(sizeof(words) / sizeof(words[0]));
  for (int i = int(pieces.size()); i < n; ++i) {
    snprintf(buf, sizeof(buf), "%s%s", words[(i - 259) % kWords],
             i < 259 + kWords ? "" : std::to_string(i).c_str());
    pieces.push_back(buf);
  }
  std::vector<float> scores(pieces.size());
  for (size_t i = 0; i < scores.size(); ++i) scores[i] = -float(i) * 0.25f;
  StatusOr<Tokenizer> t =
      Tokenizer::FromVocab(std::move(pieces), std::move(scores), {}, 1, 2, 0, add_space_prefix);
  REQUIRE(t.ok());
  return std::move(*t);
}

// A written file in memory, the field offsets of every key and tensor, and
// their names (in the same order).
struct Built {
  std::vector<uint8_t> bytes;
  GgufLayout layout;
  std::vector<std::string> keys, tensors;

  size_t Key(const std::string& key) const {
    for (size_t i = 0; i < keys.size(); ++i) {
      if (keys[i] == key) return i;
    }
    FAIL("no key " << key);
    return 0;
  }
  size_t Tensor(const std::string& name) const {
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (tensors[i] == name) return i;
    }
    FAIL("no tensor " << name);
    return 0;
  }
  // Offsets of a u32/f32 scalar value, element i of an array value, ne[i] of
  // a tensor and a tensor's ggml type.
  size_t Scalar(const std::string& key) const { return layout.metadata[Key(key)].value; }
  size_t Element(const std::string& key, size_t i) const {
    return layout.metadata[Key(key)].value + 4 + 8 + 8 * i;
  }
  size_t Dim(const std::string& tensor, size_t i) const {
    return layout.tensors[Tensor(tensor)].dims + 4 + 8 * i;
  }
  size_t Type(const std::string& tensor) const { return layout.tensors[Tensor(tensor)].type; }
};

Built Build(const LutraWeights& w, const Tokenizer* tok) {
  GgufWriter g;
  REQUIRE(AddLutraFile(w, tok, &g).ok());
  Built b;
  StatusOr<std::vector<uint8_t>> bytes = g.Finish(&b.layout);
  REQUIRE(bytes.ok());
  b.bytes = std::move(*bytes);
  StatusOr<GgufReader> r = GgufReader::Parse(b.bytes.data(), b.bytes.size());
  REQUIRE(r.ok());
  for (const GgufKeyValue& kv : r->metadata()) b.keys.emplace_back(kv.key);
  for (const GgufTensorInfo& t : r->tensors()) b.tensors.emplace_back(t.name);
  REQUIRE(b.keys.size() == b.layout.metadata.size());
  REQUIRE(b.tensors.size() == b.layout.tensors.size());
  return b;
}

StatusOr<LutraFile> Read(std::vector<uint8_t> bytes) {
  StatusOr<GgufFile> g = GgufFile::FromMapped(MappedFile::FromBuffer(std::move(bytes), "x.lutra"));
  if (!g.ok()) return g.status();
  return ReadLutraFile(std::move(*g));
}

template <class T>
std::vector<uint8_t> Patched(std::vector<uint8_t> bytes, size_t at, T value) {
  REQUIRE(at + sizeof(T) <= bytes.size());
  memcpy(bytes.data() + at, &value, sizeof(T));
  return bytes;
}

void ExpectRejected(const std::vector<uint8_t>& bytes, const std::string& fragment) {
  StatusOr<LutraFile> f = Read(bytes);
  INFO("expected '" << fragment << "' in: " << f.status().message());
  REQUIRE(!f.ok());
  CHECK(f.status().message().find(fragment) != std::string::npos);
}

// True if [p, p + n) lies in the bytes the file holds: data used in place.
bool Inside(const void* p, size_t n, const MappedFile& file) {
  const uint8_t* b = static_cast<const uint8_t*>(p);
  return b >= file.data() && b + n <= file.data() + file.size();
}

// `got` (read from `file`) holds exactly the data of `want`, in place.
void CheckMatrix(const LutraMatrix& got, const LutraMatrix& want,
                 const MappedFile& file) {
  REQUIRE(got.rows == want.rows);
  REQUIRE(got.cols == want.cols);
  REQUIRE(got.palettized() == want.palettized());
  if (!want.palettized()) {
    CHECK(Inside(got.f32, got.rows * got.cols * 4, file));
    CHECK(memcmp(got.f32, want.f32, want.rows * want.cols * 4) == 0);
    return;
  }
  const PaletteShape& g = got.palette.shape;
  const PaletteShape& s = want.palette.shape;
  CHECK(g.bits == s.bits);
  CHECK(g.codebook == s.codebook);
  // One group either way: beyond 2^20 the writer stores rows.
  CHECK(g.group_rows == (s.group_rows > (size_t{1} << 20) ? s.rows : s.group_rows));
  REQUIRE(g.index_bytes() == s.index_bytes());
  REQUIRE(g.codebook_bytes() == s.codebook_bytes());
  CHECK(Inside(got.palette.indices, g.index_bytes(), file));
  CHECK(Inside(got.palette.codebooks, g.codebook_bytes(), file));
  CHECK(memcmp(got.palette.indices, want.palette.indices, s.index_bytes()) == 0);
  CHECK(memcmp(got.palette.codebooks, want.palette.codebooks, s.codebook_bytes()) == 0);
}

void CheckSame(const LutraFile& f, const LutraWeights& want, const Tokenizer* tok) {
  const MappedFile& file = f.gguf.file();
  const LutraWeights& got = f.weights;
  const ModelConfig& a = got.config;
  const ModelConfig& b = want.config;
  for (const lutra_file_detail::HyperParameter& h : lutra_file_detail::kHyperParameters) {
    INFO(h.key);
    CHECK(a.*h.field == b.*h.field);
  }
  CHECK(a.rope_theta == b.rope_theta);
  CHECK(a.norm_eps == b.norm_eps);
  CHECK(a.rope_dim == a.head_dim);
  CHECK(a.rope_layout == RopeLayout::kAdjacentPairs);
  CHECK(a.tied_embedding == b.tied_embedding);
  const size_t nb = size_t(b.dim) * 4;
  REQUIRE(got.layers.size() == want.layers.size());
  CheckMatrix(got.token_embedding, want.token_embedding, file);
  for (size_t l = 0; l < want.layers.size(); ++l) {
    const LutraLayerWeights& x = got.layers[l];
    const LutraLayerWeights& y = want.layers[l];
    CHECK(memcmp(x.attn_norm, y.attn_norm, nb) == 0);
    CHECK(memcmp(x.ffn_norm, y.ffn_norm, nb) == 0);
    CHECK(Inside(x.attn_norm, nb, file));
    for (auto pair : {std::make_pair(&x.wq, &y.wq), std::make_pair(&x.wk, &y.wk),
                      std::make_pair(&x.wv, &y.wv), std::make_pair(&x.wo, &y.wo),
                      std::make_pair(&x.w1, &y.w1), std::make_pair(&x.w2, &y.w2),
                      std::make_pair(&x.w3, &y.w3)}) {
      CheckMatrix(*pair.first, *pair.second, file);
    }
  }
  CHECK(memcmp(got.final_norm, want.final_norm, nb) == 0);
  CheckMatrix(got.output, want.output, file);
  if (b.tied_embedding) {  // stored once: the head is the embedding's view
    CHECK(got.output.f32 == got.token_embedding.f32);
    CHECK(got.output.palette.indices == got.token_embedding.palette.indices);
  }
  REQUIRE(f.tokenizer.has_value() == (tok != nullptr));
  if (tok == nullptr) return;
  const Tokenizer& t = *f.tokenizer;
  REQUIRE(t.vocab_size() == tok->vocab_size());
  for (int i = 0; i < t.vocab_size(); ++i) {
    CHECK(t.piece(i) == tok->piece(i));
    CHECK(t.score(i) == tok->score(i));
    CHECK(t.type(i) == tok->type(i));
  }
  CHECK(t.bos_id() == tok->bos_id());
  CHECK(t.eos_id() == tok->eos_id());
  CHECK(t.unk_id() == tok->unk_id());
  for (const char* text : {"hi there", "x", "there the\n"}) {
    StatusOr<std::vector<int>> p = t.Encode(text, true);
    StatusOr<std::vector<int>> q = tok->Encode(text, true);
    REQUIRE((p.ok() && q.ok()));
    CHECK(*p == *q);
  }
}

TEST_CASE(".lutra round trip: f32, every bit width, group sizes, codebook types",
          "[lutra_file]") {
  const Tokenizer plain = MakeTokenizer(300, /*add_space_prefix=*/false);
  const Tokenizer spaced = MakeTokenizer(300, /*add_space_prefix=*/true);
  struct Case {
    Recipe recipe;
    const Tokenizer* tok;
  };
  const ElementType kF16 = ElementType::kF16, kBF16 = ElementType::kBF16,
                    kF32 = ElementType::kF32;
  const Case cases[] = {
      {{{0}, 16, kF16, true}, nullptr},
      {{{0}, 16, kF16, false}, &plain},
      {{{1}, 1, kF16, true}, &spaced},
      {{{2}, 7, kBF16, false}, nullptr},
      {{{3}, 16, kF32, true}, &plain},
      {{{4}, 16, kF16, false}, &spaced},
      {{{6}, 20, kBF16, true}, nullptr},
      {{{8}, 3, kF32, true}, &plain},
      // Mixed widths and f32 matrices in one file; group_rows above every
      // matrix's rows (one group; stored as is up to 2^20, else as rows).
      {{{4, 0, 2, 3, 6, 8, 1}, 1000, kF16, false}, &spaced},
      {{{2, 0}, size_t{1} << 21, kBF16, true}, nullptr},
  };
  uint64_t seed = 1;
  for (const Case& c : cases) {
    INFO("bits[0] " << c.recipe.bits[0] << " group_rows " << c.recipe.group_rows << " tied "
                    << c.recipe.tied << " tokenizer " << (c.tok != nullptr));
    const TestModel m = MakeModel(c.recipe, seed++);
    const Built b = Build(m.weights, c.tok);
    StatusOr<LutraFile> f = Read(b.bytes);
    INFO(f.status().message());
    REQUIRE(f.ok());
    CheckSame(*f, m.weights, c.tok);
    // Moving the file keeps the views valid (they point into its bytes).
    LutraFile moved = std::move(*f);
    CheckSame(moved, m.weights, c.tok);
  }
}

using test::TempPath;  // removed when the test program exits

TEST_CASE(".lutra files on disk: WriteLutraFile streams the bytes Finish builds",
          "[lutra_file]") {
  const Tokenizer tok = MakeTokenizer(300, true);
  const TestModel m = UntiedModel({4, 0}, 7);
  const std::string path = TempPath("disk.lutra");
  REQUIRE(WriteLutraFile(m.weights, &tok, path).ok());
  std::ifstream in(path, std::ios::binary);
  const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), {});
  CHECK(bytes == Build(m.weights, &tok).bytes);
  StatusOr<LutraFile> f = ReadLutraFile(path);
  std::remove(path.c_str());  // the mapping stays valid after unlinking
  INFO(f.status().message());
  REQUIRE(f.ok());
  CheckSame(*f, m.weights, &tok);
  CHECK(f->gguf.reader().alignment() == 64);
  for (const GgufTensorInfo& t : f->gguf.reader().tensors()) {
    CHECK((t.data - f->gguf.file().data()) % 64 == 0);  // usable in place by SIMD loads
  }
  CHECK(IsLutraFile(f->gguf.reader()));
  CHECK(ReadLutraFile(TempPath("missing.lutra")).status().code() == StatusCode::kNotFound);
}

TEST_CASE("f32 llama weights convert to LutraWeights", "[lutra_file]") {
  // ModelWeightsF32 over an owned buffer: the views LutraWeightsFromF32 makes
  // must be the same pointers, with the config's shapes.
  ModelWeightsF32 f;
  f.config = SmallConfig(true);
  const ModelConfig& c = f.config;
  f.converted.emplace_back(size_t(c.vocab_size) * c.dim + 8);
  const float* p = f.converted.back().data();
  f.token_embedding = f.classifier = p;
  f.final_norm = p + 1;
  f.layers.resize(size_t(c.n_layers));
  for (LayerWeightsF32& l : f.layers) {
    l.attn_norm = p + 2, l.ffn_norm = p + 3, l.wq = p + 4, l.wk = p + 5, l.wv = p + 6;
    l.wo = p + 7, l.w1 = p + 8, l.w2 = p + 9, l.w3 = p + 10;
  }
  const LutraWeights w = LutraWeightsFromF32(f);
  CHECK(w.token_embedding.f32 == p);
  CHECK(w.token_embedding.rows == size_t(c.vocab_size));
  CHECK(w.output.f32 == p);
  CHECK(w.layers[1].wo.f32 == p + 7);
  CHECK(w.layers[1].wo.rows == size_t(c.dim));
  CHECK(w.layers[1].wo.cols == size_t(c.q_dim()));
  CHECK(w.layers[0].w2.rows == size_t(c.dim));
  CHECK(w.layers[0].w2.cols == size_t(c.hidden_dim));
  CHECK(w.layers[0].wk.rows == size_t(c.kv_dim()));
}

TEST_CASE("The writer refuses weights that do not match their config", "[lutra_file]") {
  const TestModel m = MakeModel(Recipe(), 3);
  auto expect = [](const LutraWeights& w, const Tokenizer* tok, const char* fragment) {
    GgufWriter g;
    const Status s = AddLutraFile(w, tok, &g);
    INFO("expected '" << fragment << "' in: " << s.message());
    REQUIRE(!s.ok());
    CHECK(s.message().find(fragment) != std::string::npos);
  };
  LutraWeights w = m.weights;
  w.layers[1].w2.cols += 1;
  expect(w, nullptr, "blk.1.ffn_down");
  w = m.weights;
  w.layers.pop_back();
  expect(w, nullptr, "n_layers");
  w = m.weights;
  w.layers[0].ffn_norm = nullptr;
  expect(w, nullptr, "blk.0.ffn_norm.weight");
  w = m.weights;
  w.config.rope_dim = 8;
  expect(w, nullptr, "RoPE");
  w = m.weights;
  w.config.n_kv_heads = 3;
  expect(w, nullptr, "n_kv_heads");
  w = m.weights;
  w.layers[0].wq.palette.codebooks = nullptr;
  expect(w, nullptr, "blk.0.attn_q");
  const Tokenizer small = MakeTokenizer(299, false);
  expect(m.weights, &small, "299 tokens");
}

TEST_CASE("Hostile .lutra files are rejected with a message naming the problem",
          "[lutra_file]") {
  const Tokenizer tok = MakeTokenizer(300, false);
  // In file order: token_embd 4-bit, blk.0.attn_q 4-bit, blk.0.attn_k f32, ...
  const TestModel m = UntiedModel({4, 4, 0}, 11);
  const Built b = Build(m.weights, &tok);
  REQUIRE(Read(b.bytes).ok());
  const std::vector<uint8_t>& f = b.bytes;
  const uint64_t kU64Max = ~uint64_t{0};
  // The shape [rows, cols, bits, group_rows, codebook] of blk.0.attn_q.
  const std::string q = "lutra.palette.blk.0.attn_q";
  REQUIRE(b.Key(q) > 0);

  SECTION("header values") {
    ExpectRejected(Patched(f, b.Scalar("lutra.format_version"), uint32_t{3}), "format version 3");
    ExpectRejected(Patched(f, b.Scalar("lutra.n_layers"), uint32_t{1} << 20),
                   "n_layers = 1048576 needs at least");
    ExpectRejected(Patched(f, b.Scalar("lutra.n_layers"), uint32_t{0}), "n_layers");
    ExpectRejected(Patched(f, b.Scalar("lutra.n_layers"), uint32_t{3}), "blk.2");
    ExpectRejected(Patched(f, b.Scalar("lutra.dim"), uint32_t{1} << 25), "implausibly large");
    // Issue 18: 2^24 layers passed the per-value limit and asked for 10.6 GB.
    ExpectRejected(Patched(f, b.Scalar("lutra.n_layers"), uint32_t{1} << 24),
                   "n_layers = 16777216 needs at least 150994946 tensors");
    ExpectRejected(Patched(f, b.Scalar("lutra.n_heads"), uint32_t{3}), "n_kv_heads");
    ExpectRejected(Patched(f, b.Scalar("lutra.head_dim"), uint32_t{0}), "head_dim");
    ExpectRejected(Patched(f, b.Scalar("lutra.norm_eps"), 0.0f), "norm_eps");
    ExpectRejected(Patched(f, b.Scalar("lutra.rope_theta"), -1.0f), "rope_theta");
    ExpectRejected(Patched(f, b.Scalar("lutra.vocab_size"), uint32_t{301}), "token_embd");
    ExpectRejected(Patched(f, b.Scalar("lutra.hidden_dim"), uint32_t{71}), "ffn_gate");
    // A wrong value type is not taken for a default.
    ExpectRejected(Patched(f, b.layout.metadata[b.Key("lutra.seq_len")].type,
                           uint32_t(GgufValueType::kF32)),
                   "lutra.seq_len");
  }
  SECTION("palette shapes") {
    ExpectRejected(Patched(f, b.Element(q, 0), uint64_t{41}), "the config implies 40 x 40");
    ExpectRejected(Patched(f, b.Element(q, 1), uint64_t{39}), "the config implies 40 x 40");
    ExpectRejected(Patched(f, b.Element(q, 2), uint64_t{5}), "bits = 5");
    ExpectRejected(Patched(f, b.Element(q, 2), (uint64_t{1} << 32) + 4), "bits = 4294967300");
    ExpectRejected(Patched(f, b.Element(q, 3), uint64_t{0}), "group_rows = 0");
    ExpectRejected(Patched(f, b.Element(q, 3), (uint64_t{1} << 20) + 1),
                   "group_rows = 1048577, need 1 <= group_rows <= max(rows 40, 2^20)");
    ExpectRejected(Patched(f, b.Element(q, 3), kU64Max), "group_rows");
    // Issue 18: the shape stored as an i64 array (any integer array is
    // read) with group_rows = -1 once wrapped num_groups() to 0 and crashed
    // the first decode step.
    const std::vector<uint8_t> i64 = Patched(f, b.Scalar(q), uint32_t(GgufValueType::kI64));
    REQUIRE(Read(i64).ok());
    ExpectRejected(Patched(i64, b.Element(q, 3), int64_t{-1}),
                   "blk.0.attn_q: group_rows = -1, need 1 <= group_rows");
    ExpectRejected(Patched(f, b.Element(q, 3), kU64Max >> 1), "group_rows");
    // Above rows means one group: the 3 groups of data no longer fit it.
    ExpectRejected(Patched(f, b.Element(q, 3), uint64_t{41}), "codebook buffer");
    ExpectRejected(Patched(f, b.Element(q, 4), uint64_t{3}), "codebook type 3");
    // Another group size or width than the data has: the sizes disagree.
    ExpectRejected(Patched(f, b.Element(q, 3), uint64_t{1}), "codebook buffer");
    ExpectRejected(Patched(f, b.Element(q, 2), uint64_t{8}), "index buffer");
    // A single-group matrix may state any group_rows up to 2^20 (files that
    // lutra-generate --group wrote before the writer stored rows).
    Recipe whole;
    whole.group_rows = 300;  // >= every matrix's rows: one group each
    const TestModel single = MakeModel(whole, 14);
    const Built bs = Build(single.weights, nullptr);
    const std::string e = "lutra.palette.blk.1.attn_k";
    StatusOr<LutraFile> legacy = Read(Patched(bs.bytes, bs.Element(e, 3), uint64_t{1} << 20));
    INFO(legacy.status().message());
    REQUIRE(legacy.ok());
    CHECK(legacy->weights.layers[1].wk.palette.shape.group_rows == size_t{1} << 20);
    CHECK(legacy->weights.layers[1].wk.palette.shape.num_groups() == 1);
  }
  SECTION("tensors") {
    // Missing: rename blk.1.ffn_down.indices (last letter) and output_norm.
    std::vector<uint8_t> renamed = f;
    const size_t name_at = b.layout.tensors[b.Tensor("blk.1.ffn_down.indices")].begin + 8;
    renamed[name_at + strlen("blk.1.ffn_down.indices") - 1] = 'X';
    ExpectRejected(renamed, "no tensor 'blk.1.ffn_down.indices'");
    renamed = f;
    renamed[b.layout.tensors[b.Tensor("output_norm.weight")].begin + 8] = 'X';
    ExpectRejected(renamed, "no tensor 'output_norm.weight'");
    // The head missing: a tied file declared untied.
    const TestModel tied = MakeModel(Recipe(), 12);
    const Built bt = Build(tied.weights, nullptr);
    ExpectRejected(Patched(bt.bytes, bt.Scalar("lutra.tied_embedding"), uint8_t{0}),
                   "no tensor 'output.");
    // Sizes: fewer index bytes, a norm one short, an f32 matrix transposed.
    ExpectRejected(Patched(f, b.Dim("blk.0.attn_q.indices", 0), uint64_t{64}), "index buffer");
    ExpectRejected(Patched(f, b.Dim("blk.0.attn_q.codebooks", 0), uint64_t{16}),
                   "codebook buffer");
    ExpectRejected(Patched(f, b.Dim("blk.1.attn_norm.weight", 0), uint64_t{39}),
                   "blk.1.attn_norm.weight");
    ExpectRejected(Patched(f, b.Dim("blk.0.attn_k.weight", 0), uint64_t{20}),
                   "blk.0.attn_k.weight");
    // Types: bf16 codebooks declared where the shape says f16; f16 f32 data.
    ExpectRejected(Patched(f, b.Type("blk.0.attn_q.codebooks"), uint32_t(GgmlType::kBF16)),
                   "expected i8 indices and f16 codebooks");
    ExpectRejected(Patched(f, b.Type("blk.0.attn_q.indices"), uint32_t(GgmlType::kI16)), "");
    ExpectRejected(Patched(f, b.Type("blk.0.attn_k.weight"), uint32_t(GgmlType::kF16)),
                   "expected aligned f32");
  }
  SECTION("vocabulary") {
    // A vocabulary of another size than vocab_size, added by hand.
    GgufWriter g;
    REQUIRE(AddLutraFile(m.weights, nullptr, &g).ok());
    lutra_file_detail::AddTokenizer(MakeTokenizer(299, false), g);
    StatusOr<std::vector<uint8_t>> bytes = g.Finish();
    REQUIRE(bytes.ok());
    ExpectRejected(*bytes, "the vocabulary has 299 tokens, vocab_size is 300");
    ExpectRejected(Patched(f, b.Scalar("tokenizer.ggml.bos_token_id"), uint32_t{300}),
                   "bos_token_id");
  }
}

TEST_CASE("Truncated and corrupted .lutra files never crash", "[lutra_file]") {
  const Tokenizer tok = MakeTokenizer(300, true);
  const TestModel m = UntiedModel({3, 0, 6}, 21);
  const Built b = Build(m.weights, &tok);
  // Every cut inside the metadata and tensor infos, then a stride through
  // the data: each is an error (never a partial model).
  for (size_t n = 0; n < b.bytes.size(); n += n < b.layout.data_offset + 64 ? 1 : 61) {
    StatusOr<LutraFile> f = Read(std::vector<uint8_t>(b.bytes.begin(), b.bytes.begin() + n));
    INFO("cut at " << n << " of " << b.bytes.size());
    REQUIRE(!f.ok());
    CHECK(!f.status().message().empty());
  }
  // Random bytes overwritten in the header (metadata and tensor infos): an
  // error, or a file whose every view lies inside the buffer.
  test::Rng rng(5);
  size_t rejected = 0;
  const int kTrials = 3000;
  for (int trial = 0; trial < kTrials; ++trial) {
    std::vector<uint8_t> bytes = b.bytes;
    const int flips = 1 + int(rng.Below(3));
    for (int i = 0; i < flips; ++i) {
      bytes[rng.Below(b.layout.data_offset)] = uint8_t(rng.Bits());
    }
    StatusOr<LutraFile> f = Read(bytes);
    if (!f.ok()) {
      ++rejected;
      CHECK(!f.status().message().empty());
      continue;
    }
    const MappedFile& file = f->gguf.file();
    const LutraWeights& w = f->weights;
    std::vector<const LutraMatrix*> mats = {&w.token_embedding, &w.output};
    for (const LutraLayerWeights& l : w.layers) {
      for (const LutraMatrix* x : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w1, &l.w2, &l.w3}) {
        mats.push_back(x);
      }
      CHECK(Inside(l.attn_norm, size_t(w.config.dim) * 4, file));
      CHECK(Inside(l.ffn_norm, size_t(w.config.dim) * 4, file));
    }
    for (const LutraMatrix* x : mats) {
      if (x->palettized()) {
        CHECK(Inside(x->palette.indices, x->palette.shape.index_bytes(), file));
        CHECK(Inside(x->palette.codebooks, x->palette.shape.codebook_bytes(), file));
      } else {
        CHECK(Inside(x->f32, x->rows * x->cols * 4, file));
      }
    }
  }
  INFO(rejected << " of " << kTrials << " corrupted headers rejected");
  CHECK(rejected > kTrials / 2);
}

}  // namespace
}  // namespace lutra
