// Two sessions on one model (issue 18, docs/design.md "Sessions"): one loaded
// (mapped, palettized) model, two threads generating at once, each with its
// own RunState, Sampler, adapter and thread pool. The model, its prepared
// tables and the adapters are shared and only read; the outputs must be
// exactly those of running the sessions one after the other. CI also runs
// this under TSan (issue 18 item 5), where a write to shared state is a race.
#include <stdint.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "examples/engine.h"
#include "lutra/base/thread_pool.h"
#include "lutra/format/lora.h"
#include "lutra/runtime/sampling.h"
#include "tests/test_util.h"

namespace lutra {
namespace engine {
namespace {

// A rank-2 adapter on the attention projections of every layer.
std::shared_ptr<const Adapter> TaskAdapter(const Model& m) {
  test::Rng rng(7);
  const BaseShapes shapes = AdapterShapes(m.config);
  StatusOr<Adapter> a = Adapter::Create("task", shapes);
  REQUIRE(a.ok());
  const size_t rank = 2;
  for (int l = 0; l < m.config.n_layers; ++l) {
    for (Projection p : {Projection::kQ, Projection::kV}) {
      const std::vector<float> A = rng.GaussianVector(rank * shapes.Cols(p), 0.1f);
      const std::vector<float> B = rng.GaussianVector(shapes.Rows(p) * rank, 0.1f);
      REQUIRE(a->AddF32(size_t(l), p, rank, A.data(), B.data(), 1.0f).ok());
    }
  }
  return std::make_shared<const Adapter>(std::move(*a));
}

// What one session produced: its tokens and the logits of its last step.
struct SessionResult {
  Status status;
  std::vector<int> tokens;
  std::vector<float> last_logits;
};

// One session: its own RunState (activations, KV cache, scratch) and Sampler,
// the shared model and adapter read only. No REQUIRE here: it may run on a
// thread other than Catch2's.
SessionResult RunSession(const Model& model, const Adapter* adapter, ThreadPool* pool,
                         uint64_t seed, size_t steps) {
  SessionResult r;
  StatusOr<RunState> state = MakeRunState(model.config, /*max_batch=*/4);
  if (!state.ok()) return {state.status(), {}, {}};
  state->pool = pool;
  state->adapter = adapter;
  SamplingConfig sc;
  sc.temperature = 0.8f;
  sc.seed = seed;
  StatusOr<Sampler> sampler = Sampler::Create(size_t(model.config.vocab_size), sc);
  if (!sampler.ok()) return {sampler.status(), {}, {}};
  const std::vector<int> prompt = {1, int(5 + seed % 200), int(17 + seed % 300), 42};
  r.status = Generate(model, *state, prompt, steps, *sampler, {}, [&](int, int token) {
    r.tokens.push_back(token);
  }, nullptr);
  const size_t vocab = size_t(model.config.vocab_size);
  r.last_logits.assign(state->logits.begin(), state->logits.begin() + vocab);
  return r;
}

void ExpectSame(const SessionResult& a, const SessionResult& b) {
  INFO(a.status.message() << " / " << b.status.message());
  REQUIRE(a.status.ok());
  REQUIRE(b.status.ok());
  CHECK(a.tokens.size() > 8);
  CHECK(a.tokens == b.tokens);
  CHECK(a.last_logits == b.last_logits);  // bitwise: nothing leaked between sessions
}

TEST_CASE("Two sessions on one mapped model equal running them one after the other",
          "[sessions]") {
  // A palettized model saved and mapped back, as an app would load it.
  LoadOptions o;
  o.bits = 4;
  StatusOr<Model> made = MakeSyntheticModel("tiny", o, 31);
  REQUIRE(made.ok());
  const std::string path = test::TempPath("sessions.lutra");
  REQUIRE(SaveLutraModel(*made, nullptr, path).ok());
  StatusOr<Model> model = OpenModel(path, LoadOptions());
  INFO(model.status().message());
  REQUIRE(model.ok());
  REQUIRE(model->weights.embedding.palettized());
  const std::shared_ptr<const Adapter> adapter = TaskAdapter(*model);
  const size_t steps = getenv("LUTRA_TEST_QUICK") != nullptr ? 24 : 96;

  // Session A: no adapter, this thread only. Session B: the adapter and its
  // own 2-thread pool (pools are per session: ParallelFor is not reentrant).
  ThreadPool pool_b(2);
  const SessionResult seq_a = RunSession(*model, nullptr, nullptr, 1, steps);
  const SessionResult seq_b = RunSession(*model, adapter.get(), &pool_b, 2, steps);
  REQUIRE(seq_a.status.ok());
  REQUIRE(seq_b.status.ok());
  CHECK(seq_a.tokens != seq_b.tokens);  // the sessions really differ

  for (int round = 0; round < 2; ++round) {
    SessionResult par_a, par_b;
    std::thread ta([&] { par_a = RunSession(*model, nullptr, nullptr, 1, steps); });
    std::thread tb([&] { par_b = RunSession(*model, adapter.get(), &pool_b, 2, steps); });
    ta.join();
    tb.join();
    INFO("round " << round);
    ExpectSame(seq_a, par_a);
    ExpectSame(seq_b, par_b);
  }
}

}  // namespace
}  // namespace engine
}  // namespace lutra
