// A whole worker's serving side in one process, for unit tests and the
// session fuzzer: the control file, a store, the reactor and the lottery
// service, with connections made from socketpairs the reactor adopts. The
// caller drives the loop one short step at a time (no thread).
#pragma once

#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "lottery/control.hpp"
#include "lottery/protocol.hpp"
#include "lottery/session.hpp"
#include "lottery/store.hpp"
#include "reactor/reactor.hpp"
#include "tests/support/loop_driver.hpp"

namespace testsupport {

class ServiceHarness {
 public:
  // `options.data_dir` is created if needed; it should be empty.
  static std::unique_ptr<ServiceHarness> create(lottery::ServiceOptions options,
                                                reactor::BackendKind kind = reactor::BackendKind::epoll,
                                                std::string* error = nullptr) {
    std::unique_ptr<ServiceHarness> h(new ServiceHarness());
    auto fail = [&](const std::string& what) {
      if (error) *error = what;
      return nullptr;
    };
    auto control = lottery::control::Control::open(options.data_dir, options.agencies,
                                                   lottery::control::Control::Mode::create_or_open);
    if (!control) return fail(control.error().message);
    h->_control = std::move(*control);
    auto locks = lottery::control::ProducerLocks::open(options.data_dir);
    if (!locks) return fail(locks.error().message);
    h->_locks = std::move(*locks);
    auto store = lottery::store::Store::open(
        {options.data_dir, options.worker_id, lottery::store::segment_bytes_min, false, options.durability});
    if (!store) return fail(store.error().message);
    h->_store = std::move(*store);
    auto loop = reactor::Reactor::create(kind, lottery::reactor_options_for(options));
    if (!loop) return fail(loop.error().message);
    h->_loop = std::move(*loop);
    h->_service = std::make_unique<lottery::LotteryService>(*h->_loop, *h->_store, *h->_control, *h->_locks, options);
    h->_loop->set_handler(h->_service.get());
    h->_refusal = lottery::refusal_frame();
    h->_loop->set_refusal(h->_refusal);
    return h;
  }

  ~ServiceHarness() {
    for (int fd : _client_fds) ::close(fd);
    _service.reset();
    _loop.reset();
    if (_store) (void)_store->close();
  }

  // A new connection; returns the client's end (non-blocking). With
  // `buffer_bytes`, both directions get kernel buffers about that small.
  int connect(int buffer_bytes = 0) {
    int fd = adopt_socketpair(*_loop, buffer_bytes);
    if (fd >= 0) _client_fds.push_back(fd);
    return fd;
  }

  // One pass of the loop, waiting up to `ms` for an event.
  void step(uint64_t ms = 1) { testsupport::step(*_loop, ms); }

  template <typename Done>
  bool run_until(Done done, uint64_t timeout_ms = 5000) {
    return testsupport::run_until(*_loop, done, timeout_ms);
  }

  reactor::Reactor& loop() { return *_loop; }
  lottery::LotteryService& service() { return *_service; }
  lottery::control::Control& control() { return *_control; }

 private:
  ServiceHarness() = default;
  std::unique_ptr<lottery::control::Control> _control;
  std::unique_ptr<lottery::control::ProducerLocks> _locks;
  std::unique_ptr<lottery::store::Store> _store;
  std::unique_ptr<reactor::Reactor> _loop;
  std::unique_ptr<lottery::LotteryService> _service;
  std::vector<std::byte> _refusal;
  std::vector<int> _client_fds;
};

// The client's side of a connection: bytes in, whole reply frames out.
struct DecodedReply {
  uint8_t type = 0;
  uint32_t seq = 0;
  lottery::proto::Status status = lottery::proto::Status::ok;
  uint16_t bet_index = lottery::proto::no_bet_index;
  std::string reason;
};

class ReplyReader {
 public:
  // Reads what is there without blocking. True once the server closed.
  bool read(int fd) {
    char buf[65536];
    while (true) {
      ssize_t n = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
      if (n > 0) {
        _buf.append(buf, static_cast<size_t>(n));
        continue;
      }
      if (n == 0) return _closed = true;
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return _closed;
      return _closed = true;
    }
  }
  // The next whole reply, if one has arrived. A frame that does not decode
  // is reported as malformed (`bad` is set).
  std::optional<DecodedReply> next() {
    namespace proto = lottery::proto;
    if (_buf.size() < lottery::limits::frame_header_bytes) return std::nullopt;
    proto::FrameHeader h;
    auto data = reinterpret_cast<const std::byte*>(_buf.data());
    auto check = proto::parse_header(data, _buf.size(), lottery::limits::frame_bytes_max, h);
    if (check != proto::HeaderCheck::ok) {
      bad = true;
      return std::nullopt;
    }
    if (_buf.size() < h.length) return std::nullopt;
    proto::Reply r;
    if (!proto::decode_reply({data, h.length}, r)) {
      bad = true;
      return std::nullopt;
    }
    DecodedReply out{r.header.type, r.header.seq, r.status, r.bet_index, std::string(r.reason)};
    _buf.erase(0, h.length);
    return out;
  }
  bool closed() const { return _closed; }
  size_t buffered() const { return _buf.size(); }

  bool bad = false;

 private:
  std::string _buf;
  bool _closed = false;
};

}  // namespace testsupport
