// Next-token sampling from logits: repetition penalty, greedy (argmax),
// temperature, top-k, top-p (nucleus) and min-p, with a seeded RNG.
//
// Plain scalar C++ on purpose: sampling touches the logits once per token
// (a few microseconds against milliseconds of matrix work), and scalar code
// gives the same token sequence for a given seed on every SIMD target, which
// makes generations reproducible across devices and testable.
#ifndef LUTRA_SAMPLING_H_
#define LUTRA_SAMPLING_H_

#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "lutra/base/status.h"

namespace lutra {

// xorshift64* seeded through SplitMix64 (so seeds 0, 1, 2... give unrelated
// streams). Not cryptographic; period 2^64 - 1; identical on every platform.
class SamplerRng {
 public:
  explicit SamplerRng(uint64_t seed = 0) {
    uint64_t z = seed + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    state_ = z ^ (z >> 31);
    if (state_ == 0) state_ = 0x2545F4914F6CDD1Dull;  // xorshift needs != 0
  }
  uint64_t NextU64() {
    state_ ^= state_ >> 12;
    state_ ^= state_ << 25;
    state_ ^= state_ >> 27;
    return state_ * 0x2545F4914F6CDD1Dull;
  }
  // Uniform in [0, 1) with 53 random bits.
  double NextDouble() { return double(NextU64() >> 11) * (1.0 / 9007199254740992.0); }

 private:
  uint64_t state_;
};

// Index of the largest of logits[0, n); the lowest index among equal maxima;
// NaNs are never chosen (unless all are NaN: 0). Returns 0 for n = 0.
inline size_t ArgMax(const float* logits, size_t n) {
  size_t best = 0;
  float best_v = -HUGE_VALF;
  bool found = false;
  for (size_t i = 0; i < n; ++i) {
    if (logits[i] > best_v || (!found && logits[i] == best_v)) {
      best = i;
      best_v = logits[i];
      found = true;
    }
  }
  return best;
}

struct SamplingConfig {
  // 0: greedy argmax (top_k, top_p and the RNG are unused). Otherwise the
  // logits are divided by it: < 1 sharpens, > 1 flattens.
  float temperature = 1.0f;
  // Keep only the k most probable tokens; 0 (or >= vocab) keeps all.
  size_t top_k = 0;
  // Keep the smallest set of most probable tokens whose probability sums to
  // >= top_p (after top_k); 1 keeps all. In (0, 1].
  float top_p = 1.0f;
  uint64_t seed = 0;
  // Keep only tokens whose probability is >= min_p times the most probable
  // one's, measured before the temperature (llama.cpp's min-p, which runs
  // after top-k and top-p); 0 keeps all. In [0, 1].
  float min_p = 0.0f;
  // llama.cpp's repetition penalty: each distinct token among the last
  // repeat_last_n accepted ones (Accept) has its logit divided by
  // repeat_penalty when positive and multiplied by it otherwise, before
  // anything else, greedy included. 1 (or repeat_last_n 0) turns it off.
  float repeat_penalty = 1.0f;
  size_t repeat_last_n = 64;

  Status Validate() const {
    if (!(temperature >= 0.0f) || !std::isfinite(temperature)) {
      return InvalidArgument("SamplingConfig: temperature = %g, need a finite value >= 0",
                             double(temperature));
    }
    if (!(top_p > 0.0f && top_p <= 1.0f)) {
      return InvalidArgument("SamplingConfig: top_p = %g, need 0 < top_p <= 1",
                             double(top_p));
    }
    if (!(min_p >= 0.0f && min_p <= 1.0f)) {
      return InvalidArgument("SamplingConfig: min_p = %g, need 0 <= min_p <= 1", double(min_p));
    }
    if (!(repeat_penalty > 0.0f) || !std::isfinite(repeat_penalty)) {
      return InvalidArgument("SamplingConfig: repeat_penalty = %g, need a finite value > 0",
                             double(repeat_penalty));
    }
    return Status();
  }
};

// Draws token ids from logits according to a SamplingConfig. Holds the
// scratch buffers (no allocation per token) and the RNG state, so one
// Sampler per generation stream; not thread-safe.
class Sampler {
 public:
  Sampler() = default;

  static StatusOr<Sampler> Create(size_t vocab_size, const SamplingConfig& config) {
    LUTRA_RETURN_IF_ERROR(config.Validate());
    if (vocab_size == 0 || vocab_size > (size_t{1} << 32)) {
      return InvalidArgument("Sampler: vocab_size = %zu, need 1 .. 2^32", vocab_size);
    }
    Sampler s;
    s.vocab_ = vocab_size;
    s.config_ = config;
    s.rng_ = SamplerRng(config.seed);
    s.weights_.resize(vocab_size);
    s.order_.resize(vocab_size);
    if (s.Penalizes()) {
      s.penalized_.resize(vocab_size);
      s.seen_.resize(vocab_size);
    }
    return s;
  }

  const SamplingConfig& config() const { return config_; }
  size_t vocab_size() const { return vocab_; }

  // Records a token of the text (prompt or generated) for the repetition
  // penalty; only the last repeat_last_n are kept. Ids outside the
  // vocabulary are ignored. A no-op when the penalty is off.
  void Accept(int token) {
    if (!Penalizes() || token < 0 || size_t(token) >= vocab_) return;
    if (history_.size() < config_.repeat_last_n) {
      history_.push_back(uint32_t(token));
    } else {
      history_[history_next_] = uint32_t(token);
      history_next_ = (history_next_ + 1) % history_.size();
    }
  }

  // Returns a token id in [0, vocab_size). logits: vocab_size floats, not
  // modified. -inf and NaN logits are never drawn (unless all are: argmax).
  size_t Sample(const float* logits) {
    logits = Penalize(logits);
    const size_t n = vocab_;
    const size_t best = ArgMax(logits, n);
    // Greedy; or all logits -inf/NaN; or a +inf logit (certain token).
    if (config_.temperature == 0.0f || !std::isfinite(logits[best])) return best;
    size_t num = 0;
    const double total = Candidates(logits, &num);
    // Inverse CDF over the kept candidates (in their order).
    const double r = rng_.NextDouble() * total;
    double cum = 0.0;
    for (size_t j = 0; j < num; ++j) {
      cum += weights_[order_[j]];
      if (r < cum) return order_[j];
    }
    return order_[num - 1];  // r == total after rounding
  }

  // The distribution Sample draws from: probs[i] for all i < vocab_size
  // (zero outside the top-k / top-p set), summing to 1. For tests and for
  // callers that want the probabilities (e.g. speculative decoding).
  void Probabilities(const float* logits, float* probs) {
    logits = Penalize(logits);
    std::fill(probs, probs + vocab_, 0.0f);
    const size_t best = ArgMax(logits, vocab_);
    if (config_.temperature == 0.0f || !std::isfinite(logits[best])) {
      probs[best] = 1.0f;
      return;
    }
    size_t num = 0;
    const double total = Candidates(logits, &num);
    for (size_t j = 0; j < num; ++j) {
      probs[order_[j]] = float(weights_[order_[j]] / total);
    }
  }

 private:
  bool Penalizes() const { return config_.repeat_penalty != 1.0f && config_.repeat_last_n > 0; }

  // `logits`, or a copy with the repetition penalty applied to each distinct
  // token of the history (once per token however often it occurs, as in
  // llama.cpp).
  const float* Penalize(const float* logits) {
    if (!Penalizes() || history_.empty()) return logits;
    std::copy(logits, logits + vocab_, penalized_.begin());
    const float penalty = config_.repeat_penalty;
    for (uint32_t t : history_) {
      if (seen_[t]) continue;
      seen_[t] = 1;
      float& l = penalized_[t];
      l = l > 0.0f ? l / penalty : l * penalty;
    }
    for (uint32_t t : history_) seen_[t] = 0;
    return penalized_.data();
  }

  // Sets weights_[i] = e^((logit_i - max) / T), selects the candidates into
  // order_[0, *num) and returns their total weight.
  double Candidates(const float* logits, size_t* num) {
    const size_t n = vocab_;
    const float mx = logits[ArgMax(logits, n)];
    const double inv_t = 1.0 / double(config_.temperature);
    double sum = 0.0;
    for (size_t i = 0; i < n; ++i) {
      // Computed in double: f32 exp would differ between libm versions in
      // the last bit; double keeps the draw stable in practice.
      // NaN logits get weight 0 like -inf (never drawn).
      weights_[i] = logits[i] >= -HUGE_VALF
                        ? std::exp((double(logits[i]) - double(mx)) * inv_t)
                        : 0.0;
      sum += weights_[i];
    }
    for (size_t i = 0; i < n; ++i) order_[i] = static_cast<uint32_t>(i);
    size_t k = n;
    // Descending weight, ties by ascending index: a strict total order, so
    // the kept set and its order never depend on the sort's implementation.
    const auto before = [this](uint32_t a, uint32_t b) {
      return weights_[a] > weights_[b] || (weights_[a] == weights_[b] && a < b);
    };
    bool sorted = false;
    if (config_.top_k != 0 && config_.top_k < n) {
      k = config_.top_k;
      std::nth_element(order_.begin(), order_.begin() + (k - 1), order_.end(), before);
      std::sort(order_.begin(), order_.begin() + k, before);
      sorted = true;
      sum = 0.0;
      for (size_t j = 0; j < k; ++j) sum += weights_[order_[j]];
    }
    if (config_.top_p < 1.0f) {
      const double target = double(config_.top_p) * sum;
      if (!sorted) {
        // Tokens whose probability is below (1 - top_p) / (n - 1) cannot be
        // in the nucleus: all of them together have less than 1 - top_p.
        // Dropping them first makes the sort cheap for large vocabularies.
        const double cutoff = n > 1 ? (1.0 - double(config_.top_p)) / double(n - 1) * sum : 0.0;
        size_t m = 0;
        for (size_t i = 0; i < n; ++i) {
          if (weights_[i] >= cutoff) order_[m++] = static_cast<uint32_t>(i);
        }
        k = m;
        std::sort(order_.begin(), order_.begin() + k, before);
      }
      double cum = 0.0;
      size_t keep = k;
      for (size_t j = 0; j < k; ++j) {
        cum += weights_[order_[j]];
        if (cum >= target) {
          keep = j + 1;
          break;
        }
      }
      k = keep;
      sum = 0.0;
      for (size_t j = 0; j < k; ++j) sum += weights_[order_[j]];
    }
    if (config_.min_p > 0.0f) {
      // p_i >= min_p p_max before the temperature is logit_i - max >=
      // log(min_p); the most probable token always passes (log(1) = 0).
      // Compacting keeps the candidates' order.
      const double floor = std::log(double(config_.min_p));
      size_t m = 0;
      sum = 0.0;
      for (size_t j = 0; j < k; ++j) {
        const uint32_t i = order_[j];
        if (double(logits[i]) - double(mx) >= floor) {
          order_[m++] = i;
          sum += weights_[i];
        }
      }
      k = m;
    }
    *num = k;
    return sum;
  }

  size_t vocab_ = 0;
  SamplingConfig config_;
  SamplerRng rng_;
  std::vector<double> weights_;
  std::vector<uint32_t> order_;
  std::vector<float> penalized_;    // vocab_size, when the penalty is on
  std::vector<uint8_t> seen_;       // vocab_size flags, all 0 between calls
  std::vector<uint32_t> history_;   // last repeat_last_n accepted tokens (ring)
  size_t history_next_ = 0;         // oldest entry once history_ is full
};

}  // namespace lutra

#endif  // LUTRA_SAMPLING_H_
