// The agency bet file: `first_name,last_name,document,birthdate,number`, one
// bet a line, UTF-8, CRLF or LF, no header, no quoting. An optional UTF-8 BOM
// at the start and blank lines are skipped.
//
// The file is read into memory once; every bet handed out is a set of
// string_views into that buffer, so reading a bet never allocates. A file is
// validated whole before anything is sent (a bad line means no bet leaves the
// agency), then read a second time to build the batches: parsing is cheaper
// than keeping a decoded copy of millions of bets.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "common/result.hpp"
#include "lottery/protocol.hpp"

namespace lottery::client {

// Reading the whole file into memory is the design; this bound turns an absurd
// input into a clear error instead of an allocation failure, and keeps line
// numbers within 32 bits.
inline constexpr uint64_t csv_file_bytes_max = uint64_t{4} * 1024 * 1024 * 1024;
inline constexpr size_t csv_fields_per_line = 5;

// The first bad line of a file: 1-based line number and what is wrong with it.
struct CsvError {
  std::string file;
  uint32_t line = 0;
  std::string what;

  // "FILE: line N: WHAT", for people.
  std::string to_string() const;
  common::Error to_error() const;
};

// One bet of the file and the 1-based line it came from.
struct CsvRecord {
  proto::Bet bet;
  uint32_t line = 0;
};

// Where a reader stands: byte offset of the next line and lines consumed so
// far. Lets a second reader start where a batch started.
struct CsvPosition {
  size_t offset = 0;
  uint32_t line = 0;
};

// Parses and validates the five fields of one bet (the CSV reader and the
// single-bet mode share these rules). Returns an empty string when the bet is
// valid (no allocation), else why it is refused, naming the field.
std::string parse_bet_fields(std::string_view first_name, std::string_view last_name, std::string_view document,
                             std::string_view birthdate, std::string_view number, proto::Date today, proto::Bet& out);

// Walks the bets of a CSV buffer. Cheap to copy; the buffer must outlive it.
class CsvReader {
 public:
  enum class Step : uint8_t { bet, end, error };

  CsvReader(std::string_view file_name, std::string_view data, proto::Date today, CsvPosition from = {});

  // Next bet, or the end, or the first malformed line (then error() says why
  // and the reader stays on that error).
  Step next(CsvRecord& out);
  const CsvError& error() const { return _error; }
  CsvPosition position() const { return {_offset, _line}; }

 private:
  Step fail(std::string what);
  Step parse_line(std::string_view line, CsvRecord& out);

  std::string_view _file_name;
  std::string_view _data;
  proto::Date _today;
  size_t _offset;
  uint32_t _line;
  CsvError _error;
  bool _failed = false;
};

struct CsvSummary {
  uint64_t bets = 0;
  uint32_t lines = 0;  // lines read, blank ones included
};

// A bet file loaded into memory. Move-only; readers it hands out point into
// its buffer and must not outlive it.
class BetFile {
 public:
  // Reads the file (I/O errors name the system call and the file).
  static common::Result<BetFile> load(const std::string& path);
  // Wraps bytes already in memory (tests, single-bet mode, stdin-like sources).
  static BetFile from_buffer(std::string name, std::string_view bytes);

  BetFile(BetFile&&) noexcept = default;
  BetFile& operator=(BetFile&&) noexcept = default;
  BetFile(const BetFile&) = delete;
  BetFile& operator=(const BetFile&) = delete;

  const std::string& path() const { return _path; }
  std::string_view bytes() const { return {_data.get(), _size}; }

  CsvReader reader(proto::Date today, CsvPosition from = {}) const { return CsvReader(_path, bytes(), today, from); }

  // Parses every line. On success, how many bets and lines there are; on the
  // first bad line, a CsvError (structured, for the log) also returned as the
  // Error's message.
  common::Result<CsvSummary> validate(proto::Date today, CsvError* first_error = nullptr) const;

 private:
  BetFile(std::string path, std::unique_ptr<char[]> data, size_t size)
      : _path(std::move(path)), _data(std::move(data)), _size(size) {}

  std::string _path;
  // A unique_ptr rather than a std::string: moving a short std::string moves
  // its bytes (small-string optimisation) and would leave the views dangling.
  std::unique_ptr<char[]> _data;
  size_t _size = 0;
};

}  // namespace lottery::client
