// Acknowledgements held until a sync covers them (lottery/durable_acks), in
// one process over socketpairs: `always` syncs once per loop iteration for
// everything it committed; `group` syncs on its thread, a full group at once,
// and the window holds a group while the disk is idle; a graceful stop syncs
// and acknowledges what is held.
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

class DurableAcks : public ::testing::Test {
 protected:
  void SetUp() override { common::log::init(common::log::Level::off); }
  void TearDown() override {
    h.reset();
    common::log::init(common::log::Level::info);
  }

  void start(lottery::store::Durability durability, uint32_t window_ms, uint32_t group_batches) {
    lottery::ServiceOptions options;
    options.data_dir = dir.path() + "/data";
    options.agencies = 2;
    options.durability = durability;
    options.group_window_ms = window_ms;
    options.group_batches_max = group_batches;
    std::string error;
    h = ServiceHarness::create(options, reactor::BackendKind::epoll, &error);
    ASSERT_TRUE(h) << error;
  }

  static void send_all(int fd, const std::vector<std::byte>& bytes) {
    ASSERT_TRUE(testsupport::send_all(fd, bytes)) << std::strerror(errno);
  }
  static void append_hello(std::vector<std::byte>& out, uint32_t seq, uint16_t agency, uint64_t producer) {
    std::vector<std::byte> f(64);
    f.resize(proto::encode_hello(f.data(), f.size(), seq, agency, producer));
    out.insert(out.end(), f.begin(), f.end());
  }
  static void append_batch(std::vector<std::byte>& out, uint32_t seq, uint16_t agency) {
    std::vector<std::byte> f(lottery::limits::frame_bytes_max);
    proto::BatchBuilder b(f.data(), f.size(), agency, lottery::limits::batch_bets_max);
    for (int i = 0; i < 3; i++) EXPECT_TRUE(b.add(proto::Bet{"Ana", "Peña", "123", proto::Date{1990, 1, 2}, 7}));
    f.resize(b.finish(seq));
    out.insert(out.end(), f.begin(), f.end());
  }
  // Every reply that arrives within `ms` of loop steps.
  std::vector<testsupport::DecodedReply> replies_for(int fd, ReplyReader& r, uint64_t ms) {
    std::vector<testsupport::DecodedReply> got;
    uint64_t until = reactor::Reactor::now_ms() + ms;
    while (reactor::Reactor::now_ms() < until) {
      h->step(1);
      r.read(fd);
      while (auto rep = r.next()) got.push_back(*rep);
    }
    return got;
  }
  std::vector<testsupport::DecodedReply> replies_until(int fd, ReplyReader& r, size_t count) {
    std::vector<testsupport::DecodedReply> got;
    EXPECT_TRUE(h->run_until([&] {
      r.read(fd);
      while (auto rep = r.next()) got.push_back(*rep);
      return got.size() >= count || r.bad;
    }));
    return got;
  }
  uint64_t syncs() { return h->control().worker(0).syncs.load(); }

  testsupport::TempDir dir;
  std::unique_ptr<ServiceHarness> h;
};

constexpr size_t batches = 40;

TEST_F(DurableAcks, AlwaysSyncsOncePerIterationForEverythingItCommitted) {
  start(lottery::store::Durability::always, 0, 64);
  int fd = h->connect();
  std::vector<std::byte> bytes;
  append_hello(bytes, 1, 1, 77);
  for (uint32_t seq = 1; seq <= batches; seq++) append_batch(bytes, seq, 1);
  send_all(fd, bytes);  // one send: the loop reads it in one or a few iterations
  ReplyReader r;
  auto got = replies_until(fd, r, 1 + batches);
  ASSERT_EQ(got.size(), 1 + batches);
  for (size_t i = 1; i < got.size(); i++) {
    EXPECT_EQ(got[i].status, Status::ok);
    EXPECT_EQ(got[i].seq, i);  // in commit order
  }
  EXPECT_GE(syncs(), 1u);
  EXPECT_LE(syncs(), 4u) << "one sync per loop iteration, not per batch";
}

TEST_F(DurableAcks, GroupSyncsAFullGroupAtOnceAndAcksInOrder) {
  // A long window: only the group size (8) starts these syncs.
  start(lottery::store::Durability::group, 1000, 8);
  int fd = h->connect();
  std::vector<std::byte> bytes;
  append_hello(bytes, 1, 1, 78);
  for (uint32_t seq = 1; seq <= batches; seq++) append_batch(bytes, seq, 1);
  send_all(fd, bytes);
  ReplyReader r;
  auto got = replies_until(fd, r, 1 + batches);
  ASSERT_EQ(got.size(), 1 + batches);
  for (size_t i = 1; i < got.size(); i++) {
    EXPECT_EQ(got[i].status, Status::ok);
    EXPECT_EQ(got[i].seq, i);
  }
  // One sync per full group of 8 (more if the batches arrive over several
  // reads and a partial group goes when the previous sync completes).
  EXPECT_GE(syncs(), batches / 8);
  EXPECT_LE(syncs(), batches / 4);
}

TEST_F(DurableAcks, GroupWindowHoldsASmallGroupAndShutdownSyncsIt) {
  start(lottery::store::Durability::group, 1000, 64);
  int fd = h->connect();
  std::vector<std::byte> bytes;
  append_hello(bytes, 1, 1, 79);
  for (uint32_t seq = 1; seq <= 3; seq++) append_batch(bytes, seq, 1);
  send_all(fd, bytes);
  ReplyReader r;
  auto early = replies_for(fd, r, 100);
  ASSERT_EQ(early.size(), 1u) << "only the hello: the batches wait for the window";
  EXPECT_EQ(syncs(), 0u);
  // A graceful stop waits for nothing more: it syncs and acknowledges.
  h->service().begin_shutdown();
  auto got = replies_until(fd, r, 3);
  ASSERT_EQ(got.size(), 3u);
  for (size_t i = 0; i < got.size(); i++) {
    EXPECT_EQ(got[i].status, Status::ok);
    EXPECT_EQ(got[i].seq, i + 1);
  }
  EXPECT_EQ(syncs(), 1u);
}

TEST_F(DurableAcks, GroupWindowZeroSyncsAtTheEndOfTheIteration) {
  start(lottery::store::Durability::group, 0, 64);
  int fd = h->connect();
  std::vector<std::byte> bytes;
  append_hello(bytes, 1, 1, 80);
  append_batch(bytes, 1, 1);
  send_all(fd, bytes);
  ReplyReader r;
  auto got = replies_until(fd, r, 2);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[1].status, Status::ok);
  EXPECT_EQ(syncs(), 1u);
}

}  // namespace
