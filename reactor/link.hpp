// What a protocol handler needs from whatever carries its bytes: queue a
// reply, learn how much room is left, close, pause. The reactor implements it
// for plaintext sockets; a TLS layer (tls/) implements it on top of the
// reactor, so the protocol code is the same with and without encryption.
// Like the reactor, a link knows nothing of what the bytes mean.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "reactor/backend.hpp"

namespace reactor {

enum class CloseReason : uint8_t { peer_closed, io_error, local, input_overflow, shutdown };
const char* close_reason_name(CloseReason r);

// Close after the queued output is sent (yes) or drop it (no).
enum class Flush : uint8_t { yes, no };

class Link {
 public:
  // Queues bytes for `id`. False when `id` is gone or lacks room; nothing is queued then.
  virtual bool send(ConnId id, std::span<const std::byte> bytes) = 0;
  // Room for one more reserve_send (0 when `id` is gone).
  virtual size_t send_space(ConnId id) const = 0;
  // `size` bytes to encode a reply into in place; commit_send() queues them.
  // nullptr when `id` is gone or lacks room.
  virtual std::byte* reserve_send(ConnId id, size_t size) = 0;
  virtual void commit_send(ConnId id, size_t size) = 0;
  virtual bool is_open(ConnId id) const = 0;
  virtual void close(ConnId id, Flush flush, CloseReason reason = CloseReason::local) = 0;
  // Closes now, open or still flushing, dropping what is unsent. Stale ids are ignored.
  virtual void abort(ConnId id) = 0;
  virtual void pause_reading(ConnId id) = 0;
  virtual void resume_reading(ConnId id) = 0;
  // Bytes queued for `id` and not yet sent (0 when `id` is gone).
  virtual size_t queued_output(ConnId id) const = 0;
  // Who the peer proved to be (a TLS pre-shared key identity), or 0 when the
  // link does not authenticate peers (plaintext).
  virtual uint32_t peer_identity(ConnId id) const = 0;
  // Every open connection closes after its queued output.
  virtual void close_all(CloseReason reason) = 0;

 protected:
  ~Link() = default;
};

}  // namespace reactor
