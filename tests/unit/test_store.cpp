// The store: append, reopen, scan, roll-over, torn tails, and the draw.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <fstream>

#include "lottery/draw.hpp"
#include "lottery/store.hpp"
#include "test_support.hpp"

using namespace lottery;
using testsupport::TempDir;

namespace {

uint16_t number_mod(size_t i) { return static_cast<uint16_t>(i % 10000); }
uint16_t number_winner_every_10(size_t i) { return i % 10 == 0 ? 7574 : static_cast<uint16_t>(i % 7000); }

void append(store::Store& s, uint16_t agency, uint64_t seq, const std::vector<std::byte>& bets, uint16_t count,
            uint64_t producer = 42) {
  auto slot = s.reserve(bets.size());
  ASSERT_TRUE(slot.ok()) << slot.error().message;
  std::memcpy(*slot, bets.data(), bets.size());
  s.commit(store::EntryMeta{agency, count, producer, seq}, bets.size());
}

uint64_t scan_all(const std::string& dir, uint64_t* entries = nullptr) {
  auto segs = store::list_segments(dir, -1);
  EXPECT_TRUE(segs.ok());
  uint64_t bets = 0, n = 0;
  for (auto& p : *segs) {
    auto r = store::scan_segment(p, [&](const store::EntryView& e) {
      bets += e.meta.bet_count;
      n++;
    });
    EXPECT_TRUE(r.ok());
  }
  if (entries) *entries = n;
  return bets;
}

}  // namespace

TEST(Store, AppendReopenScan) {
  TempDir dir;
  auto bets = testsupport::encode_bets(100, number_mod);
  {
    auto s = store::Store::open({dir.path(), 0, store::segment_bytes_min});
    ASSERT_TRUE(s.ok()) << s.error().message;
    for (uint64_t seq = 1; seq <= 10; seq++) append(**s, 1 + seq % 3, seq, bets, 100);
    EXPECT_EQ((*s)->total_bets(), 1000u);
    ASSERT_TRUE((*s)->close().ok());
  }
  auto s = store::Store::open({dir.path(), 0, store::segment_bytes_min});
  ASSERT_TRUE(s.ok()) << s.error().message;
  EXPECT_EQ((*s)->total_bets(), 1000u);
  EXPECT_EQ((*s)->total_entries(), 10u);
  EXPECT_EQ((*s)->bets_stored(1), 300u);
  EXPECT_EQ((*s)->bets_stored(2), 400u);
  EXPECT_TRUE((*s)->recovery().dropped.empty());
  // Appending after reopen continues the same log.
  append(**s, 1, 11, bets, 100);
  ASSERT_TRUE((*s)->close().ok());
  uint64_t entries = 0;
  EXPECT_EQ(scan_all(dir.path(), &entries), 1100u);
  EXPECT_EQ(entries, 11u);
}

TEST(Store, ScanGivesBackExactBytesAndMeta) {
  TempDir dir;
  std::vector<std::string> docs;
  auto bets = testsupport::encode_bets(5, number_mod, &docs);
  auto s = store::Store::open({dir.path(), 3, store::segment_bytes_min});
  ASSERT_TRUE(s.ok());
  append(**s, 4, 99, bets, 5);
  ASSERT_TRUE((*s)->close().ok());
  auto segs = store::list_segments(dir.path(), 3);
  ASSERT_TRUE(segs.ok());
  ASSERT_EQ(segs->size(), 1u);
  int seen = 0;
  auto r = store::scan_segment((*segs)[0], [&](const store::EntryView& e) {
    seen++;
    EXPECT_EQ(e.meta.agency, 4);
    EXPECT_EQ(e.meta.sequence, 99u);
    EXPECT_EQ(e.meta.producer_id, 42u);
    ASSERT_EQ(e.bets.size(), bets.size());
    EXPECT_EQ(std::memcmp(e.bets.data(), bets.data(), bets.size()), 0);
  });
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(seen, 1);
  EXPECT_EQ(r->header.worker_id, 3);
  EXPECT_FALSE(r->stopped_at_bad_entry);
}

TEST(Store, RollsOverToNewSegments) {
  TempDir dir;
  auto bets = testsupport::encode_bets(1000, number_mod);  // ~30 KiB per entry
  auto s = store::Store::open({dir.path(), 0, store::segment_bytes_min});
  ASSERT_TRUE(s.ok());
  for (uint64_t seq = 1; seq <= 100; seq++) append(**s, 1, seq, bets, 1000);
  ASSERT_TRUE((*s)->close().ok());
  auto segs = store::list_segments(dir.path(), 0);
  ASSERT_TRUE(segs.ok());
  EXPECT_GT(segs->size(), 2u);
  EXPECT_EQ(scan_all(dir.path()), 100000u);
  // Segment files are preallocated to their full size, not sparse.
  for (auto& p : *segs) {
    struct stat st {};
    ASSERT_EQ(::stat(p.c_str(), &st), 0);
    EXPECT_EQ(static_cast<size_t>(st.st_size), store::segment_bytes_min);
    EXPECT_GE(static_cast<size_t>(st.st_blocks) * 512, store::segment_bytes_min);
  }
}

TEST(Store, AbandonedEntryLeavesNothing) {
  TempDir dir;
  auto bets = testsupport::encode_bets(10, number_mod);
  auto s = store::Store::open({dir.path(), 0, store::segment_bytes_min});
  ASSERT_TRUE(s.ok());
  append(**s, 1, 1, bets, 10);
  auto slot = (*s)->reserve(bets.size());
  ASSERT_TRUE(slot.ok());
  std::memcpy(*slot, bets.data(), bets.size());
  (*s)->abandon(bets.size());
  append(**s, 1, 2, bets, 10);
  ASSERT_TRUE((*s)->close().ok());
  uint64_t entries = 0;
  EXPECT_EQ(scan_all(dir.path(), &entries), 20u);
  EXPECT_EQ(entries, 2u);
}

TEST(Store, TornTailIsCutOnReopen) {
  TempDir dir;
  auto bets = testsupport::encode_bets(50, number_mod);
  std::string path;
  size_t entry = store::entry_size(bets.size());
  {
    auto s = store::Store::open({dir.path(), 0, store::segment_bytes_min});
    ASSERT_TRUE(s.ok());
    for (uint64_t seq = 1; seq <= 3; seq++) append(**s, 2, seq, bets, 50);
    path = (*s)->current_segment_path();
    ASSERT_TRUE((*s)->close().ok());
  }
  // Flip one byte inside the last entry: it is torn now.
  {
    int fd = ::open(path.c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    off_t at = static_cast<off_t>(store::segment_header_bytes + 2 * entry + 100);
    char b;
    ASSERT_EQ(::pread(fd, &b, 1, at), 1);
    b ^= 0x5A;
    ASSERT_EQ(::pwrite(fd, &b, 1, at), 1);
    ::close(fd);
  }
  auto s = store::Store::open({dir.path(), 0, store::segment_bytes_min});
  ASSERT_TRUE(s.ok()) << s.error().message;
  EXPECT_EQ((*s)->total_bets(), 100u);
  ASSERT_EQ((*s)->recovery().dropped.size(), 1u);
  EXPECT_NE((*s)->recovery().dropped[0].find("offset: " + std::to_string(store::segment_header_bytes + 2 * entry)),
            std::string::npos);
  append(**s, 2, 4, bets, 50);
  ASSERT_TRUE((*s)->close().ok());
  EXPECT_EQ(scan_all(dir.path()), 150u);
}

TEST(Store, RefusesAFileThatIsNotASegment) {
  TempDir dir;
  {
    std::ofstream f(dir.path() + "/" + store::segment_file_name(0, 1));
    f << std::string(4096, 'x');
  }
  auto s = store::Store::open({dir.path(), 0, store::segment_bytes_min});
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message.find("magic"), std::string::npos);
}

TEST(Draw, WinnersPerAgencyAcrossWorkers) {
  TempDir dir;
  std::vector<std::string> docs;
  auto bets = testsupport::encode_bets(100, number_winner_every_10, &docs);
  for (uint16_t worker = 0; worker < 2; worker++) {
    auto s = store::Store::open({dir.path(), worker, store::segment_bytes_min});
    ASSERT_TRUE(s.ok());
    uint64_t producer = 100u + worker;  // each worker served its own producers
    append(**s, static_cast<uint16_t>(1 + worker), 1, bets, 100, producer);
    append(**s, 3, 2, bets, 100, producer);
    ASSERT_TRUE((*s)->close().ok());
  }
  auto r = run_draw(dir.path(), 7574, 3);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->bets_scanned, 400u);
  ASSERT_EQ(r->winners.size(), 4u);
  EXPECT_EQ(r->winners[1].size(), 10u);
  EXPECT_EQ(r->winners[2].size(), 10u);
  EXPECT_EQ(r->winners[3].size(), 20u);
  EXPECT_EQ(r->winners[1][0], docs[0]);
  EXPECT_EQ(r->winners[1][1], docs[10]);
  // Another winning number, no winners.
  EXPECT_EQ(r->duplicates_skipped, 0u);
  auto none = run_draw(dir.path(), 9999, 3);
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->total_winners(), 0u);
}

TEST(Draw, CountsAStoredDuplicateOnce) {
  TempDir dir;
  auto bets = testsupport::encode_bets(100, number_winner_every_10);
  for (uint16_t worker = 0; worker < 2; worker++) {
    auto s = store::Store::open({dir.path(), worker, store::segment_bytes_min});
    ASSERT_TRUE(s.ok());
    append(**s, 1, 1, bets, 100, 7);  // the same batch of the same producer, in two workers
    ASSERT_TRUE((*s)->close().ok());
  }
  auto r = run_draw(dir.path(), 7574, 1);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->bets_scanned, 100u);
  EXPECT_EQ(r->winners[1].size(), 10u);
  EXPECT_EQ(r->duplicates_skipped, 1u);
}

namespace {

std::vector<char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void write_file(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

}  // namespace

// For many random cut points and byte flips in the last entry, recovery keeps
// exactly the valid prefix, and the store then appends after it.
TEST(StoreRecovery, TornTailsKeepExactlyTheValidPrefix) {
  TempDir dir;
  auto bets = testsupport::encode_bets(40, number_mod);
  size_t entry = store::entry_size(bets.size());
  std::string path;
  {
    auto s = store::Store::open({dir.path(), 0, store::segment_bytes_min});
    ASSERT_TRUE(s.ok());
    for (uint64_t seq = 1; seq <= 6; seq++) append(**s, 1, seq, bets, 40);
    path = (*s)->current_segment_path();
    ASSERT_TRUE((*s)->close().ok());
  }
  const std::vector<char> pristine = read_file(path);
  const size_t last = store::segment_header_bytes + 5 * entry;
  uint64_t seed = 0x5eed;
  auto next = [&] {
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    return seed >> 33;
  };
  for (int trial = 0; trial < 300; trial++) {
    std::vector<char> damaged = pristine;
    if (trial % 2 == 0) {
      // A write cut short: the entry's bytes from `cut` on never reached the file.
      size_t cut = last + next() % entry;
      std::fill(damaged.begin() + static_cast<long>(cut), damaged.begin() + static_cast<long>(last + entry), 0);
      if (cut == last) damaged[last + 4] = 1;  // a torn header, not free space
    } else {
      size_t at = last + next() % entry;
      damaged[at] = static_cast<char>(damaged[at] ^ static_cast<char>(1 + next() % 255));
    }
    write_file(path, damaged);
    auto s = store::Store::open({dir.path(), 0, store::segment_bytes_min});
    ASSERT_TRUE(s.ok()) << "trial " << trial << ": " << s.error().message;
    bool tail_intact = damaged == pristine;
    EXPECT_EQ((*s)->total_bets(), tail_intact ? 240u : 200u) << "trial " << trial;
    if (!tail_intact) {
      EXPECT_EQ((*s)->recovery().dropped.size(), 1u) << "trial " << trial;
    }
    append(**s, 1, 7, bets, 40);
    ASSERT_TRUE((*s)->close().ok());
    EXPECT_EQ(scan_all(dir.path()), tail_intact ? 280u : 240u) << "trial " << trial;
    write_file(path, pristine);
  }
}

TEST(StoreRecovery, DamageInTheMiddleRefusesUnlessRepair) {
  TempDir dir;
  auto bets = testsupport::encode_bets(30, number_mod);
  size_t entry = store::entry_size(bets.size());
  std::string path;
  {
    auto s = store::Store::open({dir.path(), 0, store::segment_bytes_min});
    ASSERT_TRUE(s.ok());
    for (uint64_t seq = 1; seq <= 5; seq++) append(**s, 2, seq, bets, 30);
    path = (*s)->current_segment_path();
    ASSERT_TRUE((*s)->close().ok());
  }
  std::vector<char> bytes = read_file(path);
  bytes[store::segment_header_bytes + entry + 77] ^= 0x10;  // inside entry 2 of 5
  write_file(path, bytes);

  auto refused = store::Store::open({dir.path(), 0, store::segment_bytes_min});
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.error().message.find("refusing to start"), std::string::npos) << refused.error().message;
  EXPECT_NE(refused.error().message.find("--repair"), std::string::npos);

  store::StoreOptions repair{dir.path(), 0, store::segment_bytes_min};
  repair.repair = true;
  auto repaired = store::Store::open(repair);
  ASSERT_TRUE(repaired.ok()) << repaired.error().message;
  EXPECT_EQ((*repaired)->total_bets(), 120u);  // entries 1, 3, 4, 5
  ASSERT_EQ((*repaired)->recovery().repaired.size(), 1u);
  EXPECT_NE((*repaired)->recovery().repaired[0].find("offset: " + std::to_string(store::segment_header_bytes + entry)),
            std::string::npos);
  ASSERT_TRUE((*repaired)->close().ok());
  // The skip record is part of the log now: a plain start accepts it.
  auto again = store::Store::open({dir.path(), 0, store::segment_bytes_min});
  ASSERT_TRUE(again.ok()) << again.error().message;
  EXPECT_EQ((*again)->total_bets(), 120u);
  EXPECT_TRUE((*again)->recovery().repaired.empty());
}

TEST(StoreRecovery, ReaderNeverCrashesOnGarbage) {
  // The scanner is the first thing to read a file from disk: random bytes
  // after a valid header must only ever produce "bad entry".
  TempDir dir;
  std::string path;
  {
    auto s = store::Store::open({dir.path(), 0, store::segment_bytes_min});
    ASSERT_TRUE(s.ok());
    path = (*s)->current_segment_path();
    ASSERT_TRUE((*s)->close().ok());
  }
  std::vector<char> bytes = read_file(path);
  uint64_t seed = 99;
  for (int trial = 0; trial < 50; trial++) {
    std::vector<char> junk = bytes;
    for (size_t i = store::segment_header_bytes; i < 64 * 1024; i++) {
      seed = seed * 6364136223846793005ull + 1442695040888963407ull;
      junk[i] = static_cast<char>(seed >> 56);
    }
    auto r = store::scan_bytes({reinterpret_cast<const std::byte*>(junk.data()), junk.size()}, nullptr);
    EXPECT_TRUE(r.stopped_at_bad_entry);
    EXPECT_EQ(r.entries, 0u);
  }
}

namespace {
void count_sync(void* counter) { ++*static_cast<int*>(counter); }
}  // namespace

TEST(StoreDurability, SyncOnlyWhenDirtyAndAcrossRollOver) {
  TempDir dir;
  auto bets = testsupport::encode_bets(1000, number_mod);  // ~30 KiB entries: 30 per 1 MiB segment
  store::StoreOptions opts{dir.path(), 0, store::segment_bytes_min};
  opts.durability = store::Durability::group;
  auto s = store::Store::open(opts);
  ASSERT_TRUE(s.ok());
  int syncs = 0;
  (*s)->set_sync_hook(count_sync, &syncs);
  ASSERT_TRUE((*s)->sync().ok());
  EXPECT_EQ(syncs, 0);  // nothing to sync
  for (uint64_t seq = 1; seq <= 10; seq++) append(**s, 1, seq, bets, 1000);
  EXPECT_TRUE((*s)->dirty());
  ASSERT_TRUE((*s)->sync().ok());
  EXPECT_EQ(syncs, 1);  // one sync for the whole group
  EXPECT_FALSE((*s)->dirty());
  // A group that spans a roll-over still takes one sync, covering both files.
  for (uint64_t seq = 11; seq <= 40; seq++) append(**s, 1, seq, bets, 1000);
  EXPECT_TRUE((*s)->dirty());
  ASSERT_TRUE((*s)->sync().ok());
  EXPECT_EQ(syncs, 2);
  EXPECT_EQ((*s)->sync_count(), 2u);
  ASSERT_TRUE((*s)->close().ok());
  EXPECT_EQ(scan_all(dir.path()), 40000u);
}
