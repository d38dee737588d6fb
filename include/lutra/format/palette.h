// Palettized weight matrices: the storage format of lutra's weights.
//
// W has N rows (output channels) x K columns (inputs). Each group of G
// consecutive rows shares one codebook of 2^b values; each weight is a b-bit
// index into its row's codebook. The byte layout is the binding contract in
// docs/format.md (summary below); the GEMV/GEMM kernels, the palettizer
// (palettize.h) and the model files all use exactly this layout.
//
// Layout summary (docs/format.md has the full contract and the reasons):
// - codebooks: ceil(N/G) groups x 2^b entries (f16, bf16 or f32), group-major;
//   entry e of group g is codebooks[g * 2^b + e]; row r uses group r / G.
// - indices: each row packed independently, row stride
//   row_bytes = Kp * b / 8 where Kp = K rounded up to the block width
//   KB(b) = 16 (b=8), 32 (b=4), 64 (b=2, b=6), 128 (b=1, b=3).
//   Padding columns K..Kp-1 hold index 0.
// - a plane of width w is stored in 16-byte chunks; one chunk covers
//   16 * (8 / w) consecutive columns starting at c0, and column c0 + 16*s + j
//   lives in byte j, bits [s*w, s*w + w).
// - b = 3 is a 2-bit low plane plus a 1-bit high plane, b = 6 a 4-bit low
//   plane plus a 2-bit high plane (index = low | high << w_low); within each
//   block the low plane's bytes come first, then the high plane's.
//
// This is a plain header (no per-target code): scalar reference accessors and
// packing used by tests, tools and the palettizer. Kernels decode the layout
// with SIMD in their own -inl.h headers.
#ifndef LUTRA_PALETTE_H_
#define LUTRA_PALETTE_H_

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <memory>
#include <new>
#include <type_traits>
#include <utility>

#include "hwy/base.h"
#include "lutra/base/element.h"
#include "lutra/base/status.h"

namespace lutra {

// The format rule of b-bit indices, in one place (layout summary above):
// b = 1, 2, 4, 8 is one plane of width b; b = 3, 6 a low plane of width 2b/3
// plus a high plane of width b/3 (index = low | high << kLowBits). A block is
// the smallest run of columns that fills whole 16-byte chunks of every plane:
// one chunk (16 bytes) for one plane; two low chunks then one high chunk (48
// bytes) for two. Used by the scalar pack/unpack below and by the SIMD decode
// (kernels/lut_decode-inl.h). kBits must be a valid width (see WithBits).
template <int kBits>
struct PaletteFormat {
  static_assert(kBits == 1 || kBits == 2 || kBits == 3 || kBits == 4 || kBits == 6 ||
                    kBits == 8,
                "palette index width must be 1, 2, 3, 4, 6 or 8");
  static constexpr bool kTwoPlanes = kBits == 3 || kBits == 6;
  static constexpr int kLowBits = kTwoPlanes ? 2 * kBits / 3 : kBits;
  static constexpr int kHighBits = kTwoPlanes ? kBits / 3 : 0;  // 0: no high plane
  static constexpr size_t kBlockBytes = kTwoPlanes ? 48 : 16;
  static constexpr size_t kBlockCols = 8 * kBlockBytes / kBits;  // 16 .. 128
  // The high plane's chunk follows the low plane's chunks within a block.
  static constexpr size_t kHighOffset = kBlockCols * kLowBits / 8;
  // Runs of 16 consecutive columns per block (fields per low-plane byte x
  // low chunks per block). A SIMD decode of one block per 128-bit lane yields
  // one index vector per run (kernels/lut_decode-inl.h "sub-vectors").
  static constexpr size_t kRunsPerBlock = kBlockCols / 16;
};

// Calls fn(std::integral_constant<int, b>()) for the supported index width
// b = bits, so that fn can instantiate code for it (decltype(arg)::value);
// returns fn's Status (Ok when fn returns void), or InvalidArgument naming
// the width when bits is not 1, 2, 3, 4, 6 or 8. The one switch on widths.
template <class Fn>
Status WithBits(int bits, const Fn& fn) {
  const auto call = [&fn](auto b) -> Status {
    if constexpr (std::is_void_v<decltype(fn(b))>) {
      fn(b);
      return Status::Ok();
    } else {
      return fn(b);
    }
  };
  switch (bits) {
    case 1:
      return call(std::integral_constant<int, 1>());
    case 2:
      return call(std::integral_constant<int, 2>());
    case 3:
      return call(std::integral_constant<int, 3>());
    case 4:
      return call(std::integral_constant<int, 4>());
    case 6:
      return call(std::integral_constant<int, 6>());
    case 8:
      return call(std::integral_constant<int, 8>());
  }
  return InvalidArgument("palette: bits = %d, need one of 1, 2, 3, 4, 6, 8", bits);
}

// True for the index widths the format supports: 1, 2, 3, 4, 6, 8.
inline bool IsValidPaletteBits(int bits) {
  return WithBits(bits, [](auto) {}).ok();
}

// Columns per packed block for b-bit indices (PaletteFormat::kBlockCols); 0
// for an unsupported width.
inline size_t PaletteBlockCols(int bits) {
  size_t cols = 0;
  (void)WithBits(bits, [&cols](auto b) { cols = PaletteFormat<decltype(b)::value>::kBlockCols; });
  return cols;
}

// Shape and storage parameters of one palettized matrix. All size helpers
// assume Validate() returned OK.
struct PaletteShape {
  size_t rows = 0;        // N, output channels
  size_t cols = 0;        // K, inputs
  int bits = 4;           // b, index width in {1,2,3,4,6,8}
  size_t group_rows = 16; // G, rows sharing one codebook (1..N; G > N is ok)
  ElementType codebook = ElementType::kF16;

  // OK if bits is in {1,2,3,4,6,8}, rows, cols, group_rows >= 1 (all <= 2^40),
  // codebook is a known type and total_bytes() fits in size_t (with headroom).
  Status Validate() const {
    const size_t kMaxDim = size_t{1} << 40;
    if (!IsValidPaletteBits(bits)) {
      return InvalidArgument("palette: bits = %d, need one of 1, 2, 3, 4, 6, 8",
                             bits);
    }
    if (rows == 0 || cols == 0) {
      return InvalidArgument("palette: shape %zu x %zu, need rows >= 1 and cols >= 1",
                             rows, cols);
    }
    // group_rows above rows is one group (allowed), but a value near 2^64
    // (e.g. -1 read from a file) would wrap num_groups() to 0 and leave the
    // codebooks empty: bound it like the dimensions below.
    if (group_rows == 0 || group_rows > kMaxDim) {
      return InvalidArgument("palette: group_rows = %zu, need 1 <= group_rows <= 2^40",
                             group_rows);
    }
    if (!IsFloatElement(codebook)) {
      return InvalidArgument("palette: codebook type %d (%s) is not f16 (0), bf16 (1) or f32 (2)",
                             static_cast<int>(codebook), ElementTypeName(codebook));
    }
    // Keep every size computation far from overflow: 2^40 rows or columns is
    // beyond any model, and the product limit keeps total_bytes < 2^62.
    if (rows > kMaxDim || cols > kMaxDim ||
        (rows > 0 && padded_cols() > (size_t{1} << 62) / rows / 8)) {
      return InvalidArgument("palette: shape %zu x %zu is too large", rows, cols);
    }
    return Status::Ok();
  }

  size_t block_cols() const { return PaletteBlockCols(bits); }
  // K rounded up to a whole number of blocks.
  size_t padded_cols() const {
    const size_t kb = block_cols();
    return (cols + kb - 1) / kb * kb;
  }
  // Byte stride between consecutive rows of packed indices.
  size_t row_bytes() const { return padded_cols() * static_cast<size_t>(bits) / 8; }
  // Bytes of one packed block of block_cols() columns (16, 32 or 48).
  size_t block_bytes() const { return block_cols() * static_cast<size_t>(bits) / 8; }
  size_t num_groups() const { return (rows + group_rows - 1) / group_rows; }
  size_t num_entries() const { return size_t{1} << bits; }  // 2^bits
  size_t index_bytes() const { return rows * row_bytes(); }
  size_t codebook_bytes() const {
    return num_groups() * num_entries() * ElementBytes(codebook);
  }
  size_t total_bytes() const { return index_bytes() + codebook_bytes(); }
  // 8 * (index_bytes + codebook_bytes) / (N * K): padding and codebooks included.
  double bits_per_weight() const {
    return 8.0 * static_cast<double>(total_bytes()) /
           (static_cast<double>(rows) * static_cast<double>(cols));
  }
};

namespace palette_detail {

// Where one plane of a block lives: width w and its byte offset in the block.
struct Plane {
  int w;
  size_t offset;
};

// Low plane (always present) and high plane (b = 3, 6; w = 0 otherwise), from
// PaletteFormat. bits is valid (callers hold a validated shape).
inline void Planes(int bits, Plane* low, Plane* high) {
  *low = {0, 0};
  *high = {0, 0};
  (void)WithBits(bits, [&](auto b) {
    using F = PaletteFormat<decltype(b)::value>;
    *low = {F::kLowBits, 0};
    *high = {F::kHighBits, F::kHighOffset};
  });
}

// Byte and bit shift of column `c` (relative to the block start) in a plane of
// width w: chunks of 16 bytes cover 16 * (8 / w) columns each.
inline void Locate(const Plane& p, size_t c, size_t* byte, int* shift) {
  const size_t cols_per_chunk = 16 * static_cast<size_t>(8 / p.w);
  const size_t chunk = c / cols_per_chunk;
  const size_t in_chunk = c % cols_per_chunk;
  *byte = p.offset + chunk * 16 + (in_chunk & 15);
  *shift = static_cast<int>(in_chunk >> 4) * p.w;
}

inline uint32_t GetField(const uint8_t* block, const Plane& p, size_t c) {
  size_t byte;
  int shift;
  Locate(p, c, &byte, &shift);
  return (static_cast<uint32_t>(block[byte]) >> shift) & ((1u << p.w) - 1u);
}

inline void SetField(uint8_t* block, const Plane& p, size_t c, uint32_t v) {
  size_t byte;
  int shift;
  Locate(p, c, &byte, &shift);
  const uint32_t mask = ((1u << p.w) - 1u) << shift;
  block[byte] = static_cast<uint8_t>((block[byte] & ~mask) | ((v << shift) & mask));
}

}  // namespace palette_detail

// Reads the b-bit index of column c (0 <= c < padded_cols) from one packed
// row. Scalar reference decode: slow, used by tests and tools.
inline uint32_t UnpackIndex(const PaletteShape& shape, const uint8_t* packed_row,
                            size_t c) {
  using namespace palette_detail;
  Plane low, high;
  Planes(shape.bits, &low, &high);
  const size_t kb = shape.block_cols();
  const uint8_t* block = packed_row + (c / kb) * shape.block_bytes();
  const size_t cb = c % kb;
  uint32_t idx = GetField(block, low, cb);
  if (high.w != 0) idx |= GetField(block, high, cb) << low.w;
  return idx;
}

// Writes index `idx` (< 2^b; higher bits are dropped) of column c into one
// packed row, leaving all other columns unchanged.
inline void PackIndex(const PaletteShape& shape, uint8_t* packed_row, size_t c,
                      uint32_t idx) {
  using namespace palette_detail;
  Plane low, high;
  Planes(shape.bits, &low, &high);
  const size_t kb = shape.block_cols();
  uint8_t* block = packed_row + (c / kb) * shape.block_bytes();
  const size_t cb = c % kb;
  SetField(block, low, cb, idx & ((1u << low.w) - 1u));
  if (high.w != 0) SetField(block, high, cb, idx >> low.w);
}

// Packs one whole row: indices[c] for c < K (each < 2^b), padding columns
// K..Kp-1 set to 0. Overwrites all row_bytes() bytes of packed_row. Writes
// byte by byte (no read-modify-write), so it is the fast path for producers.
inline void PackRow(const PaletteShape& shape, const uint8_t* HWY_RESTRICT indices,
                    uint8_t* HWY_RESTRICT packed_row) {
  using namespace palette_detail;
  Plane planes[2];
  Planes(shape.bits, &planes[0], &planes[1]);
  const size_t kb = shape.block_cols();
  const size_t bb = shape.block_bytes();
  const size_t K = shape.cols;
  const size_t num_blocks = shape.padded_cols() / kb;
  for (size_t blk = 0; blk < num_blocks; ++blk) {
    uint8_t* block = packed_row + blk * bb;
    const size_t c0 = blk * kb;
    int shift_in = 0;  // bit offset of this plane's field within the index
    for (const Plane& p : planes) {
      if (p.w == 0) break;
      const size_t per_chunk = 16 * static_cast<size_t>(8 / p.w);
      const uint32_t mask = (1u << p.w) - 1u;
      for (size_t chunk = 0; chunk < kb / per_chunk; ++chunk) {
        for (size_t j = 0; j < 16; ++j) {
          uint32_t byte = 0;
          for (size_t s = 0; s < static_cast<size_t>(8 / p.w); ++s) {
            const size_t c = c0 + chunk * per_chunk + 16 * s + j;
            const uint32_t idx = c < K ? indices[c] : 0u;
            byte |= ((idx >> shift_in) & mask) << (s * static_cast<size_t>(p.w));
          }
          block[p.offset + chunk * 16 + j] = static_cast<uint8_t>(byte);
        }
      }
      shift_in += p.w;
    }
  }
}

// Unpacks the first K indices of one packed row into indices[0..K).
inline void UnpackRow(const PaletteShape& shape, const uint8_t* HWY_RESTRICT packed_row,
                      uint8_t* HWY_RESTRICT indices) {
  for (size_t c = 0; c < shape.cols; ++c) {
    indices[c] = static_cast<uint8_t>(UnpackIndex(shape, packed_row, c));
  }
}

// Non-owning, read-only view of a palettized matrix: over a PaletteMatrix or
// over external memory such as an mmapped file (no copy, no alignment needed).
// Cheap to copy; the memory must outlive the view.
struct PaletteView {
  PaletteShape shape;
  const uint8_t* indices = nullptr;   // shape.index_bytes() bytes
  const void* codebooks = nullptr;    // shape.codebook_bytes() bytes

  // Validates the shape and that the buffers are non-null and have exactly the
  // sizes the shape implies.
  static StatusOr<PaletteView> Make(const PaletteShape& shape, const uint8_t* indices,
                                    size_t index_bytes, const void* codebooks,
                                    size_t codebook_bytes) {
    LUTRA_RETURN_IF_ERROR(shape.Validate());
    if (indices == nullptr || codebooks == nullptr) {
      return InvalidArgument("palette view: null %s pointer",
                             indices == nullptr ? "indices" : "codebooks");
    }
    if (index_bytes != shape.index_bytes()) {
      return InvalidArgument(
          "palette view: index buffer has %zu bytes, shape %zu x %zu at %d bits needs %zu",
          index_bytes, shape.rows, shape.cols, shape.bits, shape.index_bytes());
    }
    if (codebook_bytes != shape.codebook_bytes()) {
      return InvalidArgument(
          "palette view: codebook buffer has %zu bytes, %zu groups x %zu %s entries need %zu",
          codebook_bytes, shape.num_groups(), shape.num_entries(),
          ElementTypeName(shape.codebook), shape.codebook_bytes());
    }
    PaletteView v;
    v.shape = shape;
    v.indices = indices;
    v.codebooks = codebooks;
    return v;
  }

  // Start of row r's packed indices (row_bytes() bytes). r < rows.
  const uint8_t* row(size_t r) const { return indices + r * shape.row_bytes(); }
  // Scalar decode of the index at (r, c); r < rows, c < padded_cols.
  uint32_t index(size_t r, size_t c) const { return UnpackIndex(shape, row(r), c); }
  // Codebook entry e (< 2^b) of group `group` (< num_groups) as f32.
  float entry(size_t group, size_t e) const {
    return LoadElement(codebooks, shape.codebook, group * shape.num_entries() + e);
  }
  // Dequantized weight (r, c) = entry(r / G, index(r, c)).
  float weight(size_t r, size_t c) const {
    return entry(r / shape.group_rows, index(r, c));
  }
  // Codebook of the group that row r belongs to, as a raw pointer to
  // num_entries() entries of the codebook type.
  const void* row_codebook(size_t r) const {
    return static_cast<const uint8_t*>(codebooks) +
           (r / shape.group_rows) * shape.num_entries() * ElementBytes(shape.codebook);
  }
};

// Owning palettized matrix: one allocation holding the indices (offset 0)
// then the codebooks (at index_bytes rounded up to 64), both 64-byte aligned.
// Movable, not copyable. Default-constructed = empty (rows = 0).
class PaletteMatrix {
 public:
  static constexpr size_t kAlign = 64;

  PaletteMatrix() = default;
  PaletteMatrix(PaletteMatrix&&) = default;
  PaletteMatrix& operator=(PaletteMatrix&&) = default;
  PaletteMatrix(const PaletteMatrix&) = delete;
  PaletteMatrix& operator=(const PaletteMatrix&) = delete;

  // Allocates zeroed storage (all indices 0, all codebook entries +0.0).
  static StatusOr<PaletteMatrix> Allocate(const PaletteShape& shape) {
    LUTRA_RETURN_IF_ERROR(shape.Validate());
    const size_t cb_offset = RoundUp(shape.index_bytes());
    const size_t total = RoundUp(cb_offset + shape.codebook_bytes());
    void* p = ::operator new(total, std::align_val_t(kAlign), std::nothrow);
    if (p == nullptr) {
      return ResourceExhausted("palette: cannot allocate %zu bytes for %zu x %zu matrix",
                               total, shape.rows, shape.cols);
    }
    memset(p, 0, total);
    PaletteMatrix m;
    m.shape_ = shape;
    m.codebook_offset_ = cb_offset;
    m.storage_.reset(static_cast<uint8_t*>(p));
    return m;
  }

  const PaletteShape& shape() const { return shape_; }
  bool empty() const { return storage_ == nullptr; }
  PaletteView view() const {
    PaletteView v;
    v.shape = shape_;
    v.indices = storage_.get();
    v.codebooks = storage_ ? storage_.get() + codebook_offset_ : nullptr;
    return v;
  }
  // index_bytes() bytes, rows at stride row_bytes().
  uint8_t* mutable_indices() { return storage_.get(); }
  uint8_t* mutable_row(size_t r) { return storage_.get() + r * shape_.row_bytes(); }
  // codebook_bytes() bytes of the codebook type.
  void* mutable_codebooks() { return storage_.get() + codebook_offset_; }

  // Scalar pack of one index (r < rows, c < padded_cols, idx < 2^bits).
  void set_index(size_t r, size_t c, uint32_t idx) {
    PackIndex(shape_, mutable_row(r), c, idx);
  }
  // Stores v rounded to the codebook type (RoundToElementType: f16 saturates;
  // group < num_groups, e < 2^bits).
  void set_entry(size_t group, size_t e, float v) {
    StoreElement(mutable_codebooks(), shape_.codebook, group * shape_.num_entries() + e, v);
  }

 private:
  struct AlignedDelete {
    void operator()(uint8_t* p) const { ::operator delete(p, std::align_val_t(kAlign)); }
  };
  static size_t RoundUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

  PaletteShape shape_;
  size_t codebook_offset_ = 0;
  std::unique_ptr<uint8_t, AlignedDelete> storage_;
};

// Reference dequantization of row r (< rows) into out[0..K). Scalar, slow:
// the ground truth that the SIMD kernels are tested against.
inline void DequantizeRow(const PaletteView& v, size_t r, float* out) {
  float table[256];
  const size_t g = r / v.shape.group_rows;
  for (size_t e = 0; e < v.shape.num_entries(); ++e) table[e] = v.entry(g, e);
  const uint8_t* packed = v.row(r);
  for (size_t c = 0; c < v.shape.cols; ++c) {
    out[c] = table[UnpackIndex(v.shape, packed, c)];
  }
}

// Reference dequantization of the whole matrix into out (row-major N x K,
// out_size >= N * K floats).
inline Status Dequantize(const PaletteView& v, float* out, size_t out_size) {
  LUTRA_RETURN_IF_ERROR(v.shape.Validate());
  if (v.indices == nullptr || v.codebooks == nullptr) {
    return InvalidArgument("dequantize: view has null indices or codebooks");
  }
  const size_t n = v.shape.rows * v.shape.cols;
  if (out == nullptr || out_size < n) {
    return InvalidArgument("dequantize: output holds %zu floats, %zu x %zu needs %zu",
                           out == nullptr ? size_t{0} : out_size, v.shape.rows,
                           v.shape.cols, n);
  }
  for (size_t r = 0; r < v.shape.rows; ++r) DequantizeRow(v, r, out + r * v.shape.cols);
  return Status::Ok();
}

}  // namespace lutra

#endif  // LUTRA_PALETTE_H_
