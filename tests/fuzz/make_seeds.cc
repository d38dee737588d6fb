// Writes the fuzz seeds that the project's own writers make (cmake/fuzz.sh
// adds the shared models and vocabularies next to them):
//
//   make_seeds OUT_DIR MODELS_DIR [VOCAB_DIR]
//
// OUT_DIR/<harness>/ gets small, valid inputs for each harness: small so
// that libFuzzer's mutations reach the interesting fields quickly (it
// mutates a few bytes at a time). Each seed is read back with its reader
// first, so a seed that stops being valid fails here rather than silently
// seeding nothing. MODELS_DIR/stories260K.bin (when present) becomes the
// palettized .lutra seeds; VOCAB_DIR/*.gguf cut-down vocabularies.
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <dirent.h>
#include <sys/stat.h>

#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

#include "examples/engine.h"
#include "lutra/format/gguf.h"
#include "lutra/format/gguf_writer.h"
#include "lutra/format/llama_model.h"
#include "lutra/format/lora.h"
#include "lutra/format/lora_file.h"
#include "lutra/format/lutra_file.h"
#include "lutra/format/tokenizer.h"

namespace {

using namespace lutra;
using namespace lutra::engine;

int failures = 0;

void Fail(const std::string& what, const Status& s) {
  fprintf(stderr, "make_seeds: %s: %s\n", what.c_str(), s.message().c_str());
  ++failures;
}

bool WriteBytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  FILE* f = fopen(path.c_str(), "wb");
  if (f == nullptr) return false;
  const bool ok = fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  return fclose(f) == 0 && ok;
}

template <class T>
void Put(std::vector<uint8_t>* out, T v) {
  const uint8_t* p = reinterpret_cast<const uint8_t*>(&v);
  out->insert(out->end(), p, p + sizeof(T));
}

// GGUF metadata of every value type, nested arrays and tensors of the types
// the reader converts.
void GgufSeeds(const std::string& dir) {
  GgufWriter g(3);
  g.AddU8("general.u8", 200);
  g.AddI8("general.i8", -100);
  g.AddU16("general.u16", 60000);
  g.AddI16("general.i16", -30000);
  g.AddU32("general.alignment", 64);
  g.AddI32("llama.block_count", 2);
  g.AddU64("general.u64", uint64_t{1} << 40);
  g.AddI64("general.i64", -(int64_t{1} << 40));
  g.AddF32("llama.rope.freq_base", 10000.0f);
  g.AddF64("general.f64", 0.25);
  g.AddBool("general.bool", true);
  g.AddString("general.architecture", "llama");
  g.AddStringArray("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", " a", "b"});
  g.AddF32Array("tokenizer.ggml.scores", {0.f, 0.f, 0.f, -1.f, -2.f});
  g.AddI32Array("tokenizer.ggml.token_type", {2, 3, 3, 1, 1});
  std::vector<float> x(64);
  for (size_t i = 0; i < x.size(); ++i) x[i] = float(i) * 0.25f - 4.0f;
  g.AddTensorF32("f32", {8, 8}, x.data(), GgmlType::kF32);
  g.AddTensorF32("f16", {16, 4}, x.data(), GgmlType::kF16);
  g.AddTensorF32("bf16", {64}, x.data(), GgmlType::kBF16);
  g.AddTensorF32("q8_0", {32, 2}, x.data(), GgmlType::kQ8_0);
  g.AddTensorF32("q4_0", {64, 1}, x.data(), GgmlType::kQ4_0);
  StatusOr<std::vector<uint8_t>> bytes = g.Finish();
  if (!bytes.ok()) return Fail("gguf seed", bytes.status());
  StatusOr<GgufReader> back = GgufReader::Parse(bytes->data(), bytes->size());
  if (!back.ok()) return Fail("gguf seed", back.status());
  WriteBytes(dir + "/types.gguf", *bytes);
}

// A llama2.c checkpoint of the smallest shape the loader takes.
void Llama2cSeeds(const std::string& dir) {
  for (bool shared : {true, false}) {
    const int32_t dim = 8, hidden = 16, layers = 1, heads = 2, kv_heads = 1, vocab = 16,
                  seq = 4;
    std::vector<uint8_t> out;
    for (int32_t v : {dim, hidden, layers, heads, kv_heads, shared ? vocab : -vocab, seq}) {
      Put(&out, v);
    }
    const size_t head = dim / heads, kv = kv_heads * head;
    const size_t floats = vocab * dim + layers * dim + layers * dim * dim +
                          2 * layers * kv * dim + layers * dim * dim + layers * dim +
                          3 * layers * hidden * dim + dim + seq * head +
                          (shared ? 0 : vocab * dim);
    for (size_t i = 0; i < floats; ++i) Put(&out, float(int(i % 17) - 8) * 0.125f);
    StatusOr<ModelWeightsF32> back =
        LoadLlama2cModel(MappedFile::FromBuffer(std::vector<uint8_t>(out), "seed.bin"));
    if (!back.ok()) return Fail("llama2c seed", back.status());
    WriteBytes(dir + (shared ? "/tiny_shared.bin" : "/tiny_unshared.bin"), out);
  }
}

// A llama2.c tokenizer.bin: the three specials, the 256 byte pieces and a
// few merged words.
void TokenizerSeeds(const std::string& dir) {
  std::vector<std::string> pieces = {"<unk>", "\n<s>\n", "\n</s>\n"};
  for (int b = 0; b < 256; ++b) {
    char s[8];
    snprintf(s, sizeof(s), "<0x%02X>", b);
    pieces.push_back(s);
  }
  for (const char* w : {" ", "e", " t", "he", " the", " a", "ll", "o", " w", "or", "ld"}) {
    pieces.push_back(w);
  }
  std::vector<uint8_t> out;
  Put(&out, int32_t{8});
  for (size_t i = 0; i < pieces.size(); ++i) {
    Put(&out, i < 259 ? 0.0f : -float(i));
    Put(&out, static_cast<int32_t>(pieces[i].size()));
    out.insert(out.end(), pieces[i].begin(), pieces[i].end());
  }
  StatusOr<Tokenizer> back = Tokenizer::FromLlama2cBytes(out.data(), out.size());
  if (!back.ok()) return Fail("tokenizer seed", back.status());
  WriteBytes(dir + "/bytes_and_words.bin", out);
}

// Adapters for lora_fuzz.cc's base shapes: one target and several, f32 and
// f16, uniform and per-target scales, both kinds.
void LoraSeeds(const std::string& dir) {
  const BaseShapes base = BaseShapes::Llama(2, 16, 48, 16, 8);
  struct Seed {
    const char* name;
    ElementType type;
    size_t targets;
    size_t rank;
    bool mixed_scales;
  };
  const Seed seeds[] = {{"one_f32", ElementType::kF32, 1, 1, false},
                        {"three_f16", ElementType::kF16, 3, 2, false},
                        {"mixed_scales_f32", ElementType::kF32, 4, 2, true}};
  for (const Seed& s : seeds) {
    StatusOr<Adapter> a = Adapter::Create(s.name, base);
    if (!a.ok()) return Fail("lora seed", a.status());
    if (s.mixed_scales) a->set_kind("recovery");
    for (size_t t = 0; t < s.targets; ++t) {
      const Projection p = kAllProjections[(t * 3) % kNumProjections];
      const size_t layer = t % base.num_layers;
      std::vector<float> fa(s.rank * base.Cols(p)), fb(base.Rows(p) * s.rank);
      for (size_t i = 0; i < fa.size(); ++i) fa[i] = float(int(i % 7) - 3) * 0.5f;
      for (size_t i = 0; i < fb.size(); ++i) fb[i] = float(int(i % 5) - 2) * 0.25f;
      const float scale = s.mixed_scales ? 0.5f + float(t) : 2.0f;
      Status st = a->AddF32(layer, p, s.rank, fa.data(), fb.data(), scale, s.type);
      if (!st.ok()) return Fail("lora seed", st);
    }
    StatusOr<std::vector<uint8_t>> bytes = SerializeAdapter(*a);
    if (!bytes.ok()) return Fail("lora seed", bytes.status());
    LoadAdapterOptions o;
    o.f32_storage = ElementType::kF32;
    StatusOr<Adapter> back = ParseAdapterBytes(bytes->data(), bytes->size(), base, o);
    if (!back.ok()) return Fail("lora seed", back.status());
    WriteBytes(dir + "/" + s.name + ".gguf", *bytes);
  }
}

// A vocabulary GGUF (llama.cpp's ggml-vocab-*.gguf) cut to its first
// `keep` tokens plus every non-normal one (control, user-defined, byte),
// renumbered in order, with the merges among the kept pieces. The full
// files are 0.7-4 MB, which libFuzzer would truncate to its 1 MB input
// limit and parse at ~20 execs/s; cut, they keep each tokenizer's model,
// pre-tokenizer, specials and merge structure at ~30 KB.
Status TrimVocab(const std::string& in, const std::string& out, size_t keep) {
  StatusOr<GgufFile> file = GgufFile::Open(in);
  if (!file.ok()) return file.status();
  const GgufReader& g = file->reader();
  StatusOr<std::vector<std::string_view>> tokens = g.GetStringArray("tokenizer.ggml.tokens");
  if (!tokens.ok()) return tokens.status();
  std::vector<int64_t> types;
  if (g.Find("tokenizer.ggml.token_type") != nullptr) {
    StatusOr<std::vector<int64_t>> t = g.GetIntArray("tokenizer.ggml.token_type");
    if (!t.ok()) return t.status();
    types = std::move(*t);
  }
  std::vector<int64_t> new_id(tokens->size(), -1);
  std::vector<size_t> kept;
  for (size_t i = 0; i < tokens->size(); ++i) {
    const bool normal = i >= types.size() || types[i] == 1;
    if (i < keep || !normal) {
      new_id[i] = static_cast<int64_t>(kept.size());
      kept.push_back(i);
    }
  }
  std::unordered_set<std::string_view> pieces;
  for (size_t i : kept) pieces.insert((*tokens)[i]);
  GgufWriter w(3);
  for (const GgufKeyValue& kv : g.metadata()) {
    const std::string key(kv.key);
    const GgufValue& v = kv.value;
    if (key == "tokenizer.ggml.tokens") {
      std::vector<std::string> t;
      for (size_t i : kept) t.emplace_back((*tokens)[i]);
      w.AddStringArray(key, t);
    } else if (key == "tokenizer.ggml.token_type") {
      std::vector<int32_t> t;
      for (size_t i : kept) t.push_back(static_cast<int32_t>(types[i]));
      w.AddI32Array(key, t);
    } else if (key == "tokenizer.ggml.scores") {
      StatusOr<std::vector<float>> sc = g.GetF32Array(key);
      if (!sc.ok()) return sc.status();
      std::vector<float> t;
      for (size_t i : kept) t.push_back(i < sc->size() ? (*sc)[i] : 0.0f);
      w.AddF32Array(key, t);
    } else if (key == "tokenizer.ggml.merges") {
      StatusOr<std::vector<std::string_view>> merges = g.GetStringArray(key);
      if (!merges.ok()) return merges.status();
      std::vector<std::string> t;
      for (std::string_view m : *merges) {
        const size_t space = m.size() > 1 ? m.find(' ', 1) : std::string_view::npos;
        if (space == std::string_view::npos) continue;
        const std::string left(m.substr(0, space)), right(m.substr(space + 1));
        if (pieces.count(left) && pieces.count(right) && pieces.count(left + right)) {
          t.emplace_back(m);
        }
      }
      w.AddStringArray(key, t);
    } else if (key.size() > 9 && key.compare(key.size() - 9, 9, "_token_id") == 0) {
      StatusOr<int64_t> id = g.GetInt(key);
      if (!id.ok()) return id.status();
      if (*id >= 0 && static_cast<size_t>(*id) < new_id.size() && new_id[*id] >= 0) {
        w.AddU32(key, static_cast<uint32_t>(new_id[*id]));
      }
    } else if (v.type == GgufValueType::kString) {
      w.AddString(key, std::string(v.str()));
    } else if (v.type == GgufValueType::kBool) {
      w.AddBool(key, *g.GetBool(key));
    } else if (v.type == GgufValueType::kF32 || v.type == GgufValueType::kF64) {
      w.AddF64(key, *g.GetF64(key));
    } else if (v.is_integer()) {
      StatusOr<int64_t> x = g.GetInt(key);
      if (x.ok()) w.AddI64(key, *x);
    } else if (v.type == GgufValueType::kArray && v.array_type == GgufValueType::kString) {
      StatusOr<std::vector<std::string_view>> a = g.GetStringArray(key);
      if (!a.ok()) return a.status();
      w.AddStringArray(key, std::vector<std::string>(a->begin(), a->end()));
    } else if (v.type == GgufValueType::kArray) {
      w.AddArray(key, v.array_type, v.data, v.count);
    }
  }
  StatusOr<std::vector<uint8_t>> bytes = w.Finish();
  if (!bytes.ok()) return bytes.status();
  StatusOr<GgufReader> back = GgufReader::Parse(bytes->data(), bytes->size());
  if (!back.ok()) return back.status();
  StatusOr<Tokenizer> tok = Tokenizer::FromGguf(*back);
  if (!tok.ok()) return tok.status();
  if (!WriteBytes(out, *bytes)) return DataLoss("cannot write %s", out.c_str());
  return Status::Ok();
}

void VocabSeeds(const std::string& dir, const std::string& vocab_dir) {
  DIR* d = opendir(vocab_dir.c_str());
  if (d == nullptr) {
    fprintf(stderr, "make_seeds: %s absent: no vocabulary seeds\n", vocab_dir.c_str());
    return;
  }
  while (dirent* e = readdir(d)) {
    const std::string name = e->d_name;
    if (name.size() < 5 || name.compare(name.size() - 5, 5, ".gguf") != 0) continue;
    Status s = TrimVocab(vocab_dir + "/" + name, dir + "/cut-" + name, 1000);
    if (!s.ok()) Fail("vocabulary seed " + name, s);
  }
  closedir(d);
}

// stories260K palettized (random-free: plain k-means, no calibration) at
// two widths and group sizes, with its tokenizer, as lutra-generate writes
// .lutra files.
void LutraSeeds(const std::string& dir, const std::string& models) {
  const std::string bin = models + "/stories260K.bin";
  struct stat st;
  if (stat(bin.c_str(), &st) != 0) {
    fprintf(stderr, "make_seeds: %s absent: no .lutra seeds from it\n", bin.c_str());
    return;
  }
  StatusOr<Model> f32 = OpenModel(bin, LoadOptions());
  if (!f32.ok()) return Fail("lutra seed", f32.status());
  StatusOr<std::shared_ptr<const Tokenizer>> tok = LoadTokenizer(models + "/tok512.bin", *f32);
  if (!tok.ok()) return Fail("lutra seed", tok.status());
  struct Width {
    int bits;
    size_t group;
  };
  for (Width w : {Width{4, 16}, Width{2, 1}}) {
    LoadOptions o;
    o.bits = w.bits;
    o.group = w.group;
    o.calibrate = false;
    o.gptq = false;
    StatusOr<Model> q = PalettizeModel(*f32, o, 1);
    if (!q.ok()) return Fail("lutra seed", q.status());
    const std::string path = dir + "/stories260K_q" + std::to_string(w.bits) + "g" +
                             std::to_string(w.group) + ".lutra";
    Status s = SaveLutraModel(*q, tok->get(), path);
    if (!s.ok()) return Fail("lutra seed", s);
    StatusOr<Model> back = OpenModel(path, LoadOptions());
    if (!back.ok()) return Fail("lutra seed", back.status());
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 && argc != 4) {
    fprintf(stderr, "usage: make_seeds OUT_DIR MODELS_DIR [VOCAB_DIR]\n");
    return 2;
  }
  const std::string out = argv[1];
  for (const char* h : {"gguf", "llama2c", "tokenizer", "gguf_model", "lora", "lutra"}) {
    mkdir((out + "/" + h).c_str(), 0755);
  }
  GgufSeeds(out + "/gguf");
  Llama2cSeeds(out + "/llama2c");
  TokenizerSeeds(out + "/tokenizer");
  LoraSeeds(out + "/lora");
  LutraSeeds(out + "/lutra", argv[2]);
  if (argc == 4) VocabSeeds(out + "/gguf_model", argv[3]);
  return failures == 0 ? 0 : 1;
}
