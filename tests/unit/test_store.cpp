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

void append(store::Store& s, uint16_t agency, uint64_t seq, const std::vector<std::byte>& bets, uint16_t count) {
  auto slot = s.reserve(bets.size());
  ASSERT_TRUE(slot.ok()) << slot.error().message;
  std::memcpy(*slot, bets.data(), bets.size());
  s.commit(store::EntryMeta{agency, count, 42, seq}, bets.size());
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
    append(**s, static_cast<uint16_t>(1 + worker), 1, bets, 100);
    append(**s, 3, 2, bets, 100);
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
  auto none = run_draw(dir.path(), 9999, 3);
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->total_winners(), 0u);
}
