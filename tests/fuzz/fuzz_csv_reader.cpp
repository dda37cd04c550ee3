// libFuzzer target: the agency client's CSV reader, which reads files the
// agency's own systems write (and a broken export can hold anything). The
// input is the file. Properties: validate() and a reader agree on the bet
// count and on the first bad line; every bet handed out passes the
// protocol's own check_bet and points into the file; a reader resumed from a
// position gives the same bets as the first one from there on.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "client/csv.hpp"
#include "lottery/protocol.hpp"

namespace {

using namespace lottery;

void inside(std::string_view v, std::string_view file) {
  if (!v.empty() && (v.data() < file.data() || v.data() + v.size() > file.data() + file.size())) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const proto::Date today{2026, 6, 1};
  auto file = client::BetFile::from_buffer("fuzz.csv", std::string_view(reinterpret_cast<const char*>(data), size));
  client::CsvError first_error;
  auto summary = file.validate(today, &first_error);

  proto::ValidationContext ctx{1, today};
  client::CsvReader reader = file.reader(today);
  client::CsvRecord rec;
  uint64_t bets = 0;
  uint32_t last_line = 0;
  std::vector<client::CsvPosition> positions;
  client::CsvReader::Step step;
  while ((step = reader.next(rec)) == client::CsvReader::Step::bet) {
    if (rec.line <= last_line) __builtin_trap();
    last_line = rec.line;
    inside(rec.bet.first_name, file.bytes());
    inside(rec.bet.last_name, file.bytes());
    inside(rec.bet.document, file.bytes());
    if (proto::check_bet(rec.bet, ctx)) __builtin_trap();
    if (bets < 4) positions.push_back(reader.position());
    bets++;
  }
  if (summary) {
    if (step != client::CsvReader::Step::end || bets != summary->bets) __builtin_trap();
  } else {
    if (step != client::CsvReader::Step::error) __builtin_trap();
    if (reader.error().line != first_error.line || reader.error().what != first_error.what) __builtin_trap();
    if (reader.error().what.empty()) __builtin_trap();
  }
  // Resuming from where a batch would start gives the same rest.
  for (size_t k = 0; k < positions.size(); k++) {
    client::CsvReader resumed = file.reader(today, positions[k]);
    uint64_t rest = 0;
    while (resumed.next(rec) == client::CsvReader::Step::bet) rest++;
    if (rest != bets - (k + 1)) __builtin_trap();
  }
  return 0;
}
