#include "client/client_config.hpp"

#include <CLI/CLI.hpp>
#include <charconv>
#include <map>

#include "common/config.hpp"

namespace lottery::client {
namespace {

// Every place one setting can come from, so an error can name them all.
struct SettingName {
  const char* key;   // config.yaml dotted path, or nullptr when the file has no such key
  const char* env;   // environment variable, or nullptr
  const char* flag;  // command-line flag
};

constexpr SettingName server_address_setting{"server.address", "CLI_SERVER_ADDRESS", "--server-address"};
constexpr SettingName loop_amount_setting{"loop.amount", "CLI_LOOP_AMOUNT", "--loop-amount"};
constexpr SettingName loop_period_setting{"loop.period", "CLI_LOOP_PERIOD", "--loop-period"};
constexpr SettingName log_level_setting{"log.level", "CLI_LOG_LEVEL", "--log-level"};
constexpr SettingName batch_max_amount_setting{"batch.maxAmount", "CLI_BATCH_MAXAMOUNT", "--batch-max-amount"};
constexpr SettingName batch_max_bytes_setting{nullptr, nullptr, "--batch-max-bytes"};
constexpr SettingName inflight_setting{nullptr, nullptr, "--inflight"};
constexpr SettingName id_setting{nullptr, "CLI_ID", "--id"};
constexpr SettingName data_file_setting{nullptr, "CLI_DATA_FILE", "--data-file"};
constexpr SettingName producer_id_setting{nullptr, "CLI_PRODUCER_ID", "--producer-id"};
constexpr SettingName tls_key_setting{"tls.key", "CLI_TLS_KEY", "--tls-key"};
constexpr SettingName nombre_setting{nullptr, "NOMBRE", "--nombre"};
constexpr SettingName apellido_setting{nullptr, "APELLIDO", "--apellido"};
constexpr SettingName documento_setting{nullptr, "DOCUMENTO", "--documento"};
constexpr SettingName nacimiento_setting{nullptr, "NACIMIENTO", "--nacimiento"};
constexpr SettingName numero_setting{nullptr, "NUMERO", "--numero"};

constexpr int exit_usage = 1;  // same code as any other refused input
constexpr uint32_t loop_amount_max = 1'000'000;

std::string describe(const SettingName& s) {
  std::string out = s.flag;
  if (s.env != nullptr) out += std::string(" / ") + s.env;
  if (s.key != nullptr) out += std::string(" / config ") + s.key;
  return out;
}

common::Error setting_error(const SettingName& s, std::string_view value, std::string_view what) {
  return common::Error::make(EINVAL, describe(s) + " = '" + std::string(value) + "': " + std::string(what));
}

// Digits only (no sign, no spaces), within [min, max].
common::Result<uint64_t> parse_uint(const SettingName& s, std::string_view text, uint64_t min, uint64_t max) {
  uint64_t v = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  bool digits_only = !text.empty() && text.front() != '-' && text.front() != '+';
  if (!digits_only || ec != std::errc{} || end != text.data() + text.size())
    return setting_error(s, text, "not a non-negative integer");
  if (v < min || v > max)
    return setting_error(s, text, "out of range " + std::to_string(min) + ".." + std::to_string(max));
  return v;
}

// Registers one string option with its environment variable; `value` already
// holds the config-file value or the default, so an option that is given
// nowhere keeps it.
CLI::Option* add_setting(CLI::App& app, const SettingName& s, std::string& value, const std::string& help) {
  CLI::Option* opt = app.add_option(s.flag, value, help);
  if (s.env != nullptr) opt->envname(s.env);
  return opt;
}

std::string file_value(const std::map<std::string, std::string>& file, const SettingName& s,
                       std::string_view fallback) {
  if (s.key != nullptr) {
    auto it = file.find(s.key);
    if (it != file.end() && !it->second.empty()) return it->second;
  }
  return std::string(fallback);
}

constexpr const char* exit_codes_help =
    "Exit codes: 0 done (or stopped by SIGTERM/SIGINT), 1 input refused (config, data file, a bet the server "
    "rejected, a data file shorter than what the server already stores from it), 2 server not reachable after "
    "loop.amount attempts (at start, or after a dropped connection), 3 protocol error (e.g. the server's stored "
    "stream for this producer disagrees with this client's, or a request for another agency than the TLS key's) "
    "or the server cannot go on (storage error), 4 the server refused the TLS key (wrong, rotated, missing).";

}  // namespace

CommandLine read_command_line(int argc, char** argv) {
  CommandLine result;
  ClientSettings s;

  // The config file is read before the full parse so its values can become
  // the options' defaults: then flag > env > file > default needs no merging.
  std::optional<std::string> config_flag = common::config::prescan_flag(argc, argv, "--config");
  s.config_path = config_flag.value_or(std::string(default_config_path));
  // Only the default file may be absent; a file named on the command line must exist.
  auto file = common::config::load_yaml(s.config_path, !config_flag.has_value());
  std::map<std::string, std::string> values;
  if (file.ok()) values = std::move(file.value());

  s.server_address = file_value(values, server_address_setting, default_server_address);
  s.loop_amount = file_value(values, loop_amount_setting, std::to_string(default_loop_amount));
  s.loop_period = file_value(values, loop_period_setting, "1s");
  s.log_level = file_value(values, log_level_setting, "INFO");
  s.batch_max_amount = file_value(values, batch_max_amount_setting, std::to_string(default_batch_max_amount));
  s.batch_max_bytes = std::to_string(limits::client_batch_bytes_default);
  s.inflight = std::to_string(default_inflight_batches);
  s.tls_key = file_value(values, tls_key_setting, "");

  CLI::App app{"Lottery agency client: sends an agency's bets to the lottery server and asks for its winners.",
               "lottery-client"};
  app.footer(exit_codes_help);
  app.add_option("--config", s.config_path, "YAML config file (default ./config.yaml, optional when absent)");
  add_setting(app, server_address_setting, s.server_address, "Server HOST:PORT (default server:12345)");
  add_setting(app, loop_amount_setting, s.loop_amount, "Connection attempts before giving up (default 10)");
  add_setting(app, loop_period_setting, s.loop_period,
              "Base backoff between connection attempts: 500ms, 1s, 2m or seconds (default 1s)");
  add_setting(app, log_level_setting, s.log_level, "DEBUG, INFO, WARNING, ERROR or CRITICAL (default INFO)");
  add_setting(app, batch_max_amount_setting, s.batch_max_amount, "Bets per batch (default 128, at most 4096)");
  add_setting(app, batch_max_bytes_setting, s.batch_max_bytes, "Byte budget of a batch frame (default 8192)");
  add_setting(app, inflight_setting, s.inflight, "Batches sent ahead of their acknowledgement (default 16)");
  add_setting(app, id_setting, s.id, "Agency id, 1..65535 (required)");
  add_setting(app, data_file_setting, s.data_file, "Agency bet file (default .data/agency-<id>.csv)");
  add_setting(app, producer_id_setting, s.producer_id,
              "Producer id for exactly-once resends, 1..2^64-1 (default: a hash of the agency and the data "
              "file's absolute path, or of the single bet)");
  add_setting(app, tls_key_setting, s.tls_key,
              "This agency's TLS key file (lotteryctl keys init writes agency-N.key); unset: plaintext");
  add_setting(app, nombre_setting, s.single_bet.first_name, "Single-bet mode: first name");
  add_setting(app, apellido_setting, s.single_bet.last_name, "Single-bet mode: last name");
  add_setting(app, documento_setting, s.single_bet.document, "Single-bet mode: document (digits)");
  add_setting(app, nacimiento_setting, s.single_bet.birthdate, "Single-bet mode: birthdate YYYY-MM-DD");
  add_setting(app, numero_setting, s.single_bet.number, "Single-bet mode: number 0..9999");
  app.add_flag("--finish", s.finish, "Single-bet mode: then send FINISHED and ask for the winners");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int code = app.exit(e);  // prints the help or the usage error
    result.exit_code = code == 0 ? 0 : exit_usage;
    return result;
  }
  // Reported after the parse so that --help works even with a broken file.
  if (!file.ok()) {
    result.exit_code = exit_usage;
    result.error = file.error().message;
    return result;
  }
  result.settings = std::move(s);
  return result;
}

common::Result<HostPort> parse_host_port(std::string_view text) {
  HostPort out;
  std::string_view host;
  std::string_view port;
  if (!text.empty() && text.front() == '[') {
    size_t close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':')
      return common::Error::make(EINVAL, "not [IPV6]:PORT");
    host = text.substr(1, close - 1);
    port = text.substr(close + 2);
  } else {
    size_t colon = text.rfind(':');
    if (colon == std::string_view::npos) return common::Error::make(EINVAL, "not HOST:PORT");
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
    if (host.find(':') != std::string_view::npos)
      return common::Error::make(EINVAL, "write an IPv6 address as [ADDR]:PORT");
  }
  if (host.empty()) return common::Error::make(EINVAL, "no host before the port");
  auto p = parse_uint(server_address_setting, port, 1, 65535);
  if (!p.ok()) return common::Error::make(EINVAL, "port must be 1..65535");
  out.host = std::string(host);
  out.port = static_cast<uint16_t>(p.value());
  return out;
}

common::Result<std::chrono::milliseconds> parse_duration(std::string_view text) {
  // Integer arithmetic on "INT[.FRAC][unit]": no locale, no floating-point
  // surprises ("1e3", "inf" and "nan" are refused).
  constexpr size_t int_digits_max = 9;
  constexpr size_t frac_digits_max = 3;  // millisecond resolution
  auto bad = [&] { return common::Error::make(EINVAL, "not a duration (500ms, 1s, 2m or seconds)"); };
  size_t i = 0;
  uint64_t whole = 0;
  while (i < text.size() && text[i] >= '0' && text[i] <= '9')
    whole = whole * 10 + static_cast<uint64_t>(text[i++] - '0');
  if (i == 0 || i > int_digits_max) return bad();
  uint64_t frac = 0;
  uint64_t frac_scale = 1;
  if (i < text.size() && text[i] == '.') {
    i++;
    size_t start = i;
    while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
      if (i - start < frac_digits_max) {
        frac = frac * 10 + static_cast<uint64_t>(text[i] - '0');
        frac_scale *= 10;
      }
      i++;
    }
    if (i == start) return bad();
  }
  std::string_view unit = text.substr(i);
  uint64_t unit_ms;
  if (unit == "ms")
    unit_ms = 1;
  else if (unit == "s" || unit.empty())
    unit_ms = 1000;
  else if (unit == "m")
    unit_ms = uint64_t{60} * 1000;
  else
    return bad();
  uint64_t ms = whole * unit_ms + frac * unit_ms / frac_scale;
  return std::chrono::milliseconds(static_cast<int64_t>(ms));
}

namespace {

common::Status resolve_single_bet(const ClientSettings& raw, ClientConfig& out) {
  const SingleBetFields& f = raw.single_bet;
  const std::pair<const std::string*, const SettingName*> fields[] = {{&f.first_name, &nombre_setting},
                                                                      {&f.last_name, &apellido_setting},
                                                                      {&f.document, &documento_setting},
                                                                      {&f.birthdate, &nacimiento_setting},
                                                                      {&f.number, &numero_setting}};
  std::string missing;
  size_t given = 0;
  for (const auto& [value, name] : fields) {
    if (!value->empty()) {
      given++;
    } else {
      missing += missing.empty() ? "" : ", ";
      missing += name->env;
    }
  }
  if (given == 0) return common::ok_status();
  // Some but not all: most likely a typo in a deployment. Sending the whole
  // agency file instead would be a surprise, so refuse.
  if (given != std::size(fields))
    return common::Error::make(EINVAL,
                               "single-bet mode needs NOMBRE, APELLIDO, DOCUMENTO, NACIMIENTO and NUMERO "
                               "(or --nombre ... --numero); missing: " +
                                   missing);
  out.single_bet = f;
  return common::ok_status();
}

}  // namespace

common::Result<ClientConfig> resolve_client_config(const ClientSettings& raw) {
  ClientConfig c;
  c.server_address = raw.server_address;
  auto server = parse_host_port(raw.server_address);
  if (!server.ok()) return setting_error(server_address_setting, raw.server_address, server.error().message);
  c.server = server.value();

  auto amount = parse_uint(loop_amount_setting, raw.loop_amount, 1, loop_amount_max);
  if (!amount.ok()) return amount.error();
  c.loop_amount = static_cast<uint32_t>(amount.value());

  auto period = parse_duration(raw.loop_period);  // its errors do not repeat the value
  if (!period.ok()) return setting_error(loop_period_setting, raw.loop_period, period.error().message);
  if (period.value() > loop_period_max) return setting_error(loop_period_setting, raw.loop_period, "over 1 hour");
  c.loop_period = period.value();

  if (!common::log::parse_level(raw.log_level, c.log_level))
    return setting_error(log_level_setting, raw.log_level, "not DEBUG, INFO, WARNING, ERROR or CRITICAL");

  auto batch = parse_uint(batch_max_amount_setting, raw.batch_max_amount, 1, UINT32_MAX);
  if (!batch.ok()) return batch.error();
  c.batch_max_amount_clamped = batch.value() > limits::batch_bets_max;
  c.batch_max_amount = c.batch_max_amount_clamped ? limits::batch_bets_max : static_cast<size_t>(batch.value());

  auto bytes = parse_uint(batch_max_bytes_setting, raw.batch_max_bytes, batch_bytes_min, limits::frame_bytes_max);
  if (!bytes.ok()) return bytes.error();
  c.batch_max_bytes = static_cast<size_t>(bytes.value());

  auto inflight = parse_uint(inflight_setting, raw.inflight, 1, inflight_batches_max);
  if (!inflight.ok()) return inflight.error();
  c.inflight = static_cast<size_t>(inflight.value());

  if (raw.id.empty()) return common::Error::make(EINVAL, "the agency id is required: set CLI_ID or --id (1..65535)");
  auto id = parse_uint(id_setting, raw.id, 1, UINT16_MAX);
  if (!id.ok()) return id.error();
  c.agency_id = static_cast<uint16_t>(id.value());

  c.tls_key = raw.tls_key;
  c.data_file = raw.data_file.empty() ? ".data/agency-" + std::to_string(c.agency_id) + ".csv" : raw.data_file;
  if (!raw.producer_id.empty()) {
    // Zero means "no producer" on the wire.
    auto producer = parse_uint(producer_id_setting, raw.producer_id, 1, UINT64_MAX);
    if (!producer.ok()) return producer.error();
    c.producer_id = producer.value();
  }
  c.finish = raw.finish;
  if (auto st = resolve_single_bet(raw, c); !st.ok()) return st.error();
  return c;
}

}  // namespace lottery::client
