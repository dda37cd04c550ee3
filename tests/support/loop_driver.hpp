// Driving a Reactor from a single-threaded test, one short pass at a time,
// and serving one end of a socketpair on it.
#pragma once

#include <sys/socket.h>

#include <cstddef>
#include <cstdint>
#include <span>

#include "reactor/reactor.hpp"

namespace testsupport {

// One pass of the loop, waiting up to `ms` for something to happen.
inline void step(reactor::Reactor& loop, uint64_t ms = 1) {
  loop.add_timer(ms, [&loop] { loop.stop(); });
  loop.run();
}

// Steps until `done()` holds; false after `timeout_ms` without it.
template <typename Done>
bool run_until(reactor::Reactor& loop, Done done, uint64_t timeout_ms = 5000, uint64_t step_ms = 1) {
  uint64_t deadline = reactor::Reactor::now_ms() + timeout_ms;
  while (!done()) {
    if (reactor::Reactor::now_ms() > deadline) return false;
    step(loop, step_ms);
  }
  return true;
}

// A connected socketpair (non-blocking); the loop serves one end, the other
// is returned (-1 on failure). With `buffer_bytes`, the kernel buffers of
// both ends are about that small.
inline int adopt_socketpair(reactor::Reactor& loop, int buffer_bytes = 0) {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) < 0) return -1;
  if (buffer_bytes > 0) {
    for (int fd : fds) {
      ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buffer_bytes, sizeof buffer_bytes);
      ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buffer_bytes, sizeof buffer_bytes);
    }
  }
  loop.adopt(fds[0]);
  return fds[1];
}

// Writes all of `bytes` to a socket with room for them (a test's small
// requests). False, errno set, when a send fails or would block.
inline bool send_all(int fd, std::span<const std::byte> bytes) {
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::send(fd, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

}  // namespace testsupport
