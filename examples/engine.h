// lutra engine: a Llama forward pass, sampler loop and quality evaluation
// composed of lutra kernels (through lutra/dispatch.h), in the spirit of
// llama2.c's run.c: a config struct, a weights struct, a run-state struct and
// one function per step. lutra-generate (generate.cc) is its command line.
#ifndef LUTRA_EXAMPLES_ENGINE_H_
#define LUTRA_EXAMPLES_ENGINE_H_

#include <stddef.h>
#include <stdint.h>

#include <array>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "lutra/base/status.h"
#include "lutra/base/thread_pool.h"
#include "lutra/format/llama_model.h"
#include "lutra/format/lora.h"
#include "lutra/format/lutra_file.h"
#include "lutra/format/palette.h"
#include "lutra/format/tokenizer.h"
#include "lutra/kernels/kv_cache.h"
#include "lutra/kernels/matmul.h"
#include "lutra/quantize/calibration.h"
#include "lutra/runtime/sampling.h"

namespace lutra {
namespace engine {

// ----------------------------------------------------------------------------
// Model description
//
// The hyper-parameters are lutra::ModelConfig (lutra/format/llama_model.h);
// the engine runs the configs CheckSupported accepts.

// ValidateConfig's invariants, plus what Forward implements: RoPE over whole
// heads (rope_dim == head_dim), adjacent-pair or half-split, with any
// frequency factors / linear scaling.
Status CheckSupported(const ModelConfig& config);

// One projection y = W x (lutra/format/lutra_file.h: f32 or palettized, see
// docs/format.md) with the kernels' tables. Points into storage owned by
// Model (loaded floats, palettized copies, or a mapped .lutra file).
struct Linear : LutraMatrix {
  const PreparedPalette* prepared = nullptr;  // the GEMV/GEMM tables of `palette`
};

struct LayerWeights {
  const float* attn_norm = nullptr;  // dim
  Linear wq, wk, wv, wo;             // q_dim x dim, kv_dim x dim (x2), dim x q_dim
  const float* ffn_norm = nullptr;   // dim
  Linear w1, w2, w3;                 // hidden x dim (gate), dim x hidden, hidden x dim (up)
  // Biases of the q/k/v projections (qwen2), f32 even in palettized
  // models; null: none.
  const float* bq = nullptr;         // q_dim
  const float* bk = nullptr;         // kv_dim
  const float* bv = nullptr;         // kv_dim
};

struct Weights {
  Linear embedding;  // vocab x dim, read one row per token
  std::vector<LayerWeights> layers;
  const float* final_norm = nullptr;  // dim
  Linear output;     // vocab x dim; the same matrix as `embedding` when tied
};

// Weights plus the memory they live in. Movable, not copyable.
struct Model {
  ModelConfig config;
  Weights weights;
  // The vocabulary carried by the model file (GGUF, .lutra); may be null.
  std::shared_ptr<const Tokenizer> tokenizer;
  // Storage the views in `weights` point into.
  std::vector<std::vector<float>> f32_storage;
  std::vector<PaletteMatrix> palettes;
  std::vector<std::unique_ptr<PreparedPalette>> prepared;
  std::shared_ptr<void> keep_alive;  // e.g. the loader's mapped file
  // Heap bytes loading allocated for this model (the budget that
  // LoadOptions::max_memory_bytes bounds); mapped pages are not counted.
  size_t heap_bytes = 0;
  // How a palettized model was made (written to .lutra files as
  // lutra.quantization), and the per-tensor table of the choices made
  // (QuantizeReport); both empty for f32 models.
  std::string quantization;
  std::string quantization_table;
  // The calibration statistics it was palettized with (null: none), e.g.
  // for the recovery adapter's activation weighting.
  std::shared_ptr<const CalibrationStats> calibration;
  // The accuracy-recovery adapter made with it (LoadOptions::recover_rank;
  // null: none). Not part of the weights: it runs as a LoRA adapter.
  std::shared_ptr<const Adapter> recovery;

  // Builds the kernels' per-group tables of every palettized matrix (once,
  // after the weights are in place; a tied head shares the embedding's).
  Status Prepare();

  // Matrices once each (a tied output head is the embedding), for stats.
  std::vector<const Linear*> Matrices() const;
  // The same matrices, writable, in the same order (a tied head is not
  // listed: TieHead() makes it the embedding again).
  std::vector<Linear*> MutableMatrices();
  // Names in Matrices() order (token_embd, blk.L.attn_q, ..., output), and
  // the calibration site of each one's input ("" for an untied embedding,
  // a lookup). calibration.h explains sites.
  std::vector<std::string> MatrixNames() const;
  std::vector<std::string> MatrixInputSites() const;
  size_t WeightBytes() const;     // all matrices + norms
  size_t MatrixWeights() const;   // number of matrix elements
  double BitsPerWeight() const;   // 8 * matrix bytes / matrix elements
};

// Name of a calibration site (the input of one or more matrices): for layer
// L, kind "attn_in" (wq wk wv), "attn_out" (wo), "ffn_in" (w1 w3),
// "ffn_mid" (w2) gives "blk.L.<kind>"; layer < 0 gives "output_in" (head).
std::string InputSite(int layer, const char* kind);

// How --mixed weighs tensors against each other (docs/quality.md).
enum class Sensitivity {
  kAuto,      // kMeasured for models up to 100 M matrix weights, else kWeighted
  kMeasured,  // each tensor's output KL per unit of error (quantize/sensitivity.h)
  kWeighted,  // activation-weighted error only, every tensor alike
};

// Codebook tuning's default (LoadOptions::tune_steps = -1): steps, and the
// largest model it runs on. A step is a forward and backward pass over 512
// training tokens; its cost grows with the matrix weights (about 0.12 s
// per step on stories260K's 0.26 M weights, one Zen 5 core). The default
// spends about kTuneWeightSteps (steps x matrix weights), within
// [kTuneDefaultSteps, kTuneMaxSteps]: 2400 steps on stories260K (5-6 min on
// one core, sampling the fresh text included), 640 at 1 M weights, 320 at
// 2 M, never under 300. It runs by default only on calibration text of at
// least kTuneMinTokens, and where it runs the sampled calibration text is
// kTuneCalibTokens long. The steps train on fresh sampled text
// (TuneOptions::train_text), so more steps no longer fit one text better
// than the model: on stories260K, --mixed 3.5's mean KL over 4 unseen texts
// was 0.130 at 1200 steps, 0.108 at 2400 and 0.113 at 4800
// (docs/quality.md).
constexpr int kTuneDefaultSteps = 300;
constexpr int kTuneMaxSteps = 2400;
constexpr double kTuneWeightSteps = 6.4e8;
constexpr size_t kTuneAutoMaxWeights = 2000000;
constexpr size_t kTuneMinTokens = 2048;
constexpr size_t kTuneCalibTokens = 32768;

// The default tuning steps of a model with `matrix_weights` weights in its
// matrices (see kTuneWeightSteps).
inline int TuneDefaultSteps(size_t matrix_weights) {
  const double budget = kTuneWeightSteps / double(matrix_weights > 0 ? matrix_weights : 1);
  return budget >= double(kTuneMaxSteps)     ? kTuneMaxSteps
         : budget <= double(kTuneDefaultSteps) ? kTuneDefaultSteps
                                                : int(budget);
}

// How to build the weights at load time.
struct LoadOptions {
  int bits = 0;              // 0: f32 weights; else palettize at b bits
  double mixed_bits = 0.0;   // > 0: mixed 2..8 bits and G per tensor within this budget
  size_t group = 16;         // rows sharing one codebook (--bits; --mixed: see groups)
  // --mixed: rows per codebook the allocator may choose from.
  std::vector<size_t> groups = {1, 2, 4, 8, 16};
  // Calibration (quantize/calibration.h): palettize against E[x^2] of each
  // matrix's input on calibration text. The text is calib_text when given,
  // else calib_tokens tokens sampled from the f32 model itself (seed
  // calib_seed, sequences starting at calib_bos).
  bool calibrate = true;
  std::vector<int> calib_text;
  // 0: 2048 for models up to 100 M matrix weights, else 64 (sampling from
  // an f32 model of billions of weights runs at about a token per second);
  // kTuneCalibTokens where codebook tuning runs (tune_steps != 0, up to
  // kTuneAutoMaxWeights).
  size_t calib_tokens = 0;
  uint64_t calib_seed = 0xCA11B;
  int calib_bos = 1;
  Sensitivity sensitivity = Sensitivity::kAuto;
  // GPTQ-style error feedback (quantize/gptq.h) under each input's Gram
  // matrix, when calibrating and all Gram matrices fit in 1 GiB.
  bool gptq = true;
  ElementType codebook = ElementType::kF16;
  bool progress = false;     // progress bar on stderr
  int seq_len = 0;           // > 0: override the context length (KV capacity)
  // Memory budget of loading: the most heap bytes OpenModel / PalettizeModel
  // may allocate for the model (the file when read into memory, tensors
  // converted to f32, the kernels' tables, a palettized copy; Model::
  // heap_bytes). 0: no limit. A model that needs more is refused with
  // ResourceExhausted before the large allocations are made. Mapped file
  // pages are not heap and do not count. docs/reliability.md.
  size_t max_memory_bytes = 0;
  // false: read the model file into memory instead of mapping it, for hosts
  // where the file may change or shrink while the model is in use (a mapped
  // file that shrinks faults with SIGBUS; docs/model-files.md).
  bool use_mmap = true;
  // End-to-end codebook tuning (examples/tune.cc, docs/quality.md): after
  // palettizing, Adam steps on the codebook entries of the <= 4-bit
  // matrices against the f32 model's output distribution on the
  // calibration text. -1: TuneDefaultSteps() for models up to
  // kTuneAutoMaxWeights matrix weights, else off (tune_always: on); 0: off.
  // Needs calibration.
  int tune_steps = -1;
  bool tune_always = false;
  // Also tune the RMSNorm weights (f32, stored anyway): held-out KL of
  // 4-bit stories260K 0.103 -> 0.097 (docs/quality.md).
  bool tune_norms = true;
  // Also tune the indices (TuneOptions::index_lr; off: the indices stay as
  // palettizing chose them).
  bool tune_indices = true;
  // Tune on freshly sampled text, each sequence once (TuneOptions::
  // train_text), where the calibration text is sampled: 1 on, 0 off (cycle
  // the calibration text), -1 on up to kTuneAutoMaxWeights. Sampling is a
  // decode, one read of every weight per token, so on large models the
  // fresh text would cost more than the training steps.
  int tune_fresh = -1;
  // > 0: also build a rank-r accuracy-recovery adapter (Model::recovery):
  // the SVD of each projection's weighted residual (BuildRecoveryAdapter),
  // then, where tuning runs, trained with the codebooks on the same loss
  // (TuneOptions::adapter), so that base and adapter are fitted together.
  size_t recover_rank = 0;
  // Which projections get the recovery adapter: bit p set adapts
  // kAllProjections[p] in every layer. The adapter costs r (N + K) 16-bit
  // values per matrix, so on small matrices it is worth placing: wo, w2 and
  // wv carry the most output error per unit of weight error (docs/quality.md).
  uint32_t recover_targets = (1u << kNumProjections) - 1;
};

// Opens a llama2.c checkpoint (.bin), GGUF v3 Llama model (both through
// lutra/format/llama_model.h) or .lutra file (lutra/format/lutra_file.h,
// mapped, weights used in place), detected by content, not name, and
// palettizes it when options ask for it. threads: for palettizing.
StatusOr<Model> OpenModel(const std::string& path, const LoadOptions& options,
                          size_t threads = 1);

// The tokenizer for `model`: a llama2.c tokenizer.bin at `path` when given,
// else the vocabulary carried by the model file. Checks the vocabulary size.
StatusOr<std::shared_ptr<const Tokenizer>> LoadTokenizer(const std::string& path,
                                                         const Model& model);

// A byte-level vocabulary for synthetic models (ids 0-2 <unk> <s> </s>, 3-258
// the bytes <0xXX>, the rest placeholder words " w<id>"); vocab_size >= 259.
StatusOr<Tokenizer> ByteTokenizer(int vocab_size);

// A palettized copy of an f32 model (the source may be dropped afterwards):
// calibrates (unless options.calibrate is false), chooses each tensor's
// width and G (--mixed), and palettizes with activation-weighted k-means.
// Fills the result's quantization, quantization_table and calibration.
StatusOr<Model> PalettizeModel(const Model& f32_model, const LoadOptions& options,
                               size_t threads = 1);

// `count` tokens sampled from `model` (temperature 1, no top-p, `seed`), in
// sequences that start with `bos` and run to the model's context length or
// an end of text, concatenated.
StatusOr<std::vector<int>> SampleTokens(const Model& model, size_t count, int bos,
                                        uint64_t seed, ThreadPool* pool = nullptr);

// Runs `tokens` through `model` in windows of the context length (each from
// position 0) and collects the second moments of every matrix input.
StatusOr<CalibrationStats> Calibrate(const Model& model, const std::vector<int>& tokens,
                                     size_t max_batch, ThreadPool* pool = nullptr);

// The raw inputs of every matrix (site -> tokens x cols floats) on `tokens`,
// run as Calibrate does; up to layer `last_layer` only when >= 0 (no head).
StatusOr<std::map<std::string, std::vector<float>>> CaptureInputs(
    const Model& model, const std::vector<int>& tokens, size_t max_batch,
    ThreadPool* pool = nullptr, int last_layer = -1);

// Writes `model` (f32 or palettized) and `tokenizer` (may be null) as a
// .lutra file (lutra/format/lutra_file.h, docs/format.md) that OpenModel
// maps without copying the weights.
Status SaveLutraModel(const Model& model, const Tokenizer* tokenizer, const std::string& path);

// Random weights at a named Llama-like shape ("tiny", "1b", "afm"), f32 or
// palettized per `options` (random indices and codebooks drawn directly: no
// k-means over billions of floats). Output head tied to the embedding.
StatusOr<Model> MakeSyntheticModel(const std::string& shape, const LoadOptions& options,
                                   uint64_t seed);

// ----------------------------------------------------------------------------
// Run state: activations for up to `max_batch` tokens and the KV cache.

struct RunState {
  size_t max_batch = 0;
  std::vector<float> x, xb;       // max_batch x dim
  std::vector<float> q;           // max_batch x q_dim
  std::vector<float> k, v;        // max_batch x kv_dim
  std::vector<float> att;         // max_batch x q_dim attention output
  std::vector<float> hb, hb2;     // max_batch x hidden_dim
  std::vector<float> logits;      // max_batch x vocab
  std::vector<double> rope_inv_freq;  // head_dim / 2: RopeInverseFrequencies, per Forward
  // Keys and values of the last seq_len positions of every layer: a ring
  // buffer, so generation may run past seq_len (attending a sliding window).
  KVCache cache;
  // Matrix products: worker threads (null = this thread only), the
  // palettized kernels' precision (matmul.h) and their reusable scratch.
  ThreadPool* pool = nullptr;
  MatmulPrecision precision = MatmulPrecision::kInt8;
  PreparedInput scratch;
  // q/k/v, and gate/up, in one parallel region each (dispatch::GemmGroup;
  // false: one per matrix, as before, for e2e_bench --unfused), their
  // prepared inputs and one GEMM scratch per pool thread (grown on first use).
  bool fuse_shared_input = true;
  std::array<PreparedInput, 3> group_in;
  std::vector<GemmScratch> gemm_scratch;
  // LoRA adapter applied to the layer projections (null: none). Fused into
  // the palettized GEMV/GEMM epilogue: y = W x + scale * B (A x).
  const Adapter* adapter = nullptr;
  std::vector<float> lora_ax;  // f32 weights' LoRA scratch (rank floats)
  // ForwardBatch's working lists, empty otherwise: token i's adapter where
  // the sequences' adapters differ (it then overrides `adapter`), and one
  // projection's per-token deltas (3 x max_batch: one list per matrix of a
  // fused q/k/v group).
  std::vector<const Adapter*> token_adapters;
  std::vector<const LoraDelta*> token_lora;
  // When set, Forward adds every matrix input it computes to these
  // statistics (sites as in Model::MatrixInputSites) and runs the head on
  // every token.
  CalibrationStats* calibration = nullptr;
  // When set, Forward also appends every matrix input it computes, raw
  // (rows x cols floats per call), to capture[site] (sequential GPTQ).
  std::map<std::string, std::vector<float>>* capture = nullptr;
  // >= 0: Forward stops after this layer (no head, null logits), for
  // capturing the inputs of one layer without running the rest.
  int stop_after_layer = -1;
};

StatusOr<RunState> MakeRunState(const ModelConfig& config, size_t max_batch,
                                ElementType kv_type = ElementType::kF32);

// A run state for ForwardBatch / GenerateBatch: activations for max_batch
// tokens and a one-position KV cache it never uses (each sequence brings its
// own). BatchStateBytes is its size.
StatusOr<RunState> MakeBatchState(const ModelConfig& config, size_t max_batch);
uint64_t BatchStateBytes(const ModelConfig& config, size_t max_batch);

// Bytes MakeRunState allocates (activations and KV cache), e.g. to check a
// memory budget before making it; saturates instead of overflowing.
uint64_t RunStateBytes(const ModelConfig& config, size_t max_batch,
                       ElementType kv_type = ElementType::kF32);

// Runs `num` tokens at positions pos..pos+num-1 through the model, appending
// their keys/values to the cache. num <= state.max_batch; num > 1 is prefill
// (matrix-matrix products), num == 1 is decode (matrix-vector products).
// Returns the logits (vocab floats per token) of the last token, or of all
// `num` tokens (num x vocab, row-major) when `all_logits`.
StatusOr<const float*> Forward(const Model& model, RunState& state, const int* tokens,
                               size_t num, size_t pos, bool all_logits = false);

// ----------------------------------------------------------------------------
// Generation

struct GenerateStats {
  size_t prompt_tokens = 0;     // tokens prefilled
  // Tokens passed to on_token; the first is sampled from the prefill's
  // logits, each later one costs a decode forward pass.
  size_t generated_tokens = 0;
  // Single-token forward passes after the prefill (a stop token sampled
  // after one is not generated, but its pass is counted).
  size_t decode_forwards = 0;
  double prefill_seconds = 0.0;  // prompt through the model, first token sampled
  double decode_seconds = 0.0;   // the decode passes, their sampling and on_token
  size_t positions = 0;          // cache positions filled: start_pos + prompt + decode passes
  int stop_token = -1;           // the stop token sampled (not fed to the model), or -1
  // Speculative decoding (GenerateSpeculative; 0 for Generate): tokens
  // drafted and drafts the target accepted. decode_forwards counts the
  // target's verify passes.
  size_t drafted_tokens = 0;
  size_t accepted_tokens = 0;
  size_t draft_forwards = 0;     // the draft model's forward passes

  // Generate calls these figures add up (a chat sums its turns'): each
  // call's first token comes from its prefill, not from a decode pass.
  size_t calls = 1;

  // Adds another call's counts and times (a chat's turns); positions and
  // stop_token stay this one's.
  void Add(const GenerateStats& o) {
    calls += o.calls;
    prompt_tokens += o.prompt_tokens;
    generated_tokens += o.generated_tokens;
    decode_forwards += o.decode_forwards;
    prefill_seconds += o.prefill_seconds;
    decode_seconds += o.decode_seconds;
    drafted_tokens += o.drafted_tokens;
    accepted_tokens += o.accepted_tokens;
    draft_forwards += o.draft_forwards;
  }

  // Tokens generated per target forward pass after the prefill (1 for plain
  // decoding, up to draft length + 1 with speculation): generated tokens
  // but each call's first, over decode_forwards.
  double TokensPerForward() const {
    return decode_forwards > 0 && generated_tokens >= calls && calls > 0
               ? double(generated_tokens - calls) / double(decode_forwards)
               : 0.0;
  }
  double AcceptanceRate() const {
    return drafted_tokens > 0 ? double(accepted_tokens) / double(drafted_tokens) : 0.0;
  }

  // Decode speed: forward passes per second (not generated tokens, which
  // include the one sampled during the prefill).
  double DecodeTokensPerSecond() const {
    return decode_seconds > 0.0 ? double(decode_forwards) / decode_seconds : 0.0;
  }
};

// Feeds `prompt` at positions start_pos.. (0: a new sequence, starting with
// BOS; > 0: continuing the cache's first start_pos positions, e.g. the next
// chat turn) and samples until position `steps` (counted from 0, prompt
// included, like llama2.c: at most steps + 1 - start_pos - prompt tokens)
// or one of `stop_tokens`. Calls on_token(prev, token) for each generated
// token as soon as it is sampled. The prompt and generated tokens are
// Accept()ed by the sampler (repetition penalty). `sampler`
// (lutra/runtime/sampling.h) must be made for the model's vocab_size.
Status Generate(const Model& model, RunState& state, const std::vector<int>& prompt,
                size_t steps, Sampler& sampler, const std::vector<int>& stop_tokens,
                const std::function<void(int prev, int token)>& on_token,
                GenerateStats* stats, size_t start_pos = 0);

// ----------------------------------------------------------------------------
// Several sequences decoded together (issue 15; docs/generate.md "Batched
// decoding")

// One decode step of n independent sequences. tokens[i] is the next token of
// sequence seqs[i], at position seqs[i]->cache.end(0). It attends that
// sequence's own KV cache, with that sequence's adapter (seqs[i]->adapter).
// The n tokens' matrix products run as one batched product (the small-M
// GEMM, whose rows are GEMV's bits), each token with its own sequence's LoRA
// delta in the epilogue (Epilogue::token_lora), so the weights are read once
// per step whatever the mix of adapters. `batch` (MakeBatchState, or any run state for the model)
// provides the activations (max_batch >= n), the threads and the precision;
// each sequence's state provides only its KV cache and adapter, and must
// have batch's precision. Row i of the result is bit for
// bit the logits a single-token Forward on seqs[i] gives. The sequences must
// be distinct and made for `model`. Returns n x vocab logits.
StatusOr<const float*> ForwardBatch(const Model& model, RunState& batch, RunState* const* seqs,
                                    const int* tokens, size_t n);

// Generate for several prompts at once: prompts[i] is prefilled on seqs[i]
// (its own KV cache, adapter and pool; Generate's start_pos 0), then the live
// sequences decode together, one ForwardBatch per step, each until its
// position steps[i] (Generate's `steps`) or one of `stop_tokens`. samplers[i] samples sequence i; on_token(i,
// prev, token) is called as each token is sampled. Each sequence's tokens
// are those Generate gives it alone with the same sampler (bit-identical
// logits, same draws). stats (may be null) receives one entry per sequence;
// its decode_seconds is the batched decode's wall time while the sequence
// was live, its decode_forwards the batched steps it took part in.
Status GenerateBatch(const Model& model, RunState& batch, const std::vector<RunState*>& seqs,
                     const std::vector<std::vector<int>>& prompts,
                     const std::vector<Sampler*>& samplers, const std::vector<size_t>& steps,
                     const std::vector<int>& stop_tokens,
                     const std::function<void(size_t seq, int prev, int token)>& on_token,
                     std::vector<GenerateStats>* stats);

// ----------------------------------------------------------------------------
// Speculative decoding (issue 15; docs/generate.md "Speculative decoding")

// Where drafts come from: prompt lookup (lutra/runtime/speculative.h) or a
// draft model with the target's vocabulary (another model, or the target
// palettized at fewer bits: "self-draft"). Exactly one drafter.
struct SpeculativeOptions {
  // > 0: draft up to `lookup` tokens by prompt lookup, matching the last
  // n-gram (n = lookup_ngram down to 1) against the prompt and the text
  // generated so far. 0: off.
  size_t lookup = 0;
  size_t lookup_ngram = 3;
  // Non-null: draft up to draft_max tokens with this model, one forward
  // pass per token in draft_state (its own KV cache, made for
  // draft_model->config; max_batch >= 1). Its cache holds the same
  // positions as the target's: empty for start_pos 0, else the first
  // start_pos positions (GenerateSpeculative leaves it so after each call
  // that ends within the draft model's context).
  const Model* draft_model = nullptr;
  RunState* draft_state = nullptr;
  size_t draft_max = 4;
  // Seed of the acceptance rule's and the draft's random draws (sampling
  // only; greedy decoding draws nothing).
  uint64_t seed = 0x5EC;
};

// Generate (same arguments, same output contract) with speculation: each
// step drafts k tokens, runs the target once on [last token, drafts] (one
// batched Forward, all logits) and keeps the longest accepted prefix plus
// one token from the target's own logits; the rejected positions are cut
// from the KV caches (KVCache::Truncate). Greedy (temperature 0): a draft
// is accepted when it is the target's argmax, so the output is token for
// token that of Generate, provided the batched Forward gives each row the
// logits a single-token Forward would. Sampling: speculative sampling
// (SpeculativeAccept), whose output follows the target's distribution; the
// draws differ from Generate's for the same seed.
// Drafts never make the cache wrap: k shrinks so that the verified
// positions stay below both models' context (ring capacity), so no live KV
// entry is overwritten and rollback is always possible; past the context,
// decoding continues one token per pass as in Generate. k is also at most
// state.max_batch - 1 and the tokens still to generate - 1.
// Fills stats' speculative fields (drafted_tokens, accepted_tokens).
Status GenerateSpeculative(const Model& model, RunState& state, const std::vector<int>& prompt,
                           size_t steps, Sampler& sampler, const std::vector<int>& stop_tokens,
                           const std::function<void(int prev, int token)>& on_token,
                           GenerateStats* stats, const SpeculativeOptions& spec,
                           size_t start_pos = 0);

// ----------------------------------------------------------------------------
// Quality of a quantized model against its reference

struct EvalResult {
  size_t positions = 0;        // next-token predictions compared
  double mean_kl = 0.0;        // mean KL(P_reference || P_test), nats
  double top1_agreement = 0.0; // fraction of positions with the same argmax
  double perplexity_reference = 0.0;  // of the text under each model
  double perplexity_test = 0.0;
};

// Teacher-forces `tokens` through both models (same ModelConfig) and compares the
// next-token distributions at every position but the last. test_adapter
// (may be null) runs on `test`, e.g. a recovery adapter. The reference keeps
// f32 K/V; `test` uses test_kv_type, so the KL includes the KV cache's cost.
StatusOr<EvalResult> Evaluate(const Model& reference, const Model& test,
                              const std::vector<int>& tokens, size_t max_batch,
                              ThreadPool* pool = nullptr,
                              MatmulPrecision precision = MatmulPrecision::kInt8,
                              const Adapter* test_adapter = nullptr,
                              ElementType test_kv_type = ElementType::kF32);

// ----------------------------------------------------------------------------
// LoRA adapters (lutra/format/lora.h)

// The shapes an adapter for `model` must have.
BaseShapes AdapterShapes(const ModelConfig& config);

// Loads a LoRA adapter file (GGUF, llama.cpp layout; lutra/format/lora_file.h) for
// `model`, its scales multiplied by `scale`.
StatusOr<std::shared_ptr<const Adapter>> LoadLora(const std::string& path, float scale,
                                                  const Model& model);

// Rank-r accuracy-recovery adapter of a palettized model: the truncated SVD
// of each projection's quantization residual W - W_hat (lutra/quantize/recovery.h).
// With the palettized model's calibration statistics, the residual is
// weighted by sqrt(E[x^2]) of each input column before the SVD (and the
// weighting undone in A), so the rank goes where the activations are.
// `projections`: LoadOptions::recover_targets.
StatusOr<std::shared_ptr<const Adapter>> BuildRecoveryAdapter(
    const Model& f32_model, const Model& palettized, size_t rank, size_t threads,
    uint32_t projections = (1u << kNumProjections) - 1);

// ----------------------------------------------------------------------------
// End-to-end codebook tuning (tune.cc; docs/quality.md)
//
// A plain-C++ training forward and backward pass of the Llama block that
// Forward runs (RMSNorm, RoPE in the model's layout and inv_freq, GQA with a
// causal mask, SwiGLU, tied or untied head, q/k/v biases), on dense
// weights: a palettized model's are dequantized. Sequences always start at
// position 0 and are at most the context length; there is no KV cache.

struct TuneOptions {
  size_t steps = kTuneDefaultSteps;
  // Adam step size relative to each matrix's codebook RMS (and each norm
  // weight vector's RMS), decayed to 0 along a cosine over the steps.
  float lr = 1e-3f;
  size_t segment = 256;  // tokens per training sequence (<= the context length)
  size_t batch = 2;      // sequences per step
  bool norms = false;    // also tune the RMSNorm weights
  // Index tuning (codebook_tune.h StepIndices): Adam step size of the
  // weights' latent values relative to the codebook RMS, on the same cosine;
  // 0 keeps the indices fixed. 3e-3: held-out KL of 4-bit stories260K
  // 0.097 -> 0.073; 1e-2 moved too many indices and doubled it
  // (docs/quality.md).
  float index_lr = 3e-3f;
  uint64_t seed = 0x7E57;  // minibatch order: the result is deterministic
  ThreadPool* pool = nullptr;  // sequences of a batch in parallel
  // The f32 model's log-probabilities on the calibration text (tokens x
  // vocab floats) are kept when they fit in this, else recomputed per step.
  size_t max_teacher_bytes = size_t{256} << 20;
  // A LoRA adapter of the palettized model to train along (null: none),
  // e.g. BuildRecoveryAdapter's: the student's projections are W_hat +
  // scale B A, its factors start here, and the trained ones come back in
  // TuneReport::adapter (same targets, ranks, scales and element type).
  const Adapter* adapter = nullptr;
  // Adam step size of the factors relative to each factor's RMS, on the
  // same cosine as lr (so an all-zero factor stays zero: start from the SVD
  // adapter). 3e-3: --mixed 3.35 --recover-rank 1 on stories260K, held-out
  // KL 0.204; 1e-2: 0.210 (docs/lora.md).
  float adapter_lr = 3e-3f;
  // The text the steps train on (null: the calibration text). The KL in
  // TuneReport stays the calibration text's. PalettizeModel samples a fresh
  // text of steps x batch x segment tokens, so that no sequence is seen
  // twice: the tuned model then fits the model's distribution instead of
  // the sequences it saw (docs/quality.md).
  const std::vector<int>* train_text = nullptr;
};

struct TuneReport {
  std::shared_ptr<const Adapter> adapter;  // TuneOptions::adapter, trained
  size_t steps = 0, matrices = 0, tokens = 0;  // tokens: of the training text
  size_t changed_indices = 0, indices = 0;  // index tuning: moved / all
  double kl_before = 0.0, kl_after = 0.0;  // mean KL on the calibration text
  double seconds = 0.0;
};

// Tunes the codebook entries of `palettized`'s matrices of width <= 4 (and
// its norm weights with options.norms, its indices with options.index_lr)
// to minimise the mean KL(P_f32 || P_palettized) over `calib`, cut into
// sequences of options.segment tokens. The entries are rounded to their
// stored type and the kernels' tables rebuilt (Model::Prepare). The two models must have the
// same config; `f32_model` must be f32.
StatusOr<TuneReport> TuneCodebooks(const Model& f32_model, Model& palettized,
                                   const std::vector<int>& calib, const TuneOptions& options);

// The training forward pass's logits (n x vocab, row-major) for tokens at
// positions 0..n-1 (n <= the context length); f64: computed in double;
// adapter (may be null): its scale B A added to the layer projections. For
// checking the training code against Forward.
StatusOr<std::vector<float>> TrainingLogits(const Model& model, const int* tokens, size_t n,
                                            bool f64 = false, const Adapter* adapter = nullptr);

// Mean over the n positions of KL(softmax(teacher_logits) || P_model) and,
// when `grads` is non-null, its gradient w.r.t. every dense parameter:
// Matrices() order (rows x cols each), then per layer attn_norm and
// ffn_norm, then final_norm (dim each). f64: in double (gradient checks).
StatusOr<double> DistillationLoss(const Model& model, const int* tokens, size_t n,
                                  const float* teacher_logits, bool f64,
                                  std::vector<std::vector<double>>* grads);

}  // namespace engine
}  // namespace lutra

#endif  // LUTRA_EXAMPLES_ENGINE_H_
