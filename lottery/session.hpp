// The lottery service: the server side of the protocol, as a reactor Handler.
// It turns frames into store appends, finish marks and winners replies. The
// reactor below it moves bytes; the store beside it keeps them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "lottery/control.hpp"
#include "lottery/durable_acks.hpp"
#include "lottery/protocol.hpp"
#include "lottery/results.hpp"
#include "lottery/store.hpp"
#include "reactor/reactor.hpp"

namespace lottery {

struct ServiceOptions {
  uint16_t agencies = 5;
  uint16_t winning_number = 7574;
  std::string data_dir = "./data";
  uint16_t worker_id = 0;
  store::Durability durability = store::Durability::none;
  // Group commit: one sync per window or per this many batches, whichever first.
  uint32_t group_window_ms = 0;
  uint32_t group_batches_max = 64;
  // Hostile input (docs/SECURITY.md): defaults in lottery/limits.hpp, each
  // settable by a server flag.
  size_t connections_max = limits::connections_per_worker_default;  // this worker
  size_t connections_total_max = limits::connections_total_default;  // every worker together
  size_t frame_bytes_max = limits::frame_bytes_max;                  // a request frame
  size_t batch_bets_max = limits::batch_bets_max;
  size_t unidentified_bytes_max = limits::unidentified_bytes_default;  // before a successful hello
  size_t pending_reply_bytes_max = limits::pending_reply_bytes_default;
  uint32_t handshake_timeout_ms = limits::handshake_timeout_ms_default;
  uint32_t idle_timeout_ms = limits::idle_timeout_ms_default;
  uint32_t reply_stall_timeout_ms = limits::reply_stall_timeout_ms_default;
  uint32_t sweep_interval_ms = limits::session_sweep_interval_ms;  // tests shorten it
};

// The reactor options a service with these limits needs: its slots (the
// per-worker cap plus the refusal slots) and the pending-reply pause mark.
reactor::Options reactor_options_for(const ServiceOptions& options);

// The frame the server sends to a connection it refuses for lack of room
// (status too_many_connections), for Reactor::set_refusal.
std::vector<std::byte> refusal_frame();
// The frame, in clear, for a plaintext connection to a server that requires
// TLS (status tls_required), for tls::TlsLayer::set_plaintext_refusal.
std::vector<std::byte> tls_required_frame();

struct ServiceCounters {
  uint64_t connections = 0;
  uint64_t batches_accepted = 0;
  uint64_t batches_rejected = 0;
  uint64_t bets_accepted = 0;
  uint64_t protocol_errors = 0;
  uint64_t refused = 0;           // over a connection cap
  uint64_t handshake_timeouts = 0;
  uint64_t idle_timeouts = 0;
  uint64_t stalled = 0;           // dropped: replies not read
};

class LotteryService final : public reactor::Handler {
 public:
  // `control` is the state shared with the other workers (finished agencies,
  // the draw); this worker's counters live in its slot there. `reactor` has
  // reactor_options_for(options).max_connections slots or fewer.
  LotteryService(reactor::Reactor& reactor, store::Store& store, control::Control& control,
                 control::ProducerLocks& producer_locks, ServiceOptions options)
      : LotteryService(reactor, reactor, store, control, producer_locks, std::move(options)) {}
  // `link` carries the connections' bytes: the reactor itself (plaintext) or
  // a TLS layer on top of it; `reactor` gives the timers. With a link that
  // authenticates peers (peer_identity() != 0) the agency is the peer's
  // identity and nothing else: every request for another agency is refused
  // with not_your_agency and the connection closed.
  LotteryService(reactor::Reactor& reactor, reactor::Link& link, store::Store& store, control::Control& control,
                 control::ProducerLocks& producer_locks, ServiceOptions options);
  ~LotteryService() override;

  void on_open(reactor::ConnId id) override;
  size_t on_data(reactor::ConnId id, std::span<const std::byte> data) override;
  void on_close(reactor::ConnId id, reactor::CloseReason reason) override;

  // Graceful stop: waiting winners queries are answered "shutting down" and
  // every connection is closed once its replies are out.
  void begin_shutdown();
  // Called when another process may have completed the draw (the results
  // file appeared): loads the results and answers every held winners query.
  void on_draw_maybe_done();
  bool draw_done() const { return _results.has_value(); }
  size_t waiting_queries() const;
  const ServiceCounters& counters() const { return _counters; }

 private:
  struct Session {
    bool open = false;
    // Counted against the connection caps (a refused connection is open only
    // until its error frame is out).
    bool admitted = false;
    // Closed by us or the peer, its last replies maybe still going out: the
    // sweep aborts it at linger_until_ms. Cleared when the slot is reused.
    bool lingering = false;
    bool waiting_winners = false;
    reactor::ConnId id;
    uint16_t agency = 0;  // 0 until hello
    uint32_t unidentified_bytes = 0;  // request bytes taken before the hello
    uint64_t producer_id = 0;
    int64_t producer = -1;  // index of the producer slot this connection holds (locked), or -1
    uint32_t waiting_seq = 0;
    uint32_t waiting_start = 0;
    uint64_t opened_ms = 0;
    uint64_t last_request_ms = 0;
    uint64_t stalled_since_ms = 0;  // replies over the cap since then; 0: not stalled
    uint64_t linger_until_ms = 0;
  };

  enum class Outcome : uint8_t { keep, close };

  // Why the server closed a connection on its own, for the rate-limited log.
  enum class Drop : uint8_t { refused, handshake_timeout, idle_timeout, replies_not_read, count };
  struct DropLog {
    uint64_t since_logged = 0;  // drops not yet reported
    uint64_t last_logged_ms = 0;
  };

  Session* session(reactor::ConnId id);
  bool admit();
  void refuse(Session& s);
  void sweep();
  void expire(Session& s, proto::Status status, Drop why, const char* reason);
  void note_drop(Drop why, uint64_t now_ms, uint64_t count = 1);
  // Logs the drops counted since the last line, per reason, once its interval
  // is over (or now, with force).
  void flush_drop_logs(uint64_t now_ms, bool force = false);
  Outcome handle_frame(Session& s, const proto::FrameHeader& h, proto::Bytes body);
  Outcome handle_hello(Session& s, const proto::FrameHeader& h, proto::Bytes body);
  Outcome handle_batch(Session& s, const proto::FrameHeader& h, proto::Bytes body);
  // Nothing when the connection said hello as `agency`; otherwise replies
  // not_identified, agency_mismatch (plaintext) or not_your_agency (TLS) and
  // says what becomes of the connection.
  std::optional<Outcome> refuse_unless_own_agency(Session& s, const proto::FrameHeader& h, uint16_t agency);
  // Replies not_your_agency (logged); the caller closes the connection.
  void refuse_other_agency(Session& s, const proto::FrameHeader& h, uint16_t asked);
  Outcome handle_finished(Session& s, const proto::FrameHeader& h, proto::Bytes body);
  Outcome handle_winners(Session& s, const proto::FrameHeader& h, proto::Bytes body);
  void reply_error(Session& s, uint8_t request_type, uint32_t seq, proto::Status status, uint16_t bet_index,
                   std::string_view reason);
  void send_winners_page(Session& s, uint32_t seq, uint32_t start);
  bool load_results_if_done();
  void answer_waiting();
  void release_producer(Session& s);
  void acknowledge(Session& s, uint32_t seq, uint16_t count);
  // DurableAcks::Release: a held acknowledgement whose sync completed (or failed).
  static void release_ack(void* self, const PendingAck& ack, bool synced);

  reactor::Reactor& _reactor;
  reactor::Link& _link;
  store::Store& _store;
  control::Control& _control;
  control::ProducerLocks& _producer_locks;
  control::WorkerSlot& _slot;
  ServiceOptions _options;
  std::vector<Session> _sessions;  // by reactor slot
  size_t _admitted = 0;            // sessions counted against the caps
  reactor::Reactor::TimerId _sweep_timer = 0;
  DropLog _drop_logs[static_cast<size_t>(Drop::count)];
  uint64_t _reactor_refused_seen = 0;  // reactor Stats::refused_full already counted
  std::optional<Results> _results;
  bool _shutting_down = false;
  ServiceCounters _counters;
  proto::Date _today;
  uint64_t _today_checked_ms = 0;
  // Acknowledgements waiting for a sync (durability group/always).
  DurableAcks _acks;
};

}  // namespace lottery
