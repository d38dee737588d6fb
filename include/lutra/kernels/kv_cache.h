// KV cache: per layer, the keys and values of the last `capacity` positions,
// stored as f32, f16, bf16 or int8 (one f32 scale per position and kv head).
//
// Plain header: configuration, storage, ring indexing and bookkeeping. The
// SIMD writers (f32 -> f16/bf16/int8 conversion on append) are in
// kv_cache-inl.h, the readers in attention-inl.h.
//
// Positions are absolute token indices (0, 1, 2, ...), kept as such for RoPE.
// Position p lives in slot p % capacity. Per layer the cache holds the
// contiguous run of positions [start(layer), end(layer)):
//  - Append writes positions end, end + 1, ... in place (no reallocation, no
//    shifting of old rows).
//  - In ring mode, once end passes capacity the oldest positions are
//    overwritten, so start = end - capacity; attention then covers the last
//    `capacity` positions. In fixed mode appending past capacity is an
//    OutOfRange error.
//  - Truncate(n) rewinds every layer to end = n (re-prompting, rejected
//    speculative tokens); the rows past n are simply overwritten later.
//
// Storage layout (why): one 64-byte aligned block. For each layer, K then V,
// each [num_kv_heads][capacity][head_dim] elements: head-major so that the
// decode kernel, which handles one kv head (and its query group) at a time,
// streams a contiguous run of rows. int8 scales: [layer][K,V][kv_head][slot]
// f32, contiguous over slots so a block of rows reads its scales at once.
#ifndef LUTRA_KV_CACHE_H_
#define LUTRA_KV_CACHE_H_

#include <stddef.h>
#include <stdint.h>

#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>  // madvise
#endif

#include "hwy/aligned_allocator.h"
#include "lutra/base/element.h"
#include "lutra/base/status.h"

namespace lutra {

struct KVCacheConfig {
  size_t num_layers = 1;
  size_t num_kv_heads = 1;
  size_t head_dim = 0;
  size_t capacity = 0;  // positions kept per layer (C)
  // Element type of the cached K and V rows: f32, f16, bf16 (round to
  // nearest even, f16 overflow becomes +-inf) or int8, symmetric:
  // x ~= q * scale, scale = max|x| / 127 per (position, kv head), separately
  // for K and V (element.h, element-inl.h).
  ElementType type = ElementType::kF32;
  // true: ring buffer, appending past capacity overwrites the oldest
  // position. false: appending past capacity is an OutOfRange error.
  bool ring = true;

  Status Validate() const {
    if (num_layers == 0 || num_kv_heads == 0 || head_dim == 0 || capacity == 0) {
      return InvalidArgument(
          "KVCacheConfig: num_layers = %zu, num_kv_heads = %zu, head_dim = %zu, "
          "capacity = %zu; all must be >= 1",
          num_layers, num_kv_heads, head_dim, capacity);
    }
    if (ElementBytes(type) == 0) {
      return InvalidArgument("KVCacheConfig: unknown element type %d", int(type));
    }
    // Guard the size computation against overflow (2^40 bytes is far beyond
    // any device).
    const double bytes = double(num_layers) * 2.0 * double(num_kv_heads) *
                         double(capacity) * double(head_dim + 4);
    if (bytes > double(uint64_t{1} << 40)) {
      return ResourceExhausted("KVCacheConfig: %.3g bytes requested", bytes);
    }
    return Status();
  }
};

class KVCache {
 public:
  KVCache() = default;  // empty; use Create
  KVCache(KVCache&&) = default;
  KVCache& operator=(KVCache&&) = default;

  static StatusOr<KVCache> Create(const KVCacheConfig& config) {
    LUTRA_RETURN_IF_ERROR(config.Validate());
    KVCache c;
    c.config_ = config;
    // Round each head's run of rows to 64 bytes so every head starts on a
    // cache line (and a vector boundary of every target).
    c.head_bytes_ = RoundUp64(config.capacity * config.head_dim *
                              ElementBytes(config.type));
    c.rows_bytes_ = config.num_layers * 2 * config.num_kv_heads * c.head_bytes_;
    const size_t scale_bytes =
        config.type == ElementType::kI8
            ? RoundUp64(config.num_layers * 2 * config.num_kv_heads *
                        config.capacity * sizeof(float))
            : 0;
    c.bytes_ = c.rows_bytes_ + scale_bytes;
    c.data_ = hwy::AllocateAligned<uint8_t>(c.bytes_);
    if (!c.data_) {
      return ResourceExhausted("KVCache: cannot allocate %zu bytes", c.bytes_);
    }
    AdviseHugePages(c.data_.get(), c.bytes_);
    c.start_.assign(config.num_layers, 0);
    c.end_.assign(config.num_layers, 0);
    return c;
  }

  const KVCacheConfig& config() const { return config_; }
  size_t num_layers() const { return config_.num_layers; }
  size_t num_kv_heads() const { return config_.num_kv_heads; }
  size_t head_dim() const { return config_.head_dim; }
  size_t capacity() const { return config_.capacity; }
  ElementType type() const { return config_.type; }
  bool ring() const { return config_.ring; }

  // Positions [start(layer), end(layer)) are held. end is the next position
  // to append; end - start <= capacity. Precondition: layer < num_layers().
  size_t start(size_t layer) const { return start_[layer]; }
  size_t end(size_t layer) const { return end_[layer]; }

  // Bytes allocated (rows, padding and int8 scales): the cache's memory use.
  size_t MemoryBytes() const { return bytes_; }
  // Bytes that reading positions' K and V rows of one layer touches, per
  // position (all kv heads, K and V, scales included).
  size_t BytesPerPosition() const {
    return 2 * config_.num_kv_heads *
           (config_.head_dim * ElementBytes(config_.type) +
            (config_.type == ElementType::kI8 ? sizeof(float) : 0));
  }

  size_t Slot(size_t pos) const { return pos % config_.capacity; }

  // Row storage of one (layer, kv head): `capacity` rows of head_dim elements
  // of type(), row for position p at slot Slot(p). Preconditions: layer and
  // kv_head in range.
  uint8_t* K(size_t layer, size_t kv_head) {
    return data_.get() + HeadIndex(layer, 0, kv_head) * head_bytes_;
  }
  uint8_t* V(size_t layer, size_t kv_head) {
    return data_.get() + HeadIndex(layer, 1, kv_head) * head_bytes_;
  }
  const uint8_t* K(size_t layer, size_t kv_head) const {
    return data_.get() + HeadIndex(layer, 0, kv_head) * head_bytes_;
  }
  const uint8_t* V(size_t layer, size_t kv_head) const {
    return data_.get() + HeadIndex(layer, 1, kv_head) * head_bytes_;
  }
  // int8 only (nullptr otherwise): `capacity` scales, indexed by slot.
  float* KScales(size_t layer, size_t kv_head) { return Scales(layer, 0, kv_head); }
  float* VScales(size_t layer, size_t kv_head) { return Scales(layer, 1, kv_head); }
  const float* KScales(size_t layer, size_t kv_head) const {
    return const_cast<KVCache*>(this)->Scales(layer, 0, kv_head);
  }
  const float* VScales(size_t layer, size_t kv_head) const {
    return const_cast<KVCache*>(this)->Scales(layer, 1, kv_head);
  }

  // Scalar read-back of the row of `pos` (any position currently in the slot;
  // the caller checks start <= pos < end), dequantized to head_dim floats.
  // For tests, debugging and reference paths; the kernels read rows with
  // SIMD. kv: 0 = K, 1 = V.
  void DecodeRow(size_t layer, int kv, size_t kv_head, size_t pos,
                 float* out) const {
    const size_t hd = config_.head_dim;
    const size_t slot = Slot(pos);
    const uint8_t* rows = kv == 0 ? K(layer, kv_head) : V(layer, kv_head);
    for (size_t i = 0; i < hd; ++i) out[i] = LoadElement(rows, config_.type, slot * hd + i);
    if (config_.type == ElementType::kI8) {
      const float scale = (kv == 0 ? KScales(layer, kv_head) : VScales(layer, kv_head))[slot];
      for (size_t i = 0; i < hd; ++i) out[i] *= scale;
    }
  }

  // Validates an append of num_tokens positions starting at `pos` to `layer`
  // and commits the bookkeeping (end, and start in ring mode); the caller
  // (AppendKV in kv_cache-inl.h) then writes the rows. Positions below
  // *first_to_write are overwritten again within the same append (ring mode,
  // num_tokens > capacity) and need not be written.
  // Errors: layer out of range; pos != end(layer) (appends are contiguous:
  // Truncate first to rewrite); fixed mode and pos + num_tokens > capacity.
  Status BeginAppend(size_t layer, size_t pos, size_t num_tokens,
                     size_t* first_to_write) {
    if (data_ == nullptr) return InvalidArgument("KVCache: not created");
    if (layer >= config_.num_layers) {
      return OutOfRange("KVCache append: layer %zu, cache has %zu layers", layer,
                        config_.num_layers);
    }
    if (pos != end_[layer]) {
      return InvalidArgument(
          "KVCache append: position %zu to layer %zu, whose next position is "
          "%zu (appends are contiguous; Truncate to rewind)",
          pos, layer, end_[layer]);
    }
    const size_t new_end = pos + num_tokens;
    if (!config_.ring && new_end > config_.capacity) {
      return OutOfRange(
          "KVCache append: positions up to %zu exceed the fixed capacity %zu "
          "(layer %zu); create the cache with ring = true to wrap",
          new_end, config_.capacity, layer);
    }
    end_[layer] = new_end;
    if (new_end > config_.capacity) {
      start_[layer] = HWY_MAX(start_[layer], new_end - config_.capacity);
    }
    *first_to_write = HWY_MAX(pos, start_[layer]);
    return Status();
  }

  // Rewinds every layer to end = new_end: the positions >= new_end are
  // dropped. new_end = 0 always succeeds (same as Reset).
  // Errors (no layer is changed then): new_end > end(layer) for some layer,
  // or new_end < start(layer), i.e. the ring buffer already overwrote the
  // positions that would have to become the newest ones.
  Status Truncate(size_t new_end) {
    if (new_end == 0) {
      Reset();
      return Status();
    }
    for (size_t l = 0; l < end_.size(); ++l) {
      if (new_end > end_[l]) {
        return OutOfRange("KVCache truncate: to %zu but layer %zu ends at %zu",
                          new_end, l, end_[l]);
      }
      if (new_end < start_[l]) {
        return OutOfRange(
            "KVCache truncate: to %zu but layer %zu only holds positions from "
            "%zu (the ring buffer overwrote older ones)",
            new_end, l, start_[l]);
      }
    }
    for (size_t& e : end_) e = new_end;
    return Status();
  }

  void Reset() {
    for (size_t& s : start_) s = 0;
    for (size_t& e : end_) e = 0;
  }

 private:
  // Asks the kernel to back the rows with transparent huge pages where it
  // only does so on request (THP "madvise" mode, a common default): decode
  // streams every row once per token, and with 4 KiB pages every 16 rows of
  // a head (f16, head_dim 128) are a TLB miss and a restart of the hardware
  // prefetchers. On attention_bench (Zen 3, shared machine) the gain was
  // within the noise (about +5%). A hint: failure is fine.
  static void AdviseHugePages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr uintptr_t kPage = 4096;
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kPage - 1) & ~(kPage - 1);
    const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kPage - 1);
    if (bytes >= (size_t{2} << 20) && end > begin) {
      (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
    }
#else
    (void)p;
    (void)bytes;
#endif
  }
  static size_t RoundUp64(size_t bytes) { return (bytes + 63) & ~size_t{63}; }
  size_t HeadIndex(size_t layer, size_t kv, size_t kv_head) const {
    return (layer * 2 + kv) * config_.num_kv_heads + kv_head;
  }
  float* Scales(size_t layer, size_t kv, size_t kv_head) {
    if (config_.type != ElementType::kI8) return nullptr;
    float* base = reinterpret_cast<float*>(data_.get() + rows_bytes_);
    return base + HeadIndex(layer, kv, kv_head) * config_.capacity;
  }

  KVCacheConfig config_;
  size_t head_bytes_ = 0;  // one (layer, K|V, kv head) run of rows
  size_t rows_bytes_ = 0;
  size_t bytes_ = 0;
  hwy::AlignedFreeUniquePtr<uint8_t[]> data_{nullptr, hwy::AlignedFreer()};
  std::vector<size_t> start_, end_;
};

}  // namespace lutra

#endif  // LUTRA_KV_CACHE_H_
