// The heritage log format, which the operators' tooling parses:
//
//   YYYY-MM-DD HH:MM:SS LEVEL action: <name> | result: <success|fail|in_progress> | key: value | ...
//
// Every line leaves the process in exactly one write(2) to stderr (lines are
// far below PIPE_BUF, so lines of different processes never interleave), and
// the write happens before the caller goes on, so a line that reports an event
// is out before the reply that announces it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <type_traits>

namespace common::log {

enum class Level : uint8_t { debug, info, warning, error, critical, off };

enum class Outcome : uint8_t { success, fail, in_progress };

// A value in a log line. Integers are formatted, strings are copied with '|'
// and line breaks replaced, so a value can never break the line's structure.
class Value {
 public:
  Value(std::string_view s) : _kind(Kind::text), _text(s) {}  // NOLINT
  Value(const char* s) : _kind(Kind::text), _text(s) {}        // NOLINT
  Value(const std::string& s) : _kind(Kind::text), _text(s) {} // NOLINT
  template <typename I, std::enable_if_t<std::is_integral_v<I> && !std::is_same_v<I, bool>, int> = 0>
  Value(I v) {  // NOLINT
    if constexpr (std::is_signed_v<I>) {
      _kind = Kind::signed_int;
      _signed = static_cast<int64_t>(v);
    } else {
      _kind = Kind::unsigned_int;
      _unsigned = static_cast<uint64_t>(v);
    }
  }
  Value(bool v) : _kind(Kind::text), _text(v ? "true" : "false") {}  // NOLINT
  Value(double v) : _kind(Kind::floating), _double(v) {}            // NOLINT

  void append_to(std::string& out) const;

 private:
  enum class Kind : uint8_t { text, signed_int, unsigned_int, floating };
  Kind _kind = Kind::text;
  std::string_view _text;
  int64_t _signed = 0;
  uint64_t _unsigned = 0;
  double _double = 0;
};

struct Field {
  std::string_view key;
  Value value;
};

// Deferred mode, for an event loop: lines are gathered and written by
// flush(), whole lines only, at most pipe_atomic_bytes per write(2) (so
// writes to a pipe stay atomic and lines of different processes never
// interleave). The loop calls flush() once per iteration, before it sends the
// replies of that iteration: a line still goes out before the reply it
// reports, with one system call for many lines instead of one each.
inline constexpr size_t pipe_atomic_bytes = 4096;  // PIPE_BUF on Linux
void set_deferred(bool deferred);
void flush();

// Configures the process-wide logger. Safe to call again (e.g. after fork).
void init(Level level);
void set_level(Level level);
Level level();
bool enabled(Level level);

// Parses DEBUG/INFO/WARNING/ERROR/CRITICAL (any case, WARN accepted).
bool parse_level(std::string_view text, Level& out);

void event(Level level, std::string_view action, Outcome result, std::initializer_list<Field> fields = {});

inline void info(std::string_view action, Outcome result, std::initializer_list<Field> fields = {}) {
  event(Level::info, action, result, fields);
}
inline void debug(std::string_view action, Outcome result, std::initializer_list<Field> fields = {}) {
  if (enabled(Level::debug)) event(Level::debug, action, result, fields);
}
inline void warning(std::string_view action, Outcome result, std::initializer_list<Field> fields = {}) {
  event(Level::warning, action, result, fields);
}
inline void error(std::string_view action, Outcome result, std::initializer_list<Field> fields = {}) {
  event(Level::error, action, result, fields);
}

}  // namespace common::log
