#include "lottery/draw.hpp"

#include <tuple>
#include <unordered_set>

#include "common/assert.hpp"
#include "lottery/limits.hpp"
#include "lottery/protocol.hpp"
#include "lottery/store.hpp"

namespace lottery {

common::Result<DrawResult> run_draw(const std::string& data_dir, uint16_t winning_number, uint16_t agencies) {
  LOTTERY_ASSERT(winning_number <= limits::bet_number_max);
  DrawResult result;
  result.winning_number = winning_number;
  result.winners.resize(size_t{agencies} + 1);
  result.bets_per_agency.assign(size_t{agencies} + 1, 0);
  auto segments = store::list_segments(data_dir, -1);
  if (!segments) return segments.error();
  // Defence in depth: the exactly-once protocol keeps duplicates out of the
  // store, and the draw would not count one twice anyway.
  struct IdHash {
    size_t operator()(const std::tuple<uint16_t, uint64_t, uint64_t>& t) const {
      return std::hash<uint64_t>()(std::get<1>(t) * 1000003u ^ std::get<2>(t) * 31u ^ std::get<0>(t));
    }
  };
  std::unordered_set<std::tuple<uint16_t, uint64_t, uint64_t>, IdHash> seen;
  for (const std::string& path : *segments) {
    auto scanned = store::scan_segment(path, [&](const store::EntryView& e) {
      if (!seen.emplace(e.meta.agency, e.meta.producer_id, e.meta.sequence).second) {
        result.duplicates_skipped++;
        return;
      }
      // The scanner verified the checksum and the bet count, so the bets are
      // walked with the unchecked fast path: number, then skip.
      const std::byte* p = e.bets.data();
      const std::byte* end = p + e.bets.size();
      bool known = e.meta.agency >= 1 && e.meta.agency <= agencies;
      while (p < end) {
        size_t size = proto::bet_size_at(p);
        if (proto::bet_number_at(p) == winning_number && known) {
          size_t doc_len = std::to_integer<size_t>(p[6]);
          result.winners[e.meta.agency].emplace_back(reinterpret_cast<const char*>(p + limits::bet_fixed_bytes),
                                                     doc_len);
        }
        p += size;
      }
      LOTTERY_ASSERT(p == end);
      result.bets_scanned += e.meta.bet_count;
      if (known) result.bets_per_agency[e.meta.agency] += e.meta.bet_count;
      result.entries_scanned++;
      result.bytes_scanned += e.bets.size();
    });
    if (!scanned) return scanned.error();
    result.segments_scanned++;
  }
  return result;
}

}  // namespace lottery
