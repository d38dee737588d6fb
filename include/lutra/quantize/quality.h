// How far a quantized model's next-token distributions are from its
// reference's: mean KL(P_reference || P_test), top-1 agreement and both
// perplexities, accumulated position by position over teacher-forced text.
//
// The one definition of the quality figures lutra reports (lutra-generate
// --eval, lora_bench's recovery table, tests). Every sum is in double and in
// position order, so a figure does not depend on how positions were batched.
//
// Plain header: scalar C++, no per-target code.
#ifndef LUTRA_QUANTIZE_QUALITY_H_
#define LUTRA_QUANTIZE_QUALITY_H_

#include <stddef.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace lutra {

// out[i] = log softmax(logits)[i] in double: l_i - (max + log sum exp(l - max)).
inline void LogSoftmaxF64(const float* logits, size_t n, std::vector<double>* out) {
  out->resize(n);
  double max = -HUGE_VAL;
  for (size_t i = 0; i < n; ++i) max = std::max(max, double(logits[i]));
  double sum = 0.0;
  for (size_t i = 0; i < n; ++i) sum += std::exp(double(logits[i]) - max);
  const double log_z = max + std::log(sum);
  for (size_t i = 0; i < n; ++i) (*out)[i] = double(logits[i]) - log_z;
}

// Index of the largest logit (the first of equal ones): the greedy token.
inline size_t ArgmaxLogit(const float* logits, size_t n) {
  return size_t(std::max_element(logits, logits + n) - logits);
}

// Accumulates the gap between two models' next-token distributions.
class DistributionGap {
 public:
  // One position: both models' logits (vocab each) and the token that came
  // next in the text (-1 when unknown; it then counts for KL and top-1 only).
  void Add(const float* reference, const float* test, size_t vocab, int next_token = -1) {
    LogSoftmaxF64(reference, vocab, &log_p_);
    LogSoftmaxF64(test, vocab, &log_q_);
    double kl = 0.0;
    for (size_t v = 0; v < vocab; ++v) kl += std::exp(log_p_[v]) * (log_p_[v] - log_q_[v]);
    kl_sum_ += kl;
    agree_ += ArgmaxLogit(reference, vocab) == ArgmaxLogit(test, vocab);
    ++positions_;
    if (next_token >= 0 && size_t(next_token) < vocab) {
      nll_reference_ -= log_p_[size_t(next_token)];
      nll_test_ -= log_q_[size_t(next_token)];
      ++scored_;
    }
  }
  void Add(const std::vector<float>& reference, const std::vector<float>& test,
           int next_token = -1) {
    Add(reference.data(), test.data(), std::min(reference.size(), test.size()), next_token);
  }

  size_t positions() const { return positions_; }
  // Mean KL(P_reference || P_test) per position, nats.
  double mean_kl() const { return positions_ ? kl_sum_ / double(positions_) : 0.0; }
  // Fraction of positions where both models' greedy token is the same.
  double top1_agreement() const { return positions_ ? double(agree_) / double(positions_) : 0.0; }
  // exp(mean negative log-likelihood of the next tokens) under each model.
  double perplexity_reference() const { return Perplexity(nll_reference_); }
  double perplexity_test() const { return Perplexity(nll_test_); }

 private:
  double Perplexity(double nll) const { return scored_ ? std::exp(nll / double(scored_)) : 0.0; }

  size_t positions_ = 0, agree_ = 0, scored_ = 0;
  double kl_sum_ = 0.0, nll_reference_ = 0.0, nll_test_ = 0.0;
  std::vector<double> log_p_, log_q_;  // scratch, reused across positions
};

}  // namespace lutra

#endif  // LUTRA_QUANTIZE_QUALITY_H_
