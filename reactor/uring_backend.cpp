// io_uring backend: arrives with issue #5. Until then the reactor reports it
// as unavailable and callers fall back to epoll.
#include "reactor/backend.hpp"

namespace reactor {

common::Result<std::unique_ptr<Backend>> make_uring_backend(size_t /*max_connections*/) {
  return common::Error::make(ENOSYS, "the io_uring backend is not built yet; use --io=epoll");
}

}  // namespace reactor
