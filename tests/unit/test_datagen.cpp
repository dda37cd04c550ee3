// Data generator: PRNGs fixed bit for bit, determinism from the seed, exact
// winners, unique documents, and output the client's CSV reader accepts.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "client/csv.hpp"
#include "test_support.hpp"
#include "tools/datagen_lib.hpp"

using namespace lottery;
using namespace lottery::datagen;

namespace {

std::string generate(const GeneratorOptions& options, const AgencySpec& spec, AgencyResult* result = nullptr) {
  StringSink sink;
  AgencyResult r = generate_agency(options, spec, sink);
  if (result != nullptr) *result = r;
  return sink.data;
}

// What the tests compare of a parsed bet, copied out of the file buffer.
struct ParsedBet {
  uint32_t line = 0;
  std::string document;
  uint16_t number = 0;
};

std::vector<ParsedBet> parse(const std::string& text) {
  client::BetFile file = client::BetFile::from_buffer("generated.csv", text);
  std::vector<ParsedBet> out;
  client::CsvReader reader = file.reader(proto::today_local());
  client::CsvRecord r;
  client::CsvReader::Step step;
  while ((step = reader.next(r)) == client::CsvReader::Step::bet)
    out.push_back(ParsedBet{r.line, std::string(r.bet.document), r.bet.number});
  EXPECT_EQ(step, client::CsvReader::Step::end) << reader.error().to_string();
  return out;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

TEST(Datagen, SplitMix64MatchesTheReferenceOutput) {
  // First outputs of the reference splitmix64.c for seed 0: the generator
  // must not drift, or every committed data set would change.
  SplitMix64 mix(0);
  EXPECT_EQ(mix.next(), 0xE220A8397B1DCDAFull);
  EXPECT_EQ(mix.next(), 0x6E789E6AA1B965F4ull);
  EXPECT_EQ(mix.next(), 0x06C45D188009454Full);
}

TEST(Datagen, XoshiroIsDeterministicAndBelowStaysInRange) {
  Xoshiro256 a(42);
  Xoshiro256 b(42);
  Xoshiro256 c(43);
  bool differs = false;
  for (int i = 0; i < 100; i++) {
    uint64_t x = a.next();
    EXPECT_EQ(x, b.next());
    differs |= x != c.next();
  }
  EXPECT_TRUE(differs);
  uint64_t counts[7] = {};
  for (int i = 0; i < 70000; i++) {
    uint64_t v = a.below(7);
    ASSERT_LT(v, 7u);
    counts[v]++;
  }
  for (uint64_t n : counts) EXPECT_NEAR(static_cast<double>(n), 10000.0, 600.0);
  EXPECT_EQ(a.below(1), 0u);
}

TEST(Datagen, DocumentPermutationIsABijectionOnASample) {
  DocumentPermutation p(7);
  constexpr uint64_t sample = 200000;
  std::vector<uint64_t> values;
  values.reserve(sample);
  for (uint64_t i = 0; i < sample; i++) {
    uint64_t v = p.permute(i);
    ASSERT_LT(v, document_count);
    values.push_back(v);
  }
  // The top of the range maps inside it too.
  EXPECT_LT(p.permute(document_count - 1), document_count);
  std::sort(values.begin(), values.end());
  EXPECT_EQ(std::adjacent_find(values.begin(), values.end()), values.end());
}

TEST(Datagen, SameSeedSameBytesOtherSeedOtherBytes) {
  GeneratorOptions o;
  AgencySpec spec{2, 500, 3};
  std::string first = generate(o, spec);
  EXPECT_EQ(first, generate(o, spec));
  o.seed = 2;
  EXPECT_NE(first, generate(o, spec));
}

TEST(Datagen, ExactWinnersAndNoOtherBetOnTheWinningNumber) {
  GeneratorOptions o;
  o.winning_number = 1234;
  for (uint64_t winners : {0u, 1u, 7u, 100u}) {
    AgencyResult result;
    std::string text = generate(o, AgencySpec{1, 100, winners}, &result);
    client::BetFile file = client::BetFile::from_buffer("g.csv", text);
    client::CsvReader reader = file.reader(proto::today_local());
    client::CsvRecord r;
    std::vector<std::string> on_winning;
    uint64_t bets = 0;
    while (reader.next(r) == client::CsvReader::Step::bet) {
      bets++;
      if (r.bet.number == o.winning_number) on_winning.emplace_back(r.bet.document);
    }
    EXPECT_EQ(bets, 100u);
    EXPECT_EQ(on_winning.size(), winners);
    EXPECT_EQ(on_winning, result.winner_documents);
    EXPECT_EQ(result.winners, winners);
  }
}

TEST(Datagen, WinnersDoNotChangeThePeople) {
  GeneratorOptions o;
  std::string none = generate(o, AgencySpec{1, 300, 0});
  std::string some = generate(o, AgencySpec{1, 300, 5});
  auto a = parse(none);
  auto b = parse(some);
  ASSERT_EQ(a.size(), b.size());
  size_t number_changes = 0;
  for (size_t i = 0; i < a.size(); i++) {
    EXPECT_EQ(a[i].line, b[i].line);
    EXPECT_EQ(a[i].document, b[i].document);
    number_changes += a[i].number != b[i].number;
  }
  EXPECT_EQ(number_changes, 5u);
  // Same lines apart from the numbers.
  EXPECT_EQ(std::count(none.begin(), none.end(), '\n'), std::count(some.begin(), some.end(), '\n'));
}

TEST(Datagen, RealisticValidUniqueBets) {
  GeneratorOptions o;
  std::string text = generate(o, AgencySpec{3, 20000, 2});
  client::BetFile file = client::BetFile::from_buffer("g.csv", text);
  auto summary = file.validate(proto::today_local());
  ASSERT_TRUE(summary.ok()) << summary.error().message;
  EXPECT_EQ(summary->bets, 20000u);

  client::CsvReader reader = file.reader(proto::today_local());
  client::CsvRecord r;
  std::set<std::string_view> documents;
  bool accented = false;
  bool compound = false;
  while (reader.next(r) == client::CsvReader::Step::bet) {
    EXPECT_EQ(r.bet.document.size(), 8u);
    EXPECT_TRUE(documents.insert(r.bet.document).second) << "duplicate " << r.bet.document;
    EXPECT_GE(r.bet.birthdate.year, birth_year_first);
    EXPECT_LE(r.bet.birthdate.year, birth_year_last);
    EXPECT_LE(r.bet.number, 9999);
    accented |= r.bet.last_name.find("\xC3") != std::string_view::npos;
    compound |= r.bet.first_name.find(' ') != std::string_view::npos;
  }
  EXPECT_TRUE(accented);
  EXPECT_TRUE(compound);
  EXPECT_EQ(text.find('\r'), std::string::npos);
}

TEST(Datagen, CrlfOption) {
  GeneratorOptions o;
  o.crlf = true;
  std::string text = generate(o, AgencySpec{1, 10, 1});
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 10);
  EXPECT_EQ(std::count(text.begin(), text.end(), '\r'), 10);
  EXPECT_EQ(parse(text).size(), 10u);
}

TEST(Datagen, DefaultWinnersAreSmallAndDeterministic) {
  for (uint16_t agency = 1; agency <= 50; agency++) {
    uint64_t k = default_winners(1, agency, 1000);
    EXPECT_LE(k, default_winners_max);
    EXPECT_EQ(k, default_winners(1, agency, 1000));
    EXPECT_LE(default_winners(1, agency, 1), 1u);
  }
}

TEST(Datagen, WritesFilesAndExpectedJson) {
  testsupport::TempDir dir;
  DatasetOptions options;
  options.out_dir = dir.path() + "/out";
  options.agencies = {AgencySpec{1, 50, 2}, AgencySpec{2, 0, 0}, AgencySpec{3, 30, 1}};
  auto results = write_dataset(options);
  ASSERT_TRUE(results.ok()) << results.error().message;
  ASSERT_EQ(results->size(), 3u);

  std::string one = read_file(options.out_dir + "/agency-1.csv");
  EXPECT_EQ(one, generate(options.generator, options.agencies[0]));
  EXPECT_EQ(read_file(options.out_dir + "/agency-2.csv"), "");
  std::string json = read_file(options.out_dir + "/expected.json");
  EXPECT_EQ(
      json.rfind("{\"winning_number\":7574,\"agencies\":{\"1\":{\"bets\":50,\"winners\":2,\"winner_documents\":[\"", 0),
      0u)
      << json;
  EXPECT_NE(json.find("\"2\":{\"bets\":0,\"winners\":0,\"winner_documents\":[]}"), std::string::npos) << json;
  EXPECT_NE(json.find("\"total_bets\":80}"), std::string::npos) << json;
  for (const std::string& doc : (*results)[0].winner_documents) EXPECT_NE(json.find(doc), std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(options.out_dir + "/agency-1.csv.tmp"));
}
