// The lottery service: the server side of the protocol, as a reactor Handler.
// It turns frames into store appends, finish marks and winners replies. The
// reactor below it moves bytes; the store beside it keeps them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "lottery/control.hpp"
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
  uint32_t group_window_ms = 1;
  uint32_t group_batches_max = 64;
};

struct ServiceCounters {
  uint64_t connections = 0;
  uint64_t batches_accepted = 0;
  uint64_t batches_rejected = 0;
  uint64_t bets_accepted = 0;
  uint64_t protocol_errors = 0;
};

class LotteryService final : public reactor::Handler {
 public:
  // `control` is the state shared with the other workers (finished agencies,
  // the draw); this worker's counters live in its slot there.
  LotteryService(reactor::Reactor& reactor, store::Store& store, control::Control& control,
                 control::ProducerLocks& producer_locks, ServiceOptions options, size_t max_connections);

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
    reactor::ConnId id;
    uint16_t agency = 0;  // 0 until hello
    uint64_t producer_id = 0;
    int64_t producer = -1;  // index of the producer slot this connection holds (locked), or -1
    bool waiting_winners = false;
    uint32_t waiting_seq = 0;
    uint32_t waiting_start = 0;
  };

  enum class Outcome : uint8_t { keep, close };

  Session* session(reactor::ConnId id);
  Outcome handle_frame(Session& s, const proto::FrameHeader& h, proto::Bytes body);
  Outcome handle_hello(Session& s, const proto::FrameHeader& h, proto::Bytes body);
  Outcome handle_batch(Session& s, const proto::FrameHeader& h, proto::Bytes body);
  Outcome handle_finished(Session& s, const proto::FrameHeader& h, proto::Bytes body);
  Outcome handle_winners(Session& s, const proto::FrameHeader& h, proto::Bytes body);
  void reply_error(Session& s, uint8_t request_type, uint32_t seq, proto::Status status, uint16_t bet_index,
                   std::string_view reason);
  void send_winners_page(Session& s, uint32_t seq, uint32_t start);
  bool load_results_if_done();
  void answer_waiting();
  void release_producer(Session& s);
  void acknowledge(Session& s, uint32_t seq, uint16_t count);
  // Group commit: syncs the store once and sends every acknowledgement that waited for it.
  void flush_group();

  struct PendingAck {
    reactor::ConnId id;
    uint32_t seq;
    uint16_t count;
  };

  reactor::Reactor& _reactor;
  store::Store& _store;
  control::Control& _control;
  control::ProducerLocks& _producer_locks;
  control::WorkerSlot& _slot;
  std::vector<PendingAck> _pending_acks;  // reserved at start: group_batches_max
  reactor::Reactor::TimerId _group_timer = 0;
  ServiceOptions _options;
  std::vector<Session> _sessions;  // by reactor slot
  std::optional<Results> _results;
  bool _shutting_down = false;
  ServiceCounters _counters;
  proto::Date _today;
  uint64_t _today_checked_ms = 0;
};

}  // namespace lottery
