// Agency session: the state machine against an in-process fake server
// (pipelining, out-of-order acks, rejections, winners paging, frames split at
// every byte; exactly once: resume from a stored prefix, drops and resends,
// producer_busy, sequence gaps), then the socket driver over a socketpair and
// the reconnect loop over loopback TCP.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <deque>
#include <string>
#include <thread>
#include <vector>

#include "client/agency_session.hpp"
#include "client/net.hpp"
#include "lottery/wire.hpp"
#include "test_support.hpp"

using namespace lottery;
using namespace lottery::client;

namespace {

constexpr uint16_t agency_id = 3;

class VectorSource final : public BetSource {
 public:
  explicit VectorSource(size_t count) {
    _documents.reserve(count);
    for (size_t i = 0; i < count; i++) _documents.push_back(std::to_string(20000000 + i));
  }
  bool next(proto::Bet& out, uint32_t& line) override {
    if (_next == _documents.size()) return false;
    out = proto::Bet{"María José", "Fornerón", _documents[_next], proto::Date{1990, 1, 2},
                     static_cast<uint16_t>(_next % 10000)};
    // Pretend every other line of the file is blank, so lines and indexes differ.
    line = static_cast<uint32_t>(2 * _next + 1);
    _next++;
    return true;
  }
  const std::string& document(size_t i) const { return _documents[i]; }

 private:
  std::vector<std::string> _documents;
  size_t _next = 0;
};

struct RecordingListener final : SessionListener {
  void on_hello_acked(const proto::HelloAck& ack) override {
    hello = ack;
    hellos++;
  }
  void on_resumed(uint64_t seq, uint64_t bets) override {
    resumed_seq = seq;
    resumed_bets = bets;
  }
  void on_reconnected(const proto::HelloAck&, uint32_t confirmed, uint32_t resending) override {
    reconnects.emplace_back(confirmed, resending);
  }
  void on_batch_acked(uint32_t seq, uint16_t count, proto::Bytes bets) override {
    acked_seqs.push_back(seq);
    acked_bets += count;
    proto::BetCursor cursor(bets);
    proto::Bet bet;
    while (cursor.next(bet)) acked_documents.emplace_back(bet.document);
  }
  void on_finished_acked(uint64_t sent, uint64_t stored) override {
    finished_sent = sent;
    finished_stored = stored;
  }
  void on_winner(std::string_view document) override { winners.emplace_back(document); }
  void on_winners_received(uint32_t total) override { winners_total = total; }

  proto::HelloAck hello;
  int hellos = 0;
  uint64_t resumed_seq = 0;
  uint64_t resumed_bets = 0;
  std::vector<std::pair<uint32_t, uint32_t>> reconnects;  // (confirmed, resending)
  std::vector<uint32_t> acked_seqs;
  uint64_t acked_bets = 0;
  std::vector<std::string> acked_documents;
  uint64_t finished_sent = 0;
  uint64_t finished_stored = 0;
  std::vector<std::string> winners;
  int64_t winners_total = -1;
};

// Speaks the server side of protocol v1 from bytes to bytes, with the
// exactly-once producer model of docs/PROTOCOL.md: stored seqs are a prefix
// 1..stored_seq, a batch at or below it is a duplicate (acked again, not
// stored), one past stored_seq + 1 is a sequence_gap. The producer state
// outlives a connection; drop_connection() loses only what was in transit.
class FakeServer {
 public:
  // --- the producer's stored stream (survives drop_connection)
  uint32_t stored_seq = 0;
  uint64_t producer_bets = 0;  // bets stored under seqs 1..stored_seq
  bool agency_finished = false;

  // --- behaviour
  std::vector<std::string> winners;
  uint32_t page_size = 2;
  bool hold_batch_acks = false;  // queue batch replies until release_acks()
  bool reverse_acks = false;     // release held replies newest first
  uint32_t reject_seq = 0;       // reject this batch ...
  uint16_t reject_index = 0;     // ... naming this bet
  uint32_t force_gap_seq = 0;    // answer this batch with sequence_gap
  bool ack_wrong_count = false;
  int busy_hellos = 0;                       // answer this many HELLOs with producer_busy
  uint32_t lose_from_seq = 0;                // batches with seq >= this vanish (the connection is dying)
  bool lose_finished_request = false;        // FINISHED vanishes before the server sees it
  bool lose_finished_reply = false;          // FINISHED is done, its ack vanishes
  uint32_t lose_winners_start = UINT32_MAX;  // the query for this page gets no answer

  // --- what happened
  int hellos = 0;
  std::vector<uint64_t> hello_producers;
  std::vector<uint32_t> batch_seqs;  // every batch received, stored or not
  std::vector<uint16_t> batch_counts;
  std::vector<size_t> batch_frame_bytes;
  std::vector<std::string> batch_first_documents;
  std::vector<uint32_t> stored_seqs;  // batches stored, in order
  int duplicates = 0;
  std::vector<uint32_t> winners_starts;
  int finished_count = 0;

  void receive(proto::Bytes bytes) {
    _in.insert(_in.end(), bytes.begin(), bytes.end());
    while (true) {
      proto::FrameHeader h;
      auto check = proto::parse_header(_in.data(), _in.size(), limits::frame_bytes_max, h);
      if (check == proto::HeaderCheck::need_more || _in.size() < h.length) break;
      ASSERT_EQ(check, proto::HeaderCheck::ok);
      proto::Bytes frame(_in.data(), h.length);
      ASSERT_TRUE(proto::body_crc_matches(h, frame.subspan(limits::frame_header_bytes)));
      handle(h, frame.subspan(limits::frame_header_bytes));
      _in.erase(_in.begin(), _in.begin() + h.length);
    }
  }

  // Releases the oldest `n` held batch replies (all by default).
  void release_acks(size_t n = SIZE_MAX) {
    n = std::min(n, _held.size());
    if (reverse_acks) {
      for (size_t i = n; i-- > 0;) out.insert(out.end(), _held[i].begin(), _held[i].end());
    } else {
      for (size_t i = 0; i < n; i++) out.insert(out.end(), _held[i].begin(), _held[i].end());
    }
    _held.erase(_held.begin(), _held.begin() + static_cast<std::ptrdiff_t>(n));
  }
  size_t held() const { return _held.size(); }

  // The connection breaks: partial requests and unsent replies are gone, the
  // stored stream stays.
  void drop_connection() {
    _in.clear();
    _held.clear();
    out.clear();
  }

  std::vector<std::byte> out;

 private:
  void reply(size_t n, std::vector<std::byte>& buf) { out.insert(out.end(), buf.begin(), buf.begin() + n); }
  void batch_reply(size_t n, std::vector<std::byte>& buf) {
    if (hold_batch_acks) {
      _held.emplace_back(buf.begin(), buf.begin() + n);
    } else {
      reply(n, buf);
    }
  }

  void handle(const proto::FrameHeader& h, proto::Bytes body) {
    std::vector<std::byte> buf(limits::frame_bytes_max);
    switch (static_cast<proto::MsgType>(h.type)) {
      case proto::MsgType::hello:
        return on_hello(h, body, buf);
      case proto::MsgType::batch:
        return on_batch(h, body, buf);
      case proto::MsgType::finished:
        if (lose_finished_request) return;
        finished_count++;
        agency_finished = true;
        if (lose_finished_reply) return;
        reply(proto::encode_finished_ack(buf.data(), buf.size(), h.seq, producer_bets), buf);
        return;
      case proto::MsgType::winners:
        return on_winners(h, body, buf);
      default:
        FAIL() << "unexpected request type " << int{h.type};
    }
  }

  void on_hello(const proto::FrameHeader& h, proto::Bytes body, std::vector<std::byte>& buf) {
    proto::HelloRequest req;
    ASSERT_TRUE(proto::decode_hello(body, req));
    EXPECT_EQ(req.agency, agency_id);
    hellos++;
    hello_producers.push_back(req.producer_id);
    if (busy_hellos > 0) {
      busy_hellos--;
      reply(proto::encode_error_reply(buf.data(), buf.size(), h.type, h.seq, proto::Status::producer_busy,
                                      proto::no_bet_index, "producer held by another connection"),
            buf);
      return;
    }
    proto::HelloAck ack;
    ack.agency = req.agency;
    ack.finished = agency_finished;
    ack.worker = 7;
    ack.stored_seq = stored_seq;
    ack.producer_bets = producer_bets;
    ack.bets_stored = producer_bets;
    reply(proto::encode_hello_ack(buf.data(), buf.size(), h.seq, ack), buf);
  }

  void on_batch(const proto::FrameHeader& h, proto::Bytes body, std::vector<std::byte>& buf) {
    proto::BatchInfo info;
    proto::ValidationContext ctx{agency_id, proto::Date{2024, 6, 1}};
    auto rejection = proto::validate_batch(body, ctx, info);
    ASSERT_FALSE(rejection.has_value()) << rejection->reason;
    batch_seqs.push_back(h.seq);
    batch_counts.push_back(info.count);
    batch_frame_bytes.push_back(h.length);
    proto::BetCursor cursor(body.subspan(limits::batch_body_header_bytes));
    proto::Bet first;
    ASSERT_TRUE(cursor.next(first));
    batch_first_documents.emplace_back(first.document);
    if (lose_from_seq != 0 && h.seq >= lose_from_seq) return;
    if (h.seq == force_gap_seq || h.seq > stored_seq + 1) {
      batch_reply(proto::encode_error_reply(buf.data(), buf.size(), h.type, h.seq, proto::Status::sequence_gap,
                                            proto::no_bet_index, "batch seq is not the producer's next"),
                  buf);
      return;
    }
    if (h.seq == reject_seq) {
      batch_reply(proto::encode_error_reply(buf.data(), buf.size(), h.type, h.seq, proto::Status::invalid_document,
                                            reject_index, "document is not allowed"),
                  buf);
      return;
    }
    if (h.seq <= stored_seq) {
      duplicates++;
    } else {
      stored_seq = h.seq;
      producer_bets += info.count;
      stored_seqs.push_back(h.seq);
    }
    uint16_t count = static_cast<uint16_t>(info.count + (ack_wrong_count ? 1 : 0));
    batch_reply(proto::encode_batch_ack(buf.data(), buf.size(), h.seq, count), buf);
  }

  void on_winners(const proto::FrameHeader& h, proto::Bytes body, std::vector<std::byte>& buf) {
    uint16_t agency = 0;
    uint32_t start = 0;
    ASSERT_TRUE(proto::decode_winners_query(body, agency, start));
    winners_starts.push_back(start);
    if (start == lose_winners_start) return;
    proto::WinnersReplyBuilder b(buf.data(), buf.size(), static_cast<uint32_t>(winners.size()), start);
    for (uint32_t i = start; i < winners.size() && i < start + page_size; i++) EXPECT_TRUE(b.add(winners[i]));
    reply(b.finish(h.seq), buf);
  }

  std::vector<std::byte> _in;
  std::deque<std::vector<std::byte>> _held;
};

// Moves bytes both ways until nothing moves; replies reach the session in
// pieces of `chunk` bytes.
void pump(AgencySession& session, FakeServer& server, size_t chunk = 1 << 20) {
  for (int round = 0; round < 100000; round++) {
    bool moved = false;
    for (proto::Bytes out = session.pending_output(); !out.empty(); out = session.pending_output()) {
      // Hand the server odd-sized pieces too: it must not matter.
      size_t n = std::min<size_t>(out.size(), 1000);
      server.receive(out.first(n));
      session.on_sent(n);
      moved = true;
    }
    size_t offset = 0;
    while (offset < server.out.size() && !session.done() && !session.failed() && !session.must_reconnect()) {
      auto space = session.receive_space();
      size_t n = std::min({chunk, space.size(), server.out.size() - offset});
      std::memcpy(space.data(), server.out.data() + offset, n);
      session.on_received(n);
      offset += n;
      moved = true;
    }
    server.out.clear();
    if (!moved || session.done() || session.failed() || session.must_reconnect()) return;
  }
  FAIL() << "session did not settle";
}

// The connection breaks and a new one takes its place.
void reconnect(AgencySession& session, FakeServer& server) {
  server.drop_connection();
  session.restart_on_new_connection();
  pump(session, server);
}

std::vector<uint32_t> seqs(uint32_t first, uint32_t last) {
  std::vector<uint32_t> out;
  for (uint32_t s = first; s <= last; s++) out.push_back(s);
  return out;
}

SessionOptions options(size_t inflight = 4, size_t bets_max = 10) {
  SessionOptions o;
  o.agency = agency_id;
  o.producer_id = 77;
  o.batch_bets_max = bets_max;
  o.inflight_max = inflight;
  return o;
}

// What most tests start from: a source of `bets` bets, a listener, the
// session under test, and the fake server it talks to.
struct Rig {
  explicit Rig(size_t bets, const SessionOptions& o = options()) : source(bets), session(o, source, listener) {}
  VectorSource source;
  RecordingListener listener;
  AgencySession session;
  FakeServer server;
};

}  // namespace

TEST(AgencySession, FullSessionInOrder) {
  Rig rig(95);
  auto& [source, listener, session, server] = rig;
  server.winners = {"30904465", "21689196", "34407251", "11111111", "22222222"};
  pump(session, server);
  ASSERT_TRUE(session.done()) << session.failure().reason;
  EXPECT_EQ(server.batch_seqs, (std::vector<uint32_t>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}));
  EXPECT_EQ(server.batch_counts.back(), 5u);
  EXPECT_EQ(listener.acked_bets, 95u);
  EXPECT_EQ(listener.acked_documents.front(), source.document(0));
  EXPECT_EQ(listener.acked_documents.back(), source.document(94));
  EXPECT_EQ(server.finished_count, 1);
  EXPECT_EQ(listener.finished_sent, 95u);
  EXPECT_EQ(listener.finished_stored, 95u);
  EXPECT_EQ(server.winners_starts, (std::vector<uint32_t>{0, 2, 4}));
  EXPECT_EQ(listener.winners, server.winners);
  EXPECT_EQ(listener.winners_total, 5);
}

TEST(AgencySession, RepliesSplitAtEveryByte) {
  Rig rig(37, options(3, 4));
  auto& [source, listener, session, server] = rig;
  server.winners = {"1", "22", "333"};
  pump(session, server, 1);
  ASSERT_TRUE(session.done()) << session.failure().reason;
  EXPECT_EQ(listener.acked_bets, 37u);
  EXPECT_EQ(listener.winners.size(), 3u);
}

TEST(AgencySession, KeepsTheWindowFullWithoutWaitingForAcks) {
  Rig rig(100, options(4, 10));
  auto& [source, listener, session, server] = rig;
  server.hold_batch_acks = true;
  pump(session, server);
  // HELLO was acked; then exactly `inflight` batches went out with no ack back.
  EXPECT_EQ(server.batch_seqs.size(), 4u);
  EXPECT_EQ(server.held(), 4u);
  EXPECT_TRUE(session.pending_output().empty());
  server.release_acks();
  server.hold_batch_acks = false;
  pump(session, server);
  ASSERT_TRUE(session.done()) << session.failure().reason;
  EXPECT_EQ(server.batch_seqs.size(), 10u);
}

TEST(AgencySession, OutOfOrderAcksSlideTheWindow) {
  Rig rig(80, options(4, 10));
  auto& [source, listener, session, server] = rig;
  server.hold_batch_acks = true;
  server.reverse_acks = true;
  pump(session, server);
  for (int i = 0; i < 5 && !session.done(); i++) {
    server.release_acks();
    pump(session, server);
  }
  ASSERT_TRUE(session.done()) << session.failure().reason;
  EXPECT_EQ(listener.acked_seqs.front(), 4u);  // newest first
  EXPECT_EQ(listener.acked_bets, 80u);
}

TEST(AgencySession, RespectsTheByteBudget) {
  VectorSource source(200);
  RecordingListener listener;
  SessionOptions o = options(4, limits::batch_bets_max);
  o.batch_bytes_max = 512;
  AgencySession session(o, source, listener);
  FakeServer server;
  pump(session, server);
  ASSERT_TRUE(session.done()) << session.failure().reason;
  for (size_t bytes : server.batch_frame_bytes) EXPECT_LE(bytes, 512u);
  EXPECT_GT(server.batch_seqs.size(), 1u);
  EXPECT_EQ(server.producer_bets, 200u);
}

TEST(AgencySession, RejectionNamesTheBetAndItsLine) {
  Rig rig(50, options(4, 10));
  auto& [source, listener, session, server] = rig;
  server.reject_seq = 3;
  server.reject_index = 4;
  pump(session, server);
  ASSERT_TRUE(session.failed());
  const SessionFailure& f = session.failure();
  EXPECT_EQ(f.kind, FailureKind::rejected);
  EXPECT_EQ(f.seq, 3u);
  EXPECT_EQ(f.status, proto::Status::invalid_document);
  EXPECT_EQ(f.bet_index, 4);
  // Bet 3*10 - 10 + 4 = 24 of the source, on line 2*24 + 1.
  EXPECT_EQ(f.line, 49u);
  EXPECT_EQ(f.document, source.document(24));
  EXPECT_EQ(f.reason, "document is not allowed");
  EXPECT_EQ(server.finished_count, 0);
}

TEST(AgencySession, AlreadyFinishedAgencyOnlyAsksForWinners) {
  Rig rig(10);
  auto& [source, listener, session, server] = rig;
  server.agency_finished = true;
  server.winners = {"5"};
  pump(session, server);
  ASSERT_TRUE(session.done()) << session.failure().reason;
  EXPECT_TRUE(server.batch_seqs.empty());
  EXPECT_EQ(server.finished_count, 0);
  EXPECT_EQ(listener.winners, std::vector<std::string>{"5"});
}

TEST(AgencySession, SingleBetWithoutFinish) {
  VectorSource source(1);
  RecordingListener listener;
  SessionOptions o = options();
  o.mode = SessionMode::single_bet;
  o.finish = false;
  AgencySession session(o, source, listener);
  FakeServer server;
  pump(session, server);
  ASSERT_TRUE(session.done()) << session.failure().reason;
  EXPECT_EQ(listener.acked_bets, 1u);
  EXPECT_EQ(server.finished_count, 0);
  EXPECT_TRUE(server.winners_starts.empty());
}

TEST(AgencySession, NoBetsStillFinishesAndAsks) {
  Rig rig(0);
  auto& [source, listener, session, server] = rig;
  pump(session, server);
  ASSERT_TRUE(session.done()) << session.failure().reason;
  EXPECT_TRUE(server.batch_seqs.empty());
  EXPECT_EQ(server.finished_count, 1);
  EXPECT_EQ(listener.winners_total, 0);
}

TEST(AgencySession, AckWithTheWrongCountIsAProtocolError) {
  Rig rig(5);
  auto& [source, listener, session, server] = rig;
  server.ack_wrong_count = true;
  pump(session, server);
  ASSERT_TRUE(session.failed());
  EXPECT_EQ(session.failure().kind, FailureKind::protocol);
}

void receive_connection_error(AgencySession& session, proto::Status status, std::string_view reason) {
  std::vector<std::byte> buf(256);
  size_t n = proto::encode_error_reply(buf.data(), buf.size(), proto::connection_error_type, 0, status,
                                       proto::no_bet_index, reason);
  auto space = session.receive_space();
  std::memcpy(space.data(), buf.data(), n);
  session.on_received(n);
}

TEST(AgencySession, ConnectionErrorFrameIsARefusal) {
  Rig rig(5);
  auto& [source, listener, session, server] = rig;
  receive_connection_error(session, proto::Status::frame_too_large, "length over the limit");
  ASSERT_TRUE(session.failed());
  EXPECT_EQ(session.failure().kind, FailureKind::refused);
  EXPECT_EQ(session.failure().status, proto::Status::frame_too_large);
  EXPECT_EQ(session.failure().reason, "length over the limit");
}

// "Not now" refusals: the session asks for a new connection (after the
// reconnect loop's back-off) instead of failing the run.
TEST(AgencySession, TransientConnectionErrorsAskForANewConnection) {
  for (auto status : {proto::Status::too_many_connections, proto::Status::handshake_timeout,
                      proto::Status::idle_timeout}) {
    Rig rig(5);
    auto& [source, listener, session, server] = rig;
    receive_connection_error(session, status, "later");
    EXPECT_FALSE(session.failed()) << proto::status_name(status);
    EXPECT_TRUE(session.must_reconnect()) << proto::status_name(status);
    EXPECT_EQ(session.retry_status(), status);
  }
}

TEST(AgencySession, GarbageIsAProtocolError) {
  Rig rig(5);
  auto& [source, listener, session, server] = rig;
  auto space = session.receive_space();
  std::memset(space.data(), 0xAB, 32);
  session.on_received(32);
  ASSERT_TRUE(session.failed());
  EXPECT_EQ(session.failure().kind, FailureKind::protocol);
}

// ------------------------------------------------------------------ exactly once

TEST(AgencySessionExactlyOnce, ResumesAfterTheStoredPrefix) {
  Rig rig(95, options(4, 10));
  auto& [source, listener, session, server] = rig;
  // An earlier run got batches 1..3 (30 bets) stored, perhaps with another
  // batch size: only the bet count decides where the source resumes.
  server.stored_seq = 3;
  server.producer_bets = 30;
  pump(session, server);
  ASSERT_TRUE(session.done()) << session.failure().reason;
  EXPECT_EQ(listener.resumed_seq, 3u);
  EXPECT_EQ(listener.resumed_bets, 30u);
  ASSERT_FALSE(server.batch_seqs.empty());
  EXPECT_EQ(server.batch_seqs.front(), 4u);
  EXPECT_EQ(server.batch_first_documents.front(), source.document(30));
  EXPECT_EQ(server.stored_seqs, seqs(4, 10));
  EXPECT_EQ(server.duplicates, 0);
  EXPECT_EQ(listener.acked_bets, 65u);
  EXPECT_EQ(listener.acked_documents.front(), source.document(30));
  EXPECT_EQ(session.batches_acked(), 10u);
  // FINISHED counts the whole file, resumed bets included.
  EXPECT_EQ(listener.finished_sent, 95u);
  EXPECT_EQ(listener.finished_stored, 95u);
}

TEST(AgencySessionExactlyOnce, ResumeFailsWhenTheSourceIsShorterThanWhatIsStored) {
  Rig rig(25);
  auto& [source, listener, session, server] = rig;
  server.stored_seq = 3;
  server.producer_bets = 30;
  pump(session, server);
  ASSERT_TRUE(session.failed());
  EXPECT_EQ(session.failure().kind, FailureKind::input_mismatch);
  EXPECT_NE(session.failure().reason.find("changed"), std::string::npos) << session.failure().reason;
  EXPECT_TRUE(server.batch_seqs.empty());
}

TEST(AgencySessionExactlyOnce, SingleBetAlreadyStoredIsNotSentAgain) {
  VectorSource source(1);
  RecordingListener listener;
  SessionOptions o = options();
  o.mode = SessionMode::single_bet;
  o.finish = false;
  AgencySession session(o, source, listener);
  FakeServer server;
  server.stored_seq = 1;
  server.producer_bets = 1;
  pump(session, server);
  ASSERT_TRUE(session.done()) << session.failure().reason;
  EXPECT_EQ(listener.resumed_bets, 1u);
  EXPECT_TRUE(server.batch_seqs.empty());
}

TEST(AgencySessionExactlyOnce, DropMidWindowResendsOnlyWhatTheServerLacks) {
  Rig rig(100, options(4, 10));
  auto& [source, listener, session, server] = rig;
  server.hold_batch_acks = true;
  server.lose_from_seq = 3;  // the connection dies under batch 3
  pump(session, server);
  ASSERT_EQ(server.batch_seqs, seqs(1, 4));
  ASSERT_EQ(server.stored_seqs, seqs(1, 2));
  // Only batch 1's ack gets through; the window slides and batch 5 goes out
  // into the dying connection too.
  server.release_acks(1);
  pump(session, server);
  ASSERT_EQ(listener.acked_seqs, seqs(1, 1));
  ASSERT_EQ(server.batch_seqs, seqs(1, 5));
  EXPECT_EQ(session.batches_pending(), 4u);  // 2, 3, 4, 5

  // New connection: the server stores 1..2, so 2 is acknowledged by the HELLO
  // ack and 3, 4, 5 go out again, then the rest.
  server.hold_batch_acks = false;
  server.lose_from_seq = 0;
  size_t before = server.batch_seqs.size();
  reconnect(session, server);
  ASSERT_TRUE(session.done()) << session.failure().reason;
  EXPECT_EQ(server.hellos, 2);
  EXPECT_EQ(
      std::vector<uint32_t>(server.batch_seqs.begin() + static_cast<std::ptrdiff_t>(before), server.batch_seqs.end()),
      seqs(3, 10));
  EXPECT_EQ(server.stored_seqs, seqs(1, 10));
  EXPECT_EQ(server.duplicates, 0);
  EXPECT_EQ(listener.acked_seqs, seqs(1, 10));  // each once, 2 by the HELLO ack
  EXPECT_EQ(listener.acked_bets, 100u);
  EXPECT_EQ(session.batches_confirmed_by_hello(), 1u);
  ASSERT_EQ(listener.reconnects.size(), 1u);
  EXPECT_EQ(listener.reconnects[0], (std::pair<uint32_t, uint32_t>{1, 3}));
  EXPECT_EQ(listener.finished_sent, 100u);
  EXPECT_EQ(server.finished_count, 1);
}

TEST(AgencySessionExactlyOnce, DropAfterEveryBatchWasStoredResendsNothing) {
  Rig rig(40, options(4, 10));
  auto& [source, listener, session, server] = rig;
  server.hold_batch_acks = true;
  pump(session, server);
  ASSERT_EQ(server.stored_seqs, seqs(1, 4));
  server.hold_batch_acks = false;
  reconnect(session, server);
  ASSERT_TRUE(session.done()) << session.failure().reason;
  EXPECT_EQ(server.batch_seqs, seqs(1, 4));
  EXPECT_EQ(listener.acked_seqs, seqs(1, 4));
  EXPECT_EQ(session.batches_confirmed_by_hello(), 4u);
  EXPECT_EQ(server.finished_count, 1);
}

TEST(AgencySessionExactlyOnce, LostFinishedAckThenHelloSaysFinished) {
  Rig rig(25, options(4, 10));
  auto& [source, listener, session, server] = rig;
  server.winners = {"1", "22", "333"};
  server.lose_finished_reply = true;
  pump(session, server);
  ASSERT_FALSE(session.done());
  ASSERT_EQ(server.finished_count, 1);
  server.lose_finished_reply = false;
  reconnect(session, server);
  ASSERT_TRUE(session.done()) << session.failure().reason;
  EXPECT_EQ(server.finished_count, 1);       // not sent again
  EXPECT_EQ(server.batch_seqs, seqs(1, 3));  // nothing resent
  EXPECT_EQ(listener.finished_sent, 25u);
  EXPECT_EQ(listener.finished_stored, 25u);
  EXPECT_EQ(listener.winners, server.winners);
}

TEST(AgencySessionExactlyOnce, LostFinishedRequestIsSentAgain) {
  Rig rig(25, options(4, 10));
  auto& [source, listener, session, server] = rig;
  server.winners = {"1"};
  server.lose_finished_request = true;
  pump(session, server);
  ASSERT_EQ(server.finished_count, 0);
  server.lose_finished_request = false;
  reconnect(session, server);
  ASSERT_TRUE(session.done()) << session.failure().reason;
  EXPECT_EQ(server.finished_count, 1);
  EXPECT_EQ(server.batch_seqs, seqs(1, 3));
  EXPECT_EQ(listener.winners, server.winners);
}

TEST(AgencySessionExactlyOnce, DropWhileWaitingForWinnersAsksAgainFromTheSamePage) {
  Rig rig(5);
  auto& [source, listener, session, server] = rig;
  server.winners = {"1", "22", "333", "4444", "55555"};
  server.lose_winners_start = 2;
  pump(session, server);
  ASSERT_FALSE(session.done());
  server.lose_winners_start = UINT32_MAX;
  reconnect(session, server);
  ASSERT_TRUE(session.done()) << session.failure().reason;
  EXPECT_EQ(server.winners_starts, (std::vector<uint32_t>{0, 2, 2, 4}));
  EXPECT_EQ(listener.winners, server.winners);  // no page twice
  EXPECT_EQ(server.finished_count, 1);
}

TEST(AgencySessionExactlyOnce, ProducerBusyThenSuccess) {
  Rig rig(30);
  auto& [source, listener, session, server] = rig;
  server.busy_hellos = 2;
  pump(session, server);
  for (int i = 0; i < 2; i++) {
    ASSERT_TRUE(session.must_reconnect());
    EXPECT_EQ(session.retry_status(), proto::Status::producer_busy);
    EXPECT_FALSE(session.identified());
    EXPECT_TRUE(server.batch_seqs.empty());
    reconnect(session, server);
  }
  ASSERT_TRUE(session.done()) << session.failure().reason;
  EXPECT_EQ(server.hellos, 3);
  EXPECT_EQ(server.stored_seqs, seqs(1, 3));
  EXPECT_EQ(listener.acked_bets, 30u);
  // Every HELLO names the same producer.
  EXPECT_EQ(server.hello_producers, (std::vector<uint64_t>{77, 77, 77}));
  // The HELLO that finally got through reports a reconnect, with nothing to settle.
  EXPECT_EQ(listener.reconnects, (std::vector<std::pair<uint32_t, uint32_t>>{{0, 0}}));
}

TEST(AgencySessionExactlyOnce, SequenceGapIsAProtocolFailure) {
  Rig rig(50, options(4, 10));
  auto& [source, listener, session, server] = rig;
  server.force_gap_seq = 2;
  pump(session, server);
  ASSERT_TRUE(session.failed());
  const SessionFailure& f = session.failure();
  EXPECT_EQ(f.kind, FailureKind::protocol);
  EXPECT_EQ(f.status, proto::Status::sequence_gap);
  EXPECT_EQ(f.seq, 2u);
  EXPECT_NE(f.reason.find("disagree"), std::string::npos) << f.reason;
}

TEST(AgencySessionExactlyOnce, RejectionIsReportedNotTheGapsItCauses) {
  // Replies come newest first here, so the gaps for 3 and 4 arrive before
  // the rejection of 2 that caused them.
  Rig rig(100, options(4, 10));
  auto& [source, listener, session, server] = rig;
  server.hold_batch_acks = true;
  server.reverse_acks = true;
  server.reject_seq = 2;
  server.reject_index = 1;
  pump(session, server);
  ASSERT_EQ(server.held(), 4u);
  server.release_acks();
  pump(session, server);
  ASSERT_TRUE(session.failed());
  const SessionFailure& f = session.failure();
  EXPECT_EQ(f.kind, FailureKind::rejected);
  EXPECT_EQ(f.status, proto::Status::invalid_document);
  EXPECT_EQ(f.seq, 2u);
  EXPECT_EQ(f.document, source.document(11));
}

TEST(AgencySessionExactlyOnce, GapBehindAcksIsReportedOnceTheyArrive) {
  Rig rig(100, options(4, 10));
  auto& [source, listener, session, server] = rig;
  server.hold_batch_acks = true;
  server.reverse_acks = true;
  server.force_gap_seq = 3;
  pump(session, server);
  server.release_acks();
  pump(session, server);
  ASSERT_TRUE(session.failed());
  EXPECT_EQ(session.failure().status, proto::Status::sequence_gap);
  EXPECT_EQ(session.failure().seq, 3u);
  EXPECT_EQ(session.batches_acked(), 2u);
}

TEST(AgencySessionExactlyOnce, ServerThatForgotAcknowledgedBatchesIsAProtocolFailure) {
  Rig rig(100, options(4, 10));
  auto& [source, listener, session, server] = rig;
  server.lose_from_seq = 5;
  pump(session, server);
  ASSERT_EQ(session.batches_acked(), 4u);
  server.lose_from_seq = 0;
  server.stored_seq = 2;  // rolled back past acknowledged batches
  server.producer_bets = 20;
  reconnect(session, server);
  ASSERT_TRUE(session.failed());
  EXPECT_EQ(session.failure().kind, FailureKind::protocol);
  EXPECT_NE(session.failure().reason.find("acknowledged batches were lost"), std::string::npos)
      << session.failure().reason;
}

TEST(AgencySessionExactlyOnce, ShuttingDownAsksForANewConnection) {
  Rig rig(10);
  auto& [source, listener, session, server] = rig;
  std::vector<std::byte> buf(256);
  size_t n = proto::encode_error_reply(buf.data(), buf.size(), proto::connection_error_type, 0,
                                       proto::Status::shutting_down, proto::no_bet_index, "stopping");
  auto space = session.receive_space();
  std::memcpy(space.data(), buf.data(), n);
  session.on_received(n);
  ASSERT_FALSE(session.failed());
  EXPECT_TRUE(session.must_reconnect());
  EXPECT_EQ(session.retry_status(), proto::Status::shutting_down);
  EXPECT_TRUE(session.pending_output().empty());
  reconnect(session, server);
  ASSERT_TRUE(session.done()) << session.failure().reason;
  EXPECT_EQ(listener.acked_bets, 10u);
}

// ------------------------------------------------------------------ sockets

namespace {

// Serves one session on `fd` from a thread: reads requests, writes replies
// one byte at a time so the client sees every possible split.
void serve(int fd, FakeServer& server, bool close_after_hello) {
  std::vector<std::byte> buf(64 * 1024);
  bool hello_done = false;
  while (true) {
    ssize_t n = ::recv(fd, buf.data(), buf.size(), 0);
    if (n <= 0) break;
    server.receive(proto::Bytes(buf.data(), static_cast<size_t>(n)));
    if (close_after_hello && !server.out.empty()) hello_done = true;
    for (std::byte b : server.out)
      if (::send(fd, &b, 1, MSG_NOSIGNAL) != 1) return;
    server.out.clear();
    if (hello_done) break;
  }
  ::shutdown(fd, SHUT_RDWR);
}

// A connected pair: the client's end non-blocking (as the client makes its
// sockets), the fake server's end blocking (its thread just reads and writes).
std::pair<UniqueFd, UniqueFd> socket_pair() {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return {};
  UniqueFd client(sv[0]);
  int flags = ::fcntl(client.get(), F_GETFL);
  EXPECT_EQ(::fcntl(client.get(), F_SETFL, flags | O_NONBLOCK), 0);
  return {std::move(client), UniqueFd(sv[1])};
}

// A loopback TCP listener on an ephemeral port.
struct LoopbackListener {
  UniqueFd fd;
  uint16_t port = 0;
};

LoopbackListener listen_on_loopback() {
  LoopbackListener l;
  l.fd = UniqueFd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::bind(l.fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  EXPECT_EQ(::listen(l.fd.get(), 4), 0);
  socklen_t len = sizeof addr;
  EXPECT_EQ(::getsockname(l.fd.get(), reinterpret_cast<sockaddr*>(&addr), &len), 0);
  l.port = ntohs(addr.sin_port);
  return l;
}

// A port nothing listens on: bound, then closed.
uint16_t refused_port() {
  LoopbackListener l = listen_on_loopback();
  return l.port;  // the listener closes as `l` goes
}

}  // namespace

TEST(AgencySessionSocket, DrivesAWholeSession) {
  auto [client, server_fd] = socket_pair();
  FakeServer server;
  server.winners = {"30904465", "21689196", "34407251"};
  std::thread t([&] { serve(server_fd.get(), server, false); });

  VectorSource source(3000);
  RecordingListener listener;
  AgencySession session(options(16, 128), source, listener);
  std::atomic<bool> stop{false};
  RunOutcome outcome = drive_session(client.get(), session, WaitContext{&stop, nullptr});
  client.reset();
  t.join();
  ASSERT_EQ(outcome.result, RunResult::done) << outcome.error.message << session.failure().reason;
  EXPECT_EQ(listener.acked_bets, 3000u);
  EXPECT_EQ(listener.winners, server.winners);
}

TEST(AgencySessionSocket, ServerClosingMidSessionIsConnectionLost) {
  auto [client, server_fd] = socket_pair();
  FakeServer server;
  server.hold_batch_acks = true;
  std::thread t([&] { serve(server_fd.get(), server, true); });

  VectorSource source(100);
  RecordingListener listener;
  AgencySession session(options(), source, listener);
  std::atomic<bool> stop{false};
  RunOutcome outcome = drive_session(client.get(), session, WaitContext{&stop, nullptr});
  t.join();
  EXPECT_EQ(outcome.result, RunResult::connection_lost);
  EXPECT_FALSE(outcome.error.message.empty());
}

TEST(AgencySessionSocket, StopFlagEndsAWait) {
  auto [client, server_fd] = socket_pair();  // the server never answers
  Rig rig(1);
  auto& [source, listener, session, server] = rig;
  std::atomic<bool> stop{true};
  RunOutcome outcome = drive_session(client.get(), session, WaitContext{&stop, nullptr});
  EXPECT_EQ(outcome.result, RunResult::stopped);
}

TEST(ClientNet, BackoffDoublesUpToTheCap) {
  using std::chrono::milliseconds;
  RetryPolicy p{10, milliseconds(500), milliseconds(5000)};
  EXPECT_EQ(backoff_delay(p, 1), milliseconds(500));
  EXPECT_EQ(backoff_delay(p, 2), milliseconds(1000));
  EXPECT_EQ(backoff_delay(p, 4), milliseconds(4000));
  EXPECT_EQ(backoff_delay(p, 5), milliseconds(5000));
  EXPECT_EQ(backoff_delay(p, 50), milliseconds(5000));
  RetryPolicy big{3, milliseconds(8000), milliseconds(5000)};
  EXPECT_EQ(backoff_delay(big, 3), milliseconds(8000));
}

TEST(ClientNet, RetriesThenGivesUpOnARefusedPort) {
  uint16_t port = refused_port();

  std::vector<uint32_t> attempts;
  RetryPolicy p{3, std::chrono::milliseconds(1), std::chrono::milliseconds(5)};
  auto fd = connect_with_retry(
      HostPort{"127.0.0.1", port}, p, WaitContext{},
      [&](uint32_t attempt, const common::Error&, std::chrono::milliseconds) { attempts.push_back(attempt); });
  ASSERT_FALSE(fd.ok());
  EXPECT_EQ(fd.error().code, ECONNREFUSED);
  EXPECT_NE(fd.error().message.find("after 3 attempts"), std::string::npos) << fd.error().message;
  EXPECT_EQ(attempts, (std::vector<uint32_t>{1, 2}));
}

TEST(ClientNet, ConnectsToAListener) {
  LoopbackListener listener = listen_on_loopback();
  auto fd = connect_once(HostPort{"localhost", listener.port}, WaitContext{});
  ASSERT_TRUE(fd.ok()) << fd.error().message;
  EXPECT_TRUE(fd->valid());
}

// ------------------------------------------------------------------ reconnect loop

namespace {

struct RecordingObserver final : ConnectionObserver {
  void on_connected() override { connected++; }
  void on_connect_failed(uint32_t attempt, const common::Error&, std::chrono::milliseconds) override {
    connect_failures.push_back(attempt);
    if (stop_on_connect_failure) stop_on_connect_failure->store(true);
  }
  void on_reconnecting(uint32_t attempt, uint32_t pending, const common::Error& why) override {
    reconnect_attempts.push_back(attempt);
    reconnect_pending.push_back(pending);
    reconnect_errors.push_back(why.message);
  }
  int connected = 0;
  std::vector<uint32_t> connect_failures;
  std::vector<uint32_t> reconnect_attempts;
  std::vector<uint32_t> reconnect_pending;
  std::vector<std::string> reconnect_errors;
  std::atomic<bool>* stop_on_connect_failure = nullptr;
};

// Serves one connection until the client closes it or `cut_after_batches`
// batches have arrived; then the connection is closed under the client, with
// unread requests still queued (so the client sees a reset).
void serve_until(int fd, FakeServer& server, size_t cut_after_batches) {
  std::vector<std::byte> buf(64 * 1024);
  while (server.batch_seqs.size() < cut_after_batches) {
    ssize_t n = ::recv(fd, buf.data(), buf.size(), 0);
    if (n <= 0) return;
    server.receive(proto::Bytes(buf.data(), static_cast<size_t>(n)));
    size_t sent = 0;
    while (sent < server.out.size()) {
      ssize_t w = ::send(fd, server.out.data() + sent, server.out.size() - sent, MSG_NOSIGNAL);
      if (w <= 0) return;
      sent += static_cast<size_t>(w);
    }
    server.out.clear();
  }
}

}  // namespace

TEST(ReconnectLoop, CutConnectionIsReplacedAndOnlyUnstoredBatchesResent) {
  LoopbackListener listener = listen_on_loopback();
  FakeServer server;
  server.winners = {"30904465", "21689196"};
  std::thread t([&] {
    UniqueFd first(::accept(listener.fd.get(), nullptr, nullptr));
    serve_until(first.get(), server, 5);
    server.drop_connection();
    first.reset();
    UniqueFd second(::accept(listener.fd.get(), nullptr, nullptr));
    serve_until(second.get(), server, SIZE_MAX);
  });

  VectorSource source(3000);
  RecordingListener events;
  AgencySession session(options(16, 128), source, events);
  RecordingObserver observer;
  std::atomic<bool> stop{false};
  RetryPolicy policy{3, std::chrono::milliseconds(10), std::chrono::milliseconds(50)};
  RunOutcome out = run_session_with_reconnect(HostPort{"127.0.0.1", listener.port}, policy, session,
                                              WaitContext{&stop, nullptr}, observer);
  t.join();
  ASSERT_EQ(out.result, RunResult::done) << out.error.message << session.failure().reason;
  // 3000 bets in batches of 128: 24 batches, each stored exactly once
  // whatever the cut caught in flight.
  EXPECT_EQ(server.stored_seqs, seqs(1, 24));
  EXPECT_EQ(server.duplicates, 0);
  EXPECT_EQ(events.acked_seqs.size(), 24u);
  EXPECT_EQ(events.acked_bets, 3000u);
  EXPECT_EQ(events.winners, server.winners);
  EXPECT_EQ(observer.connected, 1);
  EXPECT_EQ(observer.reconnect_attempts, (std::vector<uint32_t>{1}));
  EXPECT_EQ(server.hellos, 2);
}

TEST(ReconnectLoop, ProducerBusyCountsAsAFailedAttempt) {
  LoopbackListener listener = listen_on_loopback();
  FakeServer server;
  server.busy_hellos = 1000;
  constexpr uint32_t attempts = 3;
  std::thread t([&] {
    for (uint32_t i = 0; i < attempts; i++) {
      UniqueFd c(::accept(listener.fd.get(), nullptr, nullptr));
      serve_until(c.get(), server, SIZE_MAX);  // until the client hangs up
    }
  });
  VectorSource source(10);
  RecordingListener events;
  AgencySession session(options(), source, events);
  RecordingObserver observer;
  RetryPolicy policy{attempts, std::chrono::milliseconds(1), std::chrono::milliseconds(5)};
  RunOutcome out =
      run_session_with_reconnect(HostPort{"127.0.0.1", listener.port}, policy, session, WaitContext{}, observer);
  t.join();
  EXPECT_EQ(out.result, RunResult::unreachable);
  EXPECT_TRUE(out.ever_connected);
  EXPECT_EQ(out.error.code, EBUSY);
  EXPECT_NE(out.error.message.find("producer_busy"), std::string::npos) << out.error.message;
  EXPECT_EQ(server.hellos, 3);
  EXPECT_TRUE(server.batch_seqs.empty());
  EXPECT_EQ(observer.reconnect_attempts, (std::vector<uint32_t>{2, 3}));
}

TEST(ReconnectLoop, GivesUpAfterTheAttempts) {
  uint16_t port = refused_port();
  VectorSource source(1);
  RecordingListener events;
  AgencySession session(options(), source, events);
  RecordingObserver observer;
  RetryPolicy policy{3, std::chrono::milliseconds(1), std::chrono::milliseconds(5)};
  RunOutcome out = run_session_with_reconnect(HostPort{"127.0.0.1", port}, policy, session, WaitContext{}, observer);
  EXPECT_EQ(out.result, RunResult::unreachable);
  EXPECT_FALSE(out.ever_connected);
  EXPECT_EQ(out.error.code, ECONNREFUSED);
  EXPECT_NE(out.error.message.find("after 3 attempts"), std::string::npos) << out.error.message;
  EXPECT_EQ(observer.connect_failures, (std::vector<uint32_t>{1, 2}));
}

TEST(ReconnectLoop, StopEndsTheBackoff) {
  uint16_t port = refused_port();
  VectorSource source(1);
  RecordingListener events;
  AgencySession session(options(), source, events);
  std::atomic<bool> stop{false};
  RecordingObserver observer;
  // The stop request lands while the loop is about to back off for a minute.
  observer.stop_on_connect_failure = &stop;
  RetryPolicy policy{10, std::chrono::milliseconds(60'000), std::chrono::milliseconds(60'000)};
  auto started = std::chrono::steady_clock::now();
  RunOutcome out =
      run_session_with_reconnect(HostPort{"127.0.0.1", port}, policy, session, WaitContext{&stop, nullptr}, observer);
  EXPECT_EQ(out.result, RunResult::stopped);
  EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::seconds(5));
}
