// lutra engine: a Llama forward pass, sampler loop and quality evaluation
// composed of lutra kernels (through examples/dispatch.h), in the spirit of
// llama2.c's run.c: a config struct, a weights struct, a run-state struct and
// one function per step. lutra-generate (generate.cc) is its command line.
#ifndef LUTRA_EXAMPLES_ENGINE_H_
#define LUTRA_EXAMPLES_ENGINE_H_

#include <stddef.h>
#include <stdint.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "lutra/status.h"

namespace lutra {
namespace engine {

// ----------------------------------------------------------------------------
// Model description

struct Config {
  int dim = 0;         // residual stream width
  int hidden_dim = 0;  // FFN width
  int n_layers = 0;
  int n_heads = 0;     // query heads
  int n_kv_heads = 0;  // key/value heads (GQA: n_heads is a multiple)
  int head_dim = 0;    // usually dim / n_heads
  int vocab_size = 0;
  int seq_len = 0;     // maximum context (KV cache capacity)
  float rope_theta = 10000.0f;
  float norm_eps = 1e-5f;

  int q_dim() const { return n_heads * head_dim; }
  int kv_dim() const { return n_kv_heads * head_dim; }
  Status Validate() const;
};

// One projection y = W x, W rows x cols (rows = outputs). Points into storage
// owned by Model (loaded floats, palettized copies, or a mapped file).
struct Linear {
  size_t rows = 0, cols = 0;
  const float* f32 = nullptr;  // row-major rows x cols
};

struct LayerWeights {
  const float* attn_norm = nullptr;  // dim
  Linear wq, wk, wv, wo;             // q_dim x dim, kv_dim x dim (x2), dim x q_dim
  const float* ffn_norm = nullptr;   // dim
  Linear w1, w2, w3;                 // hidden x dim (gate), dim x hidden, hidden x dim (up)
};

struct Weights {
  Linear embedding;  // vocab x dim, read one row per token
  std::vector<LayerWeights> layers;
  const float* final_norm = nullptr;  // dim
  Linear output;     // vocab x dim; the same matrix as `embedding` when tied
};

// Weights plus the memory they live in. Movable, not copyable.
struct Model {
  Config config;
  Weights weights;
  // Storage the views in `weights` point into.
  std::vector<std::vector<float>> f32_storage;
  std::shared_ptr<void> keep_alive;  // e.g. the loader's mapped file
};

// ----------------------------------------------------------------------------
// Run state: activations for up to `max_batch` tokens and the KV cache.

struct RunState {
  size_t max_batch = 0;
  std::vector<float> x, xb, xb2;  // max_batch x dim
  std::vector<float> q;           // max_batch x q_dim
  std::vector<float> k, v;        // max_batch x kv_dim
  std::vector<float> att;         // n_heads x seq_len scores (one token at a time)
  std::vector<float> hb, hb2;     // max_batch x hidden_dim
  std::vector<float> logits;      // max_batch x vocab
  // KV cache, per layer seq_len x kv_dim, ring-indexed by pos % seq_len.
  std::vector<std::vector<float>> key_cache, value_cache;
};

StatusOr<RunState> MakeRunState(const Config& config, size_t max_batch);

// Runs `num` tokens at positions pos..pos+num-1 through the model, appending
// their keys/values to the cache. num <= state.max_batch; num > 1 is prefill
// (matrix-matrix products), num == 1 is decode (matrix-vector products).
// Returns the logits (vocab floats per token) of the last token, or of all
// `num` tokens (num x vocab, row-major) when `all_logits`.
StatusOr<const float*> Forward(const Model& model, RunState& state, const int* tokens,
                               size_t num, size_t pos, bool all_logits = false);

// ----------------------------------------------------------------------------
// Sampling

struct SamplerOptions {
  float temperature = 0.0f;  // 0: greedy
  float top_p = 0.9f;        // nucleus; >= 1 disables
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplerOptions& options) : options_(options), rng_(options.seed) {}
  // Picks a token from `logits` (modified in place).
  int Sample(float* logits, size_t vocab);

 private:
  float RandomFloat();
  SamplerOptions options_;
  uint64_t rng_;
  std::vector<std::pair<float, int>> candidates_;
};

// ----------------------------------------------------------------------------
// Generation

struct GenerateStats {
  size_t prompt_tokens = 0;
  size_t decode_tokens = 0;
  double prefill_seconds = 0.0;    // prompt through the model, first token sampled
  double decode_seconds = 0.0;
};

// Feeds `prompt` (token ids, starting with BOS) and samples until `steps`
// positions in total (prompt included, like llama2.c) or one of `stop_tokens`. Calls
// on_token(prev, token) for each generated token as soon as it is sampled.
Status Generate(const Model& model, RunState& state, const std::vector<int>& prompt,
                size_t steps, Sampler& sampler, const std::vector<int>& stop_tokens,
                const std::function<void(int prev, int token)>& on_token,
                GenerateStats* stats);

}  // namespace engine
}  // namespace lutra

#endif  // LUTRA_EXAMPLES_ENGINE_H_
