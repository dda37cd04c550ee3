// Installing signal dispositions in one line each. The handlers themselves
// stay with their programs (they only set a flag and, where there is a loop,
// wake it); what is shared is the sigaction boilerplate around them.
#pragma once

#include <signal.h>

namespace common::signals {

// `handler` runs for `sig`, with no other signal blocked while it does.
// `flags`: SA_* flags (e.g. SA_RESTART | SA_NOCLDSTOP for SIGCHLD).
inline void handle(int sig, void (*handler)(int), int flags = 0) {
  struct sigaction sa {};
  sa.sa_handler = handler;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = flags;
  ::sigaction(sig, &sa, nullptr);
}

// A write to a closed socket returns EPIPE instead of killing the process.
inline void ignore(int sig) { handle(sig, SIG_IGN); }

// Back to the default disposition (e.g. SIGCHLD in a forked worker).
inline void reset(int sig) { handle(sig, SIG_DFL); }

}  // namespace common::signals
