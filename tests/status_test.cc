// Status / StatusOr ergonomics (base/status.h): the propagation macros,
// value_or, and the debug trap on reading an error's value. The compile-fail
// check (a dropped Status is an error under -Werror) and the trap's death
// test are CTests added by tests/status_test.cmake.
#include <memory>
#include <string>
#include <utility>

#include <catch2/catch_test_macros.hpp>

#include "lutra/base/status.h"

namespace lutra {
namespace {

StatusOr<int> Parse(int v) {
  if (v < 0) return InvalidArgument("parse: %d < 0", v);
  return v * 2;
}

StatusOr<std::unique_ptr<int>> MakeBox(int v) {
  if (v == 0) return NotFound("box: empty");
  return std::make_unique<int>(v);
}

// Adds the doubled values; the first error returns early.
StatusOr<int> Sum(int a, int b, int* reached) {
  LUTRA_ASSIGN_OR_RETURN(int x, Parse(a));
  *reached = 1;
  int y = 0;
  LUTRA_ASSIGN_OR_RETURN(y, Parse(b));  // assigns an existing variable
  *reached = 2;
  return x + y;
}

Status Check(int v) {
  LUTRA_RETURN_IF_ERROR(Parse(v).status());
  LUTRA_ASSIGN_OR_RETURN(std::unique_ptr<int> box, MakeBox(v));  // move-only value
  return *box == v ? Status::Ok() : Status(StatusCode::kInternal, "box");
}

TEST_CASE("status: ASSIGN_OR_RETURN and RETURN_IF_ERROR propagate the first error") {
  int reached = 0;
  StatusOr<int> s = Sum(2, 3, &reached);
  REQUIRE(s.ok());
  CHECK(*s == 10);
  CHECK(reached == 2);

  reached = 0;
  s = Sum(-1, 3, &reached);
  REQUIRE(!s.ok());
  CHECK(s.status().code() == StatusCode::kInvalidArgument);
  CHECK(s.status().message() == "parse: -1 < 0");
  CHECK(reached == 0);

  s = Sum(1, -2, &reached);
  CHECK(s.status().message() == "parse: -2 < 0");
  CHECK(reached == 1);

  CHECK(Check(4).ok());
  CHECK(Check(-4).code() == StatusCode::kInvalidArgument);
  CHECK(Check(0).code() == StatusCode::kNotFound);
}

TEST_CASE("status: value_or") {
  CHECK(Parse(3).value_or(-1) == 6);
  CHECK(Parse(-3).value_or(-1) == -1);
  const StatusOr<std::string> name = std::string("lutra");
  const StatusOr<std::string> none = NotFound("no name");
  CHECK(name.value_or("x") == "lutra");
  CHECK(none.value_or("x") == "x");
  std::unique_ptr<int> box = MakeBox(0).value_or(nullptr);
  CHECK(box == nullptr);
  box = MakeBox(5).value_or(nullptr);
  REQUIRE(box != nullptr);
  CHECK(*box == 5);
}

TEST_CASE("status: an OK Status is not a value") {
  const StatusOr<int> s = Status::Ok();
  CHECK(!s.ok());
  CHECK(s.status().code() == StatusCode::kInternal);
  CHECK(Status().ok());
  CHECK(InvalidArgument("a").WithContext("b").message() == "b: a");
}

// Hidden: run by the status_trap CTest (tests/status_test.cmake), which
// expects this process to stop with the message (this file is compiled
// without NDEBUG).
TEST_CASE("status: value() of an error traps in debug builds", "[.trap]") {
  const StatusOr<int> s = InvalidArgument("the reason");
  const int v = *s;  // programming error: traps here
  CHECK(v == 0);
}

}  // namespace
}  // namespace lutra
