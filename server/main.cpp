// lottery-server: one worker process today (per-core workers arrive with the
// process-model issue). Wires config, store, reactor and the lottery service,
// and shuts them down in order on SIGTERM/SIGINT.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstring>

#include "common/log.hpp"
#include "lottery/session.hpp"
#include "lottery/store.hpp"
#include "reactor/net.hpp"
#include "reactor/reactor.hpp"
#include "server/server_config.hpp"

namespace log = common::log;

namespace {

volatile sig_atomic_t g_stop_signal = 0;
std::atomic<reactor::Reactor*> g_reactor{nullptr};

void on_stop_signal(int sig) {
  // Only set a flag and wake the loop; the loop does the work.
  g_stop_signal = sig;
  if (reactor::Reactor* r = g_reactor.load(std::memory_order_relaxed)) r->wake();
}

void install_signal_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  struct sigaction ignore {};
  ignore.sa_handler = SIG_IGN;
  sigaction(SIGPIPE, &ignore, nullptr);
}

common::Result<std::unique_ptr<reactor::Reactor>> make_reactor(server::IoMode mode, size_t max_connections) {
  reactor::Options opts{.max_connections = max_connections};
  if (mode == server::IoMode::epoll) return reactor::Reactor::create(reactor::BackendKind::epoll, opts);
  auto uring = reactor::Reactor::create(reactor::BackendKind::uring, opts);
  if (uring || mode == server::IoMode::uring) return uring;
  log::warning("io_backend", log::Outcome::fail,
               {{"backend", "io_uring"}, {"error", uring.error().message}, {"fallback", "epoll"}});
  return reactor::Reactor::create(reactor::BackendKind::epoll, opts);
}

int fail(const char* action, const std::string& message) {
  log::error(action, log::Outcome::fail, {{"error", message}});
  log::info("exit", log::Outcome::fail, {{"code", 1}});
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  int exit_code = 0;
  auto cfg_result = server::parse_config(argc, argv, exit_code);
  if (!cfg_result) {
    if (exit_code >= 0) return exit_code;  // --help, or CLI11 already explained
    log::init(log::Level::info);
    return fail("config", cfg_result.error().message);
  }
  const server::ServerConfig& cfg = *cfg_result;
  log::init(cfg.log_level);
  install_signal_handlers();
  log::info("config", log::Outcome::success,
            {{"ip", cfg.ip}, {"port", cfg.port}, {"backlog", cfg.listen_backlog}, {"data_dir", cfg.data_dir},
             {"agencies", cfg.agencies}, {"winning_number", cfg.winning_number}});

  auto store = lottery::store::Store::open({cfg.data_dir, 0, cfg.segment_bytes});
  if (!store) return fail("store_open", store.error().message);
  for (const std::string& dropped : (*store)->recovery().dropped)
    log::warning("store_recovery", log::Outcome::success, {{"dropped", dropped}});
  log::info("store_open", log::Outcome::success,
            {{"segments", (*store)->recovery().segments}, {"entries", (*store)->total_entries()},
             {"bets", (*store)->total_bets()}});

  auto reactor_result = make_reactor(cfg.io, cfg.max_connections);
  if (!reactor_result) return fail("io_backend", reactor_result.error().message);
  reactor::Reactor& loop = **reactor_result;
  log::info("io_backend", log::Outcome::success, {{"backend", loop.backend_name()}, {"worker", 0}});

  auto listener = reactor::net::listen_tcp(cfg.ip, cfg.port, cfg.listen_backlog, reactor::net::ReusePort::yes);
  if (!listener) return fail("listen", listener.error().message);
  auto port = reactor::net::local_port(*listener);
  if (auto st = loop.add_listener(*listener); !st) return fail("listen", st.error().message);
  log::info("listen", log::Outcome::success, {{"ip", cfg.ip}, {"port", port ? *port : cfg.port}});

  lottery::LotteryService service(loop, **store, {cfg.agencies, cfg.winning_number, cfg.data_dir},
                                  cfg.max_connections);
  loop.set_handler(&service);
  g_reactor.store(&loop);

  bool shutting_down = false;
  uint64_t shutdown_deadline = 0;
  std::function<void()> check_drained;
  check_drained = [&] {
    if (loop.slots_in_use() == 0 || reactor::Reactor::now_ms() >= shutdown_deadline) {
      loop.stop();
      return;
    }
    loop.add_timer(10, check_drained);
  };
  loop.set_wake_callback([&] {
    if (g_stop_signal == 0 || shutting_down) return;
    shutting_down = true;
    log::info("shutdown", log::Outcome::in_progress, {{"signal", strsignal(g_stop_signal)}});
    loop.stop_accepting();
    log::info("listener_closed", log::Outcome::success, {{"port", port ? *port : cfg.port}});
    service.begin_shutdown();
    shutdown_deadline = reactor::Reactor::now_ms() + static_cast<uint64_t>(cfg.shutdown_grace_ms);
    check_drained();
  });
  if (g_stop_signal != 0) loop.wake();  // a signal that came before the loop existed

  loop.run();
  g_reactor.store(nullptr);
  log::info("connections_closed", log::Outcome::success,
            {{"accepted", loop.stats().accepted}, {"still_open", loop.connection_count()}});
  if (auto st = (*store)->close(); !st) return fail("store_close", st.error().message);
  log::info("store_closed", log::Outcome::success, {{"bets", (*store)->total_bets()}});
  log::info("exit", log::Outcome::success, {{"code", 0}});
  return 0;
}
