// Agency session: the state machine against an in-process fake server
// (pipelining, out-of-order acks, rejections, winners paging, frames split at
// every byte), then the socket driver over a socketpair.
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
  void on_hello_acked(const proto::HelloAck& ack) override { hello = ack; }
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
  std::vector<uint32_t> acked_seqs;
  uint64_t acked_bets = 0;
  std::vector<std::string> acked_documents;
  uint64_t finished_sent = 0;
  uint64_t finished_stored = 0;
  std::vector<std::string> winners;
  int64_t winners_total = -1;
};

// Speaks the server side of protocol v1 from bytes to bytes.
class FakeServer {
 public:
  std::vector<std::string> winners;
  uint32_t page_size = 2;
  bool hello_finished = false;
  bool hold_batch_acks = false;  // queue batch acks until release_acks()
  bool reverse_acks = false;     // release held acks newest first
  uint32_t reject_seq = 0;       // reject this batch ...
  uint16_t reject_index = 0;     // ... naming this bet
  bool ack_wrong_count = false;

  std::vector<uint32_t> batch_seqs;
  std::vector<uint16_t> batch_counts;
  std::vector<size_t> batch_frame_bytes;
  std::vector<uint32_t> winners_starts;
  int finished_count = 0;
  uint64_t bets = 0;

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

  void release_acks() {
    if (reverse_acks) {
      for (auto it = _held.rbegin(); it != _held.rend(); ++it) out.insert(out.end(), it->begin(), it->end());
    } else {
      for (const auto& f : _held) out.insert(out.end(), f.begin(), f.end());
    }
    _held.clear();
  }
  size_t held() const { return _held.size(); }

  std::vector<std::byte> out;

 private:
  void reply(size_t n, std::vector<std::byte>& buf) { out.insert(out.end(), buf.begin(), buf.begin() + n); }

  void handle(const proto::FrameHeader& h, proto::Bytes body) {
    std::vector<std::byte> buf(limits::frame_bytes_max);
    switch (static_cast<proto::MsgType>(h.type)) {
      case proto::MsgType::hello: {
        proto::HelloRequest req;
        ASSERT_TRUE(proto::decode_hello(body, req));
        EXPECT_EQ(req.agency, agency_id);
        proto::HelloAck ack;
        ack.agency = req.agency;
        ack.finished = hello_finished;
        reply(proto::encode_hello_ack(buf.data(), buf.size(), h.seq, ack), buf);
        return;
      }
      case proto::MsgType::batch: {
        proto::BatchInfo info;
        proto::ValidationContext ctx{agency_id, proto::Date{2024, 6, 1}};
        auto rejection = proto::validate_batch(body, ctx, info);
        ASSERT_FALSE(rejection.has_value()) << rejection->reason;
        batch_seqs.push_back(h.seq);
        batch_counts.push_back(info.count);
        batch_frame_bytes.push_back(h.length);
        if (h.seq == reject_seq) {
          reply(proto::encode_error_reply(buf.data(), buf.size(), h.type, h.seq, proto::Status::invalid_document,
                                          reject_index, "document is not allowed"),
                buf);
          return;
        }
        bets += info.count;
        size_t n = proto::encode_batch_ack(buf.data(), buf.size(), h.seq,
                                           static_cast<uint16_t>(info.count + (ack_wrong_count ? 1 : 0)));
        if (hold_batch_acks) {
          _held.emplace_back(buf.begin(), buf.begin() + n);
        } else {
          reply(n, buf);
        }
        return;
      }
      case proto::MsgType::finished:
        finished_count++;
        reply(proto::encode_finished_ack(buf.data(), buf.size(), h.seq, bets), buf);
        return;
      case proto::MsgType::winners: {
        uint16_t agency = 0;
        uint32_t start = 0;
        ASSERT_TRUE(proto::decode_winners_query(body, agency, start));
        winners_starts.push_back(start);
        proto::WinnersReplyBuilder b(buf.data(), buf.size(), static_cast<uint32_t>(winners.size()), start);
        for (uint32_t i = start; i < winners.size() && i < start + page_size; i++) EXPECT_TRUE(b.add(winners[i]));
        reply(b.finish(h.seq), buf);
        return;
      }
      default:
        FAIL() << "unexpected request type " << int{h.type};
    }
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
    while (offset < server.out.size() && !session.done() && !session.failed()) {
      auto space = session.receive_space();
      size_t n = std::min({chunk, space.size(), server.out.size() - offset});
      std::memcpy(space.data(), server.out.data() + offset, n);
      session.on_received(n);
      offset += n;
      moved = true;
    }
    server.out.clear();
    if (!moved || session.done() || session.failed()) return;
  }
  FAIL() << "session did not settle";
}

SessionOptions options(size_t inflight = 4, size_t bets_max = 10) {
  SessionOptions o;
  o.agency = agency_id;
  o.producer_id = 77;
  o.batch_bets_max = bets_max;
  o.inflight_max = inflight;
  return o;
}

}  // namespace

TEST(AgencySession, FullSessionInOrder) {
  VectorSource source(95);
  RecordingListener listener;
  AgencySession session(options(), source, listener);
  FakeServer server;
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
  VectorSource source(37);
  RecordingListener listener;
  AgencySession session(options(3, 4), source, listener);
  FakeServer server;
  server.winners = {"1", "22", "333"};
  pump(session, server, 1);
  ASSERT_TRUE(session.done()) << session.failure().reason;
  EXPECT_EQ(listener.acked_bets, 37u);
  EXPECT_EQ(listener.winners.size(), 3u);
}

TEST(AgencySession, KeepsTheWindowFullWithoutWaitingForAcks) {
  VectorSource source(100);
  RecordingListener listener;
  AgencySession session(options(4, 10), source, listener);
  FakeServer server;
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
  VectorSource source(80);
  RecordingListener listener;
  AgencySession session(options(4, 10), source, listener);
  FakeServer server;
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
  EXPECT_EQ(server.bets, 200u);
}

TEST(AgencySession, RejectionNamesTheBetAndItsLine) {
  VectorSource source(50);
  RecordingListener listener;
  AgencySession session(options(4, 10), source, listener);
  FakeServer server;
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
  VectorSource source(10);
  RecordingListener listener;
  AgencySession session(options(), source, listener);
  FakeServer server;
  server.hello_finished = true;
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
  VectorSource source(0);
  RecordingListener listener;
  AgencySession session(options(), source, listener);
  FakeServer server;
  pump(session, server);
  ASSERT_TRUE(session.done()) << session.failure().reason;
  EXPECT_TRUE(server.batch_seqs.empty());
  EXPECT_EQ(server.finished_count, 1);
  EXPECT_EQ(listener.winners_total, 0);
}

TEST(AgencySession, AckWithTheWrongCountIsAProtocolError) {
  VectorSource source(5);
  RecordingListener listener;
  AgencySession session(options(), source, listener);
  FakeServer server;
  server.ack_wrong_count = true;
  pump(session, server);
  ASSERT_TRUE(session.failed());
  EXPECT_EQ(session.failure().kind, FailureKind::protocol);
}

TEST(AgencySession, ConnectionErrorFrameIsARefusal) {
  VectorSource source(5);
  RecordingListener listener;
  AgencySession session(options(), source, listener);
  std::vector<std::byte> buf(256);
  size_t n = proto::encode_error_reply(buf.data(), buf.size(), proto::connection_error_type, 0,
                                       proto::Status::too_many_connections, proto::no_bet_index, "busy");
  auto space = session.receive_space();
  std::memcpy(space.data(), buf.data(), n);
  session.on_received(n);
  ASSERT_TRUE(session.failed());
  EXPECT_EQ(session.failure().kind, FailureKind::refused);
  EXPECT_EQ(session.failure().status, proto::Status::too_many_connections);
  EXPECT_EQ(session.failure().reason, "busy");
}

TEST(AgencySession, GarbageIsAProtocolError) {
  VectorSource source(5);
  RecordingListener listener;
  AgencySession session(options(), source, listener);
  auto space = session.receive_space();
  std::memset(space.data(), 0xAB, 32);
  session.on_received(32);
  ASSERT_TRUE(session.failed());
  EXPECT_EQ(session.failure().kind, FailureKind::protocol);
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

}  // namespace

TEST(AgencySessionSocket, DrivesAWholeSession) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
  UniqueFd client(sv[0]);
  UniqueFd server_fd(sv[1]);
  // The server thread uses blocking reads.
  int flags = ::fcntl(server_fd.get(), F_GETFL);
  ASSERT_EQ(::fcntl(server_fd.get(), F_SETFL, flags & ~O_NONBLOCK), 0);
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
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
  UniqueFd client(sv[0]);
  UniqueFd server_fd(sv[1]);
  int flags = ::fcntl(server_fd.get(), F_GETFL);
  ASSERT_EQ(::fcntl(server_fd.get(), F_SETFL, flags & ~O_NONBLOCK), 0);
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
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
  UniqueFd client(sv[0]);
  UniqueFd server_fd(sv[1]);  // never answers
  VectorSource source(1);
  RecordingListener listener;
  AgencySession session(options(), source, listener);
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
  // Bind a port, then close it: connecting there is refused.
  UniqueFd probe(::socket(AF_INET, SOCK_STREAM, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(probe.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  socklen_t len = sizeof addr;
  ASSERT_EQ(::getsockname(probe.get(), reinterpret_cast<sockaddr*>(&addr), &len), 0);
  uint16_t port = ntohs(addr.sin_port);
  probe.reset();

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
  UniqueFd listener(::socket(AF_INET, SOCK_STREAM, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(listener.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(::listen(listener.get(), 1), 0);
  socklen_t len = sizeof addr;
  ASSERT_EQ(::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&addr), &len), 0);
  auto fd = connect_once(HostPort{"localhost", ntohs(addr.sin_port)}, WaitContext{});
  ASSERT_TRUE(fd.ok()) << fd.error().message;
  EXPECT_TRUE(fd->valid());
}

TEST(ClientNet, ProducerIdsDiffer) {
  auto a = random_producer_id();
  auto b = random_producer_id();
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(b.ok());
  EXPECT_NE(a.value(), b.value());
}
