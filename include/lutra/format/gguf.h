// GGUF (v2, v3) reader: metadata, tensor infos, and conversion of tensors to
// f32 (the tensor element types and their dequantization: ggml_types.h).
//
// GGUF layout (little-endian): "GGUF", u32 version, u64 tensor_count,
// u64 metadata_kv_count; metadata entries {string key, u32 type, value};
// tensor infos {string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type,
// u64 offset}; padding to general.alignment (default 32); the data section,
// where each tensor starts at data_offset + offset. A string is u64 length +
// bytes (no terminator); an array is u32 element type, u64 count, elements.
// Tensor dimensions are in ggml order: ne[0] is the contiguous (innermost)
// one, so a [rows, cols] row-major matrix has ne = {cols, rows}.
//
// GgufReader::Parse works over a caller-owned byte span (typically a
// MappedFile), copies nothing, and validates every count, length, type id,
// dimension and offset against the span before anything is used; afterwards
// all pointers it hands out are in bounds. Errors name the field and the
// numbers, e.g. "gguf: tensor 'blk.0.attn_q.weight' data [offset 1234,
// size 4096) exceeds file size 2000".
//
// LoRA adapters converted by llama.cpp (general.type = "adapter",
// adapter.type = "lora", tensors "<base name>.lora_a" / ".lora_b") are plain
// GGUF files and read the same way.
//
// Plain header: no Highway targets, no exceptions.
#ifndef LUTRA_GGUF_H_
#define LUTRA_GGUF_H_

#include <stddef.h>
#include <stdint.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "lutra/base/status.h"
#include "lutra/format/ggml_types.h"
#include "lutra/format/mapped_file.h"

namespace lutra {

// ---------------------------------------------------------------------------
// Types

// Metadata value types (gguf_type).
enum class GgufValueType : uint32_t {
  kU8 = 0,
  kI8 = 1,
  kU16 = 2,
  kI16 = 3,
  kU32 = 4,
  kI32 = 5,
  kF32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kU64 = 10,
  kI64 = 11,
  kF64 = 12,
};
inline constexpr uint32_t kGgufNumValueTypes = 13;

inline const char* GgufValueTypeName(GgufValueType type) {
  static const char* const kNames[kGgufNumValueTypes] = {
      "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64",
      "f64"};
  const uint32_t t = static_cast<uint32_t>(type);
  return t < kGgufNumValueTypes ? kNames[t] : "invalid";
}

// Bytes of one scalar of `type`; 0 for string, array and invalid types.
inline size_t GgufValueTypeSize(GgufValueType type) {
  switch (type) {
    case GgufValueType::kU8:
    case GgufValueType::kI8:
    case GgufValueType::kBool:
      return 1;
    case GgufValueType::kU16:
    case GgufValueType::kI16:
      return 2;
    case GgufValueType::kU32:
    case GgufValueType::kI32:
    case GgufValueType::kF32:
      return 4;
    case GgufValueType::kU64:
    case GgufValueType::kI64:
    case GgufValueType::kF64:
      return 8;
    default:
      return 0;
  }
}

namespace gguf_internal {

// Quoted-safe excerpt of file text for messages: at most 80 bytes,
// non-printable bytes as \xNN, so a corrupt name cannot garble the message.
inline std::string Printable(std::string_view s) {
  std::string out;
  const size_t n = s.size() < 80 ? s.size() : 80;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7F && c != '\'') {
      out.push_back(static_cast<char>(c));
    } else {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02X", c);
      out += buf;
    }
  }
  if (s.size() > n) out += "...";
  return out;
}

}  // namespace gguf_internal

// ---------------------------------------------------------------------------
// Metadata

// One metadata value; points into the parsed span (no copies).
struct GgufValue {
  GgufValueType type = GgufValueType::kU8;
  // Scalars: the raw little-endian bytes. Strings: the characters.
  // Arrays: the first element (strings: the first element's u64 length).
  const uint8_t* data = nullptr;
  // Strings: byte length. Arrays: element count. Scalars: 1.
  uint64_t count = 0;
  // Arrays only: element type, and the total bytes of all elements.
  GgufValueType array_type = GgufValueType::kU8;
  uint64_t array_bytes = 0;

  bool is_integer() const {
    switch (type) {
      case GgufValueType::kU8: case GgufValueType::kI8: case GgufValueType::kU16:
      case GgufValueType::kI16: case GgufValueType::kU32: case GgufValueType::kI32:
      case GgufValueType::kU64: case GgufValueType::kI64:
        return true;
      default:
        return false;
    }
  }
  // Precondition: type == kString.
  std::string_view str() const {
    return std::string_view(reinterpret_cast<const char*>(data), static_cast<size_t>(count));
  }
};

struct GgufKeyValue {
  std::string_view key;
  GgufValue value;
};

// Reads element `i` of an integer-typed scalar/array storage as int64
// (u64 values above INT64_MAX are reported through *overflow).
inline int64_t GgufLoadInteger(GgufValueType type, const uint8_t* p, bool* overflow) {
  *overflow = false;
  switch (type) {
    case GgufValueType::kU8: return *p;
    case GgufValueType::kI8: return static_cast<int8_t>(*p);
    case GgufValueType::kU16: { uint16_t v; std::memcpy(&v, p, 2); return v; }
    case GgufValueType::kI16: { int16_t v; std::memcpy(&v, p, 2); return v; }
    case GgufValueType::kU32: { uint32_t v; std::memcpy(&v, p, 4); return v; }
    case GgufValueType::kI32: { int32_t v; std::memcpy(&v, p, 4); return v; }
    case GgufValueType::kI64: { int64_t v; std::memcpy(&v, p, 8); return v; }
    case GgufValueType::kU64: {
      uint64_t v = 0;
      std::memcpy(&v, p, 8);
      if (v > static_cast<uint64_t>(INT64_MAX)) *overflow = true;
      return static_cast<int64_t>(v);
    }
    default: *overflow = true; return 0;
  }
}

// ---------------------------------------------------------------------------
// Tensors

struct GgufTensorInfo {
  std::string_view name;
  uint32_t n_dims = 0;
  uint64_t ne[4] = {1, 1, 1, 1};  // ggml order: ne[0] contiguous; unused dims 1
  uint32_t type = 0;              // GgmlType id
  uint64_t offset = 0;            // relative to the data section
  uint64_t n_elements = 0;
  uint64_t n_bytes = 0;
  const uint8_t* data = nullptr;  // resolved, in bounds; alignment = file's

  GgmlType ggml_type() const { return static_cast<GgmlType>(type); }
  const char* type_name() const { return GgmlTypeName(type); }
  // Elements per row (ne[0]) and number of rows (product of ne[1..]).
  uint64_t row_length() const { return ne[0]; }
  uint64_t n_rows() const { return ne[0] == 0 ? 0 : n_elements / ne[0]; }
  uint64_t row_bytes() const { return n_rows() == 0 ? 0 : n_bytes / n_rows(); }
  // "[64, 512]" in ggml order, for messages.
  std::string ShapeString() const {
    std::string s = "[";
    for (uint32_t i = 0; i < n_dims; ++i) {
      if (i) s += ", ";
      s += std::to_string(ne[i]);
    }
    return s + "]";
  }
};

// Fails (Unimplemented, naming type and tensor) unless ConvertToF32 handles
// the tensor's type.
inline Status CheckConvertibleToF32(const GgufTensorInfo& t) {
  const GgmlTypeInfo* info = GetGgmlTypeInfo(t.type);
  if (info == nullptr || !info->to_f32) {
    return Unimplemented("gguf: unsupported tensor type %s for tensor '%s' (convertible: %s)",
                         info ? info->name : "unknown", gguf_internal::Printable(t.name).c_str(),
                         GgmlConvertibleTypeNames().c_str());
  }
  return Status::Ok();
}

// Writes row `row` (< t.n_rows()) of t as t.row_length() floats to out.
inline Status TensorRowToF32(const GgufTensorInfo& t, uint64_t row, float* out) {
  LUTRA_RETURN_IF_ERROR(CheckConvertibleToF32(t));
  if (row >= t.n_rows()) {
    return OutOfRange("gguf: row %llu of tensor '%s' out of range (%llu rows)",
                      static_cast<unsigned long long>(row),
                      gguf_internal::Printable(t.name).c_str(),
                      static_cast<unsigned long long>(t.n_rows()));
  }
  return ConvertToF32(t.type, t.data + row * t.row_bytes(), t.row_length(), out);
}

// Writes all t.n_elements floats of t to out (capacity out_len).
inline Status TensorToF32(const GgufTensorInfo& t, float* out, uint64_t out_len) {
  LUTRA_RETURN_IF_ERROR(CheckConvertibleToF32(t));
  if (out_len < t.n_elements) {
    return InvalidArgument("gguf: tensor '%s' has %llu elements, output holds %llu",
                           gguf_internal::Printable(t.name).c_str(),
                           static_cast<unsigned long long>(t.n_elements),
                           static_cast<unsigned long long>(out_len));
  }
  return ConvertToF32(t.type, t.data, t.n_elements, out);
}

inline StatusOr<std::vector<float>> TensorToF32(const GgufTensorInfo& t) {
  LUTRA_RETURN_IF_ERROR(CheckConvertibleToF32(t));
  if (t.n_elements > SIZE_MAX / sizeof(float)) {
    return ResourceExhausted("gguf: tensor '%s' is too large for this host",
                             gguf_internal::Printable(t.name).c_str());
  }
  std::vector<float> out(static_cast<size_t>(t.n_elements));
  LUTRA_RETURN_IF_ERROR(TensorToF32(t, out.data(), out.size()));
  return out;
}

// ---------------------------------------------------------------------------
// Reader

class GgufReader {
 public:
  // Sanity caps beyond "fits in the file": no real model comes close.
  static constexpr uint64_t kMaxTensors = uint64_t{1} << 20;
  static constexpr uint64_t kMaxMetadata = uint64_t{1} << 20;
  static constexpr uint32_t kMaxDims = 4;
  static constexpr uint32_t kDefaultAlignment = 32;
  // Smallest encodings, used to bound counts by the bytes left:
  // key (8-byte length) + type (4) + 1-byte value; name (8) + n_dims (4) +
  // type (4) + offset (8).
  static constexpr uint64_t kMinMetadataBytes = 13;
  static constexpr uint64_t kMinTensorInfoBytes = 24;

  GgufReader() = default;

  // Parses and validates a GGUF file held in [data, data + size). Nothing is
  // copied: the bytes must outlive the reader (and everything it returns).
  static StatusOr<GgufReader> Parse(const uint8_t* data, size_t size) {
    GgufReader g;
    Status s = g.ParseImpl(data, size);
    if (!s.ok()) return s;
    return g;
  }

  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  // Absolute file offset of the data section.
  uint64_t data_offset() const { return data_offset_; }
  size_t file_size() const { return size_; }
  const uint8_t* file_data() const { return data_; }

  const std::vector<GgufKeyValue>& metadata() const { return kvs_; }
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }

  // nullptr when absent.
  const GgufValue* Find(std::string_view key) const {
    auto it = kv_index_.find(key);
    return it == kv_index_.end() ? nullptr : &kvs_[it->second].value;
  }
  const GgufTensorInfo* FindTensor(std::string_view name) const {
    auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
  }
  // NotFound "gguf: no tensor 'name'" when absent.
  StatusOr<const GgufTensorInfo*> GetTensor(std::string_view name) const {
    const GgufTensorInfo* t = FindTensor(name);
    if (t == nullptr) {
      return NotFound("gguf: no tensor '%s'", gguf_internal::Printable(name).c_str());
    }
    return t;
  }

  // Typed getters. Without a default, a missing key is NotFound; with one,
  // the default is returned. A present key of the wrong type (or a value that
  // does not fit the requested type) is always an error, never the default.
  // Integer getters accept any integer type whose value fits.
  StatusOr<int64_t> GetInt(std::string_view key) const { return GetIntImpl(key, nullptr); }
  StatusOr<int64_t> GetInt(std::string_view key, int64_t dflt) const {
    return GetIntImpl(key, &dflt);
  }
  StatusOr<uint32_t> GetU32(std::string_view key) const {
    return GetRanged<uint32_t>(key, nullptr, 0, UINT32_MAX, "u32");
  }
  StatusOr<uint32_t> GetU32(std::string_view key, uint32_t dflt) const {
    const int64_t d = dflt;
    return GetRanged<uint32_t>(key, &d, 0, UINT32_MAX, "u32");
  }
  StatusOr<int32_t> GetI32(std::string_view key) const {
    return GetRanged<int32_t>(key, nullptr, INT32_MIN, INT32_MAX, "i32");
  }
  StatusOr<int32_t> GetI32(std::string_view key, int32_t dflt) const {
    const int64_t d = dflt;
    return GetRanged<int32_t>(key, &d, INT32_MIN, INT32_MAX, "i32");
  }
  StatusOr<uint64_t> GetU64(std::string_view key) const {
    const GgufValue* v = Find(key);
    if (v == nullptr) return Missing(key);
    if (v->type == GgufValueType::kU64) {
      uint64_t x = 0;
      std::memcpy(&x, v->data, 8);
      return x;
    }
    StatusOr<int64_t> x = GetIntImpl(key, nullptr);
    if (!x.ok()) return x.status();
    if (*x < 0) return OutOfRangeValue(key, *x, "u64");
    return static_cast<uint64_t>(*x);
  }
  // f32 or f64 values (f64 narrowed).
  StatusOr<float> GetF32(std::string_view key) const { return GetFloatImpl(key, nullptr); }
  StatusOr<float> GetF32(std::string_view key, float dflt) const {
    const double d = dflt;
    return GetFloatImpl(key, &d);
  }
  StatusOr<double> GetF64(std::string_view key) const {
    const GgufValue* v = Find(key);
    if (v == nullptr) return Missing(key);
    return ScalarF64(key, *v);
  }
  StatusOr<double> GetF64(std::string_view key, double dflt) const {
    const GgufValue* v = Find(key);
    if (v == nullptr) return dflt;
    return ScalarF64(key, *v);
  }
  StatusOr<bool> GetBool(std::string_view key) const { return GetBoolImpl(key, nullptr); }
  StatusOr<bool> GetBool(std::string_view key, bool dflt) const {
    return GetBoolImpl(key, &dflt);
  }
  // The view points into the file bytes.
  StatusOr<std::string_view> GetString(std::string_view key) const {
    return GetStringImpl(key, nullptr);
  }
  StatusOr<std::string_view> GetString(std::string_view key, std::string_view dflt) const {
    return GetStringImpl(key, &dflt);
  }
  // The raw array value (type kArray), for element types not covered below.
  StatusOr<GgufValue> GetArray(std::string_view key) const {
    const GgufValue* v = Find(key);
    if (v == nullptr) return Missing(key);
    if (v->type != GgufValueType::kArray) return WrongType(key, *v, "array");
    return *v;
  }
  // Array of strings; views point into the file bytes.
  StatusOr<std::vector<std::string_view>> GetStringArray(std::string_view key) const {
    StatusOr<GgufValue> a = GetArray(key);
    if (!a.ok()) return a.status();
    if (a->array_type != GgufValueType::kString) return WrongArrayType(key, *a, "string");
    std::vector<std::string_view> out;
    out.reserve(static_cast<size_t>(a->count));
    // Lengths were validated by Parse; re-check anyway, it is cheap.
    ByteReader r(a->data, static_cast<size_t>(a->array_bytes), "gguf");
    for (uint64_t i = 0; i < a->count; ++i) {
      uint64_t len = 0;
      const uint8_t* p = nullptr;
      LUTRA_RETURN_IF_ERROR(r.Read(&len, "string length"));
      LUTRA_RETURN_IF_ERROR(r.Take(len, &p, "string"));
      out.emplace_back(reinterpret_cast<const char*>(p), static_cast<size_t>(len));
    }
    return out;
  }
  // Array of f32 or f64.
  StatusOr<std::vector<float>> GetF32Array(std::string_view key) const {
    StatusOr<GgufValue> a = GetArray(key);
    if (!a.ok()) return a.status();
    std::vector<float> out(static_cast<size_t>(a->count));
    if (a->array_type == GgufValueType::kF32) {
      if (a->count) std::memcpy(out.data(), a->data, out.size() * sizeof(float));
    } else if (a->array_type == GgufValueType::kF64) {
      for (size_t i = 0; i < out.size(); ++i) {
        double d = 0;
        std::memcpy(&d, a->data + 8 * i, 8);
        out[i] = static_cast<float>(d);
      }
    } else {
      return WrongArrayType(key, *a, "f32");
    }
    return out;
  }
  // Array of any integer type (u64 values above INT64_MAX are an error).
  StatusOr<std::vector<int64_t>> GetIntArray(std::string_view key) const {
    StatusOr<GgufValue> a = GetArray(key);
    if (!a.ok()) return a.status();
    GgufValue elem;
    elem.type = a->array_type;
    if (!elem.is_integer()) return WrongArrayType(key, *a, "integer");
    const size_t esize = GgufValueTypeSize(a->array_type);
    std::vector<int64_t> out(static_cast<size_t>(a->count));
    for (size_t i = 0; i < out.size(); ++i) {
      bool overflow;
      out[i] = GgufLoadInteger(a->array_type, a->data + esize * i, &overflow);
      if (overflow) {
        return DataLoss("gguf: key '%s' element %zu does not fit in i64",
                        gguf_internal::Printable(key).c_str(), i);
      }
    }
    return out;
  }

 private:
  static Status Missing(std::string_view key) {
    return NotFound("gguf: missing key '%s'", gguf_internal::Printable(key).c_str());
  }
  static Status WrongType(std::string_view key, const GgufValue& v, const char* expected) {
    return DataLoss("gguf: key '%s' has type %s, expected %s",
                    gguf_internal::Printable(key).c_str(), GgufValueTypeName(v.type), expected);
  }
  static Status WrongArrayType(std::string_view key, const GgufValue& v, const char* expected) {
    return DataLoss("gguf: key '%s' is an array of %s, expected an array of %s",
                    gguf_internal::Printable(key).c_str(), GgufValueTypeName(v.array_type),
                    expected);
  }
  static Status OutOfRangeValue(std::string_view key, int64_t x, const char* type) {
    return DataLoss("gguf: key '%s' = %lld does not fit in %s",
                    gguf_internal::Printable(key).c_str(), static_cast<long long>(x), type);
  }

  StatusOr<int64_t> GetIntImpl(std::string_view key, const int64_t* dflt) const {
    const GgufValue* v = Find(key);
    if (v == nullptr) {
      if (dflt) return *dflt;
      return Missing(key);
    }
    if (!v->is_integer()) return WrongType(key, *v, "an integer");
    bool overflow;
    const int64_t x = GgufLoadInteger(v->type, v->data, &overflow);
    if (overflow) {
      return DataLoss("gguf: key '%s' (u64) does not fit in i64",
                      gguf_internal::Printable(key).c_str());
    }
    return x;
  }
  template <class T>
  StatusOr<T> GetRanged(std::string_view key, const int64_t* dflt, int64_t lo, int64_t hi,
                        const char* name) const {
    StatusOr<int64_t> x = GetIntImpl(key, dflt);
    if (!x.ok()) return x.status();
    if (*x < lo || *x > hi) return OutOfRangeValue(key, *x, name);
    return static_cast<T>(*x);
  }
  StatusOr<double> ScalarF64(std::string_view key, const GgufValue& v) const {
    if (v.type == GgufValueType::kF32) {
      float f = 0;
      std::memcpy(&f, v.data, 4);
      return static_cast<double>(f);
    }
    if (v.type == GgufValueType::kF64) {
      double d = 0;
      std::memcpy(&d, v.data, 8);
      return d;
    }
    return WrongType(key, v, "f32 or f64");
  }
  StatusOr<float> GetFloatImpl(std::string_view key, const double* dflt) const {
    const GgufValue* v = Find(key);
    if (v == nullptr) {
      if (dflt) return static_cast<float>(*dflt);
      return Missing(key);
    }
    StatusOr<double> d = ScalarF64(key, *v);
    if (!d.ok()) return d.status();
    return static_cast<float>(*d);
  }
  StatusOr<bool> GetBoolImpl(std::string_view key, const bool* dflt) const {
    const GgufValue* v = Find(key);
    if (v == nullptr) {
      if (dflt) return *dflt;
      return Missing(key);
    }
    if (v->type != GgufValueType::kBool) return WrongType(key, *v, "bool");
    return *v->data != 0;
  }
  StatusOr<std::string_view> GetStringImpl(std::string_view key,
                                           const std::string_view* dflt) const {
    const GgufValue* v = Find(key);
    if (v == nullptr) {
      if (dflt) return *dflt;
      return Missing(key);
    }
    if (v->type != GgufValueType::kString) return WrongType(key, *v, "string");
    return v->str();
  }

  // Reads a GGUF string (u64 length + bytes) as a view into the data.
  // `what()` describes the field; it is called only to build an error, so
  // the fast path (e.g. 128k vocabulary strings) allocates nothing.
  template <class What>
  static Status ReadStringLazy(ByteReader& r, std::string_view* out, const What& what) {
    uint64_t len = 0;
    if (r.remaining() < 8) return r.Require(8, what() + " length");
    std::memcpy(&len, r.current(), 8);
    if (len > r.remaining() - 8) {
      return DataLoss("gguf: %s length %llu at offset %zu exceeds the %zu bytes left in the file",
                      what().c_str(), static_cast<unsigned long long>(len), r.pos(),
                      r.remaining() - 8);
    }
    const uint8_t* p = nullptr;
    LUTRA_RETURN_IF_ERROR(r.Take(8 + len, &p, "string"));
    *out = std::string_view(reinterpret_cast<const char*>(p + 8), static_cast<size_t>(len));
    return Status::Ok();
  }
  static Status ReadString(ByteReader& r, std::string_view* out, const std::string& what) {
    return ReadStringLazy(r, out, [&what] { return what; });
  }

  static Status ReadValueType(ByteReader& r, GgufValueType* type, const std::string& what) {
    uint32_t t = 0;
    LUTRA_RETURN_IF_ERROR(r.Read(&t, what));
    if (t >= kGgufNumValueTypes) {
      return DataLoss("gguf: %s is %u, not a valid type (0..12)", what.c_str(), t);
    }
    *type = static_cast<GgufValueType>(t);
    return Status::Ok();
  }

  // Reads the value of metadata entry `key` (its type already read).
  static Status ReadValue(ByteReader& r, std::string_view key, GgufValue* v) {
    const std::string name = "value of '" + gguf_internal::Printable(key) + "'";
    if (v->type == GgufValueType::kString) {
      std::string_view s;
      LUTRA_RETURN_IF_ERROR(ReadString(r, &s, "string " + name));
      v->data = reinterpret_cast<const uint8_t*>(s.data());
      v->count = s.size();
      return Status::Ok();
    }
    if (v->type != GgufValueType::kArray) {
      v->count = 1;
      return r.Take(GgufValueTypeSize(v->type), &v->data, name);
    }
    LUTRA_RETURN_IF_ERROR(ReadValueType(r, &v->array_type, "array element type of '" +
                                                               gguf_internal::Printable(key) +
                                                               "'"));
    if (v->array_type == GgufValueType::kArray) {
      return Unimplemented("gguf: key '%s' is an array of arrays (unsupported)",
                           gguf_internal::Printable(key).c_str());
    }
    LUTRA_RETURN_IF_ERROR(r.Read(&v->count, "array length of '" +
                                                gguf_internal::Printable(key) + "'"));
    const size_t start = r.pos();
    v->data = r.current();
    if (v->array_type == GgufValueType::kString) {
      // Each string needs at least its 8-byte length: bound the count before
      // walking so a huge count fails fast with a clear message.
      if (v->count > r.remaining() / 8) {
        return DataLoss("gguf: key '%s' array of %llu strings cannot fit in the %zu bytes left",
                        gguf_internal::Printable(key).c_str(),
                        static_cast<unsigned long long>(v->count), r.remaining());
      }
      for (uint64_t i = 0; i < v->count; ++i) {
        std::string_view unused;
        LUTRA_RETURN_IF_ERROR(ReadStringLazy(r, &unused, [i, key] {
          return "element " + std::to_string(i) + " of '" + gguf_internal::Printable(key) + "'";
        }));
      }
    } else {
      uint64_t bytes = 0;
      if (!CheckedMul(v->count, GgufValueTypeSize(v->array_type), &bytes) ||
          bytes > r.remaining()) {
        return DataLoss("gguf: key '%s' array of %llu %s exceeds the %zu bytes left in the file",
                        gguf_internal::Printable(key).c_str(),
                        static_cast<unsigned long long>(v->count),
                        GgufValueTypeName(v->array_type), r.remaining());
      }
      LUTRA_RETURN_IF_ERROR(r.Skip(bytes, name));
    }
    v->array_bytes = r.pos() - start;
    return Status::Ok();
  }

  Status ParseImpl(const uint8_t* data, size_t size) {
    if (!HostIsLittleEndian()) return Unimplemented("gguf: big-endian hosts are not supported");
    data_ = data;
    size_ = size;
    ByteReader r(data, size, "gguf");
    uint8_t magic[4] = {0, 0, 0, 0};
    LUTRA_RETURN_IF_ERROR(r.Read(&magic, "magic"));
    if (std::memcmp(magic, "GGUF", 4) != 0) {
      return DataLoss("gguf: bad magic '%s', expected 'GGUF'",
                      gguf_internal::Printable(std::string_view(
                          reinterpret_cast<const char*>(magic), 4)).c_str());
    }
    LUTRA_RETURN_IF_ERROR(r.Read(&version_, "version"));
    if (version_ == 0x02000000u || version_ == 0x03000000u) {
      return Unimplemented("gguf: big-endian GGUF files are not supported");
    }
    if (version_ == 1) {
      return Unimplemented("gguf: version 1 is not supported (only 2 and 3)");
    }
    if (version_ != 2 && version_ != 3) {
      return DataLoss("gguf: unknown version %u (supported: 2, 3)", version_);
    }
    uint64_t n_tensors = 0, n_kv = 0;
    LUTRA_RETURN_IF_ERROR(r.Read(&n_tensors, "tensor count"));
    LUTRA_RETURN_IF_ERROR(r.Read(&n_kv, "metadata count"));
    if (n_tensors > kMaxTensors || n_tensors > r.remaining() / kMinTensorInfoBytes) {
      return DataLoss("gguf: tensor count %llu is implausible (limit %llu, and %zu bytes left "
                      "hold at most %zu tensor infos)",
                      static_cast<unsigned long long>(n_tensors),
                      static_cast<unsigned long long>(kMaxTensors), r.remaining(),
                      static_cast<size_t>(r.remaining() / kMinTensorInfoBytes));
    }
    if (n_kv > kMaxMetadata || n_kv > r.remaining() / kMinMetadataBytes) {
      return DataLoss("gguf: metadata count %llu is implausible (limit %llu, and %zu bytes "
                      "left hold at most %zu entries)",
                      static_cast<unsigned long long>(n_kv),
                      static_cast<unsigned long long>(kMaxMetadata), r.remaining(),
                      static_cast<size_t>(r.remaining() / kMinMetadataBytes));
    }

    kvs_.reserve(static_cast<size_t>(n_kv));
    for (uint64_t i = 0; i < n_kv; ++i) {
      const std::string idx = std::to_string(i);
      GgufKeyValue kv;
      LUTRA_RETURN_IF_ERROR(ReadString(r, &kv.key, "key of metadata entry " + idx));
      LUTRA_RETURN_IF_ERROR(ReadValueType(
          r, &kv.value.type, "type of '" + gguf_internal::Printable(kv.key) + "'"));
      LUTRA_RETURN_IF_ERROR(ReadValue(r, kv.key, &kv.value));
      if (!kv_index_.emplace(kv.key, kvs_.size()).second) {
        return DataLoss("gguf: duplicate metadata key '%s'",
                        gguf_internal::Printable(kv.key).c_str());
      }
      kvs_.push_back(kv);
    }

    // general.alignment must be a u32 power of two (as llama.cpp requires).
    alignment_ = kDefaultAlignment;
    if (const GgufValue* a = Find("general.alignment")) {
      if (a->type != GgufValueType::kU32) {
        return DataLoss("gguf: general.alignment has type %s, expected u32",
                        GgufValueTypeName(a->type));
      }
      uint32_t align = 0;
      std::memcpy(&align, a->data, 4);
      if (align == 0 || (align & (align - 1)) != 0) {
        return DataLoss("gguf: general.alignment %u is not a power of two", align);
      }
      alignment_ = align;
    }

    tensors_.reserve(static_cast<size_t>(n_tensors));
    for (uint64_t i = 0; i < n_tensors; ++i) {
      GgufTensorInfo t;
      LUTRA_RETURN_IF_ERROR(ReadString(r, &t.name, "name of tensor " + std::to_string(i)));
      const std::string tname = "'" + gguf_internal::Printable(t.name) + "'";
      LUTRA_RETURN_IF_ERROR(r.Read(&t.n_dims, "n_dims of tensor " + tname));
      if (t.n_dims > kMaxDims) {
        return DataLoss("gguf: tensor %s has %u dimensions (at most %u)", tname.c_str(),
                        t.n_dims, kMaxDims);
      }
      uint64_t n = 1;
      for (uint32_t d = 0; d < t.n_dims; ++d) {
        LUTRA_RETURN_IF_ERROR(r.Read(&t.ne[d], "dimension " + std::to_string(d) +
                                                   " of tensor " + tname));
      }
      for (uint32_t d = 0; d < t.n_dims; ++d) {
        if (t.ne[d] > static_cast<uint64_t>(INT64_MAX) || !CheckedMul(n, t.ne[d], &n) ||
            n > static_cast<uint64_t>(INT64_MAX)) {
          return DataLoss("gguf: tensor %s dimensions %s overflow the element count",
                          tname.c_str(), t.ShapeString().c_str());
        }
      }
      t.n_elements = n;
      LUTRA_RETURN_IF_ERROR(r.Read(&t.type, "type of tensor " + tname));
      const GgmlTypeInfo* info = GetGgmlTypeInfo(t.type);
      if (info == nullptr) {
        return DataLoss("gguf: tensor %s has unknown type id %u", tname.c_str(), t.type);
      }
      if (t.ne[0] % info->block_size != 0) {
        return DataLoss("gguf: tensor %s row length %llu is not a multiple of the %s block "
                        "size %u", tname.c_str(), static_cast<unsigned long long>(t.ne[0]),
                        info->name, info->block_size);
      }
      if (!CheckedMul(n / info->block_size, info->type_size, &t.n_bytes)) {
        return DataLoss("gguf: tensor %s byte size overflows", tname.c_str());
      }
      LUTRA_RETURN_IF_ERROR(r.Read(&t.offset, "offset of tensor " + tname));
      if (t.offset % alignment_ != 0) {
        return DataLoss("gguf: tensor %s offset %llu is not a multiple of the alignment %llu",
                        tname.c_str(), static_cast<unsigned long long>(t.offset),
                        static_cast<unsigned long long>(alignment_));
      }
      if (!tensor_index_.emplace(t.name, tensors_.size()).second) {
        return DataLoss("gguf: duplicate tensor name %s", tname.c_str());
      }
      tensors_.push_back(t);
    }

    // The data section starts at the next multiple of the alignment.
    const uint64_t header_end = r.pos();
    data_offset_ = (header_end + alignment_ - 1) / alignment_ * alignment_;
    for (GgufTensorInfo& t : tensors_) {
      uint64_t begin = UINT64_MAX, end = UINT64_MAX;
      if (!CheckedAdd(data_offset_, t.offset, &begin) || !CheckedAdd(begin, t.n_bytes, &end) ||
          end > size) {
        // Absolute offsets, so the numbers compare directly with the size.
        return DataLoss("gguf: tensor '%s' data [offset %llu, size %llu) exceeds file size %zu",
                        gguf_internal::Printable(t.name).c_str(),
                        static_cast<unsigned long long>(begin),
                        static_cast<unsigned long long>(t.n_bytes), size);
      }
      t.data = data + begin;
    }
    return Status::Ok();
  }

  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  uint32_t version_ = 0;
  uint64_t alignment_ = kDefaultAlignment;
  uint64_t data_offset_ = 0;
  std::vector<GgufKeyValue> kvs_;
  std::vector<GgufTensorInfo> tensors_;
  std::unordered_map<std::string_view, size_t> kv_index_;
  std::unordered_map<std::string_view, size_t> tensor_index_;
};

// A GGUF file with its bytes: owns the MappedFile that the reader points into.
// Move-only; moving keeps the reader valid (the bytes do not move).
class GgufFile {
 public:
  GgufFile() = default;

  static StatusOr<GgufFile> Open(const std::string& path) {
    StatusOr<MappedFile> file = MappedFile::Open(path);
    if (!file.ok()) return file.status();
    return FromMapped(std::move(*file));
  }
  // Errors are prefixed with the file's path.
  static StatusOr<GgufFile> FromMapped(MappedFile file) {
    GgufFile g;
    g.file_ = std::move(file);
    StatusOr<GgufReader> reader = GgufReader::Parse(g.file_.data(), g.file_.size());
    if (!reader.ok()) return reader.status().WithContext(g.file_.path());
    g.reader_ = std::move(*reader);
    return g;
  }

  const GgufReader& reader() const { return reader_; }
  const MappedFile& file() const { return file_; }
  // Moves the bytes out (to keep tensor data alive elsewhere); the reader
  // still points at them, so use it only while the returned file lives.
  MappedFile ReleaseFile() && { return std::move(file_); }

 private:
  MappedFile file_;
  GgufReader reader_;
};

}  // namespace lutra

#endif  // LUTRA_GGUF_H_
