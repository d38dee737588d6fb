// Speculative decoding's model-free parts: the prompt-lookup drafter and the
// acceptance rule of speculative sampling (Leviathan et al. 2023, Chen et
// al. 2023). The engine (examples/engine.h, GenerateSpeculative) drafts
// tokens, verifies them with one batched forward pass of the target model
// and calls these to decide which to keep.
//
// Plain scalar C++ like sampling.h: the rule touches one distribution per
// drafted token, and scalar code makes the accepted tokens the same for a
// given seed on every SIMD target.
#ifndef LUTRA_SPECULATIVE_H_
#define LUTRA_SPECULATIVE_H_

#include <stddef.h>

#include <algorithm>
#include <vector>

#include "lutra/runtime/sampling.h"

namespace lutra {

// Prompt lookup: drafts the continuation of the last n-gram of `text` (the
// prompt and the tokens generated so far) from its most recent earlier
// occurrence in `text`, trying n = max_ngram down to 1. Appends up to
// max_draft tokens (those that followed the match) to *draft and returns how
// many; 0 when no n-gram recurs (or max_draft or max_ngram is 0).
// Cost: O(size * max_ngram) per call, negligible next to a forward pass for
// the contexts of on-device models.
inline size_t PromptLookupDraft(const int* text, size_t size, size_t max_ngram,
                                size_t max_draft, std::vector<int>* draft) {
  if (max_draft == 0 || size < 2) return 0;
  for (size_t n = std::min(max_ngram, size - 1); n >= 1; --n) {
    const int* tail = text + size - n;
    // Most recent match first: recent text predicts the next tokens best.
    // A match must end before the tail does, so a token follows it.
    for (size_t i = size - n; i-- > 0;) {
      if (!std::equal(tail, tail + n, text + i)) continue;
      const size_t from = i + n;
      const size_t num = std::min(max_draft, size - from);
      draft->insert(draft->end(), text + from, text + from + num);
      return num;
    }
  }
  return 0;
}

// What the acceptance rule decided for one drafted token.
struct SpeculativeVerdict {
  bool accepted = false;
  size_t token = 0;  // the drafted token when accepted, else the resampled one
};

// Speculative sampling's acceptance rule for a token `drafted` that was drawn
// from the draft distribution q. p: the target's distribution at the same
// position. Both are `n` probabilities summing to 1 (Sampler::Probabilities:
// after temperature, top-k, top-p, min-p, so the processed distributions).
// q == nullptr means a point mass on `drafted` (a deterministic drafter such
// as prompt lookup). Accepts with probability min(1, p[x] / q[x]); otherwise
// returns a token drawn from the residual max(0, p - q), normalized. The
// token returned is then distributed exactly as p, whatever q is.
// `residual`: scratch, resized to n. Deterministic given `rng`'s state.
inline SpeculativeVerdict SpeculativeAccept(const float* p, const float* q, size_t n,
                                            size_t drafted, SamplerRng& rng,
                                            std::vector<double>* residual) {
  SpeculativeVerdict v;
  if (n == 0) return v;
  drafted = std::min(drafted, n - 1);
  const double px = double(p[drafted]);
  const double qx = q != nullptr ? double(q[drafted]) : 1.0;
  // u < p/q with u in [0, 1): always accepted when p >= q; never when p = 0.
  const double u = rng.NextDouble();
  if (px > 0.0 && u * qx < px) {
    v.accepted = true;
    v.token = drafted;
    return v;
  }
  residual->resize(n);
  double total = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double qi = q != nullptr ? double(q[i]) : (i == drafted ? 1.0 : 0.0);
    const double r = std::max(0.0, double(p[i]) - qi);
    (*residual)[i] = r;
    total += r;
  }
  // total = 0 only when p <= q everywhere, i.e. p == q up to rounding, where
  // rejection has (nearly) zero probability: draw from p itself.
  if (!(total > 0.0)) {
    total = 0.0;
    for (size_t i = 0; i < n; ++i) total += ((*residual)[i] = double(p[i]));
  }
  const double r = rng.NextDouble() * total;
  double cum = 0.0;
  size_t last = 0;  // last token with weight, for r == total after rounding
  for (size_t i = 0; i < n; ++i) {
    if ((*residual)[i] <= 0.0) continue;
    last = i;
    cum += (*residual)[i];
    if (r < cum) {
      v.token = i;
      return v;
    }
  }
  v.token = last;
  return v;
}

// Draws a token from the distribution `probs` (n probabilities summing to
// about 1) by inverse CDF; the draft side of speculative sampling, whose q
// the acceptance rule then needs as is.
inline size_t SampleFrom(const float* probs, size_t n, SamplerRng& rng) {
  double total = 0.0;
  for (size_t i = 0; i < n; ++i) total += double(probs[i]);
  const double r = rng.NextDouble() * total;
  double cum = 0.0;
  size_t last = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!(probs[i] > 0.0f)) continue;
    last = i;
    cum += double(probs[i]);
    if (r < cum) return i;
  }
  return last;
}

}  // namespace lutra

#endif  // LUTRA_SPECULATIVE_H_
