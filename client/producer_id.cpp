#include "client/producer_id.hpp"

#include <climits>
#include <cstdlib>

namespace lottery::client {
namespace {

// 64-bit FNV-1a (offset basis and prime from the FNV reference). Fields are
// fed in a fixed little-endian layout, so the id does not depend on the host.
class Fnv1a64 {
 public:
  void bytes(std::string_view s) {
    for (char c : s) {
      _h ^= static_cast<unsigned char>(c);
      _h *= prime;
    }
  }
  void u64(uint64_t v) {
    for (int i = 0; i < 8; i++) {
      _h ^= static_cast<uint8_t>(v >> (8 * i));
      _h *= prime;
    }
  }
  // Length first, so ("ab", "c") and ("a", "bc") hash differently.
  void field(std::string_view s) {
    u64(s.size());
    bytes(s);
  }
  // Zero means "no producer" on the wire; remap the one hash that lands there.
  uint64_t id() const { return _h != 0 ? _h : 1; }

 private:
  static constexpr uint64_t offset_basis = 0xcbf29ce484222325ull;
  static constexpr uint64_t prime = 0x100000001b3ull;
  uint64_t _h = offset_basis;
};

// The tag names the program and the kind of stream, so a file stream and a
// single-bet stream can never share an id.
Fnv1a64 start(std::string_view kind, uint16_t agency) {
  Fnv1a64 h;
  h.field("lottery-client");
  h.field(kind);
  h.u64(agency);
  return h;
}

}  // namespace

uint64_t file_producer_id(uint16_t agency, std::string_view canonical_file_path) {
  Fnv1a64 h = start("file", agency);
  h.field(canonical_file_path);
  return h.id();
}

uint64_t bet_producer_id(uint16_t agency, const proto::Bet& bet) {
  // Parsed values, not the raw text: "042" and "42" are the same number.
  Fnv1a64 h = start("bet", agency);
  h.field(bet.document);
  h.u64(bet.number);
  h.u64(bet.birthdate.ordinal());
  h.field(bet.first_name);
  h.field(bet.last_name);
  return h.id();
}

common::Result<std::string> canonical_path(const std::string& path) {
  char resolved[PATH_MAX];
  if (::realpath(path.c_str(), resolved) == nullptr) return common::Error::from_errno(("realpath " + path).c_str());
  return std::string(resolved);
}

}  // namespace lottery::client
