// Reactor limits, unit last. The reactor knows bytes and descriptors only.
#pragma once

#include <cstddef>
#include <cstdint>

namespace reactor::limits {

// One read(2) or one provided buffer. 64 KiB drains a loopback socket in few
// calls without thrashing L2.
inline constexpr size_t read_chunk_bytes = 64 * 1024;
// A connection's input buffer holds what a handler left unconsumed (a partial
// frame, or frames held back while the connection's output is full) plus one
// more chunk, so a leftover never has to be dropped on the next read.
inline constexpr size_t input_buffer_bytes = 2 * read_chunk_bytes;
// A connection's pending output. Handlers check send_space() before producing
// a reply; past the high-water mark the connection stops being read.
inline constexpr size_t output_buffer_bytes = 128 * 1024;
inline constexpr size_t output_high_water_bytes = output_buffer_bytes / 2;
inline constexpr size_t connections_default = 4096;
inline constexpr size_t events_per_wait_max = 256;
inline constexpr size_t timers_max = 1024;

static_assert(input_buffer_bytes >= 2 * read_chunk_bytes);
static_assert(output_high_water_bytes < output_buffer_bytes);

}  // namespace reactor::limits
