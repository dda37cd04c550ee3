// A worker process: its own listening socket (SO_REUSEPORT), reactor, store
// segments and lottery service. Shares nothing on the hot path with the other
// workers; finishing and the draw go through the control file and its lock.
#pragma once

#include "server/server_config.hpp"

namespace server {

// In the data directory: the keys the workers load (mode 0600). The master
// writes it from --tls-keys at start and on every SIGHUP whose file parses,
// so a worker restarted after a crash loads the keys in use, never a keys
// file broken since the last good reload.
inline constexpr const char* active_keys_file_name = "tls-keys.active";

// Runs worker `worker_id` until SIGTERM/SIGINT. Called in the child right
// after fork; returns the process exit code.
int run_worker(const ServerConfig& cfg, unsigned worker_id, pid_t master_pid);

}  // namespace server
