// Stable producer ids: the same input gives the same id on every run (and
// build: one value is pinned), different inputs give different ids.
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>

#include "client/producer_id.hpp"
#include "test_support.hpp"

using namespace lottery;
using namespace lottery::client;

namespace {

proto::Bet sample_bet() {
  return proto::Bet{"Santiago Lionel", "Lorca", "30904465", proto::Date{1999, 3, 17}, 7574};
}

}  // namespace

TEST(ProducerId, FileIdIsStableAndPinned) {
  uint64_t id = file_producer_id(1, "/data/agency-1.csv");
  EXPECT_EQ(id, file_producer_id(1, "/data/agency-1.csv"));
  // Changing the hash or its encoding would make every stored stream look
  // new to the server, and a re-run would send its bets twice. The value was
  // computed independently (FNV-1a 64 over the encoding in producer_id.cpp).
  EXPECT_EQ(id, 0xe20a06c81a789a2cull) << std::hex << id;
}

TEST(ProducerId, FileIdDependsOnAgencyAndPath) {
  uint64_t id = file_producer_id(1, "/data/agency-1.csv");
  EXPECT_NE(id, file_producer_id(2, "/data/agency-1.csv"));
  EXPECT_NE(id, file_producer_id(1, "/data/agency-2.csv"));
  EXPECT_NE(id, 0u);
}

TEST(ProducerId, BetIdDependsOnEveryField) {
  proto::Bet bet = sample_bet();
  uint64_t id = bet_producer_id(1, bet);
  EXPECT_EQ(id, bet_producer_id(1, sample_bet()));
  EXPECT_NE(id, bet_producer_id(2, bet));
  proto::Bet other = bet;
  other.number = 7575;
  EXPECT_NE(id, bet_producer_id(1, other));
  other = bet;
  other.document = "30904466";
  EXPECT_NE(id, bet_producer_id(1, other));
  other = bet;
  other.birthdate.day = 18;
  EXPECT_NE(id, bet_producer_id(1, other));
  // Fields are length-prefixed: moving a byte between names changes the id.
  other = bet;
  other.first_name = "Santiago Lionel L";
  other.last_name = "orca";
  EXPECT_NE(id, bet_producer_id(1, other));
}

TEST(ProducerId, FileAndBetStreamsNeverShareAnId) {
  proto::Bet bet = sample_bet();
  EXPECT_NE(bet_producer_id(1, bet), file_producer_id(1, bet.document));
}

TEST(ProducerId, CanonicalPathResolvesRelativePathsAndSymlinks) {
  testsupport::TempDir dir;
  std::string file = dir.path() + "/agency-1.csv";
  std::ofstream(file) << "a,b,1,2000-01-01,1\n";
  std::string link = dir.path() + "/link.csv";
  ASSERT_EQ(::symlink(file.c_str(), link.c_str()), 0);
  auto direct = canonical_path(file);
  auto via_dots = canonical_path(dir.path() + "/./sub/../agency-1.csv");
  auto via_link = canonical_path(link);
  ASSERT_TRUE(direct.ok()) << direct.error().message;
  EXPECT_FALSE(via_dots.ok());  // "sub" does not exist: realpath refuses
  ASSERT_TRUE(via_link.ok());
  EXPECT_EQ(direct.value(), via_link.value());
  EXPECT_EQ(file_producer_id(1, direct.value()), file_producer_id(1, via_link.value()));
}

TEST(ProducerId, CanonicalPathNamesAMissingFile) {
  auto missing = canonical_path("/nonexistent/agency-9.csv");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.error().message.find("/nonexistent/agency-9.csv"), std::string::npos);
}
