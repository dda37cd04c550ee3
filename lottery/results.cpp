#include "lottery/results.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "common/crc32c.hpp"
#include "lottery/limits.hpp"
#include "lottery/wire.hpp"

namespace lottery {

using common::Error;
using wire::load_le;
using wire::store_le;

namespace {

common::Status write_all(int fd, const std::vector<std::byte>& bytes, const std::string& path) {
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Error::from_errno(("write " + path).c_str());
    }
    done += static_cast<size_t>(n);
  }
  return common::ok_status();
}

}  // namespace

common::Status write_results(const std::string& data_dir, const Results& r) {
  std::vector<std::byte> body;
  for (size_t a = 1; a < r.agencies.size(); a++) {
    const AgencyResult& ar = r.agencies[a];
    size_t at = body.size();
    body.resize(at + 1 + 8 + 4);
    store_le<uint8_t>(body.data() + at, ar.closed_out ? 1 : 0);
    store_le<uint64_t>(body.data() + at + 1, ar.bets);
    store_le<uint32_t>(body.data() + at + 9, static_cast<uint32_t>(ar.winners.size()));
    for (const std::string& doc : ar.winners) {
      if (doc.size() > limits::document_digits_max) return Error::make(EINVAL, "winner document too long");
      body.push_back(static_cast<std::byte>(doc.size()));
      const auto* p = reinterpret_cast<const std::byte*>(doc.data());
      body.insert(body.end(), p, p + doc.size());
    }
  }
  std::vector<std::byte> file(results_header_bytes);
  std::byte* h = file.data();
  std::memcpy(h, results_magic, sizeof results_magic);
  store_le<uint32_t>(h + 8, results_format_version);
  store_le<uint32_t>(h + 12, static_cast<uint32_t>(r.agencies.empty() ? 0 : r.agencies.size() - 1));
  store_le<uint16_t>(h + 16, r.winning_number);
  store_le<uint64_t>(h + 24, r.draw_unix_ms);
  store_le<uint64_t>(h + 32, r.bets_scanned);
  store_le<uint64_t>(h + 40, r.total_winners());
  store_le<uint64_t>(h + 48, body.size());
  store_le<uint32_t>(h + 56, common::crc32c(body.data(), body.size()));
  store_le<uint32_t>(h + 60, common::crc32c(h, 60));
  file.insert(file.end(), body.begin(), body.end());

  // Write, fsync, rename, fsync the directory: a reader sees either no
  // results file or a complete one, also after a crash.
  std::string final_path = data_dir + "/" + results_file_name;
  std::string tmp_path = final_path + ".tmp";
  int fd = ::open(tmp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Error::from_errno(("open " + tmp_path).c_str());
  common::Status st = write_all(fd, file, tmp_path);
  if (st && ::fsync(fd) < 0) st = Error::from_errno(("fsync " + tmp_path).c_str());
  ::close(fd);
  if (!st) return st;
  if (::rename(tmp_path.c_str(), final_path.c_str()) < 0) return Error::from_errno(("rename " + tmp_path).c_str());
  int dfd = ::open(data_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return Error::from_errno(("open " + data_dir).c_str());
  int rc = ::fsync(dfd);
  ::close(dfd);
  if (rc < 0) return Error::from_errno(("fsync " + data_dir).c_str());
  return common::ok_status();
}

common::Result<Results> read_results(const std::string& data_dir) {
  std::string path = data_dir + "/" + results_file_name;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Error::from_errno(("open " + path).c_str());
  struct stat st {};
  if (::fstat(fd, &st) < 0) {
    ::close(fd);
    return Error::from_errno(("fstat " + path).c_str());
  }
  std::vector<std::byte> file(static_cast<size_t>(st.st_size));
  size_t got = 0;
  while (got < file.size()) {
    ssize_t n = ::read(fd, file.data() + got, file.size() - got);
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  ::close(fd);
  auto bad = [&](const char* why) { return Error::make(EIO, path + ": " + why); };
  if (got != file.size() || file.size() < results_header_bytes) return bad("shorter than its header");
  const std::byte* h = file.data();
  if (std::memcmp(h, results_magic, sizeof results_magic) != 0) return bad("bad magic");
  if (load_le<uint32_t>(h + 60) != common::crc32c(h, 60)) return bad("header checksum mismatch");
  if (load_le<uint32_t>(h + 8) != results_format_version) return bad("unsupported version");
  uint64_t body_bytes = load_le<uint64_t>(h + 48);
  if (body_bytes != file.size() - results_header_bytes) return bad("body size mismatch");
  const std::byte* body = h + results_header_bytes;
  if (load_le<uint32_t>(h + 56) != common::crc32c(body, body_bytes)) return bad("body checksum mismatch");
  Results r;
  uint32_t agencies = load_le<uint32_t>(h + 12);
  r.winning_number = load_le<uint16_t>(h + 16);
  r.draw_unix_ms = load_le<uint64_t>(h + 24);
  r.bets_scanned = load_le<uint64_t>(h + 32);
  r.agencies.resize(size_t{agencies} + 1);
  wire::Reader in(body, body_bytes);
  for (uint32_t a = 1; a <= agencies; a++) {
    AgencyResult& ar = r.agencies[a];
    ar.closed_out = in.read<uint8_t>() != 0;
    ar.bets = in.read<uint64_t>();
    uint32_t count = in.read<uint32_t>();
    if (in.failed() || count > in.remaining()) return bad("truncated body");
    ar.winners.reserve(count);
    for (uint32_t i = 0; i < count; i++) {
      uint8_t len = in.read<uint8_t>();
      const std::byte* d = in.take(len);
      if (in.failed()) return bad("truncated body");
      ar.winners.emplace_back(reinterpret_cast<const char*>(d), len);
    }
  }
  if (in.remaining() != 0) return bad("bytes after the last agency");
  if (load_le<uint64_t>(h + 40) != r.total_winners()) return bad("winner count mismatch");
  return r;
}

}  // namespace lottery
