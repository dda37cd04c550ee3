#include "lottery/control.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cstring>
#include <new>
#include <thread>

#include "common/assert.hpp"
#include "common/crc32c.hpp"
#include "common/log.hpp"
#include "lottery/draw.hpp"
#include "lottery/results.hpp"
#include "lottery/store.hpp"

#include <tuple>
#include <unordered_set>

namespace lottery::control {

using common::Error;

struct EntryIdHash {
  size_t operator()(const std::tuple<uint32_t, uint64_t, uint64_t>& t) const {
    return std::hash<uint64_t>()(std::get<1>(t) * 31 + std::get<2>(t) * 1000003 + std::get<0>(t));
  }
};
namespace log = common::log;

namespace {

// How long the draw waits for workers that are in the middle of committing a
// batch. A commit takes microseconds; a worker stuck longer is dead or hung.
constexpr int writer_wait_ms_max = 10'000;

uint64_t unix_ms() {
  struct timespec ts {};
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000u + static_cast<uint64_t>(ts.tv_nsec) / 1'000'000u;
}

uint32_t geometry_crc(const ControlLayout& l) {
  return common::crc32c(&l, offsetof(ControlLayout, geometry_crc));
}

size_t file_bytes() {
  size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  return (sizeof(ControlLayout) + page - 1) / page * page;
}

bool process_alive(uint64_t pid) {
  if (pid == 0) return false;
  return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM;
}

}  // namespace

const char* draw_state_name(DrawState s) {
  switch (s) {
    case DrawState::open: return "open";
    case DrawState::drawing: return "drawing";
    case DrawState::done: return "done";
  }
  return "unknown";
}

common::Result<std::unique_ptr<Control>> Control::open(const std::string& data_dir, uint32_t agencies, Mode mode) {
  if (mode == Mode::create_or_open) {
    if (::mkdir(data_dir.c_str(), 0755) < 0 && errno != EEXIST) return Error::from_errno(("mkdir " + data_dir).c_str());
  }
  std::string path = data_dir + "/" + control_file_name;
  int flags = O_CLOEXEC | (mode == Mode::read_only ? O_RDONLY : O_RDWR) | (mode == Mode::create_or_open ? O_CREAT : 0);
  int fd = ::open(path.c_str(), flags, 0644);
  if (fd < 0) {
    if (errno == ENOENT) return Error::make(ENOENT, path + " does not exist: no server has used this data directory");
    return Error::from_errno(("open " + path).c_str());
  }
  std::unique_ptr<Control> c(new Control());
  c->_fd = fd;
  c->_data_dir = data_dir;
  c->_read_only = mode == Mode::read_only;
  struct stat st {};
  if (::fstat(fd, &st) < 0) return Error::from_errno(("fstat " + path).c_str());
  bool fresh = st.st_size == 0;
  if (fresh) {
    if (mode != Mode::create_or_open) return Error::make(EIO, path + " is empty");
    if (agencies < 1 || agencies > limits::agencies_max) return Error::make(EINVAL, "agencies out of range");
    if (int rc = ::posix_fallocate(fd, 0, static_cast<off_t>(file_bytes())); rc != 0)
      return Error::from_errno(("posix_fallocate " + path).c_str(), rc);
  } else if (static_cast<size_t>(st.st_size) != file_bytes()) {
    return Error::make(EIO, path + ": unexpected size " + std::to_string(st.st_size) + " (another format version?)");
  }
  int prot = c->_read_only ? PROT_READ : PROT_READ | PROT_WRITE;
  void* map = ::mmap(nullptr, file_bytes(), prot, MAP_SHARED, fd, 0);
  if (map == MAP_FAILED) return Error::from_errno(("mmap " + path).c_str());
  if (fresh) {
    auto* l = new (map) ControlLayout();
    std::memcpy(l->magic, control_magic, sizeof control_magic);
    l->version = control_format_version;
    l->layout_bytes = static_cast<uint32_t>(sizeof(ControlLayout));
    l->agencies = agencies;
    l->geometry_crc = geometry_crc(*l);
    c->_layout = l;
    if (auto s = c->sync(); !s) return s.error();
    return c;
  }
  c->_layout = std::launder(static_cast<ControlLayout*>(map));
  const ControlLayout& l = *c->_layout;
  if (std::memcmp(l.magic, control_magic, sizeof control_magic) != 0) return Error::make(EIO, path + ": bad magic");
  if (l.geometry_crc != geometry_crc(l)) return Error::make(EIO, path + ": header checksum mismatch");
  if (l.version != control_format_version || l.layout_bytes != sizeof(ControlLayout))
    return Error::make(EIO, path + ": unsupported control file version");
  if (agencies != 0 && l.agencies != agencies)
    return Error::make(EINVAL, "the data directory " + data_dir + " was set up for " + std::to_string(l.agencies) +
                                   " agencies, not " + std::to_string(agencies) +
                                   "; use that number or a new data directory");
  return c;
}

Control::~Control() {
  if (_layout != nullptr) ::munmap(_layout, file_bytes());
  if (_fd >= 0) ::close(_fd);
}

common::Status Control::sync() {
  if (_read_only) return common::ok_status();
  if (::msync(_layout, file_bytes(), MS_SYNC) < 0) return Error::from_errno("msync control file");
  return common::ok_status();
}

uint64_t Control::bets_stored(uint32_t agency) const {
  uint64_t total = 0;
  for (size_t w = 0; w < workers_max; w++) total += _layout->bets_stored[w][agency].load(std::memory_order_relaxed);
  return total;
}

// ---------------------------------------------------------------- lock

common::Result<std::unique_ptr<DrawLock>> DrawLock::acquire(const std::string& data_dir) {
  std::string path = data_dir + "/" + lock_file_name;
  // Opened here, by this process: a descriptor inherited through fork would
  // share its lock with the parent instead of competing for it.
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return Error::from_errno(("open " + path).c_str());
  while (::flock(fd, LOCK_EX) < 0) {
    if (errno == EINTR) continue;
    Error e = Error::from_errno(("flock " + path).c_str());
    ::close(fd);
    return e;
  }
  return std::unique_ptr<DrawLock>(new DrawLock(fd));
}

DrawLock::~DrawLock() {
  ::flock(_fd, LOCK_UN);
  ::close(_fd);
}

// ---------------------------------------------------------------- the draw

namespace {

// Runs the draw. The caller holds the draw lock.
common::Result<DrawOutcome> draw_locked(Control& control, uint16_t winning_number) {
  ControlLayout& l = control.layout();
  l.draw_state.store(static_cast<uint32_t>(DrawState::drawing), std::memory_order_seq_cst);
  // Wait out batches being committed right now (see BatchGuard).
  for (size_t w = 0; w < workers_max; w++) {
    int waited = 0;
    while (l.workers[w].writing.load(std::memory_order_seq_cst) != 0 && process_alive(l.workers[w].pid.load())) {
      if (waited >= writer_wait_ms_max)
        return Error::make(ETIMEDOUT, "worker " + std::to_string(w) + " did not finish its commit");
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      waited++;
    }
  }
  auto drawn = run_draw(control.data_dir(), winning_number, static_cast<uint16_t>(control.agencies()));
  if (!drawn) return drawn.error();
  Results results;
  results.winning_number = winning_number;
  results.draw_unix_ms = unix_ms();
  results.agencies.resize(size_t{control.agencies()} + 1);
  for (uint32_t a = 1; a <= control.agencies(); a++) {
    AgencyResult& ar = results.agencies[a];
    // An agency closed out by the operator never confirmed it had sent
    // everything: it takes no part in the draw.
    ar.closed_out = control.closed_out(a);
    if (ar.closed_out) continue;
    ar.bets = drawn->bets_per_agency[a];
    ar.winners = std::move(drawn->winners[a]);
    results.bets_scanned += ar.bets;
  }
  if (auto st = write_results(control.data_dir(), results); !st) return st.error();
  DrawOutcome out;
  out.ran = true;
  out.bets_scanned = results.bets_scanned;
  out.winners = results.total_winners();
  l.winning_number.store(winning_number);
  l.draw_bets_scanned.store(out.bets_scanned);
  l.draw_winners.store(out.winners);
  l.draw_unix_ms.store(results.draw_unix_ms);
  l.draw_state.store(static_cast<uint32_t>(DrawState::done), std::memory_order_seq_cst);
  if (auto st = control.sync(); !st) return st.error();
  // The last step touches the results file: workers watching the directory
  // (inotify IN_ATTRIB) learn that the draw is done only now that the state
  // says so. The rename above may reach them a moment too early.
  std::string results_path = control.data_dir() + "/" + results_file_name;
  ::utimensat(AT_FDCWD, results_path.c_str(), nullptr, 0);
  return out;
}

uint32_t finished_count(const Control& c) {
  uint32_t n = 0;
  for (uint32_t a = 1; a <= c.agencies(); a++) n += c.finished(a) ? 1 : 0;
  return n;
}

}  // namespace

common::Result<FinishResult> finish_agency(Control& control, uint32_t agency, uint16_t winning_number) {
  LOTTERY_ASSERT(agency >= 1 && agency <= control.agencies());
  auto lock = DrawLock::acquire(control.data_dir());
  if (!lock) return lock.error();
  FinishResult r;
  DrawState state = control.draw_state();
  if (control.closed_out(agency)) {
    r.outcome = FinishOutcome::closed;
    return r;
  }
  if (state == DrawState::done) {
    r.outcome = FinishOutcome::draw_done;
    return r;
  }
  if (state == DrawState::drawing) {
    r.outcome = FinishOutcome::closed;
    return r;
  }
  if (control.finished(agency)) {
    r.outcome = FinishOutcome::already_finished;
    return r;
  }
  AgencySlot& slot = control.layout().agencies_slots[agency];
  slot.finished_unix_ms.store(unix_ms());
  slot.finished.store(1, std::memory_order_seq_cst);
  // A finished agency must stay finished across a crash or restart.
  if (auto st = control.sync(); !st) return st.error();
  if (finished_count(control) == control.agencies()) {
    auto d = draw_locked(control, winning_number);
    if (!d) return d.error();
    r.draw = std::move(*d);
  }
  return r;
}

common::Result<DrawOutcome> close_betting(Control& control, uint16_t winning_number) {
  auto lock = DrawLock::acquire(control.data_dir());
  if (!lock) return lock.error();
  if (control.draw_state() == DrawState::done) return DrawOutcome{};
  DrawOutcome closed;
  for (uint32_t a = 1; a <= control.agencies(); a++) {
    if (!control.finished(a) && !control.closed_out(a)) {
      control.layout().agencies_slots[a].closed_out.store(1, std::memory_order_seq_cst);
      closed.closed_out.push_back(a);
    }
  }
  control.layout().closed_unix_ms.store(unix_ms());
  auto d = draw_locked(control, winning_number);
  if (!d) return d.error();
  d->closed_out = std::move(closed.closed_out);
  return d;
}

common::Result<DrawOutcome> resume_draw_if_due(Control& control, uint16_t winning_number) {
  auto lock = DrawLock::acquire(control.data_dir());
  if (!lock) return lock.error();
  DrawState state = control.draw_state();
  if (state == DrawState::done) return DrawOutcome{};
  if (state == DrawState::open && finished_count(control) < control.agencies()) return DrawOutcome{};
  // A draw that was interrupted (state "drawing"), or that became due while
  // nobody drew, runs now.
  return draw_locked(control, winning_number);
}

}  // namespace lottery::control

// ---------------------------------------------------------------- producers

namespace lottery::control {

using common::Error;
namespace log = common::log;

uint64_t producer_key(uint32_t agency, uint64_t producer_id) {
  // splitmix64 finaliser over both fields; never 0 (0 marks a free slot).
  uint64_t z = producer_id ^ (uint64_t{agency} * 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return z | 1;
}

ProducerSlot* find_or_insert_producer(Control& control, uint32_t agency, uint64_t producer_id) {
  uint64_t key = producer_key(agency, producer_id);
  ProducerSlot* table = control.layout().producers;
  for (size_t probe = 0; probe < producers_max; probe++) {
    ProducerSlot& slot = table[(key + probe) % producers_max];
    uint64_t seen = slot.key.load(std::memory_order_acquire);
    if (seen == key) return &slot;
    if (seen != 0) continue;
    uint64_t expected = 0;
    if (slot.key.compare_exchange_strong(expected, key, std::memory_order_acq_rel)) {
      slot.producer_id.store(producer_id);
      slot.agency.store(agency);
      return &slot;
    }
    if (expected == key) return &slot;  // another process claimed it for the same producer
  }
  return nullptr;
}

size_t producer_index(const Control& control, const ProducerSlot* slot) {
  return static_cast<size_t>(slot - control.layout().producers);
}

common::Result<std::unique_ptr<ProducerLocks>> ProducerLocks::open(const std::string& data_dir) {
  std::string path = data_dir + "/" + producers_lock_file_name;
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return Error::from_errno(("open " + path).c_str());
  return std::unique_ptr<ProducerLocks>(new ProducerLocks(fd));
}

ProducerLocks::~ProducerLocks() { ::close(_fd); }

bool ProducerLocks::try_lock(size_t index) {
  struct flock fl {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = static_cast<off_t>(index);
  fl.l_len = 1;
  // F_OFD_SETLK (Linux 3.15): owned by this open file description, so it is
  // released when the process dies and is not shared with forked children.
  return ::fcntl(_fd, F_OFD_SETLK, &fl) == 0;
}

void ProducerLocks::unlock(size_t index) {
  struct flock fl {};
  fl.l_type = F_UNLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = static_cast<off_t>(index);
  fl.l_len = 1;
  ::fcntl(_fd, F_OFD_SETLK, &fl);
}

common::Status resolve_pending(Control& control, ProducerSlot& slot) {
  uint32_t pending_worker = slot.pending_worker.load(std::memory_order_seq_cst);
  if (pending_worker == 0) return common::ok_status();
  uint64_t seq = slot.pending_seq.load();
  auto segments = store::list_segments(control.data_dir(), static_cast<int>(pending_worker - 1));
  if (!segments) return segments.error();
  bool landed = false;
  if (!segments->empty()) {
    auto scanned = store::scan_segment(segments->back(), [&](const store::EntryView& e) {
      if (e.meta.agency == slot.agency.load() && e.meta.producer_id == slot.producer_id.load() &&
          e.meta.sequence == seq)
        landed = true;
    });
    if (!scanned) return scanned.error();
  }
  if (landed && seq == slot.last_seq.load() + 1) {
    slot.bets.fetch_add(slot.pending_bets.load());
    slot.last_seq.store(seq);
  }
  log::warning("productor_pendiente", landed ? log::Outcome::success : log::Outcome::fail,
               {{"agencia", slot.agency.load()}, {"seq", seq}, {"worker", pending_worker - 1},
                {"almacenado", landed ? "si" : "no"}});
  slot.pending_seq.store(0);
  slot.pending_bets.store(0);
  slot.pending_worker.store(0, std::memory_order_seq_cst);
  return common::ok_status();
}

common::Result<uint64_t> rebuild_producers(Control& control) {
  ProducerSlot* table = control.layout().producers;
  for (size_t i = 0; i < producers_max; i++) {
    table[i].key.store(0);
    table[i].producer_id.store(0);
    table[i].agency.store(0);
    table[i].pending_worker.store(0);
    table[i].last_seq.store(0);
    table[i].bets.store(0);
    table[i].pending_seq.store(0);
    table[i].pending_bets.store(0);
  }
  auto segments = store::list_segments(control.data_dir(), -1);
  if (!segments) return segments.error();
  // Stored seqs of one producer may sit in several workers' segments, in any
  // file order; the set catches a batch stored twice.
  std::unordered_set<std::tuple<uint32_t, uint64_t, uint64_t>, EntryIdHash> seen;
  uint64_t duplicates = 0;
  for (const std::string& path : *segments) {
    auto scanned = store::scan_segment(path, [&](const store::EntryView& e) {
      if (!seen.emplace(e.meta.agency, e.meta.producer_id, e.meta.sequence).second) {
        duplicates++;
        return;
      }
      ProducerSlot* slot = find_or_insert_producer(control, e.meta.agency, e.meta.producer_id);
      if (slot == nullptr) return;
      slot->bets.fetch_add(e.meta.bet_count);
      if (e.meta.sequence > slot->last_seq.load()) slot->last_seq.store(e.meta.sequence);
    });
    if (!scanned) return scanned.error();
  }
  if (auto st = control.sync(); !st) return st.error();
  return duplicates;
}

}  // namespace lottery::control
