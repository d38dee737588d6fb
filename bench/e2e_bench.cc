// End-to-end prefill and decode speed of lutra-generate's engine
// (examples/engine.h) on synthetic Llama-shaped models: palettized (4-bit,
// mixed 3.5) against f32 weights through the same pipeline, in the same run,
// with 1 and 2 threads.
//
//   e2e_bench [--shape afm] [--f32-layers 2] [--prefill 64] [--decode 16]
//             [--reps 3] [--threads 1,2] [--full-layers 26] [--verify 1,2,4,8]
//             [--sequences 2,4,8 [--adapters 2]]
//             [--context 64,512,2048,8192 [--kv f16,bf16,int8] [--chunk 512]]
//             [--unfused] [--fusion-ab]
//
// Palettized models run at the full shape (afm: 26 layers); the f32
// comparison runs at the same per-layer dims with --f32-layers layers (f32
// AFM is 11 GB), and the palettized models are also run at that reduced
// depth so every ratio compares equal shapes. Figures are medians of --reps
// runs; each run prefills --prefill tokens (GEMM) then decodes --decode
// tokens (GEMV) one at a time. "GB/s" is weight bytes streamed per decoded
// token times tokens/s (the head and embedding included); "read GB/s" is a
// plain sum over 512 MiB by the same threads before each repetition, and
// "decode / read" the median over repetitions of the one over the other.
//
// --context N,... [--kv f16,bf16,int8]: the context-length sweep of the
// 4-bit model at full depth: per KV type and thread count, prefill N tokens
// (in chunks of --chunk tokens, 512 by default, as lutra-generate does),
// then decode --decode tokens; prefill ms per token (once: long runs are
// steady) and decode tokens/s (median of --reps), with decode's ratio to
// the first context's rate. With --context only that table is printed.
//
// --unfused runs q/k/v and gate/up as one parallel region per matrix, as
// before dispatch::GemmGroup. --fusion-ab times the two on the 4-bit model
// at full depth in one process: after the prefill, one-token decode steps at
// the same position, fused and unfused alternating (the order swapped every
// pair), medians of --reps x 10 pairs and the median of the per-pair
// ratios; with --fusion-ab only that table is printed.
//
// --verify K,...: the cost of speculative decoding's verify step on the
// 4-bit model at full depth: after the prefill, one forward of K + 1 tokens
// (the last token and K drafts, logits for all: what GenerateSpeculative
// runs) against a plain one-token decode step at the same position, the two
// alternating, medians of --reps x 5 pairs. With --verify only that table
// is printed.
//
// --sequences N,...: batched decoding of N independent sequences
// (engine::ForwardBatch: each its own KV cache, one small-M GEMM per matrix
// for all), 4-bit, full depth: after each sequence's --prefill prompt, one
// batched step of the N sequences against one decode step of a single
// sequence, alternating, medians of --reps x 5 pairs; tokens/s over all
// sequences and its ratio to one sequence's. With --sequences only that
// table is printed. --adapters K (with --sequences): K random rank-16 f16
// adapters on every projection, sequence i decoding with adapter i % K
// (interleaved, so no two neighbours share one when K > 1) and the single
// sequence with adapter 0: one pass per matrix with a LoRA delta per token.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "lutra/dispatch.h"
#include "examples/engine.h"
#include "tests/support/random_weights.h"

namespace {

using lutra::Status;
using lutra::StatusOr;
namespace engine = lutra::engine;

struct Args {
  std::string shape = "afm";
  int full_layers = 0;  // 0: the shape's own
  int f32_layers = 2;
  size_t prefill = 64;
  size_t decode = 16;
  int reps = 3;
  std::vector<size_t> threads = {1, 2};
  std::vector<size_t> verify;  // drafted tokens per verify step (empty: skip)
  std::vector<size_t> sequences;  // --sequences: batched decoding (empty: skip)
  size_t adapters = 0;  // --adapters: distinct adapters over the sequences
  std::vector<size_t> context;  // prompt lengths of the context sweep (empty: skip)
  std::vector<lutra::ElementType> kv = {lutra::ElementType::kF16, lutra::ElementType::kBF16,
                                        lutra::ElementType::kI8};
  size_t chunk = 512;  // prefill tokens per Forward in the context sweep
  bool unfused = false;  // --unfused: q/k/v and gate/up one region per matrix
  bool fusion_ab = false;  // --fusion-ab: fused against unfused decode steps
};

struct Result {
  double prefill_tps = 0.0, decode_tps = 0.0;
  // Read bandwidth measured by the same threads before each repetition,
  // and the median over repetitions of decode weight GB/s over it.
  double read_gbs = 0.0, decode_vs_read = 0.0;
};

// Prints a failed step's message; the exit code of a failed table.
int Fail(const Status& s) {
  fprintf(stderr, "e2e_bench: %s\n", s.message().c_str());
  return 1;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The synthetic prompt of n token ids spread over the vocabulary.
std::vector<int> Prompt(const engine::Model& model, size_t n) {
  std::vector<int> prompt(n);
  for (size_t i = 0; i < n; ++i) prompt[i] = int((i * 7919 + 3) % model.config.vocab_size);
  return prompt;
}

volatile uint64_t g_read_sink;  // keeps ReadGBs' sums alive

// GB/s of `pool`'s threads summing 512 MiB (each its own contiguous part,
// 8 independent integer sums: enough loads in flight for one core's
// bandwidth): the bandwidth a decode step can hope for, measured by this
// binary in the same repetitions (the machine's bandwidth drifts).
double ReadGBs(lutra::ThreadPool& pool) {
  static std::vector<uint64_t> buf = [] {
    std::vector<uint64_t> b((size_t{512} << 20) / sizeof(uint64_t));
    for (size_t i = 0; i < b.size(); ++i) b[i] = i * 0x9E3779B97F4A7C15ull;  // touch every page
    return b;
  }();
  const size_t T = pool.NumThreads();
  std::vector<uint64_t> sums(T);
  const auto t0 = std::chrono::steady_clock::now();
  pool.ParallelFor(T, [&](size_t task, size_t) {
    const lutra::RowRange r = lutra::SplitRows(buf.size(), T, task, 512);
    uint64_t s[8] = {};
    size_t i = r.begin;
    for (; i + 8 <= r.end; i += 8) {
#if defined(__GNUC__)  // 4 KiB ahead, as matmul_bench reads best
      __builtin_prefetch(buf.data() + std::min(i + 512, r.end - 1));
#endif
      for (size_t j = 0; j < 8; ++j) s[j] += buf[i + j];
    }
    for (; i < r.end; ++i) s[0] += buf[i];
    sums[task] = s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
  });
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  g_read_sink = sums[0];
  return double(buf.size() * sizeof(uint64_t)) / dt * 1e-9;
}

// Median prefill and decode tokens/s of `model` with `threads` threads, and
// the read bandwidth of the same threads, measured before each repetition.
StatusOr<Result> Measure(const engine::Model& model, const Args& a, size_t threads) {
  using Clock = std::chrono::steady_clock;
  lutra::ThreadPool pool(threads);
  StatusOr<engine::RunState> state = engine::MakeRunState(model.config, a.prefill);
  if (!state.ok()) return state.status();
  state->pool = &pool;
  state->fuse_shared_input = !a.unfused;
  const std::vector<int> prompt = Prompt(model, a.prefill);
  std::vector<double> prefill, decode, read, ratio;
  const double bytes = double(model.WeightBytes());
  for (int rep = 0; rep < a.reps; ++rep) {
    read.push_back(ReadGBs(pool));
    const auto t0 = Clock::now();
    StatusOr<const float*> out = engine::Forward(model, *state, prompt.data(), prompt.size(), 0);
    if (!out.ok()) return out.status();
    const auto t1 = Clock::now();
    int token = 1;
    for (size_t i = 0; i < a.decode; ++i) {
      out = engine::Forward(model, *state, &token, 1, prompt.size() + i);
      if (!out.ok()) return out.status();
      token = int(std::max_element(*out, *out + model.config.vocab_size) - *out);
    }
    const auto t2 = Clock::now();
    prefill.push_back(double(a.prefill) / std::chrono::duration<double>(t1 - t0).count());
    decode.push_back(double(a.decode) / std::chrono::duration<double>(t2 - t1).count());
    ratio.push_back(bytes * decode.back() * 1e-9 / read.back());
  }
  return Result{Median(prefill), Median(decode), Median(read), Median(ratio)};
}

// Milliseconds of one forward of `n` tokens at position `pos` (all logits
// when n > 1, as the verify step needs them).
StatusOr<double> TimeForward(const engine::Model& model, engine::RunState& state, size_t n,
                             size_t pos) {
  using Clock = std::chrono::steady_clock;
  std::vector<int> tokens(n);
  for (size_t i = 0; i < n; ++i) tokens[i] = int((pos + i) * 31 % model.config.vocab_size);
  const auto t0 = Clock::now();
  StatusOr<const float*> out = engine::Forward(model, state, tokens.data(), n, pos, n > 1);
  if (!out.ok()) return out.status();
  return 1e3 * std::chrono::duration<double>(Clock::now() - t0).count();
}

// Runs the --prefill prompt through `state` from position 0 (the start of
// the --verify and --fusion-ab tables).
Status PrefillPrompt(const engine::Model& model, const Args& a, engine::RunState& state) {
  const std::vector<int> prompt = Prompt(model, a.prefill);
  return engine::Forward(model, state, prompt.data(), prompt.size(), 0).status();
}

// The 4-bit synthetic model at full depth with a context of seq_len
// positions (--verify, --fusion-ab, --context); prints the error and
// returns null on failure.
std::unique_ptr<engine::Model> FullDepth4Bit(const Args& a, size_t seq_len) {
  engine::LoadOptions q4;
  q4.bits = 4;
  q4.seq_len = int(seq_len);
  const std::string shape = a.shape + ":" + std::to_string(a.full_layers);
  StatusOr<engine::Model> model = engine::MakeSyntheticModel(shape, q4, 1);
  if (!model.ok()) {
    Fail(model.status());
    return nullptr;
  }
  return std::make_unique<engine::Model>(std::move(*model));
}

// The verify-step table (--verify): per thread count, a plain decode step
// and each verify size, timed in alternation at the same position.
int RunVerify(const Args& a) {
  const size_t max_k = *std::max_element(a.verify.begin(), a.verify.end());
  const std::unique_ptr<engine::Model> model = FullDepth4Bit(a, a.prefill + max_k + 2);
  if (model == nullptr) return 1;
  printf("\nVerify step, 4-bit, %d layers, after a %zu-token prefill (median of %d pairs):\n\n",
         a.full_layers, a.prefill, 5 * a.reps);
  printf("| threads | drafted k | tokens per forward | decode step ms | verify step ms | "
         "verify / decode |\n|---|---|---|---|---|---|\n");
  for (size_t threads : a.threads) {
    lutra::ThreadPool pool(threads);
    StatusOr<engine::RunState> state =
        engine::MakeRunState(model->config, std::max(a.prefill, max_k + 1));
    if (!state.ok()) return Fail(state.status());
    state->pool = &pool;
    state->fuse_shared_input = !a.unfused;
    if (Status st = PrefillPrompt(*model, a, *state); !st.ok()) return Fail(st);
    for (size_t k : a.verify) {
      std::vector<double> plain, verify;
      for (int r = 0; r < 5 * a.reps; ++r) {
        // Order swapped every pair so neither side always runs first.
        for (int side = 0; side < 2; ++side) {
          const bool is_verify = (side == 0) == (r % 2 == 0);
          StatusOr<double> ms = TimeForward(*model, *state, is_verify ? k + 1 : 1, a.prefill);
          if (!ms.ok()) return Fail(ms.status());
          (is_verify ? verify : plain).push_back(*ms);
        }
      }
      const double p = Median(plain), v = Median(verify);
      printf("| %zu | %zu | %zu | %.2f | %.2f | %.2fx |\n", threads, k, k + 1, p, v, v / p);
      fflush(stdout);
    }
  }
  return 0;
}

// The batched-decoding table (--sequences): see the top of the file.
int RunSequences(const Args& a) {
  const size_t max_n = *std::max_element(a.sequences.begin(), a.sequences.end());
  const size_t steps = 5 * size_t(a.reps);
  // Each timed pair appends one position to every sequence it runs.
  const std::unique_ptr<engine::Model> model = FullDepth4Bit(a, a.prefill + 2 * steps + 2);
  if (model == nullptr) return 1;
  // Sequence i's adapter is i % K (the single sequence's: 0).
  std::vector<std::shared_ptr<const lutra::Adapter>> adapters;
  lutra::test::Rng rng(5);
  for (size_t k = 0; k < a.adapters; ++k) {
    StatusOr<lutra::Adapter> ad =
        lutra::test::RandomAdapter("a" + std::to_string(k), engine::AdapterShapes(model->config),
                                   16, lutra::ElementType::kF16, 1.0f, 0.01f, rng);
    if (!ad.ok()) return Fail(ad.status());
    adapters.push_back(std::make_shared<const lutra::Adapter>(std::move(ad).value()));
  }
  const auto adapter_of = [&](size_t i) -> const lutra::Adapter* {
    return adapters.empty() ? nullptr : adapters[i % adapters.size()].get();
  };
  printf("\nBatched decoding, 4-bit, %d layers, N sequences after a %zu-token prefill each, "
         "%zu rank-16 adapters (median of %zu pairs):\n\n",
         a.full_layers, a.prefill, a.adapters, steps);
  printf("| threads | sequences N | one sequence's step ms | batched step ms | batched / one | "
         "tokens/s, all N | tokens/s vs one sequence |\n|---|---|---|---|---|---|---|\n");
  for (size_t threads : a.threads) {
    lutra::ThreadPool pool(threads);
    for (size_t n : a.sequences) {
      // Sequence 0 runs alone, 1..n together: all at the same positions.
      std::vector<engine::RunState> states;
      for (size_t i = 0; i <= n; ++i) {
        StatusOr<engine::RunState> st = engine::MakeRunState(model->config, a.prefill);
        if (!st.ok()) return Fail(st.status());
        st->pool = &pool;
        st->adapter = adapter_of(i == 0 ? 0 : i - 1);
        if (Status p = PrefillPrompt(*model, a, *st); !p.ok()) return Fail(p);
        states.push_back(std::move(*st));
      }
      StatusOr<engine::RunState> batch = engine::MakeBatchState(model->config, max_n);
      if (!batch.ok()) return Fail(batch.status());
      batch->pool = &pool;
      std::vector<engine::RunState*> seqs;
      for (size_t i = 1; i <= n; ++i) seqs.push_back(&states[i]);
      std::vector<double> one, all;
      for (size_t r = 0; r < steps; ++r) {
        for (int side = 0; side < 2; ++side) {
          const bool batched = (side == 0) == (r % 2 == 0);
          const size_t pos = a.prefill + r;
          std::vector<int> tokens(batched ? n : 1);
          for (size_t i = 0; i < tokens.size(); ++i) {
            tokens[i] = int((pos + 7 * i) * 31 % model->config.vocab_size);
          }
          using Clock = std::chrono::steady_clock;
          const auto t0 = Clock::now();
          const Status st =
              batched ? engine::ForwardBatch(*model, *batch, seqs.data(), tokens.data(), n)
                            .status()
                      : engine::Forward(*model, states[0], tokens.data(), 1, pos).status();
          if (!st.ok()) return Fail(st);
          (batched ? all : one)
              .push_back(1e3 * std::chrono::duration<double>(Clock::now() - t0).count());
        }
      }
      const double p = Median(one), b = Median(all);
      printf("| %zu | %zu | %.2f | %.2f | %.2fx | %.1f | %.2fx |\n", threads, n, p, b, b / p,
             1e3 * double(n) / b, double(n) * p / b);
      fflush(stdout);
    }
  }
  return 0;
}

// The fused-against-unfused table (--fusion-ab): see the top of the file.
int RunFusionAB(const Args& a) {
  const std::unique_ptr<engine::Model> model = FullDepth4Bit(a, a.prefill + 2);
  if (model == nullptr) return 1;
  printf("\nDecode step, 4-bit, %d layers, q/k/v and gate/up fused (GemmGroup) or one region "
         "per matrix (median of %d pairs):\n\n| threads | unfused ms | fused ms | fused / "
         "unfused (median of pair ratios) |\n|---|---|---|---|\n",
         a.full_layers, 10 * a.reps);
  for (size_t threads : a.threads) {
    lutra::ThreadPool pool(threads);
    StatusOr<engine::RunState> state = engine::MakeRunState(model->config, a.prefill);
    if (!state.ok()) return Fail(state.status());
    state->pool = &pool;
    if (Status st = PrefillPrompt(*model, a, *state); !st.ok()) return Fail(st);
    std::vector<double> fused, unfused, ratio;
    for (int r = 0; r < 10 * a.reps; ++r) {
      double ms[2];
      for (int side = 0; side < 2; ++side) {
        const bool is_fused = (side == 0) == (r % 2 == 0);
        state->fuse_shared_input = is_fused;
        StatusOr<double> t = TimeForward(*model, *state, 1, a.prefill);
        if (!t.ok()) return Fail(t.status());
        ms[is_fused ? 1 : 0] = *t;
      }
      unfused.push_back(ms[0]);
      fused.push_back(ms[1]);
      ratio.push_back(ms[1] / ms[0]);
    }
    printf("| %zu | %.2f | %.2f | %.3f |\n", threads, Median(unfused), Median(fused),
           Median(ratio));
    fflush(stdout);
  }
  return 0;
}

// The context-length table (--context): see the top of the file.
int RunContext(const Args& a) {
  using Clock = std::chrono::steady_clock;
  const size_t max_ctx = *std::max_element(a.context.begin(), a.context.end());
  const std::unique_ptr<engine::Model> model = FullDepth4Bit(a, max_ctx + a.decode);
  if (model == nullptr) return 1;
  printf("\nContext sweep, 4-bit, %d layers, prefill in chunks of %zu, %zu decoded tokens "
         "(decode: median of %d), target %s:\n\n",
         a.full_layers, a.chunk, a.decode, a.reps, lutra::dispatch::TargetName());
  printf("| KV | threads | context | prefill ms/token | decode tok/s | decode vs %zu |\n"
         "|---|---|---|---|---|---|\n", a.context[0]);
  for (const lutra::ElementType kv : a.kv) {
    for (size_t threads : a.threads) {
      lutra::ThreadPool pool(threads);
      StatusOr<engine::RunState> state = engine::MakeRunState(model->config, a.chunk, kv);
      if (!state.ok()) return Fail(state.status());
      state->pool = &pool;
      state->fuse_shared_input = !a.unfused;
      double first_rate = 0.0;
      for (size_t ctx : a.context) {
        const std::vector<int> prompt = Prompt(*model, ctx);
        const auto t0 = Clock::now();
        for (size_t done = 0; done < ctx; done += a.chunk) {
          const size_t n = std::min(a.chunk, ctx - done);
          StatusOr<const float*> out = engine::Forward(*model, *state, &prompt[done], n, done);
          if (!out.ok()) return Fail(out.status());
        }
        const double prefill_ms =
            1e3 * std::chrono::duration<double>(Clock::now() - t0).count() / double(ctx);
        std::vector<double> rates;
        for (int rep = 0; rep < a.reps; ++rep) {
          // Each rep decodes at the same positions (Forward rewinds the cache).
          int token = 1;
          const auto t1 = Clock::now();
          for (size_t i = 0; i < a.decode; ++i) {
            StatusOr<const float*> out = engine::Forward(*model, *state, &token, 1, ctx + i);
            if (!out.ok()) return Fail(out.status());
            token = int((ctx + i) * 31 % size_t(model->config.vocab_size));
          }
          rates.push_back(double(a.decode) /
                          std::chrono::duration<double>(Clock::now() - t1).count());
        }
        const double rate = Median(rates);
        if (first_rate == 0.0) first_rate = rate;
        printf("| %s | %zu | %zu | %.2f | %.2f | %.2f |\n", lutra::ElementTypeName(kv), threads,
               ctx, prefill_ms, rate, rate / first_rate);
        fflush(stdout);
      }
    }
  }
  return 0;
}

struct Variant {
  const char* name;
  engine::LoadOptions options;
};

int Run(const Args& a) {
  engine::LoadOptions f32, q4, mixed;
  q4.bits = 4;
  mixed.mixed_bits = 3.5;
  const Variant variants[] = {{"f32", f32}, {"4-bit", q4}, {"mixed 3.5", mixed}};
  printf("e2e_bench: shape %s, prefill %zu tokens, decode %zu tokens, median of %d, target %s\n",
         a.shape.c_str(), a.prefill, a.decode, a.reps, lutra::dispatch::TargetName());
  printf("| model | layers | weights | bits/weight | threads | prefill tok/s | decode tok/s | "
         "decode GB/s | read GB/s | decode / read | prefill vs f32 | decode vs f32 |\n");
  printf("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  // Depths: the reduced one (all three variants, ratios), then the full one
  // (palettized only).
  std::vector<int> depths = {a.f32_layers};
  if (a.full_layers != a.f32_layers) depths.push_back(a.full_layers);
  for (int layers : depths) {
    const std::string shape = a.shape + ":" + std::to_string(layers);
    std::vector<Result> f32_results;
    for (const Variant& v : variants) {
      if (layers != a.f32_layers && v.options.bits == 0 && v.options.mixed_bits == 0.0) continue;
      engine::LoadOptions o = v.options;
      o.seq_len = int(a.prefill + a.decode);
      StatusOr<engine::Model> model = engine::MakeSyntheticModel(shape, o, 1);
      if (!model.ok()) return Fail(model.status());
      for (size_t ti = 0; ti < a.threads.size(); ++ti) {
        StatusOr<Result> r = Measure(*model, a, a.threads[ti]);
        if (!r.ok()) return Fail(r.status());
        if (v.options.bits == 0 && v.options.mixed_bits == 0.0) f32_results.push_back(*r);
        char vs_prefill[32] = "-", vs_decode[32] = "-";
        if (layers == a.f32_layers && ti < f32_results.size()) {
          snprintf(vs_prefill, sizeof(vs_prefill), "%.2fx", r->prefill_tps / f32_results[ti].prefill_tps);
          snprintf(vs_decode, sizeof(vs_decode), "%.2fx", r->decode_tps / f32_results[ti].decode_tps);
        }
        const double bytes = double(model->WeightBytes());
        printf("| %s | %d | %.0f MiB | %.2f | %zu | %.1f | %.2f | %.2f | %.2f | %.0f%% | %s | %s |\n",
               v.name, layers, bytes / 1048576.0, model->BitsPerWeight(), a.threads[ti],
               r->prefill_tps, r->decode_tps, bytes * r->decode_tps / 1e9, r->read_gbs,
               100.0 * r->decode_vs_read, vs_prefill, vs_decode);
        fflush(stdout);
      }
    }
  }
  return 0;
}

bool ParseArgs(int argc, char** argv, Args* a) {
  for (int i = 1; i < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--unfused" || flag == "--fusion-ab") {  // the flags without a value
      (flag == "--unfused" ? a->unfused : a->fusion_ab) = true;
      --i;
      continue;
    }
    if (i + 1 >= argc) return false;
    const char* v = argv[i + 1];
    if (flag == "--shape") {
      a->shape = v;
    } else if (flag == "--full-layers") {
      a->full_layers = atoi(v);
    } else if (flag == "--f32-layers") {
      a->f32_layers = atoi(v);
    } else if (flag == "--prefill") {
      a->prefill = size_t(atoi(v));
    } else if (flag == "--decode") {
      a->decode = size_t(atoi(v));
    } else if (flag == "--reps") {
      a->reps = atoi(v);
    } else if (flag == "--adapters") {
      const int k = atoi(v);
      if (k < 0 || k > 64) return false;
      a->adapters = size_t(k);
    } else if (flag == "--chunk") {
      a->chunk = size_t(atoi(v));
    } else if (flag == "--kv") {  // names as ElementTypeName gives them
      a->kv.clear();
      for (std::string rest = v; !rest.empty();) {
        const size_t comma = rest.find(',');
        const std::string name = rest.substr(0, comma);
        rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
        lutra::ElementType t;
        if (!lutra::ElementTypeFromName(name.c_str(), &t)) return false;
        a->kv.push_back(t);
      }
    } else if (flag == "--threads" || flag == "--verify" || flag == "--context" ||
               flag == "--sequences") {
      std::vector<size_t>& list = flag == "--threads"   ? a->threads
                                  : flag == "--verify"  ? a->verify
                                  : flag == "--context" ? a->context
                                                        : a->sequences;
      list.clear();
      for (const char* p = v; *p;) {
        char* end = nullptr;
        list.push_back(size_t(strtoul(p, &end, 10)));
        if (end == p) return false;
        p = end;
        if (*p == ',') ++p;
      }
    } else {
      return false;
    }
  }
  for (size_t k : a->verify) {
    if (k < 1 || k > 64) return false;
  }
  for (size_t n : a->context) {
    if (n < 1) return false;
  }
  for (size_t n : a->sequences) {
    if (n < 1 || n > 64) return false;  // kGemmSmallM: rows are GEMV's bits
  }
  if (a->adapters > 0 && a->sequences.empty()) return false;  // --adapters is for --sequences
  return a->f32_layers >= 1 && a->chunk >= 1 && !a->kv.empty() && a->prefill >= 1 &&
         a->decode >= 1 && a->reps >= 1 && !a->threads.empty();
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  if (!ParseArgs(argc, argv, &a)) {
    fprintf(stderr,
            "usage: e2e_bench [--shape afm|1b|tiny] [--full-layers L] [--f32-layers L] "
            "[--prefill N] [--decode N] [--reps R] [--threads 1,2] [--verify 1,2,4,8] "
            "[--sequences 2,4,8 [--adapters K]] [--context 64,512,2048,8192 [--kv f16,bf16,int8] "
            "[--chunk N]] [--unfused] [--fusion-ab]\n");
    return 2;
  }
  if (a.full_layers == 0) {
    a.full_layers = a.shape == "afm" ? 26 : a.shape == "1b" ? 16 : 4;
  }
  if (!a.verify.empty()) return RunVerify(a);
  if (!a.sequences.empty()) return RunSequences(a);
  if (!a.context.empty()) return RunContext(a);
  if (a.fusion_ab) return RunFusionAB(a);
  return Run(a);
}
