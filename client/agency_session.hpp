// The agency side of a protocol v1 session, as a state machine without I/O:
// the caller moves bytes between it and a socket (see client/net.hpp), tests
// move them between it and a fake server.
//
//   HELLO -> ack -> batches 1..N, up to `inflight_max` unacknowledged
//   -> FINISHED -> ack -> WINNERS(start=0) -> page -> WINNERS(start+=count) ...
//
// Exactly once (docs/PROTOCOL.md): the first HELLO ack says how much of this
// producer's stream the server already stores (a prefix of batches); the
// session skips those bets and numbers on from there. When a connection
// drops, the caller opens a new one and calls restart_on_new_connection():
// the session says HELLO again, drops the window batches the new ack reports
// stored, resends the rest in seq order, and re-sends whatever control
// request (FINISHED, WINNERS) was left unanswered.
//
// Every buffer is sized at construction: the window of batch frames (each
// kept until its ack, so the ack can be logged bet by bet and the batch can
// be resent after a drop), the line numbers of their bets, and a receive
// buffer that holds the largest frame.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "lottery/limits.hpp"
#include "lottery/protocol.hpp"

namespace lottery::client {

// Twice the largest frame, so a full frame always fits after a partial one.
inline constexpr size_t receive_buffer_bytes = 2 * limits::frame_bytes_max;
// HELLO, FINISHED and WINNERS requests are a few bytes each.
inline constexpr size_t control_frame_bytes_max = 64;
// Seq of the HELLO; batches are 1, 2, 3, ... and later requests follow them.
inline constexpr uint32_t hello_seq = 0;

static_assert(receive_buffer_bytes >= limits::frame_bytes_max);

// Where the bets come from: the agency file, or the one bet of single-bet mode.
class BetSource {
 public:
  virtual ~BetSource() = default;
  // The next bet and its 1-based line in the source (0 when it has none);
  // false at the end.
  virtual bool next(proto::Bet& out, uint32_t& line) = 0;
};

enum class SessionMode : uint8_t {
  agency,      // the whole file, then FINISHED and the winners
  single_bet,  // one bet; FINISHED and winners only when asked
};

struct SessionOptions {
  uint16_t agency = 0;
  uint64_t producer_id = 0;
  SessionMode mode = SessionMode::agency;
  bool finish = true;  // send FINISHED and ask for the winners after the bets
  size_t batch_bets_max = 128;
  size_t batch_bytes_max = limits::client_batch_bytes_default;
  size_t inflight_max = 16;
};

// What the session reports, named after what completed. Called from inside
// on_received(), in the order the replies arrived.
class SessionListener {
 public:
  virtual ~SessionListener() = default;
  virtual void on_hello_acked(const proto::HelloAck& /*ack*/) {}
  // The first HELLO ack said the server already stores this producer's
  // batches 1..stored_seq (`bets` bets): they were skipped in the source.
  virtual void on_resumed(uint64_t /*stored_seq*/, uint64_t /*bets*/) {}
  // HELLO on a new connection was acked: `confirmed` window batches were
  // stored already (each also reported through on_batch_acked), `resending`
  // go out again.
  virtual void on_reconnected(const proto::HelloAck& /*ack*/, uint32_t /*confirmed*/, uint32_t /*resending*/) {}
  // `bets` is the batch's encoded bets (iterate with proto::BetCursor).
  virtual void on_batch_acked(uint32_t /*seq*/, uint16_t /*count*/, proto::Bytes /*bets*/) {}
  virtual void on_finished_acked(uint64_t /*bets_sent*/, uint64_t /*bets_stored*/) {}
  virtual void on_winner(std::string_view /*document*/) {}
  virtual void on_winners_received(uint32_t /*total*/) {}
};

enum class FailureKind : uint8_t {
  none,
  rejected,        // the server refused a request (a bet, the agency, ...): our input is wrong
  refused,         // the server refused the connection (connection-level error frame)
  protocol,        // the server sent something this client cannot make sense of, or
                   // its view of this producer's stream contradicts ours
  input_mismatch,  // the server stores more of this producer than the source holds
};

struct SessionFailure {
  FailureKind kind = FailureKind::none;
  uint8_t request_type = 0;  // which request it answers (proto::MsgType), or connection_error_type
  uint32_t seq = 0;
  proto::Status status = proto::Status::ok;
  uint16_t bet_index = proto::no_bet_index;
  uint32_t line = 0;     // line of the rejected bet in its source, 0 when unknown
  std::string document;  // of the rejected bet, when known
  uint16_t number = 0;
  std::string reason;
};

class AgencySession {
 public:
  AgencySession(const SessionOptions& options, BetSource& source, SessionListener& listener);
  AgencySession(const AgencySession&) = delete;
  AgencySession& operator=(const AgencySession&) = delete;

  // The next bytes to send (empty when there is nothing to send now). Builds
  // the next batches when the window has room.
  proto::Bytes pending_output();
  // `n` bytes of pending_output() were sent.
  void on_sent(size_t n);

  // Where to receive, then how many bytes arrived there. Frames may arrive
  // split anywhere; complete ones are handled at once.
  std::span<std::byte> receive_space();
  void on_received(size_t n);

  bool done() const { return _phase == Phase::done; }
  bool failed() const { return _phase == Phase::failed; }
  const SessionFailure& failure() const { return _failure; }

  // The server asked this client to come back on a new connection
  // (producer_busy, shutting_down); the status says which.
  bool must_reconnect() const { return _retry_status != proto::Status::ok; }
  proto::Status retry_status() const { return _retry_status; }
  // HELLO was acked on the current connection.
  bool identified() const { return _link == Link::identified; }
  // The current connection is gone and a new one replaces it: forget what
  // was in transit, say HELLO again and, once it is acked, resend what the
  // server does not store. Not for a session that is done or failed.
  void restart_on_new_connection();

  uint64_t bets_sent() const { return _bets_built; }
  // Batches 1..N are acknowledged (by their acks, by a HELLO ack, or stored
  // in an earlier run).
  uint32_t batches_acked() const { return _acked_through; }
  // Built batches not acknowledged yet, the ones a reconnect may resend.
  uint32_t batches_pending() const { return in_window(); }
  // Window batches a HELLO ack after a reconnect reported stored.
  uint32_t batches_confirmed_by_hello() const { return _confirmed_by_hello; }
  // Grows with every reply that moves the session on (a batch, FINISHED or
  // WINNERS answered); HELLO acks do not count. Lets the caller tell a
  // connection that got somewhere from one that dropped straight away.
  uint64_t progress() const { return _progress; }

 private:
  enum class Phase : uint8_t { starting, betting, finishing, winners, done, failed };
  // The current connection: HELLO not yet acked, or acked.
  enum class Link : uint8_t { awaiting_hello, identified };

  // One batch of the window. Its frame stays here until its ack arrives.
  struct Slot {
    uint32_t seq = 0;
    uint16_t count = 0;
    size_t frame_bytes = 0;
    size_t sent_bytes = 0;
    bool acked = false;
    bool gap = false;  // refused with sequence_gap while an earlier batch awaited its reply
  };

  std::byte* slot_frame(uint32_t seq);
  uint32_t* slot_lines(uint32_t seq);
  proto::Bytes slot_bets(uint32_t seq);
  Slot& slot(uint32_t seq);
  uint32_t in_window() const { return _built_through - _acked_through; }
  bool reading() const { return _phase != Phase::done && _phase != Phase::failed && !must_reconnect(); }

  void fill_window();
  bool build_batch();
  void slide_window();
  void queue_control(size_t frame_bytes, uint32_t seq, uint8_t type);
  void after_bets_acked();
  void queue_winners_query();
  void go_to_winners();

  void handle_frame(proto::Bytes frame);
  void on_hello_reply(const proto::Reply& r);
  bool check_hello_ack(const proto::HelloAck& ack);
  void start_from(const proto::HelloAck& ack);
  bool skip_stored_prefix(const proto::HelloAck& ack);
  void resume_after_reconnect(const proto::HelloAck& ack);
  bool drop_stored_batches(const proto::HelloAck& ack);
  void on_batch_reply(const proto::Reply& r);
  void on_sequence_gap(uint32_t seq);
  void on_finished_reply(const proto::Reply& r);
  void on_winners_reply(const proto::Reply& r);
  void fail_protocol(std::string why);
  void fail_rejected(const proto::Reply& r);
  void fail_sequence_gap(uint32_t seq);
  void name_rejected_bet(uint32_t seq, uint16_t bet_index);

  SessionOptions _options;
  BetSource& _source;
  SessionListener& _listener;
  Phase _phase = Phase::starting;
  SessionFailure _failure;

  // HELLO, built once and sent first on every connection. Nothing else goes
  // out on a connection until its ack says what the server already stores.
  std::byte _hello[control_frame_bytes_max];
  size_t _hello_bytes = 0;
  size_t _hello_sent = 0;
  Link _link = Link::awaiting_hello;
  uint32_t _connections = 1;  // the current one included
  proto::Status _retry_status = proto::Status::ok;
  // The first HELLO ack said the agency already sent FINISHED (an earlier run).
  bool _finished_at_hello = false;

  // Control frame (FINISHED, WINNERS): at most one outstanding. It stays
  // here until answered, so a reconnect can send it again.
  std::byte _control[control_frame_bytes_max];
  size_t _control_bytes = 0;
  size_t _control_sent = 0;
  uint32_t _control_seq = 0;
  uint8_t _control_type = 0;
  bool _control_awaiting_reply = false;

  // The window, a ring indexed by seq: seqs (acked_through, built_through]
  // are in flight, (acked_through, sent_through] fully written.
  std::vector<Slot> _slots;
  std::vector<std::byte> _frames;  // inflight_max x batch_bytes_max
  std::vector<uint32_t> _lines;    // inflight_max x batch_bets_max
  uint32_t _acked_through = 0;
  uint32_t _sent_through = 0;
  uint32_t _built_through = 0;
  uint64_t _bets_built = 0;
  uint64_t _bets_acked = 0;  // bets in batches 1.._acked_through
  uint32_t _confirmed_by_hello = 0;
  uint64_t _progress = 0;
  bool _source_done = false;
  // A bet read from the source that did not fit in the previous batch.
  bool _have_carry = false;
  proto::Bet _carry;
  uint32_t _carry_line = 0;

  uint32_t _winners_start = 0;  // documents received so far
  uint32_t _next_seq = 0;       // seq of the next request after the batches

  std::vector<std::byte> _receive;
  size_t _received = 0;
};

}  // namespace lottery::client
