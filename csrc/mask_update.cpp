// The mask write of a prune step (lthfast.pruning: Masks.apply_ on masked modules): copy each new mask into
// the module's mask buffer and zero the stored weights where it is 0, in one pass over both, on several threads.
//
// A weight is rewritten only when it is dead and its bits are not already +0.0, and a 16-weight block is
// stored back only when one of its weights changes: after the first IMP rounds most dead weights are already
// zero, and their cache lines are then read but not written back (torch's integer multiply writes them all).
#include <cstring>

#include "mask_update.h"
#include "threshold_driver.h"
#include "threshold_simd.h"

namespace lthfast {
namespace {

template <int ES>
struct Word;
template <>
struct Word<2> {
  using type = uint16_t;
};
template <>
struct Word<4> {
  using type = uint32_t;
};
template <>
struct Word<8> {
  using type = uint64_t;
};

template <int ES>
int64_t write_scalar(const MaskWrite& w, int64_t b, int64_t e) {
  using W = typename Word<ES>::type;
  int64_t changed = 0;
  for (int64_t i = b; i < e; ++i) {
    const uint8_t m = w.mask[i];
    w.buffer[i] = m;
    W x;
    std::memcpy(&x, w.weight + ES * i, ES);
    if (m == 0 && x != 0) {
      x = 0;
      std::memcpy(w.weight + ES * i, &x, ES);
      ++changed;
    }
  }
  return changed;
}

#ifdef LTHFAST_X86
// float32 weights, 16 per step: dead lanes with nonzero bits are cleared, the step is stored only if one was.
LTHFAST_AVX2 int64_t write_avx2_f32(const MaskWrite& w, int64_t b, int64_t e, int64_t& done) {
  const __m256i zero = _mm256_setzero_si256();
  int64_t changed = 0, i = b;
  for (; i + 16 <= e; i += 16) {
    const __m128i m16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.mask + i));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(w.buffer + i), m16);
    __m256i* const p = reinterpret_cast<__m256i*>(w.weight + 4 * i);
    const __m256i w0 = _mm256_loadu_si256(p), w1 = _mm256_loadu_si256(p + 1);
    const __m256i dead0 = _mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(m16), zero);
    const __m256i dead1 = _mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(m16, m16)), zero);
    const __m256i clear0 = _mm256_andnot_si256(_mm256_cmpeq_epi32(w0, zero), dead0);
    const __m256i clear1 = _mm256_andnot_si256(_mm256_cmpeq_epi32(w1, zero), dead1);
    const __m256i any = _mm256_or_si256(clear0, clear1);
    if (!_mm256_testz_si256(any, any)) {
      _mm256_storeu_si256(p, _mm256_andnot_si256(clear0, w0));
      _mm256_storeu_si256(p + 1, _mm256_andnot_si256(clear1, w1));
      changed += _mm_popcnt_u32(_mm256_movemask_ps(_mm256_castsi256_ps(clear0))) +
                 _mm_popcnt_u32(_mm256_movemask_ps(_mm256_castsi256_ps(clear1)));
    }
  }
  done = i;
  return changed;
}
#endif

int64_t write_range(const MaskWrite& w, int64_t b, int64_t e) {
  int64_t changed = 0;
  switch (w.esize) {
    case 2:
      return write_scalar<2>(w, b, e);
    case 8:
      return write_scalar<8>(w, b, e);
    default:
#ifdef LTHFAST_X86
      if (kernels::cpu_has_avx2()) changed = write_avx2_f32(w, b, e, b);
#endif
      return changed + write_scalar<4>(w, b, e);
  }
}

}  // namespace

int64_t write_masks(const std::vector<MaskWrite>& items, int threads, int64_t grain) {
  // Contiguous element ranges of the concatenated tensors, one per part (a range may span tensors).
  std::vector<int64_t> offsets(1, 0);
  for (const MaskWrite& w : items) offsets.push_back(offsets.back() + w.n);
  const int64_t total = offsets.back();
  const int nparts = static_cast<int>(
      std::clamp<int64_t>(total / std::max<int64_t>(1, grain), 1, int64_t{std::max(1, threads)} * kPartsPerThread));
  std::vector<int64_t> changed(nparts, 0);
  parallel_parts(nparts, threads, [&](int p) {
    const int64_t b = total * p / nparts, e = total * (p + 1) / nparts;
    for (size_t j = 0; j < items.size(); ++j) {
      const int64_t tb = std::max(b, offsets[j]), te = std::min(e, offsets[j + 1]);
      if (tb < te) changed[p] += write_range(items[j], tb - offsets[j], te - offsets[j]);
    }
  });
  int64_t sum = 0;
  for (int64_t c : changed) sum += c;
  return sum;
}

}  // namespace lthfast
