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
#include <algorithm>
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
  parallel_parts(nparts, req.threads, [&](int p) {
    const Part& part = g.parts[p];
    const uint32_t* const keys = g.pool->key.get();
    const uint32_t* const poss = g.pool->pos.get();
    const uint32_t lo = g.lo, bucket = static_cast<uint32_t>(b);
    const int shift = g.shift;
    Candidate* out = cand.data() + at[p];
    // pieces and candidates are both in position order: walk them together
    size_t pi = 0;
    uint64_t piece_lo = 0, piece_hi = 0;
    uint8_t* piece_bits = nullptr;
    for (const Chunk& c : part.chunks) {
      for (int64_t j = c.at; j < c.at + c.n; ++j) {
        const uint32_t key = keys[j], pos = poss[j], kb = (key - lo) >> shift;
        if (kb == bucket) *out++ = Candidate{key, part.begin + pos};
        if (bits != nullptr) {
          while (pos >= piece_hi) {
            const Piece& next = part.pieces[pi++];
            piece_lo = next.gpos - part.begin;
            piece_hi = piece_lo + static_cast<uint64_t>(next.end - next.begin);
            piece_bits = bits + next.bits_at;
          }
          const uint64_t local = pos - piece_lo;
          piece_bits[local >> 3] |= static_cast<uint8_t>(static_cast<unsigned>(kb < bucket) << (local & 7));
        }
      }
    }
    if (out != cand.data() + at[p + 1])
      throw std::runtime_error("lthfast._C: candidate count differs from the histogram");
  });
  std::nth_element(cand.begin(), cand.begin() + (rank - 1), cand.end());
  threshold = cand[rank - 1].key;  // the k-th alive element in (key, position) order
  pruned = 0;
  if (!req.write) {
    release(g);
    g.collected = true;
    return true;
  }
  // The bucket's first `rank` (in any order after nth_element) join the marked ones.
  std::vector<const Piece*> pieces;
  for (const Part& part : g.parts)
    for (const Piece& pc : part.pieces) pieces.push_back(&pc);
  for (int64_t j = 0; j < rank; ++j) {
    const uint64_t pos = cand[j].pos;
    const auto it = std::upper_bound(pieces.begin(), pieces.end(), pos,
                                     [](uint64_t v, const Piece* pc) { return v < pc->gpos; });
    const Piece& pc = **(it - 1);
    const uint64_t local = pos - pc.gpos;
    bits[pc.bits_at + static_cast<int64_t>(local >> 3)] |= static_cast<uint8_t>(1u << (local & 7));
  }
  std::vector<int64_t> cleared(nparts, 0);
  parallel_parts(nparts, req.threads, [&](int p) {
    for (const Piece& pc : g.parts[p].pieces) {
      const TensorRef& t = req.tensors[pc.tensor];
      const int esize = element_size(t.dtype);
      void* const zero = t.zero == nullptr ? nullptr : static_cast<char*>(t.zero) + esize * pc.begin;
      cleared[p] += clear_marked(t.mask + pc.begin, bits + pc.bits_at, pc.end - pc.begin, zero, esize);
    }
  });
  int64_t total = 0;
  for (int64_t c : cleared) total += c;
  release(g);
  if (total != g.k)
    throw std::runtime_error("lthfast._C: pruned count differs from k (weights or masks changed during the call?)");
  pruned = total;
  g.collected = true;
  return true;
}

}  // namespace lthfast
