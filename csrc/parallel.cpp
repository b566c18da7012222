// The run-time lookup of torch's OpenMP runtime for parallel_for (parallel.h).
#include "parallel.h"

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#endif

namespace lthfast {
namespace {
std::atomic<bool> g_use_openmp{true};
}  // namespace

GompParallel gomp_parallel() {
#if defined(__unix__) || defined(__APPLE__)
  static std::atomic<GompParallel> found{nullptr};
  if (!g_use_openmp.load(std::memory_order_relaxed)) return nullptr;
  GompParallel fn = found.load(std::memory_order_acquire);
  if (fn == nullptr) {  // not cached until found: torch may load it after our first call
    if (void* lib = dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD)) {
      fn = reinterpret_cast<GompParallel>(dlsym(lib, "GOMP_parallel"));
      dlclose(lib);  // drops the reference RTLD_NOLOAD took; torch's own keeps it loaded
      found.store(fn, std::memory_order_release);
    }
  }
  return fn;
#else
  return nullptr;
#endif
}

bool use_openmp(bool enabled) { return g_use_openmp.exchange(enabled); }

}  // namespace lthfast
