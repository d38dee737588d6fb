// Compile-fail check for tests/status_test.cmake: dropping a Status or a
// StatusOr must not compile under -Werror. Built twice: as is (the CTest
// expects the compiler to fail naming the dropped Status) and with
// -DLUTRA_NODISCARD_CONTROL (must compile: the failure is the dropped result,
// not a broken include).
#include "lutra/base/status.h"

lutra::Status Fallible() { return lutra::InvalidArgument("x"); }
lutra::StatusOr<int> FallibleValue() { return 1; }

int main() {
#ifdef LUTRA_NODISCARD_CONTROL
  (void)Fallible();  // an explicit discard is allowed
  return FallibleValue().ok() ? 0 : 1;
#else
  Fallible();       // error: a dropped result
  FallibleValue();  // error likewise
  return 0;
#endif
}
