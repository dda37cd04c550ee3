// Failed TLS handshakes per source address, as a token bucket per address in
// a fixed table (no allocation after start-up). An address may fail
// `burst` handshakes in a row, then one per `refill_ms`; over that, its
// connections are closed before any handshake work is done. The table holds
// failure_table_slots addresses; a new address takes the least recently
// touched slot of its probe window, so a flood of addresses can evict an
// entry (it then starts again with a full bucket), never grow memory.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>

#include <array>
#include <cstdint>
#include <vector>

#include "tls/limits.hpp"

namespace tls {

// An IPv4 or IPv6 address as 16 bytes (IPv4 mapped), or "local" (Unix sockets).
struct PeerAddress {
  std::array<uint8_t, 16> bytes{};
  static PeerAddress from(const sockaddr_storage& ss);
  // Numeric text ("127.0.0.1", "::1", "local").
  void format(char* out, size_t size) const;
  friend bool operator==(const PeerAddress&, const PeerAddress&) = default;
};

class FailureLimiter {
 public:
  FailureLimiter(uint32_t burst, uint32_t refill_ms);

  // False when `addr` has used up its failures: refuse it without a handshake.
  bool allowed(const PeerAddress& addr, uint64_t now_ms);
  void record_failure(const PeerAddress& addr, uint64_t now_ms);

 private:
  static constexpr size_t probe_slots = 8;
  struct Slot {
    PeerAddress addr;
    bool used = false;
    uint64_t updated_ms = 0;
    // Tokens in thousandths, so refills of a fraction of a token add up.
    uint64_t tokens_milli = 0;
  };
  Slot* find(const PeerAddress& addr);
  void refill(Slot& s, uint64_t now_ms) const;

  uint32_t _burst;
  uint32_t _refill_ms;
  std::vector<Slot> _slots;  // failure_table_slots, sized at construction
};

}  // namespace tls
