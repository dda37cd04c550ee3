// bench-discard-sink: the loopback limit. A minimal epoll server that reads
// the same batch frames as lottery-server, finds their ends from the 4-byte
// length prefix, and answers each with a 4-byte acknowledgement (the frame's
// seq). No checksum, no validation, no store: whatever lottery-server costs
// beyond this is the price of its work. Usage: bench-discard-sink PORT
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

constexpr size_t buffer_bytes = 256 * 1024;     // a connection's unparsed input
constexpr size_t acks_max = buffer_bytes / 16;  // a frame is at least 16 bytes
volatile sig_atomic_t g_stop = 0;

struct Conn {
  std::vector<char> in = std::vector<char>(buffer_bytes);
  size_t len = 0;
};

uint32_t load_u32(const char* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);  // little-endian, like the protocol (x86-64, arm64)
  return v;
}

// Reads until EAGAIN; answers every whole frame. False when the peer is gone.
bool serve(int fd, Conn& c) {
  uint32_t acks[acks_max];
  while (true) {
    ssize_t n = ::recv(fd, c.in.data() + c.len, c.in.size() - c.len, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno == EAGAIN;
    if (n == 0) return false;
    c.len += static_cast<size_t>(n);
    size_t pos = 0, count = 0;
    while (c.len - pos >= 16) {
      uint32_t length = load_u32(&c.in[pos]);
      if (length < 16 || length > c.in.size()) return false;
      if (c.len - pos < length) break;
      acks[count++] = load_u32(&c.in[pos + 8]);  // the seq
      pos += length;
    }
    std::memmove(c.in.data(), c.in.data() + pos, c.len - pos);
    c.len -= pos;
    // Acks are 4 bytes per batch and the client reads them, so the socket
    // buffer is never full in practice; if it is, wait rather than drop one.
    const char* out = reinterpret_cast<const char*>(acks);
    size_t left = count * 4;
    while (left > 0) {
      ssize_t w = ::send(fd, out, left, MSG_NOSIGNAL);
      if (w < 0 && errno != EAGAIN && errno != EINTR) return false;
      if (w > 0) out += w, left -= static_cast<size_t>(w);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: bench-discard-sink PORT  (listens on 127.0.0.1)\n");
    return 2;
  }
  signal(SIGTERM, [](int) { g_stop = 1; });
  signal(SIGINT, [](int) { g_stop = 1; });
  int lfd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  int one = 1;
  ::setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(std::atoi(argv[1])));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(lfd, 1024) != 0) {
    std::perror("bench-discard-sink: bind/listen");
    return 1;
  }
  int ep = ::epoll_create1(0);
  epoll_event ev{.events = EPOLLIN, .data = {.fd = lfd}};
  ::epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
  std::vector<Conn*> conns(65536, nullptr);
  epoll_event events[256];
  while (!g_stop) {
    int n = ::epoll_wait(ep, events, 256, 200);
    for (int i = 0; i < n; i++) {
      int fd = events[i].data.fd;
      if (fd == lfd) {
        int cfd = ::accept4(lfd, nullptr, nullptr, SOCK_NONBLOCK);
        if (cfd < 0 || static_cast<size_t>(cfd) >= conns.size()) {
          if (cfd >= 0) ::close(cfd);
          continue;
        }
        ::setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conns[cfd] = new Conn;
        epoll_event cev{.events = EPOLLIN | EPOLLET, .data = {.fd = cfd}};
        ::epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &cev);
      } else if (!serve(fd, *conns[fd])) {
        ::close(fd);
        delete conns[fd];
        conns[fd] = nullptr;
      }
    }
  }
  return 0;
}
