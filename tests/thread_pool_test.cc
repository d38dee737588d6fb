// ThreadPool::ParallelFor runs every task exactly once on a valid thread, and
// SplitRows partitions a range into aligned contiguous pieces.
#include <stddef.h>

#include <atomic>
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

}  // namespace
}  // namespace lutra
