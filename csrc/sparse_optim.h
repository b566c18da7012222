// The per-element arithmetic of the fused optimizer steps (sparse_optim.cpp): torch.optim's single-tensor float32
// SGD and Adam / AdamW operations in torch's order, over a contiguous block (with an optional mask), as AVX2 + FMA
// vector kernels chosen at run time and their scalar twin. Included by sparse_optim.cpp only.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define LTHFAST_OPTIM_X86 1
#include <immintrin.h>
#endif

namespace lthfast::optim {

constexpr int64_t kBlock = 256;  // elements per kernel block: the square roots' scratch, sparse mode's gather

inline std::atomic<bool> g_vector{true};

inline bool vector_supported() {
#ifdef LTHFAST_OPTIM_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

inline bool use_vector() { return g_vector.load(std::memory_order_relaxed) && vector_supported(); }

// MKL's Fortran vmsSqrt (n, a, r, mode) as libtorch_cpu exports it, and the mode ATen calls it with
// (aten/src/ATen/cpu/vml.h: VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE).
using VmlSqrt = void (*)(const int32_t*, const float*, float*, const int64_t*);
inline constexpr int64_t kVmlMode = 0x2 | 0x140000 | 0x100;

inline VmlSqrt vml_sqrt_fn() {
#if defined(__unix__) || defined(__APPLE__)
  static const VmlSqrt fn = [] {
    VmlSqrt found = nullptr;
    for (const char* name : {"libtorch_cpu.so", "libtorch_cpu.dylib"}) {
      if (void* lib = dlopen(name, RTLD_NOW | RTLD_NOLOAD)) {
        found = reinterpret_cast<VmlSqrt>(dlsym(lib, "VMSSQRT_"));
        dlclose(lib);  // drops the reference RTLD_NOLOAD took; torch's own keeps it loaded
        if (found) break;
      }
    }
    return found;
  }();
  return fn;
#else
  return nullptr;
#endif
}

inline std::atomic<bool> g_vml_sqrt{false};  // set by optim_sqrt

// out[i] = sqrt(x[i]) as torch.sqrt computes it (n <= kBlock), in place allowed.
inline void sqrt_block(const float* x, float* out, int64_t n) {
  if (g_vml_sqrt.load(std::memory_order_relaxed)) {
    const int32_t count = static_cast<int32_t>(n);
    vml_sqrt_fn()(&count, x, out, &kVmlMode);
    return;
  }
  for (int64_t i = 0; i < n; ++i) out[i] = std::sqrt(x[i]);
}

// torch.maximum: NaN when either is NaN.
inline float max_nan(float a, float b) {
  if (std::isnan(a)) return a;
  if (std::isnan(b)) return b;
  return a > b ? a : b;
}

// The gradient torch's step uses at i (negated under maximize), +0.0 where the mask byte is 0: pruned weights and
// their state then stay +0.0 through every update below.
inline float grad_at(const float* g, const uint8_t* mask, int64_t i, bool maximize) {
  if (mask && !mask[i]) return 0.0f;
  return maximize ? -g[i] : g[i];
}

// ---------------------------------------------------------------------------------------------------------------
// SGD: torch.optim.sgd._single_tensor_sgd, per element.

struct SgdScalars {  // float32 as ATen casts the Python scalars
  float wd, momentum, damp1, neg_lr;
  bool has_wd, has_momentum, nesterov, maximize, first;
};

// g: the gradient, already negated under maximize (and +0.0 where masked off).
inline void sgd_one(const SgdScalars& s, float& p, float g, float* buf) {
  if (s.has_wd) g = std::fma(p, s.wd, g);  // grad.add(param, alpha=wd)
  if (s.has_momentum) {
    const float b = s.first ? g : std::fma(g, s.damp1, *buf * s.momentum);  // buf.mul_(m).add_(grad, alpha=1-d)
    *buf = b;
    g = s.nesterov ? std::fma(b, s.momentum, g) : b;  // grad.add(buf, alpha=m) or buf
  }
  p = std::fma(g, s.neg_lr, p);  // param.add_(grad, alpha=-lr)
}

inline void sgd_scalar(const SgdScalars& s, float* p, const float* g, float* buf, const uint8_t* mask, int64_t n) {
  for (int64_t i = 0; i < n; ++i) sgd_one(s, p[i], grad_at(g, mask, i, s.maximize), buf ? buf + i : nullptr);
}

// ---------------------------------------------------------------------------------------------------------------
// Adam / AdamW: torch.optim.adam._single_tensor_adam (capturable=False, differentiable=False), per element.

struct AdamScalars {
  float wd, decay, lerp_coeff, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step;
  int wd_mode;  // 0 none, 1 L2 (Adam), 2 decoupled (AdamW)
  bool lerp_small, amsgrad, maximize;
};

// Phase 1 of an element: the moments; returns the second moment the denominator uses (v, or its running max).
// g as for sgd_one.
inline float adam_moments(const AdamScalars& s, float& p, float g, float& m, float& v, float* mx) {
  if (s.wd_mode == 1) g = std::fma(p, s.wd, g);  // grad.add(param, alpha=wd)
  if (s.wd_mode == 2) p = p * s.decay;           // param.mul_(1 - lr * wd)
  // exp_avg.lerp_(grad, 1 - beta1): ATen's lerp, fma(w, end - start, start) for |w| < 0.5, else from the end
  m = std::fma(s.lerp_coeff, g - m, s.lerp_small ? m : g);
  v = std::fma(s.one_minus_beta2 * g, g, v * s.beta2);  // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
  if (!s.amsgrad) return v;
  return *mx = max_nan(*mx, v);  // torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
}

// Phase 2, given root = sqrt(second moment): (root / bias_correction2_sqrt).add_(eps), then
// param.addcdiv_(exp_avg, denom, value=-step_size).
inline float adam_update(const AdamScalars& s, float p, float m, float root) {
  return p + s.neg_step * m / (root / s.bc2_sqrt + s.eps);
}

// Before the square roots of a masked block: 1 where the mask byte is 0. A pruned entry's second moment is +0.0, and
// MKL's square root takes a slow path on zeros (5x on a block of them, 7x when they alternate with positives, on
// the 2-core EPYC VM); its update is +0.0 + (-lr * 0) / denom = +0.0 whatever the root, so only the time changes.
inline void unit_roots_where_pruned(float* root, const uint8_t* mask, int64_t n) {
  if (!mask) return;
  for (int64_t i = 0; i < n; ++i) root[i] = mask[i] ? root[i] : 1.0f;
}

// n <= kBlock elements; `root` is scratch for the square roots.
inline void adam_scalar(const AdamScalars& s, float* p, const float* g, float* m, float* v, float* mx,
                        const uint8_t* mask, int64_t n, float* root) {
  for (int64_t i = 0; i < n; ++i)
    root[i] = adam_moments(s, p[i], grad_at(g, mask, i, s.maximize), m[i], v[i], mx ? mx + i : nullptr);
  unit_roots_where_pruned(root, mask, n);
  sqrt_block(root, root, n);
  for (int64_t i = 0; i < n; ++i) p[i] = adam_update(s, p[i], m[i], root[i]);
}

#ifdef LTHFAST_OPTIM_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")

// grad_at for lanes i..i+7.
inline __m256 load_grad(const float* g, const uint8_t* mask, int64_t i, bool maximize) {
  __m256 x = _mm256_loadu_ps(g + i);
  if (maximize) x = _mm256_xor_ps(x, _mm256_set1_ps(-0.0f));
  if (mask) {
    int64_t bytes;
    std::memcpy(&bytes, mask + i, 8);
    const __m256i wide = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes));
    const __m256i dead = _mm256_cmpeq_epi32(wide, _mm256_setzero_si256());
    x = _mm256_andnot_ps(_mm256_castsi256_ps(dead), x);
  }
  return x;
}

inline void sgd_avx2(const SgdScalars& s, float* p, const float* g, float* buf, const uint8_t* mask, int64_t n) {
  const __m256 wd = _mm256_set1_ps(s.wd), mom = _mm256_set1_ps(s.momentum);
  const __m256 damp1 = _mm256_set1_ps(s.damp1), neg_lr = _mm256_set1_ps(s.neg_lr);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 x = _mm256_loadu_ps(p + i);
    __m256 gv = load_grad(g, mask, i, s.maximize);
    if (s.has_wd) gv = _mm256_fmadd_ps(x, wd, gv);
    if (s.has_momentum) {
      const __m256 b = s.first ? gv : _mm256_fmadd_ps(gv, damp1, _mm256_mul_ps(_mm256_loadu_ps(buf + i), mom));
      _mm256_storeu_ps(buf + i, b);
      gv = s.nesterov ? _mm256_fmadd_ps(b, mom, gv) : b;
    }
    _mm256_storeu_ps(p + i, _mm256_fmadd_ps(gv, neg_lr, x));
  }
  sgd_scalar(s, p + i, g + i, buf ? buf + i : nullptr, mask ? mask + i : nullptr, n - i);
}

inline void adam_avx2(const AdamScalars& s, float* p, const float* g, float* m, float* v, float* mx,
                      const uint8_t* mask, int64_t n, float* root) {
  const __m256 wd = _mm256_set1_ps(s.wd), decay = _mm256_set1_ps(s.decay);
  const __m256 coeff = _mm256_set1_ps(s.lerp_coeff), beta2 = _mm256_set1_ps(s.beta2);
  const __m256 c2 = _mm256_set1_ps(s.one_minus_beta2), bc2 = _mm256_set1_ps(s.bc2_sqrt);
  const __m256 eps = _mm256_set1_ps(s.eps), neg_step = _mm256_set1_ps(s.neg_step);
  const int64_t body = n & ~int64_t{7};
  for (int64_t i = 0; i < body; i += 8) {
    __m256 gv = load_grad(g, mask, i, s.maximize);
    if (s.wd_mode == 1) gv = _mm256_fmadd_ps(_mm256_loadu_ps(p + i), wd, gv);
    if (s.wd_mode == 2) _mm256_storeu_ps(p + i, _mm256_mul_ps(_mm256_loadu_ps(p + i), decay));
    const __m256 mo = _mm256_loadu_ps(m + i);
    const __m256 mn = _mm256_fmadd_ps(coeff, _mm256_sub_ps(gv, mo), s.lerp_small ? mo : gv);
    const __m256 vn = _mm256_fmadd_ps(_mm256_mul_ps(c2, gv), gv, _mm256_mul_ps(_mm256_loadu_ps(v + i), beta2));
    _mm256_storeu_ps(m + i, mn);
    _mm256_storeu_ps(v + i, vn);
    __m256 second = vn;
    if (s.amsgrad) {
      const __m256 old = _mm256_loadu_ps(mx + i);
      // torch.maximum's vector form: max, with all bits set where either is NaN
      second = _mm256_or_ps(_mm256_max_ps(old, vn), _mm256_cmp_ps(old, vn, _CMP_UNORD_Q));
      _mm256_storeu_ps(mx + i, second);
    }
    _mm256_storeu_ps(root + i, second);
  }
  for (int64_t i = body; i < n; ++i)
    root[i] = adam_moments(s, p[i], grad_at(g, mask, i, s.maximize), m[i], v[i], mx ? mx + i : nullptr);
  unit_roots_where_pruned(root, mask, n);
  sqrt_block(root, root, n);
  for (int64_t i = 0; i < body; i += 8) {
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_loadu_ps(root + i), bc2), eps);
    const __m256 step = _mm256_div_ps(_mm256_mul_ps(neg_step, _mm256_loadu_ps(m + i)), denom);
    _mm256_storeu_ps(p + i, _mm256_add_ps(_mm256_loadu_ps(p + i), step));
  }
  for (int64_t i = body; i < n; ++i) p[i] = adam_update(s, p[i], m[i], root[i]);
}

// Whether the float32 bits g are +-0 wherever the mask byte is 0 (mask_optimizer's check of the gradients).
inline bool pruned_zero32_avx2(const uint32_t* g, const uint8_t* mask, int64_t n) {
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff), zero = _mm256_setzero_si256();
  __m256i acc = zero;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mask + i));
    const __m128i lo = _mm256_castsi256_si128(bytes), hi = _mm256_extracti128_si256(bytes, 1);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int q = 0; q < 4; ++q) {
      const __m256i dead = _mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(parts[q]), zero);
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + i + 8 * q));
      acc = _mm256_or_si256(acc, _mm256_and_si256(x, dead));
    }
  }
  bool ok = _mm256_testz_si256(acc, magnitude);
  for (; i < n; ++i) ok &= mask[i] || !(g[i] & 0x7fffffffu);
  return ok;
}

#pragma GCC pop_options
#endif

inline void sgd_block(const SgdScalars& s, float* p, const float* g, float* buf, const uint8_t* mask, int64_t n) {
#ifdef LTHFAST_OPTIM_X86
  if (use_vector()) return sgd_avx2(s, p, g, buf, mask, n);
#endif
  sgd_scalar(s, p, g, buf, mask, n);
}

// Any n: kBlock elements at a time (the square roots go through a block-sized scratch).
inline void adam_block(const AdamScalars& s, float* p, const float* g, float* m, float* v, float* mx,
                       const uint8_t* mask, int64_t n) {
  alignas(32) float root[kBlock];
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t k = std::min(kBlock, n - b);
    const uint8_t* mb = mask ? mask + b : nullptr;
    float* xb = mx ? mx + b : nullptr;
#ifdef LTHFAST_OPTIM_X86
    if (use_vector()) {
      adam_avx2(s, p + b, g + b, m + b, v + b, xb, mb, k, root);
      continue;
    }
#endif
    adam_scalar(s, p + b, g + b, m + b, v + b, xb, mb, k, root);
  }
}

}  // namespace lthfast::optim
