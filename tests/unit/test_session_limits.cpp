// The lottery service against hostile peers (docs/SECURITY.md), one worker in
// process over socketpairs: connection caps, the pre-hello budget, the
// handshake and idle deadlines, the pending-reply cap (paused, then dropped)
// and the configurable frame and batch limits.
#include <gtest/gtest.h>
#include <sys/socket.h>

#include <cstring>
#include <string>
#include <vector>

#include "common/log.hpp"
#include "test_support.hpp"
#include "tests/support/service_harness.hpp"

namespace proto = lottery::proto;
using proto::Status;
using testsupport::ReplyReader;
using testsupport::ServiceHarness;

namespace {

class SessionLimits : public ::testing::Test {
 protected:
  void SetUp() override { common::log::init(common::log::Level::off); }
  void TearDown() override {
    h.reset();
    common::log::init(common::log::Level::info);
  }

  void start(lottery::ServiceOptions options) {
    options.data_dir = dir.path() + "/data";
    options.agencies = 2;
    std::string error;
    h = ServiceHarness::create(options, reactor::BackendKind::epoll, &error);
    ASSERT_TRUE(h) << error;
  }

  static void send_all(int fd, const std::vector<std::byte>& bytes) {
    ASSERT_TRUE(testsupport::send_all(fd, bytes)) << std::strerror(errno);
  }
  static std::vector<std::byte> hello(uint32_t seq, uint16_t agency, uint64_t producer) {
    std::vector<std::byte> f(64);
    f.resize(proto::encode_hello(f.data(), f.size(), seq, agency, producer));
    return f;
  }
  static std::vector<std::byte> winners(uint32_t seq, uint16_t agency) {
    std::vector<std::byte> f(64);
    f.resize(proto::encode_winners_query(f.data(), f.size(), seq, agency, 0));
    return f;
  }
  static std::vector<std::byte> batch(uint32_t seq, uint16_t agency, size_t bets) {
    std::vector<std::byte> f(lottery::limits::frame_bytes_max);
    proto::BatchBuilder b(f.data(), f.size(), agency, lottery::limits::batch_bets_max);
    for (size_t i = 0; i < bets; i++) EXPECT_TRUE(b.add(proto::Bet{"Ana", "Paz", "123", proto::Date{1990, 1, 2}, 7}));
    f.resize(b.finish(seq));
    return f;
  }
  // The next reply on `fd`, waiting for it.
  testsupport::DecodedReply reply(int fd, ReplyReader& r) {
    std::optional<testsupport::DecodedReply> got;
    EXPECT_TRUE(h->run_until([&] {
      r.read(fd);
      got = r.next();
      return got.has_value() || r.bad;
    }));
    EXPECT_FALSE(r.bad);
    return got.value_or(testsupport::DecodedReply{});
  }
  bool closed_by_server(int fd, ReplyReader& r) {
    return h->run_until([&] { return r.read(fd); });
  }

  testsupport::TempDir dir;
  std::unique_ptr<ServiceHarness> h;
};

TEST_F(SessionLimits, PerWorkerCapRefusesWithAnErrorFrameAndKeepsTheOthers) {
  lottery::ServiceOptions o;
  o.connections_max = 2;
  start(o);
  int a = h->connect(), b = h->connect(), c = h->connect();
  ReplyReader ra, rb, rc;
  auto refused = reply(c, rc);
  EXPECT_EQ(refused.type, proto::connection_error_type);
  EXPECT_EQ(refused.status, Status::too_many_connections);
  EXPECT_TRUE(closed_by_server(c, rc));
  send_all(a, hello(1, 1, 10));
  send_all(b, hello(1, 2, 11));
  EXPECT_EQ(reply(a, ra).status, Status::ok);
  EXPECT_EQ(reply(b, rb).status, Status::ok);
  EXPECT_EQ(h->service().counters().refused, 1u);
  EXPECT_EQ(h->control().worker(0).connections_open.load(), 2u);
  EXPECT_EQ(h->control().worker(0).connections_refused.load(), 1u);
  // A place frees up when one leaves.
  ::shutdown(a, SHUT_WR);
  EXPECT_TRUE(closed_by_server(a, ra));
  int d = h->connect();
  ReplyReader rd;
  send_all(d, hello(1, 1, 12));
  EXPECT_EQ(reply(d, rd).status, Status::ok);
}

TEST_F(SessionLimits, TotalCapCountsEveryWorkersConnections) {
  lottery::ServiceOptions o;
  o.connections_total_max = 6;
  start(o);
  // Other workers hold five between them.
  h->control().worker(3).connections_open.store(2);
  h->control().worker(7).connections_open.store(3);
  int a = h->connect(), b = h->connect();
  ReplyReader ra, rb;
  send_all(a, hello(1, 1, 10));
  EXPECT_EQ(reply(a, ra).status, Status::ok);
  auto refused = reply(b, rb);
  EXPECT_EQ(refused.status, Status::too_many_connections);
  EXPECT_TRUE(closed_by_server(b, rb));
  EXPECT_EQ(h->control().worker(0).connections_open.load(), 1u);
  h->control().worker(3).connections_open.store(0);
  h->control().worker(7).connections_open.store(0);
}

TEST_F(SessionLimits, ThePreHelloBudgetIsJudgedFromTheLengthPrefix) {
  lottery::ServiceOptions o;
  o.unidentified_bytes_max = 100;
  start(o);
  int a = h->connect();
  ReplyReader ra;
  // Small requests before hello are refused but the connection stays...
  send_all(a, winners(1, 1));
  EXPECT_EQ(reply(a, ra).status, Status::not_identified);
  send_all(a, winners(2, 1));
  EXPECT_EQ(reply(a, ra).status, Status::not_identified);
  // ...until the bytes add up past the budget: only the header of this one
  // is sent, and that is enough to refuse it.
  auto big = batch(3, 1, 10);
  ASSERT_GT(big.size(), 100u);
  send_all(a, std::vector<std::byte>(big.begin(), big.begin() + 16));
  auto r = reply(a, ra);
  EXPECT_EQ(r.type, proto::connection_error_type);
  EXPECT_EQ(r.status, Status::not_identified);
  EXPECT_TRUE(closed_by_server(a, ra));
  // After a successful hello the budget no longer applies.
  int b = h->connect();
  ReplyReader rb;
  send_all(b, hello(1, 1, 20));
  EXPECT_EQ(reply(b, rb).status, Status::ok);
  send_all(b, batch(1, 1, 10));
  EXPECT_EQ(reply(b, rb).status, Status::ok);
}

TEST_F(SessionLimits, HandshakeDeadlineClosesAConnectionThatNeverSaysHello) {
  lottery::ServiceOptions o;
  o.handshake_timeout_ms = 60;
  o.sweep_interval_ms = 10;
  start(o);
  int a = h->connect();
  ReplyReader ra;
  auto half = hello(1, 1, 10);
  send_all(a, std::vector<std::byte>(half.begin(), half.begin() + 5));
  uint64_t t0 = reactor::Reactor::now_ms();
  auto r = reply(a, ra);
  EXPECT_GE(reactor::Reactor::now_ms() - t0, 50u);
  EXPECT_EQ(r.type, proto::connection_error_type);
  EXPECT_EQ(r.status, Status::handshake_timeout);
  EXPECT_TRUE(closed_by_server(a, ra));
  EXPECT_EQ(h->service().counters().handshake_timeouts, 1u);
}

TEST_F(SessionLimits, IdleTimeoutSparesAConnectionWhoseWinnersQueryIsHeld) {
  lottery::ServiceOptions o;
  o.idle_timeout_ms = 80;
  o.sweep_interval_ms = 10;
  start(o);
  int idle = h->connect(), waiting = h->connect();
  ReplyReader ri, rw;
  send_all(idle, hello(1, 1, 10));
  send_all(waiting, hello(1, 2, 11));
  EXPECT_EQ(reply(idle, ri).status, Status::ok);
  EXPECT_EQ(reply(waiting, rw).status, Status::ok);
  send_all(waiting, winners(2, 2));  // held: the draw has not run
  // A batch that crawls in never completes a request: still idle.
  auto b = batch(1, 1, 3);
  send_all(idle, std::vector<std::byte>(b.begin(), b.begin() + 20));
  auto r = reply(idle, ri);
  EXPECT_EQ(r.status, Status::idle_timeout);
  EXPECT_TRUE(closed_by_server(idle, ri));
  for (int i = 0; i < 20; i++) h->step(10);
  EXPECT_FALSE(rw.read(waiting)) << "a held winners query is not idleness";
  EXPECT_EQ(h->service().counters().idle_timeouts, 1u);
}

TEST_F(SessionLimits, AClientThatNeverReadsIsPausedAtTheCapThenDropped) {
  lottery::ServiceOptions o;
  o.pending_reply_bytes_max = 2048;
  o.reply_stall_timeout_ms = 100;
  o.sweep_interval_ms = 10;
  start(o);
  int a = h->connect(4096);
  ReplyReader ra;
  send_all(a, hello(1, 1, 10));
  EXPECT_EQ(reply(a, ra).status, Status::ok);
  send_all(a, winners(2, 1));  // held; every later query is refused with not_ready
  auto q = winners(3, 1);
  std::vector<std::byte> many;
  for (int i = 0; i < 64; i++) many.insert(many.end(), q.begin(), q.end());
  reactor::ConnId id{0, 0};
  size_t peak = 0;
  bool dropped = false;
  for (int i = 0; i < 2000 && !dropped; i++) {
    (void)::send(a, many.data(), many.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    h->step(1);
    // Slot 0, generation 0: the only connection.
    peak = std::max(peak, h->loop().queued_output(id));
    dropped = h->service().counters().stalled == 1;
  }
  ASSERT_TRUE(dropped);
  // Paused at the cap: never more than the cap plus one reply queued.
  EXPECT_GT(peak, 2048u);
  EXPECT_LE(peak, 2048u + lottery::limits::frame_bytes_max);
  EXPECT_EQ(h->control().worker(0).connections_dropped.load(), 1u);
  EXPECT_TRUE(h->run_until([&] { return h->loop().slots_in_use() == 0; }));
}

TEST_F(SessionLimits, FrameAndBatchLimitsAreSettable) {
  lottery::ServiceOptions o;
  o.frame_bytes_max = 1024;
  o.batch_bets_max = 3;
  start(o);
  int a = h->connect();
  ReplyReader ra;
  send_all(a, hello(1, 1, 10));
  EXPECT_EQ(reply(a, ra).status, Status::ok);
  send_all(a, batch(1, 1, 4));
  auto r = reply(a, ra);
  EXPECT_EQ(r.status, Status::too_many_bets);
  send_all(a, batch(1, 1, 3));
  EXPECT_EQ(reply(a, ra).status, Status::ok);
  // A frame over 1 KiB is refused from its prefix.
  auto big = batch(2, 1, 60);
  ASSERT_GT(big.size(), 1024u);
  send_all(a, std::vector<std::byte>(big.begin(), big.begin() + 4));
  r = reply(a, ra);
  EXPECT_EQ(r.type, proto::connection_error_type);
  EXPECT_EQ(r.status, Status::frame_too_large);
  EXPECT_TRUE(closed_by_server(a, ra));
}

TEST_F(SessionLimits, ALingeringCloseIsCutOffAfterTheStallTimeout) {
  lottery::ServiceOptions o;
  o.reply_stall_timeout_ms = 60;
  o.sweep_interval_ms = 10;
  o.pending_reply_bytes_max = lottery::limits::pending_reply_bytes_default;
  start(o);
  int a = h->connect(4096);
  ReplyReader ra;
  send_all(a, hello(1, 1, 10));
  EXPECT_EQ(reply(a, ra).status, Status::ok);
  send_all(a, winners(2, 1));
  // Replies pile up unread (below the pause mark), then a framing error
  // closes the connection "after its replies are out", which never happens.
  auto q = winners(3, 1);
  for (int i = 0; i < 200; i++) {
    (void)::send(a, q.data(), q.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    h->step(0);
  }
  std::vector<std::byte> bad(16, std::byte{0});
  bad[0] = std::byte{3};  // length 3
  (void)::send(a, bad.data(), bad.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
  EXPECT_TRUE(h->run_until([&] { return h->loop().connection_count() == 0; }));
  // Closing, its output stuck; the sweep aborts it.
  EXPECT_TRUE(h->run_until([&] { return h->loop().slots_in_use() == 0; }, 2000));
}

}  // namespace
