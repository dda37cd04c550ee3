// lottery_bench: Google Benchmark micro-benchmarks of the per-bet work, each
// reported per bet (items_per_second is bets/s; ns/bet is its inverse).
//
//   frame/*   what the server does to a batch frame before it stores it
//   store/*   appending a batch to the memory-mapped store
//   draw/*    the draw's scan over every stored bet (bets/s and bytes/s)
//   csv/*     the agency client's CSV parse and batch encode
//   log/*     the one log line the server writes per batch (to /dev/null)
//
// The bets are the load generator's (client/loadgen.hpp): realistic names with
// accents, 8-digit documents, 128 bets a batch. Stores live in
// $LOTTERY_BENCH_DIR (default /tmp), and are removed afterwards.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "client/csv.hpp"
#include "client/loadgen.hpp"
#include "common/crc32c.hpp"
#include "common/log.hpp"
#include "lottery/draw.hpp"
#include "lottery/protocol.hpp"
#include "lottery/store.hpp"
#include "tools/datagen_lib.hpp"

namespace {

using namespace lottery;

constexpr size_t batch_bets = 128;
constexpr size_t pool_batches = 64;  // distinct batches, cycled, so caches see more than one frame
constexpr size_t draw_bets = 4'000'000;
constexpr size_t csv_bets = 100'000;

// The same frames as the load generator sends.
const loadgen::EncodedPool& frames() {
  static const loadgen::EncodedPool pool = loadgen::encode_pool(
      loadgen::Target::lottery, 1, loadgen::generate_bets(1, 1, pool_batches * batch_bets), batch_bets);
  return pool;
}

proto::Bytes frame_at(size_t i) {
  const auto& pool = frames();
  const auto& req = pool.requests[i % pool.requests.size()];
  return {pool.bytes.data() + req.offset, req.bytes};
}

void per_bet_counters(benchmark::State& state, uint64_t bets, uint64_t bytes) {
  state.SetItemsProcessed(static_cast<int64_t>(bets));
  state.SetBytesProcessed(static_cast<int64_t>(bytes));
  // A rate of bets*1e-9 per second, inverted, is nanoseconds per bet.
  state.counters["ns/bet"] =
      benchmark::Counter(static_cast<double>(bets) * 1e-9, benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

class TempDir {
 public:
  TempDir() {
    const char* base = ::getenv("LOTTERY_BENCH_DIR");
    std::string tmpl = std::string(base != nullptr ? base : "/tmp") + "/lottery-bench-XXXXXX";
    char* p = ::mkdtemp(tmpl.data());
    if (p == nullptr) std::abort();
    _path = p;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(_path, ec);
  }
  const std::string& path() const { return _path; }

 private:
  std::string _path;
};

proto::ValidationContext validation() {
  return {5, proto::today_local()};
}

// ---------------------------------------------------------------- frame

void BM_frame_crc(benchmark::State& state) {
  uint64_t bets = 0, bytes = 0;
  size_t i = 0;
  for (auto _ : state) {
    proto::Bytes f = frame_at(i++);
    proto::FrameHeader h;
    proto::parse_header(f.data(), f.size(), limits::frame_bytes_max, h);
    bool ok = proto::body_crc_matches(h, f.subspan(limits::frame_header_bytes));
    benchmark::DoNotOptimize(ok);
    bets += batch_bets;
    bytes += f.size();
  }
  per_bet_counters(state, bets, bytes);
}
BENCHMARK(BM_frame_crc)->Name("frame/header+crc32c");

void BM_frame_validate(benchmark::State& state) {
  auto ctx = validation();
  uint64_t bets = 0, bytes = 0;
  size_t i = 0;
  for (auto _ : state) {
    proto::Bytes f = frame_at(i++);
    proto::BatchInfo info;
    auto r = proto::validate_batch(f.subspan(limits::frame_header_bytes), ctx, info);
    benchmark::DoNotOptimize(r);
    bets += info.count;
    bytes += f.size();
  }
  per_bet_counters(state, bets, bytes);
}
BENCHMARK(BM_frame_validate)->Name("frame/validate");

void BM_frame_decode_validate(benchmark::State& state) {
  auto ctx = validation();
  uint64_t bets = 0, bytes = 0;
  size_t i = 0;
  for (auto _ : state) {
    proto::Bytes f = frame_at(i++);
    proto::FrameHeader h;
    if (proto::parse_header(f.data(), f.size(), limits::frame_bytes_max, h) != proto::HeaderCheck::ok) std::abort();
    proto::Bytes body = f.subspan(limits::frame_header_bytes);
    if (!proto::body_crc_matches(h, body)) std::abort();
    proto::BatchInfo info;
    if (proto::validate_batch(body, ctx, info)) std::abort();
    bets += info.count;
    bytes += f.size();
  }
  per_bet_counters(state, bets, bytes);
}
BENCHMARK(BM_frame_decode_validate)->Name("frame/decode+crc+validate");

// ---------------------------------------------------------------- store

// The server's store path per batch: reserve, copy the bets into the
// mapping, (validate them there,) commit. Segments that the store has left
// are unlinked at once so a long run does not fill the disk.
template <bool Validate>
void BM_store_append(benchmark::State& state) {
  TempDir dir;
  auto store = store::Store::open({dir.path(), 0, store::segment_bytes_default});
  if (!store) {
    state.SkipWithError(store.error().message.c_str());
    return;
  }
  auto ctx = validation();
  std::string segment = (*store)->current_segment_path();
  uint64_t bets = 0, bytes = 0;
  size_t i = 0;
  for (auto _ : state) {
    proto::Bytes f = frame_at(i++);
    proto::BatchInfo info;
    proto::read_batch_header(f.subspan(limits::frame_header_bytes), info);
    proto::Bytes wire = f.subspan(limits::frame_header_bytes + limits::batch_body_header_bytes);
    auto slot = (*store)->reserve(wire.size());
    if (!slot) {
      state.SkipWithError(slot.error().message.c_str());
      break;
    }
    std::memcpy(*slot, wire.data(), wire.size());
    if constexpr (Validate) {
      if (proto::validate_batch_parts(info.agency, info.count, proto::Bytes(*slot, wire.size()), ctx)) std::abort();
    }
    (*store)->commit({info.agency, info.count, 1, i}, wire.size());
    if ((*store)->current_segment_path() != segment) {
      ::unlink(segment.c_str());
      segment = (*store)->current_segment_path();
    }
    bets += info.count;
    bytes += f.size();
  }
  per_bet_counters(state, bets, bytes);
}
BENCHMARK(BM_store_append<false>)->Name("store/append");
BENCHMARK(BM_store_append<true>)->Name("store/append+validate");

// ---------------------------------------------------------------- draw

// A store of draw_bets bets (about 160 MB), written once.
const std::string& draw_store() {
  static TempDir dir;
  static bool written = false;
  if (!written) {
    auto store = store::Store::open({dir.path(), 0, store::segment_bytes_default});
    if (!store) std::abort();
    for (size_t i = 0; i < draw_bets / batch_bets; i++) {
      proto::Bytes f = frame_at(i);
      proto::Bytes wire = f.subspan(limits::frame_header_bytes + limits::batch_body_header_bytes);
      auto slot = (*store)->reserve(wire.size());
      if (!slot) std::abort();
      std::memcpy(*slot, wire.data(), wire.size());
      (*store)->commit({1, static_cast<uint16_t>(batch_bets), 1, i}, wire.size());
    }
    if (!(*store)->close()) std::abort();
    written = true;
  }
  return dir.path();
}

// The real draw: list and map the segments, verify every entry's CRC32C,
// walk the bets, collect the winners.
void BM_draw(benchmark::State& state) {
  const std::string& dir = draw_store();
  uint64_t bets = 0, bytes = 0;
  for (auto _ : state) {
    auto r = run_draw(dir, 7574, 5);
    if (!r) {
      state.SkipWithError(r.error().message.c_str());
      break;
    }
    bets += r->bets_scanned;
    bytes += r->bytes_scanned;
  }
  per_bet_counters(state, bets, bytes);
}
BENCHMARK(BM_draw)->Name("draw/run_draw")->Unit(benchmark::kMillisecond)->UseRealTime();

// The scan's inner loop alone, over the same bets in memory: what the draw
// would cost with the checksums already trusted.
void BM_draw_walk(benchmark::State& state) {
  std::vector<std::byte> bets_bytes;
  for (size_t i = 0; i < pool_batches; i++) {
    proto::Bytes wire = frame_at(i).subspan(limits::frame_header_bytes + limits::batch_body_header_bytes);
    bets_bytes.insert(bets_bytes.end(), wire.begin(), wire.end());
  }
  uint64_t bets = 0, bytes = 0;
  for (auto _ : state) {
    const std::byte* p = bets_bytes.data();
    const std::byte* end = p + bets_bytes.size();
    uint64_t winners = 0;
    while (p < end) {
      winners += proto::bet_number_at(p) == 7574;
      p += proto::bet_size_at(p);
    }
    benchmark::DoNotOptimize(winners);
    bets += pool_batches * batch_bets;
    bytes += bets_bytes.size();
  }
  per_bet_counters(state, bets, bytes);
}
BENCHMARK(BM_draw_walk)->Name("draw/walk-only");

void BM_crc32c(benchmark::State& state) {
  std::vector<std::byte> data(static_cast<size_t>(state.range(0)), std::byte{0x5A});
  for (auto _ : state) benchmark::DoNotOptimize(common::crc32c(data.data(), data.size()));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * state.range(0));
}
BENCHMARK(BM_crc32c)->Name("crc32c")->Arg(5000)->Arg(1 << 20);

// ---------------------------------------------------------------- client csv

const std::string& csv_text() {
  static const std::string text = [] {
    datagen::StringSink sink;
    datagen::generate_agency({}, {1, csv_bets, 0}, sink);
    return sink.data;
  }();
  return text;
}

void BM_csv_parse(benchmark::State& state) {
  auto file = client::BetFile::from_buffer("bench.csv", csv_text());
  proto::Date today = proto::today_local();
  uint64_t bets = 0;
  for (auto _ : state) {
    auto reader = file.reader(today);
    client::CsvRecord rec;
    while (reader.next(rec) == client::CsvReader::Step::bet) bets++;
  }
  per_bet_counters(state, bets, static_cast<uint64_t>(state.iterations()) * csv_text().size());
}
BENCHMARK(BM_csv_parse)->Name("csv/parse")->Unit(benchmark::kMillisecond);

void BM_csv_parse_encode(benchmark::State& state) {
  auto file = client::BetFile::from_buffer("bench.csv", csv_text());
  proto::Date today = proto::today_local();
  std::vector<std::byte> frame(limits::client_batch_bytes_default);
  uint64_t bets = 0;
  for (auto _ : state) {
    auto reader = file.reader(today);
    client::CsvRecord rec;
    proto::BatchBuilder builder(frame.data(), frame.size(), 1, batch_bets);
    uint32_t seq = 1;
    while (reader.next(rec) == client::CsvReader::Step::bet) {
      if (!builder.add(rec.bet)) {
        benchmark::DoNotOptimize(builder.finish(seq++));
        builder.reset();
        builder.add(rec.bet);
      }
      bets++;
    }
    if (!builder.empty()) benchmark::DoNotOptimize(builder.finish(seq));
  }
  per_bet_counters(state, bets, static_cast<uint64_t>(state.iterations()) * csv_text().size());
}
BENCHMARK(BM_csv_parse_encode)->Name("csv/parse+encode")->Unit(benchmark::kMillisecond);

// ---------------------------------------------------------------- log

// The server writes `apuesta_recibida` once per stored batch, with one
// write(2). Measured here to /dev/null, so this is the floor of that cost.
void BM_log_line(benchmark::State& state) {
  int saved = ::dup(STDERR_FILENO);
  int null_fd = ::open("/dev/null", O_WRONLY);
  ::dup2(null_fd, STDERR_FILENO);
  common::log::init(common::log::Level::info);
  uint64_t bets = 0;
  for (auto _ : state) {
    common::log::info("apuesta_recibida", common::log::Outcome::success, {{"cantidad", 128}, {"agencia", 3}});
    bets += batch_bets;
  }
  ::dup2(saved, STDERR_FILENO);
  ::close(saved);
  ::close(null_fd);
  per_bet_counters(state, bets, 0);
}
BENCHMARK(BM_log_line)->Name("log/apuesta_recibida-per-batch");

}  // namespace

BENCHMARK_MAIN();
