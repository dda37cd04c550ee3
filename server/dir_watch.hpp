// "Has a file of this name appeared in that directory?", from inotify, for
// the master (lotteryctl's close request) and the workers (the draw's
// results file renamed into place). No polling: the fd goes into the
// reactor's watch list and is drained when readable.
#pragma once

#include <sys/inotify.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "common/result.hpp"

namespace server {

// A non-blocking inotify fd watching `dir` for files closed after writing,
// renamed in, and (with `attributes`) whose attributes changed.
inline common::Result<int> watch_directory(const std::string& dir, bool attributes = false) {
  int fd = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  if (fd < 0) return common::Error::from_errno("inotify_init1");
  uint32_t mask = IN_MOVED_TO | IN_CLOSE_WRITE | (attributes ? IN_ATTRIB : 0u);
  if (::inotify_add_watch(fd, dir.c_str(), mask) < 0) {
    int err = errno;
    ::close(fd);
    return common::Error::make(err, std::string("inotify_add_watch on ") + dir + ": " + std::strerror(err));
  }
  return fd;
}

// Reads every pending event of `fd`; true when one of them named `name`.
inline bool drain_for(int fd, const char* name) {
  alignas(inotify_event) char buf[4096];
  bool seen = false;
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof buf)) > 0) {
    for (char* p = buf; p < buf + n;) {
      auto* ev = reinterpret_cast<inotify_event*>(p);
      if (ev->len > 0 && std::strcmp(ev->name, name) == 0) seen = true;
      p += sizeof(inotify_event) + ev->len;
    }
  }
  return seen;
}

}  // namespace server
