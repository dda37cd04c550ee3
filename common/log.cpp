#include "common/log.hpp"

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/base_sink.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <memory>
#include <mutex>

namespace common::log {
namespace {

// Writes each formatted line with a single write(2). spdlog's stock sinks go
// through stdio, whose buffering may split a line across writes and so let
// lines of different worker processes interleave.
void write_all(const char* p, size_t left) {
  while (left > 0) {
    ssize_t n = ::write(STDERR_FILENO, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;  // Nowhere left to report a failing log; drop the line.
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
}

class SingleWriteSink final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  void set_deferred(bool deferred) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!deferred) flush_pending();
    _deferred = deferred;
  }

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    spdlog::memory_buf_t line;
    formatter_->format(msg, line);
    if (!_deferred || line.size() > pipe_atomic_bytes) {
      flush_pending();
      write_all(line.data(), line.size());
      return;
    }
    if (_pending_len + line.size() > pipe_atomic_bytes) flush_pending();
    std::memcpy(_pending + _pending_len, line.data(), line.size());
    _pending_len += line.size();
  }
  void flush_() override { flush_pending(); }

 private:
  void flush_pending() {
    write_all(_pending, _pending_len);
    _pending_len = 0;
  }

  bool _deferred = false;
  char _pending[pipe_atomic_bytes];
  size_t _pending_len = 0;
};

std::shared_ptr<SingleWriteSink>& sink_slot() {
  static std::shared_ptr<SingleWriteSink> sink;
  return sink;
}

// The heritage format spells levels in capitals ("INFO"); spdlog's %l is lower case.
class UpperLevelFlag final : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&, spdlog::memory_buf_t& dest) override {
    std::string_view name;
    switch (msg.level) {
      case spdlog::level::trace:
      case spdlog::level::debug: name = "DEBUG"; break;
      case spdlog::level::info: name = "INFO"; break;
      case spdlog::level::warn: name = "WARNING"; break;
      case spdlog::level::err: name = "ERROR"; break;
      default: name = "CRITICAL"; break;
    }
    dest.append(name.data(), name.data() + name.size());
  }
  std::unique_ptr<custom_flag_formatter> clone() const override { return std::make_unique<UpperLevelFlag>(); }
};

spdlog::level::level_enum to_spdlog(Level l) {
  switch (l) {
    case Level::debug: return spdlog::level::debug;
    case Level::info: return spdlog::level::info;
    case Level::warning: return spdlog::level::warn;
    case Level::error: return spdlog::level::err;
    case Level::critical: return spdlog::level::critical;
    case Level::off: return spdlog::level::off;
  }
  return spdlog::level::info;
}

std::shared_ptr<spdlog::logger>& logger_slot() {
  static std::shared_ptr<spdlog::logger> logger;
  return logger;
}

Level current_level = Level::info;

std::shared_ptr<spdlog::logger>& get_logger() {
  auto& slot = logger_slot();
  if (!slot) init(current_level);
  return slot;
}

void append_sanitized(std::string& out, std::string_view s) {
  for (char c : s) {
    // '|' separates fields and a line break ends the record: neither may
    // appear inside a value.
    if (c == '|' || c == '\n' || c == '\r') c = '/';
    out.push_back(c);
  }
}

}  // namespace

void Value::append_to(std::string& out) const {
  char buf[32];
  switch (_kind) {
    case Kind::text: append_sanitized(out, _text); return;
    case Kind::signed_int: {
      auto r = std::to_chars(buf, buf + sizeof buf, _signed);
      out.append(buf, r.ptr);
      return;
    }
    case Kind::unsigned_int: {
      auto r = std::to_chars(buf, buf + sizeof buf, _unsigned);
      out.append(buf, r.ptr);
      return;
    }
    case Kind::floating: {
      auto r = std::to_chars(buf, buf + sizeof buf, _double, std::chars_format::fixed, 3);
      out.append(buf, r.ptr);
      return;
    }
  }
}

void init(Level l) {
  auto sink = std::make_shared<SingleWriteSink>();
  if (sink_slot()) sink_slot()->set_deferred(false);
  sink_slot() = sink;
  auto formatter = std::make_unique<spdlog::pattern_formatter>();
  formatter->add_flag<UpperLevelFlag>('*').set_pattern("%Y-%m-%d %H:%M:%S %* %v");
  sink->set_formatter(std::move(formatter));
  auto logger = std::make_shared<spdlog::logger>("lottery", std::move(sink));
  current_level = l;
  logger->set_level(to_spdlog(l));
  logger_slot() = std::move(logger);
}

void set_deferred(bool deferred) {
  get_logger();
  sink_slot()->set_deferred(deferred);
}

void flush() {
  get_logger()->flush();
}

void set_level(Level l) {
  current_level = l;
  get_logger()->set_level(to_spdlog(l));
}

Level level() { return current_level; }

bool enabled(Level l) { return l >= current_level && current_level != Level::off; }

bool parse_level(std::string_view text, Level& out) {
  std::string up;
  for (char c : text) up.push_back(static_cast<char>(c >= 'a' && c <= 'z' ? c - 32 : c));
  if (up == "DEBUG" || up == "TRACE") out = Level::debug;
  else if (up == "INFO") out = Level::info;
  else if (up == "WARNING" || up == "WARN") out = Level::warning;
  else if (up == "ERROR") out = Level::error;
  else if (up == "CRITICAL" || up == "FATAL") out = Level::critical;
  else if (up == "OFF" || up == "NONE") out = Level::off;
  else return false;
  return true;
}

void event(Level l, std::string_view action, Outcome result, std::initializer_list<Field> fields) {
  if (!enabled(l)) return;
  // Reused per thread: a log line per batch must not cost an allocation.
  thread_local std::string line;
  line.clear();
  line.append("action: ");
  append_sanitized(line, action);
  line.append(" | result: ");
  switch (result) {
    case Outcome::success: line.append("success"); break;
    case Outcome::fail: line.append("fail"); break;
    case Outcome::in_progress: line.append("in_progress"); break;
  }
  for (const Field& f : fields) {
    line.append(" | ");
    append_sanitized(line, f.key);
    line.append(": ");
    f.value.append_to(line);
  }
  get_logger()->log(to_spdlog(l), std::string_view(line));
}

}  // namespace common::log
