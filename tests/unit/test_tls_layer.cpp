// The TLS layer between a reactor (epoll and io_uring) and a handler, over
// socketpairs the reactor adopts, with an OpenSSL client on the other end,
// all in one thread: the test steps the loop and the client in turn.
#include <gtest/gtest.h>
#include <openssl/err.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "reactor/reactor.hpp"
#include "tests/support/loop_driver.hpp"
#include "tests/unit/test_support.hpp"
#include "tls/failure_limiter.hpp"
#include "tls/keys.hpp"
#include "tls/layer.hpp"
#include "tls/psk.hpp"

namespace {

using reactor::BackendKind;
using reactor::ConnId;

// Echoes every byte back through the Link, and remembers who the link said
// the peer is. Consumes at most `take` bytes a call, to exercise leftovers.
class EchoHandler final : public reactor::Handler {
 public:
  explicit EchoHandler(reactor::Link& link) : _link(link) {}
  void on_open(ConnId) override { opened++; }
  size_t on_data(ConnId id, std::span<const std::byte> data) override {
    data_calls++;
    identity = _link.peer_identity(id);
    size_t n = std::min({data.size(), take, _link.send_space(id)});
    if (n == 0) return 0;
    std::byte* out = _link.reserve_send(id, n);
    EXPECT_NE(out, nullptr);
    std::memcpy(out, data.data(), n);
    _link.commit_send(id, n);
    return n;
  }
  void on_close(ConnId, reactor::CloseReason) override { closed++; }

  int opened = 0;
  int closed = 0;
  int data_calls = 0;
  uint32_t identity = 0;
  size_t take = SIZE_MAX;

 private:
  reactor::Link& _link;
};

tls::Key key_of(uint8_t fill) {
  tls::Key k{};
  k.fill(fill);
  return k;
}

class TlsLayerTest : public ::testing::TestWithParam<BackendKind> {
 protected:
  void SetUp() override {
    // OpenSSL writes to the client socket with write(2): a server that closed
    // it must be an error value, not SIGPIPE.
    ::signal(SIGPIPE, SIG_IGN);
    auto r = reactor::Reactor::create(GetParam(), reactor::Options{.max_connections = 8});
    if (!r) GTEST_SKIP() << "backend unavailable on this machine: " << r.error().message;
    _loop = std::move(*r);
    tls::KeyRing keys;
    keys.set(1, key_of(0x11));
    keys.set(2, key_of(0x22));
    auto layer = tls::TlsLayer::create(*_loop, 8, keys, tls::LayerOptions{.failure_burst = 3, .failure_refill_ms = 60000});
    ASSERT_TRUE(layer.ok()) << layer.error().message;
    _layer = std::move(*layer);
    _echo = std::make_unique<EchoHandler>(*_layer);
    _layer->set_inner(_echo.get());
    static const char refusal[] = "PLAINTEXT-REFUSED";
    _layer->set_plaintext_refusal(std::as_bytes(std::span(refusal, sizeof refusal - 1)));
    _loop->set_handler(_layer.get());
    auto ctx = tls::make_context(tls::Side::client);
    ASSERT_TRUE(ctx.ok());
    _client_ctx = std::move(*ctx);
  }
  void TearDown() override {
    for (int fd : _fds) ::close(fd);
  }

  void step() { testsupport::step(*_loop); }

  int connect() {
    int fd = testsupport::adopt_socketpair(*_loop);
    EXPECT_GE(fd, 0);
    _fds.push_back(fd);
    return fd;
  }

  // Handshakes as `identity` with `key`; true when it completes.
  bool handshake(int fd, tls::SslPtr& ssl, tls::ClientKey& ck, uint32_t identity, const tls::Key& key) {
    ck.identity = identity;
    ck.key = key;
    ck.identity_text = tls::identity_text(identity);
    auto made = tls::make_client_ssl(_client_ctx.get(), &ck);
    EXPECT_TRUE(made.ok());
    ssl = std::move(*made);
    SSL_set_fd(ssl.get(), fd);
    for (int i = 0; i < 2000; i++) {
      ERR_clear_error();
      int r = SSL_do_handshake(ssl.get());
      if (r == 1) return true;
      int e = SSL_get_error(ssl.get(), r);
      if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) return false;
      step();
    }
    return false;
  }

  // Writes everything and reads back `want` bytes, stepping the loop.
  std::string echo(SSL* ssl, const std::string& payload) {
    size_t sent = 0;
    std::string got;
    char buf[16384];
    for (int i = 0; i < 20000 && got.size() < payload.size(); i++) {
      if (sent < payload.size()) {
        int w = SSL_write(ssl, payload.data() + sent, static_cast<int>(std::min<size_t>(payload.size() - sent, 8192)));
        if (w > 0) sent += static_cast<size_t>(w);
      }
      step();
      while (true) {
        int r = SSL_read(ssl, buf, sizeof buf);
        if (r <= 0) break;
        got.append(buf, static_cast<size_t>(r));
      }
    }
    return got;
  }

  std::unique_ptr<reactor::Reactor> _loop;
  std::unique_ptr<tls::TlsLayer> _layer;
  std::unique_ptr<EchoHandler> _echo;
  tls::CtxPtr _client_ctx;
  std::vector<int> _fds;
};

TEST_P(TlsLayerTest, TheRightKeyProvesTheIdentityAndBytesRoundTrip) {
  int fd = connect();
  tls::SslPtr ssl;
  tls::ClientKey ck;
  ASSERT_TRUE(handshake(fd, ssl, ck, 2, key_of(0x22)));
  EXPECT_EQ(_echo->opened, 1);
  // 300 KiB: many records, more than the plaintext buffer, the BIO pair and
  // the reactor's output hold at once; the handler takes 1000 bytes a call.
  _echo->take = 1000;
  std::string payload;
  for (size_t i = 0; i < 300 * 1024; i++) payload.push_back(static_cast<char>('a' + i % 26));
  EXPECT_EQ(echo(ssl.get(), payload), payload);
  EXPECT_EQ(_echo->identity, 2u);
  EXPECT_EQ(_layer->stats().handshakes_ok, 1u);
  EXPECT_EQ(_layer->stats().handshakes_failed, 0u);
}

TEST_P(TlsLayerTest, AWrongKeyAndAnUnknownIdentityFailAlikeAndNeverReachTheHandler) {
  for (uint32_t id : {1u, 7u}) {
    int fd = connect();
    tls::SslPtr ssl;
    tls::ClientKey ck;
    EXPECT_FALSE(handshake(fd, ssl, ck, id, key_of(0x33)));
    for (int i = 0; i < 20; i++) step();
  }
  EXPECT_EQ(_echo->opened, 2);  // deadlines and caps count from the TCP connect
  EXPECT_EQ(_echo->closed, 2);
  EXPECT_EQ(_echo->data_calls, 0);
  EXPECT_EQ(_layer->stats().handshakes_failed, 2u);
  EXPECT_EQ(_loop->connection_count(), 0u);
}

TEST_P(TlsLayerTest, PlaintextGetsTheRefusalInClearAndIsClosed) {
  int fd = connect();
  ASSERT_EQ(::send(fd, "\x1c\x00\x00\x00", 4, 0), 4);
  std::string got;
  char buf[256];
  bool closed = false;
  for (int i = 0; i < 200 && !closed; i++) {
    step();
    ssize_t n;
    while ((n = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT)) > 0) got.append(buf, static_cast<size_t>(n));
    if (n == 0) closed = true;
  }
  EXPECT_EQ(got, "PLAINTEXT-REFUSED");
  EXPECT_TRUE(closed);
  EXPECT_EQ(_echo->data_calls, 0);
  EXPECT_EQ(_layer->stats().plaintext_refused, 1u);
}

TEST_P(TlsLayerTest, ReplacedKeysApplyToNewHandshakesOnly) {
  int fd = connect();
  tls::SslPtr old_ssl;
  tls::ClientKey old_ck;
  ASSERT_TRUE(handshake(fd, old_ssl, old_ck, 1, key_of(0x11)));
  tls::KeyRing rotated;
  rotated.set(1, key_of(0x44));
  _layer->replace_keys(rotated);
  // The established connection goes on.
  EXPECT_EQ(echo(old_ssl.get(), "still here"), "still here");
  tls::SslPtr ssl;
  tls::ClientKey ck;
  EXPECT_FALSE(handshake(connect(), ssl, ck, 1, key_of(0x11)));
  EXPECT_TRUE(handshake(connect(), ssl, ck, 1, key_of(0x44)));
}

TEST_P(TlsLayerTest, AnAddressOverItsFailuresIsClosedWithoutAHandshake) {
  for (int i = 0; i < 3; i++) {
    tls::SslPtr ssl;
    tls::ClientKey ck;
    EXPECT_FALSE(handshake(connect(), ssl, ck, 1, key_of(0x99)));
  }
  tls::SslPtr ssl;
  tls::ClientKey ck;
  EXPECT_FALSE(handshake(connect(), ssl, ck, 1, key_of(0x11)));  // the right key, too late
  EXPECT_EQ(_layer->stats().rate_limited, 1u);
  EXPECT_EQ(_layer->stats().handshakes_failed, 3u);
  EXPECT_EQ(_echo->opened, 3);  // the refused one never reached the handler
}

INSTANTIATE_TEST_SUITE_P(Backends, TlsLayerTest, ::testing::Values(BackendKind::epoll, BackendKind::uring),
                         [](const auto& p) { return p.param == BackendKind::epoll ? "epoll" : "uring"; });

TEST(FailureLimiter, AllowsTheBurstThenOnePerRefill) {
  tls::FailureLimiter limiter(2, 1000);
  tls::PeerAddress a;
  a.bytes[15] = 1;
  tls::PeerAddress b;
  b.bytes[15] = 2;
  EXPECT_TRUE(limiter.allowed(a, 0));
  limiter.record_failure(a, 0);
  EXPECT_TRUE(limiter.allowed(a, 0));
  limiter.record_failure(a, 0);
  EXPECT_FALSE(limiter.allowed(a, 10));
  EXPECT_TRUE(limiter.allowed(b, 10));  // per address
  EXPECT_FALSE(limiter.allowed(a, 999));
  EXPECT_TRUE(limiter.allowed(a, 1000));
  limiter.record_failure(a, 1000);
  EXPECT_FALSE(limiter.allowed(a, 1500));
}

TEST(FailureLimiter, ManyAddressesNeverGrowTheTable) {
  tls::FailureLimiter limiter(1, 1000);
  for (uint32_t i = 0; i < 10 * tls::limits::failure_table_slots; i++) {
    tls::PeerAddress a;
    std::memcpy(a.bytes.data() + 12, &i, 4);
    limiter.record_failure(a, 5);
    EXPECT_FALSE(limiter.allowed(a, 5));
  }
}

TEST(KeyRing, ParsesTheFileFormatAndNamesTheBadLine) {
  std::string hex(64, 'a');
  auto ok = tls::KeyRing::parse("# comment\n\n3 " + hex + "\r\n1\t" + std::string(64, 'B') + "\n", "t");
  ASSERT_TRUE(ok.ok()) << ok.error().message;
  EXPECT_EQ(ok->size(), 2u);
  ASSERT_NE(ok->find(3), nullptr);
  EXPECT_EQ((*ok->find(3))[0], 0xaa);
  EXPECT_EQ((*ok->find(1))[31], 0xbb);
  EXPECT_EQ(ok->find(2), nullptr);
  for (auto [text, line] : std::vector<std::pair<std::string, std::string>>{
           {"1 " + hex + "\n2 abc\n", "line 2"},
           {"0 " + hex + "\n", "line 1"},
           {"1 " + hex + "\n1 " + hex + "\n", "line 2"},
           {"x " + hex + "\n", "line 1"},
           {"1 " + std::string(63, 'a') + "g\n", "line 1"},
           {"1\n", "line 1"}}) {
    auto bad = tls::KeyRing::parse(text, "t");
    ASSERT_FALSE(bad.ok()) << text;
    EXPECT_NE(bad.error().message.find(line), std::string::npos) << bad.error().message;
  }
}

TEST(KeyDir, InitWritesPrivateFilesAndRotateChangesOneAgency) {
  testsupport::TempDir tmp;
  std::string dir = tmp.path() + "/keys";
  ASSERT_TRUE(tls::init_key_dir(dir, 3, false).ok());
  struct stat st {};
  ASSERT_EQ(::stat(dir.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  auto server = tls::KeyRing::load(dir + "/server.keys");
  ASSERT_TRUE(server.ok());
  ASSERT_EQ(server->size(), 3u);
  for (uint32_t a = 1; a <= 3; a++) {
    std::string path = dir + "/" + tls::agency_key_file_name(a);
    ASSERT_EQ(::stat(path.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u) << path;
    auto own = tls::load_client_key(path);
    ASSERT_TRUE(own.ok());
    EXPECT_EQ(own->identity, a);
    EXPECT_EQ(own->key, *server->find(a));  // the agency's file and the server's line agree
  }
  EXPECT_NE(*server->find(1), *server->find(2));
  EXPECT_FALSE(tls::init_key_dir(dir, 3, false).ok());  // never silently replaces every key
  ASSERT_TRUE(tls::rotate_key(dir, 2).ok());
  auto rotated = tls::KeyRing::load(dir + "/server.keys");
  ASSERT_TRUE(rotated.ok());
  EXPECT_EQ(*rotated->find(1), *server->find(1));
  EXPECT_NE(*rotated->find(2), *server->find(2));
  EXPECT_EQ(*rotated->find(3), *server->find(3));
  EXPECT_EQ(tls::load_client_key(dir + "/agency-2.key")->key, *rotated->find(2));
}

}  // namespace
