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

static_assert(frame_bytes_max <= UINT32_MAX);
static_assert(client_batch_bytes_default <= frame_bytes_max);
static_assert(frame_header_bytes + batch_body_header_bytes + bet_bytes_max <= client_batch_bytes_default,
              "one bet of maximal size must fit in a default batch");
static_assert(frame_header_bytes + winners_reply_header_bytes + winners_page_max * (1 + document_digits_max) <=
                  frame_bytes_max,
              "a full winners page must fit in one frame");
static_assert(name_bytes_max <= 255 && document_digits_max <= 255, "lengths are encoded as u8");
static_assert(batch_bets_max <= UINT16_MAX, "bet count is encoded as u16");

}  // namespace lottery::limits
