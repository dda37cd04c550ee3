// Little-endian load/store helpers. Every multi-byte integer on the wire and
// on disk is little-endian; these compile to plain moves on x86-64 and to a
// byte swap elsewhere, and never assume alignment.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace lottery::wire {

template <typename T>
inline T byteswap(T v) {
  if constexpr (sizeof(T) == 1) return v;
  else if constexpr (sizeof(T) == 2) return static_cast<T>(__builtin_bswap16(static_cast<uint16_t>(v)));
  else if constexpr (sizeof(T) == 4) return static_cast<T>(__builtin_bswap32(static_cast<uint32_t>(v)));
  else return static_cast<T>(__builtin_bswap64(static_cast<uint64_t>(v)));
}

template <typename T>
inline T load_le(const void* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  if constexpr (std::endian::native == std::endian::big) v = byteswap(v);
  return v;
}

template <typename T>
inline void store_le(void* p, T v) {
  if constexpr (std::endian::native == std::endian::big) v = byteswap(v);
  std::memcpy(p, &v, sizeof v);
}

// Bounds-checked sequential reader over a byte span. Reads past the end set
// `failed` and return zero, so decoders check once at the end.
class Reader {
 public:
  Reader(const std::byte* data, size_t size) : _p(data), _end(data + size) {}

  template <typename T>
  T read() {
    if (static_cast<size_t>(_end - _p) < sizeof(T)) {
      _failed = true;
      _p = _end;
      return T{};
    }
    T v = load_le<T>(_p);
    _p += sizeof(T);
    return v;
  }
  const std::byte* take(size_t n) {
    if (static_cast<size_t>(_end - _p) < n) {
      _failed = true;
      _p = _end;
      return nullptr;
    }
    const std::byte* at = _p;
    _p += n;
    return at;
  }
  size_t remaining() const { return static_cast<size_t>(_end - _p); }
  bool failed() const { return _failed; }
  const std::byte* position() const { return _p; }

 private:
  const std::byte* _p;
  const std::byte* _end;
  bool _failed = false;
};

// Sequential writer into a caller-owned buffer; overflow sets `failed`.
class Writer {
 public:
  Writer(std::byte* data, size_t size) : _begin(data), _p(data), _end(data + size) {}

  template <typename T>
  void write(T v) {
    if (static_cast<size_t>(_end - _p) < sizeof(T)) {
      _failed = true;
      return;
    }
    store_le<T>(_p, v);
    _p += sizeof(T);
  }
  void write_bytes(const void* src, size_t n) {
    if (static_cast<size_t>(_end - _p) < n) {
      _failed = true;
      return;
    }
    if (n) std::memcpy(_p, src, n);
    _p += n;
  }
  size_t size() const { return static_cast<size_t>(_p - _begin); }
  size_t remaining() const { return static_cast<size_t>(_end - _p); }
  bool failed() const { return _failed; }
  std::byte* data() { return _begin; }

 private:
  std::byte* _begin;
  std::byte* _p;
  std::byte* _end;
  bool _failed = false;
};

}  // namespace lottery::wire
