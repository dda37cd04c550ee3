// The control file: state shared by every worker process (and lotteryctl),
// memory-mapped from <data-dir>/control.lctl. docs/STORAGE.md is the contract.
//
// What lives here, and who may change it:
// - per-agency finished / closed-out flags: written under the draw lock;
// - the draw state: written under the draw lock;
// - per-worker counters: each written only by its own worker (or by the
//   master when it restarts that worker), read by anyone;
// - per-worker "writing" flags that make closing the betting safe against a
//   batch being committed at the same moment (see BatchGuard).
//
// The draw lock is flock(2) on <data-dir>/draw.lock. flock belongs to the open
// file description, so every process opens the lock file itself (after fork)
// with O_CLOEXEC; a lock inherited through fork would be shared, not exclusive.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/result.hpp"
#include "lottery/limits.hpp"

namespace lottery::control {

inline constexpr char control_magic[8] = {'L', 'O', 'T', 'C', 'T', 'L', '\0', '\1'};
inline constexpr uint32_t control_format_version = 1;
inline constexpr size_t workers_max = 64;
inline constexpr const char* control_file_name = "control.lctl";
inline constexpr const char* lock_file_name = "draw.lock";
inline constexpr const char* producers_lock_file_name = "producers.lock";
// Producer streams tracked at once (open addressing; 1 MiB of control file).
inline constexpr size_t producers_max = 16384;

enum class DrawState : uint32_t {
  open = 0,     // betting open, no draw yet
  drawing = 1,  // the betting is closed and the draw is running (or was interrupted: it is re-run)
  done = 2,     // results file written; winners answerable
};
const char* draw_state_name(DrawState s);

// Alignment keeps each worker's counters on their own cache lines so workers
// never contend on a line (false sharing).
struct alignas(64) WorkerSlot {
  std::atomic<uint64_t> pid;
  std::atomic<uint64_t> started_unix_ms;
  std::atomic<uint64_t> restarts;
  std::atomic<uint64_t> connections_total;
  std::atomic<uint64_t> connections_open;
  std::atomic<uint64_t> batches;
  std::atomic<uint64_t> bets;
  std::atomic<uint64_t> errors;  // rejected batches and protocol errors
  std::atomic<uint64_t> syncs;   // msyncs of the store (durability group/always)
  std::atomic<uint64_t> duplicates;  // resent batches acknowledged without storing
  std::atomic<uint64_t> connections_refused;    // over a connection cap
  std::atomic<uint64_t> connections_timed_out;  // handshake or idle deadline
  std::atomic<uint64_t> connections_dropped;    // replies not read (stalled, or input overflow)
  alignas(64) std::atomic<uint32_t> writing;  // 1 while committing a batch
  std::atomic<uint32_t> alive;
};

struct AgencySlot {
  std::atomic<uint32_t> finished;
  std::atomic<uint32_t> closed_out;  // did not finish before the operator closed the betting
  std::atomic<uint64_t> finished_unix_ms;
};

// One producer's stream (see docs/PROTOCOL.md, "Exactly once"): stored seqs
// are the prefix 1..last_seq. Only the worker holding the producer's lock
// (an OFD lock on byte <index> of producers.lock) writes it. pending_* mark a
// batch being committed, so that if the holder dies mid-commit the next
// holder can tell, from the dead worker's newest segment, whether it landed.
struct alignas(64) ProducerSlot {
  std::atomic<uint64_t> key;  // 0: free; else producer_key(agency, producer_id)
  std::atomic<uint64_t> producer_id;
  std::atomic<uint32_t> agency;
  std::atomic<uint32_t> pending_worker;  // worker id + 1 while committing, else 0
  std::atomic<uint64_t> last_seq;
  std::atomic<uint64_t> bets;
  std::atomic<uint64_t> pending_seq;
  std::atomic<uint64_t> pending_bets;
};
static_assert(sizeof(ProducerSlot) == 64);

uint64_t producer_key(uint32_t agency, uint64_t producer_id);

// The fixed part of the file. Counters are mutated in place by several
// processes, so they carry no checksum; the geometry fields, written once at
// creation, do.
struct ControlLayout {
  char magic[8];
  uint32_t version;
  uint32_t layout_bytes;
  uint32_t agencies;  // configured at creation; a restart with another value is refused
  uint32_t geometry_crc;  // CRC32C of the fields above
  alignas(64) std::atomic<uint32_t> draw_state;
  std::atomic<uint32_t> winning_number;
  std::atomic<uint64_t> draw_unix_ms;
  std::atomic<uint64_t> closed_unix_ms;  // when the operator closed the betting, 0 if never
  std::atomic<uint64_t> draw_bets_scanned;
  std::atomic<uint64_t> draw_winners;
  WorkerSlot workers[workers_max];
  AgencySlot agencies_slots[limits::agencies_max + 1];
  // bets_stored[worker][agency]: each row written only by its worker.
  std::atomic<uint64_t> bets_stored[workers_max][limits::agencies_max + 1];
  ProducerSlot producers[producers_max];
};
static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared-memory atomics must be lock-free");
static_assert(std::atomic<uint32_t>::is_always_lock_free);
static_assert(sizeof(WorkerSlot) % 64 == 0);
// The slot's size is part of the file layout (docs/STORAGE.md).
static_assert(sizeof(WorkerSlot) == 192);

class Control {
 public:
  enum class Mode : uint8_t { create_or_open, open_existing, read_only };
  // Opens (or creates) the control file of `data_dir`. `agencies` must match
  // the file's when it exists.
  static common::Result<std::unique_ptr<Control>> open(const std::string& data_dir, uint32_t agencies, Mode mode);
  ~Control();
  Control(const Control&) = delete;
  Control& operator=(const Control&) = delete;

  ControlLayout& layout() { return *_layout; }
  const ControlLayout& layout() const { return *_layout; }
  uint32_t agencies() const { return _layout->agencies; }
  const std::string& data_dir() const { return _data_dir; }
  DrawState draw_state() const { return static_cast<DrawState>(_layout->draw_state.load()); }
  bool finished(uint32_t agency) const { return _layout->agencies_slots[agency].finished.load() != 0; }
  bool closed_out(uint32_t agency) const { return _layout->agencies_slots[agency].closed_out.load() != 0; }
  uint64_t bets_stored(uint32_t agency) const;
  WorkerSlot& worker(size_t id) { return _layout->workers[id]; }

  // Makes the control file's current contents durable (msync).
  common::Status sync();

 private:
  Control() = default;
  std::string _data_dir;
  int _fd = -1;
  ControlLayout* _layout = nullptr;
  bool _read_only = false;
};

// flock(LOCK_EX) on draw.lock, opened by this process, released on scope exit.
class DrawLock {
 public:
  static common::Result<std::unique_ptr<DrawLock>> acquire(const std::string& data_dir);
  ~DrawLock();
  DrawLock(const DrawLock&) = delete;
  DrawLock& operator=(const DrawLock&) = delete;

 private:
  explicit DrawLock(int fd) : _fd(fd) {}
  int _fd;
};

// The producer's slot, claimed if new (lock-free: a CAS on the key). nullptr
// when the table is full.
ProducerSlot* find_or_insert_producer(Control& control, uint32_t agency, uint64_t producer_id);
size_t producer_index(const Control& control, const ProducerSlot* slot);

// Per-process OFD (open file description) locks on producers.lock, one byte
// per producer slot. The kernel drops them when the process dies, so a
// killed worker never leaves a producer locked.
class ProducerLocks {
 public:
  static common::Result<std::unique_ptr<ProducerLocks>> open(const std::string& data_dir);
  ~ProducerLocks();
  ProducerLocks(const ProducerLocks&) = delete;
  ProducerLocks& operator=(const ProducerLocks&) = delete;
  bool try_lock(size_t index);
  void unlock(size_t index);

 private:
  explicit ProducerLocks(int fd) : _fd(fd) {}
  int _fd;
};

// Settles a commit that a dead holder left pending: if the dead worker's
// newest segment holds the pending batch, it counts as stored. The caller
// holds the producer's lock.
common::Status resolve_pending(Control& control, ProducerSlot& slot);

// Rebuilds every producer's state from the segments (at server start, before
// any worker runs). Returns the number of duplicate entries found (0 unless a
// bug or a manual copy put the same batch twice in the store).
common::Result<uint64_t> rebuild_producers(Control& control);

// Marks a worker as committing a batch. A worker sets it, then checks that
// betting is still open; the closer sets the draw state, then waits for every
// flag to drop. Both sides use sequentially consistent atomics, so either the
// worker sees the closed state (and refuses the batch) or the closer waits for
// its commit (and the draw includes it). No acknowledged bet misses the draw.
class BatchGuard {
 public:
  explicit BatchGuard(WorkerSlot& w) : _w(w) { _w.writing.store(1, std::memory_order_seq_cst); }
  ~BatchGuard() { _w.writing.store(0, std::memory_order_seq_cst); }
  BatchGuard(const BatchGuard&) = delete;
  BatchGuard& operator=(const BatchGuard&) = delete;

 private:
  WorkerSlot& _w;
};

enum class FinishOutcome : uint8_t { finished, already_finished, closed, draw_done };

struct DrawOutcome {
  bool ran = false;  // this call ran the draw
  uint64_t bets_scanned = 0;
  uint64_t winners = 0;
  std::vector<uint32_t> closed_out;  // agencies closed out by this call
};

// Marks `agency` finished under the draw lock; when it was the last expected
// agency, runs the draw (in this process) before releasing the lock.
struct FinishResult {
  FinishOutcome outcome = FinishOutcome::finished;
  DrawOutcome draw;
};
common::Result<FinishResult> finish_agency(Control& control, uint32_t agency, uint16_t winning_number);

// Closes the betting: agencies that have not finished are closed out, and the
// draw runs with the agencies that finished. Idempotent.
common::Result<DrawOutcome> close_betting(Control& control, uint16_t winning_number);

// Completes a draw that a crashed process left in the `drawing` state, or
// that became due while no one was running (e.g. every agency finished but
// the process died before drawing). Call at start-up.
common::Result<DrawOutcome> resume_draw_if_due(Control& control, uint16_t winning_number);

}  // namespace lottery::control
