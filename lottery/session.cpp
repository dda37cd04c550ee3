#include "lottery/session.hpp"

#include <cstring>
#include <iterator>

#include "common/assert.hpp"
#include "common/log.hpp"

namespace lottery {

namespace log = common::log;
using proto::MsgType;
using proto::Status;

namespace {
// Room a reply may need; a frame is handled only when this much output space
// is free, so a reply is never dropped for lack of buffer.
constexpr size_t reply_bytes_max = limits::frame_bytes_max;
constexpr uint64_t today_refresh_ms = 1000;
// A connection at its pending-reply cap must still find room for one more
// reply, or the request that tipped it over would lose its answer.
static_assert(limits::pending_reply_bytes_default + reply_bytes_max <= reactor::limits::output_buffer_bytes);
static_assert(limits::pending_reply_bytes_default < reactor::limits::output_buffer_bytes);
constexpr const char* refusal_reason = "the server is at its connection limit; retry later";

const char* drop_action(bool refused) { return refused ? "conexion_rechazada" : "conexion_cerrada"; }
// By LotteryService::Drop.
constexpr const char* drop_names[] = {"too_many_connections", "handshake_timeout", "idle_timeout",
                                      "replies_not_read"};
const char* drop_name(int why) { return drop_names[why]; }
}  // namespace

reactor::Options reactor_options_for(const ServiceOptions& options) {
  return reactor::Options{.max_connections = options.connections_max + limits::refusal_slots,
                          .output_pause_bytes = options.pending_reply_bytes_max};
}

std::vector<std::byte> refusal_frame() {
  std::vector<std::byte> frame(limits::frame_header_bytes + 6 + limits::reply_reason_bytes_max);
  size_t n = proto::encode_error_reply(frame.data(), frame.size(), proto::connection_error_type, 0,
                                       Status::too_many_connections, proto::no_bet_index, refusal_reason);
  LOTTERY_ASSERT(n > 0);
  frame.resize(n);
  return frame;
}

std::vector<std::byte> tls_required_frame() {
  std::vector<std::byte> frame(limits::frame_header_bytes + 6 + limits::reply_reason_bytes_max);
  size_t n = proto::encode_error_reply(frame.data(), frame.size(), proto::connection_error_type, 0,
                                       Status::tls_required, proto::no_bet_index,
                                       "this server requires TLS with the agency's key (--tls-key)");
  LOTTERY_ASSERT(n > 0);
  frame.resize(n);
  return frame;
}

LotteryService::LotteryService(reactor::Reactor& reactor, reactor::Link& link, store::Store& store,
                               control::Control& control, control::ProducerLocks& producer_locks,
                               ServiceOptions options)
    : _reactor(reactor),
      _link(link),
      _store(store),
      _control(control),
      _producer_locks(producer_locks),
      _slot(control.worker(options.worker_id)),
      _options(std::move(options)),
      _acks(reactor, store, _slot.syncs,
            {_options.durability, _options.group_window_ms, _options.group_batches_max}, &release_ack, this) {
  LOTTERY_ASSERT(_options.agencies >= 1 && _options.agencies <= limits::agencies_max);
  LOTTERY_ASSERT(_options.agencies == control.agencies());
  LOTTERY_ASSERT(_options.worker_id < control::workers_max);
  LOTTERY_ASSERT(_options.group_batches_max >= 1);
  LOTTERY_ASSERT(_options.connections_max >= 1);
  LOTTERY_ASSERT(_options.frame_bytes_max >= limits::frame_bytes_min);
  LOTTERY_ASSERT(_options.frame_bytes_max <= limits::frame_bytes_max);
  LOTTERY_ASSERT(_options.batch_bets_max >= 1 && _options.batch_bets_max <= limits::batch_bets_max);
  LOTTERY_ASSERT(_options.unidentified_bytes_max >= limits::hello_frame_bytes);
  LOTTERY_ASSERT(_options.pending_reply_bytes_max >= limits::pending_reply_bytes_min);
  LOTTERY_ASSERT(_options.pending_reply_bytes_max <= limits::pending_reply_bytes_default);
  LOTTERY_ASSERT(_options.sweep_interval_ms >= 1);
  _sessions.resize(reactor_options_for(_options).max_connections);
  static_assert(std::size(drop_names) == static_cast<size_t>(Drop::count));
  // This worker's row of per-agency counts starts from what its segments hold.
  for (uint32_t a = 0; a <= _options.agencies; a++)
    _control.layout().bets_stored[_options.worker_id][a].store(_store.bets_stored(static_cast<uint16_t>(a)));
  load_results_if_done();
  _sweep_timer = _reactor.add_timer(_options.sweep_interval_ms, [this] { sweep(); });
}

LotteryService::~LotteryService() {
  if (_sweep_timer != 0) _reactor.cancel_timer(_sweep_timer);
}

size_t LotteryService::waiting_queries() const {
  size_t n = 0;
  for (const Session& s : _sessions) n += s.open && s.waiting_winners ? 1 : 0;
  return n;
}

LotteryService::Session* LotteryService::session(reactor::ConnId id) {
  if (id.slot >= _sessions.size()) return nullptr;
  Session& s = _sessions[id.slot];
  return s.open && s.id == id ? &s : nullptr;
}

void LotteryService::on_open(reactor::ConnId id) {
  LOTTERY_ASSERT(id.slot < _sessions.size());
  uint64_t now = reactor::Reactor::now_ms();
  Session& s = _sessions[id.slot];
  s = Session{.open = true, .id = id, .opened_ms = now, .last_request_ms = now};
  if (_shutting_down) {
    reply_error(s, proto::connection_error_type, 0, Status::shutting_down, proto::no_bet_index,
                "server is shutting down");
    _link.close(id, reactor::Flush::yes);
    return;
  }
  if (!admit()) {
    refuse(s);
    return;
  }
  s.admitted = true;
  _counters.connections++;
  _slot.connections_total.fetch_add(1, std::memory_order_relaxed);
}

bool LotteryService::admit() {
  if (_admitted >= _options.connections_max) return false;
  // Counted first, then the sum checked, both sequentially consistent: two
  // workers admitting at the same moment may both refuse near the cap, but
  // never both admit past it. A dead worker's count is reset by the master.
  _slot.connections_open.fetch_add(1, std::memory_order_seq_cst);
  uint64_t total = 0;
  for (size_t w = 0; w < control::workers_max; w++)
    total += _control.worker(w).connections_open.load(std::memory_order_seq_cst);
  if (total > _options.connections_total_max) {
    _slot.connections_open.fetch_sub(1, std::memory_order_seq_cst);
    return false;
  }
  _admitted++;
  return true;
}

void LotteryService::refuse(Session& s) {
  _counters.refused++;
  _slot.connections_refused.fetch_add(1, std::memory_order_relaxed);
  note_drop(Drop::refused, s.opened_ms);
  reply_error(s, proto::connection_error_type, 0, Status::too_many_connections, proto::no_bet_index, refusal_reason);
  _link.close(s.id, reactor::Flush::yes);
}

void LotteryService::on_close(reactor::ConnId id, reactor::CloseReason reason) {
  Session* s = session(id);
  if (s == nullptr) return;
  release_producer(*s);
  if (s->admitted) {
    _slot.connections_open.fetch_sub(1, std::memory_order_seq_cst);
    LOTTERY_ASSERT(_admitted > 0);
    _admitted--;
  }
  uint64_t now = reactor::Reactor::now_ms();
  if (reason == reactor::CloseReason::input_overflow) {
    _counters.stalled++;
    _slot.connections_dropped.fetch_add(1, std::memory_order_relaxed);
    note_drop(Drop::replies_not_read, now);
  }
  // Its last replies may still be on their way out: a peer that does not take
  // them is cut off at linger_until_ms (see sweep).
  *s = Session{.lingering = true, .id = id, .linger_until_ms = now + _options.reply_stall_timeout_ms};
}

// ---------------------------------------------------------------- deadlines

void LotteryService::sweep() {
  _sweep_timer = 0;
  uint64_t now = reactor::Reactor::now_ms();
  for (Session& s : _sessions) {
    if (s.lingering) {
      if (now >= s.linger_until_ms) {
        s.lingering = false;
        _link.abort(s.id);  // a no-op when it is long gone
      }
      continue;
    }
    if (!s.open || !s.admitted) continue;
    // Paused at the pending-reply cap: dropped if the peer does not start
    // taking its replies again within the stall timeout.
    if (_link.queued_output(s.id) > _options.pending_reply_bytes_max) {
      if (s.stalled_since_ms == 0) {
        s.stalled_since_ms = now;
      } else if (now - s.stalled_since_ms >= _options.reply_stall_timeout_ms) {
        _counters.stalled++;
        _slot.connections_dropped.fetch_add(1, std::memory_order_relaxed);
        note_drop(Drop::replies_not_read, now);
        _link.abort(s.id);  // its output is full: no room for a last word
        continue;
      }
    } else {
      s.stalled_since_ms = 0;
    }
    if (s.agency == 0) {
      if (now - s.opened_ms >= _options.handshake_timeout_ms)
        expire(s, Status::handshake_timeout, Drop::handshake_timeout, "no hello within the handshake deadline");
      continue;
    }
    // A held winners query is a connection waiting for us, not an idle one.
    if (!s.waiting_winners && now - s.last_request_ms >= _options.idle_timeout_ms)
      expire(s, Status::idle_timeout, Drop::idle_timeout, "no request within the idle timeout");
  }
  // Connections the reactor refused on its own (every slot taken, the
  // refusal slots too) count as refused here.
  uint64_t refused_full = _reactor.stats().refused_full;
  if (refused_full > _reactor_refused_seen) {
    uint64_t n = refused_full - _reactor_refused_seen;
    _reactor_refused_seen = refused_full;
    _counters.refused += n;
    _slot.connections_refused.fetch_add(n, std::memory_order_relaxed);
    note_drop(Drop::refused, now, n);
  }
  flush_drop_logs(now);
  _sweep_timer = _reactor.add_timer(_options.sweep_interval_ms, [this] { sweep(); });
}

void LotteryService::expire(Session& s, Status status, Drop why, const char* reason) {
  if (why == Drop::handshake_timeout) _counters.handshake_timeouts++;
  else _counters.idle_timeouts++;
  _slot.connections_timed_out.fetch_add(1, std::memory_order_relaxed);
  note_drop(why, reactor::Reactor::now_ms());
  reply_error(s, proto::connection_error_type, 0, status, proto::no_bet_index, reason);
  _link.close(s.id, reactor::Flush::yes);
}

void LotteryService::note_drop(Drop why, uint64_t now_ms, uint64_t count) {
  DropLog& d = _drop_logs[static_cast<size_t>(why)];
  d.since_logged += count;
  // The first drop after a quiet interval is reported at once; later ones are
  // counted and reported together when the interval is over (flush_drop_logs).
  if (d.last_logged_ms == 0 || now_ms - d.last_logged_ms >= limits::connection_log_interval_ms)
    flush_drop_logs(now_ms);
}

void LotteryService::flush_drop_logs(uint64_t now_ms, bool force) {
  for (size_t i = 0; i < static_cast<size_t>(Drop::count); i++) {
    DropLog& d = _drop_logs[i];
    if (d.since_logged == 0) continue;
    if (!force && d.last_logged_ms != 0 && now_ms - d.last_logged_ms < limits::connection_log_interval_ms) continue;
    log::warning(drop_action(i == static_cast<size_t>(Drop::refused)), log::Outcome::fail,
                 {{"worker", _options.worker_id}, {"motivo", drop_name(static_cast<int>(i))},
                  {"conexiones", d.since_logged}, {"intervalo_ms", limits::connection_log_interval_ms}});
    d.since_logged = 0;
    d.last_logged_ms = now_ms;
  }
}

size_t LotteryService::on_data(reactor::ConnId id, std::span<const std::byte> data) {
  Session* s = session(id);
  if (s == nullptr) return data.size();
  size_t used = 0;
  while (data.size() - used >= 4) {
    // At the pending-reply cap the requests wait where they are (the reactor
    // has stopped reading too) until the peer takes its replies.
    if (_link.queued_output(id) > _options.pending_reply_bytes_max) break;
    const std::byte* p = data.data() + used;
    size_t avail = data.size() - used;
    proto::FrameHeader h;
    auto check = proto::parse_header(p, avail, _options.frame_bytes_max, h);
    if (check == proto::HeaderCheck::need_more) break;
    if (check != proto::HeaderCheck::ok) {
      Status st = check == proto::HeaderCheck::too_large ? Status::frame_too_large : Status::bad_frame;
      const char* why = check == proto::HeaderCheck::too_large ? "frame length over max_frame_bytes"
                        : check == proto::HeaderCheck::bad_version ? "unsupported protocol version"
                        : check == proto::HeaderCheck::bad_flags   ? "reserved flags are not zero"
                                                                   : "frame length shorter than its header";
      _counters.protocol_errors++;
      _slot.errors.fetch_add(1, std::memory_order_relaxed);
      log::warning("frame", log::Outcome::fail, {{"agencia", s->agency}, {"code", proto::status_name(st)}, {"reason", why}});
      reply_error(*s, proto::connection_error_type, 0, st, proto::no_bet_index, why);
      _link.close(id, reactor::Flush::yes);
      return data.size();
    }
    // Before a successful hello a connection is a stranger: it may send a
    // few small frames (hello retries), not bulk. Decided from the header,
    // before any of the body is buffered.
    if (s->agency == 0 && s->unidentified_bytes + h.length > _options.unidentified_bytes_max) {
      const char* why = "more than max_unidentified_bytes sent before a successful hello";
      _counters.protocol_errors++;
      _slot.errors.fetch_add(1, std::memory_order_relaxed);
      log::warning("frame", log::Outcome::fail, {{"agencia", 0}, {"code", "not_identified"}, {"reason", why}});
      reply_error(*s, proto::connection_error_type, 0, Status::not_identified, proto::no_bet_index, why);
      _link.close(id, reactor::Flush::yes);
      return data.size();
    }
    if (avail < h.length) break;  // the rest of the frame is still on its way
    // Back-pressure: handle a frame only when its reply surely fits.
    if (_link.send_space(id) < reply_bytes_max) break;
    proto::Bytes body(p + limits::frame_header_bytes, h.length - limits::frame_header_bytes);
    used += h.length;
    if (s->agency == 0) s->unidentified_bytes += h.length;
    s->last_request_ms = reactor::Reactor::now_ms();
    if (!proto::body_crc_matches(h, body)) {
      _counters.protocol_errors++;
      _slot.errors.fetch_add(1, std::memory_order_relaxed);
      log::warning("frame", log::Outcome::fail, {{"agencia", s->agency}, {"code", "bad_checksum"}, {"seq", h.seq}});
      reply_error(*s, h.type, h.seq, Status::bad_checksum, proto::no_bet_index, "body checksum mismatch");
      _link.close(id, reactor::Flush::yes);
      return data.size();
    }
    if (handle_frame(*s, h, body) == Outcome::close) {
      _link.close(id, reactor::Flush::yes);
      return data.size();
    }
    s = session(id);
    if (s == nullptr) return data.size();
  }
  return used;
}

LotteryService::Outcome LotteryService::handle_frame(Session& s, const proto::FrameHeader& h, proto::Bytes body) {
  if (_shutting_down) {
    reply_error(s, h.type, h.seq, Status::shutting_down, proto::no_bet_index, "server is shutting down");
    return Outcome::close;
  }
  switch (h.type) {
    case static_cast<uint8_t>(MsgType::hello): return handle_hello(s, h, body);
    case static_cast<uint8_t>(MsgType::batch): return handle_batch(s, h, body);
    case static_cast<uint8_t>(MsgType::finished): return handle_finished(s, h, body);
    case static_cast<uint8_t>(MsgType::winners): return handle_winners(s, h, body);
    default:
      _counters.protocol_errors++;
      _slot.errors.fetch_add(1, std::memory_order_relaxed);
      reply_error(s, h.type, h.seq, Status::unknown_type, proto::no_bet_index, "unknown request type");
      return Outcome::close;
  }
}

void LotteryService::reply_error(Session& s, uint8_t request_type, uint32_t seq, Status status, uint16_t bet_index,
                                 std::string_view reason) {
  std::byte* dst = _link.reserve_send(s.id, reply_bytes_max);
  if (dst == nullptr) return;  // connection gone or hopelessly behind: it will be closed
  size_t n = proto::encode_error_reply(dst, reply_bytes_max, request_type, seq, status, bet_index, reason);
  _link.commit_send(s.id, n);
}

LotteryService::Outcome LotteryService::handle_hello(Session& s, const proto::FrameHeader& h, proto::Bytes body) {
  proto::HelloRequest req;
  if (!proto::decode_hello(body, req)) {
    reply_error(s, h.type, h.seq, Status::malformed_body, proto::no_bet_index, "hello body has the wrong size");
    return Outcome::close;
  }
  // Over TLS the agency was proven by the handshake's key; a hello cannot
  // claim another.
  if (uint32_t proven = _link.peer_identity(s.id); proven != 0 && req.agency != proven) {
    refuse_other_agency(s, h, req.agency);
    return Outcome::close;
  }
  if (req.agency < 1 || req.agency > _options.agencies) {
    reply_error(s, h.type, h.seq, Status::invalid_agency, proto::no_bet_index, "agency is not a known agency");
    return Outcome::keep;
  }
  if (s.agency != 0 && s.agency != req.agency) {
    reply_error(s, h.type, h.seq, Status::agency_mismatch, proto::no_bet_index,
                "connection already identified as another agency");
    return Outcome::close;
  }
  if (s.producer >= 0 && s.producer_id != req.producer_id) release_producer(s);
  if (s.producer < 0) {
    control::ProducerSlot* slot = control::find_or_insert_producer(_control, req.agency, req.producer_id);
    if (slot == nullptr) {
      reply_error(s, h.type, h.seq, Status::storage_error, proto::no_bet_index, "producer table is full");
      return Outcome::keep;
    }
    size_t index = control::producer_index(_control, slot);
    // One connection at a time owns a producer's stream: in this worker (the
    // OFD lock does not exclude ourselves) and across workers (it does).
    bool held_here = false;
    for (const Session& other : _sessions)
      if (other.open && other.producer == static_cast<int64_t>(index)) held_here = true;
    if (held_here || !_producer_locks.try_lock(index)) {
      reply_error(s, h.type, h.seq, Status::producer_busy, proto::no_bet_index,
                  "another connection holds this producer's stream; retry shortly");
      return Outcome::keep;
    }
    s.producer = static_cast<int64_t>(index);
    if (auto st = control::resolve_pending(_control, *slot); !st) {
      log::error("productor", log::Outcome::fail, {{"agencia", req.agency}, {"error", st.error().message}});
    }
  }
  s.agency = req.agency;
  s.producer_id = req.producer_id;
  const control::ProducerSlot& producer = _control.layout().producers[s.producer];
  proto::HelloAck ack;
  ack.agency = s.agency;
  ack.finished = _control.finished(s.agency);
  ack.draw_done = _control.draw_state() == control::DrawState::done;
  ack.stored_seq = producer.last_seq.load();
  ack.producer_bets = producer.bets.load();
  ack.bets_stored = _control.bets_stored(s.agency);
  ack.worker = _options.worker_id;
  log::debug("hello", log::Outcome::success, {{"agencia", s.agency}});
  std::byte* dst = _link.reserve_send(s.id, reply_bytes_max);
  LOTTERY_ASSERT(dst != nullptr);  // on_data checked the room
  _link.commit_send(s.id, proto::encode_hello_ack(dst, reply_bytes_max, h.seq, ack));
  return Outcome::keep;
}

LotteryService::Outcome LotteryService::handle_batch(Session& s, const proto::FrameHeader& h, proto::Bytes body) {
  proto::BatchInfo info;
  auto reject = [&](Status st, uint16_t index, const char* why) {
    _counters.batches_rejected++;
    _slot.errors.fetch_add(1, std::memory_order_relaxed);
    log::info("apuesta_recibida", log::Outcome::fail,
              {{"cantidad", info.count}, {"agencia", s.agency}, {"seq", h.seq}, {"code", proto::status_name(st)},
               {"bet_index", index == proto::no_bet_index ? -1 : int{index}}, {"reason", why}});
    reply_error(s, h.type, h.seq, st, index, why);
    return Outcome::keep;
  };
  if (!proto::read_batch_header(body, info))
    return reject(Status::malformed_body, proto::no_bet_index, "batch body shorter than its header");
  if (s.agency == 0) return reject(Status::not_identified, proto::no_bet_index, "send hello before bets");
  if (info.agency != s.agency && _link.peer_identity(s.id) != 0) {
    _counters.batches_rejected++;
    refuse_other_agency(s, h, info.agency);
    return Outcome::close;
  }
  if (info.agency != s.agency)
    return reject(Status::agency_mismatch, proto::no_bet_index, "batch agency is not the connection's agency");

  // Held from before the state checks until after the commit, so closing the
  // betting either sees this batch committed or makes us refuse it.
  control::BatchGuard guard(_slot);
  if (_control.closed_out(s.agency))
    return reject(Status::betting_closed, proto::no_bet_index, "the betting was closed before this agency finished");
  switch (_control.draw_state()) {
    case control::DrawState::open: break;
    case control::DrawState::drawing:
      return reject(Status::betting_closed, proto::no_bet_index, "the betting is closed; the draw is running");
    case control::DrawState::done:
      return reject(Status::draw_done, proto::no_bet_index, "the draw is done; no more bets");
  }
  if (_control.finished(s.agency))
    return reject(Status::agency_finished, proto::no_bet_index, "this agency already finished");

  // Exactly once: the producer's stored seqs are the prefix 1..last_seq.
  LOTTERY_ASSERT(s.producer >= 0);
  control::ProducerSlot& producer = _control.layout().producers[s.producer];
  uint64_t last_seq = producer.last_seq.load();
  if (h.seq <= last_seq) {
    // A resend of a batch already stored: acknowledged again, stored once.
    _slot.duplicates.fetch_add(1, std::memory_order_relaxed);
    log::info("apuesta_duplicada", log::Outcome::success,
              {{"cantidad", info.count}, {"agencia", info.agency}, {"seq", h.seq}});
    acknowledge(s, h.seq, info.count);
    return Outcome::keep;
  }
  if (h.seq != last_seq + 1)
    return reject(Status::sequence_gap, proto::no_bet_index, "batch seq is not the producer's next");

  // Parse straight into the mapping: copy the bets to their place in the
  // segment, validate them there, then commit or abandon the entry.
  proto::Bytes wire_bets = body.subspan(limits::batch_body_header_bytes);
  auto slot = _store.reserve(wire_bets.size());
  if (!slot) {
    Status st = slot.error().code == ENOSPC ? Status::storage_full : Status::storage_error;
    log::error("store", log::Outcome::fail, {{"error", slot.error().message}});
    return reject(st, proto::no_bet_index, st == Status::storage_full ? "storage full" : "storage error");
  }
  std::byte* dst = *slot;
  std::memcpy(dst, wire_bets.data(), wire_bets.size());
  uint64_t now = reactor::Reactor::now_ms();
  if (now - _today_checked_ms >= today_refresh_ms || _today_checked_ms == 0) {
    _today = proto::today_local();
    _today_checked_ms = now;
  }
  proto::ValidationContext ctx{_options.agencies, _today, _options.batch_bets_max};
  proto::Bytes stored_bets(dst, wire_bets.size());
  if (auto r = proto::validate_batch_parts(info.agency, info.count, stored_bets, ctx)) {
    _store.abandon(wire_bets.size());
    return reject(r->status, r->index, r->reason);
  }
  // Marked pending before the commit point (the entry's checksum), settled
  // after: if this worker dies in between, the next holder of the producer
  // looks for the entry in our newest segment (control::resolve_pending).
  producer.pending_seq.store(h.seq);
  producer.pending_bets.store(info.count);
  producer.pending_worker.store(_options.worker_id + 1u, std::memory_order_seq_cst);
  _store.commit(store::EntryMeta{info.agency, info.count, s.producer_id, h.seq}, wire_bets.size());
  producer.bets.fetch_add(info.count);
  producer.last_seq.store(h.seq);
  producer.pending_worker.store(0, std::memory_order_seq_cst);
  _counters.batches_accepted++;
  _counters.bets_accepted += info.count;
  _slot.batches.fetch_add(1, std::memory_order_relaxed);
  _slot.bets.fetch_add(info.count, std::memory_order_relaxed);
  _control.layout().bets_stored[_options.worker_id][info.agency].fetch_add(info.count, std::memory_order_relaxed);

  // apuesta_almacenada per bet: always for a single-bet batch (the classic
  // single-bet mode), otherwise only at DEBUG.
  if (info.count == 1 || log::enabled(log::Level::debug)) {
    log::Level level = info.count == 1 ? log::Level::info : log::Level::debug;
    proto::BetCursor cursor(stored_bets);
    proto::Bet bet;
    while (cursor.next(bet))
      log::event(level, "apuesta_almacenada", log::Outcome::success,
                 {{"dni", bet.document}, {"numero", bet.number}, {"agencia", info.agency}});
  }
  // The log line goes out before the acknowledgement it reports.
  log::info("apuesta_recibida", log::Outcome::success, {{"cantidad", info.count}, {"agencia", info.agency}});
  if (_options.durability == store::Durability::none) {
    acknowledge(s, h.seq, info.count);
  } else {
    _acks.hold(PendingAck{s.id, h.seq, info.count});  // sent once a sync covers it
  }
  return Outcome::keep;
}

void LotteryService::acknowledge(Session& s, uint32_t seq, uint16_t count) {
  std::byte* out = _link.reserve_send(s.id, reply_bytes_max);
  if (out == nullptr) {
    // Only a connection that stopped reading its replies gets here; it will
    // resend, and the batch is recognised as a duplicate.
    _link.close(s.id, reactor::Flush::no);
    return;
  }
  _link.commit_send(s.id, proto::encode_batch_ack(out, reply_bytes_max, seq, count));
}

void LotteryService::release_ack(void* self, const PendingAck& ack, bool synced) {
  auto* service = static_cast<LotteryService*>(self);
  Session* s = service->session(ack.id);
  if (s == nullptr) return;  // gone: the client resends, and the batch is a duplicate
  if (!synced) {
    service->reply_error(*s, static_cast<uint8_t>(MsgType::batch), ack.seq, Status::storage_error,
                         proto::no_bet_index, "could not sync the store");
    return;
  }
  service->acknowledge(*s, ack.seq, ack.count);
}

void LotteryService::release_producer(Session& s) {
  if (s.producer < 0) return;
  // What this producer's state says is stored must be durable before another
  // connection, maybe on another worker, can act on it.
  _acks.sync_all();
  _producer_locks.unlock(static_cast<size_t>(s.producer));
  s.producer = -1;
}

std::optional<LotteryService::Outcome> LotteryService::refuse_unless_own_agency(Session& s,
                                                                                  const proto::FrameHeader& h,
                                                                                  uint16_t agency) {
  if (s.agency == 0) {
    reply_error(s, h.type, h.seq, Status::not_identified, proto::no_bet_index, "send hello first");
    return Outcome::keep;
  }
  if (agency == s.agency) return std::nullopt;
  // Plaintext: a buggy terminal, told and kept. TLS: the key says who this
  // is, so asking for another agency is an attempt, refused and cut off.
  if (_link.peer_identity(s.id) != 0) {
    refuse_other_agency(s, h, agency);
    return Outcome::close;
  }
  reply_error(s, h.type, h.seq, Status::agency_mismatch, proto::no_bet_index, "not the connection's agency");
  return Outcome::keep;
}

void LotteryService::refuse_other_agency(Session& s, const proto::FrameHeader& h, uint16_t asked) {
  uint32_t proven = _link.peer_identity(s.id);
  _counters.protocol_errors++;
  _slot.errors.fetch_add(1, std::memory_order_relaxed);
  log::warning("agencia_ajena", log::Outcome::fail,
               {{"agencia", proven}, {"pedida", asked}, {"type", int{h.type}}, {"code", "not_your_agency"}});
  reply_error(s, h.type, h.seq, Status::not_your_agency, proto::no_bet_index,
              "this connection's TLS key belongs to another agency");
}

LotteryService::Outcome LotteryService::handle_finished(Session& s, const proto::FrameHeader& h, proto::Bytes body) {
  uint16_t agency = 0;
  if (!proto::decode_agency_body(body, agency)) {
    reply_error(s, h.type, h.seq, Status::malformed_body, proto::no_bet_index, "finished body has the wrong size");
    return Outcome::close;
  }
  if (auto refused = refuse_unless_own_agency(s, h, agency)) return *refused;
  // The finish mark, and the draw when this was the last agency, happen under
  // the draw lock shared by every worker.
  auto result = control::finish_agency(_control, agency, _options.winning_number);
  if (!result) {
    log::error("fin_apuestas", log::Outcome::fail, {{"agencia", agency}, {"error", result.error().message}});
    reply_error(s, h.type, h.seq, Status::storage_error, proto::no_bet_index, "could not record the finish");
    return Outcome::keep;
  }
  switch (result->outcome) {
    case control::FinishOutcome::finished: break;
    case control::FinishOutcome::already_finished:
      reply_error(s, h.type, h.seq, Status::agency_finished, proto::no_bet_index, "this agency already finished");
      return Outcome::keep;
    case control::FinishOutcome::closed:
      reply_error(s, h.type, h.seq, Status::betting_closed, proto::no_bet_index,
                  "the betting was closed before this agency finished");
      return Outcome::keep;
    case control::FinishOutcome::draw_done:
      reply_error(s, h.type, h.seq, Status::draw_done, proto::no_bet_index, "the draw is done");
      return Outcome::keep;
  }
  uint64_t stored = _control.bets_stored(agency);
  log::info("fin_apuestas", log::Outcome::success, {{"agencia", agency}, {"cantidad", stored}});
  if (result->draw.ran) {
    log::info("sorteo", log::Outcome::success,
              {{"numero_ganador", _options.winning_number}, {"apuestas", result->draw.bets_scanned},
               {"ganadores", result->draw.winners}, {"worker", _options.worker_id}});
  }
  std::byte* out = _link.reserve_send(s.id, reply_bytes_max);
  LOTTERY_ASSERT(out != nullptr);
  _link.commit_send(s.id, proto::encode_finished_ack(out, reply_bytes_max, h.seq, stored));
  if (result->draw.ran) on_draw_maybe_done();
  return Outcome::keep;
}

LotteryService::Outcome LotteryService::handle_winners(Session& s, const proto::FrameHeader& h, proto::Bytes body) {
  uint16_t agency = 0;
  uint32_t start = 0;
  if (!proto::decode_winners_query(body, agency, start)) {
    reply_error(s, h.type, h.seq, Status::malformed_body, proto::no_bet_index, "winners body has the wrong size");
    return Outcome::close;
  }
  // Winners are personal data: an agency reads only its own. Agency 0 asks
  // for the connection's own (over TLS: the key's), so a client need not say.
  if (agency == 0) agency = s.agency;
  if (auto refused = refuse_unless_own_agency(s, h, agency)) return *refused;
  if (_control.closed_out(agency)) {
    reply_error(s, h.type, h.seq, Status::betting_closed, proto::no_bet_index,
                "the betting was closed before this agency finished; it took no part in the draw");
    return Outcome::keep;
  }
  if (!_results && !load_results_if_done()) {
    if (s.waiting_winners) {
      reply_error(s, h.type, h.seq, Status::not_ready, proto::no_bet_index, "a winners query is already waiting");
      return Outcome::keep;
    }
    // Held until the draw: never a partial answer.
    s.waiting_winners = true;
    s.waiting_seq = h.seq;
    s.waiting_start = start;
    log::debug("consulta_ganadores", log::Outcome::in_progress, {{"agencia", agency}});
    return Outcome::keep;
  }
  send_winners_page(s, h.seq, start);
  return Outcome::keep;
}

void LotteryService::send_winners_page(Session& s, uint32_t seq, uint32_t start) {
  LOTTERY_ASSERT(_results.has_value());
  LOTTERY_ASSERT(s.agency < _results->agencies.size());
  const auto& docs = _results->agencies[s.agency].winners;
  std::byte* out = _link.reserve_send(s.id, reply_bytes_max);
  if (out == nullptr) return;
  uint32_t total = static_cast<uint32_t>(docs.size());
  proto::WinnersReplyBuilder page(out, reply_bytes_max, total, start);
  for (size_t i = start; i < docs.size(); i++)
    if (!page.add(docs[i])) break;
  log::debug("consulta_ganadores", log::Outcome::success, {{"agencia", s.agency}, {"cant_ganadores", total}});
  _link.commit_send(s.id, page.finish(seq));
}

bool LotteryService::load_results_if_done() {
  if (_results) return true;
  if (_control.draw_state() != control::DrawState::done) return false;
  auto r = read_results(_options.data_dir);
  if (!r) {
    log::error("resultados", log::Outcome::fail, {{"error", r.error().message}});
    return false;
  }
  if (r->agencies.size() != size_t{_options.agencies} + 1) {
    log::error("resultados", log::Outcome::fail, {{"error", "results file is for another number of agencies"}});
    return false;
  }
  _results = std::move(*r);
  log::debug("resultados", log::Outcome::success, {{"worker", _options.worker_id}, {"ganadores", _results->total_winners()}});
  return true;
}

void LotteryService::answer_waiting() {
  uint64_t now = reactor::Reactor::now_ms();
  for (Session& s : _sessions) {
    if (s.open && s.waiting_winners) {
      s.waiting_winners = false;
      s.last_request_ms = now;  // its idle time starts with the answer
      send_winners_page(s, s.waiting_seq, s.waiting_start);
    }
  }
}

void LotteryService::on_draw_maybe_done() {
  if (load_results_if_done()) answer_waiting();
}

void LotteryService::begin_shutdown() {
  _acks.sync_all();
  flush_drop_logs(reactor::Reactor::now_ms(), /*force=*/true);
  _shutting_down = true;
  for (Session& s : _sessions) {
    if (!s.open) continue;
    if (s.waiting_winners) {
      s.waiting_winners = false;
      reply_error(s, static_cast<uint8_t>(MsgType::winners), s.waiting_seq, Status::shutting_down,
                  proto::no_bet_index, "server is shutting down before the draw");
    }
  }
  _link.close_all(reactor::CloseReason::shutdown);
}

}  // namespace lottery
