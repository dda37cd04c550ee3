// The client's sockets: resolve and connect with a bounded backoff, then move
// bytes between a socket and an AgencySession with ppoll() until the session
// ends, fails, the connection drops or a stop signal arrives. A dropped
// connection is replaced (same backoff) and the session resumes on the new
// one (see AgencySession::restart_on_new_connection).
//
// Signals: the caller blocks SIGTERM/SIGINT and passes the mask to wait with
// (the same mask, signals unblocked). ppoll() swaps it in atomically, so a
// signal that lands between "check the stop flag" and "sleep" still wakes the
// sleep with EINTR instead of being noticed only at the next event.
#pragma once

#include <signal.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>

#include "client/agency_session.hpp"
#include "client/client_config.hpp"
#include "common/result.hpp"
#include "tls/psk.hpp"

namespace lottery::client {

// A connect that neither completes nor fails within this time (a silently
// dropped SYN) counts as a failed attempt.
inline constexpr std::chrono::milliseconds connect_timeout{5000};
// Error code of any wait cut short by the stop flag.
inline constexpr int stopped_error_code = EINTR;

// Owns a file descriptor; closes it once.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : _fd(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : _fd(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const { return _fd; }
  bool valid() const { return _fd >= 0; }
  int release();
  void reset();

 private:
  int _fd = -1;
};

// How every wait notices a stop request.
struct WaitContext {
  const std::atomic<bool>* stop = nullptr;  // set by the signal handler
  const sigset_t* wait_mask = nullptr;      // signal mask while waiting; nullptr keeps the current one
  bool stopped() const { return stop != nullptr && stop->load(std::memory_order_relaxed); }
};

struct RetryPolicy {
  uint32_t attempts = default_loop_amount;
  std::chrono::milliseconds base = default_loop_period;
  std::chrono::milliseconds cap = loop_backoff_cap;
};

// Delay after the `failed_attempts`-th failure: base, 2*base, 4*base, ...
// capped at max(cap, base).
std::chrono::milliseconds backoff_delay(const RetryPolicy& policy, uint32_t failed_attempts);

// Sleeps, waking early on a stop; false when stopped.
bool sleep_unless_stopped(std::chrono::milliseconds delay, const WaitContext& ctx);

// One attempt: resolves the host (every attempt, since a container name may
// appear in DNS only once its container starts) and tries each address.
// The socket comes back non-blocking, with TCP_NODELAY.
common::Result<UniqueFd> connect_once(const HostPort& server, const WaitContext& ctx);

using ConnectFailure =
    std::function<void(uint32_t attempt, const common::Error& error, std::chrono::milliseconds retry_in)>;

// Up to policy.attempts attempts, backing off between them; `on_failure` is
// told of each failed attempt that will be retried. A stop request returns an
// error with code stopped_error_code.
common::Result<UniqueFd> connect_with_retry(const HostPort& server, const RetryPolicy& policy, const WaitContext& ctx,
                                            const ConnectFailure& on_failure);

// TLS for the client's connections (docs/SECURITY.md): the context and the
// agency's key. A default-constructed one means plaintext.
struct TlsClient {
  SSL_CTX* ctx = nullptr;
  const tls::ClientKey* key = nullptr;
  bool enabled() const { return ctx != nullptr; }
};
// How long a TLS handshake may take once the TCP connection is up.
inline constexpr std::chrono::milliseconds tls_handshake_timeout{10000};

// Runs the client side of a TLS handshake over a connected non-blocking
// socket. `refused` is set when the server answered with an alert (a wrong
// key, an unknown agency, no key): retrying would not help.
common::Status tls_handshake(int fd, SSL* ssl, const WaitContext& ctx, bool& refused);

enum class RunResult : uint8_t {
  done,             // the session completed
  session_failed,   // see session.failure()
  stopped,          // the stop flag was set
  connection_lost,  // drive_session only: see RunOutcome::error
  come_back_later,  // drive_session only: the server said producer_busy or shutting_down
  unreachable,      // run_session_with_reconnect only: every attempt failed, see RunOutcome::error
  tls_refused,      // the server refused our TLS key (see RunOutcome::error); retrying would not help
};

struct RunOutcome {
  RunResult result = RunResult::done;
  common::Error error;
  bool ever_connected = false;  // run_session_with_reconnect: some attempt reached the server
};

// Drives the session over a connected non-blocking socket. Never busy-waits:
// with nothing to send it sleeps in ppoll() until the server answers.
// With `ssl` (handshake done) the bytes go through TLS.
RunOutcome drive_session(int fd, AgencySession& session, const WaitContext& ctx, SSL* ssl = nullptr);

// What run_session_with_reconnect reports, for the log.
class ConnectionObserver {
 public:
  virtual ~ConnectionObserver() = default;
  // The first connection is up (HELLO not yet sent).
  virtual void on_connected() {}
  // An attempt at the first connection failed; the next one follows in `retry_in`.
  virtual void on_connect_failed(uint32_t /*attempt*/, const common::Error& /*error*/,
                                 std::chrono::milliseconds /*retry_in*/) {}
  // About to try attempt `attempt` at replacing a lost connection; `why`
  // ended the previous connection or attempt.
  virtual void on_reconnecting(uint32_t /*attempt*/, uint32_t /*pending_batches*/, const common::Error& /*why*/) {}
};

// Connects, drives the session and, whenever the connection drops (EOF,
// ECONNRESET, EPIPE, ...) or the server says producer_busy or shutting_down,
// connects again and resumes the session. Attempts that end before a HELLO
// ack count against policy.attempts, backing off as connect_with_retry does;
// a HELLO ack starts the count over. After a connection that made progress
// the next attempt is immediate; after one that dropped with none, it backs
// off too, so a server that drops every connection is not hammered.
// Returns done, session_failed, stopped or unreachable.
// With `tls` enabled every connection starts with a handshake; a refused one
// ends the run with tls_refused.
RunOutcome run_session_with_reconnect(const HostPort& server, const RetryPolicy& policy, AgencySession& session,
                                      const WaitContext& ctx, ConnectionObserver& observer,
                                      const TlsClient& tls = TlsClient{});

}  // namespace lottery::client
