// GQA attention (decode and prefill) vs. a double-precision full-softmax
// reference, on every target, for every KV storage type, across the ring
// buffer's wrap, with and without a sliding window.
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tests/attention_test.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "lutra/base/thread_pool.h"
#include "lutra/kernels/attention-inl.h"
#include "lutra/kernels/kv_cache-inl.h"
#include "lutra/kernels/kv_cache.h"
#include "tests/test_util.h"

#ifndef LUTRA_TESTS_ATTENTION_TEST_ONCE_
#define LUTRA_TESTS_ATTENTION_TEST_ONCE_
namespace lutra {
namespace test {

// Everything appended to one layer, in f32, by absolute position: the
// reference reads these originals (or the cache's dequantized rows).
struct History {
  size_t kv_heads = 0, head_dim = 0;
  std::vector<float> k, v;  // [pos][kv_heads][head_dim]
  const float* K(size_t pos, size_t h) const {
    return k.data() + (pos * kv_heads + h) * head_dim;
  }
  const float* V(size_t pos, size_t h) const {
    return v.data() + (pos * kv_heads + h) * head_dim;
  }
};

// Full softmax in double over positions [lo, hi] of kv head h.
// get_k / get_v return head_dim floats of a position.
template <class GetK, class GetV>
void AttentionRef(const float* q, size_t head_dim, size_t lo, size_t hi,
                  double scale, const GetK& get_k, const GetV& get_v,
                  double* out) {
  std::vector<double> s(hi - lo + 1);
  double mx = -HUGE_VAL;
  for (size_t p = lo; p <= hi; ++p) {
    const float* k = get_k(p);
    double d = 0.0;
    for (size_t i = 0; i < head_dim; ++i) d += double(q[i]) * k[i];
    s[p - lo] = d * scale;
    mx = std::max(mx, s[p - lo]);
  }
  double sum = 0.0;
  for (double& x : s) sum += (x = std::exp(x - mx));
  for (size_t i = 0; i < head_dim; ++i) out[i] = 0.0;
  for (size_t p = lo; p <= hi; ++p) {
    const float* v = get_v(p);
    const double w = s[p - lo] / sum;
    for (size_t i = 0; i < head_dim; ++i) out[i] += w * v[i];
  }
}

// Per-element relative error of one stored value of each type (int8 is
// bounded per row instead, see below).
inline double TypeRelError(ElementType type) {
  switch (type) {
    case ElementType::kF32: return 0.0;
    case ElementType::kF16: return 1.0 / 2048;  // 2^-11: round to nearest, 10 bits
    case ElementType::kBF16: return 1.0 / 256;  // 2^-8: round to nearest, 7 bits
    case ElementType::kI8: return 0.0;
  }
  return 0.0;
}

// A one-layer cache config.
inline KVCacheConfig OneLayer(size_t kv_heads, size_t head_dim, size_t capacity,
                              ElementType type) {
  KVCacheConfig cfg;
  cfg.num_kv_heads = kv_heads;
  cfg.head_dim = head_dim;
  cfg.capacity = capacity;
  cfg.type = type;
  return cfg;
}

// Bitwise equality of two outputs (the determinism contracts are about
// bits, not tolerances).
inline bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace test
}  // namespace lutra
#endif  // LUTRA_TESTS_ATTENTION_TEST_ONCE_

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace {

using test::History;
using test::SameBits;

struct Shape {
  size_t kv_heads, group, head_dim, capacity;
  ElementType type;
};

std::string Describe(const Shape& s, size_t pos, size_t window) {
  return std::string(ElementTypeName(s.type)) + " kv_heads=" + std::to_string(s.kv_heads) +
         " g=" + std::to_string(s.group) + " head_dim=" + std::to_string(s.head_dim) +
         " C=" + std::to_string(s.capacity) + " pos=" + std::to_string(pos) +
         " window=" + std::to_string(window);
}

// Checks out[token][head] for query tokens at pos .. pos + nt - 1 against
// (a) the reference over the cache's own (dequantized) rows, with a
// tolerance for f32 rounding only, and (b) the reference over the f32
// originals, with the stated storage error bound:
//   score error  ds <= scale * sum_i |q_i| * err_i(k)   (err_i per type)
//   output error    <= max|v| * (e^(2 ds) - 1) + max_t err(v_t)
// (softmax weights move by at most a factor e^(+-ds) each, so their L1
// change is <= e^(2 ds) - 1; the weights sum to 1 over V's errors).
struct Worst {
  double vs_cache = 0.0;  // max |error| / tolerance vs the cache's rows
  double vs_orig = 0.0;   // max |error| / storage bound vs f32 originals
  double tol32 = 0.0;     // largest f32-rounding tolerance relative to max|v|
  double signal = 0.0, noise = 0.0;  // sum ref^2, sum (out - ref)^2 vs originals
};

Worst MeasureOutputs(const KVCache& cache, const History& hist, const Shape& sh,
                     size_t pos, size_t nt, size_t window, const float* q,
                     const float* out) {
  Worst worst;
  const size_t hd = sh.head_dim, nh = sh.kv_heads * sh.group;
  const double scale = 1.0 / std::sqrt(double(hd));
  const size_t cap = sh.capacity;
  const size_t w = window == 0 ? cap : std::min(window, cap);
  std::vector<double> ref(hd), ref_orig(hd);
  // Dequantized cache rows of [lo, p] for one kv head, decoded once and
  // shared by its g query heads; per-row max|k|, max|v| of the originals.
  std::vector<float> kdec, vdec;
  std::vector<double> kmax, vmax;
  for (size_t t = 0; t < nt; ++t) {
    const size_t p = pos + t;
    const size_t lo = std::max(cache.start(0), p + 1 >= w ? p + 1 - w : 0);
    const size_t len = p - lo + 1;
    kdec.resize(len * hd);
    vdec.resize(len * hd);
    kmax.resize(len);
    vmax.resize(len);
    for (size_t head = 0; head < nh; ++head) {
      const size_t kvh = head / sh.group;
      const float* qh = q + (t * nh + head) * hd;
      if (head % sh.group == 0) {
        for (size_t pp = lo; pp <= p; ++pp) {
          cache.DecodeRow(0, 0, kvh, pp, kdec.data() + (pp - lo) * hd);
          cache.DecodeRow(0, 1, kvh, pp, vdec.data() + (pp - lo) * hd);
          const float* ko = hist.K(pp, kvh);
          const float* vo = hist.V(pp, kvh);
          kmax[pp - lo] = vmax[pp - lo] = 0.0;
          for (size_t i = 0; i < hd; ++i) {
            kmax[pp - lo] = std::max(kmax[pp - lo], double(std::abs(ko[i])));
            vmax[pp - lo] = std::max(vmax[pp - lo], double(std::abs(vo[i])));
          }
        }
      }
      double max_v = 0.0, max_qk = 0.0, max_dv = 0.0, max_ds = 0.0;
      const double rel = test::TypeRelError(sh.type);
      const bool int8 = sh.type == ElementType::kI8;
      // int8 KV: the kernel quantizes q like a cached row (QuantizeRowI8)
      // and takes q.k in integers, so reference (a) uses that q, and the
      // bound (b) adds its error, |q - q8 * scale| <= max|q| / 254 each.
      std::vector<float> q8row(qh, qh + hd);
      double dq = 0.0;
      if (int8) {
        float max_q = 0.0f;
        for (size_t i = 0; i < hd; ++i) max_q = std::max(max_q, std::abs(qh[i]));
        if (max_q > 0.0f) {
          const float inv = 127.0f / max_q, qscale = max_q / 127.0f;
          for (size_t i = 0; i < hd; ++i) q8row[i] = float(I8FromF32(qh[i] * inv)) * qscale;
        }
        dq = max_q / 254.0 * 1.001;
      }
      for (size_t pp = lo; pp <= p; ++pp) {
        const float* kd = kdec.data() + (pp - lo) * hd;
        const float* ko = hist.K(pp, kvh);
        const float* vo = hist.V(pp, kvh);
        double qk = 0.0, ds = 0.0, dv = 0.0;
        for (size_t i = 0; i < hd; ++i) {
          const double aq = std::abs(double(qh[i]));
          qk += aq * std::abs(kd[i]);
          ds += aq * (int8 ? kmax[pp - lo] / 254.0 : rel * std::abs(ko[i])) +
                dq * std::abs(kd[i]);
          if (!int8) dv = std::max(dv, rel * std::abs(vo[i]));
        }
        if (int8) dv = vmax[pp - lo] / 254.0;
        max_qk = std::max(max_qk, qk);
        max_v = std::max(max_v, vmax[pp - lo] * 1.01);
        max_ds = std::max(max_ds, ds * scale);
        max_dv = std::max(max_dv, dv);
      }
      test::AttentionRef(
          q8row.data(), hd, lo, p, scale,
          [&](size_t pp) { return kdec.data() + (pp - lo) * hd; },
          [&](size_t pp) { return vdec.data() + (pp - lo) * hd; }, ref.data());
      test::AttentionRef(
          qh, hd, lo, p, scale, [&](size_t pp) { return hist.K(pp, kvh); },
          [&](size_t pp) { return hist.V(pp, kvh); }, ref_orig.data());
      // f32 rounding, with the statistical (random-walk) growth of rounding
      // errors rather than the worst case, which is ~1000x looser than what
      // any correct kernel shows and would hide real bugs: each score is off
      // by ~ sqrt(head_dim) * eps * sum_i |q_i k_i| (x4 margin), which moves
      // the softmax weights by a factor e^(+-ds) each; the weights (Exp:
      // 2 ulp) and the convex combination of V rows add
      // ~ eps * (sqrt(context) + 8) * max|v|.
      const double eps = 1.1920929e-7;
      const double ds32 =
          scale * 4.0 * eps * (std::sqrt(double(hd)) + 2.0) * max_qk;
      const double tol32 =
          max_v * (std::expm1(2.0 * ds32) +
                   4.0 * eps * (std::sqrt(double(p - lo + 1)) + 8.0)) +
          1e-30;
      const double tol_o = max_v * std::expm1(2.0 * max_ds) + max_dv + tol32;
      const float* o = out + (t * nh + head) * hd;
      worst.tol32 = std::max(worst.tol32, tol32 / max_v);
      for (size_t i = 0; i < hd; ++i) {
        const double e1 = std::abs(double(o[i]) - ref[i]) / tol32;
        const double e2 = std::abs(double(o[i]) - ref_orig[i]) / tol_o;
        worst.signal += ref_orig[i] * ref_orig[i];
        worst.noise += (o[i] - ref_orig[i]) * (o[i] - ref_orig[i]);
        // !(x <= y) also catches NaN.
        if (!(e1 <= worst.vs_cache)) worst.vs_cache = std::isnan(e1) ? HUGE_VAL : e1;
        if (!(e2 <= worst.vs_orig)) worst.vs_orig = std::isnan(e2) ? HUGE_VAL : e2;
      }
    }
  }
  return worst;
}

Worst CheckOutputs(const KVCache& cache, const History& hist, const Shape& sh,
                   size_t pos, size_t nt, size_t window, const float* q,
                   const float* out) {
  const Worst w = MeasureOutputs(cache, hist, sh, pos, nt, window, q, out);
  INFO(Describe(sh, pos, window) << " tokens=" << nt << " on "
       << test::CurrentTargetName() << ": error/tolerance vs cache rows "
       << w.vs_cache << ", vs f32 originals " << w.vs_orig);
  CHECK(w.vs_cache <= 1.0);
  CHECK(w.vs_orig <= 1.0);
  // Not vacuous: the f32 tolerance is a small fraction of the outputs'
  // scale (a wrong position, head, scale or mask moves outputs by > 1%).
  CHECK(w.tol32 < 1e-3);
  return w;
}

// Decodes token by token past the capacity (ring wrap), checking attention
// at every position of interest, with and without a window.
void TestDecode() {
  test::Rng rng(42);
  const ElementType types[] = {ElementType::kF32, ElementType::kF16, ElementType::kBF16, ElementType::kI8};
  const size_t groups[] = {1, 2, 3, 4, 8};
  const size_t dims[] = {32, 64, 80, 128, 18};
  for (ElementType type : types) {
    double signal = 0.0, noise = 0.0;
    for (size_t g : groups) {
      for (size_t hd : dims) {
        // The odd head_dim (vector tails) once, with f32 rows: tails of the
        // other types use the same LoadN paths; keeps the ASan run short.
        if (hd == 18 && type != ElementType::kF32) continue;
        // Capacity 45 > block (32): blocks split at the wrap point too.
        const Shape sh{2, g, hd, 45, type};
        const size_t nh = sh.kv_heads * g;
        for (size_t window : {size_t{0}, size_t{7}}) {
          KVCacheConfig cfg;
          cfg.num_layers = 1;
          cfg.num_kv_heads = sh.kv_heads;
          cfg.head_dim = hd;
          cfg.capacity = sh.capacity;
          cfg.type = type;
          StatusOr<KVCache> c = KVCache::Create(cfg);
          REQUIRE(c.ok());
          KVCache& cache = *c;
          History hist{sh.kv_heads, hd, {}, {}};
          const size_t total = 2 * sh.capacity + 13;
          std::vector<float> q(nh * hd), out(nh * hd);
          for (size_t p = 0; p < total; ++p) {
            std::vector<float> k = rng.GaussianVector(sh.kv_heads * hd);
            std::vector<float> v = rng.GaussianVector(sh.kv_heads * hd);
            hist.k.insert(hist.k.end(), k.begin(), k.end());
            hist.v.insert(hist.v.end(), v.begin(), v.end());
            REQUIRE(AppendKV(cache, 0, p, 1, k.data(), v.data()).ok());
            // Check a sample of positions (all is too slow under ASan):
            // the first ones, around capacity and the block size, the end.
            const bool check = p == 0 || p == 2 || p == 32 || p + 1 == sh.capacity ||
                               p == sh.capacity || p == sh.capacity + 20 ||
                               p + 1 == total;
            if (!check) continue;
            for (float& x : q) x = rng.Gaussian(2.0f);  // peaky softmax
            AttentionOptions opt;
            opt.window = window;
            const Status st = Attention(cache, 0, p, 1, q.data(), nh, out.data(), opt);
            INFO(Describe(sh, p, window) << " " << st.message());
            REQUIRE(st.ok());
            const Worst w =
                CheckOutputs(cache, hist, sh, p, 1, window, q.data(), out.data());
            signal += w.signal;
            noise += w.noise;
          }
        }
      }
    }
    // Typical (not worst-case) distortion of the attention output caused by
    // the storage type, vs. f32 K/V: the figures docs/attention.md states.
    const double snr = noise == 0.0 ? 300.0 : 10.0 * std::log10(signal / noise);
    if (std::string(test::CurrentTargetName()) == "AVX3_ZEN4" ||
        std::string(test::CurrentTargetName()) == "AVX2") {
      std::printf("[attention] %s KV: output SNR %.1f dB vs f32 K/V (%s)\n",
                  ElementTypeName(type), snr, test::CurrentTargetName());
    }
    const double min_snr = type == ElementType::kF32    ? 120.0
                           : type == ElementType::kF16  ? 60.0
                           : type == ElementType::kBF16 ? 40.0
                                                   : 35.0;
    INFO(ElementTypeName(type) << " SNR " << snr << " dB on " << test::CurrentTargetName());
    CHECK(snr >= min_snr);
  }
}

// Prefill of T tokens equals T decode steps (before and after the wrap,
// with a window), and chunks that the ring cannot serve are rejected.
void TestPrefill() {
  test::Rng rng(7);
  ThreadPool pool(2);
  for (ElementType type : {ElementType::kF32, ElementType::kF16, ElementType::kI8}) {
    for (size_t g : {size_t{1}, size_t{3}, size_t{8}}) {
      for (size_t hd : {size_t{64}, size_t{80}, size_t{128}}) {
        if (hd == 64 && type != ElementType::kF32) continue;  // test time
        // The AFM shape: on AVX-512 its decode steps keep their 3 rows in
        // registers (ScoresInRegisters, AccumulateVInRegisters) while the
        // prefill call's 4-row passes take the general path; both must give
        // the same bits. int8: ScoresI8 with 3 and 4 rows (4 keys at a time
        // on AVX-512, one at a time on AVX2).
        if (hd == 128 && (type == ElementType::kF32 || g != 3)) continue;
        for (size_t window : {size_t{0}, size_t{9}}) {
          const size_t cap = 70, kvh = 2, nh = kvh * g;
          const KVCacheConfig cfg = test::OneLayer(kvh, hd, cap, type);
          StatusOr<KVCache> c1 = KVCache::Create(cfg), c2 = KVCache::Create(cfg);
          REQUIRE((c1.ok() && c2.ok()));
          KVCache& pre = *c1;
          KVCache& dec = *c2;
          const Shape sh{kvh, g, hd, cap, type};
          History hist{kvh, hd, {}, {}};
          // Chunks: 37 tokens (crosses blocks), 20 more (fills to 57), then
          // with a window the ring may take chunks of cap - window + 1.
          std::vector<size_t> chunks = {37, 20};
          if (window != 0) chunks.push_back(cap - window + 1);
          size_t pos = 0;
          for (size_t T : chunks) {
            std::vector<float> k = rng.GaussianVector(T * kvh * hd);
            std::vector<float> v = rng.GaussianVector(T * kvh * hd);
            std::vector<float> q = rng.GaussianVector(T * nh * hd, 2.0f);
            hist.k.insert(hist.k.end(), k.begin(), k.end());
            hist.v.insert(hist.v.end(), v.begin(), v.end());
            REQUIRE(AppendKV(pre, 0, pos, T, k.data(), v.data()).ok());
            std::vector<float> out_pre(T * nh * hd), out_dec(T * nh * hd), out_mt(T * nh * hd);
            AttentionOptions opt;
            opt.window = window;
            const Status st = Attention(pre, 0, pos, T, q.data(), nh, out_pre.data(), opt);
            INFO(Describe(sh, pos, window) << " T=" << T << " " << st.message());
            REQUIRE(st.ok());
            REQUIRE(Attention(pre, 0, pos, T, q.data(), nh, out_mt.data(), opt, &pool).ok());
            for (size_t t = 0; t < T; ++t) {
              const size_t row = t * kvh * hd;
              REQUIRE(AppendKV(dec, 0, pos + t, 1, k.data() + row, v.data() + row).ok());
              REQUIRE(Attention(dec, 0, pos + t, 1, q.data() + t * nh * hd, nh,
                                out_dec.data() + t * nh * hd, opt)
                          .ok());
            }
            // The contract: each query's output is bit-identical whether
            // computed alone or in the prefill call, on 1 or 2 threads.
            CHECK(SameBits(out_pre, out_dec));
            CHECK(SameBits(out_pre, out_mt));
            // Against the reference too (the last chunk: the wrapped one
            // when there is a window; the others are covered by decode).
            if (T == chunks.back()) {
              CheckOutputs(pre, hist, sh, pos, T, window, q.data(), out_pre.data());
            }
            pos += T;
          }
          // A chunk longer than the ring can serve is rejected, not wrong.
          // Smallest chunk whose appends overwrite what its first query needs.
          const size_t T = window ? cap - window + 2 : std::max<size_t>(2, cap - pos + 1);
          std::vector<float> k(T * kvh * hd, 0.5f), q(T * nh * hd, 1.0f), out(q.size());
          REQUIRE(AppendKV(pre, 0, pos, T, k.data(), k.data()).ok());
          AttentionOptions opt;
          opt.window = window;
          const Status st = Attention(pre, 0, pos, T, q.data(), nh, out.data(), opt);
          CHECK(st.code() == StatusCode::kOutOfRange);
          // The same positions one at a time are fine.
          CHECK(Attention(pre, 0, pos + T - 1, 1, q.data(), nh, out.data(), opt).ok());
        }
      }
    }
  }
}

// Truncate and re-append (speculative decoding) gives the same attention
// as never having appended the rejected tokens.
void TestTruncate() {
  test::Rng rng(3);
  KVCacheConfig cfg;
  cfg.num_kv_heads = 2;
  cfg.head_dim = 32;
  cfg.capacity = 50;
  cfg.type = ElementType::kF16;
  StatusOr<KVCache> a = KVCache::Create(cfg), b = KVCache::Create(cfg);
  REQUIRE((a.ok() && b.ok()));
  const size_t nh = 4, hd = 32, kvh = 2;
  std::vector<float> k = rng.GaussianVector(80 * kvh * hd);
  std::vector<float> v = rng.GaussianVector(80 * kvh * hd);
  std::vector<float> junk = rng.GaussianVector(5 * kvh * hd);
  // a: 60 tokens, 5 junk, truncate to 60, then tokens 60..79.
  REQUIRE(AppendKV(*a, 0, 0, 60, k.data(), v.data()).ok());
  REQUIRE(AppendKV(*a, 0, 60, 5, junk.data(), junk.data()).ok());
  REQUIRE(a->Truncate(60).ok());
  REQUIRE(AppendKV(*a, 0, 60, 20, k.data() + 60 * kvh * hd, v.data() + 60 * kvh * hd).ok());
  REQUIRE(AppendKV(*b, 0, 0, 80, k.data(), v.data()).ok());
  std::vector<float> q = rng.GaussianVector(nh * hd), oa(nh * hd), ob(nh * hd);
  REQUIRE(Attention(*a, 0, 79, 1, q.data(), nh, oa.data()).ok());
  REQUIRE(Attention(*b, 0, 79, 1, q.data(), nh, ob.data()).ok());
  for (size_t i = 0; i < oa.size(); ++i) CHECK(oa[i] == ob[i]);
}

// The comparison can fail: an output off by 1% of max|v| is caught
// against the cache rows, and one off by 50% against the (worst-case, hence
// loose) int8 bound; the typical int8 error is checked by SNR in TestDecode.
void TestDetectsError() {
  test::Rng rng(99);
  for (ElementType type : {ElementType::kF32, ElementType::kI8}) {
    const Shape sh{1, 2, 64, 16, type};
    KVCacheConfig cfg;
    cfg.head_dim = 64;
    cfg.capacity = 16;
    cfg.type = type;
    StatusOr<KVCache> c = KVCache::Create(cfg);
    REQUIRE(c.ok());
    History hist{1, 64, rng.GaussianVector(10 * 64), rng.GaussianVector(10 * 64)};
    REQUIRE(AppendKV(*c, 0, 0, 10, hist.k.data(), hist.v.data()).ok());
    std::vector<float> q = rng.GaussianVector(2 * 64), out(2 * 64);
    REQUIRE(Attention(*c, 0, 9, 1, q.data(), 2, out.data()).ok());
    const Worst ok = MeasureOutputs(*c, hist, sh, 9, 1, 0, q.data(), out.data());
    CHECK(ok.vs_cache <= 1.0);
    CHECK(ok.vs_orig <= 1.0);
    double max_v = 0.0;
    for (float x : hist.v) max_v = std::max(max_v, double(std::abs(x)));
    out[5] += float((type == ElementType::kF32 ? 1e-2 : 0.5) * max_v);
    const Worst bad = MeasureOutputs(*c, hist, sh, 9, 1, 0, q.data(), out.data());
    CHECK(bad.vs_cache > 1.0);
    CHECK(bad.vs_orig > 1.0);
  }
}

// Split-KV and the determinism contracts, for every KV type, across the
// ring's wrap, with and without a window, with chunks that cut blocks (16),
// chunks that do not align with them (40) and the default (0 = 256):
//  (a) outputs match the reference (the chunk merge is right);
//  (b) no pool, 1 and 2 threads give the same bits;
//  (c) a query computed alone (decode) and as a row of a call with
//      num_tokens = k <= 16 (speculative verification) give the same bits.
void TestSplitKV() {
  test::Rng rng(11);
  ThreadPool pool1(1), pool2(2);
  const bool quick = getenv("LUTRA_TEST_QUICK") != nullptr;
  const size_t batch_sizes[] = {16, 1, 5, 9, 16, 3, 13, 2, 7, 11};
  for (ElementType type : {ElementType::kF32, ElementType::kF16, ElementType::kBF16,
                           ElementType::kI8}) {
    for (size_t chunk : {size_t{0}, size_t{16}, size_t{40}}) {
      for (size_t window : {size_t{0}, size_t{23}}) {
        // head_dim 36: full vector pairs plus a partial vector on every
        // target. Capacity 100: the ring wraps mid-block and mid-chunk.
        const size_t kvh = 2, g = 3, hd = 36, cap = 100, nh = kvh * g;
        const Shape sh{kvh, g, hd, cap, type};
        const KVCacheConfig cfg = test::OneLayer(kvh, hd, cap, type);
        StatusOr<KVCache> c1 = KVCache::Create(cfg), c2 = KVCache::Create(cfg);
        REQUIRE((c1.ok() && c2.ok()));
        KVCache& seq = *c1;    // appended and attended one token at a time
        KVCache& batch = *c2;  // appended and attended k tokens at a time
        History hist{kvh, hd, {}, {}};
        AttentionOptions opt;
        opt.window = window;
        opt.kv_chunk = chunk;
        const size_t total = quick ? cap + 40 : 2 * cap + 37;
        size_t pos = 0;
        for (size_t step = 0; pos < total; ++step) {
          size_t k = batch_sizes[step % 10];
          // Without a window a wrapped ring serves single tokens only.
          if (window == 0 && pos + k > cap) k = 1;
          k = std::min(k, total - pos);
          std::vector<float> kk = rng.GaussianVector(k * kvh * hd);
          std::vector<float> vv = rng.GaussianVector(k * kvh * hd);
          std::vector<float> q = rng.GaussianVector(k * nh * hd, 2.0f);
          hist.k.insert(hist.k.end(), kk.begin(), kk.end());
          hist.v.insert(hist.v.end(), vv.begin(), vv.end());
          std::vector<float> single(k * nh * hd), one(nh * hd), two(nh * hd);
          for (size_t t = 0; t < k; ++t) {
            const size_t row = t * kvh * hd;
            REQUIRE(AppendKV(seq, 0, pos + t, 1, kk.data() + row, vv.data() + row).ok());
            const float* qt = q.data() + t * nh * hd;
            const Status st = Attention(seq, 0, pos + t, 1, qt, nh, single.data() + t * nh * hd, opt);
            INFO(Describe(sh, pos + t, window) << " chunk=" << chunk << " " << st.message());
            REQUIRE(st.ok());
            REQUIRE(Attention(seq, 0, pos + t, 1, qt, nh, one.data(), opt, &pool1).ok());
            REQUIRE(Attention(seq, 0, pos + t, 1, qt, nh, two.data(), opt, &pool2).ok());
            const std::vector<float> alone(single.begin() + t * nh * hd,
                                           single.begin() + (t + 1) * nh * hd);
            CHECK(SameBits(alone, one));
            CHECK(SameBits(alone, two));
            if ((pos + t) % 7 == 0 || pos + t + 1 == total) {
              CheckOutputs(seq, hist, sh, pos + t, 1, window, qt, alone.data());
            }
          }
          REQUIRE(AppendKV(batch, 0, pos, k, kk.data(), vv.data()).ok());
          std::vector<float> rows1(single.size()), rows2(single.size());
          const Status st = Attention(batch, 0, pos, k, q.data(), nh, rows1.data(), opt);
          INFO(Describe(sh, pos, window) << " chunk=" << chunk << " k=" << k << " "
                                         << st.message());
          REQUIRE(st.ok());
          REQUIRE(Attention(batch, 0, pos, k, q.data(), nh, rows2.data(), opt, &pool2).ok());
          CHECK(SameBits(rows1, single));
          CHECK(SameBits(rows2, single));
          pos += k;
        }
      }
    }
  }
}

void TestErrors() {
  KVCacheConfig cfg;
  cfg.num_layers = 2;
  cfg.num_kv_heads = 4;
  cfg.head_dim = 16;
  cfg.capacity = 8;
  StatusOr<KVCache> c = KVCache::Create(cfg);
  REQUIRE(c.ok());
  std::vector<float> kv(4 * 16, 1.0f), q(12 * 16, 1.0f), out(q.size());
  REQUIRE(AppendKV(*c, 0, 0, 1, kv.data(), kv.data()).ok());
  // 6 heads is not a multiple of 4 kv heads.
  Status st = Attention(*c, 0, 0, 1, q.data(), 6, out.data());
  CHECK(st.code() == StatusCode::kInvalidArgument);
  CHECK(st.message().find("num_kv_heads") != std::string::npos);
  CHECK(Attention(*c, 2, 0, 1, q.data(), 8, out.data()).code() ==
        StatusCode::kOutOfRange);
  // Position 1 not appended yet; layer 1 holds nothing.
  CHECK(Attention(*c, 0, 1, 1, q.data(), 8, out.data()).code() ==
        StatusCode::kOutOfRange);
  CHECK(Attention(*c, 1, 0, 1, q.data(), 8, out.data()).code() ==
        StatusCode::kOutOfRange);
  CHECK(Attention(*c, 0, 0, 1, q.data(), 8, out.data()).ok());
  CHECK(Attention(*c, 0, 0, 0, q.data(), 8, out.data()).ok());  // no tokens
  KVCache empty;
  CHECK(!Attention(empty, 0, 0, 1, q.data(), 8, out.data()).ok());
}

}  // namespace
}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lutra {
HWY_EXPORT(TestDecode);
HWY_EXPORT(TestPrefill);
HWY_EXPORT(TestSplitKV);
HWY_EXPORT(TestTruncate);
HWY_EXPORT(TestErrors);
HWY_EXPORT(TestDetectsError);

TEST_CASE("Decode attention matches full-softmax reference", "[attention]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestDecode)(); });
}
TEST_CASE("Prefill is bit-identical to decode steps; oversized chunks rejected", "[attention]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestPrefill)(); });
}
TEST_CASE("Split-KV matches the reference; bits independent of threads and batch",
          "[attention]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestSplitKV)(); });
}
TEST_CASE("Truncate then re-append equals a clean history", "[attention]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestTruncate)(); });
}
TEST_CASE("Attention rejects bad shapes and positions", "[attention]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestErrors)(); });
}
TEST_CASE("Attention comparison detects errors", "[attention]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestDetectsError)(); });
}
}  // namespace lutra
#endif  // HWY_ONCE
