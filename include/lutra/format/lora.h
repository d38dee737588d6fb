// LoRA adapters: small low-rank corrections applied on top of a frozen
// (palettized) base model, y = W x + scale * B (A x).
//
// Per adapted matrix W (N rows = outputs x K columns = inputs):
//   A: rank x K, row-major (the "down" projection, lora_a),
//   B: N x rank, row-major (the "up" projection, lora_b),
//   elements f16 or bf16 (16-bit: half the memory of f32, and the
//   GEMV epilogue converts them on load), plus an f32 scale.
// The product B A is never formed and never merged into W: the palettized
// base is shared by every adapter and by requests without one, so switching
// adapters is swapping one pointer (see lora_manager.h), and W stays exactly
// as the palettizer wrote it. The GEMV/GEMM kernels apply the delta in their
// epilogue (LoraDelta below, which Adapter::Find returns).
//
// Targets: the attention projections q, k, v, o and the FFN w1 (gate),
// w2 (down), w3 (up) of any subset of layers. An adapter is validated
// against the base model's shapes (BaseShapes) when it is built or loaded,
// so a kernel never sees a factor whose shape does not match its matrix.
//
// Plain header: data structures, validation and a scalar reference.
#ifndef LUTRA_LORA_H_
#define LUTRA_LORA_H_

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "lutra/base/element.h"
#include "lutra/base/status.h"

namespace lutra {

// Largest LoRA rank the epilogue supports.
inline constexpr size_t kMaxLoraRank = 64;

// Low-rank delta added to the output: y += scale * B * (A * x).
// A is rank x K row-major, B is N x rank row-major, both of `type`. A * x is
// computed once per call (in Prepare*Input), B's rows while each output row
// is still in registers.
struct LoraDelta {
  const void* a = nullptr;
  const void* b = nullptr;
  size_t rank = 0;  // 1..kMaxLoraRank
  ElementType type = ElementType::kF32;
  float scale = 1.0f;
};

// Validates a LoRA delta against a K-column, N-row weight.
inline Status ValidateLora(const LoraDelta& lora) {
  if (lora.rank == 0 || lora.rank > kMaxLoraRank) {
    return InvalidArgument("lora: rank = %zu, need 1..%zu", lora.rank, kMaxLoraRank);
  }
  if (lora.a == nullptr || lora.b == nullptr) {
    return InvalidArgument("lora: null %s factor", lora.a == nullptr ? "A" : "B");
  }
  if (!IsFloatElement(lora.type)) {
    return InvalidArgument("lora: type %d (%s) is not f16 (0), bf16 (1) or f32 (2)",
                           static_cast<int>(lora.type), ElementTypeName(lora.type));
  }
  if (!std::isfinite(lora.scale)) return InvalidArgument("lora: scale is not finite");
  return Status::Ok();
}

// Builds the epilogue's view of factors a (rank x K) and b (N x rank).
inline LoraDelta MakeLoraDelta(const void* a, const void* b, size_t rank, ElementType type,
                               float scale) {
  LoraDelta d{};
  d.a = a;
  d.b = b;
  d.rank = rank;
  d.type = type;
  d.scale = scale;
  return d;
}

// The projections of a Llama-style layer that an adapter may target. Values
// index tables; they are not part of any file format (files use the names).
enum class Projection : uint8_t {
  kQ = 0,   // attention query, q_dim x dim
  kK = 1,   // attention key, kv_dim x dim
  kV = 2,   // attention value, kv_dim x dim
  kO = 3,   // attention output, dim x q_dim
  kW1 = 4,  // FFN gate, hidden x dim
  kW2 = 5,  // FFN down, dim x hidden
  kW3 = 6,  // FFN up, hidden x dim
};
inline constexpr size_t kNumProjections = 7;

inline constexpr Projection kAllProjections[kNumProjections] = {
    Projection::kQ,  Projection::kK,  Projection::kV, Projection::kO,
    Projection::kW1, Projection::kW2, Projection::kW3};

// Short name used in messages ("q", "w1", ...).
inline const char* ProjectionName(Projection p) {
  static const char* const kNames[kNumProjections] = {"q", "k", "v", "o", "w1", "w2", "w3"};
  const size_t i = static_cast<size_t>(p);
  return i < kNumProjections ? kNames[i] : "invalid";
}

// GGUF (llama.cpp) tensor name stem: blk.<layer>.<stem>.weight.
inline const char* ProjectionGgufName(Projection p) {
  static const char* const kNames[kNumProjections] = {
      "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_down", "ffn_up"};
  const size_t i = static_cast<size_t>(p);
  return i < kNumProjections ? kNames[i] : "invalid";
}

// Parses a GGUF stem ("attn_q", ...) into *p; false if it is not a target.
inline bool ProjectionFromGgufName(const std::string& stem, Projection* p) {
  for (Projection q : kAllProjections) {
    if (stem == ProjectionGgufName(q)) {
      *p = q;
      return true;
    }
  }
  return false;
}

// Shapes of the base model's adaptable matrices: every layer has the same
// shapes (Llama), rows x cols per projection. An adapter is checked against
// this before any kernel sees it.
struct BaseShapes {
  size_t num_layers = 0;
  size_t rows[kNumProjections] = {};
  size_t cols[kNumProjections] = {};

  // Llama layout: q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim.
  static BaseShapes Llama(size_t num_layers, size_t dim, size_t hidden_dim,
                          size_t q_dim, size_t kv_dim) {
    BaseShapes s;
    s.num_layers = num_layers;
    const size_t r[kNumProjections] = {q_dim, kv_dim, kv_dim, dim, hidden_dim, dim, hidden_dim};
    const size_t c[kNumProjections] = {dim, dim, dim, q_dim, dim, hidden_dim, dim};
    for (size_t i = 0; i < kNumProjections; ++i) {
      s.rows[i] = r[i];
      s.cols[i] = c[i];
    }
    return s;
  }
  size_t Rows(Projection p) const { return rows[static_cast<size_t>(p)]; }
  size_t Cols(Projection p) const { return cols[static_cast<size_t>(p)]; }

  Status Validate() const {
    if (num_layers == 0 || num_layers > (size_t{1} << 20)) {
      return InvalidArgument("lora: base model has %zu layers, need 1..2^20", num_layers);
    }
    for (Projection p : kAllProjections) {
      if (Rows(p) == 0 || Cols(p) == 0 || Rows(p) > (size_t{1} << 24) ||
          Cols(p) > (size_t{1} << 24)) {
        return InvalidArgument("lora: base projection %s is %zu x %zu, need 1..2^24 each",
                               ProjectionName(p), Rows(p), Cols(p));
      }
    }
    return Status::Ok();
  }
  bool operator==(const BaseShapes& o) const {
    if (num_layers != o.num_layers) return false;
    for (size_t i = 0; i < kNumProjections; ++i) {
      if (rows[i] != o.rows[i] || cols[i] != o.cols[i]) return false;
    }
    return true;
  }
};

// One adapted matrix: the factors (owned, 64-byte aligned, one allocation)
// and the LoraDelta view of them that the GEMV/GEMM epilogue takes.
class LoraFactors {
 public:
  static constexpr size_t kAlign = 64;

  size_t layer() const { return layer_; }
  Projection projection() const { return projection_; }
  size_t rows() const { return rows_; }  // N
  size_t cols() const { return cols_; }  // K
  size_t rank() const { return delta_.rank; }
  ElementType type() const { return delta_.type; }
  float scale() const { return delta_.scale; }
  // What the kernels take: a, b, rank, type, scale.
  const LoraDelta& delta() const { return delta_; }
  // A: rank x cols, B: rows x rank, elements of type().
  const void* a() const { return delta_.a; }
  const void* b() const { return delta_.b; }
  size_t a_elements() const { return rank() * cols_; }
  size_t b_elements() const { return rows_ * rank(); }
  // Heap bytes held (both factors, with alignment padding).
  size_t bytes() const { return bytes_; }
  // Element (i, j) of A or B as f32 (reference/test access).
  float A(size_t i, size_t j) const { return LoadElement(a(), type(), i * cols_ + j); }
  float B(size_t i, size_t j) const { return LoadElement(b(), type(), i * rank() + j); }

 private:
  friend class Adapter;
  struct AlignedDelete {
    void operator()(uint8_t* p) const { ::operator delete(p, std::align_val_t(kAlign)); }
  };
  static size_t RoundUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

  size_t layer_ = 0;
  Projection projection_ = Projection::kQ;
  size_t rows_ = 0, cols_ = 0;
  size_t bytes_ = 0;
  std::unique_ptr<uint8_t, AlignedDelete> storage_;
  LoraDelta delta_{};
};

// A named set of LoRA factors for some (layer, projection) targets of one
// base model. Immutable once built and shared read-only between concurrent
// generations (std::shared_ptr<const Adapter>). Movable; the LoraDelta
// pointers stay valid across moves (the factors live on the heap).
class Adapter {
 public:
  Adapter() = default;
  Adapter(Adapter&&) = default;
  Adapter& operator=(Adapter&&) = default;
  Adapter(const Adapter&) = delete;
  Adapter& operator=(const Adapter&) = delete;

  // An empty adapter (no targets yet) for `base`.
  static StatusOr<Adapter> Create(std::string name, const BaseShapes& base) {
    LUTRA_RETURN_IF_ERROR(base.Validate());
    Adapter a;
    a.name_ = std::move(name);
    a.base_ = base;
    a.table_.assign(base.num_layers * kNumProjections, -1);
    return a;
  }

  // Adds the factors of one target: `a` is rank x K, `b` is N x rank
  // (row-major; N x K is the base shape of `p`), given as `src` elements
  // (f32, f16 or bf16, any alignment) and stored as `type` (f32 -> f16/bf16
  // rounds to nearest even, f16 saturating at +-65504; same type: bits
  // copied). `what` names the target in errors (e.g. the file's tensor
  // name); empty: "layer L proj". Errors: layer out of range, duplicate
  // target, rank 0 or > kMaxLoraRank, a_elems / b_elems not rank*K /
  // N*rank, non-finite elements or scale.
  Status AddFactors(size_t layer, Projection p, size_t rank, const void* a, size_t a_elems,
                    const void* b, size_t b_elems, ElementType src, ElementType type,
                    float scale, const std::string& what = std::string()) {
    const std::string name =
        what.empty() ? "layer " + std::to_string(layer) + " " + ProjectionName(p) : what;
    if (table_.empty()) return InvalidArgument("lora: adapter was not created for a base model");
    if (static_cast<size_t>(p) >= kNumProjections) {
      return InvalidArgument("lora: %s: projection %d is not a target", name.c_str(),
                             static_cast<int>(p));
    }
    if (layer >= base_.num_layers) {
      return InvalidArgument("lora: %s: layer %zu, base model has %zu layers", name.c_str(),
                             layer, base_.num_layers);
    }
    if (table_[layer * kNumProjections + static_cast<size_t>(p)] >= 0) {
      return InvalidArgument("lora: %s: layer %zu %s is adapted twice", name.c_str(), layer,
                             ProjectionName(p));
    }
    if (!IsFloatElement(type) || !IsFloatElement(src)) {
      return InvalidArgument("lora: %s: element type %s -> %s (%d -> %d), need f16, bf16 or f32",
                             name.c_str(), ElementTypeName(src), ElementTypeName(type),
                             static_cast<int>(src), static_cast<int>(type));
    }
    const size_t N = base_.Rows(p), K = base_.Cols(p);
    if (rank == 0 || rank > kMaxLoraRank) {
      return InvalidArgument("lora: %s: rank %zu, need 1..%zu", name.c_str(), rank,
                             kMaxLoraRank);
    }
    if (a_elems != rank * K) {
      return InvalidArgument("lora: %s: A has %zu elements, base %s is %zu x %zu so rank %zu "
                             "needs A = %zu x %zu",
                             name.c_str(), a_elems, ProjectionName(p), N, K, rank, rank, K);
    }
    if (b_elems != N * rank) {
      return InvalidArgument("lora: %s: B has %zu elements, base %s is %zu x %zu so rank %zu "
                             "needs B = %zu x %zu",
                             name.c_str(), b_elems, ProjectionName(p), N, K, rank, N, rank);
    }
    if (a == nullptr || b == nullptr) {
      return InvalidArgument("lora: %s: null factor data", name.c_str());
    }
    if (!(scale - scale == 0.0f)) {  // NaN or Inf
      return InvalidArgument("lora: %s: scale is not finite", name.c_str());
    }
    auto f = std::unique_ptr<LoraFactors>(new (std::nothrow) LoraFactors());
    if (f == nullptr) return ResourceExhausted("lora: %s: out of memory", name.c_str());
    f->layer_ = layer;
    f->projection_ = p;
    f->rows_ = N;
    f->cols_ = K;
    const size_t esize = ElementBytes(type);
    const size_t a_bytes = LoraFactors::RoundUp(a_elems * esize);
    f->bytes_ = a_bytes + LoraFactors::RoundUp(b_elems * esize);
    void* mem = ::operator new(f->bytes_, std::align_val_t(LoraFactors::kAlign), std::nothrow);
    if (mem == nullptr) {
      return ResourceExhausted("lora: %s: cannot allocate %zu bytes", name.c_str(), f->bytes_);
    }
    f->storage_.reset(static_cast<uint8_t*>(mem));
    memset(mem, 0, f->bytes_);
    uint8_t* dst_a = f->storage_.get();
    uint8_t* dst_b = f->storage_.get() + a_bytes;
    LUTRA_RETURN_IF_ERROR(Convert(a, a_elems, src, type, dst_a, name, "A"));
    LUTRA_RETURN_IF_ERROR(Convert(b, b_elems, src, type, dst_b, name, "B"));
    f->delta_ = MakeLoraDelta(dst_a, dst_b, rank, type, scale);
    table_[layer * kNumProjections + static_cast<size_t>(p)] =
        static_cast<int32_t>(factors_.size());
    bytes_ += f->bytes_;
    factors_.push_back(std::move(f));
    return Status::Ok();
  }

  // Convenience: f32 factors (a: rank x K, b: N x rank), stored as `type`.
  Status AddF32(size_t layer, Projection p, size_t rank, const float* a, const float* b,
                float scale, ElementType type = ElementType::kF16) {
    if (table_.empty()) return InvalidArgument("lora: adapter was not created for a base model");
    if (static_cast<size_t>(p) >= kNumProjections) {
      return InvalidArgument("lora: projection %d is not a target", static_cast<int>(p));
    }
    return AddFactors(layer, p, rank, a, rank * base_.Cols(p), b, base_.Rows(p) * rank,
                      ElementType::kF32, type, scale);
  }

  // The epilogue's delta for (layer, p), or nullptr when this adapter leaves
  // that matrix alone (or layer is out of range). O(1): one table lookup.
  const LoraDelta* Find(size_t layer, Projection p) const {
    const LoraFactors* f = FindFactors(layer, p);
    return f ? &f->delta() : nullptr;
  }
  // Same, with shapes and element access.
  const LoraFactors* FindFactors(size_t layer, Projection p) const {
    const size_t pi = static_cast<size_t>(p);
    if (layer >= base_.num_layers || pi >= kNumProjections) return nullptr;
    const int32_t i = table_[layer * kNumProjections + pi];
    return i < 0 ? nullptr : factors_[static_cast<size_t>(i)].get();
  }

  // Multiplies every target's scale by s (e.g. `--lora FILE:SCALE`). Call
  // before sharing the adapter: it is immutable afterwards.
  void MultiplyScale(float s) {
    for (auto& f : factors_) f->delta_.scale *= s;
  }

  const std::string& name() const { return name_; }
  void set_name(std::string name) { name_ = std::move(name); }
  const BaseShapes& base() const { return base_; }
  size_t num_targets() const { return factors_.size(); }
  // Targets in insertion order, i < num_targets().
  const LoraFactors& target(size_t i) const { return *factors_[i]; }
  // Heap bytes of all factors: what the manager's memory budget counts.
  size_t bytes() const { return bytes_; }

  // What the adapter is for, saved with it: "task" (default) or "recovery".
  const std::string& kind() const { return kind_; }
  void set_kind(std::string kind) { kind_ = std::move(kind); }

 private:
  // Index of the first non-finite element of n `type` elements, or n. Works
  // on the bits (exponent all ones = Inf or NaN), so it is a fast scan.
  static size_t FirstNonFinite(const void* src, size_t n, ElementType type) {
    const uint8_t* p = static_cast<const uint8_t*>(src);
    if (type == ElementType::kF32) {
      for (size_t i = 0; i < n; ++i) {
        uint32_t bits;
        memcpy(&bits, p + 4 * i, 4);
        if ((bits & 0x7F800000u) == 0x7F800000u) return i;
      }
      return n;
    }
    const uint16_t exp = type == ElementType::kF16 ? 0x7C00u : 0x7F80u;
    for (size_t i = 0; i < n; ++i) {
      uint16_t bits;
      memcpy(&bits, p + 2 * i, 2);
      if ((bits & exp) == exp) return i;
    }
    return n;
  }

  static Status Convert(const void* src, size_t n, ElementType src_type, ElementType type,
                        uint8_t* dst, const std::string& name, const char* which) {
    const size_t bad = FirstNonFinite(src, n, src_type);
    if (bad != n) {
      return InvalidArgument("lora: %s: %s element %zu is not finite", name.c_str(), which, bad);
    }
    if (src_type == type) {  // exact copy of the bits (the common case: f16 files)
      memcpy(dst, src, n * ElementBytes(type));
      return Status::Ok();
    }
    // Storage rounding (element.h): nearest even, f16 saturating.
    for (size_t i = 0; i < n; ++i) StoreElement(dst, type, i, LoadElement(src, src_type, i));
    return Status::Ok();
  }

  std::string name_;
  std::string kind_ = "task";
  BaseShapes base_;
  std::vector<int32_t> table_;  // layer * kNumProjections + p -> factors_ index or -1
  std::vector<std::unique_ptr<LoraFactors>> factors_;
  size_t bytes_ = 0;
};

// Scalar reference of the epilogue, in double: y[n] += scale * sum_r
// B[n][r] * sum_k A[r][k] * x[k] for `batch` rows of x (batch x K,
// row-major) and y (batch x N). The ground truth the SIMD epilogue is
// tested against, and a slow fallback.
inline void LoraReferenceApply(const LoraFactors& f, const float* x, size_t batch, float* y) {
  const size_t N = f.rows(), K = f.cols(), R = f.rank();
  std::vector<double> ax(R);
  for (size_t m = 0; m < batch; ++m) {
    for (size_t r = 0; r < R; ++r) {
      double sum = 0.0;
      for (size_t k = 0; k < K; ++k) sum += double(f.A(r, k)) * x[m * K + k];
      ax[r] = sum;
    }
    for (size_t n = 0; n < N; ++n) {
      double sum = 0.0;
      for (size_t r = 0; r < R; ++r) sum += double(f.B(n, r)) * ax[r];
      y[m * N + n] = static_cast<float>(y[m * N + n] + double(f.scale()) * sum);
    }
  }
}

}  // namespace lutra

#endif  // LUTRA_LORA_H_
