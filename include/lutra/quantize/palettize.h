// Palettizer: f32 weight matrix -> palettized matrix (palette.h format).
//
// Each group of G consecutive rows gets its own codebook of 2^b values found
// by 1-D (optionally importance-weighted) k-means over the group's G * K
// weights; each weight then stores the index of its nearest codebook entry.
//
// Per group (n = G * K values, k = 2^b centers), kmeans_1d.h finds the
// codebook: exact in 1-D on sorted values with prefix sums, initialized per
// PalettizeInit, refined by Lloyd iterations (that header explains each step).
// Then:
//  - Centers are rounded to the codebook type (f16 by default) BEFORE the
//     final assignment, so each index is optimal for the value actually
//     stored. Each weight picks its nearest stored entry by a branch-free
//     binary search over the entries' midpoints.
//
// Everything is deterministic for given inputs and options (including the
// seed), and independent of the thread count: groups are independent and
// statistics are reduced in group order.
//
// Cost: ~15-40 ns per weight on one core for b <= 4 (4096 x 4096 in well
// under a second when the machine is quiet; bench/palettize_bench.cc), plus
// O(k B log B) per group for the DP. Scratch memory: ~48 bytes per value of
// one group (G * K values) per thread, plus the output matrix.
//
// Plain header (scalar C++ and std::thread; no per-target code).
#ifndef LUTRA_QUANTIZE_PALETTIZE_H_
#define LUTRA_QUANTIZE_PALETTIZE_H_

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <limits>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "lutra/base/status.h"
#include "lutra/format/palette.h"
#include "lutra/quantize/kmeans_1d.h"

namespace lutra {

struct PalettizeOptions {
  int bits = 4;                 // index width b in {1, 2, 3, 4, 6, 8}
  size_t group_rows = 16;       // G rows share one codebook (G >= N: one group)
  ElementType codebook = ElementType::kF16;
  uint64_t seed = 0;            // only used by kKMeansPlusPlus
  int max_iters = 30;           // Lloyd iterations per group (0 = init only)
  size_t threads = 1;           // worker threads; 0 = hardware concurrency
  PalettizeInit init = PalettizeInit::kOptimal;
  // Optional K per-column importance weights (e.g. mean squared activation of
  // each input): minimizes sum_c importance[c] * (w[r][c] - w'[r][c])^2.
  // Must be finite and >= 0, not all 0. For the clustering, each weight is
  // raised to at least 1e-6 * mean, so zero-importance columns still get a
  // sensible (nearest) index; reported errors use the weights as given.
  const float* column_importance = nullptr;
  // Called after each finished group with (groups done, total groups).
  // Calls are serialized (under a mutex) but may come from worker threads.
  std::function<void(size_t done, size_t total)> progress;
};

// Error statistics of a palettization (all sums in double over all N * K
// weights; w' is the dequantized weight).
struct PalettizeStats {
  double sq_error = 0.0;           // sum (w - w')^2
  double weighted_sq_error = 0.0;  // sum importance[c] * (w - w')^2 (= sq_error without importance)
  double sum_sq = 0.0;             // sum w^2
  double weighted_sum_sq = 0.0;    // sum importance[c] * w^2
  size_t num_weights = 0;          // N * K
  size_t num_groups = 0;
  size_t degenerate_groups = 0;    // groups with <= 2^b distinct values (exact)
  int max_iters_used = 0;          // most Lloyd iterations any group ran (incl. empty-cluster repairs)

  double mse() const { return num_weights ? sq_error / double(num_weights) : 0.0; }
  // 10 log10(sum w^2 / sum (w - w')^2); 300 when exact.
  double snr_db() const {
    if (sq_error <= 0.0) return 300.0;
    return 10.0 * std::log10(sum_sq / sq_error);
  }
  double weighted_snr_db() const {
    if (weighted_sq_error <= 0.0) return 300.0;
    return 10.0 * std::log10(weighted_sum_sq / weighted_sq_error);
  }
};


// Checks the palettizer's inputs; the message names the problem. w must hold
// rows * cols finite floats; with an f16 codebook, |w| <= 65504.
inline Status ValidatePalettizeInput(const float* w, size_t rows, size_t cols,
                                     const PalettizeOptions& opt) {
  PaletteShape shape;
  shape.rows = rows;
  shape.cols = cols;
  shape.bits = opt.bits;
  shape.group_rows = opt.group_rows;
  shape.codebook = opt.codebook;
  LUTRA_RETURN_IF_ERROR(shape.Validate().WithContext("palettize"));
  if (w == nullptr) return InvalidArgument("palettize: weights pointer is null");
  if (cols >= (size_t{1} << 32)) {
    return InvalidArgument("palettize: cols = %zu, need cols < 2^32", cols);
  }
  if (opt.max_iters < 0) {
    return InvalidArgument("palettize: max_iters = %d, need max_iters >= 0", opt.max_iters);
  }
  if (opt.init != PalettizeInit::kOptimal && opt.init != PalettizeInit::kQuantile &&
      opt.init != PalettizeInit::kKMeansPlusPlus && opt.init != PalettizeInit::kCompanded) {
    return InvalidArgument("palettize: unknown init method %d", static_cast<int>(opt.init));
  }
  const float limit = opt.codebook == ElementType::kF16 ? 65504.0f
                                                         : std::numeric_limits<float>::max();
  for (size_t r = 0; r < rows; ++r) {
    const float* row = w + r * cols;
    for (size_t c = 0; c < cols; ++c) {
      if (!std::isfinite(row[c])) {
        return InvalidArgument("palettize: weight (%zu, %zu) is %s; weights must be finite",
                               r, c, std::isnan(row[c]) ? "NaN" : "infinite");
      }
      if (std::abs(row[c]) > limit) {
        return InvalidArgument(
            "palettize: weight (%zu, %zu) = %g exceeds the f16 codebook range (65504); "
            "use ElementType::kBF16 or kF32",
            r, c, double(row[c]));
      }
    }
  }
  if (opt.column_importance != nullptr) {
    double sum = 0.0;
    for (size_t c = 0; c < cols; ++c) {
      const float v = opt.column_importance[c];
      if (!std::isfinite(v) || v < 0.0f) {
        return InvalidArgument(
            "palettize: column_importance[%zu] = %g, need finite values >= 0", c, double(v));
      }
      sum += v;
    }
    if (!(sum > 0.0)) {
      return InvalidArgument("palettize: column_importance is all zero");
    }
  }
  return Status::Ok();
}

// Palettizes the row-major rows x cols matrix w (see the top of this file).
// On success, fills *stats (if non-null) with the error statistics, computed
// exactly against the stored (rounded) codebooks.
inline StatusOr<PaletteMatrix> Palettize(const float* w, size_t rows, size_t cols,
                                         const PalettizeOptions& opt,
                                         PalettizeStats* stats = nullptr) {
  using namespace kmeans_1d;
  LUTRA_RETURN_IF_ERROR(ValidatePalettizeInput(w, rows, cols, opt));
  PaletteShape shape;
  shape.rows = rows;
  shape.cols = cols;
  shape.bits = opt.bits;
  shape.group_rows = opt.group_rows;  // G >= N: one group
  shape.codebook = opt.codebook;
  StatusOr<PaletteMatrix> alloc = PaletteMatrix::Allocate(shape);
  if (!alloc.ok()) return alloc.status();
  PaletteMatrix m = std::move(alloc.value());

  // Clustering weights: importance raised to >= 1e-6 * mean (see options).
  std::vector<float> eff;
  if (opt.column_importance != nullptr) {
    double mean = 0.0;
    for (size_t c = 0; c < cols; ++c) mean += opt.column_importance[c];
    mean /= double(cols);
    const float floor_w = static_cast<float>(1e-6 * mean);
    eff.resize(cols);
    for (size_t c = 0; c < cols; ++c) eff[c] = std::max(opt.column_importance[c], floor_w);
  }
  const float* weights = eff.empty() ? nullptr : eff.data();
  const float* imp = opt.column_importance;

  const size_t G = shape.group_rows;
  const size_t num_groups = shape.num_groups();
  const size_t k = shape.num_entries();
  std::vector<GroupResult> results(num_groups);
  std::atomic<size_t> next{0};
  std::mutex progress_mu;
  size_t done = 0;

  auto worker = [&]() {
    GroupScratch s;
    s.row_idx.resize(cols);
    std::vector<double> centers(k), mids(k);
    for (;;) {
      const size_t grp = next.fetch_add(1);
      if (grp >= num_groups) break;
      const size_t r0 = grp * G;
      const size_t nrows = std::min(G, rows - r0);
      GroupResult& res = results[grp];
      const uint64_t group_seed = opt.seed ^ (0x9E3779B97F4A7C15ull * (grp + 1));
      ClusterGroup(s, w + r0 * cols, nrows, cols, weights, k, opt.init, opt.max_iters, group_seed,
                   centers.data(), &res);
      // Store rounded entries; assign against the stored values.
      for (size_t e = 0; e < k; ++e) {
        m.set_entry(grp, e, static_cast<float>(centers[e]));
        centers[e] = m.view().entry(grp, e);
      }
      for (size_t e = 0; e + 1 < k; ++e) mids[e] = 0.5 * (centers[e] + centers[e + 1]);
      mids[k - 1] = std::numeric_limits<double>::infinity();
      for (size_t r = r0; r < r0 + nrows; ++r) {
        const float* row = w + r * cols;
        double sq = 0.0, wsq = 0.0, sig = 0.0, wsig = 0.0;
        for (size_t c = 0; c < cols; ++c) {
          const double x = row[c];
          const uint32_t idx = Nearest(mids.data(), k, x);
          s.row_idx[c] = static_cast<uint8_t>(idx);
          const double d = x - centers[idx];
          sq += d * d;
          sig += x * x;
          if (imp) {
            wsq += double(imp[c]) * d * d;
            wsig += double(imp[c]) * x * x;
          }
        }
        res.sq_error += sq;
        res.sum_sq += sig;
        res.weighted_sq_error += imp ? wsq : sq;
        res.weighted_sum_sq += imp ? wsig : sig;
        PackRow(shape, s.row_idx.data(), m.mutable_row(r));
      }
      if (opt.progress) {
        std::lock_guard<std::mutex> lock(progress_mu);
        opt.progress(++done, num_groups);
      }
    }
  };

  size_t threads = opt.threads;
  if (threads == 0) threads = std::max<size_t>(1, std::thread::hardware_concurrency());
  threads = std::min(threads, num_groups);
  if (threads <= 1) {
    worker();
  } else {
    std::vector<std::thread> pool;
    pool.reserve(threads - 1);
    for (size_t t = 0; t + 1 < threads; ++t) pool.emplace_back(worker);
    worker();
    for (std::thread& t : pool) t.join();
  }

  if (stats != nullptr) {
    PalettizeStats st;
    st.num_weights = rows * cols;
    st.num_groups = num_groups;
    for (const GroupResult& r : results) {  // group order: thread-count independent
      st.sq_error += r.sq_error;
      st.weighted_sq_error += r.weighted_sq_error;
      st.sum_sq += r.sum_sq;
      st.weighted_sum_sq += r.weighted_sum_sq;
      st.degenerate_groups += r.degenerate ? 1 : 0;
      st.max_iters_used = std::max(st.max_iters_used, r.iters);
    }
    *stats = st;
  }
  return m;
}

// Error statistics of an existing palettized matrix against the original
// weights w (rows x cols of v.shape), by reference dequantization. Same
// definitions as the by-product of Palettize (degenerate_groups and
// max_iters_used stay 0). column_importance: optional, K weights.
inline StatusOr<PalettizeStats> MeasurePaletteError(const PaletteView& v, const float* w,
                                                    const float* column_importance = nullptr) {
  LUTRA_RETURN_IF_ERROR(v.shape.Validate().WithContext("palette error"));
  if (v.indices == nullptr || v.codebooks == nullptr || w == nullptr) {
    return InvalidArgument("palette error: null view or weights");
  }
  const size_t K = v.shape.cols;
  std::vector<float> row(K);
  PalettizeStats st;
  st.num_weights = v.shape.rows * K;
  st.num_groups = v.shape.num_groups();
  for (size_t r = 0; r < v.shape.rows; ++r) {
    DequantizeRow(v, r, row.data());
    for (size_t c = 0; c < K; ++c) {
      const double x = w[r * K + c];
      const double d = x - double(row[c]);
      const double imp = column_importance ? double(column_importance[c]) : 1.0;
      st.sq_error += d * d;
      st.sum_sq += x * x;
      st.weighted_sq_error += imp * d * d;
      st.weighted_sum_sq += imp * x * x;
    }
  }
  return st;
}

}  // namespace lutra

#endif  // LUTRA_QUANTIZE_PALETTIZE_H_
