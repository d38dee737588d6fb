// Error reporting without exceptions.
//
// Library code is built with -fno-exceptions for mobile targets, and must never
// abort on bad input (shapes, files, options). Every fallible entry point
// returns a Status (or StatusOr<T>) whose message names what is wrong, e.g.
// "palettize: K = 0, need K >= 1".
#ifndef LUTRA_STATUS_H_
#define LUTRA_STATUS_H_

#include <cstdarg>
#include <cstdio>
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

class Status {
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
  Status Name(const char* format, Args... args) {                           \
    return MakeError(Code, format, args...);                                \
  }                                                                         \
  inline Status Name(const char* message) { return Status(Code, message); }
LUTRA_ERROR_FN(InvalidArgument, StatusCode::kInvalidArgument)
LUTRA_ERROR_FN(OutOfRange, StatusCode::kOutOfRange)
LUTRA_ERROR_FN(DataLoss, StatusCode::kDataLoss)
LUTRA_ERROR_FN(NotFound, StatusCode::kNotFound)
LUTRA_ERROR_FN(Unimplemented, StatusCode::kUnimplemented)
LUTRA_ERROR_FN(ResourceExhausted, StatusCode::kResourceExhausted)
#undef LUTRA_ERROR_FN

// A value or the Status that explains why there is none. T must be movable.
template <class T>
class StatusOr {
 public:
  StatusOr(Status status) : status_(std::move(status)) {}  // NOLINT: implicit
  StatusOr(T value) : has_value_(true), value_(std::move(value)) {}  // NOLINT
  bool ok() const { return has_value_; }
  const Status& status() const { return status_; }
  // Precondition: ok().
  T& value() & { return value_; }
  const T& value() const& { return value_; }
  T&& value() && { return std::move(value_); }
  T* operator->() { return &value_; }
  const T* operator->() const { return &value_; }
  T& operator*() { return value_; }
  const T& operator*() const { return value_; }

 private:
  Status status_;  // OK when has_value_
  bool has_value_ = false;
  T value_{};
};

}  // namespace lutra

#define LUTRA_RETURN_IF_ERROR(expr)               \
  do {                                            \
    ::lutra::Status lutra_status_ = (expr);       \
    if (!lutra_status_.ok()) return lutra_status_; \
  } while (0)

#endif  // LUTRA_STATUS_H_
