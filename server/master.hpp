// The master process, in the manner of nginx's: it forks the workers, restarts
// any that dies (with back-off when one keeps dying), closes the betting on
// --close-at or on an operator's request, serves /metrics, and on SIGTERM
// stops every worker gracefully before exiting 0. It never touches a bet.
#pragma once

#include "server/server_config.hpp"

namespace server {

int run_master(ServerConfig cfg);

// A file lotteryctl drops into the data directory to ask a running server to
// close the betting.
inline constexpr const char* close_request_file_name = "close.request";
// Held (flock) by the master for its whole life: one server per data directory.
inline constexpr const char* server_lock_file_name = "server.lock";

}  // namespace server
