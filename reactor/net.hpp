// Socket helpers (in the manner of Redis's anet.c): every system call that can
// fail returns an Error that names the call and the address.
#pragma once

#include <cstdint>
#include <string>

#include "common/result.hpp"

namespace reactor::net {

enum class ReusePort : bool { no = false, yes = true };

// A non-blocking listening TCP socket. With ReusePort::yes every worker
// process opens its own socket on the same address and the kernel spreads
// connections among them.
common::Result<int> listen_tcp(const std::string& ip, uint16_t port, int backlog, ReusePort reuse_port);
// The port a socket is bound to (for port 0 in tests).
common::Result<uint16_t> local_port(int fd);
// A blocking connected TCP socket, TCP_NODELAY set; host may be a name.
common::Result<int> connect_tcp(const std::string& host, uint16_t port);
// Splits "host:port" (also "[v6]:port").
bool split_host_port(const std::string& address, std::string& host, uint16_t& port);
common::Status set_nodelay(int fd);

}  // namespace reactor::net
