// lutra-generate (placeholder until the generator lands): runs a kernel
// through dynamic dispatch and prints which target served it.
#include <cstdio>
#include <vector>

#include "examples/dispatch.h"

int main() {
  std::vector<float> a(4099, 0.5f), b(4099, 2.0f);
  const float dot = lutra::dispatch::Dot(a.data(), b.data(), a.size());
  std::printf("lutra demo: Dot of 4099 elements = %.1f (expected 4099.0) on %s\n",
              dot, lutra::dispatch::TargetName());
  return dot == 4099.0f ? 0 : 1;
}
