// Server settings: flag > environment > config.ini ([DEFAULT]) > default.
#pragma once

#include <cstdint>
#include <string>

#include "common/log.hpp"
#include "common/result.hpp"
#include "lottery/limits.hpp"
#include "tls/limits.hpp"

namespace server {

enum class IoMode : uint8_t { auto_select, epoll, uring };

struct ServerConfig {
  std::string config_path = "config.ini";
  std::string ip = "0.0.0.0";
  uint16_t port = 12345;
  int listen_backlog = 1024;
  common::log::Level log_level = common::log::Level::info;
  std::string data_dir = "./data";
  uint16_t agencies = 5;
  uint16_t winning_number = 7574;
  IoMode io = IoMode::auto_select;
  size_t segment_bytes = 64ull * 1024 * 1024;
  // Hostile input (docs/SECURITY.md); defaults in lottery/limits.hpp.
  size_t max_connections = lottery::limits::connections_per_worker_default;  // per worker
  size_t max_connections_total = lottery::limits::connections_total_default;
  size_t max_frame_bytes = lottery::limits::frame_bytes_max;
  size_t max_batch_bets = lottery::limits::batch_bets_max;
  size_t max_unidentified_bytes = lottery::limits::unidentified_bytes_default;
  size_t max_pending_reply_bytes = lottery::limits::pending_reply_bytes_default;
  uint32_t handshake_timeout_ms = lottery::limits::handshake_timeout_ms_default;
  uint32_t idle_timeout_ms = lottery::limits::idle_timeout_ms_default;
  uint32_t reply_stall_timeout_ms = lottery::limits::reply_stall_timeout_ms_default;
  int shutdown_grace_ms = 5000;
  unsigned workers = 0;  // 0: one per online CPU
  bool pin_cpus = false;
  std::string close_at;         // "HH:MM[:SS]" today or "YYYY-MM-DDTHH:MM[:SS]", local time; empty: never
  std::string metrics_address;  // "HOST:PORT"; empty: no metrics endpoint
  // Default group: an acknowledged bet survives a power cut, at the price of
  // about a millisecond of acknowledgement latency (see docs/STORAGE.md).
  std::string durability = "group";
  uint32_t group_window_ms = 0;
  uint32_t group_batches_max = 64;
  bool repair = false;
  // TLS (docs/SECURITY.md): the server's keys file; empty means plaintext,
  // every connection unauthenticated (logged as a warning at start).
  std::string tls_keys;
  uint32_t tls_failure_burst = tls::limits::failure_burst_default;          // failed handshakes in a row, per address
  uint32_t tls_failure_refill_ms = tls::limits::failure_refill_ms_default;  // then one more per this many ms
};

// Seconds since the epoch of a --close-at value, or an error.
common::Result<int64_t> parse_close_at(const std::string& text);

// Parses argv (and the environment, and the config file). Returns the exit
// code to use in `exit_code` when the process should stop (e.g. --help).
common::Result<ServerConfig> parse_config(int argc, char** argv, int& exit_code);

}  // namespace server
