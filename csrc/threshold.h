// Global / layer-wise magnitude threshold by bracketed radix select over order-preserving key bits.
//
// Key of an element: the float32 bit pattern of |w| (times the tensor's float32 scale when scales are given,
// rounded to nearest-even by one IEEE float32 multiply). For non-negative floats the bit pattern, read as an
// unsigned integer, orders exactly like the value, so selection works on integers. Keys of finite weights lie
// in [0, KEY_MAX] (a scaled key can overflow to +inf = KEY_MAX, which still orders correctly).
//
// Order: elements of a group are ranked by (key, position), position = index in the concatenation of the
// group's tensors in list order, each flattened row-major. The k smallest alive elements are pruned (mask
// byte set to 0); the threshold is the largest pruned key. Exactly the same set for any thread count.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace lthfast {

constexpr uint32_t KEY_MAX = 0x7f800000u;  // bits of +inf
constexpr int SUB_BITS = 10;               // sub-buckets per bracket: 1024
constexpr int SUB_BUCKETS = 1 << SUB_BITS;

enum DType : int { F32 = 0, F16 = 1, BF16 = 2 };

struct TensorRef {
  const void* data = nullptr;  // contiguous, numel elements of dtype
  uint8_t* mask = nullptr;     // contiguous bool/uint8 bytes (nonzero = alive), or nullptr = all alive
  void* zero = nullptr;        // `data` again when the weights this call prunes are to be zeroed (write mode)
  int64_t numel = 0;
  int dtype = F32;
  bool scaled = false;
  float scale = 1.0f;
};

struct Request {
  std::vector<TensorRef> tensors;
  std::vector<std::vector<int>> groups;  // tensor indices per group, ascending
  std::vector<double> amounts;           // per group: fraction of alive (or empty)
  std::vector<int64_t> ks;               // per group: count (or empty)
  bool write = false;                    // update masks in place
  // Write mode with zeroing, bool masks (alive = 1) and no two tensors sharing memory: the first count pass
  // prunes the alive fp32 elements below the bracket in place (mask and weight, while their lines are in cache)
  // and logs their weights; the log puts them back if the call then fails (NaN/Inf, k too large) or the bracket
  // missed. Nothing else sees the intermediate state: the masks and weights are the caller's, held for the call.
  bool speculate = false;
  int threads = 1;
  int64_t grain = 1 << 16;  // minimum elements per part (up to 4 parts per thread); small groups use fewer
};

enum Status : int { OK = 0, NONFINITE = 1, K_TOO_LARGE = 2 };

struct Result {
  int status = OK;
  std::vector<int> bad_tensors;     // tensors holding NaN/Inf among their alive weights
  std::vector<int64_t> alive;       // per group
  std::vector<int64_t> k;           // per group: k = round-half-even(amount * alive), or the given k
  std::vector<uint32_t> threshold;  // per group: key bits of the k-th smallest alive key (unused when k == 0)
  std::vector<int64_t> pruned;      // per group: masks cleared (k when write, else 0)
  std::vector<int> passes;          // per group: full passes over the weights (for tests and benchmarks)
  std::vector<int> collected;       // per group: 1 when finished from the count pass's candidates (no 2nd read)
  std::vector<int64_t> speculated;  // per group: elements the first count pass pruned in place (kept or undone)
  double sample_ms = 0, count_ms = 0, apply_ms = 0;  // wall time per phase, all groups (for benchmarks)
};

// Runs validation (count pass) for every group first; masks are written only if every group is valid.
Result select_threshold(const Request& req);

// ---- per-piece kernels (threshold_count.cpp, threshold_kernels.cpp): one contiguous range [begin, end) of
// one tensor ----

// Candidate store of a collecting count pass: the current chunk of a pool shared by the group's parts. When
// the chunk is full the kernel calls refill, which hands out the next free chunk (false: the pool is spent).
struct CandidateSink {
  uint32_t* key = nullptr;  // key bits
  uint32_t* pos = nullptr;  // position in the part (parts hold < 2^30 elements)
  int64_t n = 0, cap = 0;   // used / size of the current chunk
  bool (*refill)(CandidateSink&) = nullptr;
  void* ctx = nullptr;
};

// Count pass. "below": alive keys < lo. Alive keys in [lo, hi] are counted in sub[(key - lo) >> shift] and,
// when collecting (sink != nullptr, until its pool runs out), stored in the sink as (key, pos_base + i -
// begin). When `bits` is set too, bit (i - begin) of bits is written for every element: alive and key < lo
// (complete unless the sink's pool ran out).
struct CountArgs {
  uint32_t lo = 0, hi = 0;  // hi < lo: empty bracket
  int shift = 0;
};
struct CountOut {
  int64_t alive = 0, below = 0;
  bool bad = false;
  uint32_t* sub = nullptr;  // SUB_BUCKETS counters
  uint8_t* bits = nullptr;  // ceil((end - begin) / 8) bytes, or nullptr
  CandidateSink* sink = nullptr;
  uint32_t pos_base = 0;
  bool overflow = false;  // the sink ran out: some in-bracket keys were only counted
  // Speculative pruning (Request::speculate, fp32 pieces with bits): elements [begin, spec_end) of the piece
  // were counted with their below-bracket lanes pruned in place, and those lanes' weight bits appended to
  // `undo` in position order. The pass stops speculating when the undo pool runs out (undo_spent).
  CandidateSink* undo = nullptr;
  int64_t spec_end = 0;
  bool undo_spent = false;
};
void count_piece(const TensorRef& t, int64_t begin, int64_t end, const CountArgs& a, CountOut& out);

// Clears mask[i] where bit i of bits is set, i < n, and zeroes element i of `zero` (esize bytes each) when it is
// not null. Returns the number of bits set.
int64_t clear_marked(uint8_t* mask, const uint8_t* bits, int64_t n, void* zero, int esize);

inline int element_size(int dtype) { return dtype == F32 ? 4 : 2; }

// Writes +0.0 (all bits zero) into element i of an array of esize-byte elements.
inline void zero_element(void* base, int esize, int64_t i) {
  char* const p = static_cast<char*>(base) + static_cast<int64_t>(esize) * i;
  for (int b = 0; b < esize; ++b) p[b] = 0;
}

// Writes +0.0 into element i of t's weights when t.zero is set.
inline void zero_weight(const TensorRef& t, int64_t i) {
  if (t.zero != nullptr) zero_element(t.zero, element_size(t.dtype), i);
}

// Turns the AVX2 kernels off (false) or back on where the CPU has them; returns the previous setting.
bool set_vector_kernels(bool enabled);

struct Candidate {
  uint32_t key;
  uint64_t pos;  // position in the group
  bool operator<(const Candidate& o) const { return key < o.key || (key == o.key && pos < o.pos); }
};

// Apply pass. Alive keys < lo are pruned (when write). Alive keys in [clo, chi] are "rare": in candidate mode
// they are appended to cand; in tie mode (clo == chi) the first `quota` of them are pruned.
struct ApplyArgs {
  uint32_t lo = 0, clo = 1, chi = 0;
  bool tie_mode = false;
  bool write = false;
};
struct ApplyOut {
  int64_t pruned = 0;
  Candidate* cand = nullptr;
  int64_t ncand = 0;     // candidates seen; only the first `cand_cap` are stored (the driver checks equality)
  int64_t cand_cap = 0;
  int64_t quota = 0;
};
void apply_piece(const TensorRef& t, int64_t begin, int64_t end, uint64_t gpos, const ApplyArgs& a, ApplyOut& out);

// Scalar key of element i (for sampling). Returns false for NaN/Inf weights.
bool key_at(const TensorRef& t, int64_t i, uint32_t& key);

}  // namespace lthfast
