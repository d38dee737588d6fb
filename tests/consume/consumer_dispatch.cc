// A lutra consumer with dynamic dispatch: only installed plain headers and
// the lutra::dispatch library, no Highway macros. GEMV and GEMM through a
// Linear, then int8 KV cache + attention, on the best SIMD target of this
// CPU; checked against scalar references.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "lutra/dispatch.h"
#include "lutra/linear.h"

// ---- engine code (what an engine writes; <= 30 lines) -----------------------
lutra::Status Run(const float* weights, size_t N, size_t K, const float* x, size_t M,
                  float* y, const float* q, const float* kv, size_t T, size_t D, float* attn) {
  lutra::PalettizeOptions popt;
  popt.bits = 4;
  LUTRA_ASSIGN_OR_RETURN(lutra::PaletteMatrix w, lutra::Palettize(weights, N, K, popt));
  lutra::LinearOptions lopt;
  lopt.max_tokens = M;
  lopt.max_threads = 2;
  LUTRA_ASSIGN_OR_RETURN(lutra::Linear fc, lutra::Linear::Make(w.view(), lopt));
  lutra::ThreadPool pool(2);
  LUTRA_RETURN_IF_ERROR(fc.Prepare(x, 1, lutra::Epilogue()));  // GEMV: token 0
  LUTRA_RETURN_IF_ERROR(fc.RunParallel(y, &pool));
  LUTRA_RETURN_IF_ERROR(fc.Prepare(x, M, lutra::Epilogue()));  // GEMM: M tokens
  LUTRA_RETURN_IF_ERROR(fc.RunParallel(y + N, &pool));        // y: 1 + M rows
  lutra::KVCacheConfig cfg;
  cfg.head_dim = D;
  cfg.capacity = T;
  cfg.type = lutra::ElementType::kI8;
  LUTRA_ASSIGN_OR_RETURN(lutra::KVCache cache, lutra::KVCache::Create(cfg));
  LUTRA_RETURN_IF_ERROR(lutra::dispatch::AppendKV(cache, 0, 0, T, kv, kv + T * D));
  // Query at position T - 1 attends to all T cached positions (1 head).
  LUTRA_RETURN_IF_ERROR(lutra::dispatch::Attention(cache, 0, T - 1, 1, q, 1, attn));
  // A 3-bit matrix: Unimplemented when lutra was built with LUTRA_BITS=4.
  popt.bits = 3;
  LUTRA_ASSIGN_OR_RETURN(lutra::PaletteMatrix w3, lutra::Palettize(weights, N, K, popt));
  LUTRA_ASSIGN_OR_RETURN(lutra::Linear fc3, lutra::Linear::Make(w3.view(), lopt));
  return fc3.Prepare(x, 1, lutra::Epilogue());
}
// ---- end of engine code -----------------------------------------------------

int main() {
  const size_t N = 40, K = 100, M = 3, T = 9, D = 16;
  std::vector<float> w(N * K), x(M * K), y((1 + M) * N), q(D), kv(2 * T * D), attn(D);
  for (size_t i = 0; i < w.size(); ++i) w[i] = std::sin(0.37f * i);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::cos(0.11f * i);
  for (size_t i = 0; i < kv.size(); ++i) kv[i] = std::sin(0.05f * i + 1.0f);
  for (size_t i = 0; i < D; ++i) q[i] = 0.3f * std::cos(0.2f * i);
  const lutra::Status s = Run(w.data(), N, K, x.data(), M, y.data(), q.data(), kv.data(), T, D,
                              attn.data());
  // The library built with every width runs the 3-bit matrix; with LUTRA_BITS=4 it refuses it.
  const bool three_bit_off = s.code() == lutra::StatusCode::kUnimplemented &&
                             std::strstr(s.message().c_str(), "3-bit") != nullptr;
  if (!s.ok() && !three_bit_off) {
    std::fprintf(stderr, "consumer_dispatch: %s\n", s.message().c_str());
    return 1;
  }
  // References: GEMM's token 0 (y row 1) matches the GEMV (y row 0) to
  // rounding, and every output is near the f32 product with the unquantized
  // weights (4-bit palettes of this matrix: error within 25% of max |y|).
  double max_err = 0.0, max_ref = 0.0, gemm_gemv = 0.0;
  for (size_t r = 0; r < N; ++r) gemm_gemv = std::fmax(gemm_gemv, std::fabs(y[r] - y[N + r]));
  for (size_t t = 0; t < 1 + M; ++t) {
    const float* xt = x.data() + (t == 0 ? 0 : t - 1) * K;
    for (size_t r = 0; r < N; ++r) {
      double ref = 0.0;
      for (size_t k = 0; k < K; ++k) ref += double(w[r * K + k]) * xt[k];
      max_err = std::fmax(max_err, std::fabs(ref - y[t * N + r]));
      max_ref = std::fmax(max_ref, std::fabs(ref));
    }
  }
  std::vector<double> p(T), out(D, 0.0);
  double pmax = -1e300, psum = 0.0, attn_err = 0.0;
  for (size_t t = 0; t < T; ++t) {
    double dot = 0.0;
    for (size_t i = 0; i < D; ++i) dot += double(q[i]) * kv[t * D + i];
    p[t] = dot / std::sqrt(double(D));
    pmax = std::fmax(pmax, p[t]);
  }
  for (size_t t = 0; t < T; ++t) psum += p[t] = std::exp(p[t] - pmax);
  for (size_t t = 0; t < T; ++t) {
    for (size_t i = 0; i < D; ++i) out[i] += p[t] / psum * kv[T * D + t * D + i];
  }
  for (size_t i = 0; i < D; ++i) attn_err = std::fmax(attn_err, std::fabs(out[i] - attn[i]));
  const bool ok = gemm_gemv <= 1e-4 * max_ref && max_err <= 0.25 * max_ref && attn_err <= 0.02;
  std::printf("consumer_dispatch (%s): GEMV+GEMM max error %.4f of %.3f (GEMM vs GEMV %.2g), "
              "int8 attention error %.5f, 3-bit kernels %s: %s\n",
              lutra::dispatch::ActiveTarget(), max_err, max_ref, gemm_gemv, attn_err,
              three_bit_off ? "not compiled (Unimplemented)" : "run", ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
