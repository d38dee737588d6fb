// AdapterManager: many LoRA adapters registered by name, loaded on first use
// and kept in an LRU cache under a memory budget.
//
// Serving model: one frozen base model, many small task adapters. A request
// asks the manager for its adapter by name and gets a
// std::shared_ptr<const Adapter>; it passes adapter->Find(layer, proj) to the
// kernels for the whole generation. Switching adapters between requests is
// therefore O(1) (a hash lookup and a list splice on a hit) and never touches
// the base weights.
//
// Thread safety: every method may be called concurrently. One mutex guards
// the cache; it is NOT held while an adapter file is being read, so a slow
// load does not stall requests for adapters already resident. Two threads
// missing the same adapter at once may both load it; the first to finish
// inserts it and the other adopts that copy (its own is dropped).
//
// Eviction and lifetime: the budget counts the bytes of the adapters the
// cache holds. Inserting past the budget evicts least-recently-used adapters
// from the cache, but an evicted adapter that a generation still holds stays
// alive (shared_ptr) until that generation drops it; only the cache's
// reference goes. Memory in use can therefore briefly exceed the budget by
// the adapters that in-flight generations hold, never by anything the cache
// keeps on its own.
#ifndef LUTRA_LORA_MANAGER_H_
#define LUTRA_LORA_MANAGER_H_

#include <stddef.h>
#include <stdint.h>

#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "lutra/base/status.h"
#include "lutra/format/lora.h"
#include "lutra/format/lora_file.h"

namespace lutra {

class AdapterManager {
 public:
  using AdapterPtr = std::shared_ptr<const Adapter>;
  // Produces the adapter on a cache miss (reads a file, builds it, ...).
  // Called without the manager's lock held; may be called again after an
  // eviction. Must be safe to call from any thread.
  using Loader = std::function<StatusOr<AdapterPtr>()>;

  struct Stats {
    size_t hits = 0, misses = 0, loads = 0, evictions = 0;
  };

  // budget_bytes: the most adapter bytes (Adapter::bytes()) the cache keeps.
  explicit AdapterManager(size_t budget_bytes) : budget_(budget_bytes) {}
  AdapterManager(const AdapterManager&) = delete;
  AdapterManager& operator=(const AdapterManager&) = delete;

  // Registers `name` with a loader. Errors: empty name, null loader, name
  // already registered.
  Status Register(const std::string& name, Loader loader) {
    if (name.empty()) return InvalidArgument("adapter manager: empty adapter name");
    if (!loader) return InvalidArgument("adapter manager: %s: null loader", name.c_str());
    std::lock_guard<std::mutex> lock(mu_);
    if (!loaders_.emplace(name, std::move(loader)).second) {
      return InvalidArgument("adapter manager: %s is already registered", name.c_str());
    }
    return Status::Ok();
  }

  // Registers an adapter file (lora_file.h format), read on first use and
  // validated against `base`; options.scale is the user's scale.
  Status RegisterFile(const std::string& name, const std::string& path, const BaseShapes& base,
                      const LoadAdapterOptions& options = LoadAdapterOptions()) {
    LoadAdapterOptions opt = options;
    if (opt.name.empty()) opt.name = name;
    return Register(name, [path, base, opt]() { return LoadAdapter(path, base, opt); });
  }

  // Forgets `name` and drops the cache's reference (holders keep theirs).
  Status Unregister(const std::string& name) {
    std::lock_guard<std::mutex> lock(mu_);
    if (loaders_.erase(name) == 0) {
      return NotFound("adapter manager: %s is not registered", name.c_str());
    }
    auto it = index_.find(name);
    if (it != index_.end()) EraseLocked(it->second);
    return Status::Ok();
  }

  // The adapter `name`, loading it on a miss. A hit marks it most recently
  // used. Errors: not registered (NotFound), the loader's error (prefixed
  // with the name), or an adapter larger than the whole budget
  // (ResourceExhausted; nothing is evicted for it).
  StatusOr<AdapterPtr> Get(const std::string& name) {
    Loader loader;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = index_.find(name);
      if (it != index_.end()) {
        ++stats_.hits;
        lru_.splice(lru_.begin(), lru_, it->second);  // O(1) move to front
        return it->second->adapter;
      }
      auto lit = loaders_.find(name);
      if (lit == loaders_.end()) {
        return NotFound("adapter manager: %s is not registered", name.c_str());
      }
      ++stats_.misses;
      loader = lit->second;  // copy: Unregister may run while we load
    }
    StatusOr<AdapterPtr> loaded = loader();
    if (!loaded.ok()) return loaded.status().WithContext("adapter " + name);
    AdapterPtr adapter = std::move(loaded).value();
    if (adapter == nullptr) return Status(StatusCode::kInternal, "adapter " + name + ": loader returned null");
    const size_t bytes = adapter->bytes();
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.loads;
    auto it = index_.find(name);
    if (it != index_.end()) {  // another thread loaded it meanwhile: share that one
      lru_.splice(lru_.begin(), lru_, it->second);
      return it->second->adapter;
    }
    if (bytes > budget_) {
      return ResourceExhausted("adapter manager: %s needs %zu bytes, the budget is %zu",
                               name.c_str(), bytes, budget_);
    }
    if (loaders_.count(name) == 0) return adapter;  // unregistered while loading: don't cache
    while (resident_ + bytes > budget_ && !lru_.empty()) {
      EraseLocked(std::prev(lru_.end()));
      ++stats_.evictions;
    }
    lru_.push_front(Entry{name, adapter, bytes});
    index_[name] = lru_.begin();
    resident_ += bytes;
    return adapter;
  }

  // True if `name` is in the cache now (no loading, no LRU update).
  bool IsResident(const std::string& name) const {
    std::lock_guard<std::mutex> lock(mu_);
    return index_.count(name) != 0;
  }
  // Names in the cache, most recently used first.
  std::vector<std::string> ResidentNames() const {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::string> names;
    for (const Entry& e : lru_) names.push_back(e.name);
    return names;
  }
  size_t resident_bytes() const {
    std::lock_guard<std::mutex> lock(mu_);
    return resident_;
  }
  size_t budget_bytes() const {
    std::lock_guard<std::mutex> lock(mu_);
    return budget_;
  }
  // Changes the budget, evicting LRU adapters until the cache fits.
  void SetBudget(size_t budget_bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    budget_ = budget_bytes;
    while (resident_ > budget_ && !lru_.empty()) {
      EraseLocked(std::prev(lru_.end()));
      ++stats_.evictions;
    }
  }
  Stats stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }

 private:
  struct Entry {
    std::string name;
    AdapterPtr adapter;
    size_t bytes;
  };
  using Iter = std::list<Entry>::iterator;

  void EraseLocked(Iter it) {
    resident_ -= it->bytes;
    index_.erase(it->name);
    lru_.erase(it);
  }

  mutable std::mutex mu_;
  size_t budget_;
  size_t resident_ = 0;
  std::list<Entry> lru_;  // front = most recently used
  std::unordered_map<std::string, Iter> index_;
  std::unordered_map<std::string, Loader> loaders_;
  Stats stats_;
};

}  // namespace lutra

#endif  // LUTRA_LORA_MANAGER_H_
