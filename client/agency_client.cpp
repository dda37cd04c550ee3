// lottery-client: one agency's side of the lottery.
//
// Agency mode reads and validates the agency's whole bet file first (a bad
// line means nothing is sent), connects, sends the bets in pipelined batches,
// says FINISHED and waits for the agency's winners. Single-bet mode (NOMBRE,
// APELLIDO, DOCUMENTO, NACIMIENTO, NUMERO) sends one bet.
//
// Exactly once: the producer id is stable for a given agency and input (see
// client/producer_id.hpp), so a re-run skips what the server already stores,
// and a dropped connection is replaced and its unacknowledged batches resent.
//
// The log lines are the heritage contract the operators' tooling reads; keep
// the action names and keys as they are.

#include <signal.h>

#include <atomic>
#include <cstdio>
#include <exception>
#include <utility>

#include "client/agency_session.hpp"
#include "client/client_config.hpp"
#include "client/csv.hpp"
#include "client/net.hpp"
#include "client/producer_id.hpp"
#include "common/log.hpp"

namespace {

namespace log = common::log;
using common::log::Outcome;
using namespace lottery;
using namespace lottery::client;

// Exit codes, also listed in --help.
constexpr int exit_ok = 0;
constexpr int exit_input_refused = 1;
constexpr int exit_unreachable = 2;
constexpr int exit_connection = 3;
constexpr int exit_tls_refused = 4;

// Written by the signal handler, read by every wait (see client/net.hpp).
std::atomic<bool> stop_requested{false};
static_assert(std::atomic<bool>::is_always_lock_free, "the signal handler may only touch a lock-free flag");

extern "C" void on_stop_signal(int) {
  stop_requested.store(true, std::memory_order_relaxed);
}

// How a run ended: the exit code, and whether a signal ended it.
struct RunEnd {
  int code = exit_ok;
  bool by_signal = false;
};

common::Status install_signal_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  // No SA_RESTART: a blocked ppoll() must return EINTR so the loop sees the flag.
  sa.sa_flags = 0;
  if (::sigaction(SIGTERM, &sa, nullptr) != 0) return common::Error::from_errno("sigaction(SIGTERM)");
  if (::sigaction(SIGINT, &sa, nullptr) != 0) return common::Error::from_errno("sigaction(SIGINT)");
  // Sockets use MSG_NOSIGNAL; this covers stderr going to a closed pipe.
  struct sigaction ignore {};
  ignore.sa_handler = SIG_IGN;
  sigemptyset(&ignore.sa_mask);
  if (::sigaction(SIGPIPE, &ignore, nullptr) != 0) return common::Error::from_errno("sigaction(SIGPIPE)");
  return common::ok_status();
}

// Blocks SIGTERM/SIGINT outside the waits and returns the mask to wait with,
// in which they are unblocked (see client/net.hpp for why).
common::Result<sigset_t> block_stop_signals() {
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  sigset_t previous;
  if (::sigprocmask(SIG_BLOCK, &stop_signals, &previous) != 0) return common::Error::from_errno("sigprocmask");
  sigdelset(&previous, SIGTERM);
  sigdelset(&previous, SIGINT);
  return previous;
}

// ------------------------------------------------------------------ sources

// Bets of an already validated file: the reader cannot fail any more.
class CsvBetSource final : public BetSource {
 public:
  explicit CsvBetSource(CsvReader reader) : _reader(std::move(reader)) {}
  bool next(proto::Bet& out, uint32_t& line) override {
    CsvRecord record;
    CsvReader::Step step = _reader.next(record);
    LOTTERY_ASSERT(step != CsvReader::Step::error);
    if (step == CsvReader::Step::end) return false;
    out = record.bet;
    line = record.line;
    return true;
  }

 private:
  CsvReader _reader;
};

class SingleBetSource final : public BetSource {
 public:
  explicit SingleBetSource(const proto::Bet& bet) : _bet(bet) {}
  bool next(proto::Bet& out, uint32_t& line) override {
    if (_given) return false;
    _given = true;
    out = _bet;
    line = 0;
    return true;
  }

 private:
  proto::Bet _bet;
  bool _given = false;
};

// ------------------------------------------------------------------ logging

// The session's and the connection loop's events, as the heritage log lines.
class LoggingListener final : public SessionListener, public ConnectionObserver {
 public:
  // `single_bet` is the bet of single-bet mode (nullptr in agency mode).
  LoggingListener(const ClientConfig& cfg, SessionMode mode, uint64_t producer_id, const proto::Bet* single_bet)
      : _cfg(cfg), _mode(mode), _producer_id(producer_id), _single_bet(single_bet) {}

  // ---- connection loop
  void on_connected() override {
    log::info("conectar", Outcome::success, {{"server", _cfg.server_address}, {"agency", _cfg.agency_id}});
  }

  void on_connect_failed(uint32_t attempt, const common::Error& e, std::chrono::milliseconds retry_in) override {
    log::warning("conectar", Outcome::fail,
                 {{"attempt", attempt},
                  {"attempts", _cfg.loop_amount},
                  {"error", e.message},
                  {"retry_in_ms", static_cast<int64_t>(retry_in.count())}});
  }

  void on_reconnecting(uint32_t attempt, uint32_t pending, const common::Error& why) override {
    log::warning("reconectar", Outcome::in_progress,
                 {{"intento", attempt}, {"pendientes", pending}, {"error", why.message}});
  }

  // ---- session
  void on_hello_acked(const proto::HelloAck& ack) override {
    log::debug("hello", Outcome::success,
               {{"agency", ack.agency},
                {"producer_id", _producer_id},
                {"worker", ack.worker},
                {"finished", ack.finished},
                {"draw_done", ack.draw_done},
                {"stored_seq", ack.stored_seq},
                {"producer_bets", ack.producer_bets},
                {"bets_stored", ack.bets_stored}});
    if (ack.finished && _mode == SessionMode::agency && !_hello_seen)
      log::warning(
          "hello", Outcome::success,
          {{"agency", ack.agency}, {"note", "agency already finished in an earlier run; asking for winners only"}});
    _hello_seen = true;
  }

  void on_resumed(uint64_t stored_seq, uint64_t bets) override {
    log::info("reanudar", Outcome::success, {{"seq", stored_seq}, {"apuestas_almacenadas", bets}});
    // The heritage line for the one bet, which an earlier run got stored.
    if (_single_bet != nullptr)
      log::info("apuesta_enviada", Outcome::success, {{"dni", _single_bet->document}, {"numero", _single_bet->number}});
  }

  void on_reconnected(const proto::HelloAck& ack, uint32_t confirmed, uint32_t resending) override {
    log::info("reconectar", Outcome::success,
              {{"seq", ack.stored_seq}, {"confirmados", confirmed}, {"reenviar", resending}, {"worker", ack.worker}});
  }

  void on_batch_acked(uint32_t seq, uint16_t count, proto::Bytes bets) override {
    if (_mode == SessionMode::single_bet) {
      proto::BetCursor cursor(bets);
      proto::Bet bet;
      while (cursor.next(bet))
        log::info("apuesta_enviada", Outcome::success, {{"dni", bet.document}, {"numero", bet.number}});
      return;
    }
    log::info("batch_enviado", Outcome::success, {{"seq", seq}, {"cantidad", count}});
    if (!log::enabled(log::Level::debug)) return;
    proto::BetCursor cursor(bets);
    proto::Bet bet;
    while (cursor.next(bet))
      log::debug("apuesta_enviada", Outcome::success, {{"dni", bet.document}, {"numero", bet.number}});
  }

  void on_finished_acked(uint64_t bets_sent, uint64_t bets_stored) override {
    log::info("fin_apuestas", Outcome::success, {{"cantidad", bets_sent}});
    log::debug("fin_apuestas_servidor", Outcome::success, {{"almacenadas", bets_stored}});
  }

  void on_winner(std::string_view document) override { log::debug("ganador", Outcome::success, {{"dni", document}}); }

  void on_winners_received(uint32_t total) override {
    log::info("consulta_ganadores", Outcome::success, {{"cant_ganadores", total}});
  }

 private:
  const ClientConfig& _cfg;
  SessionMode _mode;
  uint64_t _producer_id;
  const proto::Bet* _single_bet;
  bool _hello_seen = false;  // later HELLOs follow reconnects
};

const char* request_action(uint8_t request_type, SessionMode mode) {
  switch (request_type) {
    case static_cast<uint8_t>(proto::MsgType::hello):
      return "hello";
    case static_cast<uint8_t>(proto::MsgType::batch):
      return mode == SessionMode::single_bet ? "apuesta_enviada" : "batch_enviado";
    case static_cast<uint8_t>(proto::MsgType::finished):
      return "fin_apuestas";
    case static_cast<uint8_t>(proto::MsgType::winners):
      return "consulta_ganadores";
    default:
      return "conexion";
  }
}

int log_session_failure(const SessionFailure& f, SessionMode mode) {
  if (f.kind == FailureKind::input_mismatch) {
    log::error("reanudar", Outcome::fail, {{"error", f.reason}});
    return exit_input_refused;
  }
  if (f.kind == FailureKind::protocol && f.status == proto::Status::ok) {
    // Nothing the server said, but something it sent we cannot read.
    log::error("conexion", Outcome::fail, {{"error", "protocol: " + f.reason}});
    return exit_connection;
  }
  const char* action = request_action(f.request_type, mode);
  const char* code = proto::status_name(f.status);
  bool names_bet = f.bet_index != proto::no_bet_index && f.request_type == static_cast<uint8_t>(proto::MsgType::batch);
  if (names_bet && mode == SessionMode::single_bet) {
    log::error(action, Outcome::fail,
               {{"dni", f.document}, {"numero", f.number}, {"code", code}, {"reason", f.reason}});
  } else if (names_bet) {
    log::error(action, Outcome::fail,
               {{"seq", f.seq},
                {"code", code},
                {"bet_index", f.bet_index},
                {"line", f.line},
                {"dni", f.document},
                {"reason", f.reason}});
  } else if (f.request_type == static_cast<uint8_t>(proto::MsgType::batch)) {
    log::error(action, Outcome::fail, {{"seq", f.seq}, {"code", code}, {"reason", f.reason}});
  } else {
    log::error(action, Outcome::fail, {{"code", code}, {"reason", f.reason}});
  }
  return f.kind == FailureKind::rejected ? exit_input_refused : exit_connection;
}

// ------------------------------------------------------------------ session

RunEnd run_session(const ClientConfig& cfg, BetSource& source, SessionMode mode, uint64_t producer_id,
                   const proto::Bet* single_bet) {
  auto mask = block_stop_signals();
  if (!mask.ok()) {
    log::error("conectar", Outcome::fail, {{"error", mask.error().message}});
    return {exit_connection, false};
  }
  WaitContext ctx{&stop_requested, &mask.value()};

  SessionOptions options;
  options.agency = cfg.agency_id;
  options.producer_id = producer_id;
  options.mode = mode;
  options.finish = mode == SessionMode::agency || cfg.finish;
  options.batch_bets_max = cfg.batch_max_amount;
  options.batch_bytes_max = cfg.batch_max_bytes;
  options.inflight_max = cfg.inflight;
  LoggingListener listener(cfg, mode, producer_id, single_bet);
  AgencySession session(options, source, listener);

  RetryPolicy policy{cfg.loop_amount, cfg.loop_period, loop_backoff_cap};
  // TLS: the agency's key proves who we are; the server takes the agency
  // from the handshake.
  TlsClient tls_client;
  tls::CtxPtr tls_ctx;
  tls::ClientKey tls_key;
  if (!cfg.tls_key.empty()) {
    auto key = tls::load_client_key(cfg.tls_key);
    if (!key) {
      log::error("tls_key", Outcome::fail, {{"file", cfg.tls_key}, {"error", key.error().message}});
      return {exit_input_refused, false};
    }
    tls_key = std::move(*key);
    if (tls_key.identity != cfg.agency_id)
      log::warning("tls_key", Outcome::fail,
                   {{"file", cfg.tls_key}, {"key_agency", tls_key.identity}, {"agency", cfg.agency_id},
                    {"warning", "the key belongs to another agency; the server will refuse this agency's requests"}});
    auto made = tls::make_context(tls::Side::client);
    if (!made) {
      log::error("tls_key", Outcome::fail, {{"error", made.error().message}});
      return {exit_connection, false};
    }
    tls_ctx = std::move(*made);
    tls_client = TlsClient{tls_ctx.get(), &tls_key};
  }
  RunOutcome outcome = run_session_with_reconnect(cfg.server, policy, session, ctx, listener, tls_client);
  log::debug("cerrar_conexion", Outcome::success, {{"server", cfg.server_address}});

  switch (outcome.result) {
    case RunResult::done:
      return {exit_ok, false};
    case RunResult::stopped:
      return {exit_ok, true};
    case RunResult::session_failed:
      return {log_session_failure(session.failure(), mode), false};
    case RunResult::unreachable:
      if (!outcome.ever_connected) {
        log::error("conectar", Outcome::fail, {{"server", cfg.server_address}, {"error", outcome.error.message}});
      } else {
        log::error("conexion", Outcome::fail,
                   {{"error", outcome.error.message},
                    {"batches_acked", session.batches_acked()},
                    {"pendientes", session.batches_pending()}});
      }
      return {exit_unreachable, false};
    case RunResult::tls_refused:
      log::error("tls_handshake", Outcome::fail, {{"server", cfg.server_address}, {"reason", outcome.error.message}});
      return {exit_tls_refused, false};
    case RunResult::connection_lost:
    case RunResult::come_back_later:
      break;  // handled inside run_session_with_reconnect
  }
  LOTTERY_ASSERT(false && "run_session_with_reconnect returned a per-connection result");
  return {exit_connection, false};
}

// The file's stable producer id, unless the operator gave one.
common::Result<uint64_t> file_producer(const ClientConfig& cfg) {
  if (cfg.producer_id) return *cfg.producer_id;
  auto path = canonical_path(cfg.data_file);
  if (!path.ok()) return path.error();
  return file_producer_id(cfg.agency_id, path.value());
}

RunEnd run_agency(const ClientConfig& cfg) {
  auto file = BetFile::load(cfg.data_file);
  if (!file.ok()) {
    log::error("leer_apuestas", Outcome::fail, {{"file", cfg.data_file}, {"error", file.error().message}});
    return {exit_input_refused, false};
  }
  // One `today` for both passes, so a bet valid in the first is valid in the second.
  proto::Date today = proto::today_local();
  CsvError bad_line;
  auto summary = file->validate(today, &bad_line);
  if (!summary.ok()) {
    log::error("leer_apuestas", Outcome::fail,
               {{"file", cfg.data_file}, {"line", bad_line.line}, {"error", bad_line.what}});
    return {exit_input_refused, false};
  }
  log::info("leer_apuestas", Outcome::success, {{"file", cfg.data_file}, {"cantidad", summary->bets}});
  auto producer = file_producer(cfg);
  if (!producer.ok()) {
    log::error("leer_apuestas", Outcome::fail, {{"file", cfg.data_file}, {"error", producer.error().message}});
    return {exit_input_refused, false};
  }
  if (stop_requested.load(std::memory_order_relaxed)) return {exit_ok, true};
  CsvBetSource source(file->reader(today));
  return run_session(cfg, source, SessionMode::agency, producer.value(), nullptr);
}

RunEnd run_single_bet(const ClientConfig& cfg) {
  const SingleBetFields& f = *cfg.single_bet;
  proto::Bet bet;
  std::string why =
      parse_bet_fields(f.first_name, f.last_name, f.document, f.birthdate, f.number, proto::today_local(), bet);
  if (!why.empty()) {
    log::error("apuesta_enviada", Outcome::fail, {{"dni", f.document}, {"numero", f.number}, {"error", why}});
    return {exit_input_refused, false};
  }
  SingleBetSource source(bet);
  uint64_t producer = cfg.producer_id ? *cfg.producer_id : bet_producer_id(cfg.agency_id, bet);
  return run_session(cfg, source, SessionMode::single_bet, producer, &bet);
}

void log_exit(const RunEnd& end) {
  if (end.by_signal)
    log::info("exit", Outcome::success, {{"reason", "signal"}});
  else if (end.code == exit_ok)
    log::info("exit", Outcome::success);
  else
    log::info("exit", Outcome::fail, {{"exit_code", end.code}});
}

RunEnd run_with(const ClientConfig& cfg) {
  log::set_level(cfg.log_level);
  if (cfg.batch_max_amount_clamped)
    log::warning("config", Outcome::success,
                 {{"batch_max_amount", cfg.batch_max_amount}, {"note", "clamped to batch_bets_max"}});
  log::debug("config", Outcome::success,
             {{"agency", cfg.agency_id},
              {"server", cfg.server_address},
              {"loop_amount", cfg.loop_amount},
              {"loop_period_ms", static_cast<int64_t>(cfg.loop_period.count())},
              {"batch_max_amount", cfg.batch_max_amount},
              {"batch_max_bytes", cfg.batch_max_bytes},
              {"inflight", cfg.inflight},
              {"data_file", cfg.data_file},
              {"producer_id", cfg.producer_id ? std::to_string(*cfg.producer_id) : std::string("derived")},
              {"mode", cfg.single_bet ? "single_bet" : "agency"}});
  return cfg.single_bet ? run_single_bet(cfg) : run_agency(cfg);
}

int run(int argc, char** argv) {
  log::init(log::Level::info);
  CommandLine command_line = read_command_line(argc, argv);
  if (!command_line.settings && command_line.error.empty()) return command_line.exit_code;  // help or usage, printed
  RunEnd end{exit_input_refused, false};
  if (!command_line.settings) {
    log::error("config", Outcome::fail, {{"error", command_line.error}});
  } else if (auto cfg = resolve_client_config(*command_line.settings); !cfg.ok()) {
    log::error("config", Outcome::fail, {{"error", cfg.error().message}});
  } else if (auto st = install_signal_handlers(); !st.ok()) {
    log::error("config", Outcome::fail, {{"error", st.error().message}});
  } else {
    end = run_with(cfg.value());
  }
  log_exit(end);
  return end.code;
}

}  // namespace

int main(int argc, char** argv) {
  // Nothing is expected to throw past here (CLI11 errors are caught where the
  // command line is parsed); this is the last line against std::bad_alloc and
  // the like, so the operator still gets a log line and an exit code.
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    common::log::event(common::log::Level::critical, "exit", Outcome::fail, {{"error", e.what()}});
  } catch (...) {
    common::log::event(common::log::Level::critical, "exit", Outcome::fail, {{"error", "unknown exception"}});
  }
  return exit_input_refused;
}
