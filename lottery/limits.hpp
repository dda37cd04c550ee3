// Every limit of the protocol and the store, in one place, unit last.
// Relations between them are checked at compile time below.
#pragma once

#include <cstddef>
#include <cstdint>

namespace lottery::limits {

// --- wire ---
inline constexpr uint8_t protocol_version = 1;
inline constexpr size_t frame_header_bytes = 16;
// Hard cap on any frame, request or reply, checked from the length prefix
// before a single byte of the body is buffered.
inline constexpr size_t frame_bytes_max = 64 * 1024;
// What an agency client puts in one batch frame by default (the heritage limit).
inline constexpr size_t client_batch_bytes_default = 8 * 1024;
inline constexpr size_t batch_bets_max = 4096;
inline constexpr size_t reply_reason_bytes_max = 200;

// --- bets ---
inline constexpr size_t name_bytes_max = 100;     // per first or last name, UTF-8 bytes
inline constexpr size_t document_digits_max = 10;  // national ids are 7-9 digits
inline constexpr uint16_t bet_number_max = 9999;
inline constexpr uint16_t birth_year_min = 1900;
inline constexpr uint16_t agencies_max = 4096;
// Fixed prefix of an encoded bet: number, year, month, day, three lengths.
inline constexpr size_t bet_fixed_bytes = 9;
inline constexpr size_t bet_bytes_max = bet_fixed_bytes + document_digits_max + 2 * name_bytes_max;
inline constexpr size_t batch_body_header_bytes = 4;  // agency u16, count u16

// --- winners replies (paginated so a reply never exceeds frame_bytes_max) ---
inline constexpr size_t winners_page_max = 4096;
inline constexpr size_t winners_reply_header_bytes = 2 + 4 + 4 + 4;  // status, total, start, count

// --- hostile input (docs/SECURITY.md). Defaults of the server's flags; a flag
// may lower each one (within the *_min bounds), never raise it past the hard
// cap the buffers are sized for. ---
// The smallest request frame limit an operator may set: one batch of one bet
// of maximal size still fits.
inline constexpr size_t frame_bytes_min = frame_header_bytes + batch_body_header_bytes + bet_bytes_max;
// Connections one worker serves at once, and all workers together (summed
// through the control file's per-worker counters).
inline constexpr size_t connections_per_worker_default = 4096;
inline constexpr size_t connections_total_default = 16384;
// Reactor slots beyond the per-worker cap. A connection over a cap takes one
// of these just long enough to be sent its too_many_connections frame; past
// them the reactor writes the same frame straight to the socket and closes it.
inline constexpr size_t refusal_slots = 64;
// What a connection may send before a successful hello: a hello frame is 28
// bytes, so this allows dozens of retries (producer_busy, a wrong agency) and
// refuses a stranger's bulk at its first length prefix.
inline constexpr size_t hello_frame_bytes = frame_header_bytes + 12;
inline constexpr size_t unidentified_bytes_default = 1024;
// Unsent replies a connection may have queued. At this mark the server stops
// reading and handling its requests (paused); if they stay past it for
// reply_stall_timeout_ms the connection is dropped.
inline constexpr size_t pending_reply_bytes_default = 64 * 1024;
inline constexpr size_t pending_reply_bytes_min = 1024;
// Deadlines (slowloris): from accept to a successful hello; from the last
// complete request to the next (a connection whose winners query is held
// until the draw is not idle); and for replies that do not drain. A closing
// connection gets reply_stall_timeout_ms to take its last replies, too.
inline constexpr uint32_t handshake_timeout_ms_default = 10'000;
inline constexpr uint32_t idle_timeout_ms_default = 120'000;
inline constexpr uint32_t reply_stall_timeout_ms_default = 10'000;
inline constexpr uint32_t timeout_ms_min = 50;
// One timer per worker walks the sessions this often to apply the deadlines
// (no timer per connection); a deadline fires up to this much late.
inline constexpr uint32_t session_sweep_interval_ms = 250;
// Refused and timed-out connections are logged once per interval, with a
// count, so a flood cannot turn into a flood of log lines.
inline constexpr uint32_t connection_log_interval_ms = 10'000;

// --- durability (docs/STORAGE.md) ---
// --durability always: acknowledgements held for the loop iteration's one
// sync. An iteration that commits more batches than this syncs early and
// goes on (at 4 KiB and up per batch, that is 4 MiB and more per sync).
inline constexpr size_t always_acks_per_sync_max = 1024;
// --group-batches: the most batches in one group commit.
inline constexpr uint32_t group_batches_max = 4096;
// Group commit: after a sync's acknowledgements go out, the next group waits
// up to half that sync's duration, and at most this long, for the clients'
// next batches (about one round trip), so one sync covers their whole window.
inline constexpr uint64_t group_gather_us_max = 500;

static_assert(frame_bytes_max <= UINT32_MAX);
static_assert(frame_bytes_min <= client_batch_bytes_default && frame_bytes_min <= frame_bytes_max);
static_assert(hello_frame_bytes <= unidentified_bytes_default, "a hello must fit in the pre-hello budget");
static_assert(pending_reply_bytes_min <= pending_reply_bytes_default);
static_assert(session_sweep_interval_ms <= timeout_ms_min * 10);
static_assert(client_batch_bytes_default <= frame_bytes_max);
static_assert(frame_header_bytes + batch_body_header_bytes + bet_bytes_max <= client_batch_bytes_default,
              "one bet of maximal size must fit in a default batch");
static_assert(frame_header_bytes + winners_reply_header_bytes + winners_page_max * (1 + document_digits_max) <=
                  frame_bytes_max,
              "a full winners page must fit in one frame");
static_assert(name_bytes_max <= 255 && document_digits_max <= 255, "lengths are encoded as u8");
static_assert(batch_bets_max <= UINT16_MAX, "bet count is encoded as u16");

}  // namespace lottery::limits
