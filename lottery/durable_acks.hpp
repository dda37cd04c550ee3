// Acknowledgements held until the bytes they report are durable, and the
// syncs that release them (docs/STORAGE.md, "Durability policies").
//
// `always`: every batch the event loop commits in one iteration waits for
// ONE sync at the end of that iteration (the reactor's before-sleep hook),
// then all their acknowledgements are queued together, as Redis's
// `appendfsync always` does for one iteration's commands.
//
// `group`: the sync runs on a thread of its own, so the loop keeps reading,
// validating and appending while the previous group is being synced. A group
// is handed to the thread when the thread is free and either the previous
// sync completed (the disk was busy: those batches waited already) and the
// group then gathered the clients' answers to its acknowledgements for a
// fraction of that sync's duration, or its first batch waited the window, or
// it holds group_batches_max batches.
// A group that fills up while the previous one is still syncing waits for
// it, on the loop: the disk sets the pace. The thread reports through an
// eventfd the reactor watches, so acknowledgements leave from the loop only.
//
// Neither allocates per batch: the held acknowledgements live in a ring
// sized at start-up.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "lottery/store.hpp"
#include "reactor/reactor.hpp"

namespace lottery {

// One batch's acknowledgement, held until its bytes are synced.
struct PendingAck {
  reactor::ConnId id;
  uint32_t seq = 0;
  uint16_t count = 0;
};

class DurableAcks {
 public:
  // Called on the loop thread, in commit order, for each held acknowledgement
  // once the sync that covers it completed (`synced`) or failed.
  using Release = void (*)(void* context, const PendingAck& ack, bool synced);
  struct Options {
    store::Durability durability = store::Durability::none;
    uint32_t group_window_ms = 0;
    uint32_t group_batches_max = 64;
  };

  // Adds its before-sleep hook to `reactor`, and in group mode starts the
  // sync thread (or, if that fails, logs why and syncs on the loop).
  // `sync_counter` counts completed syncs.
  DurableAcks(reactor::Reactor& reactor, store::Store& store, std::atomic<uint64_t>& sync_counter, Options options,
              Release on_release, void* context);
  ~DurableAcks();
  DurableAcks(const DurableAcks&) = delete;
  DurableAcks& operator=(const DurableAcks&) = delete;

  // A batch just committed; its acknowledgement waits for the policy's sync.
  void hold(const PendingAck& ack);
  // Blocks until everything committed so far is durable, and releases every
  // held acknowledgement: before a producer's lock is let go, at shutdown.
  void sync_all();
  size_t held() const { return _count; }

 private:
  void before_sleep();
  void push(const PendingAck& ack);
  // Releases the oldest `n` held acknowledgements (fewer if a nested
  // sync_all, from a handler the release ran, released them first).
  void release(size_t n, bool synced);
  void sync_on_loop();
  void start_job();
  void wait_for_job();
  void complete_job();
  void on_sync_done();
  void thread_main();
  size_t open_count() const { return _count - _in_flight; }
  void arm_window_timer();
  void cancel_window_timer();
  void on_gather_timer();
  void arm_gather_timer(uint64_t delay_us);

  reactor::Reactor& _reactor;
  store::Store& _store;
  std::atomic<uint64_t>& _sync_counter;
  Options _options;
  Release _release;
  void* _context;

  // Held acknowledgements, oldest first: the in-flight group's, then the
  // open group's.
  std::vector<PendingAck> _ring;
  size_t _head = 0;
  size_t _count = 0;
  size_t _in_flight = 0;  // the oldest _in_flight belong to the job being synced

  uint64_t _open_since_ms = 0;  // when the open group's first batch was held
  bool _due = false;            // start the open group as soon as the thread is free
  reactor::Reactor::TimerId _window_timer = 0;
  // After a sync's acknowledgements are released, the next group gathers
  // the clients' answers until this time (a timerfd: microseconds).
  uint64_t _job_started_us = 0;
  uint64_t _gather_until_us = 0;
  int _gather_fd = -1;
  bool _gather_armed = false;

  // The sync thread. _job is the loop's between begin_sync and the hand-over
  // and after _job_done; the thread's in between. The mutex orders the two.
  bool _threaded = false;
  bool _job_active = false;  // loop side: a job was handed over and not completed
  std::thread _thread;
  int _event_fd = -1;
  std::mutex _mutex;
  std::condition_variable _cv;
  bool _job_ready = false;  // loop → thread
  bool _job_done = false;   // thread → loop
  bool _stop = false;
  common::Status _job_result = common::ok_status();
  store::Store::SyncJob _job;
};

}  // namespace lottery
