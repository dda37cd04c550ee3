// lottery-server: a master process and one worker process per CPU (see
// server/master.cpp and server/worker.cpp).
#include "common/log.hpp"
#include "server/master.hpp"
#include "server/server_config.hpp"

namespace log = common::log;

int main(int argc, char** argv) {
  int exit_code = 0;
  auto cfg = server::parse_config(argc, argv, exit_code);
  if (!cfg) {
    if (exit_code >= 0) return exit_code;  // --help, or CLI11 already explained
    log::init(log::Level::info);
    log::error("config", log::Outcome::fail, {{"error", cfg.error().message}});
    log::info("exit", log::Outcome::fail, {{"code", 1}});
    return 1;
  }
  log::init(cfg->log_level);
  log::info("config", log::Outcome::success,
            {{"ip", cfg->ip}, {"port", cfg->port}, {"backlog", cfg->listen_backlog}, {"data_dir", cfg->data_dir},
             {"agencies", cfg->agencies}, {"winning_number", cfg->winning_number}, {"workers", cfg->workers}});
  return server::run_master(std::move(*cfg));
}
