// Unstructured sparse fp32 products of the CPU masked linear and conv (sparse_matmul.cpp), for
// lthfast/ops/sparse_cpu.py. Every product is vectorized over the batch: activations arrive "lanes last"
// (X^T [K][lanes] for a linear, [C][H][W][lanes] for a conv) with `lanes` a multiple of 16 (the caller pads with
// zeros), so one alive weight multiplies a whole vector of samples. The weight stays the dense [N][K] array (the
// Parameter's storage) and is read at its alive entries only, through the mask's CSR / CSC index.
#pragma once

#include <cstdint>

namespace lthfast {

constexpr int64_t kSparseLaneMultiple = 16;  // `lanes` (and every leading dimension below) is a multiple of this

// C[r][0:lanes] = init_r + sum over s in [ptr[r], ptr[r+1]) of w[r * w_outer + idx[s] * w_inner] * A[idx[s]][0:lanes]
// for r < rows, with init_r = bias[r] (or 0 when bias is null). The forward (A = X^T, idx = the CSR's columns,
// w_outer = K, w_inner = 1) and dX (A = dY^T, idx = the CSC's rows, w_outer = 1, w_inner = K).
struct SparseRows {
  const float* a = nullptr;
  int64_t lda = 0;
  int64_t rows = 0;
  const int64_t* ptr = nullptr;
  const int32_t* idx = nullptr;
  const float* w = nullptr;
  int64_t w_outer = 0, w_inner = 0;
  const float* bias = nullptr;
  float* c = nullptr;
  int64_t ldc = 0;
  int64_t lanes = 0;
};

// dW[r * ldw + idx[s]] = sum over l < lanes of dY^T[r][l] * X^T[idx[s]][l] for every alive entry s of row r (an
// SDDMM); other entries of dW are left as they are (the caller zeroes dW).
struct SparseGradWeight {
  const float* dy = nullptr;  // dY^T [rows][ldd]
  int64_t ldd = 0;
  const float* x = nullptr;  // X^T [K][ldx]
  int64_t ldx = 0;
  int64_t rows = 0;
  const int64_t* ptr = nullptr;
  const int32_t* idx = nullptr;
  float* dw = nullptr;
  int64_t ldw = 0;
  int64_t lanes = 0;
};

// A 2-D convolution in the lanes-last layout (lanes = the batch, padded), one group layout:
//   X  [Cin][H][W][lanes], zero-padded by the caller so that every tap of every output lies inside it;
//   Y  [Cout][OH][OW][lanes];  W [Cout][Cin/groups * kh * kw] (the weight's own layout, index over that view).
// Output (co, oh, ow) reads X[ci][oh * sh + i * dh][ow * sw + j * dw] for its alive taps (ci, i, j) of weight
// column q = (ci_local * kh + i) * kw + j, with ci = group(co) * cin_g + ci_local.
struct SparseConv {
  const float* x = nullptr;
  int64_t h = 0, w = 0;  // the padded input's spatial size
  float* y = nullptr;
  int64_t oh = 0, ow = 0;
  int64_t cout = 0, cin_g = 0, cout_g = 0;  // cout_g: output channels per group
  int64_t kh = 0, kw = 0, sh = 1, sw = 1, dh = 1, dw = 1;
  const int64_t* ptr = nullptr;  // CSR over the weight's [Cout][Cin/groups * kh * kw] view
  const int32_t* idx = nullptr;
  const float* weight = nullptr;
  const float* bias = nullptr;
  int64_t lanes = 0;
};

// dX of SparseConv: dX [Cin][H][W][lanes] (padded like X; the caller zeroes it and crops the padding) +=
// w * dY[co][oh][ow] at every (oh, ow) for every alive tap, through the CSC over the weight's view (ptr, idx: for
// weight column q, its alive output channels), run over input channels so that writes never race.
// dW of SparseConv: dW[co][q] = sum over (oh, ow, lanes) of dY[co][oh][ow] * X[ci][oh*sh + i*dh][ow*sw + j*dw]
// at alive (co, q) (CSR), other entries untouched.

// Layout changes between torch tensors (any strides, float32) and the lanes-last buffers, with zero padding.
// to_lanes: dst [C][H + top + bottom][W + left + right][lanes] from src[b, c, h, w] (strides sb, sc, sh, sw),
// b < B <= lanes, every other entry of dst (padding, lanes past B) zero. A linear's X [M, K] is B = M, C = K, H = W = 1.
struct LanesLayout {
  int64_t b = 0, c = 0, h = 0, w = 0;
  int64_t sb = 0, sc = 0, sh = 0, sw = 0;  // the torch tensor's strides, in elements
  int64_t top = 0, bottom = 0, left = 0, right = 0;
  int64_t lanes = 0;
};
void to_lanes(const LanesLayout& l, const float* src, float* dst, int threads);
// from_lanes: dst[b, c, h, w] (strides as given) = src[c][h + top][w + left][b] for the b, c, h, w of `l`, where src
// is [C][H + top + bottom][W + left + right][lanes] (a crop of the padded buffer: a conv's dX).
void from_lanes(const LanesLayout& l, const float* src, float* dst, int threads);

// A whole masked linear on torch tensors: X [m, k] (strides sx0, sx1), W [n, k] contiguous, the mask's CSR
// (row_ptr, cols) and CSC (col_ptr, col_rows). The lanes buffers live in per-thread scratch that is reused from
// call to call (no allocation or page faults per step).
struct SparseLinear {
  const float* x = nullptr;
  int64_t sx0 = 0, sx1 = 0;
  int64_t m = 0, n = 0, k = 0;
  const float* w = nullptr;
  const int64_t* row_ptr = nullptr;
  const int32_t* cols = nullptr;
  const int64_t* col_ptr = nullptr;
  const int32_t* col_rows = nullptr;
};
// Y [m, n] contiguous = X (W ⊙ M)^T + bias (bias may be null).
void sparse_linear_forward(const SparseLinear& p, const float* bias, float* y, int threads);
// dX [m, k] contiguous (null: not wanted), dW [n, k] contiguous, zero where pruned (null: not wanted), and the
// bias gradient db [n] = sum of dY over its m rows (null: not wanted), from dY [m, n] (strides sg0, sg1).
void sparse_linear_backward(const SparseLinear& p, const float* g, int64_t sg0, int64_t sg1, float* dx, float* dw,
                            float* db, int threads);

bool sparse_vector_isa(int* width);  // the lanes per vector of the kernels chosen at run time (4 scalar, 8, 16)
int sparse_force_isa(int width);      // 0: auto; 4 / 8 / 16 force (tests); returns the previous setting

void sparse_rows(const SparseRows& p, int threads);
void sparse_grad_weight(const SparseGradWeight& p, int threads);
void sparse_conv_forward(const SparseConv& p, int threads);
void sparse_conv_grad_input(const SparseConv& p, float* dx, int threads);  // p.x unused; p.y = dY; csc in ptr/idx
void sparse_conv_grad_weight(const SparseConv& p, const float* dy, float* dw, int threads);  // p.y unused

}  // namespace lthfast
