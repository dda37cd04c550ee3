// Fixed-size byte blocks on a free list. Connections borrow an input or output
// block only while they hold unconsumed or unsent bytes, so an idle
// connection costs no buffer memory. The pool grows on demand and never
// shrinks: after warm-up the hot path allocates nothing.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <vector>

#include "common/assert.hpp"

namespace reactor {

class BufferPool {
 public:
  explicit BufferPool(size_t block_bytes) : _block_bytes(block_bytes) {}
  ~BufferPool() {
    for (std::byte* b : _all) std::free(b);
  }
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  std::byte* acquire() {
    if (_free.empty()) {
      // 64-byte alignment keeps blocks on their own cache lines.
      auto* b = static_cast<std::byte*>(std::aligned_alloc(64, _block_bytes));
      LOTTERY_ASSERT(b != nullptr);
      _all.push_back(b);
      _free.reserve(_all.capacity());
      return b;
    }
    std::byte* b = _free.back();
    _free.pop_back();
    return b;
  }
  void release(std::byte* b) {
    LOTTERY_ASSERT(b != nullptr);
    _free.push_back(b);
  }
  size_t block_bytes() const { return _block_bytes; }
  size_t blocks_total() const { return _all.size(); }
  size_t blocks_free() const { return _free.size(); }

 private:
  size_t _block_bytes;
  std::vector<std::byte*> _all;
  std::vector<std::byte*> _free;
};

}  // namespace reactor
