// The hostile-input limits as server settings: defaults, flag > environment >
// config.ini, and ranges that refuse a limit the buffers are not built for.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <fstream>
#include <string>
#include <vector>

#include "server/server_config.hpp"
#include "test_support.hpp"

namespace {

common::Result<server::ServerConfig> parse(const std::vector<std::string>& args, int& exit_code) {
  static char program[] = "lottery-server";
  std::vector<std::string> copy = args;
  std::vector<char*> argv{program};
  for (auto& a : copy) argv.push_back(a.data());
  return server::parse_config(static_cast<int>(argv.size()), argv.data(), exit_code);
}

class ServerLimitsConfig : public ::testing::Test {
 protected:
  void SetUp() override {
    ini = dir.path() + "/config.ini";
    std::ofstream(ini) << "[DEFAULT]\n";
  }
  void TearDown() override {
    ::unsetenv("SERVER_IDLE_TIMEOUT_MS");
    ::unsetenv("SERVER_MAX_CONNECTIONS_TOTAL");
  }
  testsupport::TempDir dir;
  std::string ini;
  int exit_code = -1;
};

TEST_F(ServerLimitsConfig, DefaultsAreTheNamedLimits) {
  auto cfg = parse({"--config", ini}, exit_code);
  ASSERT_TRUE(cfg) << cfg.error().message;
  namespace lim = lottery::limits;
  EXPECT_EQ(cfg->max_connections, lim::connections_per_worker_default);
  EXPECT_EQ(cfg->max_connections_total, lim::connections_total_default);
  EXPECT_EQ(cfg->max_frame_bytes, lim::frame_bytes_max);
  EXPECT_EQ(cfg->max_batch_bets, lim::batch_bets_max);
  EXPECT_EQ(cfg->max_unidentified_bytes, lim::unidentified_bytes_default);
  EXPECT_EQ(cfg->max_pending_reply_bytes, lim::pending_reply_bytes_default);
  EXPECT_EQ(cfg->handshake_timeout_ms, lim::handshake_timeout_ms_default);
  EXPECT_EQ(cfg->idle_timeout_ms, lim::idle_timeout_ms_default);
  EXPECT_EQ(cfg->reply_stall_timeout_ms, lim::reply_stall_timeout_ms_default);
}

TEST_F(ServerLimitsConfig, FlagOverEnvironmentOverIni) {
  std::ofstream(ini) << "[DEFAULT]\nSERVER_IDLE_TIMEOUT_MS = 1000\nSERVER_MAX_FRAME_BYTES = 8192\n"
                        "SERVER_MAX_CONNECTIONS_TOTAL = 50\n";
  ::setenv("SERVER_IDLE_TIMEOUT_MS", "2000", 1);
  ::setenv("SERVER_MAX_CONNECTIONS_TOTAL", "60", 1);
  auto cfg = parse({"--config", ini, "--max-connections-total", "70"}, exit_code);
  ASSERT_TRUE(cfg) << cfg.error().message;
  EXPECT_EQ(cfg->max_frame_bytes, 8192u);      // ini
  EXPECT_EQ(cfg->idle_timeout_ms, 2000u);      // environment over ini
  EXPECT_EQ(cfg->max_connections_total, 70u);  // flag over environment
}

TEST_F(ServerLimitsConfig, LimitsPastWhatTheBuffersHoldAreRefused) {
  const char* const bad[][2] = {{"--max-frame-bytes", "65537"},
                                {"--max-frame-bytes", "100"},
                                {"--max-batch-bets", "4097"},
                                {"--max-batch-bets", "0"},
                                {"--max-pending-reply-bytes", "1000000"},
                                {"--max-unidentified-bytes", "10"},
                                {"--handshake-timeout-ms", "0"},
                                {"--idle-timeout-ms", "1"}};
  for (const auto& flag : bad) {
    testing::internal::CaptureStderr();
    testing::internal::CaptureStdout();
    auto cfg = parse({"--config", ini, flag[0], flag[1]}, exit_code);
    testing::internal::GetCapturedStderr();
    testing::internal::GetCapturedStdout();
    EXPECT_FALSE(cfg) << flag[0] << " " << flag[1];
  }
}

}  // namespace
