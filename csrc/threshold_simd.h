// Shared pieces of the threshold kernels (threshold_count.cpp, threshold_kernels.cpp): scalar key helpers,
// the AVX2 building blocks, lookup tables and the (dtype, mask, scaled) dispatch. Internal to lthfast._C.
#pragma once

#include <cstdint>
#include <cstring>

#include "threshold.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define LTHFAST_X86 1
#include <immintrin.h>
#endif

namespace lthfast {
namespace kernels {

template <int DT>
inline uint32_t abs_bits(const void* p, int64_t i) {
  if constexpr (DT == F32) {
    uint32_t u;
    std::memcpy(&u, static_cast<const char*>(p) + 4 * i, 4);
    return u & 0x7fffffffu;
  } else {
    uint16_t h;
    std::memcpy(&h, static_cast<const char*>(p) + 2 * i, 2);
    return h & 0x7fffu;
  }
}

template <int DT>
constexpr uint32_t inf_bits() {
  return DT == F32 ? 0x7f800000u : (DT == F16 ? 0x7c00u : 0x7f80u);
}

inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float32 bits of the magnitude (exact for all three dtypes).
template <int DT>
inline uint32_t magnitude_key(uint32_t a) {
  if constexpr (DT == F32) {
    return a;
  } else if constexpr (DT == BF16) {
    return a << 16;
  } else {
    // fp16 subnormal: a * 2^-24 (exact); normal: rebias the exponent 15 -> 127 and widen the mantissa.
    return a < 0x400u ? f2u(static_cast<float>(a) * 0x1p-24f) : (a << 13) + (112u << 23);
  }
}

template <int DT, bool SCALED>
inline uint32_t key_of(uint32_t a, float s) {
  uint32_t key = magnitude_key<DT>(a);
  if constexpr (SCALED) key = f2u(u2f(key) * s);  // one IEEE float32 multiply, round-to-nearest-even
  return key;
}

// Byte j of kExpand.v[bits] is 0xff when bit j is set: clears pruned mask bytes eight at a time.
struct ExpandTable {
  uint64_t v[256];
  uint8_t pop[256];  // bits set
  ExpandTable() {
    for (int bits = 0; bits < 256; ++bits) {
      v[bits] = 0;
      pop[bits] = 0;
      for (int j = 0; j < 8; ++j)
        if (bits & (1 << j)) {
          v[bits] |= uint64_t{0xff} << (8 * j);
          ++pop[bits];
        }
    }
  }
};
extern const ExpandTable kExpand;


// True when the CPU has AVX2 (and F16C, POPCNT, BMI) and the tests have not turned the vector kernels off.
bool cpu_has_avx2();

#ifdef LTHFAST_X86
#define LTHFAST_AVX2 __attribute__((target("avx2,f16c,popcnt,bmi")))

// Unscaled keys of the eight elements from i: the float32 bits of |w|, >= KEY_MAX exactly for NaN/Inf.
template <int DT>
LTHFAST_AVX2 inline __m256i magnitude8(const void* p, int64_t i) {
  if constexpr (DT == F32) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const float*>(p) + i));
    return _mm256_and_si256(raw, _mm256_set1_epi32(0x7fffffff));
  } else {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    h = _mm_and_si128(h, _mm_set1_epi16(0x7fff));
    if constexpr (DT == BF16) return _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
    return _mm256_castps_si256(_mm256_cvtph_ps(h));  // exact, subnormals included; NaN/Inf stay NaN/Inf
  }
}

template <bool SCALED>
LTHFAST_AVX2 inline __m256i scale8(__m256i mag, __m256 s) {
  if constexpr (SCALED) return _mm256_castps_si256(_mm256_mul_ps(_mm256_castsi256_ps(mag), s));
  return mag;
}

// All-ones lanes where the mask byte is nonzero.
template <bool MASK>
LTHFAST_AVX2 inline __m256i alive8(const uint8_t* m, int64_t i) {
  if constexpr (!MASK) {
    return _mm256_set1_epi32(-1);
  } else {
    const __m256i m32 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m + i)));
    return _mm256_cmpgt_epi32(m32, _mm256_setzero_si256());  // bytes widen to 0..255: signed compare is fine
  }
}

LTHFAST_AVX2 inline int64_t hsum(__m256i v) {
  alignas(32) int32_t x[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(x), v);
  int64_t s = 0;
  for (int j = 0; j < 8; ++j) s += x[j];
  return s;
}

// kCompress.v[bits] lists the set lanes of `bits` first: a permutation that packs selected lanes to the front.
struct CompressTable {
  alignas(32) int32_t v[256][8];
  CompressTable() {
    for (int bits = 0; bits < 256; ++bits) {
      int n = 0;
      for (int j = 0; j < 8; ++j)
        if (bits & (1 << j)) v[bits][n++] = j;
      while (n < 8) v[bits][n++] = 0;
    }
  }
};
extern const CompressTable kCompress;

#endif  // LTHFAST_X86

// Expands the runtime (dtype, has mask, scaled) triple into a template instantiation.
template <template <int, bool, bool> class F, class... Args>
void dispatch(const TensorRef& t, Args&&... args) {
  const bool mask = t.mask != nullptr;
  switch (t.dtype) {
#define LTHFAST_CASE(DT)                                          \
  case DT:                                                        \
    if (mask && t.scaled) return F<DT, true, true>::run(t, args...);  \
    if (mask) return F<DT, true, false>::run(t, args...);          \
    if (t.scaled) return F<DT, false, true>::run(t, args...);      \
    return F<DT, false, false>::run(t, args...);
    LTHFAST_CASE(F32)
    LTHFAST_CASE(F16)
    LTHFAST_CASE(BF16)
#undef LTHFAST_CASE
  }
}

}  // namespace kernels
}  // namespace lthfast
