// Accuracy-recovery adapter, built without training: for each palettized
// matrix, the best rank-r approximation of its quantization residual.
//
// Palettizing W gives W_hat = W - E. The error E is mostly noise-like, but
// its top singular directions carry a disproportionate share of the energy
// (outlier channels, rows whose codebook fits badly), and a rank-r LoRA
// (r = 16) on top of the frozen base wins those back:
//   E ~= U_r S_r V_r^T (truncated SVD, svd.h),  B = U_r S_r^(1/2),
//   A = S_r^(1/2) V_r^T,  scale = 1,  so  W_hat + B A ~= W.
// The square-root split keeps A and B at similar magnitudes, which suits
// 16-bit storage (no factor gets all of the dynamic range).
//
// With calibration (RecoveryTarget::column_importance = h, E[x_k^2] of the
// matrix's input, calibration.h) the fit minimizes the output error
// E||(E - B A) x||^2 ~ ||(E - B A) D||_F^2 with D = diag(sqrt(h)) instead:
// the SVD is of E D, and A = S^(1/2) V^T D^-1 undoes the scaling, so the
// rank is spent on the input columns that carry large activations.
//
// Optionally (RecoveryOptions::rounds > 0) the base and the adapter are
// refined together by alternating: W_hat_t = Palettize(W - B_{t-1} A_{t-1}),
// (B_t, A_t) = SVD_r(W - W_hat_t). The codebooks then fit the part of W that
// a low-rank term cannot express, and the low-rank term takes what the
// codebooks cannot. That changes the base matrices, so the result is only
// valid as a pair (use RecoveryResult::requantized as the base), unlike the
// plain adapter that sits on an existing base. The pair with the smallest
// error over the rounds is returned (rounds never make it worse).
//
// Plain header: scalar C++, offline (model conversion / load time).
#ifndef LUTRA_RECOVERY_H_
#define LUTRA_RECOVERY_H_

#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "lutra/base/status.h"
#include "lutra/format/lora.h"
#include "lutra/format/palette.h"
#include "lutra/quantize/palettize.h"
#include "lutra/quantize/svd.h"

namespace lutra {

struct RecoveryOptions {
  size_t rank = 16;                  // r (clamped to min(N, K) per matrix; <= kMaxLoraRank)
  int power_iterations = 2;          // randomized SVD sharpening (svd.h)
  size_t oversample = 8;             // randomized SVD extra sketch columns
  uint64_t seed = 0x5EEDu;           // sketch seed: the adapter is deterministic
  ElementType type = ElementType::kF16;  // storage of A and B
  size_t threads = 1;                // matrices processed in parallel (0 = all cores)
  // Alternating rounds (BuildRecoveryAdapterAlternating only): 0 = palettize
  // W once, then SVD of the residual; t > 0 re-palettizes W - BA t times.
  int rounds = 0;
  // Palettizer settings for the alternating variant (bits, group, codebook).
  PalettizeOptions palettize;
};

// One matrix to recover: the original f32 weights and its palettized copy.
struct RecoveryTarget {
  size_t layer = 0;
  Projection projection = Projection::kQ;
  const float* weights = nullptr;  // N x K row-major f32 (N x K from BaseShapes)
  PaletteView quantized;           // W_hat, same N x K (unused by the alternating variant)
  // Optional K per-column weights h >= 0 (not all 0): fit the residual in
  // the h-weighted norm (see the top of this file). Each is raised to at
  // least 1e-6 of their mean so that D is invertible.
  const float* column_importance = nullptr;
};

// Relative Frobenius errors of one matrix: ||W - W_hat||_F / ||W||_F before,
// ||W - W_hat - s B A||_F / ||W||_F after (with the factors as stored, i.e.
// after rounding to f16/bf16). For inputs x with i.i.d. components this is
// also the relative RMS error of the output W x.
struct RecoveryMatrixStats {
  size_t layer = 0;
  Projection projection = Projection::kQ;
  size_t rank = 0;
  double rel_error_quantized = 0.0;
  double rel_error_recovered = 0.0;
  int best_round = 0;  // alternating variant: which round was kept
};

struct RecoveryResult {
  Adapter adapter;
  // Alternating variant only: the new base matrices, one per target in the
  // order given (they replace the model's palettized weights).
  std::vector<PaletteMatrix> requantized;
  std::vector<RecoveryMatrixStats> stats;  // one per target, in order
};

namespace recovery_detail {

inline Status CheckTargets(const BaseShapes& base, const std::vector<RecoveryTarget>& targets,
                           const RecoveryOptions& opt, bool need_quantized) {
  LUTRA_RETURN_IF_ERROR(base.Validate());
  if (opt.rank == 0 || opt.rank > kMaxLoraRank) {
    return InvalidArgument("recovery: rank %zu, need 1..%zu", opt.rank, kMaxLoraRank);
  }
  if (targets.empty()) return InvalidArgument("recovery: no target matrices");
  if (opt.rounds < 0 || opt.rounds > 100) {
    return InvalidArgument("recovery: rounds = %d, need 0..100", opt.rounds);
  }
  for (const RecoveryTarget& t : targets) {
    if (static_cast<size_t>(t.projection) >= kNumProjections || t.layer >= base.num_layers) {
      return InvalidArgument("recovery: target layer %zu projection %d is not in the base "
                             "model (%zu layers)",
                             t.layer, static_cast<int>(t.projection), base.num_layers);
    }
    const size_t N = base.Rows(t.projection), K = base.Cols(t.projection);
    if (t.weights == nullptr) {
      return InvalidArgument("recovery: layer %zu %s: null weights", t.layer,
                             ProjectionName(t.projection));
    }
    if (need_quantized) {
      if (t.quantized.indices == nullptr || t.quantized.codebooks == nullptr) {
        return InvalidArgument("recovery: layer %zu %s: null palettized view", t.layer,
                               ProjectionName(t.projection));
      }
      if (t.quantized.shape.rows != N || t.quantized.shape.cols != K) {
        return InvalidArgument("recovery: layer %zu %s: palettized matrix is %zu x %zu, "
                               "base shape is %zu x %zu",
                               t.layer, ProjectionName(t.projection), t.quantized.shape.rows,
                               t.quantized.shape.cols, N, K);
      }
      LUTRA_RETURN_IF_ERROR(t.quantized.shape.Validate());
    }
  }
  return Status::Ok();
}

// Low-rank factors in f32, rounded to the storage type so that errors are
// measured on what will actually be applied.
struct Factors {
  size_t rank = 0;
  std::vector<float> a;  // rank x K
  std::vector<float> b;  // N x rank
};

// SVD_r(residual D) split as B = U S^1/2, A = S^1/2 Vt D^-1, with D =
// diag(sqrt(importance)) (identity when importance is null).
inline StatusOr<Factors> FitResidual(const std::vector<float>& residual, size_t N, size_t K,
                                     const RecoveryOptions& opt, uint64_t seed,
                                     const float* importance = nullptr) {
  std::vector<float> d;  // column scales sqrt(h), floored
  std::vector<float> scaled;
  if (importance != nullptr) {
    double mean = 0.0;
    for (size_t k = 0; k < K; ++k) mean += importance[k];
    mean /= double(K);
    if (!(mean > 0.0) || !std::isfinite(mean)) {
      return InvalidArgument("recovery: column importance must be finite, >= 0, not all 0");
    }
    d.resize(K);
    for (size_t k = 0; k < K; ++k) {
      d[k] = float(std::sqrt(std::max(double(importance[k]), 1e-6 * mean)));
    }
    scaled = residual;
    for (size_t n = 0; n < N; ++n) {
      for (size_t k = 0; k < K; ++k) scaled[n * K + k] *= d[k];
    }
  }
  SvdOptions so;
  so.rank = opt.rank;
  so.oversample = opt.oversample;
  so.power_iterations = opt.power_iterations;
  so.seed = seed;
  StatusOr<TruncatedSvd> svd =
      RandomizedSvd(d.empty() ? residual.data() : scaled.data(), N, K, so);
  if (!svd.ok()) return svd.status();
  Factors f;
  f.rank = svd->rank;
  f.a.resize(f.rank * K);
  f.b.resize(N * f.rank);
  for (size_t r = 0; r < f.rank; ++r) {
    const float root = std::sqrt(svd->s[r]);
    for (size_t k = 0; k < K; ++k) {
      const float v = root * svd->vt[r * K + k];
      f.a[r * K + k] = RoundToElementType(d.empty() ? v : v / d[k], opt.type);
    }
    for (size_t n = 0; n < N; ++n) {
      f.b[n * f.rank + r] = RoundToElementType(svd->u[n * f.rank + r] * root, opt.type);
    }
  }
  return f;
}

// W - W_hat as f32.
inline std::vector<float> Residual(const float* w, const PaletteView& q) {
  const size_t N = q.shape.rows, K = q.shape.cols;
  std::vector<float> res(N * K);
  for (size_t n = 0; n < N; ++n) {
    DequantizeRow(q, n, res.data() + n * K);
    for (size_t k = 0; k < K; ++k) res[n * K + k] = w[n * K + k] - res[n * K + k];
  }
  return res;
}

// ||residual - B A||_F^2 (in double).
inline double RemainingSq(const std::vector<float>& residual, const Factors& f, size_t N,
                          size_t K) {
  double sum = 0.0;
  std::vector<double> row(K);
  for (size_t n = 0; n < N; ++n) {
    for (size_t k = 0; k < K; ++k) row[k] = residual[n * K + k];
    for (size_t r = 0; r < f.rank; ++r) {
      const double b = f.b[n * f.rank + r];
      const float* a = f.a.data() + r * K;
      for (size_t k = 0; k < K; ++k) row[k] -= b * a[k];
    }
    for (size_t k = 0; k < K; ++k) sum += row[k] * row[k];
  }
  return sum;
}

inline double SumSq(const float* w, size_t n) {
  double s = 0.0;
  for (size_t i = 0; i < n; ++i) s += double(w[i]) * w[i];
  return s;
}

// Runs fn(i) for i < n on up to `threads` threads (0 = hardware), keeping
// the first error in index order so results do not depend on scheduling.
template <class Fn>
Status ParallelFor(size_t n, size_t threads, const Fn& fn) {
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  threads = std::min(threads, n);
  std::vector<Status> status(n);
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t i; (i = next.fetch_add(1)) < n;) status[i] = fn(i);
  };
  std::vector<std::thread> pool;
  for (size_t t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
  for (const Status& s : status) LUTRA_RETURN_IF_ERROR(s);
  return Status::Ok();
}

// Seed per matrix: independent sketches, same result whatever the order.
inline uint64_t TargetSeed(uint64_t seed, const RecoveryTarget& t, int round) {
  return seed ^ (0x9E3779B97F4A7C15ull * (t.layer * kNumProjections +
                                          static_cast<size_t>(t.projection) + 1)) ^
         (uint64_t(round) << 56);
}

inline Status AddAll(const BaseShapes& base, const std::vector<RecoveryTarget>& targets,
                     const std::vector<Factors>& factors, const RecoveryOptions& opt,
                     Adapter* adapter) {
  for (size_t i = 0; i < targets.size(); ++i) {
    const RecoveryTarget& t = targets[i];
    const size_t N = base.Rows(t.projection), K = base.Cols(t.projection);
    // Factors are already rounded to opt.type, so the f32 -> type conversion
    // is exact.
    LUTRA_RETURN_IF_ERROR(adapter->AddFactors(t.layer, t.projection, factors[i].rank,
                                              factors[i].a.data(), factors[i].rank * K,
                                              factors[i].b.data(), N * factors[i].rank,
                                              ElementType::kF32, opt.type, 1.0f));
  }
  return Status::Ok();
}

}  // namespace recovery_detail

// Builds the recovery adapter for an existing palettized base: one rank-r
// target per RecoveryTarget from the truncated SVD of W - W_hat. `stats`
// (optional) receives per-matrix errors. Deterministic for given inputs
// and options, whatever opt.threads.
inline StatusOr<Adapter> BuildRecoveryAdapter(const BaseShapes& base,
                                              const std::vector<RecoveryTarget>& targets,
                                              const RecoveryOptions& opt,
                                              std::vector<RecoveryMatrixStats>* stats = nullptr,
                                              const std::string& name = "recovery") {
  using namespace recovery_detail;
  LUTRA_RETURN_IF_ERROR(CheckTargets(base, targets, opt, /*need_quantized=*/true));
  std::vector<Factors> factors(targets.size());
  std::vector<RecoveryMatrixStats> st(targets.size());
  LUTRA_RETURN_IF_ERROR(ParallelFor(targets.size(), opt.threads, [&](size_t i) -> Status {
    const RecoveryTarget& t = targets[i];
    const size_t N = base.Rows(t.projection), K = base.Cols(t.projection);
    const std::vector<float> residual = Residual(t.weights, t.quantized);
    StatusOr<Factors> f = FitResidual(residual, N, K, opt, TargetSeed(opt.seed, t, 0),
                                        t.column_importance);
    if (!f.ok()) {
      return f.status().WithContext("recovery: layer " + std::to_string(t.layer) + " " +
                                    ProjectionName(t.projection));
    }
    factors[i] = std::move(f).value();
    const double norm = std::sqrt(SumSq(t.weights, N * K));
    const double inv = norm > 0.0 ? 1.0 / norm : 0.0;
    st[i].layer = t.layer;
    st[i].projection = t.projection;
    st[i].rank = factors[i].rank;
    st[i].rel_error_quantized = std::sqrt(SumSq(residual.data(), N * K)) * inv;
    st[i].rel_error_recovered = std::sqrt(RemainingSq(residual, factors[i], N, K)) * inv;
    return Status::Ok();
  }));
  StatusOr<Adapter> adapter = Adapter::Create(name, base);
  if (!adapter.ok()) return adapter.status();
  adapter->set_kind("recovery");
  LUTRA_RETURN_IF_ERROR(AddAll(base, targets, factors, opt, &adapter.value()));
  if (stats) *stats = std::move(st);
  return adapter;
}

// Alternating variant: palettizes each target's weights with opt.palettize
// (targets' `quantized` views are ignored), then refines base and adapter
// together for opt.rounds rounds (see the top of this file). Returns the
// adapter, the new base matrices and per-matrix errors.
inline StatusOr<RecoveryResult> BuildRecoveryAdapterAlternating(
    const BaseShapes& base, const std::vector<RecoveryTarget>& targets,
    const RecoveryOptions& opt, const std::string& name = "recovery") {
  using namespace recovery_detail;
  LUTRA_RETURN_IF_ERROR(CheckTargets(base, targets, opt, /*need_quantized=*/false));
  RecoveryResult result;
  std::vector<Factors> factors(targets.size());
  result.requantized.resize(targets.size());
  result.stats.resize(targets.size());
  PalettizeOptions popt = opt.palettize;
  popt.threads = 1;  // parallel over matrices instead
  popt.progress = nullptr;
  LUTRA_RETURN_IF_ERROR(ParallelFor(targets.size(), opt.threads, [&](size_t i) -> Status {
    const RecoveryTarget& t = targets[i];
    const size_t N = base.Rows(t.projection), K = base.Cols(t.projection);
    const std::string what =
        "recovery: layer " + std::to_string(t.layer) + " " + ProjectionName(t.projection);
    const double norm = std::sqrt(SumSq(t.weights, N * K));
    const double inv = norm > 0.0 ? 1.0 / norm : 0.0;
    std::vector<float> target(t.weights, t.weights + N * K);  // what the palettizer fits
    PalettizeOptions po = popt;
    if (t.column_importance != nullptr) po.column_importance = t.column_importance;
    double best = -1.0;
    for (int round = 0; round <= opt.rounds; ++round) {
      StatusOr<PaletteMatrix> q = Palettize(target.data(), N, K, po);
      if (!q.ok()) return q.status().WithContext(what);
      const std::vector<float> residual = Residual(t.weights, q->view());
      StatusOr<Factors> f = FitResidual(residual, N, K, opt, TargetSeed(opt.seed, t, round),
                                          t.column_importance);
      if (!f.ok()) return f.status().WithContext(what);
      const double err = std::sqrt(RemainingSq(residual, *f, N, K)) * inv;
      if (round == 0) result.stats[i].rel_error_quantized = std::sqrt(SumSq(residual.data(), N * K)) * inv;
      if (best < 0.0 || err < best) {
        best = err;
        result.stats[i].rel_error_recovered = err;
        result.stats[i].best_round = round;
        result.requantized[i] = std::move(q).value();
        factors[i] = f.value();
      }
      // Next round fits the codebooks to what the low-rank term cannot hold.
      for (size_t n = 0; n < N; ++n) {
        for (size_t k = 0; k < K; ++k) {
          double ba = 0.0;
          for (size_t r = 0; r < f->rank; ++r) ba += double(f->b[n * f->rank + r]) * f->a[r * K + k];
          target[n * K + k] = static_cast<float>(t.weights[n * K + k] - ba);
        }
      }
    }
    result.stats[i].layer = t.layer;
    result.stats[i].projection = t.projection;
    result.stats[i].rank = factors[i].rank;
    return Status::Ok();
  }));
  StatusOr<Adapter> adapter = Adapter::Create(name, base);
  if (!adapter.ok()) return adapter.status();
  adapter->set_kind("recovery");
  LUTRA_RETURN_IF_ERROR(AddAll(base, targets, factors, opt, &adapter.value()));
  result.adapter = std::move(adapter).value();
  return result;
}

}  // namespace lutra

#endif  // LUTRA_RECOVERY_H_
