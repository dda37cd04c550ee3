// lotteryctl: the operator's view of a data directory, while the server runs
// and after it stopped.
//   status            agencies, the draw, the workers (from the control file)
//   winners [--agency N]
//   close             close the betting: unfinished agencies are closed out and
//                     the draw runs with those that finished
#include <fcntl.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>

#include "common/log.hpp"
#include "lottery/control.hpp"
#include "lottery/results.hpp"

namespace {

using lottery::control::Control;
using lottery::control::DrawState;

// Kept in step with server/master.hpp (lotteryctl does not link the server).
constexpr const char* close_request_file_name = "close.request";
constexpr const char* server_lock_file_name = "server.lock";
constexpr int close_wait_ms_max = 120'000;

std::string format_time(uint64_t unix_ms) {
  if (unix_ms == 0) return "-";
  time_t t = static_cast<time_t>(unix_ms / 1000);
  struct tm tm_v {};
  ::localtime_r(&t, &tm_v);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &tm_v);
  return buf;
}

std::string thousands(uint64_t v) {
  std::string digits = std::to_string(v);
  std::string out;
  for (size_t i = 0; i < digits.size(); i++) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out.push_back(',');
    out.push_back(digits[i]);
  }
  return out;
}

int fail(const std::string& message) {
  std::fprintf(stderr, "lotteryctl: %s\n", message.c_str());
  return 1;
}

// True when a server holds the data directory.
bool server_running(const std::string& data_dir) {
  std::string path = data_dir + "/" + server_lock_file_name;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  bool held = ::flock(fd, LOCK_SH | LOCK_NB) < 0 && errno == EWOULDBLOCK;
  ::close(fd);
  return held;
}

int cmd_status(const std::string& data_dir) {
  auto control = Control::open(data_dir, 0, Control::Mode::read_only);
  if (!control) return fail(control.error().message);
  const Control& c = **control;
  const auto& l = c.layout();
  std::printf("Data directory: %s (server %s)\n", data_dir.c_str(), server_running(data_dir) ? "running" : "stopped");
  DrawState state = c.draw_state();
  if (state == DrawState::done) {
    std::printf("Draw: done at %s, winning number %u, %s bets, %s winners\n", format_time(l.draw_unix_ms).c_str(),
                l.winning_number.load(), thousands(l.draw_bets_scanned).c_str(), thousands(l.draw_winners).c_str());
  } else if (state == DrawState::drawing) {
    std::printf("Draw: running (the betting is closed)\n");
  } else {
    uint32_t finished = 0;
    for (uint32_t a = 1; a <= c.agencies(); a++) finished += c.finished(a) ? 1 : 0;
    std::printf("Draw: waiting, %u of %u agencies finished\n", finished, c.agencies());
  }
  if (l.closed_unix_ms != 0) std::printf("Betting closed by the operator at %s\n", format_time(l.closed_unix_ms).c_str());
  std::printf("\n%6s  %14s  %-8s  %s\n", "AGENCY", "BETS STORED", "FINISHED", "NOTE");
  for (uint32_t a = 1; a <= c.agencies(); a++) {
    std::string note;
    if (c.closed_out(a)) note = "closed out: not in the draw";
    else if (c.finished(a)) note = "finished " + format_time(l.agencies_slots[a].finished_unix_ms);
    std::printf("%6u  %14s  %-8s  %s\n", a, thousands(c.bets_stored(a)).c_str(), c.finished(a) ? "yes" : "no",
                note.c_str());
  }
  std::printf("\n%6s  %8s  %-4s  %8s  %10s  %11s  %10s  %14s  %8s\n", "WORKER", "PID", "UP", "RESTARTS",
              "CONNS OPEN", "CONNS TOTAL", "BATCHES", "BETS", "ERRORS");
  for (size_t w = 0; w < lottery::control::workers_max; w++) {
    const auto& s = l.workers[w];
    if (s.pid == 0 && s.batches == 0) continue;
    std::printf("%6zu  %8llu  %-4s  %8s  %10s  %11s  %10s  %14s  %8s\n", w,
                static_cast<unsigned long long>(s.pid.load()), s.alive ? "yes" : "no",
                thousands(s.restarts).c_str(), thousands(s.connections_open).c_str(),
                thousands(s.connections_total).c_str(), thousands(s.batches).c_str(), thousands(s.bets).c_str(),
                thousands(s.errors).c_str());
  }
  return 0;
}

int cmd_winners(const std::string& data_dir, int agency) {
  auto results = lottery::read_results(data_dir);
  if (!results) {
    auto control = Control::open(data_dir, 0, Control::Mode::read_only);
    if (control && (*control)->draw_state() != DrawState::done) return fail("the draw has not run yet");
    return fail(results.error().message);
  }
  const auto& r = *results;
  if (agency != 0 && (agency < 1 || static_cast<size_t>(agency) >= r.agencies.size()))
    return fail("no agency " + std::to_string(agency));
  std::printf("Winning number %u, draw at %s, %s bets\n", r.winning_number, format_time(r.draw_unix_ms).c_str(),
              thousands(r.bets_scanned).c_str());
  for (size_t a = 1; a < r.agencies.size(); a++) {
    if (agency != 0 && static_cast<size_t>(agency) != a) continue;
    const auto& ar = r.agencies[a];
    if (ar.closed_out) {
      std::printf("agency %zu: closed out (not in the draw)\n", a);
      continue;
    }
    std::printf("agency %zu: %zu winners\n", a, ar.winners.size());
    for (const auto& doc : ar.winners) std::printf("  %s\n", doc.c_str());
  }
  return 0;
}

int cmd_close(const std::string& data_dir, uint16_t winning_number) {
  if (server_running(data_dir)) {
    // Ask the running server: its master closes and draws, so the server's
    // log holds the sorteo line, once.
    std::string path = data_dir + "/" + close_request_file_name;
    std::string tmp = path + ".tmp";
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 || ::close(fd) < 0 || ::rename(tmp.c_str(), path.c_str()) < 0)
      return fail("cannot write " + path + ": " + std::strerror(errno));
    auto control = Control::open(data_dir, 0, Control::Mode::read_only);
    if (!control) return fail(control.error().message);
    for (int waited = 0; (*control)->draw_state() != DrawState::done; waited += 20) {
      if (waited >= close_wait_ms_max) return fail("the server did not complete the draw in time; see its log");
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    std::printf("betting closed by the server; the draw is done\n");
    return cmd_status(data_dir);
  }
  auto control = Control::open(data_dir, 0, Control::Mode::open_existing);
  if (!control) return fail(control.error().message);
  auto d = lottery::control::close_betting(**control, winning_number);
  if (!d) return fail(d.error().message);
  if (!d->ran) std::printf("the draw was already done\n");
  else std::printf("betting closed (no server running); the draw ran here: %s bets, %s winners\n",
                   thousands(d->bets_scanned).c_str(), thousands(d->winners).c_str());
  return cmd_status(data_dir);
}

}  // namespace

int main(int argc, char** argv) {
  common::log::init(common::log::Level::warning);
  CLI::App app{"lotteryctl: inspect and operate a lottery data directory"};
  std::string data_dir = "./data";
  app.add_option("--data-dir", data_dir, "the server's data directory")->envname("SERVER_DATA_DIR");
  app.require_subcommand(1);
  auto* status = app.add_subcommand("status", "agencies, draw state and worker counters");
  int agency = 0;
  auto* winners = app.add_subcommand("winners", "the winners of the draw");
  winners->add_option("--agency", agency, "only this agency");
  uint16_t winning_number = 7574;
  auto* close = app.add_subcommand("close", "close the betting and run the draw with the agencies that finished");
  close->add_option("--winning-number", winning_number, "used only when no server is running")
      ->envname("SERVER_WINNING_NUMBER");
  CLI11_PARSE(app, argc, argv);
  if (*status) return cmd_status(data_dir);
  if (*winners) return cmd_winners(data_dir, agency);
  if (*close) return cmd_close(data_dir, winning_number);
  return 1;
}
