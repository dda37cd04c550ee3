#include "tls/psk.hpp"

#include <openssl/err.h>

#include <poll.h>

#include <algorithm>
#include <cerrno>
#include <climits>

#include "common/assert.hpp"

namespace tls {
namespace {

// TLS_AES_128_GCM_SHA256 (RFC 8446 B.4).
constexpr unsigned char psk_cipher_id[2] = {0x13, 0x01};

int use_psk_session(SSL* ssl, const EVP_MD* md, const unsigned char** id, size_t* idlen, SSL_SESSION** sess) {
  const auto* key = static_cast<const ClientKey*>(SSL_get_app_data(ssl));
  *sess = nullptr;
  if (key == nullptr) return 1;  // no PSK to offer
  // After a HelloRetryRequest the server has fixed the hash; ours is SHA-256.
  if (md != nullptr && md != EVP_sha256()) return 1;
  SSL_SESSION* s = make_psk_session(ssl, key->key);
  if (s == nullptr) return 0;
  *id = reinterpret_cast<const unsigned char*>(key->identity_text.data());
  *idlen = key->identity_text.size();
  *sess = s;
  return 1;
}

}  // namespace

std::string drain_errors() {
  std::string out;
  unsigned long e;
  while ((e = ERR_get_error()) != 0) {
    const char* reason = ERR_reason_error_string(e);
    if (!out.empty()) out += "; ";
    out += reason != nullptr ? reason : "error " + std::to_string(ERR_GET_REASON(e));
  }
  for (char& c : out)
    if (c == '|') c = '/';
  return out;
}

common::Result<CtxPtr> make_context(Side side) {
  CtxPtr ctx(SSL_CTX_new(side == Side::server ? TLS_server_method() : TLS_client_method()));
  if (!ctx) return common::Error::make(EIO, "SSL_CTX_new: " + drain_errors());
  if (SSL_CTX_set_min_proto_version(ctx.get(), TLS1_3_VERSION) != 1 ||
      SSL_CTX_set_max_proto_version(ctx.get(), TLS1_3_VERSION) != 1)
    return common::Error::make(EIO, "TLS 1.3 is not available in this OpenSSL: " + drain_errors());
  // SHA-256 suites only: the PSK's hash is SHA-256.
  if (SSL_CTX_set_ciphersuites(ctx.get(), "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256") != 1)
    return common::Error::make(EIO, "SSL_CTX_set_ciphersuites: " + drain_errors());
  // Partial writes: a reply larger than the room in the BIO pair is written
  // record by record, with the ciphertext moved out between records.
  SSL_CTX_set_mode(ctx.get(), SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  if (side == Side::client) {
    // A client reads from its socket: without read-ahead OpenSSL makes two
    // read(2) calls per record (header, then body), and a pipelined client
    // gets a small record per acknowledgement. Read-ahead takes whatever the
    // socket holds in one call; callers read until SSL_read wants more.
    SSL_CTX_set_read_ahead(ctx.get(), 1);
  }
  if (side == Side::server) {
    // Every connection proves its key afresh; tickets would only be a second
    // kind of credential to rotate.
    SSL_CTX_set_num_tickets(ctx.get(), 0);
    SSL_CTX_set_options(ctx.get(), SSL_OP_NO_TICKET);
  }
  return ctx;
}

SSL_SESSION* make_psk_session(SSL* ssl, const Key& key) {
  const SSL_CIPHER* cipher = SSL_CIPHER_find(ssl, psk_cipher_id);
  if (cipher == nullptr) return nullptr;
  SSL_SESSION* s = SSL_SESSION_new();
  if (s == nullptr) return nullptr;
  if (SSL_SESSION_set1_master_key(s, key.data(), key.size()) != 1 || SSL_SESSION_set_cipher(s, cipher) != 1 ||
      SSL_SESSION_set_protocol_version(s, TLS1_3_VERSION) != 1) {
    SSL_SESSION_free(s);
    return nullptr;
  }
  return s;
}

std::string identity_text(uint32_t identity) { return std::to_string(identity); }

uint32_t parse_identity(const unsigned char* data, size_t size) {
  if (size == 0 || size > 5) return 0;
  uint32_t id = 0;
  for (size_t i = 0; i < size; i++) {
    if (data[i] < '0' || data[i] > '9') return 0;
    id = id * 10 + (data[i] - '0');
  }
  return id <= limits::identity_max ? id : 0;
}

common::Result<ClientKey> load_client_key(const std::string& path) {
  auto ring = KeyRing::load(path);
  if (!ring) return ring.error();
  if (ring->size() != 1)
    return common::Error::make(EINVAL, path + ": an agency's key file holds exactly one key, not " +
                                           std::to_string(ring->size()));
  ClientKey key;
  key.identity = ring->entries()[0].identity;
  key.key = ring->entries()[0].key;
  key.identity_text = identity_text(key.identity);
  return key;
}

common::Result<SslPtr> make_client_ssl(SSL_CTX* ctx, const ClientKey* key) {
  SslPtr ssl(SSL_new(ctx));
  if (!ssl) return common::Error::make(EIO, "SSL_new: " + drain_errors());
  SSL_set_app_data(ssl.get(), const_cast<ClientKey*>(key));
  SSL_set_psk_use_session_callback(ssl.get(), use_psk_session);
  SSL_set_connect_state(ssl.get());
  return ssl;
}

namespace {

ssize_t io_result(SSL* ssl, int r, short* wants) {
  if (r > 0) return r;
  switch (SSL_get_error(ssl, r)) {
    case SSL_ERROR_WANT_READ:
      if (wants != nullptr) *wants = POLLIN;
      errno = EAGAIN;
      return -1;
    case SSL_ERROR_WANT_WRITE:
      if (wants != nullptr) *wants = POLLOUT;
      errno = EAGAIN;
      return -1;
    case SSL_ERROR_ZERO_RETURN:
      return 0;  // close_notify
    case SSL_ERROR_SYSCALL:
      if (errno == 0) return 0;  // EOF without close_notify
      return -1;
    default:
      if (ERR_GET_REASON(ERR_peek_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
        ERR_clear_error();
        return 0;  // EOF without close_notify (OpenSSL 3 calls it an error)
      }
      ERR_clear_error();
      errno = EPROTO;
      return -1;
  }
}

int clamp(size_t n) { return static_cast<int>(std::min<size_t>(n, INT32_MAX)); }

}  // namespace

ssize_t read_some(SSL* ssl, void* p, size_t n, short* wants) {
  ERR_clear_error();
  errno = 0;
  return io_result(ssl, SSL_read(ssl, p, clamp(n)), wants);
}

ssize_t write_some(SSL* ssl, const void* p, size_t n, short* wants) {
  ERR_clear_error();
  errno = 0;
  return io_result(ssl, SSL_write(ssl, p, clamp(n)), wants);
}

}  // namespace tls
