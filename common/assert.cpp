#include "common/assert.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <unistd.h>

#include "common/result.hpp"

namespace common {

[[noreturn]] void assert_fail(const char* expr, const char* file, int line, const char* func) {
  // One write(2), no allocation: we may be here because memory is corrupt.
  char buf[512];
  int n = std::snprintf(buf, sizeof buf, "assertion failed: %s (%s:%d in %s)\n", expr, file, line, func);
  if (n > 0) {
    ssize_t ignored = ::write(STDERR_FILENO, buf, static_cast<size_t>(n) < sizeof buf ? static_cast<size_t>(n) : sizeof buf - 1);
    (void)ignored;
  }
  std::abort();
}

Error Error::from_errno(const char* what, int err) {
  return Error{err, std::string(what) + ": " + std::strerror(err)};
}

}  // namespace common
