// libFuzzer target: the segment reader, the first code to read bytes from
// disk. The input is what follows a valid segment header; the reader must
// only ever report entries or a bad entry, never crash or read out of bounds.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/crc32c.hpp"
#include "lottery/store.hpp"
#include "lottery/wire.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace lottery;
  std::vector<std::byte> file(store::segment_header_bytes + size);
  std::byte* h = file.data();
  std::memcpy(h, store::segment_magic, sizeof store::segment_magic);
  wire::store_le<uint16_t>(h + 8, store::segment_format_version);
  wire::store_le<uint32_t>(h + 12, static_cast<uint32_t>(store::segment_header_bytes));
  wire::store_le<uint64_t>(h + 24, file.size());
  wire::store_le<uint32_t>(h + 60, common::crc32c(h, 60));
  if (size > 0) std::memcpy(h + store::segment_header_bytes, data, size);
  uint64_t bets = 0;
  auto r = store::scan_bytes(file, [&](const store::EntryView& e) {
    // Entries handed out must be inside the file and decode fully.
    if (e.bets.data() < file.data() || e.bets.data() + e.bets.size() > file.data() + file.size()) __builtin_trap();
    bets += e.meta.bet_count;
  });
  if (r.bets != bets || r.valid_bytes > file.size()) __builtin_trap();
  (void)store::find_next_valid_entry(file, store::segment_header_bytes);
  return 0;
}
