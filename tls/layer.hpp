// TLS between the reactor and a protocol handler. To the reactor it is the
// Handler: it takes ciphertext in on_data and writes ciphertext with the
// reactor's send calls. To the protocol it is the Link (and calls its
// Handler): the protocol sees decrypted bytes and its replies are encrypted
// on the way out. OpenSSL runs over a BIO pair per connection, in memory, so
// it never touches a socket and never blocks the loop; the reactor still owns
// every descriptor, buffer and backend (epoll or io_uring alike).
//
// Peers authenticate with a TLS 1.3 pre-shared key (tls/psk.hpp); the key's
// identity is the connection's peer_identity(), which the protocol trusts
// instead of anything the peer says. The layer knows identities as numbers
// only, nothing of what they mean.
#pragma once

#include <openssl/ssl.h>

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "common/result.hpp"
#include "reactor/buffer_pool.hpp"
#include "reactor/reactor.hpp"
#include "tls/failure_limiter.hpp"
#include "tls/keys.hpp"
#include "tls/psk.hpp"

namespace tls {

struct LayerOptions {
  uint32_t failure_burst = limits::failure_burst_default;
  uint32_t failure_refill_ms = limits::failure_refill_ms_default;
  uint32_t worker_id = 0;  // for the log
};

struct LayerStats {
  uint64_t handshakes_ok = 0;
  uint64_t handshakes_failed = 0;  // bad key, unknown identity, no key, broken handshake, plaintext
  uint64_t plaintext_refused = 0;
  uint64_t rate_limited = 0;  // closed before any handshake: too many failures from the address
};

class TlsLayer final : public reactor::Handler, public reactor::Link {
 public:
  // `slots`: the reactor's connection slots (Options::max_connections).
  static common::Result<std::unique_ptr<TlsLayer>> create(reactor::Reactor& reactor, size_t slots, KeyRing keys,
                                                          LayerOptions options);
  ~TlsLayer() override;
  TlsLayer(const TlsLayer&) = delete;
  TlsLayer& operator=(const TlsLayer&) = delete;

  // The protocol above; gets on_open at accept (so deadlines and connection
  // caps count from the TCP connection), on_data only once the handshake
  // proved who the peer is.
  void set_inner(reactor::Handler* inner) { _inner = inner; }
  // Written in clear to a connection whose first byte is not a TLS record
  // (a plaintext client), before it is closed.
  void set_plaintext_refusal(std::span<const std::byte> bytes) { _plaintext_refusal.assign(bytes.begin(), bytes.end()); }
  // New keys for new handshakes; established connections keep going.
  void replace_keys(KeyRing keys) { _keys = std::move(keys); }
  size_t key_count() const { return _keys.size(); }
  const LayerStats& stats() const { return _stats; }

  // reactor::Handler (from the reactor)
  void on_open(reactor::ConnId id) override;
  size_t on_data(reactor::ConnId id, std::span<const std::byte> data) override;
  void on_close(reactor::ConnId id, reactor::CloseReason reason) override;
  void on_output_drained(reactor::ConnId id) override;

  // reactor::Link (from the protocol)
  bool send(reactor::ConnId id, std::span<const std::byte> bytes) override;
  size_t send_space(reactor::ConnId id) const override;
  std::byte* reserve_send(reactor::ConnId id, size_t size) override;
  void commit_send(reactor::ConnId id, size_t size) override;
  bool is_open(reactor::ConnId id) const override;
  void close(reactor::ConnId id, reactor::Flush flush, reactor::CloseReason reason) override;
  void abort(reactor::ConnId id) override { _reactor.abort(id); }
  void pause_reading(reactor::ConnId id) override;
  void resume_reading(reactor::ConnId id) override;
  size_t queued_output(reactor::ConnId id) const override { return _reactor.queued_output(id); }
  uint32_t peer_identity(reactor::ConnId id) const override;
  void close_all(reactor::CloseReason reason) override { _reactor.close_all(reason); }

  // The largest reserve_send a protocol may make (one encrypted reply at a time).
  static constexpr size_t reply_bytes_max = 64 * 1024;

 private:
  enum class State : uint8_t { free, refused, handshaking, established, failed };
  struct Conn {
    State state = State::free;
    reactor::ConnId id;
    SSL* ssl = nullptr;
    BIO* network = nullptr;  // our end of the BIO pair; OpenSSL owns the other
    bool inner_open = false;
    bool saw_first_byte = false;
    bool paused_by_inner = false;
    bool broken = false;  // encrypting failed: closed at the next turn
    uint32_t offered = 0;   // identity the peer offered, if we hold a key for it
    uint32_t identity = 0;  // proven by a completed handshake
    PeerAddress addr;
    std::byte* in = nullptr;  // decrypted, not yet consumed; pooled while non-empty
    size_t in_len = 0;
  };
  enum class Turn : uint8_t { idle, progressed, gone };

  TlsLayer(reactor::Reactor& reactor, size_t slots, KeyRing keys, LayerOptions options, CtxPtr ctx, Key decoy);
  static int find_psk(SSL* ssl, const unsigned char* identity, size_t identity_len, SSL_SESSION** session);

  Conn* lookup(reactor::ConnId id);
  const Conn* lookup(reactor::ConnId id) const;
  bool alive(const Conn& c, reactor::ConnId id) const { return c.id == id && c.state == State::established; }
  // Moves the ciphertext OpenSSL produced into the reactor's output. False
  // when some could not move (no room: the connection is broken).
  bool pump_out(Conn& c);
  // Decrypts what the BIO pair holds and offers it to the protocol.
  Turn pump_in(Conn& c);
  void handshake_failed(Conn& c, const char* reason, const std::string& detail);
  void free_conn(Conn& c);

  reactor::Reactor& _reactor;
  reactor::Handler* _inner = nullptr;
  KeyRing _keys;
  LayerOptions _options;
  CtxPtr _ctx;
  // Used for an identity we hold no key for, so an unknown agency and a
  // wrong key take the same path, and the same time, to the same failure.
  Key _decoy;
  std::vector<Conn> _conns;  // by reactor slot
  reactor::BufferPool _plaintext_pool{limits::plaintext_buffer_bytes};
  std::vector<std::byte> _scratch;  // reserve_send's room: one reply is encrypted at a time
  reactor::ConnId _reserved_for;    // the connection holding _scratch between reserve and commit
  std::vector<std::byte> _plaintext_refusal;
  FailureLimiter _limiter;
  LayerStats _stats;
  uint64_t _rejections_unlogged = 0;
  uint64_t _rejections_logged_ms = 0;
};

}  // namespace tls
