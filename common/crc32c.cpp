#include "common/crc32c.hpp"

#include <array>
#include <cstring>

namespace common {
namespace {

constexpr uint32_t castagnoli_reflected = 0x82F63B78u;

constexpr std::array<uint32_t, 256> make_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ castagnoli_reflected : c >> 1;
    table[i] = c;
  }
  return table;
}
constexpr auto crc_table = make_table();

uint32_t crc32c_portable(uint32_t crc, const unsigned char* p, size_t n) {
  crc = ~crc;
  while (n--) crc = crc_table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

#if defined(__x86_64__)
// The crc32 instruction has a latency of 3 cycles and a throughput of one
// per cycle, so one dependent chain uses a third of the unit. Long inputs are
// cut into rounds of three equal blocks, each CRC'd by its own chain, and the
// three registers are combined at the end of the round. The combination uses
// the CRC's linearity: running a register over n more bytes is the same as
// running it over n zero bytes (a linear map of the register, tabulated
// below) and XOR-ing the CRC of those bytes from 0. So, with registers A, B,
// C over blocks of L bytes:  crc(A ++ B ++ C) = zeros(zeros(A, L) ^ B, L) ^ C.

// Block sizes of a round: long for bulk, short for what is left (a 5 KB
// frame is three long rounds and two short ones).
constexpr size_t long_block_bytes = 512;
constexpr size_t short_block_bytes = 64;

// zeros(x, bytes) as four byte-indexed tables: the map is linear, so it is
// the XOR of its values on the bytes of x.
using ZeroTable = std::array<std::array<uint32_t, 256>, 4>;

constexpr ZeroTable make_zero_table(size_t bytes) {
  std::array<uint32_t, 32> basis{};  // zeros(1 << k, bytes)
  for (int k = 0; k < 32; k++) {
    uint32_t x = uint32_t{1} << k;
    for (size_t bit = 0; bit < 8 * bytes; bit++) x = (x & 1) ? (x >> 1) ^ castagnoli_reflected : x >> 1;
    basis[k] = x;
  }
  ZeroTable t{};
  for (int i = 0; i < 4; i++)
    for (uint32_t v = 0; v < 256; v++) {
      uint32_t x = 0;
      for (int b = 0; b < 8; b++)
        if (v & (1u << b)) x ^= basis[8 * i + b];
      t[i][v] = x;
    }
  return t;
}
constexpr ZeroTable long_zeros = make_zero_table(long_block_bytes);
constexpr ZeroTable short_zeros = make_zero_table(short_block_bytes);

inline uint32_t zeros(const ZeroTable& t, uint32_t x) {
  return t[0][x & 0xFF] ^ t[1][(x >> 8) & 0xFF] ^ t[2][(x >> 16) & 0xFF] ^ t[3][x >> 24];
}

inline uint64_t load64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

template <size_t Block>
__attribute__((target("sse4.2"), always_inline)) inline uint32_t crc_round(uint32_t crc, const unsigned char* p,
                                                                            const ZeroTable& t) {
  static_assert(Block % 8 == 0);
  uint64_t a = crc, b = 0, c = 0;
  for (size_t i = 0; i < Block; i += 8) {
    a = __builtin_ia32_crc32di(a, load64(p + i));
    b = __builtin_ia32_crc32di(b, load64(p + Block + i));
    c = __builtin_ia32_crc32di(c, load64(p + 2 * Block + i));
  }
  uint32_t ab = zeros(t, static_cast<uint32_t>(a)) ^ static_cast<uint32_t>(b);
  return zeros(t, ab) ^ static_cast<uint32_t>(c);
}

__attribute__((target("sse4.2"))) uint32_t crc32c_sse42(uint32_t crc, const unsigned char* p, size_t n) {
  uint32_t c32 = ~crc;
  while (n >= 3 * long_block_bytes) {
    c32 = crc_round<long_block_bytes>(c32, p, long_zeros);
    p += 3 * long_block_bytes;
    n -= 3 * long_block_bytes;
  }
  while (n >= 3 * short_block_bytes) {
    c32 = crc_round<short_block_bytes>(c32, p, short_zeros);
    p += 3 * short_block_bytes;
    n -= 3 * short_block_bytes;
  }
  uint64_t c = c32;
  while (n >= 8) {
    c = __builtin_ia32_crc32di(c, load64(p));
    p += 8;
    n -= 8;
  }
  c32 = static_cast<uint32_t>(c);
  while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
  return ~c32;
}
#endif

using crc_fn = uint32_t (*)(uint32_t, const unsigned char*, size_t);

crc_fn pick_implementation() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("sse4.2")) return crc32c_sse42;
#endif
  return crc32c_portable;
}

const crc_fn crc_impl = pick_implementation();

}  // namespace

uint32_t crc32c_extend(uint32_t crc, const void* data, size_t size) {
  return crc_impl(crc, static_cast<const unsigned char*>(data), size);
}

uint32_t crc32c_extend_portable(uint32_t crc, const void* data, size_t size) {
  return crc32c_portable(crc, static_cast<const unsigned char*>(data), size);
}

}  // namespace common
