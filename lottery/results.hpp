// The results file, <data-dir>/results.lres: the outcome of the draw, written
// once, atomically (write a temporary file, fsync, rename, fsync the
// directory), and read by every worker and by lotteryctl. docs/STORAGE.md is
// the contract.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/result.hpp"

namespace lottery {

inline constexpr const char* results_file_name = "results.lres";
inline constexpr char results_magic[8] = {'L', 'O', 'T', 'R', 'E', 'S', '\0', '\1'};
inline constexpr uint32_t results_format_version = 1;
inline constexpr size_t results_header_bytes = 64;

struct AgencyResult {
  bool closed_out = false;  // did not finish before the betting closed: not in the draw
  uint64_t bets = 0;        // bets of the agency that took part in the draw
  std::vector<std::string> winners;
};

struct Results {
  uint16_t winning_number = 0;
  uint64_t draw_unix_ms = 0;
  uint64_t bets_scanned = 0;
  std::vector<AgencyResult> agencies;  // index = agency id; [0] unused

  uint64_t total_winners() const {
    uint64_t n = 0;
    for (const auto& a : agencies) n += a.winners.size();
    return n;
  }
};

common::Status write_results(const std::string& data_dir, const Results& results);
common::Result<Results> read_results(const std::string& data_dir);

}  // namespace lottery
