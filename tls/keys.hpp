// Pre-shared keys, one per agency. A keys file is text, one key a line:
//
//   # comment
//   <identity> <64 hex digits>
//
// The server's file has every agency's line; an agency's file has its own
// line only (tools: lotteryctl keys init / rotate). Keys come from OpenSSL's
// RAND_bytes; nothing here does cryptography.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "common/result.hpp"
#include "tls/limits.hpp"

namespace tls {

using Key = std::array<uint8_t, limits::key_bytes>;

struct KeyEntry {
  uint32_t identity = 0;
  Key key{};
};

class KeyRing {
 public:
  // Parses a keys file. An error names the file and the line.
  static common::Result<KeyRing> load(const std::string& path);
  static common::Result<KeyRing> parse(std::string_view text, const std::string& origin);

  // The key of `identity`, or nullptr. Lookup by the (public) identity only.
  const Key* find(uint32_t identity) const;
  const std::vector<KeyEntry>& entries() const { return _entries; }
  bool empty() const { return _entries.empty(); }
  size_t size() const { return _entries.size(); }
  void set(uint32_t identity, const Key& key);

 private:
  std::vector<KeyEntry> _entries;  // sorted by identity
};

// 32 fresh random bytes from OpenSSL's CSPRNG.
common::Result<Key> random_key();
std::string to_hex(const Key& key);
// One line per entry, in the file format above, with a header comment.
std::string format_keys(const KeyRing& ring, std::string_view comment);
// Writes `text` to `path` with mode 0600 through a temporary file and a
// rename, so a reader (a server reloading on SIGHUP) sees the old file or the
// new one, never half of it.
common::Status write_private_file(const std::string& path, const std::string& text);

// A key directory, as lotteryctl keys init writes it: `server.keys` (every
// agency, for the server) and `agency-N.key` (agency N's own, for its
// client), all mode 0600 in a directory of mode 0700.
inline constexpr const char* server_keys_file_name = "server.keys";
std::string agency_key_file_name(uint32_t agency);  // "agency-3.key"
// Fresh keys for agencies 1..agencies. Refuses to replace an existing
// server.keys unless `replace`.
common::Status init_key_dir(const std::string& dir, uint32_t agencies, bool replace);
// A fresh key for one agency: its file and its line in server.keys, each
// replaced atomically. The server picks it up on SIGHUP.
common::Status rotate_key(const std::string& dir, uint32_t agency);

}  // namespace tls
