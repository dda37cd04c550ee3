// The contract between the reactor's loop and an I/O backend (epoll today,
// io_uring beside it). A backend moves bytes and reports what completed; the
// loop owns connection state, buffers, timers and the handler.
//
// Every connection is named by {slot, generation}. A backend hands both back
// with each completion and the loop drops completions whose generation is
// stale, so a reused slot never sees an event meant for its predecessor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>

#include "common/result.hpp"

namespace reactor {

struct ConnId {
  uint32_t slot = UINT32_MAX;
  uint32_t generation = 0;
  friend bool operator==(const ConnId&, const ConnId&) = default;
  bool valid() const { return slot != UINT32_MAX; }
};

// What a backend reports. Calls arrive only from Backend::poll, never from
// inside a submitting call such as Backend::send.
class BackendEvents {
 public:
  virtual void on_accept(int listen_fd, int conn_fd) = 0;
  // Accepting on `listen_fd` failed with `err` (EMFILE, ENFILE...). Returns
  // true when the loop took a pending connection off the listener some other
  // way (so accepting again may make progress), false when it could not.
  virtual bool on_accept_error(int listen_fd, int err) = 0;
  // `data` is valid only during the call.
  virtual void on_recv(ConnId id, std::span<const std::byte> data) = 0;
  // The peer closed (err == 0) or receiving failed (err is an errno value).
  virtual void on_recv_end(ConnId id, int err) = 0;
  // `bytes` of the send started with Backend::send went out (all of it unless err != 0).
  virtual void on_sent(ConnId id, size_t bytes, int err) = 0;
  // The backend holds no more references to the connection or its buffers.
  virtual void on_released(ConnId id) = 0;
  virtual void on_watch(uint64_t token) = 0;

 protected:
  ~BackendEvents() = default;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string_view name() const = 0;

  virtual common::Status add_listener(int fd) = 0;
  virtual void remove_listener(int fd) = 0;
  // Reports readability of `fd` (an eventfd, a signalfd...) as on_watch(token).
  // The callee must drain the fd itself.
  virtual common::Status add_watch(int fd, uint64_t token) = 0;

  virtual common::Status open_connection(ConnId id, int fd) = 0;
  virtual void set_receiving(ConnId id, bool on) = 0;
  // Transmits [data, data+size). The memory stays valid and unchanged until
  // on_sent; at most one send is in flight per connection.
  virtual void send(ConnId id, const std::byte* data, size_t size) = 0;
  // Stops all I/O on the connection and closes `fd`; on_released follows once
  // nothing in flight refers to the connection any more.
  virtual void close_connection(ConnId id, int fd) = 0;

  // Waits up to timeout_ms (-1: no limit) and dispatches completions. Returns
  // the number dispatched.
  virtual int poll(int timeout_ms, BackendEvents& events) = 0;
};

enum class BackendKind { epoll, uring };

common::Result<std::unique_ptr<Backend>> make_epoll_backend(size_t max_connections);
common::Result<std::unique_ptr<Backend>> make_uring_backend(size_t max_connections);

}  // namespace reactor
