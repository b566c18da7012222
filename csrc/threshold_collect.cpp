// Finishing a group from the candidates its first count pass collected: no second read of the weights.
//
// The count pass left, per part, the alive elements inside the bracket [lo, hi] as (key, position) pairs in
// position order, the histogram of their keys, and (write mode) a bitset of the alive elements below lo.
// When the k-th smallest key lies in the bracket: the histogram gives its bucket b; one pass over the
// candidates adds those of buckets below b to the bitset and gathers bucket b's (a few hundred on smooth
// data); nth_element on those gives the exact k-th (key, position) and the bucket's elements up to it,
// which join the bitset; then one pass over masks and bits clears every marked mask byte.
// That pass moves the masks (n bytes, read and written) and n/8 bytes of bits, against 4n + 2n bytes for a
// second pass over fp32 weights and their masks.
// When the count pass speculated (Request::speculate), the elements below lo of the ranges it covered are
// already pruned: the candidates to prune there are pruned directly (a prefetched list), the final pass
// covers only the rest, and the log is dropped. When the candidates cannot finish the group, or the call
// fails, undo_speculation puts the logged weights back first.
#include <algorithm>
#include <cstring>
#include <memory>
#include <stdexcept>

#include "threshold_driver.h"

namespace lthfast {

namespace {

void release(Group& g) {
  g.pool.reset();
  g.bits.reset();
}

}  // namespace

bool finish_collected(Group& g, const Request& req, uint32_t& threshold, int64_t& pruned) {
  const int nparts = static_cast<int>(g.parts.size());
  bool overflow = false;
  for (const Part& part : g.parts) overflow |= part.overflow;
  std::vector<uint64_t> sub;
  const uint64_t in = sum_sub(g, sub);
  if (overflow || g.k <= g.below || static_cast<uint64_t>(g.k - g.below) > in) {
    undo_speculation(g, req);  // the caller's passes read the weights as they were
    release(g);  // before the caller's own passes allocate theirs: the peak stays at the larger of the two
    return false;
  }
  int b = 0;
  int64_t cum = g.below;
  while (cum + static_cast<int64_t>(sub[b]) < g.k) cum += static_cast<int64_t>(sub[b++]);
  const int64_t rank = g.k - cum;  // 1 <= rank <= sub[b]

  // One pass over each part's candidates: those in buckets below b are marked in the bits (write mode), those
  // in bucket b go to the part's slice of `cand` (sized by the part's histogram), in group order.
  std::vector<int64_t> at(nparts + 1, 0);
  for (int p = 0; p < nparts; ++p) at[p + 1] = at[p] + g.part_sub[static_cast<size_t>(p) * SUB_BUCKETS + b];
  std::vector<Candidate> cand(at[nparts]);
  uint8_t* const bits = g.bits.get();
  // Pruned by this function: an element of a speculated range is pruned directly (its bit would not be read
  // again), any other joins the bits for the final pass. Speculated ranges are fp32 with masks.
  struct Direct {
    uint8_t* mask;
    float* weight;
  };
  std::vector<std::vector<Direct>> direct(nparts);
  const auto mark = [&](const Piece& pc, uint64_t local, std::vector<Direct>& list) {
    const int64_t i = pc.begin + static_cast<int64_t>(local);
    if (i < pc.spec_end) {
      const TensorRef& t = req.tensors[pc.tensor];
      list.push_back(Direct{t.mask + i, static_cast<float*>(t.zero) + i});
    } else {
      bits[pc.bits_at + static_cast<int64_t>(local >> 3)] |= static_cast<uint8_t>(1u << (local & 7));
    }
  };
  // A few hundred bytes apart on average: each is a cache miss on its mask and weight lines, so the lines of
  // the ones kAhead further are prefetched.
  const auto prune_direct = [](const std::vector<Direct>& list) {
    constexpr size_t kAhead = 16;
    for (size_t j = 0; j < list.size(); ++j) {
      if (j + kAhead < list.size()) {
        __builtin_prefetch(list[j + kAhead].mask, 1);
        __builtin_prefetch(list[j + kAhead].weight, 1);
      }
      *list[j].mask = 0;
      *list[j].weight = 0.0f;
    }
  };
  parallel_parts(nparts, req.threads, [&](int p) {
    const Part& part = g.parts[p];
    const uint32_t* const keys = g.pool->key.get();
    const uint32_t* const poss = g.pool->pos.get();
    const uint32_t lo = g.lo, bucket = static_cast<uint32_t>(b);
    const int shift = g.shift;
    Candidate* out = cand.data() + at[p];
    // 1. bucket b's candidates to `cand`; the positions of those below it packed without a branch (the test
    //    is a coin flip per candidate)
    int64_t total = 0;
    for (const Chunk& c : part.chunks) total += c.n;
    std::unique_ptr<uint32_t[]> below(new uint32_t[total + 1]);  // uninitialized: only what is written is paged in
    size_t nbelow = 0;
    for (const Chunk& c : part.chunks) {
      for (int64_t j = c.at; j < c.at + c.n; ++j) {
        const uint32_t key = keys[j], pos = poss[j], kb = (key - lo) >> shift;
        if (kb == bucket) *out++ = Candidate{key, part.begin + pos};
        below[nbelow] = pos;
        nbelow += kb < bucket;
      }
    }
    if (out != cand.data() + at[p + 1])
      throw std::runtime_error("lthfast._C: candidate count differs from the histogram");
    if (bits == nullptr) return;
    // 2. to bits or the direct list: pieces and candidates are both in position order, walked together
    bool speculated_part = false;
    for (const Piece& pc : part.pieces) speculated_part |= pc.spec_end > pc.begin;
    if (speculated_part) direct[p].reserve(nbelow);
    size_t pi = 0;
    uint64_t piece_lo = 0, piece_hi = 0;
    const Piece* piece = nullptr;
    for (size_t j = 0; j < nbelow; ++j) {
      const uint32_t pos = below[j];
      while (pos >= piece_hi) {
        piece = &part.pieces[pi++];
        piece_lo = piece->gpos - part.begin;
        piece_hi = piece_lo + static_cast<uint64_t>(piece->end - piece->begin);
      }
      mark(*piece, pos - piece_lo, direct[p]);
    }
    // 3. the direct ones
    prune_direct(direct[p]);
  });
  std::nth_element(cand.begin(), cand.begin() + (rank - 1), cand.end());
  threshold = cand[rank - 1].key;  // the k-th alive element in (key, position) order
  pruned = 0;
  if (!req.write) {
    release(g);
    g.collected = true;
    return true;
  }
  int64_t total = speculated(g);
  for (auto& list : direct) {
    total += static_cast<int64_t>(list.size());
    list.clear();
  }
  // The bucket's first `rank` (in any order after nth_element) join the marked ones.
  std::vector<const Piece*> pieces;
  for (const Part& part : g.parts)
    for (const Piece& pc : part.pieces) pieces.push_back(&pc);
  for (int64_t j = 0; j < rank; ++j) {
    const uint64_t pos = cand[j].pos;
    const auto it = std::upper_bound(pieces.begin(), pieces.end(), pos,
                                     [](uint64_t v, const Piece* pc) { return v < pc->gpos; });
    mark(**(it - 1), pos - (*(it - 1))->gpos, direct[0]);
  }
  prune_direct(direct[0]);
  // The final pass, after each piece's speculated range (done by the count pass).
  std::vector<int64_t> cleared(nparts, 0);
  parallel_parts(nparts, req.threads, [&](int p) {
    for (const Piece& pc : g.parts[p].pieces) {
      const TensorRef& t = req.tensors[pc.tensor];
      const int esize = element_size(t.dtype);
      const int64_t from = pc.spec_end;  // (spec_end - begin) is a multiple of 8: the bits stay whole bytes
      void* const zero = t.zero == nullptr ? nullptr : static_cast<char*>(t.zero) + esize * from;
      cleared[p] += clear_marked(t.mask + from, bits + pc.bits_at + (from - pc.begin) / 8, pc.end - from, zero, esize);
    }
  });
  total += static_cast<int64_t>(direct[0].size());
  for (int64_t c : cleared) total += c;
  g.undo.reset();  // kept: the count pass's pruning is final
  release(g);
  if (total != g.k)
    throw std::runtime_error("lthfast._C: pruned count differs from k (weights or masks changed during the call?)");
  pruned = total;
  g.collected = true;
  return true;
}

int64_t speculated(const Group& g) {
  int64_t n = 0;
  if (g.undo)
    for (const Part& part : g.parts)
      for (const Chunk& c : part.undo_chunks) n += c.n;
  return n;
}

void undo_speculation(Group& g, const Request& req) {
  if (!g.undo) return;
  const int nparts = static_cast<int>(g.parts.size());
  std::vector<int64_t> restored(nparts, 0);
  parallel_parts(nparts, req.threads, [&](int p) {
    const Part& part = g.parts[p];
    const uint32_t* const log = g.undo->key.get();
    size_t ci = 0;
    int64_t at = 0, left = 0;  // the next logged value: log[at], `left` more in this chunk
    for (const Piece& pc : part.pieces) {
      if (pc.spec_end <= pc.begin) continue;
      const TensorRef& t = req.tensors[pc.tensor];  // speculated pieces are fp32 with masks
      float* const w = static_cast<float*>(t.zero);
      const uint8_t* const bits = g.bits.get() + pc.bits_at;
      for (int64_t byte = 0; byte < (pc.spec_end - pc.begin) / 8; ++byte) {
        for (unsigned b = bits[byte]; b != 0; b &= b - 1) {
          while (left == 0) {
            if (ci == part.undo_chunks.size()) throw std::runtime_error("lthfast._C: speculation log too short");
            at = part.undo_chunks[ci].at;
            left = part.undo_chunks[ci++].n;
          }
          const int64_t i = pc.begin + 8 * byte + __builtin_ctz(b);
          t.mask[i] = 1;
          std::memcpy(w + i, log + at, 4);
          ++at;
          --left;
          ++restored[p];
        }
      }
    }
  });
  int64_t total = 0;
  for (int64_t r : restored) total += r;
  if (total != speculated(g)) throw std::runtime_error("lthfast._C: speculation log and bits disagree");
  g.undo.reset();
}

}  // namespace lthfast
