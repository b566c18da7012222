// Tile index of a CPU byte mask (tile_index.cpp), for lthfast/kernels/tile_index.py.
#pragma once

#include <cstdint>
#include <vector>

namespace lthfast {

struct TileIndexArrays {
  int64_t tiles_n = 0, tiles_k = 0;
  std::vector<uint8_t> alive;                 // tiles_n x tiles_k, 1 = the tile holds a nonzero entry
  std::vector<int32_t> row_ptr, col_ptr;      // CSR / CSC offsets: tiles_n + 1, tiles_k + 1
  std::vector<int32_t> tile_rows, tile_cols;  // alive tiles in row-major order (tile_cols is also CSR's list)
  std::vector<int32_t> col_rows;              // CSC: the alive tile rows of each tile column, ascending
  int64_t max_row_tiles = 0, max_col_tiles = 0;
  bool same = false;  // the tile map equals `previous` (build_tile_index): alive filled, the lists left empty
};

// mask: n rows of k bytes, row r at mask + r * row_stride (nonzero = alive). block_n, block_k >= 1.
// previous (may be null): the tiles_n x tiles_k byte map of an earlier index of the same geometry; when the new
// map equals it, the lists are not built (`same`): the caller keeps the earlier index.
TileIndexArrays build_tile_index(const uint8_t* mask, int64_t n, int64_t k, int64_t row_stride, int64_t block_n,
                                 int64_t block_k, const uint8_t* previous = nullptr);

}  // namespace lthfast
