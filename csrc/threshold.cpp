// Driver of the threshold select: groups, parts, threads, the sample bracket and the refinement loop.
//
// Per group (all tensors in global mode, one tensor each in layer-wise mode):
//  1. sample ~32K elements (deterministic positions) and bracket the target quantile: [lo, hi] keys;
//  2. count pass: alive count, NaN/Inf check, alive keys below lo, and a 1024-bucket histogram of the alive
//     keys inside the bracket (only ~1-2% of the elements, so the pass runs at memory speed);
//  3. locate the bucket that holds the k-th key. If the bracket missed, or the bucket still holds too many
//     elements to collect, the bucket (or the missed side) becomes the new bracket and step 2 repeats: each
//     repeat shrinks the key range 1024-fold, so four passes reach a single key value at worst;
//  4. apply pass: clear masks of alive keys below the bucket and collect the bucket's elements (a few hundred
//     on smooth data) as (key, position) pairs; nth_element on them gives the exact k-th (key, position);
//     when the bucket is one key value (heavy ties), the pass instead clears the first ties of each part up
//     to a quota given by the per-part tie counts: the same (key, position) order.
// When the sample gave a bracket, the first count pass also collects the bracket's alive elements as
// (key, position) candidates (capped at n/32: 8 bytes each, <= 0.25 byte per weight) and, in write mode,
// a bitset of "alive and key < lo" (0.125 byte per weight). If the bracket holds the k-th key and the cap
// held, steps 3-4 run on those instead (threshold_collect.cpp): the weights are read once, not twice.
// With zeroing (Request::speculate) and at most 1/16 of the group expected below lo, that pass also prunes
// the fp32 elements below lo in place and logs their weights (4 bytes each, sized from the sample).
// All groups are counted (and validated) before any mask is written, except the first count pass's speculative
// pruning (Request::speculate): put back from its log before the call fails, or before the bracket is refined.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>

#include "threshold_driver.h"

namespace lthfast {
namespace {

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

constexpr int64_t kSampleSize = 1 << 15;
constexpr int64_t kSampleMinGroup = 1 << 18;  // below this a full-range first pass is cheaper than sampling
constexpr int64_t kMaxPart = int64_t{1} << 30;  // keeps the kernels' 32-bit lane counters from overflowing

void build_parts(Group& g, const Request& req) {
  g.offsets.assign(1, 0);
  for (int t : g.tensors) g.offsets.push_back(g.offsets.back() + static_cast<uint64_t>(req.tensors[t].numel));
  g.n = static_cast<int64_t>(g.offsets.back());
  int64_t nparts =
      std::clamp<int64_t>(g.n / std::max<int64_t>(1, req.grain), 1, int64_t{std::max(1, req.threads)} * kPartsPerThread);
  nparts = std::max(nparts, (g.n + kMaxPart - 1) / kMaxPart);
  g.parts.assign(nparts, {});
  g.bits_bytes = 0;
  for (int64_t p = 0; p < nparts; ++p) {
    const uint64_t b = static_cast<uint64_t>(g.n) * p / nparts, e = static_cast<uint64_t>(g.n) * (p + 1) / nparts;
    g.parts[p].begin = b;
    for (size_t j = 0; j < g.tensors.size(); ++j) {
      const uint64_t tb = std::max(b, g.offsets[j]), te = std::min(e, g.offsets[j + 1]);
      if (tb < te) {
        g.parts[p].pieces.push_back(Piece{g.tensors[j], static_cast<int64_t>(tb - g.offsets[j]),
                                          static_cast<int64_t>(te - g.offsets[j]), tb, g.bits_bytes});
        g.bits_bytes += static_cast<int64_t>((te - tb + 7) / 8);
      }
    }
  }
}

int shift_for(uint32_t lo, uint32_t hi) {
  int s = 0;
  while (hi > lo && ((hi - lo) >> s) >= static_cast<uint32_t>(SUB_BUCKETS)) ++s;
  return s;
}

// Brackets the target quantile of the alive keys from a deterministic sample; full range when the sample
// cannot. The target is the fraction `amount`, or k over the alive count estimated from the sample.
void sample_bracket(Group& g, const Request& req, size_t gi) {
  g.lo = 0;
  g.hi = KEY_MAX;
  if (g.n < kSampleMinGroup) return;
  // Sample positions, ascending: a pseudo-random offset inside each stride avoids aliasing with periodic
  // layouts (e.g. 3x3 kernels).
  struct At {
    const TensorRef* t;
    int64_t i;
  };
  std::vector<At> at(kSampleSize);
  const uint64_t stride = static_cast<uint64_t>(g.n) / kSampleSize;
  size_t j = 0;
  for (int64_t s = 0; s < kSampleSize; ++s) {
    const uint64_t h = (static_cast<uint64_t>(s) + 1) * 0x9E3779B97F4A7C15ull;
    const uint64_t pos = s * stride + (h >> 33) % stride;
    while (g.offsets[j + 1] <= pos) ++j;
    at[s] = At{&req.tensors[g.tensors[j]], static_cast<int64_t>(pos - g.offsets[j])};
  }
  // Each sample is a cache (and TLB) miss: software prefetch overlaps them (32K samples over 29.5M fp32
  // weights, 1 thread of the 2-core dev box: 4.4-6.6 ms without it, 2.4-2.9 ms with it) and so do threads.
  const int nt = static_cast<int>(std::min<int64_t>(std::max(1, req.threads), 8));
  const int nchunks = nt * kPartsPerThread;
  std::vector<std::vector<uint32_t>> part(nchunks);
  parallel_parts(nchunks, nt, [&](int p) {
    const int64_t b = kSampleSize * p / nchunks, e = kSampleSize * (p + 1) / nchunks;
    part[p].reserve(e - b);
    // The mask first (32 ahead), the weight (16 ahead) only where that mask byte, by then in cache, is alive:
    // in late IMP rounds most samples are pruned and their weight lines are not read (ResNet-50-shaped 25.5M
    // weights at 10.7% alive, 2 threads: 0.9-1.0 -> 0.8 ms).
    const auto weight_at = [](const At& f) {
      return static_cast<const char*>(f.t->data) + f.i * element_size(f.t->dtype);
    };
    for (int64_t s = b; s < e; ++s) {
      if (s + 32 < e) {
        const At& f = at[s + 32];
        __builtin_prefetch(f.t->mask != nullptr ? static_cast<const void*>(f.t->mask + f.i) : weight_at(f));
      }
      if (s + 16 < e) {
        const At& f = at[s + 16];
        if (f.t->mask != nullptr && f.t->mask[f.i] != 0) __builtin_prefetch(weight_at(f));
      }
      uint32_t key;
      const At& a = at[s];
      if ((a.t->mask == nullptr || a.t->mask[a.i] != 0) && key_at(*a.t, a.i, key)) part[p].push_back(key);
    }
  });
  std::vector<uint32_t> keys;
  keys.reserve(kSampleSize);
  for (const auto& v : part) keys.insert(keys.end(), v.begin(), v.end());
  const double m = static_cast<double>(keys.size());
  if (m < 1024) return;
  double q = req.amounts.empty() ? static_cast<double>(req.ks[gi]) / (static_cast<double>(g.n) * m / kSampleSize)
                                 : req.amounts[gi];
  q = std::min(q, 1.0);
  if (!(q > 0.0)) return;
  const double r = q * m, delta = 4.0 * std::sqrt(m * q * (1.0 - q)) + 16.0;
  const int64_t lo_i = static_cast<int64_t>(std::floor(r - delta)), hi_i = static_cast<int64_t>(std::ceil(r + delta));
  if (lo_i > 0) {
    std::nth_element(keys.begin(), keys.begin() + lo_i, keys.end());
    g.lo = keys[lo_i];
    g.below_est = static_cast<int64_t>(static_cast<double>(lo_i) * static_cast<double>(g.n) / kSampleSize);
  }
  if (hi_i < static_cast<int64_t>(keys.size()) - 1) {
    std::nth_element(keys.begin(), keys.begin() + hi_i, keys.end());
    g.hi = keys[hi_i];
  }
}

// Hands the sink of one part the pool's next chunk, after recording the chunk it filled.
struct SinkOwner {
  Pool* pool;
  std::vector<Chunk>* chunks;  // the part's record of its chunks
};
bool refill(CandidateSink& s) {
  const SinkOwner& o = *static_cast<const SinkOwner*>(s.ctx);
  if (s.cap > 0) o.chunks->push_back(Chunk{s.key - o.pool->key.get(), s.n});
  const int64_t at = o.pool->next.fetch_add(o.pool->chunk, std::memory_order_relaxed);
  if (at + o.pool->chunk > o.pool->cap) {
    s = CandidateSink{nullptr, nullptr, 0, 0, s.refill, s.ctx};
    return false;
  }
  s.key = o.pool->key.get() + at;
  s.pos = o.pool->pos ? o.pool->pos.get() + at : nullptr;
  s.n = 0;
  s.cap = o.pool->chunk;
  return true;
}

// A pool of `cap` entries (`with_pos`: positions too) for `nparts` parts, in chunks of up to 4096, plus
// `spare` chunks per part (room for the unused tails of the chunks the parts hold).
std::unique_ptr<Pool> make_pool(int64_t cap, int nparts, bool with_pos, int spare = 0) {
  // new[] leaves the buffers uninitialized: only the pages that are written get memory.
  auto pool = std::make_unique<Pool>();
  pool->chunk = std::clamp<int64_t>(cap / (8 * nparts), 64, 4096);
  cap += int64_t{spare} * nparts * pool->chunk;
  pool->cap = cap;
  pool->key.reset(new uint32_t[cap]);
  if (with_pos) pool->pos.reset(new uint32_t[cap]);
  return pool;
}

// Count pass over the whole group for bracket [g.lo, g.hi], collecting candidates (and, in write mode, the
// below-bracket bits) when `collect`. Returns the bad tensors.
std::vector<int> count_pass(Group& g, const Request& req, bool collect = false) {
  g.shift = shift_for(g.lo, g.hi);
  const int nparts = static_cast<int>(g.parts.size());
  g.part_sub.assign(static_cast<size_t>(nparts) * SUB_BUCKETS, 0);
  if (collect) {
    g.pool = make_pool(std::max<int64_t>(g.n / 32, 1 << 12), nparts, /*with_pos=*/true);
    if (req.write) g.bits.reset(new uint8_t[g.bits_bytes]);
    // The undo log: the sample's estimate of the elements below lo, plus a quarter (a miss only stops the
    // speculation where the log ran out) and a chunk's rounding per part. Only when at most 1/16 of the group
    // is to be pruned: above that most weight lines hold a pruned weight, the final pass over the bits
    // streams through them at memory speed, and the log (4 bytes per pruned weight, its pages faulted in the
    // first time a process needs that much) costs more than it saves. ResNet-50-shaped 25.5M weights, 20% of
    // the alive per IMP round: it starts paying at round 6 (6.6% pruned; rounds 3-4 at 1/8 were 6-16 ms
    // slower on 1 thread, benchmarks/bench_prune_step.py's lthfast worker against the previous commit).
    if (req.write && req.speculate && g.below_est > 0 && g.below_est <= g.n / 16)
      g.undo = make_pool(g.below_est + g.below_est / 4 + 4096, nparts, /*with_pos=*/false, /*spare=*/2);
  }
  std::vector<int64_t> alive(nparts, 0), below(nparts, 0);
  std::vector<std::vector<int>> bad(nparts);
  const CountArgs args{g.lo, g.hi, g.shift};
  parallel_parts(nparts, req.threads, [&](int p) {
    Part& part = g.parts[p];
    uint32_t* const sub = g.part_sub.data() + static_cast<size_t>(p) * SUB_BUCKETS;
    SinkOwner owner{g.pool.get(), &part.chunks}, undo_owner{g.undo.get(), &part.undo_chunks};
    CandidateSink sink, undo;
    sink.refill = undo.refill = &refill;
    sink.ctx = &owner;
    undo.ctx = &undo_owner;
    part.chunks.clear();
    part.undo_chunks.clear();
    CountOut out;
    out.sub = sub;
    out.sink = collect ? &sink : nullptr;
    out.undo = collect && g.undo ? &undo : nullptr;
    for (Piece& pc : part.pieces) {
      out.bits = g.bits ? g.bits.get() + pc.bits_at : nullptr;
      out.pos_base = static_cast<uint32_t>(pc.gpos - part.begin);
      out.bad = false;
      out.spec_end = pc.begin;
      count_piece(req.tensors[pc.tensor], pc.begin, pc.end, args, out);
      pc.spec_end = out.spec_end;
      if (out.bad) bad[p].push_back(pc.tensor);
    }
    alive[p] = out.alive;
    below[p] = out.below;
    part.overflow = out.overflow;
    if (collect) {
      if (sink.cap > 0) part.chunks.push_back(Chunk{sink.key - g.pool->key.get(), sink.n});
      if (undo.cap > 0) part.undo_chunks.push_back(Chunk{undo.key - g.undo->key.get(), undo.n});
    }
  });
  g.alive = g.below = 0;
  std::vector<int> bad_tensors;
  for (int p = 0; p < nparts; ++p) {
    g.alive += alive[p];
    g.below += below[p];
    for (int t : bad[p])
      if (bad_tensors.empty() || bad_tensors.back() != t) bad_tensors.push_back(t);
  }
  ++g.passes;
  return bad_tensors;
}

}  // namespace

uint64_t sum_sub(const Group& g, std::vector<uint64_t>& sub) {
  sub.assign(SUB_BUCKETS, 0);
  for (size_t p = 0; p < g.parts.size(); ++p)
    for (int b = 0; b < SUB_BUCKETS; ++b) sub[b] += g.part_sub[p * SUB_BUCKETS + b];
  uint64_t in = 0;
  for (uint64_t c : sub) in += c;
  return in;
}

namespace {

void clear_mask(const Request& req, const Group& g, uint64_t pos) {
  const size_t j = std::upper_bound(g.offsets.begin(), g.offsets.end(), pos) - g.offsets.begin() - 1;
  const TensorRef& t = req.tensors[g.tensors[j]];
  t.mask[pos - g.offsets[j]] = 0;
  zero_weight(t, static_cast<int64_t>(pos - g.offsets[j]));
}

// Steps 3-4 for one counted group. Returns the threshold key.
uint32_t finish_group(Group& g, const Request& req, int64_t& pruned) {
  uint32_t threshold = 0;
  if (g.pool && finish_collected(g, req, threshold, pruned)) return threshold;
  const int nparts = static_cast<int>(g.parts.size());
  const int64_t cap = std::max<int64_t>(1 << 14, g.n / 32);  // 16-byte candidates: <= 0.5 byte per weight
  for (;;) {
    std::vector<uint64_t> sub;
    const uint64_t in = sum_sub(g, sub);
    if (g.k <= g.below) {  // the bracket missed high
      g.hi = g.lo - 1;
      g.lo = 0;
      count_pass(g, req);
      continue;
    }
    if (static_cast<uint64_t>(g.k - g.below) > in) {  // missed low
      g.lo = g.hi + 1;
      g.hi = KEY_MAX;
      count_pass(g, req);
      continue;
    }
    int b = 0;
    int64_t cum = g.below;
    while (cum + static_cast<int64_t>(sub[b]) < g.k) cum += static_cast<int64_t>(sub[b++]);
    const uint32_t blo = g.lo + (static_cast<uint32_t>(b) << g.shift);
    const uint32_t bhi = static_cast<uint32_t>(std::min<uint64_t>(g.hi, uint64_t{blo} + (uint64_t{1} << g.shift) - 1));
    const int64_t count = static_cast<int64_t>(sub[b]), rank = g.k - cum;  // 1 <= rank <= count
    if (blo != bhi && count > cap) {  // refine: the bucket becomes the bracket
      g.lo = blo;
      g.hi = bhi;
      count_pass(g, req);
      continue;
    }
    ApplyArgs args;
    args.lo = blo;
    args.clo = blo;
    args.chi = bhi;
    args.tie_mode = blo == bhi;
    args.write = req.write;
    std::vector<ApplyOut> outs(nparts);
    std::vector<Candidate> cand;
    if (args.tie_mode) {
      if (!req.write) return blo;
      int64_t before = 0;
      for (int p = 0; p < nparts; ++p) {
        const int64_t ties = g.part_sub[static_cast<size_t>(p) * SUB_BUCKETS + b];
        outs[p].quota = std::clamp<int64_t>(rank - before, 0, ties);
        before += ties;
      }
    } else {
      cand.resize(count);
      int64_t off = 0;
      for (int p = 0; p < nparts; ++p) {
        outs[p].cand = cand.data() + off;
        outs[p].cand_cap = g.part_sub[static_cast<size_t>(p) * SUB_BUCKETS + b];
        off += outs[p].cand_cap;
      }
    }
    parallel_parts(nparts, req.threads, [&](int p) {
      for (const Piece& pc : g.parts[p].pieces)
        apply_piece(req.tensors[pc.tensor], pc.begin, pc.end, pc.gpos, args, outs[p]);
    });
    ++g.passes;
    int64_t cleared = 0;
    bool same = true;  // false only if the weights or masks changed during the call
    for (int p = 0; p < nparts; ++p) {
      same &= args.tie_mode || outs[p].ncand == outs[p].cand_cap;
      cleared += outs[p].pruned;
    }
    threshold = blo;
    if (!args.tie_mode) {
      if (!same) throw std::runtime_error("lthfast._C: weights or masks changed during the threshold select");
      std::nth_element(cand.begin(), cand.begin() + (rank - 1), cand.end());
      threshold = cand[rank - 1].key;
      if (req.write) {
        for (int64_t j = 0; j < rank; ++j) clear_mask(req, g, cand[j].pos);
        cleared += rank;
      }
    }
    if (req.write && cleared != g.k)
      throw std::runtime_error("lthfast._C: pruned count differs from k (weights or masks changed during the call?)");
    pruned = req.write ? cleared : 0;
    return threshold;
  }
}

}  // namespace

Result select_threshold(const Request& req) {
  const size_t ngroups = req.groups.size();
  Result res;
  res.alive.assign(ngroups, 0);
  res.k.assign(ngroups, 0);
  res.threshold.assign(ngroups, 0);
  res.pruned.assign(ngroups, 0);
  res.passes.assign(ngroups, 0);
  res.collected.assign(ngroups, 0);
  res.speculated.assign(ngroups, 0);
  std::vector<Group> groups(ngroups);
  for (size_t gi = 0; gi < ngroups; ++gi) {
    Group& g = groups[gi];
    g.tensors = req.groups[gi];
    build_parts(g, req);
    const double t0 = now_ms();
    sample_bracket(g, req, gi);
    const double t1 = now_ms();
    std::vector<int> bad = count_pass(g, req, /*collect=*/g.lo > 0 || g.hi < KEY_MAX);
    res.sample_ms += t1 - t0;
    res.count_ms += now_ms() - t1;
    res.bad_tensors.insert(res.bad_tensors.end(), bad.begin(), bad.end());
    res.alive[gi] = g.alive;
    // k = round(amount * alive), round half to even (std::nearbyint in the default rounding mode), exactly
    // Python's round() on the same double product, as torch.nn.utils.prune computes it.
    g.k = req.amounts.empty() ? req.ks[gi] : static_cast<int64_t>(std::nearbyint(req.amounts[gi] * double(g.alive)));
    res.k[gi] = g.k;
    res.speculated[gi] = speculated(g);
  }
  std::sort(res.bad_tensors.begin(), res.bad_tensors.end());
  const auto fail = [&](int status) {
    for (Group& g : groups) undo_speculation(g, req);
    res.status = status;
    return res;
  };
  if (!res.bad_tensors.empty()) return fail(NONFINITE);
  for (size_t gi = 0; gi < ngroups; ++gi) {
    if (groups[gi].k < 0 || groups[gi].k > groups[gi].alive) return fail(K_TOO_LARGE);
  }
  for (size_t gi = 0; gi < ngroups; ++gi) {
    Group& g = groups[gi];
    const double t0 = now_ms();
    if (g.k > 0) {
      res.threshold[gi] = finish_group(g, req, res.pruned[gi]);
    } else {
      undo_speculation(g, req);  // (a sample bracket with elements below it, then k = 0)
    }
    g.pool.reset();
    g.bits.reset();
    res.apply_ms += now_ms() - t0;  // includes refinement count passes, if any
    res.passes[gi] = g.passes;
    res.collected[gi] = g.collected;
  }
  return res;
}

}  // namespace lthfast
