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

namespace lottery::control {

using common::Error;
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
