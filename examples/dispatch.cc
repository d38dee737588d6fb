// Dynamic dispatch of lutra kernels: compiled once per Highway target.
// See dispatch.h for why, and docs/design.md for static dispatch instead.
#include "examples/dispatch.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "examples/dispatch.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "lutra/dot-inl.h"

HWY_BEFORE_NAMESPACE();
namespace lutra {
namespace HWY_NAMESPACE {
namespace {

float DotT(const float* a, const float* b, size_t num) { return Dot(a, b, num); }

}  // namespace
}  // namespace HWY_NAMESPACE
}  // namespace lutra
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include "hwy/targets.h"

namespace lutra {
namespace dispatch {

HWY_EXPORT(DotT);

float Dot(const float* a, const float* b, size_t num) {
  return HWY_DYNAMIC_DISPATCH(DotT)(a, b, num);
}

const char* TargetName() {
  // The dispatch table picks the best of the targets this binary was built
  // for among those the CPU supports: the lowest set bit of the intersection
  // (Highway orders better targets first, with smaller bit values).
  const int64_t targets = hwy::SupportedTargets() & HWY_TARGETS;
  return hwy::TargetName(targets & ~(targets - 1));
}

}  // namespace dispatch
}  // namespace lutra
#endif  // HWY_ONCE
