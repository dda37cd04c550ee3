#include "client/loadgen.hpp"

#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <bit>
#include <cinttypes>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>

#include "client/csv.hpp"
#include "common/assert.hpp"
#include "lottery/protocol.hpp"

namespace lottery::loadgen {

// ---------------------------------------------------------------- histogram

size_t LatencyHistogram::bucket_of(uint64_t v) {
  constexpr uint64_t exact_below = 2 * histogram_sub_buckets;
  if (v < exact_below) return static_cast<size_t>(v);
  if (v > histogram_value_max_ns) v = histogram_value_max_ns;
  unsigned magnitude = static_cast<unsigned>(std::bit_width(v)) - 1;  // >= sub_bucket_bits + 1
  unsigned shift = magnitude - histogram_sub_bucket_bits;
  uint64_t sub = v >> shift;  // in [sub_buckets, 2 * sub_buckets)
  return size_t{shift} * histogram_sub_buckets + static_cast<size_t>(sub);
}

uint64_t LatencyHistogram::bucket_lowest(size_t index) {
  if (index < 2 * histogram_sub_buckets) return index;
  size_t shift = index / histogram_sub_buckets - 1;
  uint64_t sub = index % histogram_sub_buckets + histogram_sub_buckets;
  return sub << shift;
}

uint64_t LatencyHistogram::bucket_highest(size_t index) {
  if (index < 2 * histogram_sub_buckets) return index;
  size_t shift = index / histogram_sub_buckets - 1;
  return bucket_lowest(index) + (uint64_t{1} << shift) - 1;
}

void LatencyHistogram::record(uint64_t value_ns) {
  if (value_ns > histogram_value_max_ns) value_ns = histogram_value_max_ns;
  size_t i = bucket_of(value_ns);
  LOTTERY_ASSERT(i < _counts.size());
  _counts[i]++;
  _total++;
  _sum += value_ns;
  _min = std::min(_min, value_ns);
  _max = std::max(_max, value_ns);
}

void LatencyHistogram::merge(const LatencyHistogram& other) {
  for (size_t i = 0; i < _counts.size(); i++) _counts[i] += other._counts[i];
  _total += other._total;
  _sum += other._sum;
  _min = std::min(_min, other._min);
  _max = std::max(_max, other._max);
}

void LatencyHistogram::reset() {
  std::fill(_counts.begin(), _counts.end(), 0);
  _total = 0;
  _sum = 0;
  _min = UINT64_MAX;
  _max = 0;
}

uint64_t LatencyHistogram::value_at_percentile(double percentile) const {
  if (_total == 0) return 0;
  double clamped = std::clamp(percentile, 0.0, 100.0);
  auto wanted = static_cast<uint64_t>(std::ceil(clamped / 100.0 * static_cast<double>(_total)));
  wanted = std::clamp<uint64_t>(wanted, 1, _total);
  uint64_t seen = 0;
  for (size_t i = 0; i < _counts.size(); i++) {
    seen += _counts[i];
    if (seen >= wanted) return std::min(bucket_highest(i), _max);
  }
  return _max;
}

// ---------------------------------------------------------------- options

const char* target_name(Target t) {
  switch (t) {
    case Target::lottery:
      return "lottery";
    case Target::discard:
      return "discard";
    case Target::redis:
      return "redis";
  }
  return "?";
}

common::Status check_options(const Options& o) {
  auto bad = [](std::string why) { return common::Status(common::Error::make(EINVAL, std::move(why))); };
  if (o.connections < 1 || o.connections > connections_max)
    return bad("--connections must be 1.." + std::to_string(connections_max));
  if (o.agencies < 1 || o.agencies > limits::agencies_max)
    return bad("--agencies must be 1.." + std::to_string(limits::agencies_max));
  if (o.batch_bets < 1 || o.batch_bets > limits::batch_bets_max)
    return bad("--batch must be 1.." + std::to_string(limits::batch_bets_max));
  if (o.pipeline < 1 || o.pipeline > pipeline_max) return bad("--pipeline must be 1.." + std::to_string(pipeline_max));
  if (o.pool_batches < 1 || o.pool_batches > pool_batches_max)
    return bad("--pool-batches must be 1.." + std::to_string(pool_batches_max));
  if (!(o.duration_s > 0) && o.total_bets == 0) return bad("give a --duration > 0 or a --bets total");
  if (o.warmup_s < 0) return bad("--warmup must be >= 0");
  if (o.rate_bets_per_s < 0) return bad("--rate must be >= 0");
  if (o.drain_timeout_s < 0) return bad("--drain-timeout must be >= 0");
  if (o.finish && o.target != Target::lottery) return bad("--finish speaks the lottery protocol only");
  if (!o.csv_files.empty() && !o.csv_dir.empty()) return bad("give --csv files or a --csv-dir, not both");
  if (!o.tls_keys.empty() && o.target != Target::lottery) return bad("--tls-keys speaks the lottery protocol only");
  return common::ok_status();
}

common::Result<Options> parse_options(int argc, const char* const* argv, int& exit_code) {
  Options o;
  std::string target = target_name(o.target);
  bool no_progress = false;
  CLI::App app{
      "lottery-loadgen: drives a lottery server (or the discard sink, or Redis) with pre-encoded batches\n"
      "and reports bets/s, MB/s and the batch-acknowledgement latency distribution."};
  // A flag given twice takes its last value, so scripts can append overrides.
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--address", o.address, "server HOST:PORT")->capture_default_str();
  app.add_option("--target", target, "protocol: lottery, discard (bench-discard-sink) or redis")
      ->check(CLI::IsMember({"lottery", "discard", "redis"}))
      ->capture_default_str();
  app.add_option("--connections", o.connections, "TCP connections")->capture_default_str();
  app.add_option("--agencies", o.agencies, "agencies 1..N, spread over the connections round-robin")
      ->capture_default_str();
  app.add_option("--batch", o.batch_bets, "bets per batch (per RPUSH for redis)")->capture_default_str();
  app.add_option("--pipeline", o.pipeline, "batches in flight per connection")->capture_default_str();
  app.add_option("--duration", o.duration_s, "seconds of measurement after the warm-up")->capture_default_str();
  app.add_option("--bets", o.total_bets, "send this many bets in total instead of running for --duration");
  app.add_option("--warmup", o.warmup_s, "seconds of load before measuring")->capture_default_str();
  app.add_option("--rate", o.rate_bets_per_s,
                 "open loop: target bets/s, latency measured from each batch's intended send time (0: closed loop)")
      ->capture_default_str();
  app.add_option("--drain-timeout", o.drain_timeout_s, "seconds to wait for outstanding acks at the end")
      ->capture_default_str();
  app.add_flag("--finish", o.finish, "send FINISHED for every agency at the end (this can trigger the draw)");
  app.add_option("--csv", o.csv_files, "replay these agency CSV files (agency-N.csv is agency N)")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  app.add_option("--csv-dir", o.csv_dir, "replay every agency-*.csv of this directory");
  app.add_option("--pool-batches", o.pool_batches, "distinct pre-encoded batches per agency (generated bets)")
      ->capture_default_str();
  app.add_option("--seed", o.seed, "seed of the generated bets")->capture_default_str();
  app.add_option("--server-pid", o.server_pids,
                 "server process id whose CPU time (its descendants' included) to report (repeatable)")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  app.add_option("--tls-keys", o.tls_keys,
                 "TLS 1.3 with pre-shared keys: the server's keys file or a directory of agency-N.key files "
                 "(lotteryctl keys init); each connection uses its agency's key");
  app.add_flag("--json", o.json, "print the report as one JSON object on stdout");
  app.add_flag("--no-progress", no_progress, "no live progress line (it is shown only on a terminal anyway)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    exit_code = app.exit(e);
    return common::Error::make(EINVAL, e.what());
  }
  o.target = target == "discard" ? Target::discard : target == "redis" ? Target::redis : Target::lottery;
  o.progress = !no_progress;
  if (auto st = check_options(o); !st) {
    std::fprintf(stderr, "lottery-loadgen: %s\n", st.error().message.c_str());
    exit_code = 2;
    return st.error();
  }
  exit_code = 0;
  return o;
}

// ---------------------------------------------------------------- bets

uint64_t Rng::next() {
  uint64_t z = (_state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

namespace {

// Names as an Argentine agency writes them: UTF-8, accents, ñ and ü.
constexpr std::string_view first_names[] = {"María",   "José",      "Juan Pablo", "Lucía",     "Martín", "Sofía",
                                            "Agustín", "Valentina", "Joaquín",    "Camila",    "Ramón",  "Inés",
                                            "Begoña",  "Nicolás",   "Julián",     "Ana Belén", "Tomás",  "Mónica",
                                            "Héctor",  "Sebastián", "Florencia",  "Iñaki",     "Zoë",    "Noemí",
                                            "Germán",  "Débora",    "Andrés",     "Verónica",  "Raúl",   "Ángela"};
constexpr std::string_view last_names[] = {"Pérez",     "González", "Rodríguez",  "Fernández",  "López",    "Martínez",
                                           "Gómez",     "Díaz",     "Sánchez",    "Núñez",      "Ibáñez",   "Muñoz",
                                           "Domínguez", "Peña",     "Güemes",     "Álvarez",    "Giménez",  "Benítez",
                                           "Castaño",   "Ortúzar",  "De la Cruz", "Sáenz Peña", "Acuña",    "Quiñones",
                                           "Ruiz",      "Suárez",   "Cáceres",    "Echeverría", "Avendaño", "Müller"};
constexpr uint16_t birth_year_first = 1940;
constexpr uint16_t birth_year_count = 66;  // 1940..2005
constexpr uint64_t document_first = 10'000'000;
constexpr uint64_t document_count = 90'000'000;  // 8 digits

void append_bet(BetList& out, const proto::Bet& bet) {
  size_t at = out.bytes.size();
  size_t n = proto::encoded_bet_bytes(bet);
  out.bytes.resize(at + n);
  size_t written = proto::encode_bet(out.bytes.data() + at, n, bet);
  LOTTERY_ASSERT(written == n);
  out.starts.push_back(static_cast<uint32_t>(at));
}

}  // namespace

BetList generate_bets(uint64_t seed, uint16_t agency, size_t count) {
  Rng rng(seed * 0x100000001B3ull + agency);
  BetList out;
  out.starts.reserve(count);
  out.bytes.reserve(count * 40);
  for (size_t i = 0; i < count; i++) {
    std::string document = std::to_string(document_first + rng.below(document_count));
    proto::Date birth;
    birth.year = static_cast<uint16_t>(birth_year_first + rng.below(birth_year_count));
    birth.month = static_cast<uint8_t>(1 + rng.below(12));
    birth.day = static_cast<uint8_t>(1 + rng.below(31));
    while (!proto::is_calendar_date(birth)) birth.day--;
    proto::Bet bet{first_names[rng.below(std::size(first_names))], last_names[rng.below(std::size(last_names))],
                   document, birth, static_cast<uint16_t>(rng.below(limits::bet_number_max + 1))};
    append_bet(out, bet);
  }
  return out;
}

common::Result<BetList> load_csv_bets(const std::string& path) {
  auto file = client::BetFile::load(path);
  if (!file) return file.error();
  proto::Date today = proto::today_local();
  auto reader = file->reader(today);
  BetList out;
  client::CsvRecord record;
  while (true) {
    switch (reader.next(record)) {
      case client::CsvReader::Step::bet:
        append_bet(out, record.bet);
        continue;
      case client::CsvReader::Step::end:
        break;
      case client::CsvReader::Step::error:
        return reader.error().to_error();
    }
    break;
  }
  if (out.size() == 0) return common::Error::make(EINVAL, path + ": no bets");
  return out;
}

uint16_t agency_from_file_name(std::string_view path) {
  size_t slash = path.rfind('/');
  std::string_view name = slash == std::string_view::npos ? path : path.substr(slash + 1);
  constexpr std::string_view prefix = "agency-";
  constexpr std::string_view suffix = ".csv";
  if (name.size() <= prefix.size() + suffix.size() || name.substr(0, prefix.size()) != prefix ||
      name.substr(name.size() - suffix.size()) != suffix)
    return 0;
  std::string_view digits = name.substr(prefix.size(), name.size() - prefix.size() - suffix.size());
  unsigned value = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return 0;
    value = value * 10 + static_cast<unsigned>(c - '0');
    if (value > limits::agencies_max) return 0;
  }
  return static_cast<uint16_t>(value);
}

namespace {

void append_text(std::vector<std::byte>& out, std::string_view s) {
  const auto* p = reinterpret_cast<const std::byte*>(s.data());
  out.insert(out.end(), p, p + s.size());
}

size_t bet_bytes(const BetList& bets, size_t i) {
  size_t end = i + 1 < bets.size() ? bets.starts[i + 1] : bets.bytes.size();
  return end - bets.starts[i];
}

}  // namespace

void append_redis_rpush(std::vector<std::byte>& out, uint16_t agency, const BetList& bets, size_t first, size_t count) {
  std::string key = "bets:" + std::to_string(agency);
  append_text(out, "*" + std::to_string(count + 2) + "\r\n$5\r\nRPUSH\r\n$" + std::to_string(key.size()) + "\r\n" +
                       key + "\r\n");
  for (size_t i = first; i < first + count; i++) {
    size_t n = bet_bytes(bets, i);
    append_text(out, "$" + std::to_string(n) + "\r\n");
    const std::byte* p = bets.bytes.data() + bets.starts[i];
    out.insert(out.end(), p, p + n);
    append_text(out, "\r\n");
  }
}

EncodedPool encode_pool(Target target, uint16_t agency, const BetList& bets, size_t batch_bets) {
  LOTTERY_ASSERT(bets.size() > 0 && batch_bets >= 1);
  EncodedPool pool;
  pool.agency = agency;
  size_t i = 0;
  while (i < bets.size()) {
    EncodedRequest req;
    req.offset = static_cast<uint32_t>(pool.bytes.size());
    if (target == Target::redis) {
      size_t count = std::min(batch_bets, bets.size() - i);
      append_redis_rpush(pool.bytes, agency, bets, i, count);
      req.bets = static_cast<uint32_t>(count);
      i += count;
    } else {
      size_t at = pool.bytes.size();
      pool.bytes.resize(at + limits::frame_bytes_max);
      proto::BatchBuilder builder(pool.bytes.data() + at, limits::frame_bytes_max, agency, batch_bets);
      proto::Bet bet;
      while (i < bets.size()) {
        proto::BetCursor cursor(proto::Bytes(bets.bytes.data() + bets.starts[i], bet_bytes(bets, i)));
        bool decoded = cursor.next(bet);
        LOTTERY_ASSERT(decoded);
        if (!builder.add(bet)) break;
        i++;
      }
      LOTTERY_ASSERT(!builder.empty());  // one bet always fits in a frame
      req.bets = builder.count();
      size_t frame = builder.finish(0);
      pool.bytes.resize(at + frame);
    }
    req.bytes = static_cast<uint32_t>(pool.bytes.size() - req.offset);
    pool.largest_request_bytes = std::max<size_t>(pool.largest_request_bytes, req.bytes);
    pool.bets += req.bets;
    pool.requests.push_back(req);
  }
  return pool;
}

// ---------------------------------------------------------------- report

uint64_t Report::error_count() const {
  uint64_t n = 0;
  for (const auto& [name, count] : errors) n += count;
  return n;
}

std::vector<double> report_percentiles() {
  std::vector<double> ps;
  for (int p = 0; p <= 90; p += 10) ps.push_back(p);
  for (double p : {95.0, 97.5, 99.0, 99.5, 99.9, 99.95, 99.99, 99.999}) ps.push_back(p);
  return ps;
}

namespace {

double us(uint64_t ns) {
  return static_cast<double>(ns) / 1000.0;
}

// printf into a std::string; the attribute lets -Wformat check every call.
__attribute__((format(printf, 1, 2))) std::string sfmt(const char* format, ...) {
  char buf[512];
  va_list args;
  va_start(args, format);
  int n = std::vsnprintf(buf, sizeof buf, format, args);
  va_end(args);
  return std::string(buf, static_cast<size_t>(std::clamp(n, 0, static_cast<int>(sizeof buf) - 1)));
}

std::string json_string(std::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out.push_back('\\');
    if (static_cast<unsigned char>(c) < 0x20) {
      out += sfmt("\\u%04x", static_cast<unsigned>(c));
      continue;
    }
    out.push_back(c);
  }
  return out + "\"";
}

}  // namespace

std::string format_text(const Report& r) {
  std::string s;
  s += sfmt("target      %s at %s, %zu connections, %zu agencies, batch %zu, pipeline %zu, %s\n", target_name(r.target),
            r.address.c_str(), r.connections, r.agencies, r.batch_bets, r.pipeline,
            r.rate_target_bets_per_s > 0 ? sfmt("open loop at %.0f bets/s", r.rate_target_bets_per_s).c_str()
                                         : "closed loop");
  s += sfmt("window      %.2f s after %.2f s of warm-up\n", r.window_s, r.warmup_s);
  s += sfmt("throughput  %.0f bets/s, %.1f MB/s, %.0f batches/s (%" PRIu64 " bets acknowledged)\n", r.bets_per_s(),
            r.mb_per_s(), r.window_s > 0 ? static_cast<double>(r.batches) / r.window_s : 0.0, r.bets);
  const LatencyHistogram& h = r.latency;
  s += sfmt("ack latency p50 %.1f us, p90 %.1f us, p99 %.1f us, p99.9 %.1f us, max %.1f us (mean %.1f us)\n",
            us(h.value_at_percentile(50)), us(h.value_at_percentile(90)), us(h.value_at_percentile(99)),
            us(h.value_at_percentile(99.9)), us(h.max_ns()), h.mean_ns() / 1000.0);
  if (r.server_cpu_s >= 0) {
    double per_million = r.bets > 0 ? r.server_cpu_s / (static_cast<double>(r.bets) / 1e6) : 0.0;
    s += sfmt("server cpu  %.2f s in the window, %.3f s per million bets\n", r.server_cpu_s, per_million);
  }
  s += sfmt("client cpu  %.2f s\n", r.client_cpu_s);
  if (r.errors.empty()) {
    s += "errors      none\n";
  } else {
    s += "errors     ";
    for (const auto& [name, count] : r.errors) s += sfmt(" %s: %" PRIu64, name.c_str(), count);
    s += "\n";
  }
  return s;
}

std::string format_json(const Report& r) {
  const LatencyHistogram& h = r.latency;
  std::string s = "{";
  s += "\"target\":" + json_string(target_name(r.target));
  s += ",\"address\":" + json_string(r.address);
  s += sfmt(",\"connections\":%zu,\"agencies\":%zu,\"batch\":%zu,\"pipeline\":%zu", r.connections, r.agencies,
            r.batch_bets, r.pipeline);
  s += sfmt(",\"rate_target\":%.1f,\"warmup_s\":%.3f,\"window_s\":%.4f", r.rate_target_bets_per_s, r.warmup_s,
            r.window_s);
  s += sfmt(",\"bets\":%" PRIu64 ",\"batches\":%" PRIu64 ",\"bytes\":%" PRIu64, r.bets, r.batches, r.bytes);
  s += sfmt(",\"bets_per_s\":%.1f,\"mb_per_s\":%.3f", r.bets_per_s(), r.mb_per_s());
  s += sfmt(
      ",\"latency_us\":{\"p50\":%.2f,\"p90\":%.2f,\"p99\":%.2f,\"p999\":%.2f,\"max\":%.2f,\"min\":%.2f,\"mean\":%.2f}",
      us(h.value_at_percentile(50)), us(h.value_at_percentile(90)), us(h.value_at_percentile(99)),
      us(h.value_at_percentile(99.9)), us(h.max_ns()), us(h.min_ns()), h.mean_ns() / 1000.0);
  s += ",\"percentiles\":[";
  bool first = true;
  for (double p : report_percentiles()) {
    s += sfmt("%s[%g,%.2f]", first ? "" : ",", p, us(h.value_at_percentile(p)));
    first = false;
  }
  s += sfmt("%s[100,%.2f]]", first ? "" : ",", us(h.max_ns()));
  s += sfmt(",\"server_cpu_s\":%.3f,\"client_cpu_s\":%.3f", r.server_cpu_s, r.client_cpu_s);
  double per_million = r.server_cpu_s >= 0 && r.bets > 0 ? r.server_cpu_s / (static_cast<double>(r.bets) / 1e6) : -1;
  s += sfmt(",\"server_cpu_s_per_million_bets\":%.4f", per_million);
  s += sfmt(",\"batches_sent_total\":%" PRIu64 ",\"batches_acked_total\":%" PRIu64, r.batches_sent_total,
            r.batches_acked_total);
  s += ",\"errors\":{";
  first = true;
  for (const auto& [name, count] : r.errors) {
    s += (first ? "" : ",") + json_string(name) + sfmt(":%" PRIu64, count);
    first = false;
  }
  s += sfmt("},\"error_count\":%" PRIu64 ",\"finished_sent\":%s}\n", r.error_count(),
            r.finished_sent ? "true" : "false");
  return s;
}

std::string format_progress(double elapsed_s, double bets_per_s, double mb_per_s, const LatencyHistogram& interval,
                            uint64_t errors) {
  return sfmt("%6.1f s %12.0f bets/s %8.1f MB/s  p50 %8.1f us  p99 %8.1f us  max %9.1f us  errors %" PRIu64, elapsed_s,
              bets_per_s, mb_per_s, us(interval.value_at_percentile(50)), us(interval.value_at_percentile(99)),
              us(interval.max_ns()), errors);
}

double process_cpu_seconds(int pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(in, line)) return -1;
  // The command name (field 2) may hold spaces; fields are counted after its ')'.
  size_t close = line.rfind(')');
  if (close == std::string::npos) return -1;
  std::istringstream rest(line.substr(close + 2));
  std::string field;
  uint64_t utime = 0, stime = 0;
  for (int i = 3; i <= 15 && rest >> field; i++) {
    if (i == 14) utime = std::stoull(field);
    if (i == 15) stime = std::stoull(field);
  }
  long ticks = ::sysconf(_SC_CLK_TCK);
  if (ticks <= 0) return -1;
  return static_cast<double>(utime + stime) / static_cast<double>(ticks);
}

}  // namespace lottery::loadgen
