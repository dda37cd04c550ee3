// The CRC32C in use (three interleaved SSE4.2 streams where the CPU has the
// instruction) against the byte-at-a-time table implementation and known
// values, over lengths and alignments that hit every block size and tail.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "common/crc32c.hpp"

namespace {

TEST(Crc32c, KnownValues) {
  EXPECT_EQ(common::crc32c("123456789", 9), 0xE3069283u);  // the check value of CRC-32C
  EXPECT_EQ(common::crc32c("", 0), 0u);
  std::vector<unsigned char> zeros(32, 0);
  EXPECT_EQ(common::crc32c(zeros.data(), zeros.size()), 0x8A9136AAu);  // RFC 3720, B.4
  std::vector<unsigned char> ones(32, 0xFF);
  EXPECT_EQ(common::crc32c(ones.data(), ones.size()), 0x62A8AB43u);
}

TEST(Crc32c, MatchesTheTableImplementationOnRandomLengthsAndAlignments) {
  constexpr uint32_t seed = 20261205;
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::vector<unsigned char> buf(70'000 + 64);
  for (auto& b : buf) b = static_cast<unsigned char>(rng());
  auto check = [&](size_t offset, size_t len, uint32_t init) {
    const unsigned char* p = buf.data() + offset;
    ASSERT_EQ(common::crc32c_extend(init, p, len), common::crc32c_extend_portable(init, p, len))
        << "offset " << offset << " length " << len << " init " << init;
  };
  // Every length up to a few rounds of both block sizes, at every alignment mod 8.
  for (size_t len = 0; len <= 3 * 1536 + 200; len++) check(len % 8, len, 0);
  std::uniform_int_distribution<size_t> length(0, 70'000), offset(0, 63);
  for (int i = 0; i < 2000; i++) check(offset(rng), length(rng), static_cast<uint32_t>(rng()));
}

TEST(Crc32c, ExtendIsConcatenation) {
  std::mt19937 rng(7);
  std::vector<unsigned char> buf(20'000);
  for (auto& b : buf) b = static_cast<unsigned char>(rng());
  uint32_t whole = common::crc32c(buf.data(), buf.size());
  for (size_t cut : {size_t{0}, size_t{1}, size_t{191}, size_t{192}, size_t{1535}, size_t{1536}, size_t{7777},
                     buf.size()})
    EXPECT_EQ(common::crc32c_extend(common::crc32c(buf.data(), cut), buf.data() + cut, buf.size() - cut), whole)
        << "cut " << cut;
}

}  // namespace
