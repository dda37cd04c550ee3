// The lottery wire protocol, version 1. docs/PROTOCOL.md is the contract; this
// file implements it for both the server and the clients.
//
// Decoding works in place over a byte span: a decoded bet is a set of
// string_views into the frame, so the server validates a batch without a
// single allocation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

#include "lottery/limits.hpp"

namespace lottery::proto {

using Bytes = std::span<const std::byte>;

// Request types keep the ids of the original exercise (1, 2, 3).
enum class MsgType : uint8_t {
  batch = 1,     // a batch of bets
  finished = 2,  // this agency has sent all its bets
  winners = 3,   // winners of this agency
  hello = 4,     // identifies the agency (and producer) of a connection
};
// A reply's type is the request's type with the high bit set; its seq echoes
// the request's seq. So every reply names what it answers.
inline constexpr uint8_t reply_bit = 0x80;
// Connection-level error sent by the server outside any request (e.g. the
// connection is refused); it is always followed by a close.
inline constexpr uint8_t connection_error_type = 0xFF;

enum class Status : uint16_t {
  ok = 0,
  // framing (the connection is closed after the reply)
  bad_frame = 1,        // bad version, flags or length field
  frame_too_large = 2,  // length prefix over frame_bytes_max
  bad_checksum = 3,     // body CRC32C mismatch
  unknown_type = 4,
  malformed_body = 5,  // truncated body or a field that overflows it
  // bets (the batch is rejected, the connection stays)
  invalid_agency = 10,
  invalid_name = 11,
  invalid_document = 12,
  invalid_birthdate = 13,
  invalid_number = 14,
  too_many_bets = 15,
  // session state
  not_identified = 20,   // a request before hello
  agency_mismatch = 21,  // request for an agency other than the connection's
  agency_finished = 22,  // bets after this agency said finished
  draw_done = 23,        // bets or finished after the draw
  not_ready = 24,        // winners asked before the draw (non-waiting query)
  betting_closed = 25,
  sequence_gap = 26,   // a batch seq that is not the producer's next (stored seqs stay a prefix)
  producer_busy = 27,  // another connection holds this producer's stream; retry shortly
  // TLS (docs/SECURITY.md): the agency is the handshake's, and nothing else
  not_your_agency = 28,  // a request for another agency than the TLS key's; sent, then closed
  tls_required = 29,     // a plaintext connection to a server with key material; sent in clear, then closed
  // server
  storage_error = 30,
  storage_full = 31,
  shutting_down = 32,
  too_many_connections = 33,  // over the per-worker or total connection cap
  // deadlines (docs/SECURITY.md); sent as a connection error, then closed
  handshake_timeout = 34,  // no successful hello within the handshake deadline
  idle_timeout = 35,       // no complete request within the idle timeout
};

const char* status_name(Status s);

struct FrameHeader {
  uint32_t length = 0;  // whole frame, header included
  uint8_t version = limits::protocol_version;
  uint8_t type = 0;
  uint16_t flags = 0;
  uint32_t seq = 0;
  uint32_t body_crc = 0;  // CRC32C of the body
};

enum class HeaderCheck : uint8_t { need_more, ok, bad_version, bad_length, too_large, bad_flags };

// Checks a frame header from its first bytes. Only the length prefix and the
// fixed fields are checked; the caller checks the body CRC once it has it all.
HeaderCheck parse_header(const std::byte* data, size_t available, size_t frame_max, FrameHeader& out);
void write_header(std::byte* dst, const FrameHeader& h);
bool body_crc_matches(const FrameHeader& h, Bytes body);

struct Date {
  uint16_t year = 0;
  uint8_t month = 0;
  uint8_t day = 0;
  friend bool operator==(const Date&, const Date&) = default;
  uint32_t ordinal() const { return uint32_t{year} * 10000u + uint32_t{month} * 100u + day; }
};
Date today_local();
bool is_calendar_date(Date d);
// Parses "YYYY-MM-DD" strictly (no calendar check).
bool parse_date(std::string_view text, Date& out);

// One bet, as the encoder takes it and as the decoder hands it back (views
// into the frame).
struct Bet {
  std::string_view first_name;
  std::string_view last_name;
  std::string_view document;
  Date birthdate;
  uint16_t number = 0;
};

// --- validation ---
struct Rejection {
  Status status = Status::ok;
  uint16_t index = 0xFFFF;  // index of the bad bet in its batch, or 0xFFFF
  const char* reason = "";  // static text, never allocated
};
inline constexpr uint16_t no_bet_index = 0xFFFF;

struct ValidationContext {
  uint16_t agencies = 5;  // known agencies are 1..agencies
  Date today;
  size_t batch_bets_max = limits::batch_bets_max;  // the server may set it lower
};

// Returns nullptr when the name is valid, else why not: 1..name_bytes_max
// bytes of UTF-8 (no overlong forms, surrogates or code points past
// U+10FFFF) without control characters (C0, DEL, C1) or commas.
const char* check_name(std::string_view name);
// The same rules walked byte by byte: the reference check_name's
// vectorised fast path is tested against, and where it goes when that path
// cannot vouch for a name (to give the exact reason).
const char* check_name_bytes(std::string_view name);
const char* check_document(std::string_view doc);
const char* check_birthdate(Date d, Date today);
std::optional<Rejection> check_bet(const Bet& bet, const ValidationContext& ctx);

struct BatchInfo {
  uint16_t agency = 0;
  uint16_t count = 0;
};
// Decodes and validates a whole batch body. All or nothing: the first bad bet
// rejects the batch.
std::optional<Rejection> validate_batch(Bytes body, const ValidationContext& ctx, BatchInfo& out);
// The same checks over the parts of a body: its header fields and its bets
// (the server validates bets after copying them into the store's mapping).
std::optional<Rejection> validate_batch_parts(uint16_t agency, uint16_t count, Bytes bets,
                                              const ValidationContext& ctx);
// Reads a batch body's header fields (agency, count) without validating bets.
bool read_batch_header(Bytes body, BatchInfo& out);

// Walks the bets of a batch body that has already been validated (or read
// back from the store, whose checksum vouches for it).
class BetCursor {
 public:
  explicit BetCursor(Bytes bets) : _p(bets.data()), _end(bets.data() + bets.size()) {}
  // Returns false at the end or on a malformed bet.
  bool next(Bet& out);
  bool at_end() const { return _p == _end; }
  size_t remaining() const { return static_cast<size_t>(_end - _p); }

 private:
  const std::byte* _p;
  const std::byte* _end;
};

// Fast path for the draw: the number of the bet at `p` and the bet's size,
// without building string views.
inline uint16_t bet_number_at(const std::byte* p) {
  return static_cast<uint16_t>(std::to_integer<unsigned>(p[0]) | (std::to_integer<unsigned>(p[1]) << 8));
}
inline size_t bet_size_at(const std::byte* p) {
  return limits::bet_fixed_bytes + std::to_integer<size_t>(p[6]) + std::to_integer<size_t>(p[7]) +
         std::to_integer<size_t>(p[8]);
}

// --- encoding requests ---
size_t encoded_bet_bytes(const Bet& bet);
// Writes one bet; returns bytes written, 0 when it does not fit.
size_t encode_bet(std::byte* dst, size_t capacity, const Bet& bet);

// Builds a batch frame in a caller buffer of `capacity` bytes (the frame-size
// budget, e.g. 8 KiB).
class BatchBuilder {
 public:
  BatchBuilder(std::byte* buffer, size_t capacity, uint16_t agency, size_t bets_max);
  // Appends a bet; false when the frame budget or the bet count is reached.
  bool add(const Bet& bet);
  uint16_t count() const { return _count; }
  bool empty() const { return _count == 0; }
  // Completes the header (length, seq, CRC) and returns the frame size.
  size_t finish(uint32_t seq);
  void reset();

 private:
  std::byte* _buf;
  size_t _capacity;
  size_t _used;
  uint16_t _agency;
  uint16_t _count = 0;
  size_t _bets_max;
};

size_t encode_hello(std::byte* dst, size_t capacity, uint32_t seq, uint16_t agency, uint64_t producer_id);
size_t encode_finished(std::byte* dst, size_t capacity, uint32_t seq, uint16_t agency);
size_t encode_winners_query(std::byte* dst, size_t capacity, uint32_t seq, uint16_t agency, uint32_t start);
// Fills in header fields for a frame whose body is already at dst+16.
size_t finish_frame(std::byte* frame, size_t body_bytes, uint8_t type, uint32_t seq);

// --- replies ---
struct HelloAck {
  uint16_t agency = 0;
  bool finished = false;
  bool draw_done = false;
  uint16_t worker = 0;          // the server worker serving this connection (diagnostics)
  // The producer's stream as stored: batches 1..stored_seq (always a prefix)
  // holding producer_bets bets. A resuming client skips that many bets and
  // continues with seq stored_seq + 1.
  uint64_t stored_seq = 0;
  uint64_t producer_bets = 0;
  uint64_t bets_stored = 0;     // bets stored for the whole agency, every producer
};

size_t encode_error_reply(std::byte* dst, size_t capacity, uint8_t request_type, uint32_t seq, Status status,
                          uint16_t bet_index, std::string_view reason);
size_t encode_hello_ack(std::byte* dst, size_t capacity, uint32_t seq, const HelloAck& ack);
size_t encode_batch_ack(std::byte* dst, size_t capacity, uint32_t seq, uint16_t count);
size_t encode_finished_ack(std::byte* dst, size_t capacity, uint32_t seq, uint64_t bets_stored);

// Winners reply: status, total, start, count, then `count` documents (u8 len + digits).
class WinnersReplyBuilder {
 public:
  WinnersReplyBuilder(std::byte* buffer, size_t capacity, uint32_t total, uint32_t start);
  bool add(std::string_view document);
  size_t finish(uint32_t seq);

 private:
  std::byte* _buf;
  size_t _capacity;
  size_t _used;
  uint32_t _count = 0;
};

// A decoded reply frame (views into the frame).
struct Reply {
  FrameHeader header;
  uint8_t answers = 0;  // request type this reply answers
  Status status = Status::ok;
  uint16_t bet_index = no_bet_index;
  std::string_view reason;
  Bytes payload;  // what follows the status for ok replies
};
bool decode_reply(Bytes frame, Reply& out);
bool decode_hello_ack(const Reply& r, HelloAck& out);
bool decode_batch_ack(const Reply& r, uint16_t& count);
bool decode_finished_ack(const Reply& r, uint64_t& bets_stored);
struct WinnersPage {
  uint32_t total = 0;
  uint32_t start = 0;
  uint32_t count = 0;
  Bytes documents;  // `count` x (u8 len, digits)
};
bool decode_winners_page(const Reply& r, WinnersPage& out);
// Iterates documents of a winners page.
bool next_document(Bytes& cursor, std::string_view& doc);

// Request bodies, decoded by the server.
struct HelloRequest {
  uint16_t agency = 0;
  uint64_t producer_id = 0;
};
bool decode_hello(Bytes body, HelloRequest& out);
bool decode_agency_body(Bytes body, uint16_t& agency);  // finished
bool decode_winners_query(Bytes body, uint16_t& agency, uint32_t& start);

}  // namespace lottery::proto
