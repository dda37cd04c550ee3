// Errors are values. `Result<T>` is a small stand-in for C++23's std::expected:
// either a T or an `Error` {code, message}. errno is turned into an Error in one
// place (Error::from_errno) so every system-call failure names the call.
#pragma once

#include <cerrno>
#include <string>
#include <utility>
#include <variant>

#include "common/assert.hpp"

namespace common {

struct Error {
  int code = 0;         // errno value for system errors, or a module's own code
  std::string message;  // what failed and, where we can tell, what to do

  static Error from_errno(const char* what, int err = errno);
  static Error make(int code, std::string message) { return Error{code, std::move(message)}; }
};

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : _v(std::move(value)) {}           // NOLINT: implicit on purpose
  Result(Error error) : _v(std::move(error)) {}       // NOLINT: implicit on purpose

  bool ok() const { return _v.index() == 0; }
  explicit operator bool() const { return ok(); }

  T& value() {
    LOTTERY_ASSERT(ok());
    return std::get<0>(_v);
  }
  const T& value() const {
    LOTTERY_ASSERT(ok());
    return std::get<0>(_v);
  }
  T& operator*() { return value(); }
  T* operator->() { return &value(); }
  const Error& error() const {
    LOTTERY_ASSERT(!ok());
    return std::get<1>(_v);
  }

 private:
  std::variant<T, Error> _v;
};

// Result<void>: success or an Error.
struct Ok {};
using Status = Result<Ok>;
inline Status ok_status() { return Ok{}; }

}  // namespace common
