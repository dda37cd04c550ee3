// CRC32C (Castagnoli), the checksum of every frame on the wire and every entry
// on disk. SSE4.2 has an instruction for it; we pick it at run time so the
// binary still runs (slower) on CPUs without it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace common {

// Continues a CRC: crc32c_extend(crc32c_extend(0, a), b) == crc32c(a ++ b).
uint32_t crc32c_extend(uint32_t crc, const void* data, size_t size);

// The byte-at-a-time table implementation, the reference the fast one is
// tested against (and what runs on a CPU without SSE4.2).
uint32_t crc32c_extend_portable(uint32_t crc, const void* data, size_t size);

inline uint32_t crc32c(const void* data, size_t size) { return crc32c_extend(0, data, size); }
inline uint32_t crc32c(std::span<const std::byte> bytes) { return crc32c_extend(0, bytes.data(), bytes.size()); }

}  // namespace common
