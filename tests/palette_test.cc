// Palettized matrix format (palette.h): sizes, packing layout, codebooks,
// views over external memory and reference dequantization.
//
// palette.h is plain scalar C++ (no per-target code), so these tests run once;
// the SIMD kernels that decode this layout test themselves per target against
// DequantizeRow.
#include "lutra/format/palette.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "tests/test_util.h"

namespace lutra {
namespace {

const int kAllBits[] = {1, 2, 3, 4, 6, 8};

using test::Contains;

// Independent reference of the bit address of (column c, bit k of the index)
// within a packed row, written directly from docs/format.md (enumerating each
// b explicitly rather than sharing palette.h's plane helper).
void RefBitAddress(int b, size_t c, int k, size_t* byte, int* bit) {
  switch (b) {
    case 8:  // 16-col blocks of 16 B: byte j = column j.
      *byte = c;
      *bit = k;
      return;
    case 4:  // 32-col blocks of 16 B: low nibble col j, high nibble col j+16.
      *byte = (c / 32) * 16 + (c % 16);
      *bit = static_cast<int>((c % 32) / 16) * 4 + k;
      return;
    case 2:  // 64-col blocks of 16 B: byte j holds j, j+16, j+32, j+48.
      *byte = (c / 64) * 16 + (c % 16);
      *bit = static_cast<int>((c % 64) / 16) * 2 + k;
      return;
    case 1:  // 128-col blocks of 16 B: bit s of byte j is column j + 16 s.
      *byte = (c / 128) * 16 + (c % 16);
      *bit = static_cast<int>((c % 128) / 16) + k;
      return;
    case 6: {  // 64-col blocks of 48 B: 4-bit chunks (0-31, 32-63), 2-bit chunk.
      const size_t base = (c / 64) * 48, cb = c % 64;
      if (k < 4) {
        *byte = base + (cb / 32) * 16 + (cb % 16);
        *bit = static_cast<int>((cb % 32) / 16) * 4 + k;
      } else {
        *byte = base + 32 + (cb % 16);
        *bit = static_cast<int>(cb / 16) * 2 + (k - 4);
      }
      return;
    }
    case 3: {  // 128-col blocks of 48 B: 2-bit chunks (0-63, 64-127), 1-bit chunk.
      const size_t base = (c / 128) * 48, cb = c % 128;
      if (k < 2) {
        *byte = base + (cb / 64) * 16 + (cb % 16);
        *bit = static_cast<int>((cb % 64) / 16) * 2 + k;
      } else {
        *byte = base + 32 + (cb % 16);
        *bit = static_cast<int>(cb / 16);
      }
      return;
    }
  }
  FAIL("bad bits");
}

// Reference packing of one row from the spec.
std::vector<uint8_t> RefPackRow(int b, size_t row_bytes, const std::vector<uint8_t>& idx) {
  std::vector<uint8_t> out(row_bytes, 0);
  for (size_t c = 0; c < idx.size(); ++c) {
    for (int k = 0; k < b; ++k) {
      if ((idx[c] >> k) & 1) {
        size_t byte = 0;
        int bit = 0;
        RefBitAddress(b, c, k, &byte, &bit);
        REQUIRE(byte < row_bytes);
        REQUIRE(bit < 8);
        out[byte] |= static_cast<uint8_t>(1u << bit);
      }
    }
  }
  return out;
}

TEST_CASE("PaletteShape sizes follow the formula") {
  // Worked example from docs/format.md: 4096 x 4096, b = 4, G = 16, f16.
  PaletteShape s;
  s.rows = 4096;
  s.cols = 4096;
  REQUIRE(s.Validate().ok());
  CHECK(s.block_cols() == 32);
  CHECK(s.padded_cols() == 4096);
  CHECK(s.row_bytes() == 2048);
  CHECK(s.num_groups() == 256);
  CHECK(s.num_entries() == 16);
  CHECK(s.index_bytes() == 4096u * 2048u);
  CHECK(s.codebook_bytes() == 256u * 16u * 2u);
  CHECK(s.total_bytes() == 8388608u + 8192u);
  CHECK(s.bits_per_weight() == 8.0 * (8388608.0 + 8192.0) / (4096.0 * 4096.0));
  CHECK(s.bits_per_weight() == 4.00390625);  // exact in binary

  // Block widths and block bytes from the spec table.
  const size_t kb[] = {128, 64, 128, 32, 64, 16};
  const size_t bb[] = {16, 16, 48, 16, 48, 16};
  for (size_t i = 0; i < 6; ++i) {
    s.bits = kAllBits[i];
    CHECK(s.block_cols() == kb[i]);
    CHECK(s.block_bytes() == bb[i]);
  }

  // Exhaustive formula check over odd shapes, every b, G and codebook type.
  const size_t entry_bytes[] = {2, 2, 4};
  for (int b : kAllBits) {
    for (size_t K : {size_t{1}, size_t{15}, size_t{16}, size_t{17}, size_t{33},
                     size_t{64}, size_t{127}, size_t{128}, size_t{129}, size_t{1000}}) {
      for (size_t N : {size_t{1}, size_t{15}, size_t{16}, size_t{17}, size_t{100}}) {
        for (size_t G : {size_t{1}, size_t{4}, size_t{16}, size_t{100}, size_t{1000}}) {
          for (int t = 0; t < 3; ++t) {
            PaletteShape sh;
            sh.rows = N;
            sh.cols = K;
            sh.bits = b;
            sh.group_rows = G;
            sh.codebook = static_cast<ElementType>(t);
            REQUIRE(sh.Validate().ok());
            const size_t KB = b == 8 ? 16 : b == 4 ? 32 : (b == 2 || b == 6) ? 64 : 128;
            const size_t Kp = (K + KB - 1) / KB * KB;
            const size_t groups = (N + G - 1) / G;
            const size_t idx_bytes = N * (Kp * b / 8);
            const size_t cb_bytes = groups * (size_t{1} << b) * entry_bytes[t];
            CHECK(sh.padded_cols() == Kp);
            CHECK(sh.row_bytes() * 8 == Kp * static_cast<size_t>(b));
            CHECK(sh.index_bytes() == idx_bytes);
            CHECK(sh.codebook_bytes() == cb_bytes);
            CHECK(sh.total_bytes() == idx_bytes + cb_bytes);
            CHECK(sh.bits_per_weight() ==
                  8.0 * double(idx_bytes + cb_bytes) / (double(N) * double(K)));
          }
        }
      }
    }
  }
  CHECK(ElementBytes(ElementType::kF16) == 2);
  CHECK(ElementBytes(ElementType::kBF16) == 2);
  CHECK(ElementBytes(ElementType::kF32) == 4);
}

TEST_CASE("PaletteShape rejects bad shapes with a clear message") {
  PaletteShape s;
  s.rows = 8;
  s.cols = 8;
  for (int b : {0, 5, 7, 9, 16, -1}) {
    s.bits = b;
    const Status st = s.Validate();
    CHECK(st.code() == StatusCode::kInvalidArgument);
    CHECK(Contains(st.message(), "bits = " + std::to_string(b)));
  }
  s.bits = 4;
  s.rows = 0;
  CHECK(Contains(s.Validate().message(), "need rows >= 1"));
  s.rows = 8;
  s.cols = 0;
  CHECK(Contains(s.Validate().message(), "cols >= 1"));
  s.cols = 8;
  s.group_rows = 0;
  CHECK(Contains(s.Validate().message(), "group_rows = 0"));
  s.group_rows = 16;
  s.codebook = static_cast<ElementType>(7);
  CHECK(Contains(s.Validate().message(), "codebook type 7"));
  s.codebook = ElementType::kF16;
  s.rows = size_t{1} << 41;
  CHECK(Contains(s.Validate().message(), "too large"));
  s.rows = size_t{1} << 30;
  s.cols = size_t{1} << 36;
  CHECK(Contains(s.Validate().message(), "too large"));
  CHECK(!PaletteMatrix::Allocate(s).ok());
}

// Packing round trip for every b, K not a multiple of the block, and the exact
// bytes against the spec-derived reference; padding columns are zero.
TEST_CASE("Packing matches the spec layout and round-trips") {
  test::Rng rng(42);
  for (int b : kAllBits) {
    for (size_t K : test::SweepSizes(1031)) {
      PaletteShape s;
      s.rows = 3;
      s.cols = K;
      s.bits = b;
      s.group_rows = 2;
      REQUIRE(s.Validate().ok());
      INFO("b=" << b << " K=" << K);
      std::vector<uint8_t> idx(K);
      for (auto& v : idx) v = static_cast<uint8_t>(rng.Below(size_t{1} << b));
      // Bit-pattern rows as well: all ones exposes any bleed into neighbours.
      if (K % 3 == 0) {
        for (auto& v : idx) v = static_cast<uint8_t>((1u << b) - 1);
      }
      const std::vector<uint8_t> ref = RefPackRow(b, s.row_bytes(), idx);

      std::vector<uint8_t> packed(s.row_bytes(), 0xAB);  // garbage must be overwritten
      PackRow(s, idx.data(), packed.data());
      CHECK(packed == ref);

      // Scalar set_index into a zeroed matrix gives the same bytes in every row.
      auto m = PaletteMatrix::Allocate(s);
      REQUIRE(m.ok());
      for (size_t r = 0; r < s.rows; ++r) {
        for (size_t c = K; c-- > 0;) m->set_index(r, c, idx[c]);  // any order
      }
      for (size_t r = 0; r < s.rows; ++r) {
        CHECK(memcmp(m->view().row(r), ref.data(), ref.size()) == 0);
      }
      // Overwriting one index changes only that column.
      if (K > 1) {
        const size_t c = rng.Below(K);
        const uint32_t nv = (idx[c] + 1u) & ((1u << b) - 1u);
        m->set_index(1, c, nv);
        for (size_t cc = 0; cc < K; ++cc) {
          CHECK(m->view().index(1, cc) == (cc == c ? nv : idx[cc]));
        }
      }
      std::vector<uint8_t> back(K);
      UnpackRow(s, packed.data(), back.data());
      CHECK(back == idx);
      for (size_t c = K; c < s.padded_cols(); ++c) {
        CHECK(UnpackIndex(s, packed.data(), c) == 0);
      }
    }
  }
}

// Hand-written bytes for small patterns, so a shared misreading of the spec by
// the reference and the library would still be caught.
TEST_CASE("Packing known bytes") {
  PaletteShape s;
  s.rows = 1;
  s.cols = 64;
  std::vector<uint8_t> idx(128, 0), packed;

  s.bits = 4;  // col j low nibble, col j + 16 high nibble
  idx[0] = 0x3;
  idx[16] = 0xA;
  idx[33] = 0xF;
  packed.assign(s.row_bytes(), 0);
  PackRow(s, idx.data(), packed.data());
  CHECK(packed[0] == 0xA3);
  CHECK(packed[17] == 0x0F);

  s.bits = 2;  // byte j: cols j, j+16, j+32, j+48 in bits 0-1, 2-3, 4-5, 6-7
  std::fill(idx.begin(), idx.end(), 0);
  idx[5] = 1;
  idx[21] = 2;
  idx[37] = 3;
  idx[53] = 1;
  packed.assign(s.row_bytes(), 0);
  PackRow(s, idx.data(), packed.data());
  CHECK(packed[5] == (1 | 2 << 2 | 3 << 4 | 1 << 6));

  s.bits = 6;  // 4-bit low plane chunks then 2-bit high plane chunk
  std::fill(idx.begin(), idx.end(), 0);
  idx[40] = 0x2B;  // low 0xB -> chunk 1, byte 8, low nibble; high 2 -> byte 32+8 bits 4-5
  packed.assign(s.row_bytes(), 0);
  PackRow(s, idx.data(), packed.data());
  CHECK(packed.size() == 48);
  CHECK(packed[16 + 8] == 0x0B);
  CHECK(packed[32 + 8] == (2 << 4));

  s.bits = 3;
  s.cols = 128;
  std::fill(idx.begin(), idx.end(), 0);
  idx[100] = 0x6;  // low 2 -> chunk 1, byte 4, bits 4-5 (100-64 = 36 = 2*16+4); high 1 -> byte 32+4 bit 6
  packed.assign(s.row_bytes(), 0);
  PackRow(s, idx.data(), packed.data());
  CHECK(packed[16 + 4] == (2 << 4));
  CHECK(packed[32 + 4] == (1 << 6));

  s.bits = 1;
  std::fill(idx.begin(), idx.end(), 0);
  idx[127] = 1;  // byte 15, bit 7
  packed.assign(s.row_bytes(), 0);
  PackRow(s, idx.data(), packed.data());
  CHECK(packed[15] == 0x80);
}

TEST_CASE("Codebook entries round to the codebook type") {
  for (int t = 0; t < 3; ++t) {
    const auto type = static_cast<ElementType>(t);
    PaletteShape s;
    s.rows = 5;
    s.cols = 7;
    s.bits = 2;
    s.group_rows = 2;
    s.codebook = type;
    auto m = PaletteMatrix::Allocate(s);
    REQUIRE(m.ok());
    const float v = 0.1f;
    m->set_entry(2, 3, v);
    const float got = m->view().entry(2, 3);
    CHECK(got == RoundToElementType(v, type));
    if (type == ElementType::kF32) {
      CHECK(got == v);
    } else {
      CHECK(got != v);  // 0.1 is not representable in 16 bits
      CHECK(std::abs(got - v) <= v * (type == ElementType::kF16 ? 1e-3f : 4e-3f));
    }
    // Other entries are untouched (zero).
    CHECK(m->view().entry(2, 2) == 0.0f);
    CHECK(m->view().entry(1, 3) == 0.0f);
  }
  CHECK(RoundToElementType(1e6f, ElementType::kF16) == 65504.0f);
  CHECK(RoundToElementType(-1e6f, ElementType::kF16) == -65504.0f);
  CHECK(RoundToElementType(1e6f, ElementType::kBF16) == 999424.0f);
}

// Fills a random matrix through the owning API and checks views, dequantize
// and an unaligned external copy (as an mmapped file would be) agree.
TEST_CASE("Views over external memory and dequantization") {
  test::Rng rng(7);
  for (int b : kAllBits) {
    for (size_t N : {size_t{1}, size_t{17}, size_t{33}}) {
      for (size_t G : {size_t{1}, size_t{16}, N}) {
        PaletteShape s;
        s.rows = N;
        s.cols = 77;
        s.bits = b;
        s.group_rows = G;
        s.codebook = static_cast<ElementType>(rng.Below(3));
        INFO("b=" << b << " N=" << N << " G=" << G);
        auto mo = PaletteMatrix::Allocate(s);
        REQUIRE(mo.ok());
        PaletteMatrix m = std::move(mo.value());  // movable
        CHECK(reinterpret_cast<uintptr_t>(m.mutable_indices()) % 64 == 0);
        CHECK(reinterpret_cast<uintptr_t>(m.mutable_codebooks()) % 64 == 0);
        std::vector<float> expected(N * s.cols);
        std::vector<float> table(s.num_groups() * s.num_entries());
        for (size_t g = 0; g < s.num_groups(); ++g) {
          for (size_t e = 0; e < s.num_entries(); ++e) {
            m.set_entry(g, e, rng.Gaussian());
            table[g * s.num_entries() + e] = m.view().entry(g, e);
          }
        }
        for (size_t r = 0; r < N; ++r) {
          for (size_t c = 0; c < s.cols; ++c) {
            const uint32_t i = static_cast<uint32_t>(rng.Below(s.num_entries()));
            m.set_index(r, c, i);
            expected[r * s.cols + c] = table[(r / G) * s.num_entries() + i];
          }
        }
        std::vector<float> out(N * s.cols, -1.0f);
        REQUIRE(Dequantize(m.view(), out.data(), out.size()).ok());
        CHECK(out == expected);

        // Copy to deliberately misaligned external buffers.
        const PaletteView mv = m.view();
        std::vector<uint8_t> ext_idx(s.index_bytes() + 1), ext_cb(s.codebook_bytes() + 3);
        memcpy(ext_idx.data() + 1, mv.indices, s.index_bytes());
        memcpy(ext_cb.data() + 3, mv.codebooks, s.codebook_bytes());
        auto v = PaletteView::Make(s, ext_idx.data() + 1, s.index_bytes(),
                                   ext_cb.data() + 3, s.codebook_bytes());
        REQUIRE(v.ok());
        std::vector<float> row(s.cols);
        for (size_t r = 0; r < N; ++r) {
          DequantizeRow(*v, r, row.data());
          for (size_t c = 0; c < s.cols; ++c) {
            CHECK(row[c] == expected[r * s.cols + c]);
            CHECK(v->weight(r, c) == expected[r * s.cols + c]);
          }
          CHECK(static_cast<const uint8_t*>(v->row_codebook(r)) ==
                ext_cb.data() + 3 + (r / G) * s.num_entries() * ElementBytes(s.codebook));
        }
      }
    }
  }
}

TEST_CASE("View and Dequantize reject bad buffers") {
  PaletteShape s;
  s.rows = 17;
  s.cols = 40;
  s.bits = 4;
  std::vector<uint8_t> idx(s.index_bytes()), cb(s.codebook_bytes());
  CHECK(PaletteView::Make(s, idx.data(), idx.size(), cb.data(), cb.size()).ok());
  auto bad = PaletteView::Make(s, idx.data(), idx.size() - 1, cb.data(), cb.size());
  CHECK(!bad.ok());
  CHECK(Contains(bad.status().message(), "index buffer has 543 bytes"));
  CHECK(Contains(bad.status().message(), "needs 544"));
  bad = PaletteView::Make(s, idx.data(), idx.size(), cb.data(), cb.size() + 2);
  CHECK(Contains(bad.status().message(), "codebook buffer has 66 bytes"));
  bad = PaletteView::Make(s, nullptr, idx.size(), cb.data(), cb.size());
  CHECK(Contains(bad.status().message(), "null indices"));
  PaletteShape s2 = s;
  s2.bits = 5;
  bad = PaletteView::Make(s2, idx.data(), idx.size(), cb.data(), cb.size());
  CHECK(Contains(bad.status().message(), "bits = 5"));

  auto m = PaletteMatrix::Allocate(s);
  REQUIRE(m.ok());
  std::vector<float> out(17 * 40 - 1);
  const Status st = Dequantize(m->view(), out.data(), out.size());
  CHECK(st.code() == StatusCode::kInvalidArgument);
  CHECK(Contains(st.message(), "output holds 679 floats"));
  CHECK(!Dequantize(PaletteView(), out.data(), out.size()).ok());
  PaletteMatrix empty;
  CHECK(empty.empty());
}

}  // namespace
}  // namespace lutra
