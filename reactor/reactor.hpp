// A small event loop in the manner of Redis's ae: connections, timers and a
// wake-up, behind one handler interface. It knows nothing of what the bytes
// mean; lottery/ implements the Handler.
#pragma once

#include <sys/socket.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <new>
#include <type_traits>
#include <span>
#include <string>
#include <vector>

#include "common/result.hpp"
#include "reactor/backend.hpp"
#include "reactor/buffer_pool.hpp"
#include "reactor/link.hpp"
#include "reactor/limits.hpp"

namespace reactor {

class Handler {
 public:
  virtual ~Handler() = default;
  virtual void on_open(ConnId id) = 0;
  // Bytes received on `id` (the unconsumed rest of earlier calls first).
  // Returns how many bytes it consumed; the rest is offered again with the
  // next bytes, or when the connection's output drains.
  virtual size_t on_data(ConnId id, std::span<const std::byte> data) = 0;
  // The connection is gone; `id` is never valid again.
  virtual void on_close(ConnId id, CloseReason reason) = 0;
  // Everything queued for `id` has gone out. A handler that holds input of
  // its own (a TLS layer's decrypted bytes) offers it again here; the reactor
  // re-offers only what it holds itself.
  virtual void on_output_drained(ConnId /*id*/) {}
};

struct Options {
  size_t max_connections = limits::connections_default;
  // Queued output past which a connection stops being read (resumed below
  // half of it). Below limits::output_buffer_bytes, so handlers that wait for
  // room before replying always find some once the peer reads.
  size_t output_pause_bytes = limits::output_high_water_bytes;
};

struct Stats {
  uint64_t accepted = 0;
  uint64_t closed = 0;
  uint64_t refused_full = 0;   // accepted then closed: no free slot, or no descriptor for it
  uint64_t refused_no_fd = 0;  // of those, accepted with the spare descriptor (EMFILE/ENFILE)
  uint64_t bytes_in = 0;
  uint64_t bytes_out = 0;
};

// A timer's callback, stored in place so that arming a timer never
// allocates: any callable that is trivially copyable and destructible (a
// lambda capturing `this`, pointers, references or small values) and fits in
// limits::timer_callback_bytes. A callable that needs more state should
// capture a pointer to it.
class TimerCallback {
 public:
  TimerCallback() = default;
  template <typename F>
    requires(!std::is_same_v<std::decay_t<F>, TimerCallback> && std::is_invocable_v<F&>)
  TimerCallback(F f) {  // NOLINT: implicit on purpose, add_timer takes lambdas
    static_assert(sizeof(F) <= limits::timer_callback_bytes,
                  "a timer callback captures too much: capture a pointer to its state instead");
    static_assert(alignof(F) <= alignof(std::max_align_t));
    static_assert(std::is_trivially_copyable_v<F> && std::is_trivially_destructible_v<F>,
                  "a timer callback is copied as bytes and never destroyed: capture pointers, not owners");
    ::new (static_cast<void*>(_storage)) F(f);
    _invoke = [](std::byte* storage) { (*std::launder(reinterpret_cast<F*>(storage)))(); };
  }
  void operator()() { _invoke(_storage); }

 private:
  alignas(std::max_align_t) std::byte _storage[limits::timer_callback_bytes]{};
  void (*_invoke)(std::byte*) = nullptr;
};

class Reactor final : public Link, private BackendEvents {
 public:
  static common::Result<std::unique_ptr<Reactor>> create(BackendKind kind, Options options);
  ~Reactor();
  Reactor(const Reactor&) = delete;
  Reactor& operator=(const Reactor&) = delete;

  std::string_view backend_name() const { return _backend->name(); }
  void set_handler(Handler* handler) { _handler = handler; }

  // Takes ownership of a listening socket (non-blocking).
  common::Status add_listener(int fd);
  // Closes every listening socket: no new connections from now on.
  void stop_accepting();

  // Queues bytes for `id`. False when `id` is gone or its output buffer lacks
  // room; nothing is queued then.
  bool send(ConnId id, std::span<const std::byte> bytes) override;
  // Free room in `id`'s output buffer (0 when `id` is gone).
  size_t send_space(ConnId id) const override;
  // Reserves `size` bytes of `id`'s output buffer to encode into in place; commit_send() queues them.
  std::byte* reserve_send(ConnId id, size_t size) override;
  void commit_send(ConnId id, size_t size) override;
  bool is_open(ConnId id) const override;
  // Closes `id` after its queued output is sent (flush) or at once.
  using Flush = reactor::Flush;
  void close(ConnId id, Flush flush, CloseReason reason = CloseReason::local) override;
  void pause_reading(ConnId id) override;
  void resume_reading(ConnId id) override;
  size_t connection_count() const { return _open_count; }
  // Bytes queued for `id` and not yet sent (0 when `id` is gone).
  size_t queued_output(ConnId id) const override;
  // Closes `id` now, open or still flushing its last output, dropping what is
  // unsent: for a peer that stopped reading. Stale ids are ignored.
  void abort(ConnId id) override;
  // A plaintext socket proves nothing about its peer.
  uint32_t peer_identity(ConnId) const override { return 0; }
  // The peer's address (getpeername), false when `id` is gone or unknown.
  bool peer_address(ConnId id, struct sockaddr_storage& out) const;
  // Serves an already connected socket as if it had been accepted (a
  // socketpair in tests and fuzzers). Non-blocking; the reactor owns it now.
  void adopt(int fd) { on_accept(-1, fd); }
  // Bytes written (best effort, without blocking) to a connection refused
  // because every slot is taken, before it is closed: the handler's
  // "too many connections" message. Empty: closed silently.
  void set_refusal(std::span<const std::byte> bytes) { _refusal.assign(bytes.begin(), bytes.end()); }
  // Slots not yet free: open, or closing with output still draining.
  size_t slots_in_use() const { return _conns.size() - _free_slots.size(); }
  // Runs every open connection through close(Flush::yes, reason).
  void close_all(CloseReason reason) override;

  // Timers: one-shot, in milliseconds on the monotonic clock, from a pool of
  // limits::timers_max slots allocated at start-up (no allocation per timer).
  // An id is never 0; cancelling a timer that fired or was cancelled is a no-op.
  using TimerId = uint64_t;
  TimerId add_timer(uint64_t delay_ms, TimerCallback callback);
  void cancel_timer(TimerId id);
  size_t timers_armed() const { return _timers.size() - _free_timers.size(); }

  // A readable fd calls `callback` (the callee drains the fd).
  common::Status watch_fd(int fd, std::function<void()> callback);

  // Async-signal-safe: wakes run() from a signal handler or another thread.
  void wake();
  void set_wake_callback(std::function<void()> callback) { _on_wake = std::move(callback); }
  // Runs after every batch of completions and timers, before the iteration's
  // replies are flushed and the loop sleeps; hooks run in the order they were
  // added (a handler's, then the process's log flush, say). Set-up only.
  void add_before_sleep(std::function<void()> callback);

  void run();
  void stop() { _stopping = true; }
  static uint64_t now_ms();
  const Stats& stats() const { return _stats; }

 private:
  explicit Reactor(std::unique_ptr<Backend> backend, Options options);

  enum class State : uint8_t { free, open, closing, releasing };
  struct Conn {
    int fd = -1;
    uint32_t generation = 0;
    State state = State::free;
    bool send_in_flight = false;
    bool dirty = false;  // has output not yet handed to the backend
    bool paused_by_handler = false;
    bool paused_by_output = false;
    bool receiving = false;
    CloseReason close_reason = CloseReason::local;
    std::byte* in = nullptr;  // borrowed from _input_pool while non-empty
    size_t in_len = 0;
    std::byte* out = nullptr;  // borrowed from _output_pool while non-empty
    size_t out_head = 0;       // first byte not yet sent
    size_t out_sending = 0;    // end of the range handed to the backend
    size_t out_tail = 0;       // end of queued bytes
  };

  // BackendEvents
  void on_accept(int listen_fd, int conn_fd) override;
  bool on_accept_error(int listen_fd, int err) override;
  void refuse(int conn_fd);
  void on_recv(ConnId id, std::span<const std::byte> data) override;
  void on_recv_end(ConnId id, int err) override;
  void on_sent(ConnId id, size_t bytes, int err) override;
  void on_released(ConnId id) override;
  void on_watch(uint64_t token) override;

  Conn* lookup(ConnId id);
  const Conn* lookup(ConnId id) const;
  void deliver(ConnId id, Conn& c);
  void flush_dirty();
  void start_send(ConnId id, Conn& c);
  void begin_close(ConnId id, Conn& c, CloseReason reason);
  void finish_close(ConnId id, Conn& c);
  void update_receiving(ConnId id, Conn& c);
  void release_output_if_empty(Conn& c);
  int next_timeout_ms();
  void run_timers();

  std::unique_ptr<Backend> _backend;
  Options _options;
  Handler* _handler = nullptr;
  std::vector<Conn> _conns;
  std::vector<uint32_t> _free_slots;
  std::vector<ConnId> _dirty;
  size_t _open_count = 0;
  BufferPool _input_pool{limits::input_buffer_bytes};
  BufferPool _output_pool{limits::output_buffer_bytes};
  std::vector<int> _listeners;
  std::vector<std::byte> _refusal;

  // A timer slot is armed from add_timer until it fires or is cancelled; its
  // generation changes each time it is freed, so a stale id or heap entry
  // never reaches its next occupant.
  struct TimerSlot {
    TimerCallback callback;
    uint32_t generation = 1;
    bool armed = false;
  };
  struct TimerEntry {  // a min-heap on deadline; cancelled entries stay until popped or purged
    uint64_t deadline_ms;
    uint32_t slot;
    uint32_t generation;
  };
  bool timer_entry_live(const TimerEntry& e) const;
  void free_timer_slot(uint32_t slot);
  std::vector<TimerSlot> _timers;         // limits::timers_max, sized at start-up
  std::vector<uint32_t> _free_timers;     // reserved at start-up
  std::vector<TimerEntry> _timer_heap;    // reserved at start-up

  int _wake_fd = -1;
  // Held open so that, out of descriptors, one can be freed to accept a
  // waiting connection and refuse it (the libev/haproxy "reserve fd").
  int _spare_fd = -1;
  std::function<void()> _on_wake;
  std::vector<std::pair<int, std::function<void()>>> _watches;
  std::vector<std::function<void()>> _before_sleep;
  bool _stopping = false;
  Stats _stats;
};

}  // namespace reactor
