// The bet store: append-only segment files, memory-mapped. docs/STORAGE.md is
// the contract for the on-disk layout.
//
// A batch is written straight into the mapping: the caller reserves room for
// the batch's bets, copies the wire bytes there, validates them in place, and
// then either commits (the entry header and its checksum are written last) or
// abandons (the bytes are zeroed, nothing is stored). A reader accepts an
// entry only if its checksum covers it, so a half-written entry is never seen.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/result.hpp"
#include "lottery/limits.hpp"

namespace lottery::store {

inline constexpr char segment_magic[8] = {'L', 'O', 'T', 'S', 'E', 'G', '\0', '\1'};
inline constexpr uint16_t segment_format_version = 1;
inline constexpr size_t segment_header_bytes = 64;
inline constexpr uint32_t entry_magic = 0x31544542;  // "BET1" in little-endian bytes
// A checksummed record that covers bytes --repair found damaged: readers skip it.
inline constexpr uint32_t skip_entry_magic = 0x31504B53;  // "SKP1"
inline constexpr size_t entry_header_bytes = 40;
inline constexpr size_t entry_alignment = 8;
inline constexpr size_t entry_payload_max = limits::frame_bytes_max;
inline constexpr size_t entry_bytes_max = entry_header_bytes + entry_payload_max + entry_alignment;
inline constexpr size_t segment_bytes_default = 64ull * 1024 * 1024;
inline constexpr size_t segment_bytes_min = 1024 * 1024;
static_assert(segment_bytes_min >= segment_header_bytes + entry_bytes_max, "a segment must hold the largest entry");

inline size_t entry_size(size_t payload_bytes) {
  return (entry_header_bytes + payload_bytes + entry_alignment - 1) & ~(entry_alignment - 1);
}

// An entry's identity and contents, as committed and as scanned back.
struct EntryMeta {
  uint16_t agency = 0;
  uint16_t bet_count = 0;
  uint64_t producer_id = 0;
  uint64_t sequence = 0;
};

struct EntryView {
  EntryMeta meta;
  uint64_t offset = 0;               // of the entry in its segment
  std::span<const std::byte> bets;  // the encoded bets (wire format)
};

struct SegmentHeader {
  uint16_t worker_id = 0;
  uint64_t segment_index = 0;
  uint64_t capacity_bytes = 0;
  uint64_t created_unix_ns = 0;
};

// Result of scanning one segment.
struct ScanResult {
  SegmentHeader header;
  uint64_t entries = 0;
  uint64_t bets = 0;
  uint64_t skipped_bytes = 0;  // covered by skip records (--repair)
  uint64_t valid_bytes = 0;  // end of the last valid entry
  uint64_t file_bytes = 0;
  // Set when scanning stopped at bytes that are neither a valid entry nor the
  // zeroed free space: a torn tail (or corruption). Offset of the first bad byte.
  bool stopped_at_bad_entry = false;
  uint64_t bad_offset = 0;
  std::string bad_reason;
  // When scanning stopped at a bad entry: offset of the next valid entry after
  // it, if any. Set means corruption in the middle of the log (not a torn
  // tail): acknowledged entries follow the damage.
  bool valid_entry_after_bad = false;
  uint64_t next_valid_offset = 0;
};

// Finds the first offset >= from (8-aligned) holding a valid entry, or 0.
uint64_t find_next_valid_entry(std::span<const std::byte> file, uint64_t from);

// Scans a segment file, calling `on_entry` for every valid entry in order.
// The file is mapped read-only for the duration of the call.
common::Result<ScanResult> scan_segment(const std::string& path,
                                        const std::function<void(const EntryView&)>& on_entry);
// Same, over bytes already in memory (used by the writer's recovery and by tests).
ScanResult scan_bytes(std::span<const std::byte> file, const std::function<void(const EntryView&)>& on_entry);

// Segment files in `dir`, sorted by (worker, index). worker < 0: every worker.
common::Result<std::vector<std::string>> list_segments(const std::string& dir, int worker);
std::string segment_file_name(uint16_t worker_id, uint64_t index);

// When an acknowledged batch is on disk. docs/STORAGE.md says what each survives.
enum class Durability : uint8_t {
  none,    // in the page cache: survives the process, not the kernel or the power
  group,   // synced in groups (one msync per window) before the group is acknowledged
  always,  // synced before each acknowledgement
};
const char* durability_name(Durability d);
bool parse_durability(std::string_view text, Durability& out);

struct StoreOptions {
  std::string data_dir = "./data";
  uint16_t worker_id = 0;
  size_t segment_bytes = segment_bytes_default;
  // Skip damaged bytes in the middle of a segment (logged) instead of refusing to start.
  bool repair = false;
  Durability durability = Durability::none;
};

struct RecoveryReport {
  uint64_t segments = 0;
  uint64_t entries = 0;
  uint64_t bets = 0;
  // One line per torn tail that was cut off: file, offset, bytes.
  std::vector<std::string> dropped;
  // One line per damaged region that --repair covered with a skip record.
  std::vector<std::string> repaired;
};

// The writer for one worker's segments. Not thread-safe: one per worker.
class Store {
 public:
  struct Mapping {
    int fd = -1;
    std::byte* map = nullptr;
    size_t capacity = 0;
    std::string path;
  };

  // Opens (creating if needed) the data directory, recovers this worker's
  // segments and positions the tail after the last valid entry.
  static common::Result<std::unique_ptr<Store>> open(const StoreOptions& options);
  ~Store();
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  // Room for `payload_bytes` of bets in the mapping, rolling to a new segment
  // when the current one is full. The pointer is valid until commit/abandon.
  common::Result<std::byte*> reserve(size_t payload_bytes);
  // Makes the reserved entry durable in the page cache and visible to readers.
  void commit(const EntryMeta& meta, size_t payload_bytes);
  // Forgets the reserved entry: its bytes are zeroed so no reader, and no
  // later recovery, can mistake them for an entry.
  void abandon(size_t payload_bytes);

  // Makes everything appended so far durable: msync(MS_SYNC) of the bytes
  // written since the last sync (on Linux that is vfs_fsync_range, the data
  // part of fdatasync). A no-op when nothing is dirty. Not while a SyncJob
  // is out.
  common::Status sync();
  // Appended bytes not yet handed to a sync (by sync() or begin_sync()).
  bool dirty() const { return _synced != _tail || !_retired.empty(); }

  // A sync in two halves, so that it can run on another thread while the
  // event loop goes on appending: begin_sync() (loop thread) captures what is
  // appended so far, SyncJob::run() (any thread, touching nothing of the
  // Store) makes it durable, end_sync() (loop thread) takes the result. One
  // job at a time; bytes appended after begin_sync() belong to the next one.
  struct SyncJob {
    common::Status run();
    // Segments left behind by a roll-over: synced whole, then unmapped.
    std::vector<Mapping> retired;
    // [from, to) of the current segment's mapping, `from` page-aligned.
    std::byte* map = nullptr;
    size_t from = 0;
    size_t to = 0;
    uint16_t worker_id = 0;
    uint64_t segment_index = 0;  // names the file in an error message
  };
  // False (and `job` untouched) when nothing is dirty.
  bool begin_sync(SyncJob& job);
  void end_sync(SyncJob& job, const common::Status& result);
  bool sync_in_flight() const { return _job_active; }
  uint64_t sync_count() const { return _sync_count; }
  // Tests count syncs through this hook (called once per real sync).
  void set_sync_hook(void (*hook)(void*), void* arg) {
    _sync_hook = hook;
    _sync_hook_arg = arg;
  }
  common::Status close();

  const RecoveryReport& recovery() const { return _recovery; }
  uint64_t bets_stored(uint16_t agency) const;
  uint64_t total_bets() const { return _total_bets; }
  uint64_t total_entries() const { return _total_entries; }
  const std::string& current_segment_path() const { return _path; }

 private:
  explicit Store(StoreOptions options) : _options(std::move(options)) {}

  common::Result<Mapping> map_segment(uint64_t index, bool create);
  // The next segment is created, allocated and prefaulted by a helper thread
  // while the current one fills, so the event loop neither waits for
  // posix_fallocate nor takes a page fault per 4 KiB of new segment. The
  // thread also unmaps the segment just left (munmap of a large dirty mapping
  // is slow too). It writes to a ".next" file that the roll-over renames.
  void prepare_next_segment(std::optional<Mapping> release);
  common::Result<Mapping> take_prepared_segment();
  void discard_prepared_segment();
  static void discard(const Mapping& m);
  common::Status open_segment(uint64_t index, bool create);
  common::Status unmap_current();
  common::Status recover_segment(const std::string& path, bool last);

  StoreOptions _options;
  int _fd = -1;
  std::byte* _map = nullptr;
  size_t _capacity = 0;
  size_t _tail = 0;
  uint64_t _segment_index = 0;
  std::string _path;
  size_t _reserved = 0;  // payload bytes reserved, 0 when none
  bool _reserved_active = false;
  size_t _synced = 0;  // bytes of the current segment handed to a sync (done, or in a SyncJob)
  bool _job_active = false;  // a SyncJob is out (begin_sync without its end_sync)
  // Segments rolled over before their last bytes were synced, or while a
  // SyncJob may still be syncing them: kept mapped until the next sync
  // (durable modes only).
  std::vector<Mapping> _retired;
  std::future<common::Result<Mapping>> _next;  // valid while a next segment is being (or was) prepared
  uint64_t _next_index = 0;
  uint64_t _sync_count = 0;
  void (*_sync_hook)(void*) = nullptr;
  void* _sync_hook_arg = nullptr;
  uint64_t _total_bets = 0;
  uint64_t _total_entries = 0;
  std::vector<uint64_t> _bets_per_agency;
  RecoveryReport _recovery;
};

}  // namespace lottery::store
