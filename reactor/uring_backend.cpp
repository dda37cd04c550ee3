// The io_uring backend: completions instead of readiness, in the manner of
// liburing's examples (io_uring-udp.c, proxy.c).
//
//   listeners    one multishot accept each (kernel 5.19), re-armed when it ends
//   connections  one multishot recv each (6.0; single-shot re-armed after every
//                completion on older kernels), taking buffers from a ring of
//                provided buffers shared by all connections (5.19); one
//                IORING_OP_SEND at a time (5.6), continued here when short
//   watches      one multishot poll each (5.13)
//   hang-ups     one single-shot poll for POLLRDHUP per connection with a
//                multishot recv (see on_hangup_done: a kernel race)
//
// The calls the loop makes (send, set_receiving, close_connection...) only
// record what they want. poll() turns that into SQEs, submits them with the
// same io_uring_enter that waits, and reaps the whole batch of CQEs before
// advancing the CQ once; every callback into BackendEvents comes from there.
// So between two polls the SQ is empty: every SQE naming a descriptor is in
// the kernel, which holds its own reference to the file, and close(2) on that
// descriptor cannot make a queued SQE hit a different socket that reused the
// number.
//
// Received bytes never skip the queue: each completion's buffer is appended
// to its connection's list of held buffers and delivered from the head of that
// list, so bytes that arrive after set_receiving(false) (a multishot recv may
// post completions until its cancel lands) wait there, in order, until
// receiving resumes.
//
// Minimum kernel 5.19 (provided-buffer rings, multishot accept). Nothing is
// allocated after start-up: slots, buffers and work lists are sized here.
#include "reactor/uring_backend.hpp"

#include <liburing.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "common/assert.hpp"
#include "reactor/backend.hpp"
#include "reactor/limits.hpp"

namespace reactor {
namespace {

// user_data layout: the operation in the top 8 bits, a 24-bit index (a
// connection slot, a listener or a watch), then the 32-bit generation of what
// the index names, as in the epoll backend's tags.
enum class Op : uint8_t {
  accept = 1,
  accept_cancel,
  watch,
  recv,
  recv_cancel,
  send,
  send_cancel,
  hangup,
  hangup_cancel
};

constexpr unsigned index_bits = 24;
constexpr uint32_t index_limit = uint32_t{1} << index_bits;
constexpr uint16_t buffer_group = 0;
// A connection has at most a recv, a send, a hang-up poll and a cancel for
// each in flight.
constexpr uint8_t ops_per_connection_max = 6;

struct Tag {
  Op op;
  uint32_t index;
  uint32_t generation;
};

uint64_t make_tag(Op op, uint32_t index, uint32_t generation) {
  return (uint64_t{static_cast<uint8_t>(op)} << 56) | (uint64_t{index} << 32) | generation;
}

Tag parse_tag(uint64_t t) {
  return Tag{static_cast<Op>(t >> 56), static_cast<uint32_t>(t >> 32) & (index_limit - 1), static_cast<uint32_t>(t)};
}

std::string errno_text(int err) {
  const char* name = ::strerrorname_np(err);
  return std::string(name != nullptr ? name : "errno " + std::to_string(err)) + " (" + std::strerror(err) + ")";
}

// A failure of io_uring_enter on a ring that worked until now is a
// programming error (wrong thread, corrupt ring): abort naming the call.
[[noreturn]] void fail_syscall(const char* call, int err) {
  static char what[192];
  std::snprintf(what, sizeof what, "%s: %s", call, std::strerror(err));
  common::assert_fail(what, __FILE__, __LINE__, __func__);
}

struct Slot {
  ConnId id;  // invalid while the slot is free
  int fd = -1;
  // What the loop asked for.
  bool receiving = false;
  bool closed = false;
  // Operations in the kernel.
  bool recv_armed = false;
  bool recv_multishot = false;
  bool recv_cancel_armed = false;
  bool send_armed = false;
  bool send_cancel_armed = false;
  bool hangup_armed = false;
  bool hangup_cancel_armed = false;
  uint8_t outstanding = 0;  // operations whose last completion is not reaped yet
  // SQEs owed to the kernel at the next poll.
  bool want_recv = false;
  bool want_recv_cancel = false;
  bool want_send = false;
  bool want_hangup = false;
  bool starved = false;      // its recv ended with ENOBUFS: re-armed once buffers come back
  bool hangup_seen = false;  // the peer closed or reset: single-shot receives from now on
  // Received, not yet delivered: buffer ids in arrival order (linked through
  // UringBackend::_buffer_next), then possibly the end of the stream.
  int32_t held_head = -1;
  int32_t held_tail = -1;
  bool end_seen = false;
  bool end_reported = false;
  int end_err = 0;
  // The send in progress.
  const std::byte* send_data = nullptr;
  size_t send_size = 0;
  size_t send_done = 0;
  // Membership of the work lists. The lists hold slot indices, and these
  // flags outlive a reuse of the slot so no index is ever listed twice.
  bool in_todo = false;
  bool in_ready = false;
  bool in_starved = false;
};

struct Listener {
  int fd = -1;
  uint32_t generation = 0;
  bool active = false;  // between add_listener and remove_listener
  bool accept_armed = false;
  bool cancel_armed = false;
  bool want_accept = false;
  bool want_cancel = false;
  uint8_t outstanding = 0;
};

struct Watch {
  int fd = -1;
  uint64_t token = 0;
  bool armed = false;
  bool want_arm = false;
};

class UringBackend final : public Backend {
 public:
  UringBackend(size_t max_connections, const UringTuning& tuning)
      : _multishot_recv(tuning.multishot_recv),
        _counters(tuning.counters != nullptr ? tuning.counters : &_own_counters),
        _buffer_count(tuning.buffer_count),
        _buffer_bytes(tuning.buffer_bytes),
        _buffer_next(tuning.buffer_count, -1),
        _buffer_len(tuning.buffer_count, 0),
        _buffer_in_ring(tuning.buffer_count, 0),
        _slots(max_connections) {
    _todo.reserve(max_connections);
    _ready.reserve(max_connections);
    _ready_now.reserve(max_connections);
    _starved.reserve(max_connections);
    _fds_to_close.reserve(max_connections);
  }

  ~UringBackend() override {
    for (int fd : _fds_to_close) ::close(fd);
    // Closing the ring cancels whatever is still in flight; the buffers are
    // unmapped only after that.
    if (_ring_ready) io_uring_queue_exit(&_ring);
    if (_buffer_ring != nullptr) ::munmap(_buffer_ring, _buffer_ring_bytes);
    if (_buffers != nullptr) ::munmap(_buffers, _buffer_count * _buffer_bytes);
  }

  UringBackend(const UringBackend&) = delete;
  UringBackend& operator=(const UringBackend&) = delete;

  common::Status init() {
    if (auto st = setup_ring(); !st) return st;
    if (auto st = check_kernel(); !st) return st;
    return setup_buffers();
  }

  std::string_view name() const override { return "io_uring"; }

  common::Status add_listener(int fd) override {
    for (size_t i = 0; i < _listeners.size(); i++) {
      Listener& l = _listeners[i];
      if (l.active || l.outstanding > 0) continue;
      l.fd = fd;
      l.generation++;
      l.active = true;
      l.want_accept = true;
      l.want_cancel = false;
      _listeners_dirty = true;
      return common::ok_status();
    }
    return common::Error::make(EMFILE, "add_listener: more than " + std::to_string(limits::uring_listeners_max) +
                                           " listening sockets (limits::uring_listeners_max)");
  }

  void remove_listener(int fd) override {
    for (Listener& l : _listeners) {
      if (!l.active || l.fd != fd) continue;
      // The caller closes fd next; an armed accept holds its own reference
      // and ends once the cancel is submitted. Connections it accepts
      // meanwhile are closed on arrival.
      l.active = false;
      l.want_accept = false;
      if (l.accept_armed) {
        l.want_cancel = true;
        _listeners_dirty = true;
      }
    }
  }

  common::Status add_watch(int fd, uint64_t token) override {
    if (_watch_count == _watches.size())
      return common::Error::make(EMFILE, "add_watch: more than " + std::to_string(limits::uring_watches_max) +
                                             " watched descriptors (limits::uring_watches_max)");
    _watches[_watch_count++] = Watch{.fd = fd, .token = token, .armed = false, .want_arm = true};
    _watches_dirty = true;
    return common::ok_status();
  }

  common::Status open_connection(ConnId id, int fd) override {
    LOTTERY_ASSERT(id.slot < _slots.size());
    Slot& s = _slots[id.slot];
    // The loop reuses a slot only after on_released, when nothing is in flight.
    LOTTERY_ASSERT(!s.id.valid());
    LOTTERY_ASSERT(s.outstanding == 0);
    LOTTERY_ASSERT(s.held_head < 0);
    reset(s);
    s.id = id;
    s.fd = fd;
    s.receiving = true;
    s.want_recv = true;
    s.want_hangup = _multishot_recv;
    push_todo(id.slot);
    return common::ok_status();
  }

  void set_receiving(ConnId id, bool on) override {
    Slot* s = slot(id);
    if (s == nullptr || s->closed || s->receiving == on) return;
    s->receiving = on;
    if (!on) {
      s->want_recv = false;
      // A multishot recv keeps posting until cancelled; what it posts before
      // the cancel lands is held. A single-shot one posts at most once more.
      if (s->recv_armed && s->recv_multishot && !s->recv_cancel_armed) {
        s->want_recv_cancel = true;
        push_todo(id.slot);
      }
      return;
    }
    // A cancel not submitted yet is dropped: the recv simply carries on
    // (unless the peer hung up, see on_hangup_done).
    if (!s->hangup_seen) s->want_recv_cancel = false;
    if (s->held_head >= 0 || (s->end_seen && !s->end_reported)) push_ready(id.slot);
    if (can_arm_recv(*s)) {
      s->want_recv = true;
      push_todo(id.slot);
    }
  }

  void send(ConnId id, const std::byte* data, size_t size) override {
    Slot* s = slot(id);
    LOTTERY_ASSERT(s != nullptr);
    LOTTERY_ASSERT(!s->closed);
    LOTTERY_ASSERT(s->send_data == nullptr);
    LOTTERY_ASSERT(size > 0);
    s->send_data = data;
    s->send_size = size;
    s->send_done = 0;
    s->want_send = true;
    push_todo(id.slot);
  }

  void close_connection(ConnId id, int fd) override {
    Slot* s = slot(id);
    LOTTERY_ASSERT(s != nullptr);
    LOTTERY_ASSERT(!s->closed);
    LOTTERY_ASSERT(s->fd == fd);
    s->closed = true;
    s->receiving = false;
    s->want_recv = s->want_recv_cancel = s->want_send = s->want_hangup = false;
    drop_held(*s);
    // Operations in flight hold their own reference to the socket, so it
    // stays open (no FIN yet) until their cancels, queued here, complete.
    if (io_uring_sq_ready(&_ring) == 0) {
      ::close(fd);
    } else {
      // The kernel refused part of the last batch (memory pressure): an SQE
      // still queued may name fd, so its number must not be reused yet.
      _fds_to_close.push_back(fd);
    }
    s->fd = -1;
    push_todo(id.slot);   // cancels
    push_ready(id.slot);  // on_released, once nothing is in flight
  }

  int poll(int timeout_ms, BackendEvents& events) override {
    if (!_enabled) enable_ring();
    int dispatched = run_ready(events);
    queue_work();
    submit_and_wait(dispatched > 0 || !_ready.empty() ? 0 : timeout_ms);
    if (!_fds_to_close.empty() && io_uring_sq_ready(&_ring) == 0) {
      for (int fd : _fds_to_close) ::close(fd);
      _fds_to_close.clear();
    }
    return dispatched + reap(events);
  }

 private:
  // ------------------------------------------------------------ set-up

  common::Status setup_ring() {
    // Most capable flags first; a kernel that lacks one answers EINVAL and
    // the next set is tried.
    //   IORING_SETUP_SINGLE_ISSUER (6.0): only the loop's thread submits.
    //   IORING_SETUP_DEFER_TASKRUN (6.1): completion work runs when the loop
    //     enters the kernel to wait, never by interrupting it.
    //   IORING_SETUP_COOP_TASKRUN (5.19): no IPI to run completion work.
    //   IORING_SETUP_SUBMIT_ALL (5.18): one bad SQE does not stop its batch.
    //   IORING_SETUP_R_DISABLED (5.10): the ring starts disabled, so the
    //     thread that polls first (the loop's, not necessarily this one)
    //     becomes its single issuer.
    //   IORING_SETUP_CQSIZE (5.5): a CQ larger than the SQ, for multishot.
    constexpr unsigned base = IORING_SETUP_CQSIZE | IORING_SETUP_R_DISABLED;
    constexpr unsigned attempts[] = {
        base | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SINGLE_ISSUER |
            IORING_SETUP_DEFER_TASKRUN,
        base | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SINGLE_ISSUER,
        base | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN,
        base,
    };
    int ret = -EINVAL;
    for (unsigned flags : attempts) {
      io_uring_params params{};
      params.flags = flags;
      params.cq_entries = limits::uring_cq_entries;
      // io_uring_setup(2) (5.1).
      ret = io_uring_queue_init_params(limits::uring_sq_entries, &_ring, &params);
      if (ret == 0) {
        _ring_ready = true;
        _features = params.features;
        return common::ok_status();
      }
      if (ret != -EINVAL) break;
    }
    const char* hint = "";
    switch (-ret) {
      case EPERM:
        hint = "io_uring is blocked here (seccomp filter, or sysctl kernel.io_uring_disabled)";
        break;
      case ENOSYS:
        hint = "this kernel is built without io_uring";
        break;
      case ENOMEM:
        hint = "raise RLIMIT_MEMLOCK (kernels before 5.12 charge rings to it)";
        break;
      case EINVAL:
        hint = "this kernel is too old (5.19 needed)";
        break;
      default:
        hint = "io_uring is unavailable";
        break;
    }
    return common::Error::make(-ret, "io_uring_setup: " + errno_text(-ret) + ": " + hint + "; use --io=epoll");
  }

  common::Status check_kernel() {
    // IORING_FEAT_NODROP (5.5): a full CQ never loses a completion.
    // IORING_FEAT_FAST_POLL (5.7): socket operations wait on an internal poll,
    //   not in worker threads.
    // IORING_FEAT_EXT_ARG (5.11): the wait carries its own timeout, so no
    //   timeout SQE (and no foreign completion) is ever needed.
    constexpr unsigned needed = IORING_FEAT_NODROP | IORING_FEAT_FAST_POLL | IORING_FEAT_EXT_ARG;
    if ((_features & needed) != needed)
      return common::Error::make(ENOTSUP,
                                 "io_uring_setup: the kernel lacks NODROP, FAST_POLL or EXT_ARG "
                                 "(5.19 needed); use --io=epoll");
    // IORING_REGISTER_PROBE (5.6): which opcodes this kernel knows.
    io_uring_probe* probe = io_uring_get_probe_ring(&_ring);
    if (probe == nullptr)
      return common::Error::make(ENOTSUP,
                                 "io_uring_register(PROBE) failed: kernel too old (5.19 needed); "
                                 "use --io=epoll");
    struct Needed {
      int op;
      const char* name;
    };
    constexpr Needed ops[] = {
        {IORING_OP_ACCEPT, "IORING_OP_ACCEPT"},              // 5.5
        {IORING_OP_RECV, "IORING_OP_RECV"},                  // 5.6
        {IORING_OP_SEND, "IORING_OP_SEND"},                  // 5.6
        {IORING_OP_POLL_ADD, "IORING_OP_POLL_ADD"},          // 5.1
        {IORING_OP_ASYNC_CANCEL, "IORING_OP_ASYNC_CANCEL"},  // 5.5
    };
    const char* missing = nullptr;
    for (const Needed& n : ops)
      if (missing == nullptr && !io_uring_opcode_supported(probe, n.op)) missing = n.name;
    io_uring_free_probe(probe);
    if (missing != nullptr)
      return common::Error::make(ENOTSUP, std::string("io_uring: the kernel lacks ") + missing + "; use --io=epoll");
    return common::ok_status();
  }

  common::Status setup_buffers() {
    // Buffer memory and the ring describing it are mapped once, page
    // aligned as the kernel requires of the ring; MAP_POPULATE so the first
    // receives take no page faults.
    size_t bytes = _buffer_count * _buffer_bytes;
    void* mem = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem == MAP_FAILED) return common::Error::from_errno("mmap(io_uring receive buffers)");
    _buffers = static_cast<std::byte*>(mem);
    size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    _buffer_ring_bytes = (_buffer_count * sizeof(io_uring_buf) + page - 1) / page * page;
    mem = ::mmap(nullptr, _buffer_ring_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return common::Error::from_errno("mmap(io_uring buffer ring)");
    _buffer_ring = static_cast<io_uring_buf_ring*>(mem);
    io_uring_buf_ring_init(_buffer_ring);
    io_uring_buf_reg reg{};
    reg.ring_addr = reinterpret_cast<uintptr_t>(_buffer_ring);
    reg.ring_entries = static_cast<uint32_t>(_buffer_count);
    reg.bgid = buffer_group;
    // IORING_REGISTER_PBUF_RING (5.19). liburing 2.3 has no
    // io_uring_setup_buf_ring yet, so the ring is mapped and registered here.
    int ret = io_uring_register_buf_ring(&_ring, &reg, 0);
    if (ret != 0)
      return common::Error::make(-ret, "io_uring_register(PBUF_RING): " + errno_text(-ret) +
                                           ": provided-buffer rings need kernel 5.19; use --io=epoll");
    int mask = io_uring_buf_ring_mask(static_cast<uint32_t>(_buffer_count));
    for (size_t bid = 0; bid < _buffer_count; bid++) {
      io_uring_buf_ring_add(_buffer_ring, buffer(bid), static_cast<unsigned>(_buffer_bytes),
                            static_cast<unsigned short>(bid), mask, static_cast<int>(bid));
      _buffer_in_ring[bid] = 1;
    }
    io_uring_buf_ring_advance(_buffer_ring, static_cast<int>(_buffer_count));
    return common::ok_status();
  }

  void enable_ring() {
    // IORING_REGISTER_ENABLE_RINGS (5.10): from the loop's thread, which the
    // kernel then takes as the single issuer. Debian's liburing 2.3 declares
    // io_uring_enable_rings but does not export it, hence the raw register.
    int ret = io_uring_register(static_cast<unsigned>(_ring.ring_fd), IORING_REGISTER_ENABLE_RINGS, nullptr, 0);
    if (ret < 0) fail_syscall("io_uring_register(ENABLE_RINGS)", -ret);
    _enabled = true;
  }

  // ------------------------------------------------------------ buffers

  std::byte* buffer(size_t bid) { return _buffers + bid * _buffer_bytes; }

  // The kernel handed `bid` over in a completion.
  void take_buffer(uint32_t bid) {
    LOTTERY_ASSERT(bid < _buffer_count);
    LOTTERY_ASSERT(_buffer_in_ring[bid] == 1);
    _buffer_in_ring[bid] = 0;
  }

  // Gives `bid` back to the kernel: visible to the next recv at once.
  void return_buffer(uint32_t bid) {
    LOTTERY_ASSERT(bid < _buffer_count);
    LOTTERY_ASSERT(_buffer_in_ring[bid] == 0);
    _buffer_in_ring[bid] = 1;
    io_uring_buf_ring_add(_buffer_ring, buffer(bid), static_cast<unsigned>(_buffer_bytes),
                          static_cast<unsigned short>(bid),
                          io_uring_buf_ring_mask(static_cast<uint32_t>(_buffer_count)), 0);
    io_uring_buf_ring_advance(_buffer_ring, 1);
    _buffers_returned++;
  }

  void hold(Slot& s, uint32_t bid, uint32_t len) {
    _buffer_len[bid] = len;
    _buffer_next[bid] = -1;
    if (s.held_tail >= 0) {
      _buffer_next[static_cast<size_t>(s.held_tail)] = static_cast<int32_t>(bid);
    } else {
      s.held_head = static_cast<int32_t>(bid);
    }
    s.held_tail = static_cast<int32_t>(bid);
  }

  uint32_t pop_held(Slot& s) {
    LOTTERY_ASSERT(s.held_head >= 0);
    auto bid = static_cast<uint32_t>(s.held_head);
    s.held_head = _buffer_next[bid];
    if (s.held_head < 0) s.held_tail = -1;
    return bid;
  }

  void drop_held(Slot& s) {
    while (s.held_head >= 0) return_buffer(pop_held(s));
  }

  // ------------------------------------------------------------ slots

  Slot* slot(ConnId id) {
    if (id.slot >= _slots.size()) return nullptr;
    Slot& s = _slots[id.slot];
    return s.id == id ? &s : nullptr;
  }

  // The slot a completion names, or nullptr when it belongs to an earlier
  // generation (which the release rule below should make impossible).
  Slot* slot_for(const Tag& t) {
    if (t.index < _slots.size()) {
      Slot& s = _slots[t.index];
      if (s.id.valid() && s.id.generation == t.generation) return &s;
    }
    _counters->stale_completions++;
    return nullptr;
  }

  void reset(Slot& s) {
    Slot fresh;
    fresh.in_todo = s.in_todo;
    fresh.in_ready = s.in_ready;
    fresh.in_starved = s.in_starved;
    s = fresh;
  }

  void push_todo(uint32_t index) {
    Slot& s = _slots[index];
    if (!s.in_todo) {
      s.in_todo = true;
      _todo.push_back(index);
    }
  }

  void push_ready(uint32_t index) {
    Slot& s = _slots[index];
    if (!s.in_ready) {
      s.in_ready = true;
      _ready.push_back(index);
    }
  }

  static bool can_arm_recv(const Slot& s) {
    // One recv at a time, and none while a cancel aimed at the last one is
    // in flight: a cancel keyed by user_data must never find its successor.
    return s.receiving && !s.closed && !s.recv_armed && !s.recv_cancel_armed && !s.end_seen && !s.starved;
  }

  void rearm_recv_if_wanted(uint32_t index, Slot& s) {
    if (can_arm_recv(s)) {
      s.want_recv = true;
      push_todo(index);
    }
  }

  void operation_done(Slot& s) {
    LOTTERY_ASSERT(s.outstanding > 0);
    s.outstanding--;
  }

  // Reports on_released once the slot is closed and no completion can still
  // name it; only then may the loop reuse the slot and drop the output buffer.
  int release_if_quiet(Slot& s, BackendEvents& events) {
    if (!s.id.valid() || !s.closed || s.outstanding > 0) return 0;
    LOTTERY_ASSERT(s.held_head < 0);
    LOTTERY_ASSERT(!s.recv_armed && !s.send_armed && !s.hangup_armed);
    ConnId id = s.id;
    reset(s);
    events.on_released(id);
    return 1;
  }

  // Hands held buffers to the loop in arrival order while it is receiving,
  // then the end of the stream if one came after them.
  int deliver_held(Slot& s, BackendEvents& events) {
    int n = 0;
    ConnId id = s.id;
    while (s.held_head >= 0 && s.receiving && !s.closed) {
      uint32_t bid = pop_held(s);
      events.on_recv(id, {buffer(bid), _buffer_len[bid]});
      // The loop copied whatever it keeps.
      return_buffer(bid);
      n++;
    }
    if (s.held_head < 0 && s.end_seen && !s.end_reported && s.receiving && !s.closed) {
      s.end_reported = true;
      events.on_recv_end(id, s.end_err);
      n++;
    }
    return n;
  }

  // Delivers held data of connections that resumed receiving and releases
  // closed ones with nothing in flight. Work queued meanwhile waits for the
  // next poll, so one connection cannot keep the loop here.
  int run_ready(BackendEvents& events) {
    int n = 0;
    _ready_now.swap(_ready);
    for (uint32_t index : _ready_now) {
      Slot& s = _slots[index];
      s.in_ready = false;
      if (!s.id.valid()) continue;
      n += s.closed ? release_if_quiet(s, events) : deliver_held(s, events);
    }
    _ready_now.clear();
    return n;
  }

  // ------------------------------------------------------------ submission

  io_uring_sqe* get_sqe() {
    io_uring_sqe* sqe = io_uring_get_sqe(&_ring);
    if (sqe == nullptr) {
      // SQ full: hand the kernel what is queued and take a fresh entry.
      int ret = io_uring_submit(&_ring);
      if (ret < 0 && ret != -EAGAIN && ret != -EBUSY && ret != -EINTR) fail_syscall("io_uring_enter(submit)", -ret);
      sqe = io_uring_get_sqe(&_ring);
    }
    LOTTERY_ASSERT(sqe != nullptr);
    return sqe;
  }

  // Turns everything recorded since the last poll into SQEs.
  void queue_work() {
    if (_listeners_dirty) queue_listener_ops();
    if (_watches_dirty) queue_watch_ops();
    rearm_starved();
    for (uint32_t index : _todo) {
      Slot& s = _slots[index];
      s.in_todo = false;
      if (s.id.valid()) queue_slot_ops(index, s);
    }
    _todo.clear();
  }

  void queue_slot_ops(uint32_t index, Slot& s) {
    uint32_t gen = s.id.generation;
    if (s.closed) {
      if (s.recv_armed && !s.recv_cancel_armed) {
        queue_cancel(s, make_tag(Op::recv_cancel, index, gen), make_tag(Op::recv, index, gen));
        s.recv_cancel_armed = true;
      }
      if (s.send_armed && !s.send_cancel_armed) {
        queue_cancel(s, make_tag(Op::send_cancel, index, gen), make_tag(Op::send, index, gen));
        s.send_cancel_armed = true;
      }
      if (s.hangup_armed && !s.hangup_cancel_armed) {
        queue_cancel(s, make_tag(Op::hangup_cancel, index, gen), make_tag(Op::hangup, index, gen));
        s.hangup_cancel_armed = true;
      }
      return;
    }
    if (s.want_hangup) {
      s.want_hangup = false;
      if (!s.hangup_armed && !s.hangup_seen) queue_hangup_poll(index, s);
    }
    if (s.want_recv_cancel) {
      s.want_recv_cancel = false;
      if (s.recv_armed && s.recv_multishot && !s.recv_cancel_armed && (!s.receiving || s.hangup_seen)) {
        queue_cancel(s, make_tag(Op::recv_cancel, index, gen), make_tag(Op::recv, index, gen));
        s.recv_cancel_armed = true;
      }
    }
    if (s.want_recv) {
      s.want_recv = false;
      if (can_arm_recv(s)) queue_recv(index, s);
    }
    if (s.want_send) {
      s.want_send = false;
      queue_send(index, s);
    }
  }

  void queue_recv(uint32_t index, Slot& s) {
    io_uring_sqe* sqe = get_sqe();
    bool multishot = _multishot_recv && !s.hangup_seen;
    if (multishot) {
      // IORING_RECV_MULTISHOT (6.0): one SQE, one completion per chunk for
      // as long as IORING_CQE_F_MORE is set. The length must be 0: each
      // chunk is one provided buffer.
      io_uring_prep_recv_multishot(sqe, s.fd, nullptr, 0, 0);
    } else {
      // Single-shot IORING_OP_RECV (5.6), re-armed after each completion.
      io_uring_prep_recv(sqe, s.fd, nullptr, _buffer_bytes, 0);
    }
    // IOSQE_BUFFER_SELECT from a provided-buffer ring (5.19): the kernel
    // picks a buffer only once data is there, so idle connections hold none.
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = buffer_group;
    io_uring_sqe_set_data64(sqe, make_tag(Op::recv, index, s.id.generation));
    s.recv_armed = true;
    s.recv_multishot = multishot;
    s.outstanding++;
    LOTTERY_ASSERT(s.outstanding <= ops_per_connection_max);
  }

  void queue_send(uint32_t index, Slot& s) {
    LOTTERY_ASSERT(!s.send_armed);
    LOTTERY_ASSERT(s.send_done < s.send_size);
    // The kernel takes at most 2^31 bytes per send; the rest follows as a
    // short send would.
    size_t len = std::min<size_t>(s.send_size - s.send_done, size_t{1} << 30);
    io_uring_sqe* sqe = get_sqe();
    // IORING_OP_SEND (5.6). MSG_NOSIGNAL: a reset peer is an error value,
    // never SIGPIPE.
    io_uring_prep_send(sqe, s.fd, s.send_data + s.send_done, len, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(sqe, make_tag(Op::send, index, s.id.generation));
    s.send_armed = true;
    s.outstanding++;
    LOTTERY_ASSERT(s.outstanding <= ops_per_connection_max);
  }

  void queue_cancel(Slot& s, uint64_t tag, uint64_t target) {
    io_uring_sqe* sqe = get_sqe();
    // IORING_OP_ASYNC_CANCEL (5.5) keyed by the target's user_data.
    io_uring_prep_cancel64(sqe, target, 0);
    io_uring_sqe_set_data64(sqe, tag);
    s.outstanding++;
    LOTTERY_ASSERT(s.outstanding <= ops_per_connection_max);
  }

  void queue_hangup_poll(uint32_t index, Slot& s) {
    io_uring_sqe* sqe = get_sqe();
    // Single-shot IORING_OP_POLL_ADD (5.1): completes once the peer shuts
    // down its side or resets (POLLRDHUP; POLLERR and POLLHUP always count).
    io_uring_prep_poll_add(sqe, s.fd, POLLRDHUP);
    io_uring_sqe_set_data64(sqe, make_tag(Op::hangup, index, s.id.generation));
    s.hangup_armed = true;
    s.outstanding++;
    LOTTERY_ASSERT(s.outstanding <= ops_per_connection_max);
  }

  void queue_listener_ops() {
    _listeners_dirty = false;
    for (uint32_t i = 0; i < _listeners.size(); i++) {
      Listener& l = _listeners[i];
      if (l.want_cancel) {
        l.want_cancel = false;
        if (l.accept_armed && !l.cancel_armed) {
          io_uring_sqe* sqe = get_sqe();
          // IORING_OP_ASYNC_CANCEL (5.5) of the listener's accept.
          io_uring_prep_cancel64(sqe, make_tag(Op::accept, i, l.generation), 0);
          io_uring_sqe_set_data64(sqe, make_tag(Op::accept_cancel, i, l.generation));
          l.cancel_armed = true;
          l.outstanding++;
        }
      }
      if (l.want_accept) {
        l.want_accept = false;
        if (l.active && !l.accept_armed) {
          io_uring_sqe* sqe = get_sqe();
          // Multishot accept (5.19): one SQE accepts every connection until a
          // completion comes without IORING_CQE_F_MORE. The sockets stay
          // blocking: io_uring waits on its own poll, and nothing else here
          // reads or writes them.
          io_uring_prep_multishot_accept(sqe, l.fd, nullptr, nullptr, SOCK_CLOEXEC);
          io_uring_sqe_set_data64(sqe, make_tag(Op::accept, i, l.generation));
          l.accept_armed = true;
          l.outstanding++;
        }
      }
    }
  }

  void queue_watch_ops() {
    _watches_dirty = false;
    for (uint32_t i = 0; i < _watch_count; i++) {
      Watch& w = _watches[i];
      if (!w.want_arm || w.armed) continue;
      w.want_arm = false;
      io_uring_sqe* sqe = get_sqe();
      // Multishot poll (5.13): a completion per wake-up while F_MORE is set.
      io_uring_prep_poll_multishot(sqe, w.fd, POLLIN);
      io_uring_sqe_set_data64(sqe, make_tag(Op::watch, i, 0));
      w.armed = true;
    }
  }

  // Connections whose recv ran the buffer ring dry are re-armed once any
  // buffer has come back since; until then re-arming would only fail again.
  void rearm_starved() {
    if (_starved.empty() || _buffers_returned == _starved_mark) return;
    for (uint32_t index : _starved) {
      Slot& s = _slots[index];
      s.in_starved = false;
      if (!s.starved) continue;
      s.starved = false;
      rearm_recv_if_wanted(index, s);
    }
    _starved.clear();
  }

  void submit_and_wait(int timeout_ms) {
    int ret;
    if (timeout_ms == 0) {
      // Enter with GETEVENTS but no wait: under DEFER_TASKRUN (6.1)
      // completions are posted only when we enter with it.
      ret = io_uring_submit_and_get_events(&_ring);
    } else if (timeout_ms < 0) {
      ret = io_uring_submit_and_wait(&_ring, 1);
    } else {
      __kernel_timespec ts{};
      ts.tv_sec = timeout_ms / 1000;
      ts.tv_nsec = static_cast<long long>(timeout_ms % 1000) * 1'000'000;
      io_uring_cqe* cqe = nullptr;
      // The timeout travels in the enter call (IORING_FEAT_EXT_ARG, 5.11).
      ret = io_uring_submit_and_wait_timeout(&_ring, &cqe, 1, &ts, nullptr);
    }
    // ETIME: nothing completed in time. EINTR: a signal (its handler wakes
    // us through a watch). EAGAIN/EBUSY: the kernel took only part of the
    // batch; the rest stays queued for the next poll.
    if (ret == -EEXIST) fail_syscall("io_uring_enter from a thread other than the loop's (SINGLE_ISSUER)", -ret);
    if (ret < 0 && ret != -ETIME && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY)
      fail_syscall("io_uring_enter", -ret);
  }

  // ------------------------------------------------------------ completions

  int reap(BackendEvents& events) {
    _returned_at_batch_start = _buffers_returned;
    int dispatched = 0;
    unsigned seen = 0;
    unsigned head;
    io_uring_cqe* cqe;
    io_uring_for_each_cqe(&_ring, head, cqe) {
      dispatched += on_completion(cqe->user_data, cqe->res, cqe->flags, events);
      seen++;
    }
    // One store hands the whole batch back to the kernel.
    io_uring_cq_advance(&_ring, seen);
    return dispatched;
  }

  int on_completion(uint64_t user_data, int res, uint32_t flags, BackendEvents& events) {
    Tag t = parse_tag(user_data);
    switch (t.op) {
      case Op::accept:
        return on_accept_done(t, res, flags, events);
      case Op::accept_cancel:
        return on_accept_cancel_done(t);
      case Op::watch:
        return on_watch_done(t, res, flags, events);
      case Op::recv:
        return on_recv_done(t, res, flags, events);
      case Op::send:
        return on_send_done(t, res, events);
      case Op::hangup:
        return on_hangup_done(t, res, events);
      case Op::recv_cancel:
      case Op::send_cancel:
      case Op::hangup_cancel:
        return on_cancel_done(t, events);
    }
    LOTTERY_ASSERT(!"completion with an unknown operation tag");
    return 0;
  }

  int on_accept_done(const Tag& t, int res, uint32_t flags, BackendEvents& events) {
    LOTTERY_ASSERT(t.index < _listeners.size());
    Listener& l = _listeners[t.index];
    // Entries are reused only when nothing is in flight, so the generation
    // always matches; a mismatch would be a bookkeeping bug.
    LOTTERY_ASSERT(l.generation == t.generation);
    if ((flags & IORING_CQE_F_MORE) == 0) {
      LOTTERY_ASSERT(l.outstanding > 0);
      l.accept_armed = false;
      l.outstanding--;
      // The multishot accept ended (an error such as EMFILE, or a full CQ):
      // re-arm it, as epoll would try accept4 again on the next wake.
      if (l.active) {
        l.want_accept = true;
        _listeners_dirty = true;
      }
    }
    if (res < 0) {
      // Out of descriptors: the re-armed accept would fail again at once
      // for as long as the connection waits in the backlog. The loop takes
      // it off another way (see Reactor::on_accept_error).
      if (l.active && res != -ECANCELED && res != -EAGAIN && res != -EINTR && res != -ECONNABORTED)
        (void)events.on_accept_error(l.fd, -res);
      return 1;
    }
    if (l.active) {
      events.on_accept(l.fd, res);
    } else {
      ::close(res);  // accepted while its cancel was on the way
    }
    return 1;
  }

  int on_accept_cancel_done(const Tag& t) {
    LOTTERY_ASSERT(t.index < _listeners.size());
    Listener& l = _listeners[t.index];
    LOTTERY_ASSERT(l.outstanding > 0);
    l.cancel_armed = false;
    l.outstanding--;
    return 1;
  }

  int on_watch_done(const Tag& t, int res, uint32_t flags, BackendEvents& events) {
    LOTTERY_ASSERT(t.index < _watch_count);
    Watch& w = _watches[t.index];
    if ((flags & IORING_CQE_F_MORE) == 0) {
      w.armed = false;
      // An error (the fd was closed) leaves the watch off rather than
      // spinning on it.
      if (res >= 0) {
        w.want_arm = true;
        _watches_dirty = true;
      }
    }
    if (res > 0) events.on_watch(w.token);
    return 1;
  }

  int on_recv_done(const Tag& t, int res, uint32_t flags, BackendEvents& events) {
    bool more = (flags & IORING_CQE_F_MORE) != 0;
    bool has_buffer = (flags & IORING_CQE_F_BUFFER) != 0;
    uint32_t bid = flags >> IORING_CQE_BUFFER_SHIFT;
    if (has_buffer) take_buffer(bid);
    Slot* sp = slot_for(t);
    if (sp == nullptr) {
      if (has_buffer) return_buffer(bid);
      return 1;
    }
    Slot& s = *sp;
    if (!more) {
      LOTTERY_ASSERT(s.recv_armed);
      s.recv_armed = false;
      operation_done(s);
    }
    if (res > 0) {
      LOTTERY_ASSERT(has_buffer);
      if (s.closed) {
        return_buffer(bid);
      } else {
        if (!s.receiving) _counters->held_while_paused++;
        hold(s, bid, static_cast<uint32_t>(res));
      }
    } else {
      if (has_buffer) return_buffer(bid);
      if (res == 0) {
        if (!s.end_seen) {
          s.end_seen = true;
          s.end_err = 0;
        }
      } else if (res == -ENOBUFS) {
        // The buffer ring ran dry: back-pressure, not an error. The data
        // waits in the socket until buffers come back.
        _counters->recv_enobufs++;
        starve(t.index, s);
      } else if (res == -EINVAL && s.recv_multishot && _multishot_recv) {
        // A kernel before 6.0 rejects IORING_RECV_MULTISHOT: single-shot
        // receives from now on.
        _multishot_recv = false;
        _counters->multishot_recv_fallbacks++;
      } else if (res == -ECANCELED || res == -EINTR || res == -EAGAIN) {
        // Cancelled by us, or interrupted: re-armed below if still wanted.
      } else if (!s.end_seen) {
        s.end_seen = true;
        s.end_err = -res;
      }
    }
    if (!more) {
      rearm_recv_if_wanted(t.index, s);
    } else if (!s.recv_cancel_armed && (s.closed || !s.receiving || s.hangup_seen)) {
      // Still posting after a pause, a close or a hang-up (its cancel missed
      // it, or none was sent yet): cancel it (again).
      s.want_recv_cancel = true;
      push_todo(t.index);
    }
    int n = 1;
    if (s.receiving && !s.closed) n += deliver_held(s, events);
    return n + release_if_quiet(s, events);
  }

  void starve(uint32_t index, Slot& s) {
    if (s.closed || s.end_seen) return;
    s.starved = true;
    if (!s.in_starved) {
      s.in_starved = true;
      _starved.push_back(index);
    }
    // Buffers given back from this batch on were returned after the kernel
    // found the ring empty.
    _starved_mark = _returned_at_batch_start;
  }

  int on_send_done(const Tag& t, int res, BackendEvents& events) {
    Slot* sp = slot_for(t);
    if (sp == nullptr) return 1;
    Slot& s = *sp;
    LOTTERY_ASSERT(s.send_armed);
    s.send_armed = false;
    operation_done(s);
    // A closed connection's send is not reported: on_released covers it.
    if (s.closed) return 1 + release_if_quiet(s, events);
    if (res > 0) {
      s.send_done += static_cast<size_t>(res);
      LOTTERY_ASSERT(s.send_done <= s.send_size);
      if (s.send_done < s.send_size) {
        // Short send (the socket buffer filled): the rest goes at the next
        // poll, and the loop hears of the send only once, at its end.
        _counters->short_send_resumed++;
        s.want_send = true;
        push_todo(t.index);
        return 1;
      }
    } else if (res == -EINTR || res == -EAGAIN) {
      s.want_send = true;
      push_todo(t.index);
      return 1;
    }
    int err = res > 0 ? 0 : (res == 0 ? EPIPE : -res);
    size_t done = s.send_done;
    s.send_data = nullptr;
    s.send_size = s.send_done = 0;
    events.on_sent(s.id, done, err);
    return 1 + release_if_quiet(s, events);
  }

  // A multishot recv that reads the last bytes while a reset is already
  // pending finds the queue empty and waits for a wake-up the reset has
  // already spent: the end of the stream is never posted (seen on 6.18, about
  // one reset in a thousand; single-shot receives are not affected). So a
  // connection with a multishot recv also has a poll for the hang-up, and
  // when it fires the multishot recv is cancelled and replaced by
  // single-shot ones, which read what is left and then report the end.
  int on_hangup_done(const Tag& t, int res, BackendEvents& events) {
    Slot* sp = slot_for(t);
    if (sp == nullptr) return 1;
    Slot& s = *sp;
    LOTTERY_ASSERT(s.hangup_armed);
    s.hangup_armed = false;
    operation_done(s);
    if (res > 0 && !s.closed) {
      s.hangup_seen = true;
      if (s.recv_armed && s.recv_multishot && !s.end_seen) {
        s.want_recv_cancel = true;
        push_todo(t.index);
      }
    }
    return 1 + release_if_quiet(s, events);
  }

  int on_cancel_done(const Tag& t, BackendEvents& events) {
    Slot* sp = slot_for(t);
    if (sp == nullptr) return 1;
    Slot& s = *sp;
    // The result (0, ENOENT: it had finished, EALREADY: it was running) needs
    // no action: a recv that survives asks for another cancel on its next
    // completion (on_recv_done).
    if (t.op == Op::recv_cancel) {
      s.recv_cancel_armed = false;
    } else if (t.op == Op::send_cancel) {
      s.send_cancel_armed = false;
    } else {
      s.hangup_cancel_armed = false;
    }
    operation_done(s);
    if (t.op == Op::recv_cancel) rearm_recv_if_wanted(t.index, s);
    return 1 + release_if_quiet(s, events);
  }

  io_uring _ring{};
  bool _ring_ready = false;
  bool _enabled = false;
  unsigned _features = 0;
  bool _multishot_recv;
  UringCounters _own_counters;
  UringCounters* _counters;

  size_t _buffer_count;
  size_t _buffer_bytes;
  std::byte* _buffers = nullptr;
  io_uring_buf_ring* _buffer_ring = nullptr;
  size_t _buffer_ring_bytes = 0;
  std::vector<int32_t> _buffer_next;     // held-list links, by buffer id
  std::vector<uint32_t> _buffer_len;     // bytes in a held buffer
  std::vector<uint8_t> _buffer_in_ring;  // 1 while the kernel may pick it
  uint64_t _buffers_returned = 0;
  uint64_t _returned_at_batch_start = 0;
  uint64_t _starved_mark = 0;

  std::vector<Slot> _slots;
  std::vector<uint32_t> _todo;       // slots owing SQEs
  std::vector<uint32_t> _ready;      // slots owing callbacks (held data, release)
  std::vector<uint32_t> _ready_now;  // _ready, swapped out while it is served
  std::vector<uint32_t> _starved;    // slots waiting for buffers
  std::vector<int> _fds_to_close;    // closes deferred until the SQ is drained

  std::array<Listener, limits::uring_listeners_max> _listeners{};
  bool _listeners_dirty = false;
  std::array<Watch, limits::uring_watches_max> _watches{};
  size_t _watch_count = 0;
  bool _watches_dirty = false;
};

}  // namespace

common::Result<std::unique_ptr<Backend>> make_uring_backend(size_t max_connections, const UringTuning& tuning) {
  if (max_connections == 0 || max_connections >= index_limit)
    return common::Error::make(EINVAL,
                               "io_uring backend: max_connections must be in 1.." + std::to_string(index_limit - 1));
  LOTTERY_ASSERT(std::has_single_bit(tuning.buffer_count));
  LOTTERY_ASSERT(tuning.buffer_count <= limits::uring_buffer_count);
  LOTTERY_ASSERT(tuning.buffer_bytes > 0);
  LOTTERY_ASSERT(tuning.buffer_bytes <= limits::uring_buffer_bytes);
  auto backend = std::make_unique<UringBackend>(max_connections, tuning);
  if (auto st = backend->init(); !st) return st.error();
  return std::unique_ptr<Backend>(std::move(backend));
}

common::Result<std::unique_ptr<Backend>> make_uring_backend(size_t max_connections) {
  return make_uring_backend(max_connections, UringTuning{});
}

}  // namespace reactor
