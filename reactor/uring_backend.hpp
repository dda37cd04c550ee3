// Test-facing knobs of the io_uring backend. make_uring_backend(n) is what the
// loop uses; this overload lets tests shrink the provided-buffer ring (so it
// runs dry), force single-shot receives (as on a kernel before 6.0) and read
// counters of the rare paths they mean to exercise.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "common/result.hpp"
#include "reactor/backend.hpp"
#include "reactor/limits.hpp"

namespace reactor {

struct UringCounters {
  uint64_t recv_enobufs = 0;        // a recv ended because the buffer ring was empty
  uint64_t held_while_paused = 0;   // buffers that arrived after set_receiving(false)
  uint64_t short_send_resumed = 0;  // sends continued after a short completion
  uint64_t stale_completions = 0;   // completions for an older generation (should stay 0)
  uint64_t multishot_recv_fallbacks = 0;
};

struct UringTuning {
  size_t buffer_count = limits::uring_buffer_count;  // a power of two, at most the default
  size_t buffer_bytes = limits::uring_buffer_bytes;  // at most the default
  bool multishot_recv = true;
  UringCounters* counters = nullptr;  // optional; the backend only increments it
};

common::Result<std::unique_ptr<Backend>> make_uring_backend(size_t max_connections, const UringTuning& tuning);

}  // namespace reactor
