// The count pass over one piece (count_piece): alive count, NaN/Inf check, keys below the bracket, the
// histogram of the bracket and, on the first pass, its candidates and the below-bracket bits. A portable
// scalar loop and an AVX2 loop chosen at run time (the extension is built without -march flags).
//
// Why AVX2 by hand: the count pass should run near memory speed. The scalar loop ran at ~1.5 ns/element/core
// (~22 ms for 30M on 2 cores); the 8-lane loop runs at ~0.6 ns/element on one core. Over 29.5M fp32 weights
// and their masks on 2 threads the collecting pass takes ~17.6 ms where one torch.sum over the weights takes
// ~7.7 ms (benchmarks/bench_threshold.py on the shared 2-core EPYC dev box). Elements inside the bracket
// (~1-2%) leave the vector path through a branch-free compress.
#include <algorithm>

#include "threshold_simd.h"

namespace lthfast {
namespace kernels {
namespace {

// Stores one candidate; false when the sink's pool is spent.
inline bool put(CandidateSink& s, uint32_t key, uint32_t pos) {
  if (s.n == s.cap && !s.refill(s)) return false;
  s.key[s.n] = key;
  s.pos[s.n] = pos;
  ++s.n;
  return true;
}

// Elements [b, e) of the piece that starts at `base` (b - base is a multiple of 8: bit bytes stay whole).
template <int DT, bool MASK, bool SCALED>
void count_scalar(const TensorRef& t, int64_t base, int64_t b, int64_t e, const CountArgs& a, CountOut& o) {
  int64_t alive = 0, below = 0;
  bool bad = false;
  uint32_t byte = 0;
  for (int64_t i = b; i < e; ++i) {
    const int64_t j = i - base;
    if (!MASK || t.mask[i] != 0) {
      const uint32_t ab = abs_bits<DT>(t.data, i);
      bad |= ab >= inf_bits<DT>();
      const uint32_t key = key_of<DT, SCALED>(ab, t.scale);
      ++alive;
      if (key < a.lo) {
        ++below;
        byte |= 1u << (j & 7);
      } else if (key <= a.hi) {
        ++o.sub[(key - a.lo) >> a.shift];
        if (o.sink != nullptr && !o.overflow) o.overflow = !put(*o.sink, key, o.pos_base + static_cast<uint32_t>(j));
      }
    }
    if (o.bits != nullptr && ((j & 7) == 7 || i + 1 == e)) {
      o.bits[j >> 3] = static_cast<uint8_t>(byte);
      byte = 0;
    }
  }
  o.alive += alive;
  o.below += below;
  o.bad |= bad;
}

#ifdef LTHFAST_X86
// Counts staged candidates in the histogram (while they are in L1) and moves them to the sink, as far as its
// pool lasts (o.overflow is set when it runs out).
inline void flush(CountOut& o, const CountArgs& a, const uint32_t* keys, const uint32_t* poss, int64_t count) {
  uint32_t* const sub = o.sub;  // locals: the counter stores could alias a's and o's fields
  const uint32_t lo = a.lo;
  const int shift = a.shift;
  for (int64_t j = 0; j < count; ++j) ++sub[(keys[j] - lo) >> shift];
  CandidateSink& s = *o.sink;
  for (int64_t j = 0; j < count;) {
    if (s.n == s.cap && !s.refill(s)) {
      o.overflow = true;
      return;
    }
    const int64_t take = std::min(count - j, s.cap - s.n);
    std::memcpy(s.key + s.n, keys + j, 4 * take);
    std::memcpy(s.pos + s.n, poss + j, 4 * take);
    s.n += take;
    j += take;
  }
}

enum LoopMode { kHistogram, kCollect, kCollectBits, kCollectSpec };  // kCollectSpec: kCollectBits + speculation

struct CountAcc {
  __m256i n_alive, n_below, max_mag;  // max of the alive unscaled keys: NaN/Inf among them iff >= KEY_MAX
  __m256i pos;                        // positions of the block's lanes (when collecting)
  int staged;
};

// One 8-block of count_loop. Keys are < 2^31 (NaN patterns included), and lo <= KEY_MAX + 1, so signed
// 32-bit compares order them.
template <int DT, bool MASK, bool SCALED, LoopMode MODE>
LTHFAST_AVX2 __attribute__((always_inline)) inline void count_block(const void* data, const uint8_t* mask, int64_t i,
                                                                    uint8_t* bit_byte, __m256i lo, __m256i hi,
                                                                    __m256 s, __m128i shift, CountAcc& acc,
                                                                    uint32_t* stage, uint32_t* stage_pos) {
  const __m256i mag = magnitude8<DT>(data, i);
  const __m256i key = scale8<SCALED>(mag, s);
  const __m256i alive = alive8<MASK>(mask, i);
  const __m256i lt = _mm256_cmpgt_epi32(lo, key);
  const __m256i gt = _mm256_cmpgt_epi32(key, hi);
  const __m256i low = _mm256_and_si256(lt, alive);
  acc.n_alive = _mm256_sub_epi32(acc.n_alive, alive);
  acc.n_below = _mm256_sub_epi32(acc.n_below, low);
  acc.max_mag = _mm256_max_epu32(acc.max_mag, _mm256_and_si256(mag, alive));
  if constexpr (MODE >= kCollectBits) *bit_byte = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_castsi256_ps(low)));
  // Branch-free compress of the in-bracket lanes: a branch per 8-block mispredicts on ~14% of blocks when
  // 1.8% of the elements are in the bracket, which cost 6 ms of a 10 ms pass (30M fp32, 2 cores); the
  // compress costs ~4 vector ops per block.
  const unsigned in = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(_mm256_or_si256(lt, gt), alive)));
  const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress.v[in]));
  if constexpr (MODE != kHistogram) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(stage + acc.staged), _mm256_permutevar8x32_epi32(key, perm));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(stage_pos + acc.staged),
                        _mm256_permutevar8x32_epi32(acc.pos, perm));
    acc.pos = _mm256_add_epi32(acc.pos, _mm256_set1_epi32(8));
  } else {
    const __m256i idx = _mm256_srl_epi32(_mm256_sub_epi32(key, lo), shift);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(stage + acc.staged), _mm256_permutevar8x32_epi32(idx, perm));
  }
  acc.staged += _mm_popcnt_u32(in);
}

// Speculative pruning of one fp32 8-block (kCollectSpec): the lanes set in `low` (alive, below the bracket) get
// their weight bits appended to the undo log, then +0.0 and mask 0, while the lines are in L1. The count pass
// has just read them: pruning here instead of in a later pass over the bits saves reading every line that
// holds a pruned weight again (~7 ms of a 21 ms prune of 25.5M fp32 weights at IMP round 10, 2 threads).
LTHFAST_AVX2 inline void speculate8(float* w, uint8_t* mask, int64_t i, unsigned low, CandidateSink& undo) {
  if (low == 0) return;
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i));
  const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress.v[low]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(undo.key + undo.n), _mm256_permutevar8x32_epi32(raw, perm));
  undo.n += _mm_popcnt_u32(low);
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i sel = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(low)), lane_bit), lane_bit);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + i), _mm256_andnot_si256(sel, raw));
  uint64_t m;
  std::memcpy(&m, mask + i, 8);
  m &= ~kExpand.v[low];
  std::memcpy(mask + i, &m, 8);
}

// Runs the 8-blocks from i that fit before e; returns where it stopped (early only when collecting and the
// sink's pool ran out: o.overflow is then set, or when speculating and the undo log ran out: o.undo_spent). The
// bits are written in kCollectBits and kCollectSpec modes only.
// Two blocks per iteration: the pass is bound by instructions on the 2-core EPYC dev box (~0.6 ns per
// element per core, well under its memory bandwidth), and paying the loop, prefetch and staging checks once
// per two blocks took the collecting loop from 45 to 35 instructions per block (count pass over 29.5M fp32,
// 2 threads: 18.9 -> 15.6 ms, medians of 20).
template <int DT, bool MASK, bool SCALED, LoopMode MODE>
LTHFAST_AVX2 int64_t count_loop(const TensorRef& t, int64_t base, int64_t i, int64_t e, const CountArgs& a,
                                CountOut& o) {
  constexpr bool kCollecting = MODE != kHistogram;
  const void* const data = t.data;  // locals: the byte stores could alias t's fields
  const uint8_t* const mask = t.mask;
  float* const spec_w = MODE == kCollectSpec ? static_cast<float*>(t.zero) : nullptr;
  uint8_t* const spec_mask = MODE == kCollectSpec ? t.mask : nullptr;
  uint8_t* const bits = MODE >= kCollectBits ? o.bits + ((i - base) >> 3) : nullptr;
  const auto bits_at = [bits](int64_t q) { return MODE >= kCollectBits ? bits + q : nullptr; };
  uint32_t* const sub = o.sub;
  const __m256i lo = _mm256_set1_epi32(static_cast<int>(a.lo));
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(a.hi));
  const __m256 s = _mm256_set1_ps(t.scale);
  const __m128i shift = _mm_cvtsi32_si128(a.shift);
  // In-bracket lanes are staged in L1 (bucket indices, or keys and positions when collecting) and moved out
  // every kStage.
  constexpr int kStage = 1024;
  alignas(32) uint32_t stage[kStage + 8];
  alignas(32) uint32_t stage_pos[kCollecting ? kStage + 8 : 1];
  CountAcc acc{_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
               _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                _mm256_set1_epi32(static_cast<int>(o.pos_base + static_cast<uint32_t>(i - base)))),
               0};
  const int64_t blocks = (e - i) >> 3;
  int64_t q = 0;
  for (; q + 2 <= blocks; q += 2) {
    // Write-prefetch 8 KB ahead: each fresh cache line of bits otherwise stalls a store (the bits cost the
    // pass 4.1 ms without the prefetch, 2.0 ms with it: 15M fp32, 1 thread, medians of 10 paired runs).
    if constexpr (MODE >= kCollectBits) __builtin_prefetch(bits + q + 8192, 1);
    if constexpr (MODE == kCollectSpec) {
      CandidateSink& u = *o.undo;
      if (u.n + 16 > u.cap && !u.refill(u)) {  // room for two blocks' lanes, or the speculation stops here
        o.undo_spent = true;
        break;
      }
    }
    count_block<DT, MASK, SCALED, MODE>(data, mask, i + 8 * q, bits_at(q), lo, hi, s, shift, acc, stage, stage_pos);
    count_block<DT, MASK, SCALED, MODE>(data, mask, i + 8 * q + 8, bits_at(q + 1), lo, hi, s, shift, acc, stage,
                                        stage_pos);
    if constexpr (MODE == kCollectSpec) {
      speculate8(spec_w, spec_mask, i + 8 * q, bits[q], *o.undo);
      speculate8(spec_w, spec_mask, i + 8 * q + 8, bits[q + 1], *o.undo);
    }
    if (acc.staged > kStage - 16) {
      if constexpr (kCollecting) {
        flush(o, a, stage, stage_pos, acc.staged);
        acc.staged = 0;
        if (o.overflow) {
          q += 2;
          break;
        }
      } else {
        for (int j = 0; j < acc.staged; ++j) ++sub[stage[j]];
        acc.staged = 0;
      }
    }
  }
  if (MODE != kCollectSpec && q < blocks && !o.overflow) {  // (a speculating loop leaves it to kCollectBits)
    count_block<DT, MASK, SCALED, MODE>(data, mask, i + 8 * q, bits_at(q), lo, hi, s, shift, acc, stage, stage_pos);
    ++q;
  }
  if constexpr (kCollecting) {
    flush(o, a, stage, stage_pos, acc.staged);
  } else {
    for (int j = 0; j < acc.staged; ++j) ++sub[stage[j]];
  }
  o.alive += hsum(acc.n_alive);
  o.below += hsum(acc.n_below);
  const __m256i bad = _mm256_cmpgt_epi32(acc.max_mag, _mm256_set1_epi32(static_cast<int>(KEY_MAX) - 1));
  o.bad |= !_mm256_testz_si256(bad, bad);
  return i + 8 * q;
}

template <int DT, bool MASK, bool SCALED>
LTHFAST_AVX2 void count_avx2(const TensorRef& t, int64_t b, int64_t e, const CountArgs& a, CountOut& o) {
  int64_t i = b;
  if constexpr (DT == F32 && MASK) {
    if (o.sink != nullptr && !o.overflow && o.bits != nullptr && o.undo != nullptr && !o.undo_spent &&
        t.zero != nullptr) {
      i = count_loop<DT, MASK, SCALED, kCollectSpec>(t, b, i, e, a, o);
      o.spec_end = i;
    }
  }
  if (o.sink != nullptr && !o.overflow) {
    i = o.bits != nullptr ? count_loop<DT, MASK, SCALED, kCollectBits>(t, b, i, e, a, o)
                          : count_loop<DT, MASK, SCALED, kCollect>(t, b, i, e, a, o);
  }
  i = count_loop<DT, MASK, SCALED, kHistogram>(t, b, i, e, a, o);
  count_scalar<DT, MASK, SCALED>(t, b, i, e, a, o);
}

#endif  // LTHFAST_X86

template <int DT, bool MASK, bool SCALED>
void count_dispatch(const TensorRef& t, int64_t b, int64_t e, const CountArgs& a, CountOut& o) {
#ifdef LTHFAST_X86
  if (cpu_has_avx2()) return count_avx2<DT, MASK, SCALED>(t, b, e, a, o);
#endif
  count_scalar<DT, MASK, SCALED>(t, b, b, e, a, o);
}

template <int DT, bool MASK, bool SCALED>
struct CountF {
  static void run(const TensorRef& t, int64_t b, int64_t e, const CountArgs& a, CountOut& o) {
    count_dispatch<DT, MASK, SCALED>(t, b, e, a, o);
  }
};
}  // namespace
}  // namespace kernels

void count_piece(const TensorRef& t, int64_t begin, int64_t end, const CountArgs& a, CountOut& out) {
  kernels::dispatch<kernels::CountF>(t, begin, end, a, out);
}

}  // namespace lthfast
