// The load generator's engine: one thread, one epoll set over every
// connection. One thread on purpose: on a small machine the generator shares
// the cores with the server it measures, and every cycle it spends is taken
// from the server. Requests are pre-encoded (client/loadgen.cpp), so sending a
// batch is a memcpy into the connection's output buffer and a send(2).
//
// Closed loop: each connection keeps `pipeline` batches in flight and sends
// the next as soon as an acknowledgement frees a place; latency is measured
// from the moment a batch is handed to the socket.
// Open loop (--rate): batch k is due at t0 + k/rate, connection (k mod C)
// sends it; latency is measured from that intended time, so a batch that had
// to wait (window full, socket full, generator late) shows the wait, and
// coordinated omission cannot hide queueing in the server.
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include "client/client_config.hpp"
#include "client/loadgen.hpp"
#include "client/net.hpp"
#include "common/assert.hpp"
#include "lottery/protocol.hpp"
#include "lottery/wire.hpp"
#include "tls/keys.hpp"
#include "tls/psk.hpp"

#include <openssl/err.h>

namespace lottery::loadgen {
namespace {

constexpr size_t receive_buffer_bytes = 64 * 1024 + limits::frame_bytes_max;
constexpr size_t epoll_events_max = 256;
constexpr uint64_t ns_per_s = 1'000'000'000;
constexpr uint64_t progress_interval_ns = ns_per_s;
constexpr uint64_t idle_wait_ns = 100'000'000;  // the longest sleep when nothing is due
constexpr uint64_t connect_phase_timeout_ns = 10 * ns_per_s;
constexpr size_t frame_seq_offset = 8;  // docs/PROTOCOL.md: seq at bytes 8..11, outside the body CRC
constexpr uint32_t discard_ack_bytes = 4;
// The generator asks the kernel to wake it within 1 us of a timer instead of
// the default 50 us slack, so open-loop sends leave on time.
constexpr unsigned long timer_slack_ns = 1000;
// Open loop: a wait shorter than this is spent polling, not sleeping. On a
// virtual machine a sleep and wake-up costs tens of microseconds, so sleeping
// between batches due a few microseconds apart makes every send late.
constexpr uint64_t spin_below_ns = 50'000;

uint64_t now_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * ns_per_s + static_cast<uint64_t>(ts.tv_nsec);
}

double own_cpu_seconds() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  auto secs = [](const timeval& tv) { return static_cast<double>(tv.tv_sec) + static_cast<double>(tv.tv_usec) / 1e6; };
  return secs(ru.ru_utime) + secs(ru.ru_stime);
}

// The children of `pid` (every thread's list), so a master that forks
// workers is measured whole by naming the master alone.
void add_descendants(int pid, std::vector<int>& out) {
  std::error_code ec;
  for (const auto& task : std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/task", ec)) {
    std::ifstream in(task.path() / "children");
    int child = 0;
    while (in >> child) {
      if (std::find(out.begin(), out.end(), child) != out.end()) continue;
      out.push_back(child);
      add_descendants(child, out);
    }
  }
}

// CPU seconds of the named processes and all their descendants, -1 when a
// named process cannot be read.
double server_cpu_seconds(const std::vector<int>& pids) {
  if (pids.empty()) return -1;
  std::vector<int> all(pids.begin(), pids.end());
  for (int pid : pids) add_descendants(pid, all);
  double sum = 0;
  for (size_t i = 0; i < all.size(); i++) {
    double s = process_cpu_seconds(all[i]);
    if (s < 0 && i < pids.size()) return -1;
    if (s > 0) sum += s;  // a descendant that just exited counts as nothing
  }
  return sum;
}

struct Flight {
  uint64_t start_ns = 0;  // handed to the socket (closed loop) or intended (open loop)
  uint32_t seq = 0;
  uint32_t bets = 0;
  uint32_t bytes = 0;
};

enum class ConnState : uint8_t { hello, ready, finishing, done, dead };

struct Conn {
  int fd = -1;
  SSL* ssl = nullptr;  // with --tls-keys: the connection's TLS, handshake done
  size_t index = 0;
  const EncodedPool* pool = nullptr;
  size_t next_request = 0;
  ConnState state = ConnState::ready;
  bool writable = true;
  bool finish_owner = false;  // sends FINISHED for its agency
  uint32_t next_seq = 1;      // batches are 1, 2, 3, ...; HELLO is 0
  uint64_t issued = 0;        // batches issued so far (the open-loop schedule index)
  std::vector<std::byte> out;
  size_t out_head = 0;
  size_t out_tail = 0;
  std::vector<std::byte> in;
  size_t in_len = 0;
  std::vector<Flight> ring;  // capacity `pipeline`
  size_t ring_head = 0;
  size_t ring_count = 0;
};

class Runner {
 public:
  Runner(const Options& o, const std::atomic<bool>* stop) : _o(o), _stop(stop) {}
  ~Runner() {
    for (Conn& c : _conns) {
      if (c.ssl != nullptr) SSL_free(c.ssl);
      if (c.fd >= 0) ::close(c.fd);
    }
    if (_epfd >= 0) ::close(_epfd);
  }

  common::Status prepare();
  common::Status connect_all();
  Report run();

 private:
  bool stop_requested() const { return _stop != nullptr && _stop->load(std::memory_order_relaxed); }
  void count_error(const std::string& name, uint64_t n = 1) { _report.errors[name] += n; }
  void fail_conn(Conn& c, const std::string& why);
  bool can_issue() const;
  void issue(Conn& c, uint64_t start_ns);
  void queue_bytes(Conn& c, const std::byte* data, size_t n);
  void refill(Conn& c, uint64_t now);
  void flush(Conn& c);
  void on_readable(Conn& c);
  size_t parse_lottery(Conn& c, const std::byte* p, size_t n);
  size_t parse_discard(Conn& c, const std::byte* p, size_t n);
  size_t parse_redis(Conn& c, const std::byte* p, size_t n);
  void complete(Conn& c, uint32_t seq, const char* error);
  void start_finish();
  void poll_once(uint64_t timeout_ns);
  uint64_t open_loop_due(const Conn& c, uint64_t now) const;
  size_t in_flight() const;
  bool all_dead() const;
  void progress_tick(uint64_t now);

  common::Status load_tls_keys();
  // recv/send, or SSL_read/SSL_write with the same conventions (-1 and
  // errno EAGAIN while OpenSSL waits for the socket).
  ssize_t read_some(Conn& c, std::byte* p, size_t n);
  ssize_t write_some(Conn& c, const std::byte* p, size_t n);

  const Options& _o;
  const std::atomic<bool>* _stop;
  tls::CtxPtr _tls_ctx;
  std::vector<tls::ClientKey> _tls_keys;  // by agency; identity 0 where no key
  std::vector<EncodedPool> _pools;
  std::vector<Conn> _conns;
  int _epfd = -1;
  Report _report;

  // The run's clock.
  uint64_t _t0 = 0;  // load starts (open-loop schedule origin)
  uint64_t _window_start = 0;
  uint64_t _window_end = 0;
  uint64_t _last_ack = 0;
  bool _started = false;  // batches flow only once every HELLO is acknowledged
  bool _measuring = false;
  bool _stop_sending = false;
  uint64_t _stop_sending_at = 0;
  uint64_t _bets_issued = 0;
  double _interval_ns = 0;  // open loop: ns between batches, all connections together
  size_t _finish_pending = 0;
  bool _finish_started = false;

  // Progress line.
  bool _show_progress = false;
  uint64_t _next_progress = 0;
  uint64_t _interval_bets = 0;
  uint64_t _interval_bytes = 0;
  uint64_t _interval_start = 0;
  LatencyHistogram _interval_latency;

  double _server_cpu_start = -1;
  double _client_cpu_start = 0;
};

common::Status Runner::prepare() {
  std::vector<std::string> files = _o.csv_files;
  if (!_o.csv_dir.empty()) {
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(_o.csv_dir, ec)) {
      std::string name = entry.path().filename().string();
      if (agency_from_file_name(name) != 0) files.push_back(entry.path().string());
    }
    if (ec) return common::Error::make(ec.value(), "reading --csv-dir " + _o.csv_dir + ": " + ec.message());
    if (files.empty()) return common::Error::make(ENOENT, "no agency-N.csv file in " + _o.csv_dir);
    std::sort(files.begin(), files.end(), [](const std::string& a, const std::string& b) {
      return agency_from_file_name(a) < agency_from_file_name(b);
    });
  }
  if (!files.empty()) {
    for (size_t i = 0; i < files.size(); i++) {
      auto bets = load_csv_bets(files[i]);
      if (!bets) return bets.error();
      uint16_t agency = agency_from_file_name(files[i]);
      if (agency == 0) agency = static_cast<uint16_t>(i + 1);
      _pools.push_back(encode_pool(_o.target, agency, *bets, _o.batch_bets));
    }
  } else {
    for (size_t a = 1; a <= _o.agencies; a++) {
      BetList bets = generate_bets(_o.seed, static_cast<uint16_t>(a), _o.pool_batches * _o.batch_bets);
      _pools.push_back(encode_pool(_o.target, static_cast<uint16_t>(a), bets, _o.batch_bets));
    }
  }
  _report.target = _o.target;
  _report.address = _o.address;
  _report.connections = _o.connections;
  _report.agencies = _pools.size();
  _report.batch_bets = _o.batch_bets;
  _report.pipeline = _o.pipeline;
  _report.rate_target_bets_per_s = _o.rate_bets_per_s;
  _report.warmup_s = _o.warmup_s;
  return common::ok_status();
}

common::Status Runner::load_tls_keys() {
  std::error_code ec;
  tls::KeyRing ring;
  if (std::filesystem::is_directory(_o.tls_keys, ec)) {
    for (const EncodedPool& pool : _pools) {
      auto key = tls::load_client_key(_o.tls_keys + "/" + tls::agency_key_file_name(pool.agency));
      if (!key) return key.error();
      ring.set(key->identity, key->key);
    }
  } else {
    auto loaded = tls::KeyRing::load(_o.tls_keys);
    if (!loaded) return loaded.error();
    ring = std::move(*loaded);
  }
  _tls_keys.resize(limits::agencies_max + 1);
  for (const EncodedPool& pool : _pools) {
    const tls::Key* key = ring.find(pool.agency);
    if (key == nullptr)
      return common::Error::make(ENOENT, "--tls-keys " + _o.tls_keys + " has no key for agency " +
                                             std::to_string(pool.agency));
    _tls_keys[pool.agency] = tls::ClientKey{pool.agency, *key, tls::identity_text(pool.agency)};
  }
  auto ctx = tls::make_context(tls::Side::client);
  if (!ctx) return ctx.error();
  _tls_ctx = std::move(*ctx);
  return common::ok_status();
}

ssize_t Runner::read_some(Conn& c, std::byte* p, size_t n) {
  if (c.ssl == nullptr) return ::recv(c.fd, p, n, 0);
  return tls::read_some(c.ssl, p, n);
}

ssize_t Runner::write_some(Conn& c, const std::byte* p, size_t n) {
  if (c.ssl == nullptr) return ::send(c.fd, p, n, MSG_NOSIGNAL);
  return tls::write_some(c.ssl, p, n);
}

common::Status Runner::connect_all() {
  if (!_o.tls_keys.empty())
    if (auto st = load_tls_keys(); !st) return st;
  auto server = client::parse_host_port(_o.address);
  if (!server) return common::Error::make(EINVAL, "--address " + _o.address + ": " + server.error().message);
  _epfd = ::epoll_create1(EPOLL_CLOEXEC);
  if (_epfd < 0) return common::Error::from_errno("epoll_create1");
  client::RetryPolicy policy{
      .attempts = 20, .base = std::chrono::milliseconds(50), .cap = std::chrono::milliseconds(500)};
  client::WaitContext ctx{.stop = _stop, .wait_mask = nullptr};
  _conns.resize(_o.connections);
  std::vector<bool> agency_has_owner(_pools.size(), false);
  for (size_t i = 0; i < _conns.size(); i++) {
    Conn& c = _conns[i];
    c.index = i;
    size_t pool_index = i % _pools.size();
    c.pool = &_pools[pool_index];
    c.finish_owner = !agency_has_owner[pool_index];
    agency_has_owner[pool_index] = true;
    // Connections of one agency start at different places in its pool.
    c.next_request = (i / _pools.size()) * 7919 % c.pool->requests.size();
    c.out.resize(_o.pipeline * c.pool->largest_request_bytes + client::control_frame_bytes_max);
    c.in.resize(receive_buffer_bytes);
    c.ring.resize(_o.pipeline);
    auto fd = client::connect_with_retry(*server, policy, ctx, [](uint32_t, const common::Error&, auto) {});
    if (!fd)
      return common::Error::make(
          fd.error().code, "connection " + std::to_string(i + 1) + " to " + _o.address + ": " + fd.error().message);
    if (_tls_ctx) {
      // One handshake per connection, before the clock starts.
      auto ssl = tls::make_client_ssl(_tls_ctx.get(), &_tls_keys[c.pool->agency]);
      if (!ssl) return ssl.error();
      bool refused = false;
      if (auto st = client::tls_handshake(fd->get(), ssl->get(), ctx, refused); !st)
        return common::Error::make(st.error().code,
                                   "connection " + std::to_string(i + 1) + ": " + st.error().message);
      c.ssl = ssl->release();
    }
    c.fd = fd->release();
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.u64 = i;
    if (::epoll_ctl(_epfd, EPOLL_CTL_ADD, c.fd, &ev) != 0) return common::Error::from_errno("epoll_ctl(ADD)");
    if (_o.target == Target::lottery) {
      std::byte hello[client::control_frame_bytes_max];
      size_t n = proto::encode_hello(hello, sizeof hello, client::hello_seq, c.pool->agency, 0x10AD0000ull + i);
      queue_bytes(c, hello, n);
      c.state = ConnState::hello;
      flush(c);
    }
  }
  // Every HELLO acknowledged before the clock starts, so the first batches do
  // not measure connection setup.
  uint64_t deadline = now_ns() + connect_phase_timeout_ns;
  while (std::any_of(_conns.begin(), _conns.end(), [](const Conn& c) { return c.state == ConnState::hello; })) {
    if (stop_requested()) return common::Error::make(EINTR, "stopped by a signal");
    uint64_t now = now_ns();
    if (now >= deadline) return common::Error::make(ETIMEDOUT, "no HELLO acknowledgement within 10 s");
    poll_once(std::min(deadline - now, idle_wait_ns));
  }
  if (all_dead()) return common::Error::make(ECONNREFUSED, "every connection was refused");
  return common::ok_status();
}

void Runner::fail_conn(Conn& c, const std::string& why) {
  if (c.state == ConnState::dead) return;
  count_error(why);
  if (c.ring_count > 0) count_error("lost_in_flight", c.ring_count);
  if (c.state == ConnState::finishing) _finish_pending--;
  c.ring_count = 0;
  c.state = ConnState::dead;
  if (c.ssl != nullptr) {
    SSL_free(c.ssl);
    c.ssl = nullptr;
  }
  ::close(c.fd);  // also leaves the epoll set
  c.fd = -1;
}

bool Runner::all_dead() const {
  return std::all_of(_conns.begin(), _conns.end(), [](const Conn& c) { return c.state == ConnState::dead; });
}

size_t Runner::in_flight() const {
  size_t n = 0;
  for (const Conn& c : _conns) n += c.ring_count;
  return n;
}

bool Runner::can_issue() const {
  if (_stop_sending) return false;
  return _o.total_bets == 0 || _bets_issued < _o.total_bets;
}

void Runner::queue_bytes(Conn& c, const std::byte* data, size_t n) {
  if (c.out_tail + n > c.out.size()) {
    // Compact: unsent bytes never exceed the window, which the buffer holds.
    std::memmove(c.out.data(), c.out.data() + c.out_head, c.out_tail - c.out_head);
    c.out_tail -= c.out_head;
    c.out_head = 0;
  }
  LOTTERY_ASSERT(c.out_tail + n <= c.out.size());
  std::memcpy(c.out.data() + c.out_tail, data, n);
  c.out_tail += n;
}

void Runner::issue(Conn& c, uint64_t start_ns) {
  LOTTERY_ASSERT(c.ring_count < c.ring.size());
  const EncodedRequest& req = c.pool->requests[c.next_request];
  c.next_request = c.next_request + 1 == c.pool->requests.size() ? 0 : c.next_request + 1;
  queue_bytes(c, c.pool->bytes.data() + req.offset, req.bytes);
  size_t at = c.out_tail - req.bytes;  // queue_bytes may have compacted the buffer
  uint32_t seq = c.next_seq++;
  if (_o.target != Target::redis) wire::store_le<uint32_t>(c.out.data() + at + frame_seq_offset, seq);
  Flight& f = c.ring[(c.ring_head + c.ring_count) % c.ring.size()];
  f = Flight{start_ns, seq, req.bets, req.bytes};
  c.ring_count++;
  c.issued++;
  _bets_issued += req.bets;
  _report.batches_sent_total++;
}

uint64_t Runner::open_loop_due(const Conn& c, uint64_t now) const {
  // Global batch k is due at t0 + k * interval and belongs to connection k mod C.
  if (now < _t0) return 0;
  auto due_global = static_cast<uint64_t>(static_cast<double>(now - _t0) / _interval_ns) + 1;
  uint64_t conns = _conns.size();
  return due_global > c.index ? (due_global - c.index + conns - 1) / conns : 0;
}

void Runner::refill(Conn& c, uint64_t now) {
  if (c.state != ConnState::ready || !_started) {
    flush(c);
    return;
  }
  if (_interval_ns <= 0) {
    while (c.ring_count < c.ring.size() && can_issue()) issue(c, now);
  } else {
    uint64_t due = open_loop_due(c, now);
    uint64_t conns = _conns.size();
    while (c.ring_count < c.ring.size() && c.issued < due && can_issue()) {
      auto intended = _t0 + static_cast<uint64_t>(static_cast<double>(c.issued * conns + c.index) * _interval_ns);
      issue(c, intended);
    }
  }
  flush(c);
}

void Runner::flush(Conn& c) {
  while (c.writable && c.out_head < c.out_tail && c.fd >= 0) {
    ssize_t n = write_some(c, c.out.data() + c.out_head, c.out_tail - c.out_head);
    if (n > 0) {
      c.out_head += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      c.writable = false;  // EPOLLOUT (edge) says when to go on
      return;
    }
    fail_conn(c, std::string("send: ") + std::strerror(errno));
    return;
  }
  if (c.out_head == c.out_tail) c.out_head = c.out_tail = 0;
}

void Runner::complete(Conn& c, uint32_t seq, const char* error) {
  if (c.ring_count == 0) {
    fail_conn(c, "reply_without_request");
    return;
  }
  Flight f = c.ring[c.ring_head];
  c.ring_head = (c.ring_head + 1) % c.ring.size();
  c.ring_count--;
  _report.batches_acked_total++;
  if (seq != f.seq && _o.target != Target::redis) count_error("seq_mismatch");
  if (error != nullptr) {
    count_error(error);
    return;
  }
  if (!_measuring) return;
  uint64_t now = now_ns();
  uint64_t latency = now > f.start_ns ? now - f.start_ns : 0;
  _report.latency.record(latency);
  _report.bets += f.bets;
  _report.batches++;
  _report.bytes += f.bytes;
  _last_ack = now;
  if (_show_progress) {
    _interval_latency.record(latency);
    _interval_bets += f.bets;
    _interval_bytes += f.bytes;
  }
}

size_t Runner::parse_lottery(Conn& c, const std::byte* p, size_t n) {
  size_t used = 0;
  while (n - used >= limits::frame_header_bytes && c.state != ConnState::dead) {
    proto::FrameHeader h;
    auto check = proto::parse_header(p + used, n - used, limits::frame_bytes_max, h);
    if (check == proto::HeaderCheck::need_more) break;
    if (check != proto::HeaderCheck::ok) {
      fail_conn(c, "bad_reply_frame");
      return n;
    }
    if (n - used < h.length) break;
    proto::Reply r;
    if (!proto::decode_reply(proto::Bytes(p + used, h.length), r)) {
      fail_conn(c, "bad_reply_frame");
      return n;
    }
    used += h.length;
    if (r.answers == proto::connection_error_type) {
      fail_conn(c, std::string("connection_error:") + proto::status_name(r.status));
      return n;
    }
    bool ok = r.status == proto::Status::ok;
    switch (static_cast<proto::MsgType>(r.answers)) {
      case proto::MsgType::hello:
        if (!ok) {
          fail_conn(c, std::string("hello:") + proto::status_name(r.status));
          return n;
        }
        c.state = ConnState::ready;
        break;
      case proto::MsgType::batch:
        complete(c, r.header.seq, ok ? nullptr : proto::status_name(r.status));
        break;
      case proto::MsgType::finished:
        if (!ok) count_error(std::string("finished:") + proto::status_name(r.status));
        if (c.state == ConnState::finishing) {
          c.state = ConnState::done;
          _finish_pending--;
        }
        break;
      default:
        fail_conn(c, "unexpected_reply");
        return n;
    }
  }
  return used;
}

size_t Runner::parse_discard(Conn& c, const std::byte* p, size_t n) {
  size_t used = 0;
  while (n - used >= discard_ack_bytes && c.state != ConnState::dead) {
    complete(c, wire::load_le<uint32_t>(p + used), nullptr);
    used += discard_ack_bytes;
  }
  return used;
}

size_t Runner::parse_redis(Conn& c, const std::byte* p, size_t n) {
  // RPUSH answers ":<list length>\r\n", or "-ERR ...\r\n".
  const char* s = reinterpret_cast<const char*>(p);
  size_t used = 0;
  while (used < n && c.state != ConnState::dead) {
    const void* cr = std::memchr(s + used, '\r', n - used);
    if (cr == nullptr) break;
    size_t end = static_cast<size_t>(static_cast<const char*>(cr) - s);
    if (end + 1 >= n) break;  // the '\n' is still on its way
    char kind = s[used];
    if (kind == ':') {
      complete(c, 0, nullptr);
    } else if (kind == '-') {
      complete(c, 0, "redis_error");
    } else {
      fail_conn(c, "bad_redis_reply");
      return n;
    }
    used = end + 2;
  }
  return used;
}

void Runner::on_readable(Conn& c) {
  while (c.fd >= 0) {
    ssize_t n = read_some(c, c.in.data() + c.in_len, c.in.size() - c.in_len);
    if (n > 0) {
      c.in_len += static_cast<size_t>(n);
      size_t used = 0;
      switch (_o.target) {
        case Target::lottery:
          used = parse_lottery(c, c.in.data(), c.in_len);
          break;
        case Target::discard:
          used = parse_discard(c, c.in.data(), c.in_len);
          break;
        case Target::redis:
          used = parse_redis(c, c.in.data(), c.in_len);
          break;
      }
      if (c.fd < 0) return;
      std::memmove(c.in.data(), c.in.data() + used, c.in_len - used);
      c.in_len -= used;
      continue;
    }
    if (n == 0) {
      bool expected = c.state == ConnState::done && c.ring_count == 0;
      if (!expected)
        fail_conn(c, "connection_closed_by_server");
      else {
        if (c.ssl != nullptr) {
          SSL_free(c.ssl);
          c.ssl = nullptr;
        }
        ::close(c.fd);
        c.fd = -1;
      }
      return;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) break;
    fail_conn(c, std::string("recv: ") + std::strerror(errno));
    return;
  }
  refill(c, now_ns());
}

void Runner::poll_once(uint64_t timeout_ns) {
  epoll_event events[epoll_events_max];
  timespec ts{};
  ts.tv_sec = static_cast<time_t>(timeout_ns / ns_per_s);
  ts.tv_nsec = static_cast<long>(timeout_ns % ns_per_s);
  int n = ::epoll_pwait2(_epfd, events, static_cast<int>(epoll_events_max), &ts, nullptr);
  if (n < 0) {
    LOTTERY_ASSERT(errno == EINTR);
    return;
  }
  for (int i = 0; i < n; i++) {
    Conn& c = _conns[events[i].data.u64];
    if (c.fd < 0) continue;
    if (events[i].events & EPOLLOUT) {
      c.writable = true;
      flush(c);
    }
    if (events[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) on_readable(c);
  }
}

void Runner::start_finish() {
  _finish_started = true;
  for (Conn& c : _conns) {
    if (!c.finish_owner) continue;
    if (c.state != ConnState::ready) {
      count_error("finish_not_sent");
      continue;
    }
    std::byte frame[client::control_frame_bytes_max];
    size_t n = proto::encode_finished(frame, sizeof frame, c.next_seq++, c.pool->agency);
    queue_bytes(c, frame, n);
    c.state = ConnState::finishing;
    _finish_pending++;
    flush(c);
  }
  _report.finished_sent = true;
}

void Runner::progress_tick(uint64_t now) {
  if (!_show_progress || now < _next_progress) return;
  double secs = static_cast<double>(now - _interval_start) / 1e9;
  double elapsed = static_cast<double>(now - _t0) / 1e9;
  std::string line = format_progress(elapsed, secs > 0 ? static_cast<double>(_interval_bets) / secs : 0,
                                     secs > 0 ? static_cast<double>(_interval_bytes) / secs / 1e6 : 0,
                                     _interval_latency, _report.error_count());
  std::fprintf(stderr, "\r%s%s", line.c_str(), _measuring ? "" : " (warm-up)");
  std::fflush(stderr);
  _interval_latency.reset();
  _interval_bets = 0;
  _interval_bytes = 0;
  _interval_start = now;
  _next_progress = now + progress_interval_ns;
}

Report Runner::run() {
  ::prctl(PR_SET_TIMERSLACK, timer_slack_ns, 0, 0, 0);
  _show_progress = _o.progress && ::isatty(STDERR_FILENO) == 1;
  if (_o.rate_bets_per_s > 0) {
    double batches_per_s = _o.rate_bets_per_s / static_cast<double>(_o.batch_bets);
    _interval_ns = 1e9 / batches_per_s;
  }
  _t0 = now_ns();
  _started = true;
  _interval_start = _t0;
  _next_progress = _t0 + progress_interval_ns;
  const uint64_t warm_end = _t0 + static_cast<uint64_t>(_o.warmup_s * 1e9);
  const bool timed = _o.total_bets == 0;
  const uint64_t end = timed ? warm_end + static_cast<uint64_t>(_o.duration_s * 1e9) : UINT64_MAX;
  const auto drain_ns = static_cast<uint64_t>(_o.drain_timeout_s * 1e9);

  auto open_window = [&](uint64_t now) {
    _measuring = true;
    _window_start = now;
    _last_ack = now;
    _server_cpu_start = server_cpu_seconds(_o.server_pids);
    _client_cpu_start = own_cpu_seconds();
  };
  auto close_window = [&](uint64_t at) {
    _measuring = false;
    _window_end = at;
    double server_now = server_cpu_seconds(_o.server_pids);
    _report.server_cpu_s = server_now >= 0 && _server_cpu_start >= 0 ? server_now - _server_cpu_start : -1;
    _report.client_cpu_s = own_cpu_seconds() - _client_cpu_start;
  };

  while (true) {
    uint64_t now = now_ns();
    if (!_measuring && _window_end == 0 && now >= warm_end) open_window(now);
    if (!_stop_sending && (stop_requested() || now >= end || !can_issue() || all_dead())) {
      _stop_sending = true;
      _stop_sending_at = now;
      if (_measuring && timed) close_window(now);
    }
    if (_stop_sending) {
      bool drained = in_flight() == 0;
      if (drained && _o.finish && !_finish_started && !stop_requested()) start_finish();
      bool finished = !_o.finish || _finish_pending == 0 || stop_requested();
      if ((drained && finished) || all_dead()) break;
      if (now >= _stop_sending_at + drain_ns) {
        count_error("unacknowledged_at_end", in_flight());
        break;
      }
    }
    for (Conn& c : _conns) refill(c, now);
    progress_tick(now);

    uint64_t wake = now + idle_wait_ns;
    if (_show_progress) wake = std::min(wake, _next_progress);
    if (!_measuring && _window_end == 0) wake = std::min(wake, warm_end);
    if (!_stop_sending && timed) wake = std::min(wake, end);
    if (_stop_sending) wake = std::min(wake, _stop_sending_at + drain_ns);
    if (_interval_ns > 0 && !_stop_sending) {
      auto next_k = static_cast<uint64_t>(static_cast<double>(now - _t0) / _interval_ns) + 1;
      wake = std::min(wake, _t0 + static_cast<uint64_t>(static_cast<double>(next_k) * _interval_ns));
    }
    // A sleep shorter than a context switch costs more than it saves and
    // wakes late: below spin_below_ns the loop polls without sleeping.
    uint64_t timeout = wake > now ? wake - now : 0;
    poll_once(timeout < spin_below_ns ? 0 : timeout);
  }
  if (_measuring) close_window(timed ? now_ns() : _last_ack);  // bets mode, or a stop before the end
  if (_window_start == 0) _window_start = _window_end;         // stopped during the warm-up
  _report.window_s = static_cast<double>(_window_end - _window_start) / 1e9;
  if (_show_progress) std::fprintf(stderr, "\n");
  return _report;
}

}  // namespace

common::Result<Report> run(const Options& options, const std::atomic<bool>* stop) {
  if (auto st = check_options(options); !st) return st.error();
  Runner runner(options, stop);
  if (auto st = runner.prepare(); !st) return st.error();
  if (auto st = runner.connect_all(); !st) return st.error();
  return runner.run();
}

}  // namespace lottery::loadgen
