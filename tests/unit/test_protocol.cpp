// Wire protocol: round trips, validation rules, and frames split anywhere.
#include <gtest/gtest.h>

#include <random>

#include <array>
#include <string>
#include <vector>

#include "lottery/protocol.hpp"
#include "lottery/wire.hpp"

using namespace lottery;
using namespace lottery::proto;

namespace {

Bet sample_bet() {
  return Bet{"Santiago Lionel", "Lorca", "30904465", Date{1999, 3, 17}, 2201};
}

ValidationContext ctx() { return ValidationContext{5, Date{2026, 12, 4}}; }

std::vector<std::byte> build_batch(uint16_t agency, const std::vector<Bet>& bets, uint32_t seq = 7) {
  std::vector<std::byte> buf(limits::frame_bytes_max);
  BatchBuilder b(buf.data(), buf.size(), agency, limits::batch_bets_max);
  for (const Bet& bet : bets) EXPECT_TRUE(b.add(bet));
  size_t n = b.finish(seq);
  buf.resize(n);
  return buf;
}

Bytes body_of(const std::vector<std::byte>& frame) {
  return Bytes(frame).subspan(limits::frame_header_bytes);
}

}  // namespace

TEST(Protocol, BatchRoundTrip) {
  std::vector<Bet> bets = {sample_bet(), Bet{"María José", "Fornerón", "1", Date{2000, 2, 29}, 0},
                           Bet{"Ñandú", "Álvarez", "1234567890", Date{1980, 1, 1}, 9999}};
  auto frame = build_batch(3, bets, 42);
  FrameHeader h;
  ASSERT_EQ(parse_header(frame.data(), frame.size(), limits::frame_bytes_max, h), HeaderCheck::ok);
  EXPECT_EQ(h.length, frame.size());
  EXPECT_EQ(h.type, static_cast<uint8_t>(MsgType::batch));
  EXPECT_EQ(h.seq, 42u);
  EXPECT_TRUE(body_crc_matches(h, body_of(frame)));
  BatchInfo info;
  ASSERT_FALSE(validate_batch(body_of(frame), ctx(), info).has_value());
  EXPECT_EQ(info.agency, 3);
  EXPECT_EQ(info.count, 3);
  BetCursor cursor(body_of(frame).subspan(limits::batch_body_header_bytes));
  for (const Bet& want : bets) {
    Bet got;
    ASSERT_TRUE(cursor.next(got));
    EXPECT_EQ(got.first_name, want.first_name);
    EXPECT_EQ(got.last_name, want.last_name);
    EXPECT_EQ(got.document, want.document);
    EXPECT_EQ(got.birthdate, want.birthdate);
    EXPECT_EQ(got.number, want.number);
  }
  EXPECT_TRUE(cursor.at_end());
}

TEST(Protocol, BatchBuilderRespectsByteBudgetAndCount) {
  std::array<std::byte, 8192> buf{};
  BatchBuilder b(buf.data(), buf.size(), 1, 128);
  size_t added = 0;
  while (b.add(sample_bet())) added++;
  EXPECT_EQ(added, 128u);  // sample bets are small: the count limit binds first
  size_t n = b.finish(1);
  EXPECT_LE(n, 8192u);

  BatchBuilder small(buf.data(), 200, 1, 4096);
  added = 0;
  while (small.add(sample_bet())) added++;
  EXPECT_GT(added, 0u);
  EXPECT_LE(small.finish(1), 200u);
}

TEST(Protocol, HeaderChecks) {
  std::array<std::byte, 64> buf{};
  size_t n = encode_finished(buf.data(), buf.size(), 9, 2);
  FrameHeader h;
  for (size_t avail = 0; avail < limits::frame_header_bytes; avail++)
    EXPECT_EQ(parse_header(buf.data(), avail, limits::frame_bytes_max, h), HeaderCheck::need_more) << avail;
  EXPECT_EQ(parse_header(buf.data(), n, limits::frame_bytes_max, h), HeaderCheck::ok);

  auto bad = buf;
  wire::store_le<uint32_t>(bad.data(), limits::frame_bytes_max + 1);
  EXPECT_EQ(parse_header(bad.data(), 4, limits::frame_bytes_max, h), HeaderCheck::too_large);
  wire::store_le<uint32_t>(bad.data(), 3);
  EXPECT_EQ(parse_header(bad.data(), 4, limits::frame_bytes_max, h), HeaderCheck::bad_length);
  bad = buf;
  bad[4] = std::byte{2};
  EXPECT_EQ(parse_header(bad.data(), n, limits::frame_bytes_max, h), HeaderCheck::bad_version);
  bad = buf;
  bad[6] = std::byte{1};
  EXPECT_EQ(parse_header(bad.data(), n, limits::frame_bytes_max, h), HeaderCheck::bad_flags);
  bad = buf;
  bad[n - 1] ^= std::byte{0xFF};
  ASSERT_EQ(parse_header(bad.data(), n, limits::frame_bytes_max, h), HeaderCheck::ok);
  EXPECT_FALSE(body_crc_matches(h, Bytes(bad).subspan(limits::frame_header_bytes, n - limits::frame_header_bytes)));
}

TEST(Protocol, RequestRoundTrips) {
  std::array<std::byte, 64> buf{};
  size_t n = encode_hello(buf.data(), buf.size(), 1, 4, 0x1122334455667788ull);
  HelloRequest hello;
  ASSERT_TRUE(decode_hello(Bytes(buf).subspan(16, n - 16), hello));
  EXPECT_EQ(hello.agency, 4);
  EXPECT_EQ(hello.producer_id, 0x1122334455667788ull);

  n = encode_winners_query(buf.data(), buf.size(), 2, 5, 77);
  uint16_t agency;
  uint32_t start;
  ASSERT_TRUE(decode_winners_query(Bytes(buf).subspan(16, n - 16), agency, start));
  EXPECT_EQ(agency, 5);
  EXPECT_EQ(start, 77u);
}

TEST(Protocol, ReplyRoundTrips) {
  std::array<std::byte, 4096> buf{};
  size_t n = encode_batch_ack(buf.data(), buf.size(), 11, 128);
  Reply r;
  ASSERT_TRUE(decode_reply(Bytes(buf).first(n), r));
  EXPECT_EQ(r.answers, static_cast<uint8_t>(MsgType::batch));
  EXPECT_EQ(r.header.seq, 11u);
  uint16_t count;
  ASSERT_TRUE(decode_batch_ack(r, count));
  EXPECT_EQ(count, 128);

  n = encode_error_reply(buf.data(), buf.size(), 1, 12, Status::invalid_document, 3, "document is empty");
  ASSERT_TRUE(decode_reply(Bytes(buf).first(n), r));
  EXPECT_EQ(r.status, Status::invalid_document);
  EXPECT_EQ(r.bet_index, 3);
  EXPECT_EQ(r.reason, "document is empty");
  EXPECT_EQ(r.header.seq, 12u);

  HelloAck ack;
  ack.agency = 3;
  ack.finished = true;
  ack.stored_seq = 99;
  ack.producer_bets = 500;
  ack.bets_stored = 1000;
  ack.worker = 2;
  n = encode_hello_ack(buf.data(), buf.size(), 1, ack);
  ASSERT_TRUE(decode_reply(Bytes(buf).first(n), r));
  HelloAck got;
  ASSERT_TRUE(decode_hello_ack(r, got));
  EXPECT_EQ(got.agency, 3);
  EXPECT_TRUE(got.finished);
  EXPECT_FALSE(got.draw_done);
  EXPECT_EQ(got.stored_seq, 99u);
  EXPECT_EQ(got.producer_bets, 500u);
  EXPECT_EQ(got.worker, 2);
  EXPECT_EQ(got.bets_stored, 1000u);

  WinnersReplyBuilder w(buf.data(), buf.size(), 3, 0);
  ASSERT_TRUE(w.add("30904465"));
  ASSERT_TRUE(w.add("1"));
  n = w.finish(5);
  ASSERT_TRUE(decode_reply(Bytes(buf).first(n), r));
  WinnersPage page;
  ASSERT_TRUE(decode_winners_page(r, page));
  EXPECT_EQ(page.total, 3u);
  EXPECT_EQ(page.count, 2u);
  Bytes cursor = page.documents;
  std::string_view doc;
  ASSERT_TRUE(next_document(cursor, doc));
  EXPECT_EQ(doc, "30904465");
  ASSERT_TRUE(next_document(cursor, doc));
  EXPECT_EQ(doc, "1");
  EXPECT_FALSE(next_document(cursor, doc));
}

// Each validation rule: a passing and a failing case, and the index of the
// failing bet.
struct RuleCase {
  const char* name;
  Bet bet;
  Status want;
};

TEST(Validation, EveryRule) {
  Bet ok = sample_bet();
  std::string long_name(limits::name_bytes_max + 1, 'a');
  std::string max_name(limits::name_bytes_max, 'a');
  std::vector<RuleCase> cases = {
      {"ok", ok, Status::ok},
      {"accents", Bet{"José María", "Núñez", "123", Date{1990, 5, 5}, 5}, Status::ok},
      {"max name", Bet{max_name, max_name, "1", Date{1990, 5, 5}, 5}, Status::ok},
      {"empty first", Bet{"", "Lorca", "1", Date{1990, 5, 5}, 5}, Status::invalid_name},
      {"empty last", Bet{"Ana", "", "1", Date{1990, 5, 5}, 5}, Status::invalid_name},
      {"long name", Bet{long_name, "Lorca", "1", Date{1990, 5, 5}, 5}, Status::invalid_name},
      {"control", Bet{"An\ta", "Lorca", "1", Date{1990, 5, 5}, 5}, Status::invalid_name},
      {"del", Bet{"An\x7f", "Lorca", "1", Date{1990, 5, 5}, 5}, Status::invalid_name},
      {"c1 control", Bet{"An\xc2\x85", "Lorca", "1", Date{1990, 5, 5}, 5}, Status::invalid_name},
      {"bad utf8", Bet{"An\xc3", "Lorca", "1", Date{1990, 5, 5}, 5}, Status::invalid_name},
      {"overlong", Bet{"\xc0\xaf", "Lorca", "1", Date{1990, 5, 5}, 5}, Status::invalid_name},
      {"surrogate", Bet{"\xed\xa0\x80", "Lorca", "1", Date{1990, 5, 5}, 5}, Status::invalid_name},
      {"comma", Bet{"Ana,Bea", "Lorca", "1", Date{1990, 5, 5}, 5}, Status::invalid_name},
      {"empty doc", Bet{"Ana", "Lorca", "", Date{1990, 5, 5}, 5}, Status::invalid_document},
      {"long doc", Bet{"Ana", "Lorca", "12345678901", Date{1990, 5, 5}, 5}, Status::invalid_document},
      {"letter doc", Bet{"Ana", "Lorca", "12a4", Date{1990, 5, 5}, 5}, Status::invalid_document},
      {"feb 30", Bet{"Ana", "Lorca", "1", Date{1990, 2, 30}, 5}, Status::invalid_birthdate},
      {"feb 29 non-leap", Bet{"Ana", "Lorca", "1", Date{1900, 2, 29}, 5}, Status::invalid_birthdate},
      {"month 13", Bet{"Ana", "Lorca", "1", Date{1990, 13, 1}, 5}, Status::invalid_birthdate},
      {"day 0", Bet{"Ana", "Lorca", "1", Date{1990, 1, 0}, 5}, Status::invalid_birthdate},
      {"future", Bet{"Ana", "Lorca", "1", Date{2026, 12, 5}, 5}, Status::invalid_birthdate},
      {"today", Bet{"Ana", "Lorca", "1", Date{2026, 12, 4}, 5}, Status::ok},
      {"ancient", Bet{"Ana", "Lorca", "1", Date{1899, 12, 31}, 5}, Status::invalid_birthdate},
      {"number max", Bet{"Ana", "Lorca", "1", Date{1990, 1, 1}, 9999}, Status::ok},
      {"number over", Bet{"Ana", "Lorca", "1", Date{1990, 1, 1}, 10000}, Status::invalid_number},
  };
  for (const RuleCase& c : cases) {
    auto frame = build_batch(1, {ok, ok, c.bet});
    BatchInfo info;
    auto r = validate_batch(body_of(frame), ctx(), info);
    if (c.want == Status::ok) {
      EXPECT_FALSE(r.has_value()) << c.name << ": " << (r ? r->reason : "");
    } else {
      ASSERT_TRUE(r.has_value()) << c.name;
      EXPECT_EQ(r->status, c.want) << c.name;
      EXPECT_EQ(r->index, 2) << c.name;
      EXPECT_STRNE(r->reason, "") << c.name;
    }
  }
}

TEST(Validation, AgencyMustBeKnown) {
  for (uint16_t agency : {0, 6, 65535}) {
    auto frame = build_batch(agency, {sample_bet()});
    BatchInfo info;
    auto r = validate_batch(body_of(frame), ctx(), info);
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->status, Status::invalid_agency);
  }
  auto frame = build_batch(5, {sample_bet()});
  BatchInfo info;
  EXPECT_FALSE(validate_batch(body_of(frame), ctx(), info).has_value());
}

TEST(Validation, MalformedBodies) {
  auto frame = build_batch(1, {sample_bet(), sample_bet()});
  std::vector<std::byte> body(body_of(frame).begin(), body_of(frame).end());
  BatchInfo info;
  // Truncated anywhere: never accepted, never read out of bounds.
  for (size_t cut = 0; cut < body.size(); cut++) {
    auto r = validate_batch(Bytes(body).first(cut), ctx(), info);
    ASSERT_TRUE(r.has_value()) << cut;
  }
  // Trailing garbage.
  body.push_back(std::byte{0});
  auto r = validate_batch(body, ctx(), info);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, Status::malformed_body);
  // Count says more bets than there are.
  body.pop_back();
  wire::store_le<uint16_t>(body.data() + 2, 3);
  r = validate_batch(body, ctx(), info);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, Status::malformed_body);
  EXPECT_EQ(r->index, 2);
  // Zero bets.
  wire::store_le<uint16_t>(body.data() + 2, 0);
  r = validate_batch(body, ctx(), info);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, Status::malformed_body);
}

TEST(Dates, ParseAndCalendar) {
  Date d;
  EXPECT_TRUE(parse_date("1999-03-17", d));
  EXPECT_EQ(d, (Date{1999, 3, 17}));
  EXPECT_FALSE(parse_date("1999-3-17", d));
  EXPECT_FALSE(parse_date("1999/03/17", d));
  EXPECT_FALSE(parse_date("19a9-03-17", d));
  EXPECT_TRUE(is_calendar_date(Date{2000, 2, 29}));
  EXPECT_FALSE(is_calendar_date(Date{2100, 2, 29}));
  EXPECT_FALSE(is_calendar_date(Date{2023, 4, 31}));
}

// The 8-bytes-at-a-time fast path of check_name must agree with the byte
// rules for every byte value at every position of a chunk.
TEST(Validation, NameFastPathAgreesWithByteRules) {
  for (size_t len : {8u, 9u, 15u, 16u, 24u, 31u}) {
    for (size_t pos = 0; pos < len; pos++) {
      for (unsigned b = 0; b < 256; b++) {
        std::string name(len, 'a');
        name[pos] = static_cast<char>(b);
        bool ascii_ok = b >= 0x20 && b < 0x7F && b != ',';
        const char* why = check_name(name);
        if (b < 0x80) {
          EXPECT_EQ(why == nullptr, ascii_ok) << "len " << len << " pos " << pos << " byte " << b;
        } else {
          // A lone byte >= 0x80 is never valid UTF-8.
          EXPECT_NE(why, nullptr) << "len " << len << " pos " << pos << " byte " << b;
        }
      }
    }
  }
  EXPECT_EQ(check_name("Agustín Emanuel de la Santísima Trinidad"), nullptr);
  EXPECT_NE(check_name("Agustín Emanuel de la Santísima,Trinidad"), nullptr);
}

// check_name's 16-bytes-at-a-time path (ASCII and two-byte sequences) must
// give the byte rules' verdict, and their reason, for every pair of byte
// values at every position of names that straddle its chunks, and for
// random names built from the pieces that matter.
TEST(Validation, NameVectorPathAgreesWithByteRules) {
  for (size_t len : {2u, 3u, 15u, 16u, 17u, 31u, 32u, 33u}) {
    for (size_t pos = 0; pos + 1 < len; pos += (len > 17 ? 7 : 1)) {
      for (unsigned a = 0x80; a < 256; a++) {
        for (unsigned b = 0; b < 256; b++) {
          std::string name(len, 'a');
          name[pos] = static_cast<char>(a);
          name[pos + 1] = static_cast<char>(b);
          const char* fast = check_name(name);
          const char* bytes = check_name_bytes(name);
          ASSERT_EQ(fast == nullptr, bytes == nullptr) << "len " << len << " pos " << pos << " bytes " << a << " " << b;
          if (fast != nullptr) {
      ASSERT_STREQ(fast, bytes);
    }
        }
      }
    }
  }
  constexpr uint32_t seed = 20261205;
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  const std::vector<std::string> pieces = {"a", "Z", " ", "'", "-", "á", "Ñ", "ü", "\xC2\xA0", "\xC2\x85", "\xDF\xBF",
                                           "€", "\xF0\x9F\x98\x80", ",", "\x7F", "\x1F", "\xC3", "\xA9", "\xC0\xAF",
                                           "\xE0\x80\xAF", "\xED\xA0\x80", "\xFF"};
  for (int i = 0; i < 200'000; i++) {
    std::string name;
    size_t parts = 1 + rng() % 40;
    // Mostly valid pieces, so long valid names (the vector path's case) are common.
    for (size_t k = 0; k < parts; k++) name += pieces[rng() % 100 < 90 ? rng() % 8 : rng() % pieces.size()];
    if (name.size() > lottery::limits::name_bytes_max) name.resize(lottery::limits::name_bytes_max);
    const char* fast = check_name(name);
    const char* bytes = check_name_bytes(name);
    ASSERT_EQ(fast == nullptr, bytes == nullptr) << "name " << name;
    if (fast != nullptr) {
      ASSERT_STREQ(fast, bytes);
    }
  }
}
