#include "reactor/reactor.hpp"

#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/assert.hpp"

namespace reactor {

namespace {
// Backends carry at least 48 bits of token; user watches count up from 0.
constexpr uint64_t wake_token = (uint64_t{1} << 48) - 1;
}

const char* close_reason_name(CloseReason r) {
  switch (r) {
    case CloseReason::peer_closed: return "peer_closed";
    case CloseReason::io_error: return "io_error";
    case CloseReason::local: return "local";
    case CloseReason::input_overflow: return "input_overflow";
    case CloseReason::shutdown: return "shutdown";
  }
  return "unknown";
}

common::Result<std::unique_ptr<Reactor>> Reactor::create(BackendKind kind, Options options) {
  LOTTERY_ASSERT(options.max_connections > 0);
  LOTTERY_ASSERT(options.output_pause_bytes > 0);
  LOTTERY_ASSERT(options.output_pause_bytes < limits::output_buffer_bytes);
  auto backend = kind == BackendKind::epoll ? make_epoll_backend(options.max_connections)
                                            : make_uring_backend(options.max_connections);
  if (!backend) return backend.error();
  std::unique_ptr<Reactor> r(new Reactor(std::move(*backend), options));
  r->_wake_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (r->_wake_fd < 0) return common::Error::from_errno("eventfd");
  if (auto st = r->_backend->add_watch(r->_wake_fd, wake_token); !st) return st.error();
  r->_spare_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (r->_spare_fd < 0) return common::Error::from_errno("open(/dev/null) for the spare descriptor");
  return r;
}

Reactor::Reactor(std::unique_ptr<Backend> backend, Options options)
    : _backend(std::move(backend)), _options(options) {
  // Connection slots are sized once, at start-up.
  _conns.resize(options.max_connections);
  _free_slots.reserve(options.max_connections);
  for (size_t i = options.max_connections; i-- > 0;) _free_slots.push_back(static_cast<uint32_t>(i));
  _dirty.reserve(options.max_connections);
  _timers.resize(limits::timers_max);
  _free_timers.reserve(limits::timers_max);
  for (size_t i = limits::timers_max; i-- > 0;) _free_timers.push_back(static_cast<uint32_t>(i));
  _timer_heap.reserve(limits::timers_max);
  _before_sleep.reserve(limits::before_sleep_hooks_max);
}

Reactor::~Reactor() {
  for (int fd : _listeners) ::close(fd);
  for (auto& c : _conns)
    if (c.fd >= 0) ::close(c.fd);
  if (_wake_fd >= 0) ::close(_wake_fd);
  if (_spare_fd >= 0) ::close(_spare_fd);
}

uint64_t Reactor::now_ms() {
  struct timespec ts {};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000u + static_cast<uint64_t>(ts.tv_nsec) / 1000000u;
}

// ---------------------------------------------------------------- listeners

common::Status Reactor::add_listener(int fd) {
  if (auto st = _backend->add_listener(fd); !st) return st;
  _listeners.push_back(fd);
  return common::ok_status();
}

void Reactor::stop_accepting() {
  for (int fd : _listeners) {
    _backend->remove_listener(fd);
    ::close(fd);
  }
  _listeners.clear();
}

// The peer gets the refusal message, if the socket takes it at once (a fresh
// socket has an empty send buffer), and sees the connection close.
void Reactor::refuse(int conn_fd) {
  _stats.refused_full++;
  if (!_refusal.empty()) (void)::send(conn_fd, _refusal.data(), _refusal.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
  ::close(conn_fd);
}

void Reactor::on_accept(int /*listen_fd*/, int conn_fd) {
  if (_free_slots.empty()) return refuse(conn_fd);  // over the connection cap
  uint32_t slot = _free_slots.back();
  _free_slots.pop_back();
  Conn& c = _conns[slot];
  LOTTERY_ASSERT(c.state == State::free);
  LOTTERY_ASSERT(c.in == nullptr && c.out == nullptr);
  c = Conn{.fd = conn_fd, .generation = c.generation, .state = State::open};
  ConnId id{slot, c.generation};
  if (auto st = _backend->open_connection(id, conn_fd); !st) {
    ::close(conn_fd);
    c.fd = -1;
    c.state = State::free;
    _free_slots.push_back(slot);
    return;
  }
  c.receiving = true;
  _open_count++;
  _stats.accepted++;
  if (_handler) _handler->on_open(id);
}

// Out of descriptors, a waiting connection can be neither accepted nor left
// (the listener would report it again at once, forever). Free the spare, take
// the connection with it, refuse it, and take the spare back: the peer learns
// why instead of hanging, and the loop does not spin.
bool Reactor::on_accept_error(int listen_fd, int err) {
  if (err != EMFILE && err != ENFILE) return false;
  if (_spare_fd >= 0) {
    ::close(_spare_fd);
    _spare_fd = -1;
  }
  int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd >= 0) {
    _stats.refused_no_fd++;
    refuse(fd);
  }
  _spare_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  return fd >= 0;
}

// ---------------------------------------------------------------- lookup

Reactor::Conn* Reactor::lookup(ConnId id) {
  if (id.slot >= _conns.size()) return nullptr;
  Conn& c = _conns[id.slot];
  if (c.generation != id.generation || c.state != State::open) return nullptr;
  return &c;
}

const Reactor::Conn* Reactor::lookup(ConnId id) const {
  if (id.slot >= _conns.size()) return nullptr;
  const Conn& c = _conns[id.slot];
  if (c.generation != id.generation || c.state != State::open) return nullptr;
  return &c;
}

bool Reactor::is_open(ConnId id) const { return lookup(id) != nullptr; }

// ---------------------------------------------------------------- input

void Reactor::on_recv(ConnId id, std::span<const std::byte> data) {
  Conn* c = lookup(id);
  if (c == nullptr) return;  // stale completion, or closing: drop
  _stats.bytes_in += data.size();
  if (c->in_len == 0) {
    // Fast path: hand the backend's buffer straight to the handler and keep
    // only what it leaves.
    size_t used = _handler ? _handler->on_data(id, data) : data.size();
    LOTTERY_ASSERT(used <= data.size());
    c = lookup(id);
    if (c == nullptr) return;  // handler closed it
    size_t rest = data.size() - used;
    if (rest == 0) return;
    if (rest > limits::input_buffer_bytes) {
      begin_close(id, *c, CloseReason::input_overflow);
      return;
    }
    c->in = _input_pool.acquire();
    std::memcpy(c->in, data.data() + used, rest);
    c->in_len = rest;
    return;
  }
  if (limits::input_buffer_bytes - c->in_len < data.size()) {
    // Only a peer that keeps sending while its replies pile up gets here.
    begin_close(id, *c, CloseReason::input_overflow);
    return;
  }
  std::memcpy(c->in + c->in_len, data.data(), data.size());
  c->in_len += data.size();
  deliver(id, *c);
}

void Reactor::deliver(ConnId id, Conn& c) {
  if (c.in_len == 0 || _handler == nullptr) return;
  size_t used = _handler->on_data(id, {c.in, c.in_len});
  Conn* cp = lookup(id);
  if (cp == nullptr) return;
  LOTTERY_ASSERT(used <= cp->in_len);
  if (used == cp->in_len) {
    _input_pool.release(cp->in);
    cp->in = nullptr;
    cp->in_len = 0;
  } else if (used > 0) {
    std::memmove(cp->in, cp->in + used, cp->in_len - used);
    cp->in_len -= used;
  }
}

void Reactor::on_recv_end(ConnId id, int err) {
  Conn* c = lookup(id);
  if (c == nullptr) return;
  // Whatever is queued for the peer still goes out: a client may half-close
  // after its last request and wait for the replies.
  close(id, Flush::yes, err == 0 ? CloseReason::peer_closed : CloseReason::io_error);
}

void Reactor::pause_reading(ConnId id) {
  if (Conn* c = lookup(id)) {
    c->paused_by_handler = true;
    update_receiving(id, *c);
  }
}

void Reactor::resume_reading(ConnId id) {
  if (Conn* c = lookup(id)) {
    c->paused_by_handler = false;
    update_receiving(id, *c);
    deliver(id, *c);
  }
}

void Reactor::update_receiving(ConnId id, Conn& c) {
  bool want = c.state == State::open && !c.paused_by_handler && !c.paused_by_output;
  if (want != c.receiving) {
    c.receiving = want;
    _backend->set_receiving(id, want);
  }
}

// ---------------------------------------------------------------- output

size_t Reactor::send_space(ConnId id) const {
  const Conn* c = lookup(id);
  if (c == nullptr) return 0;
  if (c->out == nullptr) return limits::output_buffer_bytes;
  // While a send is in flight its bytes must not move, so only the tail is free.
  if (c->send_in_flight) return limits::output_buffer_bytes - c->out_tail;
  return limits::output_buffer_bytes - (c->out_tail - c->out_head);
}

std::byte* Reactor::reserve_send(ConnId id, size_t size) {
  Conn* c = lookup(id);
  if (c == nullptr || size > send_space(id)) return nullptr;
  if (c->out == nullptr) {
    c->out = _output_pool.acquire();
    c->out_head = c->out_sending = c->out_tail = 0;
  } else if (!c->send_in_flight && c->out_head > 0) {
    size_t live = c->out_tail - c->out_head;
    std::memmove(c->out, c->out + c->out_head, live);
    c->out_head = c->out_sending = 0;
    c->out_tail = live;
  }
  LOTTERY_ASSERT(limits::output_buffer_bytes - c->out_tail >= size);
  return c->out + c->out_tail;
}

void Reactor::commit_send(ConnId id, size_t size) {
  Conn* c = lookup(id);
  LOTTERY_ASSERT(c != nullptr);
  LOTTERY_ASSERT(c->out != nullptr);
  LOTTERY_ASSERT(c->out_tail + size <= limits::output_buffer_bytes);
  c->out_tail += size;
  if (!c->dirty) {
    c->dirty = true;
    _dirty.push_back(id);
  }
  if (!c->paused_by_output && c->out_tail - c->out_head > _options.output_pause_bytes) {
    c->paused_by_output = true;
    update_receiving(id, *c);
  }
}

bool Reactor::send(ConnId id, std::span<const std::byte> bytes) {
  std::byte* dst = reserve_send(id, bytes.size());
  if (dst == nullptr) return false;
  std::memcpy(dst, bytes.data(), bytes.size());
  commit_send(id, bytes.size());
  return true;
}

void Reactor::flush_dirty() {
  // Replies produced by a whole batch of completions leave in one send per
  // connection.
  for (size_t i = 0; i < _dirty.size(); i++) {
    ConnId id = _dirty[i];
    Conn& c = _conns[id.slot];
    if (c.generation != id.generation) continue;
    c.dirty = false;
    if (c.state == State::open && !c.send_in_flight) start_send(id, c);
    if (c.state == State::closing && !c.send_in_flight) finish_close(id, c);
  }
  _dirty.clear();
}

void Reactor::start_send(ConnId id, Conn& c) {
  if (c.out == nullptr || c.out_tail == c.out_head) return;
  LOTTERY_ASSERT(!c.send_in_flight);
  if (c.out_head > 0) {
    // Unsent bytes move to the front before a send pins them: while it is in
    // flight only the room after out_tail is free (send_space), and a
    // connection that resumes reading with its room stuck behind a pinned
    // tail would pile input up until input_overflow.
    size_t live = c.out_tail - c.out_head;
    std::memmove(c.out, c.out + c.out_head, live);
    c.out_head = c.out_sending = 0;
    c.out_tail = live;
  }
  c.send_in_flight = true;
  c.out_sending = c.out_tail;
  _backend->send(id, c.out + c.out_head, c.out_sending - c.out_head);
}

void Reactor::release_output_if_empty(Conn& c) {
  if (c.out != nullptr && c.out_head == c.out_tail && !c.send_in_flight) {
    _output_pool.release(c.out);
    c.out = nullptr;
    c.out_head = c.out_sending = c.out_tail = 0;
  }
}

void Reactor::on_sent(ConnId id, size_t bytes, int err) {
  if (id.slot >= _conns.size()) return;
  Conn& c = _conns[id.slot];
  if (c.generation != id.generation || !c.send_in_flight) return;
  c.send_in_flight = false;
  if (c.state == State::releasing) {
    // Aborted while this send was in flight: nothing more goes out.
    c.out_head = c.out_tail;
    release_output_if_empty(c);
    return;
  }
  if (err != 0) {
    c.out_head = c.out_tail;  // nothing more can reach this peer
    release_output_if_empty(c);
    if (c.state == State::open) {
      begin_close(id, c, CloseReason::io_error);
    } else if (c.state == State::closing) {
      finish_close(id, c);
    }
    return;
  }
  _stats.bytes_out += bytes;
  c.out_head += bytes;
  LOTTERY_ASSERT(c.out_head <= c.out_sending);
  if (c.out_head < c.out_tail) {
    // The rest of this range, and whatever came since, leave with the
    // iteration's flush, after the before-sleep hooks: replies queued by
    // completions reaped in this same poll must not overtake what those hooks
    // write first (the log lines that report them, a sync).
    if (!c.dirty) {
      c.dirty = true;
      _dirty.push_back(id);
    }
  } else {
    c.out_head = c.out_sending = c.out_tail = 0;
    release_output_if_empty(c);
  }
  if (c.state == State::closing) {
    if (!c.dirty) finish_close(id, c);  // else flush_dirty sends the rest, then closes
    return;
  }
  if (c.state != State::open) return;
  if (c.paused_by_output && c.out_tail - c.out_head <= _options.output_pause_bytes / 2) {
    c.paused_by_output = false;
    update_receiving(id, c);
    // Input held back while the output was full gets its turn now.
    deliver(id, c);
  }
  // A handler with input of its own (decrypted bytes a TLS layer holds) gets
  // its turn too; one virtual call per completed send, a no-op for plaintext.
  if (_handler != nullptr && lookup(id) != nullptr) _handler->on_output_drained(id);
}

bool Reactor::peer_address(ConnId id, sockaddr_storage& out) const {
  const Conn* c = lookup(id);
  if (c == nullptr || c->fd < 0) return false;
  socklen_t len = sizeof out;
  return ::getpeername(c->fd, reinterpret_cast<sockaddr*>(&out), &len) == 0;
}

// ---------------------------------------------------------------- closing

void Reactor::close(ConnId id, Flush flush, CloseReason reason) {
  Conn* c = lookup(id);
  if (c == nullptr) return;
  if (flush == Flush::no) {
    // A send in flight keeps its bytes (the backend points at them); only
    // what was not handed over yet is dropped.
    if (c->send_in_flight) {
      c->out_tail = c->out_sending;
    } else {
      c->out_head = c->out_tail;
      release_output_if_empty(*c);
    }
  }
  begin_close(id, *c, reason);
}

size_t Reactor::queued_output(ConnId id) const {
  const Conn* c = lookup(id);
  return c == nullptr || c->out == nullptr ? 0 : c->out_tail - c->out_head;
}

void Reactor::abort(ConnId id) {
  if (id.slot >= _conns.size()) return;
  Conn& c = _conns[id.slot];
  if (c.generation != id.generation) return;
  if (c.state == State::open) close(id, Flush::no);  // may release at once: nothing left to send
  if (c.state != State::closing) return;
  // Whatever is unsent is dropped. A send in flight still points into the
  // output buffer, which goes back to the pool once the backend lets go of it.
  if (c.send_in_flight) {
    c.out_tail = c.out_sending;
  } else {
    c.out_head = c.out_tail;
    release_output_if_empty(c);
  }
  c.state = State::releasing;
  _backend->close_connection(id, c.fd);
  c.fd = -1;
}

void Reactor::close_all(CloseReason reason) {
  for (uint32_t slot = 0; slot < _conns.size(); slot++) {
    Conn& c = _conns[slot];
    if (c.state == State::open) begin_close(ConnId{slot, c.generation}, c, reason);
  }
}

void Reactor::begin_close(ConnId id, Conn& c, CloseReason reason) {
  LOTTERY_ASSERT(c.state == State::open);
  c.state = State::closing;
  c.close_reason = reason;
  if (c.receiving) {
    c.receiving = false;
    _backend->set_receiving(id, false);
  }
  if (c.in != nullptr) {
    _input_pool.release(c.in);
    c.in = nullptr;
    c.in_len = 0;
  }
  _open_count--;
  if (_handler) _handler->on_close(id, reason);
  // Queued output (if any) is flushed first; finish_close runs when it is out.
  if (!c.send_in_flight && !c.dirty) finish_close(id, c);
}

void Reactor::finish_close(ConnId id, Conn& c) {
  LOTTERY_ASSERT(c.state == State::closing);
  if (c.out != nullptr && c.out_head < c.out_tail && !c.send_in_flight) {
    start_send(id, c);
    return;
  }
  if (c.send_in_flight) return;
  c.state = State::releasing;
  _backend->close_connection(id, c.fd);
  c.fd = -1;
}

void Reactor::on_released(ConnId id) {
  if (id.slot >= _conns.size()) return;
  Conn& c = _conns[id.slot];
  if (c.generation != id.generation || c.state != State::releasing) return;
  c.out_head = c.out_tail;
  c.send_in_flight = false;
  release_output_if_empty(c);
  LOTTERY_ASSERT(c.in == nullptr);
  c.state = State::free;
  // A new generation makes every outstanding ConnId for this slot stale.
  c.generation++;
  _free_slots.push_back(id.slot);
  _stats.closed++;
}

// ---------------------------------------------------------------- timers, watches

namespace {
bool later(const auto& a, const auto& b) { return a.deadline_ms > b.deadline_ms; }
}  // namespace

bool Reactor::timer_entry_live(const TimerEntry& e) const {
  const TimerSlot& t = _timers[e.slot];
  return t.armed && t.generation == e.generation;
}

void Reactor::free_timer_slot(uint32_t slot) {
  TimerSlot& t = _timers[slot];
  LOTTERY_ASSERT(t.armed);
  t.armed = false;
  t.generation++;
  if (t.generation == 0) t.generation = 1;  // ids are never 0
  _free_timers.push_back(slot);
}

Reactor::TimerId Reactor::add_timer(uint64_t delay_ms, TimerCallback callback) {
  // Running out of slots is a programmer error: timers_max is far above what
  // any caller keeps armed.
  LOTTERY_ASSERT(!_free_timers.empty());
  if (_timer_heap.size() >= limits::timers_max) {
    // Cancelled timers stay in the heap until their deadline; drop them now
    // rather than fail a caller that adds and cancels often. At most
    // timers_max - 1 are live (a slot is free), so this makes room.
    std::erase_if(_timer_heap, [this](const TimerEntry& e) { return !timer_entry_live(e); });
    std::make_heap(_timer_heap.begin(), _timer_heap.end(), later<TimerEntry, TimerEntry>);
  }
  LOTTERY_ASSERT(_timer_heap.size() < limits::timers_max);
  uint32_t slot = _free_timers.back();
  _free_timers.pop_back();
  TimerSlot& t = _timers[slot];
  LOTTERY_ASSERT(!t.armed);
  t.armed = true;
  t.callback = callback;
  _timer_heap.push_back(TimerEntry{now_ms() + delay_ms, slot, t.generation});
  std::push_heap(_timer_heap.begin(), _timer_heap.end(), later<TimerEntry, TimerEntry>);
  return (uint64_t{t.generation} << 32) | slot;
}

void Reactor::cancel_timer(TimerId id) {
  uint64_t slot = id & 0xffff'ffffu;
  if (slot >= _timers.size()) return;
  TimerSlot& t = _timers[slot];
  if (!t.armed || t.generation != static_cast<uint32_t>(id >> 32)) return;  // fired, or cancelled already
  free_timer_slot(static_cast<uint32_t>(slot));
}

int Reactor::next_timeout_ms() {
  if (_stopping) return 0;
  if (_timer_heap.empty()) return -1;
  uint64_t now = now_ms();
  uint64_t deadline = _timer_heap.front().deadline_ms;
  return deadline <= now ? 0 : static_cast<int>(std::min<uint64_t>(deadline - now, 60'000));
}

void Reactor::run_timers() {
  uint64_t now = now_ms();
  while (!_timer_heap.empty() && _timer_heap.front().deadline_ms <= now) {
    std::pop_heap(_timer_heap.begin(), _timer_heap.end(), later<TimerEntry, TimerEntry>);
    TimerEntry e = _timer_heap.back();
    _timer_heap.pop_back();
    if (!timer_entry_live(e)) continue;  // cancelled
    // Freed before the call, so the callback may arm timers (itself again).
    TimerCallback callback = _timers[e.slot].callback;
    free_timer_slot(e.slot);
    callback();
  }
}

common::Status Reactor::watch_fd(int fd, std::function<void()> callback) {
  uint64_t token = _watches.size();
  if (auto st = _backend->add_watch(fd, token); !st) return st;
  _watches.emplace_back(fd, std::move(callback));
  return common::ok_status();
}

void Reactor::add_before_sleep(std::function<void()> callback) {
  LOTTERY_ASSERT(_before_sleep.size() < limits::before_sleep_hooks_max);
  _before_sleep.push_back(std::move(callback));
}

void Reactor::wake() {
  uint64_t one = 1;
  // write(2) is async-signal-safe; a full counter already means "wake".
  ssize_t n = ::write(_wake_fd, &one, sizeof one);
  (void)n;
}

void Reactor::on_watch(uint64_t token) {
  if (token == wake_token) {
    uint64_t count;
    while (::read(_wake_fd, &count, sizeof count) > 0) {
    }
    if (_on_wake) _on_wake();
    return;
  }
  LOTTERY_ASSERT(token < _watches.size());
  _watches[token].second();
}

// ---------------------------------------------------------------- loop

void Reactor::run() {
  _stopping = false;
  while (!_stopping) {
    // Completions first, then timers, then one flush of all replies.
    _backend->poll(_dirty.empty() ? next_timeout_ms() : 0, *this);
    run_timers();
    for (auto& hook : _before_sleep) hook();
    flush_dirty();
  }
  flush_dirty();
}

}  // namespace reactor
