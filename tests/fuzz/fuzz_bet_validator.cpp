// libFuzzer target: the bet parser and validator. The input is a batch body
// (agency, count, bets) as the server receives it. Properties:
// - a batch that validates re-encodes, bet by bet, to exactly its bytes, and
//   every bet in it passes check_bet;
// - a rejection names a bet inside the batch (or none);
// - check_name agrees with a plain, byte-at-a-time reference of the name rules
//   (UTF-8 without overlong forms, surrogates or code points past U+10FFFF; no
//   C0, DEL or C1 control characters; no comma; 1..100 bytes), so the fast
//   path of the real one is checked against the rules themselves.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <vector>

#include "lottery/limits.hpp"
#include "lottery/protocol.hpp"

namespace {

using namespace lottery;

bool reference_name_ok(std::string_view name) {
  if (name.empty() || name.size() > limits::name_bytes_max) return false;
  size_t i = 0;
  while (i < name.size()) {
    auto b0 = static_cast<unsigned char>(name[i]);
    uint32_t cp;
    size_t len;
    if (b0 < 0x80) {
      cp = b0;
      len = 1;
    } else if ((b0 & 0xE0) == 0xC0) {
      cp = b0 & 0x1Fu;
      len = 2;
    } else if ((b0 & 0xF0) == 0xE0) {
      cp = b0 & 0x0Fu;
      len = 3;
    } else if ((b0 & 0xF8) == 0xF0) {
      cp = b0 & 0x07u;
      len = 4;
    } else {
      return false;
    }
    if (i + len > name.size()) return false;
    for (size_t k = 1; k < len; k++) {
      auto b = static_cast<unsigned char>(name[i + k]);
      if ((b & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (b & 0x3Fu);
    }
    static constexpr uint32_t smallest[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < smallest[len]) return false;  // overlong
    if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    if (cp < 0x20 || cp == 0x7F || (cp >= 0x80 && cp <= 0x9F)) return false;
    if (cp == ',') return false;
    i += len;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  // The first byte picks the context: how many agencies exist.
  proto::ValidationContext ctx{static_cast<uint16_t>(1 + data[0] % 8), proto::Date{2026, 6, 1}};
  proto::Bytes body(reinterpret_cast<const std::byte*>(data + 1), size - 1);

  // The name rules, on the whole input and on each of its tails.
  std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  for (size_t from = 0; from < text.size() && from < 8; from++) {
    std::string_view name = text.substr(from, limits::name_bytes_max + 1);
    if ((proto::check_name(name) == nullptr) != reference_name_ok(name)) __builtin_trap();
  }

  proto::BatchInfo info;
  auto rejection = proto::validate_batch(body, ctx, info);
  if (rejection) {
    if (rejection->status == proto::Status::ok) __builtin_trap();
    if (rejection->index != proto::no_bet_index && rejection->index >= info.count) __builtin_trap();
    if (rejection->reason == nullptr || rejection->reason[0] == '\0') __builtin_trap();
    return 0;
  }
  // Accepted: walk it again and re-encode every bet.
  if (info.count == 0 || info.count > limits::batch_bets_max) __builtin_trap();
  if (info.agency < 1 || info.agency > ctx.agencies) __builtin_trap();
  proto::Bytes bets = body.subspan(limits::batch_body_header_bytes);
  proto::BetCursor cursor(bets);
  std::vector<std::byte> again(bets.size());
  size_t written = 0;
  proto::Bet bet;
  for (uint16_t i = 0; i < info.count; i++) {
    if (!cursor.next(bet)) __builtin_trap();
    if (proto::check_bet(bet, ctx)) __builtin_trap();
    size_t n = proto::encode_bet(again.data() + written, again.size() - written, bet);
    if (n == 0 || n != proto::encoded_bet_bytes(bet)) __builtin_trap();
    written += n;
  }
  if (!cursor.at_end() || written != bets.size()) __builtin_trap();
  if (std::memcmp(again.data(), bets.data(), bets.size()) != 0) __builtin_trap();
  return 0;
}
