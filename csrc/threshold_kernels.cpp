// The apply pass over one piece (apply_piece: clears masks below the bucket and collects or tie-clears the
// bucket), clear_marked (masks from the bitset of the collected path), the lookup tables and the switch
// between AVX2 and scalar kernels. AVX2 versions are chosen at run time, as in threshold_count.cpp.
#include <atomic>
#include <cstring>

#include "threshold_simd.h"

namespace lthfast {
namespace kernels {

const ExpandTable kExpand;
#ifdef LTHFAST_X86
const CompressTable kCompress;
#endif

namespace {

std::atomic<bool> g_vector_kernels{true};  // tests turn the AVX2 kernels off to cover the scalar ones

template <int DT, bool SCALED>
void apply_scalar(const TensorRef& t, int64_t b, int64_t e, uint64_t gpos, const ApplyArgs& a, ApplyOut& o) {
  for (int64_t i = b; i < e; ++i) {
    if (t.mask != nullptr && t.mask[i] == 0) continue;
    const uint32_t key = key_of<DT, SCALED>(abs_bits<DT>(t.data, i), t.scale);
    bool prune = key < a.lo;
    if (key >= a.clo && key <= a.chi) {
      if (a.tie_mode) {
        prune = o.quota > 0;
        o.quota -= prune;
      } else {
        if (o.ncand < o.cand_cap) o.cand[o.ncand] = Candidate{key, gpos + static_cast<uint64_t>(i - b)};
        ++o.ncand;
      }
    }
    if (a.write && prune) {
      t.mask[i] = 0;
      zero_weight(t, i);
      ++o.pruned;
    }
  }
}

#ifdef LTHFAST_X86
template <int DT, bool MASK, bool SCALED>
LTHFAST_AVX2 void apply_avx2(const TensorRef& t, int64_t b, int64_t e, uint64_t gpos, const ApplyArgs& a,
                             ApplyOut& o) {
  const __m256i lo = _mm256_set1_epi32(static_cast<int>(a.lo));
  const __m256i clo = _mm256_set1_epi32(static_cast<int>(a.clo));
  const __m256i chi = _mm256_set1_epi32(static_cast<int>(a.chi));
  const __m256 s = _mm256_set1_ps(t.scale);
  alignas(32) uint32_t keys[8];
  int64_t pruned = 0;
  int64_t i = b;
  for (; i + 8 <= e; i += 8) {
    const __m256i key = scale8<SCALED>(magnitude8<DT>(t.data, i), s);
    const __m256i alive = alive8<MASK>(t.mask, i);
    const __m256i out = _mm256_or_si256(_mm256_cmpgt_epi32(clo, key), _mm256_cmpgt_epi32(key, chi));
    unsigned rare = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(out, alive)));
    unsigned prune = 0;
    if (a.write) prune = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_and_si256(_mm256_cmpgt_epi32(lo, key), alive)));
    if (rare != 0) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(keys), key);
      do {
        const int j = __builtin_ctz(rare);
        if (a.tie_mode) {
          if (o.quota > 0) {
            prune |= 1u << j;
            --o.quota;
          }
        } else {
          if (o.ncand < o.cand_cap) o.cand[o.ncand] = Candidate{keys[j], gpos + static_cast<uint64_t>(i + j - b)};
          ++o.ncand;
        }
        rare &= rare - 1;
      } while (rare != 0);
    }
    if (MASK && a.write) {
      // Unconditional store: a branch on "any pruned" mispredicts at typical rates (20% pruned -> 83% of
      // 8-blocks prune something) and the cache lines are already in L1.
      uint64_t m;
      std::memcpy(&m, t.mask + i, 8);
      m &= ~kExpand.v[prune];
      std::memcpy(t.mask + i, &m, 8);
      pruned += _mm_popcnt_u32(prune);
      if (t.zero != nullptr)  // only on this rare path (no bracket): the collected path zeroes in clear_marked
        for (unsigned z = prune; z != 0; z &= z - 1) zero_weight(t, i + __builtin_ctz(z));
    }
  }
  o.pruned += pruned;
  apply_scalar<DT, SCALED>(t, i, e, gpos + static_cast<uint64_t>(i - b), a, o);
}

// clear_marked's 32-byte steps; returns the elements done.
LTHFAST_AVX2 int64_t clear_marked_avx2(uint8_t* mask, const uint8_t* bits, int64_t n, float* zero, int64_t& cleared) {
  // byte q of a step takes bit q % 8 of bits byte q / 8
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  int64_t j = 0, count = 0;
  for (; j + 32 <= n; j += 32) {
    uint32_t b;
    std::memcpy(&b, bits + (j >> 3), 4);
    const __m256i spread_bits = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(b)), spread);
    const __m256i marked = _mm256_cmpeq_epi8(_mm256_and_si256(spread_bits, bit), bit);
    __m256i* const m = reinterpret_cast<__m256i*>(mask + j);
    _mm256_storeu_si256(m, _mm256_andnot_si256(marked, _mm256_loadu_si256(m)));
    count += _mm_popcnt_u32(b);
    if (zero != nullptr && b != 0) {
      // fp32 weights of the marked lanes, 8 at a time: only the 8-blocks with a pruned weight are rewritten, so
      // after the first rounds (2% of all weights pruned per round at 10% density) most weight lines are not
      // written. Load + andnot + store, not vmaskmovps: its store form is microcoded and slow on AMD cores.
      const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
      for (int q = 0; q < 4; ++q) {
        const unsigned byte = (b >> (8 * q)) & 0xffu;
        if (byte == 0) continue;
        const __m256i sel = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(byte)), lane_bit),
                                               lane_bit);
        float* const w = zero + j + 8 * q;
        _mm256_storeu_ps(w, _mm256_andnot_ps(_mm256_castsi256_ps(sel), _mm256_loadu_ps(w)));
      }
    }
  }
  cleared += count;
  return j;
}

#endif  // LTHFAST_X86

template <int DT, bool MASK, bool SCALED>
void apply_dispatch(const TensorRef& t, int64_t b, int64_t e, uint64_t gpos, const ApplyArgs& a, ApplyOut& o) {
#ifdef LTHFAST_X86
  if (cpu_has_avx2()) return apply_avx2<DT, MASK, SCALED>(t, b, e, gpos, a, o);
#endif
  apply_scalar<DT, SCALED>(t, b, e, gpos, a, o);
}

template <int DT, bool MASK, bool SCALED>
struct ApplyF {
  static void run(const TensorRef& t, int64_t b, int64_t e, uint64_t gpos, const ApplyArgs& a, ApplyOut& o) {
    apply_dispatch<DT, MASK, SCALED>(t, b, e, gpos, a, o);
  }
};

}  // namespace

bool cpu_has_avx2() {
#ifdef LTHFAST_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                         __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi");
  return ok && g_vector_kernels.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

}  // namespace kernels

using namespace kernels;

void apply_piece(const TensorRef& t, int64_t begin, int64_t end, uint64_t gpos, const ApplyArgs& a, ApplyOut& out) {
  dispatch<ApplyF>(t, begin, end, gpos, a, out);
}

int64_t clear_marked(uint8_t* mask, const uint8_t* bits, int64_t n, void* zero, int esize) {
  // One read and one write of the masks plus n/8 bytes of bits: 1/3 of the bytes of a second pass over fp32
  // weights and their masks (plus, when zeroing, the lines of the weights pruned now).
  int64_t cleared = 0, j = 0;
#ifdef LTHFAST_X86
  if (cpu_has_avx2() && (zero == nullptr || esize == 4))
    j = clear_marked_avx2(mask, bits, n, static_cast<float*>(zero), cleared);
#endif
  const auto zero_at = [zero, esize](int64_t i) {
    if (zero != nullptr) zero_element(zero, esize, i);
  };
  for (; j + 8 <= n; j += 8) {
    const uint8_t b = bits[j >> 3];
    uint64_t m;
    std::memcpy(&m, mask + j, 8);
    m &= ~kExpand.v[b];
    std::memcpy(mask + j, &m, 8);
    cleared += kExpand.pop[b];
    for (unsigned z = b; z != 0; z &= z - 1) zero_at(j + __builtin_ctz(z));
  }
  for (; j < n; ++j) {
    if ((bits[j >> 3] >> (j & 7)) & 1) {
      mask[j] = 0;
      zero_at(j);
      ++cleared;
    }
  }
  return cleared;
}

bool set_vector_kernels(bool enabled) { return g_vector_kernels.exchange(enabled); }

bool key_at(const TensorRef& t, int64_t i, uint32_t& key) {
  switch (t.dtype) {
    case F16: {
      const uint32_t a = abs_bits<F16>(t.data, i);
      key = t.scaled ? key_of<F16, true>(a, t.scale) : key_of<F16, false>(a, t.scale);
      return a < inf_bits<F16>();
    }
    case BF16: {
      const uint32_t a = abs_bits<BF16>(t.data, i);
      key = t.scaled ? key_of<BF16, true>(a, t.scale) : key_of<BF16, false>(a, t.scale);
      return a < inf_bits<BF16>();
    }
    default: {
      const uint32_t a = abs_bits<F32>(t.data, i);
      key = t.scaled ? key_of<F32, true>(a, t.scale) : key_of<F32, false>(a, t.scale);
      return a < inf_bits<F32>();
    }
  }
}

}  // namespace lthfast
