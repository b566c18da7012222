// Internal state of the threshold select, shared by the driver (threshold.cpp) and the finish from collected
// candidates (threshold_collect.cpp).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "parallel.h"
#include "threshold.h"

namespace lthfast {

struct Piece {
  int tensor;
  int64_t begin, end;
  uint64_t gpos;    // group position of element `begin`
  int64_t bits_at;  // byte offset of the piece's bits in Group::bits (every piece starts on a byte)
  int64_t spec_end = 0;  // elements [begin, spec_end) were pruned speculatively below the bracket (CountOut)
};

struct Chunk {
  int64_t at, n;  // a slice of the candidate pool: first entry, entries used
};

// A contiguous range of group positions, counted by one thread.
struct Part {
  std::vector<Piece> pieces;
  uint64_t begin = 0;         // group position of the part's first element
  std::vector<Chunk> chunks;  // its collected candidates, in position order
  std::vector<Chunk> undo_chunks;  // weight bits of its speculatively pruned elements, in position order
  bool overflow = false;      // the pool ran out while this part was counted
};

// Candidates (alive keys inside the bracket) collected by the first count pass: one pool per group, handed
// out in chunks so that parts with more of the bracket take more of it.
struct Pool {
  std::unique_ptr<uint32_t[]> key, pos;  // pos: position in the part (none in an undo pool: key = weight bits)
  int64_t cap = 0, chunk = 0;
  std::atomic<int64_t> next{0};
};

struct Group {
  std::vector<int> tensors;
  std::vector<uint64_t> offsets;  // group position of each tensor's first element, plus the total
  int64_t n = 0;
  std::vector<Part> parts;
  int64_t bits_bytes = 0;  // sum over pieces of ceil(elements / 8)
  // selection state
  int64_t alive = 0, k = 0, below = 0;
  uint32_t lo = 0, hi = KEY_MAX;
  int shift = 0;
  std::vector<uint32_t> part_sub;  // parts x SUB_BUCKETS
  int passes = 0;
  // held from a collecting count pass until the group is finished
  std::unique_ptr<Pool> pool;
  std::unique_ptr<uint8_t[]> bits;  // alive and key < lo, per piece (write mode only)
  bool collected = false;           // finished from them
  // speculative pruning (Request::speculate): sample estimate of the alive elements below lo, and the log
  // of the weights pruned by the first count pass until the group is finished (kept) or undone
  int64_t below_est = 0;
  std::unique_ptr<Pool> undo;
};

// Parts per thread: threads take the next part when done, so that a thread slowed by another process on its
// core (a shared 2-core machine) holds back a quarter of its share instead of all of it. With one CPU-bound
// process on the other core, the threshold select took 3.5x its time with one part per thread.
constexpr int kPartsPerThread = 4;

// Runs fn(p) for p in [0, nparts) on up to `threads` threads (parallel.h: torch's OpenMP team when loaded).
template <class F>
void parallel_parts(int nparts, int threads, F&& fn) {
  parallel_for(nparts, threads, [&](int64_t p) { fn(static_cast<int>(p)); });
}

// Sums the parts' histograms of the bracket into sub; returns the total.
uint64_t sum_sub(const Group& g, std::vector<uint64_t>& sub);

// Finishes a group whose first count pass collected its candidates, without reading the weights again:
// threshold and (write) mask update. Returns false when the candidates cannot do it (the pool overflowed or
// the bracket missed the k-th key); either way the candidates and bits are released.
bool finish_collected(Group& g, const Request& req, uint32_t& threshold, int64_t& pruned);

// Puts back the masks (1) and weights that the group's first count pass pruned speculatively, and drops the
// log. No-op when nothing is pending.
void undo_speculation(Group& g, const Request& req);

// Elements the group's first count pass pruned speculatively (the log's length).
int64_t speculated(const Group& g);

}  // namespace lthfast
