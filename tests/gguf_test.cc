// GGUF reader: the real stories260K.gguf, writer round trips of every value
// and tensor type, and rejection of corrupt files (every truncation, bad
// magic/version, huge counts and lengths, bad types, dims overflow, offsets
// out of range, misalignment, duplicates, random byte flips) with messages
// that name the problem. No SIMD here, so no per-target loop.
#include "lutra/format/gguf.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "hwy/base.h"  // reference F32FromF16 / F32FromBF16
#include "lutra/format/gguf_writer.h"
#include "lutra/format/mapped_file.h"
#include "tests/test_util.h"

namespace lutra {
namespace {

using test::Contains;

// Expects Parse to fail with `code` and a message containing `needle`.
void ExpectParseError(const std::vector<uint8_t>& bytes, StatusCode code,
                      const std::string& needle) {
  StatusOr<GgufReader> g = GgufReader::Parse(bytes.data(), bytes.size());
  INFO("expected error containing: " << needle);
  REQUIRE(!g.ok());
  INFO("got: " << g.status().message());
  CHECK(g.status().code() == code);
  CHECK(Contains(g.status().message(), needle));
  CHECK(g.status().message().rfind("gguf: ", 0) == 0);
}

template <class T>
void Patch(std::vector<uint8_t>& bytes, size_t at, T value) {
  REQUIRE(at + sizeof(T) <= bytes.size());
  std::memcpy(bytes.data() + at, &value, sizeof(T));
}

// A small file with every metadata type and three tensors of different types.
std::vector<uint8_t> SmallFile(GgufLayout* layout = nullptr, uint32_t version = 3) {
  GgufWriter w(version);
  w.AddString("general.architecture", "llama");
  w.AddU8("t.u8", 200);
  w.AddI8("t.i8", -100);
  w.AddU16("t.u16", 60000);
  w.AddI16("t.i16", -30000);
  w.AddU32("t.u32", 4000000000u);
  w.AddI32("t.i32", -2000000000);
  w.AddU64("t.u64", 0xFFFFFFFFFFFFFFFFull);
  w.AddI64("t.i64", -5000000000ll);
  w.AddF32("t.f32", 1.5f);
  w.AddF64("t.f64", -2.25);
  w.AddBool("t.bool", true);
  w.AddString("t.empty", "");
  w.AddStringArray("t.strings", {"a", "", "\xE2\x96\x81hello", "<0x0A>"});
  const std::vector<float> fa = {1.0f, -2.0f, 3.5f};
  w.AddF32Array("t.f32s", fa);
  const std::vector<int32_t> ia = {1, -1, 7};
  w.AddI32Array("t.i32s", ia);
  const uint16_t u16s[2] = {1, 65535};
  w.AddArray("t.u16s", GgufValueType::kU16, u16s, 2);
  w.AddArray("t.none", GgufValueType::kU8, nullptr, 0);
  std::vector<float> a(3 * 5), b(64), c(32 * 2);
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>(i) - 7.0f;
  for (size_t i = 0; i < b.size(); ++i) b[i] = 0.25f * static_cast<float>(i);
  for (size_t i = 0; i < c.size(); ++i) c[i] = std::sin(static_cast<float>(i));
  w.AddTensorF32("a.weight", {5, 3}, a.data());
  w.AddTensorF32("b.weight", {64}, b.data(), GgmlType::kF16);
  w.AddTensorF32("c.weight", {32, 2}, c.data(), GgmlType::kQ8_0);
  StatusOr<std::vector<uint8_t>> bytes = w.Finish(layout);
  REQUIRE(bytes.ok());
  return std::move(*bytes);
}

TEST_CASE("GGUF writer round trip: every metadata type") {
  for (uint32_t version : {2u, 3u}) {
    const std::vector<uint8_t> bytes = SmallFile(nullptr, version);
    StatusOr<GgufReader> g = GgufReader::Parse(bytes.data(), bytes.size());
    INFO(g.status().message());
    REQUIRE(g.ok());
    CHECK(g->version() == version);
    CHECK(g->metadata().size() == 18);
    CHECK(g->tensors().size() == 3);
    CHECK(*g->GetString("general.architecture") == "llama");
    CHECK(*g->GetInt("t.u8") == 200);
    CHECK(*g->GetInt("t.i8") == -100);
    CHECK(*g->GetInt("t.u16") == 60000);
    CHECK(*g->GetInt("t.i16") == -30000);
    CHECK(*g->GetU32("t.u32") == 4000000000u);
    CHECK(*g->GetI32("t.i32") == -2000000000);
    CHECK(*g->GetU64("t.u64") == 0xFFFFFFFFFFFFFFFFull);
    CHECK(*g->GetInt("t.i64") == -5000000000ll);
    CHECK(*g->GetF32("t.f32") == 1.5f);
    CHECK(*g->GetF64("t.f64") == -2.25);
    CHECK(*g->GetF32("t.f64") == -2.25f);  // f64 narrows
    CHECK(*g->GetBool("t.bool") == true);
    CHECK(g->GetString("t.empty")->empty());
    const auto strs = g->GetStringArray("t.strings");
    REQUIRE(strs.ok());
    REQUIRE(strs->size() == 4);
    CHECK((*strs)[0] == "a");
    CHECK((*strs)[1].empty());
    CHECK((*strs)[2] == "\xE2\x96\x81hello");
    CHECK((*strs)[3] == "<0x0A>");
    CHECK(*g->GetF32Array("t.f32s") == std::vector<float>{1.0f, -2.0f, 3.5f});
    CHECK(*g->GetIntArray("t.i32s") == std::vector<int64_t>{1, -1, 7});
    CHECK(*g->GetIntArray("t.u16s") == std::vector<int64_t>{1, 65535});
    CHECK(g->GetIntArray("t.none")->empty());
    StatusOr<GgufValue> arr = g->GetArray("t.u16s");
    REQUIRE(arr.ok());
    CHECK(arr->array_type == GgufValueType::kU16);
    CHECK(arr->count == 2);

    // Defaults apply only to missing keys.
    CHECK(*g->GetU32("missing", 7) == 7u);
    CHECK(*g->GetF32("missing", 0.5f) == 0.5f);
    CHECK(*g->GetString("missing", "x") == "x");
    CHECK(*g->GetBool("missing", false) == false);
    // Errors name the key and the types.
    StatusOr<uint32_t> missing = g->GetU32("missing");
    CHECK(missing.status().code() == StatusCode::kNotFound);
    CHECK(missing.status().message() == "gguf: missing key 'missing'");
    StatusOr<uint32_t> wrong = g->GetU32("t.f32", 3);
    REQUIRE(!wrong.ok());
    CHECK(wrong.status().message() == "gguf: key 't.f32' has type f32, expected an integer");
    StatusOr<uint32_t> range = g->GetU32("t.i8");
    REQUIRE(!range.ok());
    CHECK(range.status().message() == "gguf: key 't.i8' = -100 does not fit in u32");
    CHECK(!g->GetI32("t.u32").ok());
    CHECK(!g->GetInt("t.u64").ok());  // > INT64_MAX
    CHECK(Contains(g->GetString("t.u8").status().message(), "has type u8, expected string"));
    CHECK(Contains(g->GetStringArray("t.f32s").status().message(),
                   "is an array of f32, expected an array of string"));
    CHECK(Contains(g->GetF32Array("t.i32s").status().message(), "expected an array of f32"));
    CHECK(Contains(g->GetIntArray("t.strings").status().message(),
                   "expected an array of integer"));
    CHECK(Contains(g->GetArray("t.u8").status().message(), "expected array"));
    CHECK(g->GetTensor("nope").status().message() == "gguf: no tensor 'nope'");
  }
}

TEST_CASE("GGUF tensors: infos, alignment, conversion of every supported type") {
  test::Rng rng(1234);
  const std::vector<uint64_t> ne = {64, 3};
  const std::vector<float> x = rng.GaussianVector(64 * 3);
  for (uint32_t align : {1u, 8u, 32u, 64u}) {
    GgufWriter w;
    if (align != 32) w.AddU32("general.alignment", align);
    const GgmlType types[] = {GgmlType::kF32, GgmlType::kF16, GgmlType::kBF16, GgmlType::kQ8_0,
                              GgmlType::kQ4_0};
    for (GgmlType t : types) {
      w.AddTensorF32(std::string("t.") + GgmlTypeName(static_cast<uint32_t>(t)), ne, x.data(), t);
    }
    // A 1-element odd-sized tensor forces padding between tensors.
    const float one = 3.0f;
    w.AddTensorF32("odd", {1}, &one, GgmlType::kF16);
    w.AddTensorF32("after_odd", ne, x.data());
    GgufLayout layout;
    StatusOr<std::vector<uint8_t>> bytes = w.Finish(&layout);
    REQUIRE(bytes.ok());
    // Copy into storage that is 64-aligned so data alignment is testable.
    std::vector<uint64_t> storage((bytes->size() + 7) / 8);
    std::memcpy(storage.data(), bytes->data(), bytes->size());
    const uint8_t* base = reinterpret_cast<const uint8_t*>(storage.data());
    StatusOr<GgufReader> g = GgufReader::Parse(base, bytes->size());
    INFO("alignment " << align << ": " << g.status().message());
    REQUIRE(g.ok());
    CHECK(g->alignment() == align);
    CHECK(g->data_offset() == layout.data_offset);
    CHECK(g->data_offset() % align == 0);
    for (const GgufTensorInfo& t : g->tensors()) {
      INFO("tensor " << std::string(t.name));
      CHECK((t.data - base) % align == 0);
      CHECK(t.offset % align == 0);
      if (t.name == "odd") {
        CHECK(*TensorToF32(t) == std::vector<float>{3.0f});
        continue;
      }
      CHECK(t.n_dims == 2);
      CHECK(t.ne[0] == 64);
      CHECK(t.ne[1] == 3);
      CHECK(t.n_elements == 192);
      CHECK(t.n_rows() == 3);
      StatusOr<std::vector<float>> all = TensorToF32(t);
      REQUIRE(all.ok());
      // Per-type error bound relative to the block's largest magnitude.
      double rel = 0.0;
      switch (t.ggml_type()) {
        case GgmlType::kF32: rel = 0.0; break;
        case GgmlType::kF16: rel = 1.0 / 2048; break;          // 11-bit significand
        case GgmlType::kBF16: rel = 1.0 / 256; break;          // 8-bit significand
        case GgmlType::kQ8_0: rel = 0.5 / 127 + 1.0 / 2048; break;  // half a step + f16 scale
        case GgmlType::kQ4_0: rel = 1.0 / 8 + 1.0 / 1024; break;  // ~ one step of 16 levels
        default: FAIL("unexpected type");
      }
      for (size_t blk = 0; blk < x.size() / 32; ++blk) {
        double amax = 0.0;
        // std::max, not std::fmax: aarch64 GCC 12.2 crashes (ICE in
        // vect_transform_reduction) vectorizing an fmax reduction that widens
        // float to double. Same result here: no NaNs in x.
        for (size_t j = 0; j < 32; ++j) amax = std::max(amax, double(std::fabs(x[blk * 32 + j])));
        for (size_t j = 0; j < 32; ++j) {
          const size_t i = blk * 32 + j;
          const double tol = t.ggml_type() == GgmlType::kF16 || t.ggml_type() == GgmlType::kBF16
                                 ? rel * std::fabs(x[i]) + 1e-7
                                 : rel * amax + 1e-7;
          if (std::fabs((*all)[i] - x[i]) > tol) {
            FAIL(t.type_name() << " element " << i << ": " << (*all)[i] << " vs " << x[i]);
          }
        }
      }
      // Row conversion equals the corresponding slice of the whole tensor.
      std::vector<float> row(64);
      for (uint64_t r = 0; r < 3; ++r) {
        REQUIRE(TensorRowToF32(t, r, row.data()).ok());
        CHECK(std::equal(row.begin(), row.end(), all->begin() + r * 64));
      }
      const Status oob = TensorRowToF32(t, 3, row.data());
      CHECK(oob.code() == StatusCode::kOutOfRange);
      CHECK(Contains(oob.message(), "row 3 of tensor"));
      std::vector<float> small(10);
      CHECK(Contains(TensorToF32(t, small.data(), small.size()).message(),
                     "has 192 elements, output holds 10"));
    }
  }
}

TEST_CASE("GGUF: f16 and bf16 bit conversions are exact for all 65536 inputs") {
  size_t nans = 0;
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    const float want = hwy::F32FromF16(hwy::BitCastScalar<hwy::float16_t>(h));
    const float got = F32FromF16Bits(h);
    if (std::isnan(want)) {
      ++nans;
      CHECK(std::isnan(got));
      continue;
    }
    uint32_t a, b;
    std::memcpy(&a, &got, 4);
    std::memcpy(&b, &want, 4);
    if (a != b) FAIL("f16 bits 0x" << std::hex << bits << ": " << got << " vs " << want);
    const float bf_want = hwy::F32FromBF16(hwy::BitCastScalar<hwy::bfloat16_t>(h));
    const float bf_got = F32FromBF16Bits(h);
    std::memcpy(&a, &bf_got, 4);
    std::memcpy(&b, &bf_want, 4);
    if (a != b && !std::isnan(bf_want)) FAIL("bf16 bits 0x" << std::hex << bits);
  }
  CHECK(nans == 2 * 1023);  // exponent all ones, mantissa != 0, both signs
  CHECK(F32FromF16Bits(0x0001) == std::ldexp(1.0f, -24));  // smallest subnormal
  CHECK(F32FromF16Bits(0x7BFF) == 65504.0f);               // largest normal
  CHECK(std::isinf(F32FromF16Bits(0xFC00)));
  CHECK(F32FromF16Bits(0xFC00) < 0.0f);
  CHECK(std::signbit(F32FromF16Bits(0x8000)));             // -0
}

TEST_CASE("GGUF writer: views, streaming WriteFile and its errors") {
  std::vector<float> big(4096 + 3);
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<float>(i) * 0.5f;
  GgufWriter w;
  w.AddU32("general.alignment", 64);
  w.AddString("name", "view test");
  w.AddTensorView("view", GgmlType::kF32, {big.size()}, big.data(), big.size() * 4);
  w.AddTensorF32("copy", {3}, big.data());
  w.AddTensorView("empty", GgmlType::kF32, {0}, big.data(), 0);
  w.AddTensorF32("last", {32}, big.data(), GgmlType::kQ8_0);
  StatusOr<std::vector<uint8_t>> mem = w.Finish();
  REQUIRE(mem.ok());
  const std::string path = test::TempPath("writer.gguf");
  REQUIRE(w.WriteFile(path).ok());
  StatusOr<MappedFile> file = MappedFile::Open(path);
  REQUIRE(file.ok());
  REQUIRE(file->size() == mem->size());
  CHECK(std::memcmp(file->data(), mem->data(), mem->size()) == 0);
  StatusOr<GgufReader> g = GgufReader::Parse(file->data(), file->size());
  REQUIRE(g.ok());
  CHECK(*TensorToF32(*g->FindTensor("view")) == big);
  CHECK(g->FindTensor("empty")->n_bytes == 0);
  CHECK(TensorToF32(*g->FindTensor("empty"))->empty());
  std::remove(path.c_str());

  // Errors are recorded and returned by Finish/WriteFile.
  GgufWriter bad;
  bad.AddU32("k", 1);
  bad.AddU32("k", 2);
  CHECK(bad.Finish().status().message() == "gguf writer: duplicate key 'k'");
  GgufWriter bad2;
  bad2.AddTensor("t", GgmlType::kQ8_0, {31}, big.data(), 34);
  CHECK(Contains(bad2.Finish().status().message(), "gguf writer: tensor 't' of 34 bytes"));
  CHECK(!bad2.WriteFile(path).ok());
  GgufWriter bad3;
  bad3.AddTensorF32("t", {4}, big.data());
  bad3.AddTensorF32("t", {4}, big.data());
  CHECK(bad3.Finish().status().message() == "gguf writer: duplicate tensor 't'");
  GgufWriter bad4;
  bad4.AddTensorF32("t", {256}, big.data(), GgmlType::kQ4_K);
  CHECK(bad4.Finish().status().message() ==
        "gguf writer: no encoder for q4_K (tensor 't')");
  GgufWriter ok;
  CHECK(Contains(ok.WriteFile("/nonexistent-dir/x.gguf").message(),
                 "gguf writer: cannot create '/nonexistent-dir/x.gguf'"));
}

TEST_CASE("MappedFile: empty files, directories, buffers, moves") {
  const std::string path = test::TempPath("empty");
  std::FILE* f = std::fopen(path.c_str(), "wb");
  REQUIRE(f != nullptr);
  std::fclose(f);
  for (MappedFile::Mode mode : {MappedFile::Mode::kMapOrRead, MappedFile::Mode::kRead}) {
    StatusOr<MappedFile> empty = MappedFile::Open(path, mode);
    REQUIRE(empty.ok());
    CHECK(empty->size() == 0);
    CHECK(GgufReader::Parse(empty->data(), empty->size()).status().message() ==
          "gguf: truncated at offset 0 reading magic (need 4 bytes, 0 left)");
  }
  std::remove(path.c_str());
  StatusOr<MappedFile> dir = MappedFile::Open(".");
  REQUIRE(!dir.ok());
  CHECK(dir.status().message() == "open '.': is a directory");
  // Moves keep the bytes at the same address (readers hold pointers).
  MappedFile a = MappedFile::FromBuffer({1, 2, 3}, "buf");
  const uint8_t* p = a.data();
  MappedFile b = std::move(a);
  CHECK(b.data() == p);
  CHECK(b.size() == 3);
  CHECK(b.path() == "buf");
  CHECK(a.data() == nullptr);
  CHECK(a.size() == 0);
}

TEST_CASE("GGUF: unsupported tensor types are recognised and named") {
  // An iq2_xxs tensor (256-element blocks of 66 bytes) parses (its size is
  // known) but converting it says which type and tensor.
  GgufWriter w;
  std::vector<uint8_t> iq2(66 * 2, 0);
  w.AddTensor("blk.0.attn_q.weight", GgmlType::kIQ2_XXS, {256, 2}, iq2.data(), iq2.size());
  StatusOr<std::vector<uint8_t>> bytes = w.Finish();
  REQUIRE(bytes.ok());
  StatusOr<GgufReader> g = GgufReader::Parse(bytes->data(), bytes->size());
  REQUIRE(g.ok());
  const GgufTensorInfo* t = g->FindTensor("blk.0.attn_q.weight");
  REQUIRE(t != nullptr);
  CHECK(std::string(t->type_name()) == "iq2_xxs");
  CHECK(t->n_bytes == 132);
  StatusOr<std::vector<float>> f = TensorToF32(*t);
  REQUIRE(!f.ok());
  CHECK(f.status().code() == StatusCode::kUnimplemented);
  CHECK(Contains(f.status().message(),
                 "unsupported tensor type iq2_xxs for tensor 'blk.0.attn_q.weight'"));
  for (uint32_t id = 0; id < 64; ++id) {
    const GgmlTypeInfo* info = GetGgmlTypeInfo(id);
    if (info == nullptr) continue;
    CHECK(info->block_size >= 1);
    CHECK(info->type_size >= 1);
  }
  CHECK(std::string(GgmlTypeName(8)) == "q8_0");
  CHECK(std::string(GgmlTypeName(30)) == "bf16");
  CHECK(std::string(GgmlTypeName(31)) == "unknown");
}

TEST_CASE("GGUF: LoRA adapter files read like any GGUF") {
  // llama.cpp's convert_lora_to_gguf layout: general.type = adapter,
  // adapter.type = lora, adapter.lora.alpha, and per adapted weight
  // "<name>.lora_a" [in, rank] / "<name>.lora_b" [rank, out] in ggml order.
  const int dim = 64, rank = 4, out = 32;
  test::Rng rng(7);
  const std::vector<float> a = rng.GaussianVector(dim * rank);
  const std::vector<float> b = rng.GaussianVector(rank * out);
  GgufWriter w;
  w.AddString("general.architecture", "llama");
  w.AddString("general.type", "adapter");
  w.AddString("adapter.type", "lora");
  w.AddF32("adapter.lora.alpha", 8.0f);
  w.AddTensorF32("blk.0.attn_k.weight.lora_a", {uint64_t(dim), uint64_t(rank)}, a.data(),
                 GgmlType::kF16);
  w.AddTensorF32("blk.0.attn_k.weight.lora_b", {uint64_t(rank), uint64_t(out)}, b.data(),
                 GgmlType::kF32);
  StatusOr<std::vector<uint8_t>> bytes = w.Finish();
  REQUIRE(bytes.ok());
  StatusOr<GgufFile> f = GgufFile::FromMapped(MappedFile::FromBuffer(*bytes, "adapter.gguf"));
  REQUIRE(f.ok());
  const GgufReader& g = f->reader();
  CHECK(*g.GetString("general.type") == "adapter");
  CHECK(*g.GetString("adapter.type") == "lora");
  CHECK(*g.GetF32("adapter.lora.alpha") == 8.0f);
  const GgufTensorInfo* la = g.FindTensor("blk.0.attn_k.weight.lora_a");
  const GgufTensorInfo* lb = g.FindTensor("blk.0.attn_k.weight.lora_b");
  REQUIRE(la != nullptr);
  REQUIRE(lb != nullptr);
  CHECK(la->ne[0] == uint64_t(dim));
  CHECK(la->ne[1] == uint64_t(rank));
  CHECK(lb->ne[0] == uint64_t(rank));
  CHECK(lb->ne[1] == uint64_t(out));
  CHECK(*TensorToF32(*lb) == b);
}

TEST_CASE("GGUF: the real stories260K.gguf") {
  const std::string dir = test::SharedModelsDir();
  if (dir.empty()) SKIP("shared models not found (../shared/models)");
  for (MappedFile::Mode mode : {MappedFile::Mode::kMapOrRead, MappedFile::Mode::kRead}) {
    StatusOr<MappedFile> file = MappedFile::Open(dir + "/stories260K.gguf", mode);
    REQUIRE(file.ok());
    CHECK(file->is_mapped() == (mode == MappedFile::Mode::kMapOrRead));
    CHECK(file->size() == 1185376);
    StatusOr<GgufFile> gf = GgufFile::FromMapped(std::move(*file));
    INFO(gf.status().message());
    REQUIRE(gf.ok());
    const GgufReader& g = gf->reader();
    CHECK(g.version() == 3);
    CHECK(g.tensors().size() == 48);
    CHECK(g.metadata().size() == 19);
    CHECK(g.alignment() == 32);
    CHECK(*g.GetString("general.architecture") == "llama");
    CHECK(*g.GetU32("llama.embedding_length") == 64);
    CHECK(*g.GetU32("llama.feed_forward_length") == 172);
    CHECK(*g.GetU32("llama.block_count") == 5);
    CHECK(*g.GetU32("llama.attention.head_count") == 8);
    CHECK(*g.GetU32("llama.attention.head_count_kv") == 4);
    CHECK(*g.GetU32("llama.context_length") == 2048);
    CHECK(*g.GetF32("llama.attention.layer_norm_rms_epsilon") == 1e-5f);
    CHECK(g.GetStringArray("tokenizer.ggml.tokens")->size() == 512);
    CHECK(g.GetF32Array("tokenizer.ggml.scores")->size() == 512);
    CHECK(g.GetIntArray("tokenizer.ggml.token_type")->size() == 512);
    const GgufTensorInfo* q = g.FindTensor("blk.0.attn_q.weight");
    REQUIRE(q != nullptr);
    CHECK(q->ShapeString() == "[64, 64]");
    CHECK(q->type == 0);
    const GgufTensorInfo* k = g.FindTensor("blk.4.attn_k.weight");
    REQUIRE(k != nullptr);
    CHECK(k->ShapeString() == "[64, 32]");  // in = 64, out = kv_dim 32
    CHECK(g.FindTensor("blk.2.ffn_down.weight")->ShapeString() == "[172, 64]");
    for (const GgufTensorInfo& t : g.tensors()) {
      CHECK(reinterpret_cast<uintptr_t>(t.data) % 4 == 0);
      CHECK(t.data + t.n_bytes <= g.file_data() + g.file_size());
    }
    // The last tensor ends exactly at the end of the file.
    const GgufTensorInfo& last = g.tensors().back();
    CHECK(last.data + last.n_bytes == g.file_data() + g.file_size());
  }
  StatusOr<MappedFile> none = MappedFile::Open(dir + "/does-not-exist.gguf");
  REQUIRE(!none.ok());
  CHECK(none.status().code() == StatusCode::kNotFound);
  CHECK(Contains(none.status().message(), "does-not-exist.gguf': No such file or directory"));
  StatusOr<MappedFile> directory = MappedFile::Open(dir);
  CHECK(!directory.ok());
}

TEST_CASE("GGUF corrupt: every truncation of a small file is rejected") {
  const std::vector<uint8_t> full = SmallFile();
  REQUIRE(GgufReader::Parse(full.data(), full.size()).ok());
  for (size_t n = 0; n < full.size(); ++n) {
    // Exact-size heap copies so ASan catches any read past the prefix.
    std::vector<uint8_t> prefix(full.begin(), full.begin() + static_cast<ptrdiff_t>(n));
    StatusOr<GgufReader> g = GgufReader::Parse(prefix.data(), prefix.size());
    INFO("prefix of " << n << " bytes");
    REQUIRE(!g.ok());
    CHECK(g.status().code() == StatusCode::kDataLoss);
    CHECK(g.status().message().rfind("gguf: ", 0) == 0);
  }
  // Spot-check the messages at a few cut points.
  ExpectParseError(std::vector<uint8_t>(full.begin(), full.begin() + 2), StatusCode::kDataLoss,
                   "gguf: truncated at offset 0 reading magic (need 4 bytes, 2 left)");
  ExpectParseError(std::vector<uint8_t>(full.begin(), full.begin() + 20), StatusCode::kDataLoss,
                   "reading metadata count");
  ExpectParseError(std::vector<uint8_t>(full.begin(), full.end() - 1), StatusCode::kDataLoss,
                   "gguf: tensor 'c.weight' data [offset");
}

TEST_CASE("GGUF corrupt: coarse grid of truncations of the real file") {
  const std::string dir = test::SharedModelsDir();
  if (dir.empty()) SKIP("shared models not found (../shared/models)");
  StatusOr<MappedFile> file = MappedFile::Open(dir + "/stories260K.gguf");
  REQUIRE(file.ok());
  const size_t size = file->size();
  size_t checked = 0;
  for (size_t n = 0; n < size; n += (n < 14400 ? 29 : 9973)) {
    std::vector<uint8_t> prefix(file->data(), file->data() + n);
    StatusOr<GgufReader> g = GgufReader::Parse(prefix.data(), prefix.size());
    INFO("prefix of " << n << " bytes: " << g.status().message());
    REQUIRE(!g.ok());
    CHECK(g.status().message().rfind("gguf: ", 0) == 0);
    ++checked;
  }
  CHECK(checked > 500);
}

TEST_CASE("GGUF corrupt: header fields") {
  GgufLayout lay;
  const std::vector<uint8_t> good = SmallFile(&lay);
  std::vector<uint8_t> b;

  b = good;
  b[0] = 'X';
  ExpectParseError(b, StatusCode::kDataLoss, "gguf: bad magic 'XGUF', expected 'GGUF'");
  b = good;
  Patch<uint32_t>(b, 4, 1);
  ExpectParseError(b, StatusCode::kUnimplemented, "version 1 is not supported");
  b = good;
  Patch<uint32_t>(b, 4, 4);
  ExpectParseError(b, StatusCode::kDataLoss, "gguf: unknown version 4 (supported: 2, 3)");
  b = good;
  Patch<uint32_t>(b, 4, 0x03000000u);
  ExpectParseError(b, StatusCode::kUnimplemented, "big-endian GGUF");

  b = good;
  Patch<uint64_t>(b, 8, uint64_t{1} << 62);
  ExpectParseError(b, StatusCode::kDataLoss, "gguf: tensor count 4611686018427387904 is implausible");
  b = good;
  Patch<uint64_t>(b, 8, 1000);  // under the cap, but cannot fit in the file
  ExpectParseError(b, StatusCode::kDataLoss, "tensor count 1000 is implausible");
  b = good;
  Patch<uint64_t>(b, 16, ~uint64_t{0});
  ExpectParseError(b, StatusCode::kDataLoss, "metadata count 18446744073709551615 is implausible");
  b = good;
  Patch<uint64_t>(b, 16, 19);  // one more entry than present: runs into tensor infos
  {
    StatusOr<GgufReader> g = GgufReader::Parse(b.data(), b.size());
    REQUIRE(!g.ok());
    INFO(g.status().message());
    CHECK(g.status().message().rfind("gguf: ", 0) == 0);
  }
}

TEST_CASE("GGUF corrupt: metadata strings, arrays and types") {
  GgufLayout lay;
  const std::vector<uint8_t> good = SmallFile(&lay);
  std::vector<uint8_t> b;
  // Entry 0 is general.architecture (string), 13 is t.strings (array of string),
  // 14 is t.f32s (array of f32).
  b = good;
  Patch<uint64_t>(b, lay.metadata[0].begin, uint64_t{1} << 60);
  ExpectParseError(b, StatusCode::kDataLoss,
                   "gguf: key of metadata entry 0 length 1152921504606846976 at offset 24 "
                   "exceeds the");
  b = good;
  Patch<uint64_t>(b, lay.metadata[0].value, ~uint64_t{0});
  ExpectParseError(b, StatusCode::kDataLoss,
                   "string value of 'general.architecture' length 18446744073709551615");
  b = good;
  Patch<uint32_t>(b, lay.metadata[1].type, 13);
  ExpectParseError(b, StatusCode::kDataLoss, "gguf: type of 't.u8' is 13, not a valid type");
  b = good;
  Patch<uint32_t>(b, lay.metadata[13].value, 99);
  ExpectParseError(b, StatusCode::kDataLoss, "array element type of 't.strings' is 99");
  b = good;
  Patch<uint32_t>(b, lay.metadata[13].value, static_cast<uint32_t>(GgufValueType::kArray));
  ExpectParseError(b, StatusCode::kUnimplemented, "'t.strings' is an array of arrays");
  b = good;
  Patch<uint64_t>(b, lay.metadata[13].value + 4, uint64_t{1} << 40);
  ExpectParseError(b, StatusCode::kDataLoss,
                   "key 't.strings' array of 1099511627776 strings cannot fit");
  b = good;
  Patch<uint64_t>(b, lay.metadata[13].value + 12, uint64_t{1} << 50);  // element 0 length
  ExpectParseError(b, StatusCode::kDataLoss, "element 0 of 't.strings' length 1125899906842624");
  b = good;
  Patch<uint64_t>(b, lay.metadata[14].value + 4, uint64_t{1} << 62);  // f32 count * 4 overflows
  ExpectParseError(b, StatusCode::kDataLoss,
                   "key 't.f32s' array of 4611686018427387904 f32 exceeds the");
  b = good;
  Patch<uint64_t>(b, lay.metadata[14].value + 4, 5000);
  ExpectParseError(b, StatusCode::kDataLoss, "key 't.f32s' array of 5000 f32 exceeds the");

  // Duplicate key: rename t.i8 to t.u8 (same length).
  b = good;
  std::memcpy(b.data() + lay.metadata[2].begin + 8, "t.u8", 4);
  ExpectParseError(b, StatusCode::kDataLoss, "gguf: duplicate metadata key 't.u8'");
  // Control bytes in names are escaped in messages.
  b = good;
  b[lay.metadata[2].begin + 8] = '\n';
  Patch<uint32_t>(b, lay.metadata[2].type, 77);
  ExpectParseError(b, StatusCode::kDataLoss, "type of '\\x0A.i8' is 77");
}

TEST_CASE("GGUF corrupt: alignment") {
  for (uint32_t bad : {0u, 3u, 48u}) {
    GgufWriter w;
    w.AddU32("general.alignment", 32);
    const float x[4] = {1, 2, 3, 4};
    w.AddTensorF32("x", {4}, x);
    GgufLayout lay;
    std::vector<uint8_t> b = *w.Finish(&lay);
    Patch<uint32_t>(b, lay.metadata[0].value, bad);
    ExpectParseError(b, StatusCode::kDataLoss,
                     "gguf: general.alignment " + std::to_string(bad) + " is not a power of two");
  }
  GgufWriter w;
  w.AddU64("general.alignment", 32);
  std::vector<uint8_t> b = *w.Finish();
  ExpectParseError(b, StatusCode::kDataLoss, "general.alignment has type u64, expected u32");
}

TEST_CASE("GGUF corrupt: tensor infos") {
  GgufLayout lay;
  const std::vector<uint8_t> good = SmallFile(&lay);
  std::vector<uint8_t> b;
  const GgufLayout::Entry& a = lay.tensors[0];  // a.weight f32 {5, 3}
  const GgufLayout::Entry& c = lay.tensors[2];  // c.weight q8_0 {32, 2}

  b = good;
  Patch<uint64_t>(b, a.begin, uint64_t{1} << 45);
  ExpectParseError(b, StatusCode::kDataLoss, "name of tensor 0 length 35184372088832");
  b = good;
  Patch<uint32_t>(b, a.dims, 5);
  ExpectParseError(b, StatusCode::kDataLoss, "gguf: tensor 'a.weight' has 5 dimensions (at most 4)");
  b = good;
  Patch<uint32_t>(b, a.dims, 0xFFFFFFFFu);
  ExpectParseError(b, StatusCode::kDataLoss, "has 4294967295 dimensions");
  // ne = {2^32, 2^32}: the product overflows int64.
  b = good;
  Patch<uint64_t>(b, a.dims + 4, uint64_t{1} << 32);
  Patch<uint64_t>(b, a.dims + 12, uint64_t{1} << 32);
  ExpectParseError(b, StatusCode::kDataLoss,
                   "gguf: tensor 'a.weight' dimensions [4294967296, 4294967296] overflow");
  b = good;
  Patch<uint64_t>(b, a.dims + 4, ~uint64_t{0});
  ExpectParseError(b, StatusCode::kDataLoss, "overflow the element count");
  // Large but not overflowing dims: the data range check catches it.
  b = good;
  Patch<uint64_t>(b, a.dims + 4, uint64_t{1} << 40);
  ExpectParseError(b, StatusCode::kDataLoss,
                   "gguf: tensor 'a.weight' data [offset " + std::to_string(lay.data_offset) +
                       ", size 13194139533312) exceeds file size " + std::to_string(good.size()));
  b = good;
  Patch<uint32_t>(b, a.type, 99);
  ExpectParseError(b, StatusCode::kDataLoss, "gguf: tensor 'a.weight' has unknown type id 99");
  b = good;
  Patch<uint32_t>(b, a.type, 32);  // a removed repacked type
  ExpectParseError(b, StatusCode::kDataLoss, "unknown type id 32");
  b = good;
  Patch<uint64_t>(b, c.dims + 4, 33);  // q8_0 rows must be whole blocks
  ExpectParseError(b, StatusCode::kDataLoss,
                   "gguf: tensor 'c.weight' row length 33 is not a multiple of the q8_0 block "
                   "size 32");
  b = good;
  Patch<uint64_t>(b, c.offset, 8);
  ExpectParseError(b, StatusCode::kDataLoss,
                   "gguf: tensor 'c.weight' offset 8 is not a multiple of the alignment 32");
  b = good;
  Patch<uint64_t>(b, c.offset, 1u << 20);
  ExpectParseError(b, StatusCode::kDataLoss,
                   "gguf: tensor 'c.weight' data [offset " +
                       std::to_string(lay.data_offset + (1u << 20)) + ", size 68) exceeds file "
                       "size " + std::to_string(good.size()));
  b = good;
  Patch<uint64_t>(b, c.offset, ~uint64_t{0} - 31);  // data_offset + offset overflows
  ExpectParseError(b, StatusCode::kDataLoss, "gguf: tensor 'c.weight' data [offset");
  // Duplicate tensor name ("c.weight" -> "a.weight").
  b = good;
  b[c.begin + 8] = 'a';
  ExpectParseError(b, StatusCode::kDataLoss, "gguf: duplicate tensor name 'a.weight'");
}

TEST_CASE("GGUF corrupt: random byte flips never crash") {
  GgufLayout lay;
  const std::vector<uint8_t> good = SmallFile(&lay);
  test::Rng rng(99);
  size_t rejected = 0, accepted = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::vector<uint8_t> b = good;
    const int flips = 1 + static_cast<int>(rng.Below(4));
    for (int f = 0; f < flips; ++f) {
      // Mostly in the header (where parsing decisions are made).
      const size_t at = rng.Below(iter % 4 == 0 ? b.size() : lay.data_offset);
      b[at] = static_cast<uint8_t>(rng.Bits());
    }
    StatusOr<GgufReader> g = GgufReader::Parse(b.data(), b.size());
    if (!g.ok()) {
      ++rejected;
      CHECK(g.status().message().rfind("gguf: ", 0) == 0);
      continue;
    }
    ++accepted;
    // Whatever parsed must be safe to use.
    for (const GgufKeyValue& kv : g->metadata()) {
      if (kv.value.type == GgufValueType::kArray &&
          kv.value.array_type == GgufValueType::kString) {
        CHECK(g->GetStringArray(kv.key).ok());
      }
    }
    for (const GgufTensorInfo& t : g->tensors()) {
      if (CheckConvertibleToF32(t).ok() && t.n_elements < (1u << 20)) {
        CHECK(TensorToF32(t).ok());
      }
    }
  }
  CHECK(rejected > 0);
  CHECK(accepted > 0);
}

}  // namespace
}  // namespace lutra
