// One-dimensional weighted k-means of one group of weights: the clustering
// step of the palettizer (palettize.h), which calls ClusterGroup once per
// group of G rows and then rounds the centers and assigns indices.
//
// For n values (G * K) and k = 2^b centers:
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
//     - kKMeansPlusPlus: D^2 sampling seeded by the group seed (PalettizeOptions::seed and the group
//       index, so results do not depend on the thread count).
//  4. Lloyd iterations on the sorted data: the boundaries between clusters are
//     the midpoints of adjacent centers, found by binary search, and new
//     centers are run means from the prefix sums, so one iteration costs
//     O(k log n), independent of n. Stops when no boundary moves, or after
//     max_iters. An empty cluster (possible after the quantile or k-means++
//     inits when values tie) is moved to split the cluster with the largest
//     error, and Lloyd runs again, so no entry is wasted.
//
// Deterministic for given inputs, init and seed. Plain scalar C++; scratch
// memory ~48 bytes per value (GroupScratch), reused across groups.
#ifndef LUTRA_QUANTIZE_KMEANS_1D_H_
#define LUTRA_QUANTIZE_KMEANS_1D_H_

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

namespace lutra {

enum class PalettizeInit : uint8_t {
  kOptimal = 0,         // DP-optimal on candidate boundaries (default), see above
  kQuantile = 1,        // weighted quantiles
  kKMeansPlusPlus = 2,  // D^2 sampling, uses PalettizeOptions::seed
  kCompanded = 3,       // quantiles of density^(1/3): faster than kOptimal for b >= 6
};

namespace kmeans_1d {

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
                         const float* weights, size_t k, PalettizeInit init, int max_iters,
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
  res->iters = Lloyd(s, g, k, max_iters, centers);
  // Empty clusters (possible after kQuantile / kKMeansPlusPlus inits with
  // ties, rarely otherwise) waste an entry: move each one to split the
  // cluster with the largest error at its mean, then run Lloyd again.
  for (size_t rep = 0; rep < k && max_iters > 0; ++rep) {
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
    res->iters += Lloyd(s, g, k, max_iters, centers);
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

}  // namespace kmeans_1d

}  // namespace lutra

#endif  // LUTRA_QUANTIZE_KMEANS_1D_H_
