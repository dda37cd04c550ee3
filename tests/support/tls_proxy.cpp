// lottery-tls-proxy: a test tool. Listens on 127.0.0.1 (an ephemeral port,
// printed as "port N"), and for each plaintext connection it accepts opens a
// TLS 1.3 connection to the server with the given agency key (or none), then
// relays bytes both ways. Python's ssl module has no external-PSK support
// before 3.13, so the integration tests speak the protocol in clear to this
// proxy and the proxy speaks TLS to the server, with the client library's
// own TLS code (client/net.hpp). A failed handshake closes the plaintext
// side at once and prints "handshake fail: <why>"; a good one prints
// "handshake ok".
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>

#include <openssl/err.h>

#include "client/client_config.hpp"
#include "client/net.hpp"
#include "tls/psk.hpp"

namespace {

std::mutex g_out;
void say(const std::string& line) {
  std::lock_guard<std::mutex> lock(g_out);
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

bool send_all(int fd, const char* p, size_t n) {
  while (n > 0) {
    ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

void relay(int local, lottery::client::HostPort server, SSL_CTX* ctx, const tls::ClientKey* key) {
  lottery::client::WaitContext wait{};
  auto fd = lottery::client::connect_once(server, wait);
  if (!fd) {
    say("connect fail: " + fd.error().message);
    ::close(local);
    return;
  }
  auto ssl = tls::make_client_ssl(ctx, key);
  if (!ssl) {
    say("handshake fail: " + ssl.error().message);
    ::close(local);
    return;
  }
  bool refused = false;
  if (auto st = lottery::client::tls_handshake(fd->get(), ssl->get(), wait, refused); !st) {
    say(std::string("handshake fail: ") + (refused ? "refused: " : "dropped: ") + st.error().message);
    ::close(local);
    return;
  }
  say("handshake ok");
  SSL* s = ssl->get();
  char buf[65536];
  bool local_open = true;
  while (true) {
    pollfd p[2] = {{fd->get(), POLLIN, 0}, {local, static_cast<short>(local_open ? POLLIN : 0), 0}};
    if (SSL_pending(s) == 0 && ::poll(p, 2, -1) < 0) break;
    if (SSL_pending(s) > 0 || (p[0].revents & (POLLIN | POLLHUP | POLLERR))) {
      bool closed = false;
      while (true) {
        ERR_clear_error();
        int r = SSL_read(s, buf, sizeof buf);
        if (r > 0) {
          if (!send_all(local, buf, static_cast<size_t>(r))) closed = true;
          continue;
        }
        int e = SSL_get_error(s, r);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) break;
        closed = true;  // close_notify, EOF or an error: the server is done
        break;
      }
      if (closed) break;
    }
    if (local_open && (p[1].revents & (POLLIN | POLLHUP | POLLERR))) {
      ssize_t n = ::recv(local, buf, sizeof buf, 0);
      if (n <= 0) {
        // The test half-closed: pass it on as a TCP half-close after our data.
        local_open = false;
        ::shutdown(fd->get(), SHUT_WR);
        continue;
      }
      size_t done = 0;
      while (done < static_cast<size_t>(n)) {
        ERR_clear_error();
        int r = SSL_write(s, buf + done, static_cast<int>(static_cast<size_t>(n) - done));
        if (r > 0) {
          done += static_cast<size_t>(r);
          continue;
        }
        int e = SSL_get_error(s, r);
        if (e != SSL_ERROR_WANT_WRITE && e != SSL_ERROR_WANT_READ) break;
        pollfd w{fd->get(), static_cast<short>(e == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN), 0};
        ::poll(&w, 1, 1000);
      }
    }
  }
  ::close(local);
}

}  // namespace

int main(int argc, char** argv) {
  std::string connect_to, key_path;
  bool no_key = false;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--connect" && i + 1 < argc) connect_to = argv[++i];
    else if (a == "--key" && i + 1 < argc) key_path = argv[++i];
    else if (a == "--no-key") no_key = true;
    else {
      std::fprintf(stderr, "usage: lottery-tls-proxy --connect HOST:PORT (--key FILE | --no-key)\n");
      return 1;
    }
  }
  if (connect_to.empty() || (key_path.empty() && !no_key)) {
    std::fprintf(stderr, "usage: lottery-tls-proxy --connect HOST:PORT (--key FILE | --no-key)\n");
    return 1;
  }
  ::signal(SIGPIPE, SIG_IGN);
  auto server = lottery::client::parse_host_port(connect_to);
  if (!server) {
    std::fprintf(stderr, "--connect: %s\n", server.error().message.c_str());
    return 1;
  }
  static tls::ClientKey key;
  if (!no_key) {
    auto loaded = tls::load_client_key(key_path);
    if (!loaded) {
      std::fprintf(stderr, "--key: %s\n", loaded.error().message.c_str());
      return 1;
    }
    key = std::move(*loaded);
  }
  auto ctx = tls::make_context(tls::Side::client);
  if (!ctx) {
    std::fprintf(stderr, "%s\n", ctx.error().message.c_str());
    return 1;
  }
  int lfd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (::bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(lfd, 128) != 0 ||
      ::getsockname(lfd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    std::perror("listen");
    return 1;
  }
  say("port " + std::to_string(ntohs(addr.sin_port)));
  while (true) {
    int c = ::accept(lfd, nullptr, nullptr);
    if (c < 0) continue;
    int one = 1;
    ::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    std::thread(relay, c, *server, ctx->get(), no_key ? nullptr : &key).detach();
  }
}
