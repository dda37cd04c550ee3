// The epoll backend: readiness, edge-triggered for connections. Reads go into
// one loop-wide buffer; writes are attempted at once and completed on EPOLLOUT.
// Completions found while submitting (a write that finished at once) are
// queued and reported from poll(), never from inside send().
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <vector>

#include "common/assert.hpp"
#include "reactor/backend.hpp"
#include "reactor/limits.hpp"

namespace reactor {
namespace {

// epoll_event.data.u64 layout: kind in the top 8 bits, then a 24-bit slot and
// the slot's 32-bit generation (nginx's "instance" bit, widened).
enum class Kind : uint64_t { listener = 1, watch = 2, conn = 3 };

uint64_t tag(Kind k, uint64_t value) { return (static_cast<uint64_t>(k) << 56) | (value & ((1ull << 56) - 1)); }
uint64_t conn_tag(ConnId id) { return tag(Kind::conn, (uint64_t{id.slot} << 32) | id.generation); }
Kind tag_kind(uint64_t t) { return static_cast<Kind>(t >> 56); }
uint64_t tag_value(uint64_t t) { return t & ((1ull << 56) - 1); }

class EpollBackend final : public Backend {
 public:
  EpollBackend(int epfd, size_t max_connections) : _epfd(epfd), _slots(max_connections) {
    _events.resize(limits::events_per_wait_max);
    _read_buf.resize(limits::read_chunk_bytes);
    _pending.reserve(max_connections);
    _processing.reserve(max_connections);
  }
  ~EpollBackend() override { ::close(_epfd); }

  std::string_view name() const override { return "epoll"; }

  common::Status add_listener(int fd) override {
    epoll_event ev{};
    ev.events = EPOLLIN;  // level-triggered: accept a bounded number per wake
    ev.data.u64 = tag(Kind::listener, static_cast<uint64_t>(fd));
    if (::epoll_ctl(_epfd, EPOLL_CTL_ADD, fd, &ev) < 0) return common::Error::from_errno("epoll_ctl(ADD listener)");
    return common::ok_status();
  }

  void remove_listener(int fd) override { ::epoll_ctl(_epfd, EPOLL_CTL_DEL, fd, nullptr); }

  common::Status add_watch(int fd, uint64_t token) override {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = tag(Kind::watch, token);
    if (::epoll_ctl(_epfd, EPOLL_CTL_ADD, fd, &ev) < 0) return common::Error::from_errno("epoll_ctl(ADD watch)");
    _watch_tokens_fd.emplace_back(token, fd);
    return common::ok_status();
  }

  common::Status open_connection(ConnId id, int fd) override {
    LOTTERY_ASSERT(id.slot < _slots.size());
    Slot& s = _slots[id.slot];
    s = Slot{.fd = fd, .id = id, .receiving = true};
    epoll_event ev{};
    // Edge-triggered: we always read until EAGAIN, so one wake per burst.
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.u64 = conn_tag(id);
    if (::epoll_ctl(_epfd, EPOLL_CTL_ADD, fd, &ev) < 0) return common::Error::from_errno("epoll_ctl(ADD conn)");
    return common::ok_status();
  }

  void set_receiving(ConnId id, bool on) override {
    Slot* s = slot(id);
    if (s == nullptr) return;
    bool was = s->receiving;
    s->receiving = on;
    // Edge-triggered readiness is not re-reported: when reading resumes,
    // catch up on what arrived meanwhile.
    if (on && !was) s->read_pending = true, queue(s);
  }

  void send(ConnId id, const std::byte* data, size_t size) override {
    Slot* s = slot(id);
    LOTTERY_ASSERT(s != nullptr);
    LOTTERY_ASSERT(s->send_data == nullptr);
    s->send_data = data;
    s->send_size = size;
    s->send_done = 0;
    try_write(*s);
  }

  void close_connection(ConnId id, int fd) override {
    Slot* s = slot(id);
    LOTTERY_ASSERT(s != nullptr);
    // close(2) removes the fd from the epoll set (we hold no dup of it).
    ::close(fd);
    s->fd = -1;
    s->closed = true;
    queue(s);
  }

  int poll(int timeout_ms, BackendEvents& events) override {
    int dispatched = drain_pending(events);
    int n = ::epoll_wait(_epfd, _events.data(), static_cast<int>(_events.size()), dispatched > 0 ? 0 : timeout_ms);
    if (n < 0) {
      LOTTERY_ASSERT(errno == EINTR);  // anything else is a programming error
      return dispatched;
    }
    for (int i = 0; i < n; i++) {
      uint64_t t = _events[i].data.u64;
      uint32_t ev = _events[i].events;
      switch (tag_kind(t)) {
        case Kind::listener: accept_some(static_cast<int>(tag_value(t)), events); break;
        case Kind::watch: events.on_watch(tag_value(t)); break;
        case Kind::conn: {
          uint64_t v = tag_value(t);
          ConnId id{static_cast<uint32_t>(v >> 32), static_cast<uint32_t>(v)};
          Slot* s = slot(id);
          if (s == nullptr || s->closed) break;  // stale event for a reused slot
          if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) s->read_pending = true;
          if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) s->peer_hup = true;
          if ((ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) && s->send_data != nullptr) try_write(*s);
          if (s->read_pending || s->sent_ready) queue(s);
          break;
        }
      }
      dispatched++;
    }
    return dispatched + drain_pending(events);
  }

 private:
  struct Slot {
    int fd = -1;
    ConnId id;
    bool receiving = false;
    bool read_pending = false;
    bool queued = false;
    bool closed = false;
    bool sent_ready = false;  // a finished send to report
    bool peer_hup = false;    // the peer closed or reset: read on to the EOF
    bool recv_ended = false;  // on_recv_end was reported: the stream is over
    int send_err = 0;
    const std::byte* send_data = nullptr;
    size_t send_size = 0;
    size_t send_done = 0;
  };

  Slot* slot(ConnId id) {
    if (id.slot >= _slots.size()) return nullptr;
    Slot& s = _slots[id.slot];
    return s.id == id ? &s : nullptr;
  }

  void queue(Slot* s) {
    if (!s->queued) {
      s->queued = true;
      _pending.push_back(s->id);
    }
  }

  void try_write(Slot& s) {
    while (s.send_done < s.send_size) {
      ssize_t n = ::send(s.fd, s.send_data + s.send_done, s.send_size - s.send_done, MSG_NOSIGNAL);
      if (n > 0) {
        s.send_done += static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;  // EPOLLOUT resumes
      s.send_err = n < 0 ? errno : EPIPE;
      break;
    }
    s.sent_ready = true;
    queue(&s);
  }

  // Reports queued work: finished sends, reads, releases. Reading happens
  // here so every recv completion reaches the loop from poll().
  int drain_pending(BackendEvents& events) {
    int count = 0;
    // Work queued while we report (a busy reader re-queued, a resumed
    // connection) waits for the next poll, so one peer cannot hog the loop.
    _processing.swap(_pending);
    for (size_t i = 0; i < _processing.size(); i++) {
      ConnId id = _processing[i];
      Slot* s = slot(id);
      if (s == nullptr) continue;
      s->queued = false;
      count++;
      if (s->sent_ready) {
        s->sent_ready = false;
        size_t done = s->send_done;
        int err = s->send_err;
        s->send_data = nullptr;
        s->send_size = s->send_done = 0;
        s->send_err = 0;
        events.on_sent(id, done, err);
        s = slot(id);
        if (s == nullptr) continue;
      }
      if (s->closed) {
        s->id = ConnId{};
        events.on_released(id);
        continue;
      }
      if (s->read_pending && s->receiving && !s->recv_ended) read_some(*s, events);
    }
    _processing.clear();
    return count;
  }

  void read_some(Slot& s, BackendEvents& events) {
    ConnId id = s.id;
    // Bounded per wake so one busy peer cannot starve the others; the slot is
    // re-queued if data may remain.
    for (int round = 0; round < 16; round++) {
      ssize_t n = ::recv(s.fd, _read_buf.data(), _read_buf.size(), 0);
      if (n > 0) {
        events.on_recv(id, {_read_buf.data(), static_cast<size_t>(n)});
        Slot* again = slot(id);
        if (again == nullptr || again->closed || !again->receiving) return;
        if (static_cast<size_t>(n) < _read_buf.size() && !again->peer_hup) {
          // A short read on a stream socket means the socket is drained
          // (edge-triggered epoll reports new data as a new edge).
          again->read_pending = false;
          return;
        }
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        s.read_pending = false;
        return;
      }
      s.read_pending = false;
      // Reported once: a later edge (EPOLLHUP after EPOLLIN) must not read
      // the socket again and report a second end.
      s.recv_ended = true;
      events.on_recv_end(id, n == 0 ? 0 : errno);
      return;
    }
    queue(&s);
  }

  void accept_some(int listen_fd, BackendEvents& events) {
    for (int i = 0; i < 64; i++) {
      int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd >= 0) {
        events.on_accept(listen_fd, fd);
        continue;
      }
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      if (errno == EINTR || errno == ECONNABORTED) continue;
      // Out of descriptors (or another error): the listener stays readable,
      // so unless the loop drains the connection some other way the next
      // wake would fail the same way at once, a busy loop.
      if (!events.on_accept_error(listen_fd, errno)) return;
    }
  }

  int _epfd;
  std::vector<Slot> _slots;
  std::vector<epoll_event> _events;
  std::vector<std::byte> _read_buf;
  std::vector<ConnId> _pending;
  std::vector<ConnId> _processing;
  std::vector<std::pair<uint64_t, int>> _watch_tokens_fd;
};

}  // namespace

common::Result<std::unique_ptr<Backend>> make_epoll_backend(size_t max_connections) {
  int epfd = ::epoll_create1(EPOLL_CLOEXEC);
  if (epfd < 0) return common::Error::from_errno("epoll_create1");
  return std::unique_ptr<Backend>(new EpollBackend(epfd, max_connections));
}

}  // namespace reactor
