#include "tls/layer.hpp"

#include <openssl/err.h>

#include <algorithm>
#include <climits>
#include <cstring>

#include "common/assert.hpp"
#include "common/log.hpp"

namespace tls {

namespace log = common::log;

common::Result<std::unique_ptr<TlsLayer>> TlsLayer::create(reactor::Reactor& reactor, size_t slots, KeyRing keys,
                                                           LayerOptions options) {
  LOTTERY_ASSERT(slots > 0);
  auto ctx = make_context(Side::server);
  if (!ctx) return ctx.error();
  auto decoy = random_key();
  if (!decoy) return decoy.error();
  std::unique_ptr<TlsLayer> layer(
      new TlsLayer(reactor, slots, std::move(keys), options, std::move(*ctx), *decoy));
  SSL_CTX_set_app_data(layer->_ctx.get(), layer.get());
  SSL_CTX_set_psk_find_session_callback(layer->_ctx.get(), find_psk);
  return layer;
}

TlsLayer::TlsLayer(reactor::Reactor& reactor, size_t slots, KeyRing keys, LayerOptions options, CtxPtr ctx,
                   Key decoy)
    : _reactor(reactor),
      _keys(std::move(keys)),
      _options(options),
      _ctx(std::move(ctx)),
      _decoy(decoy),
      _conns(slots),
      _scratch(reply_bytes_max),
      _limiter(options.failure_burst, options.failure_refill_ms) {}

TlsLayer::~TlsLayer() {
  for (Conn& c : _conns) free_conn(c);
}

int TlsLayer::find_psk(SSL* ssl, const unsigned char* identity, size_t identity_len, SSL_SESSION** session) {
  auto* layer = static_cast<TlsLayer*>(SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl)));
  auto* c = static_cast<Conn*>(SSL_get_app_data(ssl));
  LOTTERY_ASSERT(layer != nullptr);
  LOTTERY_ASSERT(c != nullptr);
  // Looked up by the identity, which is public. The secret part, checking
  // the client's binder against the key, is OpenSSL's HMAC and
  // constant-time comparison, the same for the decoy key.
  uint32_t id = parse_identity(identity, identity_len);
  const Key* key = id != 0 ? layer->_keys.find(id) : nullptr;
  c->offered = key != nullptr ? id : 0;
  *session = make_psk_session(ssl, key != nullptr ? *key : layer->_decoy);
  return *session != nullptr ? 1 : 0;
}

TlsLayer::Conn* TlsLayer::lookup(reactor::ConnId id) {
  if (id.slot >= _conns.size()) return nullptr;
  Conn& c = _conns[id.slot];
  return c.state != State::free && c.id == id ? &c : nullptr;
}

const TlsLayer::Conn* TlsLayer::lookup(reactor::ConnId id) const {
  if (id.slot >= _conns.size()) return nullptr;
  const Conn& c = _conns[id.slot];
  return c.state != State::free && c.id == id ? &c : nullptr;
}

void TlsLayer::free_conn(Conn& c) {
  if (c.ssl != nullptr) SSL_free(c.ssl);  // frees OpenSSL's end of the pair
  if (c.network != nullptr) BIO_free(c.network);
  if (c.in != nullptr) _plaintext_pool.release(c.in);
  c = Conn{};
}

// ---------------------------------------------------------------- from the reactor

void TlsLayer::on_open(reactor::ConnId id) {
  LOTTERY_ASSERT(id.slot < _conns.size());
  Conn& c = _conns[id.slot];
  LOTTERY_ASSERT(c.state == State::free);
  c = Conn{};
  c.state = State::handshaking;
  c.id = id;
  sockaddr_storage ss{};
  if (_reactor.peer_address(id, ss)) c.addr = PeerAddress::from(ss);
  uint64_t now = reactor::Reactor::now_ms();
  if (!_limiter.allowed(c.addr, now)) {
    // Too many failures from this address: no handshake work at all.
    _stats.rate_limited++;
    _rejections_unlogged++;
    if (_rejections_logged_ms == 0 || now - _rejections_logged_ms >= limits::rejection_log_interval_ms) {
      char ip[INET6_ADDRSTRLEN + 8];
      c.addr.format(ip, sizeof ip);
      log::warning("tls_handshake", log::Outcome::fail,
                   {{"worker", _options.worker_id}, {"ip", ip}, {"reason", "rate_limited"},
                    {"conexiones", _rejections_unlogged}, {"intervalo_ms", limits::rejection_log_interval_ms}});
      _rejections_unlogged = 0;
      _rejections_logged_ms = now;
    }
    c.state = State::refused;
    _reactor.close(id, reactor::Flush::no);
    return;
  }
  BIO* internal = nullptr;
  c.ssl = SSL_new(_ctx.get());
  if (c.ssl == nullptr || BIO_new_bio_pair(&internal, limits::bio_bytes, &c.network, limits::bio_bytes) != 1) {
    log::error("tls_handshake", log::Outcome::fail,
               {{"worker", _options.worker_id}, {"reason", "out_of_memory"}, {"error", drain_errors()}});
    c.state = State::refused;
    _reactor.close(id, reactor::Flush::no);
    return;
  }
  SSL_set_bio(c.ssl, internal, internal);
  SSL_set_accept_state(c.ssl);
  SSL_set_app_data(c.ssl, &c);
  // The protocol learns of the connection now, not after the handshake: its
  // connection caps and its handshake deadline count from the TCP connect.
  c.inner_open = true;
  if (_inner != nullptr) _inner->on_open(id);
}

void TlsLayer::on_close(reactor::ConnId id, reactor::CloseReason reason) {
  Conn* c = lookup(id);
  if (c == nullptr) return;
  if (c->state == State::handshaking && (reason == reactor::CloseReason::peer_closed ||
                                         reason == reactor::CloseReason::io_error)) {
    // The peer gave up mid-handshake (a client that failed our server's
    // answer, a scanner): a failure like any other.
    _stats.handshakes_failed++;
    _limiter.record_failure(c->addr, reactor::Reactor::now_ms());
    char ip[INET6_ADDRSTRLEN + 8];
    c->addr.format(ip, sizeof ip);
    log::warning("tls_handshake", log::Outcome::fail,
                 {{"worker", _options.worker_id}, {"ip", ip}, {"reason", "peer_closed_during_handshake"}});
  }
  bool inner_open = c->inner_open;
  free_conn(*c);
  if (inner_open && _inner != nullptr) _inner->on_close(id, reason);
}

size_t TlsLayer::on_data(reactor::ConnId id, std::span<const std::byte> data) {
  Conn* cp = lookup(id);
  if (cp == nullptr || (cp->state != State::handshaking && cp->state != State::established)) return data.size();
  Conn& c = *cp;
  if (!c.saw_first_byte && !data.empty()) {
    c.saw_first_byte = true;
    if (static_cast<uint8_t>(data[0]) != limits::handshake_record_type) {
      _stats.plaintext_refused++;
      if (!_plaintext_refusal.empty()) (void)_reactor.send(id, _plaintext_refusal);
      handshake_failed(c, "plaintext", "first byte is not a TLS handshake record");
      return data.size();
    }
  }
  size_t used = 0;
  while (true) {
    bool progress = false;
    if (used < data.size()) {
      int w = BIO_write(c.network, data.data() + used,
                        static_cast<int>(std::min<size_t>(data.size() - used, INT_MAX)));
      if (w > 0) {
        used += static_cast<size_t>(w);
        progress = true;
      }
    }
    if (c.state == State::handshaking) {
      ERR_clear_error();
      int r = SSL_do_handshake(c.ssl);
      if (!pump_out(c)) {
        handshake_failed(c, "output_full", "no room for the handshake's answer");
        return data.size();
      }
      if (r == 1) {
        if (c.offered == 0) {  // cannot happen: the decoy key never verifies
          handshake_failed(c, "unknown_identity", "");
          return data.size();
        }
        c.state = State::established;
        c.identity = c.offered;
        _stats.handshakes_ok++;
        if (log::enabled(log::Level::debug)) {
          char ip[INET6_ADDRSTRLEN + 8];
          c.addr.format(ip, sizeof ip);
          log::debug("tls_handshake", log::Outcome::success,
                     {{"worker", _options.worker_id}, {"ip", ip}, {"agencia", c.identity}});
        }
        progress = true;
      } else {
        int e = SSL_get_error(c.ssl, r);
        if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
          std::string detail = drain_errors();
          handshake_failed(c, "handshake_failed", detail);
          return data.size();
        }
      }
    }
    if (c.state == State::established) {
      Turn t = pump_in(c);
      if (t == Turn::gone) return data.size();
      if (t == Turn::progressed) progress = true;
    }
    if (!progress) break;
  }
  return used;
}

void TlsLayer::on_output_drained(reactor::ConnId id) {
  Conn* c = lookup(id);
  if (c == nullptr || c->state != State::established) return;
  if (c->broken) {
    _reactor.close(id, reactor::Flush::no, reactor::CloseReason::io_error);
    return;
  }
  if (c->paused_by_inner) return;
  // Decrypted bytes the protocol left for lack of output room get their
  // turn, then whatever ciphertext the reactor itself still holds.
  if (pump_in(*c) == Turn::gone) return;
  _reactor.resume_reading(id);
}

void TlsLayer::handshake_failed(Conn& c, const char* reason, const std::string& detail) {
  _stats.handshakes_failed++;
  _limiter.record_failure(c.addr, reactor::Reactor::now_ms());
  char ip[INET6_ADDRSTRLEN + 8];
  c.addr.format(ip, sizeof ip);
  // The failure log names the address and why; never a key, and the same
  // words for a wrong key and an unknown agency.
  log::warning("tls_handshake", log::Outcome::fail,
               {{"worker", _options.worker_id}, {"ip", ip}, {"reason", reason},
                {"detail", detail.empty() ? std::string("-") : detail}});
  (void)pump_out(c);  // the alert, if OpenSSL wrote one
  c.state = State::failed;
  _reactor.close(c.id, reactor::Flush::yes);
}

bool TlsLayer::pump_out(Conn& c) {
  while (true) {
    size_t pending = BIO_ctrl_pending(c.network);
    if (pending == 0) return true;
    size_t room = _reactor.send_space(c.id);
    if (room == 0) return false;
    size_t n = std::min(pending, room);
    std::byte* dst = _reactor.reserve_send(c.id, n);
    if (dst == nullptr) return false;
    int r = BIO_read(c.network, dst, static_cast<int>(n));
    LOTTERY_ASSERT(r > 0);
    _reactor.commit_send(c.id, static_cast<size_t>(r));
  }
}

TlsLayer::Turn TlsLayer::pump_in(Conn& c) {
  reactor::ConnId id = c.id;
  bool progressed = false;
  while (true) {
    // Decrypt as much as the plaintext buffer holds.
    bool got = false;
    while (c.in_len < limits::plaintext_buffer_bytes) {
      if (c.in == nullptr) c.in = _plaintext_pool.acquire();
      ERR_clear_error();
      int r = SSL_read(c.ssl, c.in + c.in_len, static_cast<int>(limits::plaintext_buffer_bytes - c.in_len));
      if (r > 0) {
        c.in_len += static_cast<size_t>(r);
        got = true;
        continue;
      }
      int e = SSL_get_error(c.ssl, r);
      if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) break;
      if (e == SSL_ERROR_ZERO_RETURN) {
        // close_notify: the peer is done sending; our replies still go out.
        (void)pump_out(c);
        _reactor.close(id, reactor::Flush::yes, reactor::CloseReason::peer_closed);
        return Turn::gone;
      }
      // A record that does not authenticate, or a broken stream.
      char ip[INET6_ADDRSTRLEN + 8];
      c.addr.format(ip, sizeof ip);
      log::warning("tls_record", log::Outcome::fail,
                   {{"worker", _options.worker_id}, {"ip", ip}, {"agencia", c.identity}, {"detail", drain_errors()}});
      (void)pump_out(c);
      _reactor.close(id, reactor::Flush::yes, reactor::CloseReason::io_error);
      return Turn::gone;
    }
    if (!pump_out(c)) c.broken = true;  // SSL_read may answer (a key update)
    if (c.in_len == 0) {
      if (c.in != nullptr) {
        _plaintext_pool.release(c.in);
        c.in = nullptr;
      }
      break;
    }
    if (got) progressed = true;
    size_t used = _inner != nullptr ? _inner->on_data(id, {c.in, c.in_len}) : c.in_len;
    if (!alive(c, id)) return Turn::gone;
    LOTTERY_ASSERT(used <= c.in_len);
    if (used > 0) {
      progressed = true;
      std::memmove(c.in, c.in + used, c.in_len - used);
      c.in_len -= used;
    }
    if (c.broken) {
      _reactor.close(id, reactor::Flush::no, reactor::CloseReason::io_error);
      return Turn::gone;
    }
    if (used == 0 && !got) break;
    if (c.paused_by_inner) break;
  }
  return progressed ? Turn::progressed : Turn::idle;
}

// ---------------------------------------------------------------- from the protocol

size_t TlsLayer::send_space(reactor::ConnId id) const {
  const Conn* c = lookup(id);
  if (c == nullptr || c->state != State::established || c->broken) return 0;
  size_t room = _reactor.send_space(id);
  // What encrypting `room` bytes of replies would add, record by record.
  size_t overhead = (room / limits::record_plaintext_bytes_max + 1) * limits::record_overhead_bytes;
  return std::min(room > overhead ? room - overhead : 0, _scratch.size());
}

std::byte* TlsLayer::reserve_send(reactor::ConnId id, size_t size) {
  if (size > send_space(id)) return nullptr;
  _reserved_for = id;
  return _scratch.data();
}

void TlsLayer::commit_send(reactor::ConnId id, size_t size) {
  LOTTERY_ASSERT(_reserved_for == id);
  LOTTERY_ASSERT(size <= _scratch.size());
  _reserved_for = reactor::ConnId{};
  Conn* c = lookup(id);
  LOTTERY_ASSERT(c != nullptr);
  LOTTERY_ASSERT(c->state == State::established);
  size_t done = 0;
  while (done < size && !c->broken) {
    ERR_clear_error();
    int r = SSL_write(c->ssl, _scratch.data() + done, static_cast<int>(size - done));
    if (r > 0) {
      done += static_cast<size_t>(r);
    } else if (SSL_get_error(c->ssl, r) != SSL_ERROR_WANT_WRITE) {
      c->broken = true;
    }
    // Records leave the BIO pair for the reactor's output as they are made;
    // send_space() promised room for all of them.
    if (!pump_out(*c)) c->broken = true;
  }
  if (c->broken) {
    log::error("tls_record", log::Outcome::fail,
               {{"worker", _options.worker_id}, {"agencia", c->identity}, {"detail", drain_errors()}});
  }
}

bool TlsLayer::send(reactor::ConnId id, std::span<const std::byte> bytes) {
  std::byte* dst = reserve_send(id, bytes.size());
  if (dst == nullptr) return false;
  std::memcpy(dst, bytes.data(), bytes.size());
  commit_send(id, bytes.size());
  return true;
}

bool TlsLayer::is_open(reactor::ConnId id) const {
  const Conn* c = lookup(id);
  return c != nullptr && (c->state == State::handshaking || c->state == State::established) &&
         _reactor.is_open(id);
}

void TlsLayer::close(reactor::ConnId id, reactor::Flush flush, reactor::CloseReason reason) {
  Conn* c = lookup(id);
  if (c != nullptr && c->state == State::established && flush == reactor::Flush::yes && !c->broken) {
    // close_notify after the last reply, so the peer can tell an orderly end
    // from a cut connection.
    SSL_shutdown(c->ssl);
    (void)pump_out(*c);
  }
  // Before the handshake there is nothing to flush that the peer could read.
  bool flushable = c == nullptr || c->state == State::established;
  _reactor.close(id, flushable ? flush : reactor::Flush::no, reason);
}

void TlsLayer::pause_reading(reactor::ConnId id) {
  if (Conn* c = lookup(id)) c->paused_by_inner = true;
  _reactor.pause_reading(id);
}

void TlsLayer::resume_reading(reactor::ConnId id) {
  Conn* c = lookup(id);
  if (c != nullptr) {
    c->paused_by_inner = false;
    if (c->state == State::established && pump_in(*c) == Turn::gone) return;
  }
  _reactor.resume_reading(id);
}

uint32_t TlsLayer::peer_identity(reactor::ConnId id) const {
  const Conn* c = lookup(id);
  return c != nullptr && c->state == State::established ? c->identity : 0;
}

}  // namespace tls
