"""Persistent, TMA-fed Triton kernels for the masked linear forward and dX: the GEMMs of ``masked_matmul``, with a
grid of about one wave of programs that each loop over output tiles, and their X / dY slabs and weight tiles fetched
by Hopper's tensor memory accelerator.

The math and the tile index are those of ``lthfast.kernels.masked_matmul``: Y = X (W ⊙ M)^T + b over the CSR
(``row_ptr`` / ``row_cols`` / ``row_mid``) and dX = dY (W ⊙ M) over the CSC (``col_ptr`` / ``col_rows`` / ``col_mid``)
of the alive weight tiles, full tiles first (no mask read), then partial ones (the mask applied with ``tl.where``, so a
NaN stored under a pruned weight never leaks). What changes is the schedule and the loads. A one-program-per-tile grid
launches tiles x m-blocks programs (8192 at Linear(4096, 4096), 8192 tokens, 128x32 output tiles) that the hardware
hands to SMs in whatever order they free up; here ``min(tiles, SMs x PROGRAMS_PER_SM)`` programs, all resident at once,
stride over the tiles in a fixed order that keeps the X slabs they share in L2, with no per-tile program launch. Each
tile's two inner loops are still pipelined on their own (the loads of a program's next tile start when its current tile
is stored), so the overlap across tiles comes from the other programs on the SM. A TMA load moves a whole [rows, cols]
block into shared memory with one instruction and no address arithmetic per thread, and reads zeros outside the tensor,
so the loops carry no bounds masks. TMA needs a 2-D tensor with unit last stride, 16-byte aligned base and row stride,
fp16 / bf16 / fp32, and an sm_90+ GPU; where X (dY) or W does not qualify (``tma_unsupported``), the same persistent
kernel runs with pointer loads (constexpr ``TMA`` off) rather than refusing: callers need not route, and the schedule is
kept for any layout. The mask of a partial tile is always a pointer load (uint8).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from lthfast.indexing.tiles import TileIndex, keep_if_capturing
from lthfast.kernels.autotune import Tuned, cdiv, density_class, offset_type, size_class
from lthfast.kernels.dw_split import full_tiles
from lthfast.kernels.masked_matmul import (
    ACC_PER_THREAD,
    INTERPRETER_TILE,
    MAX_BUFFERS,
    WIDE_TILE_WARPS,
    _check,
    _col_lists,
    _precision,
    _row_lists,
    forward_tile,
    grad_input_tile,
)

# The interpreter runs masked_matmul's 16-row tile and this many programs, so that each loops over several tiles.
INTERPRETER_PROGRAMS = 3
INTERPRETER_CONFIG = {"BLOCK_M": INTERPRETER_TILE, "PROGRAMS_PER_SM": 1}

# Launch configs on CUDA (BLOCK_M, programs per SM, warps, stages), timed once per key by Tuned; the first that
# ``_prune_configs`` keeps is what LTHFAST_AUTOTUNE=0 runs. PROGRAMS_PER_SM sizes the grid (SMs x it, at most one
# program per output tile): 1 for 128-wide weight tiles, whose buffers fill an SM (compiled offline for sm_90, bf16:
# 147 KB); 2-4 for narrower ones, where one program would leave the SM idle while it waits on its loads and stores
# (22-82 KB, 4-10 programs fit). Not yet timed on a GPU, so the tuner decides.
CUDA_CONFIGS = [
    {"BLOCK_M": bm, "PROGRAMS_PER_SM": p, "num_warps": w, "num_stages": s}
    for bm, p, w, s in ((128, 4, 4, 3), (128, 2, 4, 3), (128, 1, 8, 3), (64, 4, 4, 4), (256, 1, 8, 3), (128, 2, 4, 5))
]
# What the programs resident on one SM may fill: 228 KB of shared memory on sm_90 (1 KB of it reserved per program),
# and 16 warps' worth of registers at 128 per thread, what an accumulator of ACC_PER_THREAD values and the loop's
# addresses take (compiled offline for sm_90, bf16: 42-123 registers per thread at 4 warps, 44-170 at 8).
SM_SHARED = 228 * 1024
SM_WARPS = 16
# dtypes a TMA descriptor is built for here (what the kernels take)
TMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fits(c: dict, rows: int, per_stage: int, wide: bool) -> bool:
    """masked_matmul's rule (accumulator per thread, 8 warps for 128-wide tiles, buffers within MAX_BUFFERS), and
    PROGRAMS_PER_SM programs within one SM by shared memory and registers: the grid must be one wave, or a second
    wave's programs start only when the first wave's programs end, and the persistent loop gains nothing."""
    warps, buffers = c["num_warps"], (c["num_stages"] + 1) // 2 * per_stage
    programs = c["PROGRAMS_PER_SM"]
    return (
        rows <= ACC_PER_THREAD * 32 * warps and (not wide or warps >= WIDE_TILE_WARPS) and buffers <= MAX_BUFFERS
        and programs * (buffers + 1024) <= SM_SHARED and programs * warps <= SM_WARPS
    )  # fmt: skip


def _prune_configs(configs: list[dict], key: tuple) -> list[dict]:
    """Drop BLOCK_M larger than the (bucketed) token count, the key's first entry, and configs that do not fit
    (``_fits``; the key holds (tokens, N, K, BLOCK_N, BLOCK_K, density, dtype, ...)); keep at least one config. A
    stage is an X (dY) slab, a weight tile and its mask; the TMA pipeline keeps (stages + 1) // 2 of them, as the
    pointer loads of masked_matmul do (the tile index read first takes half the stages)."""
    m_bucket, block_n, block_k, dtype = key[0], key[3], key[4], key[6]

    def ok(c: dict) -> bool:
        rows = c["BLOCK_M"] * max(block_n, block_k)
        per_stage = rows * dtype.itemsize + block_n * block_k * (dtype.itemsize + 1)
        return c["BLOCK_M"] <= max(64, m_bucket) and _fits(c, rows, per_stage, max(block_n, block_k) >= 128)

    return [c for c in configs if ok(c)] or configs[:1]


@triton.jit
def _forward_persistent_kernel(
    # x, w: TMA descriptors where TMA, else pointers
    x, w, m_ptr, b_ptr, y_ptr,
    row_ptr, row_cols, row_mid,  # CSR over weight-tile rows: alive k-tiles of each n-tile, full ones first
    # sizes
    M, N, K, tiles_n,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_mn, stride_mk, stride_ym, stride_yn,
    # meta-parameters; PROGRAMS_PER_SM is the launcher's (it sizes the grid)
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, IDX: tl.constexpr,
    FULL_TILES: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr,
):  # fmt: skip
    """Y [M, N] = X [M, K] @ (W ⊙ M)^T [K, N] (+ b [N]): each program loops over the (BLOCK_M x BLOCK_N) output
    tiles pid, pid + programs, ...; every tile is written, bias only (or zeros) where its tile row has no alive
    tile. FULL_TILES: run the full tiles without the mask (off: every tile reads it; ``dw_split.full_tiles``)."""
    for t in range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tiles_n, tl.num_programs(0)):
        # n fastest: the programs in flight at once cover consecutive n-tiles of one or a few m-blocks, so they share
        # those X slabs in L2, and the sparse weight (read once per m-block) stays there too.
        forward_tile(x, w, m_ptr, b_ptr, y_ptr, row_ptr, row_cols, row_mid, (t // tiles_n) * BLOCK_M, t % tiles_n,
                     M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_mn, stride_mk, stride_ym, stride_yn,
                     HAS_BIAS, PRECISION, UPCAST, IDX, FULL_TILES, TMA, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip


@triton.jit
def _grad_input_persistent_kernel(
    # g, w: TMA descriptors where TMA, else pointers
    g, w, m_ptr, dx_ptr,
    col_ptr, col_rows, col_mid,  # CSC over weight-tile columns: alive n-tiles of each k-tile, full ones first
    # sizes
    M, N, K, tiles_k,
    # strides
    stride_gm, stride_gn, stride_wn, stride_wk, stride_mn, stride_mk, stride_xm, stride_xk,
    # meta-parameters; PROGRAMS_PER_SM is the launcher's (it sizes the grid)
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, IDX: tl.constexpr, FULL_TILES: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr,
):  # fmt: skip
    """dX [M, K] = dY [M, N] @ (W ⊙ M) [N, K]: each program loops over the (BLOCK_M x BLOCK_K) tiles of dX pid,
    pid + programs, ...; a tile whose column has no alive tile is written as zeros. FULL_TILES as in the forward."""
    for t in range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tiles_k, tl.num_programs(0)):
        # k fastest: the programs in flight share the dY slabs of one or a few m-blocks in L2 (as the forward's X)
        grad_input_tile(g, w, m_ptr, dx_ptr, col_ptr, col_rows, col_mid, (t // tiles_k) * BLOCK_M, t % tiles_k,
                        M, N, K, stride_gm, stride_gn, stride_wn, stride_wk, stride_mn, stride_mk, stride_xm,
                        stride_xk, PRECISION, UPCAST, IDX, FULL_TILES, TMA, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip


_forward = Tuned(_forward_persistent_kernel, CUDA_CONFIGS, prune=_prune_configs)
_grad_input = Tuned(_grad_input_persistent_kernel, CUDA_CONFIGS, prune=_prune_configs)


# ----------------------------------------------------------------------------------------------- launchers


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _tma_capable(device: torch.device) -> bool:
    """Whether the GPU has a tensor memory accelerator (sm_90 and later)."""
    return torch.cuda.get_device_capability(device)[0] >= 9


def tma_unsupported(t: torch.Tensor) -> str | None:
    """Why a TMA descriptor cannot address the 2-D tensor ``t`` (None when it can): its dtype, an empty or strided
    last dimension, or a base address or row stride that is not a multiple of 16 bytes."""
    if t.dtype not in TMA_DTYPES:
        return f"dtype {t.dtype}"
    if t.dim() != 2 or 0 in t.shape:
        return f"shape {tuple(t.shape)}"
    if t.stride(1) != 1:
        return f"last stride {t.stride(1)}, not 1"
    if t.data_ptr() % 16:
        return f"base address {t.data_ptr():#x} not 16-byte aligned"
    if t.stride(0) * t.element_size() % 16:
        return f"row stride of {t.stride(0) * t.element_size()} bytes, not a multiple of 16"
    return None


def _upcast(t: torch.Tensor) -> bool:
    """Dot operands upcast to fp32: bf16 in the interpreter (``masked_matmul._operand``)."""
    return _interpreted(t) and t.dtype == torch.bfloat16


def _use_tma(*tensors: torch.Tensor) -> bool:
    """TMA loads when the device has them (the interpreter emulates them) and every operand qualifies."""
    like = tensors[0]
    capable = _interpreted(like) or _tma_capable(like.device)
    return capable and all(tma_unsupported(t) is None for t in tensors)


def _descriptor(t: torch.Tensor, cols: int) -> TensorDescriptor:
    """A TMA descriptor over ``t``; its block's rows are set per launch config (the grid, ``_programs_grid``), its
    columns here. 16 rows until then: a placeholder that passes the descriptor's own checks."""
    return TensorDescriptor.from_tensor(t, [INTERPRETER_TILE, cols])


def _programs_grid(like: torch.Tensor, m: int, tiles_other: int, slab: TensorDescriptor | None, programs: int | None):
    """The launch grid of a config: ``programs`` when given (tests), else one program per output tile up to SMs x
    PROGRAMS_PER_SM (``INTERPRETER_PROGRAMS`` in the interpreter). Tuned evaluates it for each config right before
    launching (or compiling) with that config, so it also sets the X (dY) descriptor's block rows to the config's
    BLOCK_M, as triton.autotune's pre_hook would."""

    def grid(meta: dict) -> tuple[int]:
        if slab is not None:
            slab.block_shape = [meta["BLOCK_M"], slab.block_shape[1]]
        if programs is not None:
            return (programs,)
        tiles = cdiv(m, meta["BLOCK_M"]) * tiles_other
        if _interpreted(like):
            return (min(tiles, INTERPRETER_PROGRAMS),)
        return (min(tiles, _sm_count(like.device) * meta["PROGRAMS_PER_SM"]),)

    return grid


def _launch(tuned: Tuned, like: torch.Tensor, index: TileIndex, m: int, grid, *args, **constexprs):
    """Launch ``tuned`` with the config tuned for this key on CUDA, the interpreter's config elsewhere. A TMA
    descriptor reaches the kernel by value (a CUtensorMap among its parameters, which a CUDA graph copies when it
    captures the launch), so only the tile index, which the kernel reads through pointers, is kept for a graph."""
    if _interpreted(like):
        return tuned.launch(None, grid, *args, fixed=INTERPRETER_CONFIG, **constexprs)
    keep_if_capturing(like, index)
    # everything the best config depends on: token-count class, sizes, tiles, density class, dtype, constexprs
    key = (size_class(m), *index.shape, index.block_n, index.block_k, density_class(index.tile_density), like.dtype,
           *constexprs.values())  # fmt: skip
    return tuned.launch(key, grid, *args, **constexprs)


def persistent_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    index: TileIndex,
    programs: int | None = None,
) -> torch.Tensor:
    """Y [M, N] = x [M, K] (W ⊙ M)^T + bias, as ``masked_matmul.masked_linear_forward``: weight/mask [N, K]; bias [N]
    or None; ``index`` from ``masked_matmul.mask_tile_index(mask)``. Same device (CUDA, or CPU under
    TRITON_INTERPRET=1); returns x's dtype, a new contiguous tensor. ``programs``: the grid size (default: one wave,
    at most one program per output tile). TMA loads where x and weight allow (``tma_unsupported``), else pointer
    loads."""
    _check(index, weight.shape, x, weight, mask)
    m, k = x.shape
    n = weight.shape[0]
    bias = None if bias is None else bias.contiguous()  # the kernel reads it at unit stride (N values: no cost)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    full = full_tiles(x)
    row_cols, row_mid = _row_lists(index, mask, full)
    tma = _use_tma(x, weight)
    a = _descriptor(x, index.block_k) if tma else x
    b = TensorDescriptor.from_tensor(weight, [index.block_n, index.block_k]) if tma else weight
    grid = _programs_grid(x, m, index.tiles_n, a if tma else None, programs)
    _launch(
        _forward, x, index, m, grid,
        a, b, mask.view(torch.uint8), bias if bias is not None else y, y,
        index.row_ptr, row_cols, row_mid,
        m, n, k, index.tiles_n,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), mask.stride(0), mask.stride(1),
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype), UPCAST=_upcast(x),
        IDX=offset_type(x, y, weight, mask), FULL_TILES=full, TMA=tma, BLOCK_N=index.block_n, BLOCK_K=index.block_k,
    )  # fmt: skip
    return y


def persistent_linear_grad_input(
    grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, index: TileIndex, programs: int | None = None
) -> torch.Tensor:
    """dX [M, K] = grad [M, N] (W ⊙ M), as ``masked_matmul.masked_linear_grad_input``: weight/mask [N, K]. Returns
    grad's dtype, a new contiguous tensor. ``programs`` and TMA as in ``persistent_linear_forward``."""
    _check(index, weight.shape, grad, weight, mask)
    m, n = grad.shape
    k = weight.shape[1]
    dx = torch.empty((m, k), dtype=grad.dtype, device=grad.device)
    if m == 0 or k == 0:
        return dx
    full = full_tiles(grad)
    col_rows, col_mid = _col_lists(index, mask, full)
    tma = _use_tma(grad, weight)
    a = _descriptor(grad, index.block_n) if tma else grad
    b = TensorDescriptor.from_tensor(weight, [index.block_n, index.block_k]) if tma else weight
    grid = _programs_grid(grad, m, index.tiles_k, a if tma else None, programs)
    _launch(
        _grad_input, grad, index, m, grid,
        a, b, mask.view(torch.uint8), dx,
        index.col_ptr, col_rows, col_mid,
        m, n, k, index.tiles_k,
        grad.stride(0), grad.stride(1), weight.stride(0), weight.stride(1), mask.stride(0), mask.stride(1),
        dx.stride(0), dx.stride(1),
        PRECISION=_precision(grad.dtype), UPCAST=_upcast(grad), IDX=offset_type(grad, dx, weight, mask),
        FULL_TILES=full, TMA=tma, BLOCK_N=index.block_n, BLOCK_K=index.block_k,
    )  # fmt: skip
    return dx


__all__ = ["persistent_linear_forward", "persistent_linear_grad_input", "tma_unsupported"]
