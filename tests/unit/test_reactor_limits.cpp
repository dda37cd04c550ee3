// The reactor's part in defending against hostile peers, on every backend:
// the refusal written when every slot is taken, abort() of a connection
// whose peer stopped reading (open or still flushing), the configurable
// output pause mark, input overflow, and adopting a connected socket.
// Single-threaded: the test drives the loop one short step at a time.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "reactor/net.hpp"
#include "reactor/reactor.hpp"
#include "tests/support/loop_driver.hpp"

using reactor::BackendKind;
using reactor::ConnId;

namespace {

// Answers every byte it is offered with `reply_per_byte` bytes (when there is
// room), or consumes nothing at all (hoard mode).
class Answerer final : public reactor::Handler {
 public:
  explicit Answerer(reactor::Reactor& r) : _r(r) {}
  void on_open(ConnId id) override {
    ids.push_back(id);
    opened++;
  }
  size_t on_data(ConnId id, std::span<const std::byte> data) override {
    offered += data.size();
    if (hoard) return 0;
    size_t used = 0;
    std::vector<std::byte> reply(reply_per_byte, std::byte{'r'});
    while (used < data.size() && _r.send_space(id) >= reply.size()) {
      if (!reply.empty()) {
        EXPECT_TRUE(_r.send(id, reply));
      }
      used++;
    }
    return used;
  }
  void on_close(ConnId, reactor::CloseReason reason) override {
    closed++;
    last_reason = reason;
  }

  size_t reply_per_byte = 0;
  bool hoard = false;
  size_t offered = 0;
  int opened = 0;
  int closed = 0;
  reactor::CloseReason last_reason = reactor::CloseReason::local;
  std::vector<ConnId> ids;

 private:
  reactor::Reactor& _r;
};

class ReactorLimits : public ::testing::TestWithParam<BackendKind> {
 protected:
  // Returns false (and the test skips) when the backend cannot run here.
  bool make(reactor::Options options) {
    auto r = reactor::Reactor::create(GetParam(), options);
    if (!r) {
      skip_reason = r.error().message;
      return false;
    }
    loop = std::move(*r);
    handler = std::make_unique<Answerer>(*loop);
    loop->set_handler(handler.get());
    return true;
  }
  void step(uint64_t ms = 2) { testsupport::step(*loop, ms); }
  template <typename Done>
  bool run_until(Done done, uint64_t timeout_ms = 5000) {
    return testsupport::run_until(*loop, done, timeout_ms, 2);
  }
  // A connected pair; the reactor serves one end, the test holds the other.
  int adopt_pair(int buffer_bytes = 0) {
    int fd = testsupport::adopt_socketpair(*loop, buffer_bytes);
    EXPECT_GE(fd, 0);
    mine.push_back(fd);
    return fd;
  }
  // Reads what is there; true once the peer closed (EOF or reset).
  static bool drain(int fd, std::string* into = nullptr) {
    char buf[65536];
    while (true) {
      ssize_t n = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
      if (n > 0) {
        if (into) into->append(buf, static_cast<size_t>(n));
        continue;
      }
      if (n == 0) return true;
      return errno != EAGAIN && errno != EWOULDBLOCK;
    }
  }
  // A loopback listener served by the loop, which answers connections it
  // cannot take with `refusal`. The port, or nothing when setting up failed.
  std::optional<uint16_t> listen_refusing_with(std::string_view refusal) {
    loop->set_refusal(std::as_bytes(std::span(refusal.data(), refusal.size())));
    auto listener = reactor::net::listen_tcp("127.0.0.1", 0, 16, reactor::net::ReusePort::no);
    if (!listener) return std::nullopt;
    auto port = reactor::net::local_port(*listener);
    if (!port || !loop->add_listener(*listener)) return std::nullopt;
    return *port;
  }
  void TearDown() override {
    for (int fd : mine) ::close(fd);
  }

  std::string skip_reason;
  std::unique_ptr<reactor::Reactor> loop;
  std::unique_ptr<Answerer> handler;
  std::vector<int> mine;
};

#define MAKE_OR_SKIP(options)                        \
  do {                                               \
    if (!make(options)) GTEST_SKIP() << skip_reason; \
  } while (0)

TEST_P(ReactorLimits, WhenEverySlotIsTakenTheRefusalIsWrittenThenTheSocketClosed) {
  MAKE_OR_SKIP((reactor::Options{.max_connections = 1}));
  auto port = listen_refusing_with("NO ROOM");
  ASSERT_TRUE(port);
  auto first = reactor::net::connect_tcp("127.0.0.1", *port);
  ASSERT_TRUE(first);
  mine.push_back(*first);
  ASSERT_TRUE(run_until([&] { return handler->opened == 1; }));
  auto second = reactor::net::connect_tcp("127.0.0.1", *port);
  ASSERT_TRUE(second);
  mine.push_back(*second);
  std::string got;
  ASSERT_TRUE(run_until([&] { return drain(*second, &got); }));
  EXPECT_EQ(got, "NO ROOM");
  EXPECT_EQ(loop->stats().refused_full, 1u);
  EXPECT_EQ(handler->opened, 1);
  // The one it holds is untouched.
  EXPECT_TRUE(loop->is_open(handler->ids[0]));
}

// Out of descriptors, a connection waiting in the backlog can be neither
// accepted nor ignored (the listener keeps reporting it). The loop refuses it
// with the spare descriptor: the peer gets the refusal, and the loop, rather
// than spinning on EMFILE, sleeps until something happens.
TEST_P(ReactorLimits, OutOfDescriptorsTheWaitingConnectionsAreRefusedNotSpunOn) {
  MAKE_OR_SKIP((reactor::Options{.max_connections = 16}));
  const char refusal[] = "NO FD";
  loop->set_refusal(std::as_bytes(std::span(refusal, sizeof refusal - 1)));
  // A neighbour that must not be disturbed. Serving it first also runs each
  // virtual call once, so UBSan's vptr check has them cached (checking
  // afresh takes a pipe, not to be had once out of descriptors).
  handler->reply_per_byte = 1;
  int neighbour = adopt_pair();
  ASSERT_EQ(::send(neighbour, "x", 1, 0), 1);
  ASSERT_TRUE(run_until([&] { return handler->offered == 1; }));
  // Everything that needs a descriptor is made before the limit drops: the
  // listener and the client sockets (connecting takes none).
  auto listener = reactor::net::listen_tcp("127.0.0.1", 0, 16, reactor::net::ReusePort::no);
  ASSERT_TRUE(listener);
  auto port = reactor::net::local_port(*listener);
  ASSERT_TRUE(port);
  constexpr int waiting = 3;
  int clients[waiting];
  for (int& c : clients) {
    c = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ASSERT_GE(c, 0);
    mine.push_back(c);
  }
  // The lowest free descriptor becomes the limit: no new one can be made.
  int probe = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  ASSERT_GE(probe, 0);
  ::close(probe);
  struct rlimit saved {};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &saved), 0);
  struct rlimit low = saved;
  low.rlim_cur = static_cast<rlim_t>(probe);
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &low), 0);
  // Listening starts under the low limit: io_uring's accept takes the limit
  // in force when it is armed.
  bool listening = static_cast<bool>(loop->add_listener(*listener));
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(*port);
  to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int connected = 0;
  for (int c : clients) connected += ::connect(c, reinterpret_cast<sockaddr*>(&to), sizeof to) == 0 ? 1 : 0;
  std::string got[waiting];
  int ended = 0;
  bool all = listening && connected == waiting && run_until([&] {
    ended = 0;
    for (int i = 0; i < waiting; i++) ended += drain(clients[i], &got[i]) ? 1 : 0;
    return ended == waiting;
  });
  // Many idle passes: a loop spinning on EMFILE would refuse nothing more
  // but never sleep; one that lost track of the listener would hang later.
  uint64_t refused = loop->stats().refused_no_fd;
  for (int i = 0; i < 20; i++) step(1);
  uint64_t refused_after_idle = loop->stats().refused_no_fd;
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &saved), 0);
  ASSERT_TRUE(all) << "listening " << listening << ", connected " << connected << ", " << ended << " of " << waiting
                   << " refused, opened " << handler->opened;
  for (const auto& g : got) EXPECT_EQ(g, "NO FD");
  EXPECT_EQ(refused, static_cast<uint64_t>(waiting));
  EXPECT_EQ(refused_after_idle, refused);
  EXPECT_EQ(handler->opened, 1);
  // The neighbour was served throughout.
  ASSERT_EQ(::send(neighbour, "y", 1, 0), 1);
  std::string echoed;
  ASSERT_TRUE(run_until([&] {
    drain(neighbour, &echoed);
    return echoed.size() == 2;
  }));
  // With descriptors back, connections are served again.
  auto next = reactor::net::connect_tcp("127.0.0.1", *port);
  ASSERT_TRUE(next);
  mine.push_back(*next);
  ASSERT_TRUE(run_until([&] { return handler->opened == 2; }));
}

TEST_P(ReactorLimits, AdoptedSocketIsServedLikeAnAcceptedOne) {
  MAKE_OR_SKIP((reactor::Options{.max_connections = 4}));
  handler->reply_per_byte = 2;
  int fd = adopt_pair();
  ASSERT_EQ(handler->opened, 1);
  ASSERT_EQ(::send(fd, "abc", 3, 0), 3);
  std::string got;
  ASSERT_TRUE(run_until([&] {
    drain(fd, &got);
    return got.size() == 6;
  }));
}

TEST_P(ReactorLimits, OutputPauseMarkIsAnOption) {
  MAKE_OR_SKIP((reactor::Options{.max_connections = 4, .output_pause_bytes = 1024}));
  handler->reply_per_byte = 100;
  int fd = adopt_pair(4096);
  // The peer asks and never reads: past 1 KiB of queued replies the loop
  // stops reading it, well before the 64 KiB default.
  std::vector<char> asks(64 * 1024, 'q');
  size_t sent = 0;
  for (int i = 0; i < 500; i++) {
    ssize_t n = ::send(fd, asks.data(), asks.size(), MSG_DONTWAIT);
    if (n > 0) sent += static_cast<size_t>(n);
    step(1);
  }
  ConnId id = handler->ids[0];
  EXPECT_GT(loop->queued_output(id), 1024u);
  EXPECT_LT(loop->queued_output(id), 1024u + 100u * 64 * 1024);
  size_t offered = handler->offered;
  for (int i = 0; i < 20; i++) step(1);
  EXPECT_EQ(handler->offered, offered) << "a paused connection is not read";
  EXPECT_LT(handler->offered, sent + 1);
  // Reading resumes once the peer takes its replies.
  std::string got;
  ASSERT_TRUE(run_until([&] {
    drain(fd, &got);
    return handler->offered > offered;
  }));
}

TEST_P(ReactorLimits, AbortDropsUnsentOutputOfAnOpenConnection) {
  MAKE_OR_SKIP((reactor::Options{.max_connections = 4}));
  handler->reply_per_byte = 1000;
  int fd = adopt_pair(4096);
  ASSERT_EQ(::send(fd, "xxxxxxxxxx", 10, 0), 10);
  ConnId id{};
  ASSERT_TRUE(run_until([&] {
    id = handler->ids[0];
    return loop->queued_output(id) > 0;
  }));
  loop->abort(id);
  EXPECT_FALSE(loop->is_open(id));
  EXPECT_EQ(handler->closed, 1);
  ASSERT_TRUE(run_until([&] { return loop->slots_in_use() == 0; }));
  ASSERT_TRUE(run_until([&] { return drain(fd); }));
  loop->abort(id);  // stale: ignored
  EXPECT_EQ(handler->closed, 1);
}

TEST_P(ReactorLimits, AbortEndsAConnectionStuckFlushingItsLastReplies) {
  MAKE_OR_SKIP((reactor::Options{.max_connections = 4}));
  handler->reply_per_byte = 1000;
  int fd = adopt_pair(4096);
  std::vector<char> asks(40, 'q');
  ASSERT_EQ(::send(fd, asks.data(), asks.size(), 0), 40);
  ConnId id{};
  ASSERT_TRUE(run_until([&] {
    id = handler->ids[0];
    return handler->offered >= 40 && loop->queued_output(id) > 0;
  }));
  // A graceful close waits for a peer that never reads...
  loop->close(id, reactor::Reactor::Flush::yes);
  for (int i = 0; i < 20; i++) step(1);
  EXPECT_EQ(loop->slots_in_use(), 1u);
  // ...until it is aborted.
  loop->abort(id);
  ASSERT_TRUE(run_until([&] { return loop->slots_in_use() == 0; }));
  EXPECT_EQ(handler->closed, 1);
  ASSERT_TRUE(run_until([&] { return drain(fd); }));
}

TEST_P(ReactorLimits, CloseWithoutFlushWhileASendIsInFlight) {
  MAKE_OR_SKIP((reactor::Options{.max_connections = 4}));
  handler->reply_per_byte = 3000;
  int fd = adopt_pair(4096);
  ASSERT_EQ(::send(fd, "qqqqq", 5, 0), 5);
  ConnId id{};
  // 15,000 bytes of replies go to the backend; the peer's small buffer keeps
  // that send in flight.
  ASSERT_TRUE(run_until([&] {
    id = handler->ids[0];
    return handler->offered >= 5 && loop->queued_output(id) > 0;
  }));
  for (int i = 0; i < 5; i++) step(1);
  // 15,000 more are queued behind it.
  ASSERT_EQ(::send(fd, "qqqqq", 5, 0), 5);
  ASSERT_TRUE(run_until([&] { return handler->offered >= 10; }));
  loop->close(id, reactor::Reactor::Flush::no);
  // The bytes handed to the backend arrive whole; the queued ones never do,
  // and the slot is released once the peer has taken what was in flight.
  std::string got;
  ASSERT_TRUE(run_until([&] {
    bool ended = drain(fd, &got);
    return ended && loop->slots_in_use() == 0;
  }));
  EXPECT_EQ(got.size(), 15000u);
}

TEST_P(ReactorLimits, InputOverflowClosesTheConnection) {
  MAKE_OR_SKIP((reactor::Options{.max_connections = 4}));
  handler->hoard = true;  // consumes nothing, never pauses: only the read buffer bounds it
  int fd = adopt_pair();
  std::vector<char> junk(16 * 1024, 'j');
  bool closed = false;
  for (int i = 0; i < 200 && !closed; i++) {
    (void)::send(fd, junk.data(), junk.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    step(1);
    closed = handler->closed == 1;
  }
  ASSERT_TRUE(closed);
  EXPECT_EQ(handler->last_reason, reactor::CloseReason::input_overflow);
  EXPECT_LE(handler->offered, 64u * reactor::limits::input_buffer_bytes);
}

INSTANTIATE_TEST_SUITE_P(Backends, ReactorLimits, ::testing::Values(BackendKind::epoll, BackendKind::uring),
                         [](const auto& param_info) {
                           return param_info.param == BackendKind::epoll ? "epoll" : "uring";
                         });

}  // namespace
