// lottery-loadgen: load generator for the lottery server (and, for
// comparison, the discard sink and Redis). See client/loadgen.hpp and
// docs/PERFORMANCE.md.
//
//   lottery-loadgen --address 127.0.0.1:12345 --connections 4 --batch 128 --pipeline 8 --duration 10
//   lottery-loadgen --rate 200000 --duration 10 --json       # open loop
//
// Exit status: 0 when every request was acknowledged, 1 when some failed
// (the report says which), 2 on a usage or setup error.
#include <signal.h>

#include <atomic>
#include <cstdio>

#include "client/loadgen.hpp"
#include "common/signals.hpp"

namespace {

constexpr int exit_ok = 0;
constexpr int exit_request_errors = 1;
constexpr int exit_setup_failed = 2;

std::atomic<bool> g_stop{false};

void on_stop_signal(int) {
  g_stop.store(true, std::memory_order_relaxed);
}

}  // namespace

int main(int argc, char** argv) {
  int exit_code = 0;
  auto options = lottery::loadgen::parse_options(argc, argv, exit_code);
  if (!options) return exit_code;

  // A signal only sets the flag: the run stops sending, drains and reports.
  common::signals::handle(SIGINT, on_stop_signal);
  common::signals::handle(SIGTERM, on_stop_signal);
  common::signals::ignore(SIGPIPE);

  auto report = lottery::loadgen::run(*options, &g_stop);
  if (!report) {
    std::fprintf(stderr, "lottery-loadgen: %s\n", report.error().message.c_str());
    return exit_setup_failed;
  }
  std::string text = options->json ? lottery::loadgen::format_json(*report) : lottery::loadgen::format_text(*report);
  std::fwrite(text.data(), 1, text.size(), stdout);
  return report->error_count() == 0 ? exit_ok : exit_request_errors;
}
