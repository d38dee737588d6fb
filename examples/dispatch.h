// Plain C++ entry points to lutra kernels with dynamic dispatch.
//
// This is the pattern an engine uses to ship one binary for every CPU: the
// kernels are compiled once per Highway target in dispatch.cc (the only file
// that includes hwy/foreach_target.h), and each call below jumps to the best
// target of the running CPU. Callers include only this plain header.
#ifndef LUTRA_EXAMPLES_DISPATCH_H_
#define LUTRA_EXAMPLES_DISPATCH_H_

#include <stddef.h>

namespace lutra {
namespace dispatch {

// sum_i a[i] * b[i], see lutra/dot-inl.h.
float Dot(const float* a, const float* b, size_t num);

// Name of the Highway target these calls run on, e.g. "AVX3_ZEN4".
const char* TargetName();

}  // namespace dispatch
}  // namespace lutra

#endif  // LUTRA_EXAMPLES_DISPATCH_H_
