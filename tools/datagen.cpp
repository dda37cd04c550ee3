// lottery-datagen: writes deterministic agency bet files and the winners they
// must produce (expected.json), for demos, tests and load runs.
//
//   lottery-datagen --agencies 5 --bets 1000 --seed 1 --out-dir .data

#include <CLI/CLI.hpp>
#include <charconv>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "common/result.hpp"
#include "tools/datagen_lib.hpp"

namespace {

using namespace lottery::datagen;

constexpr int exit_ok = 0;
constexpr int exit_bad_input = 1;
constexpr int exit_write_failed = 2;
constexpr uint64_t agencies_max = 65535;  // agency ids are u16 on the wire

struct Args {
  uint64_t agencies = default_agencies;
  uint64_t bets = default_bets_per_agency;
  std::string bets_list;
  uint64_t seed = default_seed;
  uint64_t winning_number = default_winning_number;
  uint64_t winners = 0;
  std::string winners_list;
  std::string out_dir = ".data";
  bool crlf = false;
  bool agencies_given = false;
  bool winners_given = false;
};

// "100,200,300" -> {100, 200, 300}; digits and commas only.
common::Result<std::vector<uint64_t>> parse_list(const std::string& flag, const std::string& text) {
  std::vector<uint64_t> out;
  size_t start = 0;
  while (start <= text.size()) {
    size_t comma = text.find(',', start);
    size_t end = comma == std::string::npos ? text.size() : comma;
    uint64_t v = 0;
    auto [ptr, ec] = std::from_chars(text.data() + start, text.data() + end, v);
    if (start == end || ec != std::errc{} || ptr != text.data() + end)
      return common::Error::make(EINVAL, flag + " '" + text + "': expected numbers separated by commas");
    out.push_back(v);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

// Reconciles --agencies with the per-agency lists: a list alone sets the
// number of agencies; both must agree.
common::Result<std::vector<AgencySpec>> plan_agencies(const Args& a) {
  std::vector<uint64_t> bets;
  std::vector<uint64_t> winners;
  if (!a.bets_list.empty()) {
    auto l = parse_list("--bets-list", a.bets_list);
    if (!l.ok()) return l.error();
    bets = std::move(l.value());
  }
  if (!a.winners_list.empty()) {
    auto l = parse_list("--winners-list", a.winners_list);
    if (!l.ok()) return l.error();
    winners = std::move(l.value());
  }
  uint64_t count = a.agencies;
  for (const auto* list : {&bets, &winners}) {
    if (list->empty()) continue;
    if (a.agencies_given && list->size() != count)
      return common::Error::make(EINVAL, "a per-agency list has " + std::to_string(list->size()) +
                                             " entries but --agencies is " + std::to_string(count));
    count = list->size();
  }
  if (!bets.empty() && !winners.empty() && bets.size() != winners.size())
    return common::Error::make(EINVAL, "--bets-list and --winners-list have different lengths");
  if (count < 1 || count > agencies_max) return common::Error::make(EINVAL, "--agencies must be 1..65535");

  std::vector<AgencySpec> specs;
  for (uint64_t i = 0; i < count; i++) {
    AgencySpec s;
    s.agency = static_cast<uint16_t>(i + 1);
    s.bets = bets.empty() ? a.bets : bets[i];
    if (s.bets > bets_per_agency_max)
      return common::Error::make(EINVAL, "agency " + std::to_string(s.agency) + ": at most " +
                                             std::to_string(bets_per_agency_max) + " bets (8-digit unique documents)");
    if (!winners.empty())
      s.winners = winners[i];
    else if (a.winners_given)
      s.winners = a.winners;
    else
      s.winners = default_winners(a.seed, s.agency, s.bets);
    if (s.winners > s.bets)
      return common::Error::make(EINVAL, "agency " + std::to_string(s.agency) + ": " + std::to_string(s.winners) +
                                             " winners but only " + std::to_string(s.bets) + " bets");
    specs.push_back(s);
  }
  return specs;
}

int run(int argc, char** argv) {
  Args a;
  CLI::App app{"Writes deterministic lottery agency bet files (agency-<i>.csv) and expected.json.", "lottery-datagen"};
  app.add_option("--agencies", a.agencies, "Number of agencies (default 5)")
      ->check(CLI::Range(uint64_t{1}, agencies_max));
  auto* bets_opt = app.add_option("--bets", a.bets, "Bets per agency (default 1000)");
  app.add_option("--bets-list", a.bets_list, "Bets of each agency, e.g. 100,200,300")->excludes(bets_opt);
  app.add_option("--seed", a.seed, "PRNG seed; the output is a pure function of it (default 1)");
  app.add_option("--winning-number", a.winning_number, "The winning number (default 7574)")
      ->check(CLI::Range(uint64_t{0}, uint64_t{9999}));
  auto* winners_opt =
      app.add_option("--winners", a.winners, "Bets on the winning number per agency (default 0..3 at random)");
  app.add_option("--winners-list", a.winners_list, "Winners of each agency, e.g. 2,3,0")->excludes(winners_opt);
  app.add_option("--out-dir", a.out_dir, "Output directory (default .data)");
  app.add_flag("--crlf", a.crlf, "CRLF line endings (default LF)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? exit_ok : exit_bad_input;
  }
  a.agencies_given = app.count("--agencies") > 0;
  a.winners_given = app.count("--winners") > 0;

  auto specs = plan_agencies(a);
  if (!specs.ok()) {
    std::fprintf(stderr, "lottery-datagen: %s\n", specs.error().message.c_str());
    return exit_bad_input;
  }
  DatasetOptions options;
  options.generator.seed = a.seed;
  options.generator.winning_number = static_cast<uint16_t>(a.winning_number);
  options.generator.crlf = a.crlf;
  options.agencies = std::move(specs.value());
  options.out_dir = a.out_dir;

  auto results = write_dataset(options);
  if (!results.ok()) {
    std::fprintf(stderr, "lottery-datagen: %s\n", results.error().message.c_str());
    return exit_write_failed;
  }
  uint64_t total = 0;
  for (const AgencyResult& r : results.value()) {
    std::printf("agency %u: %llu bets, %llu on %u -> %s/%s\n", unsigned{r.agency},
                static_cast<unsigned long long>(r.bets), static_cast<unsigned long long>(r.winners),
                unsigned{options.generator.winning_number}, a.out_dir.c_str(), agency_file_name(r.agency).c_str());
    total += r.bets;
  }
  std::printf("expected: %s/expected.json (%llu bets, seed %llu)\n", a.out_dir.c_str(),
              static_cast<unsigned long long>(total), static_cast<unsigned long long>(a.seed));
  return exit_ok;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lottery-datagen: %s\n", e.what());
  } catch (...) {
    std::fprintf(stderr, "lottery-datagen: unknown exception\n");
  }
  return exit_bad_input;
}
