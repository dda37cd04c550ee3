// The draw: one scan of every stored bet, of every worker, collecting the
// documents of the bets on the winning number, per agency.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/result.hpp"

namespace lottery {

struct DrawResult {
  uint16_t winning_number = 0;
  // winners[agency] holds the documents of that agency's winning bets, in
  // store order. Index 0 is unused.
  std::vector<std::vector<std::string>> winners;
  std::vector<uint64_t> bets_per_agency;  // index = agency
  uint64_t bets_scanned = 0;
  uint64_t entries_scanned = 0;
  uint64_t bytes_scanned = 0;
  uint64_t segments_scanned = 0;
  // Entries whose (agency, producer, seq) was already seen: counted once.
  uint64_t duplicates_skipped = 0;

  uint64_t total_winners() const {
    uint64_t n = 0;
    for (const auto& w : winners) n += w.size();
    return n;
  }
};

common::Result<DrawResult> run_draw(const std::string& data_dir, uint16_t winning_number, uint16_t agencies);

}  // namespace lottery
