// Helpers shared by unit tests: temporary directories that clean up after
// themselves, and encoded sample batches.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include "lottery/protocol.hpp"

namespace testsupport {

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/lottery-test-XXXXXX";
    char* p = ::mkdtemp(tmpl);
    EXPECT_NE(p, nullptr);
    _path = p ? p : "/tmp";
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(_path, ec);
  }
  const std::string& path() const { return _path; }

 private:
  std::string _path;
};

// Encoded bets (wire format) for `count` bets; bet i has number `number_of(i)`
// and document "10000000 + i".
inline std::vector<std::byte> encode_bets(size_t count, uint16_t (*number_of)(size_t),
                                          std::vector<std::string>* docs_out = nullptr) {
  std::vector<std::byte> out;
  std::vector<std::string> docs;
  docs.reserve(count);
  for (size_t i = 0; i < count; i++) docs.push_back(std::to_string(10000000 + i));
  for (size_t i = 0; i < count; i++) {
    lottery::proto::Bet bet{"María", "Núñez", docs[i], lottery::proto::Date{1990, 1, 2}, number_of(i)};
    size_t at = out.size();
    out.resize(at + lottery::proto::encoded_bet_bytes(bet));
    EXPECT_GT(lottery::proto::encode_bet(out.data() + at, out.size() - at, bet), 0u);
  }
  if (docs_out) *docs_out = docs;
  return out;
}

}  // namespace testsupport
