// ThreadPool::ParallelFor runs every task exactly once on a valid thread, and
// SplitRows partitions a range into aligned contiguous pieces.
#include <stddef.h>

#include <stdint.h>
#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "lutra/base/thread_pool.h"

namespace lutra {
namespace {

TEST_CASE("ParallelFor runs every task once", "[thread_pool]") {
  for (size_t threads : {1, 2, 3, 8}) {
    ThreadPool pool(threads);
    CHECK(pool.NumThreads() == threads);
    for (size_t rep = 0; rep < 50; ++rep) {
      const size_t num_tasks = rep % 13;  // includes 0 and 1
      std::vector<std::atomic<int>> hits(num_tasks);
      for (auto& h : hits) h.store(0);
      std::atomic<bool> bad_thread{false};
      pool.ParallelFor(num_tasks, [&](size_t task, size_t thread) {
        hits[task].fetch_add(1);
        if (thread >= threads) bad_thread.store(true);
      });
      for (size_t t = 0; t < num_tasks; ++t) CHECK(hits[t].load() == 1);
      CHECK(!bad_thread.load());
    }
  }
  ThreadPool zero(0);  // treated as 1: runs inline
  size_t ran = 0;
  zero.ParallelFor(3, [&](size_t, size_t thread) { ran += 1 + thread; });
  CHECK(ran == 3);
}

TEST_CASE("SplitRows partitions aligned ranges", "[thread_pool]") {
  for (size_t n : {0, 1, 5, 16, 77, 4096, 4099}) {
    for (size_t parts : {1, 2, 3, 7}) {
      for (size_t align : {1, 4, 16}) {
        size_t expect_begin = 0;
        for (size_t p = 0; p < parts; ++p) {
          const RowRange r = SplitRows(n, parts, p, align);
          CHECK(r.begin == expect_begin);
          CHECK(r.begin <= r.end);
          if (r.end != n) CHECK(r.end % align == 0);
          expect_begin = r.end;
        }
        CHECK(expect_begin == n);
      }
    }
  }
}


// The pool's workers poll for spin_us, then sleep, between calls (thread_pool.h);
// a lost wake-up hangs, a missed happens-before shows under TSan
// (cmake/test.sh tsan), a task run twice or not at all fails the sums.
// Calls come back to back, after pauses, and with work sizes from nothing
// to more tasks than threads, on pools that only block (spin 0), that block
// almost at once (1 us: the spin-to-sleep hand-over is hit all the time)
// and that spin the default time.
TEST_CASE("ParallelFor survives many calls of random sizes", "[thread_pool]") {
  // 2 * 10^5 calls by default (~1 s in Release), 2 * 10^4 under
  // LUTRA_TEST_QUICK (ASan, qemu); cmake/test.sh tsan runs 10^6 through
  // LUTRA_POOL_STRESS_CALLS.
  size_t calls = getenv("LUTRA_TEST_QUICK") ? 20000 : 200000;
  if (const char* env = getenv("LUTRA_POOL_STRESS_CALLS")) calls = strtoull(env, nullptr, 10);
  for (const auto& [threads, spin_us] :
       {std::pair<size_t, unsigned>{2, 0}, {3, 1}, {2, ThreadPool::kDefaultSpinMicros},
        {3, ThreadPool::kDefaultSpinMicros}}) {
    INFO(threads << " threads, spin " << spin_us << " us");
    ThreadPool pool(threads, spin_us);
    std::mt19937_64 rng(threads + spin_us);
    std::vector<uint64_t> sums(64);
    uint64_t expect = 0, total = 0;
    for (size_t call = 0; call < calls / 4; ++call) {
      const size_t num_tasks = rng() % 9;  // 0..8
      const size_t work = rng() % 64;      // iterations per task
      if (call % 20000 == 19999) std::this_thread::sleep_for(std::chrono::milliseconds(2));
      pool.ParallelFor(num_tasks, [&](size_t task, size_t thread) {
        uint64_t acc = task + 1;
        for (size_t i = 0; i < work; ++i) acc = acc * 6364136223846793005ull + 1;
        sums[task] = acc;  // each task owns its slot
        (void)thread;
      });
      for (size_t task = 0; task < num_tasks; ++task) {
        uint64_t acc = task + 1;
        for (size_t i = 0; i < work; ++i) acc = acc * 6364136223846793005ull + 1;
        expect += acc;
        total += sums[task];
        sums[task] = 0;
      }
    }
    CHECK(total == expect);
  }
}

TEST_CASE("ParallelFor wakes workers that went to sleep", "[thread_pool]") {
  ThreadPool pool(3);
  for (int rep = 0; rep < 5; ++rep) {
    // Long enough for the workers to block (a spinning pool's spin included).
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    // One task per thread that waits until all three run at once: it only
    // finishes if both sleeping workers were woken.
    std::atomic<int> arrived{0};
    pool.ParallelFor(3, [&](size_t, size_t) {
      arrived.fetch_add(1);
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
      while (arrived.load() < 3 && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::yield();
      }
    });
    CHECK(arrived.load() == 3);
  }
}

}  // namespace
}  // namespace lutra
