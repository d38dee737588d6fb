// lutra engine: see engine.h. Every loop over weights or activations below is
// a lutra kernel called through lutra/dispatch.h.
#include "examples/engine.h"

#include <math.h>
#include <string.h>

#include <algorithm>
#include <chrono>

#include "lutra/dispatch.h"
#include "lutra/quantize/quality.h"
#include "lutra/runtime/sampling.h"
#include "lutra/runtime/speculative.h"

namespace lutra {
namespace engine {

Status CheckSupported(const ModelConfig& c) {
  LUTRA_RETURN_IF_ERROR(ValidateConfig(c));
  if (c.rope_dim != c.head_dim) {
    return Unimplemented("model: partial RoPE (rope_dim %d != head_dim %d) is not supported",
                         c.rope_dim, c.head_dim);
  }
  return Status();
}

StatusOr<RunState> MakeRunState(const ModelConfig& c, size_t max_batch, ElementType kv_type) {
  LUTRA_RETURN_IF_ERROR(CheckSupported(c));
  if (max_batch == 0) return InvalidArgument("run state: max_batch must be >= 1");
  RunState s;
  s.max_batch = max_batch;
  s.x.resize(max_batch * c.dim);
  s.xb.resize(max_batch * c.dim);
  s.q.resize(max_batch * c.q_dim());
  s.k.resize(max_batch * c.kv_dim());
  s.v.resize(max_batch * c.kv_dim());
  s.att.resize(max_batch * c.q_dim());
  s.hb.resize(max_batch * c.hidden_dim);
  s.hb2.resize(max_batch * c.hidden_dim);
  s.logits.resize(max_batch * c.vocab_size);
  KVCacheConfig kv;
  kv.num_layers = c.n_layers;
  kv.num_kv_heads = c.n_kv_heads;
  kv.head_dim = c.head_dim;
  kv.capacity = c.seq_len;
  kv.type = kv_type;
  kv.ring = true;
  StatusOr<KVCache> cache = KVCache::Create(kv);
  if (!cache.ok()) return cache.status();
  s.cache = std::move(*cache);
  return s;
}

namespace {
// The config of MakeBatchState's run state: the sequences bring their caches.
ModelConfig BatchStateConfig(const ModelConfig& config) {
  ModelConfig one = config;
  one.seq_len = 1;
  return one;
}
}  // namespace

StatusOr<RunState> MakeBatchState(const ModelConfig& config, size_t max_batch) {
  return MakeRunState(BatchStateConfig(config), max_batch);
}

uint64_t BatchStateBytes(const ModelConfig& config, size_t max_batch) {
  return RunStateBytes(BatchStateConfig(config), max_batch);
}

uint64_t RunStateBytes(const ModelConfig& c, size_t max_batch, ElementType kv_type) {
  // In double: a hostile config cannot overflow it; the result saturates.
  const double b = double(max_batch);
  const double activations =
      4.0 * b * (2.0 * c.dim + 2.0 * c.q_dim() + 2.0 * c.kv_dim() + 2.0 * c.hidden_dim +
                 double(c.vocab_size));
  // KVCache::Create: per layer, K and V, per KV head a 64-byte-rounded run of
  // capacity x head_dim elements, plus int8's per-position scales.
  const double heads = double(c.n_layers) * 2.0 * double(c.n_kv_heads);
  const double run = double(c.seq_len) * double(c.head_dim) * double(ElementBytes(kv_type));
  const double scales = kv_type == ElementType::kI8 ? heads * double(c.seq_len) * 4.0 : 0.0;
  const double total = activations + heads * (run + 64.0) + scales;
  return total >= 1.8e19 ? ~uint64_t{0} : uint64_t(total);
}

// ----------------------------------------------------------------------------
// Steps of the forward pass

namespace {

// Whether run state s (its activation buffers and, with `cache`, its KV
// cache) was made for c.
Status CheckRunState(const ModelConfig& c, const RunState& s, const char* caller,
                     bool cache = true) {
  if ((cache && (s.cache.num_layers() != size_t(c.n_layers) ||
                 s.cache.capacity() != size_t(c.seq_len) ||
                 s.cache.num_kv_heads() != size_t(c.n_kv_heads) ||
                 s.cache.head_dim() != size_t(c.head_dim))) ||
      s.x.size() != s.max_batch * size_t(c.dim) ||
      s.hb.size() != s.max_batch * size_t(c.hidden_dim) ||
      s.logits.size() != s.max_batch * size_t(c.vocab_size) ||
      s.q.size() != s.max_batch * size_t(c.q_dim())) {
    return InvalidArgument("%s: the run state was made for a different model config", caller);
  }
  return Status();
}

// The LoRA deltas of one projection for a call's tokens: one for all (may
// be null), or, where the tokens' adapters differ (ForwardBatch over
// sequences with different adapters), one per token.
struct TokenLora {
  const LoraDelta* one = nullptr;
  const LoraDelta* const* per_token = nullptr;  // num entries (null: none)
};

// Projection p of `layer` (-1: the head, which has none) for the num tokens
// of s: s.adapter's delta, or with s.token_adapters each token's adapter's,
// listed in s.token_lora's slot `slot` (< 3: one per matrix of a GemmGroup).
TokenLora LoraOf(RunState& s, int layer, Projection p, size_t num, size_t slot) {
  TokenLora r;
  if (layer < 0) return r;
  if (s.token_adapters.empty()) {
    r.one = s.adapter != nullptr ? s.adapter->Find(size_t(layer), p) : nullptr;
    return r;
  }
  if (s.token_lora.size() < 3 * s.max_batch) s.token_lora.resize(3 * s.max_batch);
  const LoraDelta** list = &s.token_lora[slot * s.max_batch];
  for (size_t i = 0; i < num; ++i) {
    const Adapter* a = s.token_adapters[i];
    list[i] = a != nullptr ? a->Find(size_t(layer), p) : nullptr;
  }
  r.per_token = list;
  return r;
}

// Y (num x rows) = X (num x cols) W^T: GEMV for one token, GEMM for a batch.
// `layer`/`p` select the adapter's delta (LoraOf).
Status Project(RunState& s, const Linear& w, const float* x, size_t num, float* y,
               int layer = -1, Projection p = Projection::kQ) {
  const TokenLora lora = LoraOf(s, layer, p, num, 0);
  if (w.palettized()) {
    if (lora.per_token != nullptr) {
      return dispatch::GemmPerTokenLora(*w.prepared, x, num, lora.per_token, s.precision, y,
                                        s.pool, &s.scratch);
    }
    if (num == 1) {
      return dispatch::Gemv(*w.prepared, x, lora.one, s.precision, y, s.pool, &s.scratch);
    }
    return dispatch::Gemm(*w.prepared, x, num, lora.one, s.precision, y, s.pool, &s.scratch);
  }
  if (num == 1) {
    dispatch::MatVecF32(w.f32, w.rows, w.cols, x, y, s.pool);
  } else {
    dispatch::MatMulF32(w.f32, w.rows, w.cols, x, num, y, s.pool);
  }
  // LoraApply takes each token on its own: one call per token gives the
  // same bits as one call for all.
  for (size_t i = 0; i < num; ++i) {
    const LoraDelta* d = lora.per_token != nullptr ? lora.per_token[i] : lora.one;
    if (d == nullptr) continue;
    s.lora_ax.resize(d->rank);
    dispatch::LoraApply(*d, x + i * w.cols, 1, w.rows, w.cols, s.lora_ax.data(), y + i * w.rows);
  }
  return Status();
}

// One product of a shared input (ProjectShared).
struct SharedOut {
  const Linear* w;
  float* y;
  Projection p;
};

// y_i = x W_i^T for the n <= 3 matrices that read the same input (q/k/v,
// gate/up): one parallel region (dispatch::GemmGroup) when all are
// palettized, else one Project each. The same bits either way.
Status ProjectShared(RunState& s, const float* x, size_t num, int layer, const SharedOut* outs,
                     size_t n) {
  bool fused = s.fuse_shared_input && n <= s.group_in.size();
  for (size_t i = 0; i < n; ++i) fused = fused && outs[i].w->palettized();
  if (!fused) {
    for (size_t i = 0; i < n; ++i) {
      LUTRA_RETURN_IF_ERROR(Project(s, *outs[i].w, x, num, outs[i].y, layer, outs[i].p));
    }
    return Status();
  }
  dispatch::GroupJob jobs[3];
  for (size_t i = 0; i < n; ++i) {
    const TokenLora lora = LoraOf(s, layer, outs[i].p, num, i);
    jobs[i].w = outs[i].w->prepared;
    jobs[i].lora = lora.one;
    jobs[i].token_lora = lora.per_token;
    jobs[i].y = outs[i].y;
    jobs[i].in = &s.group_in[i];
  }
  const size_t threads = s.pool != nullptr ? s.pool->NumThreads() : 1;
  if (num > 1 && s.gemm_scratch.size() < threads) s.gemm_scratch.resize(threads);
  return dispatch::GemmGroup(jobs, n, x, num, s.precision, s.pool,
                             num > 1 ? s.gemm_scratch.data() : nullptr);
}

// y (num x n) += bias (n floats) in every row; a null bias adds nothing.
void AddBias(const float* bias, size_t num, size_t n, float* y) {
  if (bias == nullptr) return;
  for (size_t i = 0; i < num; ++i) dispatch::AddTo(y + i * n, bias, n);
}

// Copies the embedding row of each token into x (num x dim).
void Embed(const Linear& embedding, const int* tokens, size_t num, float* x) {
  for (size_t i = 0; i < num; ++i) {
    float* row = x + i * embedding.cols;
    if (embedding.palettized()) {
      dispatch::DequantizeRow(embedding.palette, size_t(tokens[i]), row);
    } else {
      memcpy(row, embedding.f32 + size_t(tokens[i]) * embedding.cols,
             embedding.cols * sizeof(float));
    }
  }
}

// Stores the batch's keys/values at positions pos.. of `layer` and attends
// each query to its causal window. Once the ring buffer has wrapped, a
// token's own append would overwrite what an earlier token of the same batch
// still reads, so such batches go one token at a time.
Status Attend(const ModelConfig& c, RunState& s, size_t layer, size_t num, size_t pos) {
  const size_t q_dim = c.q_dim(), kv_dim = c.kv_dim();
  const size_t step = pos + num <= size_t(c.seq_len) ? num : 1;
  for (size_t i = 0; i < num; i += step) {
    LUTRA_RETURN_IF_ERROR(dispatch::AppendKV(s.cache, layer, pos + i, step, &s.k[i * kv_dim],
                                             &s.v[i * kv_dim]));
    LUTRA_RETURN_IF_ERROR(dispatch::Attention(s.cache, layer, pos + i, step, &s.q[i * q_dim],
                                              c.n_heads, &s.att[i * q_dim], s.pool));
  }
  return Status();
}

// Adds rows x cols activations to the run's calibration statistics and
// capture, if any.
Status Observe(RunState& s, int layer, const char* kind, const float* x, size_t rows,
               size_t cols) {
  if (s.capture != nullptr) {
    std::vector<float>& v = (*s.capture)[InputSite(layer, kind)];
    v.insert(v.end(), x, x + rows * cols);
  }
  if (s.calibration == nullptr) return Status();
  return s.calibration->Add(InputSite(layer, kind), x, rows, cols);
}

// One transformer layer over the num token rows of s.x: x += Wo Attention(..),
// then x += W2 (SiLU(W1 xn) * W3 xn). attend() takes the projected s.q, s.k
// and s.v (biases added) to s.att: RoPE, the KV append and the attention,
// which Forward runs over one sequence and ForwardBatch per sequence.
template <class AttendFn>
Status RunLayer(const ModelConfig& c, const LayerWeights& lw, RunState& s, int l, size_t num,
                const AttendFn& attend) {
  const size_t dim = c.dim, hidden = c.hidden_dim;
  for (size_t i = 0; i < num; ++i) {
    dispatch::RMSNorm(&s.x[i * dim], lw.attn_norm, dim, c.norm_eps, &s.xb[i * dim]);
  }
  LUTRA_RETURN_IF_ERROR(Observe(s, l, "attn_in", s.xb.data(), num, dim));
  const SharedOut qkv[3] = {{&lw.wq, s.q.data(), Projection::kQ},
                            {&lw.wk, s.k.data(), Projection::kK},
                            {&lw.wv, s.v.data(), Projection::kV}};
  LUTRA_RETURN_IF_ERROR(ProjectShared(s, s.xb.data(), num, l, qkv, 3));
  AddBias(lw.bq, num, c.q_dim(), s.q.data());
  AddBias(lw.bk, num, c.kv_dim(), s.k.data());
  AddBias(lw.bv, num, c.kv_dim(), s.v.data());
  LUTRA_RETURN_IF_ERROR(attend());
  LUTRA_RETURN_IF_ERROR(Observe(s, l, "attn_out", s.att.data(), num, c.q_dim()));
  LUTRA_RETURN_IF_ERROR(Project(s, lw.wo, s.att.data(), num, s.xb.data(), l, Projection::kO));
  dispatch::AddTo(s.x.data(), s.xb.data(), num * dim);

  for (size_t i = 0; i < num; ++i) {
    dispatch::RMSNorm(&s.x[i * dim], lw.ffn_norm, dim, c.norm_eps, &s.xb[i * dim]);
  }
  LUTRA_RETURN_IF_ERROR(Observe(s, l, "ffn_in", s.xb.data(), num, dim));
  const SharedOut gate_up[2] = {{&lw.w1, s.hb.data(), Projection::kW1},
                                {&lw.w3, s.hb2.data(), Projection::kW3}};
  LUTRA_RETURN_IF_ERROR(ProjectShared(s, s.xb.data(), num, l, gate_up, 2));
  dispatch::SwiGLU(s.hb.data(), s.hb2.data(), num * hidden, s.hb.data());
  LUTRA_RETURN_IF_ERROR(Observe(s, l, "ffn_mid", s.hb.data(), num, hidden));
  LUTRA_RETURN_IF_ERROR(Project(s, lw.w2, s.hb.data(), num, s.xb.data(), l, Projection::kW2));
  dispatch::AddTo(s.x.data(), s.xb.data(), num * dim);
  return Status();
}

}  // namespace

std::string InputSite(int layer, const char* kind) {
  if (layer < 0) return "output_in";
  return "blk." + std::to_string(layer) + "." + kind;
}

StatusOr<const float*> Forward(const Model& model, RunState& s, const int* tokens,
                               size_t num, size_t pos, bool all_logits) {
  const ModelConfig& c = model.config;
  const Weights& w = model.weights;
  if (num == 0 || num > s.max_batch) {
    return InvalidArgument("forward: %zu tokens, need 1..%zu", num, s.max_batch);
  }
  for (size_t i = 0; i < num; ++i) {
    if (tokens[i] < 0 || tokens[i] >= c.vocab_size) {
      return OutOfRange("forward: token %d outside the vocabulary (%d)", tokens[i],
                        c.vocab_size);
    }
  }
  const size_t dim = c.dim;
  LUTRA_RETURN_IF_ERROR(CheckRunState(c, s, "forward"));
  // Positions continue the cache, or rewind it (a new prompt on this state).
  if (pos != s.cache.end(0)) LUTRA_RETURN_IF_ERROR(s.cache.Truncate(pos));
  // The model's RoPE frequencies (a few dozen pow calls: negligible next to
  // the matrices, and always those of `model`, whatever made the state).
  s.rope_inv_freq = RopeInverseFrequencies(c);
  const double* inv_freq = s.rope_inv_freq.data();

  Embed(w.embedding, tokens, num, s.x.data());
  for (int l = 0; l < c.n_layers; ++l) {
    LUTRA_RETURN_IF_ERROR(RunLayer(c, w.layers[l], s, l, num, [&]() -> Status {
      LUTRA_RETURN_IF_ERROR(dispatch::RoPE(s.q.data(), num, c.n_heads, c.head_dim, pos,
                                           inv_freq, c.rope_layout));
      LUTRA_RETURN_IF_ERROR(dispatch::RoPE(s.k.data(), num, c.n_kv_heads, c.head_dim, pos,
                                           inv_freq, c.rope_layout));
      return Attend(c, s, size_t(l), num, pos);
    }));
    if (l == s.stop_after_layer) return static_cast<const float*>(nullptr);
  }

  // Head: only the rows whose logits are wanted (all when calibrating).
  const size_t first = all_logits || s.calibration != nullptr || s.capture != nullptr ? 0 : num - 1;
  const size_t rows = num - first;
  for (size_t i = first; i < num; ++i) {
    dispatch::RMSNorm(&s.x[i * dim], w.final_norm, dim, c.norm_eps, &s.xb[(i - first) * dim]);
  }
  LUTRA_RETURN_IF_ERROR(Observe(s, -1, "", s.xb.data(), rows, dim));
  LUTRA_RETURN_IF_ERROR(Project(s, w.output, s.xb.data(), rows, s.logits.data()));
  const size_t last = all_logits ? 0 : rows - 1;
  return static_cast<const float*>(s.logits.data() + last * size_t(c.vocab_size));
}

StatusOr<const float*> ForwardBatch(const Model& model, RunState& b, RunState* const* seqs,
                                    const int* tokens, size_t n) {
  const ModelConfig& c = model.config;
  const Weights& w = model.weights;
  if (n == 0 || n > b.max_batch) {
    return InvalidArgument("forward batch: %zu sequences, need 1..%zu (the batch state's "
                           "max_batch)",
                           n, b.max_batch);
  }
  if (b.calibration != nullptr || b.capture != nullptr || b.stop_after_layer >= 0) {
    return InvalidArgument("forward batch: calibration and capture run through Forward");
  }
  LUTRA_RETURN_IF_ERROR(CheckRunState(c, b, "forward batch", /*cache=*/false));
  std::vector<size_t> pos(n);
  for (size_t i = 0; i < n; ++i) {
    if (seqs[i] == nullptr) return InvalidArgument("forward batch: sequence %zu is null", i);
    for (size_t j = 0; j < i; ++j) {
      if (seqs[j] == seqs[i]) {
        return InvalidArgument("forward batch: sequences %zu and %zu are the same state; each "
                               "sequence needs its own",
                               j, i);
      }
    }
    LUTRA_RETURN_IF_ERROR(CheckRunState(c, *seqs[i], "forward batch"));
    if (seqs[i]->precision != b.precision) {
      return InvalidArgument("forward batch: sequence %zu has another matmul precision than "
                             "the batch state",
                             i);
    }
    if (tokens[i] < 0 || tokens[i] >= c.vocab_size) {
      return OutOfRange("forward batch: token %d outside the vocabulary (%d)", tokens[i],
                        c.vocab_size);
    }
    pos[i] = seqs[i]->cache.end(0);
  }
  const size_t dim = c.dim, q_dim = c.q_dim(), kv_dim = c.kv_dim();
  b.rope_inv_freq = RopeInverseFrequencies(c);
  const double* inv_freq = b.rope_inv_freq.data();
  // Token i's adapter is its sequence's: one for all when they agree, else
  // one per token (the matmuls' per-token LoRA epilogue), so every matrix
  // is read once per step either way. b's own adapter is restored after.
  const Adapter* const own = b.adapter;
  bool mixed = false;
  for (size_t i = 1; i < n; ++i) mixed = mixed || seqs[i]->adapter != seqs[0]->adapter;
  b.adapter = seqs[0]->adapter;
  if (mixed) {
    b.token_adapters.resize(n);
    for (size_t i = 0; i < n; ++i) b.token_adapters[i] = seqs[i]->adapter;
  }
  const auto run = [&]() -> Status {
    Embed(w.embedding, tokens, n, b.x.data());
    for (int l = 0; l < c.n_layers; ++l) {
      LUTRA_RETURN_IF_ERROR(RunLayer(c, w.layers[l], b, l, n, [&]() -> Status {
        // Each token at its own position, against its own cache (Attend's
        // single-token step).
        for (size_t i = 0; i < n; ++i) {
          LUTRA_RETURN_IF_ERROR(dispatch::RoPE(&b.q[i * q_dim], 1, c.n_heads, c.head_dim,
                                               pos[i], inv_freq, c.rope_layout));
          LUTRA_RETURN_IF_ERROR(dispatch::RoPE(&b.k[i * kv_dim], 1, c.n_kv_heads, c.head_dim,
                                               pos[i], inv_freq, c.rope_layout));
          LUTRA_RETURN_IF_ERROR(dispatch::AppendKV(seqs[i]->cache, size_t(l), pos[i], 1,
                                                   &b.k[i * kv_dim], &b.v[i * kv_dim]));
          LUTRA_RETURN_IF_ERROR(dispatch::Attention(seqs[i]->cache, size_t(l), pos[i], 1,
                                                    &b.q[i * q_dim], c.n_heads,
                                                    &b.att[i * q_dim], b.pool));
        }
        return Status();
      }));
    }
    for (size_t i = 0; i < n; ++i) {
      dispatch::RMSNorm(&b.x[i * dim], w.final_norm, dim, c.norm_eps, &b.xb[i * dim]);
    }
    return Project(b, w.output, b.xb.data(), n, b.logits.data());
  };
  const Status status = run();
  b.adapter = own;
  b.token_adapters.clear();
  if (!status.ok()) return status;
  return static_cast<const float*>(b.logits.data());
}

// ----------------------------------------------------------------------------
// Generation

namespace {

// Runs tokens[0, num) at positions pos.. in chunks of state.max_batch
// tokens; returns the logits of the last one.
StatusOr<const float*> ForwardChunked(const Model& model, RunState& state, const int* tokens,
                                      size_t num, size_t pos) {
  const float* logits = nullptr;
  for (size_t done = 0; done < num;) {
    const size_t n = std::min(state.max_batch, num - done);
    StatusOr<const float*> out = Forward(model, state, tokens + done, n, pos + done);
    if (!out.ok()) return out.status();
    logits = *out;
    done += n;
  }
  return logits;
}

// The start of Generate and GenerateSpeculative: checks the prompt and the
// sampler, runs the prompt at positions start_pos.., Accept()s it and
// returns the first token, sampled from its logits. Sets st's
// prompt_tokens and prefill_seconds.
StatusOr<int> Prefill(const Model& model, RunState& state, const std::vector<int>& prompt,
                      Sampler& sampler, size_t start_pos, GenerateStats* st) {
  using Clock = std::chrono::steady_clock;
  if (prompt.empty()) return InvalidArgument("generate: empty prompt (need at least BOS)");
  const size_t vocab = model.config.vocab_size;
  if (sampler.vocab_size() != vocab) {
    return InvalidArgument("generate: the sampler is made for %zu tokens, the model has %zu",
                           sampler.vocab_size(), vocab);
  }
  st->prompt_tokens = prompt.size();
  const auto t0 = Clock::now();
  StatusOr<const float*> logits =
      ForwardChunked(model, state, prompt.data(), prompt.size(), start_pos);
  if (!logits.ok()) return logits.status();
  for (int t : prompt) sampler.Accept(t);
  const int token = int(sampler.Sample(*logits));
  st->prefill_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return token;
}

// A sampled token, as every generator takes it: a stop token is recorded
// in st and ends the text (false); any other is Accept()ed by the sampler,
// passed to on_token(prev, token) and counted.
template <class OnToken>
bool TakeToken(int prev, int token, const std::vector<int>& stop_tokens, Sampler& sampler,
               const OnToken& on_token, GenerateStats& st) {
  if (std::find(stop_tokens.begin(), stop_tokens.end(), token) != stop_tokens.end()) {
    st.stop_token = token;
    return false;
  }
  sampler.Accept(token);
  on_token(prev, token);
  ++st.generated_tokens;
  return true;
}

}  // namespace

Status Generate(const Model& model, RunState& state, const std::vector<int>& prompt,
                size_t steps, Sampler& sampler, const std::vector<int>& stop_tokens,
                const std::function<void(int, int)>& on_token, GenerateStats* stats,
                size_t start_pos) {
  using Clock = std::chrono::steady_clock;
  GenerateStats st;
  LUTRA_ASSIGN_OR_RETURN(int token, Prefill(model, state, prompt, sampler, start_pos, &st));
  size_t pos = start_pos + prompt.size();

  // Decode: llama2.c counts `steps` positions including the prompt's, so
  // steps + 1 - prompt tokens are generated; the first comes from the
  // prefill's logits and the last one is never forwarded, so there is one
  // decode forward pass fewer than generated tokens.
  const auto t1 = Clock::now();
  const size_t to_generate = steps + 1 > pos ? steps + 1 - pos : 0;
  int prev = prompt.back();
  const auto emit = [&](int p, int t) {
    if (on_token) on_token(p, t);
  };
  for (size_t n = 0; n < to_generate; ++n) {
    if (n > 0) {
      StatusOr<const float*> out = Forward(model, state, &token, 1, pos++);
      if (!out.ok()) return out.status();
      ++st.decode_forwards;
      prev = token;
      token = int(sampler.Sample(*out));
    }
    if (!TakeToken(prev, token, stop_tokens, sampler, emit, st)) break;
  }
  st.decode_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
  st.positions = pos;
  if (stats) *stats = st;
  return Status();
}

Status GenerateBatch(const Model& model, RunState& batch, const std::vector<RunState*>& seqs,
                     const std::vector<std::vector<int>>& prompts,
                     const std::vector<Sampler*>& samplers, const std::vector<size_t>& steps,
                     const std::vector<int>& stop_tokens,
                     const std::function<void(size_t seq, int prev, int token)>& on_token,
                     std::vector<GenerateStats>* stats) {
  using Clock = std::chrono::steady_clock;
  const size_t n = seqs.size();
  if (prompts.size() != n || samplers.size() != n || steps.size() != n) {
    return InvalidArgument("generate batch: %zu states, %zu prompts, %zu samplers and %zu step "
                           "limits; need one of each per sequence",
                           n, prompts.size(), samplers.size(), steps.size());
  }
  if (n > batch.max_batch) {
    return InvalidArgument("generate batch: %zu sequences, the batch state holds %zu", n,
                           batch.max_batch);
  }
  for (size_t i = 0; i < n; ++i) {
    if (seqs[i] == nullptr || samplers[i] == nullptr) {
      return InvalidArgument("generate batch: sequence %zu has no %s", i,
                             seqs[i] == nullptr ? "state" : "sampler");
    }
  }
  // Per sequence, Generate's loop state: the token to feed next, its
  // position, the decode steps taken and the steps it may take.
  struct Live {
    int token = 0, prev = 0;
    size_t pos = 0, step = 0, to_generate = 0;
    bool done = false;
  };
  std::vector<Live> live(n);
  std::vector<GenerateStats> st(n);
  // Sequence i's sampled token (TakeToken), then its step limit.
  const auto take = [&](size_t i) {
    Live& q = live[i];
    const auto emit = [&](int p, int t) {
      if (on_token) on_token(i, p, t);
    };
    q.done = !TakeToken(q.prev, q.token, stop_tokens, *samplers[i], emit, st[i]) ||
             ++q.step >= q.to_generate;
  };
  for (size_t i = 0; i < n; ++i) {
    // Each prompt alone, on its own state (chunked prefill, with that
    // state's adapter and threads).
    StatusOr<int> first = Prefill(model, *seqs[i], prompts[i], *samplers[i], 0, &st[i]);
    if (!first.ok()) return first.status().WithContext("sequence " + std::to_string(i));
    Live& q = live[i];
    q.token = *first;
    q.pos = prompts[i].size();
    q.prev = prompts[i].back();
    q.to_generate = steps[i] + 1 > q.pos ? steps[i] + 1 - q.pos : 0;
    if (q.to_generate == 0) {
      q.done = true;
    } else {
      take(i);
    }
  }

  std::vector<RunState*> rows;
  std::vector<int> tokens;
  std::vector<size_t> index;
  const auto t1 = Clock::now();
  for (;;) {
    rows.clear();
    tokens.clear();
    index.clear();
    for (size_t i = 0; i < n; ++i) {
      if (live[i].done) continue;
      rows.push_back(seqs[i]);
      tokens.push_back(live[i].token);
      index.push_back(i);
    }
    if (rows.empty()) break;
    StatusOr<const float*> out = ForwardBatch(model, batch, rows.data(), tokens.data(), rows.size());
    if (!out.ok()) return out.status();
    const double now = std::chrono::duration<double>(Clock::now() - t1).count();
    for (size_t r = 0; r < rows.size(); ++r) {
      const size_t i = index[r];
      Live& q = live[i];
      ++st[i].decode_forwards;
      ++q.pos;
      q.prev = q.token;
      q.token = int(samplers[i]->Sample(*out + r * size_t(model.config.vocab_size)));
      take(i);
      st[i].decode_seconds = now;
    }
  }
  for (size_t i = 0; i < n; ++i) st[i].positions = live[i].pos;
  if (stats) *stats = std::move(st);
  return Status();
}

Status GenerateSpeculative(const Model& model, RunState& state, const std::vector<int>& prompt,
                           size_t steps, Sampler& sampler, const std::vector<int>& stop_tokens,
                           const std::function<void(int, int)>& on_token, GenerateStats* stats,
                           const SpeculativeOptions& spec, size_t start_pos) {
  using Clock = std::chrono::steady_clock;
  const size_t vocab = model.config.vocab_size;
  const Model* draft = spec.draft_model;
  if ((spec.lookup > 0) == (draft != nullptr)) {
    return InvalidArgument("speculative: give exactly one drafter (lookup > 0 or a draft "
                           "model); lookup = %zu, draft model %s",
                           spec.lookup, draft != nullptr ? "given" : "none");
  }
  if (state.max_batch < 2) {
    return InvalidArgument("speculative: the run state's max_batch is %zu; verifying needs the "
                           "last token and at least one draft in one batch (>= 2)",
                           state.max_batch);
  }
  if (draft != nullptr) {
    if (spec.draft_state == nullptr) {
      return InvalidArgument("speculative: a draft model needs its own draft_state");
    }
    if (size_t(draft->config.vocab_size) != vocab) {
      return InvalidArgument("speculative: the draft model's vocabulary has %d tokens, the "
                             "target's %zu; they must share one vocabulary",
                             draft->config.vocab_size, vocab);
    }
    if (spec.draft_max == 0) return InvalidArgument("speculative: draft_max must be >= 1");
    // (Past the draft's context nothing is drafted, so its cache may lag.)
    if (start_pos > 0 && start_pos < size_t(draft->config.seq_len) &&
        spec.draft_state->cache.end(0) != start_pos) {
      return InvalidArgument("speculative: the draft model's cache ends at position %zu, the "
                             "target continues at %zu (keep the draft state between calls)",
                             spec.draft_state->cache.end(0), start_pos);
    }
  }
  GenerateStats st;
  LUTRA_ASSIGN_OR_RETURN(int token, Prefill(model, state, prompt, sampler, start_pos, &st));
  size_t pos = start_pos + prompt.size();

  const auto t1 = Clock::now();
  const bool greedy = sampler.config().temperature == 0.0f;
  SamplerRng rng(spec.seed);
  // The draft model's q: the target's sampling settings without the
  // repetition penalty, whose history cannot be rolled back. Any q keeps
  // the output distributed as the target's; a closer one is accepted more.
  Sampler draft_sampler;
  std::vector<float> p, q;
  std::vector<double> residual;
  if (!greedy) {
    p.resize(vocab);
    if (draft != nullptr) {
      SamplingConfig dc = sampler.config();
      dc.repeat_penalty = 1.0f;
      StatusOr<Sampler> ds = Sampler::Create(vocab, dc);
      if (!ds.ok()) return ds.status();
      draft_sampler = std::move(*ds);
      q.resize(spec.draft_max * vocab);
    }
  }
  // text[i]: the token at position start_pos + i (prompt, then generated).
  std::vector<int> text(prompt);
  std::vector<int> batch;
  size_t draft_end = start_pos;  // the draft cache's next position
  const size_t target_context = size_t(model.config.seq_len);
  const size_t draft_context = draft != nullptr ? size_t(draft->config.seq_len) : 0;
  const size_t max_draft = draft != nullptr ? spec.draft_max : spec.lookup;

  const size_t to_generate = steps + 1 > pos ? steps + 1 - pos : 0;
  int prev = prompt.back();
  bool done = to_generate == 0;
  // Emits the next token (as Generate does); sets `done` at a stop token or
  // when enough are generated.
  const auto emit = [&](int t) {
    const auto pass = [&](int p, int tok) {
      if (on_token) on_token(p, tok);
    };
    if (!TakeToken(prev, t, stop_tokens, sampler, pass, st)) {
      done = true;
      return;
    }
    prev = t;
    text.push_back(t);
    done = st.generated_tokens >= to_generate;
  };
  if (!done) emit(token);
  while (!done) {
    // text.back() sits at position pos, not yet forwarded. Draft k tokens:
    // the verify pass then yields up to k + 1.
    token = text.back();
    size_t k = std::min({max_draft, to_generate - st.generated_tokens - 1, state.max_batch - 1});
    // No wrap: the target verifies positions pos..pos + k and the draft
    // model forwards up to pos + k - 1, all below their ring's capacity, so
    // every rejected position can be rolled back.
    k = pos < target_context ? std::min(k, target_context - 1 - pos) : 0;
    if (draft != nullptr) k = pos < draft_context ? std::min(k, draft_context - pos) : 0;
    batch.assign(1, token);
    if (k > 0 && draft == nullptr) {
      PromptLookupDraft(text.data(), text.size(), spec.lookup_ngram, k, &batch);
    } else if (k > 0) {
      RunState& ds = *spec.draft_state;
      // Catch up on the positions the draft cache lacks (the prompt, the
      // last accepted draft, the target's token), then one pass per draft.
      StatusOr<const float*> dl = ForwardChunked(*draft, ds, &text[draft_end - start_pos],
                                                 pos + 1 - draft_end, draft_end);
      for (size_t i = 0;; ++i) {
        if (!dl.ok()) return dl.status();
        ++st.draft_forwards;
        int d;
        if (greedy) {
          d = int(ArgMax(*dl, vocab));
        } else {
          draft_sampler.Probabilities(*dl, &q[i * vocab]);
          d = int(SampleFrom(&q[i * vocab], vocab, rng));
        }
        batch.push_back(d);
        if (i + 1 == k) break;
        dl = Forward(*draft, ds, &d, 1, pos + 1 + i);
      }
      draft_end = pos + k;
    }
    k = batch.size() - 1;
    st.drafted_tokens += k;
    StatusOr<const float*> out = Forward(model, state, batch.data(), k + 1, pos, true);
    if (!out.ok()) return out.status();
    ++st.decode_forwards;
    // Row i holds the target's logits after batch[i]: the draft batch[i + 1]
    // stands when the target would have produced it.
    size_t kept = 0;  // rows whose input token stays in the cache
    for (size_t i = 0; i <= k && !done; ++i) {
      const float* row = *out + i * vocab;
      kept = i + 1;
      int next;
      bool accepted;
      if (i < k && !greedy) {
        sampler.Probabilities(row, p.data());
        const SpeculativeVerdict v =
            SpeculativeAccept(p.data(), draft != nullptr ? &q[i * vocab] : nullptr, vocab,
                              size_t(batch[i + 1]), rng, &residual);
        next = int(v.token);
        accepted = v.accepted;
      } else {
        next = int(sampler.Sample(row));
        accepted = i < k && next == batch[i + 1];
      }
      st.accepted_tokens += accepted ? 1 : 0;
      emit(next);
      if (!accepted) break;
    }
    pos += kept;
    // Roll back the rejected drafts' keys and values.
    if (state.cache.end(0) > pos) LUTRA_RETURN_IF_ERROR(state.cache.Truncate(pos));
    if (draft != nullptr && draft_end > pos) {
      LUTRA_RETURN_IF_ERROR(spec.draft_state->cache.Truncate(pos));
      draft_end = pos;
    }
  }
  // Leave the draft cache holding the target's positions, for a next call
  // that continues at st.positions (a chat turn) and may still draft.
  if (draft != nullptr && draft_end < pos && pos < draft_context) {
    StatusOr<const float*> dl = ForwardChunked(*draft, *spec.draft_state,
                                               &text[draft_end - start_pos], pos - draft_end,
                                               draft_end);
    if (!dl.ok()) return dl.status();
    ++st.draft_forwards;
  }
  st.decode_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
  st.positions = pos;
  if (stats) *stats = st;
  return Status();
}

// ----------------------------------------------------------------------------
// Evaluation

StatusOr<EvalResult> Evaluate(const Model& reference, const Model& test,
                              const std::vector<int>& tokens, size_t max_batch,
                              ThreadPool* pool, MatmulPrecision precision,
                              const Adapter* test_adapter, ElementType test_kv_type) {
  const ModelConfig& c = reference.config;
  const ModelConfig& t = test.config;
  if (c.dim != t.dim || c.n_layers != t.n_layers || c.vocab_size != t.vocab_size ||
      c.hidden_dim != t.hidden_dim || c.n_heads != t.n_heads || c.n_kv_heads != t.n_kv_heads) {
    return InvalidArgument("evaluate: the two models have different shapes");
  }
  if (tokens.size() < 2) return InvalidArgument("evaluate: need at least 2 tokens");
  if (tokens.size() > size_t(c.seq_len)) {
    return InvalidArgument("evaluate: %zu tokens exceed the context of %d", tokens.size(),
                           c.seq_len);
  }
  StatusOr<RunState> ref_state = MakeRunState(c, max_batch);
  if (!ref_state.ok()) return ref_state.status();
  StatusOr<RunState> test_state = MakeRunState(t, max_batch, test_kv_type);
  if (!test_state.ok()) return test_state.status();
  ref_state->pool = test_state->pool = pool;
  ref_state->precision = test_state->precision = precision;
  test_state->adapter = test_adapter;

  const size_t vocab = c.vocab_size;
  const size_t positions = tokens.size() - 1;  // predictions with a known next token
  DistributionGap gap;
  for (size_t done = 0; done < positions;) {
    const size_t n = std::min(max_batch, positions - done);
    StatusOr<const float*> ref = Forward(reference, *ref_state, &tokens[done], n, done, true);
    if (!ref.ok()) return ref.status();
    StatusOr<const float*> tst = Forward(test, *test_state, &tokens[done], n, done, true);
    if (!tst.ok()) return tst.status();
    for (size_t i = 0; i < n; ++i) {
      gap.Add(*ref + i * vocab, *tst + i * vocab, vocab, tokens[done + i + 1]);
    }
    done += n;
  }
  EvalResult r;
  r.positions = gap.positions();
  r.mean_kl = gap.mean_kl();
  r.top1_agreement = gap.top1_agreement();
  r.perplexity_reference = gap.perplexity_reference();
  r.perplexity_test = gap.perplexity_test();
  return r;
}

// ----------------------------------------------------------------------------
// Calibration

StatusOr<std::vector<int>> SampleTokens(const Model& model, size_t count, int bos,
                                        uint64_t seed, ThreadPool* pool) {
  const ModelConfig& c = model.config;
  if (count == 0) return InvalidArgument("calibration: 0 tokens requested");
  if (bos < 0 || bos >= c.vocab_size) {
    return InvalidArgument("calibration: BOS token %d outside the vocabulary (%d)", bos,
                           c.vocab_size);
  }
  // Sequence i is seeded with seed + i and depends on nothing else, so the
  // text does not depend on the thread count. Each thread samples a group of
  // up to kSampleBatch whole sequences on its own states (a wave of threads x
  // batch sequences at a time; the small models sampled for tuning text are
  // too small for the threads to share a matmul), decoded together by
  // GenerateBatch: one pass over the weights per step for the group, and
  // each sequence the tokens it gets alone.
  constexpr size_t kSampleBatch = 8;
  constexpr uint64_t kSampleStateBytes = uint64_t{256} << 20;  // per thread
  const size_t threads = pool != nullptr ? pool->NumThreads() : 1;
  const uint64_t state_bytes = RunStateBytes(c, 1);
  const size_t batch = size_t(std::max<uint64_t>(
      1, std::min<uint64_t>(kSampleBatch, kSampleStateBytes / std::max<uint64_t>(state_bytes, 1))));
  struct Group {
    std::vector<RunState> seqs;
    RunState batch;
  };
  std::vector<Group> groups(threads);
  for (Group& g : groups) {
    for (size_t i = 0; i < batch; ++i) {
      StatusOr<RunState> state = MakeRunState(c, 1);
      if (!state.ok()) return state.status();
      state->precision = MatmulPrecision::kF32;
      g.seqs.push_back(std::move(*state));
    }
    StatusOr<RunState> b = MakeBatchState(c, batch);
    if (!b.ok()) return b.status();
    b->precision = MatmulPrecision::kF32;
    g.batch = std::move(*b);
  }
  const size_t max_steps = std::min<size_t>(size_t(c.seq_len), count);
  const size_t wave_size = threads * batch;
  std::vector<std::vector<int>> wave(wave_size);
  std::vector<Status> status(threads);
  std::vector<int> out;
  for (uint64_t first = 0; out.size() < count;) {
    // No more sequences than the text still needs if each runs to
    // max_steps tokens (sequences that end early leave the rest to the
    // next wave, which continues with the next seeds).
    const size_t needed = (count - out.size() + max_steps - 1) / max_steps;
    const size_t wave_seqs = std::min(wave_size, std::max<size_t>(needed, 1));
    const auto sample = [&](size_t thread, size_t) {
      Group& g = groups[thread];
      const size_t mine =
          wave_seqs > thread * batch ? std::min(batch, wave_seqs - thread * batch) : 0;
      if (mine == 0) return;
      std::vector<RunState*> seqs;
      std::vector<std::vector<int>> prompts(mine, std::vector<int>{bos});
      std::vector<Sampler> samplers;
      std::vector<Sampler*> sampler_ptrs;
      for (size_t i = 0; i < mine; ++i) {
        const size_t w = thread * batch + i;
        wave[w].assign(1, bos);
        SamplingConfig sc;
        // Plain sampling at temperature 1, without top-p: text drawn from the
        // model's own distribution, tail tokens included. Text a person wrote
        // goes through contexts that follow unlikely tokens, which top-p 0.9
        // never produced: with it, the held-out KL of --mixed 4.0 stories260K
        // was 0.19 against 0.10 now (docs/quality.md).
        sc.temperature = 1.0f;
        sc.top_p = 1.0f;
        sc.seed = seed + first + w;
        StatusOr<Sampler> sampler = Sampler::Create(size_t(c.vocab_size), sc);
        if (!sampler.ok()) {
          status[thread] = sampler.status();
          return;
        }
        samplers.push_back(std::move(*sampler));
        seqs.push_back(&g.seqs[i]);
      }
      for (Sampler& s : samplers) sampler_ptrs.push_back(&s);
      if (max_steps >= 2) {
        status[thread] = GenerateBatch(
            model, g.batch, seqs, prompts, sampler_ptrs, std::vector<size_t>(mine, max_steps),
            {bos}, [&](size_t i, int, int token) { wave[thread * batch + i].push_back(token); },
            nullptr);
      }
    };
    if (threads > 1) {
      pool->ParallelFor(threads, sample);
    } else {
      sample(0, 0);
    }
    for (size_t t = 0; t < threads; ++t) LUTRA_RETURN_IF_ERROR(status[t]);
    for (size_t w = 0; w < wave_seqs && out.size() < count; ++w) {
      // The last sequence stops where the text reaches `count`.
      const size_t take = std::min(wave[w].size(), count - out.size());
      out.insert(out.end(), wave[w].begin(), wave[w].begin() + take);
    }
    first += wave_seqs;
  }
  return out;
}

namespace {

// Runs `tokens` through `model` in windows of the context length, each from
// position 0, with exact kernels and the state's calibration hooks.
Status RunText(const Model& model, RunState& state, const std::vector<int>& tokens) {
  if (tokens.empty()) return InvalidArgument("calibration: the calibration text is empty");
  state.precision = MatmulPrecision::kF32;
  const size_t window = size_t(model.config.seq_len);
  for (size_t start = 0; start < tokens.size(); start += window) {
    const size_t end = std::min(tokens.size(), start + window);
    for (size_t done = start; done < end;) {
      const size_t n = std::min(state.max_batch, end - done);
      StatusOr<const float*> out = Forward(model, state, &tokens[done], n, done - start);
      if (!out.ok()) return out.status().WithContext("calibration");
      done += n;
    }
  }
  return Status();
}

}  // namespace

StatusOr<CalibrationStats> Calibrate(const Model& model, const std::vector<int>& tokens,
                                     size_t max_batch, ThreadPool* pool) {
  StatusOr<RunState> state = MakeRunState(model.config, max_batch);
  if (!state.ok()) return state.status();
  CalibrationStats stats;
  state->pool = pool;
  state->calibration = &stats;
  LUTRA_RETURN_IF_ERROR(RunText(model, *state, tokens));
  stats.tokens = tokens.size();
  return stats;
}

StatusOr<std::map<std::string, std::vector<float>>> CaptureInputs(
    const Model& model, const std::vector<int>& tokens, size_t max_batch, ThreadPool* pool,
    int last_layer) {
  StatusOr<RunState> state = MakeRunState(model.config, max_batch);
  if (!state.ok()) return state.status();
  std::map<std::string, std::vector<float>> capture;
  state->pool = pool;
  state->capture = &capture;
  state->stop_after_layer = last_layer;
  LUTRA_RETURN_IF_ERROR(RunText(model, *state, tokens));
  return capture;
}

}  // namespace engine
}  // namespace lutra
