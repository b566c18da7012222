"""Triton kernels for the three GEMMs of a masked linear layer, each skipping entirely-pruned weight tiles.

Weight W [N, K] is stored dense, mask M [N, K] is bool; X [M, K] and dY [M, N] are 2-D (callers flatten).
  forward  Y  = X (W ⊙ M)^T + b     per (m, n) output tile, loop over the alive k-tiles of n-tile row (CSR)
  dX       dX = dY (W ⊙ M)          per (m, k) output tile, loop over the alive n-tiles of k-tile column (CSC)
  dW       dW = (dY^T X) ⊙ M        per GROUP alive tiles of one k-tile column (an SDDMM over the column-ordered
                                    tile list) and M-split; the same launch zeroes the dead tiles
Each row's (column's) alive tiles come full ones first (``tile_index.full_partial``): a full tile, every entry
alive, runs with no mask load and no select, so a mask pruned in blocks of the tile size or coarser runs mask-free
loops; inside a partial tile the mask is applied elementwise with ``tl.where``, so a value stored under a pruned
entry (even NaN) never reaches the result. dW stores a program's tiles without reading the mask when all are
full. Accumulation is fp32; inputs fp32/fp16/bf16; fp32 uses IEEE products unless
``torch.backends.cuda.matmul.allow_tf32`` is set, matching torch's default numerics.

Tile granularity: the weight tile [BLOCK_N, BLOCK_K] is *fixed per call* and the tile index is built (and cached
on the mask by ``tile_index``) at that granularity; the autotuner only varies BLOCK_M, warps and stages. The
alternative, an index at a fixed fine granule walked by larger kernel tiles, skips nothing once a kernel tile
straddles one live granule: at 90% sparsity in 32x32 blocks a 64x64 tile is alive with p = 1 - 0.9^4 = 34%.
So ``pick_tile_shape`` chooses the coarsest candidate whose alive area (alive tiles x tile area) stays within
``TILE_AREA_SLACK`` of the finest candidate's, one index per candidate shape, each built once per mask version.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lthfast.indexing.tiles import (
    TileIndex,
    cached_on_mask,
    column_groups,
    dead_tiles,
    full_partial,
    group_full,
    keep_if_capturing,
    tile_index,
)
from lthfast.kernels import dw_split
from lthfast.kernels.autotune import Faster, Tuned, cdiv, density_class, offset_type, size_class
from lthfast.kernels.dw_split import finish_split, full_tiles, store_dw, zero_dead

# Weight-tile shapes (BLOCK_N, BLOCK_K) tried on CUDA, coarsest first. 32x32 is the smallest tile that still
# feeds the tensor cores with a K step of 32 (bf16 wgmma/mma need K >= 16). 128x128 serves masks pruned in 128x128
# blocks (and dense ones): a wider tile re-reads X and dY less often per flop (1/BLOCK_N + 1/BLOCK_M bytes per flop
# in bf16, lthfast.bench.floor), at one program per SM (compiled offline for sm_90: 147 KB of buffers).
CUDA_TILE_SHAPES = ((128, 128), (64, 64), (64, 32), (32, 32))
# A coarser tile is kept while its alive area is at most this much above the finest candidate's: the larger
# tile runs closer to peak per flop; the slack is an estimate until measured on an H100 (bench_masked_linear.py).
TILE_AREA_SLACK = 0.15
# The interpreter (CI on CPU) runs one small fixed config, so that odd shapes span several partial tiles.
INTERPRETER_TILE = 16
INTERPRETER_CONFIG = {"BLOCK_M": INTERPRETER_TILE}

# Launch configs on CUDA (BLOCK_M, warps, stages), timed once per key by lthfast.kernels.autotune.Tuned.
# The forward and dX loops load a tile index, then the tiles it names: Triton's pipeliner spreads that two-load chain
# over the stages, so the tiles are fetched only (stages - 1) // 2 iterations ahead (compiled offline for sm_90:
# two shared buffers at 3 or 4 stages, three at 5 or 6, four at 7 or 8). 5 and 7 stages are offered for latency-
# bound loops (few programs per SM); not yet timed on a GPU, so the tuner decides.
CUDA_CONFIGS = [
    {"BLOCK_M": bm, "num_warps": w, "num_stages": s}
    for bm, w, s in ((128, 4, 3), (64, 4, 3), (128, 8, 3), (256, 8, 3), (128, 4, 5), (64, 4, 7))
]


# dW programs take GROUP alive tiles of one k-tile column (one X slab for all of them; GROUP * BLOCK_N >= 64 rows
# also lets 32-wide tiles use Hopper's wgmma, compiled offline: benchmarks/compile_report.py). The tile list is padded
# per column to a multiple of DW_GROUP_ALIGN, so that every GROUP dividing it reads one column per program. GROUP 1
# (first: what LTHFAST_AUTOTUNE=0 runs) is what the H200 measured; the others are untimed on a GPU so far.
DW_GROUP_ALIGN = 4
DW_CONFIGS = [{**c, "GROUP": g} for g in (1, 2, 4) for c in CUDA_CONFIGS]
INTERPRETER_GROUP = 2  # CI's default: a grouped dW; tests pass group=1 and 4 too


# A config is kept while its accumulator holds at most this many fp32 values per thread, 128-wide weight tiles run
# on 8 warps or more, and its pipeline buffers fit in MAX_BUFFERS bytes of shared memory. Compiled offline for sm_90
# (bf16, 128x128 weight tiles): 255 registers per thread at 4 warps for BLOCK_M 64 and 128 (166-175 at 8 warps), and
# 229-246 KB of buffers at 5 and 7 stages (one program per SM, or none); the forward and dX loops keep
# (stages + 1) // 2 buffers of X (or dY), W and the mask, the dW loop ``stages`` buffers of dY and X.
ACC_PER_THREAD = 64
WIDE_TILE_WARPS = 8
MAX_BUFFERS = 200 * 1024


def _fits(c: dict, acc: int, per_stage: int, buffers: int, wide: bool) -> bool:
    warps = c["num_warps"]
    return (
        acc <= ACC_PER_THREAD * 32 * warps and (not wide or warps >= WIDE_TILE_WARPS)
        and buffers * per_stage <= MAX_BUFFERS
    )  # fmt: skip


def _prune_configs(configs: list[dict], key: tuple) -> list[dict]:
    """Drop BLOCK_M larger than the (bucketed) token count, the key's first entry, and configs whose accumulator or
    buffers do not fit (``_fits``; the key holds (tokens, N, K, BLOCK_N, BLOCK_K, density, dtype, ...)); keep at
    least one config."""
    m_bucket, block_n, block_k, dtype = key[0], key[3], key[4], key[6]

    def ok(c: dict) -> bool:
        rows = c["BLOCK_M"] * max(block_n, block_k)  # the forward's [M, N] or dX's [M, K] accumulator
        per_stage = rows * dtype.itemsize + block_n * block_k * (dtype.itemsize + 1)  # X or dY, W and the mask
        buffers = (c["num_stages"] + 1) // 2
        return c["BLOCK_M"] <= max(64, m_bucket) and _fits(c, rows, per_stage, buffers, max(block_n, block_k) >= 128)

    return [c for c in configs if ok(c)] or configs[:1]


# A grouped dW config is kept while its pipeline buffers (stages x BLOCK_M x (GROUP * BLOCK_N + BLOCK_K) elements) fit
# in this many bytes and its accumulator has at most 128 rows: compiled offline for sm_90 (bf16), the others need
# 147-490 KB of shared memory (1 program per SM, or none) or 254 registers per thread.
DW_GROUP_MAX_BUFFERS = 128 * 1024
DW_GROUP_MAX_ROWS = 128


def _prune_dw_configs(configs: list[dict], key: tuple) -> list[dict]:
    """``_prune_configs``, and grouped configs only where their buffers and accumulator stay small (the key holds
    (tokens, N, K, BLOCK_N, BLOCK_K, density, dtype, ...))."""
    block_n, block_k, dtype = key[3], key[4], key[6]

    def small(c: dict) -> bool:
        buffers = c["num_stages"] * c["BLOCK_M"] * (c["GROUP"] * block_n + block_k) * dtype.itemsize
        grouped_ok = buffers <= DW_GROUP_MAX_BUFFERS and c["GROUP"] * block_n <= DW_GROUP_MAX_ROWS
        per_stage = c["BLOCK_M"] * (c["GROUP"] * block_n + block_k) * dtype.itemsize
        fits = _fits(c, c["GROUP"] * block_n * block_k, per_stage, c["num_stages"], max(block_n, block_k) >= 128)
        return fits and (c["GROUP"] == 1 or grouped_ok) and c["BLOCK_M"] <= max(64, key[0])

    return [c for c in configs if small(c)] or configs[:1]


@triton.jit
def _operand(t, UPCAST: tl.constexpr):
    """A dot operand; upcast to fp32 only where ``UPCAST`` (the interpreter keeps bf16 as raw uint16 bits and
    its tl.dot multiplies those bits; fp32 products of bf16 values are exact, so the numerics are unchanged)."""
    if UPCAST:
        return t.to(tl.float32)
    return t


@triton.jit
def _block(a, off_r, off_c, R, C, stride_r, stride_c, TMA: tl.constexpr, IDX: tl.constexpr,
           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """The [BLOCK_R, BLOCK_C] block at (off_r, off_c) of an [R, C] tensor, zeros outside it: one TMA load through the
    descriptor ``a`` where ``TMA`` (the persistent kernels, lthfast.kernels.persistent), else masked pointer loads
    from ``a``, a pointer."""
    if TMA:
        return a.load([off_r, off_c])
    else:
        offs_r = off_r.to(IDX) + tl.arange(0, BLOCK_R)
        offs_c = off_c.to(IDX) + tl.arange(0, BLOCK_C)
        inside = (offs_r < R)[:, None] & (offs_c < C)[None, :]
        return tl.load(a + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c, mask=inside, other=0.0)


@triton.jit
def _weight(w, m_ptr, off_n, off_k, N, K, stride_wn, stride_wk, stride_mn, stride_mk, APPLY_MASK: tl.constexpr,
            TMA: tl.constexpr, IDX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """The weight tile [BLOCK_N, BLOCK_K] at (off_n, off_k), and W ⊙ M where ``APPLY_MASK`` (a partial tile: the
    mask is read, and a value stored under a pruned entry, even NaN, becomes 0)."""
    tile = _block(w, off_n, off_k, N, K, stride_wn, stride_wk, TMA, IDX, BLOCK_N, BLOCK_K)
    if APPLY_MASK:
        offs_n = off_n.to(IDX) + tl.arange(0, BLOCK_N)
        offs_k = off_k.to(IDX) + tl.arange(0, BLOCK_K)
        inside = (offs_n < N)[:, None] & (offs_k < K)[None, :]
        keep = tl.load(m_ptr + offs_n[:, None] * stride_mn + offs_k[None, :] * stride_mk, mask=inside, other=0)
        tile = tl.where(keep != 0, tile, tl.zeros_like(tile))
    return tile


@triton.jit
def _forward_step(
    acc, x, w, m_ptr, row_cols, i, off_m, off_n, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_mn, stride_mk,
    APPLY_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, IDX: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """acc += X [m-block, k-tile] @ (W ⊙ M)^T [k-tile, n-block] for the i-th k-tile of ``row_cols``."""
    off_k = tl.load(row_cols + i) * BLOCK_K
    a = _block(x, off_m, off_k, M, K, stride_xm, stride_xk, TMA, IDX, BLOCK_M, BLOCK_K)
    b = _weight(w, m_ptr, off_n, off_k, N, K, stride_wn, stride_wk, stride_mn, stride_mk, APPLY_MASK, TMA, IDX,
                BLOCK_N, BLOCK_K)  # fmt: skip
    return tl.dot(_operand(a, UPCAST), tl.trans(_operand(b, UPCAST)), acc, input_precision=PRECISION)


@triton.jit
def _grad_input_step(
    acc, g, w, m_ptr, col_rows, i, off_m, off_k, M, N, K,
    stride_gm, stride_gn, stride_wn, stride_wk, stride_mn, stride_mk,
    APPLY_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, IDX: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """acc += dY [m-block, n-tile] @ (W ⊙ M) [n-tile, k-block] for the i-th n-tile of ``col_rows``."""
    off_n = tl.load(col_rows + i) * BLOCK_N
    a = _block(g, off_m, off_n, M, N, stride_gm, stride_gn, TMA, IDX, BLOCK_M, BLOCK_N)
    b = _weight(w, m_ptr, off_n, off_k, N, K, stride_wn, stride_wk, stride_mn, stride_mk, APPLY_MASK, TMA, IDX,
                BLOCK_N, BLOCK_K)  # fmt: skip
    return tl.dot(_operand(a, UPCAST), _operand(b, UPCAST), acc, input_precision=PRECISION)


@triton.jit
def forward_tile(
    x, w, m_ptr, b_ptr, y_ptr, row_ptr, row_cols, row_mid, off_m, pid_n, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_mn, stride_mk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, IDX: tl.constexpr,
    FULL_TILES: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The output tile Y [off_m:+BLOCK_M, n-tile pid_n]: the row's full tiles with no mask load, then its partial
    ones with the mask applied (all partial unless FULL_TILES, see ``dw_split.full_tiles``), plus the bias; written
    even where the row has no alive tile. Shared by the one-program-per-tile kernel and the persistent one."""
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = tl.load(row_ptr + pid_n)
    mid = tl.load(row_mid + pid_n) if FULL_TILES else start
    end = tl.load(row_ptr + pid_n + 1)
    for i in range(start, mid):  # full tiles: no mask load, no select
        acc = _forward_step(acc, x, w, m_ptr, row_cols, i, off_m, off_n, M, N, K,
                            stride_xm, stride_xk, stride_wn, stride_wk, stride_mn, stride_mk,
                            False, PRECISION, UPCAST, IDX, TMA, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    for i in range(mid, end):  # partial tiles: the mask applied
        acc = _forward_step(acc, x, w, m_ptr, row_cols, i, off_m, off_n, M, N, K,
                            stride_xm, stride_xk, stride_wn, stride_wk, stride_mn, stride_mk,
                            True, PRECISION, UPCAST, IDX, TMA, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    offs_m = off_m.to(IDX) + tl.arange(0, BLOCK_M)
    offs_n = off_n.to(IDX) + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & in_n[None, :])


@triton.jit
def grad_input_tile(
    g, w, m_ptr, dx_ptr, col_ptr, col_rows, col_mid, off_m, pid_k, M, N, K,
    stride_gm, stride_gn, stride_wn, stride_wk, stride_mn, stride_mk, stride_xm, stride_xk,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, IDX: tl.constexpr, FULL_TILES: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The dX tile [off_m:+BLOCK_M, k-tile pid_k], as ``forward_tile`` over the column's alive n-tiles (zeros where it
    has none)."""
    off_k = pid_k * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    start = tl.load(col_ptr + pid_k)
    mid = tl.load(col_mid + pid_k) if FULL_TILES else start
    end = tl.load(col_ptr + pid_k + 1)
    for i in range(start, mid):  # full tiles: no mask load, no select
        acc = _grad_input_step(acc, g, w, m_ptr, col_rows, i, off_m, off_k, M, N, K,
                               stride_gm, stride_gn, stride_wn, stride_wk, stride_mn, stride_mk,
                               False, PRECISION, UPCAST, IDX, TMA, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    for i in range(mid, end):  # partial tiles: the mask applied
        acc = _grad_input_step(acc, g, w, m_ptr, col_rows, i, off_m, off_k, M, N, K,
                               stride_gm, stride_gn, stride_wn, stride_wk, stride_mn, stride_mk,
                               True, PRECISION, UPCAST, IDX, TMA, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    offs_m = off_m.to(IDX) + tl.arange(0, BLOCK_M)
    offs_k = off_k.to(IDX) + tl.arange(0, BLOCK_K)
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_k < K)[None, :])


@triton.jit
def _forward_kernel(
    # pointers
    x_ptr, w_ptr, m_ptr, b_ptr, y_ptr,
    row_ptr, row_cols, row_mid,  # CSR over weight-tile rows: alive k-tiles of each n-tile, full ones first
    # sizes
    M, N, K, tiles_n,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_mn, stride_mk, stride_ym, stride_yn,
    # meta-parameters
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, IDX: tl.constexpr,
    FULL_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Y [M, N] = X [M, K] @ (W ⊙ M)^T [K, N] (+ b [N]). One program per (BLOCK_M x BLOCK_N) output tile.
    FULL_TILES: run the full tiles without the mask (off: every tile reads it; see ``dw_split.full_tiles``)."""
    pid = tl.program_id(0).to(IDX)
    # n fastest: the programs in flight share one X row block, and the sparse weight stays in L2.
    pid_n = pid % tiles_n
    off_m = (pid // tiles_n) * BLOCK_M
    forward_tile(x_ptr, w_ptr, m_ptr, b_ptr, y_ptr, row_ptr, row_cols, row_mid, off_m, pid_n, M, N, K,
                 stride_xm, stride_xk, stride_wn, stride_wk, stride_mn, stride_mk, stride_ym, stride_yn,
                 HAS_BIAS, PRECISION, UPCAST, IDX, FULL_TILES, False, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip


@triton.jit
def _grad_input_kernel(
    # pointers
    g_ptr, w_ptr, m_ptr, dx_ptr,
    col_ptr, col_rows, col_mid,  # CSC over weight-tile columns: alive n-tiles of each k-tile, full ones first
    # sizes
    M, N, K, tiles_k,
    # strides
    stride_gm, stride_gn, stride_wn, stride_wk, stride_mn, stride_mk, stride_xm, stride_xk,
    # meta-parameters
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, IDX: tl.constexpr, FULL_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dX [M, K] = dY [M, N] @ (W ⊙ M) [N, K]. One program per (BLOCK_M x BLOCK_K) tile of dX; FULL_TILES as in
    the forward."""
    pid = tl.program_id(0).to(IDX)
    pid_k = pid % tiles_k
    off_m = (pid // tiles_k) * BLOCK_M
    grad_input_tile(g_ptr, w_ptr, m_ptr, dx_ptr, col_ptr, col_rows, col_mid, off_m, pid_k, M, N, K,
                    stride_gm, stride_gn, stride_wn, stride_wk, stride_mn, stride_mk, stride_xm, stride_xk,
                    PRECISION, UPCAST, IDX, FULL_TILES, False, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip


@triton.jit
def _grad_weight_kernel(
    # pointers; ws: fp32 workspace of the split partial sums, counters: int32 per program (both unused when DIRECT)
    g_ptr, x_ptr, m_ptr, dw_ptr, ws_ptr, counters,
    group_rows, group_cols,  # alive tiles by k-tile column, runs padded with row -1 (tile_index.column_groups)
    group_full,  # int8 per entry: 1 for a full tile or padding (tile_index.group_full)
    dead_rows, dead_cols,  # the tiles with no alive entry (tile_index.dead_tiles)
    # sizes: ENTRIES listed in group_rows (ENTRIES / GROUP alive programs), DEAD tiles, DEAD_PER zeroed per program
    M, N, K, M_PER_SPLIT, ENTRIES, DEAD, DEAD_PER,
    # strides
    stride_gm, stride_gn, stride_xm, stride_xk, stride_mn, stride_mk, stride_wn, stride_wk,
    # meta-parameters
    DIRECT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, IDX: tl.constexpr,
    FULL_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):  # fmt: skip
    """dW tiles = (dY^T [N, M] @ X [M, K]) ⊙ M for GROUP alive weight tiles of one k-tile column over one M-split
    (program_id 1), reduced in BLOCK_M steps: one X slab [BLOCK_M, BLOCK_K] serves the GROUP tiles, whose dY
    columns are gathered into one [BLOCK_M, GROUP * BLOCK_N] operand. DIRECT (one split): masked and stored into
    dW; else the last split to finish sums the splits' fp32 partials and stores (``dw_split.finish_split``).
    Programs past the alive ones store zeros into DEAD_PER dead tiles each (split 0 only)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    if pid >= ENTRIES // GROUP:
        if split == 0:
            zero_dead(dw_ptr, dead_rows, dead_cols, pid - ENTRIES // GROUP, DEAD_PER, DEAD, N, K, stride_wn, stride_wk,
                      0, 0, IDX, 1, 1, BLOCK_N, BLOCK_K)  # fmt: skip
        return
    first = pid * GROUP
    kt = tl.load(group_cols + first).to(IDX)
    lane = tl.arange(0, GROUP * BLOCK_N)
    nt = tl.load(group_rows + first + lane // BLOCK_N).to(IDX)  # -1: padding after the column's last tile
    offs_n = nt * BLOCK_N + lane % BLOCK_N
    offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
    in_n = (nt >= 0) & (offs_n < N)
    in_k = offs_k < K
    active = tl.load(group_rows + first) >= 0  # all padding: no loop, nothing to store
    m_lo = split * M_PER_SPLIT
    m_hi = tl.minimum(m_lo + M_PER_SPLIT, M)
    m_hi = tl.where(active, m_hi, m_lo)
    acc = tl.zeros((GROUP * BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(IDX)
        in_m = offs_m < m_hi
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=in_m[:, None] & in_n[None, :], other=0.0)  # fmt: skip
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=in_m[:, None] & in_k[None, :], other=0.0)  # fmt: skip
        acc = tl.dot(tl.trans(_operand(g, UPCAST)), _operand(x, UPCAST), acc, input_precision=PRECISION)
    full = tl.min(tl.load(group_full + first + tl.arange(0, GROUP)), axis=0) != 0  # all GROUP tiles full
    if DIRECT:
        store_dw(acc, full, m_ptr, dw_ptr, offs_n, offs_k, in_n, in_k, stride_mn, stride_mk, stride_wn, stride_wk,
                 FULL_TILES)  # fmt: skip
    elif active:
        finish_split(acc, ws_ptr, counters, pid, split, full, m_ptr, dw_ptr, offs_n, offs_k, in_n, in_k, stride_mn,
                     stride_mk, stride_wn, stride_wk, FULL_TILES, GROUP * BLOCK_N, BLOCK_K)  # fmt: skip


_forward = Tuned(_forward_kernel, CUDA_CONFIGS, prune=_prune_configs)
_grad_input = Tuned(_grad_input_kernel, CUDA_CONFIGS, prune=_prune_configs)
_grad_weight = Tuned(_grad_weight_kernel, DW_CONFIGS, prune=_prune_dw_configs)


# ----------------------------------------------------------------------------------------------- launchers


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: IEEE fp32 products unless torch allows TF32 (ignored for fp16/bf16 inputs)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _upcast(t: torch.Tensor) -> bool:
    return _interpreted(t) and t.dtype == torch.bfloat16


def choose_tile_shape(mask: torch.Tensor, shapes=CUDA_TILE_SHAPES, slack: float = TILE_AREA_SLACK) -> tuple[int, int]:
    """The first (coarsest) of ``shapes`` whose alive area (alive tiles x tile area) is within ``slack`` of the
    smallest alive area over ``shapes``. Builds (and caches) one tile index per shape. Any device."""
    areas = {(bn, bk): tile_index(mask, bn, bk).alive_tiles * bn * bk for bn, bk in shapes}
    floor = min(areas.values())
    return next(shape for shape in shapes if areas[shape] <= (1 + slack) * floor)


def pick_tile_shape(mask: torch.Tensor) -> tuple[int, int]:
    """The weight-tile shape (BLOCK_N, BLOCK_K) the kernels use for this mask: ``INTERPRETER_TILE`` square in
    the interpreter, ``choose_tile_shape`` over ``CUDA_TILE_SHAPES`` on CUDA."""
    if _interpreted(mask):
        return INTERPRETER_TILE, INTERPRETER_TILE
    return choose_tile_shape(mask)


def mask_tile_index(mask: torch.Tensor) -> TileIndex:
    """The (cached) tile index at the granularity ``pick_tile_shape`` chooses for this mask.

    One cache lookup per call (the ops call it once per kernel launch group): the choice itself, which looks up
    one index per candidate shape, is cached on the mask beside the indices and dropped with them.
    """
    if _interpreted(mask):
        return tile_index(mask, INTERPRETER_TILE, INTERPRETER_TILE)
    what = ("picked", CUDA_TILE_SHAPES, TILE_AREA_SLACK)
    return cached_on_mask(mask, what, lambda: tile_index(mask, *choose_tile_shape(mask)))


def _row_lists(index: TileIndex, mask: torch.Tensor, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_cols, row_mid) for the forward: the full / partial lists, or (in a capture) the index's own with no
    full tiles (row_mid = row_ptr: each row's full end is its start)."""
    if not full:
        return index.row_cols, index.row_ptr
    lists = full_partial(index, mask)
    return lists.row_cols, lists.row_mid


def _col_lists(index: TileIndex, mask: torch.Tensor, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(col_rows, col_mid) for dX, as ``_row_lists``."""
    if not full:
        return index.col_rows, index.col_ptr
    lists = full_partial(index, mask)
    return lists.col_rows, lists.col_mid


def _check(index: TileIndex, weight_shape: tuple[int, ...], *tensors: torch.Tensor) -> None:
    if index.shape != tuple(weight_shape):
        raise ValueError(f"masked_matmul: tile index for {index.shape} used with weight {tuple(weight_shape)}")
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"masked_matmul: tensors on {t.device} and {device}")


def _launch(tuned: Tuned, x_like: torch.Tensor, index: TileIndex, m: int, grid, *args, fixed=None, **constexprs):
    """Launch ``tuned`` with the config tuned for this key on CUDA, the interpreter's config elsewhere; ``fixed``
    (a config) launches with it, untimed, on either."""
    if _interpreted(x_like):
        return tuned.launch(None, grid, *args, fixed=fixed or INTERPRETER_CONFIG, **constexprs)
    keep_if_capturing(x_like, index)
    if fixed is not None:
        return tuned.launch(None, grid, *args, fixed=fixed, **constexprs)
    # everything the best config depends on: token-count class, sizes, tiles, density class, dtype, constexprs
    key = (size_class(m), *index.shape, index.block_n, index.block_k, density_class(index.tile_density), x_like.dtype,
           *constexprs.values())  # fmt: skip
    return tuned.launch(key, grid, *args, **constexprs)


# Forward and dX on CUDA: the one-program-per-tile kernels above or the persistent, TMA-fed ones of
# lthfast.kernels.persistent, whichever ran faster for the key (timed once, each after tuning its own configs);
# LTHFAST_PERSISTENT=0 / 1 forces one. The first (these) without timing in the interpreter and with tuning off: the
# kernels the H200 ran, which the CPU tests of the ops keep covering.
_VARIANTS = Faster("LTHFAST_PERSISTENT")


def _persistent():
    from lthfast.kernels import persistent  # it imports this module's helpers

    return persistent


def _variant(kind: str, like: torch.Tensor, index: TileIndex, runs) -> torch.Tensor:
    """The result of the launcher ``_VARIANTS`` picks among ``runs`` (classic, persistent) for this call's key."""
    timed = not _interpreted(like)
    key = None
    if timed:
        tma = _persistent()._use_tma(like)
        key = (kind, size_class(like.shape[0]), *index.shape, index.block_n, index.block_k,
               density_class(index.tile_density), like.dtype, tma)  # fmt: skip
    return runs[_VARIANTS.pick(key, runs, timed=timed)]()


def masked_linear_forward(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, index: TileIndex
) -> torch.Tensor:
    """Y [M, N] = x [M, K] (W ⊙ M)^T + bias. weight/mask [N, K]; bias [N] or None; ``index`` from
    ``mask_tile_index(mask)``. Same device (CUDA, or CPU under TRITON_INTERPRET=1); returns x's dtype."""
    runs = (
        lambda: _classic_forward(x, weight, mask, bias, index),
        lambda: _persistent().persistent_linear_forward(x, weight, mask, bias, index),
    )
    return _variant("forward" if bias is None else "forward+bias", x, index, runs)


def _classic_forward(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, index: TileIndex
) -> torch.Tensor:
    """``masked_linear_forward`` on the one-program-per-tile kernel."""
    _check(index, weight.shape, x, weight, mask)
    m, k = x.shape
    n = weight.shape[0]
    bias = None if bias is None else bias.contiguous()  # the kernel reads it at unit stride (N values: no cost)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    full = full_tiles(x)
    row_cols, row_mid = _row_lists(index, mask, full)
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * index.tiles_n,)
    _launch(
        _forward, x, index, m, grid,
        x, weight, mask.view(torch.uint8), bias if bias is not None else y, y,
        index.row_ptr, row_cols, row_mid,
        m, n, k, index.tiles_n,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), mask.stride(0), mask.stride(1),
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype), UPCAST=_upcast(x),
        IDX=offset_type(x, y, weight, mask), FULL_TILES=full, BLOCK_N=index.block_n, BLOCK_K=index.block_k,
    )  # fmt: skip
    return y


def masked_linear_grad_input(
    grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, index: TileIndex
) -> torch.Tensor:
    """dX [M, K] = grad [M, N] (W ⊙ M). weight/mask [N, K]. Returns grad's dtype, a new contiguous tensor."""
    runs = (
        lambda: _classic_grad_input(grad, weight, mask, index),
        lambda: _persistent().persistent_linear_grad_input(grad, weight, mask, index),
    )
    return _variant("dX", grad, index, runs)


def _classic_grad_input(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, index: TileIndex) -> torch.Tensor:
    """``masked_linear_grad_input`` on the one-program-per-tile kernel."""
    _check(index, weight.shape, grad, weight, mask)
    m, n = grad.shape
    k = weight.shape[1]
    dx = torch.empty((m, k), dtype=grad.dtype, device=grad.device)
    if m == 0 or k == 0:
        return dx
    full = full_tiles(grad)
    col_rows, col_mid = _col_lists(index, mask, full)
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * index.tiles_k,)
    _launch(
        _grad_input, grad, index, m, grid,
        grad, weight, mask.view(torch.uint8), dx,
        index.col_ptr, col_rows, col_mid,
        m, n, k, index.tiles_k,
        grad.stride(0), grad.stride(1), weight.stride(0), weight.stride(1), mask.stride(0), mask.stride(1),
        dx.stride(0), dx.stride(1),
        PRECISION=_precision(grad.dtype), UPCAST=_upcast(grad), IDX=offset_type(grad, dx, weight, mask),
        FULL_TILES=full, BLOCK_N=index.block_n, BLOCK_K=index.block_k,
    )  # fmt: skip
    return dx


def masked_linear_grad_weight(
    grad: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    index: TileIndex,
    split: int | None = None,
    group: int | None = None,
) -> torch.Tensor:
    """dW [N, K] = (grad [M, N]^T x [M, K]) ⊙ mask, exactly zero where the mask is False; x's dtype.

    One launch: dW is allocated uninitialized, its alive tiles are computed and its dead tiles (``dead_tiles``)
    zeroed by the same kernel (a mask with no alive tile, or no tokens: ``torch.zeros``, no kernel at all).
    ``split``: M-splits per program, finished inside the launch (``lthfast.kernels.dw_split``); default: enough
    programs for the GPU. ``group``: alive tiles of one column per program (1, 2 or 4); default: tuned on CUDA,
    ``INTERPRETER_GROUP`` in the interpreter.
    """
    _check(index, mask.shape, grad, x, mask)
    if group is not None and DW_GROUP_ALIGN % group:
        raise ValueError(f"masked_matmul: group must divide {DW_GROUP_ALIGN}, got {group}")
    m, n = grad.shape
    k = x.shape[1]
    if m == 0 or index.alive_tiles == 0:
        return torch.zeros((n, k), dtype=x.dtype, device=x.device)
    dw = torch.empty((n, k), dtype=x.dtype, device=x.device)
    rows, cols = column_groups(index, DW_GROUP_ALIGN)
    dead_rows, dead_cols = dead_tiles(index)
    dead = dead_rows.numel()
    dead_per = dw_split.dead_per_program(dead, x.device)
    full = full_tiles(x)
    flags = group_full(index, mask, DW_GROUP_ALIGN) if full else rows
    split = dw_split.split_count(m, index.alive_tiles, x.device) if split is None else split
    m_per_split = cdiv(m, split)
    split = cdiv(m, m_per_split)
    direct = split == 1
    entries = rows.numel()
    ws = dw if direct else dw_split.workspace(split, entries, index.block_n, index.block_k, x.device)
    counters = rows if direct else dw_split.counters(entries, x.device)
    grid = lambda meta: (entries // meta["GROUP"] + cdiv(dead, dead_per), split)
    if _interpreted(x):
        group = INTERPRETER_GROUP if group is None else group
        fixed = {**INTERPRETER_CONFIG, "GROUP": group}
    else:
        fixed = None if group is None else {**DW_CONFIGS[0], "GROUP": group}
    _launch(
        _grad_weight, x, index, m, grid,
        grad, x, mask.view(torch.uint8), dw, ws, counters, rows, cols, flags, dead_rows, dead_cols,
        m, n, k, m_per_split, entries, dead, dead_per,
        grad.stride(0), grad.stride(1), x.stride(0), x.stride(1), mask.stride(0), mask.stride(1),
        dw.stride(0), dw.stride(1),
        fixed=fixed,
        DIRECT=direct, PRECISION=_precision(x.dtype), UPCAST=_upcast(x), IDX=offset_type(grad, x, dw, mask),
        FULL_TILES=full, BLOCK_N=index.block_n, BLOCK_K=index.block_k,
    )  # fmt: skip
    return dw


def flops(m: int, index: TileIndex) -> int:
    """Multiply-add flops of one sparse GEMM over the alive tiles (for roofline reports)."""
    return 2 * m * index.alive_tiles * index.block_n * index.block_k


__all__ = [
    "masked_linear_forward",
    "masked_linear_grad_input",
    "masked_linear_grad_weight",
    "mask_tile_index",
    "pick_tile_shape",
    "choose_tile_shape",
    "flops",
]
