// Minimal GGUF writer: builds a complete GGUF v2/v3 file in memory.
//
// Used by tests to create small valid (and, by patching the bytes at the
// offsets reported in GgufLayout, deliberately corrupt) files, and usable by
// tools that export models (e.g. re-encoding f32 weights as f16 or q8_0).
// Layout written: header, metadata in insertion order, tensor infos in
// insertion order, zero padding to the alignment, tensor data (each tensor
// padded to the alignment), exactly as gguf.h reads it.
//
// Plain header; no exceptions. Errors (bad shapes, duplicate names) are
// recorded and returned by Finish().
#ifndef LUTRA_GGUF_WRITER_H_
#define LUTRA_GGUF_WRITER_H_

#include <stddef.h>
#include <stdint.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "lutra/base/element.h"
#include "lutra/base/status.h"
#include "lutra/format/gguf.h"

namespace lutra {

// Absolute byte offsets of the fields written by GgufWriter::Finish, so tests
// can patch exactly one field.
struct GgufLayout {
  struct Entry {
    size_t begin = 0;   // first byte of the metadata entry / tensor info
    size_t type = 0;    // the u32 value type (metadata) or ggml type (tensor)
    size_t value = 0;   // metadata: first byte of the value (array: element type)
    size_t dims = 0;    // tensor: the u32 n_dims
    size_t offset = 0;  // tensor: the u64 offset field
    size_t data = 0;    // tensor: absolute position of its data
  };
  std::vector<Entry> metadata;
  std::vector<Entry> tensors;
  size_t data_offset = 0;  // start of the data section
};

// ---------------------------------------------------------------------------
// Encoders from f32 (round to nearest even). n must be a multiple of the
// block size. f16 is IEEE (element.h): beyond +-65504 becomes +-Inf.

inline void EncodeF16(const float* x, size_t n, uint8_t* out) {
  for (size_t i = 0; i < n; ++i) {
    const uint16_t bits = F16BitsFromF32(x[i]);
    std::memcpy(out + 2 * i, &bits, 2);
  }
}
inline void EncodeBF16(const float* x, size_t n, uint8_t* out) {
  for (size_t i = 0; i < n; ++i) {
    const uint16_t bits = BF16BitsFromF32(x[i]);
    std::memcpy(out + 2 * i, &bits, 2);
  }
}
// Q8_0: per 32 values, d = max|x| / 127 (stored as f16), q = round(x / d).
inline void EncodeQ8_0(const float* x, size_t n, uint8_t* out) {
  for (size_t b = 0; b < n / 32; ++b) {
    const float* v = x + 32 * b;
    uint8_t* blk = out + 34 * b;
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::fmax(amax, std::fabs(v[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    EncodeF16(&d, 1, blk);
    for (int j = 0; j < 32; ++j) {
      const long q = std::lround(v[j] * id);
      blk[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(q < -127 ? -127 : (q > 127 ? 127 : q)));
    }
  }
}
// Q4_0: per 32 values, d = (value of max magnitude) / -8, q = clamp(x / d + 8).
inline void EncodeQ4_0(const float* x, size_t n, uint8_t* out) {
  for (size_t b = 0; b < n / 32; ++b) {
    const float* v = x + 32 * b;
    uint8_t* blk = out + 18 * b;
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; ++j) {
      if (std::fabs(v[j]) > amax) {
        amax = std::fabs(v[j]);
        max = v[j];
      }
    }
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    EncodeF16(&d, 1, blk);
    for (int j = 0; j < 16; ++j) {
      const auto q = [&](float f) {
        const int r = static_cast<int>(std::floor(f * id + 8.5f));
        return static_cast<uint8_t>(r < 0 ? 0 : (r > 15 ? 15 : r));
      };
      blk[2 + j] = static_cast<uint8_t>(q(v[j]) | (q(v[j + 16]) << 4));
    }
  }
}

class GgufWriter {
 public:
  explicit GgufWriter(uint32_t version = 3) : version_(version) {}

  // Scalars. "general.alignment" (u32) also sets the alignment used below.
  void AddU8(const std::string& key, uint8_t v) { AddScalar(key, GgufValueType::kU8, &v, 1); }
  void AddI8(const std::string& key, int8_t v) { AddScalar(key, GgufValueType::kI8, &v, 1); }
  void AddU16(const std::string& key, uint16_t v) { AddScalar(key, GgufValueType::kU16, &v, 2); }
  void AddI16(const std::string& key, int16_t v) { AddScalar(key, GgufValueType::kI16, &v, 2); }
  void AddU32(const std::string& key, uint32_t v) {
    if (key == "general.alignment") alignment_ = v;
    AddScalar(key, GgufValueType::kU32, &v, 4);
  }
  void AddI32(const std::string& key, int32_t v) { AddScalar(key, GgufValueType::kI32, &v, 4); }
  void AddU64(const std::string& key, uint64_t v) { AddScalar(key, GgufValueType::kU64, &v, 8); }
  void AddI64(const std::string& key, int64_t v) { AddScalar(key, GgufValueType::kI64, &v, 8); }
  void AddF32(const std::string& key, float v) { AddScalar(key, GgufValueType::kF32, &v, 4); }
  void AddF64(const std::string& key, double v) { AddScalar(key, GgufValueType::kF64, &v, 8); }
  void AddBool(const std::string& key, bool v) {
    const uint8_t b = v ? 1 : 0;
    AddScalar(key, GgufValueType::kBool, &b, 1);
  }
  void AddString(const std::string& key, const std::string& v) {
    Entry e = NewEntry(key, GgufValueType::kString);
    PutString(e.value, v);
    meta_.push_back(std::move(e));
  }
  // Array of fixed-size elements (`count` elements of `elem_type` at data).
  void AddArray(const std::string& key, GgufValueType elem_type, const void* data,
                uint64_t count) {
    const size_t esize = GgufValueTypeSize(elem_type);
    if (esize == 0) {
      Fail(InvalidArgument("gguf writer: AddArray '%s' with element type %s", key.c_str(),
                           GgufValueTypeName(elem_type)));
      return;
    }
    Entry e = NewEntry(key, GgufValueType::kArray);
    PutU32(e.value, static_cast<uint32_t>(elem_type));
    PutU64(e.value, count);
    const uint8_t* p = static_cast<const uint8_t*>(data);
    e.value.insert(e.value.end(), p, p + count * esize);
    meta_.push_back(std::move(e));
  }
  void AddStringArray(const std::string& key, const std::vector<std::string>& values) {
    Entry e = NewEntry(key, GgufValueType::kArray);
    PutU32(e.value, static_cast<uint32_t>(GgufValueType::kString));
    PutU64(e.value, values.size());
    for (const std::string& s : values) PutString(e.value, s);
    meta_.push_back(std::move(e));
  }
  void AddF32Array(const std::string& key, const std::vector<float>& v) {
    AddArray(key, GgufValueType::kF32, v.data(), v.size());
  }
  void AddI32Array(const std::string& key, const std::vector<int32_t>& v) {
    AddArray(key, GgufValueType::kI32, v.data(), v.size());
  }

  // A tensor already encoded as `type`; ne in ggml order (ne[0] contiguous).
  // `bytes` must equal the size the reader will compute. The data is copied.
  void AddTensor(const std::string& name, GgmlType type, const std::vector<uint64_t>& ne,
                 const void* data, size_t bytes) {
    AddTensorImpl(name, type, ne, data, bytes, /*copy=*/true);
  }
  // As AddTensor, but keeps only the pointer: `data` must stay valid until
  // the last Finish/WriteFile (avoids a copy of large weights).
  void AddTensorView(const std::string& name, GgmlType type, const std::vector<uint64_t>& ne,
                     const void* data, size_t bytes) {
    AddTensorImpl(name, type, ne, data, bytes, /*copy=*/false);
  }
  // Encodes f32 values as `type` (f32, f16, bf16, q8_0 or q4_0) and adds them.
  void AddTensorF32(const std::string& name, const std::vector<uint64_t>& ne, const float* x,
                    GgmlType type = GgmlType::kF32) {
    uint64_t n = 1;
    for (uint64_t d : ne) n *= d;
    std::vector<uint8_t> bytes;
    const GgmlTypeInfo* info = GetGgmlTypeInfo(static_cast<uint32_t>(type));
    if (info == nullptr || n % info->block_size != 0 || ne.empty() ||
        ne[0] % info->block_size != 0) {
      Fail(InvalidArgument("gguf writer: cannot encode tensor '%s' as type %u", name.c_str(),
                           static_cast<uint32_t>(type)));
      return;
    }
    bytes.resize(n / info->block_size * info->type_size);
    switch (type) {
      case GgmlType::kF32: std::memcpy(bytes.data(), x, n * 4); break;
      case GgmlType::kF16: EncodeF16(x, n, bytes.data()); break;
      case GgmlType::kBF16: EncodeBF16(x, n, bytes.data()); break;
      case GgmlType::kQ8_0: EncodeQ8_0(x, n, bytes.data()); break;
      case GgmlType::kQ4_0: EncodeQ4_0(x, n, bytes.data()); break;
      default:
        Fail(Unimplemented("gguf writer: no encoder for %s (tensor '%s')", info->name,
                           name.c_str()));
        return;
    }
    AddTensor(name, type, ne, bytes.data(), bytes.size());
  }

  // Serializes everything added so far; `layout` (optional) receives field
  // offsets. Fails with the first error recorded by an Add* call.
  StatusOr<std::vector<uint8_t>> Finish(GgufLayout* layout = nullptr) const {
    std::vector<uint8_t> out;
    LUTRA_RETURN_IF_ERROR(Header(&out, layout));
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const Tensor& t = tensors_[i];
      out.insert(out.end(), t.data, t.data + t.size);
      // Pad between tensors, not after the last one: the file ends where the
      // last tensor's data ends (as llama.cpp's writer does too).
      if (i + 1 < tensors_.size()) out.resize(Pad(out.size()), 0);
    }
    return out;
  }

  // Streams the file to `path` (header, then each tensor's bytes) without
  // building it in memory.
  Status WriteFile(const std::string& path) const {
    std::vector<uint8_t> header;
    LUTRA_RETURN_IF_ERROR(Header(&header, nullptr));
    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (f == nullptr) {
      const int err = errno;
      return NotFound("gguf writer: cannot create '%s': %s", path.c_str(), std::strerror(err));
    }
    bool ok = std::fwrite(header.data(), 1, header.size(), f) == header.size();
    uint64_t pos = header.size();
    static const uint8_t kZeros[256] = {};
    for (size_t i = 0; ok && i < tensors_.size(); ++i) {
      const Tensor& t = tensors_[i];
      ok = t.size == 0 || std::fwrite(t.data, 1, t.size, f) == t.size;
      pos += t.size;
      if (i + 1 < tensors_.size()) {
        uint64_t pad = Pad(pos) - pos;
        pos += pad;
        while (ok && pad > 0) {
          const size_t chunk = pad < sizeof(kZeros) ? static_cast<size_t>(pad) : sizeof(kZeros);
          ok = std::fwrite(kZeros, 1, chunk, f) == chunk;
          pad -= chunk;
        }
      }
    }
    const bool closed = std::fclose(f) == 0;
    if (!ok || !closed) {
      const int err = errno;
      return DataLoss("gguf writer: writing '%s' failed: %s", path.c_str(), std::strerror(err));
    }
    return Status::Ok();
  }

 private:
  struct Entry {
    std::string key;
    GgufValueType type;
    std::vector<uint8_t> value;
  };
  struct Tensor {
    std::string name;
    GgmlType type;
    std::vector<uint64_t> ne;
    std::vector<uint8_t> owned;  // empty for views
    const uint8_t* data = nullptr;
    size_t size = 0;
  };

  void AddTensorImpl(const std::string& name, GgmlType type, const std::vector<uint64_t>& ne,
                     const void* data, size_t bytes, bool copy) {
    const GgmlTypeInfo* info = GetGgmlTypeInfo(static_cast<uint32_t>(type));
    uint64_t n = 1;
    bool overflow = false;
    for (uint64_t d : ne) overflow |= !CheckedMul(n, d, &n);
    if (info == nullptr || ne.empty() || ne.size() > 4 || overflow ||
        ne[0] % info->block_size != 0 || n / info->block_size * info->type_size != bytes ||
        (data == nullptr && bytes != 0)) {
      Fail(InvalidArgument("gguf writer: tensor '%s' of %zu bytes does not match type %u "
                           "and %zu dims", name.c_str(), bytes, static_cast<uint32_t>(type),
                           ne.size()));
      return;
    }
    if (!tensor_names_.insert(name).second) {
      Fail(InvalidArgument("gguf writer: duplicate tensor '%s'", name.c_str()));
      return;
    }
    tensors_.emplace_back();
    Tensor& t = tensors_.back();
    t.name = name;
    t.type = type;
    t.ne = ne;
    t.size = bytes;
    const uint8_t* p = static_cast<const uint8_t*>(data);
    if (copy) {
      t.owned.assign(p, p + bytes);
      t.data = t.owned.data();  // heap buffer: stable when tensors_ grows
    } else {
      t.data = p;
    }
  }

  // Header, metadata, tensor infos and the padding before the data section.
  Status Header(std::vector<uint8_t>* out_ptr, GgufLayout* layout) const {
    if (!status_.ok()) return status_;
    if (alignment_ == 0 || (alignment_ & (alignment_ - 1)) != 0) {
      return InvalidArgument("gguf writer: alignment %u is not a power of two", alignment_);
    }
    std::vector<uint8_t>& out = *out_ptr;
    GgufLayout lay;
    out.insert(out.end(), {'G', 'G', 'U', 'F'});
    PutU32(out, version_);
    PutU64(out, tensors_.size());
    PutU64(out, meta_.size());
    for (const Entry& e : meta_) {
      GgufLayout::Entry l;
      l.begin = out.size();
      PutString(out, e.key);
      l.type = out.size();
      PutU32(out, static_cast<uint32_t>(e.type));
      l.value = out.size();
      out.insert(out.end(), e.value.begin(), e.value.end());
      lay.metadata.push_back(l);
    }
    uint64_t offset = 0;
    for (const Tensor& t : tensors_) {
      GgufLayout::Entry l;
      l.begin = out.size();
      PutString(out, t.name);
      l.dims = out.size();
      PutU32(out, static_cast<uint32_t>(t.ne.size()));
      for (uint64_t d : t.ne) PutU64(out, d);
      l.type = out.size();
      PutU32(out, static_cast<uint32_t>(t.type));
      l.offset = out.size();
      PutU64(out, offset);
      l.data = offset;  // made absolute below
      offset += Pad(t.size);
      lay.tensors.push_back(l);
    }
    if (!tensors_.empty()) out.resize(Pad(out.size()), 0);
    lay.data_offset = out.size();
    for (GgufLayout::Entry& l : lay.tensors) l.data += lay.data_offset;
    if (layout) *layout = std::move(lay);
    return Status::Ok();
  }

  static void PutU32(std::vector<uint8_t>& out, uint32_t v) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(&v);
    out.insert(out.end(), p, p + 4);
  }
  static void PutU64(std::vector<uint8_t>& out, uint64_t v) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(&v);
    out.insert(out.end(), p, p + 8);
  }
  static void PutString(std::vector<uint8_t>& out, const std::string& s) {
    PutU64(out, s.size());
    out.insert(out.end(), s.begin(), s.end());
  }
  uint64_t Pad(uint64_t n) const { return (n + alignment_ - 1) / alignment_ * alignment_; }

  Entry NewEntry(const std::string& key, GgufValueType type) {
    if (!keys_.insert(key).second) {
      Fail(InvalidArgument("gguf writer: duplicate key '%s'", key.c_str()));
    }
    Entry e;
    e.key = key;
    e.type = type;
    return e;
  }
  void AddScalar(const std::string& key, GgufValueType type, const void* v, size_t size) {
    Entry e = NewEntry(key, type);
    const uint8_t* p = static_cast<const uint8_t*>(v);
    e.value.assign(p, p + size);
    meta_.push_back(std::move(e));
  }
  void Fail(Status s) {
    if (status_.ok()) status_ = std::move(s);
  }

  uint32_t version_;
  uint32_t alignment_ = GgufReader::kDefaultAlignment;
  std::vector<Entry> meta_;
  std::vector<Tensor> tensors_;
  std::set<std::string> keys_, tensor_names_;
  Status status_;
};

}  // namespace lutra

#endif  // LUTRA_GGUF_WRITER_H_
