// LoRA benchmarks and measurements (plain main(); Google Benchmark's main is
// not used).
//
// Mode 1 (default): decode cost of the fused LoRA epilogue at the GEMV level
// on AFM-like layer shapes (dim 3072, FFN 8192, 24 query / 8 KV heads of 128:
// q, o 3072 x 3072; k, v 1024 x 3072; w1, w3 8192 x 3072; w2 3072 x 8192),
// palettized at --bits. One "layer decode" = the 7 GEMVs of one layer for
// one token. Timed with no adapter and with a rank-16 adapter on all seven
// projections, alternating the two in each repetition so machine noise hits
// both alike; reports medians and the overhead ratio. --layers distinct
// layers are cycled so the weights stream from memory, not cache; the
// memory bandwidth measured in the same run puts GB/s in context.
// Then the time to swap adapters (AdapterManager::Get on a resident adapter
// plus the Find() of every target) and to load one from a file.
//
//   lora_bench [--bits 4] [--layers 4] [--reps 15] [--rank 16] [--threads 1]
//              [--precision int8|f32]
//
// Mode 2: accuracy-recovery measurement on a real model (stories260K):
//   lora_bench --recovery ../shared/models/stories260K.bin [--rank 16]
//              [--rounds 0] [--tokens 256]
// For 4-bit, 2-bit and mixed 3.5 bits per weight (mixed_bits.h allocator,
// widths {2, 4}), palettizes the 35 layer matrices (embedding and classifier
// stay f32), builds the rank-r recovery adapter, and reports (a) the
// relative weight error sum ||W - W'||^2 / sum ||W||^2 before/after, and
// (b) the KL divergence KL(p_f32 || p_quant) per token and the top-1
// agreement of the scalar f32 reference forward pass
// (tests/support/reference_llama.h, llama2.c's run.c math) with
// W' = dequantized W_hat (+ s B A), teacher-forced on --tokens tokens sampled
// from the f32 model (temperature 1, seed 1). "Gap closed" = 1 - KL(recovered)
// / KL(palettized), where "palettized" is always the plain palettization; with
// --rounds R > 0 the recovered model is the alternating variant's pair
// (re-palettized base + adapter, recovery.h).
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "bench/lora_bench.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "bench/bench_util.h"
#include "hwy/highway.h"
#include "lutra/base/thread_pool.h"
#include "lutra/format/lora.h"
#include "lutra/format/lora_file.h"
#include "lutra/kernels/dot-inl.h"
#include "lutra/kernels/epilogue-inl.h"
#include "lutra/kernels/gemv-inl.h"
#include "lutra/kernels/matmul.h"
#include "lutra/kernels/matmul_input-inl.h"
#include "lutra/runtime/lora_manager.h"

#ifndef LUTRA_LORA_BENCH_ONCE_
#define LUTRA_LORA_BENCH_ONCE_
namespace lutra {
namespace bench {

// One layer's seven palettized projections, prepared for the kernels.
struct BenchLayer {
  PaletteMatrix w[kNumProjections];
  PreparedPalette pw[kNumProjections];
};

}  // namespace bench
}  // namespace lutra
#endif

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {

// The seven GEMVs of one layer for one token (x: K floats, y: N floats of
// the largest projection), each with the adapter's delta when given.
Status RunLayer(const bench::BenchLayer& layer, const Adapter* adapter, size_t layer_index,
                const float* x, float* y, PreparedInput* scratch, ThreadPool* pool,
                const MatmulOptions& opt) {
  for (Projection p : kAllProjections) {
    const PreparedPalette& w = layer.pw[static_cast<size_t>(p)];
    Epilogue ep;
    ep.lora = adapter ? adapter->Find(layer_index, p) : nullptr;
    LUTRA_RETURN_IF_ERROR(
        Gemv(w, x, w.shape().cols, ep, y, w.shape().rows, pool, opt, scratch));
  }
  return Status::Ok();
}

// The epilogue's extra work alone, for one layer: A x (LoraAx: rank dots of
// length K) and the B rows' dots (LoraRowDots, in the epilogue's chunks of
// kEpilogueChunk rows): the calls the GEMV epilogue makes. Returns a
// checksum so nothing is optimized away.
float LoraOnly(const Adapter& adapter, size_t layer_index, const float* x, float* ax) {
  float acc = 0.0f;
  HWY_ALIGN float dots[kEpilogueChunk];
  for (Projection p : kAllProjections) {
    const LoraDelta* d = adapter.Find(layer_index, p);
    const size_t K = adapter.base().Cols(p), N = adapter.base().Rows(p);
    LoraAx(*d, x, 1, K, K, ax);
    for (size_t n0 = 0; n0 < N; n0 += kEpilogueChunk) {
      const size_t n = HWY_MIN(kEpilogueChunk, N - n0);
      LoraRowDots(*d, ax, n0, n, dots);
      for (size_t j = 0; j < n; ++j) acc += d->scale * dots[j];
    }
  }
  return acc;
}

const char* TargetName() { return hwy::TargetName(HWY_TARGET); }

// Streams n floats from memory (for the bandwidth reference).
float SumBuffer(const float* p, size_t n) { return Dot(p, p, n); }

}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include "lutra/format/llama_model.h"
#include "lutra/quantize/mixed_bits.h"
#include "lutra/quantize/palettize.h"
#include "lutra/quantize/recovery.h"
#include "tests/support/random_weights.h"
#include "tests/support/reference_llama.h"

namespace lutra {
HWY_EXPORT(RunLayer);
HWY_EXPORT(SumBuffer);
HWY_EXPORT(TargetName);
HWY_EXPORT(LoraOnly);

namespace bench {
namespace {

struct Args {
  int bits = 4;
  size_t layers = 4;
  size_t reps = 15;
  size_t rank = 16;
  size_t threads = 1;
  MatmulPrecision precision = MatmulPrecision::kInt8;
  std::string recovery_model;
  int rounds = 0;
  size_t tokens = 256;
};

Args ParseArgs(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : nullptr;
    auto need = [&]() -> const char* {
      if (v == nullptr) {
        fprintf(stderr, "lora_bench: %s needs a value\n", flag.c_str());
        exit(2);
      }
      ++i;
      return v;
    };
    if (flag == "--bits") a.bits = atoi(need());
    else if (flag == "--layers") a.layers = strtoul(need(), nullptr, 10);
    else if (flag == "--reps") a.reps = strtoul(need(), nullptr, 10);
    else if (flag == "--rank") a.rank = strtoul(need(), nullptr, 10);
    else if (flag == "--threads") a.threads = strtoul(need(), nullptr, 10);
    else if (flag == "--rounds") a.rounds = atoi(need());
    else if (flag == "--tokens") a.tokens = strtoul(need(), nullptr, 10);
    else if (flag == "--recovery") a.recovery_model = need();
    else if (flag == "--precision") {
      const std::string p = need();
      a.precision = p == "f32" ? MatmulPrecision::kF32 : MatmulPrecision::kInt8;
    } else {
      fprintf(stderr, "lora_bench: unknown flag %s (see the top of bench/lora_bench.cc)\n",
              flag.c_str());
      exit(2);
    }
  }
  if (a.layers == 0 || a.reps == 0 || a.rank == 0 || a.threads == 0) {
    fprintf(stderr, "lora_bench: --layers, --reps, --rank, --threads must be >= 1\n");
    exit(2);
  }
  return a;
}

// Random weights: the kernels' speed does not depend on their values.
std::shared_ptr<const Adapter> RandomAdapter(const std::string& name, const BaseShapes& base,
                                             size_t rank, test::Rng& rng) {
  StatusOr<Adapter> a =
      test::RandomAdapter(name, base, rank, ElementType::kF16, 1.0f, 0.01f, rng);
  Check(a.status(), "adapter");
  return std::make_shared<const Adapter>(std::move(a).value());
}

int RunDecodeBench(const Args& args) {
  const size_t dim = 3072, hidden = 8192, q_dim = 3072, kv_dim = 1024;
  const BaseShapes base = BaseShapes::Llama(args.layers, dim, hidden, q_dim, kv_dim);
  Check(base.Validate(), "base");
  test::Rng rng(1);
  std::vector<BenchLayer> layers(args.layers);
  size_t weight_bytes = 0;
  for (BenchLayer& L : layers) {
    for (Projection p : kAllProjections) {
      const size_t i = static_cast<size_t>(p);
      L.w[i] = test::RandomGaussianPalette(rng, base.Rows(p), base.Cols(p), args.bits, 0.02f);
      StatusOr<PreparedPalette> pw = PreparedPalette::Make(L.w[i].view());
      Check(pw.status(), "prepare");
      L.pw[i] = std::move(pw).value();
      weight_bytes += L.w[i].shape().total_bytes();
    }
  }
  const std::shared_ptr<const Adapter> adapter = RandomAdapter("bench", base, args.rank, rng);
  const std::vector<float> x = rng.GaussianVector(hidden);
  std::vector<float> y(hidden);
  PreparedInput scratch;
  std::unique_ptr<ThreadPool> pool;
  if (args.threads > 1) pool.reset(new ThreadPool(args.threads));
  MatmulOptions opt;
  opt.precision = args.precision;

  // Memory bandwidth reference: stream a 256 MiB buffer.
  std::vector<float> big(size_t{64} << 20, 1.0f);
  std::vector<double> bw;
  float sink = 0.0f;
  for (int r = 0; r < 5; ++r) {
    const double t0 = Now();
    sink += HWY_DYNAMIC_DISPATCH(SumBuffer)(big.data(), big.size());
    bw.push_back(double(big.size() * 4) / (Now() - t0) / 1e9);
  }
  const double bandwidth = Median(bw);

  // Warm up, then alternate: all layers without, all layers with adapter.
  for (size_t l = 0; l < args.layers; ++l) {
    Check(HWY_DYNAMIC_DISPATCH(RunLayer)(layers[l], adapter.get(), l, x.data(), y.data(),
                                         &scratch, pool.get(), opt), "warm up");
  }
  // Each repetition times both variants back to back (alternating which
  // goes first); the overhead is the median of the per-repetition ratios,
  // which cancels slow drift of a shared machine better than a ratio of
  // medians.
  std::vector<double> t_base, t_lora, ratio, t_only;
  std::vector<float> ax(kMaxLoraRank);
  for (size_t r = 0; r < args.reps; ++r) {
    double t[2];
    for (int k = 0; k < 2; ++k) {
      const int with = (r & 1) ? 1 - k : k;
      const double t0 = Now();
      for (size_t l = 0; l < args.layers; ++l) {
        Check(HWY_DYNAMIC_DISPATCH(RunLayer)(layers[l], with ? adapter.get() : nullptr, l,
                                             x.data(), y.data(), &scratch, pool.get(), opt),
              "gemv");
      }
      t[with] = (Now() - t0) / double(args.layers);
    }
    t_base.push_back(t[0]);
    t_lora.push_back(t[1]);
    ratio.push_back(t[1] / t[0]);
    const double t0 = Now();
    for (size_t l = 0; l < args.layers; ++l) {
      sink += HWY_DYNAMIC_DISPATCH(LoraOnly)(*adapter, l, x.data(), ax.data());
    }
    t_only.push_back((Now() - t0) / double(args.layers));
  }
  const double base_s = Median(t_base), lora_s = Median(t_lora);
  const double only_s = Median(t_only);
  const double lora_bytes = double(adapter->bytes()) / double(args.layers);
  const double layer_bytes = double(weight_bytes) / double(args.layers);
  printf("target %s, %zu thread(s), precision %s, %d-bit palettized AFM-like layer "
         "(dim 3072, FFN 8192, kv 1024): %.1f MiB weights/layer, rank-%zu adapter %.2f MiB/layer\n",
         HWY_DYNAMIC_DISPATCH(TargetName)(), args.threads,
         MatmulPrecisionName(args.precision), args.bits, layer_bytes / (1 << 20), args.rank,
         lora_bytes / (1 << 20));
  printf("memory bandwidth (stream read, median of 5): %.2f GB/s\n", bandwidth);
  printf("layer decode (7 GEMVs), median of %zu: no adapter %.3f ms (%.2f GB/s = %.0f%% of "
         "bandwidth), rank-%zu LoRA on all 7 %.3f ms\n",
         args.reps, base_s * 1e3, layer_bytes / base_s / 1e9,
         100.0 * layer_bytes / base_s / 1e9 / bandwidth, args.rank, lora_s * 1e3);
  printf("LoRA overhead: median per-repetition ratio %+.1f%% (ratio of medians %+.1f%%; "
         "adapter bytes +%.1f%%); the epilogue's extra work alone %.3f ms = %.1f%% of the "
         "no-adapter layer\n",
         100.0 * (Median(ratio) - 1.0), 100.0 * (lora_s / base_s - 1.0),
         100.0 * lora_bytes / layer_bytes, only_s * 1e3, 100.0 * only_s / base_s);

  // Adapter swap: Get() of a resident adapter + Find() of every target.
  AdapterManager manager(size_t{1} << 32);
  const char* names[4] = {"a", "b", "c", "d"};
  std::vector<std::shared_ptr<const Adapter>> adapters;
  for (const char* n : names) {
    adapters.push_back(RandomAdapter(n, base, args.rank, rng));
    const auto ad = adapters.back();
    Check(manager.Register(n, [ad] { return StatusOr<AdapterManager::AdapterPtr>(ad); }),
          "register");
    Check(manager.Get(n).status(), "get");
  }
  const size_t kSwaps = 200000;
  uintptr_t acc = 0;
  std::vector<double> swap_ns;
  for (int r = 0; r < 5; ++r) {
    const double t0 = Now();
    for (size_t i = 0; i < kSwaps; ++i) {
      StatusOr<AdapterManager::AdapterPtr> a = manager.Get(names[i & 3]);
      for (size_t l = 0; l < args.layers; ++l) {
        for (Projection p : kAllProjections) {
          acc += reinterpret_cast<uintptr_t>((*a)->Find(l, p));
        }
      }
    }
    swap_ns.push_back((Now() - t0) / double(kSwaps) * 1e9);
  }
  // Cold load of one adapter file (all targets, rank r, f16).
  const char* dir = getenv("TMPDIR");
  const std::string path = std::string(dir ? dir : "/tmp") + "/lutra_lora_bench.gguf";
  Check(SaveAdapter(path, *adapter), "save");
  std::vector<double> load_ms;
  for (int r = 0; r < 5; ++r) {
    const double t0 = Now();
    StatusOr<std::shared_ptr<const Adapter>> loaded = LoadAdapter(path, base);
    Check(loaded.status(), "load");
    load_ms.push_back((Now() - t0) * 1e3);
  }
  remove(path.c_str());
  printf("adapter swap (Get of a resident adapter + Find of %zu targets), median of 5 x %zu: "
         "%.0f ns\n",
         args.layers * kNumProjections, kSwaps, Median(swap_ns));
  printf("adapter load from file (%.2f MiB, %zu layers x 7 targets, rank %zu f16), median of 5: "
         "%.2f ms\n",
         double(adapter->bytes()) / (1 << 20), args.layers, args.rank, Median(load_ms));
  return (acc == 1 && sink == 0.0f) ? 1 : 0;  // keep results alive
}

// ---------------------------------------------------------------------------
// Mode 2: recovery measurement on a real model.

// The model with its layers' seven matrices taken from `mats` (dense
// row-major f32, layer by layer in kAllProjections order); norms, embedding
// and classifier stay the model's.
std::vector<LayerWeightsF32> WithMatrices(const ModelWeightsF32& m,
                                          const std::vector<const float*>& mats) {
  std::vector<LayerWeightsF32> layers = m.layers;
  for (size_t l = 0; l < layers.size(); ++l) {
    for (Projection p : kAllProjections) {
      test::LayerMatrix(layers[l], p) = mats[l * kNumProjections + static_cast<size_t>(p)];
    }
  }
  return layers;
}

// KL(p_ref || p) per token and top-1 agreement of the scalar reference with
// `mats` against the scalar reference with `ref_mats`, teacher-forced.
DistributionGap Evaluate(const ModelWeightsF32& m, const std::vector<const float*>& ref_mats,
                               const std::vector<const float*>& mats,
                               const std::vector<int>& tokens) {
  test::ReferenceLlama ref(m, WithMatrices(m, ref_mats)), q(m, WithMatrices(m, mats));
  DistributionGap gap;
  for (size_t pos = 0; pos + 1 < tokens.size(); ++pos) {
    gap.Add(ref.Forward(tokens[pos], int(pos)), q.Forward(tokens[pos], int(pos)),
            tokens[pos + 1]);
  }
  return gap;
}

int RunRecoveryEval(const Args& args) {
  StatusOr<ModelWeightsF32> loaded = LoadModel(args.recovery_model);
  Check(loaded.status(), "load model");
  const ModelWeightsF32& m = *loaded;
  const ModelConfig& c = m.config;
  const BaseShapes base = BaseShapes::Llama(size_t(c.n_layers), size_t(c.dim),
                                            size_t(c.hidden_dim), size_t(c.q_dim()),
                                            size_t(c.kv_dim()));
  Check(base.Validate(), "base shapes");
  const size_t num_mats = size_t(c.n_layers) * kNumProjections;
  std::vector<const float*> ref_mats(num_mats);
  for (int l = 0; l < c.n_layers; ++l) {
    for (Projection p : kAllProjections) {
      ref_mats[size_t(l) * kNumProjections + size_t(p)] = test::LayerMatrix(m.layers[l], p);
    }
  }
  // Evaluation text: sampled from the f32 model (temperature 1, seed 1).
  std::vector<int> tokens = {1};  // BOS
  {
    test::ReferenceLlama ref(m);
    std::mt19937_64 rng(1);
    const size_t n = std::min(args.tokens, size_t(c.seq_len));
    while (tokens.size() < n) {
      const std::vector<double> p =
          test::SoftmaxF64(ref.Forward(tokens.back(), int(tokens.size() - 1)));
      std::discrete_distribution<int> d(p.begin(), p.end());
      tokens.push_back(d(rng));
    }
  }
  printf("model %s: dim %d, hidden %d, %d layers, %d/%d heads; %zu evaluation tokens sampled "
         "from the f32 model; recovery rank %zu, rounds %d; embedding/classifier stay f32\n",
         args.recovery_model.c_str(), c.dim, c.hidden_dim, c.n_layers, c.n_heads,
         c.n_kv_heads, tokens.size(), args.rank, args.rounds);
  printf("%-9s %7s | %-22s | %-22s | %-22s | %s\n", "config", "bpw", "weight rel. err^2 q/rec",
         "KL q (nats/token)", "KL q+recovery", "gap closed (KL), top-1 q -> rec");

  struct Config {
    const char* name;
    int bits;        // 0: mixed
    double mixed;
  };
  const Config configs[] = {{"4-bit", 4, 0.0}, {"2-bit", 2, 0.0}, {"mixed3.5", 0, 3.5}};
  for (const Config& cfg : configs) {
    // Bits per matrix.
    std::vector<int> bits(num_mats, cfg.bits);
    if (cfg.bits == 0) {
      std::vector<MixedBitsTensor> tensors(num_mats);
      for (size_t i = 0; i < num_mats; ++i) {
        const Projection p = static_cast<Projection>(i % kNumProjections);
        tensors[i].name = std::to_string(i);
        tensors[i].data = ref_mats[i];
        tensors[i].rows = base.Rows(p);
        tensors[i].cols = base.Cols(p);
      }
      MixedBitsOptions mo;
      mo.target_bits = cfg.mixed;
      StatusOr<MixedBitsPlan> plan = AllocateBits(tensors, mo);
      Check(plan.status(), "mixed bits");
      for (size_t i = 0; i < num_mats; ++i) bits[i] = plan->tensors[i].bits;
    }
    std::vector<PaletteMatrix> q(num_mats);
    std::vector<RecoveryTarget> targets(num_mats);
    size_t bytes = 0, weights = 0;
    for (size_t i = 0; i < num_mats; ++i) {
      const Projection p = static_cast<Projection>(i % kNumProjections);
      PalettizeOptions po;
      po.bits = bits[i];
      StatusOr<PaletteMatrix> pm = Palettize(ref_mats[i], base.Rows(p), base.Cols(p), po);
      Check(pm.status(), "palettize");
      q[i] = std::move(pm).value();
      bytes += q[i].shape().total_bytes();
      weights += base.Rows(p) * base.Cols(p);
      targets[i] = {i / kNumProjections, p, ref_mats[i], q[i].view()};
    }
    // The plain palettization is the baseline gap, whatever --rounds does.
    std::vector<std::vector<float>> plain(num_mats);
    std::vector<const float*> plain_mats(num_mats);
    for (size_t i = 0; i < num_mats; ++i) {
      plain[i].resize(q[i].shape().rows * q[i].shape().cols);
      Check(Dequantize(q[i].view(), plain[i].data(), plain[i].size()), "dequantize");
      plain_mats[i] = plain[i].data();
    }
    RecoveryOptions ro;
    ro.rank = args.rank;
    ro.rounds = args.rounds;
    std::vector<RecoveryMatrixStats> stats;
    std::vector<PaletteMatrix> requantized;
    Adapter adapter;
    if (args.rounds > 0) {
      // Alternating: the base is re-palettized too; same bits per matrix
      // requires one call per width, so group targets by width.
      std::vector<std::vector<size_t>> by_bits(9);
      for (size_t i = 0; i < num_mats; ++i) by_bits[size_t(bits[i])].push_back(i);
      StatusOr<Adapter> a = Adapter::Create("recovery", base);
      Check(a.status(), "adapter");
      adapter = std::move(a).value();
      stats.resize(num_mats);
      for (int b = 1; b <= 8; ++b) {
        if (by_bits[size_t(b)].empty()) continue;
        std::vector<RecoveryTarget> sub;
        for (size_t i : by_bits[size_t(b)]) sub.push_back(targets[i]);
        ro.palettize.bits = b;
        StatusOr<RecoveryResult> res = BuildRecoveryAdapterAlternating(base, sub, ro);
        Check(res.status(), "alternating recovery");
        for (size_t j = 0; j < sub.size(); ++j) {
          const size_t i = by_bits[size_t(b)][j];
          q[i] = std::move(res->requantized[j]);
          stats[i] = res->stats[j];
          const LoraFactors& f = res->adapter.target(j);
          Check(adapter.AddFactors(f.layer(), f.projection(), f.rank(), f.a(), f.a_elements(),
                                   f.b(), f.b_elements(), f.type(), f.type(), f.scale()),
                "merge adapter");
        }
      }
    } else {
      StatusOr<Adapter> a = BuildRecoveryAdapter(base, targets, ro, &stats);
      Check(a.status(), "recovery");
      adapter = std::move(a).value();
    }
    // Dense f32 W_hat and W_hat + s B A for the scalar forward pass.
    std::vector<std::vector<float>> deq(num_mats), rec(num_mats);
    std::vector<const float*> rec_mats(num_mats);
    double err_q = 0.0, err_rec = 0.0, norm = 0.0;
    for (size_t i = 0; i < num_mats; ++i) {
      const Projection p = static_cast<Projection>(i % kNumProjections);
      const size_t N = base.Rows(p), K = base.Cols(p);
      deq[i].resize(N * K);
      Check(Dequantize(q[i].view(), deq[i].data(), N * K), "dequantize");
      rec[i] = deq[i];
      const LoraFactors* f = adapter.FindFactors(i / kNumProjections, p);
      for (size_t n = 0; n < N; ++n) {
        for (size_t k = 0; k < K; ++k) {
          double ba = 0.0;
          for (size_t r = 0; r < f->rank(); ++r) ba += double(f->B(n, r)) * f->A(r, k);
          rec[i][n * K + k] = static_cast<float>(rec[i][n * K + k] + f->scale() * ba);
          const double w = ref_mats[i][n * K + k];
          err_q += (w - plain[i][n * K + k]) * (w - plain[i][n * K + k]);
          err_rec += (w - rec[i][n * K + k]) * (w - rec[i][n * K + k]);
          norm += w * w;
        }
      }
      rec_mats[i] = rec[i].data();
    }
    const DistributionGap eq = Evaluate(m, ref_mats, plain_mats, tokens);
    const DistributionGap er = Evaluate(m, ref_mats, rec_mats, tokens);
    const double bpw = 8.0 * double(bytes) / double(weights);
    const double adapter_bpw = 8.0 * double(adapter.bytes()) / double(weights);
    printf("%-9s %7.3f | %9.5f -> %9.5f | %22.5f | %22.5f | %5.1f%%, %.3f -> %.3f "
           "(adapter +%.2f bpw)\n",
           cfg.name, bpw, err_q / norm, err_rec / norm, eq.mean_kl(), er.mean_kl(),
           100.0 * (1.0 - er.mean_kl() / eq.mean_kl()), eq.top1_agreement(),
           er.top1_agreement(), adapter_bpw);
    fflush(stdout);
  }
  return 0;
}

}  // namespace
}  // namespace bench
}  // namespace lutra

int main(int argc, char** argv) {
  const lutra::bench::Args args = lutra::bench::ParseArgs(argc, argv);
  if (!args.recovery_model.empty()) return lutra::bench::RunRecoveryEval(args);
  return lutra::bench::RunDecodeBench(args);
}
#endif  // HWY_ONCE
