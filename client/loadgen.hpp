// lottery-loadgen: the pieces of the load generator that need no socket, kept
// apart so unit tests can check them: the latency histogram, the options, the
// bet corpus and its pre-encoding, and the report.
//
// The generator drives three kinds of server with the same bets:
//   lottery  the lottery protocol (HELLO, then batch frames, acks)
//   discard  bench/discard_sink: the same batch frames, a 4-byte ack each
//   redis    Redis: each batch as one variadic RPUSH of the same encoded bets
// so that bench/compare.sh compares like with like.
//
// The server's modes (worker processes, io_uring, durability) need nothing
// from the generator: they change when and by whom a batch is acknowledged,
// not the protocol. TLS does: with --tls-keys each connection handshakes with
// its agency's pre-shared key (TLS 1.3, as the agency client does), so the
// cost of encryption is measured with the same bets.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.hpp"
#include "lottery/limits.hpp"

namespace lottery::loadgen {

// ---------------------------------------------------------------- histogram

// A log-linear histogram of nanosecond values (the HdrHistogram layout):
// values below 2^(sub_bucket_bits+1) are counted exactly, larger ones in
// buckets whose width is 1/2^sub_bucket_bits of their magnitude, so every
// reported value is within 0.8% of the truth. Fixed size, no allocation
// after construction: recording is an index computation and an increment.
inline constexpr unsigned histogram_sub_bucket_bits = 7;
inline constexpr unsigned histogram_value_bits = 42;  // 2^42 ns is 73 minutes
inline constexpr uint64_t histogram_value_max_ns = (uint64_t{1} << histogram_value_bits) - 1;
inline constexpr size_t histogram_sub_buckets = size_t{1} << histogram_sub_bucket_bits;
inline constexpr size_t histogram_buckets =
    (histogram_value_bits - histogram_sub_bucket_bits - 1) * histogram_sub_buckets + 2 * histogram_sub_buckets;

class LatencyHistogram {
 public:
  LatencyHistogram() : _counts(histogram_buckets, 0) {}

  // Values over histogram_value_max_ns are counted as that maximum.
  void record(uint64_t value_ns);
  void merge(const LatencyHistogram& other);
  void reset();

  uint64_t count() const { return _total; }
  uint64_t min_ns() const { return _total == 0 ? 0 : _min; }
  uint64_t max_ns() const { return _max; }
  double mean_ns() const { return _total == 0 ? 0.0 : static_cast<double>(_sum) / static_cast<double>(_total); }
  // The smallest recorded value v such that at least `percentile`% of the
  // values are <= v, reported as the top of its bucket (never above max).
  uint64_t value_at_percentile(double percentile) const;

  // Bucket arithmetic, exposed for tests.
  static size_t bucket_of(uint64_t value_ns);
  static uint64_t bucket_lowest(size_t index);
  static uint64_t bucket_highest(size_t index);

 private:
  std::vector<uint64_t> _counts;
  uint64_t _total = 0;
  uint64_t _min = UINT64_MAX;
  uint64_t _max = 0;
  uint64_t _sum = 0;  // 2^64 ns is 584 years of summed latency
};

// ---------------------------------------------------------------- options

enum class Target : uint8_t { lottery, discard, redis };
const char* target_name(Target t);

inline constexpr std::string_view default_address = "127.0.0.1:12345";
inline constexpr size_t default_connections = 4;
inline constexpr size_t default_agencies = 5;  // the server's default --agencies
inline constexpr size_t default_batch_bets = 128;
inline constexpr size_t default_pipeline = 8;
inline constexpr double default_duration_s = 10.0;
inline constexpr double default_warmup_s = 1.0;
inline constexpr double default_drain_timeout_s = 5.0;
inline constexpr size_t default_pool_batches = 64;
inline constexpr size_t connections_max = 10000;
inline constexpr size_t pipeline_max = 1024;
inline constexpr size_t pool_batches_max = 65536;

struct Options {
  std::string address{default_address};
  Target target = Target::lottery;
  size_t connections = default_connections;
  size_t agencies = default_agencies;  // agencies 1..agencies, connection i is agency (i % agencies) + 1
  size_t batch_bets = default_batch_bets;
  size_t pipeline = default_pipeline;  // batches in flight per connection
  double duration_s = default_duration_s;
  uint64_t total_bets = 0;  // when non-zero, send this many bets instead of running for duration_s
  double warmup_s = default_warmup_s;
  double rate_bets_per_s = 0;  // 0: closed loop; else open loop at this rate
  double drain_timeout_s = default_drain_timeout_s;
  bool finish = false;  // send FINISHED per agency at the end (lottery target only)
  std::vector<std::string> csv_files;
  std::string csv_dir;
  size_t pool_batches = default_pool_batches;
  uint64_t seed = 1;
  std::vector<int> server_pids;  // their CPU time over the measured window goes in the report
  // TLS keys: the server's keys file (every agency's key) or a directory of
  // agency-N.key files. Empty: plaintext.
  std::string tls_keys;
  bool json = false;
  bool progress = true;  // a live line on stderr, only when stderr is a terminal
};

// Parses the command line. On --help or a usage error, returns an error and
// sets `exit_code` (0 for --help) after CLI11 has printed the message.
common::Result<Options> parse_options(int argc, const char* const* argv, int& exit_code);
// Cross-checks the options (ranges and combinations); an empty Error message means valid.
common::Status check_options(const Options& o);

// ---------------------------------------------------------------- bets

// Deterministic generator (splitmix64): no std distributions, whose output
// differs between standard libraries.
class Rng {
 public:
  explicit Rng(uint64_t seed) : _state(seed) {}
  uint64_t next();
  uint64_t below(uint64_t n) { return next() % n; }  // a bias of n/2^64 is irrelevant here

 private:
  uint64_t _state;
};

// Pre-encoded requests of one agency, in one buffer: the generator cycles
// through them, so sending a batch is a memcpy and, for the lottery frames,
// a 4-byte patch of the seq (which the body CRC does not cover).
struct EncodedRequest {
  uint32_t offset = 0;  // in EncodedPool::bytes
  uint32_t bytes = 0;
  uint32_t bets = 0;
};
struct EncodedPool {
  uint16_t agency = 0;
  std::vector<std::byte> bytes;
  std::vector<EncodedRequest> requests;
  uint64_t bets = 0;
  size_t largest_request_bytes = 0;
};

// Encoded bets (wire format, docs/PROTOCOL.md "A bet") of one agency, one
// bet after another, and where each starts. Realistic: Spanish names with
// accents, 8-digit documents, real calendar dates 1940..2005, numbers 0..9999.
struct BetList {
  std::vector<std::byte> bytes;
  std::vector<uint32_t> starts;  // starts.size() == bets; bytes.size() closes the last
  size_t size() const { return starts.size(); }
};
BetList generate_bets(uint64_t seed, uint16_t agency, size_t count);
// Reads an agency CSV (client/csv.hpp rules) into encoded bets.
common::Result<BetList> load_csv_bets(const std::string& path);
// The agency of "agency-N.csv", or 0 when the name does not say.
uint16_t agency_from_file_name(std::string_view path);

// Builds the requests for `target` from the bets, `batch_bets` a batch.
// Lottery and discard frames are identical (seq 0, patched at send time);
// a batch larger than frame_bytes_max is split.
EncodedPool encode_pool(Target target, uint16_t agency, const BetList& bets, size_t batch_bets);

// One RPUSH bets:<agency> of the given encoded bets, in RESP.
void append_redis_rpush(std::vector<std::byte>& out, uint16_t agency, const BetList& bets, size_t first, size_t count);

// ---------------------------------------------------------------- report

struct Report {
  Target target = Target::lottery;
  std::string address;
  size_t connections = 0;
  size_t agencies = 0;
  size_t batch_bets = 0;
  size_t pipeline = 0;
  double rate_target_bets_per_s = 0;  // 0: closed loop
  double warmup_s = 0;
  double window_s = 0;  // measured window
  uint64_t bets = 0;    // acknowledged within the window
  uint64_t batches = 0;
  uint64_t bytes = 0;  // request bytes of those batches
  uint64_t batches_sent_total = 0;
  uint64_t batches_acked_total = 0;
  LatencyHistogram latency;                // batch acknowledgement latency, within the window
  std::map<std::string, uint64_t> errors;  // by status name (or connection event)
  double server_cpu_s = -1;                // -1: not measured
  double client_cpu_s = 0;
  bool finished_sent = false;

  double bets_per_s() const { return window_s > 0 ? static_cast<double>(bets) / window_s : 0; }
  double mb_per_s() const { return window_s > 0 ? static_cast<double>(bytes) / window_s / 1e6 : 0; }
  uint64_t error_count() const;
};

// Percentiles reported in JSON for the latency plots: 0, 10, ..., 90, then
// 99, 99.9, ... (1 - 10^-k), as HdrHistogram's percentile distribution does.
std::vector<double> report_percentiles();
std::string format_text(const Report& r);
std::string format_json(const Report& r);
// "  3.0 s  412.3 k bets/s  ...", for the live progress line.
std::string format_progress(double elapsed_s, double bets_per_s, double mb_per_s, const LatencyHistogram& interval,
                            uint64_t errors);

// ---------------------------------------------------------------- run

// Connects, loads, measures and reports (client/loadgen_run.cpp). `stop`,
// set by a signal handler, ends the run early; the report then covers the
// window so far. Errors are setup failures (no connection, unreadable CSV);
// request errors during the run are counted in Report::errors instead.
common::Result<Report> run(const Options& options, const std::atomic<bool>* stop);

// Sums utime+stime of /proc/PID/stat (every thread of the process), in seconds; -1 when unreadable.
double process_cpu_seconds(int pid);

}  // namespace lottery::loadgen
