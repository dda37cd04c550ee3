// libbench-alloc-count.so: an LD_PRELOAD shim that counts heap allocations
// of a process (malloc, calloc, realloc, aligned forms, operator new) and
// prints the count to stderr when the process exits:
//
//   alloc_count: pid 1234 allocations 5678
//
// A process that leaves with _exit(2) (a forked worker) prints nothing, so
// with ALLOC_COUNT_DIR set the counter itself lives in a shared mapping of
// the file ALLOC_COUNT_DIR/alloc-count.<pid> (8 bytes, native order), which
// can be read at any time, also after the process is gone; a forked child
// gets a file of its own.
//
// bench/compare.sh runs lottery-server under it with two loads of different
// size; the difference divided by the extra bets is the allocations per bet
// on the server's hot path (the target is zero). The shim forwards to the next
// allocator (mimalloc in our binaries) and only adds a relaxed atomic increment.
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <new>

namespace {

std::atomic<unsigned long long> g_local_count{0};
std::atomic<unsigned long long>* g_count = &g_local_count;
const char* g_dir = nullptr;

// open, ftruncate and mmap do not allocate, so this is safe to run before
// the first malloc and in a child right after fork.
void map_counter() {
  char path[512];
  std::snprintf(path, sizeof path, "%s/alloc-count.%d", g_dir, static_cast<int>(::getpid()));
  int fd = ::open(path, O_CREAT | O_RDWR | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return;
  void* p = MAP_FAILED;
  if (::ftruncate(fd, sizeof(unsigned long long)) == 0)
    p = ::mmap(nullptr, sizeof(unsigned long long), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) return;
  g_count = new (p) std::atomic<unsigned long long>(0);
}

__attribute__((constructor)) void setup() {
  g_dir = ::getenv("ALLOC_COUNT_DIR");
  if (g_dir == nullptr) return;
  map_counter();
  ::pthread_atfork(nullptr, nullptr, map_counter);
}

template <typename Fn>
Fn next(const char* name) {
  return reinterpret_cast<Fn>(::dlsym(RTLD_NEXT, name));
}

using malloc_fn = void* (*)(size_t);
using calloc_fn = void* (*)(size_t, size_t);
using realloc_fn = void* (*)(void*, size_t);
using memalign_fn = int (*)(void**, size_t, size_t);
using aligned_fn = void* (*)(size_t, size_t);

// dlsym itself may call calloc before the real one is known: serve that
// from a small static arena.
alignas(16) char g_bootstrap[4096];
size_t g_bootstrap_used = 0;

struct Reporter {
  ~Reporter() {
    char line[96];
    int n = std::snprintf(line, sizeof line, "alloc_count: pid %d allocations %llu\n", static_cast<int>(::getpid()),
                          g_count->load());
    if (n > 0) (void)!::write(STDERR_FILENO, line, static_cast<size_t>(n));
  }
} g_reporter;

}  // namespace

extern "C" {

void* malloc(size_t size) {
  static malloc_fn real = next<malloc_fn>("malloc");
  g_count->fetch_add(1, std::memory_order_relaxed);
  return real(size);
}

void* calloc(size_t n, size_t size) {
  static calloc_fn real = nullptr;
  static bool resolving = false;
  if (real == nullptr) {
    if (resolving) {
      void* p = g_bootstrap + g_bootstrap_used;
      g_bootstrap_used += (n * size + 15) & ~size_t{15};
      return g_bootstrap_used <= sizeof g_bootstrap ? p : nullptr;
    }
    resolving = true;
    real = next<calloc_fn>("calloc");
    resolving = false;
  }
  g_count->fetch_add(1, std::memory_order_relaxed);
  return real(n, size);
}

void* realloc(void* p, size_t size) {
  static realloc_fn real = next<realloc_fn>("realloc");
  g_count->fetch_add(1, std::memory_order_relaxed);
  return real(p, size);
}

int posix_memalign(void** out, size_t alignment, size_t size) {
  static memalign_fn real = next<memalign_fn>("posix_memalign");
  g_count->fetch_add(1, std::memory_order_relaxed);
  return real(out, alignment, size);
}

void* aligned_alloc(size_t alignment, size_t size) {
  static aligned_fn real = next<aligned_fn>("aligned_alloc");
  g_count->fetch_add(1, std::memory_order_relaxed);
  return real(alignment, size);
}

void free(void* p) {
  if (p >= static_cast<void*>(g_bootstrap) && p < static_cast<void*>(g_bootstrap + sizeof g_bootstrap)) return;
  static void (*real)(void*) = next<void (*)(void*)>("free");
  real(p);
}

}  // extern "C"

// operator new may resolve to the allocator library's own definition rather
// than to malloc, so it is counted here as well.
void* operator new(size_t size) {
  void* p = malloc(size);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
void* operator new[](size_t size) {
  return operator new(size);
}
void operator delete(void* p) noexcept {
  free(p);
}
void operator delete[](void* p) noexcept {
  free(p);
}
void operator delete(void* p, size_t) noexcept {
  free(p);
}
void operator delete[](void* p, size_t) noexcept {
  free(p);
}
