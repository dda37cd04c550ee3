#include "lottery/protocol.hpp"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <ctime>

#include "common/assert.hpp"
#include "common/crc32c.hpp"
#include "lottery/wire.hpp"

namespace lottery::proto {

using wire::load_le;
using wire::store_le;

const char* status_name(Status s) {
  switch (s) {
    case Status::ok: return "ok";
    case Status::bad_frame: return "bad_frame";
    case Status::frame_too_large: return "frame_too_large";
    case Status::bad_checksum: return "bad_checksum";
    case Status::unknown_type: return "unknown_type";
    case Status::malformed_body: return "malformed_body";
    case Status::invalid_agency: return "invalid_agency";
    case Status::invalid_name: return "invalid_name";
    case Status::invalid_document: return "invalid_document";
    case Status::invalid_birthdate: return "invalid_birthdate";
    case Status::invalid_number: return "invalid_number";
    case Status::too_many_bets: return "too_many_bets";
    case Status::not_identified: return "not_identified";
    case Status::agency_mismatch: return "agency_mismatch";
    case Status::agency_finished: return "agency_finished";
    case Status::draw_done: return "draw_done";
    case Status::not_ready: return "not_ready";
    case Status::betting_closed: return "betting_closed";
    case Status::sequence_gap: return "sequence_gap";
    case Status::producer_busy: return "producer_busy";
    case Status::not_your_agency: return "not_your_agency";
    case Status::tls_required: return "tls_required";
    case Status::storage_error: return "storage_error";
    case Status::storage_full: return "storage_full";
    case Status::shutting_down: return "shutting_down";
    case Status::too_many_connections: return "too_many_connections";
    case Status::handshake_timeout: return "handshake_timeout";
    case Status::idle_timeout: return "idle_timeout";
  }
  return "unknown_status";
}

// ---------------------------------------------------------------- framing

HeaderCheck parse_header(const std::byte* data, size_t available, size_t frame_max, FrameHeader& out) {
  if (available < 4) return HeaderCheck::need_more;
  // The length is checked first, from the prefix alone, so an oversized frame
  // is refused before any buffer grows for it.
  out.length = load_le<uint32_t>(data);
  if (out.length > frame_max) return HeaderCheck::too_large;
  if (out.length < limits::frame_header_bytes) return HeaderCheck::bad_length;
  if (available < limits::frame_header_bytes) return HeaderCheck::need_more;
  out.version = load_le<uint8_t>(data + 4);
  out.type = load_le<uint8_t>(data + 5);
  out.flags = load_le<uint16_t>(data + 6);
  out.seq = load_le<uint32_t>(data + 8);
  out.body_crc = load_le<uint32_t>(data + 12);
  if (out.version != limits::protocol_version) return HeaderCheck::bad_version;
  if (out.flags != 0) return HeaderCheck::bad_flags;
  return HeaderCheck::ok;
}

void write_header(std::byte* dst, const FrameHeader& h) {
  store_le<uint32_t>(dst, h.length);
  store_le<uint8_t>(dst + 4, h.version);
  store_le<uint8_t>(dst + 5, h.type);
  store_le<uint16_t>(dst + 6, h.flags);
  store_le<uint32_t>(dst + 8, h.seq);
  store_le<uint32_t>(dst + 12, h.body_crc);
}

bool body_crc_matches(const FrameHeader& h, Bytes body) { return common::crc32c(body) == h.body_crc; }

size_t finish_frame(std::byte* frame, size_t body_bytes, uint8_t type, uint32_t seq) {
  size_t total = limits::frame_header_bytes + body_bytes;
  LOTTERY_ASSERT(total <= limits::frame_bytes_max);
  FrameHeader h;
  h.length = static_cast<uint32_t>(total);
  h.type = type;
  h.seq = seq;
  h.body_crc = common::crc32c(frame + limits::frame_header_bytes, body_bytes);
  write_header(frame, h);
  return total;
}

// ---------------------------------------------------------------- dates

Date today_local() {
  time_t now = ::time(nullptr);
  struct tm tm_now {};
  ::localtime_r(&now, &tm_now);
  return Date{static_cast<uint16_t>(tm_now.tm_year + 1900), static_cast<uint8_t>(tm_now.tm_mon + 1),
              static_cast<uint8_t>(tm_now.tm_mday)};
}

bool is_calendar_date(Date d) {
  if (d.month < 1 || d.month > 12 || d.day < 1) return false;
  static constexpr uint8_t days_in_month[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  unsigned dim = days_in_month[d.month - 1];
  bool leap = (d.year % 4 == 0 && d.year % 100 != 0) || d.year % 400 == 0;
  if (d.month == 2 && leap) dim = 29;
  return d.day <= dim;
}

bool parse_date(std::string_view t, Date& out) {
  if (t.size() != 10 || t[4] != '-' || t[7] != '-') return false;
  auto digits = [&](size_t from, size_t n, unsigned& v) {
    v = 0;
    for (size_t i = from; i < from + n; i++) {
      if (t[i] < '0' || t[i] > '9') return false;
      v = v * 10 + static_cast<unsigned>(t[i] - '0');
    }
    return true;
  };
  unsigned y, m, d;
  if (!digits(0, 4, y) || !digits(5, 2, m) || !digits(8, 2, d)) return false;
  out = Date{static_cast<uint16_t>(y), static_cast<uint8_t>(m), static_cast<uint8_t>(d)};
  return true;
}

// ---------------------------------------------------------------- validation

namespace {

#if defined(__SSE2__)
// True when the name is surely valid: printable ASCII other than ',', and
// two-byte UTF-8 sequences of U+00A0..U+07FF (the accented letters of
// Spanish names), checked 16 bytes at a time with masks instead of a branch
// per byte. Anything else (three- and four-byte sequences, and every invalid
// byte) returns false, and the byte rules decide, with their reason.
//
// A chunk is loaded whole when its 16 bytes cannot cross into another page,
// even if they run past the name (those bytes are masked off and a read
// within a mapped page cannot fault); ASan would see that read as an
// overflow, so it is not instrumented.
__attribute__((no_sanitize_address)) bool name_surely_valid(const unsigned char* s, size_t n) {
  constexpr size_t chunk_bytes = 16;
  constexpr uintptr_t page_bytes = 4096;
  const __m128i space = _mm_set1_epi8(0x20);
  const __m128i del = _mm_set1_epi8(0x7F);
  const __m128i comma = _mm_set1_epi8(',');
  const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80));
  uint32_t lead_carry = 0;  // the previous chunk ended with a lead byte
  uint32_t c2_carry = 0;    // ... with 0xC2
  for (size_t i = 0; i < n; i += chunk_bytes) {
    size_t rest = n - i;
    __m128i v;
    if (rest >= chunk_bytes || (reinterpret_cast<uintptr_t>(s + i) % page_bytes) <= page_bytes - chunk_bytes) {
      v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    } else {
      alignas(16) unsigned char tail[chunk_bytes] = {};
      std::memcpy(tail, s + i, rest);
      v = _mm_load_si128(reinterpret_cast<const __m128i*>(tail));
    }
    uint32_t in = rest >= chunk_bytes ? 0xFFFFu : (1u << rest) - 1;
    auto mask = [](__m128i m) { return static_cast<uint32_t>(_mm_movemask_epi8(m)); };
    uint32_t high = mask(v) & in;  // bytes >= 0x80
    // Signed compare: bytes >= 0x80 are negative, hence "< 0x20" too; they
    // are judged below.
    uint32_t control = mask(_mm_cmplt_epi8(v, space)) & ~high;
    uint32_t bad_ascii = control | mask(_mm_cmpeq_epi8(v, del)) | mask(_mm_cmpeq_epi8(v, comma));
    if (bad_ascii & in) return false;
    if (high == 0 && lead_carry == 0) continue;
    // u = byte ^ 0x80: continuations 0x80..0xBF become 0x00..0x3F, leads
    // 0xC2..0xDF become 0x42..0x5F, ASCII becomes negative.
    __m128i u = _mm_xor_si128(v, flip);
    uint32_t cont = mask(_mm_cmplt_epi8(u, _mm_set1_epi8(0x40))) & high;
    uint32_t lead = mask(_mm_and_si128(_mm_cmpgt_epi8(u, _mm_set1_epi8(0x41)), _mm_cmplt_epi8(u, _mm_set1_epi8(0x60)))) & in;
    if (high & ~cont & ~lead) return false;  // C0, C1, three- and four-byte leads, invalid bytes
    // Every lead is followed by exactly one continuation, and every
    // continuation follows a lead.
    uint32_t expected = ((lead << 1) & 0xFFFFu) | lead_carry;
    if (cont != (expected & in) || (expected & ~in)) return false;
    lead_carry = lead >> 15;
    // 0xC2 0x80..0x9F encode the C1 controls U+0080..U+009F.
    uint32_t c1 = mask(_mm_cmplt_epi8(u, space)) & high;
    uint32_t after_c2 = ((mask(_mm_cmpeq_epi8(v, _mm_set1_epi8(static_cast<char>(0xC2)))) & in) << 1 | c2_carry);
    if (after_c2 & c1 & 0xFFFFu) return false;
    c2_carry = (after_c2 >> 16) & 1;
  }
  return lead_carry == 0;
}
#endif

}  // namespace

const char* check_name(std::string_view name) {
  if (name.empty()) return "name is empty";
  if (name.size() > limits::name_bytes_max) return "name is longer than name_bytes_max";
#if defined(__SSE2__)
  if (name_surely_valid(reinterpret_cast<const unsigned char*>(name.data()), name.size())) return nullptr;
#endif
  return check_name_bytes(name);
}

const char* check_name_bytes(std::string_view name) {
  if (name.empty()) return "name is empty";
  if (name.size() > limits::name_bytes_max) return "name is longer than name_bytes_max";
  const auto* s = reinterpret_cast<const unsigned char*>(name.data());
  size_t n = name.size();
  size_t i = 0;
  while (i < n) {
    // Fast path, 8 bytes at a time, while they are plain printable ASCII
    // without a comma: most name bytes are. Any other byte falls to the
    // byte-by-byte checks below, which say what is wrong or walk the UTF-8
    // sequence. (Exact SWAR tests: every byte is < 0x80 when they run.)
    constexpr uint64_t ones = 0x0101010101010101ull;
    constexpr uint64_t highs = 0x8080808080808080ull;
    while (n - i >= 8) {
      uint64_t w;
      std::memcpy(&w, s + i, 8);
      if (w & highs) break;
      uint64_t below_space = (w - 0x20 * ones) & ~w & highs;
      uint64_t del = ((w ^ (0x7F * ones)) - ones) & ~(w ^ (0x7F * ones)) & highs;
      uint64_t comma = ((w ^ (0x2C * ones)) - ones) & ~(w ^ (0x2C * ones)) & highs;
      if (below_space | del | comma) break;
      i += 8;
    }
    if (i >= n) break;
    unsigned c = s[i];
    if (c < 0x80) {
      if (c < 0x20 || c == 0x7F) return "name has a control character";
      // The classic CSV export has no quoting; a comma would split the field.
      if (c == ',') return "name has a comma";
      i++;
      continue;
    }
    size_t len;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
      cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      cp = c & 0x07;
    } else {
      return "name is not valid UTF-8";
    }
    if (i + len > n) return "name is not valid UTF-8";
    for (size_t k = 1; k < len; k++) {
      unsigned cc = s[i + k];
      if ((cc & 0xC0) != 0x80) return "name is not valid UTF-8";
      cp = (cp << 6) | (cc & 0x3F);
    }
    // Overlong forms, UTF-16 surrogates and code points past U+10FFFF.
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF))
      return "name is not valid UTF-8";
    if (cp >= 0x80 && cp <= 0x9F) return "name has a control character";
    i += len;
  }
  return nullptr;
}

const char* check_document(std::string_view doc) {
  if (doc.empty()) return "document is empty";
  if (doc.size() > limits::document_digits_max) return "document has more than document_digits_max digits";
  for (char c : doc)
    if (c < '0' || c > '9') return "document has a character that is not a digit";
  return nullptr;
}

const char* check_birthdate(Date d, Date today) {
  if (!is_calendar_date(d)) return "birthdate is not a calendar date";
  if (d.year < limits::birth_year_min) return "birthdate is before birth_year_min";
  if (d.ordinal() > today.ordinal()) return "birthdate is in the future";
  return nullptr;
}

std::optional<Rejection> check_bet(const Bet& bet, const ValidationContext& ctx) {
  if (const char* why = check_name(bet.first_name)) return Rejection{Status::invalid_name, no_bet_index, why};
  if (const char* why = check_name(bet.last_name)) return Rejection{Status::invalid_name, no_bet_index, why};
  if (const char* why = check_document(bet.document)) return Rejection{Status::invalid_document, no_bet_index, why};
  if (const char* why = check_birthdate(bet.birthdate, ctx.today))
    return Rejection{Status::invalid_birthdate, no_bet_index, why};
  if (bet.number > limits::bet_number_max) return Rejection{Status::invalid_number, no_bet_index, "number is over 9999"};
  return std::nullopt;
}

bool BetCursor::next(Bet& out) {
  size_t left = static_cast<size_t>(_end - _p);
  if (left < limits::bet_fixed_bytes) return false;
  size_t doc_len = std::to_integer<size_t>(_p[6]);
  size_t first_len = std::to_integer<size_t>(_p[7]);
  size_t last_len = std::to_integer<size_t>(_p[8]);
  size_t size = limits::bet_fixed_bytes + doc_len + first_len + last_len;
  if (left < size) return false;
  out.number = load_le<uint16_t>(_p);
  out.birthdate = Date{load_le<uint16_t>(_p + 2), load_le<uint8_t>(_p + 4), load_le<uint8_t>(_p + 5)};
  const char* s = reinterpret_cast<const char*>(_p + limits::bet_fixed_bytes);
  out.document = std::string_view(s, doc_len);
  out.first_name = std::string_view(s + doc_len, first_len);
  out.last_name = std::string_view(s + doc_len + first_len, last_len);
  _p += size;
  return true;
}

bool read_batch_header(Bytes body, BatchInfo& out) {
  if (body.size() < limits::batch_body_header_bytes) return false;
  out.agency = load_le<uint16_t>(body.data());
  out.count = load_le<uint16_t>(body.data() + 2);
  return true;
}

std::optional<Rejection> validate_batch_parts(uint16_t agency, uint16_t count, Bytes bets,
                                              const ValidationContext& ctx) {
  if (agency < 1 || agency > ctx.agencies)
    return Rejection{Status::invalid_agency, no_bet_index, "agency is not a known agency"};
  if (count == 0) return Rejection{Status::malformed_body, no_bet_index, "batch holds no bets"};
  if (count > ctx.batch_bets_max)
    return Rejection{Status::too_many_bets, no_bet_index, "batch holds more than batch_bets_max bets"};
  BetCursor cursor(bets);
  for (uint16_t i = 0; i < count; i++) {
    Bet bet;
    if (cursor.remaining() < limits::bet_fixed_bytes)
      return Rejection{Status::malformed_body, i, "bet is truncated: the body ends before the bet's fixed part"};
    if (!cursor.next(bet))
      return Rejection{Status::malformed_body, i, "a bet's field length runs past the end of the body"};
    if (auto r = check_bet(bet, ctx)) {
      r->index = i;
      return r;
    }
  }
  if (!cursor.at_end()) return Rejection{Status::malformed_body, no_bet_index, "bytes after the last bet"};
  return std::nullopt;
}

std::optional<Rejection> validate_batch(Bytes body, const ValidationContext& ctx, BatchInfo& out) {
  if (!read_batch_header(body, out))
    return Rejection{Status::malformed_body, no_bet_index, "batch body shorter than its header"};
  return validate_batch_parts(out.agency, out.count, body.subspan(limits::batch_body_header_bytes), ctx);
}

// ---------------------------------------------------------------- encoding

size_t encoded_bet_bytes(const Bet& bet) {
  return limits::bet_fixed_bytes + bet.document.size() + bet.first_name.size() + bet.last_name.size();
}

size_t encode_bet(std::byte* dst, size_t capacity, const Bet& bet) {
  // Lengths travel as u8: the encoder refuses what the decoder could not read
  // back rather than truncating it.
  if (bet.document.size() > 255 || bet.first_name.size() > 255 || bet.last_name.size() > 255) return 0;
  size_t size = encoded_bet_bytes(bet);
  if (size > capacity) return 0;
  store_le<uint16_t>(dst, bet.number);
  store_le<uint16_t>(dst + 2, bet.birthdate.year);
  store_le<uint8_t>(dst + 4, bet.birthdate.month);
  store_le<uint8_t>(dst + 5, bet.birthdate.day);
  store_le<uint8_t>(dst + 6, static_cast<uint8_t>(bet.document.size()));
  store_le<uint8_t>(dst + 7, static_cast<uint8_t>(bet.first_name.size()));
  store_le<uint8_t>(dst + 8, static_cast<uint8_t>(bet.last_name.size()));
  std::byte* s = dst + limits::bet_fixed_bytes;
  std::memcpy(s, bet.document.data(), bet.document.size());
  s += bet.document.size();
  std::memcpy(s, bet.first_name.data(), bet.first_name.size());
  s += bet.first_name.size();
  std::memcpy(s, bet.last_name.data(), bet.last_name.size());
  return size;
}

BatchBuilder::BatchBuilder(std::byte* buffer, size_t capacity, uint16_t agency, size_t bets_max)
    : _buf(buffer), _capacity(capacity), _agency(agency), _bets_max(bets_max) {
  LOTTERY_ASSERT(capacity >= limits::frame_header_bytes + limits::batch_body_header_bytes);
  LOTTERY_ASSERT(bets_max >= 1 && bets_max <= limits::batch_bets_max);
  reset();
}

void BatchBuilder::reset() {
  _count = 0;
  _used = limits::frame_header_bytes + limits::batch_body_header_bytes;
}

bool BatchBuilder::add(const Bet& bet) {
  if (_count >= _bets_max) return false;
  size_t n = encode_bet(_buf + _used, _capacity - _used, bet);
  if (n == 0) return false;
  _used += n;
  _count++;
  return true;
}

size_t BatchBuilder::finish(uint32_t seq) {
  LOTTERY_ASSERT(_count > 0);
  std::byte* body = _buf + limits::frame_header_bytes;
  store_le<uint16_t>(body, _agency);
  store_le<uint16_t>(body + 2, _count);
  return finish_frame(_buf, _used - limits::frame_header_bytes, static_cast<uint8_t>(MsgType::batch), seq);
}

size_t encode_hello(std::byte* dst, size_t capacity, uint32_t seq, uint16_t agency, uint64_t producer_id) {
  constexpr size_t body = 12;
  if (capacity < limits::frame_header_bytes + body) return 0;
  std::byte* b = dst + limits::frame_header_bytes;
  store_le<uint16_t>(b, agency);
  store_le<uint16_t>(b + 2, 0);
  store_le<uint64_t>(b + 4, producer_id);
  return finish_frame(dst, body, static_cast<uint8_t>(MsgType::hello), seq);
}

size_t encode_finished(std::byte* dst, size_t capacity, uint32_t seq, uint16_t agency) {
  constexpr size_t body = 4;
  if (capacity < limits::frame_header_bytes + body) return 0;
  std::byte* b = dst + limits::frame_header_bytes;
  store_le<uint16_t>(b, agency);
  store_le<uint16_t>(b + 2, 0);
  return finish_frame(dst, body, static_cast<uint8_t>(MsgType::finished), seq);
}

size_t encode_winners_query(std::byte* dst, size_t capacity, uint32_t seq, uint16_t agency, uint32_t start) {
  constexpr size_t body = 8;
  if (capacity < limits::frame_header_bytes + body) return 0;
  std::byte* b = dst + limits::frame_header_bytes;
  store_le<uint16_t>(b, agency);
  store_le<uint16_t>(b + 2, 0);
  store_le<uint32_t>(b + 4, start);
  return finish_frame(dst, body, static_cast<uint8_t>(MsgType::winners), seq);
}

bool decode_hello(Bytes body, HelloRequest& out) {
  if (body.size() != 12) return false;
  out.agency = load_le<uint16_t>(body.data());
  out.producer_id = load_le<uint64_t>(body.data() + 4);
  return true;
}

bool decode_agency_body(Bytes body, uint16_t& agency) {
  if (body.size() != 4) return false;
  agency = load_le<uint16_t>(body.data());
  return true;
}

bool decode_winners_query(Bytes body, uint16_t& agency, uint32_t& start) {
  if (body.size() != 8) return false;
  agency = load_le<uint16_t>(body.data());
  start = load_le<uint32_t>(body.data() + 4);
  return true;
}

// ---------------------------------------------------------------- replies

size_t encode_error_reply(std::byte* dst, size_t capacity, uint8_t request_type, uint32_t seq, Status status,
                          uint16_t bet_index, std::string_view reason) {
  LOTTERY_ASSERT(status != Status::ok);
  if (reason.size() > limits::reply_reason_bytes_max) reason = reason.substr(0, limits::reply_reason_bytes_max);
  size_t body = 2 + 2 + 2 + reason.size();
  if (capacity < limits::frame_header_bytes + body) return 0;
  std::byte* b = dst + limits::frame_header_bytes;
  store_le<uint16_t>(b, static_cast<uint16_t>(status));
  store_le<uint16_t>(b + 2, bet_index);
  store_le<uint16_t>(b + 4, static_cast<uint16_t>(reason.size()));
  std::memcpy(b + 6, reason.data(), reason.size());
  uint8_t type = request_type == connection_error_type ? connection_error_type
                                                         : static_cast<uint8_t>(request_type | reply_bit);
  return finish_frame(dst, body, type, seq);
}

size_t encode_hello_ack(std::byte* dst, size_t capacity, uint32_t seq, const HelloAck& ack) {
  constexpr size_t body = 2 + 2 + 2 + 2 + 8 + 8 + 8;
  if (capacity < limits::frame_header_bytes + body) return 0;
  std::byte* b = dst + limits::frame_header_bytes;
  store_le<uint16_t>(b, 0);
  store_le<uint16_t>(b + 2, ack.agency);
  uint16_t flags = static_cast<uint16_t>((ack.finished ? 1 : 0) | (ack.draw_done ? 2 : 0));
  store_le<uint16_t>(b + 4, flags);
  store_le<uint16_t>(b + 6, ack.worker);
  store_le<uint64_t>(b + 8, ack.stored_seq);
  store_le<uint64_t>(b + 16, ack.producer_bets);
  store_le<uint64_t>(b + 24, ack.bets_stored);
  return finish_frame(dst, body, static_cast<uint8_t>(MsgType::hello) | reply_bit, seq);
}

size_t encode_batch_ack(std::byte* dst, size_t capacity, uint32_t seq, uint16_t count) {
  constexpr size_t body = 4;
  if (capacity < limits::frame_header_bytes + body) return 0;
  std::byte* b = dst + limits::frame_header_bytes;
  store_le<uint16_t>(b, 0);
  store_le<uint16_t>(b + 2, count);
  return finish_frame(dst, body, static_cast<uint8_t>(MsgType::batch) | reply_bit, seq);
}

size_t encode_finished_ack(std::byte* dst, size_t capacity, uint32_t seq, uint64_t bets_stored) {
  constexpr size_t body = 2 + 2 + 8;
  if (capacity < limits::frame_header_bytes + body) return 0;
  std::byte* b = dst + limits::frame_header_bytes;
  store_le<uint16_t>(b, 0);
  store_le<uint16_t>(b + 2, 0);
  store_le<uint64_t>(b + 4, bets_stored);
  return finish_frame(dst, body, static_cast<uint8_t>(MsgType::finished) | reply_bit, seq);
}

WinnersReplyBuilder::WinnersReplyBuilder(std::byte* buffer, size_t capacity, uint32_t total, uint32_t start)
    : _buf(buffer), _capacity(capacity) {
  LOTTERY_ASSERT(capacity >= limits::frame_header_bytes + limits::winners_reply_header_bytes);
  std::byte* b = _buf + limits::frame_header_bytes;
  store_le<uint16_t>(b, 0);
  store_le<uint32_t>(b + 2, total);
  store_le<uint32_t>(b + 6, start);
  _used = limits::frame_header_bytes + limits::winners_reply_header_bytes;
}

bool WinnersReplyBuilder::add(std::string_view document) {
  if (_count >= limits::winners_page_max) return false;
  if (document.size() > limits::document_digits_max) return false;
  if (_capacity - _used < 1 + document.size()) return false;
  store_le<uint8_t>(_buf + _used, static_cast<uint8_t>(document.size()));
  std::memcpy(_buf + _used + 1, document.data(), document.size());
  _used += 1 + document.size();
  _count++;
  return true;
}

size_t WinnersReplyBuilder::finish(uint32_t seq) {
  store_le<uint32_t>(_buf + limits::frame_header_bytes + 10, _count);
  return finish_frame(_buf, _used - limits::frame_header_bytes, static_cast<uint8_t>(MsgType::winners) | reply_bit,
                      seq);
}

bool decode_reply(Bytes frame, Reply& out) {
  if (parse_header(frame.data(), frame.size(), limits::frame_bytes_max, out.header) != HeaderCheck::ok) return false;
  if (out.header.length != frame.size()) return false;
  Bytes body = frame.subspan(limits::frame_header_bytes);
  if (!body_crc_matches(out.header, body)) return false;
  if (body.size() < 2) return false;
  out.answers = out.header.type == connection_error_type ? connection_error_type
                                                          : static_cast<uint8_t>(out.header.type & ~reply_bit);
  if (out.header.type != connection_error_type && (out.header.type & reply_bit) == 0) return false;
  out.status = static_cast<Status>(load_le<uint16_t>(body.data()));
  if (out.status != Status::ok) {
    if (body.size() < 6) return false;
    out.bet_index = load_le<uint16_t>(body.data() + 2);
    size_t len = load_le<uint16_t>(body.data() + 4);
    if (body.size() != 6 + len) return false;
    out.reason = std::string_view(reinterpret_cast<const char*>(body.data() + 6), len);
    out.payload = {};
    return true;
  }
  out.bet_index = no_bet_index;
  out.reason = {};
  out.payload = body.subspan(2);
  return true;
}

bool decode_hello_ack(const Reply& r, HelloAck& out) {
  if (r.status != Status::ok || r.payload.size() != 30) return false;
  const std::byte* b = r.payload.data();
  out.agency = load_le<uint16_t>(b);
  uint16_t flags = load_le<uint16_t>(b + 2);
  out.finished = flags & 1;
  out.draw_done = flags & 2;
  out.worker = load_le<uint16_t>(b + 4);
  out.stored_seq = load_le<uint64_t>(b + 6);
  out.producer_bets = load_le<uint64_t>(b + 14);
  out.bets_stored = load_le<uint64_t>(b + 22);
  return true;
}

bool decode_batch_ack(const Reply& r, uint16_t& count) {
  if (r.status != Status::ok || r.payload.size() != 2) return false;
  count = load_le<uint16_t>(r.payload.data());
  return true;
}

bool decode_finished_ack(const Reply& r, uint64_t& bets_stored) {
  if (r.status != Status::ok || r.payload.size() != 10) return false;
  bets_stored = load_le<uint64_t>(r.payload.data() + 2);
  return true;
}

bool decode_winners_page(const Reply& r, WinnersPage& out) {
  if (r.status != Status::ok || r.payload.size() < 12) return false;
  const std::byte* b = r.payload.data();
  out.total = load_le<uint32_t>(b);
  out.start = load_le<uint32_t>(b + 4);
  out.count = load_le<uint32_t>(b + 8);
  out.documents = r.payload.subspan(12);
  // Verify the page is well formed before anyone iterates it.
  Bytes cursor = out.documents;
  std::string_view doc;
  for (uint32_t i = 0; i < out.count; i++)
    if (!next_document(cursor, doc)) return false;
  return cursor.empty();
}

bool next_document(Bytes& cursor, std::string_view& doc) {
  if (cursor.empty()) return false;
  size_t len = std::to_integer<size_t>(cursor[0]);
  if (cursor.size() < 1 + len) return false;
  doc = std::string_view(reinterpret_cast<const char*>(cursor.data() + 1), len);
  cursor = cursor.subspan(1 + len);
  return true;
}

}  // namespace lottery::proto
