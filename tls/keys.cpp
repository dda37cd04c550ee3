#include "tls/keys.hpp"

#include <fcntl.h>
#include <openssl/rand.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/assert.hpp"

namespace tls {
namespace {

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

}  // namespace

common::Result<KeyRing> KeyRing::load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return common::Error::from_errno(("open keys file " + path).c_str());
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return common::Error::from_errno(("read keys file " + path).c_str());
  return parse(text.str(), path);
}

common::Result<KeyRing> KeyRing::parse(std::string_view text, const std::string& origin) {
  KeyRing ring;
  size_t line_no = 0;
  while (!text.empty()) {
    size_t end = text.find('\n');
    std::string_view line = trim(text.substr(0, end));
    text = end == std::string_view::npos ? std::string_view{} : text.substr(end + 1);
    line_no++;
    if (line.empty() || line.front() == '#') continue;
    auto bad = [&](const std::string& why) {
      return common::Error::make(EINVAL, origin + " line " + std::to_string(line_no) + ": " + why);
    };
    size_t space = line.find_first_of(" \t");
    if (space == std::string_view::npos) return bad("expected '<agency> <64 hex digits>'");
    std::string_view id_text = line.substr(0, space);
    std::string_view hex = trim(line.substr(space));
    uint64_t id = 0;
    if (id_text.empty() || id_text.size() > 6) return bad("the agency is not a number 1.." +
                                                          std::to_string(limits::identity_max));
    for (char c : id_text) {
      if (c < '0' || c > '9') return bad("the agency is not a number");
      id = id * 10 + static_cast<uint64_t>(c - '0');
    }
    if (id < 1 || id > limits::identity_max)
      return bad("agency " + std::to_string(id) + " is outside 1.." + std::to_string(limits::identity_max));
    if (hex.size() != 2 * limits::key_bytes)
      return bad("the key must be " + std::to_string(2 * limits::key_bytes) + " hex digits, not " +
                 std::to_string(hex.size()));
    Key key{};
    for (size_t i = 0; i < limits::key_bytes; i++) {
      int hi = hex_value(hex[2 * i]);
      int lo = hex_value(hex[2 * i + 1]);
      if (hi < 0 || lo < 0) return bad("the key has a character that is not a hex digit");
      key[i] = static_cast<uint8_t>(hi << 4 | lo);
    }
    if (ring.find(static_cast<uint32_t>(id)) != nullptr) return bad("agency " + std::to_string(id) + " appears twice");
    ring.set(static_cast<uint32_t>(id), key);
  }
  return ring;
}

const Key* KeyRing::find(uint32_t identity) const {
  auto it = std::lower_bound(_entries.begin(), _entries.end(), identity,
                             [](const KeyEntry& e, uint32_t id) { return e.identity < id; });
  return it != _entries.end() && it->identity == identity ? &it->key : nullptr;
}

void KeyRing::set(uint32_t identity, const Key& key) {
  LOTTERY_ASSERT(identity >= 1 && identity <= limits::identity_max);
  auto it = std::lower_bound(_entries.begin(), _entries.end(), identity,
                             [](const KeyEntry& e, uint32_t id) { return e.identity < id; });
  if (it != _entries.end() && it->identity == identity) {
    it->key = key;
    return;
  }
  _entries.insert(it, KeyEntry{identity, key});
}

common::Result<Key> random_key() {
  Key key{};
  if (RAND_bytes(key.data(), static_cast<int>(key.size())) != 1)
    return common::Error::make(EIO, "RAND_bytes failed: OpenSSL's random generator is not seeded");
  return key;
}

std::string to_hex(const Key& key) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out;
  out.reserve(2 * key.size());
  for (uint8_t b : key) {
    out.push_back(digits[b >> 4]);
    out.push_back(digits[b & 15]);
  }
  return out;
}

std::string format_keys(const KeyRing& ring, std::string_view comment) {
  std::string out = "# ";
  out += comment;
  out += "\n# <agency> <pre-shared key, 32 bytes in hex>; keep this file private (mode 0600)\n";
  for (const KeyEntry& e : ring.entries()) out += std::to_string(e.identity) + " " + to_hex(e.key) + "\n";
  return out;
}

common::Status write_private_file(const std::string& path, const std::string& text) {
  std::string tmp = path + ".tmp";
  ::unlink(tmp.c_str());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return common::Error::from_errno(("create " + tmp).c_str());
  // The umask may have taken bits away, never added; fchmod makes it exact.
  ::fchmod(fd, 0600);
  size_t done = 0;
  while (done < text.size()) {
    ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      auto err = common::Error::from_errno(("write " + tmp).c_str());
      ::close(fd);
      ::unlink(tmp.c_str());
      return err;
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    auto err = common::Error::from_errno(("sync " + tmp).c_str());
    ::unlink(tmp.c_str());
    return err;
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) return common::Error::from_errno(("rename to " + path).c_str());
  return common::ok_status();
}

std::string agency_key_file_name(uint32_t agency) { return "agency-" + std::to_string(agency) + ".key"; }

common::Status init_key_dir(const std::string& dir, uint32_t agencies, bool replace) {
  if (agencies < 1 || agencies > limits::identity_max)
    return common::Error::make(EINVAL, "--agencies must be 1.." + std::to_string(limits::identity_max));
  // Parents as needed, like mkdir -p; the key directory itself is private.
  std::error_code ec;
  bool created = std::filesystem::create_directories(dir, ec);
  if (ec) return common::Error::make(ec.value(), "mkdir " + dir + ": " + ec.message());
  if (created && ::chmod(dir.c_str(), 0700) != 0) return common::Error::from_errno(("chmod 0700 " + dir).c_str());
  std::string server_path = dir + "/" + server_keys_file_name;
  if (!replace && ::access(server_path.c_str(), F_OK) == 0)
    return common::Error::make(EEXIST, server_path + " exists; use keys rotate for one agency, or --force to "
                                                     "replace every key");
  KeyRing ring;
  for (uint32_t a = 1; a <= agencies; a++) {
    auto key = random_key();
    if (!key) return key.error();
    ring.set(a, *key);
  }
  for (const KeyEntry& e : ring.entries()) {
    KeyRing own;
    own.set(e.identity, e.key);
    if (auto st = write_private_file(dir + "/" + agency_key_file_name(e.identity),
                                     format_keys(own, "agency " + std::to_string(e.identity) + "'s TLS key"));
        !st)
      return st;
  }
  // The server's file last: a server never sees a key its agency lacks.
  return write_private_file(server_path, format_keys(ring, "the server's TLS keys, one per agency"));
}

common::Status rotate_key(const std::string& dir, uint32_t agency) {
  std::string server_path = dir + "/" + server_keys_file_name;
  auto ring = KeyRing::load(server_path);
  if (!ring) return ring.error();
  if (agency < 1 || agency > limits::identity_max)
    return common::Error::make(EINVAL, "--agency must be 1.." + std::to_string(limits::identity_max));
  auto key = random_key();
  if (!key) return key.error();
  KeyRing own;
  own.set(agency, *key);
  if (auto st = write_private_file(dir + "/" + agency_key_file_name(agency),
                                   format_keys(own, "agency " + std::to_string(agency) + "'s TLS key"));
      !st)
    return st;
  ring->set(agency, *key);
  return write_private_file(server_path, format_keys(*ring, "the server's TLS keys, one per agency"));
}

}  // namespace tls
