// The load generator's socket-free parts: the log-linear histogram, option
// parsing, the bet corpus and its encodings.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "client/loadgen.hpp"
#include "lottery/protocol.hpp"

namespace {

using namespace lottery;
using loadgen::LatencyHistogram;

TEST(LoadgenHistogram, SmallValuesAreExact) {
  for (uint64_t v = 0; v < 2 * loadgen::histogram_sub_buckets; v++) {
    size_t i = LatencyHistogram::bucket_of(v);
    EXPECT_EQ(LatencyHistogram::bucket_lowest(i), v);
    EXPECT_EQ(LatencyHistogram::bucket_highest(i), v);
  }
}

TEST(LoadgenHistogram, BucketsTileTheRangeWithBoundedError) {
  // Consecutive buckets are adjacent, and a bucket is at most 1/128 of its lowest value wide.
  for (size_t i = 1; i < loadgen::histogram_buckets; i++) {
    ASSERT_EQ(LatencyHistogram::bucket_lowest(i), LatencyHistogram::bucket_highest(i - 1) + 1) << i;
    uint64_t lo = LatencyHistogram::bucket_lowest(i);
    uint64_t width = LatencyHistogram::bucket_highest(i) - lo + 1;
    if (i >= 2 * loadgen::histogram_sub_buckets)
      ASSERT_LE(width * loadgen::histogram_sub_buckets, lo) << i;
    else
      ASSERT_EQ(width, 1u) << i;
  }
  EXPECT_EQ(LatencyHistogram::bucket_highest(loadgen::histogram_buckets - 1), loadgen::histogram_value_max_ns);
  for (uint64_t v : {300ull, 1'000ull, 12'345ull, 999'999ull, 123'456'789ull, 1ull << 40}) {
    size_t i = LatencyHistogram::bucket_of(v);
    EXPECT_LE(LatencyHistogram::bucket_lowest(i), v);
    EXPECT_GE(LatencyHistogram::bucket_highest(i), v);
  }
}

TEST(LoadgenHistogram, PercentilesOfAUniformSpread) {
  LatencyHistogram h;
  for (uint64_t us = 1; us <= 1000; us++) h.record(us * 1000);  // 1 us .. 1 ms
  EXPECT_EQ(h.count(), 1000u);
  EXPECT_EQ(h.min_ns(), 1000u);
  EXPECT_EQ(h.max_ns(), 1'000'000u);
  EXPECT_NEAR(h.mean_ns(), 500'500.0, 1.0);
  auto near = [](uint64_t got, double want) { return std::abs(static_cast<double>(got) - want) <= want * 0.01; };
  EXPECT_TRUE(near(h.value_at_percentile(50), 500'000)) << h.value_at_percentile(50);
  EXPECT_TRUE(near(h.value_at_percentile(90), 900'000)) << h.value_at_percentile(90);
  EXPECT_TRUE(near(h.value_at_percentile(99), 990'000)) << h.value_at_percentile(99);
  EXPECT_EQ(h.value_at_percentile(100), 1'000'000u);  // never above the max
  EXPECT_TRUE(near(h.value_at_percentile(0), 1'000));
}

TEST(LoadgenHistogram, MergeResetAndOverflow) {
  LatencyHistogram a, b;
  a.record(10);
  b.record(20);
  b.record(UINT64_MAX);  // clamped, not lost
  a.merge(b);
  EXPECT_EQ(a.count(), 3u);
  EXPECT_EQ(a.min_ns(), 10u);
  EXPECT_EQ(a.max_ns(), loadgen::histogram_value_max_ns);
  a.reset();
  EXPECT_EQ(a.count(), 0u);
  EXPECT_EQ(a.value_at_percentile(99), 0u);
  EXPECT_EQ(a.min_ns(), 0u);
}

loadgen::Options parse(const std::vector<std::string>& args, int& exit_code, bool& ok) {
  std::vector<const char*> argv{"lottery-loadgen"};
  for (const auto& a : args) argv.push_back(a.c_str());
  auto r = loadgen::parse_options(static_cast<int>(argv.size()), argv.data(), exit_code);
  ok = r.ok();
  loadgen::Options out;
  if (ok) out = r.value();
  return out;
}

TEST(LoadgenOptions, Defaults) {
  int code = -1;
  bool ok = false;
  auto o = parse({}, code, ok);
  ASSERT_TRUE(ok);
  EXPECT_EQ(o.address, "127.0.0.1:12345");
  EXPECT_EQ(o.target, loadgen::Target::lottery);
  EXPECT_EQ(o.connections, 4u);
  EXPECT_EQ(o.batch_bets, 128u);
  EXPECT_EQ(o.pipeline, 8u);
  EXPECT_EQ(o.rate_bets_per_s, 0.0);
  EXPECT_FALSE(o.finish);  // a load run never triggers the draw unless asked
}

TEST(LoadgenOptions, EveryFlag) {
  int code = -1;
  bool ok = false;
  auto o = parse({"--address",
                  "127.0.0.1:9",
                  "--target",
                  "redis",
                  "--connections",
                  "8",
                  "--agencies",
                  "3",
                  "--batch",
                  "64",
                  "--pipeline",
                  "2",
                  "--duration",
                  "2.5",
                  "--warmup",
                  "0",
                  "--rate",
                  "150000",
                  "--json",
                  "--server-pid",
                  "10",
                  "--server-pid",
                  "11",
                  "--seed",
                  "7",
                  "--no-progress"},
                 code, ok);
  ASSERT_TRUE(ok);
  EXPECT_EQ(o.address, "127.0.0.1:9");
  EXPECT_EQ(o.target, loadgen::Target::redis);
  EXPECT_EQ(o.connections, 8u);
  EXPECT_EQ(o.agencies, 3u);
  EXPECT_EQ(o.batch_bets, 64u);
  EXPECT_EQ(o.pipeline, 2u);
  EXPECT_DOUBLE_EQ(o.duration_s, 2.5);
  EXPECT_DOUBLE_EQ(o.warmup_s, 0.0);
  EXPECT_DOUBLE_EQ(o.rate_bets_per_s, 150000.0);
  EXPECT_TRUE(o.json);
  EXPECT_FALSE(o.progress);
  EXPECT_EQ(o.server_pids, (std::vector<int>{10, 11}));
  EXPECT_EQ(o.seed, 7u);
}

TEST(LoadgenOptions, ARepeatedFlagTakesItsLastValue) {
  int code = -1;
  bool ok = false;
  auto o = parse({"--warmup", "1", "--warmup", "0.2", "--csv", "a.csv", "--csv", "b.csv"}, code, ok);
  ASSERT_TRUE(ok);
  EXPECT_DOUBLE_EQ(o.warmup_s, 0.2);
  EXPECT_EQ(o.csv_files, (std::vector<std::string>{"a.csv", "b.csv"}));
}

TEST(LoadgenOptions, RefusesNonsense) {
  int code = -1;
  bool ok = true;
  parse({"--batch", "0"}, code, ok);
  EXPECT_FALSE(ok);
  EXPECT_NE(code, 0);
  parse({"--batch", "5000"}, code, ok);  // over batch_bets_max
  EXPECT_FALSE(ok);
  parse({"--target", "memcached"}, code, ok);
  EXPECT_FALSE(ok);
  parse({"--finish", "--target", "discard"}, code, ok);
  EXPECT_FALSE(ok);
  parse({"--duration", "0"}, code, ok);  // neither a duration nor a total
  EXPECT_FALSE(ok);
  parse({"--duration", "0", "--bets", "1000"}, code, ok);
  EXPECT_TRUE(ok);
  parse({"--tls-keys", "keys", "--target", "redis"}, code, ok);  // TLS speaks the lottery protocol only
  EXPECT_FALSE(ok);
  parse({"--tls-keys", "keys"}, code, ok);
  EXPECT_TRUE(ok);
}

TEST(LoadgenBets, GeneratedBetsAreValidAndDeterministic) {
  auto bets = loadgen::generate_bets(3, 2, 2000);
  ASSERT_EQ(bets.size(), 2000u);
  proto::ValidationContext ctx{5, proto::today_local()};
  ASSERT_FALSE(proto::validate_batch_parts(2, 2000, bets.bytes, ctx).has_value());
  bool accent = false;
  proto::BetCursor cursor(bets.bytes);
  proto::Bet bet;
  while (cursor.next(bet)) {
    EXPECT_EQ(bet.document.size(), 8u);
    for (char c : std::string(bet.first_name) + std::string(bet.last_name))
      accent |= static_cast<unsigned char>(c) >= 0x80;
  }
  EXPECT_TRUE(accent);
  EXPECT_EQ(loadgen::generate_bets(3, 2, 2000).bytes, bets.bytes);
  EXPECT_NE(loadgen::generate_bets(4, 2, 2000).bytes, bets.bytes);
}

TEST(LoadgenBets, LotteryPoolFramesDecodeAndValidate) {
  auto bets = loadgen::generate_bets(1, 4, 1000);
  auto pool = loadgen::encode_pool(loadgen::Target::lottery, 4, bets, 128);
  ASSERT_EQ(pool.requests.size(), 8u);  // 7 x 128 + 104
  EXPECT_EQ(pool.bets, 1000u);
  proto::ValidationContext ctx{5, proto::today_local()};
  for (const auto& req : pool.requests) {
    const std::byte* f = pool.bytes.data() + req.offset;
    proto::FrameHeader h;
    ASSERT_EQ(proto::parse_header(f, req.bytes, limits::frame_bytes_max, h), proto::HeaderCheck::ok);
    ASSERT_EQ(h.length, req.bytes);
    proto::Bytes body(f + limits::frame_header_bytes, req.bytes - limits::frame_header_bytes);
    ASSERT_TRUE(proto::body_crc_matches(h, body));
    proto::BatchInfo info;
    ASSERT_FALSE(proto::validate_batch(body, ctx, info).has_value());
    EXPECT_EQ(info.agency, 4);
    EXPECT_EQ(info.count, req.bets);
  }
}

TEST(LoadgenBets, RedisPoolIsVariadicRpush) {
  auto bets = loadgen::generate_bets(1, 1, 3);
  auto pool = loadgen::encode_pool(loadgen::Target::redis, 1, bets, 2);
  ASSERT_EQ(pool.requests.size(), 2u);
  std::string first(reinterpret_cast<const char*>(pool.bytes.data()), pool.requests[0].bytes);
  EXPECT_EQ(first.rfind("*4\r\n$5\r\nRPUSH\r\n$6\r\nbets:1\r\n$", 0), 0u) << first;
  EXPECT_EQ(pool.requests[0].bets, 2u);
  EXPECT_EQ(pool.requests[1].bets, 1u);
}

TEST(LoadgenBets, AgencyFromFileName) {
  EXPECT_EQ(loadgen::agency_from_file_name(".data/agency-3.csv"), 3);
  EXPECT_EQ(loadgen::agency_from_file_name("agency-12.csv"), 12);
  EXPECT_EQ(loadgen::agency_from_file_name("agency-.csv"), 0);
  EXPECT_EQ(loadgen::agency_from_file_name("bets.csv"), 0);
  EXPECT_EQ(loadgen::agency_from_file_name("agency-99999.csv"), 0);
}

TEST(LoadgenReport, JsonHasTheFiguresMachinesRead) {
  loadgen::Report r;
  r.window_s = 2;
  r.bets = 1000;
  r.bytes = 4000;
  r.latency.record(50'000);
  r.errors["invalid_name"] = 2;
  std::string json = loadgen::format_json(r);
  for (const char* key : {"\"bets_per_s\":500.0", "\"mb_per_s\":0.002",
                          "\"p99\":", "\"p999\":", "\"percentiles\":", "\"invalid_name\":2", "\"error_count\":2"})
    EXPECT_NE(json.find(key), std::string::npos) << key << " in " << json;
}

}  // namespace

// ---------------------------------------------------------------- the engine, end to end

namespace {

// A discard sink in a thread: accepts `connections`, answers every frame with
// its 4-byte seq, until every connection is closed by the generator.
class ThreadSink {
 public:
  explicit ThreadSink(size_t connections) {
    _listen = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(::bind(_listen, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    EXPECT_EQ(::listen(_listen, 16), 0);
    socklen_t len = sizeof addr;
    ::getsockname(_listen, reinterpret_cast<sockaddr*>(&addr), &len);
    _port = ntohs(addr.sin_port);
    _thread = std::thread([this, connections] { serve(connections); });
  }
  ~ThreadSink() {
    _thread.join();
    ::close(_listen);
  }
  uint16_t port() const { return _port; }
  uint64_t frames() const { return _frames; }

 private:
  void serve(size_t connections) {
    std::vector<pollfd> fds;
    std::vector<std::vector<char>> bufs;
    for (size_t i = 0; i < connections; i++) {
      fds.push_back({::accept(_listen, nullptr, nullptr), POLLIN, 0});
      bufs.emplace_back();
    }
    size_t open = connections;
    while (open > 0) {
      ::poll(fds.data(), fds.size(), 1000);
      for (size_t i = 0; i < fds.size(); i++) {
        if (fds[i].fd < 0 || fds[i].revents == 0) continue;
        char chunk[65536];
        ssize_t n = ::recv(fds[i].fd, chunk, sizeof chunk, 0);
        if (n <= 0) {
          ::close(fds[i].fd);
          fds[i].fd = -1;
          open--;
          continue;
        }
        auto& b = bufs[i];
        b.insert(b.end(), chunk, chunk + n);
        size_t pos = 0;
        std::string acks;
        while (b.size() - pos >= 16) {
          uint32_t length;
          std::memcpy(&length, &b[pos], 4);
          if (b.size() - pos < length) break;
          acks.append(&b[pos + 8], 4);
          pos += length;
          _frames++;
        }
        b.erase(b.begin(), b.begin() + static_cast<std::ptrdiff_t>(pos));
        if (!acks.empty()) {
          EXPECT_EQ(::send(fds[i].fd, acks.data(), acks.size(), 0), static_cast<ssize_t>(acks.size()));
        }
      }
    }
  }

  int _listen = -1;
  uint16_t _port = 0;
  std::thread _thread;
  uint64_t _frames = 0;
};

TEST(LoadgenRun, SendsExactlyTheRequestedBetsAndCountsEveryAck) {
  ThreadSink sink(3);
  loadgen::Options o;
  o.address = "127.0.0.1:" + std::to_string(sink.port());
  o.target = loadgen::Target::discard;
  o.connections = 3;
  o.pipeline = 4;
  o.total_bets = 100 * 128;
  o.warmup_s = 0;
  o.progress = false;
  auto report = loadgen::run(o, nullptr);
  ASSERT_TRUE(report.ok()) << report.error().message;
  EXPECT_EQ(report->bets, 100u * 128);
  EXPECT_EQ(report->batches, 100u);
  EXPECT_EQ(report->latency.count(), 100u);
  EXPECT_EQ(report->error_count(), 0u);
  EXPECT_GT(report->bets_per_s(), 0.0);
}

TEST(LoadgenRun, OpenLoopKeepsTheRate) {
  ThreadSink sink(2);
  loadgen::Options o;
  o.address = "127.0.0.1:" + std::to_string(sink.port());
  o.target = loadgen::Target::discard;
  o.connections = 2;
  o.pipeline = 64;
  o.rate_bets_per_s = 128 * 2000;  // 2000 batches/s
  o.duration_s = 0.5;
  o.warmup_s = 0.1;
  o.progress = false;
  auto report = loadgen::run(o, nullptr);
  ASSERT_TRUE(report.ok()) << report.error().message;
  EXPECT_EQ(report->error_count(), 0u);
  // 1000 batches are due in the window; a loaded machine may shift a few across its edges.
  EXPECT_NEAR(static_cast<double>(report->batches), 1000.0, 100.0);
}

}  // namespace
