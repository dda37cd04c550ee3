// Client settings: flag > env > config.yaml > default, and the checks that
// turn raw strings into a config.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <fstream>
#include <initializer_list>
#include <string>
#include <vector>

#include "client/client_config.hpp"
#include "test_support.hpp"

using namespace lottery;
using namespace lottery::client;
using namespace std::chrono_literals;

namespace {

// Every variable the client reads; each test starts with none of them set.
const char* const client_env_vars[] = {"CLI_SERVER_ADDRESS",
                                       "CLI_LOOP_AMOUNT",
                                       "CLI_LOOP_PERIOD",
                                       "CLI_LOG_LEVEL",
                                       "CLI_BATCH_MAXAMOUNT",
                                       "CLI_ID",
                                       "CLI_DATA_FILE",
                                       "CLI_PRODUCER_ID",
                                       "CLI_TLS_KEY",
                                       "NOMBRE",
                                       "APELLIDO",
                                       "DOCUMENTO",
                                       "NACIMIENTO",
                                       "NUMERO"};

class ClientConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* name : client_env_vars) {
      if (const char* v = ::getenv(name)) _saved.emplace_back(name, v);
      ::unsetenv(name);
    }
  }
  void TearDown() override {
    for (const char* name : client_env_vars) ::unsetenv(name);
    for (const auto& [name, value] : _saved) ::setenv(name.c_str(), value.c_str(), 1);
  }

  std::string write_yaml(const std::string& text) {
    std::string path = _dir.path() + "/config.yaml";
    std::ofstream(path) << text;
    return path;
  }

  // Runs read_command_line on "lottery-client ARGS...".
  static CommandLine parse(std::initializer_list<std::string> args) {
    std::vector<std::string> storage = {"lottery-client"};
    storage.insert(storage.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (std::string& s : storage) argv.push_back(s.data());
    argv.push_back(nullptr);
    return read_command_line(static_cast<int>(storage.size()), argv.data());
  }

  static ClientConfig resolve_ok(const CommandLine& cl) {
    if (!cl.settings) {
      ADD_FAILURE() << "command line refused: " << cl.error;
      return {};
    }
    auto cfg = resolve_client_config(*cl.settings);
    if (!cfg.ok()) {
      ADD_FAILURE() << cfg.error().message;
      return {};
    }
    return cfg.value();
  }

  testsupport::TempDir _dir;
  std::vector<std::pair<std::string, std::string>> _saved;
};

ClientSettings valid_settings() {
  ClientSettings s;
  s.server_address = "server:12345";
  s.loop_amount = "10";
  s.loop_period = "1s";
  s.log_level = "INFO";
  s.batch_max_amount = "128";
  s.batch_max_bytes = "8192";
  s.inflight = "16";
  s.id = "1";
  return s;
}

std::string resolve_error(const ClientSettings& s) {
  auto cfg = resolve_client_config(s);
  EXPECT_FALSE(cfg.ok());
  return cfg.ok() ? "" : cfg.error().message;
}

}  // namespace

TEST_F(ClientConfigTest, DefaultsWhenNothingIsGiven) {
  std::string empty = write_yaml("");
  ClientConfig c = resolve_ok(parse({"--config", empty, "--id", "4"}));
  EXPECT_EQ(c.server.host, "server");
  EXPECT_EQ(c.server.port, 12345);
  EXPECT_EQ(c.loop_amount, 10u);
  EXPECT_EQ(c.loop_period, 1000ms);
  EXPECT_EQ(c.log_level, common::log::Level::info);
  EXPECT_EQ(c.batch_max_amount, 128u);
  EXPECT_EQ(c.batch_max_bytes, limits::client_batch_bytes_default);
  EXPECT_EQ(c.inflight, 16u);
  EXPECT_EQ(c.agency_id, 4);
  EXPECT_EQ(c.data_file, ".data/agency-4.csv");
  EXPECT_FALSE(c.producer_id.has_value());  // derived from the input
  EXPECT_FALSE(c.single_bet.has_value());
}

TEST_F(ClientConfigTest, TlsKeyIsLayeredFlagOverEnvOverFile) {
  std::string path = write_yaml("tls:\n  key: \"/from/file.key\"\n");
  EXPECT_EQ(resolve_ok(parse({"--config", path, "--id", "1"})).tls_key, "/from/file.key");
  ::setenv("CLI_TLS_KEY", "/from/env.key", 1);
  EXPECT_EQ(resolve_ok(parse({"--config", path, "--id", "1"})).tls_key, "/from/env.key");
  EXPECT_EQ(resolve_ok(parse({"--config", path, "--id", "1", "--tls-key", "/from/flag.key"})).tls_key,
            "/from/flag.key");
  ::unsetenv("CLI_TLS_KEY");
  EXPECT_EQ(resolve_ok(parse({"--id", "1"})).tls_key, "");  // plaintext unless given
}

TEST_F(ClientConfigTest, ProducerIdFromEnvOrFlag) {
  std::string empty = write_yaml("");
  ::setenv("CLI_PRODUCER_ID", "18446744073709551615", 1);
  EXPECT_EQ(resolve_ok(parse({"--config", empty, "--id", "4"})).producer_id, UINT64_MAX);
  EXPECT_EQ(resolve_ok(parse({"--config", empty, "--id", "4", "--producer-id", "42"})).producer_id, 42u);
}

TEST_F(ClientConfigTest, DefaultConfigFileMayBeAbsent) {
  // The default path is relative to the working directory: run from an empty one.
  char old_cwd[4096];
  ASSERT_NE(::getcwd(old_cwd, sizeof old_cwd), nullptr);
  ASSERT_EQ(::chdir(_dir.path().c_str()), 0);
  CommandLine cl = parse({"--id", "1"});
  ASSERT_EQ(::chdir(old_cwd), 0);
  ClientConfig c = resolve_ok(cl);
  EXPECT_EQ(c.server_address, "server:12345");
}

TEST_F(ClientConfigTest, NamedConfigFileMustExist) {
  CommandLine cl = parse({"--config", _dir.path() + "/missing.yaml", "--id", "1"});
  EXPECT_FALSE(cl.settings.has_value());
  EXPECT_EQ(cl.exit_code, 1);
  EXPECT_NE(cl.error.find("missing.yaml"), std::string::npos);
}

TEST_F(ClientConfigTest, BrokenConfigFileIsAnError) {
  std::string path = write_yaml("server: [unclosed\n");
  CommandLine cl = parse({"--config", path, "--id", "1"});
  EXPECT_FALSE(cl.settings.has_value());
  EXPECT_EQ(cl.exit_code, 1);
  EXPECT_FALSE(cl.error.empty());
}

TEST_F(ClientConfigTest, FileOverridesDefault) {
  std::string path = write_yaml(
      "server:\n  address: \"file-host:1000\"\nloop:\n  amount: 5\n  period: \"5s\"\nlog:\n  level: DEBUG\n"
      "batch:\n  maxAmount: 50\n");
  ClientConfig c = resolve_ok(parse({"--config", path, "--id", "1"}));
  EXPECT_EQ(c.server_address, "file-host:1000");
  EXPECT_EQ(c.loop_amount, 5u);
  EXPECT_EQ(c.loop_period, 5000ms);
  EXPECT_EQ(c.log_level, common::log::Level::debug);
  EXPECT_EQ(c.batch_max_amount, 50u);
}

TEST_F(ClientConfigTest, EnvOverridesFile) {
  std::string path =
      write_yaml("server:\n  address: \"file-host:1000\"\nloop:\n  amount: 5\nbatch:\n  maxAmount: 50\n");
  ::setenv("CLI_SERVER_ADDRESS", "env-host:2000", 1);
  ::setenv("CLI_LOOP_AMOUNT", "7", 1);
  ::setenv("CLI_BATCH_MAXAMOUNT", "60", 1);
  ::setenv("CLI_LOOP_PERIOD", "250ms", 1);
  ::setenv("CLI_LOG_LEVEL", "warning", 1);
  ::setenv("CLI_ID", "3", 1);
  ::setenv("CLI_DATA_FILE", "/tmp/x.csv", 1);
  ClientConfig c = resolve_ok(parse({"--config", path}));
  EXPECT_EQ(c.server_address, "env-host:2000");
  EXPECT_EQ(c.loop_amount, 7u);
  EXPECT_EQ(c.batch_max_amount, 60u);
  EXPECT_EQ(c.loop_period, 250ms);
  EXPECT_EQ(c.log_level, common::log::Level::warning);
  EXPECT_EQ(c.agency_id, 3);
  EXPECT_EQ(c.data_file, "/tmp/x.csv");
}

TEST_F(ClientConfigTest, FlagOverridesEnv) {
  std::string path = write_yaml("server:\n  address: \"file-host:1000\"\n");
  ::setenv("CLI_SERVER_ADDRESS", "env-host:2000", 1);
  ::setenv("CLI_LOOP_AMOUNT", "7", 1);
  ::setenv("CLI_ID", "3", 1);
  ClientConfig c = resolve_ok(parse({"--config", path, "--server-address", "flag-host:3000", "--loop-amount=2", "--id",
                                     "9", "--batch-max-bytes", "4096", "--inflight", "4"}));
  EXPECT_EQ(c.server_address, "flag-host:3000");
  EXPECT_EQ(c.server.port, 3000);
  EXPECT_EQ(c.loop_amount, 2u);
  EXPECT_EQ(c.agency_id, 9);
  EXPECT_EQ(c.batch_max_bytes, 4096u);
  EXPECT_EQ(c.inflight, 4u);
}

TEST_F(ClientConfigTest, EmptyEnvDoesNotOverride) {
  std::string path = write_yaml("server:\n  address: \"file-host:1000\"\n");
  ::setenv("CLI_SERVER_ADDRESS", "", 1);
  ClientConfig c = resolve_ok(parse({"--config", path, "--id", "1"}));
  EXPECT_EQ(c.server_address, "file-host:1000");
}

TEST_F(ClientConfigTest, SingleBetFromEnvOrFlags) {
  std::string empty = write_yaml("");
  ::setenv("NOMBRE", "Ana", 1);
  ::setenv("APELLIDO", "Núñez", 1);
  ::setenv("DOCUMENTO", "30904465", 1);
  ::setenv("NACIMIENTO", "1999-03-17", 1);
  ::setenv("NUMERO", "7574", 1);
  ClientConfig c = resolve_ok(parse({"--config", empty, "--id", "1", "--numero", "12", "--finish"}));
  ASSERT_TRUE(c.single_bet.has_value());
  EXPECT_EQ(c.single_bet->first_name, "Ana");
  EXPECT_EQ(c.single_bet->last_name, "Núñez");
  EXPECT_EQ(c.single_bet->number, "12");  // the flag wins
  EXPECT_TRUE(c.finish);
}

TEST_F(ClientConfigTest, PartialSingleBetIsRefused) {
  ClientSettings s = valid_settings();
  s.single_bet.first_name = "Ana";
  s.single_bet.number = "1";
  std::string e = resolve_error(s);
  EXPECT_NE(e.find("missing: APELLIDO, DOCUMENTO, NACIMIENTO"), std::string::npos) << e;
}

TEST_F(ClientConfigTest, HelpExitsCleanly) {
  testing::internal::CaptureStdout();
  CommandLine cl = parse({"--help"});
  std::string out = testing::internal::GetCapturedStdout();
  EXPECT_FALSE(cl.settings.has_value());
  EXPECT_EQ(cl.exit_code, 0);
  EXPECT_NE(out.find("--server-address"), std::string::npos);
}

TEST_F(ClientConfigTest, UnknownFlagIsAUsageError) {
  testing::internal::CaptureStderr();
  CommandLine cl = parse({"--no-such-flag"});
  testing::internal::GetCapturedStderr();
  EXPECT_FALSE(cl.settings.has_value());
  EXPECT_EQ(cl.exit_code, 1);
}

TEST(ClientConfigResolve, ChecksEverySetting) {
  EXPECT_TRUE(resolve_client_config(valid_settings()).ok());
  auto with = [](auto change) {
    ClientSettings s = valid_settings();
    change(s);
    return resolve_error(s);
  };
  EXPECT_NE(with([](auto& s) { s.id = ""; }).find("CLI_ID"), std::string::npos);
  EXPECT_NE(with([](auto& s) { s.id = "0"; }).find("1..65535"), std::string::npos);
  EXPECT_NE(with([](auto& s) { s.id = "65536"; }).find("1..65535"), std::string::npos);
  EXPECT_NE(with([](auto& s) { s.id = "-1"; }).find("--id"), std::string::npos);
  EXPECT_NE(with([](auto& s) { s.loop_amount = "0"; }).find("loop.amount"), std::string::npos);
  EXPECT_NE(with([](auto& s) { s.loop_amount = "ten"; }).find("CLI_LOOP_AMOUNT"), std::string::npos);
  EXPECT_NE(with([](auto& s) { s.loop_period = "soon"; }).find("loop.period"), std::string::npos);
  EXPECT_NE(with([](auto& s) { s.loop_period = "2h"; }).find("loop.period"), std::string::npos);
  EXPECT_NE(with([](auto& s) { s.loop_period = "7200"; }).find("over 1 hour"), std::string::npos);
  EXPECT_NE(with([](auto& s) { s.log_level = "LOUD"; }).find("log.level"), std::string::npos);
  EXPECT_NE(with([](auto& s) { s.batch_max_amount = "0"; }).find("batch.maxAmount"), std::string::npos);
  EXPECT_NE(with([](auto& s) { s.batch_max_bytes = "100"; }).find("--batch-max-bytes"), std::string::npos);
  EXPECT_NE(with([](auto& s) { s.batch_max_bytes = "70000"; }).find("--batch-max-bytes"), std::string::npos);
  EXPECT_NE(with([](auto& s) { s.inflight = "0"; }).find("--inflight"), std::string::npos);
  EXPECT_NE(with([](auto& s) { s.inflight = "65"; }).find("--inflight"), std::string::npos);
  EXPECT_NE(with([](auto& s) { s.server_address = "no-port"; }).find("server.address"), std::string::npos);
  // Zero means "no producer" on the wire.
  EXPECT_NE(with([](auto& s) { s.producer_id = "0"; }).find("CLI_PRODUCER_ID"), std::string::npos);
  EXPECT_NE(with([](auto& s) { s.producer_id = "18446744073709551616"; }).find("--producer-id"), std::string::npos);
}

TEST(ClientConfigResolve, ClampsBatchAmount) {
  ClientSettings s = valid_settings();
  s.batch_max_amount = "100000";
  auto c = resolve_client_config(s);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->batch_max_amount, limits::batch_bets_max);
  EXPECT_TRUE(c->batch_max_amount_clamped);
}

TEST(ClientConfigParse, Durations) {
  struct Case {
    const char* text;
    int64_t ms;
  };
  for (const Case& c : {Case{"500ms", 500}, Case{"1s", 1000}, Case{"2m", 120000}, Case{"3", 3000}, Case{"0.5", 500},
                        Case{"1.25s", 1250}, Case{"0", 0}, Case{"0ms", 0}}) {
    auto d = parse_duration(c.text);
    ASSERT_TRUE(d.ok()) << c.text;
    EXPECT_EQ(d->count(), c.ms) << c.text;
  }
  for (const char* bad : {"", "s", "ms", "-1s", "1.s", ".5", "1e3", "1 s", "1sec", "inf", "1h"})
    EXPECT_FALSE(parse_duration(bad).ok()) << bad;
}

TEST(ClientConfigParse, HostPort) {
  auto a = parse_host_port("server:12345");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->host, "server");
  EXPECT_EQ(a->port, 12345);
  auto b = parse_host_port("[::1]:8080");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->host, "::1");
  EXPECT_EQ(b->port, 8080);
  auto c = parse_host_port("10.0.0.1:1");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->host, "10.0.0.1");
  for (const char* bad :
       {"server", "server:", ":123", "server:0", "server:65536", "server:12a", "::1:80", "[::1]80", "[::1]"})
    EXPECT_FALSE(parse_host_port(bad).ok()) << bad;
}
