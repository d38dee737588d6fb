// A small fixed-size thread pool with a parallel-for.
//
// lutra's kernels are single-threaded per call and take a row range, so any
// engine can split work with its own pool; this one exists so that the
// examples, tests and benchmarks need nothing else. The calling thread takes
// part in the work, so ThreadPool(1) starts no threads and ParallelFor runs
// inline.
//
// Waiting: idle workers poll for the next job, and the caller for the
// workers' end, for spin_us (default 50 us), then block on a condition
// variable. A decode step is ~100 parallel calls a few microseconds to a
// few milliseconds apart; with blocking alone each call paid a futex
// wake-up, 40-50 us per call on an idle 2-core host (pool_bench,
// docs/benchmarks.md), several milliseconds per token. The spin is bounded
// so that an oversubscribed machine, where a polling thread takes the time
// slice of the thread it waits for, loses at most spin_us per call.
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
  // spin_us: how long a worker polls for the next job, and the caller for
  // the workers' end, before blocking on a condition variable (see below).
  explicit ThreadPool(size_t num_threads, unsigned spin_us = kDefaultSpinMicros)
      : spin_us_(spin_us) {
    num_threads_ = num_threads == 0 ? 1 : num_threads;
    workers_.reserve(num_threads_ - 1);
    for (size_t t = 1; t < num_threads_; ++t) {
      workers_.emplace_back([this, t] { WorkerLoop(t); });
    }
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    start_cv_.notify_all();
    for (std::thread& w : workers_) w.join();
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Default spin before blocking. A decode step makes ~100 parallel calls
  // separated by short single-threaded work; a worker that went to sleep
  // costs a futex wake-up (10-50 us on the hosts measured) at the next call.
  static constexpr unsigned kDefaultSpinMicros = 50;

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
    job_fn_ = &fn;
    job_call_ = &CallFn<Fn>;
    num_tasks_ = num_tasks;
    next_task_.store(0, std::memory_order_relaxed);
    busy_workers_.store(workers_.size(), std::memory_order_relaxed);
    {
      // Under the mutex: a worker about to block re-checks generation_
      // under it, so it cannot miss this bump.
      std::lock_guard<std::mutex> lock(mu_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_acquire) != 0) start_cv_.notify_all();
    RunTasks(0);
    if (!SpinUntil([this] { return busy_workers_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lock(mu_);
      done_cv_.wait(lock, [this] { return busy_workers_.load(std::memory_order_acquire) == 0; });
    }
    job_fn_ = nullptr;
  }

 private:
  template <class Fn>
  static void CallFn(const void* fn, size_t task, size_t thread) {
    (*static_cast<const Fn*>(fn))(task, thread);
  }

  static void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield" ::: "memory");
#endif
  }

  // Polls done() for up to spin_us_; true once it returned true.
  template <class Done>
  bool SpinUntil(const Done& done) const {
    if (done()) return true;
    if (spin_us_ == 0) return false;
    const auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us_);
    for (;;) {
      for (int i = 0; i < 64; ++i) {
        CpuRelax();
        if (done()) return true;
      }
      if (std::chrono::steady_clock::now() >= end) return false;
    }
  }

  void RunTasks(size_t thread) {
    for (;;) {
      const size_t task = next_task_.fetch_add(1, std::memory_order_relaxed);
      if (task >= num_tasks_) break;
      job_call_(job_fn_, task, thread);
    }
  }

  void WorkerLoop(size_t thread) {
    uint64_t seen = 0;
    for (;;) {
      const auto started = [&] { return generation_.load(std::memory_order_acquire) != seen; };
      if (!SpinUntil(started)) {
        std::unique_lock<std::mutex> lock(mu_);
        sleepers_.fetch_add(1, std::memory_order_acq_rel);
        start_cv_.wait(lock, started);
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
      }
      seen = generation_.load(std::memory_order_acquire);
      if (stop_.load(std::memory_order_acquire)) return;
      RunTasks(thread);
      if (busy_workers_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        // The caller may be blocked (or about to block) on done_cv_: taking
        // the mutex orders this against its predicate check.
        { std::lock_guard<std::mutex> lock(mu_); }
        done_cv_.notify_one();
      }
    }
  }

  size_t num_threads_ = 1;
  unsigned spin_us_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable start_cv_, done_cv_;
  std::atomic<uint64_t> generation_{0};  // bumped (under mu_) per job and at shutdown
  std::atomic<bool> stop_{false};
  std::atomic<size_t> busy_workers_{0};
  std::atomic<size_t> sleepers_{0};  // workers blocked (or blocking) on start_cv_
  // The current job; written before generation_ is bumped (release), so
  // workers that observe the new generation (acquire) see it.
  const void* job_fn_ = nullptr;
  void (*job_call_)(const void*, size_t, size_t) = nullptr;
  size_t num_tasks_ = 0;
  std::atomic<size_t> next_task_{0};
};

// The Status of the lowest-numbered failing task among tasks that run
// concurrently, kept without allocating (a parallel call must not allocate
// per call: lutra::Linear's contract).
class FirstError {
 public:
  explicit FirstError(size_t num_tasks) : first_task_(num_tasks) {}
  void Record(size_t task, Status s) {
    if (s.ok()) return;
    std::lock_guard<std::mutex> lock(mu_);
    if (task < first_task_) {
      first_task_ = task;
      first_ = std::move(s);
    }
  }
  // Ok when no task failed. Call once, after every task returned.
  Status Take() { return std::move(first_); }

 private:
  std::mutex mu_;
  size_t first_task_;
  Status first_;
};

// Splits rows [0, n) into one range per thread of `pool` (SplitRows with
// `align`) and runs fn(RowRange) -> Status on each, on this thread alone when
// pool is null or has one thread (one range [0, n)). Returns the first error
// in range order, after every range ran.
template <class Fn>
Status ParallelForRows(ThreadPool* pool, size_t n, size_t align, const Fn& fn) {
  if (pool == nullptr || pool->NumThreads() == 1) return fn(RowRange{0, n});
  const size_t T = pool->NumThreads();
  FirstError first(T);
  pool->ParallelFor(T, [&](size_t task, size_t) { first.Record(task, fn(SplitRows(n, T, task, align))); });
  return first.Take();
}

}  // namespace lutra

#endif  // LUTRA_THREAD_POOL_H_
