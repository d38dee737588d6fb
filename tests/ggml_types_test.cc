// ggml block formats (lutra/format/ggml_types.h): dequantization of every
// llama.cpp quantization type of ../shared/models/ktest compared bit for bit
// with the reference values gguf-py / llama.cpp produced (README.md there),
// plus hand-made blocks for the types without reference files and the
// errors for bad sizes, unsupported and unknown types.
#include <stdint.h>
#include <stdlib.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "lutra/format/ggml_types.h"
#include "lutra/format/gguf.h"
#include "lutra/format/gguf_writer.h"
#include "tests/test_util.h"

namespace lutra {
namespace {

uint32_t Bits(float f) {
  uint32_t u = 0;
  std::memcpy(&u, &f, 4);
  return u;
}

std::string Hex(uint32_t u) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", u);
  return buf;
}

// The ggml type every 2-D tensor of tiny-k-<label>.gguf has (llama-quantize
// --pure: the scheme's base type; _M is only the file-type label).
std::string BaseTypeName(std::string label) {
  if (label.size() > 2 && label.compare(label.size() - 2, 2, "_M") == 0) {
    label.resize(label.size() - 2);
  }
  std::string lower;
  for (char c : label) lower += (c == 'K') ? c : static_cast<char>(std::tolower(c));
  return lower;  // "Q4_K_M" -> "q4_K", "IQ4_NL" -> "iq4_nl"
}

struct IndexEntry {
  std::string name;
  uint64_t offset = 0, rows = 0, cols = 0;
};

// Compares one tiny-k-<label> file's tensors with its .f32 / .index
// reference and returns the number of mismatching floats.
size_t CheckKtestFile(const std::string& dir, const std::string& label, bool whole_tensors) {
  INFO("tiny-k-" << label);
  StatusOr<GgufFile> file = GgufFile::Open(dir + "/tiny-k-" + label + ".gguf");
  REQUIRE(file.ok());
  const GgufReader& g = file->reader();
  const std::vector<char> ref_bytes = test::ReadFile(dir + "/tiny-k-" + label + ".f32");
  REQUIRE(ref_bytes.size() % 4 == 0);
  std::vector<float> ref(ref_bytes.size() / 4);
  std::memcpy(ref.data(), ref_bytes.data(), ref_bytes.size());

  std::vector<IndexEntry> index;
  {
    std::ifstream in(dir + "/tiny-k-" + label + ".index");
    REQUIRE(in.good());
    IndexEntry e;
    while (in >> e.name >> e.offset >> e.rows >> e.cols) index.push_back(e);
  }
  // Every tensor of the file is listed, in the file's order.
  REQUIRE(index.size() == g.tensors().size());
  REQUIRE(index.size() == 20);

  const std::string base = BaseTypeName(label);
  size_t mismatches = 0, compared = 0;
  std::string first;
  std::set<std::string> types;
  for (size_t i = 0; i < index.size(); ++i) {
    const IndexEntry& e = index[i];
    INFO("tensor " << e.name);
    const GgufTensorInfo* t = g.FindTensor(e.name);
    REQUIRE(t != nullptr);
    CHECK(t->name == g.tensors()[i].name);
    REQUIRE(t->row_length() == e.cols);
    REQUIRE(e.rows <= t->n_rows());
    REQUIRE(e.offset + e.rows * e.cols <= ref.size());
    // 2-D weights have the file's quantization, the norms stay f32.
    CHECK(std::string(t->type_name()) == (t->n_dims == 2 ? base : std::string("f32")));
    types.insert(t->type_name());

    std::vector<float> whole;
    if (whole_tensors) {
      StatusOr<std::vector<float>> all = TensorToF32(*t);
      REQUIRE(all.ok());
      whole = std::move(*all);
    }
    std::vector<float> row(e.cols);
    for (uint64_t r = 0; r < e.rows; ++r) {
      const Status s = TensorRowToF32(*t, r, row.data());
      REQUIRE(s.ok());
      const float* expected = ref.data() + e.offset + r * e.cols;
      for (uint64_t c = 0; c < e.cols; ++c) {
        ++compared;
        const bool row_ok = Bits(row[c]) == Bits(expected[c]);
        const bool whole_ok = !whole_tensors || Bits(whole[r * e.cols + c]) == Bits(expected[c]);
        if (row_ok && whole_ok) continue;
        if (mismatches++ == 0) {
          std::ostringstream os;
          os << e.name << " row " << r << " col " << c << ": row path " << row[c] << " ("
             << Hex(Bits(row[c])) << ")";
          if (whole_tensors) {
            const float w = whole[r * e.cols + c];
            os << ", whole-tensor path " << w << " (" << Hex(Bits(w)) << ")";
          }
          os << ", expected " << expected[c] << " (" << Hex(Bits(expected[c])) << ")";
          first = os.str();
        }
      }
    }
  }
  CHECK(compared == 70912);  // README: 70,912 floats per type
  CHECK(types.count(base) == 1);
  INFO("first mismatch: " << first);
  CHECK(mismatches == 0);
  std::printf("[ktest] %-7s %s: %zu floats compared, %zu mismatches\n", label.c_str(),
              base.c_str(), compared, mismatches);
  return mismatches;
}

TEST_CASE("ggml: every tiny-k type dequantizes bit-exactly as llama.cpp", "[ggml][shared]") {
  const std::string dir = test::SharedModelsSubdir("ktest");
  if (dir.empty()) SKIP("../shared/models/ktest not found (see README.md)");
  // Every tiny-k-<TYPE>.index in the folder (each has a .gguf and a .f32).
  std::vector<std::string> labels;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    const std::string prefix = "tiny-k-", suffix = ".index";
    if (name.size() > prefix.size() + suffix.size() && name.rfind(prefix, 0) == 0 &&
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
      labels.push_back(name.substr(prefix.size(), name.size() - prefix.size() - suffix.size()));
    }
  }
  std::sort(labels.begin(), labels.end());
  // The 11 types of issue 16 must all be there (a missing file is a failure,
  // not a silently smaller test).
  const std::vector<std::string> want = {"IQ4_NL", "Q2_K",   "Q3_K_M", "Q4_0",
                                         "Q4_1",   "Q4_K_M", "Q5_0",   "Q5_1",
                                         "Q5_K_M", "Q6_K",   "Q8_0"};
  CHECK(labels == want);
  // The whole-tensor path too, except in quick runs (ASan, qemu).
  const bool whole = getenv("LUTRA_TEST_QUICK") == nullptr;
  for (const std::string& label : labels) CheckKtestFile(dir, label, whole);
}

// ---------------------------------------------------------------------------
// Hand-made blocks

void PutF16(uint8_t* p, float v) {
  const uint16_t h = F16BitsFromF32(v);
  std::memcpy(p, &h, 2);
}

std::vector<float> Convert(GgmlType type, const std::vector<uint8_t>& bytes, uint64_t n) {
  std::vector<float> out(n);
  const Status s = ConvertToF32(static_cast<uint32_t>(type), bytes.data(), n, out.data());
  INFO(s.message());
  REQUIRE(s.ok());
  return out;
}

TEST_CASE("ggml: hand-made k-quant blocks decode to the documented values", "[ggml]") {
  // q4_K: d = 0.5, dmin = 0.25; sub-block j has scale j + 1 and min 2j,
  // packed as get_scale_min_k4 reads them (j >= 4: nibbles of bytes 8..11,
  // top bits in bytes 0..7); weight l of sub-block j has q = (j + l) & 15.
  {
    std::vector<uint8_t> b(144, 0);
    PutF16(&b[0], 0.5f);
    PutF16(&b[2], 0.25f);
    uint8_t* sc = &b[4];
    for (int j = 0; j < 8; ++j) {
      const int s = j + 1, m = 2 * j;  // both < 16: no high bits needed
      if (j < 4) {
        sc[j] = static_cast<uint8_t>(s);
        sc[j + 4] = static_cast<uint8_t>(m);
      } else {
        sc[j + 4] = static_cast<uint8_t>(s | (m << 4));
      }
    }
    // A high bit: sub-block 4's scale gets + 16 from bits 6..7 of byte 0.
    sc[0] |= 1 << 6;
    uint8_t* qs = &b[16];
    for (int p = 0; p < 4; ++p) {
      for (int l = 0; l < 32; ++l) {
        qs[32 * p + l] =
            static_cast<uint8_t>(((2 * p + l) & 15) | (((2 * p + 1 + l) & 15) << 4));
      }
    }
    const std::vector<float> y = Convert(GgmlType::kQ4_K, b, 256);
    for (int j = 0; j < 8; ++j) {
      const int s = j + 1 + (j == 4 ? 16 : 0), m = 2 * j;
      for (int l = 0; l < 32; ++l) {
        const float want = 0.5f * float(s) * float((j + l) & 15) - 0.25f * float(m);
        INFO("sub-block " << j << " weight " << l);
        CHECK(Bits(y[32 * j + l]) == Bits(want));
      }
    }
  }
  // q6_K: d = 1/64, scales[s] = s - 8 (signed), all 6-bit q = 63 -> 31, but
  // weight 5 of each 128-half has q = 0 -> -32.
  {
    std::vector<uint8_t> b(210, 0);
    for (int i = 0; i < 128; ++i) b[i] = 0xFF;       // ql
    for (int i = 0; i < 64; ++i) b[128 + i] = 0xFF;  // qh
    for (int h = 0; h < 2; ++h) {
      for (int k = 0; k < 2; ++k) b[64 * h + 5 + 32 * k] = 0;  // ql nibbles of l = 5
      b[128 + 32 * h + 5] = 0;                                 // qh of l = 5
    }
    for (int s = 0; s < 16; ++s) b[192 + s] = static_cast<uint8_t>(static_cast<int8_t>(s - 8));
    PutF16(&b[208], 1.0f / 64);
    const std::vector<float> y = Convert(GgmlType::kQ6_K, b, 256);
    for (int i = 0; i < 256; ++i) {
      const int l = i % 32, scale = i / 16 - 8;  // 16 weights per scale
      const int q = l == 5 ? -32 : 31;
      INFO("weight " << i);
      CHECK(y[i] == float(scale) * float(q) / 64.0f);
    }
  }
}

TEST_CASE("ggml: iq4_xs sub-blocks equal iq4_nl blocks at their scale", "[ggml]") {
  // d a power of two, so d * (ls - 32) is an exact fp16 scale for the
  // matching iq4_nl block: 8 sub-blocks with ls = 0, 9, ..., 63 (all 6 bits).
  test::Rng rng(16);
  const float d = 1.0f / 256;
  std::vector<uint8_t> xs(136, 0), nl(8 * 18, 0);
  PutF16(&xs[0], d);
  const int ls[8] = {0, 9, 18, 31, 33, 40, 52, 63};
  uint16_t scales_h = 0;
  for (int i = 0; i < 8; ++i) {
    xs[4 + i / 2] = static_cast<uint8_t>(xs[4 + i / 2] | ((ls[i] & 15) << (4 * (i % 2))));
    scales_h = static_cast<uint16_t>(scales_h | ((ls[i] >> 4) << (2 * i)));
    PutF16(&nl[18 * i], d * float(ls[i] - 32));
    for (int j = 0; j < 16; ++j) {
      const uint8_t q = static_cast<uint8_t>(rng.Bits());
      xs[8 + 16 * i + j] = q;
      nl[18 * i + 2 + j] = q;
    }
  }
  std::memcpy(&xs[2], &scales_h, 2);
  const std::vector<float> a = Convert(GgmlType::kIQ4_XS, xs, 256);
  const std::vector<float> b = Convert(GgmlType::kIQ4_NL, nl, 256);
  for (int i = 0; i < 256; ++i) {
    INFO("weight " << i);
    CHECK(Bits(a[i]) == Bits(b[i]));
  }
  // The iq4_nl levels themselves: index k at d = 1 is kvalues_iq4nl[k].
  std::vector<uint8_t> one(18, 0);
  PutF16(&one[0], 1.0f);
  for (int j = 0; j < 16; ++j) one[2 + j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  const std::vector<float> y = Convert(GgmlType::kIQ4_NL, one, 32);
  const float levels[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                            1,    13,   25,  38,  53,  69,  89,  113};
  for (int j = 0; j < 16; ++j) {
    CHECK(y[j] == levels[j]);
    CHECK(y[16 + j] == levels[15 - j]);
  }
}

TEST_CASE("ggml: q8_1 and q8_K are scale times int8", "[ggml]") {
  std::vector<uint8_t> q81(36, 0), q8k(292, 0);
  PutF16(&q81[0], 0.125f);
  PutF16(&q81[2], 1000.0f);  // s = d * sum(q): not part of the values
  for (int j = 0; j < 32; ++j) q81[4 + j] = static_cast<uint8_t>(static_cast<int8_t>(j - 16));
  const std::vector<float> a = Convert(GgmlType::kQ8_1, q81, 32);
  for (int j = 0; j < 32; ++j) CHECK(a[j] == 0.125f * float(j - 16));
  const float d = 0.1f;  // f32 scale: not representable in fp16
  std::memcpy(&q8k[0], &d, 4);
  for (int j = 0; j < 256; ++j) q8k[4 + j] = static_cast<uint8_t>(j);
  const std::vector<float> b = Convert(GgmlType::kQ8_K, q8k, 256);
  for (int j = 0; j < 256; ++j) CHECK(Bits(b[j]) == Bits(d * float(int8_t(uint8_t(j)))));
}

TEST_CASE("ggml: every converter reads exactly its blocks and decodes blockwise", "[ggml]") {
  // Random bytes, in a heap buffer of exactly the blocks' size (ASan catches
  // a decoder reading past its block), decoded at once and one block at a
  // time: the same bits (NaN payloads included).
  test::Rng rng(7);
  int converters = 0;
  for (uint32_t id = 0; id < 64; ++id) {
    const GgmlTypeInfo* info = GetGgmlTypeInfo(id);
    if (info == nullptr || !info->to_f32) continue;
    ++converters;
    INFO("type " << info->name);
    const uint64_t blocks = 3, n = blocks * info->block_size;
    std::vector<uint8_t> bytes(blocks * info->type_size);
    for (uint8_t& b : bytes) b = static_cast<uint8_t>(rng.Bits());
    const std::vector<float> all = Convert(static_cast<GgmlType>(id), bytes, n);
    for (uint64_t b = 0; b < blocks; ++b) {
      std::vector<uint8_t> one(bytes.begin() + b * info->type_size,
                               bytes.begin() + (b + 1) * info->type_size);
      const std::vector<float> y = Convert(static_cast<GgmlType>(id), one, info->block_size);
      CHECK(std::memcmp(y.data(), all.data() + b * info->block_size, y.size() * 4) == 0);
    }
  }
  CHECK(converters == 18);
}

TEST_CASE("ggml: bad sizes and unsupported types give clear errors", "[ggml]") {
  std::vector<uint8_t> bytes(1024, 0);
  std::vector<float> out(1024);
  // Not a whole number of blocks.
  Status s = ConvertToF32(static_cast<uint32_t>(GgmlType::kQ4_K), bytes.data(), 128, out.data());
  CHECK(s.code() == StatusCode::kInvalidArgument);
  CHECK(s.message() == "gguf: 128 elements of q4_K is not a multiple of the block size 256");
  s = ConvertToF32(static_cast<uint32_t>(GgmlType::kIQ4_NL), bytes.data(), 48, out.data());
  CHECK(s.message() == "gguf: 48 elements of iq4_nl is not a multiple of the block size 32");
  // No elements: nothing is read or written.
  CHECK(ConvertToF32(static_cast<uint32_t>(GgmlType::kQ6_K), nullptr, 0, nullptr).ok());
  // Unknown ids.
  s = ConvertToF32(31, bytes.data(), 4, out.data());
  CHECK(s.code() == StatusCode::kInvalidArgument);
  CHECK(s.message() == "gguf: unknown tensor type id 31");
  CHECK(ConvertToF32(1000, bytes.data(), 4, out.data()).code() == StatusCode::kInvalidArgument);
  // A type without a converter names itself and lists the convertible ones,
  // which come from the table.
  s = ConvertToF32(static_cast<uint32_t>(GgmlType::kIQ2_XXS), bytes.data(), 256, out.data());
  CHECK(s.code() == StatusCode::kUnimplemented);
  CHECK(s.message() ==
        "gguf: unsupported tensor type iq2_xxs (convertible: f32, f16, q4_0, q4_1, q5_0, q5_1, "
        "q8_0, q8_1, q2_K, q3_K, q4_K, q5_K, q6_K, q8_K, iq4_nl, iq4_xs, f64, bf16)");
  CHECK(GgmlConvertibleTypeNames().find("iq2_xxs") == std::string::npos);
  CHECK(ConvertToF32(static_cast<uint32_t>(GgmlType::kI32), bytes.data(), 4, out.data()).code() ==
        StatusCode::kUnimplemented);
}

TEST_CASE("ggml: the GGUF reader's errors name the tensor", "[ggml]") {
  // An unsupported type: the conversion names type and tensor.
  {
    GgufWriter w;
    std::vector<uint8_t> iq3(110, 0);
    w.AddTensor("blk.3.ffn_up.weight", GgmlType::kIQ3_S, {256}, iq3.data(), iq3.size());
    const StatusOr<std::vector<uint8_t>> bytes = w.Finish();
    REQUIRE(bytes.ok());
    StatusOr<GgufReader> g = GgufReader::Parse(bytes->data(), bytes->size());
    REQUIRE(g.ok());
    const StatusOr<std::vector<float>> f = TensorToF32(g->tensors()[0]);
    REQUIRE(!f.ok());
    CHECK(f.status().code() == StatusCode::kUnimplemented);
    CHECK(test::Contains(f.status().message(), "gguf: unsupported tensor type iq3_s for tensor "
                                               "'blk.3.ffn_up.weight' (convertible: f32, f16"));
  }
  // A k-quant tensor whose rows are not whole super-blocks (an f32 tensor of
  // 128 x 2 with its type patched to q4_K) is rejected when parsing.
  {
    GgufWriter w;
    std::vector<float> x(256, 1.0f);
    w.AddTensorF32("blk.0.attn_k.weight", {128, 2}, x.data());
    GgufLayout lay;
    StatusOr<std::vector<uint8_t>> bytes = w.Finish(&lay);
    REQUIRE(bytes.ok());
    const uint32_t q4k = static_cast<uint32_t>(GgmlType::kQ4_K);
    std::memcpy(bytes->data() + lay.tensors[0].type, &q4k, 4);
    StatusOr<GgufReader> g = GgufReader::Parse(bytes->data(), bytes->size());
    REQUIRE(!g.ok());
    CHECK(g.status().code() == StatusCode::kDataLoss);
    CHECK(g.status().message() == "gguf: tensor 'blk.0.attn_k.weight' row length 128 is not a "
                                  "multiple of the q4_K block size 256");
  }
  // A converted k-quant row: the reader's row view and the raw blocks agree.
  {
    std::vector<uint8_t> blocks(2 * 176);
    test::Rng rng(3);
    for (uint8_t& b : blocks) b = static_cast<uint8_t>(rng.Bits() & 0x3F);  // finite scales
    GgufWriter w;
    w.AddTensor("t", GgmlType::kQ5_K, {256, 2}, blocks.data(), blocks.size());
    StatusOr<std::vector<uint8_t>> bytes = w.Finish();
    REQUIRE(bytes.ok());
    StatusOr<GgufReader> g = GgufReader::Parse(bytes->data(), bytes->size());
    REQUIRE(g.ok());
    std::vector<float> row(256);
    REQUIRE(TensorRowToF32(g->tensors()[0], 1, row.data()).ok());
    const std::vector<float> direct =
        Convert(GgmlType::kQ5_K, std::vector<uint8_t>(blocks.begin() + 176, blocks.end()), 256);
    CHECK(std::memcmp(row.data(), direct.data(), 256 * 4) == 0);
  }
}

}  // namespace
}  // namespace lutra
