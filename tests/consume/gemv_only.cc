// GEMV only, static dispatch: what one Gemv call costs in compile time and
// .text per target (docs/mobile.md "GEMV: compile time and size"). Compiled
// by hand, not by CI.
#include "hwy/highway.h"
#include "lutra/kernels/gemv-inl.h"
lutra::Status RunGemv(const lutra::PreparedPalette& w, const float* x, float* y,
                      const lutra::MatmulOptions& opt, lutra::PreparedInput* in) {
  return lutra::HWY_NAMESPACE::Gemv(w, x, w.shape().cols, lutra::Epilogue(), y, w.shape().rows,
                                    nullptr, opt, in);
}
