#include "client/csv.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace lottery::client {
namespace {

constexpr std::string_view utf8_bom = "\xEF\xBB\xBF";
// Offending values are quoted in error messages, cut to this many bytes so a
// runaway field cannot flood the log.
constexpr size_t quoted_value_bytes_max = 40;

// Quotes a field for an error message. Bytes outside printable ASCII are
// escaped: the value is wrong by definition and may hold anything.
std::string quote(std::string_view value) {
  static constexpr char hex[] = "0123456789abcdef";
  std::string out = "'";
  size_t n = value.size() < quoted_value_bytes_max ? value.size() : quoted_value_bytes_max;
  for (size_t i = 0; i < n; i++) {
    auto c = static_cast<unsigned char>(value[i]);
    if (c >= 0x20 && c < 0x7F && c != '\'' && c != '\\') {
      out.push_back(static_cast<char>(c));
    } else {
      out += "\\x";
      out.push_back(hex[c >> 4]);
      out.push_back(hex[c & 0xF]);
    }
  }
  if (n < value.size()) out += "...";
  out += "'";
  return out;
}

// Strict: digits only, no sign, no spaces; leading zeros are allowed ("0042").
bool parse_number(std::string_view text, uint16_t& out) {
  if (text.empty()) return false;
  uint32_t v = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<uint32_t>(c - '0');
    if (v > limits::bet_number_max) return false;  // also stops any overflow
  }
  out = static_cast<uint16_t>(v);
  return true;
}

bool is_blank(std::string_view line) {
  for (char c : line)
    if (c != ' ' && c != '\t') return false;
  return true;
}

// Splits on ','. Stores the first csv_fields_per_line fields and returns how
// many the line really has, so a wrong count can be reported exactly.
size_t split_fields(std::string_view line, std::string_view (&fields)[csv_fields_per_line]) {
  size_t count = 0;
  size_t start = 0;
  while (true) {
    size_t comma = line.find(',', start);
    std::string_view field =
        line.substr(start, comma == std::string_view::npos ? std::string_view::npos : comma - start);
    if (count < csv_fields_per_line) fields[count] = field;
    count++;
    if (comma == std::string_view::npos) return count;
    start = comma + 1;
  }
}

}  // namespace

std::string CsvError::to_string() const {
  return file + ": line " + std::to_string(line) + ": " + what;
}

common::Error CsvError::to_error() const {
  return common::Error::make(EINVAL, to_string());
}

std::string parse_bet_fields(std::string_view first_name, std::string_view last_name, std::string_view document,
                             std::string_view birthdate, std::string_view number, proto::Date today, proto::Bet& out) {
  if (const char* why = proto::check_name(first_name)) return std::string("first_name: ") + why;
  if (const char* why = proto::check_name(last_name)) return std::string("last_name: ") + why;
  // check_document and check_birthdate name their field already.
  if (const char* why = proto::check_document(document)) return std::string(why) + ": " + quote(document);
  proto::Date date;
  if (!proto::parse_date(birthdate, date)) return "birthdate: " + quote(birthdate) + " is not in YYYY-MM-DD format";
  if (const char* why = proto::check_birthdate(date, today)) return std::string(why) + ": " + quote(birthdate);
  uint16_t value = 0;
  if (!parse_number(number, value)) return "number: " + quote(number) + " is not an integer in 0..9999";
  out = proto::Bet{first_name, last_name, document, date, value};
  return {};
}

CsvReader::CsvReader(std::string_view file_name, std::string_view data, proto::Date today, CsvPosition from)
    : _file_name(file_name), _data(data), _today(today), _offset(from.offset), _line(from.line) {
  LOTTERY_ASSERT(_offset <= _data.size());
  if (_offset == 0 && _data.substr(0, utf8_bom.size()) == utf8_bom) _offset = utf8_bom.size();
}

CsvReader::Step CsvReader::fail(std::string what) {
  _failed = true;
  _error = CsvError{std::string(_file_name), _line, std::move(what)};
  return Step::error;
}

CsvReader::Step CsvReader::next(CsvRecord& out) {
  if (_failed) return Step::error;
  while (_offset < _data.size()) {
    size_t newline = _data.find('\n', _offset);
    size_t end = newline == std::string_view::npos ? _data.size() : newline;
    std::string_view line = _data.substr(_offset, end - _offset);
    _offset = newline == std::string_view::npos ? _data.size() : newline + 1;
    // csv_file_bytes_max keeps real files far below this; the check makes the
    // bound explicit rather than letting the counter wrap.
    if (_line == UINT32_MAX) return fail("file has more lines than a 32-bit line number can count");
    _line++;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (is_blank(line)) continue;
    return parse_line(line, out);
  }
  return Step::end;
}

CsvReader::Step CsvReader::parse_line(std::string_view line, CsvRecord& out) {
  std::string_view f[csv_fields_per_line];
  size_t count = split_fields(line, f);
  if (count != csv_fields_per_line)
    return fail("expected 5 comma-separated fields (first_name,last_name,document,birthdate,number), found " +
                std::to_string(count));
  std::string why = parse_bet_fields(f[0], f[1], f[2], f[3], f[4], _today, out.bet);
  if (!why.empty()) return fail(std::move(why));
  out.line = _line;
  return Step::bet;
}

common::Result<BetFile> BetFile::load(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return common::Error::from_errno(("open " + path).c_str());
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return common::Error::from_errno(("fstat " + path).c_str(), err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return common::Error::make(EINVAL, path + " is not a regular file");
  }
  auto size = static_cast<uint64_t>(st.st_size);
  if (size > csv_file_bytes_max) {
    ::close(fd);
    return common::Error::make(EFBIG, path + " is larger than csv_file_bytes_max (4 GiB); split it");
  }
  // +1 so an empty file still gets a buffer (views into it stay non-null).
  auto data = std::make_unique_for_overwrite<char[]>(size + 1);
  size_t got = 0;
  while (got < size) {
    ssize_t n = ::read(fd, data.get() + got, size - got);
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      return common::Error::from_errno(("read " + path).c_str(), err);
    }
    if (n == 0) break;  // the file shrank while we read it: take what is there
    got += static_cast<size_t>(n);
  }
  ::close(fd);
  return BetFile(path, std::move(data), got);
}

BetFile BetFile::from_buffer(std::string name, std::string_view bytes) {
  auto data = std::make_unique_for_overwrite<char[]>(bytes.size() + 1);
  if (!bytes.empty()) std::memcpy(data.get(), bytes.data(), bytes.size());
  return BetFile(std::move(name), std::move(data), bytes.size());
}

common::Result<CsvSummary> BetFile::validate(proto::Date today, CsvError* first_error) const {
  CsvReader r = reader(today);
  CsvRecord record;
  CsvSummary summary;
  CsvReader::Step step;
  while ((step = r.next(record)) == CsvReader::Step::bet) summary.bets++;
  if (step == CsvReader::Step::error) {
    if (first_error != nullptr) *first_error = r.error();
    return r.error().to_error();
  }
  summary.lines = r.position().line;
  return summary;
}

}  // namespace lottery::client
