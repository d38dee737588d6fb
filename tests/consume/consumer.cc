// A tiny lutra consumer with static dispatch: compiled for the build's
// baseline target (add -march=... to pick the phone's or server's ISA).
#include <cstdio>
#include <vector>

#include "hwy/highway.h"
#include "lutra/dot-inl.h"
#include "lutra/status.h"

int main() {
  std::vector<float> a(100, 1.0f), b(100, 3.0f);
  const float dot = lutra::HWY_NAMESPACE::Dot(a.data(), b.data(), a.size());
  const lutra::Status status =
      dot == 300.0f ? lutra::Status::Ok() : lutra::InvalidArgument("Dot gave %f", dot);
  std::printf("consumer (%s): Dot = %.1f %s\n", hwy::TargetName(HWY_TARGET), dot,
              status.ok() ? "OK" : status.message().c_str());
  return status.ok() ? 0 : 1;
}
