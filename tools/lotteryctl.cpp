// lotteryctl: the operator's view of a data directory, while the server runs
// and after it stopped.
//   status            agencies, the draw, the workers (from the control file)
//   winners [--agency N]
//   close             close the betting: unfinished agencies are closed out and
//                     the draw runs with those that finished
//   verify            check every entry of every segment
//   export --format csv   every stored bet, once
//   dump SEGMENT      one segment, entry by entry
//   keys init --agencies N --dir DIR     TLS keys: server.keys and agency-N.key
//   keys rotate --agency N --dir DIR     a fresh key for one agency (then SIGHUP the server)
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
#include <map>
#include <set>
#include <tuple>

#include "lottery/control.hpp"
#include "lottery/protocol.hpp"
#include "lottery/results.hpp"
#include "lottery/store.hpp"
#include "tls/keys.hpp"

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
  std::printf("\n%6s  %8s  %-4s  %8s  %10s  %11s  %10s  %14s  %8s  %8s  %10s\n", "WORKER", "PID", "UP",
              "RESTARTS", "CONNS OPEN", "CONNS TOTAL", "BATCHES", "BETS", "ERRORS", "SYNCS", "DUPLICATES");
  for (size_t w = 0; w < lottery::control::workers_max; w++) {
    const auto& s = l.workers[w];
    if (s.pid == 0 && s.batches == 0) continue;
    std::printf("%6zu  %8llu  %-4s  %8s  %10s  %11s  %10s  %14s  %8s  %8s  %10s\n", w,
                static_cast<unsigned long long>(s.pid.load()), s.alive ? "yes" : "no",
                thousands(s.restarts).c_str(), thousands(s.connections_open).c_str(),
                thousands(s.connections_total).c_str(), thousands(s.batches).c_str(), thousands(s.bets).c_str(),
                thousands(s.errors).c_str(), thousands(s.syncs).c_str(), thousands(s.duplicates).c_str());
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

// Checks every entry of every segment. Exit 0 when the store is sound.
int cmd_verify(const std::string& data_dir) {
  auto segments = lottery::store::list_segments(data_dir, -1);
  if (!segments) return fail(segments.error().message);
  std::map<uint32_t, uint64_t> bets_per_agency;
  std::set<std::tuple<uint32_t, uint64_t, uint64_t>> seen;
  uint64_t entries = 0, bets = 0, duplicates = 0, problems = 0;
  std::printf("%-40s  %10s  %12s  %10s  %s\n", "SEGMENT", "ENTRIES", "BETS", "SKIPPED", "STATE");
  for (const std::string& path : *segments) {
    auto r = lottery::store::scan_segment(path, [&](const lottery::store::EntryView& e) {
      if (!seen.emplace(e.meta.agency, e.meta.producer_id, e.meta.sequence).second) {
        duplicates++;
        return;
      }
      bets_per_agency[e.meta.agency] += e.meta.bet_count;
    });
    if (!r) return fail(r.error().message);
    entries += r->entries;
    bets += r->bets;
    std::string state = "ok";
    if (r->stopped_at_bad_entry) {
      problems++;
      state = "BAD at offset " + std::to_string(r->bad_offset) + ": " + r->bad_reason +
              (r->valid_entry_after_bad ? " (valid entries follow at " + std::to_string(r->next_valid_offset) + ")"
                                        : " (torn tail)");
    }
    std::string name = path.substr(path.find_last_of('/') + 1);
    std::printf("%-40s  %10s  %12s  %10s  %s\n", name.c_str(), thousands(r->entries).c_str(),
                thousands(r->bets).c_str(), thousands(r->skipped_bytes).c_str(), state.c_str());
  }
  std::printf("\n%6s  %14s\n", "AGENCY", "BETS");
  for (const auto& [agency, n] : bets_per_agency) std::printf("%6u  %14s\n", agency, thousands(n).c_str());
  std::printf("\n%s segments, %s entries, %s bets, %s duplicate entries, %s damaged segments\n",
              thousands(segments->size()).c_str(), thousands(entries).c_str(), thousands(bets).c_str(),
              thousands(duplicates).c_str(), thousands(problems).c_str());
  return problems == 0 && duplicates == 0 ? 0 : 1;
}

// Every stored bet, once, in the classic CSV form.
int cmd_export(const std::string& data_dir, const std::string& format) {
  if (format != "csv") return fail("export supports --format csv only");
  auto segments = lottery::store::list_segments(data_dir, -1);
  if (!segments) return fail(segments.error().message);
  std::set<std::tuple<uint32_t, uint64_t, uint64_t>> seen;
  std::string out;
  out.reserve(1 << 20);
  for (const std::string& path : *segments) {
    auto r = lottery::store::scan_segment(path, [&](const lottery::store::EntryView& e) {
      if (!seen.emplace(e.meta.agency, e.meta.producer_id, e.meta.sequence).second) return;
      lottery::proto::BetCursor cursor(e.bets);
      lottery::proto::Bet bet;
      char date[16];
      while (cursor.next(bet)) {
        std::snprintf(date, sizeof date, "%04u-%02u-%02u", bet.birthdate.year, bet.birthdate.month,
                      bet.birthdate.day);
        out.append(std::to_string(e.meta.agency)).push_back(',');
        out.append(bet.first_name).push_back(',');
        out.append(bet.last_name).push_back(',');
        out.append(bet.document).push_back(',');
        out.append(date).push_back(',');
        out.append(std::to_string(bet.number)).push_back('\n');
      }
      if (out.size() > (1 << 20)) {
        std::fwrite(out.data(), 1, out.size(), stdout);
        out.clear();
      }
    });
    if (!r) return fail(r.error().message);
    if (r->stopped_at_bad_entry)
      std::fprintf(stderr, "lotteryctl: %s: stopped at offset %llu: %s\n", path.c_str(),
                   static_cast<unsigned long long>(r->bad_offset), r->bad_reason.c_str());
  }
  std::fwrite(out.data(), 1, out.size(), stdout);
  return std::fflush(stdout) == 0 ? 0 : 1;
}

// One segment, entry by entry.
int cmd_dump(const std::string& path, bool with_bets) {
  std::printf("%10s  %6s  %18s  %10s  %6s\n", "OFFSET", "AGENCY", "PRODUCER", "SEQ", "BETS");
  auto r = lottery::store::scan_segment(path, [&](const lottery::store::EntryView& e) {
    std::printf("%10llu  %6u  %18llx  %10llu  %6u\n", static_cast<unsigned long long>(e.offset), e.meta.agency,
                static_cast<unsigned long long>(e.meta.producer_id), static_cast<unsigned long long>(e.meta.sequence),
                e.meta.bet_count);
    if (!with_bets) return;
    lottery::proto::BetCursor cursor(e.bets);
    lottery::proto::Bet bet;
    while (cursor.next(bet))
      std::printf("            %.*s,%.*s,%.*s,%04u-%02u-%02u,%u\n", static_cast<int>(bet.first_name.size()),
                  bet.first_name.data(), static_cast<int>(bet.last_name.size()), bet.last_name.data(),
                  static_cast<int>(bet.document.size()), bet.document.data(), bet.birthdate.year,
                  bet.birthdate.month, bet.birthdate.day, bet.number);
  });
  if (!r) return fail(r.error().message);
  std::printf("\nworker %u, segment %llu, capacity %s bytes, %s entries, %s bets, %s bytes used, %s skipped\n",
              r->header.worker_id, static_cast<unsigned long long>(r->header.segment_index),
              thousands(r->file_bytes).c_str(), thousands(r->entries).c_str(), thousands(r->bets).c_str(),
              thousands(r->valid_bytes).c_str(), thousands(r->skipped_bytes).c_str());
  if (r->stopped_at_bad_entry) {
    std::printf("BAD entry at offset %llu: %s\n", static_cast<unsigned long long>(r->bad_offset),
                r->bad_reason.c_str());
    return 1;
  }
  return 0;
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
  auto* verify = app.add_subcommand("verify", "check every entry of every segment; counts per agency");
  std::string format = "csv";
  auto* exporter = app.add_subcommand("export", "every stored bet on standard output");
  exporter->add_option("--format", format, "csv: agency,first_name,last_name,document,birthdate,number");
  std::string segment_path;
  bool with_bets = false;
  auto* dump = app.add_subcommand("dump", "one segment file, entry by entry");
  dump->add_option("segment", segment_path, "path of the segment file")->required();
  dump->add_flag("--bets", with_bets, "print every bet");
  auto* keys = app.add_subcommand("keys", "TLS pre-shared keys, one per agency (docs/SECURITY.md)");
  keys->require_subcommand(1);
  uint32_t key_agencies = 5;
  uint32_t key_agency = 0;
  std::string key_dir = "./keys";
  bool key_force = false;
  auto* keys_init = keys->add_subcommand("init", "new keys: DIR/server.keys for the server, DIR/agency-N.key for each agency");
  keys_init->add_option("--agencies", key_agencies, "agencies 1..N")->envname("SERVER_AGENCIES");
  keys_init->add_option("--dir", key_dir, "where to write the key files (created, mode 0700)");
  keys_init->add_flag("--force", key_force, "replace an existing server.keys (every agency gets a new key)");
  auto* keys_rotate = keys->add_subcommand("rotate", "a new key for one agency, in its file and in server.keys");
  keys_rotate->add_option("--agency", key_agency, "the agency")->required();
  keys_rotate->add_option("--dir", key_dir, "the key directory");
  CLI11_PARSE(app, argc, argv);
  if (*keys_init) {
    if (auto st = tls::init_key_dir(key_dir, key_agencies, key_force); !st) {
      std::fprintf(stderr, "lotteryctl keys init: %s\n", st.error().message.c_str());
      return 1;
    }
    std::printf("wrote %s/%s (%u agencies) and %s/agency-1.key .. agency-%u.key (mode 0600)\n", key_dir.c_str(),
                tls::server_keys_file_name, key_agencies, key_dir.c_str(), key_agencies);
    return 0;
  }
  if (*keys_rotate) {
    if (auto st = tls::rotate_key(key_dir, key_agency); !st) {
      std::fprintf(stderr, "lotteryctl keys rotate: %s\n", st.error().message.c_str());
      return 1;
    }
    std::printf("agency %u has a new key in %s/%s and %s/%s; send SIGHUP to the server (kill -HUP <master pid>) "
                "to use it: the old key then stops working for new connections\n",
                key_agency, key_dir.c_str(), tls::agency_key_file_name(key_agency).c_str(), key_dir.c_str(),
                tls::server_keys_file_name);
    return 0;
  }
  if (*verify) return cmd_verify(data_dir);
  if (*exporter) return cmd_export(data_dir, format);
  if (*dump) return cmd_dump(segment_path, with_bets);
  if (*status) return cmd_status(data_dir);
  if (*winners) return cmd_winners(data_dir, agency);
  if (*close) return cmd_close(data_dir, winning_number);
  return 1;
}
