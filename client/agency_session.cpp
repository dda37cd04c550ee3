#include "client/agency_session.hpp"

#include <cstring>

#include "client/client_config.hpp"
#include "common/assert.hpp"

namespace lottery::client {
namespace {

// Which side a refusal points at decides the exit code the caller picks.
FailureKind classify(proto::Status s) {
  using proto::Status;
  switch (s) {
    // The server could not parse what we sent: a bug here or there, not bad data.
    case Status::bad_frame:
    case Status::frame_too_large:
    case Status::bad_checksum:
    case Status::unknown_type:
    case Status::malformed_body:
    // The server's stored stream and our numbering disagree: retrying the same
    // frames cannot fix that, and the bets are not at fault.
    case Status::sequence_gap:
    // Only a HELLO may get producer_busy, and that one is retried, never failed.
    case Status::producer_busy:
    // TLS: the key is another agency's, or the server wants a key we lack;
    // the configuration is wrong, not the bets.
    case Status::not_your_agency:
    case Status::tls_required:
      return FailureKind::protocol;
    // The server cannot take anything right now, whatever we send.
    case Status::storage_error:
    case Status::storage_full:
    case Status::shutting_down:
    case Status::too_many_connections:
      return FailureKind::refused;
    default:
      return FailureKind::rejected;
  }
}

// Connection errors that say "not now" rather than "not this": the server is
// full, or it cut a connection that was slow to identify itself or went quiet
// (a client throttled by loop.period, a stalled network). Retried with back-off.
bool transient_refusal(proto::Status s) {
  using proto::Status;
  return s == Status::too_many_connections || s == Status::handshake_timeout || s == Status::idle_timeout;
}

const char* header_check_name(proto::HeaderCheck c) {
  switch (c) {
    case proto::HeaderCheck::need_more:
      return "need_more";
    case proto::HeaderCheck::ok:
      return "ok";
    case proto::HeaderCheck::bad_version:
      return "bad version";
    case proto::HeaderCheck::bad_length:
      return "length below the header size";
    case proto::HeaderCheck::too_large:
      return "length over frame_bytes_max";
    case proto::HeaderCheck::bad_flags:
      return "unknown flags";
  }
  return "unknown";
}

}  // namespace

AgencySession::AgencySession(const SessionOptions& options, BetSource& source, SessionListener& listener)
    : _options(options), _source(source), _listener(listener) {
  LOTTERY_ASSERT(options.agency != 0);
  LOTTERY_ASSERT(options.inflight_max >= 1);
  LOTTERY_ASSERT(options.inflight_max <= inflight_batches_max);
  LOTTERY_ASSERT(options.batch_bets_max >= 1);
  LOTTERY_ASSERT(options.batch_bets_max <= limits::batch_bets_max);
  LOTTERY_ASSERT(options.batch_bytes_max >= batch_bytes_min);
  LOTTERY_ASSERT(options.batch_bytes_max <= limits::frame_bytes_max);
  // Every buffer the session will ever use, allocated here and only here.
  _slots.resize(options.inflight_max);
  _frames.resize(options.inflight_max * options.batch_bytes_max);
  _lines.resize(options.inflight_max * options.batch_bets_max);
  _receive.resize(receive_buffer_bytes);

  _hello_bytes = proto::encode_hello(_hello, sizeof _hello, hello_seq, options.agency, options.producer_id);
  LOTTERY_ASSERT(_hello_bytes > 0);
}

void AgencySession::restart_on_new_connection() {
  LOTTERY_ASSERT(!done() && !failed());
  _connections++;
  // Replies of the old connection, whole or partial, will never be completed.
  _received = 0;
  _hello_sent = 0;
  _link = Link::awaiting_hello;
  _retry_status = proto::Status::ok;
  // Whatever was in transit may or may not have arrived: the HELLO ack says.
  // Until then nothing is sent, and afterwards the window goes out again
  // from its first unacknowledged batch, the control request after it.
  _control_sent = 0;
  for (uint32_t seq = _acked_through + 1; seq <= _built_through; seq++) {
    slot(seq).sent_bytes = 0;
    slot(seq).gap = false;
  }
  _sent_through = _acked_through;
}

// ------------------------------------------------------------------ window

AgencySession::Slot& AgencySession::slot(uint32_t seq) {
  LOTTERY_ASSERT(seq >= 1);
  return _slots[(seq - 1) % _options.inflight_max];
}

std::byte* AgencySession::slot_frame(uint32_t seq) {
  return _frames.data() + ((seq - 1) % _options.inflight_max) * _options.batch_bytes_max;
}

uint32_t* AgencySession::slot_lines(uint32_t seq) {
  return _lines.data() + ((seq - 1) % _options.inflight_max) * _options.batch_bets_max;
}

proto::Bytes AgencySession::slot_bets(uint32_t seq) {
  constexpr size_t prefix = limits::frame_header_bytes + limits::batch_body_header_bytes;
  const Slot& s = slot(seq);
  LOTTERY_ASSERT(s.frame_bytes >= prefix);
  return {slot_frame(seq) + prefix, s.frame_bytes - prefix};
}

// Acks may come out of order (or from a HELLO ack); the window only slides
// over a contiguous prefix of acknowledged batches.
void AgencySession::slide_window() {
  while (_acked_through < _built_through && slot(_acked_through + 1).acked) {
    Slot& released = slot(_acked_through + 1);
    _bets_acked += released.count;
    released = Slot{};
    _acked_through++;
  }
  // After a reconnect, batches confirmed by the HELLO ack were never resent.
  if (_sent_through < _acked_through) _sent_through = _acked_through;
  // A sequence_gap that waited for the replies before it is real once they
  // are all acks (a rejection among them would have failed the session).
  if (_acked_through < _built_through && slot(_acked_through + 1).gap) fail_sequence_gap(_acked_through + 1);
}

void AgencySession::fill_window() {
  while (in_window() < _options.inflight_max && (!_source_done || _have_carry)) {
    if (!build_batch()) break;
  }
}

bool AgencySession::build_batch() {
  uint32_t seq = _built_through + 1;
  proto::BatchBuilder builder(slot_frame(seq), _options.batch_bytes_max, _options.agency, _options.batch_bets_max);
  uint32_t* lines = slot_lines(seq);
  if (_have_carry) {
    // Sources hand out validated bets and batch_bytes_min fits the largest
    // valid bet, so a bet always fits an empty batch.
    bool added = builder.add(_carry);
    LOTTERY_ASSERT(added);
    lines[0] = _carry_line;
    _have_carry = false;
  }
  while (!_source_done) {
    proto::Bet bet;
    uint32_t line = 0;
    if (!_source.next(bet, line)) {
      _source_done = true;
      break;
    }
    if (!builder.add(bet)) {
      _carry = bet;
      _carry_line = line;
      _have_carry = true;
      LOTTERY_ASSERT(!builder.empty());
      break;
    }
    lines[builder.count() - 1] = line;
  }
  if (builder.empty()) return false;
  Slot& s = slot(seq);
  LOTTERY_ASSERT(s.count == 0);  // the slot's previous batch was released
  s.seq = seq;
  s.count = builder.count();
  s.frame_bytes = builder.finish(seq);
  s.sent_bytes = 0;
  s.acked = false;
  _built_through = seq;
  _bets_built += s.count;
  return true;
}

void AgencySession::queue_control(size_t frame_bytes, uint32_t seq, uint8_t type) {
  LOTTERY_ASSERT(frame_bytes > 0);
  LOTTERY_ASSERT(!_control_awaiting_reply);
  _control_bytes = frame_bytes;
  _control_sent = 0;
  _control_seq = seq;
  _control_type = type;
  _control_awaiting_reply = true;
}

void AgencySession::queue_winners_query() {
  uint32_t seq = _next_seq++;
  size_t n = proto::encode_winners_query(_control, sizeof _control, seq, _options.agency, _winners_start);
  queue_control(n, seq, static_cast<uint8_t>(proto::MsgType::winners));
}

void AgencySession::go_to_winners() {
  _phase = Phase::winners;
  _next_seq = _built_through + 1;
  queue_winners_query();
}

// Called whenever the window may have drained: once every bet is acked the
// session moves on to FINISHED (or ends, in single-bet mode without --finish).
void AgencySession::after_bets_acked() {
  if (_phase != Phase::betting) return;
  fill_window();
  bool all_acked = _source_done && !_have_carry && _acked_through == _built_through;
  if (!all_acked) return;
  if (!_options.finish) {
    _phase = Phase::done;
    return;
  }
  // An earlier run already said FINISHED (a re-run of a single bet the server
  // stores): a second one would be refused, and the winners are what is left.
  if (_finished_at_hello) return go_to_winners();
  _phase = Phase::finishing;
  _next_seq = _built_through + 1;
  uint32_t seq = _next_seq++;
  size_t n = proto::encode_finished(_control, sizeof _control, seq, _options.agency);
  queue_control(n, seq, static_cast<uint8_t>(proto::MsgType::finished));
}

proto::Bytes AgencySession::pending_output() {
  if (!reading()) return {};
  if (_hello_sent < _hello_bytes) return {_hello + _hello_sent, _hello_bytes - _hello_sent};
  if (_link != Link::identified) return {};
  if (_control_sent < _control_bytes) return {_control + _control_sent, _control_bytes - _control_sent};
  if (_phase != Phase::betting) return {};
  fill_window();
  if (_sent_through == _built_through) return {};
  uint32_t seq = _sent_through + 1;
  const Slot& s = slot(seq);
  return {slot_frame(seq) + s.sent_bytes, s.frame_bytes - s.sent_bytes};
}

// Mirrors pending_output(): HELLO, then the control frame, then batches.
void AgencySession::on_sent(size_t n) {
  if (_hello_sent < _hello_bytes) {
    LOTTERY_ASSERT(n <= _hello_bytes - _hello_sent);
    _hello_sent += n;
    return;
  }
  LOTTERY_ASSERT(_link == Link::identified);
  if (_control_sent < _control_bytes) {
    LOTTERY_ASSERT(n <= _control_bytes - _control_sent);
    _control_sent += n;
    return;
  }
  LOTTERY_ASSERT(_sent_through < _built_through);
  Slot& s = slot(_sent_through + 1);
  LOTTERY_ASSERT(n <= s.frame_bytes - s.sent_bytes);
  s.sent_bytes += n;
  if (s.sent_bytes == s.frame_bytes) _sent_through++;
}

// ------------------------------------------------------------------ replies

std::span<std::byte> AgencySession::receive_space() {
  LOTTERY_ASSERT(_received < _receive.size());
  return {_receive.data() + _received, _receive.size() - _received};
}

void AgencySession::on_received(size_t n) {
  LOTTERY_ASSERT(n <= _receive.size() - _received);
  _received += n;
  size_t offset = 0;
  while (reading()) {
    proto::FrameHeader h;
    const std::byte* at = _receive.data() + offset;
    size_t available = _received - offset;
    proto::HeaderCheck check = proto::parse_header(at, available, limits::frame_bytes_max, h);
    if (check == proto::HeaderCheck::need_more) break;
    if (check != proto::HeaderCheck::ok) {
      fail_protocol(std::string("reply with an invalid frame header: ") + header_check_name(check));
      break;
    }
    if (available < h.length) break;
    handle_frame(proto::Bytes(at, h.length));
    offset += h.length;
  }
  // Keep the partial frame, if any, at the front. Frames are small next to
  // the buffer, so this moves a few bytes at most once per read.
  if (offset > 0) {
    std::memmove(_receive.data(), _receive.data() + offset, _received - offset);
    _received -= offset;
  }
}

void AgencySession::handle_frame(proto::Bytes frame) {
  proto::Reply r;
  if (!proto::decode_reply(frame, r)) return fail_protocol("undecodable reply (bad checksum or body layout)");
  if (r.status == proto::Status::shutting_down) {
    // The server is stopping, most likely to restart: what it stores is kept,
    // and a new connection picks the stream up where it stands.
    _retry_status = r.status;
    return;
  }
  if (r.answers == proto::connection_error_type) {
    if (transient_refusal(r.status)) {
      // Nothing we sent is at fault and nothing stored is lost: a new
      // connection, after the reconnect loop's back-off, resumes the stream.
      _retry_status = r.status;
      return;
    }
    _failure = SessionFailure{};
    _failure.kind = FailureKind::refused;
    _failure.request_type = proto::connection_error_type;
    _failure.status = r.status;
    _failure.reason = std::string(r.reason);
    _phase = Phase::failed;
    return;
  }
  switch (static_cast<proto::MsgType>(r.answers)) {
    case proto::MsgType::hello:
      on_hello_reply(r);
      break;
    case proto::MsgType::batch:
      on_batch_reply(r);
      break;
    case proto::MsgType::finished:
      on_finished_reply(r);
      break;
    case proto::MsgType::winners:
      on_winners_reply(r);
      break;
    default:
      fail_protocol("reply of unknown type " + std::to_string(r.header.type));
      break;
  }
}

void AgencySession::fail_protocol(std::string why) {
  _failure = SessionFailure{};
  _failure.kind = FailureKind::protocol;
  _failure.reason = std::move(why);
  _phase = Phase::failed;
}

void AgencySession::fail_rejected(const proto::Reply& r) {
  _failure = SessionFailure{};
  _failure.kind = classify(r.status);
  _failure.request_type = r.answers;
  _failure.seq = r.header.seq;
  _failure.status = r.status;
  _failure.bet_index = r.bet_index;
  _failure.reason = std::string(r.reason);
  _phase = Phase::failed;
}

void AgencySession::fail_sequence_gap(uint32_t seq) {
  _failure = SessionFailure{};
  _failure.kind = FailureKind::protocol;
  _failure.request_type = static_cast<uint8_t>(proto::MsgType::batch);
  _failure.seq = seq;
  _failure.status = proto::Status::sequence_gap;
  _failure.reason = "the server refused batch " + std::to_string(seq) + " as out of sequence although batches 1.." +
                    std::to_string(seq - 1) +
                    " are acknowledged: its stored stream for this producer and the client's numbering disagree "
                    "(another client sending as the same producer?)";
  _phase = Phase::failed;
}

// ------------------------------------------------------------------ hello

void AgencySession::on_hello_reply(const proto::Reply& r) {
  if (_link != Link::awaiting_hello || r.header.seq != hello_seq) return fail_protocol("unexpected HELLO reply");
  if (r.status == proto::Status::producer_busy) {
    // Another connection still holds this producer (often our own previous
    // one, not yet closed on the server's side): come back shortly.
    _retry_status = r.status;
    return;
  }
  if (r.status != proto::Status::ok) return fail_rejected(r);
  proto::HelloAck ack;
  if (!proto::decode_hello_ack(r, ack)) return fail_protocol("malformed HELLO ack");
  if (!check_hello_ack(ack)) return;
  _link = Link::identified;
  _listener.on_hello_acked(ack);
  if (_phase == Phase::starting) {
    // A first HELLO that needed more than one connection (producer_busy, a
    // drop before its ack) had nothing in flight to settle.
    if (_connections > 1) _listener.on_reconnected(ack, 0, 0);
    return start_from(ack);
  }
  resume_after_reconnect(ack);
}

bool AgencySession::check_hello_ack(const proto::HelloAck& ack) {
  if (ack.agency != _options.agency) {
    fail_protocol("HELLO ack names agency " + std::to_string(ack.agency));
    return false;
  }
  // Batch seqs are u32 on the wire; and every stored batch holds a bet.
  if (ack.stored_seq >= UINT32_MAX || (ack.stored_seq == 0) != (ack.producer_bets == 0) ||
      ack.producer_bets < ack.stored_seq) {
    fail_protocol("HELLO ack reports " + std::to_string(ack.stored_seq) + " stored batches holding " +
                  std::to_string(ack.producer_bets) + " bets");
    return false;
  }
  return true;
}

// The first HELLO of the session: where does this producer's stream stand?
void AgencySession::start_from(const proto::HelloAck& ack) {
  if (_options.mode == SessionMode::agency && ack.finished) {
    // The agency already said finished (an earlier run): the server would
    // refuse every bet, and the winners are all that is left to ask for.
    return go_to_winners();
  }
  if (ack.stored_seq > 0 && !skip_stored_prefix(ack)) return;
  _finished_at_hello = ack.finished;
  _phase = Phase::betting;
  after_bets_acked();
}

// An earlier run of this producer got batches 1..stored_seq stored: skip
// their bets and number on from stored_seq + 1. Stored seqs are a prefix, so
// the bets to skip are exactly the first producer_bets of the source.
bool AgencySession::skip_stored_prefix(const proto::HelloAck& ack) {
  LOTTERY_ASSERT(_built_through == 0);
  for (uint64_t skipped = 0; skipped < ack.producer_bets; skipped++) {
    proto::Bet bet;
    uint32_t line = 0;
    if (_source.next(bet, line)) continue;
    _failure = SessionFailure{};
    _failure.kind = FailureKind::input_mismatch;
    _failure.reason = "the server already stores " + std::to_string(ack.producer_bets) +
                      " bets of this producer (batches 1.." + std::to_string(ack.stored_seq) +
                      ") but the source holds only " + std::to_string(skipped) +
                      ": the data file changed since the earlier run; restore it, or pass --producer-id to send "
                      "it as a new stream";
    _phase = Phase::failed;
    return false;
  }
  _built_through = _sent_through = _acked_through = static_cast<uint32_t>(ack.stored_seq);
  _bets_built = _bets_acked = ack.producer_bets;
  _listener.on_resumed(ack.stored_seq, ack.producer_bets);
  return true;
}

// HELLO on a new connection after a drop: settle what was in transit.
void AgencySession::resume_after_reconnect(const proto::HelloAck& ack) {
  uint32_t confirmed_before = _confirmed_by_hello;
  if (_phase == Phase::betting || _phase == Phase::finishing) {
    if (!drop_stored_batches(ack)) return;
  }
  // Every batch was acked before FINISHED went out; if the server marked the
  // agency finished, only FINISHED's ack was lost. Otherwise FINISHED, still
  // queued, goes out again.
  if (_phase == Phase::finishing && ack.finished) {
    _control_awaiting_reply = false;
    _control_bytes = _control_sent = 0;
    _progress++;
    _listener.on_finished_acked(_bets_built, ack.bets_stored);
    _phase = Phase::winners;
    queue_winners_query();
  }
  // A winners query left unanswered is still queued with the same `start`.
  _listener.on_reconnected(ack, _confirmed_by_hello - confirmed_before, in_window());
  if (_phase == Phase::betting) after_bets_acked();
}

// Window batches with seq <= stored_seq were stored before the drop: treat
// them as acknowledged. The rest go out again, in seq order.
bool AgencySession::drop_stored_batches(const proto::HelloAck& ack) {
  uint64_t stored = ack.stored_seq;
  if (stored < _acked_through) {
    fail_protocol("after reconnecting, the server reports " + std::to_string(stored) +
                  " stored batches for this producer, but " + std::to_string(_acked_through) +
                  " were acknowledged: acknowledged batches were lost on the server");
    return false;
  }
  if (stored > _built_through) {
    fail_protocol("after reconnecting, the server reports " + std::to_string(stored) +
                  " stored batches for this producer, but this client built only " + std::to_string(_built_through) +
                  " (another client sending as the same producer?)");
    return false;
  }
  for (uint32_t seq = _acked_through + 1; seq <= stored; seq++) {
    Slot& s = slot(seq);
    if (s.acked) continue;
    s.acked = true;
    _confirmed_by_hello++;
    _progress++;
    _listener.on_batch_acked(seq, s.count, slot_bets(seq));
  }
  slide_window();
  if (failed()) return false;
  // Paired check: an ack is a promise that the batch is stored.
  for (uint32_t seq = _acked_through + 1; seq <= _built_through; seq++) {
    if (!slot(seq).acked) continue;
    fail_protocol("batch " + std::to_string(seq) +
                  " was acknowledged, but after reconnecting the server reports only " + std::to_string(stored) +
                  " stored batches for this producer");
    return false;
  }
  if (ack.producer_bets != _bets_acked) {
    fail_protocol("after reconnecting, the server reports " + std::to_string(ack.producer_bets) +
                  " bets stored for this producer in batches 1.." + std::to_string(stored) + ", the client sent " +
                  std::to_string(_bets_acked));
    return false;
  }
  return true;
}

// ------------------------------------------------------------------ batches

void AgencySession::on_batch_reply(const proto::Reply& r) {
  uint32_t seq = r.header.seq;
  if (_phase != Phase::betting || seq <= _acked_through || seq > _sent_through || slot(seq).acked || slot(seq).gap)
    return fail_protocol("reply to batch " + std::to_string(seq) + ", which is not in flight");
  Slot& s = slot(seq);
  if (r.status == proto::Status::sequence_gap) return on_sequence_gap(seq);
  if (r.status != proto::Status::ok) {
    fail_rejected(r);
    name_rejected_bet(seq, r.bet_index);
    return;
  }
  uint16_t count = 0;
  if (!proto::decode_batch_ack(r, count)) return fail_protocol("malformed batch ack");
  if (count != s.count)
    return fail_protocol("batch " + std::to_string(seq) + " acked with " + std::to_string(count) + " bets, sent " +
                         std::to_string(s.count));
  s.acked = true;
  _progress++;
  _listener.on_batch_acked(seq, count, slot_bets(seq));
  slide_window();
  after_bets_acked();
}

// The server refuses every batch after a rejected one with sequence_gap (a
// rejected batch does not take its seq). So a gap behind a batch still
// awaiting its reply waits for that reply: if it is a rejection, that is the
// cause to report; if it is an ack, slide_window() reports the gap.
void AgencySession::on_sequence_gap(uint32_t seq) {
  if (seq == _acked_through + 1) return fail_sequence_gap(seq);
  slot(seq).gap = true;
}

// Names the rejected bet: its line in the source and its document.
void AgencySession::name_rejected_bet(uint32_t seq, uint16_t bet_index) {
  if (bet_index >= slot(seq).count) return;
  _failure.line = slot_lines(seq)[bet_index];
  proto::BetCursor cursor(slot_bets(seq));
  proto::Bet bet;
  for (uint16_t i = 0; i <= bet_index && cursor.next(bet); i++) {
    if (i == bet_index) {
      _failure.document = std::string(bet.document);
      _failure.number = bet.number;
    }
  }
}

// ------------------------------------------------------------------ finishing

void AgencySession::on_finished_reply(const proto::Reply& r) {
  if (_phase != Phase::finishing || r.header.seq != _control_seq) return fail_protocol("unexpected FINISHED reply");
  if (r.status != proto::Status::ok) return fail_rejected(r);
  uint64_t stored = 0;
  if (!proto::decode_finished_ack(r, stored)) return fail_protocol("malformed FINISHED ack");
  _control_awaiting_reply = false;
  _progress++;
  _listener.on_finished_acked(_bets_built, stored);
  _phase = Phase::winners;
  queue_winners_query();
}

void AgencySession::on_winners_reply(const proto::Reply& r) {
  if (_phase != Phase::winners || r.header.seq != _control_seq) return fail_protocol("unexpected WINNERS reply");
  if (r.status != proto::Status::ok) return fail_rejected(r);
  proto::WinnersPage page;
  if (!proto::decode_winners_page(r, page)) return fail_protocol("malformed winners page");
  if (page.start != _winners_start)
    return fail_protocol("winners page starts at " + std::to_string(page.start) + ", asked for " +
                         std::to_string(_winners_start));
  _control_awaiting_reply = false;
  _progress++;
  proto::Bytes cursor = page.documents;
  std::string_view document;
  while (proto::next_document(cursor, document)) _listener.on_winner(document);
  _winners_start += page.count;
  if (_winners_start >= page.total) {
    _listener.on_winners_received(page.total);
    _phase = Phase::done;
    return;
  }
  // An empty page before the end would make us ask for the same page forever.
  if (page.count == 0) return fail_protocol("empty winners page before the last one");
  queue_winners_query();
}

}  // namespace lottery::client
