// A small fixed-size thread pool with a blocking parallel-for whose workers
// spin briefly between calls (a decode step makes hundreds of calls).
//
// lutra's kernels are single-threaded per call and take a row range, so any
// engine can split work with its own pool; this one exists so that the
// examples, tests and benchmarks need nothing else. The calling thread takes
// part in the work, so ThreadPool(1) starts no threads and ParallelFor runs
// inline.
//
// Plain header (no per-target code).
#ifndef LUTRA_THREAD_POOL_H_
#define LUTRA_THREAD_POOL_H_

#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "lutra/base/status.h"

namespace lutra {

// Half-open range [begin, end) of rows (or any items).
struct RowRange {
  size_t begin = 0;
  size_t end = 0;
  size_t size() const { return end - begin; }
};

// Splits [0, n) into `parts` contiguous ranges of nearly equal size whose
// boundaries are multiples of `align` (except the last end, which is n), and
// returns range `part` (< parts). Ranges may be empty when n is small. Used to
// give each thread whole GEMM panels or whole 4-row GEMV blocks.
inline RowRange SplitRows(size_t n, size_t parts, size_t part, size_t align = 1) {
  if (parts == 0) parts = 1;
  if (align == 0) align = 1;
  const size_t units = (n + align - 1) / align;
  const size_t base = units / parts, extra = units % parts;
  const size_t first = part * base + std::min(part, extra);
  const size_t count = base + (part < extra ? 1 : 0);
  RowRange r;
  r.begin = std::min(n, first * align);
  r.end = std::min(n, (first + count) * align);
  return r;
}

class ThreadPool {
 public:
  // num_threads >= 1 is the total parallelism including the caller, so
  // num_threads - 1 worker threads are started. 0 is treated as 1.
  explicit ThreadPool(size_t num_threads) {
    num_threads_ = num_threads == 0 ? 1 : num_threads;
    workers_.reserve(num_threads_ - 1);
    for (size_t t = 1; t < num_threads_; ++t) {
      workers_.emplace_back([this, t] { WorkerLoop(t); });
    }
  }
  ~ThreadPool() {
    stop_.store(true, std::memory_order_relaxed);
    Publish();
    for (std::thread& w : workers_) w.join();
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  size_t NumThreads() const { return num_threads_; }

  // Calls fn(task, thread) once for every task in [0, num_tasks), where
  // thread < NumThreads() identifies the executing thread (for per-thread
  // scratch), and returns when all calls have returned. Tasks are handed out
  // dynamically (an atomic counter), so uneven tasks balance. fn must not
  // call ParallelFor on the same pool (not reentrant) and must not throw.
  // Only one thread may call ParallelFor at a time.
  template <class Fn>
  void ParallelFor(size_t num_tasks, const Fn& fn) {
    if (num_tasks == 0) return;
    if (num_threads_ == 1 || num_tasks == 1) {
      for (size_t task = 0; task < num_tasks; ++task) fn(task, size_t{0});
      return;
    }
    // No worker touches the job fields now: each finished the previous job
    // (pending_ reached 0) and reads them again only after Publish().
    job_fn_ = &fn;
    job_call_ = &CallFn<Fn>;
    num_tasks_ = num_tasks;
    next_task_.store(0, std::memory_order_relaxed);
    pending_.store(workers_.size(), std::memory_order_relaxed);
    Publish();
    RunTasks(0);
    // The workers finish within the time of their last task; spin, then
    // yield so that an oversubscribed machine still makes progress.
    for (size_t spin = 0; pending_.load(std::memory_order_acquire) != 0; ++spin) {
      if (spin < kPausesBeforeYield) {
        Pause();
      } else {
        std::this_thread::yield();
      }
    }
    job_fn_ = nullptr;
  }

 private:
  // A decode step calls ParallelFor a few hundred times per token, with
  // single-threaded work (norms, attention, sampling) in between. Workers
  // spin on the generation counter for this long before they sleep, so a
  // step's calls find them awake (a futex wake-up costs 5-50 us; a parallel
  // GEMV at 1 ms per call loses several percent to it). Bounded, so that an
  // idle pool or an oversubscribed machine does not burn a core for long.
  static constexpr int64_t kSpinNanos = 200 * 1000;
  // Pauses (~10-40 ns each) before a waiting thread starts yielding its
  // core instead: long enough to catch a call that follows at once.
  static constexpr size_t kPausesBeforeYield = 256;

  static void Pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }

  template <class Fn>
  static void CallFn(const void* fn, size_t task, size_t thread) {
    (*static_cast<const Fn*>(fn))(task, thread);
  }

  // Starts a job (or shutdown): a new generation, and a wake-up for workers
  // that went to sleep. Lost wake-ups cannot happen: a sleeper increments
  // sleepers_ and re-reads generation_ under mu_ before it waits, both
  // seq_cst, so either it sees the new generation or this sees it sleeping
  // and notifies under mu_ (after it waits).
  void Publish() {
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) != 0) {
      std::lock_guard<std::mutex> lock(mu_);
      wake_cv_.notify_all();
    }
  }

  void RunTasks(size_t thread) {
    for (;;) {
      const size_t task = next_task_.fetch_add(1, std::memory_order_relaxed);
      if (task >= num_tasks_) break;
      job_call_(job_fn_, task, thread);
    }
  }

  // Returns the generation after `seen`, spinning (pausing, then yielding)
  // for up to kSpinNanos and then sleeping on wake_cv_.
  uint64_t AwaitGeneration(uint64_t seen) {
    const auto start = std::chrono::steady_clock::now();
    for (size_t spin = 1;; ++spin) {
      const uint64_t g = generation_.load(std::memory_order_acquire);
      if (g != seen) return g;
      if (spin < kPausesBeforeYield) {
        Pause();
        continue;
      }
      // Yielding keeps the wait cheap where threads outnumber free cores.
      std::this_thread::yield();
      if (std::chrono::steady_clock::now() - start > std::chrono::nanoseconds(kSpinNanos)) break;
    }
    std::unique_lock<std::mutex> lock(mu_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    uint64_t g;
    wake_cv_.wait(lock, [&] {
      g = generation_.load(std::memory_order_seq_cst);
      return g != seen;
    });
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
    return g;
  }

  void WorkerLoop(size_t thread) {
    uint64_t seen = 0;
    for (;;) {
      seen = AwaitGeneration(seen);
      if (stop_.load(std::memory_order_relaxed)) return;
      RunTasks(thread);
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  size_t num_threads_ = 1;
  std::vector<std::thread> workers_;
  // Bumped (seq_cst) once per job and at shutdown; the job fields and stop_
  // are written before it, so a worker that acquires the new value sees them.
  std::atomic<uint64_t> generation_{0};
  std::atomic<size_t> pending_{0};   // workers still running the current job
  std::atomic<size_t> sleepers_{0};  // workers blocked on wake_cv_
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable wake_cv_;
  // The current job (see ParallelFor for why these need no lock).
  const void* job_fn_ = nullptr;
  void (*job_call_)(const void*, size_t, size_t) = nullptr;
  size_t num_tasks_ = 0;
  std::atomic<size_t> next_task_{0};
};

// Splits rows [0, n) into one range per thread of `pool` (SplitRows with
// `align`) and runs fn(RowRange) -> Status on each, on this thread alone when
// pool is null or has one thread (one range [0, n)). Returns the first error
// in range order, after every range ran.
template <class Fn>
Status ParallelForRows(ThreadPool* pool, size_t n, size_t align, const Fn& fn) {
  if (pool == nullptr || pool->NumThreads() == 1) return fn(RowRange{0, n});
  const size_t T = pool->NumThreads();
  // The lowest failing range's Status, without a per-call allocation.
  std::mutex mu;
  size_t first_task = T;
  Status first;
  pool->ParallelFor(T, [&](size_t task, size_t) {
    Status s = fn(SplitRows(n, T, task, align));
    if (s.ok()) return;
    std::lock_guard<std::mutex> lock(mu);
    if (task < first_task) {
      first_task = task;
      first = std::move(s);
    }
  });
  return first;
}

}  // namespace lutra

#endif  // LUTRA_THREAD_POOL_H_
