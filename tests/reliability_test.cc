// Untrusted model files (issue 18, docs/reliability.md): each crafted input
// of the issue, made with the project's own writers, gets a clear error
// naming the field; the memory budget refuses a model before allocating it;
// a model read into memory (no mmap) survives its file shrinking. The .lutra
// inputs are in lutra_file_test (its patching helpers), the two-session test
// in sessions_test.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "examples/engine.h"
#include "lutra/format/gguf.h"
#include "lutra/format/gguf_writer.h"
#include "lutra/format/llama_model.h"
#include "lutra/format/lora_file.h"
#include "lutra/format/mapped_file.h"
#include "lutra/format/palette.h"
#include "tests/test_util.h"

namespace lutra {
namespace {

using test::Contains;

// Expects a failed status whose message contains `fragment`.
void ExpectError(const Status& s, const std::string& fragment) {
  INFO("expected '" << fragment << "' in: '" << s.message() << "'");
  REQUIRE(!s.ok());
  CHECK(Contains(s.message(), fragment));
}

// A GGUF llama model with one real layer (dim 64, hidden 96, 4 heads, 2 KV
// heads, vocab 40) whose llama.block_count says `block_count`; matrices in
// `type` (f32, or f16 to make the loader convert them).
std::vector<uint8_t> LlamaGguf(uint32_t block_count, GgmlType type = GgmlType::kF32) {
  GgufWriter g;
  g.AddString("general.architecture", "llama");
  g.AddU32("llama.context_length", 16);
  g.AddU32("llama.embedding_length", 64);
  g.AddU32("llama.feed_forward_length", 96);
  g.AddU32("llama.block_count", block_count);
  g.AddU32("llama.attention.head_count", 4);
  g.AddU32("llama.attention.head_count_kv", 2);
  test::Rng rng(3);
  const auto add = [&](const std::string& name, uint64_t in, uint64_t out) {
    const std::vector<float> v = rng.GaussianVector(in * (out ? out : 1), 0.1f);
    if (out == 0) {
      g.AddTensorF32(name, {in}, v.data());
    } else {
      g.AddTensorF32(name, {in, out}, v.data(), type);
    }
  };
  add("token_embd.weight", 64, 40);
  add("output_norm.weight", 64, 0);
  add("blk.0.attn_norm.weight", 64, 0);
  add("blk.0.attn_q.weight", 64, 64);
  add("blk.0.attn_k.weight", 64, 32);
  add("blk.0.attn_v.weight", 64, 32);
  add("blk.0.attn_output.weight", 64, 64);
  add("blk.0.ffn_norm.weight", 64, 0);
  add("blk.0.ffn_gate.weight", 64, 96);
  add("blk.0.ffn_down.weight", 96, 64);
  add("blk.0.ffn_up.weight", 64, 96);
  StatusOr<std::vector<uint8_t>> bytes = g.Finish();
  REQUIRE(bytes.ok());
  return std::move(*bytes);
}

StatusOr<ModelWeightsF32> LoadGguf(std::vector<uint8_t> bytes, uint64_t max_bytes = 0) {
  StatusOr<GgufFile> f = GgufFile::FromMapped(MappedFile::FromBuffer(std::move(bytes), "m.gguf"));
  if (!f.ok()) return f.status();
  return LoadGgufModel(std::move(*f), max_bytes);
}

std::string WriteTemp(const std::string& name, const std::vector<uint8_t>& bytes) {
  const std::string path = test::TempPath(name);
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  return path;
}

TEST_CASE("PaletteShape bounds group_rows: -1 from a file cannot wrap num_groups",
          "[reliability]") {
  PaletteShape s;
  s.rows = 40, s.cols = 64, s.bits = 4;
  s.group_rows = std::numeric_limits<size_t>::max();  // int64 -1 narrowed
  ExpectError(s.Validate(), "group_rows = 18446744073709551615, need 1 <= group_rows <= 2^40");
  s.group_rows = (size_t{1} << 40) + 1;
  ExpectError(s.Validate(), "group_rows");
  s.group_rows = 1000;  // above rows: one group, as the format allows
  REQUIRE(s.Validate().ok());
  CHECK(s.num_groups() == 1);
}

TEST_CASE("GGUF llama.block_count is checked against limits and tensors before sizing",
          "[reliability]") {
  REQUIRE(LoadGguf(LlamaGguf(1)).ok());
  // Issue 18: 2^31 - 1 blocks asked layers.resize for 154 GB.
  ExpectError(LoadGguf(LlamaGguf(0x7FFFFFFF)).status(),
              "m.gguf: gguf: llama.block_count = 2147483647 exceeds the limit 2^24");
  // Within the limit but far beyond the 11 tensors present.
  ExpectError(LoadGguf(LlamaGguf(1u << 24)).status(),
              "m.gguf: gguf: llama.block_count = 16777216 needs at least 150994946 tensors, "
              "the file has 11");
  ExpectError(LoadGguf(LlamaGguf(2)).status(),
              "llama.block_count = 2 needs at least 20 tensors, the file has 11");
}

TEST_CASE("GGUF f32 conversion stays within the memory budget", "[reliability]") {
  const std::vector<uint8_t> f16 = LlamaGguf(1, GgmlType::kF16);
  StatusOr<GgufReader> r = GgufReader::Parse(f16.data(), f16.size());
  REQUIRE(r.ok());
  // The seven matrices and the embedding become f32: 4 bytes per weight.
  const uint64_t need = 4 * (40 * 64 + 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 96);
  CHECK(GgufConvertedBytes(*r) == need);
  const Status s = LoadGguf(f16, need - 1).status();
  CHECK(s.code() == StatusCode::kResourceExhausted);
  ExpectError(s, "m.gguf: gguf: converting tensors to f32 needs " + std::to_string(need) +
                     " bytes, above the memory budget of " + std::to_string(need - 1));
  CHECK(LoadGguf(f16, need).ok());
  CHECK(LoadGguf(f16, 0).ok());  // 0: no limit
}

TEST_CASE("SerializeAdapter: scales whose alpha would overflow round-trip", "[reliability]") {
  BaseShapes base = BaseShapes::Llama(2, 16, 24, 16, 8);
  test::Rng rng(5);
  for (const float scale : {1e38f, -3e38f, 0.0f, 0.5f}) {
    StatusOr<Adapter> a = Adapter::Create("big", base);
    REQUIRE(a.ok());
    const size_t rank = 8;
    const std::vector<float> A = rng.GaussianVector(rank * 16, 0.1f);
    const std::vector<float> B = rng.GaussianVector(16 * rank, 0.1f);
    REQUIRE(a->AddF32(1, Projection::kQ, rank, A.data(), B.data(), scale).ok());
    StatusOr<std::vector<uint8_t>> bytes = SerializeAdapter(*a);
    REQUIRE(bytes.ok());
    StatusOr<GgufReader> g = GgufReader::Parse(bytes->data(), bytes->size());
    REQUIRE(g.ok());
    StatusOr<float> alpha = g->GetF32("adapter.lora.alpha");
    REQUIRE(alpha.ok());
    INFO("scale " << scale << " alpha " << *alpha);
    CHECK(std::isfinite(*alpha));  // issue 18: was scale * rank = inf for 1e38
    // Plain scales keep llama.cpp's alpha / r and no lutra key.
    CHECK((g->Find("lutra.lora.scales") == nullptr) == (scale == 0.5f));
    StatusOr<Adapter> back = ParseAdapterBytes(bytes->data(), bytes->size(), base);
    INFO(back.status().message());
    REQUIRE(back.ok());
    REQUIRE(back->num_targets() == 1);
    CHECK(back->target(0).scale() == scale);
  }
}

TEST_CASE("MappedFile: reading into memory respects the byte limit", "[reliability]") {
  const std::string path = WriteTemp("budget.bin", std::vector<uint8_t>(100000, 7));
  StatusOr<MappedFile> small = MappedFile::Open(path, MappedFile::Mode::kRead, 99999);
  REQUIRE(!small.ok());
  CHECK(small.status().code() == StatusCode::kResourceExhausted);
  ExpectError(small.status(), "needs 100000 bytes, above the memory budget of 99999 bytes");
  StatusOr<MappedFile> read = MappedFile::Open(path, MappedFile::Mode::kRead, 100000);
  REQUIRE(read.ok());
  CHECK(!read->is_mapped());
  CHECK(read->size() == 100000);
  // A mapping costs no heap: the limit does not apply.
  StatusOr<MappedFile> mapped = MappedFile::Open(path, MappedFile::Mode::kMapOrRead, 1);
  REQUIRE(mapped.ok());
  CHECK(mapped->size() == 100000);
}

// A synthetic "tiny" model palettized at 4 bits (seed `seed`), saved as a
// temporary .lutra file `name` with a byte vocabulary; returns its path.
std::string SavedTinyModel(const std::string& name, uint64_t seed,
                           ModelConfig* config = nullptr) {
  engine::LoadOptions four;
  four.bits = 4;
  StatusOr<engine::Model> made = engine::MakeSyntheticModel("tiny", four, seed);
  REQUIRE(made.ok());
  StatusOr<Tokenizer> tok = engine::ByteTokenizer(made->config.vocab_size);
  REQUIRE(tok.ok());
  const std::string path = test::TempPath(name);
  REQUIRE(engine::SaveLutraModel(*made, &*tok, path).ok());
  if (config != nullptr) *config = made->config;
  return path;
}

// Greedy tokens and the last logits of `steps` positions from a fixed prompt.
std::vector<float> GreedyLogits(const engine::Model& m, size_t steps, std::vector<int>* tokens) {
  StatusOr<engine::RunState> state = engine::MakeRunState(m.config, 4);
  REQUIRE(state.ok());
  Sampler sampler = Sampler::Create(size_t(m.config.vocab_size), SamplingConfig{0.0f}).value();
  const Status s = engine::Generate(m, *state, {1, 300, 301}, steps, sampler, {},
                                    [&](int, int t) { tokens->push_back(t); }, nullptr);
  REQUIRE(s.ok());
  return std::vector<float>(state->logits.begin(), state->logits.begin() + m.config.vocab_size);
}

TEST_CASE("--no-mmap: a model read into memory survives its file shrinking",
          "[reliability]") {
  const std::string path = SavedTinyModel("nommap.lutra", 8);
  const uint64_t file_bytes = std::filesystem::file_size(path);
  std::vector<int> mapped_tokens, read_tokens, after_tokens;
  std::vector<float> mapped_logits;
  {
    StatusOr<engine::Model> mapped = engine::OpenModel(path, engine::LoadOptions());
    REQUIRE(mapped.ok());
    CHECK(mapped->heap_bytes < file_bytes / 4);  // tables only: the weights are mapped
    mapped_logits = GreedyLogits(*mapped, 20, &mapped_tokens);
  }  // unmapped before the file is truncated below
  engine::LoadOptions o;
  o.use_mmap = false;
  StatusOr<engine::Model> read = engine::OpenModel(path, o);
  REQUIRE(read.ok());
  CHECK(read->heap_bytes > file_bytes);  // the file and the tables
  CHECK(GreedyLogits(*read, 20, &read_tokens) == mapped_logits);
  CHECK(read_tokens == mapped_tokens);
  // The file shrinks under the app (a partial rewrite, a cleared cache): a
  // mapped model would die of SIGBUS on its next step; this one runs on.
  std::filesystem::resize_file(path, 0);
  CHECK(GreedyLogits(*read, 20, &after_tokens) == mapped_logits);
  CHECK(after_tokens == mapped_tokens);
}

TEST_CASE("The memory budget refuses a model before allocating it", "[reliability]") {
  ModelConfig config;
  const std::string path = SavedTinyModel("budget.lutra", 9, &config);
  const uint64_t file_bytes = std::filesystem::file_size(path);

  engine::LoadOptions o;
  o.use_mmap = false;
  o.max_memory_bytes = file_bytes - 1;  // not even the file fits
  Status s = engine::OpenModel(path, o).status();
  CHECK(s.code() == StatusCode::kResourceExhausted);
  ExpectError(s, "needs " + std::to_string(file_bytes) + " bytes, above the memory budget");
  o.max_memory_bytes = file_bytes;  // the file fits, its kernels' tables do not
  ExpectError(engine::OpenModel(path, o).status(), "the kernels' tables");
  o.max_memory_bytes = 2 * file_bytes;
  StatusOr<engine::Model> fits = engine::OpenModel(path, o);
  REQUIRE(fits.ok());
  CHECK(fits->heap_bytes <= o.max_memory_bytes);

  // Palettizing an f32 model: the copy is estimated and refused up front.
  StatusOr<engine::Model> f32 = engine::MakeSyntheticModel("tiny", engine::LoadOptions(), 9);
  REQUIRE(f32.ok());
  engine::LoadOptions q;
  q.bits = 4;
  q.calibrate = false;
  q.max_memory_bytes = f32->heap_bytes + 1000;
  ExpectError(engine::PalettizeModel(*f32, q).status(), "palettizing");
  q.max_memory_bytes = 0;
  StatusOr<engine::Model> pal = engine::PalettizeModel(*f32, q);
  REQUIRE(pal.ok());
  CHECK(pal->heap_bytes >= pal->WeightBytes());
  // A synthetic 1B model is refused in microseconds instead of filling 5 GB.
  engine::LoadOptions big;
  big.max_memory_bytes = size_t{1} << 30;
  ExpectError(engine::MakeSyntheticModel("1b", big, 1).status(),
              "synthetic model '1b' needs");
  // The run state (KV cache) is sized from the config without allocating.
  const uint64_t run = engine::RunStateBytes(config, 4);
  CHECK(run > uint64_t(2) * config.n_layers * config.seq_len * config.kv_dim() * 4);
}

#ifdef LUTRA_GENERATE_BIN
// lutra-generate with `args`: exit code and stdout + stderr.
int RunGenerate(const std::string& args, std::string* out) {
  const std::string cmd = "'" LUTRA_GENERATE_BIN "' " + args + " < /dev/null 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out->append(buf, n);
  const int status = pclose(p);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST_CASE("lutra-generate: a crafted file exits 1 naming the field; --max-memory, --no-mmap",
          "[reliability][cli]") {
  std::string help;
  if (RunGenerate("--help", &help) != 0) SKIP("cannot run " LUTRA_GENERATE_BIN);
  const std::string gguf = WriteTemp("hostile.gguf", LlamaGguf(0x7FFFFFFF));
  std::string out;
  CHECK(RunGenerate("-m '" + gguf + "' -n 4", &out) == 1);
  INFO(out);
  CHECK(Contains(out, "error: " + gguf +
                          ": gguf: llama.block_count = 2147483647 exceeds the limit 2^24"));
  out.clear();
  CHECK(RunGenerate("--synthetic 1b --max-memory 512M -n 1", &out) == 1);
  CHECK(Contains(out, "synthetic model '1b' needs"));
  CHECK(Contains(out, "above the memory budget of 536870912 bytes"));
  out.clear();
  CHECK(RunGenerate("--synthetic tiny --max-memory 1.5x -n 1", &out) == 2);
  CHECK(Contains(out, "--max-memory 1.5x: expected a size like 512M"));
  // The KV cache counts too: a 2^20-position context of tiny is ~1 GiB.
  out.clear();
  CHECK(RunGenerate("--synthetic tiny --bits 4 -c 1048576 --max-memory 64M -n 1", &out) == 1);
  CHECK(Contains(out, "--max-memory: the model and its run state"));
  // A saved model runs read into memory, with the mapped run's text.
  const std::string path = SavedTinyModel("cli.lutra", 8);
  std::string mapped, read;
  CHECK(RunGenerate("-m '" + path + "' -n 8 --temp 0 -p hi", &mapped) == 0);
  CHECK(RunGenerate("-m '" + path + "' --no-mmap --max-memory 8G -n 8 --temp 0 -p hi", &read) ==
        0);
  INFO(mapped << "\n---\n" << read);
  const auto text = [](const std::string& s) { return s.substr(0, s.find('\n')); };
  CHECK(text(mapped) == text(read));
  CHECK(text(read).size() > 2);
}
#endif  // LUTRA_GENERATE_BIN

}  // namespace
}  // namespace lutra
