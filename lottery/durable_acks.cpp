#include "lottery/durable_acks.hpp"

#include <signal.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/assert.hpp"
#include "common/log.hpp"

namespace lottery {

namespace log = common::log;

namespace {
uint64_t now_us() {
  struct timespec ts {};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000u + static_cast<uint64_t>(ts.tv_nsec) / 1000u;
}
}  // namespace

DurableAcks::DurableAcks(reactor::Reactor& reactor, store::Store& store, std::atomic<uint64_t>& sync_counter,
                         Options options, Release on_release, void* context)
    : _reactor(reactor),
      _store(store),
      _sync_counter(sync_counter),
      _options(options),
      _release(on_release),
      _context(context) {
  LOTTERY_ASSERT(_release != nullptr);
  LOTTERY_ASSERT(_options.group_batches_max >= 1 && _options.group_batches_max <= limits::group_batches_max);
  switch (_options.durability) {
    case store::Durability::none: return;  // nothing is ever held
    case store::Durability::always: _ring.resize(limits::always_acks_per_sync_max); break;
    // The group being synced and the open one, each at most group_batches_max.
    case store::Durability::group: _ring.resize(2 * size_t{_options.group_batches_max}); break;
  }
  _reactor.add_before_sleep([this] { before_sleep(); });
  if (_options.durability != store::Durability::group) return;

  _event_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (_event_fd < 0) {
    log::warning("sync_thread", log::Outcome::fail,
                 {{"error", std::string("eventfd: ") + std::strerror(errno)}, {"fallback", "sync on the event loop"}});
    return;
  }
  if (auto st = _reactor.watch_fd(_event_fd, [this] { on_sync_done(); }); !st) {
    log::warning("sync_thread", log::Outcome::fail,
                 {{"error", st.error().message}, {"fallback", "sync on the event loop"}});
    return;
  }
  // The gather timer has microsecond precision (the reactor's timers have
  // milliseconds). Without it, groups are not gathered.
  _gather_fd = ::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (_gather_fd >= 0 && !_reactor.watch_fd(_gather_fd, [this] { on_gather_timer(); })) {
    ::close(_gather_fd);
    _gather_fd = -1;
  }
  // Signals stay with the loop's thread (their handlers wake the loop).
  sigset_t all, old;
  sigfillset(&all);
  ::pthread_sigmask(SIG_SETMASK, &all, &old);
  _thread = std::thread([this] { thread_main(); });
  ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
  _threaded = true;
}

DurableAcks::~DurableAcks() {
  if (_job_active) {
    // The store must not be left with a job out. Its acknowledgements are
    // not sent: whoever owns us is going away (a graceful stop ran sync_all
    // before this).
    std::unique_lock lock(_mutex);
    _cv.wait(lock, [this] { return _job_done; });
    _job_done = false;
    _job_active = false;
    _store.end_sync(_job, _job_result);
  }
  cancel_window_timer();
  if (_thread.joinable()) {
    {
      std::lock_guard lock(_mutex);
      _stop = true;
    }
    _cv.notify_all();
    _thread.join();
  }
  if (_event_fd >= 0) ::close(_event_fd);
  if (_gather_fd >= 0) ::close(_gather_fd);
}

void DurableAcks::push(const PendingAck& ack) {
  LOTTERY_ASSERT(_count < _ring.size());
  _ring[(_head + _count) % _ring.size()] = ack;
  _count++;
}

void DurableAcks::release(size_t n, bool synced) {
  LOTTERY_ASSERT(n <= _count);
  // A release may close a connection whose close syncs and releases
  // everything (sync_all): then fewer are left than n.
  for (; n > 0 && _count > 0; n--) {
    PendingAck ack = _ring[_head];
    _head = (_head + 1) % _ring.size();
    _count--;
    _release(_context, ack, synced);
  }
}

void DurableAcks::hold(const PendingAck& ack) {
  switch (_options.durability) {
    case store::Durability::none: LOTTERY_ASSERT(false && "durability none holds nothing"); return;
    case store::Durability::always:
      // More commits in one iteration than the ring holds: sync those now.
      if (_count == _ring.size()) sync_on_loop();
      push(ack);
      return;
    case store::Durability::group: break;
  }
  if (open_count() == 0) {
    _open_since_ms = reactor::Reactor::now_ms();
    arm_window_timer();
  }
  push(ack);
  if (open_count() < _options.group_batches_max) return;
  if (!_threaded) {
    sync_on_loop();
    return;
  }
  // A full group goes at once; if the previous one is still syncing, the
  // loop waits for it (back-pressure: the disk sets the pace).
  if (_job_active) wait_for_job();
  if (open_count() > 0) start_job();
}

void DurableAcks::before_sleep() {
  if (_count == 0) return;
  if (_options.durability == store::Durability::always) {
    sync_on_loop();
    return;
  }
  if (_job_active || open_count() == 0) return;
  if (open_count() < _options.group_batches_max && _gather_fd >= 0) {
    uint64_t now = now_us();
    if (now < _gather_until_us) {
      arm_gather_timer(_gather_until_us - now);
      return;
    }
  }
  bool window_over = reactor::Reactor::now_ms() - _open_since_ms >= _options.group_window_ms;
  if (!_due && !window_over) return;  // the window timer will wake the loop
  if (_threaded) {
    start_job();
  } else {
    sync_on_loop();
  }
}

void DurableAcks::sync_all() {
  if (_options.durability == store::Durability::none) return;
  if (_job_active) wait_for_job();
  if (_count > 0 || _store.dirty()) sync_on_loop();
}

void DurableAcks::sync_on_loop() {
  LOTTERY_ASSERT(!_job_active);
  cancel_window_timer();
  _due = false;
  bool dirty = _store.dirty();
  common::Status st = _store.sync();
  if (!st) log::error("store_sync", log::Outcome::fail, {{"error", st.error().message}});
  if (st && dirty) _sync_counter.fetch_add(1, std::memory_order_relaxed);
  _in_flight = 0;
  release(_count, st.ok());
}

void DurableAcks::start_job() {
  LOTTERY_ASSERT(_threaded && !_job_active);
  LOTTERY_ASSERT(_in_flight == 0);
  cancel_window_timer();
  _due = false;
  if (!_store.begin_sync(_job)) {
    // Nothing left to sync (a blocking sync_all got there first).
    release(_count, true);
    return;
  }
  _in_flight = _count;
  _job_started_us = now_us();
  {
    std::lock_guard lock(_mutex);
    _job_ready = true;
  }
  _cv.notify_all();
  _job_active = true;
}

void DurableAcks::wait_for_job() {
  LOTTERY_ASSERT(_job_active);
  {
    std::unique_lock lock(_mutex);
    _cv.wait(lock, [this] { return _job_done; });
  }
  complete_job();
}

void DurableAcks::on_sync_done() {
  uint64_t n;
  while (::read(_event_fd, &n, sizeof n) > 0) {
  }
  if (!_job_active) return;  // already completed by a blocking wait
  {
    std::lock_guard lock(_mutex);
    if (!_job_done) return;
  }
  complete_job();
  // The batches that arrived while the disk was busy have waited long enough.
  if (open_count() > 0) _due = true;
}

void DurableAcks::on_gather_timer() {
  uint64_t n;
  while (::read(_gather_fd, &n, sizeof n) > 0) {
  }
  _gather_armed = false;  // before_sleep decides
}

void DurableAcks::arm_gather_timer(uint64_t delay_us) {
  if (_gather_armed) return;
  struct itimerspec its {};
  its.it_value.tv_sec = static_cast<time_t>(delay_us / 1'000'000u);
  its.it_value.tv_nsec = static_cast<long>((delay_us % 1'000'000u) * 1000u);
  if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) its.it_value.tv_nsec = 1;
  if (::timerfd_settime(_gather_fd, 0, &its, nullptr) == 0) _gather_armed = true;
}

void DurableAcks::complete_job() {
  common::Status st = common::ok_status();
  {
    std::lock_guard lock(_mutex);
    LOTTERY_ASSERT(_job_done);
    _job_done = false;
    st = std::move(_job_result);
    _job_result = common::ok_status();
  }
  _job_active = false;
  _store.end_sync(_job, st);
  // The clients whose acknowledgements go out now answer with their next
  // batches about one round trip later. Starting the next sync before they
  // arrive would split their window into two groups that alternate, each
  // half of it; so the next group gathers for a while, a fraction of what
  // this sync took (the longer the sync, the more a bigger group pays) and
  // at most group_gather_us_max.
  if (_in_flight > 0) {
    uint64_t now = now_us();
    uint64_t took = now - _job_started_us;
    _gather_until_us = now + std::min<uint64_t>(took / 2, limits::group_gather_us_max);
  }
  if (st) {
    _sync_counter.fetch_add(1, std::memory_order_relaxed);
  } else {
    log::error("store_sync", log::Outcome::fail, {{"error", st.error().message}});
  }
  size_t n = _in_flight;
  _in_flight = 0;
  release(n, st.ok());
}

void DurableAcks::thread_main() {
  std::unique_lock lock(_mutex);
  while (true) {
    _cv.wait(lock, [this] { return _job_ready || _stop; });
    if (!_job_ready) return;  // stopping, nothing handed over
    _job_ready = false;
    lock.unlock();
    common::Status st = _job.run();
    lock.lock();
    _job_result = std::move(st);
    _job_done = true;
    _cv.notify_all();  // a loop blocked in wait_for_job
    uint64_t one = 1;
    ssize_t w = ::write(_event_fd, &one, sizeof one);  // a loop asleep in poll
    (void)w;  // a full counter already means "readable"
  }
}

void DurableAcks::arm_window_timer() {
  if (_window_timer != 0 || _options.group_window_ms == 0) return;
  _window_timer = _reactor.add_timer(_options.group_window_ms, [this] {
    // Only wakes the loop: before_sleep starts the group if the thread is free.
    _window_timer = 0;
  });
}

void DurableAcks::cancel_window_timer() {
  if (_window_timer == 0) return;
  _reactor.cancel_timer(_window_timer);
  _window_timer = 0;
}

}  // namespace lottery
