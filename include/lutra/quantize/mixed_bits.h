// Mixed-precision allocation: choose each tensor's index width b and rows
// per codebook G so that the model's average bits per weight (codebooks and
// padding included) meets a target while the total (importance-weighted)
// squared error is minimal. Each (b, G) pair is one candidate: a smaller G
// buys a better fit with codebook bytes, and the solver weighs those bytes
// against index bits like any others.
//
// Two steps, usable separately:
//  1. EstimateTensorErrors: palettize each tensor at every allowed (b, G) and
//     record its squared error and exact storage bytes. Big tensors are
//     estimated from a sample of whole row blocks (evenly spaced; a block is
//     lcm of the allowed G, so it holds whole groups of every G), scaled to
//     the full row count; bytes are always exact for the full tensor.
//     The error is MixedBitsTensor::importance x the column-weighted squared
//     error: with calibration (calibration.h) the column weights are E[x_k^2]
//     of the tensor's input, which makes the error E||(W - W_hat) x||^2, and
//     `importance` is the tensor's measured sensitivity (how much model
//     output KL one unit of that error causes; sensitivity.h).
//  2. SolveBitAllocation: a multiple-choice knapsack over the byte budget
//     floor(target * total_weights / 8), solved two ways, keeping the better:
//     (a) greedy by best error reduction per extra byte among the upgrades
//     that still fit (this follows the lower convex hull of each tensor's
//     error-vs-bytes curve, i.e. a Lagrangian sweep); (b) dynamic programming
//     over the budget in <= 65536 units (item sizes rounded up, so it never
//     exceeds the budget). Both are then polished by a local search over
//     single changes and pairwise swaps (one tensor up, another down) that
//     lower the error within the exact budget, which also spends budget left
//     over by rounding, so the average lands just below the target whenever
//     the tensors are fine-grained enough.
// AllocateBits runs both.
//
// Plain header (scalar C++).
#ifndef LUTRA_MIXED_BITS_H_
#define LUTRA_MIXED_BITS_H_

#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "lutra/base/status.h"
#include "lutra/format/palette.h"
#include "lutra/quantize/palettize.h"

namespace lutra {

// One weight tensor to allocate bits for (row-major rows x cols f32; not
// copied, must stay valid during the call).
struct MixedBitsTensor {
  std::string name;
  const float* data = nullptr;
  size_t rows = 0;
  size_t cols = 0;
  // Optional K per-column importance (e.g. mean squared activations); the
  // tensor's error is then sum_c importance[c] * (w - w')^2.
  const float* column_importance = nullptr;
  // Scale of this tensor's error in the objective (e.g. layer sensitivity).
  double importance = 1.0;
  // Widths allowed for this tensor; empty = MixedBitsOptions::allowed_bits.
  // E.g. {8} pins an embedding at 8 bits while the rest is allocated.
  std::vector<int> allowed_bits;
};

struct MixedBitsOptions {
  double target_bits = 3.5;               // average bits per weight, codebooks included
  std::vector<int> allowed_bits = {2, 4};  // subset of {1, 2, 3, 4, 6, 8}
  size_t group_rows = 16;                 // G, when allowed_groups is empty
  // Rows per codebook to choose from per tensor (each >= 1); empty: only
  // group_rows.
  std::vector<size_t> allowed_groups;
  ElementType codebook = ElementType::kF16;
  int max_iters = 30;                     // Lloyd iterations (PalettizeOptions)
  PalettizeInit init = PalettizeInit::kOptimal;
  size_t threads = 1;                     // palettizer threads
  // Tensors with more rows are estimated from about this many rows (whole
  // groups, evenly spaced); 0 = always use all rows.
  size_t sample_rows = 512;
  // Called after each tensor is estimated with (tensors done, total).
  std::function<void(size_t done, size_t total)> progress;
};

// Error and size of one tensor at each candidate width (input of the solver).
struct TensorCandidates {
  std::string name;
  size_t num_weights = 0;      // rows * cols
  std::vector<int> bits;       // candidate widths
  std::vector<size_t> group_rows;  // candidate G (parallel to bits; empty: unknown)
  std::vector<size_t> bytes;   // exact stored bytes at bits[i] (indices + codebooks)
  std::vector<double> error;   // objective error at bits[i] (>= 0)
  double sum_sq = 0.0;         // (weighted) sum of squared weights, for SNR reporting
};

// The solver's choice for one tensor.
struct TensorBits {
  std::string name;
  int bits = 0;
  size_t group_rows = 0;       // chosen G (0 when the candidates did not say)
  double error = 0.0;          // objective error at the chosen width
  size_t bytes = 0;            // stored bytes at the chosen width
  size_t num_weights = 0;
  double bits_per_weight = 0.0;  // 8 * bytes / num_weights
  double snr_db = 0.0;         // 10 log10(sum_sq / error), 300 when exact
  TensorCandidates candidates;  // everything that was considered
};

struct MixedBitsPlan {
  std::vector<TensorBits> tensors;  // same order as the input
  double target_bits = 0.0;
  double achieved_bits = 0.0;       // 8 * total_bytes / total_weights
  size_t total_bytes = 0;
  size_t budget_bytes = 0;          // floor(target_bits * total_weights / 8)
  size_t total_weights = 0;
  double total_error = 0.0;

  // One line per tensor plus a total line, for logs and reports.
  std::string ToString() const {
    std::string out;
    char line[512];
    for (const TensorBits& t : tensors) {
      std::snprintf(line, sizeof(line),
                    "%-24s %d bits  G %-3zu %8.4f bpw  %12zu B  err %.4e  SNR %6.2f dB\n",
                    t.name.c_str(), t.bits, t.group_rows, t.bits_per_weight, t.bytes, t.error,
                    t.snr_db);
      out += line;
    }
    std::snprintf(line, sizeof(line),
                  "total: %zu weights, %zu B (budget %zu B), %.4f bits/weight (target %.4f), "
                  "error %.4e\n",
                  total_weights, total_bytes, budget_bytes, achieved_bits, target_bits,
                  total_error);
    out += line;
    return out;
  }
};

namespace mixed_bits_detail {

// True, with the value in *repeat, if `values` lists a value twice.
template <class T>
bool FindRepeat(const std::vector<T>& values, T* repeat) {
  for (size_t i = 0; i < values.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (values[j] == values[i]) {
        *repeat = values[i];
        return true;
      }
    }
  }
  return false;
}

inline Status ValidateAllowedBits(const std::vector<int>& allowed) {
  if (allowed.empty()) return InvalidArgument("mixed bits: allowed_bits is empty");
  for (int b : allowed) {
    if (!IsValidPaletteBits(b)) {
      return InvalidArgument("mixed bits: allowed_bits contains %d, need values in {1,2,3,4,6,8}",
                             b);
    }
  }
  int repeat = 0;
  if (FindRepeat(allowed, &repeat)) {
    return InvalidArgument("mixed bits: allowed_bits lists %d twice", repeat);
  }
  return Status::Ok();
}

inline Status ValidateGroups(const std::vector<size_t>& groups) {
  for (size_t g : groups) {
    if (g == 0 || g > (size_t{1} << 20)) {
      return InvalidArgument("mixed bits: rows per codebook G = %zu, need 1 <= G <= 2^20", g);
    }
  }
  size_t repeat = 0;
  if (FindRepeat(groups, &repeat)) {
    return InvalidArgument("mixed bits: allowed_groups lists %zu twice", repeat);
  }
  return Status::Ok();
}

// Row block for sampling: lcm of the groups, so that a block holds whole
// groups of each (capped: beyond 4096 rows sampling saves nothing).
inline size_t SampleBlock(const std::vector<size_t>& groups) {
  size_t l = 1;
  for (size_t g : groups) {
    size_t a = l, b = g;
    while (b != 0) {
      const size_t t = a % b;
      a = b;
      b = t;
    }
    l = l / a * g;
    if (l > 4096) return 0;
  }
  return l;
}

inline double Snr(double sum_sq, double err) {
  if (err <= 0.0) return 300.0;
  return 10.0 * std::log10(sum_sq / err);
}


// Total error and bytes of an assignment.
inline double Cost(const std::vector<TensorCandidates>& cands, const std::vector<size_t>& choice,
                   size_t* bytes) {
  double err = 0.0;
  size_t b = 0;
  for (size_t t = 0; t < cands.size(); ++t) {
    err += cands[t].error[choice[t]];
    b += cands[t].bytes[choice[t]];
  }
  *bytes = b;
  return err;
}

// Greedy from the current (feasible) choice: repeatedly applies the upgrade
// with the best error reduction per extra byte among those that still fit.
inline void Greedy(const std::vector<TensorCandidates>& cands, size_t budget,
                   std::vector<size_t>* choice_ptr) {
  std::vector<size_t>& choice = *choice_ptr;
  const size_t T = cands.size();
  size_t used;
  Cost(cands, choice, &used);
  for (;;) {
    double best_slope = 0.0;
    size_t bt = T, bo = 0;
    for (size_t t = 0; t < T; ++t) {
      const TensorCandidates& c = cands[t];
      const size_t cur = choice[t];
      for (size_t o = 0; o < c.bits.size(); ++o) {
        if (c.bytes[o] <= c.bytes[cur] || c.error[o] >= c.error[cur]) continue;
        const size_t extra = c.bytes[o] - c.bytes[cur];
        if (used + extra > budget) continue;
        const double slope = (c.error[cur] - c.error[o]) / double(extra);
        if (slope > best_slope) {
          best_slope = slope;
          bt = t;
          bo = o;
        }
      }
    }
    if (bt == T) break;
    used = used - cands[bt].bytes[choice[bt]] + cands[bt].bytes[bo];
    choice[bt] = bo;
  }
}

// Local search: single changes and pairwise swaps (one tensor changes, a
// partner changes to pay for it) that lower the error within the budget. Each
// accepted move strictly lowers the error, so this terminates; the round cap
// bounds the time on pathological inputs. O(T^2 * options^2) per round.
inline void LocalSearch(const std::vector<TensorCandidates>& cands, size_t budget,
                        std::vector<size_t>* choice_ptr) {
  std::vector<size_t>& choice = *choice_ptr;
  const size_t T = cands.size();
  size_t used;
  Cost(cands, choice, &used);
  for (int round = 0; round < 64; ++round) {
    bool improved = false;
    for (size_t i = 0; i < T; ++i) {
      const TensorCandidates& ci = cands[i];
      for (size_t oi = 0; oi < ci.bits.size(); ++oi) {
        if (oi == choice[i]) continue;
        const double di = ci.error[oi] - ci.error[choice[i]];  // error change
        if (!(di < 0.0)) continue;  // i's change must lower the error
        const size_t used_i = used - ci.bytes[choice[i]] + ci.bytes[oi];
        if (used_i <= budget) {
          choice[i] = oi;
          used = used_i;
          improved = true;
          continue;
        }
        // The partner j whose change fits the budget at the largest net gain.
        double best_gain = 0.0;
        size_t bj = T, boj = 0;
        for (size_t j = 0; j < T; ++j) {
          if (j == i) continue;
          const TensorCandidates& cj = cands[j];
          for (size_t oj = 0; oj < cj.bits.size(); ++oj) {
            if (oj == choice[j]) continue;
            // used_i includes j's current bytes, so this cannot underflow.
            const size_t nu = used_i - cj.bytes[choice[j]] + cj.bytes[oj];
            if (nu > budget) continue;
            const double gain = -(di + cj.error[oj] - cj.error[choice[j]]);
            if (gain > best_gain) {
              best_gain = gain;
              bj = j;
              boj = oj;
            }
          }
        }
        if (bj != T) {
          used = used_i - cands[bj].bytes[choice[bj]] + cands[bj].bytes[boj];
          choice[i] = oi;
          choice[bj] = boj;
          improved = true;
        }
      }
    }
    if (!improved) break;
  }
}

// 0/1 multiple-choice knapsack by dynamic programming over the budget in
// units of u = ceil(budget / U) bytes, U <= 65536 (and T * U <= 2^26 bytes of
// back-pointers). Item sizes are rounded UP to units, so the result always
// fits the exact budget; the rounding costs at most T units of budget, which
// LocalSearch can then spend. Returns false if the DP is not applicable.
inline bool KnapsackDP(const std::vector<TensorCandidates>& cands, size_t budget,
                       std::vector<size_t>* choice) {
  const size_t T = cands.size();
  for (const TensorCandidates& c : cands) {
    if (c.bits.size() > 255) return false;
  }
  size_t U = std::min<size_t>(65536, (size_t{1} << 26) / T);
  if (U < 16 || budget == 0) return false;
  U = std::min(U, budget);
  const size_t unit = budget / U + (budget % U != 0 ? 1 : 0);  // ceil, no overflow
  U = budget / unit;
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> prev(U + 1, 0.0), cur(U + 1);  // min error with cost <= u
  std::vector<uint8_t> back(T * (U + 1));
  for (size_t t = 0; t < T; ++t) {
    const TensorCandidates& c = cands[t];
    std::fill(cur.begin(), cur.end(), inf);
    uint8_t* bk = back.data() + t * (U + 1);
    for (size_t o = 0; o < c.bits.size(); ++o) {
      const size_t w = (c.bytes[o] + unit - 1) / unit;
      if (w > U) continue;
      const double e = c.error[o];
      for (size_t u = w; u <= U; ++u) {
        const double v = prev[u - w] + e;
        if (v < cur[u]) {
          cur[u] = v;
          bk[u] = static_cast<uint8_t>(o);
        }
      }
    }
    std::swap(prev, cur);
  }
  if (!(prev[U] < inf)) return false;
  choice->assign(T, 0);
  size_t u = U;
  for (size_t t = T; t-- > 0;) {
    const size_t o = back[t * (U + 1) + u];
    (*choice)[t] = o;
    u -= (cands[t].bytes[o] + unit - 1) / unit;
  }
  return true;
}

}  // namespace mixed_bits_detail

// Step 1: per-tensor error at every allowed width (see the top of the file).
inline StatusOr<std::vector<TensorCandidates>> EstimateTensorErrors(
    const std::vector<MixedBitsTensor>& tensors, const MixedBitsOptions& opt) {
  LUTRA_RETURN_IF_ERROR(mixed_bits_detail::ValidateAllowedBits(opt.allowed_bits));
  if (tensors.empty()) return InvalidArgument("mixed bits: no tensors");
  const std::vector<size_t> groups =
      opt.allowed_groups.empty() ? std::vector<size_t>{opt.group_rows} : opt.allowed_groups;
  LUTRA_RETURN_IF_ERROR(mixed_bits_detail::ValidateGroups(groups));
  const size_t G = mixed_bits_detail::SampleBlock(groups);  // 0: never sample
  std::vector<TensorCandidates> out(tensors.size());
  std::vector<float> sample;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const MixedBitsTensor& ten = tensors[t];
    if (!(ten.importance >= 0.0) || !std::isfinite(ten.importance)) {
      return InvalidArgument("mixed bits: tensor '%s' importance = %g, need finite >= 0",
                             ten.name.c_str(), ten.importance);
    }
    // Rows to palettize: all, or whole blocks evenly spaced over the tensor.
    const float* data = ten.data;
    size_t rows = ten.rows;
    const size_t full_groups = G ? ten.rows / G : 0;
    if (opt.sample_rows != 0 && ten.data != nullptr && ten.rows > opt.sample_rows &&
        full_groups > 0 && ten.cols > 0) {
      const size_t want = std::min(full_groups, std::max<size_t>(1, (opt.sample_rows + G - 1) / G));
      if (want < full_groups) {
        sample.resize(want * G * ten.cols);
        for (size_t i = 0; i < want; ++i) {
          const size_t g = i * full_groups / want;  // evenly spaced, deterministic
          std::copy(ten.data + g * G * ten.cols, ten.data + (g + 1) * G * ten.cols,
                    sample.begin() + i * G * ten.cols);
        }
        data = sample.data();
        rows = want * G;
      }
    }
    const double scale = ten.rows ? double(ten.rows) / double(std::max<size_t>(rows, 1)) : 1.0;
    const std::vector<int>& allowed =
        ten.allowed_bits.empty() ? opt.allowed_bits : ten.allowed_bits;
    if (!ten.allowed_bits.empty()) {
      LUTRA_RETURN_IF_ERROR(mixed_bits_detail::ValidateAllowedBits(ten.allowed_bits)
                                .WithContext("tensor '" + ten.name + "'"));
    }
    TensorCandidates& tc = out[t];
    tc.name = ten.name;
    tc.num_weights = ten.rows * ten.cols;
    const size_t max_group = *std::max_element(groups.begin(), groups.end());
    for (size_t o = 0; o < allowed.size() * groups.size(); ++o) {
      const int b = allowed[o / groups.size()];
      // 8-bit candidates only at the largest G: the optimal init costs
      // ~5 ms per 8-bit group (most of the estimate's time on big models),
      // and 256-entry codebooks for a few rows cost more bits than they buy
      // (G = 1 at K = 3072: 1.3 bits per weight).
      if (b == 8 && groups[o % groups.size()] != max_group) continue;
      PalettizeOptions po;
      po.bits = b;
      po.group_rows = groups[o % groups.size()];
      po.codebook = opt.codebook;
      po.max_iters = opt.max_iters;
      po.init = opt.init;
      po.threads = opt.threads;
      po.column_importance = ten.column_importance;
      PalettizeStats st;
      StatusOr<PaletteMatrix> m = Palettize(data, rows, ten.cols, po, &st);
      if (!m.ok()) {
        return m.status().WithContext("mixed bits: tensor '" + ten.name + "'");
      }
      PaletteShape full = m->shape();
      full.rows = ten.rows;
      tc.bits.push_back(b);
      tc.group_rows.push_back(po.group_rows);
      tc.bytes.push_back(full.total_bytes());
      tc.error.push_back(ten.importance * st.weighted_sq_error * scale);
      tc.sum_sq = ten.importance * st.weighted_sum_sq * scale;
    }
    if (opt.progress) opt.progress(t + 1, tensors.size());
  }
  return out;
}

// Step 2: picks one candidate per tensor minimizing the summed error subject
// to total bytes <= floor(target_bits * total_weights / 8). Fails if even the
// smallest choice for every tensor exceeds the budget.
inline StatusOr<MixedBitsPlan> SolveBitAllocation(const std::vector<TensorCandidates>& cands,
                                                  double target_bits) {
  using mixed_bits_detail::Snr;
  if (cands.empty()) return InvalidArgument("mixed bits: no tensors");
  if (!std::isfinite(target_bits) || !(target_bits > 0.0)) {
    return InvalidArgument("mixed bits: target_bits = %g, need a finite value > 0", target_bits);
  }
  size_t total_weights = 0, min_bytes = 0;
  const size_t T = cands.size();
  std::vector<size_t> choice(T);
  for (size_t t = 0; t < T; ++t) {
    const TensorCandidates& c = cands[t];
    const size_t n = c.bits.size();
    if (n == 0 || c.bytes.size() != n || c.error.size() != n ||
        (!c.group_rows.empty() && c.group_rows.size() != n)) {
      return InvalidArgument("mixed bits: tensor '%s' has %zu widths, %zu sizes, %zu errors",
                             c.name.c_str(), n, c.bytes.size(), c.error.size());
    }
    if (c.num_weights == 0) {
      return InvalidArgument("mixed bits: tensor '%s' has no weights", c.name.c_str());
    }
    for (size_t o = 0; o < n; ++o) {
      if (!std::isfinite(c.error[o]) || c.error[o] < 0.0) {
        return InvalidArgument("mixed bits: tensor '%s' error at %d bits is %g", c.name.c_str(),
                               c.bits[o], c.error[o]);
      }
    }
    // Start from the smallest option (least error among equally small ones).
    size_t best = 0;
    for (size_t o = 1; o < n; ++o) {
      if (c.bytes[o] < c.bytes[best] ||
          (c.bytes[o] == c.bytes[best] && c.error[o] < c.error[best])) {
        best = o;
      }
    }
    choice[t] = best;
    total_weights += c.num_weights;
    min_bytes += c.bytes[best];
  }
  const double budget_d = std::floor(target_bits * double(total_weights) / 8.0);
  const size_t budget = budget_d >= 1.8e19 ? SIZE_MAX : static_cast<size_t>(budget_d);
  if (min_bytes > budget) {
    return InvalidArgument(
        "mixed bits: target %.4f bits/weight is below the minimum %.4f reachable with the "
        "allowed widths",
        target_bits, 8.0 * double(min_bytes) / double(total_weights));
  }
  using mixed_bits_detail::Cost;
  using mixed_bits_detail::Greedy;
  using mixed_bits_detail::KnapsackDP;
  using mixed_bits_detail::LocalSearch;
  // Candidate A: greedy + local search.
  Greedy(cands, budget, &choice);
  LocalSearch(cands, budget, &choice);
  // Candidate B: discretized exact DP + local search (uses exact bytes, so it
  // can also spend what the rounding of the DP left over). Keep the better.
  std::vector<size_t> dp_choice;
  if (KnapsackDP(cands, budget, &dp_choice)) {
    LocalSearch(cands, budget, &dp_choice);
    size_t bytes_a, bytes_b;
    const double err_a = Cost(cands, choice, &bytes_a);
    const double err_b = Cost(cands, dp_choice, &bytes_b);
    if (bytes_b <= budget && (err_b < err_a || (err_b == err_a && bytes_b < bytes_a))) {
      choice = dp_choice;
    }
  }

  MixedBitsPlan plan;
  plan.target_bits = target_bits;
  plan.budget_bytes = budget;
  plan.total_weights = total_weights;
  for (size_t t = 0; t < T; ++t) {
    const TensorCandidates& c = cands[t];
    TensorBits tb;
    tb.name = c.name;
    tb.bits = c.bits[choice[t]];
    tb.group_rows = c.group_rows.size() == c.bits.size() ? c.group_rows[choice[t]] : 0;
    tb.error = c.error[choice[t]];
    tb.bytes = c.bytes[choice[t]];
    tb.num_weights = c.num_weights;
    tb.bits_per_weight = 8.0 * double(tb.bytes) / double(c.num_weights);
    tb.snr_db = Snr(c.sum_sq, tb.error);
    tb.candidates = c;
    plan.total_bytes += tb.bytes;
    plan.total_error += tb.error;
    plan.tensors.push_back(std::move(tb));
  }
  plan.achieved_bits = 8.0 * double(plan.total_bytes) / double(total_weights);
  return plan;
}

// Both steps: estimates every tensor's error at each allowed width, then
// solves the allocation for options.target_bits.
inline StatusOr<MixedBitsPlan> AllocateBits(const std::vector<MixedBitsTensor>& tensors,
                                            const MixedBitsOptions& opt) {
  StatusOr<std::vector<TensorCandidates>> cands = EstimateTensorErrors(tensors, opt);
  if (!cands.ok()) return cands.status();
  return SolveBitAllocation(cands.value(), opt.target_bits);
}

}  // namespace lutra

#endif  // LUTRA_MIXED_BITS_H_
