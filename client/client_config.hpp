// Settings of the agency client, layered flag > environment > config.yaml >
// default (see common/config.hpp).
//
// Two steps, so each can be tested alone: the command line and its layers
// give raw strings (ClientSettings), then resolve_client_config() checks them
// and turns them into typed values (ClientConfig) with errors that name the
// setting and every place it can come from.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "common/log.hpp"
#include "common/result.hpp"
#include "lottery/limits.hpp"

namespace lottery::client {

inline constexpr std::string_view default_config_path = "config.yaml";
inline constexpr std::string_view default_server_address = "server:12345";
inline constexpr uint32_t default_loop_amount = 10;
inline constexpr std::chrono::milliseconds default_loop_period{1000};
// Connection attempts back off from loop.period, doubling, up to this cap (or
// loop.period itself when that is larger).
inline constexpr std::chrono::milliseconds loop_backoff_cap{5000};
// A period above this is a typo ("500" meant as milliseconds), not a plan.
inline constexpr std::chrono::milliseconds loop_period_max{3600 * 1000};
inline constexpr size_t default_batch_max_amount = 128;
inline constexpr size_t default_inflight_batches = 16;
// Each in-flight batch keeps its frame (for the log once acked) until its ack:
// 64 x 64 KiB is the most memory the window may hold, 4 MiB.
inline constexpr size_t inflight_batches_max = 64;
// The smallest frame budget that still carries one bet of maximal size.
inline constexpr size_t batch_bytes_min =
    limits::frame_header_bytes + limits::batch_body_header_bytes + limits::bet_bytes_max;

static_assert(default_batch_max_amount <= limits::batch_bets_max);
static_assert(default_inflight_batches <= inflight_batches_max);
static_assert(batch_bytes_min <= limits::client_batch_bytes_default);

// The five fields of one bet given on the command line or in the environment
// (NOMBRE, APELLIDO, DOCUMENTO, NACIMIENTO, NUMERO), not yet validated.
struct SingleBetFields {
  std::string first_name;
  std::string last_name;
  std::string document;
  std::string birthdate;
  std::string number;
};

// Raw values after layering; empty means "not given anywhere".
struct ClientSettings {
  std::string config_path;
  std::string server_address;
  std::string loop_amount;
  std::string loop_period;
  std::string log_level;
  std::string batch_max_amount;
  std::string batch_max_bytes;
  std::string inflight;
  std::string id;
  std::string data_file;
  std::string producer_id;
  std::string tls_key;
  SingleBetFields single_bet;
  bool finish = false;
};

// Outcome of reading the command line: settings to run with, or an exit code
// (after --help, or a usage error CLI11 already printed).
struct CommandLine {
  std::optional<ClientSettings> settings;
  int exit_code = 0;
  std::string error;  // why the config file could not be read, if that failed
};

// Parses argv, the environment and the config file. Never throws.
CommandLine read_command_line(int argc, char** argv);

struct HostPort {
  std::string host;
  uint16_t port = 0;
};
// "HOST:PORT" or "[IPv6]:PORT"; the host may be a name. Error messages say
// what is wrong, not the value (the caller names the setting and its value).
common::Result<HostPort> parse_host_port(std::string_view text);

// "500ms", "1s", "2m", "1.5s" or a plain number of seconds ("2", "0.5").
common::Result<std::chrono::milliseconds> parse_duration(std::string_view text);

struct ClientConfig {
  HostPort server;
  std::string server_address;  // as given, for the log
  uint32_t loop_amount = default_loop_amount;
  std::chrono::milliseconds loop_period = default_loop_period;
  common::log::Level log_level = common::log::Level::info;
  size_t batch_max_amount = default_batch_max_amount;
  bool batch_max_amount_clamped = false;  // asked for more than batch_bets_max
  size_t batch_max_bytes = limits::client_batch_bytes_default;
  size_t inflight = default_inflight_batches;
  uint16_t agency_id = 0;
  std::string data_file;
  // Overrides the stable producer id derived from the input (client/producer_id.hpp).
  std::optional<uint64_t> producer_id;
  // Set when all five single-bet fields are given: send that bet alone.
  std::optional<SingleBetFields> single_bet;
  bool finish = false;  // single-bet mode: also send FINISHED and ask for winners
  // The agency's TLS key file (lotteryctl keys init); empty: plaintext.
  std::string tls_key;
};

// Checks and converts the raw settings.
common::Result<ClientConfig> resolve_client_config(const ClientSettings& raw);

}  // namespace lottery::client
