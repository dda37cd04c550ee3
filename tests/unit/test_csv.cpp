// Agency CSV reader: line endings, BOM, blank lines, UTF-8, every malformed
// line named by its number, and the reference data set.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "client/csv.hpp"
#include "test_support.hpp"

using namespace lottery;
using namespace lottery::client;

namespace {

// A fixed "today" keeps the future-date rule independent of the clock.
constexpr proto::Date test_today{2024, 6, 1};

std::string write_file(const testsupport::TempDir& dir, const std::string& name, const std::string& bytes) {
  std::string path = dir.path() + "/" + name;
  std::ofstream out(path, std::ios::binary);
  out << bytes;
  return path;
}

std::vector<CsvRecord> read_all(const BetFile& file) {
  std::vector<CsvRecord> out;
  CsvReader reader = file.reader(test_today);
  CsvRecord r;
  CsvReader::Step step;
  while ((step = reader.next(r)) == CsvReader::Step::bet) out.push_back(r);
  EXPECT_EQ(step, CsvReader::Step::end) << reader.error().to_string();
  return out;
}

BetFile load(const std::string& path) {
  auto f = BetFile::load(path);
  EXPECT_TRUE(f.ok()) << (f.ok() ? "" : f.error().message);
  return std::move(f.value());
}

// The first error of a file whose line `bad_line` (1-based) is `line_text`
// and whose other lines are valid.
CsvError first_error(const std::string& line_text, uint32_t bad_line = 3) {
  std::string text;
  for (uint32_t i = 1; i < bad_line; i++) text += "Ana,Gómez,2000000" + std::to_string(i) + ",1990-01-02,42\n";
  text += line_text + "\n";
  text += "Ana,Gómez,30000000,1990-01-02,42\n";
  BetFile file = BetFile::from_buffer("agency-9.csv", text);
  CsvError error;
  auto summary = file.validate(test_today, &error);
  EXPECT_FALSE(summary.ok()) << "line accepted: " << line_text;
  return error;
}

std::string tp0_dir() {
  // LOTTERY_SOURCE_DIR when a runner sets it; else from this file's path
  // (tests/unit/ under the source dir), so plain ctest finds the data too.
  const char* env = std::getenv("LOTTERY_SOURCE_DIR");
  std::filesystem::path source = env != nullptr
                                     ? std::filesystem::path(env)
                                     : std::filesystem::path(__FILE__).parent_path().parent_path().parent_path();
  return (source / ".." / "shared" / "data" / "tp0").lexically_normal().string();
}

}  // namespace

TEST(Csv, ReadsLfLines) {
  testsupport::TempDir dir;
  BetFile file = load(write_file(dir, "a.csv",
                                 "Santiago Lionel,Lorca,30904465,1999-03-17,2201\n"
                                 "Agustin Emanuel,Zambrano,21689196,2000-05-10,9325\n"));
  auto bets = read_all(file);
  ASSERT_EQ(bets.size(), 2u);
  EXPECT_EQ(bets[0].bet.first_name, "Santiago Lionel");
  EXPECT_EQ(bets[0].bet.last_name, "Lorca");
  EXPECT_EQ(bets[0].bet.document, "30904465");
  EXPECT_EQ(bets[0].bet.birthdate, (proto::Date{1999, 3, 17}));
  EXPECT_EQ(bets[0].bet.number, 2201);
  EXPECT_EQ(bets[0].line, 1u);
  EXPECT_EQ(bets[1].bet.number, 9325);
  EXPECT_EQ(bets[1].line, 2u);
}

TEST(Csv, ReadsCrlfLinesWithoutKeepingTheCr) {
  testsupport::TempDir dir;
  BetFile file = load(write_file(dir, "a.csv", "Ana,Gómez,1,1990-01-02,7\r\nLuis,Pérez,2,1991-02-03,8\r\n"));
  auto bets = read_all(file);
  ASSERT_EQ(bets.size(), 2u);
  EXPECT_EQ(bets[0].bet.number, 7);
  EXPECT_EQ(bets[1].bet.number, 8);
  EXPECT_EQ(bets[1].bet.last_name, "Pérez");
}

TEST(Csv, LastLineWithoutNewline) {
  BetFile file = BetFile::from_buffer("x", "Ana,Gómez,1,1990-01-02,7\nLuis,Pérez,2,1991-02-03,8");
  EXPECT_EQ(read_all(file).size(), 2u);
}

TEST(Csv, SkipsBom) {
  testsupport::TempDir dir;
  BetFile file = load(write_file(dir, "a.csv", "\xEF\xBB\xBFÁngel,Núñez,1,1990-01-02,7\n"));
  auto bets = read_all(file);
  ASSERT_EQ(bets.size(), 1u);
  EXPECT_EQ(bets[0].bet.first_name, "Ángel");
  EXPECT_EQ(bets[0].line, 1u);
}

TEST(Csv, SkipsBlankLinesButCountsThem) {
  testsupport::TempDir dir;
  BetFile file = load(write_file(dir, "a.csv", "\nAna,Gómez,1,1990-01-02,7\r\n\r\n  \nLuis,Pérez,2,1991-02-03,8\n\n"));
  auto bets = read_all(file);
  ASSERT_EQ(bets.size(), 2u);
  EXPECT_EQ(bets[0].line, 2u);
  EXPECT_EQ(bets[1].line, 5u);
  auto summary = file.validate(test_today);
  ASSERT_TRUE(summary.ok());
  EXPECT_EQ(summary->bets, 2u);
}

TEST(Csv, KeepsUtf8BytesAsWritten) {
  BetFile file = BetFile::from_buffer("x", "María José,Fornerón,1,1990-01-02,7\nÑandú,Álvarez Núñez,2,1990-01-02,8\n");
  auto bets = read_all(file);
  ASSERT_EQ(bets.size(), 2u);
  EXPECT_EQ(bets[0].bet.first_name, "María José");
  EXPECT_EQ(bets[0].bet.last_name, "Fornerón");
  EXPECT_EQ(bets[1].bet.first_name, "Ñandú");
  EXPECT_EQ(bets[1].bet.last_name, "Álvarez Núñez");
}

TEST(Csv, EmptyFileHasNoBets) {
  testsupport::TempDir dir;
  BetFile file = load(write_file(dir, "a.csv", ""));
  auto summary = file.validate(test_today);
  ASSERT_TRUE(summary.ok());
  EXPECT_EQ(summary->bets, 0u);
}

TEST(Csv, MissingFileNamesTheFile) {
  auto f = BetFile::load("/nonexistent/agency-1.csv");
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.error().code, ENOENT);
  EXPECT_NE(f.error().message.find("/nonexistent/agency-1.csv"), std::string::npos);
}

TEST(Csv, ErrorsNameFileAndLine) {
  BetFile file = BetFile::from_buffer("agency-3.csv", "Ana,Gómez,1,1990-01-02,7\n\nAna,Gómez,1,1990-01-02\n");
  CsvError error;
  auto summary = file.validate(test_today, &error);
  ASSERT_FALSE(summary.ok());
  EXPECT_EQ(error.line, 3u);
  EXPECT_EQ(error.file, "agency-3.csv");
  EXPECT_NE(summary.error().message.find("agency-3.csv: line 3: "), std::string::npos) << summary.error().message;
}

TEST(Csv, EveryMalformedLineIsNamed) {
  struct Case {
    const char* line;
    const char* expect;  // part of the error text
  };
  const Case cases[] = {
      {"Ana,Gómez,1,1990-01-02", "found 4"},
      {"Ana,Gómez,1,1990-01-02,7,extra", "found 6"},
      {"Ana Gómez 1 1990-01-02 7", "found 1"},
      {",Gómez,1,1990-01-02,7", "first_name: name is empty"},
      {"Ana,,1,1990-01-02,7", "last_name: name is empty"},
      {"Ana,Gómez,12a4,1990-01-02,7", "document"},
      {"Ana,Gómez,,1990-01-02,7", "document is empty"},
      {"Ana,Gómez,12345678901,1990-01-02,7", "document"},
      {"Ana,Gómez, 123,1990-01-02,7", "document"},
      {"Ana,Gómez,1,1990/01/02,7", "YYYY-MM-DD"},
      {"Ana,Gómez,1,1990-1-2,7", "YYYY-MM-DD"},
      {"Ana,Gómez,1,,7", "YYYY-MM-DD"},
      {"Ana,Gómez,1,2001-02-29,7", "not a calendar date"},
      {"Ana,Gómez,1,1990-13-01,7", "not a calendar date"},
      {"Ana,Gómez,1,2024-06-02,7", "future"},
      {"Ana,Gómez,1,1850-01-01,7", "before"},
      {"Ana,Gómez,1,1990-01-02,10000", "number"},
      {"Ana,Gómez,1,1990-01-02,-1", "number"},
      {"Ana,Gómez,1,1990-01-02,abc", "number"},
      {"Ana,Gómez,1,1990-01-02,", "number"},
      {"Ana,Gómez,1,1990-01-02,7 ", "number"},
      {"Ana,G\xC3\x28mez,1,1990-01-02,7", "not valid UTF-8"},
      {"\xFF\xFE,Gómez,1,1990-01-02,7", "not valid UTF-8"},
      {"Ana\x01,Gómez,1,1990-01-02,7", "control character"},
  };
  for (const Case& c : cases) {
    for (uint32_t line : {1u, 3u}) {
      CsvError e = first_error(c.line, line);
      EXPECT_EQ(e.line, line) << c.line;
      EXPECT_NE(e.what.find(c.expect), std::string::npos) << c.line << " -> " << e.what;
    }
  }
}

TEST(Csv, LeadingZerosAndLimitsAreAccepted) {
  BetFile file = BetFile::from_buffer("x", "Ana,Gómez,0001,2000-02-29,0000\nAna,Gómez,1234567890,2024-06-01,9999\n");
  auto bets = read_all(file);
  ASSERT_EQ(bets.size(), 2u);
  EXPECT_EQ(bets[0].bet.number, 0);
  EXPECT_EQ(bets[0].bet.document, "0001");
  EXPECT_EQ(bets[1].bet.number, 9999);
}

TEST(Csv, ReaderResumesFromAPosition) {
  BetFile file = BetFile::from_buffer("x", "A,B,1,1990-01-02,1\n\nA,B,2,1990-01-02,2\nA,B,3,1990-01-02,3\n");
  CsvReader reader = file.reader(test_today);
  CsvRecord r;
  ASSERT_EQ(reader.next(r), CsvReader::Step::bet);
  CsvPosition after_first = reader.position();
  CsvReader again = file.reader(test_today, after_first);
  ASSERT_EQ(again.next(r), CsvReader::Step::bet);
  EXPECT_EQ(r.bet.document, "2");
  EXPECT_EQ(r.line, 3u);
}

TEST(Csv, ViewsPointIntoTheFileBuffer) {
  BetFile file = BetFile::from_buffer("x", "Ana,Gómez,1,1990-01-02,7\n");
  auto bets = read_all(file);
  ASSERT_EQ(bets.size(), 1u);
  std::string_view all = file.bytes();
  EXPECT_GE(bets[0].bet.first_name.data(), all.data());
  EXPECT_LE(bets[0].bet.last_name.data() + bets[0].bet.last_name.size(), all.data() + all.size());
  // Moving the file keeps the buffer, and so the views, where they are.
  BetFile moved = std::move(file);
  EXPECT_EQ(moved.bytes().data(), all.data());
}

TEST(Csv, ParseBetFieldsSharesTheRules) {
  proto::Bet bet;
  EXPECT_EQ(parse_bet_fields("Ana", "Gómez", "123", "1990-01-02", "42", test_today, bet), "");
  EXPECT_EQ(bet.number, 42);
  EXPECT_NE(parse_bet_fields("Ana", "Gómez", "123", "1990-02-30", "42", test_today, bet), "");
  EXPECT_NE(parse_bet_fields("Ana", "Gómez", "x", "1990-01-02", "42", test_today, bet).find("document"),
            std::string::npos);
}

TEST(Csv, ReferenceDataSet) {
  std::string dir = tp0_dir();
  if (!std::filesystem::exists(dir + "/agency-1.csv")) GTEST_SKIP() << "reference data not found at " << dir;
  const uint64_t expected_bets[] = {26936, 25518, 16014, 9238, 991};
  const uint64_t expected_winners[] = {2, 3, 3, 2, 0};
  constexpr uint16_t winning_number = 7574;
  proto::Date today = proto::today_local();
  for (int i = 0; i < 5; i++) {
    std::string path = dir + "/agency-" + std::to_string(i + 1) + ".csv";
    auto file = BetFile::load(path);
    ASSERT_TRUE(file.ok()) << file.error().message;
    auto summary = file->validate(today);
    ASSERT_TRUE(summary.ok()) << summary.error().message;
    EXPECT_EQ(summary->bets, expected_bets[i]) << path;
    uint64_t winners = 0;
    CsvReader reader = file->reader(today);
    CsvRecord r;
    while (reader.next(r) == CsvReader::Step::bet) winners += r.bet.number == winning_number;
    EXPECT_EQ(winners, expected_winners[i]) << path;
  }
}
