// Dynamic dispatch of lutra kernels: compiled once per Highway target.
// See lutra/dispatch.h for why, and docs/design.md for static dispatch instead.
#include "lutra/dispatch.h"

#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/dispatch.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "lutra/kernels/attention-inl.h"
#include "lutra/kernels/dot-inl.h"
#include "lutra/kernels/epilogue-inl.h"
#include "lutra/kernels/gemm-inl.h"
#include "lutra/kernels/gemv-inl.h"
#include "lutra/kernels/kv_cache-inl.h"
#include "lutra/kernels/matmul_input-inl.h"
#include "lutra/kernels/ops-inl.h"

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace {

float DotT(const float* a, const float* b, size_t num) { return Dot(a, b, num); }

void MatVecF32T(const float* w, size_t rows, size_t cols, const float* x, float* y,
                ThreadPool* pool) {
  const size_t tasks = pool ? pool->NumThreads() : 1;
  auto run = [&](size_t task, size_t) {
    const RowRange rr = SplitRows(rows, tasks, task, 4);
    for (size_t r = rr.begin; r < rr.end; ++r) y[r] = Dot(w + r * cols, x, cols);
  };
  if (pool) {
    pool->ParallelFor(tasks, run);
  } else {
    run(0, 0);
  }
}

void MatMulF32T(const float* w, size_t rows, size_t cols, const float* x, size_t batch,
                float* y, ThreadPool* pool) {
  const size_t tasks = pool ? pool->NumThreads() : 1;
  auto run = [&](size_t task, size_t) {
    const RowRange rr = SplitRows(rows, tasks, task, 4);
    for (size_t r = rr.begin; r < rr.end; ++r) {
      for (size_t m = 0; m < batch; ++m) y[m * rows + r] = Dot(w + r * cols, x + m * cols, cols);
    }
  };
  if (pool) {
    pool->ParallelFor(tasks, run);
  } else {
    run(0, 0);
  }
}

Status GemvT(const PreparedPalette& w, const float* x, const LoraDelta* lora,
             MatmulPrecision precision, float* y, ThreadPool* pool, PreparedInput* scratch) {
  Epilogue ep;
  ep.lora = lora;
  MatmulOptions opt;
  opt.precision = precision;
  return Gemv(w, x, w.shape().cols, ep, y, w.shape().rows, pool, opt, scratch);
}

Status GemmT(const PreparedPalette& w, const float* x, size_t batch, const LoraDelta* lora,
             const LoraDelta* const* token_lora, MatmulPrecision precision, float* y,
             ThreadPool* pool, PreparedInput* scratch) {
  Epilogue ep;
  ep.lora = lora;
  ep.token_lora = token_lora;
  MatmulOptions opt;
  opt.precision = precision;
  return Gemm(w, x, batch, w.shape().cols, ep, y, w.shape().rows, pool, opt, scratch);
}

Status GemmGroupT(const dispatch::GroupJob* jobs, size_t num_jobs, const float* x,
                  size_t batch, MatmulPrecision precision, ThreadPool* pool,
                  GemmScratch* scratch) {
  if (num_jobs == 0) return Status::Ok();
  if (jobs == nullptr) return InvalidArgument("gemm group: null jobs");
  MatmulOptions opt;
  opt.precision = precision;
  const size_t cols = jobs[0].w != nullptr ? jobs[0].w->shape().cols : 0;
  for (size_t j = 0; j < num_jobs; ++j) {
    const dispatch::GroupJob& job = jobs[j];
    if (job.w == nullptr || job.y == nullptr || job.in == nullptr) {
      return InvalidArgument("gemm group: job %zu has a null matrix, output or input", j);
    }
    if (job.w->shape().cols != cols) {
      return InvalidArgument("gemm group: job %zu has %zu columns, job 0 has %zu", j,
                             job.w->shape().cols, cols);
    }
    Epilogue ep;
    ep.lora = job.lora;
    ep.token_lora = job.token_lora;
    // Matrices of the same width read the same quantized x: copy it.
    const dispatch::GroupJob* same = nullptr;
    for (size_t i = 0; i < j && same == nullptr; ++i) {
      if (jobs[i].w->shape().bits == job.w->shape().bits) same = &jobs[i];
    }
    LUTRA_RETURN_IF_ERROR(
        same != nullptr ? PrepareGemmInputFrom(*same->in, *job.w, x, cols, ep, job.in)
                        : PrepareGemmInput(*job.w, x, batch, cols, ep, opt, job.in));
  }
  const size_t tasks = pool != nullptr ? pool->NumThreads() : 1;
  // Gemv's and Gemm's alignments of their ParallelForRows ranges.
  const size_t align = batch == 1 ? kGemvRangeAlignment : GemmRangeAlignment();
  const auto run = [&](size_t task, size_t thread) -> Status {
    for (size_t j = 0; j < num_jobs; ++j) {
      const dispatch::GroupJob& job = jobs[j];
      const size_t N = job.w->shape().rows;
      const RowRange rr = SplitRows(N, tasks, task, align);
      if (batch == 1) {
        LUTRA_RETURN_IF_ERROR(GemvRows(*job.w, *job.in, rr.begin, rr.end, job.y));
      } else {
        LUTRA_RETURN_IF_ERROR(GemmRows(*job.w, *job.in, rr.begin, rr.end, job.y, N,
                                       scratch != nullptr ? &scratch[thread] : nullptr));
      }
    }
    return Status::Ok();
  };
  if (tasks == 1) return run(0, 0);
  FirstError first(tasks);
  pool->ParallelFor(tasks, [&](size_t task, size_t thread) { first.Record(task, run(task, thread)); });
  return first.Take();
}

Status PrepareGemmT(const PreparedPalette& w, const float* X, size_t M, size_t ldx,
                    const Epilogue& epilogue, const MatmulOptions& options, PreparedInput* in) {
  return PrepareGemmInput(w, X, M, ldx, epilogue, options, in);
}
Status GemvRowsT(const PreparedPalette& w, const PreparedInput& in, size_t n0, size_t n1,
                 float* y) {
  return GemvRows(w, in, n0, n1, y);
}
Status GemmRowsT(const PreparedPalette& w, const PreparedInput& in, size_t n0, size_t n1,
                 float* Y, size_t ldy, GemmScratch* scratch) {
  return GemmRows(w, in, n0, n1, Y, ldy, scratch);
}
size_t GemmRangeAlignmentT() { return GemmRangeAlignment(); }

// The kernels' epilogue (LoraAx, then FinishRows in place over y), so that
// f32 weights round their LoRA term exactly like palettized ones.
void LoraApplyT(const LoraDelta& lora, const float* x, size_t batch, size_t rows, size_t cols,
                float* ax, float* y) {
  EpilogueArgs e;
  e.lora = &lora;
  e.lora_ax = ax;
  const hn::ScalableTag<float> df;
  for (size_t m = 0; m < batch; ++m) {
    LoraAx(lora, x + m * cols, 1, cols, cols, ax);
    float* y_row = y + m * rows;
    for (size_t n0 = 0; n0 < rows; n0 += kEpilogueChunk) {
      FinishRows(df, e, 0, n0, HWY_MIN(kEpilogueChunk, rows - n0), y_row + n0, y_row);
    }
  }
}

void RMSNormT(const float* x, const float* weight, size_t num, float eps, float* out) {
  RMSNorm(x, weight, num, eps, out);
}
Status RoPET(float* x, size_t num_tokens, size_t num_heads, size_t head_dim, size_t first_pos,
             const double* inv_freq, RopeLayout layout) {
  return RoPE(x, num_tokens, num_heads, head_dim, first_pos, inv_freq,
              layout == RopeLayout::kHalfSplit ? RopeMode::kNeoX : RopeMode::kAdjacent);
}
void SwiGLUT(const float* gate, const float* up, size_t num, float* out) {
  SwiGLU(gate, up, num, out);
}
void AddToT(float* x, const float* y, size_t num) { AddInPlace(x, y, num); }
void SoftmaxT(float* x, size_t num) { Softmax(x, num); }
Status AppendKVT(KVCache& cache, size_t layer, size_t pos, size_t num_tokens, const float* k,
                 const float* v) {
  return AppendKV(cache, layer, pos, num_tokens, k, v);
}
Status AttentionT(const KVCache& cache, size_t layer, size_t pos, size_t num_tokens,
                  const float* q, size_t num_heads, float* out, ThreadPool* pool) {
  return Attention(cache, layer, pos, num_tokens, q, num_heads, out, AttentionOptions(), pool);
}

}  // namespace
}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include "hwy/targets.h"

namespace lutra {
namespace dispatch {

HWY_EXPORT(DotT);
HWY_EXPORT(MatVecF32T);
HWY_EXPORT(MatMulF32T);

float Dot(const float* a, const float* b, size_t num) {
  return HWY_DYNAMIC_DISPATCH(DotT)(a, b, num);
}

HWY_EXPORT(GemvT);
HWY_EXPORT(LoraApplyT);
HWY_EXPORT(GemmT);

void MatVecF32(const float* w, size_t rows, size_t cols, const float* x, float* y,
               ThreadPool* pool) {
  HWY_DYNAMIC_DISPATCH(MatVecF32T)(w, rows, cols, x, y, pool);
}

void MatMulF32(const float* w, size_t rows, size_t cols, const float* x, size_t batch,
               float* y, ThreadPool* pool) {
  HWY_DYNAMIC_DISPATCH(MatMulF32T)(w, rows, cols, x, batch, y, pool);
}

Status Gemv(const PreparedPalette& w, const float* x, const LoraDelta* lora,
            MatmulPrecision precision, float* y, ThreadPool* pool, PreparedInput* scratch) {
  return HWY_DYNAMIC_DISPATCH(GemvT)(w, x, lora, precision, y, pool, scratch);
}

Status Gemm(const PreparedPalette& w, const float* x, size_t batch, const LoraDelta* lora,
            MatmulPrecision precision, float* y, ThreadPool* pool, PreparedInput* scratch) {
  return HWY_DYNAMIC_DISPATCH(GemmT)(w, x, batch, lora, nullptr, precision, y, pool, scratch);
}

Status GemmPerTokenLora(const PreparedPalette& w, const float* x, size_t batch,
                        const LoraDelta* const* token_lora, MatmulPrecision precision, float* y,
                        ThreadPool* pool, PreparedInput* scratch) {
  if (token_lora == nullptr) return InvalidArgument("gemm: null token_lora list");
  return HWY_DYNAMIC_DISPATCH(GemmT)(w, x, batch, nullptr, token_lora, precision, y, pool,
                                     scratch);
}

HWY_EXPORT(PrepareGemmT);
HWY_EXPORT(GemmGroupT);
HWY_EXPORT(GemvRowsT);
HWY_EXPORT(GemmRowsT);
HWY_EXPORT(GemmRangeAlignmentT);

Status GemmGroup(const GroupJob* jobs, size_t num_jobs, const float* x, size_t batch,
                 MatmulPrecision precision, ThreadPool* pool, GemmScratch* scratch) {
  return HWY_DYNAMIC_DISPATCH(GemmGroupT)(jobs, num_jobs, x, batch, precision, pool, scratch);
}
Status PrepareGemm(const PreparedPalette& w, const float* X, size_t M, size_t ldx,
                   const Epilogue& epilogue, const MatmulOptions& options, PreparedInput* in) {
  return HWY_DYNAMIC_DISPATCH(PrepareGemmT)(w, X, M, ldx, epilogue, options, in);
}
Status GemvRows(const PreparedPalette& w, const PreparedInput& in, size_t n0, size_t n1,
                float* y) {
  return HWY_DYNAMIC_DISPATCH(GemvRowsT)(w, in, n0, n1, y);
}
Status GemmRows(const PreparedPalette& w, const PreparedInput& in, size_t n0, size_t n1,
                float* Y, size_t ldy, GemmScratch* scratch) {
  return HWY_DYNAMIC_DISPATCH(GemmRowsT)(w, in, n0, n1, Y, ldy, scratch);
}
size_t GemvRangeAlignment() { return kGemvRangeAlignment; }
size_t GemmRangeAlignment() { return HWY_DYNAMIC_DISPATCH(GemmRangeAlignmentT)(); }

void LoraApply(const LoraDelta& lora, const float* x, size_t batch, size_t rows, size_t cols,
               float* ax, float* y) {
  HWY_DYNAMIC_DISPATCH(LoraApplyT)(lora, x, batch, rows, cols, ax, y);
}

void DequantizeRow(const PaletteView& w, size_t r, float* out) {
  lutra::DequantizeRow(w, r, out);
}

HWY_EXPORT(RMSNormT);
HWY_EXPORT(RoPET);
HWY_EXPORT(SwiGLUT);
HWY_EXPORT(AddToT);
HWY_EXPORT(SoftmaxT);
HWY_EXPORT(AppendKVT);
HWY_EXPORT(AttentionT);

void RMSNorm(const float* x, const float* weight, size_t num, float eps, float* out) {
  HWY_DYNAMIC_DISPATCH(RMSNormT)(x, weight, num, eps, out);
}
Status RoPE(float* x, size_t num_tokens, size_t num_heads, size_t head_dim, size_t first_pos,
            const double* inv_freq, RopeLayout layout) {
  return HWY_DYNAMIC_DISPATCH(RoPET)(x, num_tokens, num_heads, head_dim, first_pos, inv_freq,
                                     layout);
}
void SwiGLU(const float* gate, const float* up, size_t num, float* out) {
  HWY_DYNAMIC_DISPATCH(SwiGLUT)(gate, up, num, out);
}
void AddTo(float* x, const float* y, size_t num) { HWY_DYNAMIC_DISPATCH(AddToT)(x, y, num); }
void Softmax(float* x, size_t num) { HWY_DYNAMIC_DISPATCH(SoftmaxT)(x, num); }
Status AppendKV(KVCache& cache, size_t layer, size_t pos, size_t num_tokens, const float* k,
                const float* v) {
  return HWY_DYNAMIC_DISPATCH(AppendKVT)(cache, layer, pos, num_tokens, k, v);
}
Status Attention(const KVCache& cache, size_t layer, size_t pos, size_t num_tokens,
                 const float* q, size_t num_heads, float* out, ThreadPool* pool) {
  return HWY_DYNAMIC_DISPATCH(AttentionT)(cache, layer, pos, num_tokens, q, num_heads, out,
                                          pool);
}

const char* TargetName() { return ActiveTarget(); }

const char* ActiveTarget() {
  // The dispatch table picks the best of the targets this binary was built
  // for among those the CPU supports: the lowest set bit of the intersection
  // (Highway orders better targets first, with smaller bit values).
  const int64_t targets = hwy::SupportedTargets() & HWY_TARGETS;
  return hwy::TargetName(targets & ~(targets - 1));
}

}  // namespace dispatch
}  // namespace lutra
#endif  // HWY_ONCE
