// bench-idle-connections: what an idle connection costs the server, and
// whether the server's memory grows with the bets it stores (issue 8,
// docs/PERFORMANCE.md "Memory: idle connections and stored bets").
//
// 1. Starts lottery-server with one worker and room for N connections, and
//    reads the worker's memory (/proc/<pid>/status: RssAnon, RssFile).
// 2. Opens N connections that each say hello (an identified agency terminal
//    with nothing to send) and reads the worker's memory again: the growth
//    divided by N is the cost of an idle connection. The connection tables
//    are sized at start-up, so a second server with room for only a few
//    connections gives the fixed cost of a slot, reported beside it.
// 3. Streams B bets through one more connection and reads the memory once
//    more: the heap must not grow with the bets (they live in the store's
//    file-backed segments, of which at most the current and the prepared next
//    one are mapped).
//
// Loopback only; every process it starts is stopped before it exits.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "lottery/limits.hpp"
#include "lottery/protocol.hpp"

namespace proto = lottery::proto;
namespace fs = std::filesystem;

namespace {

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "bench-idle-connections: %s\n", what.c_str());
  std::exit(1);
}

struct Memory {
  long rss_kib = 0;
  long anon_kib = 0;
  long file_kib = 0;
};

Memory memory_of(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  Memory m;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string key;
    long value = 0;
    if (!(fields >> key >> value)) continue;
    if (key == "VmRSS:") m.rss_kib = value;
    if (key == "RssAnon:") m.anon_kib = value;
    if (key == "RssFile:") m.file_kib = value;
  }
  if (m.rss_kib == 0) die("cannot read the memory of process " + std::to_string(pid));
  return m;
}

// Kernel memory held by TCP socket buffers, machine-wide (pages).
long tcp_buffer_pages() {
  std::ifstream in("/proc/net/sockstat");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("TCP:", 0) != 0) continue;
    auto at = line.find(" mem ");
    if (at != std::string::npos) return std::stol(line.substr(at + 5));
  }
  return -1;
}

// Kernel slab memory, machine-wide (KiB): sockets, files, epoll items.
long slab_kib() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  long value = 0;
  std::string unit;
  while (in >> key >> value >> unit)
    if (key == "Slab:") return value;
  return -1;
}

struct Server {
  pid_t master = -1;
  pid_t worker = -1;
  uint16_t port = 0;
  std::string log_path;

  void stop() {
    if (master <= 0) return;
    ::kill(master, SIGTERM);
    int status = 0;
    for (int i = 0; i < 3000; i++) {
      if (::waitpid(master, &status, WNOHANG) == master) {
        master = -1;
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    ::kill(master, SIGKILL);
    ::waitpid(master, &status, 0);
    master = -1;
  }
  ~Server() { stop(); }
};

void start_server(Server& s, const std::string& bin, const std::string& data_dir, size_t connections,
                  const std::string& io, size_t segment_bytes) {
  s.log_path = data_dir + ".log";
  std::vector<std::string> args = {bin, "--ip", "127.0.0.1", "--port", "0", "--workers", "1", "--agencies", "1",
                                   "--data-dir", data_dir, "--io", io, "--durability", "none", "--segment-bytes",
                                   std::to_string(segment_bytes), "--max-connections", std::to_string(connections),
                                   "--max-connections-total", std::to_string(connections),
                                   // Idle is what is measured: no deadline may end it.
                                   "--handshake-timeout-ms", "3600000", "--idle-timeout-ms", "3600000"};
  pid_t pid = ::fork();
  if (pid < 0) die(std::string("fork: ") + std::strerror(errno));
  if (pid == 0) {
    int fd = ::open(s.log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv(bin.c_str(), argv.data());
    std::_Exit(127);
  }
  s.master = pid;
  for (int i = 0; i < 2000 && s.port == 0; i++) {
    std::ifstream log(s.log_path);
    std::string line;
    while (std::getline(log, line)) {
      auto at = line.find("action: listen | result: success");
      auto p = line.find("port: ");
      if (at != std::string::npos && p != std::string::npos)
        s.port = static_cast<uint16_t>(std::stoul(line.substr(p + 6)));
    }
    if (s.port == 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (s.port == 0) die("the server did not start; its log: " + s.log_path);
  std::ifstream children("/proc/" + std::to_string(pid) + "/task/" + std::to_string(pid) + "/children");
  if (!(children >> s.worker)) die("no worker process under the master");
}

int connect_nonblocking(uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) die(std::string("socket: ") + std::strerror(errno) + " (raise ulimit -n)");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) < 0 && errno != EINPROGRESS)
    die(std::string("connect: ") + std::strerror(errno));
  return fd;
}

bool send_all(int fd, const std::byte* p, size_t n) {
  while (n > 0) {
    ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
      pollfd pfd{fd, POLLOUT, 0};
      ::poll(&pfd, 1, 1000);
      continue;
    }
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

// Whole reply frames from one connection (what is read past a frame is kept
// for the next one).
class ReplyReader {
 public:
  // Waits for the next reply (at most ~10 s); false on error or timeout.
  bool next(int fd, proto::Reply& out) {
    if (_used > 0) {
      _buf.erase(_buf.begin(), _buf.begin() + static_cast<long>(_used));
      _used = 0;
    }
    for (int waits = 0; waits < 10;) {
      if (_buf.size() >= 4) {
        uint32_t len = std::to_integer<uint32_t>(_buf[0]) | std::to_integer<uint32_t>(_buf[1]) << 8 |
                       std::to_integer<uint32_t>(_buf[2]) << 16 | std::to_integer<uint32_t>(_buf[3]) << 24;
        if (len < lottery::limits::frame_header_bytes) return false;
        if (_buf.size() >= len) {
          _used = len;
          return proto::decode_reply({_buf.data(), len}, out);
        }
      }
      std::byte chunk[65536];
      ssize_t r = ::recv(fd, chunk, sizeof chunk, 0);
      if (r > 0) {
        _buf.insert(_buf.end(), chunk, chunk + r);
        continue;
      }
      if (r < 0 && (errno == EAGAIN || errno == EINTR)) {
        pollfd pfd{fd, POLLIN, 0};
        if (::poll(&pfd, 1, 1000) == 0) waits++;
        continue;
      }
      return false;
    }
    return false;
  }

 private:
  std::vector<std::byte> _buf;
  size_t _used = 0;  // bytes of the frame handed out last
};

// Opens `n` connections and identifies each with a hello (its own producer).
std::vector<int> open_idle(uint16_t port, size_t n) {
  std::vector<int> fds;
  fds.reserve(n);
  std::vector<std::byte> frame(64);
  const size_t wave = 256;
  for (size_t done = 0; done < n; done += wave) {
    size_t k = std::min(wave, n - done);
    std::vector<int> now;
    for (size_t i = 0; i < k; i++) now.push_back(connect_nonblocking(port));
    for (size_t i = 0; i < k; i++) {
      size_t len = proto::encode_hello(frame.data(), frame.size(), 1, 1, 1'000'000 + done + i);
      if (!send_all(now[i], frame.data(), len)) die("sending a hello failed (is the server refusing connections?)");
    }
    for (size_t i = 0; i < k; i++) {
      proto::Reply r;
      ReplyReader reader;
      if (!reader.next(now[i], r) || r.status != proto::Status::ok)
        die("connection " + std::to_string(done + i) + " was not accepted (" +
            (r.status == proto::Status::ok ? std::string("closed") : proto::status_name(r.status)) + ")");
      fds.push_back(now[i]);
    }
  }
  return fds;
}

// Streams `bets` bets through one connection (as producer `producer`), a
// window of batches at a time.
void store_bets(uint16_t port, uint64_t bets, uint64_t producer) {
  int fd = connect_nonblocking(port);
  pollfd pfd{fd, POLLOUT, 0};
  ::poll(&pfd, 1, 5000);
  std::vector<std::byte> frame(lottery::limits::client_batch_bytes_default);
  size_t len = proto::encode_hello(frame.data(), frame.size(), 0, 1, producer);
  proto::Reply r;
  ReplyReader reader;
  if (!send_all(fd, frame.data(), len) || !reader.next(fd, r) || r.status != proto::Status::ok)
    die("the bet stream's hello was refused");
  constexpr size_t window = 32;
  std::vector<std::byte> out;
  uint64_t sent = 0;
  uint32_t seq = 1;
  char doc[16], first[24];
  while (sent < bets) {
    out.clear();
    size_t in_flight = 0;
    for (; in_flight < window && sent < bets; in_flight++) {
      proto::BatchBuilder b(frame.data(), frame.size(), 1, lottery::limits::batch_bets_max);
      while (sent < bets) {
        std::snprintf(doc, sizeof doc, "%llu", static_cast<unsigned long long>(10'000'000 + sent % 89'999'999));
        std::snprintf(first, sizeof first, "Nombre%llu", static_cast<unsigned long long>(sent % 1000));
        if (!b.add(proto::Bet{first, "Apellido", doc, proto::Date{1980, 1, static_cast<uint8_t>(1 + sent % 28)},
                              static_cast<uint16_t>(sent % 10000)}))
          break;
        sent++;
      }
      size_t n = b.finish(seq++);
      out.insert(out.end(), frame.begin(), frame.begin() + static_cast<long>(n));
    }
    if (!send_all(fd, out.data(), out.size())) die("sending bets failed");
    for (size_t i = 0; i < in_flight; i++)
      if (!reader.next(fd, r) || r.status != proto::Status::ok)
        die(std::string("a batch was refused: ") + proto::status_name(r.status));
  }
  ::close(fd);
}

void raise_fd_limit(size_t needed) {
  rlimit rl{};
  ::getrlimit(RLIMIT_NOFILE, &rl);
  if (rl.rlim_cur < needed) {
    rl.rlim_cur = std::min<rlim_t>(rl.rlim_max, needed);
    ::setrlimit(RLIMIT_NOFILE, &rl);
  }
  if (rl.rlim_cur < needed)
    die("RLIMIT_NOFILE is " + std::to_string(rl.rlim_cur) + ", " + std::to_string(needed) +
        " needed: raise the hard limit (ulimit -Hn, or LimitNOFILE=) or ask for fewer --connections");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Measures the server's memory per idle connection and against the number of bets stored."};
  std::string bin_dir = "build/bin";
  size_t connections = 10'000;
  uint64_t bets = 2'000'000;
  std::string io = "epoll";
  size_t segment_bytes = 16ull * 1024 * 1024;
  app.add_option("--bin-dir", bin_dir, "where lottery-server is");
  app.add_option("--connections", connections, "idle connections to open")->check(CLI::Range(1, 1'000'000));
  app.add_option("--bets", bets, "bets to store in the second part (0: skip it)");
  app.add_option("--io", io, "server I/O backend: epoll, uring, auto");
  app.add_option("--segment-bytes", segment_bytes, "the server's segment size");
  CLI11_PARSE(app, argc, argv);

  ::signal(SIGPIPE, SIG_IGN);
  // Our own ends, and the server worker's (it raises its own limit as far as
  // the hard limit, which it inherits from us).
  raise_fd_limit(connections + 256);
  std::string bin = fs::absolute(bin_dir + "/lottery-server").string();
  if (!fs::exists(bin)) die(bin + " not found (make build, or --bin-dir)");
  char tmpl[] = "/tmp/bench-idle-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) die("mkdtemp failed");
  std::string tmp = tmpl;

  // The fixed cost of a slot: the same server with room for 16 connections.
  Memory small_base;
  {
    Server small;
    start_server(small, bin, tmp + "/small", 16, io, segment_bytes);
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    small_base = memory_of(small.worker);
  }

  Server server;
  start_server(server, bin, tmp + "/data", connections + 16, io, segment_bytes);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // the prepared segment settles
  Memory base = memory_of(server.worker);
  long tcp_before = tcp_buffer_pages();
  long slab_before = slab_kib();
  auto t0 = std::chrono::steady_clock::now();
  std::vector<int> idle = open_idle(server.port, connections);
  double open_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  Memory with_idle = memory_of(server.worker);
  long tcp_after = tcp_buffer_pages();
  long slab_after = slab_kib();

  // The bets go in two halves: the memory after the first half and after
  // the second must be the same (nothing grows with the bets stored).
  Memory after_half = with_idle, after_bets = with_idle;
  double store_s = 0;
  if (bets > 0) {
    auto t1 = std::chrono::steady_clock::now();
    store_bets(server.port, bets / 2, 42);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    after_half = memory_of(server.worker);
    store_bets(server.port, bets - bets / 2, 43);
    store_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count() - 0.3;
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    after_bets = memory_of(server.worker);
  }
  for (int fd : idle) ::close(fd);
  server.stop();
  fs::remove_all(tmp);

  double n = static_cast<double>(connections);
  double slot_b = 1024.0 * static_cast<double>(base.anon_kib - small_base.anon_kib) / n;
  double idle_b = 1024.0 * static_cast<double>(with_idle.rss_kib - base.rss_kib) / n;
  double idle_anon_b = 1024.0 * static_cast<double>(with_idle.anon_kib - base.anon_kib) / n;
  std::printf("## bench-idle-connections (%s backend, 1 worker)\n\n", io.c_str());
  std::printf("| measure | value |\n|---|---|\n");
  std::printf("| idle connections opened (each said hello) | %zu in %.2f s |\n", connections, open_s);
  std::printf("| worker RSS before / with them | %ld KiB / %ld KiB |\n", base.rss_kib, with_idle.rss_kib);
  std::printf("| growth per idle connection (RSS) | %.0f bytes |\n", idle_b);
  std::printf("| growth per idle connection (heap, RssAnon) | %.0f bytes |\n", idle_anon_b);
  std::printf("| fixed cost per slot, sized at start-up (RssAnon, vs a 16-slot server) | %.0f bytes |\n", slot_b);
  std::printf("| total per idle connection (growth + slot) | %.0f bytes (target: 16 KiB = 16384) |\n", idle_b + slot_b);
  std::printf("| kernel TCP buffer memory, whole machine, before / after | %ld / %ld pages |\n", tcp_before, tcp_after);
  std::printf("| kernel slab per connection, both of its sockets (outside any RSS) | %.0f bytes |\n",
              1024.0 * static_cast<double>(slab_after - slab_before) / n);
  if (bets > 0) {
    std::printf("| bets stored through one more connection | %llu in %.2f s |\n", static_cast<unsigned long long>(bets),
                store_s);
    std::printf("| worker RssAnon (heap): before the bets / after half / after all | %ld / %ld / %ld KiB |\n",
                with_idle.anon_kib, after_half.anon_kib, after_bets.anon_kib);
    std::printf(
        "| worker RssFile (mapped segments of %zu MiB, control file): before / half / all | %ld / %ld / "
        "%ld KiB |\n",
        segment_bytes >> 20, with_idle.file_kib, after_half.file_kib, after_bets.file_kib);
  }
  bool ok = idle_b + slot_b <= 16384.0;
  std::printf("\nresult: %s (%.0f bytes per idle connection)\n", ok ? "within target" : "OVER TARGET", idle_b + slot_b);
  return ok ? 0 : 2;
}
