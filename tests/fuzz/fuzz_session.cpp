// libFuzzer target: a whole server session. A fresh worker (control file,
// store, reactor, lottery service) serves one connection over a socketpair;
// the input is what the client sends, cut into packets of arbitrary sizes, so
// every frame boundary lands anywhere in a read. Properties: nothing crashes
// or trips a sanitizer or an assertion; every byte the server sends back is a
// well-formed reply frame; once the client half-closes, the server closes the
// connection and releases its slot.
//
// Input: byte 0 seeds the packet sizes, byte 1 picks the largest packet
// (1 byte up to 64 KiB) and options; the rest is the client's byte stream
// (the seed corpus is recorded traffic, see tests/fuzz/make_corpus.py).
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "common/log.hpp"
#include "tests/support/service_harness.hpp"

namespace {

std::string g_root;

uint32_t next_random(uint32_t& state) {
  state ^= state << 13;
  state ^= state >> 17;
  state ^= state << 5;
  return state;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  common::log::init(common::log::Level::off);
  // A tmpfs when there is one: each input gets a fresh data directory.
  const char* base = std::filesystem::is_directory("/dev/shm") ? "/dev/shm" : "/tmp";
  std::string tmpl = std::string(base) + "/lottery-fuzz-session-XXXXXX";
  if (::mkdtemp(tmpl.data()) == nullptr) std::abort();
  g_root = tmpl;
  std::atexit([] { std::filesystem::remove_all(g_root); });
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  static const size_t packet_max[] = {1, 3, 7, 16, 64, 300, 4096, 65536};
  uint32_t rng = 0x9E3779B9u ^ (uint32_t{data[0]} << 8) ^ data[1];
  size_t largest = packet_max[data[1] & 7];
  bool durable = (data[1] & 8) != 0;
  const uint8_t* stream = data + 2;
  size_t stream_size = size - 2;

  lottery::ServiceOptions options;
  options.data_dir = g_root + "/data";
  options.agencies = 2;  // small, so the draw is within the fuzzer's reach
  options.durability = durable ? lottery::store::Durability::group : lottery::store::Durability::none;
  options.connections_max = 2;
  std::filesystem::remove_all(options.data_dir);
  std::string error;
  auto h = testsupport::ServiceHarness::create(options, reactor::BackendKind::epoll, &error);
  if (!h) std::abort();  // the environment, not the input: stop loudly
  int fd = h->connect();
  testsupport::ReplyReader replies;
  auto check_replies = [&] {
    replies.read(fd);
    while (replies.next()) {
    }
    if (replies.bad) __builtin_trap();  // the server sent something that is not a reply frame
  };

  size_t sent = 0;
  int stuck = 0;
  while (sent < stream_size && !replies.closed()) {
    size_t want = 1 + next_random(rng) % largest;
    if (want > stream_size - sent) want = stream_size - sent;
    ssize_t n = ::send(fd, stream + sent, want, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      stuck = 0;
    } else if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
      break;  // the server closed the connection
    } else if (++stuck > 1000) {
      break;  // paused for good: nothing more is read
    }
    h->step(0);
    check_replies();
  }
  ::shutdown(fd, SHUT_WR);
  for (int i = 0; i < 2000 && h->loop().slots_in_use() > 0; i++) {
    h->step(1);
    check_replies();
  }
  // A connection whose last replies are read is always released.
  if (h->loop().slots_in_use() != 0) __builtin_trap();
  h.reset();
  std::filesystem::remove_all(options.data_dir);
  return 0;
}
