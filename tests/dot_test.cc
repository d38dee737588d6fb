// Dot product vs. a double-precision scalar reference, on every target.
#include <stddef.h>

#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tests/dot_test.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "lutra/kernels/dot-inl.h"
#include "tests/test_util.h"

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace {

double DotRef(const float* a, const float* b, size_t n) {
  double sum = 0.0;
  for (size_t i = 0; i < n; ++i) sum += double(a[i]) * double(b[i]);
  return sum;
}

void TestDot() {
  test::Rng rng(1234);
  for (size_t n : test::SweepSizes()) {
    // Unaligned starts: the kernel promises no alignment requirement.
    for (size_t misalign : {0, 1, 3}) {
      std::vector<float> a = rng.GaussianVector(n + misalign);
      std::vector<float> b = rng.GaussianVector(n + misalign);
      const float* pa = a.data() + misalign;
      const float* pb = b.data() + misalign;
      const float actual = Dot(pa, pb, n);
      const double expected = DotRef(pa, pb, n);
      const double tol = test::DotTolerance(n, test::L2Norm(pa, n), test::L2Norm(pb, n));
      INFO("n=" << n << " misalign=" << misalign);
      test::ExpectClose(&actual, &expected, tol, 1, "Dot");
    }
  }
  // num = 0 reads nothing.
  CHECK(Dot(static_cast<const float*>(nullptr), static_cast<const float*>(nullptr), 0) == 0.0f);
}

// The test must be able to fail: a reference that is off by more than the
// tolerance is detected (guards against a vacuous ExpectClose).
void TestDotDetectsError() {
  test::Rng rng(7);
  const size_t n = 257;
  std::vector<float> a = rng.GaussianVector(n), b = rng.GaussianVector(n);
  const double tol = test::DotTolerance(n, test::L2Norm(a), test::L2Norm(b));
  const double actual = Dot(a.data(), b.data(), n);
  CHECK(std::abs(actual - (DotRef(a.data(), b.data(), n) + 10 * tol)) > tol);
}

}  // namespace
}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lutra {
HWY_EXPORT(TestDot);
HWY_EXPORT(TestDotDetectsError);

TEST_CASE("Dot matches scalar reference on every target", "[dot]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestDot)(); });
}
TEST_CASE("Dot tolerance detects an error", "[dot]") {
  test::ForEachTarget([] { HWY_DYNAMIC_DISPATCH(TestDotDetectsError)(); });
}
}  // namespace lutra
#endif  // HWY_ONCE
