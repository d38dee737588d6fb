// Linear: one palettized weight matrix with everything a call needs, for
// engines that drive the matmul from their own scheduler.
//
// Plain header; the kernels run through the dynamic-dispatch layer
// (lutra/dispatch.h): link lutra::dispatch. A Linear owns its
// PreparedPalette, the prepared-activation buffer and one GEMM scratch per
// thread, all sized when it is made, so that Prepare and Run allocate
// nothing for up to max_tokens tokens (tests/linear_test.cc counts).
//
//   LUTRA_ASSIGN_OR_RETURN(lutra::Linear fc, lutra::Linear::Make(view, opt));
//   LUTRA_RETURN_IF_ERROR(fc.Prepare(x, M, epilogue));  // x: M x K floats
//   // Either one call per range, from the engine's threads:
//   LUTRA_RETURN_IF_ERROR(fc.Run(r0, r1, y, thread));   // y: M x N floats
//   // or the engine's parallel-for drives every range:
//   LUTRA_RETURN_IF_ERROR(fc.RunParallel(y, tasks, [&](size_t n, const auto& fn) {
//     pool.ParallelFor(n, fn);  // calls fn(task, thread) for task < n
//   }));
//
// Thread safety: Prepare must not overlap any other call on the same
// Linear. After it returns, Run may be called concurrently with disjoint row
// ranges and distinct `thread` values (each thread uses its own scratch).
// Several Linear objects may share nothing; to serve several independent
// requests at once, make one Linear per request (or use the free functions
// of lutra/dispatch.h with one PreparedInput per request over one shared
// PreparedPalette).
#ifndef LUTRA_LINEAR_H_
#define LUTRA_LINEAR_H_

#include <stddef.h>

#include <algorithm>
#include <memory>
#include <utility>
#include <vector>

#include "lutra/base/status.h"
#include "lutra/base/thread_pool.h"
#include "lutra/dispatch.h"
#include "lutra/format/palette.h"
#include "lutra/kernels/matmul.h"

namespace lutra {

struct LinearOptions {
  MatmulPrecision precision = MatmulPrecision::kInt8;
  size_t max_tokens = 1;     // largest M passed to Prepare without allocating
  size_t max_threads = 1;    // Run's `thread` is < max_threads
  size_t max_lora_rank = 0;  // largest LoRA rank in a Prepare epilogue
};

class Linear {
 public:
  Linear() = default;  // empty (rows() = 0); Make one instead
  // Prepares the weights of `view` (which must outlive the Linear: its
  // indices are not copied) and sizes every buffer for opt.
  static StatusOr<Linear> Make(const PaletteView& view, const LinearOptions& opt) {
    if (opt.max_tokens == 0 || opt.max_threads == 0) {
      return InvalidArgument("linear: max_tokens = %zu, max_threads = %zu, need >= 1",
                             opt.max_tokens, opt.max_threads);
    }
    if (opt.max_lora_rank > kMaxLoraRank) {
      return InvalidArgument("linear: max_lora_rank = %zu > %zu", opt.max_lora_rank,
                             kMaxLoraRank);
    }
    LUTRA_ASSIGN_OR_RETURN(PreparedPalette w, PreparedPalette::Make(view));
    Linear l;
    l.opt_ = opt;
    l.weights_ = std::make_unique<PreparedPalette>(std::move(w));
    l.in_ = std::make_unique<PreparedInput>();
    l.scratch_.resize(opt.max_threads);
    // One preparation at full size fills every buffer's capacity, and one
    // panel per thread sizes the GEMM scratch.
    const size_t M = opt.max_tokens, K = l.cols(), N = l.rows();
    std::vector<float> x(M * K, 0.0f), y(M * N);
    LUTRA_RETURN_IF_ERROR(l.Prepare(x.data(), M, Epilogue()));
    l.in_->lora_ax.reserve(M * opt.max_lora_rank);
    l.in_->token_lora.reserve(M);
    if (M > 1) {
      const size_t n1 = std::min(N, dispatch::GemmRangeAlignment());
      for (GemmScratch& s : l.scratch_) {
        LUTRA_RETURN_IF_ERROR(dispatch::GemmRows(*l.weights_, *l.in_, 0, n1, y.data(), N, &s));
      }
    }
    l.prepared_ = false;
    return l;
  }

  size_t rows() const { return weights_ ? weights_->shape().rows : 0; }  // N
  size_t cols() const { return weights_ ? weights_->shape().cols : 0; }  // K
  const PreparedPalette& weights() const { return *weights_; }  // precondition: made
  const LinearOptions& options() const { return opt_; }

  // Prepares M token rows x (row m at x + m * K) and the epilogue (whose
  // pointers must stay valid until the Run calls return) for Run.
  Status Prepare(const float* x, size_t M, const Epilogue& epilogue) {
    prepared_ = false;
    if (!weights_) return InvalidArgument("linear: Prepare on an empty Linear (use Make)");
    if (M == 0 || M > opt_.max_tokens) {
      return InvalidArgument("linear: M = %zu token rows, need 1..%zu (max_tokens)", M,
                             opt_.max_tokens);
    }
    // The largest rank, of `lora` or of any token's delta (token_lora).
    size_t rank = epilogue.lora != nullptr ? epilogue.lora->rank : 0;
    for (size_t m = 0; epilogue.token_lora != nullptr && m < M; ++m) {
      if (epilogue.token_lora[m] != nullptr) rank = std::max(rank, epilogue.token_lora[m]->rank);
    }
    if (rank > opt_.max_lora_rank) {
      return InvalidArgument("linear: LoRA rank %zu > max_lora_rank %zu", rank,
                             opt_.max_lora_rank);
    }
    MatmulOptions mo;
    mo.precision = opt_.precision;
    LUTRA_RETURN_IF_ERROR(dispatch::PrepareGemm(*weights_, x, M, cols(), epilogue, mo, in_.get()));
    prepared_ = true;
    return Status::Ok();
  }

  // Output channels per range that keep Run on whole blocks (4 rows for one
  // token, one GEMM panel for several): split [0, rows()) at multiples of it.
  // Depends on the prepared M and, for M > 1, on the CPU's SIMD target.
  size_t RangeAlignment() const {
    return prepared_ && in_->rows > 1 ? dispatch::GemmRangeAlignment()
                                      : dispatch::GemvRangeAlignment();
  }

  // y (M x N floats, token m at y + m * N): output channels [r0, r1) of
  // every prepared token; only those columns are written. thread <
  // max_threads picks the scratch: concurrent calls need distinct values.
  Status Run(size_t r0, size_t r1, float* y, size_t thread = 0) {
    if (!prepared_) return InvalidArgument("linear: Run before a successful Prepare");
    if (thread >= scratch_.size()) {
      return InvalidArgument("linear: thread %zu >= max_threads %zu", thread, scratch_.size());
    }
    if (in_->rows == 1) return dispatch::GemvRows(*weights_, *in_, r0, r1, y);
    return dispatch::GemmRows(*weights_, *in_, r0, r1, y, rows(), &scratch_[thread]);
  }

  // Runs every row over num_tasks ranges (SplitRows at RangeAlignment())
  // through the engine's scheduler: parallel_for(num_tasks, fn) must call
  // fn(task, thread) once per task < num_tasks, with thread < max_threads
  // and no two concurrent calls on one thread value (ThreadPool::ParallelFor
  // does), and return when all have returned. Returns the first failing
  // range's Status.
  template <class ParallelFor>
  Status RunParallel(float* y, size_t num_tasks, const ParallelFor& parallel_for) {
    if (num_tasks == 0) num_tasks = 1;
    const size_t N = rows(), align = RangeAlignment();
    FirstError first(num_tasks);
    parallel_for(num_tasks, [&](size_t task, size_t thread) {
      const RowRange rr = SplitRows(N, num_tasks, task, align);
      first.Record(task, Run(rr.begin, rr.end, y, thread));
    });
    return first.Take();
  }
  // The same over `pool` (null: this thread), one range per thread.
  Status RunParallel(float* y, ThreadPool* pool) {
    if (pool == nullptr) return Run(0, rows(), y, 0);
    return RunParallel(y, pool->NumThreads(), [pool](size_t n, const auto& fn) {
      pool->ParallelFor(n, fn);
    });
  }

 private:
  LinearOptions opt_;
  // Heap-held so that moving a Linear keeps the addresses `in_` refers to.
  std::unique_ptr<PreparedPalette> weights_;
  std::unique_ptr<PreparedInput> in_;
  std::vector<GemmScratch> scratch_;
  bool prepared_ = false;
};

}  // namespace lutra

#endif  // LUTRA_LINEAR_H_
