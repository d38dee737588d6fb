// Error reporting without exceptions.
//
// Library code is built with -fno-exceptions for mobile targets, and must never
// abort on bad input (shapes, files, options). Every fallible entry point
// returns a Status (or StatusOr<T>) whose message names what is wrong, e.g.
// "palettize: K = 0, need K >= 1".
//
// Both types are [[nodiscard]]: a dropped result is a compile warning (an
// error under -Werror; tests/status_nodiscard.cc checks that). Propagate with
// LUTRA_RETURN_IF_ERROR / LUTRA_ASSIGN_OR_RETURN, or discard on purpose with
// a (void) cast.
#ifndef LUTRA_STATUS_H_
#define LUTRA_STATUS_H_

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>

namespace lutra {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,   // bad shape, option or parameter
  kOutOfRange,        // index, position or capacity exceeded
  kDataLoss,          // corrupt or truncated file
  kNotFound,          // missing file, tensor or key
  kUnimplemented,     // valid request that this build does not support
  kResourceExhausted, // allocation or budget exceeded
  kInternal,
};

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(StatusCode code, std::string message)
      : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }
  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  // Empty when ok().
  const std::string& message() const { return message_; }

  // "what: detail" style prefixing, for callers that add context.
  Status WithContext(const std::string& context) const {
    if (ok()) return *this;
    return Status(code_, context + ": " + message_);
  }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

// printf-style message formatting for errors.
// (A C++ attribute must come before GNU attributes for clang.)
[[nodiscard]]
#if defined(__GNUC__) || defined(__clang__)
__attribute__((format(printf, 2, 3)))
#endif
inline Status MakeError(StatusCode code, const char* format, ...) {
  char buf[1024];
  va_list args;
  va_start(args, format);
  std::vsnprintf(buf, sizeof(buf), format, args);
  va_end(args);
  return Status(code, buf);
}
#define LUTRA_ERROR_FN(Name, Code)                                          \
  template <class... Args>                                                  \
  [[nodiscard]] Status Name(const char* format, Args... args) {             \
    return MakeError(Code, format, args...);                                \
  }                                                                         \
  [[nodiscard]] inline Status Name(const char* message) {                   \
    return Status(Code, message);                                           \
  }
LUTRA_ERROR_FN(InvalidArgument, StatusCode::kInvalidArgument)
LUTRA_ERROR_FN(OutOfRange, StatusCode::kOutOfRange)
LUTRA_ERROR_FN(DataLoss, StatusCode::kDataLoss)
LUTRA_ERROR_FN(NotFound, StatusCode::kNotFound)
LUTRA_ERROR_FN(Unimplemented, StatusCode::kUnimplemented)
LUTRA_ERROR_FN(ResourceExhausted, StatusCode::kResourceExhausted)
#undef LUTRA_ERROR_FN

namespace detail {
// Reached only through a programming error (reading the value of an error
// StatusOr): debug builds stop there with the error's message; release
// builds return the default-constructed value (library code never aborts).
[[noreturn]] inline void StatusOrValueOfError(const Status& status) {
  std::fprintf(stderr, "lutra: value() of an error StatusOr: %s\n", status.message().c_str());
  std::fflush(stderr);
  __builtin_trap();
}
}  // namespace detail

// A value or the Status that explains why there is none. T must be movable
// and default-constructible.
template <class T>
class [[nodiscard]] StatusOr {
 public:
  StatusOr(Status status) : status_(std::move(status)) {  // NOLINT: implicit
    // An OK status without a value is itself a programming error.
    if (status_.ok()) status_ = Status(StatusCode::kInternal, "StatusOr made from an OK Status");
  }
  StatusOr(T value) : has_value_(true), value_(std::move(value)) {}  // NOLINT
  bool ok() const { return has_value_; }
  const Status& status() const { return status_; }
  // Precondition: ok(). Reading the value of an error traps in debug builds
  // (NDEBUG undefined) after printing the error; check ok() or use value_or.
  T& value() & { return (Check(), value_); }
  const T& value() const& { return (Check(), value_); }
  T&& value() && { return (Check(), std::move(value_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() { return value(); }
  const T& operator*() const { return value(); }
  // The value when ok(), else `fallback`.
  template <class U>
  T value_or(U&& fallback) const& {
    return has_value_ ? value_ : static_cast<T>(std::forward<U>(fallback));
  }
  template <class U>
  T value_or(U&& fallback) && {
    return has_value_ ? std::move(value_) : static_cast<T>(std::forward<U>(fallback));
  }

 private:
  void Check() const {
#ifndef NDEBUG
    if (!has_value_) detail::StatusOrValueOfError(status_);
#endif
  }

  Status status_;  // OK when has_value_
  bool has_value_ = false;
  T value_{};
};

}  // namespace lutra

// Returns the Status of `expr` from the enclosing function when it is not OK.
#define LUTRA_RETURN_IF_ERROR(expr)               \
  do {                                            \
    ::lutra::Status lutra_status_ = (expr);       \
    if (!lutra_status_.ok()) return lutra_status_; \
  } while (0)

// LUTRA_ASSIGN_OR_RETURN(lhs, expr): evaluates the StatusOr `expr`; returns
// its Status from the enclosing function on error, else moves the value into
// `lhs`, which may declare a variable: LUTRA_ASSIGN_OR_RETURN(auto w, Make());
#define LUTRA_STATUS_CONCAT_INNER_(a, b) a##b
#define LUTRA_STATUS_CONCAT_(a, b) LUTRA_STATUS_CONCAT_INNER_(a, b)
#define LUTRA_ASSIGN_OR_RETURN(lhs, expr) \
  LUTRA_ASSIGN_OR_RETURN_IMPL_(LUTRA_STATUS_CONCAT_(lutra_statusor_, __LINE__), lhs, expr)
#define LUTRA_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                 \
  if (!tmp.ok()) return tmp.status();                \
  lhs = std::move(tmp).value()

#endif  // LUTRA_STATUS_H_
