// Block-sparse fp32 products of the CPU masked linear (block_matmul.cpp), for lthfast/ops/linear_torch.py.
// Tiles are b x b with b a multiple of 16 (the plan's 32 or 64); every matrix is row-major fp32 with the leading
// dimension given (in elements).
#pragma once

#include <cstdint>

namespace lthfast {

// C[:, g*b : g*b+b] = init_g + sum over s in [starts[g], starts[g+1]) of A[:, a_cols[s] : +b] @ tiles[s]
// for every group g < groups: the forward (groups = tile rows, tiles = masked W tiles transposed, [k][n]) and
// dX (groups = tile columns, A = dY, tiles = masked W tiles, [n][k]). init_g = bias[g*b : +b], or 0 when
// bias is null. A: m rows, lda; tiles: [nnz][b][b] contiguous; C: m rows, ldc, b * groups columns written.
struct RowsProduct {
  int64_t block = 32;
  const float* a = nullptr;
  int64_t lda = 0;
  const float* tiles = nullptr;
  const int64_t* starts = nullptr;  // groups + 1 entries, non-decreasing
  const int64_t* a_cols = nullptr;  // one per tile: its first column of A
  int64_t groups = 0;
  const float* bias = nullptr;  // 32 * groups, or null
  float* c = nullptr;
  int64_t ldc = 0;
  int64_t m = 0;
};

// dW[r*b + i, c*b + j] = keep[t][i][j] ? sum_m dY[m, r*b + i] X[m, c*b + j] : 0 for the tiles t = (r, c) =
// (tile_rows[t], tile_cols[t]), sorted by tile row, cut at n rows and k columns; entries of dW outside those
// tiles are left as they are (the caller zeroes dW). dY: m rows, ldy >= b * (max tile row + 1); X: m rows,
// ldx likewise; keep: [nnz][b][b] bytes, the mask of each tile.
struct GradWeight {
  int64_t block = 32;
  const float* dy = nullptr;
  int64_t ldy = 0;
  const float* x = nullptr;
  int64_t ldx = 0;
  int64_t m = 0;
  const int64_t* tile_rows = nullptr;
  const int64_t* tile_cols = nullptr;
  int64_t nnz = 0;
  const uint8_t* keep = nullptr;
  int64_t n = 0, k = 0;
  float* dw = nullptr;  // n rows of k
};

// True when this CPU has AVX2 and FMA, which the kernels need (the caller uses its torch path otherwise).
bool block_kernels_supported();

// Run lthfast._C's threads (these kernels, the threshold, the mask writes: parallel.h) on the OpenMP team that
// torch loaded (true, the default; std::threads when there is none) or always on std::threads (false, for
// tests). Returns the previous setting.
bool block_use_openmp(bool enabled);

// Both run on up to `threads` threads (the caller's included) and assume valid arguments.
void block_rows_product(const RowsProduct& p, int threads);
void block_grad_weight(const GradWeight& p, int threads);

}  // namespace lthfast
