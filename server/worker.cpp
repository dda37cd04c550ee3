#include "server/worker.hpp"

#include <sched.h>
#include <signal.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <functional>
#include <vector>

#include "common/log.hpp"
#include "common/signals.hpp"
#include "lottery/control.hpp"
#include "lottery/results.hpp"
#include "lottery/session.hpp"
#include "lottery/store.hpp"
#include "reactor/net.hpp"
#include "reactor/reactor.hpp"
#include "server/dir_watch.hpp"
#include "tls/layer.hpp"

namespace server {

namespace log = common::log;

namespace {

constexpr uint64_t draw_recheck_ms = 1000;
// While shutting down: how often to look whether every connection drained.
constexpr uint64_t drain_check_ms = 10;
// Longer than a worker's shutdown grace period plus its final sync.
constexpr int worker_lock_wait_ms_max = 60'000;

volatile sig_atomic_t g_stop_signal = 0;
volatile sig_atomic_t g_reload_keys = 0;
std::atomic<reactor::Reactor*> g_reactor{nullptr};

void on_stop_signal(int sig) {
  // Only set a flag and wake the loop; the loop does the work.
  g_stop_signal = sig;
  if (reactor::Reactor* r = g_reactor.load(std::memory_order_relaxed)) r->wake();
}

void on_reload_signal(int) {
  g_reload_keys = 1;
  if (reactor::Reactor* r = g_reactor.load(std::memory_order_relaxed)) r->wake();
}

void install_signal_handlers() {
  namespace sig = common::signals;
  sig::handle(SIGTERM, on_stop_signal);
  sig::handle(SIGINT, on_stop_signal);
  sig::handle(SIGHUP, on_reload_signal);  // forwarded by the master: reload the TLS keys file
  sig::reset(SIGCHLD);
  sig::ignore(SIGPIPE);
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);
}

common::Result<std::unique_ptr<reactor::Reactor>> make_reactor(IoMode mode, reactor::Options opts,
                                                               unsigned worker_id) {
  if (mode == IoMode::epoll) return reactor::Reactor::create(reactor::BackendKind::epoll, opts);
  auto uring = reactor::Reactor::create(reactor::BackendKind::uring, opts);
  if (uring || mode == IoMode::uring) return uring;
  log::warning("io_backend", log::Outcome::fail,
               {{"worker", worker_id}, {"backend", "io_uring"}, {"error", uring.error().message},
                {"fallback", "epoll"}});
  return reactor::Reactor::create(reactor::BackendKind::epoll, opts);
}

int fail(unsigned worker_id, const char* action, const std::string& message) {
  log::error(action, log::Outcome::fail, {{"worker", worker_id}, {"error", message}});
  return 1;
}

// Descriptors besides the connections: listener, epoll/io_uring, eventfd,
// inotify, the store's segments, the control and lock files, the log.
constexpr rlim_t fds_besides_connections = 64;

// Every reactor slot must be able to hold a socket: a worker that runs out of
// descriptors cannot accept, and the level-triggered listener would spin on
// EMFILE. Raises the soft limit as far as the hard limit allows.
void ensure_fd_limit(size_t slots, unsigned worker_id) {
  rlim_t want = static_cast<rlim_t>(slots) + fds_besides_connections;
  struct rlimit rl {};
  if (::getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur >= want) return;
  rlim_t had = rl.rlim_cur;
  rl.rlim_cur = rl.rlim_max == RLIM_INFINITY ? want : std::min(want, rl.rlim_max);
  if (::setrlimit(RLIMIT_NOFILE, &rl) < 0) rl.rlim_cur = had;
  if (rl.rlim_cur >= want) {
    log::info("fd_limit", log::Outcome::success, {{"worker", worker_id}, {"from", had}, {"to", rl.rlim_cur}});
    return;
  }
  log::warning("fd_limit", log::Outcome::fail,
               {{"worker", worker_id}, {"limit", rl.rlim_cur}, {"needed", want},
                {"error", "RLIMIT_NOFILE is below --max-connections; raise it (ulimit -n, systemd LimitNOFILE=) or "
                          "lower --max-connections"}});
}

}  // namespace

int run_worker(const ServerConfig& cfg, unsigned worker_id, pid_t master_pid) {
  // Die with the master rather than outlive it holding the port.
  ::prctl(PR_SET_PDEATHSIG, SIGTERM);
  if (::getppid() != master_pid) return 1;
  // Descriptors inherited from the master (its reactor, the metrics socket,
  // other workers' leftovers) are not ours.
  ::close_range(3, ~0u, 0);
  log::init(cfg.log_level);
  install_signal_handlers();
  if (cfg.pin_cpus) {
    long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(static_cast<int>(worker_id % static_cast<unsigned>(cpus > 0 ? cpus : 1)), &set);
    if (::sched_setaffinity(0, sizeof set, &set) < 0)
      log::warning("pin_cpu", log::Outcome::fail, {{"worker", worker_id}, {"error", std::strerror(errno)}});
  }

  // One process per worker id: a worker of a previous server (still in its
  // graceful shutdown after its master was killed) may still be writing this
  // id's segments. Its lock goes when it exits; wait for that.
  char lock_name[32];
  std::snprintf(lock_name, sizeof lock_name, "/worker-%03u.lock", worker_id);
  std::string lock_path = cfg.data_dir + lock_name;
  int worker_lock = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (worker_lock < 0) return fail(worker_id, "worker_lock", std::strerror(errno));
  for (int waited_ms = 0; ::flock(worker_lock, LOCK_EX | LOCK_NB) < 0; waited_ms += 10) {
    if (errno != EWOULDBLOCK) return fail(worker_id, "worker_lock", std::strerror(errno));
    if (waited_ms % 1000 == 0)
      log::warning("worker_lock", log::Outcome::in_progress,
                   {{"worker", worker_id}, {"waiting_for", "a previous process of this worker to exit"}});
    if (waited_ms >= worker_lock_wait_ms_max) return fail(worker_id, "worker_lock", "still held by another process");
    ::usleep(10'000);
  }

  auto control = lottery::control::Control::open(cfg.data_dir, cfg.agencies,
                                                 lottery::control::Control::Mode::open_existing);
  if (!control) return fail(worker_id, "control_open", control.error().message);
  lottery::control::WorkerSlot& slot = (*control)->worker(worker_id);

  lottery::store::Durability durability = lottery::store::Durability::group;
  lottery::store::parse_durability(cfg.durability, durability);
  auto producer_locks = lottery::control::ProducerLocks::open(cfg.data_dir);
  if (!producer_locks) return fail(worker_id, "producer_locks", producer_locks.error().message);
  auto store = lottery::store::Store::open(
      {cfg.data_dir, static_cast<uint16_t>(worker_id), cfg.segment_bytes, cfg.repair, durability});
  if (!store) return fail(worker_id, "store_open", store.error().message);
  for (const std::string& dropped : (*store)->recovery().dropped)
    log::warning("store_recovery", log::Outcome::success, {{"worker", worker_id}, {"dropped", dropped}});
  for (const std::string& repaired : (*store)->recovery().repaired)
    log::warning("store_repair", log::Outcome::success, {{"worker", worker_id}, {"skipped", repaired}});
  log::info("store_open", log::Outcome::success,
            {{"worker", worker_id}, {"segments", (*store)->recovery().segments},
             {"entries", (*store)->total_entries()}, {"bets", (*store)->total_bets()}});

  lottery::ServiceOptions service_options;
  service_options.agencies = cfg.agencies;
  service_options.winning_number = cfg.winning_number;
  service_options.data_dir = cfg.data_dir;
  service_options.worker_id = static_cast<uint16_t>(worker_id);
  service_options.durability = durability;
  service_options.group_window_ms = cfg.group_window_ms;
  service_options.group_batches_max = cfg.group_batches_max;
  service_options.connections_max = cfg.max_connections;
  service_options.connections_total_max = cfg.max_connections_total;
  service_options.frame_bytes_max = cfg.max_frame_bytes;
  service_options.batch_bets_max = cfg.max_batch_bets;
  service_options.unidentified_bytes_max = cfg.max_unidentified_bytes;
  service_options.pending_reply_bytes_max = cfg.max_pending_reply_bytes;
  service_options.handshake_timeout_ms = cfg.handshake_timeout_ms;
  service_options.idle_timeout_ms = cfg.idle_timeout_ms;
  service_options.reply_stall_timeout_ms = cfg.reply_stall_timeout_ms;
  reactor::Options reactor_options = lottery::reactor_options_for(service_options);
  ensure_fd_limit(reactor_options.max_connections, worker_id);

  auto reactor_result = make_reactor(cfg.io, reactor_options, worker_id);
  if (!reactor_result) return fail(worker_id, "io_backend", reactor_result.error().message);
  reactor::Reactor& loop = **reactor_result;
  log::info("io_backend", log::Outcome::success,
            {{"worker", worker_id}, {"backend", loop.backend_name()}, {"durability", cfg.durability}});

  auto listener = reactor::net::listen_tcp(cfg.ip, cfg.port, cfg.listen_backlog, reactor::net::ReusePort::yes);
  if (!listener) return fail(worker_id, "listen", listener.error().message);
  if (auto st = loop.add_listener(*listener); !st) return fail(worker_id, "listen", st.error().message);

  // With key material, a TLS layer sits between the reactor and the service:
  // the reactor moves ciphertext, the service sees the agency's plaintext.
  std::unique_ptr<tls::TlsLayer> tls_layer;
  const std::string active_keys = cfg.data_dir + "/" + active_keys_file_name;
  if (!cfg.tls_keys.empty()) {
    auto keys = tls::KeyRing::load(active_keys);
    if (!keys) return fail(worker_id, "tls_keys", keys.error().message);
    auto layer = tls::TlsLayer::create(
        loop, reactor_options.max_connections, std::move(*keys),
        tls::LayerOptions{cfg.tls_failure_burst, cfg.tls_failure_refill_ms, worker_id});
    if (!layer) return fail(worker_id, "tls_context", layer.error().message);
    tls_layer = std::move(*layer);
  }
  reactor::Link& link = tls_layer ? static_cast<reactor::Link&>(*tls_layer) : static_cast<reactor::Link&>(loop);
  lottery::LotteryService service(loop, link, **store, **control, **producer_locks, service_options);
  std::vector<std::byte> refusal = lottery::refusal_frame();
  std::vector<std::byte> tls_required = lottery::tls_required_frame();
  if (tls_layer) {
    tls_layer->set_inner(&service);
    tls_layer->set_plaintext_refusal(tls_required);
    loop.set_handler(tls_layer.get());
    // A TLS client could not read a frame in clear: over every slot, it is
    // closed without one.
  } else {
    loop.set_handler(&service);
    // Past the refusal slots the reactor refuses on its own, with the same frame.
    loop.set_refusal(refusal);
  }
  g_reactor.store(&loop);
  auto reload_keys = [&] {
    g_reload_keys = 0;
    if (!tls_layer) {
      log::warning("tls_keys", log::Outcome::fail,
                   {{"worker", worker_id}, {"reason", "SIGHUP, but no keys file is configured (--tls-keys)"}});
      return;
    }
    // The master checked the file before publishing it; should the copy be
    // unreadable anyway, the keys in use stay.
    auto keys = tls::KeyRing::load(active_keys);
    if (!keys) {
      log::error("tls_keys", log::Outcome::fail,
                 {{"worker", worker_id}, {"file", active_keys}, {"error", keys.error().message},
                  {"kept", tls_layer->key_count()}});
      return;
    }
    size_t count = keys->size();
    tls_layer->replace_keys(std::move(*keys));
    log::info("tls_keys", log::Outcome::success, {{"worker", worker_id}, {"file", cfg.tls_keys}, {"keys", count}});
  };

  // The draw may complete in another process (another worker, the master on
  // --close-at, lotteryctl close). Its last step renames the results file
  // into place; inotify tells us at once, with no polling.
  auto watch = watch_directory(cfg.data_dir, /*attributes=*/true);
  if (!watch) return fail(worker_id, "inotify", watch.error().message);
  int inotify_fd = *watch;
  (void)loop.watch_fd(inotify_fd, [&] {
    if (drain_for(inotify_fd, lottery::results_file_name)) service.on_draw_maybe_done();
  });

  // Belt and braces for file systems where inotify says nothing (some network
  // and overlay mounts): while queries wait, look at the draw state each second.
  // (A timer callback is stored in place, so the re-arming callable is a
  // small struct of pointers rather than a std::function naming itself.)
  struct Recheck {
    reactor::Reactor* loop;
    lottery::LotteryService* service;
    void operator()() const {
      if (service->waiting_queries() > 0) service->on_draw_maybe_done();
      loop->add_timer(draw_recheck_ms, *this);
    }
  };
  loop.add_timer(draw_recheck_ms, Recheck{&loop, &service});

  slot.writing.store(0);
  slot.pid.store(static_cast<uint64_t>(::getpid()));
  slot.alive.store(1);
  log::info("worker_ready", log::Outcome::success, {{"worker", worker_id}, {"pid", ::getpid()}});

  bool shutting_down = false;
  uint64_t shutdown_deadline = 0;
  struct CheckDrained {
    reactor::Reactor* loop;
    const uint64_t* deadline_ms;
    void operator()() const {
      if (loop->slots_in_use() == 0 || reactor::Reactor::now_ms() >= *deadline_ms) {
        loop->stop();
        return;
      }
      loop->add_timer(drain_check_ms, *this);
    }
  };
  CheckDrained check_drained{&loop, &shutdown_deadline};
  loop.set_wake_callback([&] {
    if (g_reload_keys != 0) reload_keys();
    if (g_stop_signal == 0 || shutting_down) return;
    shutting_down = true;
    log::info("shutdown", log::Outcome::in_progress, {{"worker", worker_id}, {"signal", strsignal(g_stop_signal)}});
    loop.stop_accepting();
    log::info("listener_closed", log::Outcome::success, {{"worker", worker_id}});
    service.begin_shutdown();
    shutdown_deadline = reactor::Reactor::now_ms() + static_cast<uint64_t>(cfg.shutdown_grace_ms);
    check_drained();
  });
  if (g_stop_signal != 0 || g_reload_keys != 0) loop.wake();  // a signal that came before the loop existed

  // One write(2) per loop iteration for all of its log lines, made before
  // the iteration's replies go out (the reactor flushes replies after this hook).
  log::set_deferred(true);
  // Added after the service's own hook (held acknowledgements released by a
  // sync), so those lines are out before their replies too.
  loop.add_before_sleep([] { log::flush(); });
  loop.run();
  log::set_deferred(false);
  g_reactor.store(nullptr);
  log::info("connections_closed", log::Outcome::success,
            {{"worker", worker_id}, {"accepted", loop.stats().accepted}, {"still_open", loop.connection_count()}});
  if (auto st = (*store)->close(); !st) return fail(worker_id, "store_close", st.error().message);
  log::info("store_closed", log::Outcome::success, {{"worker", worker_id}, {"bets", (*store)->total_bets()}});
  slot.alive.store(0);
  ::close(inotify_fd);
  log::info("worker_exit", log::Outcome::success, {{"worker", worker_id}, {"code", 0}});
  return 0;
}

}  // namespace server
