// TLS limits, unit last. Sizes follow from TLS 1.3 (RFC 8446) record sizes.
#pragma once

#include <cstddef>
#include <cstdint>

#include "reactor/limits.hpp"

namespace tls::limits {

// A pre-shared key: 32 random bytes (256 bits), written as 64 hex digits.
inline constexpr size_t key_bytes = 32;
// Identities are agency numbers 1..identity_max; 0 means "nobody".
inline constexpr uint32_t identity_max = 65535;

// RFC 8446 5.2: a record carries at most 2^14 bytes of plaintext and, once
// protected, at most 2^14 + 256 bytes, after a 5-byte header.
inline constexpr size_t record_plaintext_bytes_max = 16384;
inline constexpr size_t record_bytes_max = 5 + record_plaintext_bytes_max + 256;
// What protection adds to one record as we send it (AES-GCM or ChaCha20:
// header 5, content type 1, tag 16; we send no padding).
inline constexpr size_t record_overhead_bytes = 22;
// Each direction of a connection's BIO pair holds one whole record: the
// loop hands the TLS engine at most that much ciphertext at a time, and moves
// what it produces into the reactor's output before producing more. Allocated
// by OpenSSL when the connection first uses it, kept until it closes.
inline constexpr size_t bio_bytes = 17 * 1024;
static_assert(bio_bytes >= record_bytes_max);

// Decrypted bytes the protocol has not consumed yet (a partial frame) plus
// one more record, like the reactor's input buffer; pooled, held only while
// non-empty.
inline constexpr size_t plaintext_buffer_bytes = reactor::limits::input_buffer_bytes;
static_assert(plaintext_buffer_bytes >= 64 * 1024 + record_plaintext_bytes_max);

// The first byte of every TLS connection: a handshake record (RFC 8446 5.1).
inline constexpr uint8_t handshake_record_type = 0x16;

// Failed handshakes per source address (docs/SECURITY.md): a token bucket
// per address in a fixed table. `failure_burst` failures in a row are
// allowed, then one per `failure_refill_ms`; past that, connections from the
// address are closed at once, without a handshake.
inline constexpr size_t failure_table_slots = 1024;
inline constexpr uint32_t failure_burst_default = 10;
inline constexpr uint32_t failure_refill_ms_default = 1000;
// Rejections of rate-limited connections are logged once per interval, with a count.
inline constexpr uint64_t rejection_log_interval_ms = 10'000;

}  // namespace tls::limits
