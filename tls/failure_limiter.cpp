#include "tls/failure_limiter.hpp"

#include <arpa/inet.h>
#include <sys/un.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "common/assert.hpp"

namespace tls {

PeerAddress PeerAddress::from(const sockaddr_storage& ss) {
  PeerAddress a;
  if (ss.ss_family == AF_INET) {
    const auto& in4 = reinterpret_cast<const sockaddr_in&>(ss);
    a.bytes[10] = a.bytes[11] = 0xff;
    std::memcpy(a.bytes.data() + 12, &in4.sin_addr, 4);
  } else if (ss.ss_family == AF_INET6) {
    const auto& in6 = reinterpret_cast<const sockaddr_in6&>(ss);
    std::memcpy(a.bytes.data(), &in6.sin6_addr, 16);
  }
  // Anything else (a Unix socketpair in tests) is the all-zero "local".
  return a;
}

void PeerAddress::format(char* out, size_t size) const {
  static constexpr std::array<uint8_t, 12> v4_prefix{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  if (std::all_of(bytes.begin(), bytes.end(), [](uint8_t b) { return b == 0; })) {
    std::snprintf(out, size, "local");
  } else if (std::equal(v4_prefix.begin(), v4_prefix.end(), bytes.begin())) {
    ::inet_ntop(AF_INET, bytes.data() + 12, out, static_cast<socklen_t>(size));
  } else {
    ::inet_ntop(AF_INET6, bytes.data(), out, static_cast<socklen_t>(size));
  }
}

FailureLimiter::FailureLimiter(uint32_t burst, uint32_t refill_ms)
    : _burst(burst), _refill_ms(refill_ms), _slots(limits::failure_table_slots) {
  LOTTERY_ASSERT(burst >= 1);
  LOTTERY_ASSERT(refill_ms >= 1);
  static_assert(limits::failure_table_slots % probe_slots == 0);
}

FailureLimiter::Slot* FailureLimiter::find(const PeerAddress& addr) {
  // FNV-1a over the address picks a window of probe_slots slots.
  uint64_t h = 1469598103934665603ull;
  for (uint8_t b : addr.bytes) h = (h ^ b) * 1099511628211ull;
  size_t base = (h % (_slots.size() / probe_slots)) * probe_slots;
  for (size_t i = 0; i < probe_slots; i++) {
    Slot& s = _slots[base + i];
    if (s.used && s.addr == addr) return &s;
  }
  return nullptr;
}

void FailureLimiter::refill(Slot& s, uint64_t now_ms) const {
  uint64_t full = uint64_t{_burst} * 1000;
  if (now_ms > s.updated_ms) {
    uint64_t add = (now_ms - s.updated_ms) * 1000 / _refill_ms;
    s.tokens_milli = std::min(full, s.tokens_milli + add);
  }
  s.updated_ms = now_ms;
}

bool FailureLimiter::allowed(const PeerAddress& addr, uint64_t now_ms) {
  Slot* s = find(addr);
  if (s == nullptr) return true;  // no failures remembered
  refill(*s, now_ms);
  return s->tokens_milli >= 1000;
}

void FailureLimiter::record_failure(const PeerAddress& addr, uint64_t now_ms) {
  Slot* s = find(addr);
  if (s == nullptr) {
    uint64_t h = 1469598103934665603ull;
    for (uint8_t b : addr.bytes) h = (h ^ b) * 1099511628211ull;
    size_t base = (h % (_slots.size() / probe_slots)) * probe_slots;
    s = &_slots[base];
    for (size_t i = 0; i < probe_slots; i++) {
      Slot& c = _slots[base + i];
      if (!c.used) {
        s = &c;
        break;
      }
      if (c.updated_ms < s->updated_ms) s = &c;
    }
    *s = Slot{addr, true, now_ms, uint64_t{_burst} * 1000};
  }
  refill(*s, now_ms);
  s->tokens_milli = s->tokens_milli >= 1000 ? s->tokens_milli - 1000 : 0;
}

}  // namespace tls
