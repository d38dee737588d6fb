// lutra-generate: text generation from llama2.c, GGUF or .lutra model files
// (or random weights at a named shape), with weights palettized at load.
// The model code lives in engine.h/.cc and model.cc; this file is the
// command line: options, loading, then generate / evaluate / save.
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "lutra/dispatch.h"
#include "examples/engine.h"
#include "lutra/format/gguf.h"
#include "lutra/format/lora_file.h"
#include "lutra/format/lutra_file.h"
#include "lutra/format/tokenizer.h"
#include "lutra/runtime/chat_template.h"
#include "lutra/runtime/lora_manager.h"
#include "lutra/runtime/sampling.h"

namespace {

using lutra::Status;
using lutra::StatusOr;
namespace engine = lutra::engine;

// The KV cache's largest capacity (--ctx).
constexpr size_t kMaxContext = size_t(1) << 20;
// -n when neither -n nor --steps is given: up to this many new tokens,
// silently fewer when the context is shorter.
constexpr long long kDefaultNewTokens = 256;
// Most tokens drafted per verify pass (--lookup, --draft-max): beyond a few
// drafts acceptance, not the pass, limits the gain.
constexpr size_t kMaxDrafts = 31;

struct LoraSpec {
  std::string path;
  double scale = 1.0;
};

struct Options {
  std::string model;        // .bin (llama2.c), .gguf or .lutra
  std::string synthetic;    // tiny | 1b | afm | <shape>:<layers>
  std::string tokenizer;    // llama2.c tokenizer.bin (GGUF/.lutra carry their own)
  std::string prompt;
  long long n_predict = -2;  // -n: new tokens; -1 until EOS or full context; -2 not given
  size_t steps = 0;          // --steps (llama2.c): positions including the prompt; 0 not given
  float temperature = 1.0f;
  float top_p = 0.9f;
  size_t top_k = 0;
  float min_p = 0.0f;
  float repeat_penalty = 1.0f;
  long long repeat_last_n = 64;  // -1: the context length
  long long seed = -1;           // -1: from the clock
  // Every core by default (0 from hardware_concurrency: unknown, 1).
  size_t threads = std::max(1u, std::thread::hardware_concurrency());
  engine::LoadOptions load;
  // f16 halves the KV bytes that decode streams per token at a quality cost
  // below the measurement noise of --eval (docs/attention.md).
  lutra::ElementType kv_type = lutra::ElementType::kF16;
  std::string kv_type_k, kv_type_v;  // -ctk / -ctv as given (must agree)
  lutra::MatmulPrecision precision = lutra::MatmulPrecision::kInt8;
  std::string save;         // write a .lutra file and exit
  bool eval = false;
  std::string eval_text;
  std::string eval_ref;  // the f32 source of a palettized --model (.lutra)
  size_t eval_tokens = 256;
  size_t batch = 64;        // prefill chunk
  std::vector<LoraSpec> loras;
  std::string prompts_file;        // lines "[ADAPTER<TAB>]PROMPT"
  size_t recover_rank = 0;         // > 0: build a recovery adapter
  bool recover_targets_given = false;
  std::string calib_file;          // --calib-text FILE
  bool show_map = false;           // print the per-tensor table
  bool group_given = false, groups_given = false, calib_given = false;
  std::string stats_json;          // --stats-json FILE
  bool tokenize = false;           // --tokenize / --tokenize-file: print ids, exit
  std::string tokenize_text;
  bool add_bos = false;
  bool chat = false;               // --chat / -cnv
  std::string system_prompt;
  std::string chat_template;       // chatml | llama3 | llama2 (empty: from the model)
  bool no_mmap = false;            // --no-mmap: read the model into memory
  bool max_memory_given = false;   // else DefaultMaxMemory()
  // Speculative decoding (docs/generate.md "Speculative decoding").
  size_t lookup = 0;               // --lookup N: prompt-lookup drafts; 0 off
  size_t parallel = 1;             // --parallel N: --prompts-file lines decoded together
  std::string draft;               // --draft FILE: draft model
  int draft_bits = 0;              // --draft-bits B: draft palettized at B bits
  size_t draft_max = 4;            // --draft-max K: draft model's tokens per step
  bool draft_max_given = false;
  bool compare = false;            // --compare: also run without speculation
  bool Speculative() const { return lookup > 0 || !draft.empty() || draft_bits != 0; }
};

void PrintUsage(FILE* out) {
  fprintf(out,
          "Usage: lutra-generate (-m FILE | --synthetic SHAPE) [options]\n"
          "Options taking a value accept --flag VALUE and --flag=VALUE.\n"
          "\n"
          "Model:\n"
          "  -m, --model FILE    llama2.c checkpoint (.bin), GGUF v3 llama/qwen2 model\n"
          "                      (.gguf: F32/F16/BF16, Q4_0..Q8_0, Q2_K..Q6_K, IQ4_NL/XS\n"
          "                      tensors, see docs/models.md) or palettized .lutra file\n"
          "  --synthetic SHAPE   random weights: tiny, 1b, afm (or SHAPE:LAYERS, e.g. afm:4)\n"
          "  --tokenizer FILE    llama2.c tokenizer.bin (GGUF/.lutra carry their own)\n"
          "  -c, --ctx-size N    context length / KV cache capacity, up to 2^20 (default\n"
          "                      or 0: the model's; --ctx N is the same)\n"
          "  --max-memory SIZE   most memory loading may allocate: model heap (file read\n"
          "                      in, f32 conversions, tables, palettized copy) plus the\n"
          "                      KV cache; e.g. 512M, 8G, or bytes; 0 = no limit (default:\n"
          "                      physical RAM less 1/8, at least 256M less)\n"
          "  --no-mmap           read the model file into memory instead of mapping it\n"
          "                      (for files that may change or shrink while in use)\n"
          "Palettization at load (default: f32 weights):\n"
          "  --bits B            index width 1, 2, 3, 4, 6 or 8\n"
          "  --mixed BPW         widths 2/3/4/6/8 and G chosen per tensor within BPW bits\n"
          "                      per weight, codebooks included (e.g. 3.5; >= 1)\n"
          "  --group G           rows sharing one codebook (default 16; with --mixed: G\n"
          "                      fixed for all tensors)\n"
          "  --groups G1,G2,..   --mixed: the G to choose from (default 1,2,4,8,16)\n"
          "  --calib-text FILE   calibration text (default: sampled from the f32 model)\n"
          "  --calib-tokens N    calibration tokens sampled when no file (default 2048;\n"
          "                      32768 with tuning, up to 2 M weights; 64 above 100 M)\n"
          "  --calib-seed S      seed of the sampled calibration text\n"
          "  --calib MODE        on (default): activation-weighted k-means; off: plain\n"
          "                      (--synthetic: random palettes unless --calib on)\n"
          "  --sensitivity MODE  --mixed: auto (default), measured or weighted\n"
          "  --gptq on|off       error feedback at <= 4 bits when the Gram matrices fit\n"
          "                      (default on)\n"
          "  --tune-steps N      end-to-end codebook tuning steps against the f32 model\n"
          "                      (default 2400 on the smallest models, 640 at 1 M\n"
          "                      weights, 320 at 2 M, 0 above 2 M);\n"
          "                      --tune on|off: the default count even above 2 M / 0\n"
          "  --tune-norms on|off also tune the RMSNorm weights (default on)\n"
          "  --tune-indices on|off also move weights to other codebook entries\n"
          "                      (straight-through latents; default on)\n"
          "  --tune-fresh on|off tune on fresh sampled text, each sequence once\n"
          "                      (default on up to 2 M weights; off: cycle the\n"
          "                      calibration text)\n"
          "  --show-map          print each tensor's bits, G and error (stderr)\n"
          "  --save FILE.lutra   write the (palettized) model to FILE.lutra and exit;\n"
          "                      later runs map it with --model FILE.lutra\n"
          "Generation:\n"
          "  -p, --prompt TEXT   prompt (default: empty, i.e. BOS only)\n"
          "  -f, --file FILE     prompt from a file\n"
          "  -n, --n-predict N   new tokens to generate; -1: until end of sequence or the\n"
          "                      context is full (default 256, fewer if the context is\n"
          "                      shorter); prompt + N beyond the context is an error\n"
          "  --steps N           llama2.c's count instead of -n: positions including the\n"
          "                      prompt's; may run past the context over a sliding window\n"
          "  --temp T            temperature, 0 = greedy (default 1.0)\n"
          "  --top-k K           keep the K most probable tokens, 0 = all (default 0)\n"
          "  --top-p P           nucleus sampling mass, 1 = off (default 0.9; --topp too)\n"
          "  --min-p P           keep tokens with probability >= P x the top one's\n"
          "                      (before temperature), 0 = off (default 0)\n"
          "  --repeat-penalty R  penalize the last --repeat-last-n tokens: positive logits\n"
          "                      / R, negative x R; 1 = off (default 1)\n"
          "  --repeat-last-n N   tokens the penalty looks back, 0 = off, -1 = context\n"
          "                      (default 64)\n"
          "  -s, --seed S        random seed, -1 = from the clock (default -1)\n"
          "  -t, --threads N     worker threads (default: the number of cores)\n"
          "  --kv-type T         KV cache element type: f32, f16 (default), bf16, int8\n"
          "  -ctk, --cache-type-k T, -ctv, --cache-type-v T\n"
          "                      the same for llama.cpp users: f32, f16, bf16, q8_0 (=\n"
          "                      int8); lutra has one type for K and V, so they must match\n"
          "  --precision P       palettized matmuls: int8 (default: u8 codebooks x int8\n"
          "                      activations, fast) or f32 (exact codebook values)\n"
          "  --stats-json FILE   also write the stats line's figures as a JSON object\n"
          "Speculative decoding (greedy output unchanged; sampling keeps the distribution):\n"
          "  --lookup N          draft up to N tokens by prompt lookup (the last n-gram's\n"
          "                      earlier continuation in prompt + text); 0 = off\n"
          "  --draft FILE        draft with another model of the same vocabulary\n"
          "  --draft-bits B      draft with the draft model (else the target's own f32\n"
          "                      weights: self-draft) palettized at B bits\n"
          "  --draft-max K       tokens a draft model drafts per step (default 4)\n"
          "  --compare           also generate without speculation; print the speedup\n"
          "Chat:\n"
          "  -cnv, --chat        chat with an instruction-tuned model through its chat\n"
          "                      template: one turn with -p, else turns read from stdin\n"
          "  --system TEXT       system prompt\n"
          "  --chat-template T   chatml, llama3 or llama2, instead of the family detected\n"
          "                      from the model's tokenizer.chat_template\n"
          "Tokenize (loads only the vocabulary; vocab-only GGUFs work):\n"
          "  --tokenize TEXT     print the token ids of TEXT, one per line, and exit\n"
          "  --tokenize-file F   the same for the text of file F\n"
          "  --add-bos           start with BOS (default: no BOS)\n"
          "Quality (--eval): KL divergence, top-1 agreement and perplexity of the\n"
          "palettized model against the f32 model on --eval-text, or on text sampled\n"
          "from the f32 model when absent:\n"
          "  --eval              run the evaluation instead of generating\n"
          "  --eval-text TEXT    text to evaluate on\n"
          "  --eval-file FILE    text to evaluate on, from a file\n"
          "  --eval-tokens N     tokens to evaluate (default 256)\n"
          "  --eval-ref FILE     the f32 model to compare with when --model is an\n"
          "                      already palettized .lutra (with its --lora adapter)\n"
          "LoRA adapters (lutra/format/lora_file.h: llama.cpp GGUF adapter layout):\n"
          "  --lora FILE[:SCALE] load an adapter (repeatable); the first one is active\n"
          "  --lora-scaled FILE SCALE\n"
          "                      the same with a scale, as llama.cpp spells it\n"
          "  --recover-rank R    build a rank-R accuracy-recovery adapter for the\n"
          "                      palettized weights (needs --bits/--mixed; named\n"
          "                      'recovery', active unless a --lora is given), trained\n"
          "                      with the codebooks where tuning runs; --save writes\n"
          "                      it beside the model as FILE.recovery.gguf\n"
          "  --recover-targets L the projections it adapts, comma-separated from\n"
          "                      q,k,v,o,w1,w2,w3 (or attn_q, ..., ffn_up); default all\n"
          "  --prompts-file FILE one prompt per line, optionally 'ADAPTER<TAB>PROMPT' to\n"
          "                      switch adapters per prompt ('-' for none)\n"
          "  --parallel N        with --prompts-file: decode up to N prompts together, one\n"
          "                      pass over the weights per step for all of them (1..64;\n"
          "                      default 1); each keeps its own KV cache, adapter and text\n"
          "  -h, --help          this text\n");
}

// The bytes of the file at `path`, exactly.
StatusOr<std::string> ReadFileBytes(const std::string& path) {
  FILE* f = fopen(path.c_str(), "rb");
  if (f == nullptr) return lutra::NotFound("cannot open %s", path.c_str());
  std::string text;
  char buf[65536];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), f)) > 0) text.append(buf, n);
  const bool failed = ferror(f) != 0;
  fclose(f);
  if (failed) return lutra::DataLoss("cannot read %s", path.c_str());
  return text;
}

// The whole file at `path` as text without trailing newlines; an error for
// a missing or empty file.
StatusOr<std::string> ReadTextFile(const std::string& path) {
  StatusOr<std::string> text = ReadFileBytes(path);
  if (!text.ok()) return text.status();
  while (!text->empty() && (text->back() == '\n' || text->back() == '\r')) text->pop_back();
  if (text->empty()) return lutra::InvalidArgument("%s is empty", path.c_str());
  return text;
}

// Parses a whole-string number; false on garbage or out of range.
bool ParseInt(const char* s, long long lo, long long hi, long long* out) {
  char* end = nullptr;
  errno = 0;
  const long long v = strtoll(s, &end, 10);
  if (end == s || *end != '\0' || errno == ERANGE || v < lo || v > hi) return false;
  *out = v;
  return true;
}
bool ParseSize(const char* s, size_t lo, size_t hi, size_t* out) {
  long long v = 0;
  if (!ParseInt(s, (long long)lo, (long long)hi, &v)) return false;
  *out = size_t(v);
  return true;
}
constexpr char kEvalRefUse[] =
    "--eval-ref is the f32 reference of --eval on an already palettized --model .lutra "
    "(without --recover-rank)";

// The items of a comma-separated list ("1,4,16"); an empty string has none,
// and a trailing comma adds none.
std::vector<std::string> SplitCommas(const char* s) {
  std::vector<std::string> items;
  for (const char* p = s; *p != '\0';) {
    const char* comma = strchr(p, ',');
    items.push_back(comma ? std::string(p, comma) : std::string(p));
    p = comma ? comma + 1 : p + items.back().size();
  }
  return items;
}
// A byte count: plain bytes or a number with K, M, G or T (powers of 1024,
// e.g. 512M, 1.5G); false on garbage or above 2^62 (or SIZE_MAX).
bool ParseBytes(const char* s, size_t* out) {
  char* end = nullptr;
  errno = 0;
  const double v = strtod(s, &end);
  if (end == s || errno == ERANGE || !(v >= 0.0)) return false;
  double unit = 1.0;
  if (*end != '\0') {
    const char* units = "KMGT";
    const char* u = strchr(units, toupper((unsigned char)*end));
    if (u == nullptr || end[1] != '\0') return false;
    unit = std::ldexp(1.0, 10 * int(u - units + 1));
  }
  const double bytes = v * unit;
  const double max = std::min(std::ldexp(1.0, 62), double(SIZE_MAX));
  if (bytes > max || (unit == 1.0 && bytes != std::floor(bytes))) return false;
  *out = size_t(bytes);
  return true;
}

// --max-memory's default: physical memory less a margin for the system and
// other apps (1/8 of it, at least 256 MiB); 0 (no limit) where unknown.
size_t DefaultMaxMemory() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page <= 0) return 0;
  const uint64_t phys = uint64_t(pages) * uint64_t(page);
  const uint64_t margin = std::max<uint64_t>(phys / 8, uint64_t{256} << 20);
  return size_t(phys > 2 * margin ? phys - margin : phys / 2);
}

bool ParseFloat(const char* s, double lo, double hi, double* out) {
  char* end = nullptr;
  const double v = strtod(s, &end);
  if (end == s || *end != '\0' || !(v >= lo && v <= hi)) return false;
  *out = v;
  return true;
}

// Short and llama.cpp spellings -> the name ParseArgs handles.
std::string CanonicalFlag(const std::string& flag) {
  static const char* const kAliases[][2] = {
      {"-m", "--model"},          {"-p", "--prompt"},         {"-f", "--file"},
      {"-n", "--n-predict"},      {"-t", "--threads"},        {"-c", "--ctx"},
      {"--ctx-size", "--ctx"},    {"-s", "--seed"},           {"--topp", "--top-p"},
      {"-ctk", "--cache-type-k"}, {"-ctv", "--cache-type-v"}, {"-cnv", "--chat"},
      {"--conversation", "--chat"}, {"-h", "--help"}};
  for (const auto& a : kAliases) {
    if (flag == a[0]) return a[1];
  }
  return flag;
}

// --kv-type, or llama.cpp's -ctk/-ctv names (q8_0: lutra's int8, one scale
// per position and KV head rather than per 32 values).
bool ParseKvType(const std::string& v, bool llama_names, lutra::ElementType* out) {
  if (llama_names && v == "q8_0") {
    *out = lutra::ElementType::kI8;
    return true;
  }
  if (llama_names && v == "int8") return false;  // llama.cpp has no such name
  return lutra::ElementTypeFromName(v.c_str(), out);
}

// Whether `path` names a GGUF container (.gguf or .lutra).
bool HasGgufName(const std::string& path) {
  const auto ends = [&path](const char* ext) {
    const size_t n = strlen(ext);
    return path.size() >= n && strcasecmp(path.c_str() + path.size() - n, ext) == 0;
  };
  return ends(".gguf") || ends(".lutra");
}

// Formats are told apart by content, but a file named .gguf/.lutra that
// is not GGUF would otherwise be read as a llama2.c checkpoint and blamed
// for that format's errors: name the real problem instead.
Status CheckGgufMagic(const std::string& path) {
  if (!HasGgufName(path)) return Status();
  FILE* f = fopen(path.c_str(), "rb");
  if (f == nullptr) return lutra::NotFound("cannot open %s", path.c_str());
  unsigned char magic[4] = {0, 0, 0, 0};
  const size_t n = fread(magic, 1, 4, f);
  fclose(f);
  if (n == 4 && memcmp(magic, "GGUF", 4) == 0) return Status();
  if (n < 4) {
    return lutra::InvalidArgument("%s: not a GGUF file (%zu bytes, shorter than the magic "
                                  "'GGUF')",
                                  path.c_str(), n);
  }
  char text[5] = {0, 0, 0, 0, 0};
  for (size_t i = 0; i < 4; ++i) text[i] = isprint(magic[i]) ? char(magic[i]) : '.';
  return lutra::InvalidArgument("%s: not a GGUF file (bad magic %02x %02x %02x %02x '%s', "
                                "expected 'GGUF')",
                                path.c_str(), magic[0], magic[1], magic[2], magic[3], text);
}

Status ParseArgs(int argc, char** argv, Options* o, bool* help) {
  bool steps_given = false;
  for (int i = 1; i < argc; ++i) {
    // --flag=value is --flag value.
    std::string given = argv[i];
    std::string inline_value;
    bool has_inline = false;
    if (given.size() > 2 && given.compare(0, 2, "--") == 0) {
      const size_t eq = given.find('=');
      if (eq != std::string::npos) {
        inline_value = given.substr(eq + 1);
        given.resize(eq);
        has_inline = true;
      }
    }
    const std::string flag = CanonicalFlag(given);
    bool* const boolean = flag == "--help"       ? help
                          : flag == "--eval"     ? &o->eval
                          : flag == "--show-map" ? &o->show_map
                          : flag == "--chat"     ? &o->chat
                          : flag == "--add-bos"  ? &o->add_bos
                          : flag == "--no-mmap"  ? &o->no_mmap
                          : flag == "--compare"  ? &o->compare
                                                 : nullptr;
    if (boolean != nullptr) {
      if (has_inline) return lutra::InvalidArgument("%s takes no value", given.c_str());
      *boolean = true;
      if (*help) return Status();
      continue;
    }
    if (!has_inline && i + 1 >= argc) {
      return lutra::InvalidArgument("%s needs a value", given.c_str());
    }
    const std::string value_text = has_inline ? inline_value : std::string(argv[++i]);
    const char* value = value_text.c_str();
    size_t n = 0;
    double d = 0.0;
    auto bad = [&](const char* what) {
      return lutra::InvalidArgument("%s %s: expected %s", given.c_str(), value, what);
    };
    if (flag == "--model") {
      o->model = value;
    } else if (flag == "--synthetic") {
      o->synthetic = value;
    } else if (flag == "--tokenizer") {
      o->tokenizer = value;
    } else if (flag == "--prompt") {
      o->prompt = value;
    } else if (flag == "--file") {
      StatusOr<std::string> text = ReadTextFile(value);
      if (!text.ok()) return text.status().WithContext(given);
      o->prompt = std::move(*text);
    } else if (flag == "--n-predict") {
      if (!ParseInt(value, -1, 1 << 24, &o->n_predict)) {
        return bad("-1 (until end of sequence or full context) or a count >= 0");
      }
    } else if (flag == "--steps") {
      if (!ParseSize(value, 1, 1 << 24, &o->steps)) return bad("an integer >= 1");
      steps_given = true;
    } else if (flag == "--temp") {
      if (!ParseFloat(value, 0.0, 100.0, &d)) return bad("a number in [0, 100]");
      o->temperature = float(d);
    } else if (flag == "--top-p") {
      if (!ParseFloat(value, 0.0, 1.0, &d)) return bad("a number in [0, 1]");
      o->top_p = float(d);
    } else if (flag == "--top-k") {
      if (!ParseSize(value, 0, size_t(1) << 32, &o->top_k)) return bad("an integer >= 0");
    } else if (flag == "--min-p") {
      if (!ParseFloat(value, 0.0, 1.0, &d)) return bad("a number in [0, 1]");
      o->min_p = float(d);
    } else if (flag == "--repeat-penalty") {
      if (!ParseFloat(value, 1e-3, 100.0, &d)) return bad("a number in [0.001, 100]");
      o->repeat_penalty = float(d);
    } else if (flag == "--repeat-last-n") {
      if (!ParseInt(value, -1, 1 << 20, &o->repeat_last_n)) {
        return bad("-1 (the context), 0 (off) or a count up to 2^20");
      }
    } else if (flag == "--seed") {
      if (!ParseInt(value, -1, (long long)1 << 62, &o->seed)) {
        return bad("-1 (random) or an integer >= 0");
      }
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
      for (const std::string& item : SplitCommas(value)) {
        if (!ParseSize(item.c_str(), 1, 1 << 20, &n)) return bad("a list like 1,4,16 of G in [1, 2^20]");
        o->load.groups.push_back(n);
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
    } else if (flag == "--tune-steps") {
      if (!ParseSize(value, 0, 1 << 20, &n)) return bad("an integer >= 0");
      o->load.tune_steps = int(n);
    } else if (flag == "--tune") {
      const std::string v = value;
      if (v != "on" && v != "off") return bad("on or off");
      o->load.tune_always = v == "on";
      if (v == "off") {
        o->load.tune_steps = 0;
      } else if (o->load.tune_steps == 0) {  // on after off: the default count again
        o->load.tune_steps = -1;
      }
    } else if (flag == "--tune-norms") {
      const std::string v = value;
      if (v != "on" && v != "off") return bad("on or off");
      o->load.tune_norms = v == "on";
    } else if (flag == "--tune-indices") {
      const std::string v = value;
      if (v != "on" && v != "off") return bad("on or off");
      o->load.tune_indices = v == "on";
    } else if (flag == "--tune-fresh") {
      const std::string v = value;
      if (v != "on" && v != "off") return bad("on or off");
      o->load.tune_fresh = v == "on" ? 1 : 0;
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
      if (!ParseSize(value, 0, kMaxContext, &n)) {
        return bad("an integer in [1, 1048576] (2^20, the largest KV cache), or 0 for the "
                   "model's");
      }
      o->load.seq_len = int(n);
    } else if (flag == "--max-memory") {
      if (!ParseBytes(value, &o->load.max_memory_bytes)) {
        return bad("a size like 512M, 8G or a number of bytes (0: no limit)");
      }
      o->max_memory_given = true;
    } else if (flag == "--kv-type") {
      if (!ParseKvType(value, false, &o->kv_type)) return bad("f32, f16, bf16 or int8");
    } else if (flag == "--cache-type-k" || flag == "--cache-type-v") {
      if (!ParseKvType(value, true, &o->kv_type)) {
        return bad("f32, f16, bf16 or q8_0 (lutra's int8 KV cache)");
      }
      (flag == "--cache-type-k" ? o->kv_type_k : o->kv_type_v) = value;
    } else if (flag == "--precision") {
      const std::string v = value;
      if (v != "int8" && v != "f32") return bad("int8 or f32");
      o->precision = v == "f32" ? lutra::MatmulPrecision::kF32 : lutra::MatmulPrecision::kInt8;
    } else if (flag == "--save") {
      o->save = value;
    } else if (flag == "--lora") {
      // FILE[:SCALE]: the suffix is a scale only when it parses as one.
      LoraSpec spec{value, 1.0};
      const size_t colon = value_text.rfind(':');
      if (colon != std::string::npos &&
          ParseFloat(value + colon + 1, -100.0, 100.0, &spec.scale)) {
        spec.path = value_text.substr(0, colon);
      }
      o->loras.push_back(spec);
    } else if (flag == "--lora-scaled") {
      if (i + 1 >= argc) return lutra::InvalidArgument("%s needs FILE SCALE", given.c_str());
      const char* scale = argv[++i];
      if (!ParseFloat(scale, -100.0, 100.0, &d)) {
        return lutra::InvalidArgument("%s %s %s: expected a scale in [-100, 100]",
                                      given.c_str(), value, scale);
      }
      o->loras.push_back({value, d});
    } else if (flag == "--prompts-file") {
      o->prompts_file = value;
    } else if (flag == "--recover-rank") {
      if (!ParseSize(value, 1, lutra::kMaxLoraRank, &o->recover_rank)) {
        return bad("a rank in [1, 64]");
      }
    } else if (flag == "--recover-targets") {
      const char* what = "projections from q,k,v,o,w1,w2,w3 (e.g. v,o,w2)";
      uint32_t mask = 0;
      for (const std::string& name : SplitCommas(value)) {
        lutra::Projection p;
        bool found = lutra::ProjectionFromGgufName(name, &p);
        for (lutra::Projection q : lutra::kAllProjections) {
          if (name == lutra::ProjectionName(q)) p = q, found = true;
        }
        if (!found) return bad(what);
        mask |= 1u << static_cast<unsigned>(p);
      }
      if (mask == 0) return bad(what);
      o->load.recover_targets = mask;
      o->recover_targets_given = true;
    } else if (flag == "--eval-text") {
      o->eval_text = value;
    } else if (flag == "--eval-file") {
      StatusOr<std::string> text = ReadTextFile(value);
      if (!text.ok()) return text.status().WithContext("--eval-file");
      o->eval_text = std::move(*text);
    } else if (flag == "--eval-ref") {
      o->eval_ref = value;
    } else if (flag == "--eval-tokens") {
      if (!ParseSize(value, 2, 1 << 20, &o->eval_tokens)) return bad("an integer >= 2");
    } else if (flag == "--stats-json") {
      o->stats_json = value;
    } else if (flag == "--lookup") {
      // At most kMaxDrafts drafts: a verify pass of up to kGemmSmallM
      // tokens runs the few-token GEMM, whose rows are GEMV's bits, so greedy
      // output stays that of plain decoding on the int8 path too.
      static_assert(kMaxDrafts + 1 <= lutra::kGemmSmallM, "verify passes must stay exact");
      static_assert(kMaxDrafts == 31, "the messages below say 31");
      if (!ParseSize(value, 0, kMaxDrafts, &o->lookup)) {
        return bad("0 (off) or a draft length in [1, 31]");
      }
    } else if (flag == "--draft") {
      o->draft = value;
    } else if (flag == "--draft-bits") {
      if (!ParseSize(value, 1, 8, &n) || !lutra::IsValidPaletteBits(int(n))) {
        return bad("one of 1, 2, 3, 4, 6, 8");
      }
      o->draft_bits = int(n);
    } else if (flag == "--parallel") {
      // At most kGemmSmallM: a step of that many tokens runs the few-token
      // GEMM, whose rows are GEMV's bits, so each sequence's text is the one
      // it gets alone.
      if (!ParseSize(value, 1, lutra::kGemmSmallM, &o->parallel)) {
        return bad("an integer in [1, 64]");
      }
      static_assert(lutra::kGemmSmallM == 64, "the messages say 64");
    } else if (flag == "--draft-max") {
      if (!ParseSize(value, 1, kMaxDrafts, &o->draft_max)) {
        return bad("an integer in [1, 31]");  // as --lookup
      }
      o->draft_max_given = true;
    } else if (flag == "--tokenize") {
      o->tokenize = true;
      o->tokenize_text = value;
    } else if (flag == "--tokenize-file") {
      // Exactly the file's bytes: trailing newlines are tokens too.
      StatusOr<std::string> text = ReadFileBytes(value);
      if (!text.ok()) return text.status().WithContext(given);
      o->tokenize = true;
      o->tokenize_text = std::move(*text);
    } else if (flag == "--system") {
      o->system_prompt = value;
    } else if (flag == "--chat-template") {
      StatusOr<lutra::ChatFormat> f = lutra::ParseChatFormat(value);
      if (!f.ok()) return f.status().WithContext(given);
      o->chat_template = value;
    } else {
      return lutra::InvalidArgument("unknown option %s (see --help)", given.c_str());
    }
  }
  if (o->tokenize) {
    if (o->model.empty() && o->tokenizer.empty()) {
      return lutra::InvalidArgument("--tokenize needs -m FILE (GGUF or .lutra) or --tokenizer "
                                    "FILE (llama2.c)");
    }
    return Status();
  }
  if (o->model.empty() == o->synthetic.empty()) {
    return lutra::InvalidArgument("give exactly one of --model FILE or --synthetic SHAPE");
  }
  if (steps_given && o->n_predict != -2) {
    return lutra::InvalidArgument("-n and --steps are exclusive (-n counts new tokens, --steps "
                                  "positions including the prompt's)");
  }
  if (!o->kv_type_k.empty() && !o->kv_type_v.empty() && o->kv_type_k != o->kv_type_v) {
    return lutra::InvalidArgument("-ctk %s and -ctv %s differ: lutra's KV cache has one element "
                                  "type for keys and values",
                                  o->kv_type_k.c_str(), o->kv_type_v.c_str());
  }
  if (o->chat && (o->eval || !o->prompts_file.empty() || !o->save.empty())) {
    return lutra::InvalidArgument("--chat does not combine with --eval, --prompts-file or "
                                  "--save");
  }
  if (o->chat && steps_given) {
    return lutra::InvalidArgument("--chat counts each reply's tokens with -n, not --steps");
  }
  if (!o->chat && (!o->system_prompt.empty() || !o->chat_template.empty())) {
    return lutra::InvalidArgument("--system and --chat-template need --chat");
  }
  if (o->load.bits != 0 && o->load.mixed_bits != 0.0) {
    return lutra::InvalidArgument("--bits and --mixed are exclusive");
  }
  if (o->group_given && o->groups_given) {
    return lutra::InvalidArgument("--group and --groups are exclusive");
  }
  if (o->group_given) o->load.groups = {o->load.group};
  const bool draft_model = !o->draft.empty() || o->draft_bits != 0;
  if (o->lookup > 0 && draft_model) {
    return lutra::InvalidArgument("--lookup and --draft/--draft-bits are exclusive (one "
                                  "drafter)");
  }
  if (o->draft_max_given && !draft_model) {
    return lutra::InvalidArgument("--draft-max needs a draft model (--draft FILE or "
                                  "--draft-bits B)");
  }
  if (o->compare && !o->Speculative()) {
    return lutra::InvalidArgument("--compare needs speculation (--lookup, --draft or "
                                  "--draft-bits)");
  }
  if (o->Speculative() && (o->eval || !o->save.empty())) {
    return lutra::InvalidArgument("speculative decoding (--lookup, --draft, --draft-bits) runs "
                                  "with -p, --prompts-file or --chat, not with --eval or "
                                  "--save");
  }
  if (o->parallel > 1 && (o->prompts_file.empty() || o->Speculative())) {
    return lutra::InvalidArgument("--parallel decodes the lines of --prompts-file together; it "
                                  "needs --prompts-file and does not combine with speculation "
                                  "(--lookup, --draft, --draft-bits)");
  }
  if (o->compare && o->chat) {
    return lutra::InvalidArgument("--compare reruns one prompt without speculation: use it "
                                  "with -p or --prompts-file, not --chat");
  }

  const bool palettize = o->load.bits != 0 || o->load.mixed_bits != 0.0;
  if ((o->eval || o->recover_rank > 0) && !palettize && o->eval_ref.empty()) {
    return lutra::InvalidArgument("%s needs --bits B or --mixed BPW (a palettized model)%s",
                                  o->eval ? "--eval" : "--recover-rank",
                                  o->eval ? ", or a palettized .lutra with --eval-ref" : "");
  }
  if (o->recover_targets_given && o->recover_rank == 0) {
    return lutra::InvalidArgument("--recover-targets needs --recover-rank R");
  }
  if (!o->eval_ref.empty() && palettize) {
    return lutra::InvalidArgument("--eval-ref evaluates an already palettized --model .lutra: "
                                  "drop --bits/--mixed");
  }
  if (!o->eval_ref.empty() && (!o->eval || o->recover_rank > 0)) {
    return lutra::InvalidArgument("%s", kEvalRefUse);
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

// Writes a piece to stdout, skipping single ASCII control bytes (as
// llama2.c's safe_printf does), so raw byte tokens cannot garble the
// terminal. Bytes >= 0x80 are written: byte-level vocabularies and byte
// fallback spell multi-byte UTF-8 characters one token per byte.
// A decoded piece as printed: empty for a lone non-printable ASCII byte.
std::string_view Printable(std::string_view piece) {
  const unsigned char c = static_cast<unsigned char>(piece.empty() ? 0 : piece[0]);
  if (piece.size() == 1 && c < 0x80 && !isprint(c) && !isspace(c)) return {};
  return piece;
}

void PrintPiece(std::string_view piece) {
  piece = Printable(piece);
  if (piece.empty()) return;
  fwrite(piece.data(), 1, piece.size(), stdout);
  fflush(stdout);
}

// The sampler for the sampling options at `temperature` (0: greedy).
// --top-p 0 or 1 turns the nucleus off, as in llama2.c. `context`: what
// --repeat-last-n -1 means.
StatusOr<lutra::Sampler> MakeSampler(const Options& o, float temperature, size_t vocab,
                                     size_t context) {
  lutra::SamplingConfig config;
  config.temperature = temperature;
  config.top_p = o.top_p > 0.0f && o.top_p < 1.0f ? o.top_p : 1.0f;
  config.top_k = o.top_k;
  config.min_p = o.min_p;
  config.repeat_penalty = o.repeat_penalty;
  config.repeat_last_n = o.repeat_last_n < 0 ? context : size_t(o.repeat_last_n);
  config.seed = uint64_t(o.seed);
  return lutra::Sampler::Create(vocab, config);
}

// What a generation (or a whole chat) did, for the stats line and JSON.
struct RunFigures {
  engine::GenerateStats gen;
  const engine::Model* model = nullptr;
  const lutra::Adapter* adapter = nullptr;
  size_t adapter_bytes = 0;
  size_t threads = 1;
  // --compare: generated tokens per second after the first, with
  // speculation over without (0: not measured).
  double speedup = 0.0;
};

// A JSON string literal of `s` (quotes, backslashes and controls escaped).
std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += char(c);
    } else if (c < 0x20) {
      char buf[8];
      snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += char(c);
    }
  }
  return out + "\"";
}

// Prints the stats line on stderr and, with --stats-json, writes the same
// figures to that file as one JSON object (replacing it).
Status ReportStats(const Options& o, const RunFigures& f) {
  const engine::GenerateStats& st = f.gen;
  const double ttft_ms = st.prefill_seconds * 1e3;
  const double ms_per_prompt_token = st.prompt_tokens ? ttft_ms / double(st.prompt_tokens) : 0.0;
  const double weights_mib = f.model->WeightBytes() / 1048576.0;
  const double adapters_kib = f.adapter_bytes / 1024.0;
  const std::string active = f.adapter ? f.adapter->name() : "none";
  const char* target = lutra::dispatch::TargetName();
  fprintf(stderr,
          "stats: prompt %zu tokens, time to first token %.1f ms (%.2f ms/prompt token), "
          "generated %zu tokens, decode %zu tokens at %.1f tokens/s (forward passes after "
          "the first token), weights %.1f MiB at %.2f bits/weight, adapters %.1f KiB "
          "(active: %s), %zu thread%s, %s\n",
          st.prompt_tokens, ttft_ms, ms_per_prompt_token, st.generated_tokens,
          st.decode_forwards, st.DecodeTokensPerSecond(), weights_mib,
          f.model->BitsPerWeight(), adapters_kib, active.c_str(), f.threads,
          f.threads == 1 ? "" : "s", target);
  if (o.Speculative()) {
    // "decode N tokens" above counts the target's verify passes.
    fprintf(stderr,
            "speculative: drafted %zu tokens, accepted %zu (%.1f%%), %.2f tokens per target "
            "forward, %zu draft model forwards",
            st.drafted_tokens, st.accepted_tokens, 100.0 * st.AcceptanceRate(),
            st.TokensPerForward(), st.draft_forwards);
    if (f.speedup > 0.0) fprintf(stderr, ", speedup %.2fx over plain decoding", f.speedup);
    fprintf(stderr, "\n");
  }
  if (o.stats_json.empty()) return Status();
  FILE* out = fopen(o.stats_json.c_str(), "w");
  if (out == nullptr) {
    return lutra::NotFound("--stats-json: cannot open %s for writing: %s", o.stats_json.c_str(),
                           strerror(errno));
  }
  fprintf(out,
          "{\"prompt_tokens\": %zu, \"time_to_first_token_ms\": %.3f, "
          "\"ms_per_prompt_token\": %.4f, \"generated_tokens\": %zu, \"decode_tokens\": %zu, "
          "\"decode_seconds\": %.6f, \"decode_tokens_per_second\": %.3f, "
          "\"weights_mib\": %.3f, \"bits_per_weight\": %.4f, \"adapters_kib\": %.3f, "
          "\"active_adapter\": %s, \"threads\": %zu, \"target\": %s, "
          "\"drafted_tokens\": %zu, \"accepted_tokens\": %zu, \"tokens_per_forward\": %.4f, "
          "\"draft_forwards\": %zu, \"speedup\": %.4f}\n",
          st.prompt_tokens, ttft_ms, ms_per_prompt_token, st.generated_tokens,
          st.decode_forwards, st.decode_seconds, st.DecodeTokensPerSecond(), weights_mib,
          f.model->BitsPerWeight(), adapters_kib, JsonString(active).c_str(), f.threads,
          JsonString(target).c_str(), st.drafted_tokens, st.accepted_tokens,
          st.TokensPerForward(), st.draft_forwards, f.speedup);
  const bool write_failed = ferror(out) != 0;
  if (fclose(out) != 0 || write_failed) {
    return lutra::DataLoss("--stats-json: cannot write %s: %s", o.stats_json.c_str(),
                           strerror(errno));
  }
  return Status();
}

// The last position generation may reach for a `prompt_tokens` prompt at
// `start` (Generate's `steps`): -n new tokens, until the context is full
// (-1, and the default 256 when the context is shorter), or --steps as
// given. An explicit -n past the context is an error (with `clamp`, as in a
// chat reply, it stops at the context's end instead).
StatusOr<size_t> LastPosition(const Options& o, size_t start, size_t prompt_tokens,
                              size_t context, bool clamp) {
  if (o.steps != 0) return o.steps;
  const size_t used = start + prompt_tokens;
  const size_t room = context > used ? context - used : 0;
  size_t n = room;
  if (o.n_predict >= 0) {
    n = size_t(o.n_predict);
    if (n > room && !clamp) {
      return lutra::InvalidArgument(
          "-n %zu: the prompt's %zu tokens + %zu new tokens exceed the context of %zu "
          "positions; use -n -1 to stop when the context is full, -c N for a larger context "
          "(up to 2^20), or --steps N to run past it over a sliding window",
          n, used, n, context);
    }
    n = std::min(n, room);
  } else if (o.n_predict == -2) {
    n = std::min<size_t>(size_t(kDefaultNewTokens), room);
  }
  // n new tokens: the first from the prefill, then n - 1 forward passes.
  return n == 0 ? used - 1 : used + n - 1;
}

// Streams generated text to stdout.
struct PieceWriter {
  const lutra::Tokenizer& tok;
  void operator()(int prev, int token) const {
    StatusOr<std::string_view> piece = tok.Decode(prev, token);
    if (piece.ok()) PrintPiece(*piece);
  }
};

// The speculation options of --lookup / --draft / --draft-bits; with a
// draft model `draft`, its run state is made in *draft_state (which must
// outlive the options) with `state`'s threads and precision.
StatusOr<engine::SpeculativeOptions> SpeculationOptions(const Options& o,
                                                        const engine::RunState& state,
                                                        const engine::Model* draft,
                                                        engine::RunState* draft_state) {
  engine::SpeculativeOptions spec;
  spec.lookup = o.lookup;
  spec.draft_max = o.draft_max;
  spec.seed = uint64_t(o.seed);
  if (draft != nullptr) {
    StatusOr<engine::RunState> ds = engine::MakeRunState(draft->config, o.batch, o.kv_type);
    if (!ds.ok()) return ds.status().WithContext("draft model");
    *draft_state = std::move(*ds);
    draft_state->pool = state.pool;
    draft_state->precision = state.precision;
    spec.draft_model = draft;
    spec.draft_state = draft_state;
  }
  return spec;
}

// With speculation (--lookup, or a draft model `draft`): GenerateSpeculative,
// and with --compare a second, silent run without speculation for the
// speedup and an identity check.
Status RunSpeculative(const Options& o, const engine::Model& model, engine::RunState& state,
                      const std::vector<int>& prompt, size_t steps, lutra::Sampler& sampler,
                      const lutra::Tokenizer& tok, const std::vector<int>& stop,
                      const engine::Model* draft, RunFigures* figures) {
  engine::RunState draft_state;
  LUTRA_ASSIGN_OR_RETURN(engine::SpeculativeOptions spec,
                         SpeculationOptions(o, state, draft, &draft_state));
  std::vector<int> tokens;
  const PieceWriter write{tok};
  LUTRA_RETURN_IF_ERROR(engine::GenerateSpeculative(
      model, state, prompt, steps, sampler, stop,
      [&](int prev, int token) {
        write(prev, token);
        tokens.push_back(token);
      },
      &figures->gen, spec));
  printf("\n");
  fflush(stdout);
  if (!o.compare) return Status();
  StatusOr<lutra::Sampler> plain_sampler =
      MakeSampler(o, o.temperature, model.config.vocab_size, size_t(model.config.seq_len));
  if (!plain_sampler.ok()) return plain_sampler.status();
  std::vector<int> plain;
  engine::GenerateStats st;
  LUTRA_RETURN_IF_ERROR(engine::Generate(model, state, prompt, steps, *plain_sampler, stop,
                                         [&](int, int token) { plain.push_back(token); }, &st));
  // Generated tokens per second after the first (whose time is the
  // prefill's): the runs may stop at different lengths when they differ.
  const auto rate = [](const engine::GenerateStats& g) {
    return g.generated_tokens > 1 && g.decode_seconds > 0.0
               ? double(g.generated_tokens - 1) / g.decode_seconds
               : 0.0;
  };
  const engine::GenerateStats& sp = figures->gen;
  figures->speedup = rate(st) > 0.0 ? rate(sp) / rate(st) : 0.0;
  fprintf(stderr,
          "compare: without speculation %zu tokens at %.1f tokens/s, with it %zu tokens at "
          "%.1f tokens/s: %.2fx; output %s\n",
          st.generated_tokens, rate(st), sp.generated_tokens, rate(sp), figures->speedup,
          plain == tokens ? "identical"
          : o.temperature > 0.0f ? "differs (expected when sampling: other random draws)"
                                 : "DIFFERS");
  return Status();
}

// One prompt ready to run: its tokens, Generate's `steps` (LastPosition)
// and a run state with the options' batch, KV type, threads, precision and
// `adapter`.
struct PromptRun {
  std::vector<int> prompt;
  size_t steps = 0;
  engine::RunState state;
};

StatusOr<PromptRun> PreparePrompt(const Options& o, const engine::Model& model,
                                  const lutra::Tokenizer& tok, lutra::ThreadPool* pool,
                                  const std::string& text, const lutra::Adapter* adapter) {
  PromptRun run;
  LUTRA_ASSIGN_OR_RETURN(run.prompt, tok.Encode(text, tok.add_bos_token()));
  const size_t context = size_t(model.config.seq_len);
  if (run.prompt.size() > context) {
    return lutra::InvalidArgument("prompt of %zu tokens exceeds the context of %zu",
                                  run.prompt.size(), context);
  }
  LUTRA_ASSIGN_OR_RETURN(run.steps,
                         LastPosition(o, 0, run.prompt.size(), context, /*clamp=*/false));
  LUTRA_ASSIGN_OR_RETURN(run.state, engine::MakeRunState(model.config, o.batch, o.kv_type));
  run.state.pool = pool;
  run.state.precision = o.precision;
  run.state.adapter = adapter;
  return run;
}

int RunGenerate(const Options& o, const engine::Model& model, const lutra::Tokenizer& tok,
                lutra::ThreadPool* pool, const std::string& prompt_text,
                const lutra::Adapter* adapter, size_t adapter_bytes,
                const engine::Model* draft = nullptr) {
  StatusOr<PromptRun> run = PreparePrompt(o, model, tok, pool, prompt_text, adapter);
  if (!run.ok()) return Fail(run.status());
  const size_t context = size_t(model.config.seq_len);

  // The prompt is echoed first, as llama2.c does.
  int prev = -1;
  for (int t : run->prompt) {
    PieceWriter{tok}(prev, t);
    prev = t;
  }
  StatusOr<lutra::Sampler> sampler = MakeSampler(o, o.temperature, model.config.vocab_size, context);
  if (!sampler.ok()) return Fail(sampler.status());
  std::vector<int> stop = {tok.bos_id()};
  if (tok.eos_id() >= 0) stop.push_back(tok.eos_id());
  RunFigures figures{{}, &model, adapter, adapter_bytes, o.threads};
  if (o.Speculative()) {
    Status status =
        RunSpeculative(o, model, run->state, run->prompt, run->steps, *sampler, tok, stop, draft,
                       &figures);
    if (!status.ok()) return Fail(status);
    Status reported = ReportStats(o, figures);
    return reported.ok() ? 0 : Fail(reported);
  }
  Status status = engine::Generate(model, run->state, run->prompt, run->steps, *sampler, stop,
                                   PieceWriter{tok}, &figures.gen);
  printf("\n");
  fflush(stdout);
  if (!status.ok()) return Fail(status);
  Status reported = ReportStats(o, figures);
  return reported.ok() ? 0 : Fail(reported);
}

// One line of --prompts-file: the prompt and its adapter (null: none).
struct PromptLine {
  std::string text;
  std::shared_ptr<const lutra::Adapter> adapter;
};

// --parallel: the prompts of `lines` decoded together (engine::GenerateBatch),
// each on its own run state (KV cache, adapter) with the sampler it would get
// alone, so each text is the one --parallel 1 prints. Texts are printed
// whole, in line order, once all have ended (their tokens interleave while
// decoding); one stats line covers the batch.
int RunParallel(const Options& o, const engine::Model& model, const lutra::Tokenizer& tok,
                lutra::ThreadPool* pool, const std::vector<PromptLine>& lines,
                size_t adapter_bytes) {
  const size_t n = lines.size(), context = size_t(model.config.seq_len);
  std::vector<std::vector<int>> prompts;
  std::vector<size_t> steps;
  std::vector<engine::RunState> states;
  std::vector<lutra::Sampler> samplers;
  std::vector<std::string> texts(n);
  for (size_t i = 0; i < n; ++i) {
    StatusOr<PromptRun> run =
        PreparePrompt(o, model, tok, pool, lines[i].text, lines[i].adapter.get());
    if (!run.ok()) return Fail(run.status());
    StatusOr<lutra::Sampler> sampler =
        MakeSampler(o, o.temperature, model.config.vocab_size, context);
    if (!sampler.ok()) return Fail(sampler.status());
    int prev = -1;
    for (int t : run->prompt) {
      StatusOr<std::string_view> piece = tok.Decode(prev, t);
      if (piece.ok()) texts[i] += Printable(*piece);
      prev = t;
    }
    prompts.push_back(std::move(run->prompt));
    steps.push_back(run->steps);
    states.push_back(std::move(run->state));
    samplers.push_back(std::move(*sampler));
  }
  StatusOr<engine::RunState> batch = engine::MakeBatchState(model.config, n);
  if (!batch.ok()) return Fail(batch.status());
  batch->pool = pool;
  batch->precision = o.precision;
  std::vector<engine::RunState*> seqs;
  std::vector<lutra::Sampler*> sampler_ptrs;
  for (size_t i = 0; i < n; ++i) {
    seqs.push_back(&states[i]);
    sampler_ptrs.push_back(&samplers[i]);
  }
  std::vector<int> stop = {tok.bos_id()};
  if (tok.eos_id() >= 0) stop.push_back(tok.eos_id());
  std::vector<engine::GenerateStats> stats;
  Status status = engine::GenerateBatch(
      model, *batch, seqs, prompts, sampler_ptrs, steps, stop,
      [&](size_t i, int prev, int token) {
        StatusOr<std::string_view> piece = tok.Decode(prev, token);
        if (piece.ok()) texts[i] += Printable(*piece);
      },
      &stats);
  if (!status.ok()) return Fail(status);
  for (size_t i = 0; i < n; ++i) {
    fprintf(stderr, "[adapter: %s]\n",
            lines[i].adapter ? lines[i].adapter->name().c_str() : "none");
    printf("%s\n", texts[i].c_str());
    fflush(stdout);
  }
  // The batch: prefills one after another, then one decode loop.
  size_t prompt_tokens = 0, generated = 0, decoded = 0, steps_run = 0;
  double prefill_seconds = 0.0, decode_seconds = 0.0;
  for (const engine::GenerateStats& st : stats) {
    prompt_tokens += st.prompt_tokens;
    generated += st.generated_tokens;
    decoded += st.decode_forwards;
    steps_run = std::max(steps_run, st.decode_forwards);
    prefill_seconds += st.prefill_seconds;
    decode_seconds = std::max(decode_seconds, st.decode_seconds);
  }
  fprintf(stderr,
          "stats: parallel %zu sequence%s, prompts %zu tokens in %.1f ms, generated %zu tokens, "
          "decode %zu tokens in %zu batched steps at %.1f tokens/s over all sequences (%.2f ms "
          "per step), weights %.1f MiB at %.2f bits/weight, adapters %.1f KiB, %zu thread%s, "
          "%s\n",
          n, n == 1 ? "" : "s", prompt_tokens, prefill_seconds * 1e3, generated, decoded, steps_run,
          decode_seconds > 0.0 ? double(decoded) / decode_seconds : 0.0,
          steps_run > 0 ? decode_seconds * 1e3 / double(steps_run) : 0.0,
          model.WeightBytes() / 1048576.0, model.BitsPerWeight(), adapter_bytes / 1024.0,
          o.threads, o.threads == 1 ? "" : "s", lutra::dispatch::TargetName());
  return 0;
}

// Reads one line of stdin without its newline; false at the end of input.
bool ReadLine(std::string* line) {
  line->clear();
  int c;
  while ((c = getchar()) != EOF && c != '\n') line->push_back(char(c));
  if (!line->empty() && line->back() == '\r') line->pop_back();
  return c != EOF || !line->empty();
}

// tokenizer.chat_template of the model file, "" when it has none; an error
// where the file kind cannot keep one.
StatusOr<std::string> ReadChatTemplate(const Options& o) {
  if (!o.synthetic.empty()) {
    return lutra::InvalidArgument("--synthetic models have no chat template: give "
                                  "--chat-template chatml|llama3|llama2");
  }
  StatusOr<lutra::MappedFile> file = lutra::MappedFile::Open(o.model);
  if (!file.ok()) return file.status();
  if (file->size() < 4 || memcmp(file->data(), "GGUF", 4) != 0) {
    return lutra::InvalidArgument("%s: llama2.c checkpoints carry no chat template: give "
                                  "--chat-template chatml|llama3|llama2",
                                  o.model.c_str());
  }
  StatusOr<lutra::GgufFile> gguf = lutra::GgufFile::FromMapped(std::move(*file));
  if (!gguf.ok()) return gguf.status();
  if (lutra::IsLutraFile(gguf->reader())) {
    return lutra::InvalidArgument("%s: .lutra files do not keep the chat template: give "
                                  "--chat-template chatml|llama3|llama2",
                                  o.model.c_str());
  }
  if (gguf->reader().Find("tokenizer.chat_template") == nullptr) return std::string();
  StatusOr<std::string_view> t = gguf->reader().GetString("tokenizer.chat_template");
  if (!t.ok()) return t.status().WithContext(o.model);
  return std::string(*t);
}

// --chat: one turn with -p, else turns read from stdin until its end. The KV
// cache and the sampler's history carry over between turns, so each turn
// prefills only its own tokens; the conversation ends when the context is
// full. With speculation each reply is a GenerateSpeculative call that
// continues the caches (the draft model's too), and the stats count every
// turn's drafts.
int RunChat(const Options& o, const engine::Model& model, const lutra::Tokenizer& tok,
            lutra::ThreadPool* pool, const lutra::Adapter* adapter, size_t adapter_bytes,
            const engine::Model* draft) {
  StatusOr<lutra::ChatFormat> format = lutra::ChatFormat::kChatML;
  if (!o.chat_template.empty()) {
    format = lutra::ParseChatFormat(o.chat_template);
  } else {
    StatusOr<std::string> jinja = ReadChatTemplate(o);
    if (!jinja.ok()) return Fail(jinja.status());
    format = lutra::DetectChatFormat(*jinja);
    if (!format.ok()) return Fail(format.status().WithContext(o.model));
  }
  if (!format.ok()) return Fail(format.status());
  const lutra::ChatTokenizer chat(tok);
  std::vector<int> stop;
  const int end_of_turn = chat.Special(lutra::ChatEndOfTurn(*format));
  if (end_of_turn >= 0) stop.push_back(end_of_turn);
  if (tok.eos_id() >= 0) stop.push_back(tok.eos_id());
  const size_t context = size_t(model.config.seq_len);
  StatusOr<engine::RunState> state = engine::MakeRunState(model.config, o.batch, o.kv_type);
  if (!state.ok()) return Fail(state.status());
  state->pool = pool;
  state->precision = o.precision;
  state->adapter = adapter;
  StatusOr<lutra::Sampler> sampler = MakeSampler(o, o.temperature, model.config.vocab_size, context);
  if (!sampler.ok()) return Fail(sampler.status());
  engine::RunState draft_state;
  StatusOr<engine::SpeculativeOptions> spec = SpeculationOptions(o, *state, draft, &draft_state);
  if (!spec.ok()) return Fail(spec.status());
  fprintf(stderr, "chat: %s template%s\n", lutra::ChatFormatName(*format),
          o.chat_template.empty() ? " (from the model)" : "");

  const bool single = !o.prompt.empty();
  const bool terminal = !single && isatty(fileno(stdin));
  RunFigures total{{}, &model, adapter, adapter_bytes, o.threads};
  total.gen.calls = 0;  // the turns' counts add up below
  size_t pos = 0;
  std::string user;
  for (bool first = true;; first = false) {
    if (single) {
      if (!first) break;
      user = o.prompt;
    } else {
      do {
        if (terminal) {
          printf("> ");
          fflush(stdout);
        }
        if (!ReadLine(&user)) user.clear();
      } while (user.empty() && !feof(stdin));
      if (user.empty()) break;
    }
    StatusOr<std::vector<int>> ids =
        chat.Encode(lutra::FormatChatTurn(*format, first, o.system_prompt, user));
    if (!ids.ok()) return Fail(ids.status());
    if (pos + ids->size() > context) {
      fprintf(stderr, "chat: the context of %zu positions is full; ending the conversation "
              "(-c N for a longer one)\n", context);
      break;
    }
    StatusOr<size_t> steps = LastPosition(o, pos, ids->size(), context, /*clamp=*/true);
    if (!steps.ok()) return Fail(steps.status());
    engine::GenerateStats st;
    Status status = o.Speculative()
                        ? engine::GenerateSpeculative(model, *state, *ids, *steps, *sampler,
                                                      stop, PieceWriter{tok}, &st, *spec, pos)
                        : engine::Generate(model, *state, *ids, *steps, *sampler, stop,
                                           PieceWriter{tok}, &st, pos);
    printf("\n");
    fflush(stdout);
    if (!status.ok()) return Fail(status);
    pos = st.positions;
    total.gen.Add(st);
    if (st.stop_token < 0 && pos + 1 >= context) {
      fprintf(stderr, "chat: the context of %zu positions is full; ending the conversation "
              "(-c N for a longer one)\n", context);
      break;
    }
  }
  Status reported = ReportStats(o, total);
  return reported.ok() ? 0 : Fail(reported);
}

// --calib-text's tokens, empty without it.
StatusOr<std::vector<int>> CalibText(const Options& o, const lutra::Tokenizer& tok) {
  if (o.calib_file.empty()) return std::vector<int>();
  StatusOr<std::string> text = ReadTextFile(o.calib_file);
  if (!text.ok()) return text.status().WithContext("--calib-text");
  StatusOr<std::vector<int>> ids = tok.Encode(*text, tok.add_bos_token());
  if (!ids.ok()) return ids.status().WithContext("--calib-text");
  return ids;
}

// The draft model of --draft FILE and/or --draft-bits B: FILE as is or
// palettized at B bits, or without FILE the target's own f32 weights
// (`target`, before it is palettized) at B bits (self-draft). Made in the
// same way as the target (calibrated unless --calib off).
StatusOr<std::unique_ptr<engine::Model>> MakeDraftModel(const Options& o,
                                                        const engine::Model& target,
                                                        const lutra::Tokenizer& tok) {
  std::unique_ptr<engine::Model> owned;
  const engine::Model* source = &target;
  if (!o.draft.empty()) {
    LUTRA_RETURN_IF_ERROR(CheckGgufMagic(o.draft));
    engine::LoadOptions load;
    load.seq_len = o.load.seq_len;
    load.max_memory_bytes = o.load.max_memory_bytes;
    load.use_mmap = o.load.use_mmap;
    StatusOr<engine::Model> m = engine::OpenModel(o.draft, load, o.threads);
    if (!m.ok()) return m.status().WithContext("--draft " + o.draft);
    owned = std::make_unique<engine::Model>(std::move(*m));
    source = owned.get();
    // One vocabulary: the sizes, then the pieces where the draft file
    // carries its own (a llama2.c checkpoint does not).
    if (owned->config.vocab_size != target.config.vocab_size) {
      return lutra::InvalidArgument("--draft %s: its vocabulary has %d tokens, the target's "
                                    "(%s) %d; the draft model must share the target's vocabulary",
                                    o.draft.c_str(), owned->config.vocab_size,
                                    o.model.empty() ? o.synthetic.c_str() : o.model.c_str(),
                                    target.config.vocab_size);
    }
    if (owned->tokenizer != nullptr) {
      // Control tokens (BOS, EOS) decode to nothing and are spelled
      // differently by the formats (llama2.c's "\n<s>\n", GGUF's "<s>").
      const lutra::Tokenizer& dt = *owned->tokenizer;
      const auto control = [](const lutra::Tokenizer& t, int id) {
        return t.type(id) == lutra::TokenType::kControl;
      };
      for (int id = 0; id < std::min(dt.vocab_size(), tok.vocab_size()); ++id) {
        if (dt.piece(id) != tok.piece(id) && !control(dt, id) && !control(tok, id)) {
          return lutra::InvalidArgument(
              "--draft %s: token %d is '%s' in the draft's vocabulary but '%s' in the "
              "target's; the draft model must share the target's vocabulary",
              o.draft.c_str(), id, dt.piece(id).c_str(), tok.piece(id).c_str());
        }
      }
    }
    owned->tokenizer = nullptr;  // the target's is used
  }
  if (o.draft_bits == 0) return owned;
  if (source->weights.embedding.palettized()) {
    return lutra::InvalidArgument(
        "--draft-bits %d: %s is already palettized; self-draft needs f32 weights (a .bin, "
        ".gguf or --synthetic without --bits)",
        o.draft_bits, o.draft.empty() ? "the target" : o.draft.c_str());
  }
  engine::LoadOptions q = o.load;
  q.bits = o.draft_bits;
  q.mixed_bits = 0.0;
  q.calib_bos = tok.bos_id();
  StatusOr<std::vector<int>> calib = CalibText(o, tok);
  if (!calib.ok()) return calib.status();
  q.calib_text = std::move(*calib);
  StatusOr<engine::Model> pal = engine::PalettizeModel(*source, q, o.threads);
  if (!pal.ok()) return pal.status().WithContext("--draft-bits");
  fprintf(stderr, "draft model: %s\n", pal->quantization.c_str());
  return std::make_unique<engine::Model>(std::move(*pal));
}

// --tokenize: the ids of the text, one per line, from the vocabulary alone
// (a vocab-only GGUF works; no weights are loaded from a GGUF model).
int RunTokenize(const Options& o) {
  std::shared_ptr<const lutra::Tokenizer> tok;
  if (!o.tokenizer.empty()) {
    StatusOr<lutra::Tokenizer> t = lutra::Tokenizer::FromLlama2cFile(o.tokenizer);
    if (!t.ok()) return Fail(t.status());
    tok = std::make_shared<const lutra::Tokenizer>(std::move(*t));
  } else {
    Status magic = CheckGgufMagic(o.model);
    if (!magic.ok()) return Fail(magic);
    StatusOr<lutra::MappedFile> file = lutra::MappedFile::Open(o.model);
    if (!file.ok()) return Fail(file.status());
    if (file->size() < 4 || memcmp(file->data(), "GGUF", 4) != 0) {
      return Fail(lutra::InvalidArgument("%s: llama2.c checkpoints carry no vocabulary: give "
                                         "--tokenizer FILE",
                                         o.model.c_str()));
    }
    StatusOr<lutra::GgufFile> gguf = lutra::GgufFile::FromMapped(std::move(*file));
    if (!gguf.ok()) return Fail(gguf.status());
    if (lutra::IsLutraFile(gguf->reader())) {
      // Mapped, not copied: cheap even for large models.
      StatusOr<engine::Model> model = engine::OpenModel(o.model, engine::LoadOptions());
      if (!model.ok()) return Fail(model.status());
      if (!model->tokenizer) {
        return Fail(lutra::NotFound("%s carries no vocabulary", o.model.c_str()));
      }
      tok = model->tokenizer;
    } else {
      if (gguf->reader().Find("tokenizer.ggml.tokens") == nullptr) {
        return Fail(lutra::NotFound("%s carries no vocabulary (no tokenizer.ggml.tokens)",
                                    o.model.c_str()));
      }
      StatusOr<lutra::Tokenizer> t = lutra::Tokenizer::FromGguf(gguf->reader());
      if (!t.ok()) return Fail(t.status().WithContext(o.model));
      tok = std::make_shared<const lutra::Tokenizer>(std::move(*t));
    }
  }
  StatusOr<std::vector<int>> ids = tok->Encode(o.tokenize_text, o.add_bos);
  if (!ids.ok()) return Fail(ids.status());
  for (int id : *ids) printf("%d\n", id);
  if (fflush(stdout) != 0 || ferror(stdout)) {
    return Fail(lutra::DataLoss("cannot write to stdout: %s", strerror(errno)));
  }
  return 0;
}

// --eval: the palettized `test` model against its f32 `reference` on
// --eval-text, or on text the reference samples itself.
int RunEval(const Options& o, const engine::Model& reference, const engine::Model& test,
            const lutra::Tokenizer& tok, lutra::ThreadPool* pool, const lutra::Adapter* adapter) {
  const size_t max_tokens = std::min(o.eval_tokens, size_t(reference.config.seq_len));
  std::vector<int> tokens;
  if (!o.eval_text.empty()) {
    StatusOr<std::vector<int>> t = tok.Encode(o.eval_text, tok.add_bos_token());
    if (!t.ok()) return Fail(t.status());
    tokens = std::move(*t);
    if (tokens.size() > max_tokens) tokens.resize(max_tokens);
  } else {
    StatusOr<engine::RunState> state = engine::MakeRunState(reference.config, o.batch);
    if (!state.ok()) return Fail(state.status());
    state->pool = pool;
    StatusOr<lutra::Sampler> sampler =
        MakeSampler(o, o.temperature > 0.0f ? o.temperature : 1.0f, reference.config.vocab_size,
                    size_t(reference.config.seq_len));
    if (!sampler.ok()) return Fail(sampler.status());
    // Sampling needs a first token: BOS even where prompts take none.
    StatusOr<std::vector<int>> prompt =
        tok.Encode(o.prompt, tok.add_bos_token() || o.prompt.empty());
    if (!prompt.ok()) return Fail(prompt.status());
    tokens = *prompt;
    Status s = engine::Generate(reference, *state, *prompt, max_tokens - 1, *sampler, {},
                                [&](int, int token) { tokens.push_back(token); }, nullptr);
    if (!s.ok()) return Fail(s);
  }
  if (tokens.size() < 2) return Fail(lutra::InvalidArgument("--eval: need at least 2 tokens"));
  for (const lutra::Adapter* a : {static_cast<const lutra::Adapter*>(nullptr), adapter}) {
    StatusOr<engine::EvalResult> r =
        engine::Evaluate(reference, test, tokens, o.batch, pool, o.precision, a,
                         o.kv_type);
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
  if (o.tokenize) return RunTokenize(o);
  if (o.seed < 0) {
    o.seed = (long long)(uint64_t(std::chrono::system_clock::now().time_since_epoch().count()) >>
                         2);
  }
  o.load.progress = true;
  o.load.use_mmap = !o.no_mmap;
  if (!o.max_memory_given) o.load.max_memory_bytes = DefaultMaxMemory();
  if (!o.model.empty()) {
    Status magic = CheckGgufMagic(o.model);
    if (!magic.ok()) return Fail(magic);
  }

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
                          : engine::MakeSyntheticModel(o.synthetic, load, uint64_t(o.seed));
  if (!model.ok()) return Fail(model.status());
  const bool already = model->weights.embedding.palettized() && !random_palettes;
  std::unique_ptr<engine::Model> f32;
  if (!o.eval_ref.empty() && !already) return Fail(lutra::InvalidArgument("%s", kEvalRefUse));
  if (!o.eval_ref.empty()) {
    // A saved palettization, evaluated against its source: palettize once,
    // evaluate on many texts.
    engine::LoadOptions ref_load = o.load;
    ref_load.bits = 0, ref_load.mixed_bits = 0.0;
    Status magic = CheckGgufMagic(o.eval_ref);
    if (!magic.ok()) return Fail(magic.WithContext("--eval-ref"));
    StatusOr<engine::Model> ref = engine::OpenModel(o.eval_ref, ref_load, o.threads);
    if (!ref.ok()) return Fail(ref.status().WithContext("--eval-ref"));
    if (ref->weights.embedding.palettized()) {
      return Fail(lutra::InvalidArgument("--eval-ref %s is palettized: give the f32 source",
                                         o.eval_ref.c_str()));
    }
    f32 = std::make_unique<engine::Model>(std::move(*ref));
  } else if (keep_f32 && already) {
    return Fail(lutra::InvalidArgument("--eval and --recover-rank need an f32 source model "
                                       "(.bin, .gguf or --synthetic), not a palettized .lutra "
                                       "(--eval-ref FILE gives its f32 source)"));
  }
  if (palettize && already) {
    return Fail(lutra::InvalidArgument("%s is already palettized: drop --bits/--mixed",
                                       o.model.c_str()));
  }
  StatusOr<std::shared_ptr<const lutra::Tokenizer>> tokenizer = GetTokenizer(o, *model);
  if (!tokenizer.ok()) return Fail(tokenizer.status());
  // The draft model, made while the target's f32 weights are at hand.
  std::unique_ptr<engine::Model> draft;
  if (!o.draft.empty() || o.draft_bits != 0) {
    StatusOr<std::unique_ptr<engine::Model>> d = MakeDraftModel(o, *model, **tokenizer);
    if (!d.ok()) return Fail(d.status());
    draft = std::move(*d);
  }
  if (palettize && !random_palettes) {
    engine::LoadOptions q = o.load;
    q.calib_bos = (*tokenizer)->bos_id();
    q.recover_rank = o.recover_rank;
    StatusOr<std::vector<int>> calib = CalibText(o, **tokenizer);
    if (!calib.ok()) return Fail(calib.status());
    q.calib_text = std::move(*calib);
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
    if (model->recovery) {
      // A .lutra file holds weights only; the adapter goes beside it.
      const std::string path = o.save + ".recovery.gguf";
      Status s = lutra::SaveAdapter(path, *model->recovery);
      if (!s.ok()) return Fail(s);
      fprintf(stderr, "saved %s: the recovery adapter, %.1f KiB (run with --lora %s)\n",
              path.c_str(), model->recovery->bytes() / 1024.0, path.c_str());
    }
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
  for (const LoraSpec& spec : o.loras) {
    StatusOr<std::shared_ptr<const lutra::Adapter>> a =
        engine::LoadLora(spec.path, float(spec.scale), *model);
    if (!a.ok()) return Fail(a.status());
    Status added = add_adapter(*a);
    if (!added.ok()) return Fail(added);
  }
  if (model->recovery) {
    Status added = add_adapter(model->recovery);
    if (!added.ok()) return Fail(added);
  }
  if (!o.eval) f32.reset();  // only the palettized weights stay in memory
  // The run state (activations, KV cache of the whole context) counts
  // against --max-memory too: refuse a context that cannot fit up front.
  // --parallel N: N sequences' states (each with its KV cache) and the
  // batch's activations.
  const uint64_t run_bytes =
      engine::RunStateBytes(model->config, o.batch, o.kv_type) * o.parallel +
      (o.parallel > 1 ? engine::BatchStateBytes(model->config, o.parallel) : 0);
  const uint64_t draft_bytes =
      draft ? uint64_t(draft->heap_bytes) +
                  engine::RunStateBytes(draft->config, o.batch, o.kv_type)
            : 0;
  Status fits = lutra::CheckMemoryBudget(
      uint64_t(model->heap_bytes) + (f32 ? uint64_t(f32->heap_bytes) : 0) + run_bytes +
          draft_bytes,
      o.load.max_memory_bytes,
      "the model and its run state (a KV cache of " + std::to_string(model->config.seq_len) +
          " positions: " + std::to_string(run_bytes >> 20) + " MiB; see -c)");
  if (!fits.ok()) return Fail(fits.WithContext("--max-memory"));

  lutra::ThreadPool pool(o.threads);
  if (o.eval) return RunEval(o, *f32, *model, **tokenizer, &pool, active.get());
  if (o.chat) {
    return RunChat(o, *model, **tokenizer, &pool, active.get(), adapters.resident_bytes(),
                   draft.get());
  }
  if (o.prompts_file.empty()) {
    return RunGenerate(o, *model, **tokenizer, &pool, o.prompt, active.get(),
                       adapters.resident_bytes(), draft.get());
  }
  // Batch mode: one generation per line, each with its own adapter.
  FILE* f = fopen(o.prompts_file.c_str(), "r");
  if (f == nullptr) {
    return Fail(lutra::NotFound("cannot open --prompts-file %s", o.prompts_file.c_str()));
  }
  char line[4096];
  int rc = 0;
  std::vector<PromptLine> group;  // --parallel: lines waiting for a batch
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
    if (o.parallel > 1) {
      group.push_back({text, adapter});
      if (group.size() == o.parallel) {
        rc = RunParallel(o, *model, **tokenizer, &pool, group, adapters.resident_bytes());
        group.clear();
      }
      continue;
    }
    fprintf(stderr, "[adapter: %s]\n", adapter ? adapter->name().c_str() : "none");
    rc = RunGenerate(o, *model, **tokenizer, &pool, text, adapter.get(),
                     adapters.resident_bytes(), draft.get());
  }
  fclose(f);
  if (rc == 0 && !group.empty()) {
    rc = RunParallel(o, *model, **tokenizer, &pool, group, adapters.resident_bytes());
  }
  return rc;
}
