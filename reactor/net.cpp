#include "reactor/net.hpp"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

namespace reactor::net {

common::Result<int> listen_tcp(const std::string& ip, uint16_t port, int backlog, ReusePort reuse_port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  std::string port_text = std::to_string(port);
  const char* node = ip.empty() ? nullptr : ip.c_str();
  if (int rc = ::getaddrinfo(node, port_text.c_str(), &hints, &res); rc != 0) {
    return common::Error::make(EINVAL, "getaddrinfo(" + ip + "): " + ::gai_strerror(rc));
  }
  std::string where = ip + ":" + port_text;
  common::Error last = common::Error::make(EADDRNOTAVAIL, "no address to listen on for " + where);
  for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      last = common::Error::from_errno(("socket for " + where).c_str());
      continue;
    }
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (reuse_port == ReusePort::yes && ::setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0) {
      last = common::Error::from_errno(("setsockopt(SO_REUSEPORT) for " + where).c_str());
      ::close(fd);
      continue;
    }
    if (::bind(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
      last = common::Error::from_errno(
          ("bind " + where + " (is another server on this port? pick another with --port)").c_str());
      ::close(fd);
      continue;
    }
    if (::listen(fd, backlog) < 0) {
      last = common::Error::from_errno(("listen " + where).c_str());
      ::close(fd);
      continue;
    }
    ::freeaddrinfo(res);
    return fd;
  }
  ::freeaddrinfo(res);
  return last;
}

common::Result<uint16_t> local_port(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) < 0) return common::Error::from_errno("getsockname");
  if (ss.ss_family == AF_INET) return ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  if (ss.ss_family == AF_INET6) return ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port);
  return common::Error::make(EAFNOSUPPORT, "getsockname: not an IP socket");
}

common::Status set_nodelay(int fd) {
  int one = 1;
  if (::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
    return common::Error::from_errno("setsockopt(TCP_NODELAY)");
  return common::ok_status();
}

common::Result<int> connect_tcp(const std::string& host, uint16_t port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  std::string port_text = std::to_string(port);
  if (int rc = ::getaddrinfo(host.c_str(), port_text.c_str(), &hints, &res); rc != 0) {
    return common::Error::make(EHOSTUNREACH, "getaddrinfo(" + host + "): " + ::gai_strerror(rc));
  }
  common::Error last = common::Error::make(EHOSTUNREACH, "no address for " + host);
  for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      last = common::Error::from_errno("socket");
      continue;
    }
    if (::connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
      last = common::Error::from_errno(("connect " + host + ":" + port_text).c_str());
      ::close(fd);
      continue;
    }
    (void)set_nodelay(fd);
    ::freeaddrinfo(res);
    return fd;
  }
  ::freeaddrinfo(res);
  return last;
}

bool split_host_port(const std::string& address, std::string& host, uint16_t& port) {
  size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon + 1 >= address.size()) return false;
  host = address.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  unsigned long p = 0;
  for (size_t i = colon + 1; i < address.size(); i++) {
    char ch = address[i];
    if (ch < '0' || ch > '9') return false;
    p = p * 10 + static_cast<unsigned long>(ch - '0');
    if (p > 65535) return false;
  }
  if (p == 0) return false;
  port = static_cast<uint16_t>(p);
  return !host.empty();
}

}  // namespace reactor::net
