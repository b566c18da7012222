// Mask writes of a prune step (mask_update.cpp).
#pragma once

#include <cstdint>
#include <vector>

namespace lthfast {

struct MaskWrite {
  uint8_t* weight = nullptr;      // contiguous, n elements of esize bytes (2, 4 or 8)
  int esize = 4;
  uint8_t* buffer = nullptr;      // contiguous n bytes: receives the mask
  const uint8_t* mask = nullptr;  // contiguous n bytes, nonzero = alive
  int64_t n = 0;
};

// buffer[i] = mask[i] for every i, and weight[i] = +0.0 (all bits zero) where mask[i] == 0; returns the number of
// weights whose bits changed. Ranges of at least `grain` elements (up to kPartsPerThread per thread), at most
// `threads` threads.
int64_t write_masks(const std::vector<MaskWrite>& items, int threads, int64_t grain);

}  // namespace lthfast
