#include "client/net.hpp"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <openssl/err.h>
#include <unistd.h>

#include <cerrno>
#include <memory>
#include <string>

namespace lottery::client {
namespace {

using Clock = std::chrono::steady_clock;

common::Error stopped_error() {
  return common::Error::make(stopped_error_code, "stopped by a signal");
}

timespec to_timespec(std::chrono::milliseconds ms) {
  timespec ts{};
  ts.tv_sec = static_cast<time_t>(ms.count() / 1000);
  ts.tv_nsec = static_cast<long>((ms.count() % 1000) * 1'000'000);
  return ts;
}

std::chrono::milliseconds remaining(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return left.count() > 0 ? left : std::chrono::milliseconds(0);
}

enum class Wait : uint8_t { ready, timed_out, stopped, failed };

// Waits for `events` on fd (or, with fd < 0, just for the time) until the
// deadline, a stop request or an error.
Wait wait_until(int fd, short events, Clock::time_point deadline, const WaitContext& ctx, short& revents) {
  while (true) {
    if (ctx.stopped()) return Wait::stopped;
    auto left = remaining(deadline);
    timespec ts = to_timespec(left);
    pollfd p{fd, events, 0};
    int rc = ::ppoll(fd >= 0 ? &p : nullptr, fd >= 0 ? 1 : 0, &ts, ctx.wait_mask);
    if (rc < 0) {
      if (errno == EINTR) continue;  // a signal: the loop head checks the flag
      return Wait::failed;
    }
    if (rc > 0) {
      revents = p.revents;
      return Wait::ready;
    }
    if (left.count() == 0) return Wait::timed_out;
  }
}

std::string numeric_host(const sockaddr* addr, socklen_t len) {
  char host[NI_MAXHOST];
  if (::getnameinfo(addr, len, host, sizeof host, nullptr, 0, NI_NUMERICHOST) != 0) return "?";
  return host;
}

common::Result<UniqueFd> connect_address(const addrinfo& ai, const std::string& label, const WaitContext& ctx) {
  UniqueFd fd(::socket(ai.ai_family, ai.ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai.ai_protocol));
  if (!fd.valid()) return common::Error::from_errno(("socket for " + label).c_str());
  if (::connect(fd.get(), ai.ai_addr, ai.ai_addrlen) != 0) {
    if (errno != EINPROGRESS) return common::Error::from_errno(("connect " + label).c_str());
    short revents = 0;
    switch (wait_until(fd.get(), POLLOUT, Clock::now() + connect_timeout, ctx, revents)) {
      case Wait::ready:
        break;
      case Wait::stopped:
        return stopped_error();
      case Wait::timed_out:
        return common::Error::make(
            ETIMEDOUT, "connect " + label + ": no answer within " + std::to_string(connect_timeout.count()) + " ms");
      case Wait::failed:
        return common::Error::from_errno(("ppoll while connecting to " + label).c_str());
    }
    int err = 0;
    socklen_t len = sizeof err;
    if (::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len) != 0)
      return common::Error::from_errno(("getsockopt(SO_ERROR) " + label).c_str());
    if (err != 0) return common::Error::from_errno(("connect " + label).c_str(), err);
  }
  // Batches go out whole and back to back; Nagle would only hold the tail of
  // one back until the server's delayed ACK.
  int one = 1;
  if (::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0)
    return common::Error::from_errno(("setsockopt(TCP_NODELAY) " + label).c_str());
  return fd;
}

// Reads whatever the socket holds into the session. Errors only for a
// connection that is gone.
// The session has nothing more to read on this connection.
bool settled(const AgencySession& session) {
  return session.done() || session.failed() || session.must_reconnect();
}

// What the last SSL_read/SSL_write wants before it can go on.
short g_tls_wants = 0;

ssize_t recv_some(int fd, SSL* ssl, std::byte* p, size_t n) {
  if (ssl == nullptr) return ::recv(fd, p, n, MSG_DONTWAIT);
  return tls::read_some(ssl, p, n, &g_tls_wants);
}

ssize_t send_some(int fd, SSL* ssl, const std::byte* p, size_t n) {
  if (ssl == nullptr) return ::send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
  return tls::write_some(ssl, p, n, &g_tls_wants);
}

common::Status receive_available(int fd, AgencySession& session, SSL* ssl) {
  while (!settled(session)) {
    std::span<std::byte> space = session.receive_space();
    ssize_t n = recv_some(fd, ssl, space.data(), space.size());
    if (n > 0) {
      session.on_received(static_cast<size_t>(n));
      continue;
    }
    if (n == 0) return common::Error::make(ECONNRESET, "the server closed the connection");
    if (errno == EAGAIN || errno == EWOULDBLOCK) return common::ok_status();
    if (errno == EINTR) continue;
    return common::Error::from_errno("recv");
  }
  return common::ok_status();
}

common::Error come_back_reason(proto::Status status) {
  if (status == proto::Status::producer_busy)
    return common::Error::make(EBUSY,
                               "the server answered producer_busy: another connection holds this producer's stream "
                               "(another client on the same agency and data file, or our previous connection not "
                               "yet closed)");
  return common::Error::make(EAGAIN, std::string("the server answered ") + proto::status_name(status));
}

common::Error gave_up(const HostPort& server, uint32_t attempts, const common::Error& last) {
  if (last.code == EBUSY)
    return common::Error::make(last.code, "server " + server.host + ":" + std::to_string(server.port) +
                                              " kept this producer busy through " + std::to_string(attempts) +
                                              " attempts (" + last.message +
                                              "); stop the other client, or wait and run again");
  return common::Error::make(last.code, "server " + server.host + ":" + std::to_string(server.port) +
                                            " not reachable after " + std::to_string(attempts) + " attempts (last: " +
                                            last.message + "); check that the server is up and server.address");
}

common::Status send_pending(int fd, AgencySession& session, SSL* ssl) {
  while (true) {
    proto::Bytes out = session.pending_output();
    if (out.empty()) return common::ok_status();
    // MSG_NOSIGNAL: a closed peer is an error value here, not SIGPIPE.
    ssize_t n = send_some(fd, ssl, out.data(), out.size());
    if (n > 0) {
      session.on_sent(static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return common::ok_status();
    if (n < 0 && errno == EINTR) continue;
    return common::Error::from_errno("send");
  }
}

}  // namespace

UniqueFd& UniqueFd::operator=(UniqueFd&& other) noexcept {
  if (this != &other) {
    reset();
    _fd = other.release();
  }
  return *this;
}

int UniqueFd::release() {
  int fd = _fd;
  _fd = -1;
  return fd;
}

void UniqueFd::reset() {
  if (_fd >= 0) {
    // close(2) errors cannot be acted on for a socket; the descriptor is gone either way.
    ::close(_fd);
    _fd = -1;
  }
}

std::chrono::milliseconds backoff_delay(const RetryPolicy& policy, uint32_t failed_attempts) {
  auto cap = policy.cap > policy.base ? policy.cap : policy.base;
  auto delay = policy.base;
  for (uint32_t i = 1; i < failed_attempts && delay < cap; i++) delay *= 2;
  return delay < cap ? delay : cap;
}

bool sleep_unless_stopped(std::chrono::milliseconds delay, const WaitContext& ctx) {
  short revents = 0;
  Wait w = wait_until(-1, 0, Clock::now() + delay, ctx, revents);
  return w != Wait::stopped;
}

common::Result<UniqueFd> connect_once(const HostPort& server, const WaitContext& ctx) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_protocol = IPPROTO_TCP;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  std::string port = std::to_string(server.port);
  int rc = ::getaddrinfo(server.host.c_str(), port.c_str(), &hints, &found);
  if (rc != 0) {
    // getaddrinfo codes are negative, so they never collide with errno values.
    if (rc == EAI_SYSTEM) return common::Error::from_errno(("getaddrinfo " + server.host).c_str());
    return common::Error::make(rc, "getaddrinfo " + server.host + ": " + ::gai_strerror(rc));
  }
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> list(found, &::freeaddrinfo);
  common::Error last = common::Error::make(EHOSTUNREACH, "no address for " + server.host);
  for (const addrinfo* ai = list.get(); ai != nullptr; ai = ai->ai_next) {
    std::string label = server.host + ":" + port + " (" + numeric_host(ai->ai_addr, ai->ai_addrlen) + ")";
    auto fd = connect_address(*ai, label, ctx);
    if (fd.ok()) return std::move(fd.value());
    if (fd.error().code == stopped_error_code && ctx.stopped()) return fd.error();
    last = fd.error();
  }
  return last;
}

common::Result<UniqueFd> connect_with_retry(const HostPort& server, const RetryPolicy& policy, const WaitContext& ctx,
                                            const ConnectFailure& on_failure) {
  LOTTERY_ASSERT(policy.attempts >= 1);
  for (uint32_t attempt = 1;; attempt++) {
    if (ctx.stopped()) return stopped_error();
    auto fd = connect_once(server, ctx);
    if (fd.ok()) return fd;
    if (ctx.stopped()) return stopped_error();
    if (attempt >= policy.attempts) return gave_up(server, attempt, fd.error());
    auto delay = backoff_delay(policy, attempt);
    if (on_failure) on_failure(attempt, fd.error(), delay);
    if (!sleep_unless_stopped(delay, ctx)) return stopped_error();
  }
}

common::Status tls_handshake(int fd, SSL* ssl, const WaitContext& ctx, bool& refused) {
  refused = false;
  if (SSL_set_fd(ssl, fd) != 1) return common::Error::make(EIO, "SSL_set_fd: " + tls::drain_errors());
  auto deadline = Clock::now() + tls_handshake_timeout;
  while (true) {
    ERR_clear_error();
    errno = 0;
    int r = SSL_do_handshake(ssl);
    if (r == 1) return common::ok_status();
    short want = 0;
    switch (SSL_get_error(ssl, r)) {
      case SSL_ERROR_WANT_READ: want = POLLIN; break;
      case SSL_ERROR_WANT_WRITE: want = POLLOUT; break;
      case SSL_ERROR_SYSCALL:
        if (errno != 0) return common::Error::from_errno("TLS handshake");
        return common::Error::make(ECONNRESET,
                                   "TLS handshake: the server closed the connection (too many failed handshakes "
                                   "from this address, or the server is stopping)");
      default: {
        // OpenSSL 3 reports a bare EOF as an error of its own: the server
        // closed without a word (rate limited, stopping), not a refusal.
        if (ERR_GET_REASON(ERR_peek_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
          ERR_clear_error();
          return common::Error::make(ECONNRESET,
                                     "TLS handshake: the server closed the connection (too many failed handshakes "
                                     "from this address, or the server is stopping)");
        }
        // An alert from the server, or one we raise: the key is not accepted.
        refused = true;
        return common::Error::make(EACCES, "TLS handshake refused: " + tls::drain_errors() +
                                               " (is --tls-key this agency's current key?)");
      }
    }
    short revents = 0;
    switch (wait_until(fd, want, deadline, ctx, revents)) {
      case Wait::ready: break;
      case Wait::stopped: return stopped_error();
      case Wait::timed_out:
        return common::Error::make(ETIMEDOUT, "TLS handshake: no answer within " +
                                                  std::to_string(tls_handshake_timeout.count()) + " ms");
      case Wait::failed: return common::Error::from_errno("ppoll during the TLS handshake");
    }
  }
}

RunOutcome drive_session(int fd, AgencySession& session, const WaitContext& ctx, SSL* ssl) {
  while (true) {
    if (session.failed()) return {RunResult::session_failed, {}};
    if (session.done()) return {RunResult::done, {}};
    if (session.must_reconnect()) return {RunResult::come_back_later, come_back_reason(session.retry_status())};
    if (ctx.stopped()) return {RunResult::stopped, {}};
    pollfd p{fd, POLLIN, 0};
    if (!session.pending_output().empty()) p.events |= POLLOUT;
    // OpenSSL may need the socket the other way round (a write waiting for a read).
    if (ssl != nullptr) p.events |= g_tls_wants;
    // No timeout: the server holds the winners query until the draw, and
    // waiting for it is the point. A signal or the server ends the wait.
    int rc = ::ppoll(&p, 1, nullptr, ctx.wait_mask);
    if (rc < 0) {
      if (errno == EINTR) continue;
      return {RunResult::connection_lost, common::Error::from_errno("ppoll")};
    }
    if (p.revents & POLLNVAL) return {RunResult::connection_lost, common::Error::make(EBADF, "socket is not open")};
    // Replies first: a rejection the server sent just before closing explains
    // the close, so it must be read before the close is reported.
    if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
      if (auto st = receive_available(fd, session, ssl); !st.ok()) {
        if (settled(session)) continue;
        return {RunResult::connection_lost, st.error()};
      }
    }
    if (settled(session)) continue;
    if (p.revents & POLLOUT) {
      if (auto st = send_pending(fd, session, ssl); !st.ok()) {
        // The server may have said why before closing: read it if it is there.
        (void)receive_available(fd, session, ssl);
        if (settled(session)) continue;
        return {RunResult::connection_lost, st.error()};
      }
    }
  }
}

RunOutcome run_session_with_reconnect(const HostPort& server, const RetryPolicy& policy, AgencySession& session,
                                      const WaitContext& ctx, ConnectionObserver& observer, const TlsClient& tls) {
  LOTTERY_ASSERT(policy.attempts >= 1);
  bool connected = false;   // some attempt reached the server
  uint32_t failed = 0;      // attempts since the last HELLO ack that did not reach one
  uint32_t idle_drops = 0;  // identified connections in a row that dropped without progress
  common::Error why;        // what ended the previous attempt or connection
  while (true) {
    if (ctx.stopped()) return {RunResult::stopped, {}, connected};
    if (connected) observer.on_reconnecting(failed + 1, session.batches_pending(), why);
    auto fd = connect_once(server, ctx);
    if (fd.ok()) {
      if (connected) {
        session.restart_on_new_connection();
      } else {
        observer.on_connected();
        connected = true;
      }
      uint64_t progress_before = session.progress();
      tls::SslPtr ssl;
      RunOutcome out;
      bool handshake_done = true;
      if (tls.enabled()) {
        auto made = tls::make_client_ssl(tls.ctx, tls.key);
        if (!made) return {RunResult::tls_refused, made.error(), true};
        ssl = std::move(*made);
        bool refused = false;
        if (auto st = tls_handshake(fd->get(), ssl.get(), ctx, refused); !st) {
          if (refused) return {RunResult::tls_refused, st.error(), true};
          if (ctx.stopped()) return {RunResult::stopped, {}, true};
          out = {RunResult::connection_lost, st.error()};
          handshake_done = false;  // counted like a dropped connection below
        }
      }
      if (handshake_done) {
        g_tls_wants = 0;
        out = drive_session(fd->get(), session, ctx, ssl.get());
      }
      ssl.reset();
      fd->reset();
      if (out.result != RunResult::connection_lost && out.result != RunResult::come_back_later) {
        out.ever_connected = true;
        return out;
      }
      why = out.error;
      if (session.identified()) {
        failed = 0;
        idle_drops = session.progress() == progress_before ? idle_drops + 1 : 0;
        if (idle_drops == 0) continue;
        if (!sleep_unless_stopped(backoff_delay(policy, idle_drops), ctx)) return {RunResult::stopped, {}, true};
        continue;
      }
    } else {
      if (ctx.stopped()) return {RunResult::stopped, {}, connected};
      why = fd.error();
    }
    failed++;
    if (failed >= policy.attempts) return {RunResult::unreachable, gave_up(server, failed, why), connected};
    auto delay = backoff_delay(policy, failed);
    if (!connected) observer.on_connect_failed(failed, why, delay);
    if (!sleep_unless_stopped(delay, ctx)) return {RunResult::stopped, {}, connected};
  }
}

}  // namespace lottery::client
