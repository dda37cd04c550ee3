// Reactor limits, unit last. The reactor knows bytes and descriptors only.
#pragma once

#include <bit>
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
// Timers armed at once, per reactor. The server arms a handful (the session
// sweep, the group-commit window, the draw re-check, shutdown steps); the
// rest is headroom. Sized at start-up with the heap that orders them.
inline constexpr size_t timers_max = 1024;
// A timer callback is stored in place: room for `this` plus three more
// pointers or small values.
inline constexpr size_t timer_callback_bytes = 32;
// Before-sleep hooks: a handler's and a process's few, added at set-up.
inline constexpr size_t before_sleep_hooks_max = 8;

// io_uring backend. Receive buffers live in one provided-buffer ring shared by
// every connection; the kernel picks one per completion. 16 KiB holds a
// typical request batch whole, and 512 of them (8 MiB, allocated at start-up)
// let 512 connections each have a completion in flight in one batch before the
// ring runs dry, which is back-pressure (recv re-armed later), not an error.
inline constexpr size_t uring_buffer_bytes = 16 * 1024;
inline constexpr size_t uring_buffer_count = 512;
// Submission queue: one entry per operation queued in a poll; a fuller poll
// submits early and goes on. Completion queue: multishot operations post many
// completions per submission, so it is sized well beyond the SQ.
inline constexpr unsigned uring_sq_entries = 512;
inline constexpr unsigned uring_cq_entries = 8192;
inline constexpr size_t uring_listeners_max = 16;
inline constexpr size_t uring_watches_max = 32;

static_assert(input_buffer_bytes >= 2 * read_chunk_bytes);
// One provided buffer is one read, so the input buffer's "leftover plus one
// more chunk" still holds.
static_assert(uring_buffer_bytes <= read_chunk_bytes);
// The kernel names a buffer with 16 bits and indexes the ring with a mask.
static_assert(std::has_single_bit(uring_buffer_count) && uring_buffer_count <= 32768);
static_assert(uring_cq_entries >= 4 * uring_sq_entries);
static_assert(output_high_water_bytes < output_buffer_bytes);
// Timer ids carry the slot in 32 bits.
static_assert(timers_max <= UINT32_MAX);

}  // namespace reactor::limits
