// Work sharing for the kernels of lthfast._C: fn(i) for i in [0, n) on up to `threads` threads (the caller's
// included), each taking the next item when done, so that a thread slowed by another process on its core
// holds back one item, not its whole share. Rethrows the first exception.
//
// The threads are torch's own OpenMP team when torch has loaded libgomp (looked up at run time with
// dlopen(RTLD_NOLOAD), never linked), else std::threads. libgomp's workers keep spinning for a few ms after
// every parallel torch op, and threads of our own then share the cores with them: on the 2-core EPYC VM the
// 95%-sparse Linear(2048, 2048) training step (batch 512) took 37 ms with std::thread workers and 23 ms on
// torch's team.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace lthfast {

using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);

// GOMP_parallel of the libgomp already in the process, or nullptr (none loaded, or turned off).
GompParallel gomp_parallel();

// Turns the OpenMP team off (false: std::threads, for tests) or back on; returns the previous setting.
bool use_openmp(bool enabled);

template <class F>
void parallel_for(int64_t n, int threads, F&& fn) {
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(threads, n));
  if (nt == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::exception_ptr err;
  std::mutex mu;
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    try {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!err) err = std::current_exception();
    }
  };
  if (GompParallel run = gomp_parallel()) {
    using Worker = decltype(worker);
    run([](void* w) { (*static_cast<Worker*>(w))(); }, &worker, static_cast<unsigned>(nt), 0);
  } else {
    std::vector<std::thread> pool;
    for (int64_t w = 1; w < nt; ++w) pool.emplace_back(worker);
    worker();
    for (auto& t : pool) t.join();
  }
  if (err) std::rethrow_exception(err);
}

}  // namespace lthfast
