#include "lottery/store.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "common/assert.hpp"
#include "common/crc32c.hpp"
#include "lottery/protocol.hpp"
#include "lottery/wire.hpp"

namespace lottery::store {

using common::Error;
using wire::load_le;
using wire::store_le;

namespace {

uint64_t unix_now_ns() {
  struct timespec ts {};
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(ts.tv_nsec);
}

void write_segment_header(std::byte* p, const SegmentHeader& h) {
  std::memset(p, 0, segment_header_bytes);
  std::memcpy(p, segment_magic, sizeof segment_magic);
  store_le<uint16_t>(p + 8, segment_format_version);
  store_le<uint16_t>(p + 10, h.worker_id);
  store_le<uint32_t>(p + 12, static_cast<uint32_t>(segment_header_bytes));
  store_le<uint64_t>(p + 16, h.segment_index);
  store_le<uint64_t>(p + 24, h.capacity_bytes);
  store_le<uint64_t>(p + 32, h.created_unix_ns);
  store_le<uint32_t>(p + 60, common::crc32c(p, 60));
}

const char* read_segment_header(const std::byte* p, size_t size, SegmentHeader& h) {
  if (size < segment_header_bytes) return "file is shorter than a segment header";
  if (std::memcmp(p, segment_magic, sizeof segment_magic) != 0) return "bad segment magic (not a lottery segment)";
  if (load_le<uint32_t>(p + 60) != common::crc32c(p, 60)) return "segment header checksum mismatch";
  if (load_le<uint16_t>(p + 8) != segment_format_version) return "unsupported segment format version";
  if (load_le<uint32_t>(p + 12) != segment_header_bytes) return "unexpected segment header size";
  h.worker_id = load_le<uint16_t>(p + 10);
  h.segment_index = load_le<uint64_t>(p + 16);
  h.capacity_bytes = load_le<uint64_t>(p + 24);
  h.created_unix_ns = load_le<uint64_t>(p + 32);
  return nullptr;
}

uint32_t entry_checksum(const std::byte* entry, size_t payload_bytes) {
  // Covers the whole header after the checksum field, then the payload.
  return common::crc32c(entry + 4, entry_header_bytes - 4 + payload_bytes);
}

bool all_zero(const std::byte* p, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (p[i] != std::byte{0}) return false;
  return true;
}

}  // namespace

const char* durability_name(Durability d) {
  switch (d) {
    case Durability::none: return "none";
    case Durability::group: return "group";
    case Durability::always: return "always";
  }
  return "unknown";
}

bool parse_durability(std::string_view text, Durability& out) {
  if (text == "none") out = Durability::none;
  else if (text == "group") out = Durability::group;
  else if (text == "always") out = Durability::always;
  else return false;
  return true;
}

namespace {
std::string prepared_path(const std::string& final_path) { return final_path + ".next"; }
}  // namespace

std::string segment_file_name(uint16_t worker_id, uint64_t index) {
  char name[64];
  std::snprintf(name, sizeof name, "segment-w%03u-%08llu.lseg", static_cast<unsigned>(worker_id),
                static_cast<unsigned long long>(index));
  return name;
}

namespace {

// Checks the entry at `off`. Returns nullptr and fills `v` (or sets `skip`)
// when it is valid.
const char* check_entry(std::span<const std::byte> file, size_t off, EntryView& v, bool& skip) {
  const std::byte* e = file.data() + off;
  uint32_t crc = load_le<uint32_t>(e);
  uint32_t payload = load_le<uint32_t>(e + 4);
  uint32_t magic = load_le<uint32_t>(e + 8);
  skip = magic == skip_entry_magic;
  if (magic != entry_magic && !skip) return "bad entry magic";
  if (!skip && payload > entry_payload_max) return "entry length over entry_payload_max";
  if (entry_size(payload) > file.size() - off) return "entry runs past the end of the file";
  if (crc != entry_checksum(e, payload)) return "entry checksum mismatch";
  if (skip) return nullptr;
  v.meta.agency = load_le<uint16_t>(e + 12);
  v.meta.bet_count = load_le<uint16_t>(e + 14);
  v.meta.producer_id = load_le<uint64_t>(e + 16);
  v.meta.sequence = load_le<uint64_t>(e + 24);
  v.offset = off;
  v.bets = std::span<const std::byte>(e + entry_header_bytes, payload);
  // Paired check: the checksum vouches for the bytes, this vouches for the
  // writer (the count must match what the bets decode to).
  proto::BetCursor cursor(v.bets);
  proto::Bet bet;
  uint32_t n = 0;
  while (cursor.next(bet)) n++;
  if (n != v.meta.bet_count || !cursor.at_end()) return "entry bets do not decode to its bet count";
  return nullptr;
}

}  // namespace

uint64_t find_next_valid_entry(std::span<const std::byte> file, uint64_t from) {
  from = (from + entry_alignment - 1) & ~(entry_alignment - 1);
  for (uint64_t off = from; off + entry_header_bytes <= file.size(); off += entry_alignment) {
    uint32_t magic = load_le<uint32_t>(file.data() + off + 8);
    if (magic != entry_magic && magic != skip_entry_magic) continue;
    EntryView v;
    bool skip = false;
    if (check_entry(file, off, v, skip) == nullptr) return off;
  }
  return 0;
}

ScanResult scan_bytes(std::span<const std::byte> file, const std::function<void(const EntryView&)>& on_entry) {
  ScanResult r;
  r.file_bytes = file.size();
  if (const char* why = read_segment_header(file.data(), file.size(), r.header)) {
    r.stopped_at_bad_entry = true;
    r.bad_offset = 0;
    r.bad_reason = why;
    return r;
  }
  size_t off = segment_header_bytes;
  r.valid_bytes = off;
  const std::byte* base = file.data();
  while (true) {
    if (file.size() - off < entry_header_bytes) {
      // Too little room for another entry: the end, provided it is clean.
      if (!all_zero(base + off, file.size() - off)) {
        r.stopped_at_bad_entry = true;
        r.bad_offset = off;
        r.bad_reason = "non-zero bytes after the last entry";
      }
      break;
    }
    if (all_zero(base + off, entry_header_bytes)) break;  // free space: end of the log
    EntryView v;
    bool skip = false;
    if (const char* why = check_entry(file, off, v, skip)) {
      r.stopped_at_bad_entry = true;
      r.bad_offset = off;
      r.bad_reason = why;
      if (uint64_t next = find_next_valid_entry(file, off + entry_alignment)) {
        r.valid_entry_after_bad = true;
        r.next_valid_offset = next;
      }
      break;
    }
    size_t size = entry_size(load_le<uint32_t>(base + off + 4));
    if (skip) {
      r.skipped_bytes += size;
    } else {
      if (on_entry) on_entry(v);
      r.entries++;
      r.bets += v.meta.bet_count;
    }
    off += size;
    r.valid_bytes = off;
  }
  return r;
}

namespace {

// An existing file, opened and mapped whole (MAP_SHARED). An empty file is
// not an error here: `map` is then null.
struct MappedFile {
  int fd = -1;
  std::byte* map = nullptr;
  size_t size = 0;
};

common::Result<MappedFile> map_existing(const std::string& path, bool writable) {
  int fd = ::open(path.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) return Error::from_errno(("open " + path).c_str());
  struct stat st {};
  if (::fstat(fd, &st) < 0) {
    Error e = Error::from_errno(("fstat " + path).c_str());
    ::close(fd);
    return e;
  }
  MappedFile m{fd, nullptr, static_cast<size_t>(st.st_size)};
  if (m.size == 0) return m;
  void* map = ::mmap(nullptr, m.size, writable ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED, fd, 0);
  if (map == MAP_FAILED) {
    Error e = Error::from_errno(("mmap " + path).c_str());
    ::close(fd);
    return e;
  }
  m.map = static_cast<std::byte*>(map);
  return m;
}

}  // namespace

common::Result<ScanResult> scan_segment(const std::string& path,
                                        const std::function<void(const EntryView&)>& on_entry) {
  auto m = map_existing(path, false);
  if (!m) return m.error();
  ::close(m->fd);
  if (m->map == nullptr) {
    ScanResult r;
    r.stopped_at_bad_entry = true;
    r.bad_reason = "empty file";
    return r;
  }
  ::madvise(m->map, m->size, MADV_SEQUENTIAL);
  ScanResult r = scan_bytes({m->map, m->size}, on_entry);
  ::munmap(m->map, m->size);
  return r;
}

common::Result<std::vector<std::string>> list_segments(const std::string& dir, int worker) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return Error::from_errno(("opendir " + dir).c_str());
  std::vector<std::string> names;
  while (dirent* ent = ::readdir(d)) {
    unsigned w = 0;
    unsigned long long idx = 0;
    char tail[8] = {};
    if (std::sscanf(ent->d_name, "segment-w%3u-%8llu.%5s", &w, &idx, tail) == 3 && std::strcmp(tail, "lseg") == 0 &&
        std::strlen(ent->d_name) == segment_file_name(0, 0).size()) {
      if (worker < 0 || static_cast<int>(w) == worker) names.push_back(ent->d_name);
    }
  }
  ::closedir(d);
  // Zero-padded names sort by (worker, index).
  std::sort(names.begin(), names.end());
  for (auto& n : names) n = dir + "/" + n;
  return names;
}

// ---------------------------------------------------------------- writer

common::Result<std::unique_ptr<Store>> Store::open(const StoreOptions& options) {
  if (options.segment_bytes < segment_bytes_min)
    return Error::make(EINVAL, "segment size must be at least " + std::to_string(segment_bytes_min) + " bytes");
  if (::mkdir(options.data_dir.c_str(), 0755) < 0 && errno != EEXIST)
    return Error::from_errno(("mkdir " + options.data_dir).c_str());
  std::unique_ptr<Store> s(new Store(options));
  s->_bets_per_agency.assign(size_t{limits::agencies_max} + 1, 0);

  auto segments = list_segments(options.data_dir, options.worker_id);
  if (!segments) return segments.error();
  for (size_t i = 0; i < segments->size(); i++) {
    if (auto st = s->recover_segment((*segments)[i], i + 1 == segments->size()); !st) return st.error();
  }
  if (s->_map == nullptr) {
    if (auto st = s->open_segment(s->_segment_index + 1, true); !st) return st.error();
  }
  // A ".next" file left by a process that died is never part of the log.
  std::string stale = prepared_path(options.data_dir + "/" + segment_file_name(options.worker_id, s->_segment_index + 1));
  ::unlink(stale.c_str());
  s->prepare_next_segment(std::nullopt);
  return s;
}

// Verifies one segment and leaves it clean: a torn tail (the entry being
// written when a process died: never acknowledged) is cut and zeroed; damage
// followed by valid entries refuses the start unless --repair, which covers
// the damaged bytes with a checksummed skip record. The last segment stays
// mapped as the tail of the log.
common::Status Store::recover_segment(const std::string& path, bool last) {
  auto mapped = map_existing(path, true);
  if (!mapped) return mapped.error();
  int fd = mapped->fd;
  size_t size = mapped->size;
  if (mapped->map == nullptr) {
    ::close(fd);
    return Error::make(EIO, path + ": empty file; move it away to start");
  }
  std::byte* base = mapped->map;
  void* map = base;
  std::span<const std::byte> file(base, size);
  ScanResult r;
  uint64_t per_agency[limits::agencies_max + 1] = {};
  for (int pass = 0;; pass++) {
    std::fill(std::begin(per_agency), std::end(per_agency), 0);
    r = scan_bytes(file, [&](const EntryView& v) {
      if (v.meta.agency <= limits::agencies_max) per_agency[v.meta.agency] += v.meta.bet_count;
    });
    if (!r.stopped_at_bad_entry) break;
    auto fail_with = [&](std::string message) {
      ::munmap(map, size);
      ::close(fd);
      return Error::make(EIO, std::move(message));
    };
    if (r.bad_offset == 0) return fail_with(path + ": " + r.bad_reason + "; not a usable segment, move it away to start");
    bool damage_before_valid = r.valid_entry_after_bad || !last;
    if (damage_before_valid && !_options.repair) {
      return fail_with(path + ": damaged entry at offset " + std::to_string(r.bad_offset) + " (" + r.bad_reason +
                       ")" +
                       (r.valid_entry_after_bad ? ", and valid entries follow at offset " +
                                                      std::to_string(r.next_valid_offset)
                                                : ", in a segment that is not the newest") +
                       ": refusing to start. Restore the file from a backup, or start with --repair to skip the "
                       "damaged bytes (they are logged and their bets are lost)");
    }
    if (r.valid_entry_after_bad) {
      // --repair: a skip record over the damage keeps every later entry.
      uint64_t gap = r.next_valid_offset - r.bad_offset;
      if (gap < entry_header_bytes)
        return fail_with(path + ": damaged region at offset " + std::to_string(r.bad_offset) + " is too small to mark");
      std::byte* e = base + r.bad_offset;
      uint32_t payload = static_cast<uint32_t>(gap - entry_header_bytes);
      store_le<uint32_t>(e + 4, payload);
      store_le<uint32_t>(e + 8, skip_entry_magic);
      std::memset(e + 12, 0, entry_header_bytes - 12);
      store_le<uint32_t>(e, entry_checksum(e, payload));
      _recovery.repaired.push_back("file: " + path + " / offset: " + std::to_string(r.bad_offset) +
                                   " / bytes: " + std::to_string(gap) + " / reason: " + r.bad_reason);
      if (pass > 10000) return fail_with(path + ": too many damaged regions");
      continue;
    }
    // A torn tail: zero from the bad entry to the last non-zero byte.
    size_t end = size;
    while (end > r.bad_offset && base[end - 1] == std::byte{0}) end--;
    std::memset(base + r.bad_offset, 0, end - r.bad_offset);
    _recovery.dropped.push_back("file: " + path + " / offset: " + std::to_string(r.bad_offset) +
                                " / bytes: " + std::to_string(end - r.bad_offset) + " / reason: " + r.bad_reason);
  }
  _recovery.segments++;
  _recovery.entries += r.entries;
  _recovery.bets += r.bets;
  _total_entries += r.entries;
  _total_bets += r.bets;
  for (size_t a = 0; a <= limits::agencies_max; a++) _bets_per_agency[a] += per_agency[a];
  _segment_index = r.header.segment_index;
  if (!last) {
    ::msync(map, size, MS_SYNC);
    ::munmap(map, size);
    ::close(fd);
    return common::ok_status();
  }
  if (::msync(map, size, MS_SYNC) < 0) return Error::from_errno(("msync " + path).c_str());
  _fd = fd;
  _map = base;
  _capacity = size;
  _path = path;
  _tail = r.valid_bytes;
  _synced = _tail;
  return common::ok_status();
}

common::Result<Store::Mapping> Store::map_segment(uint64_t index, bool create) {
  std::string path = _options.data_dir + "/" + segment_file_name(_options.worker_id, index);
  int flags = O_RDWR | O_CLOEXEC | (create ? O_CREAT | O_EXCL : 0);
  int fd = ::open(path.c_str(), flags, 0644);
  if (fd < 0) return Error::from_errno(("open " + path).c_str());
  size_t capacity;
  if (create) {
    capacity = _options.segment_bytes;
    // Real blocks, not a sparse file: a full disk is an error here, never a
    // SIGBUS later when a page of the mapping is first written.
    int rc = ::posix_fallocate(fd, 0, static_cast<off_t>(capacity));
    if (rc != 0) {
      ::close(fd);
      ::unlink(path.c_str());
      return Error::from_errno(("posix_fallocate " + path + " (is the disk full?)").c_str(), rc);
    }
  } else {
    struct stat st {};
    if (::fstat(fd, &st) < 0) {
      Error e = Error::from_errno(("fstat " + path).c_str());
      ::close(fd);
      return e;
    }
    capacity = static_cast<size_t>(st.st_size);
  }
  void* map = ::mmap(nullptr, capacity, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (map == MAP_FAILED) {
    Error e = Error::from_errno(("mmap " + path).c_str());
    ::close(fd);
    if (create) ::unlink(path.c_str());
    return e;
  }
  if (create) {
    SegmentHeader h{_options.worker_id, index, capacity, unix_now_ns()};
    write_segment_header(static_cast<std::byte*>(map), h);
    // The header, and the new file's name, must be durable before any entry
    // in the file is acknowledged as durable.
    ::msync(map, segment_header_bytes, MS_SYNC);
    int dfd = ::open(_options.data_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      ::fsync(dfd);
      ::close(dfd);
    }
  }
  return Mapping{fd, static_cast<std::byte*>(map), capacity, path};
}

namespace {

// A segment the writer has left behind is written back and its pages are
// dropped from the page cache (as PostgreSQL does with finished WAL files),
// so the populate of the next segment reuses them. Fresh pages are far
// dearer: on the 2-vCPU VM of docs/PERFORMANCE.md, MADV_POPULATE_WRITE of a
// 64 MiB segment took 190-300 ms with pages the guest had never used (each
// one a fault on the host) and 25 ms with recycled ones, and with fresh
// pages the helper could not keep up with the loop. Runs on a helper thread.
// The cost: the draw (once) and lotteryctl read old segments from the disk.
void drop_from_page_cache(int fd) {
  ::fdatasync(fd);  // DONTNEED drops clean pages only
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
}

// Creates a segment file at `path`: allocated, mapped, header written, pages
// prefaulted. Runs on the preparing thread: it touches nothing of the Store.
common::Result<Store::Mapping> create_prepared(const std::string& path, uint16_t worker_id, uint64_t index,
                                               size_t capacity) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Error::from_errno(("open " + path).c_str());
  if (int rc = ::posix_fallocate(fd, 0, static_cast<off_t>(capacity)); rc != 0) {
    ::close(fd);
    ::unlink(path.c_str());
    return Error::from_errno(("posix_fallocate " + path + " (is the disk full?)").c_str(), rc);
  }
  void* map = ::mmap(nullptr, capacity, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (map == MAP_FAILED) {
    Error e = Error::from_errno(("mmap " + path).c_str());
    ::close(fd);
    ::unlink(path.c_str());
    return e;
  }
  write_segment_header(static_cast<std::byte*>(map), SegmentHeader{worker_id, index, capacity, unix_now_ns()});
  ::msync(map, segment_header_bytes, MS_SYNC);
  // MADV_POPULATE_WRITE (Linux 5.14) faults every page in now, on this
  // thread. An older kernel says EINVAL: the loop then takes the faults.
  ::madvise(map, capacity, MADV_POPULATE_WRITE);
  return Store::Mapping{fd, static_cast<std::byte*>(map), capacity, path};
}

}  // namespace

void Store::prepare_next_segment(std::optional<Mapping> release) {
  LOTTERY_ASSERT(!_next.valid());
  _next_index = _segment_index + 1;
  std::string path = prepared_path(_options.data_dir + "/" + segment_file_name(_options.worker_id, _next_index));
  uint16_t worker = _options.worker_id;
  uint64_t index = _next_index;
  size_t capacity = _options.segment_bytes;
  _next = std::async(std::launch::async, [release, path, worker, index, capacity]() {
    if (release) {
      ::munmap(release->map, release->capacity);
      drop_from_page_cache(release->fd);
      ::close(release->fd);
    }
    return create_prepared(path, worker, index, capacity);
  });
}

common::Result<Store::Mapping> Store::take_prepared_segment() {
  if (!_next.valid()) return Error::make(ENOENT, "no prepared segment");
  auto prepared = _next.get();  // waits if the thread is still at it
  if (!prepared) return prepared.error();
  if (_next_index != _segment_index + 1) {
    discard(*prepared);
    return Error::make(ENOENT, "the prepared segment is not the next one");
  }
  std::string final_path = _options.data_dir + "/" + segment_file_name(_options.worker_id, _next_index);
  if (::rename(prepared->path.c_str(), final_path.c_str()) < 0) {
    Error e = Error::from_errno(("rename " + prepared->path).c_str());
    discard(*prepared);
    return e;
  }
  prepared->path = final_path;
  // The new name must survive a crash before anything in the file is
  // acknowledged as durable.
  if (_options.durability != Durability::none) {
    int dfd = ::open(_options.data_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      ::fsync(dfd);
      ::close(dfd);
    }
  }
  return prepared;
}

void Store::discard(const Mapping& m) {
  ::munmap(m.map, m.capacity);
  ::close(m.fd);
  ::unlink(m.path.c_str());
}

void Store::discard_prepared_segment() {
  if (!_next.valid()) return;
  auto prepared = _next.get();
  if (prepared) discard(*prepared);
}

common::Status Store::open_segment(uint64_t index, bool create) {
  LOTTERY_ASSERT(_map == nullptr);
  auto m = map_segment(index, create);
  if (!m) return m.error();
  _fd = m->fd;
  _map = m->map;
  _capacity = m->capacity;
  _segment_index = index;
  _path = m->path;
  _tail = segment_header_bytes;
  _synced = _tail;
  return common::ok_status();
}

common::Status Store::unmap_current() {
  if (_map == nullptr) return common::ok_status();
  common::Status result = common::ok_status();
  if (::msync(_map, _capacity, MS_SYNC) < 0) result = Error::from_errno(("msync " + _path).c_str());
  ::munmap(_map, _capacity);
  ::close(_fd);
  _map = nullptr;
  _fd = -1;
  return result;
}

common::Result<std::byte*> Store::reserve(size_t payload_bytes) {
  LOTTERY_ASSERT(!_reserved_active);
  LOTTERY_ASSERT(_map != nullptr);
  if (payload_bytes > entry_payload_max) return Error::make(EMSGSIZE, "entry larger than entry_payload_max");
  if (entry_size(payload_bytes) > _capacity - _tail) {
    // Roll over. The next segment is allocated first: when the disk is full
    // this fails (ENOSPC) and the current segment stays as it was, so a later
    // batch can try again once space returns. The old segment's free tail
    // stays zeroed, which readers take as its end.
    auto next = take_prepared_segment();
    if (!next) next = map_segment(_segment_index + 1, true);  // none prepared, or preparing failed
    if (!next) return next.error();
    Mapping old{_fd, _map, _capacity, _path};
    std::optional<Mapping> release;
    if (_options.durability != Durability::none && (_synced != _tail || _job_active)) {
      // Synced by the next sync, before its batches are acknowledged. A
      // SyncJob still running may be syncing this very mapping, so it must
      // not be unmapped under it either.
      _retired.push_back(old);
    } else {
      release = old;
    }
    _fd = next->fd;
    _map = next->map;
    _capacity = next->capacity;
    _path = next->path;
    _segment_index++;
    _tail = segment_header_bytes;
    _synced = _tail;
    prepare_next_segment(release);
  }
  _reserved = payload_bytes;
  _reserved_active = true;
  return _map + _tail + entry_header_bytes;
}

void Store::commit(const EntryMeta& meta, size_t payload_bytes) {
  LOTTERY_ASSERT(_reserved_active);
  LOTTERY_ASSERT(payload_bytes == _reserved);
  std::byte* e = _map + _tail;
  store_le<uint32_t>(e + 4, static_cast<uint32_t>(payload_bytes));
  store_le<uint32_t>(e + 8, entry_magic);
  store_le<uint16_t>(e + 12, meta.agency);
  store_le<uint16_t>(e + 14, meta.bet_count);
  store_le<uint64_t>(e + 16, meta.producer_id);
  store_le<uint64_t>(e + 24, meta.sequence);
  store_le<uint64_t>(e + 32, 0);
  size_t size = entry_size(payload_bytes);
  std::memset(e + entry_header_bytes + payload_bytes, 0, size - entry_header_bytes - payload_bytes);
  // The checksum is written last: until it is there, a reader sees a bad entry
  // (a torn tail), never a wrong one.
  store_le<uint32_t>(e, entry_checksum(e, payload_bytes));
  _tail += size;
  _reserved_active = false;
  _total_entries++;
  _total_bets += meta.bet_count;
  _bets_per_agency[meta.agency] += meta.bet_count;
}

void Store::abandon(size_t payload_bytes) {
  LOTTERY_ASSERT(_reserved_active);
  LOTTERY_ASSERT(payload_bytes <= _reserved);
  std::memset(_map + _tail, 0, entry_header_bytes + _reserved);
  _reserved_active = false;
}

common::Status Store::sync() {
  LOTTERY_ASSERT(!_job_active);
  SyncJob job;
  if (!begin_sync(job)) return common::ok_status();
  common::Status st = job.run();
  end_sync(job, st);
  return st;
}

bool Store::begin_sync(SyncJob& job) {
  LOTTERY_ASSERT(!_job_active);
  LOTTERY_ASSERT(job.retired.empty());
  if (!dirty()) return false;
  // A swap, not a copy: the job's empty vector (its capacity kept from the
  // last job) comes back, so a steady state allocates nothing.
  job.retired.swap(_retired);
  job.map = nullptr;
  job.from = job.to = 0;
  job.worker_id = _options.worker_id;
  job.segment_index = _segment_index;
  if (_map != nullptr && _synced != _tail) {
    // msync wants a page-aligned start.
    size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    job.map = _map;
    job.from = _synced / page * page;
    job.to = _tail;
    _synced = _tail;
  }
  _job_active = true;
  return true;
}

common::Status Store::SyncJob::run() {
  for (Mapping& m : retired) {
    if (m.map == nullptr) continue;  // unmapped by an earlier, failed attempt
    if (::msync(m.map, m.capacity, MS_SYNC) < 0) return Error::from_errno(("msync " + m.path).c_str());
    ::munmap(m.map, m.capacity);
    ::posix_fadvise(m.fd, 0, 0, POSIX_FADV_DONTNEED);  // clean now: see drop_from_page_cache
    ::close(m.fd);
    m.map = nullptr;
    m.fd = -1;
  }
  if (map != nullptr && ::msync(map + from, to - from, MS_SYNC) < 0)
    return Error::from_errno(("msync " + segment_file_name(worker_id, segment_index)).c_str());
  return common::ok_status();
}

void Store::end_sync(SyncJob& job, const common::Status& result) {
  LOTTERY_ASSERT(_job_active);
  _job_active = false;
  if (!result) {
    // Not durable: the next sync tries these bytes again.
    for (Mapping& m : job.retired)
      if (m.map != nullptr) _retired.push_back(std::move(m));
    if (job.map != nullptr && job.map == _map) _synced = std::min(_synced, job.from);
    job.retired.clear();
    return;
  }
  job.retired.clear();
  _sync_count++;
  if (_sync_hook) _sync_hook(_sync_hook_arg);
}

common::Status Store::close() {
  LOTTERY_ASSERT(!_reserved_active);
  LOTTERY_ASSERT(!_job_active);
  discard_prepared_segment();
  // A graceful stop makes everything durable, whatever the policy.
  common::Status st = sync();
  if (st && _map != nullptr && ::fdatasync(_fd) < 0) st = Error::from_errno(("fdatasync " + _path).c_str());
  if (auto u = unmap_current(); !u && st) st = u;
  return st;
}

Store::~Store() {
  LOTTERY_ASSERT(!_job_active);
  discard_prepared_segment();
  for (Mapping& m : _retired) {
    ::munmap(m.map, m.capacity);
    ::close(m.fd);
  }
  (void)unmap_current();
}

uint64_t Store::bets_stored(uint16_t agency) const {
  return agency < _bets_per_agency.size() ? _bets_per_agency[agency] : 0;
}

}  // namespace lottery::store
