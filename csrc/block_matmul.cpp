// Block-sparse fp32 products of the CPU masked linear: forward and dX as one pass over output column blocks
// (block_rows_product), dW as one product per alive tile (block_grad_weight). One register-blocked AVX2/FMA
// micro-kernel serves all three:
//   C[mr x 16] = init + sum over segments s of A_s[mr x kc] @ B_s[kc x 16]      (mr <= 6: 12 ymm accumulators)
// A broadcast one element at a time, B two 8-wide rows per k, C stored once after the last segment. This
// replaces one torch.mm per tile row over gathered copies of X / dY: on the 2-core EPYC VM (2 threads) each
// pass of Linear(2048, 2048), batch 512, 95% sparse in 32x32 tiles took 12-18 ms that way (3 ms of it the
// 13 MB gather, 130 us per cold 512x96x32 product) for 225 MFLOP of work.
#include "block_matmul.h"
#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define LTHFAST_BLOCK_X86 1
#include <immintrin.h>
#define LTHFAST_AVX2_FMA __attribute__((target("avx2,fma")))
#endif

namespace lthfast {
namespace {

constexpr int kMr = 6;            // rows per micro-kernel call
constexpr int64_t kRowChunk = 96;  // rows per work item of block_rows_product: 16 micro-kernel rows
constexpr int64_t kTilesPerItem = 4;  // dW tiles per work item, all of one tile row
constexpr int64_t kGradChunk = 64;    // dW: rows of m per pass over the two [m][32] panels: 16 KB, in L1

#ifdef LTHFAST_BLOCK_X86
// C[MR x 16] (ldc) = init[16] (or 0; or C itself when init == c) + sum over s in [s0, s1) of
// A_s[MR x kc] @ B_s[kc x 16] (ldb), where A_s = a + a_cols[s] (a when a_cols is null) and B_s = b + s * b_step.
// A's element (i, k) is at A_s[i * lda + k] (row-major) or, with COLS, at A_s[k * lda + i] (dW's dY panel).
template <int MR, bool COLS>
LTHFAST_AVX2_FMA void micro(const float* a, const int64_t* a_cols, int64_t lda, const float* b, int64_t b_step,
                            int64_t ldb, int64_t s0, int64_t s1, int64_t kc, const float* init, float* c,
                            int64_t ldc) {
  __m256 lo[MR], hi[MR];
  const __m256 init_lo = init ? _mm256_loadu_ps(init) : _mm256_setzero_ps();
  const __m256 init_hi = init ? _mm256_loadu_ps(init + 8) : _mm256_setzero_ps();
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    lo[i] = init == c ? _mm256_loadu_ps(c + i * ldc) : init_lo;
    hi[i] = init == c ? _mm256_loadu_ps(c + i * ldc + 8) : init_hi;
  }
  for (int64_t s = s0; s < s1; ++s) {
    const float* ap = a_cols ? a + a_cols[s] : a;
    const float* bp = b + s * b_step;
    for (int64_t k = 0; k < kc; ++k) {
      const __m256 b_lo = _mm256_loadu_ps(bp + k * ldb);
      const __m256 b_hi = _mm256_loadu_ps(bp + k * ldb + 8);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m256 av = _mm256_broadcast_ss(COLS ? ap + k * lda + i : ap + i * lda + k);
        lo[i] = _mm256_fmadd_ps(av, b_lo, lo[i]);
        hi[i] = _mm256_fmadd_ps(av, b_hi, hi[i]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(c + i * ldc, lo[i]);
    _mm256_storeu_ps(c + i * ldc + 8, hi[i]);
  }
}

template <bool COLS>
void micro_rows(int mr, const float* a, const int64_t* a_cols, int64_t lda, const float* b, int64_t b_step,
                int64_t ldb, int64_t s0, int64_t s1, int64_t kc, const float* init, float* c, int64_t ldc) {
  switch (mr) {
    case 6: return micro<6, COLS>(a, a_cols, lda, b, b_step, ldb, s0, s1, kc, init, c, ldc);
    case 5: return micro<5, COLS>(a, a_cols, lda, b, b_step, ldb, s0, s1, kc, init, c, ldc);
    case 4: return micro<4, COLS>(a, a_cols, lda, b, b_step, ldb, s0, s1, kc, init, c, ldc);
    case 3: return micro<3, COLS>(a, a_cols, lda, b, b_step, ldb, s0, s1, kc, init, c, ldc);
    case 2: return micro<2, COLS>(a, a_cols, lda, b, b_step, ldb, s0, s1, kc, init, c, ldc);
    default: return micro<1, COLS>(a, a_cols, lda, b, b_step, ldb, s0, s1, kc, init, c, ldc);
  }
}

// dst[i][j] (ld) = keep[i][j] ? tile[i][j] : 0 for i < rows, j < cols; tile and keep are [b][b].
// Select, not multiply: a NaN or Inf of X / dY under a pruned entry must give an exact 0 there.
LTHFAST_AVX2_FMA void select_tile(const float* tile, const uint8_t* keep, int64_t b, float* dst, int64_t ld,
                                  int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    int64_t j = 0;
    if (cols == b) {
      for (; j < b; j += 8) {
        int64_t bytes;
        std::memcpy(&bytes, keep + i * b + j, 8);
        const __m256i on = _mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes)), _mm256_setzero_si256());
        const __m256 kept = _mm256_and_ps(_mm256_castsi256_ps(on), _mm256_loadu_ps(tile + i * b + j));
        _mm256_storeu_ps(dst + i * ld + j, kept);
      }
    }
    for (; j < cols; ++j) dst[i * ld + j] = keep[i * b + j] ? tile[i * b + j] : 0.0f;
  }
}
#endif  // LTHFAST_BLOCK_X86

}  // namespace

bool block_use_openmp(bool enabled) { return use_openmp(enabled); }

bool block_kernels_supported() {
#ifdef LTHFAST_BLOCK_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

#ifdef LTHFAST_BLOCK_X86

namespace {

// A buffer of at least `floats` floats: per calling thread and kept between calls up to kKeptScratch bytes (fresh
// 8 MB panels page-faulted on every dW call: ~4 ms of ~10 on the VM), freed with `owned` above that.
constexpr int64_t kKeptScratch = int64_t{64} << 20;
float* scratch(int64_t floats, std::unique_ptr<float[]>& owned) {
  if (floats * int64_t{sizeof(float)} > kKeptScratch) {
    owned.reset(new float[floats]);
    return owned.get();
  }
  thread_local std::unique_ptr<float[]> kept;
  thread_local int64_t size = 0;
  if (size < floats) {
    kept.reset();
    kept.reset(new float[floats]);
    size = floats;
  }
  return kept.get();
}

}  // namespace

void block_rows_product(const RowsProduct& p, int threads) {
  if (p.m <= 0 || p.groups <= 0) return;
  const int64_t b = p.block;
  const int64_t chunks = (p.m + kRowChunk - 1) / kRowChunk;
  // Items group-major: the threads share a group's tiles (~14 KB per tile row at 5% of 64 tiles: L1) and read
  // A in place, b columns per tile (no gathered copy).
  parallel_for(p.groups * chunks, threads, [&](int64_t item) {
    const int64_t g = item / chunks, r0 = (item % chunks) * kRowChunk, r1 = std::min(p.m, r0 + kRowChunk);
    const int64_t s0 = p.starts[g], s1 = p.starts[g + 1];
    for (int64_t i = r0; i < r1; i += kMr) {
      const int mr = static_cast<int>(std::min<int64_t>(kMr, r1 - i));
      for (int64_t h = 0; h < b; h += 16) {
        const float* init = p.bias ? p.bias + g * b + h : nullptr;
        micro_rows<false>(mr, p.a + i * p.lda, p.a_cols, p.lda, p.tiles + h, b * b, b, s0, s1, b, init,
                          p.c + i * p.ldc + g * b + h, p.ldc);
      }
    }
  });
}

void block_grad_weight(const GradWeight& p, int threads) {
  if (p.nnz <= 0 || p.m <= 0) return;  // dW stays zero: the caller's
  const int64_t b = p.block;
  // The reduction runs over m, down 32-column blocks of X and dY whose rows are a whole row apart (8 KB for
  // 2048 columns): every row maps to the same L1 set and few L2 sets. So both are read from contiguous
  // [m][32] panels: X's used blocks copied once up front (shared by the tile rows), dY's block copied by the
  // work item into a per-thread panel that stays in L2 (64 KB at m = 512, b = 32).
  const int64_t tk = *std::max_element(p.tile_cols, p.tile_cols + p.nnz) + 1;
  std::vector<int64_t> slot_of(tk, -1), x_blocks;
  for (int64_t t = 0; t < p.nnz; ++t) {
    if (slot_of[p.tile_cols[t]] < 0) {
      slot_of[p.tile_cols[t]] = static_cast<int64_t>(x_blocks.size());
      x_blocks.push_back(p.tile_cols[t]);
    }
  }
  const int64_t panel = p.m * b, nx = static_cast<int64_t>(x_blocks.size());
  std::unique_ptr<float[]> owned;
  float* x_panels = scratch(nx * panel, owned);
  // Row by row, so that X is read in order.
  const int64_t row_parts = std::min<int64_t>((p.m + 31) / 32, 8 * std::max(1, threads));
  parallel_for(row_parts, threads, [&](int64_t part) {
    for (int64_t r = p.m * part / row_parts; r < p.m * (part + 1) / row_parts; ++r)
      for (int64_t s = 0; s < nx; ++s)
        std::memcpy(x_panels + s * panel + r * b, p.x + r * p.ldx + x_blocks[s] * b, b * sizeof(float));
  });
  // Work items: runs of up to kTilesPerItem tiles of one tile row (tiles come sorted by tile row).
  std::vector<int64_t> item_start;
  for (int64_t t = 0; t < p.nnz; ++t)
    if (t == 0 || p.tile_rows[t] != p.tile_rows[t - 1] || t - item_start.back() == kTilesPerItem)
      item_start.push_back(t);
  item_start.push_back(p.nnz);
  parallel_for(static_cast<int64_t>(item_start.size()) - 1, threads, [&](int64_t item) {
    const int64_t tr = p.tile_rows[item_start[item]];
    thread_local std::vector<float> dy_panel, out_tile;
    dy_panel.resize(panel);
    out_tile.resize(b * b);
    for (int64_t r = 0; r < p.m; ++r)
      std::memcpy(dy_panel.data() + r * b, p.dy + r * p.ldy + tr * b, b * sizeof(float));
    for (int64_t t = item_start[item]; t < item_start[item + 1]; ++t) {
      const int64_t tc = p.tile_cols[t];
      const float* dy = dy_panel.data();  // [m][32]: A transposed (COLS)
      const float* x = x_panels + slot_of[tc] * panel;
      float* out = out_tile.data();
      for (int64_t k0 = 0; k0 < p.m; k0 += kGradChunk) {
        const int64_t kc = std::min(kGradChunk, p.m - k0);
        for (int64_t i = 0; i < b; i += kMr) {
          const int mr = static_cast<int>(std::min<int64_t>(kMr, b - i));
          for (int64_t h = 0; h < b; h += 16) {
            float* c = out + i * b + h;
            micro_rows<true>(mr, dy + k0 * b + i, nullptr, b, x + k0 * b + h, 0, b, 0, 1, kc, k0 ? c : nullptr, c,
                             b);
          }
        }
      }
      select_tile(out, p.keep + t * b * b, b, p.dw + tr * b * p.k + tc * b, p.k, std::min(b, p.n - tr * b),
                  std::min(b, p.k - tc * b));
    }
  });
}

#else  // no x86: block_kernels_supported() is false and the caller never gets here

void block_rows_product(const RowsProduct&, int) { throw std::runtime_error("lthfast._C: no block kernels here"); }
void block_grad_weight(const GradWeight&, int) { throw std::runtime_error("lthfast._C: no block kernels here"); }

#endif

}  // namespace lthfast
