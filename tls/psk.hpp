// OpenSSL set-up shared by the server's TLS layer, the agency client and the
// load generator: TLS 1.3 only, authenticated by an external pre-shared key
// (RFC 8446 2.2, psk_dhe_ke: the key proves who the peer is, an ephemeral
// X25519 exchange gives each connection fresh keys, so a key stolen later
// does not open recorded traffic). No certificates, no session tickets.
// The PSK identity on the wire is the agency number in decimal ("3").
#pragma once

#include <openssl/ssl.h>

#include <memory>
#include <string>

#include "common/result.hpp"
#include "tls/keys.hpp"

namespace tls {

struct CtxFree {
  void operator()(SSL_CTX* c) const { SSL_CTX_free(c); }
};
struct SslFree {
  void operator()(SSL* s) const { SSL_free(s); }
};
using CtxPtr = std::unique_ptr<SSL_CTX, CtxFree>;
using SslPtr = std::unique_ptr<SSL, SslFree>;

enum class Side : uint8_t { server, client };

// A TLS 1.3-only context for one side; the server's answers no certificate
// request and issues no tickets. The PSK callbacks are set per SSL (client)
// or by the layer (server).
common::Result<CtxPtr> make_context(Side side);

// A session object carrying `key` as an external PSK for TLS_AES_128_GCM_SHA256
// (the binder and the key schedule then use SHA-256). The caller owns it.
SSL_SESSION* make_psk_session(SSL* ssl, const Key& key);

// The identity text of an agency ("3"), and back (0 when it is not one).
std::string identity_text(uint32_t identity);
uint32_t parse_identity(const unsigned char* data, size_t size);

// The client's key: who it says it is, and the key that proves it.
struct ClientKey {
  uint32_t identity = 0;
  Key key{};
  std::string identity_text;  // kept alive for OpenSSL's callback
};
// Loads an agency's key file (exactly one line).
common::Result<ClientKey> load_client_key(const std::string& path);
// A client SSL that offers `key` (which must outlive it) as its PSK.
common::Result<SslPtr> make_client_ssl(SSL_CTX* ctx, const ClientKey* key);

// OpenSSL's error queue, drained, as one line without '|' ("" when empty).
std::string drain_errors();

// SSL_read / SSL_write over a non-blocking socket, with recv/send's
// conventions, for the client side (agency client, load generator): > 0
// bytes; 0 the peer closed (close_notify, or a bare EOF, which OpenSSL 3
// reports as an error); -1 with errno: EAGAIN while OpenSSL waits for the
// socket (`wants`, when given, gets POLLIN or POLLOUT), the socket's errno
// for a system-call failure, EPROTO for a TLS failure.
ssize_t read_some(SSL* ssl, void* p, size_t n, short* wants = nullptr);
ssize_t write_some(SSL* ssl, const void* p, size_t n, short* wants = nullptr);

}  // namespace tls
