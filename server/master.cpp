#include "server/master.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <cstdio>
#include <atomic>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "common/log.hpp"
#include "common/signals.hpp"
#include "lottery/control.hpp"
#include "reactor/net.hpp"
#include "server/dir_watch.hpp"
#include "reactor/reactor.hpp"
#include "tls/keys.hpp"
#include "server/metrics.hpp"
#include "server/worker.hpp"

namespace server {

namespace log = common::log;
using lottery::control::Control;

namespace {

constexpr uint64_t restart_backoff_min_ms = 100;
constexpr uint64_t restart_backoff_max_ms = 5000;
// A worker that lived shorter than this is "crashing in a loop": back off.
constexpr uint64_t worker_stable_ms = 2000;
// After SIGTERM, workers get their own grace period plus this before SIGKILL.
constexpr uint64_t kill_margin_ms = 5000;
constexpr uint64_t ready_wait_ms_max = 30'000;
constexpr size_t metrics_connections_max = 64;

volatile sig_atomic_t g_stop_signal = 0;
volatile sig_atomic_t g_child_exited = 0;
volatile sig_atomic_t g_reload_keys = 0;
std::atomic<reactor::Reactor*> g_reactor{nullptr};

void on_signal(int sig) {
  if (sig == SIGCHLD) g_child_exited = 1;
  else if (sig == SIGHUP) g_reload_keys = 1;
  else g_stop_signal = sig;
  if (reactor::Reactor* r = g_reactor.load(std::memory_order_relaxed)) r->wake();
}

void install_signal_handlers() {
  namespace sig = common::signals;
  for (int s : {SIGTERM, SIGINT, SIGCHLD, SIGHUP})  // SIGHUP: reload the TLS keys, forwarded to every worker
    sig::handle(s, on_signal, SA_RESTART | SA_NOCLDSTOP);
  sig::ignore(SIGPIPE);
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exit code " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("killed by ") + strsignal(WTERMSIG(status));
  return "status " + std::to_string(status);
}

uint64_t unix_ms() {
  struct timespec ts {};
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000u + static_cast<uint64_t>(ts.tv_nsec) / 1'000'000u;
}

struct Worker {
  pid_t pid = 0;
  uint64_t started_ms = 0;
  uint64_t backoff_ms = restart_backoff_min_ms;
  bool restart_pending = false;
};

class Master {
 public:
  explicit Master(ServerConfig cfg) : _cfg(std::move(cfg)) {}

  int run();

 private:
  common::Status take_server_lock();
  common::Status reserve_port();
  common::Status wait_for_previous_workers();
  void spawn(unsigned id);
  void reap();
  void begin_stop();
  void close_betting(const char* reason);
  void check_ready();
  void log_draw(const lottery::control::DrawOutcome& d, const char* how);
  unsigned live_workers() const;

  ServerConfig _cfg;
  unsigned _worker_count = 1;
  std::unique_ptr<Control> _control;
  std::unique_ptr<reactor::Reactor> _loop;
  std::vector<Worker> _workers;
  int _lock_fd = -1;
  int _port_fd = -1;
  // Parses --tls-keys and, when it parses, writes it to the active keys
  // file the workers load (worker.hpp). The keys, or why not.
  common::Result<tls::KeyRing> publish_keys() {
    auto keys = tls::KeyRing::load(_cfg.tls_keys);
    if (!keys) return keys.error();
    if (keys->empty()) return common::Error::make(EINVAL, _cfg.tls_keys + " holds no key; run lotteryctl keys init");
    std::string comment = "the keys in use, copied from ";
    comment.append(_cfg.tls_keys).append(" by lottery-server; do not edit");
    std::string path = _cfg.data_dir;
    path.append("/").append(active_keys_file_name);
    auto st = tls::write_private_file(path, tls::format_keys(*keys, comment));
    if (!st) return st.error();
    return keys;
  }

  // SIGHUP: a keys file that parses goes to every worker; one that does not
  // changes nothing (workers keep their keys, restarted ones load the same).
  void reload_keys() {
    if (_cfg.tls_keys.empty()) {
      log::warning("tls_keys", log::Outcome::fail, {{"reason", "SIGHUP, but no keys file is configured (--tls-keys)"}});
      return;
    }
    auto keys = publish_keys();
    if (!keys) {
      log::error("tls_keys", log::Outcome::fail,
                 {{"file", _cfg.tls_keys}, {"error", keys.error().message}, {"kept", "the keys in use"}});
      return;
    }
    // Each worker loads the new keys itself and logs the outcome.
    log::info("tls_keys_reload", log::Outcome::in_progress, {{"keys", keys->size()}, {"workers", live_workers()}});
    for (const auto& w : _workers)
      if (w.pid > 0) ::kill(w.pid, SIGHUP);
  }

  int _inotify_fd = -1;
  pid_t _pid = 0;
  bool _stopping = false;
  bool _ready_logged = false;
  uint64_t _ready_deadline = 0;
};

common::Status Master::take_server_lock() {
  std::error_code ec;
  std::filesystem::create_directories(_cfg.data_dir, ec);  // like mkdir -p
  if (ec) return common::Error::make(ec.value(), "mkdir -p " + _cfg.data_dir + ": " + ec.message());
  std::string path = _cfg.data_dir + "/" + server_lock_file_name;
  _lock_fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (_lock_fd < 0) return common::Error::from_errno(("open " + path).c_str());
  if (::flock(_lock_fd, LOCK_EX | LOCK_NB) < 0) {
    return common::Error::make(EBUSY, "another lottery-server is using the data directory " + _cfg.data_dir +
                                          " (stop it, or pick another --data-dir)");
  }
  return common::ok_status();
}

common::Status Master::reserve_port() {
  if (_cfg.port != 0) return common::ok_status();
  // Port 0 means "any": every worker must listen on the same one, so the
  // master picks it by binding (without listening, so it gets no
  // connections) and keeps that socket to hold the port.
  auto fd = reactor::net::listen_tcp(_cfg.ip, 0, 1, reactor::net::ReusePort::yes);
  if (!fd) return fd.error();
  auto port = reactor::net::local_port(*fd);
  if (!port) return port.error();
  ::shutdown(*fd, SHUT_RDWR);  // stop listening; the bind stays
  _port_fd = *fd;
  _cfg.port = *port;
  return common::ok_status();
}

common::Status Master::wait_for_previous_workers() {
  constexpr int wait_ms_max = 60'000;
  for (unsigned id = 0; id < lottery::control::workers_max; id++) {
    char name[32];
    std::snprintf(name, sizeof name, "/worker-%03u.lock", id);
    std::string path = _cfg.data_dir + name;
    int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) continue;  // never used
    int waited = 0;
    while (::flock(fd, LOCK_EX | LOCK_NB) < 0) {
      if (waited == 0)
        log::warning("worker_lock", log::Outcome::in_progress,
                     {{"worker", id}, {"waiting_for", "a process of the previous server to exit"}});
      if (waited >= wait_ms_max) {
        ::close(fd);
        return common::Error::make(EBUSY, "a process of a previous server still holds " + path);
      }
      ::usleep(10'000);
      waited += 10;
    }
    ::flock(fd, LOCK_UN);
    ::close(fd);
  }
  return common::ok_status();
}

void Master::spawn(unsigned id) {
  Worker& w = _workers[id];
  w.restart_pending = false;
  pid_t pid = ::fork();
  if (pid < 0) {
    log::error("worker_start", log::Outcome::fail, {{"worker", id}, {"error", std::strerror(errno)}});
    w.restart_pending = true;
    _loop->add_timer(w.backoff_ms, [this, id] { if (!_stopping) spawn(id); });
    return;
  }
  if (pid == 0) {
    // The child: never returns into the master's code.
    g_reactor.store(nullptr);
    ::_exit(run_worker(_cfg, id, _pid));
  }
  w.pid = pid;
  w.started_ms = reactor::Reactor::now_ms();
  log::info("worker_start", log::Outcome::success, {{"worker", id}, {"pid", pid}});
}

unsigned Master::live_workers() const {
  unsigned n = 0;
  for (const Worker& w : _workers) n += w.pid > 0 ? 1 : 0;
  return n;
}

void Master::reap() {
  int status = 0;
  pid_t pid;
  while ((pid = ::waitpid(-1, &status, WNOHANG)) > 0) {
    auto it = std::find_if(_workers.begin(), _workers.end(), [pid](const Worker& w) { return w.pid == pid; });
    if (it == _workers.end()) continue;
    unsigned id = static_cast<unsigned>(it - _workers.begin());
    Worker& w = *it;
    w.pid = 0;
    lottery::control::WorkerSlot& slot = _control->worker(id);
    // A killed worker cannot clear its own flags.
    slot.alive.store(0);
    slot.writing.store(0);
    slot.connections_open.store(0);
    bool clean = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    if (_stopping) {
      log::info("worker_exit", clean ? log::Outcome::success : log::Outcome::fail,
                {{"worker", id}, {"pid", pid}, {"status", describe_status(status)}});
      continue;
    }
    uint64_t lived = reactor::Reactor::now_ms() - w.started_ms;
    w.backoff_ms = lived < worker_stable_ms ? std::min(w.backoff_ms * 2, restart_backoff_max_ms)
                                            : restart_backoff_min_ms;
    log::warning("worker_exit", log::Outcome::fail,
                 {{"worker", id}, {"pid", pid}, {"status", describe_status(status)}, {"lived_ms", lived},
                  {"restart_in_ms", w.backoff_ms}});
    slot.restarts.fetch_add(1);
    w.restart_pending = true;
    _loop->add_timer(w.backoff_ms, [this, id] {
      if (!_stopping && _workers[id].restart_pending) spawn(id);
    });
  }
  if (_stopping && live_workers() == 0) _loop->stop();
}

void Master::begin_stop() {
  if (_stopping) return;
  _stopping = true;
  log::info("shutdown", log::Outcome::in_progress,
            {{"signal", strsignal(g_stop_signal)}, {"workers", live_workers()}});
  for (unsigned id = 0; id < _workers.size(); id++) {
    if (_workers[id].pid > 0) {
      ::kill(_workers[id].pid, SIGTERM);
      log::info("worker_stop", log::Outcome::in_progress, {{"worker", id}, {"pid", _workers[id].pid}});
    }
  }
  _loop->stop_accepting();  // the metrics endpoint
  uint64_t deadline = static_cast<uint64_t>(_cfg.shutdown_grace_ms) + kill_margin_ms;
  _loop->add_timer(deadline, [this] {
    for (unsigned id = 0; id < _workers.size(); id++) {
      if (_workers[id].pid > 0) {
        log::warning("worker_stop", log::Outcome::fail, {{"worker", id}, {"error", "grace period over; SIGKILL"}});
        ::kill(_workers[id].pid, SIGKILL);
      }
    }
  });
  if (live_workers() == 0) _loop->stop();
}

void Master::log_draw(const lottery::control::DrawOutcome& d, const char* how) {
  if (!d.ran) return;
  log::info("sorteo", log::Outcome::success,
            {{"numero_ganador", _cfg.winning_number}, {"apuestas", d.bets_scanned}, {"ganadores", d.winners},
             {"origen", how}});
}

void Master::close_betting(const char* reason) {
  if (_control->draw_state() == lottery::control::DrawState::done) {
    log::info("cierre_apuestas", log::Outcome::fail, {{"reason", reason}, {"error", "the draw is already done"}});
    return;
  }
  log::info("cierre_apuestas", log::Outcome::in_progress, {{"reason", reason}});
  auto d = lottery::control::close_betting(*_control, _cfg.winning_number);
  if (!d) {
    log::error("cierre_apuestas", log::Outcome::fail, {{"reason", reason}, {"error", d.error().message}});
    return;
  }
  std::string closed;
  for (uint32_t a : d->closed_out) {
    if (!closed.empty()) closed.push_back(',');
    closed.append(std::to_string(a));
  }
  log::info("cierre_apuestas", log::Outcome::success,
            {{"reason", reason}, {"agencias_excluidas", closed.empty() ? "none" : closed}});
  log_draw(*d, reason);
}

void Master::check_ready() {
  if (_ready_logged || _stopping) return;
  bool all = true;
  for (unsigned id = 0; id < _workers.size(); id++) {
    const auto& slot = _control->worker(id);
    if (_workers[id].pid <= 0 || slot.alive.load() == 0 ||
        slot.pid.load() != static_cast<uint64_t>(_workers[id].pid))
      all = false;
  }
  if (all) {
    _ready_logged = true;
    // Logged once every worker listens, so whoever reads this line can connect.
    log::info("listen", log::Outcome::success,
              {{"ip", _cfg.ip}, {"port", _cfg.port}, {"workers", _worker_count}, {"pid", _pid}});
    return;
  }
  if (reactor::Reactor::now_ms() > _ready_deadline) {
    log::error("listen", log::Outcome::fail, {{"error", "workers did not become ready"}});
    _ready_logged = true;
    return;
  }
  _loop->add_timer(5, [this] { check_ready(); });
}

int Master::run() {
  _pid = ::getpid();
  long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
  _worker_count = _cfg.workers != 0 ? _cfg.workers : static_cast<unsigned>(cpus > 0 ? cpus : 1);
  _worker_count = std::min<unsigned>(_worker_count, lottery::control::workers_max);
  auto fail = [](const char* action, const std::string& message) {
    log::error(action, log::Outcome::fail, {{"error", message}});
    log::info("exit", log::Outcome::fail, {{"code", 1}});
    return 1;
  };
  if (auto st = take_server_lock(); !st) return fail("server_lock", st.error().message);
  auto control = Control::open(_cfg.data_dir, _cfg.agencies, Control::Mode::create_or_open);
  if (!control) return fail("control_open", control.error().message);
  _control = std::move(*control);
  log::info("control_open", log::Outcome::success,
            {{"draw_state", lottery::control::draw_state_name(_control->draw_state())},
             {"agencies", _control->agencies()}});
  // Workers of a previous server (its master killed) may still be finishing;
  // nothing may rebuild shared state or reuse their ids until they are gone.
  if (auto st = wait_for_previous_workers(); !st) return fail("worker_lock", st.error().message);
  // Exactly-once state comes from what the segments hold, not from what the
  // control file last said (it may be older than the segments after a power
  // cut, or lost). Workers must first recover their torn tails: a torn entry
  // fails its checksum, so the scan skips it either way.
  auto duplicates = lottery::control::rebuild_producers(*_control);
  if (!duplicates) return fail("producers", duplicates.error().message);
  if (*duplicates > 0)
    log::warning("producers", log::Outcome::fail, {{"duplicate_entries", *duplicates}});
  // A draw that a crash interrupted, or that became due while nothing ran.
  auto resumed = lottery::control::resume_draw_if_due(*_control, _cfg.winning_number);
  if (!resumed) return fail("sorteo", resumed.error().message);
  log_draw(*resumed, "recovery");
  if (auto st = reserve_port(); !st) return fail("listen", st.error().message);

  auto loop = reactor::Reactor::create(reactor::BackendKind::epoll, {.max_connections = metrics_connections_max});
  if (!loop) return fail("master_loop", loop.error().message);
  _loop = std::move(*loop);
  install_signal_handlers();
  g_reactor.store(_loop.get());

  std::unique_ptr<MetricsHttp> metrics;
  if (!_cfg.metrics_address.empty()) {
    std::string host;
    uint16_t port = 0;
    if (!reactor::net::split_host_port(_cfg.metrics_address, host, port))
      return fail("metrics", "--metrics-address must be HOST:PORT, not " + _cfg.metrics_address);
    auto fd = reactor::net::listen_tcp(host, port, 64, reactor::net::ReusePort::no);
    if (!fd) return fail("metrics", fd.error().message);
    if (auto st = _loop->add_listener(*fd); !st) return fail("metrics", st.error().message);
    metrics = std::make_unique<MetricsHttp>(*_loop, *_control, _worker_count, metrics_connections_max);
    _loop->set_handler(metrics.get());
    log::info("metrics", log::Outcome::success, {{"address", _cfg.metrics_address}, {"path", "/metrics"}});
  }

  // lotteryctl close drops a request file; inotify hands it to us.
  auto watch = watch_directory(_cfg.data_dir);
  if (!watch) return fail("inotify", watch.error().message);
  _inotify_fd = *watch;
  std::string request_path = _cfg.data_dir + "/" + close_request_file_name;
  (void)_loop->watch_fd(_inotify_fd, [this, request_path] {
    bool requested = drain_for(_inotify_fd, close_request_file_name);
    if (requested && ::access(request_path.c_str(), F_OK) == 0) {
      close_betting("operator");
      ::unlink(request_path.c_str());
    }
  });
  if (::access(request_path.c_str(), F_OK) == 0) {
    close_betting("operator");
    ::unlink(request_path.c_str());
  }

  if (!_cfg.close_at.empty()) {
    int64_t at = *parse_close_at(_cfg.close_at);
    int64_t now_ms = static_cast<int64_t>(unix_ms());
    uint64_t delay = at * 1000 > now_ms ? static_cast<uint64_t>(at * 1000 - now_ms) : 0;
    log::info("cierre_programado", log::Outcome::success, {{"close_at", _cfg.close_at}, {"in_ms", delay}});
    _loop->add_timer(delay, [this] { close_betting("deadline"); });
  }

  _loop->set_wake_callback([this] {
    if (g_child_exited) {
      g_child_exited = 0;
      reap();
    }
    if (g_reload_keys != 0) {
      g_reload_keys = 0;
      reload_keys();
    }
    if (g_stop_signal != 0) begin_stop();
  });

  // Key material decides between TLS and plaintext for every worker; a bad
  // keys file stops the server here, before any worker serves in plaintext.
  if (!_cfg.tls_keys.empty()) {
    auto keys = publish_keys();
    if (!keys) return fail("tls_keys", keys.error().message);
    // An agency without a key can never connect, and the draw waits for it.
    std::string missing;
    for (uint32_t a = 1; a <= _cfg.agencies; a++)
      if (keys->find(a) == nullptr) {
        if (!missing.empty()) missing += ',';
        missing += std::to_string(a);
      }
    if (!missing.empty())
      log::warning("tls_keys", log::Outcome::fail,
                   {{"file", _cfg.tls_keys}, {"agencies_without_key", missing},
                    {"warning", "these agencies cannot connect; the draw waits for them (lotteryctl keys rotate "
                                "--agency N adds one)"}});
    log::info("tls", log::Outcome::success,
              {{"mode", "tls1.3-psk"}, {"keys", keys->size()}, {"file", _cfg.tls_keys},
               {"plaintext", "refused"}});
  } else {
    log::warning("tls", log::Outcome::fail,
                 {{"mode", "plaintext"},
                  {"warning", "no key material (--tls-keys, SERVER_TLS_KEYS): every connection is unauthenticated "
                              "and unencrypted; any client can claim any agency"}});
  }

  log::info("master_start", log::Outcome::success,
            {{"pid", _pid}, {"workers", _worker_count}, {"port", _cfg.port}, {"data_dir", _cfg.data_dir}});
  _workers.resize(_worker_count);
  for (unsigned id = 0; id < _worker_count; id++) spawn(id);
  _ready_deadline = reactor::Reactor::now_ms() + ready_wait_ms_max;
  check_ready();
  if (g_stop_signal != 0 || g_child_exited) _loop->wake();

  _loop->run();
  g_reactor.store(nullptr);
  (void)_control->sync();
  log::info("control_closed", log::Outcome::success, {{"draw_state", lottery::control::draw_state_name(_control->draw_state())}});
  if (_port_fd >= 0) ::close(_port_fd);
  log::info("exit", log::Outcome::success, {{"code", 0}});
  return 0;
}

}  // namespace

int run_master(ServerConfig cfg) {
  Master m(std::move(cfg));
  return m.run();
}

}  // namespace server
