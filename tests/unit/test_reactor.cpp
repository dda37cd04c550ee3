// The reactor on real sockets, for every backend: echo, frames split at any
// byte, many connections, back-pressure, peers that vanish, graceful close.
// A backend the machine cannot run (io_uring blocked) is skipped, not failed.
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <random>
#include <thread>

#include "reactor/net.hpp"
#include "reactor/reactor.hpp"

using reactor::BackendKind;
using reactor::ConnId;

namespace {

// Echoes every byte, or (line mode) answers each complete '\n'-terminated line
// with "<length>\n", consuming only whole lines.
class TestHandler final : public reactor::Handler {
 public:
  explicit TestHandler(reactor::Reactor& r, bool line_mode) : _r(r), _line_mode(line_mode) {}
  void on_open(ConnId) override { opened++; }
  size_t on_data(ConnId id, std::span<const std::byte> data) override {
    if (!_line_mode) {
      size_t n = std::min(data.size(), _r.send_space(id));
      if (n > 0) {
        EXPECT_TRUE(_r.send(id, data.first(n)));
      }
      return n;
    }
    size_t used = 0;
    while (true) {
      const void* nl = std::memchr(data.data() + used, '\n', data.size() - used);
      if (nl == nullptr) break;
      size_t end = static_cast<size_t>(static_cast<const std::byte*>(nl) - data.data()) + 1;
      std::string reply = std::to_string(end - used - 1) + "\n";
      EXPECT_TRUE(_r.send(id, std::as_bytes(std::span(reply.data(), reply.size()))));
      used = end;
    }
    return used;
  }
  void on_close(ConnId, reactor::CloseReason) override { closed++; }

  std::atomic<int> opened{0};
  std::atomic<int> closed{0};

 private:
  reactor::Reactor& _r;
  bool _line_mode;
};

struct Server {
  std::unique_ptr<reactor::Reactor> loop;
  std::unique_ptr<TestHandler> handler;
  std::thread thread;
  uint16_t port = 0;
  std::atomic<bool> stop_requested{false};
  std::atomic<bool> close_all_requested{false};

  ~Server() { stop(); }
  void stop() {
    if (!thread.joinable()) return;
    stop_requested = true;
    loop->wake();
    thread.join();
  }
};

std::unique_ptr<Server> start_server(BackendKind kind, bool line_mode, std::string* skip_reason) {
  auto s = std::make_unique<Server>();
  auto r = reactor::Reactor::create(kind, reactor::Options{.max_connections = 1024});
  if (!r) {
    *skip_reason = r.error().message;
    return nullptr;
  }
  s->loop = std::move(*r);
  s->handler = std::make_unique<TestHandler>(*s->loop, line_mode);
  s->loop->set_handler(s->handler.get());
  auto fd = reactor::net::listen_tcp("127.0.0.1", 0, 1024, reactor::net::ReusePort::no);
  EXPECT_TRUE(fd.ok());
  s->port = *reactor::net::local_port(*fd);
  EXPECT_TRUE(s->loop->add_listener(*fd).ok());
  Server* raw = s.get();
  s->loop->set_wake_callback([raw] {
    if (raw->close_all_requested.exchange(false)) raw->loop->close_all(reactor::CloseReason::shutdown);
    if (raw->stop_requested) raw->loop->stop();
  });
  s->thread = std::thread([raw] { raw->loop->run(); });
  return s;
}

int connect_to(uint16_t port) {
  auto fd = reactor::net::connect_tcp("127.0.0.1", port);
  EXPECT_TRUE(fd.ok()) << (fd.ok() ? "" : fd.error().message);
  return fd.ok() ? *fd : -1;
}

void write_all(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    ssize_t w = ::send(fd, c, n, MSG_NOSIGNAL);
    ASSERT_GT(w, 0) << std::strerror(errno);
    c += w;
    n -= static_cast<size_t>(w);
  }
}

std::string read_exactly(int fd, size_t n) {
  std::string out;
  out.resize(n);
  size_t got = 0;
  while (got < n) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 10000) <= 0) break;  // a hang is a failure, not a stuck test
    ssize_t r = ::recv(fd, out.data() + got, n - got, 0);
    if (r <= 0) break;
    got += static_cast<size_t>(r);
  }
  out.resize(got);
  return out;
}

bool wait_for(const std::function<bool()>& cond) {
  for (int i = 0; i < 1000; i++) {
    if (cond()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return cond();
}

// GTEST_SKIP must run in the test body itself to end the test.
#define SKIP_IF_UNAVAILABLE()                                          \
  do {                                                                 \
    if (std::string why = unavailable_reason(); !why.empty()) GTEST_SKIP() << why; \
  } while (0)

class ReactorTest : public ::testing::TestWithParam<BackendKind> {
 protected:
  std::unique_ptr<Server> start(bool line_mode) {
    std::string why;
    auto s = start_server(GetParam(), line_mode, &why);
    if (!s) {
      if (GetParam() == BackendKind::uring) return nullptr;
      ADD_FAILURE() << why;
    }
    return s;
  }
  std::string unavailable_reason() {
    auto r = reactor::Reactor::create(GetParam(), reactor::Options{.max_connections = 4});
    return r ? std::string() : "backend unavailable on this machine: " + r.error().message;
  }
};

}  // namespace

TEST_P(ReactorTest, EchoesLargeStreamWithShortWritesAndReads) {
  SKIP_IF_UNAVAILABLE();
  auto s = start(false);
  ASSERT_TRUE(s);
  int fd = connect_to(s->port);
  std::string data(1 << 20, '\0');
  std::mt19937 rng(7);
  for (auto& c : data) c = static_cast<char>(rng());
  std::string echoed;
  // Interleave writes of random sizes with reads so neither side's buffers
  // fill up; the reactor sees short reads and may do short writes.
  size_t sent = 0;
  while (sent < data.size()) {
    size_t n = std::min<size_t>(1 + rng() % 7000, data.size() - sent);
    write_all(fd, data.data() + sent, n);
    sent += n;
    echoed += read_exactly(fd, n);
  }
  EXPECT_EQ(echoed.size(), data.size());
  EXPECT_TRUE(echoed == data);
  ::close(fd);
}

TEST_P(ReactorTest, FramesSplitAtEveryByte) {
  SKIP_IF_UNAVAILABLE();
  auto s = start(true);
  ASSERT_TRUE(s);
  int fd = connect_to(s->port);
  std::string lines = "hello\nlottery\n\nx\n";
  std::string want = "5\n7\n0\n1\n";
  for (int round = 0; round < 3; round++) {
    for (char c : lines) {
      write_all(fd, &c, 1);
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    EXPECT_EQ(read_exactly(fd, want.size()), want);
  }
  ::close(fd);
}

TEST_P(ReactorTest, ManyConnectionsAtOnce) {
  SKIP_IF_UNAVAILABLE();
  auto s = start(true);
  ASSERT_TRUE(s);
  constexpr int n = 300;
  std::vector<int> fds;
  for (int i = 0; i < n; i++) fds.push_back(connect_to(s->port));
  for (int i = 0; i < n; i++) {
    std::string line = std::string(static_cast<size_t>(i), 'a') + "\n";
    write_all(fds[static_cast<size_t>(i)], line.data(), line.size());
  }
  for (int i = 0; i < n; i++) {
    std::string want = std::to_string(i) + "\n";
    EXPECT_EQ(read_exactly(fds[static_cast<size_t>(i)], want.size()), want);
  }
  for (int fd : fds) ::close(fd);
  EXPECT_TRUE(wait_for([&] { return s->handler->closed.load() == n; }));
  EXPECT_TRUE(wait_for([&] { return s->loop->slots_in_use() == 0; }));
}

TEST_P(ReactorTest, PeerVanishingMidFrameIsClosedCleanly) {
  SKIP_IF_UNAVAILABLE();
  auto s = start(true);
  ASSERT_TRUE(s);
  for (int i = 0; i < 50; i++) {
    int fd = connect_to(s->port);
    write_all(fd, "partial line without end", 24);
    if (i % 2) {
      // RST instead of FIN.
      linger lg{1, 0};
      ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    ::close(fd);
  }
  EXPECT_TRUE(wait_for([&] { return s->handler->closed.load() == 50; }));
  EXPECT_TRUE(wait_for([&] { return s->loop->slots_in_use() == 0; }));
  // Still serving.
  int fd = connect_to(s->port);
  write_all(fd, "ok\n", 3);
  EXPECT_EQ(read_exactly(fd, 2), "2\n");
  ::close(fd);
}

TEST_P(ReactorTest, SlowReaderGetsBackPressureNotLoss) {
  SKIP_IF_UNAVAILABLE();
  auto s = start(false);
  ASSERT_TRUE(s);
  int fd = connect_to(s->port);
  // Send far more than every buffer in between can hold, from another
  // thread, while this one does not read at first.
  std::string data(8 << 20, '\0');
  for (size_t i = 0; i < data.size(); i++) data[i] = static_cast<char>(i * 31 + 7);
  std::thread writer([&] { write_all(fd, data.data(), data.size()); });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  std::string echoed = read_exactly(fd, data.size());
  writer.join();
  EXPECT_EQ(echoed.size(), data.size());
  EXPECT_TRUE(echoed == data);
  ::close(fd);
}

TEST_P(ReactorTest, CloseAllFlushesThenCloses) {
  SKIP_IF_UNAVAILABLE();
  auto s = start(true);
  ASSERT_TRUE(s);
  int fd = connect_to(s->port);
  write_all(fd, "abc\n", 4);
  EXPECT_EQ(read_exactly(fd, 2), "3\n");
  s->close_all_requested = true;
  s->loop->wake();
  char b;
  pollfd p{fd, POLLIN, 0};
  ASSERT_EQ(::poll(&p, 1, 5000), 1);
  EXPECT_EQ(::recv(fd, &b, 1, 0), 0);  // orderly EOF
  ::close(fd);
  EXPECT_TRUE(wait_for([&] { return s->loop->slots_in_use() == 0; }));
}

TEST_P(ReactorTest, TimersFireInOrder) {
  SKIP_IF_UNAVAILABLE();
  auto r = reactor::Reactor::create(GetParam(), reactor::Options{.max_connections = 4});
  ASSERT_TRUE(r.ok());
  std::vector<int> order;
  (*r)->add_timer(30, [&] { order.push_back(3); });
  (*r)->add_timer(10, [&] { order.push_back(1); });
  auto cancelled = (*r)->add_timer(20, [&] { order.push_back(99); });
  (*r)->add_timer(20, [&] { order.push_back(2); });
  (*r)->cancel_timer(cancelled);
  (*r)->add_timer(40, [&] { (*r)->stop(); });
  (*r)->run();
  EXPECT_EQ(order, (std::vector<int>{1, 2, 3}));
}

INSTANTIATE_TEST_SUITE_P(Backends, ReactorTest, ::testing::Values(BackendKind::epoll, BackendKind::uring),
                         [](const ::testing::TestParamInfo<BackendKind>& param_info) {
                           return param_info.param == BackendKind::epoll ? "epoll" : "uring";
                         });
