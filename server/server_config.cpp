#include "server/server_config.hpp"

#include <CLI/CLI.hpp>

#include "common/config.hpp"
#include <cstdio>
#include <ctime>
#include <type_traits>

#include "lottery/control.hpp"
#include "lottery/limits.hpp"

namespace server {

common::Result<ServerConfig> parse_config(int argc, char** argv, int& exit_code) {
  exit_code = -1;
  ServerConfig cfg;
  // The config file comes first: its values become the defaults that the
  // environment and then the flags override.
  std::string path = common::config::prescan_flag(argc, argv, "--config")
                         .value_or(common::config::env("SERVER_CONFIG").value_or(cfg.config_path));
  bool explicit_path = common::config::prescan_flag(argc, argv, "--config").has_value() ||
                       common::config::env("SERVER_CONFIG").has_value();
  auto file = common::config::load_ini(path, !explicit_path);
  if (!file) return file.error();
  auto from_file = [&](const char* key, std::string fallback) {
    auto it = file->find(key);
    return it == file->end() || it->second.empty() ? fallback : it->second;
  };

  CLI::App app{"lottery-server: receives agencies' bets, stores them durably and runs the draw"};
  app.option_defaults()->always_capture_default();
  std::string level_text = from_file("LOGGING_LEVEL", "INFO");
  std::string io_text = from_file("SERVER_IO", "auto");
  try {
  cfg.ip = from_file("SERVER_IP", cfg.ip);
  cfg.port = static_cast<uint16_t>(std::stoul(from_file("SERVER_PORT", std::to_string(cfg.port))));
  cfg.listen_backlog = std::stoi(from_file("SERVER_LISTEN_BACKLOG", std::to_string(cfg.listen_backlog)));
  cfg.data_dir = from_file("SERVER_DATA_DIR", cfg.data_dir);
  cfg.agencies = static_cast<uint16_t>(std::stoul(from_file("SERVER_AGENCIES", std::to_string(cfg.agencies))));
  cfg.winning_number =
      static_cast<uint16_t>(std::stoul(from_file("SERVER_WINNING_NUMBER", std::to_string(cfg.winning_number))));
  auto number = [&](const char* key, auto& field) {
    field = static_cast<std::remove_reference_t<decltype(field)>>(std::stoull(from_file(key, std::to_string(field))));
  };
  number("SERVER_MAX_CONNECTIONS", cfg.max_connections);
  number("SERVER_MAX_CONNECTIONS_TOTAL", cfg.max_connections_total);
  number("SERVER_MAX_FRAME_BYTES", cfg.max_frame_bytes);
  number("SERVER_MAX_BATCH_BETS", cfg.max_batch_bets);
  number("SERVER_MAX_UNIDENTIFIED_BYTES", cfg.max_unidentified_bytes);
  number("SERVER_MAX_PENDING_REPLY_BYTES", cfg.max_pending_reply_bytes);
  number("SERVER_HANDSHAKE_TIMEOUT_MS", cfg.handshake_timeout_ms);
  number("SERVER_IDLE_TIMEOUT_MS", cfg.idle_timeout_ms);
  number("SERVER_REPLY_STALL_TIMEOUT_MS", cfg.reply_stall_timeout_ms);
  number("SERVER_TLS_FAILURE_BURST", cfg.tls_failure_burst);
  number("SERVER_TLS_FAILURE_REFILL_MS", cfg.tls_failure_refill_ms);
  cfg.tls_keys = from_file("SERVER_TLS_KEYS", cfg.tls_keys);
  } catch (const std::exception&) {
    return common::Error::make(EINVAL, "config file " + path + ": a numeric setting is not a number");
  }

  app.add_option("--config", cfg.config_path, "config.ini path")->envname("SERVER_CONFIG");
  app.add_option("--ip", cfg.ip, "address to listen on")->envname("SERVER_IP");
  app.add_option("--port", cfg.port, "TCP port")->envname("SERVER_PORT");
  app.add_option("--backlog", cfg.listen_backlog, "listen(2) backlog")
      ->envname("SERVER_LISTEN_BACKLOG")
      ->check(CLI::Range(1, 65535));
  app.add_option("--log-level", level_text, "DEBUG, INFO, WARNING, ERROR")->envname("LOGGING_LEVEL");
  app.add_option("--data-dir", cfg.data_dir, "directory of the bet store")->envname("SERVER_DATA_DIR");
  app.add_option("--agencies", cfg.agencies, "number of agencies expected to finish before the draw")
      ->envname("SERVER_AGENCIES")
      ->check(CLI::Range(1, static_cast<int>(lottery::limits::agencies_max)));
  app.add_option("--winning-number", cfg.winning_number, "the number that wins the draw")
      ->envname("SERVER_WINNING_NUMBER")
      ->check(CLI::Range(0, static_cast<int>(lottery::limits::bet_number_max)));
  app.add_option("--io", io_text, "I/O backend: auto, epoll or uring")->envname("SERVER_IO");
  app.add_option("--segment-bytes", cfg.segment_bytes, "size of each store segment file")
      ->envname("SERVER_SEGMENT_BYTES");
  // Hostile input: every limit below is explained in docs/SECURITY.md.
  namespace lim = lottery::limits;
  app.add_option("--max-connections", cfg.max_connections,
                 "connections one worker serves at once; more are refused with too_many_connections")
      ->envname("SERVER_MAX_CONNECTIONS")
      ->check(CLI::Range(1, 1'000'000));
  app.add_option("--max-connections-total", cfg.max_connections_total,
                 "connections all workers together serve at once; more are refused with too_many_connections")
      ->envname("SERVER_MAX_CONNECTIONS_TOTAL")
      ->check(CLI::Range(1, 64'000'000));
  app.add_option("--max-frame-bytes", cfg.max_frame_bytes,
                 "largest request frame, checked from its length prefix (frame_too_large, then close)")
      ->envname("SERVER_MAX_FRAME_BYTES")
      ->check(CLI::Range(lim::frame_bytes_min, lim::frame_bytes_max));
  app.add_option("--max-batch-bets", cfg.max_batch_bets, "most bets in one batch (too_many_bets)")
      ->envname("SERVER_MAX_BATCH_BETS")
      ->check(CLI::Range(size_t{1}, lim::batch_bets_max));
  app.add_option("--max-unidentified-bytes", cfg.max_unidentified_bytes,
                 "request bytes a connection may send before a successful hello (not_identified, then close)")
      ->envname("SERVER_MAX_UNIDENTIFIED_BYTES")
      ->check(CLI::Range(lim::hello_frame_bytes, lim::frame_bytes_max));
  app.add_option("--max-pending-reply-bytes", cfg.max_pending_reply_bytes,
                 "unsent replies a connection may queue before it is paused (not read)")
      ->envname("SERVER_MAX_PENDING_REPLY_BYTES")
      ->check(CLI::Range(lim::pending_reply_bytes_min, lim::pending_reply_bytes_default));
  app.add_option("--handshake-timeout-ms", cfg.handshake_timeout_ms,
                 "time from connect to a successful hello (handshake_timeout, then close)")
      ->envname("SERVER_HANDSHAKE_TIMEOUT_MS")
      ->check(CLI::Range(lim::timeout_ms_min, uint32_t{86'400'000}));
  app.add_option("--idle-timeout-ms", cfg.idle_timeout_ms,
                 "time from one complete request to the next (idle_timeout, then close); a held winners query "
                 "is not idle")
      ->envname("SERVER_IDLE_TIMEOUT_MS")
      ->check(CLI::Range(lim::timeout_ms_min, uint32_t{86'400'000}));
  app.add_option("--reply-stall-timeout-ms", cfg.reply_stall_timeout_ms,
                 "how long a connection paused at its pending-reply cap (or closing) may leave its replies "
                 "unread before it is dropped")
      ->envname("SERVER_REPLY_STALL_TIMEOUT_MS")
      ->check(CLI::Range(lim::timeout_ms_min, uint32_t{86'400'000}));
  app.add_option("--shutdown-grace-ms", cfg.shutdown_grace_ms, "how long SIGTERM waits for replies to drain")
      ->envname("SERVER_SHUTDOWN_GRACE_MS");
  app.add_option("--workers", cfg.workers, "worker processes (0: one per online CPU)")
      ->envname("SERVER_WORKERS")
      ->check(CLI::Range(0, static_cast<int>(lottery::control::workers_max)));
  app.add_flag("--pin-cpus", cfg.pin_cpus, "pin worker i to CPU i")->envname("SERVER_PIN_CPUS");
  app.add_option("--close-at", cfg.close_at,
                 "close the betting at this local time (HH:MM[:SS] today, or YYYY-MM-DDTHH:MM[:SS]) and draw "
                 "with the agencies that finished")
      ->envname("SERVER_CLOSE_AT");
  app.add_option("--metrics-address", cfg.metrics_address, "serve Prometheus metrics on HOST:PORT (GET /metrics)")
      ->envname("SERVER_METRICS_ADDRESS");
  cfg.durability = from_file("SERVER_DURABILITY", cfg.durability);
  app.add_option("--durability", cfg.durability,
                 "when a batch is acknowledged: none (in the page cache), group (synced in groups), always "
                 "(synced each batch)")
      ->envname("SERVER_DURABILITY")
      ->check(CLI::IsMember({"none", "group", "always"}));
  app.add_option("--group-window-ms", cfg.group_window_ms,
                 "group commit: while the disk is idle, how long a group's first batch waits for more before the "
                 "sync starts (0: at once)")
      ->envname("SERVER_GROUP_WINDOW_MS")
      ->check(CLI::Range(0, 1000));
  app.add_option("--group-batches", cfg.group_batches_max, "group commit: the most batches in one sync")
      ->envname("SERVER_GROUP_BATCHES")
      ->check(CLI::Range(1, 4096));
  app.add_flag("--repair", cfg.repair,
               "start even when a segment is damaged in the middle: the damaged bytes are skipped and logged")
      ->envname("SERVER_REPAIR");
  app.add_option("--tls-keys", cfg.tls_keys,
                 "keys file (lotteryctl keys init): TLS 1.3 with a pre-shared key per agency, plaintext refused; "
                 "reloaded on SIGHUP. Unset: plaintext, every connection unauthenticated")
      ->envname("SERVER_TLS_KEYS");
  app.add_option("--tls-failure-burst", cfg.tls_failure_burst,
                 "failed TLS handshakes one address may make in a row before its connections are closed unheard")
      ->envname("SERVER_TLS_FAILURE_BURST")
      ->check(CLI::Range(1, 1'000'000));
  app.add_option("--tls-failure-refill-ms", cfg.tls_failure_refill_ms,
                 "after the burst, one more failed handshake per this many milliseconds")
      ->envname("SERVER_TLS_FAILURE_REFILL_MS")
      ->check(CLI::Range(1, 86'400'000));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    exit_code = app.exit(e);
    return common::Error::make(EINVAL, "bad command line");
  }
  if (!common::log::parse_level(level_text, cfg.log_level))
    return common::Error::make(EINVAL, "LOGGING_LEVEL must be DEBUG, INFO, WARNING or ERROR, not " + level_text);
  if (io_text == "auto") cfg.io = IoMode::auto_select;
  else if (io_text == "epoll") cfg.io = IoMode::epoll;
  else if (io_text == "uring" || io_text == "io_uring") cfg.io = IoMode::uring;
  else return common::Error::make(EINVAL, "--io must be auto, epoll or uring, not " + io_text);
  if (!cfg.close_at.empty()) {
    if (auto t = parse_close_at(cfg.close_at); !t) return t.error();
  }
  return cfg;
}

common::Result<int64_t> parse_close_at(const std::string& text) {
  struct tm tm_v {};
  time_t now = ::time(nullptr);
  ::localtime_r(&now, &tm_v);
  int y = 0, mo = 0, d = 0, h = 0, mi = 0, sec = 0;
  int n = 0;
  if (std::sscanf(text.c_str(), "%4d-%2d-%2dT%2d:%2d:%2d%n", &y, &mo, &d, &h, &mi, &sec, &n) == 6 &&
      static_cast<size_t>(n) == text.size()) {
  } else if (sec = 0, n = 0, std::sscanf(text.c_str(), "%4d-%2d-%2dT%2d:%2d%n", &y, &mo, &d, &h, &mi, &n) == 5 &&
                                static_cast<size_t>(n) == text.size()) {
  } else if (y = tm_v.tm_year + 1900, mo = tm_v.tm_mon + 1, d = tm_v.tm_mday, n = 0,
             std::sscanf(text.c_str(), "%2d:%2d:%2d%n", &h, &mi, &sec, &n) == 3 && static_cast<size_t>(n) == text.size()) {
  } else if (sec = 0, n = 0, std::sscanf(text.c_str(), "%2d:%2d%n", &h, &mi, &n) == 2 &&
                                static_cast<size_t>(n) == text.size()) {
  } else {
    return common::Error::make(EINVAL, "--close-at must be HH:MM[:SS] or YYYY-MM-DDTHH:MM[:SS], not " + text);
  }
  if (mo < 1 || mo > 12 || d < 1 || d > 31 || h < 0 || h > 23 || mi < 0 || mi > 59 || sec < 0 || sec > 60)
    return common::Error::make(EINVAL, "--close-at is not a valid local time: " + text);
  struct tm want {};
  want.tm_year = y - 1900;
  want.tm_mon = mo - 1;
  want.tm_mday = d;
  want.tm_hour = h;
  want.tm_min = mi;
  want.tm_sec = sec;
  want.tm_isdst = -1;
  time_t t = ::mktime(&want);
  if (t == static_cast<time_t>(-1)) return common::Error::make(EINVAL, "--close-at is not a valid local time: " + text);
  return static_cast<int64_t>(t);
}

}  // namespace server
