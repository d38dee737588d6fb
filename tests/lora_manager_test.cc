// Tests of the adapter manager (include/lutra/runtime/lora_manager.h): loading on
// first use, LRU eviction under the memory budget, lifetime of evicted
// adapters that are still held, errors, and concurrent use from several
// threads with different adapters.
#include "lutra/runtime/lora_manager.h"

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "lutra/format/lora.h"
#include "tests/test_util.h"

namespace lutra {
namespace {

// A tiny base model: 2 layers, dim 8, hidden 12, q 8, kv 4.
BaseShapes TinyBase() { return BaseShapes::Llama(2, 8, 12, 8, 4); }

// An adapter on layer 0's q projection whose A and B are filled with `tag`,
// so that every reader can check it got the adapter it asked for. No Catch2
// assertions inside: loaders run on worker threads, and Catch2's assertion
// macros are not thread-safe.
StatusOr<AdapterManager::AdapterPtr> BuildTagged(const std::string& name, float tag,
                                                 size_t rank) {
  const BaseShapes base = TinyBase();
  auto adapter = Adapter::Create(name, base);
  if (!adapter.ok()) return adapter.status();
  std::vector<float> a(rank * base.Cols(Projection::kQ), tag);
  std::vector<float> b(base.Rows(Projection::kQ) * rank, tag);
  LUTRA_RETURN_IF_ERROR(adapter->AddF32(0, Projection::kQ, rank, a.data(), b.data(), 1.0f));
  return AdapterManager::AdapterPtr(std::make_shared<const Adapter>(std::move(adapter).value()));
}

// Same, on the test's own thread, asserting success.
std::shared_ptr<const Adapter> MakeTagged(const std::string& name, float tag, size_t rank) {
  auto adapter = BuildTagged(name, tag, rank);
  REQUIRE(adapter.ok());
  return *adapter;
}

TEST_CASE("AdapterManager loads on first use and evicts LRU under the budget") {
  const size_t one = MakeTagged("x", 1.0f, 4)->bytes();
  REQUIRE(one > 0);
  AdapterManager manager(2 * one + one / 2);  // room for two
  std::atomic<int> loads{0};
  for (int i = 0; i < 4; ++i) {
    const std::string name = "task" + std::to_string(i);
    REQUIRE(manager.Register(name, [name, i, &loads]() -> StatusOr<AdapterManager::AdapterPtr> {
      ++loads;
      return MakeTagged(name, float(i + 1), 4);
    }).ok());
  }
  CHECK(manager.resident_bytes() == 0);  // nothing loaded before first use
  auto a0 = manager.Get("task0");
  REQUIRE(a0.ok());
  CHECK((*a0)->name() == "task0");
  REQUIRE(manager.Get("task1").ok());
  CHECK(loads == 2);
  CHECK(manager.resident_bytes() == 2 * one);
  REQUIRE(manager.Get("task0").ok());  // hit: task0 becomes most recent
  CHECK(loads == 2);
  REQUIRE(manager.Get("task2").ok());  // evicts task1 (least recent)
  CHECK(manager.ResidentNames() == std::vector<std::string>{"task2", "task0"});
  CHECK(manager.resident_bytes() <= manager.budget_bytes());
  REQUIRE(manager.Get("task3").ok());  // evicts task0
  CHECK(manager.ResidentNames() == std::vector<std::string>{"task3", "task2"});
  CHECK(!manager.IsResident("task0"));
  // The evicted task0 is still alive and intact for whoever holds it.
  const AdapterManager::AdapterPtr held = *a0;
  CHECK(held->FindFactors(0, Projection::kQ)->A(0, 0) == 1.0f);
  REQUIRE(manager.Get("task0").ok());  // reload after eviction
  CHECK(loads == 5);
  const AdapterManager::Stats stats = manager.stats();
  CHECK(stats.hits == 1);
  CHECK(stats.misses == 5);
  CHECK(stats.evictions == 3);
  // Shrinking the budget evicts down to it.
  manager.SetBudget(one);
  CHECK(manager.ResidentNames() == std::vector<std::string>{"task0"});
  manager.SetBudget(0);
  CHECK(manager.resident_bytes() == 0);
}

TEST_CASE("AdapterManager: an evicted adapter lives while a holder has it") {
  const size_t one = MakeTagged("x", 1.0f, 4)->bytes();
  AdapterManager manager(one);  // room for exactly one
  REQUIRE(manager.Register("a", [] { return StatusOr<AdapterManager::AdapterPtr>(MakeTagged("a", 2.0f, 4)); }).ok());
  REQUIRE(manager.Register("b", [] { return StatusOr<AdapterManager::AdapterPtr>(MakeTagged("b", 3.0f, 4)); }).ok());
  std::weak_ptr<const Adapter> weak;
  {
    auto a = manager.Get("a");
    REQUIRE(a.ok());
    weak = *a;
    REQUIRE(manager.Get("b").ok());  // evicts a from the cache
    CHECK(!manager.IsResident("a"));
    CHECK(!weak.expired());          // ...but our handle keeps it alive
    CHECK((*a)->FindFactors(0, Projection::kQ)->B(3, 1) == 2.0f);
  }
  CHECK(weak.expired());  // freed once the last holder let go
}

TEST_CASE("AdapterManager errors name the adapter") {
  const size_t one = MakeTagged("x", 1.0f, 4)->bytes();
  AdapterManager manager(one - 1);
  CHECK(manager.Get("nope").status().code() == StatusCode::kNotFound);
  CHECK(!manager.Register("", [] { return StatusOr<AdapterManager::AdapterPtr>(nullptr); }).ok());
  CHECK(!manager.Register("null", AdapterManager::Loader()).ok());
  REQUIRE(manager.Register("big", [] { return StatusOr<AdapterManager::AdapterPtr>(MakeTagged("big", 1.0f, 4)); }).ok());
  CHECK(!manager.Register("big", [] { return StatusOr<AdapterManager::AdapterPtr>(nullptr); }).ok());
  const auto big = manager.Get("big");
  CHECK(big.status().code() == StatusCode::kResourceExhausted);
  CHECK(big.status().message().find("big") != std::string::npos);
  REQUIRE(manager.Register("broken", [] {
    return StatusOr<AdapterManager::AdapterPtr>(DataLoss("file truncated"));
  }).ok());
  const auto broken = manager.Get("broken");
  CHECK(broken.status().code() == StatusCode::kDataLoss);
  CHECK(broken.status().message() == "adapter broken: file truncated");
  CHECK(manager.Unregister("broken").ok());
  CHECK(manager.Unregister("broken").code() == StatusCode::kNotFound);
  CHECK(manager.Get("broken").status().code() == StatusCode::kNotFound);
}

TEST_CASE("AdapterManager is safe with concurrent generations on different adapters") {
  const size_t one = MakeTagged("x", 1.0f, 4)->bytes();
  constexpr int kAdapters = 6;
  AdapterManager manager(3 * one);  // half of them fit: constant churn
  for (int i = 0; i < kAdapters; ++i) {
    const std::string name = "t" + std::to_string(i);
    REQUIRE(manager.Register(name, [name, i] { return BuildTagged(name, float(i + 1), 4); })
                .ok());
  }
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&manager, &failures, t] {
      test::Rng rng(100 + t);
      for (int iter = 0; iter < 300; ++iter) {
        const int i = static_cast<int>(rng.Below(kAdapters));
        auto got = manager.Get("t" + std::to_string(i));
        if (!got.ok()) {
          ++failures;
          continue;
        }
        const AdapterManager::AdapterPtr adapter = *got;  // held for the "generation"
        const LoraFactors* f = adapter->FindFactors(0, Projection::kQ);
        // Read every element while other threads evict it from the cache.
        for (size_t r = 0; r < f->rank(); ++r) {
          for (size_t k = 0; k < f->cols(); ++k) {
            if (f->A(r, k) != float(i + 1)) ++failures;
          }
        }
        if (adapter->name() != "t" + std::to_string(i)) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(failures == 0);
  CHECK(manager.resident_bytes() <= manager.budget_bytes());
  const AdapterManager::Stats s = manager.stats();
  CHECK(s.hits + s.misses == 4 * 300);
}

}  // namespace
}  // namespace lutra
