// Palettizer: f32 weight matrix -> palettized matrix (palette.h format).
//
// Each group of G consecutive rows gets its own codebook of 2^b values found
// by 1-D (optionally importance-weighted) k-means over the group's G * K
// weights; each weight then stores the index of its nearest codebook entry.
//
// Per group (n = G * K values, k = 2^b centers):
//  1. Sort the values once (LSD radix sort on order-preserving integer keys,
//     O(n)) and build prefix sums of weight, weight * x and weight * x^2.
//     With these, the size, mean and squared error of any contiguous run of
//     sorted values cost O(1) - in 1-D, every k-means cluster is such a run.
//  2. Groups with at most k distinct values are handled exactly: the codebook
//     is the distinct values (unused entries repeat the largest).
//  3. Initialization (PalettizeInit):
//     - kOptimal (default): exact optimal 1-D k-means by dynamic programming
//       over B candidate cluster boundaries, B = clamp(max(n/8, 4k), 64,
//       1024). When the group has <= B distinct values every boundary is a
//       candidate and the result is the global optimum; otherwise the
//       candidates are B/2 equal-count and B/2 equal-width split points (so
//       both the dense middle and sparse tails of heavy-tailed data get
//       resolution). Cost O(k * B log B) with the monotone-split divide and
//       conquer (b = 8 costs ~4x b = 4; if there are fewer than k candidate
//       runs it uses kCompanded).
//     - kQuantile: centers at the weighted (i + 1/2) / k quantiles.
//     - kCompanded: quantiles of the (weighted) density raised to 1/3, the
//       asymptotically MSE-optimal center density (good for large k).
//     - kKMeansPlusPlus: D^2 sampling seeded by options.seed (and the group
//       index, so results do not depend on the thread count).
//  4. Lloyd iterations on the sorted data: the boundaries between clusters are
//     the midpoints of adjacent centers, found by binary search, and new
//     centers are run means from the prefix sums, so one iteration costs
//     O(k log n), independent of n. Stops when no boundary moves, or after
//     max_iters. An empty cluster (possible after the quantile or k-means++
//     inits when values tie) is moved to split the cluster with the largest
//     error, and Lloyd runs again, so no entry is wasted.
//  5. Centers are rounded to the codebook type (f16 by default) BEFORE the
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
#ifndef LUTRA_PALETTIZE_H_
#define LUTRA_PALETTIZE_H_

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

namespace lutra {

enum class PalettizeInit : uint8_t {
  kOptimal = 0,         // DP-optimal on candidate boundaries (default), see above
  kQuantile = 1,        // weighted quantiles
  kKMeansPlusPlus = 2,  // D^2 sampling, uses PalettizeOptions::seed
  kCompanded = 3,       // quantiles of density^(1/3): faster than kOptimal for b >= 6
};

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

namespace palettize_detail {

// Order-preserving map float -> uint32 (for finite values; -0 must be
// normalized to +0 by the caller so equal values get equal keys).
inline uint32_t FloatKey(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline float KeyFloat(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// LSD radix sort of n 64-bit items by their upper 32 bits (the lower 32 bits
// are a payload that travels along). 3 passes of 11/11/10 bits; a pass whose
// digit is the same for all items is skipped. Returns the buffer (a or tmp)
// that holds the sorted result.
inline uint64_t* RadixSortUpper32(uint64_t* a, uint64_t* tmp, size_t n) {
  static constexpr int kShift[3] = {32, 43, 54};
  static constexpr int kBits[3] = {11, 11, 10};
  std::vector<size_t> count(2048);
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = kShift[pass];
    const uint64_t mask = (uint64_t{1} << kBits[pass]) - 1;
    std::fill(count.begin(), count.end(), 0);
    for (size_t i = 0; i < n; ++i) ++count[(a[i] >> shift) & mask];
    if (count[(a[0] >> shift) & mask] == n) continue;  // all equal digit
    size_t sum = 0;
    for (size_t d = 0; d <= mask; ++d) {
      const size_t c = count[d];
      count[d] = sum;
      sum += c;
    }
    for (size_t i = 0; i < n; ++i) tmp[count[(a[i] >> shift) & mask]++] = a[i];
    std::swap(a, tmp);
  }
  return a;
}

// Per-thread scratch memory for clustering one group. About 48 bytes per
// value of the group (G * K values).
struct GroupScratch {
  std::vector<uint64_t> keys, tmp;
  std::vector<float> xs;               // sorted values
  std::vector<double> p0, p1, p2;      // prefix sums of wt, wt*y, wt*y^2 (y = x - shift)
  std::vector<size_t> cand;            // DP candidate boundaries (sorted positions)
  std::vector<double> dp_prev, dp_cur;
  std::vector<uint32_t> opt;           // DP argmins, k x (U + 1)
  std::vector<size_t> split, new_split;
  std::vector<double> d2;              // k-means++ distances
  std::vector<uint8_t> row_idx;        // one row of indices
};

// Sorted, prefix-summed view of one group's values.
class SortedGroup {
 public:
  SortedGroup(GroupScratch& s, size_t n) : s_(s), n_(n) {}

  size_t n() const { return n_; }
  float x(size_t i) const { return s_.xs[i]; }
  double shift() const { return shift_; }
  void set_shift(double v) { shift_ = v; }
  double W(size_t a, size_t b) const { return s_.p0[b] - s_.p0[a]; }
  // Mean of run [a, b) in shifted coordinates; requires W(a, b) > 0.
  double MeanY(size_t a, size_t b) const { return (s_.p1[b] - s_.p1[a]) / W(a, b); }
  // Weighted SSE of run [a, b) around its own mean.
  double Cost(size_t a, size_t b) const {
    const double w = W(a, b);
    if (w <= 0.0) return 0.0;
    const double s1 = s_.p1[b] - s_.p1[a];
    const double c = (s_.p2[b] - s_.p2[a]) - s1 * s1 / w;
    return c > 0.0 ? c : 0.0;
  }
  // First position whose value is >= t (t in original coordinates).
  size_t LowerBound(double t) const {
    const float* b = s_.xs.data();
    return static_cast<size_t>(
        std::lower_bound(b, b + n_, t, [](float v, double tt) { return double(v) < tt; }) - b);
  }
  // First position whose prefix weight exceeds w.
  size_t WeightPosition(double w) const {
    const double* b = s_.p0.data();
    const size_t i = static_cast<size_t>(std::upper_bound(b, b + n_ + 1, w) - b);
    return i == 0 ? 0 : std::min(i - 1, n_ - 1);
  }

 private:
  GroupScratch& s_;
  size_t n_;
  double shift_ = 0.0;
};

// Exact optimal k-segmentation of the sorted values with boundaries restricted
// to s.cand (which starts with 0 and ends with n). Writes k ascending centers
// (shifted coordinates). Requires cand.size() - 1 >= k.
inline void OptimalInit(GroupScratch& s, const SortedGroup& g, size_t k, double* centers) {
  const std::vector<size_t>& cand = s.cand;
  const size_t U = cand.size() - 1;  // units
  s.dp_prev.assign(U + 1, std::numeric_limits<double>::infinity());
  s.dp_cur.assign(U + 1, std::numeric_limits<double>::infinity());
  s.opt.assign(k * (U + 1), 0);
  for (size_t i = 1; i <= U; ++i) s.dp_prev[i] = g.Cost(0, cand[i]);
  // Layer j (j + 1 clusters): dp_cur[i] = min_{l in [j, i-1]} dp_prev[l] +
  // Cost(cand[l], cand[i]). The argmin is monotone in i (1-D k-means cost
  // satisfies the quadrangle inequality), so divide and conquer applies.
  struct Frame {
    size_t lo, hi, optlo, opthi;
  };
  std::vector<Frame> stack;
  for (size_t j = 1; j < k; ++j) {
    std::fill(s.dp_cur.begin(), s.dp_cur.end(), std::numeric_limits<double>::infinity());
    uint32_t* opt = s.opt.data() + j * (U + 1);
    // j + 1 clusters need >= j + 1 units, and the remaining k - 1 - j
    // clusters need one unit each after i (so the last layer only has i = U).
    // The argmin l then lies in [j, ihi - 1], all computed in the last layer.
    const size_t ilo = (j + 1 == k) ? U : j + 1;
    const size_t ihi = U - (k - 1 - j);
    stack.clear();
    stack.push_back({ilo, ihi, j, ihi - 1});
    while (!stack.empty()) {
      const Frame f = stack.back();
      stack.pop_back();
      if (f.lo > f.hi) continue;
      const size_t mid = f.lo + (f.hi - f.lo) / 2;
      double best = std::numeric_limits<double>::infinity();
      size_t best_l = f.optlo;
      const size_t lmax = std::min(f.opthi, mid - 1);
      for (size_t l = f.optlo; l <= lmax; ++l) {
        const double v = s.dp_prev[l] + g.Cost(cand[l], cand[mid]);
        if (v < best) {
          best = v;
          best_l = l;
        }
      }
      s.dp_cur[mid] = best;
      opt[mid] = static_cast<uint32_t>(best_l);
      if (mid > f.lo) stack.push_back({f.lo, mid - 1, f.optlo, best_l});
      if (mid < f.hi) stack.push_back({mid + 1, f.hi, best_l, f.opthi});
    }
    std::swap(s.dp_prev, s.dp_cur);
  }
  // Backtrack the boundaries from the last layer.
  size_t end = U;
  for (size_t j = k; j-- > 0;) {
    const size_t begin = j == 0 ? 0 : s.opt[j * (U + 1) + end];
    centers[j] = g.MeanY(cand[begin], cand[end]);
    end = begin;
  }
}

// Builds DP candidate boundaries (run starts, so equal values never split).
// Up to L = clamp(max(n / 8, 4k), 64, 1024) candidates: all run starts when
// there are at most L distinct values (the DP is then exact), otherwise L/2
// equal-count plus L/2 equal-width split points. Small groups get fewer
// candidates since Lloyd refines the boundaries anyway; 4096-wide groups
// always get 1024.
inline void BuildCandidates(GroupScratch& s, const SortedGroup& g, size_t distinct, size_t k) {
  const size_t n = g.n();
  const size_t limit = std::min<size_t>(1024, std::max<size_t>(64, std::max(n / 8, 4 * k)));
  s.cand.clear();
  s.cand.push_back(0);
  if (distinct <= limit) {
    for (size_t i = 1; i < n; ++i) {
      if (g.x(i) != g.x(i - 1)) s.cand.push_back(i);
    }
  } else {
    const size_t splits = limit / 2;
    const double lo = g.x(0), hi = g.x(n - 1);
    for (size_t i = 1; i < splits; ++i) {
      s.cand.push_back(g.LowerBound(g.x(i * n / splits)));  // equal count
      s.cand.push_back(g.LowerBound(lo + (hi - lo) * double(i) / double(splits)));  // equal width
    }
    std::sort(s.cand.begin(), s.cand.end());
    s.cand.erase(std::unique(s.cand.begin(), s.cand.end()), s.cand.end());
    if (s.cand.size() > 1 && s.cand[1] == 0) s.cand.erase(s.cand.begin());
  }
  if (s.cand.back() != n) s.cand.push_back(n);
}

inline void QuantileInit(const SortedGroup& g, size_t k, double* centers) {
  const double total = g.W(0, g.n());
  for (size_t i = 0; i < k; ++i) {
    const size_t pos = g.WeightPosition(total * (double(i) + 0.5) / double(k));
    centers[i] = double(g.x(pos)) - g.shift();
  }
}

// Companded quantiles: for large k, MSE-optimal center density is
// proportional to p(x)^(1/3) (Panter-Dite), so centers go at the (i + 1/2) / k
// quantiles of a 4096-bin histogram of the weight density raised to 1/3.
// Unlike plain quantiles this keeps centers in the tails of heavy-tailed data.
inline void CompandedInit(GroupScratch& s, const SortedGroup& g, size_t k, double* centers) {
  constexpr size_t kBins = 4096;
  const size_t n = g.n();
  const double lo = g.x(0), hi = g.x(n - 1);
  const double width = (hi - lo) / kBins;
  s.d2.assign(kBins + 1, 0.0);  // cumulative companded mass at bin edges
  size_t prev = 0;
  for (size_t b = 0; b < kBins; ++b) {
    const size_t end = b + 1 == kBins ? n : g.LowerBound(lo + width * double(b + 1));
    s.d2[b + 1] = s.d2[b] + std::cbrt(g.W(prev, end));
    prev = end;
  }
  const double total = s.d2[kBins];
  size_t b = 0;
  for (size_t i = 0; i < k; ++i) {
    const double target = total * (double(i) + 0.5) / double(k);
    while (b + 1 < kBins && s.d2[b + 1] < target) ++b;
    const double mass = s.d2[b + 1] - s.d2[b];
    const double frac = mass > 0.0 ? std::min(1.0, std::max(0.0, (target - s.d2[b]) / mass)) : 0.5;
    centers[i] = lo + width * (double(b) + frac) - g.shift();
  }
}

// D^2 sampling in 1-D; distances are weighted by the importance weights.
inline void KMeansPlusPlusInit(GroupScratch& s, const SortedGroup& g, size_t k,
                               uint64_t seed, double* centers) {
  const size_t n = g.n();
  std::mt19937_64 rng(seed);
  auto uniform = [&rng]() { return double(rng() >> 11) * (1.0 / 9007199254740992.0); };
  const double total = g.W(0, n);
  // First center: a value drawn by weight.
  double c = double(g.x(g.WeightPosition(uniform() * total))) - g.shift();
  centers[0] = c;
  s.d2.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const double d = double(g.x(i)) - g.shift() - c;
    s.d2[i] = g.W(i, i + 1) * d * d;
  }
  for (size_t j = 1; j < k; ++j) {
    double sum = 0.0;
    for (size_t i = 0; i < n; ++i) sum += s.d2[i];
    size_t pick = n - 1;
    if (sum > 0.0) {
      double r = uniform() * sum;
      for (size_t i = 0; i < n; ++i) {
        r -= s.d2[i];
        if (r < 0.0) {
          pick = i;
          break;
        }
      }
    }
    c = double(g.x(pick)) - g.shift();
    centers[j] = c;
    for (size_t i = 0; i < n; ++i) {
      const double d = double(g.x(i)) - g.shift() - c;
      s.d2[i] = std::min(s.d2[i], g.W(i, i + 1) * d * d);
    }
  }
  std::sort(centers, centers + k);
}

// Lloyd iterations on sorted data; centers ascending, shifted coordinates.
// Returns the number of iterations run.
inline int Lloyd(GroupScratch& s, const SortedGroup& g, size_t k, int max_iters,
                 double* centers) {
  const size_t n = g.n();
  s.split.assign(k + 1, 0);
  s.new_split.assign(k + 1, 0);
  s.split[k] = n;
  s.new_split[k] = n;
  int it = 0;
  for (; it < max_iters; ++it) {
    for (size_t i = 1; i < k; ++i) {
      s.new_split[i] = g.LowerBound(0.5 * (centers[i - 1] + centers[i]) + g.shift());
    }
    if (it > 0 && s.new_split == s.split) break;  // converged
    std::swap(s.split, s.new_split);
    for (size_t i = 0; i < k; ++i) {
      if (g.W(s.split[i], s.split[i + 1]) > 0.0) {
        centers[i] = g.MeanY(s.split[i], s.split[i + 1]);
      }  // else: empty cluster keeps its center (order is preserved)
    }
  }
  return it;
}

struct GroupResult {
  double sq_error = 0.0, weighted_sq_error = 0.0, sum_sq = 0.0, weighted_sum_sq = 0.0;
  int iters = 0;
  bool degenerate = false;
};

// Finds the sorted codebook (k values, original coordinates, f64) of the
// group of `nrows` rows starting at w (row stride K).
inline void ClusterGroup(GroupScratch& s, const float* w, size_t nrows, size_t K,
                         const float* weights, size_t k, const PalettizeOptions& opt,
                         uint64_t group_seed, double* centers, GroupResult* res) {
  const size_t n = nrows * K;
  s.keys.resize(n);
  s.tmp.resize(n);
  for (size_t r = 0; r < nrows; ++r) {
    const float* row = w + r * K;
    uint64_t* out = s.keys.data() + r * K;
    for (size_t c = 0; c < K; ++c) {
      const float x = row[c] == 0.0f ? 0.0f : row[c];  // -0 -> +0
      out[c] = (uint64_t{FloatKey(x)} << 32) | c;
    }
  }
  const uint64_t* sorted = RadixSortUpper32(s.keys.data(), s.tmp.data(), n);
  s.xs.resize(n);
  size_t distinct = 1;
  for (size_t i = 0; i < n; ++i) {
    s.xs[i] = KeyFloat(static_cast<uint32_t>(sorted[i] >> 32));
    if (i > 0 && s.xs[i] != s.xs[i - 1]) ++distinct;
  }
  if (distinct <= k) {
    // Exact: every distinct value gets its own entry.
    size_t j = 0;
    centers[j++] = s.xs[0];
    for (size_t i = 1; i < n; ++i) {
      if (s.xs[i] != s.xs[i - 1]) centers[j++] = s.xs[i];
    }
    for (; j < k; ++j) centers[j] = centers[j - 1];
    res->degenerate = true;
    return;
  }

  SortedGroup g(s, n);
  const double shift = s.xs[n / 2];
  g.set_shift(shift);
  s.p0.resize(n + 1);
  s.p1.resize(n + 1);
  s.p2.resize(n + 1);
  double a0 = 0.0, a1 = 0.0, a2 = 0.0;
  s.p0[0] = s.p1[0] = s.p2[0] = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double wt = weights ? double(weights[sorted[i] & 0xFFFFFFFFu]) : 1.0;
    const double y = double(s.xs[i]) - shift;
    a0 += wt;
    a1 += wt * y;
    a2 += wt * y * y;
    s.p0[i + 1] = a0;
    s.p1[i + 1] = a1;
    s.p2[i + 1] = a2;
  }

  PalettizeInit init = opt.init;
  if (init == PalettizeInit::kOptimal) {
    BuildCandidates(s, g, distinct, k);
    if (s.cand.size() - 1 < k) init = PalettizeInit::kCompanded;
  }
  switch (init) {
    case PalettizeInit::kOptimal:
      OptimalInit(s, g, k, centers);
      break;
    case PalettizeInit::kKMeansPlusPlus:
      KMeansPlusPlusInit(s, g, k, group_seed, centers);
      break;
    case PalettizeInit::kCompanded:
      CompandedInit(s, g, k, centers);
      break;
    case PalettizeInit::kQuantile:
    default:
      QuantileInit(g, k, centers);
      break;
  }
  res->iters = Lloyd(s, g, k, opt.max_iters, centers);
  // Empty clusters (possible after kQuantile / kKMeansPlusPlus inits with
  // ties, rarely otherwise) waste an entry: move each one to split the
  // cluster with the largest error at its mean, then run Lloyd again.
  for (size_t rep = 0; rep < k && opt.max_iters > 0; ++rep) {
    size_t empty = k, worst = k;
    double worst_cost = 0.0;
    for (size_t i = 0; i < k; ++i) {
      const size_t a = s.split[i], b = s.split[i + 1];
      if (g.W(a, b) <= 0.0) {
        if (empty == k) empty = i;
      } else if (g.Cost(a, b) > worst_cost) {
        worst_cost = g.Cost(a, b);
        worst = i;
      }
    }
    if (empty == k || worst == k) break;
    const size_t a = s.split[worst], b = s.split[worst + 1];
    const size_t m = g.LowerBound(g.MeanY(a, b) + shift);
    if (m <= a || m >= b) break;
    centers[empty] = g.MeanY(a, m);
    centers[worst] = g.MeanY(m, b);
    std::sort(centers, centers + k);
    res->iters += Lloyd(s, g, k, opt.max_iters, centers);
  }
  for (size_t i = 0; i < k; ++i) centers[i] += shift;
}

// Index of the nearest of the k ascending entries, given mids[i] = midpoint of
// entries i and i+1 (i < k - 1) and mids[k - 1] = +inf. Branch-free binary
// search: b steps for k = 2^b.
inline uint32_t Nearest(const double* mids, size_t k, double x) {
  size_t idx = 0;
  for (size_t step = k >> 1; step > 0; step >>= 1) {
    idx += (x >= mids[idx + step - 1]) ? step : 0;
  }
  return static_cast<uint32_t>(idx);
}

}  // namespace palettize_detail

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
  using namespace palettize_detail;
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
      ClusterGroup(s, w + r0 * cols, nrows, cols, weights, k, opt, group_seed,
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

#endif  // LUTRA_PALETTIZE_H_
