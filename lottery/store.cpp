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

std::string segment_file_name(uint16_t worker_id, uint64_t index) {
  char name[64];
  std::snprintf(name, sizeof name, "segment-w%03u-%08llu.lseg", static_cast<unsigned>(worker_id),
                static_cast<unsigned long long>(index));
  return name;
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
    const std::byte* e = base + off;
    if (all_zero(e, entry_header_bytes)) break;  // free space: end of the log
    uint32_t crc = load_le<uint32_t>(e);
    uint32_t payload = load_le<uint32_t>(e + 4);
    const char* why = nullptr;
    if (load_le<uint32_t>(e + 8) != entry_magic) {
      why = "bad entry magic";
    } else if (payload > entry_payload_max) {
      why = "entry length over entry_payload_max";
    } else if (entry_size(payload) > file.size() - off) {
      why = "entry runs past the end of the file";
    } else if (crc != entry_checksum(e, payload)) {
      why = "entry checksum mismatch";
    }
    EntryView v;
    if (why == nullptr) {
      v.meta.agency = load_le<uint16_t>(e + 12);
      v.meta.bet_count = load_le<uint16_t>(e + 14);
      v.meta.producer_id = load_le<uint64_t>(e + 16);
      v.meta.sequence = load_le<uint64_t>(e + 24);
      v.offset = off;
      v.bets = std::span<const std::byte>(e + entry_header_bytes, payload);
      // Paired check: the checksum vouches for the bytes, this vouches for
      // the writer (the count must match what the bets decode to).
      proto::BetCursor cursor(v.bets);
      proto::Bet bet;
      uint32_t n = 0;
      while (cursor.next(bet)) n++;
      if (n != v.meta.bet_count || !cursor.at_end()) why = "entry bets do not decode to its bet count";
    }
    if (why != nullptr) {
      r.stopped_at_bad_entry = true;
      r.bad_offset = off;
      r.bad_reason = why;
      break;
    }
    if (on_entry) on_entry(v);
    r.entries++;
    r.bets += v.meta.bet_count;
    off += entry_size(payload);
    r.valid_bytes = off;
  }
  if (r.valid_bytes == 0) r.valid_bytes = segment_header_bytes;
  return r;
}

common::Result<ScanResult> scan_segment(const std::string& path,
                                        const std::function<void(const EntryView&)>& on_entry) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Error::from_errno(("open " + path).c_str());
  struct stat st {};
  if (::fstat(fd, &st) < 0) {
    Error e = Error::from_errno(("fstat " + path).c_str());
    ::close(fd);
    return e;
  }
  size_t size = static_cast<size_t>(st.st_size);
  if (size == 0) {
    ::close(fd);
    ScanResult r;
    r.stopped_at_bad_entry = true;
    r.bad_reason = "empty file";
    return r;
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) return Error::from_errno(("mmap " + path).c_str());
  ::madvise(map, size, MADV_SEQUENTIAL);
  ScanResult r = scan_bytes({static_cast<const std::byte*>(map), size}, on_entry);
  ::munmap(map, size);
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
  if (segments->empty()) {
    if (auto st = s->open_segment(1, true); !st) return st.error();
    return s;
  }
  // Recover every segment of this worker; the last one becomes the tail.
  for (size_t i = 0; i < segments->size(); i++) {
    const std::string& path = (*segments)[i];
    auto scanned = scan_segment(path, [&](const EntryView& v) {
      if (v.meta.agency < s->_bets_per_agency.size()) s->_bets_per_agency[v.meta.agency] += v.meta.bet_count;
    });
    if (!scanned) return scanned.error();
    if (scanned->bad_offset == 0 && scanned->stopped_at_bad_entry)
      return Error::make(EIO, path + ": " + scanned->bad_reason + "; move the file away to start");
    s->_recovery.segments++;
    s->_recovery.entries += scanned->entries;
    s->_recovery.bets += scanned->bets;
    s->_total_entries += scanned->entries;
    s->_total_bets += scanned->bets;
    bool last = i + 1 == segments->size();
    if (!last && !scanned->stopped_at_bad_entry) continue;
    if (auto st = s->open_segment(scanned->header.segment_index, false); !st) return st.error();
    s->_tail = scanned->valid_bytes;
    if (scanned->stopped_at_bad_entry) {
      // A torn tail: the entry being written when the process died. It was
      // never acknowledged. Zero it so nothing can resurrect it.
      size_t end = std::min(s->_capacity, s->_tail + entry_bytes_max);
      s->_recovery.dropped.push_back("file: " + path + " | offset: " + std::to_string(s->_tail) +
                                     " | bytes: " + std::to_string(end - s->_tail) +
                                     " | reason: " + scanned->bad_reason);
      std::memset(s->_map + s->_tail, 0, end - s->_tail);
      if (!last) {
        // Corruption before the last segment: later segments still hold
        // acknowledged bets; keep them and append after the newest.
        if (auto st = s->unmap_current(); !st) return st.error();
        continue;
      }
    }
    if (!last) {
      if (auto st = s->unmap_current(); !st) return st.error();
    }
  }
  if (s->_map == nullptr) {
    auto st = s->open_segment(s->_segment_index + 1, true);
    if (!st) return st.error();
  }
  return s;
}

common::Status Store::open_segment(uint64_t index, bool create) {
  LOTTERY_ASSERT(_map == nullptr);
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
    return e;
  }
  _fd = fd;
  _map = static_cast<std::byte*>(map);
  _capacity = capacity;
  _segment_index = index;
  _path = path;
  if (create) {
    SegmentHeader h{_options.worker_id, index, capacity, unix_now_ns()};
    write_segment_header(_map, h);
    _tail = segment_header_bytes;
    // The new file's name must survive a crash too.
    int dfd = ::open(_options.data_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      ::fsync(dfd);
      ::close(dfd);
    }
  }
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
    // Roll over. The old segment's free tail stays zeroed, which readers take
    // as its end.
    uint64_t next = _segment_index + 1;
    if (auto st = unmap_current(); !st) return st.error();
    if (auto st = open_segment(next, true); !st) return st.error();
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
  if (_map == nullptr) return common::ok_status();
  if (::msync(_map, _tail, MS_SYNC) < 0) return Error::from_errno(("msync " + _path).c_str());
  if (::fdatasync(_fd) < 0) return Error::from_errno(("fdatasync " + _path).c_str());
  return common::ok_status();
}

common::Status Store::close() {
  LOTTERY_ASSERT(!_reserved_active);
  common::Status st = sync();
  if (auto u = unmap_current(); !u && st) st = u;
  return st;
}

Store::~Store() { (void)unmap_current(); }

uint64_t Store::bets_stored(uint16_t agency) const {
  return agency < _bets_per_agency.size() ? _bets_per_agency[agency] : 0;
}

}  // namespace lottery::store
