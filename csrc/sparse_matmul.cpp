// Unstructured sparse products of the CPU masked linear and conv (sparse_matmul.h): the kernels of
// sparse_kernels.inc compiled for AVX-512, AVX2 + FMA and the baseline ISA, one chosen at run time; the work split
// over torch's threads (parallel.h) in items that each write their own rows, so nothing races.
#include "sparse_matmul.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "parallel.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace lthfast {

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define LTHFAST_SPARSE_X86 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,fma")
namespace isa512 {
constexpr int kW = 16;
#include "sparse_kernels.inc"
}  // namespace isa512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa256 {
constexpr int kW = 8;
#include "sparse_kernels.inc"
}  // namespace isa256
#pragma GCC pop_options
#endif
namespace isa128 {
constexpr int kW = 4;
#include "sparse_kernels.inc"
}  // namespace isa128

namespace {

std::atomic<int> g_forced{0};

int detected_width() {
#ifdef LTHFAST_SPARSE_X86
  static const int width = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                                   __builtin_cpu_supports("fma")
                               ? 16
                           : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 8
                                                                                              : 4;
  return width;
#else
  return 4;
#endif
}

int width() {
  const int forced = g_forced.load(std::memory_order_relaxed);
  return forced ? std::min(forced, detected_width()) : detected_width();
}

// Calls fn(args...) of the chosen ISA's namespace; `w` is width() read once per product.
#ifdef LTHFAST_SPARSE_X86
#define LTHFAST_SPARSE_CALL(w, fn, ...)            \
  do {                                              \
    if ((w) == 16) {                                \
      isa512::fn(__VA_ARGS__);                      \
    } else if ((w) == 8) {                          \
      isa256::fn(__VA_ARGS__);                      \
    } else {                                        \
      isa128::fn(__VA_ARGS__);                      \
    }                                               \
  } while (0)
#else
#define LTHFAST_SPARSE_CALL(w, fn, ...) isa128::fn(__VA_ARGS__)
#endif

// Items of about `grain` units of work each (at least one per thread, more for load balance).
int64_t item_count(int64_t rows, int64_t work, int threads, int64_t grain) {
  const int64_t by_work = std::max<int64_t>(1, work / std::max<int64_t>(1, grain));
  return std::max<int64_t>(1, std::min<int64_t>(rows, std::max<int64_t>(by_work, threads > 1 ? 4 * threads : 1)));
}

// A thread count of 1 for calls too small to pay for waking a team (~10 us on the 2-core VM, and a whole
// time slice when another process holds a core).
constexpr int64_t kMinParallelFlops = 1 << 18;

int threads_for(int threads, int64_t flops) { return flops < kMinParallelFlops ? 1 : std::max(1, threads); }

}  // namespace

}  // namespace lthfast

namespace lthfast {
namespace {

// [r0, r1) of item i when `rows` are cut into `items` equal parts.
inline int64_t part(int64_t rows, int64_t items, int64_t i) { return rows * i / items; }

// co's alive taps: offsets into the padded input of output (0, 0) and the weight values.
void gather_taps(const SparseConv& p, int64_t co, std::vector<int64_t>& off, std::vector<float>& w) {
  const int64_t s0 = p.ptr[co], s1 = p.ptr[co + 1], window = p.kh * p.kw, q_row = p.cin_g * window;
  const int64_t ci0 = (co / p.cout_g) * p.cin_g;
  off.resize(s1 - s0);
  w.resize(s1 - s0);
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t q = p.idx[s], ci = ci0 + q / window, i = (q % window) / p.kw, j = q % p.kw;
    off[s - s0] = ((ci * p.h + i * p.dh) * p.w + j * p.dw) * p.lanes;
    w[s - s0] = p.weight[co * q_row + q];
  }
}

}  // namespace

namespace {

// Rows of a [rows][cols] block of src (row stride rs, column stride cs) into dst transposed ([cols][ld]), in 16 x 16
// tiles so that both sides stay in a few cache lines.
constexpr int64_t kTile = 16;

}  // namespace

namespace {

#ifdef LTHFAST_SPARSE_X86
// 8 x 8 block: dst[j * ldd + i] = src[i * lds + j] for i, j < 8 (AVX2 in-register transpose).
__attribute__((target("avx2"))) void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + i * ldd, t[i]);
}
#endif

bool fast_transpose() { return width() >= 8; }

// dst[w * ldd + b] = src[b * lds + w] for b < nb, w < nw (unit stride along w in src and along b in dst).
void transpose(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t nb, int64_t nw) {
  int64_t b0 = 0;
#ifdef LTHFAST_SPARSE_X86
  if (fast_transpose()) {
    for (; b0 + 8 <= nb; b0 += 8) {
      int64_t w0 = 0;
      for (; w0 + 8 <= nw; w0 += 8) transpose8(src + b0 * lds + w0, lds, dst + w0 * ldd + b0, ldd);
      for (int64_t w = w0; w < nw; ++w)
        for (int64_t b = b0; b < b0 + 8; ++b) dst[w * ldd + b] = src[b * lds + w];
    }
  }
#endif
  for (int64_t w = 0; w < nw; ++w)
    for (int64_t b = b0; b < nb; ++b) dst[w * ldd + b] = src[b * lds + w];
}

}  // namespace

void to_lanes(const LanesLayout& l, const float* src, float* dst, int threads) {
  const int64_t hp = l.h + l.top + l.bottom, wp = l.w + l.left + l.right, plane = hp * wp * l.lanes;
  const int nt = threads_for(threads, l.b * l.c * l.h * l.w);
  const bool padded = l.top || l.bottom || l.left || l.right || l.b < l.lanes;
  if (l.h == 1 && l.w == 1 && !l.top && !l.left && l.sc == 1) {  // a row-major X [B, C]: 8 x 8 register transposes
    parallel_for((l.c + 63) / 64, nt, [&](int64_t item) {
      const int64_t c0 = item * 64, c1 = std::min(l.c, c0 + 64);
      transpose(src + c0, l.sb, dst + c0 * plane, plane, l.b, c1 - c0);
      for (int64_t c = c0; c < c1; ++c) std::memset(dst + c * plane + l.b, 0, (plane - l.b) * sizeof(float));
    });
    return;
  }
  if (l.h == 1 && l.w == 1 && !l.top && !l.left) {  // a linear's X [B, C] -> [C][lanes]: 16 x 16 tiles in L1
    parallel_for((l.c + kTile - 1) / kTile, nt, [&](int64_t item) {
      const int64_t c0 = item * kTile, c1 = std::min(l.c, c0 + kTile);
      for (int64_t c = c0; c < c1; ++c) std::memset(dst + c * plane + l.b, 0, (plane - l.b) * sizeof(float));
      for (int64_t b0 = 0; b0 < l.b; b0 += kTile) {
        const int64_t b1 = std::min(l.b, b0 + kTile);
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t b = b0; b < b1; ++b) dst[c * plane + b] = src[b * l.sb + c * l.sc];
      }
    });
    return;
  }
  // a conv's x: per channel, 8 samples at a time, each read along its rows (h, w) and written 8 lanes wide
  parallel_for(l.c, nt, [&](int64_t c) {
    float* plane_dst = dst + c * plane;
    if (padded) std::memset(plane_dst, 0, plane * sizeof(float));
    if (l.sw == 1) {  // NCHW rows: 8 x 8 register transposes
      for (int64_t h = 0; h < l.h; ++h)
        transpose(src + c * l.sc + h * l.sh, l.sb, plane_dst + ((h + l.top) * wp + l.left) * l.lanes, l.lanes, l.b,
                  l.w);
      return;
    }
    for (int64_t b0 = 0; b0 < l.b; b0 += 8) {
      const int64_t b1 = std::min(l.b, b0 + 8);
      for (int64_t h = 0; h < l.h; ++h) {
        float* row = plane_dst + ((h + l.top) * wp + l.left) * l.lanes;
        const float* s = src + c * l.sc + h * l.sh;
        for (int64_t w = 0; w < l.w; ++w)
          for (int64_t b = b0; b < b1; ++b) row[w * l.lanes + b] = s[b * l.sb + w * l.sw];
      }
    }
  });
}

void from_lanes(const LanesLayout& l, const float* src, float* dst, int threads) {
  const int64_t hp = l.h + l.top + l.bottom, wp = l.w + l.left + l.right, plane = hp * wp * l.lanes;
  const int nt = threads_for(threads, l.b * l.c * l.h * l.w);
  if (l.h == 1 && l.w == 1 && !l.top && !l.left && l.sc == 1) {  // into a row-major [B, C]: register transposes
    parallel_for((l.c + 63) / 64, nt, [&](int64_t item) {
      const int64_t c0 = item * 64, c1 = std::min(l.c, c0 + 64);
      transpose(src + c0 * plane, plane, dst + c0, l.sb, c1 - c0, l.b);
    });
    return;
  }
  if (l.h == 1 && l.w == 1 && !l.top && !l.left) {  // a linear's [C][lanes] -> [B, C]: 16 x 16 tiles in L1
    parallel_for((l.c + kTile - 1) / kTile, nt, [&](int64_t item) {
      const int64_t c0 = item * kTile, c1 = std::min(l.c, c0 + kTile);
      for (int64_t b0 = 0; b0 < l.b; b0 += kTile) {
        const int64_t b1 = std::min(l.b, b0 + kTile);
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t c = c0; c < c1; ++c) dst[b * l.sb + c * l.sc] = src[c * plane + b];
      }
    });
    return;
  }
  parallel_for(l.c, nt, [&](int64_t c) {
    if (l.sw == 1) {  // NCHW rows: 8 x 8 register transposes
      for (int64_t h = 0; h < l.h; ++h)
        transpose(src + c * plane + ((h + l.top) * wp + l.left) * l.lanes, l.lanes, dst + c * l.sc + h * l.sh, l.sb,
                  l.w, l.b);
      return;
    }
    for (int64_t b0 = 0; b0 < l.b; b0 += 8) {
      const int64_t b1 = std::min(l.b, b0 + 8);
      for (int64_t h = 0; h < l.h; ++h) {
        const float* row = src + c * plane + ((h + l.top) * wp + l.left) * l.lanes;
        float* d = dst + c * l.sc + h * l.sh;
        for (int64_t w = 0; w < l.w; ++w)
          for (int64_t b = b0; b < b1; ++b) d[b * l.sb + w * l.sw] = row[w * l.lanes + b];
      }
    }
  });
}

namespace {

// Per-thread scratch for the lanes buffers of sparse_linear_*: grown, never shrunk, reused from call to call.
float* scratch(int slot, size_t floats) {
  thread_local std::vector<float> buffers[3];
  std::vector<float>& b = buffers[slot];
  if (b.size() < floats) b.resize(floats);
  return b.data();
}

int64_t lanes_of(int64_t m) { return std::max<int64_t>(1, (m + kSparseLaneMultiple - 1) / kSparseLaneMultiple) * kSparseLaneMultiple; }

LanesLayout matrix_layout(int64_t rows, int64_t cols, int64_t s0, int64_t s1, int64_t lanes) {
  LanesLayout l;
  l.b = rows, l.c = cols, l.h = 1, l.w = 1;
  l.sb = s0, l.sc = s1;
  l.lanes = lanes;
  return l;
}

}  // namespace

void sparse_linear_forward(const SparseLinear& p, const float* bias, float* y, int threads) {
  const int64_t lanes = lanes_of(p.m);
  float* xt = scratch(0, static_cast<size_t>(p.k * lanes));
  float* yt = scratch(1, static_cast<size_t>(p.n * lanes));
  to_lanes(matrix_layout(p.m, p.k, p.sx0, p.sx1, lanes), p.x, xt, threads);
  SparseRows r;
  r.a = xt, r.lda = lanes, r.rows = p.n, r.ptr = p.row_ptr, r.idx = p.cols, r.w = p.w, r.w_outer = p.k, r.w_inner = 1;
  r.bias = bias, r.c = yt, r.ldc = lanes, r.lanes = lanes;
  sparse_rows(r, threads);
  from_lanes(matrix_layout(p.m, p.n, p.n, 1, lanes), yt, y, threads);
}

void sparse_linear_backward(const SparseLinear& p, const float* g, int64_t sg0, int64_t sg1, float* dx, float* dw,
                            float* db, int threads) {
  const int64_t lanes = lanes_of(p.m);
  float* gt = scratch(0, static_cast<size_t>(p.n * lanes));
  to_lanes(matrix_layout(p.m, p.n, sg0, sg1, lanes), g, gt, threads);
  if (db) {  // the rows of dY^T, summed in order (the padded lanes are zero and are not read)
    for (int64_t r = 0; r < p.n; ++r) {
      const float* row = gt + r * lanes;
      float s = 0.f;
      for (int64_t l = 0; l < p.m; ++l) s += row[l];
      db[r] = s;
    }
  }
  if (dx) {
    float* dxt = scratch(1, static_cast<size_t>(p.k * lanes));
    SparseRows r;
    r.a = gt, r.lda = lanes, r.rows = p.k, r.ptr = p.col_ptr, r.idx = p.col_rows, r.w = p.w, r.w_outer = 1;
    r.w_inner = p.k, r.c = dxt, r.ldc = lanes, r.lanes = lanes;
    sparse_rows(r, threads);
    from_lanes(matrix_layout(p.m, p.k, p.k, 1, lanes), dxt, dx, threads);
  }
  if (dw) {
    float* xt = scratch(2, static_cast<size_t>(p.k * lanes));
    to_lanes(matrix_layout(p.m, p.k, p.sx0, p.sx1, lanes), p.x, xt, threads);
    std::memset(dw, 0, static_cast<size_t>(p.n * p.k) * sizeof(float));
    SparseGradWeight q;
    q.dy = gt, q.ldd = lanes, q.x = xt, q.ldx = lanes, q.rows = p.n, q.ptr = p.row_ptr, q.idx = p.cols, q.dw = dw;
    q.ldw = p.k, q.lanes = lanes;
    sparse_grad_weight(q, threads);
  }
}

bool sparse_vector_isa(int* lanes) {
  *lanes = width();
  return true;
}

int sparse_force_isa(int lanes) {
  if (lanes != 0 && lanes != 4 && lanes != 8 && lanes != 16) throw std::invalid_argument("lanes must be 0, 4, 8, 16");
  return g_forced.exchange(lanes);
}

void sparse_rows(const SparseRows& p, int threads) {
  const int w = width();
  const int64_t work = (p.ptr[p.rows] - p.ptr[0] + p.rows) * p.lanes;
  const int nt = threads_for(threads, 2 * work);
  const int64_t items = item_count(p.rows, work, nt, 1 << 16);
  parallel_for(items, nt, [&](int64_t i) {
    LTHFAST_SPARSE_CALL(w, rows_range, p, part(p.rows, items, i), part(p.rows, items, i + 1));
  });
}

void sparse_grad_weight(const SparseGradWeight& p, int threads) {
  const int w = width();
  const int64_t work = (p.ptr[p.rows] - p.ptr[0]) * p.lanes;
  const int nt = threads_for(threads, 2 * work);
  const int64_t items = item_count(p.rows, work, nt, 1 << 16);
  parallel_for(items, nt, [&](int64_t i) {
    LTHFAST_SPARSE_CALL(w, grad_weight_range, p, part(p.rows, items, i), part(p.rows, items, i + 1));
  });
}

void sparse_conv_forward(const SparseConv& p, int threads) {
  const int w = width();
  const int64_t work = (p.ptr[p.cout] - p.ptr[0] + p.cout) * p.oh * p.ow * p.lanes;
  const int nt = threads_for(threads, 2 * work);
  // (channel, block of output rows) items: at least 4 per thread where the channels alone are too few
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(p.oh, (4 * nt + p.cout - 1) / p.cout));
  parallel_for(p.cout * blocks, nt, [&](int64_t i) {
    thread_local std::vector<int64_t> off;
    thread_local std::vector<float> tw;
    const int64_t co = i / blocks, b = i % blocks;
    gather_taps(p, co, off, tw);
    LTHFAST_SPARSE_CALL(w, conv_out_range, p, co, part(p.oh, blocks, b), part(p.oh, blocks, b + 1), off.data(),
                        tw.data(), static_cast<int64_t>(off.size()));
  });
}

void sparse_conv_grad_input(const SparseConv& p, float* dx, int threads) {
  const int w = width();
  const int64_t window = p.kh * p.kw, q_row = p.cin_g * window, cin = p.cin_g * (p.cout / p.cout_g);
  const int64_t work = (p.ptr[q_row] - p.ptr[0]) * p.oh * p.ow * p.lanes;
  const int nt = threads_for(threads, 2 * work);
  parallel_for(cin, nt, [&](int64_t ci) {
    const int64_t g = ci / p.cin_g, ci_local = ci % p.cin_g;
    for (int64_t i = 0; i < p.kh; ++i) {
      for (int64_t j = 0; j < p.kw; ++j) {
        const int64_t q = (ci_local * p.kh + i) * p.kw + j;
        for (int64_t s = p.ptr[q]; s < p.ptr[q + 1]; ++s) {
          const int64_t co = p.idx[s];
          if (co / p.cout_g != g) continue;
          const float wv = p.weight[co * q_row + q];
          for (int64_t oh = 0; oh < p.oh; ++oh) {
            float* d = dx + ((ci * p.h + oh * p.sh + i * p.dh) * p.w + j * p.dw) * p.lanes;
            const float* g_row = p.y + (co * p.oh + oh) * p.ow * p.lanes;
            LTHFAST_SPARSE_CALL(w, axpy_strided, d, p.sw * p.lanes, g_row, p.ow, wv, p.lanes);
          }
        }
      }
    }
  });
}

void sparse_conv_grad_weight(const SparseConv& p, const float* dy, float* dw, int threads) {
  const int w = width();
  const int64_t work = (p.ptr[p.cout] - p.ptr[0]) * p.oh * p.ow * p.lanes;
  const int nt = threads_for(threads, 2 * work);
  const int64_t q_row = p.cin_g * p.kh * p.kw;
  parallel_for(p.cout, nt, [&](int64_t co) {
    thread_local std::vector<int64_t> off;
    thread_local std::vector<float> tw;
    gather_taps(p, co, off, tw);
    LTHFAST_SPARSE_CALL(w, conv_dw_channel, p, co, dy + co * p.oh * p.ow * p.lanes, off.data(), dw + co * q_row);
  });
}

}  // namespace lthfast

namespace py = pybind11;

namespace {

template <class T>
T* ptr_of(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void check_lanes(const char* what, int64_t lanes) {
  if (lanes <= 0 || lanes % lthfast::kSparseLaneMultiple)
    throw std::invalid_argument(std::string("lthfast._C.") + what + ": lanes must be a positive multiple of 16");
}

void sparse_rows_py(uintptr_t a, int64_t lda, int64_t rows, uintptr_t ptr, uintptr_t idx, uintptr_t w,
                    int64_t w_outer, int64_t w_inner, uintptr_t bias, uintptr_t c, int64_t ldc, int64_t lanes,
                    int threads) {
  check_lanes("sparse_rows", lanes);
  if (rows < 0 || lda < lanes || ldc < lanes || lda % 16 || ldc % 16 || !ptr || (rows && !c))
    throw std::invalid_argument("lthfast._C.sparse_rows: bad sizes or null buffer");
  lthfast::SparseRows p;
  p.a = ptr_of<const float>(a);
  p.lda = lda;
  p.rows = rows;
  p.ptr = ptr_of<const int64_t>(ptr);
  p.idx = ptr_of<const int32_t>(idx);
  p.w = ptr_of<const float>(w);
  p.w_outer = w_outer;
  p.w_inner = w_inner;
  p.bias = ptr_of<const float>(bias);
  p.c = ptr_of<float>(c);
  p.ldc = ldc;
  p.lanes = lanes;
  py::gil_scoped_release release;
  lthfast::sparse_rows(p, threads);
}

void sparse_grad_weight_py(uintptr_t dy, int64_t ldd, uintptr_t x, int64_t ldx, int64_t rows, uintptr_t ptr,
                           uintptr_t idx, uintptr_t dw, int64_t ldw, int64_t lanes, int threads) {
  check_lanes("sparse_grad_weight", lanes);
  if (rows < 0 || ldd < lanes || ldx < lanes || ldd % 16 || ldx % 16 || !ptr || (rows && !dw))
    throw std::invalid_argument("lthfast._C.sparse_grad_weight: bad sizes or null buffer");
  lthfast::SparseGradWeight p;
  p.dy = ptr_of<const float>(dy);
  p.ldd = ldd;
  p.x = ptr_of<const float>(x);
  p.ldx = ldx;
  p.rows = rows;
  p.ptr = ptr_of<const int64_t>(ptr);
  p.idx = ptr_of<const int32_t>(idx);
  p.dw = ptr_of<float>(dw);
  p.ldw = ldw;
  p.lanes = lanes;
  py::gil_scoped_release release;
  lthfast::sparse_grad_weight(p, threads);
}

// kind 0: forward (x -> y); 1: dX (y holds dY, out = dX, ptr/idx the CSC); 2: dW (x, y holds dY, out = dW).
void sparse_conv_py(int kind, uintptr_t x, int64_t h, int64_t w, uintptr_t y, int64_t oh, int64_t ow, int64_t cout,
                    int64_t cin_g, int64_t cout_g, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh,
                    int64_t dw, uintptr_t ptr, uintptr_t idx, uintptr_t weight, uintptr_t bias, int64_t lanes,
                    uintptr_t out, int threads) {
  check_lanes("sparse_conv", lanes);
  if (kind < 0 || kind > 2 || cout <= 0 || cin_g <= 0 || cout_g <= 0 || cout % cout_g || kh <= 0 || kw <= 0 ||
      sh <= 0 || sw <= 0 || dh <= 0 || dw <= 0 || oh < 0 || ow < 0 || (oh - 1) * sh + (kh - 1) * dh >= h + (oh == 0) ||
      (ow - 1) * sw + (kw - 1) * dw >= w + (ow == 0) || !ptr || !y)
    throw std::invalid_argument("lthfast._C.sparse_conv: bad sizes or null buffer");
  lthfast::SparseConv p;
  p.x = ptr_of<const float>(x);
  p.h = h;
  p.w = w;
  p.y = ptr_of<float>(y);
  p.oh = oh;
  p.ow = ow;
  p.cout = cout;
  p.cin_g = cin_g;
  p.cout_g = cout_g;
  p.kh = kh;
  p.kw = kw;
  p.sh = sh;
  p.sw = sw;
  p.dh = dh;
  p.dw = dw;
  p.ptr = ptr_of<const int64_t>(ptr);
  p.idx = ptr_of<const int32_t>(idx);
  p.weight = ptr_of<const float>(weight);
  p.bias = ptr_of<const float>(bias);
  p.lanes = lanes;
  py::gil_scoped_release release;
  if (kind == 0) lthfast::sparse_conv_forward(p, threads);
  if (kind == 1) lthfast::sparse_conv_grad_input(p, ptr_of<float>(out), threads);
  if (kind == 2) lthfast::sparse_conv_grad_weight(p, ptr_of<const float>(y), ptr_of<float>(out), threads);
}

void lanes_py(bool to, uintptr_t src, uintptr_t dst, std::vector<int64_t> dims, std::vector<int64_t> strides,
              std::vector<int64_t> pads, int64_t lanes, int threads) {
  check_lanes(to ? "to_lanes" : "from_lanes", lanes);
  if (dims.size() != 4 || strides.size() != 4 || pads.size() != 4 || dims[0] > lanes || !src || !dst)
    throw std::invalid_argument("lthfast._C.lanes: dims, strides and pads take 4 values each, B <= lanes");
  for (int64_t v : dims)
    if (v < 0) throw std::invalid_argument("lthfast._C.lanes: negative size");
  for (int64_t v : pads)
    if (v < 0) throw std::invalid_argument("lthfast._C.lanes: negative padding");
  lthfast::LanesLayout l;
  l.b = dims[0], l.c = dims[1], l.h = dims[2], l.w = dims[3];
  l.sb = strides[0], l.sc = strides[1], l.sh = strides[2], l.sw = strides[3];
  l.top = pads[0], l.bottom = pads[1], l.left = pads[2], l.right = pads[3];
  l.lanes = lanes;
  py::gil_scoped_release release;
  if (to)
    lthfast::to_lanes(l, ptr_of<const float>(src), ptr_of<float>(dst), threads);
  else
    lthfast::from_lanes(l, ptr_of<const float>(src), ptr_of<float>(dst), threads);
}

lthfast::SparseLinear linear_args(uintptr_t x, int64_t sx0, int64_t sx1, int64_t m, int64_t n, int64_t k, uintptr_t w,
                                  uintptr_t row_ptr, uintptr_t cols, uintptr_t col_ptr, uintptr_t col_rows) {
  if (m < 0 || n < 0 || k < 0 || !row_ptr || !col_ptr)
    throw std::invalid_argument("lthfast._C.sparse_linear: bad sizes or null index");
  lthfast::SparseLinear p;
  p.x = ptr_of<const float>(x), p.sx0 = sx0, p.sx1 = sx1, p.m = m, p.n = n, p.k = k, p.w = ptr_of<const float>(w);
  p.row_ptr = ptr_of<const int64_t>(row_ptr), p.cols = ptr_of<const int32_t>(cols);
  p.col_ptr = ptr_of<const int64_t>(col_ptr), p.col_rows = ptr_of<const int32_t>(col_rows);
  return p;
}

void sparse_linear_forward_py(uintptr_t x, int64_t sx0, int64_t sx1, int64_t m, int64_t n, int64_t k, uintptr_t w,
                              uintptr_t row_ptr, uintptr_t cols, uintptr_t bias, uintptr_t y, int threads) {
  const lthfast::SparseLinear p = linear_args(x, sx0, sx1, m, n, k, w, row_ptr, cols, row_ptr, cols);
  if (m * n && !y) throw std::invalid_argument("lthfast._C.sparse_linear_forward: null output");
  py::gil_scoped_release release;
  lthfast::sparse_linear_forward(p, ptr_of<const float>(bias), ptr_of<float>(y), threads);
}

void sparse_linear_backward_py(uintptr_t x, int64_t sx0, int64_t sx1, int64_t m, int64_t n, int64_t k, uintptr_t w,
                               uintptr_t row_ptr, uintptr_t cols, uintptr_t col_ptr, uintptr_t col_rows, uintptr_t g,
                               int64_t sg0, int64_t sg1, uintptr_t dx, uintptr_t dw, uintptr_t db, int threads) {
  const lthfast::SparseLinear p = linear_args(x, sx0, sx1, m, n, k, w, row_ptr, cols, col_ptr, col_rows);
  py::gil_scoped_release release;
  lthfast::sparse_linear_backward(p, ptr_of<const float>(g), sg0, sg1, ptr_of<float>(dx), ptr_of<float>(dw),
                                  ptr_of<float>(db), threads);
}

int sparse_isa_py() {
  int lanes = 0;
  lthfast::sparse_vector_isa(&lanes);
  return lanes;
}

}  // namespace

void bind_sparse_matmul(py::module_& m) {
  m.def("sparse_rows", &sparse_rows_py, py::arg("a"), py::arg("lda"), py::arg("rows"), py::arg("ptr"),
        py::arg("idx"), py::arg("w"), py::arg("w_outer"), py::arg("w_inner"), py::arg("bias"), py::arg("c"),
        py::arg("ldc"), py::arg("lanes"), py::arg("threads"),
        "fp32 C[r, :lanes] = bias[r] + sum_s w[r*w_outer + idx[s]*w_inner] * A[idx[s], :lanes] over the CSR "
        "(ptr int64, idx int32) rows r: the unstructured forward (A = X^T) and dX (A = dY^T, the CSC).");
  m.def("sparse_grad_weight", &sparse_grad_weight_py, py::arg("dy"), py::arg("ldd"), py::arg("x"), py::arg("ldx"),
        py::arg("rows"), py::arg("ptr"), py::arg("idx"), py::arg("dw"), py::arg("ldw"), py::arg("lanes"),
        py::arg("threads"),
        "fp32 dW[r, idx[s]] = dY^T[r, :lanes] . X^T[idx[s], :lanes] at the alive entries of the CSR; others untouched.");
  m.def("sparse_conv", &sparse_conv_py, py::arg("kind"), py::arg("x"), py::arg("h"), py::arg("w"), py::arg("y"),
        py::arg("oh"), py::arg("ow"), py::arg("cout"), py::arg("cin_g"), py::arg("cout_g"), py::arg("kh"),
        py::arg("kw"), py::arg("sh"), py::arg("sw"), py::arg("dh"), py::arg("dw"), py::arg("ptr"), py::arg("idx"),
        py::arg("weight"), py::arg("bias"), py::arg("lanes"), py::arg("out"), py::arg("threads"),
        "fp32 sparse conv in the lanes-last layout [C][H][W][lanes] (sparse_matmul.h): kind 0 forward, 1 dX "
        "(accumulated into out), 2 dW (written at alive entries of out).");
  m.def("lanes", &lanes_py, py::arg("to"), py::arg("src"), py::arg("dst"), py::arg("dims"), py::arg("strides"),
        py::arg("pads"), py::arg("lanes"), py::arg("threads"),
        "fp32 layout change (sparse_matmul.h LanesLayout): to=True, a tensor [B, C, H, W] (strides in elements) into the "
        "zero-padded lanes buffer [C][H+pads][W+pads][lanes]; to=False, a crop of such a buffer into the tensor.");
  m.def("sparse_linear_forward", &sparse_linear_forward_py, py::arg("x"), py::arg("sx0"), py::arg("sx1"),
        py::arg("m"), py::arg("n"), py::arg("k"), py::arg("w"), py::arg("row_ptr"), py::arg("cols"), py::arg("bias"),
        py::arg("y"), py::arg("threads"),
        "fp32 Y [m, n] (contiguous) = X (W ⊙ M)^T + bias through the mask's CSR, X [m, k] of strides (sx0, sx1), "
        "W [n, k] contiguous; lanes buffers in reused per-thread scratch.");
  m.def("sparse_linear_backward", &sparse_linear_backward_py, py::arg("x"), py::arg("sx0"), py::arg("sx1"),
        py::arg("m"), py::arg("n"), py::arg("k"), py::arg("w"), py::arg("row_ptr"), py::arg("cols"),
        py::arg("col_ptr"), py::arg("col_rows"), py::arg("g"), py::arg("sg0"), py::arg("sg1"), py::arg("dx"),
        py::arg("dw"), py::arg("db"), py::arg("threads"),
        "fp32 dX [m, k] (0 = not wanted), dW [n, k] (zeroed, then written at alive entries; 0 = not wanted), both "
        "contiguous, and db [n] = dY summed over rows (0 = not wanted), from dY [m, n] of strides (sg0, sg1).");
  m.def("sparse_isa", &sparse_isa_py, "Lanes per vector of the sparse kernels in use: 16 AVX-512, 8 AVX2, 4 baseline.");
  m.def("sparse_force_isa", &lthfast::sparse_force_isa, py::arg("lanes"),
        "Cap the sparse kernels' vector width (4, 8, 16; 0 = auto), for tests. Returns the previous setting.");
}
