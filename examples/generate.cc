// lutra-generate: text generation from llama2.c, GGUF or .lutra model files
// (or random weights at a named shape), with weights palettized at load.
// The model code lives in engine.h/.cc and model.cc; this file is the
// command line: options, loading, then generate / evaluate / save.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "examples/dispatch.h"
#include "examples/engine.h"
#include "lutra/format/tokenizer.h"
#include "lutra/runtime/lora_manager.h"
#include "lutra/runtime/sampling.h"

namespace {

using lutra::Status;
using lutra::StatusOr;
namespace engine = lutra::engine;

struct Options {
  std::string model;        // .bin (llama2.c), .gguf or .lutra
  std::string synthetic;    // tiny | 1b | afm | <shape>:<layers>
  std::string tokenizer;    // llama2.c tokenizer.bin (GGUF/.lutra carry their own)
  std::string prompt;
  size_t steps = 256;
  float temperature = 1.0f;
  float top_p = 0.9f;
  uint64_t seed = 0;        // 0: from the clock
  size_t threads = 1;
  engine::LoadOptions load;
  lutra::ElementType kv_type = lutra::ElementType::kF32;
  lutra::MatmulPrecision precision = lutra::MatmulPrecision::kInt8;
  std::string save;         // write a .lutra file and exit
  bool eval = false;
  std::string eval_text;
  size_t eval_tokens = 256;
  size_t batch = 64;        // prefill chunk
  std::vector<std::string> loras;  // FILE[:SCALE]
  std::string prompts_file;        // lines "[ADAPTER<TAB>]PROMPT"
  size_t recover_rank = 0;         // > 0: build a recovery adapter
  std::string calib_file;          // --calib-text FILE
  bool show_map = false;           // print the per-tensor table
  bool group_given = false, groups_given = false, calib_given = false;
};

void PrintUsage(FILE* out) {
  fprintf(out,
          "Usage: lutra-generate (--model FILE | --synthetic SHAPE) [options]\n"
          "\n"
          "Model:\n"
          "  --model FILE        llama2.c checkpoint (.bin), GGUF v3 Llama model (.gguf:\n"
          "                      F32/F16/BF16/Q8_0 tensors) or palettized .lutra file\n"
          "  --synthetic SHAPE   random weights: tiny, 1b, afm (or SHAPE:LAYERS, e.g. afm:4)\n"
          "  --tokenizer FILE    llama2.c tokenizer.bin (GGUF/.lutra carry their own)\n"
          "  --ctx N             context length / KV cache capacity (default: the model's)\n"
          "Palettization at load (default: f32 weights):\n"
          "  --bits B            index width 1, 2, 3, 4, 6 or 8\n"
          "  --mixed BPW         widths 2/3/4/6/8 and G chosen per tensor within BPW bits\n"
          "                      per weight, codebooks included (e.g. 3.5; >= 1)\n"
          "  --group G           rows sharing one codebook (default 16; with --mixed: G\n"
          "                      fixed for all tensors)\n"
          "  --groups G1,G2,..   --mixed: the G to choose from (default 1,2,4,8,16)\n"
          "  --calib-text FILE   calibration text (default: sampled from the f32 model)\n"
          "  --calib-tokens N    calibration tokens sampled when no file (default 2048;\n"
          "                      64 above 100 M weights)\n"
          "  --calib-seed S      seed of the sampled calibration text\n"
          "  --calib MODE        on (default): activation-weighted k-means; off: plain\n"
          "                      (--synthetic: random palettes unless --calib on)\n"
          "  --sensitivity MODE  --mixed: auto (default), measured or weighted\n"
          "  --gptq on|off       error feedback at <= 4 bits when the Gram matrices fit\n"
          "                      (default on)\n"
          "  --show-map          print each tensor's bits, G and error (stderr)\n"
          "  --save FILE.lutra   write the (palettized) model to FILE.lutra and exit;\n"
          "                      later runs map it with --model FILE.lutra\n"
          "Generation:\n"
          "  --prompt TEXT       prompt (default: empty, i.e. BOS only)\n"
          "  --steps N           positions including the prompt's (default 256)\n"
          "  --temp T            temperature, 0 = greedy (default 1.0)\n"
          "  --topp P            nucleus sampling mass (default 0.9)\n"
          "  --seed S            random seed (default: time)\n"
          "  --threads N         worker threads (default 1)\n"
          "  --kv-type T         KV cache element type: f32 (default), f16, bf16, int8\n"
          "  --precision P       palettized matmuls: int8 (default: u8 codebooks x int8\n"
          "                      activations, fast) or f32 (exact codebook values)\n"
          "Quality (--eval): KL divergence, top-1 agreement and perplexity of the\n"
          "palettized model against the f32 model on --eval-text, or on text sampled\n"
          "from the f32 model when absent:\n"
          "  --eval              run the evaluation instead of generating\n"
          "  --eval-text TEXT    text to evaluate on\n"
          "  --eval-file FILE    text to evaluate on, from a file\n"
          "  --eval-tokens N     tokens to evaluate (default 256)\n"
          "LoRA adapters (lutra/format/lora_file.h: llama.cpp GGUF adapter layout):\n"
          "  --lora FILE[:SCALE] load an adapter (repeatable); the first one is active\n"
          "  --recover-rank R    build a rank-R accuracy-recovery adapter for the\n"
          "                      palettized weights (needs --bits/--mixed; named\n"
          "                      'recovery', active unless a --lora is given)\n"
          "  --prompts-file FILE one prompt per line, optionally 'ADAPTER<TAB>PROMPT' to\n"
          "                      switch adapters per prompt ('-' for none)\n"
          "  --help              this text\n");
}

// The whole file at `path` as text; an error for a missing or empty file.
StatusOr<std::string> ReadTextFile(const std::string& path) {
  FILE* f = fopen(path.c_str(), "rb");
  if (f == nullptr) return lutra::NotFound("cannot open %s", path.c_str());
  std::string text;
  char buf[65536];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), f)) > 0) text.append(buf, n);
  const bool failed = ferror(f) != 0;
  fclose(f);
  if (failed) return lutra::DataLoss("cannot read %s", path.c_str());
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
  if (text.empty()) return lutra::InvalidArgument("%s is empty", path.c_str());
  return text;
}

// Parses a whole-string number; false on garbage or out of range.
bool ParseSize(const char* s, size_t lo, size_t hi, size_t* out) {
  char* end = nullptr;
  const long long v = strtoll(s, &end, 10);
  if (end == s || *end != '\0' || v < (long long)lo || v > (long long)hi) return false;
  *out = size_t(v);
  return true;
}
bool ParseFloat(const char* s, double lo, double hi, double* out) {
  char* end = nullptr;
  const double v = strtod(s, &end);
  if (end == s || *end != '\0' || !(v >= lo && v <= hi)) return false;
  *out = v;
  return true;
}

Status ParseArgs(int argc, char** argv, Options* o, bool* help) {
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      *help = true;
      return Status();
    }
    if (flag == "--eval") {
      o->eval = true;
      continue;
    }
    if (flag == "--show-map") {
      o->show_map = true;
      continue;
    }
    if (i + 1 >= argc) return lutra::InvalidArgument("%s needs a value", flag.c_str());
    const char* value = argv[++i];
    size_t n = 0;
    double d = 0.0;
    auto bad = [&](const char* what) {
      return lutra::InvalidArgument("%s %s: expected %s", flag.c_str(), value, what);
    };
    if (flag == "--model") {
      o->model = value;
    } else if (flag == "--synthetic") {
      o->synthetic = value;
    } else if (flag == "--tokenizer") {
      o->tokenizer = value;
    } else if (flag == "--prompt") {
      o->prompt = value;
    } else if (flag == "--steps") {
      if (!ParseSize(value, 1, 1 << 24, &o->steps)) return bad("an integer >= 1");
    } else if (flag == "--temp") {
      if (!ParseFloat(value, 0.0, 100.0, &d)) return bad("a number in [0, 100]");
      o->temperature = float(d);
    } else if (flag == "--topp") {
      if (!ParseFloat(value, 0.0, 1.0, &d)) return bad("a number in [0, 1]");
      o->top_p = float(d);
    } else if (flag == "--seed") {
      if (!ParseSize(value, 0, size_t(1) << 62, &n)) return bad("an integer >= 0");
      o->seed = n;
    } else if (flag == "--threads") {
      if (!ParseSize(value, 1, 256, &o->threads)) return bad("an integer in [1, 256]");
    } else if (flag == "--bits") {
      if (!ParseSize(value, 1, 8, &n) || !lutra::IsValidPaletteBits(int(n))) {
        return bad("one of 1, 2, 3, 4, 6, 8");
      }
      o->load.bits = int(n);
    } else if (flag == "--mixed") {
      if (!ParseFloat(value, 1.0, 8.0, &d)) {
        return bad("bits per weight in [1, 8] (codebooks included; nothing fits below 1)");
      }
      o->load.mixed_bits = d;
    } else if (flag == "--group") {
      if (!ParseSize(value, 1, 1 << 20, &o->load.group)) return bad("an integer in [1, 2^20]");
      o->group_given = true;
    } else if (flag == "--groups") {
      o->load.groups.clear();
      for (const char* p = value; *p != '\0';) {
        const char* comma = strchr(p, ',');
        const std::string item = comma ? std::string(p, comma) : std::string(p);
        if (!ParseSize(item.c_str(), 1, 1 << 20, &n)) return bad("a list like 1,4,16 of G in [1, 2^20]");
        o->load.groups.push_back(n);
        p = comma ? comma + 1 : p + item.size();
      }
      if (o->load.groups.empty()) return bad("a list like 1,4,16");
      o->groups_given = true;
    } else if (flag == "--calib-text") {
      o->calib_file = value;
    } else if (flag == "--calib-tokens") {
      if (!ParseSize(value, 1, 1 << 24, &o->load.calib_tokens)) return bad("an integer >= 1");
    } else if (flag == "--calib-seed") {
      if (!ParseSize(value, 0, size_t(1) << 62, &n)) return bad("an integer >= 0");
      o->load.calib_seed = n;
    } else if (flag == "--calib") {
      const std::string v = value;
      if (v != "on" && v != "off") return bad("on or off");
      o->load.calibrate = v == "on";
      o->calib_given = true;
    } else if (flag == "--gptq") {
      const std::string v = value;
      if (v != "on" && v != "off") return bad("on or off");
      o->load.gptq = v == "on";
    } else if (flag == "--sensitivity") {
      const std::string v = value;
      if (v == "auto") {
        o->load.sensitivity = engine::Sensitivity::kAuto;
      } else if (v == "measured") {
        o->load.sensitivity = engine::Sensitivity::kMeasured;
      } else if (v == "weighted") {
        o->load.sensitivity = engine::Sensitivity::kWeighted;
      } else {
        return bad("auto, measured or weighted");
      }
    } else if (flag == "--ctx") {
      if (!ParseSize(value, 1, 1 << 20, &n)) return bad("an integer >= 1");
      o->load.seq_len = int(n);
    } else if (flag == "--kv-type") {
      const std::string v = value;
      if (v == "f32") {
        o->kv_type = lutra::ElementType::kF32;
      } else if (v == "f16") {
        o->kv_type = lutra::ElementType::kF16;
      } else if (v == "bf16") {
        o->kv_type = lutra::ElementType::kBF16;
      } else if (v == "int8") {
        o->kv_type = lutra::ElementType::kI8;
      } else {
        return bad("f32, f16, bf16 or int8");
      }
    } else if (flag == "--precision") {
      const std::string v = value;
      if (v != "int8" && v != "f32") return bad("int8 or f32");
      o->precision = v == "f32" ? lutra::MatmulPrecision::kF32 : lutra::MatmulPrecision::kInt8;
    } else if (flag == "--save") {
      o->save = value;
    } else if (flag == "--lora") {
      o->loras.push_back(value);
    } else if (flag == "--prompts-file") {
      o->prompts_file = value;
    } else if (flag == "--recover-rank") {
      if (!ParseSize(value, 1, lutra::kMaxLoraRank, &o->recover_rank)) {
        return bad("a rank in [1, 64]");
      }
    } else if (flag == "--eval-text") {
      o->eval_text = value;
    } else if (flag == "--eval-file") {
      StatusOr<std::string> text = ReadTextFile(value);
      if (!text.ok()) return text.status().WithContext("--eval-file");
      o->eval_text = std::move(*text);
    } else if (flag == "--eval-tokens") {
      if (!ParseSize(value, 2, 1 << 20, &o->eval_tokens)) return bad("an integer >= 2");
    } else {
      return lutra::InvalidArgument("unknown option %s (see --help)", flag.c_str());
    }
  }
  if (o->model.empty() == o->synthetic.empty()) {
    return lutra::InvalidArgument("give exactly one of --model FILE or --synthetic SHAPE");
  }
  if (o->load.bits != 0 && o->load.mixed_bits != 0.0) {
    return lutra::InvalidArgument("--bits and --mixed are exclusive");
  }
  if (o->group_given && o->groups_given) {
    return lutra::InvalidArgument("--group and --groups are exclusive");
  }
  if (o->group_given) o->load.groups = {o->load.group};
  const bool palettize = o->load.bits != 0 || o->load.mixed_bits != 0.0;
  if ((o->eval || o->recover_rank > 0) && !palettize) {
    return lutra::InvalidArgument("%s needs --bits B or --mixed BPW (a palettized model)",
                                  o->eval ? "--eval" : "--recover-rank");
  }
  return Status();
}

int Fail(const Status& status) {
  fprintf(stderr, "lutra-generate: error: %s\n", status.message().c_str());
  return 1;
}

// --tokenizer, else the model file's vocabulary, else (synthetic) bytes.
StatusOr<std::shared_ptr<const lutra::Tokenizer>> GetTokenizer(const Options& o,
                                                               const engine::Model& model) {
  if (!o.synthetic.empty() && o.tokenizer.empty()) {
    StatusOr<lutra::Tokenizer> t = engine::ByteTokenizer(model.config.vocab_size);
    if (!t.ok()) return t.status();
    return std::shared_ptr<const lutra::Tokenizer>(new lutra::Tokenizer(std::move(*t)));
  }
  StatusOr<std::shared_ptr<const lutra::Tokenizer>> t = engine::LoadTokenizer(o.tokenizer, model);
  if (!t.ok() && o.tokenizer.empty()) {
    return t.status().WithContext(o.model + " (give --tokenizer FILE, a llama2.c tokenizer.bin)");
  }
  return t;
}

// Writes a piece to stdout, skipping unprintable single bytes (llama2.c's
// safe_printf), so raw byte tokens cannot garble the terminal.
void PrintPiece(std::string_view piece) {
  if (piece.size() == 1 && !isprint((unsigned char)piece[0]) && !isspace((unsigned char)piece[0])) {
    return;
  }
  fwrite(piece.data(), 1, piece.size(), stdout);
  fflush(stdout);
}

// The sampler for --temp/--topp/--seed at `temperature` (0: greedy). --topp 0
// or 1 turns the nucleus off, as in llama2.c.
StatusOr<lutra::Sampler> MakeSampler(const Options& o, float temperature, size_t vocab) {
  lutra::SamplingConfig config;
  config.temperature = temperature;
  config.top_p = o.top_p > 0.0f && o.top_p < 1.0f ? o.top_p : 1.0f;
  config.seed = o.seed;
  return lutra::Sampler::Create(vocab, config);
}

int RunGenerate(const Options& o, const engine::Model& model, const lutra::Tokenizer& tok,
                lutra::ThreadPool* pool, const std::string& prompt_text,
                const lutra::Adapter* adapter, size_t adapter_bytes) {
  StatusOr<std::vector<int>> prompt = tok.Encode(prompt_text, /*add_bos=*/true);
  if (!prompt.ok()) return Fail(prompt.status());
  if (prompt->size() > size_t(model.config.seq_len)) {
    return Fail(lutra::InvalidArgument("prompt of %zu tokens exceeds the context of %d",
                                       prompt->size(), model.config.seq_len));
  }
  StatusOr<engine::RunState> state = engine::MakeRunState(model.config, o.batch, o.kv_type);
  if (!state.ok()) return Fail(state.status());
  state->pool = pool;
  state->precision = o.precision;
  state->adapter = adapter;

  // The prompt is echoed first, as llama2.c does.
  int prev = -1;
  for (int t : *prompt) {
    StatusOr<std::string_view> piece = tok.Decode(prev, t);
    if (piece.ok()) PrintPiece(*piece);
    prev = t;
  }
  StatusOr<lutra::Sampler> sampler = MakeSampler(o, o.temperature, model.config.vocab_size);
  if (!sampler.ok()) return Fail(sampler.status());
  std::vector<int> stop = {tok.bos_id()};
  if (tok.eos_id() >= 0) stop.push_back(tok.eos_id());
  engine::GenerateStats st;
  Status status = engine::Generate(
      model, *state, *prompt, o.steps, *sampler, stop,
      [&](int prev_token, int token) {
        StatusOr<std::string_view> piece = tok.Decode(prev_token, token);
        if (piece.ok()) PrintPiece(*piece);
      },
      &st);
  printf("\n");
  fflush(stdout);
  if (!status.ok()) return Fail(status);
  const double ttft_ms = st.prefill_seconds * 1e3;
  fprintf(stderr,
          "stats: prompt %zu tokens, time to first token %.1f ms (%.2f ms/prompt token), "
          "decode %zu tokens at %.1f tokens/s, weights %.1f MiB at %.2f bits/weight, "
          "adapters %.1f KiB (active: %s), %zu thread%s, %s\n",
          st.prompt_tokens, ttft_ms, ttft_ms / double(st.prompt_tokens), st.decode_tokens,
          st.decode_seconds > 0 ? double(st.decode_tokens) / st.decode_seconds : 0.0,
          model.WeightBytes() / 1048576.0, model.BitsPerWeight(), adapter_bytes / 1024.0,
          adapter ? adapter->name().c_str() : "none", o.threads, o.threads == 1 ? "" : "s",
          lutra::dispatch::TargetName());
  return 0;
}

// --eval: the palettized `test` model against its f32 `reference` on
// --eval-text, or on text the reference samples itself.
int RunEval(const Options& o, const engine::Model& reference, const engine::Model& test,
            const lutra::Tokenizer& tok, lutra::ThreadPool* pool, const lutra::Adapter* adapter) {
  const size_t max_tokens = std::min(o.eval_tokens, size_t(reference.config.seq_len));
  std::vector<int> tokens;
  if (!o.eval_text.empty()) {
    StatusOr<std::vector<int>> t = tok.Encode(o.eval_text, /*add_bos=*/true);
    if (!t.ok()) return Fail(t.status());
    tokens = std::move(*t);
    if (tokens.size() > max_tokens) tokens.resize(max_tokens);
  } else {
    StatusOr<engine::RunState> state = engine::MakeRunState(reference.config, o.batch);
    if (!state.ok()) return Fail(state.status());
    state->pool = pool;
    StatusOr<lutra::Sampler> sampler = MakeSampler(
        o, o.temperature > 0.0f ? o.temperature : 1.0f, reference.config.vocab_size);
    if (!sampler.ok()) return Fail(sampler.status());
    StatusOr<std::vector<int>> prompt = tok.Encode(o.prompt, /*add_bos=*/true);
    if (!prompt.ok()) return Fail(prompt.status());
    tokens = *prompt;
    Status s = engine::Generate(reference, *state, *prompt, max_tokens - 1, *sampler, {},
                                [&](int, int token) { tokens.push_back(token); }, nullptr);
    if (!s.ok()) return Fail(s);
  }
  if (tokens.size() < 2) return Fail(lutra::InvalidArgument("--eval: need at least 2 tokens"));
  for (const lutra::Adapter* a : {static_cast<const lutra::Adapter*>(nullptr), adapter}) {
    StatusOr<engine::EvalResult> r =
        engine::Evaluate(reference, test, tokens, o.batch, pool, o.precision, a);
    if (!r.ok()) return Fail(r.status());
    printf("eval on %s: %zu positions, mean KL(f32 || palettized%s%s) %.4f nats, top-1 "
           "agreement %.1f%%, perplexity f32 %.3f -> palettized %.3f (%.2f bits/weight%s, %s "
           "kernels)\n",
           o.eval_text.empty() ? "text sampled from the f32 model" : "--eval-text", r->positions,
           a ? " + " : "", a ? a->name().c_str() : "", r->mean_kl, 100.0 * r->top1_agreement,
           r->perplexity_reference, r->perplexity_test,
           test.BitsPerWeight() +
               (a ? 8.0 * double(a->bytes()) / double(std::max<size_t>(test.MatrixWeights(), 1))
                  : 0.0),
           a ? " with the adapter" : "", lutra::MatmulPrecisionName(o.precision));
    if (adapter == nullptr) break;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  bool help = false;
  Status parsed = ParseArgs(argc, argv, &o, &help);
  if (help) {
    PrintUsage(stdout);
    return 0;
  }
  if (!parsed.ok()) {
    Fail(parsed);
    PrintUsage(stderr);
    return 2;
  }
  if (o.seed == 0) {
    o.seed = uint64_t(std::chrono::system_clock::now().time_since_epoch().count());
  }
  o.load.progress = true;

  // Load the model, f32 unless it is a palettized .lutra, then palettize it
  // here once the tokenizer is known (--calib-text needs it). --eval and
  // --recover-rank keep the f32 model too. Synthetic models get random
  // palettes directly (no k-means over billions of random floats) unless
  // --calib on asks for a real, calibrated palettization.
  const bool palettize = o.load.bits != 0 || o.load.mixed_bits != 0.0;
  const bool keep_f32 = o.eval || o.recover_rank > 0;
  const bool random_palettes = !o.synthetic.empty() && !keep_f32 && !o.calib_given;
  engine::LoadOptions load = o.load;
  if (!random_palettes) load.bits = 0, load.mixed_bits = 0.0;
  StatusOr<engine::Model> model =
      o.synthetic.empty() ? engine::OpenModel(o.model, load, o.threads)
                          : engine::MakeSyntheticModel(o.synthetic, load, o.seed);
  if (!model.ok()) return Fail(model.status());
  const bool already = model->weights.embedding.palettized() && !random_palettes;
  if (keep_f32 && already) {
    return Fail(lutra::InvalidArgument("--eval and --recover-rank need an f32 source model "
                                       "(.bin, .gguf or --synthetic), not a palettized .lutra"));
  }
  if (palettize && already) {
    return Fail(lutra::InvalidArgument("%s is already palettized: drop --bits/--mixed",
                                       o.model.c_str()));
  }
  StatusOr<std::shared_ptr<const lutra::Tokenizer>> tokenizer = GetTokenizer(o, *model);
  if (!tokenizer.ok()) return Fail(tokenizer.status());
  std::unique_ptr<engine::Model> f32;
  if (palettize && !random_palettes) {
    engine::LoadOptions q = o.load;
    q.calib_bos = (*tokenizer)->bos_id();
    if (!o.calib_file.empty()) {
      StatusOr<std::string> text = ReadTextFile(o.calib_file);
      if (!text.ok()) return Fail(text.status().WithContext("--calib-text"));
      StatusOr<std::vector<int>> ids = (*tokenizer)->Encode(*text, /*add_bos=*/true);
      if (!ids.ok()) return Fail(ids.status().WithContext("--calib-text"));
      q.calib_text = std::move(*ids);
    }
    StatusOr<engine::Model> pal = engine::PalettizeModel(*model, q, o.threads);
    if (!pal.ok()) return Fail(pal.status());
    fprintf(stderr, "%s\n", pal->quantization.c_str());
    if (o.show_map) fprintf(stderr, "%s", pal->quantization_table.c_str());
    if (keep_f32) f32 = std::make_unique<engine::Model>(std::move(*model));
    *model = std::move(*pal);
  }
  if (!o.save.empty()) {
    Status saved = engine::SaveLutraModel(*model, tokenizer->get(), o.save);
    if (!saved.ok()) return Fail(saved);
    fprintf(stderr, "saved %s: %.1f MiB of weights at %.2f bits per weight\n", o.save.c_str(),
            model->WeightBytes() / 1048576.0, model->BitsPerWeight());
    return 0;
  }

  // Adapters by name: --lora files, then the recovery adapter, all resident
  // (no budget); the first is the one --prompt runs with.
  lutra::AdapterManager adapters(SIZE_MAX);
  std::shared_ptr<const lutra::Adapter> active;
  auto add_adapter = [&](std::shared_ptr<const lutra::Adapter> a) -> Status {
    LUTRA_RETURN_IF_ERROR(adapters.Register(
        a->name(), [a]() -> StatusOr<lutra::AdapterManager::AdapterPtr> { return a; }));
    if (!active) active = a;
    return adapters.Get(a->name()).status();
  };
  for (const std::string& spec : o.loras) {
    std::string path = spec;
    double scale = 1.0;
    const size_t colon = spec.rfind(':');
    if (colon != std::string::npos && ParseFloat(spec.c_str() + colon + 1, -100.0, 100.0, &scale)) {
      path = spec.substr(0, colon);
    }
    StatusOr<std::shared_ptr<const lutra::Adapter>> a =
        engine::LoadLora(path, float(scale), *model);
    if (!a.ok()) return Fail(a.status());
    Status added = add_adapter(*a);
    if (!added.ok()) return Fail(added);
  }
  if (o.recover_rank > 0) {
    StatusOr<std::shared_ptr<const lutra::Adapter>> a =
        engine::BuildRecoveryAdapter(*f32, *model, o.recover_rank, o.threads);
    if (!a.ok()) return Fail(a.status());
    Status added = add_adapter(*a);
    if (!added.ok()) return Fail(added);
  }
  if (!o.eval) f32.reset();  // only the palettized weights stay in memory

  lutra::ThreadPool pool(o.threads);
  if (o.eval) return RunEval(o, *f32, *model, **tokenizer, &pool, active.get());
  if (o.prompts_file.empty()) {
    return RunGenerate(o, *model, **tokenizer, &pool, o.prompt, active.get(),
                       adapters.resident_bytes());
  }
  // Batch mode: one generation per line, each with its own adapter.
  FILE* f = fopen(o.prompts_file.c_str(), "r");
  if (f == nullptr) {
    return Fail(lutra::NotFound("cannot open --prompts-file %s", o.prompts_file.c_str()));
  }
  char line[4096];
  int rc = 0;
  while (rc == 0 && fgets(line, sizeof(line), f) != nullptr) {
    std::string text = line;
    while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
    if (text.empty()) continue;
    std::shared_ptr<const lutra::Adapter> adapter = active;
    const size_t tab = text.find('\t');
    if (tab != std::string::npos) {
      const std::string name = text.substr(0, tab);
      text = text.substr(tab + 1);
      adapter = nullptr;
      if (name != "-") {
        StatusOr<std::shared_ptr<const lutra::Adapter>> a = adapters.Get(name);
        if (!a.ok()) {
          rc = Fail(lutra::NotFound("--prompts-file: no adapter named '%s'", name.c_str()));
          break;
        }
        adapter = *a;
      }
    }
    fprintf(stderr, "[adapter: %s]\n", adapter ? adapter->name().c_str() : "none");
    rc = RunGenerate(o, *model, **tokenizer, &pool, text, adapter.get(),
                     adapters.resident_bytes());
  }
  fclose(f);
  return rc;
}
