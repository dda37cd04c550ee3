// Assertions that stay on in release builds.
//
// A broken invariant is a programmer error: continuing would risk storing or
// answering something wrong, so we abort with the one condition that failed.
// Expected failures (bad input, EAGAIN, ENOSPC, ...) are never asserted; they
// travel as values (see common/result.hpp).
#pragma once

namespace common {
[[noreturn]] void assert_fail(const char* expr, const char* file, int line, const char* func);
}

#define LOTTERY_ASSERT(cond)                                                      \
  do {                                                                            \
    if (__builtin_expect(!(cond), 0)) [[unlikely]]                                \
      ::common::assert_fail(#cond, __FILE__, __LINE__, __func__);                 \
  } while (0)
