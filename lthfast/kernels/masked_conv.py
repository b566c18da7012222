"""Masked conv2d as implicit GEMM in Triton: forward, dX, and dW restricted to the alive weight tiles.

The weight [N=Cout, C=Cin, KH, KW] is the GEMM matrix [N, C*KH*KW] in its own (c, kh, kw) order. A weight tile
is BLOCK_N output channels x BLOCK_C input channels x all KH*KW taps, i.e. the [BLOCK_N, BLOCK_C*KH*KW] tiles of
``tile_index(mask.view(N, -1), BLOCK_N, BLOCK_C*KH*KW)``: the kernels loop over the alive tiles of that cached
index only, and inside a tile over the taps, gathering a [BLOCK_M, BLOCK_C] slab of the input per tap (no im2col
is materialized). Forward and dX read W ⊙ M, made by the launcher (one elementwise pass over the small weight,
into channels_last), so a pruned weight contributes exact zeros even inside an alive tile and their loops read no
mask; dW applies the mask at its store, except on full tiles (every entry alive: ``tile_index.tile_full_flags``).

  forward  Y[m, n]  = sum_k Xcol[m, k] (W*M)[n, k]   grid: M-tiles x N-tiles, loop over the CSR row of the N-tile
  dX       dX[b, c, h, w] = sum_{n, tap} dY[b, n, p, q] (W*M)[n, c, tap] where h = p*stride - pad + r*dil:
           the transposed implicit GEMM in gather form (no atomics); grid: input-pixel tiles x C-blocks, loop over
           the CSC column of the C-block
  dW       (dY^T Xcol) * M on the alive tiles only (an SDDMM over the COO tile list), one program per
           (alive tile, tap, M-split); the last split of a tile to finish sums the splits' partials, and extra
           programs zero the dead tiles, all in one launch (lthfast.kernels.dw_split, shared with the linear dW).

Forward and dX come in two schedules with the same per-tile body (``_conv_fwd_tile`` / ``_conv_dx_tile``): one program
per output tile, or persistent (``persistent_conv2d_forward`` / ``persistent_conv2d_grad_input``): min(output tiles,
SMs x PROGRAMS_PER_SM) programs, each looping over tiles pid, pid + programs, ... with the channel tile fastest, so
the programs in flight share one or a few input (dY) slabs in L2. ``conv2d_forward`` / ``conv2d_grad_input`` pick
one per key (``_VARIANTS``: timed once on CUDA, ``LTHFAST_PERSISTENT=0 / 1`` forces one). Unlike the persistent
linear kernels (``lthfast.kernels.persistent``), these load by pointer only, no TMA: Triton's tensor descriptors
have no im2col mode, and a tap's [BLOCK_M, BLOCK_C] input slab is a gather of pixels shifted by the tap, with
zeros for the padding (and for dX, only the pixels a strided tap reaches), which no tiled box describes.

Inputs may be NCHW or channels_last (all strides are passed). float32/float16/bfloat16 in, fp32 accumulation.
Launchers check nothing beyond what the ops layer (``lthfast.ops.conv``) already validated.
"""

from __future__ import annotations

import functools
import weakref

import torch
import triton
import triton.language as tl

from lthfast import _backend
from lthfast.indexing.tiles import (
    TileIndex,
    contents_stamp,
    dead_tiles,
    keep_if_capturing,
    tile_full_flags,
    tile_index,
)
from lthfast.kernels import dw_split
from lthfast.kernels.autotune import Faster, Tuned, cdiv, density_class, offset_type, size_class
from lthfast.kernels.dw_split import finish_split, full_tiles, store_dw, tile_tap, zero_dead
from lthfast.reference import SAME_WIDTH_INT

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Interpreter tiles: the smallest tl.dot accepts, so CI runs few and cheap loop iterations.
INTERPRETER_TILE = (16, 16, 16)  # (BLOCK_M, BLOCK_N, BLOCK_C)


def conv_tiles(device: torch.device) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_C) of the weight tiles on ``device``: the tile index granularity (skipping unit)."""
    if device.type == "cuda" and not _backend.interpreter_enabled():
        # 64 x 32 keeps a wgmma-sized N while an 8-channel-aligned C-block stays small; not yet tuned on a GPU.
        return 64, 32
    return INTERPRETER_TILE[1], INTERPRETER_TILE[2]


# (id(mask), memory format) -> (weakref to mask, contents_stamp(mask), copy). The tile index needs a contiguous mask (a
# [N, C*KH*KW] view); a channels_last mask's copy is kept until the mask is edited in place or freed, so that
# neither the copy nor the index (a host sync) is rebuilt every step.
_copies: dict[tuple[int, str], tuple[weakref.ref, tuple[int, int], torch.Tensor]] = {}


def mask_as(mask: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``mask`` (bool [N, C, KH, KW]) in ``memory_format``: itself if already so, else a cached copy."""
    if mask.is_contiguous(memory_format=memory_format):
        return mask
    if mask.is_inference() or torch._C._functorch.is_functorch_wrapped_tensor(mask):
        return mask.contiguous(memory_format=memory_format)
    key = (id(mask), str(memory_format))
    entry = _copies.get(key)
    stamp = contents_stamp(mask)
    if entry is None or entry[0]() is not mask or entry[1] != stamp:
        copy = mask.contiguous(memory_format=memory_format)
        entry = (weakref.ref(mask, lambda _ref, key=key: _copies.pop(key, None)), stamp, copy)
        _copies[key] = entry
    return entry[2]


def conv_tile_index(mask: torch.Tensor) -> TileIndex:
    """The cached tile index of a conv mask [N, C, KH, KW] (bool) at the kernels' tile size on its device."""
    block_n, block_c = conv_tiles(mask.device)
    n, _, kh, kw = mask.shape
    return tile_index(mask_as(mask, torch.contiguous_format).view(n, -1), block_n, block_c * kh * kw)


def _masked_channels_last(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """W ⊙ M as a new channels_last tensor, exact zeros where the mask is False (the integer multiply of
    ``lthfast.reference.masked_weight``), for the forward and dX kernels.

    channels_last: the kernels read [BLOCK_C]-long runs of one (n, tap), contiguous in that layout and 9 elements
    apart in a 3x3 NCHW weight (compiled offline for sm_90, bf16: 42 scalar global loads per forward step with an
    NCHW weight, 10 with a channels_last one). Pre-masked: the kernels load no mask and select nothing per element
    (1 -> 0 mask loads and ~100 fewer SASS instructions per forward step). One elementwise pass over the weight per
    call, which the layout copy cost before; made from the live weight and mask, so a CUDA graph replays it exact
    after an in-place prune.
    """
    out = torch.empty_like(weight, memory_format=torch.channels_last, requires_grad=False)
    ints = SAME_WIDTH_INT[weight.dtype]
    with torch.no_grad():  # the kernels are not differentiable; a caller's weight may still require grad
        torch.mul(weight.detach().view(ints), mask, out=out.view(ints))
    return out


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 convolutions follow torch's own rule for cuDNN (``torch.backends.cudnn.allow_tf32``); the interpreter
    # computes in numpy at full precision either way.
    if dtype == torch.float32 and not _backend.interpreter_enabled() and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _dot_fp32(dtype: torch.dtype) -> bool:
    # Triton's interpreter multiplies the raw bit patterns of bfloat16 dot operands (triton-lang/triton#11584,
    # unsupported upstream); bf16 x bf16 products are exact in fp32, so upcasting there changes nothing else.
    return dtype == torch.bfloat16 and _backend.interpreter_enabled()


# Launch configs on CUDA (BLOCK_M, warps, stages), timed once per key by lthfast.kernels.autotune.Tuned; the
# interpreter runs INTERPRETER_TILE's BLOCK_M and times nothing. Deeper stages for the forward and dX loops, whose
# tiles come (stages - 1) // 2 iterations ahead: see lthfast.kernels.masked_matmul.CUDA_CONFIGS.
CUDA_CONFIGS = [
    {"BLOCK_M": bm, "num_warps": w, "num_stages": s}
    for bm, w, s in ((128, 4, 3), (64, 4, 3), (128, 8, 3), (128, 4, 4), (64, 4, 2), (128, 4, 5), (64, 4, 7))
]
INTERPRETER_CONFIG = {"BLOCK_M": INTERPRETER_TILE[0]}


# The persistent forward and dX: (BLOCK_M, programs per SM, warps, stages). PROGRAMS_PER_SM sizes the grid (SMs x it,
# at most one program per output tile); a 64-wide weight tile's accumulator and 2-3 stages of [BLOCK_M, 32] slabs
# leave room for 2-4 programs per SM, and a lone program per SM would idle while it waits on its gathers. Not yet
# timed on a GPU: the tuner decides, the first is what LTHFAST_AUTOTUNE=0 runs.
CUDA_PERSISTENT_CONFIGS = [
    {"BLOCK_M": bm, "PROGRAMS_PER_SM": programs, "num_warps": w, "num_stages": s}
    for bm, programs, w, s in ((128, 2, 4, 3), (128, 3, 4, 3), (64, 4, 4, 3), (128, 2, 8, 3), (128, 2, 4, 4),
                               (128, 1, 8, 4), (64, 4, 4, 5))
]  # fmt: skip
# The interpreter runs this many persistent programs, so that each loops over several tiles.
INTERPRETER_PROGRAMS = 3
INTERPRETER_PERSISTENT_CONFIG = {**INTERPRETER_CONFIG, "PROGRAMS_PER_SM": 1}


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch(tuned: Tuned, x_like: torch.Tensor, index: TileIndex, key: tuple, grid, *args, **constexprs):
    """Launch ``tuned`` with the config tuned for ``key`` (plus dtype and constexprs) on CUDA, the interpreter's
    config elsewhere. A CUDA graph capturing the launch keeps ``index`` alive (``keep_if_capturing``)."""
    if _backend.interpreter_enabled():
        fixed = INTERPRETER_PERSISTENT_CONFIG if tuned in (_fwd_persistent, _dx_persistent) else INTERPRETER_CONFIG
        return tuned.launch(None, grid, *args, fixed=fixed, **constexprs)
    keep_if_capturing(x_like, index)
    return tuned.launch((*key, x_like.dtype, *constexprs.values()), grid, *args, **constexprs)


def _grid(persistent: bool, like: torch.Tensor, m: int, tiles_other: int, programs: int | None = None):
    """The launch grid of a config over ``m`` rows (output or input pixels) x ``tiles_other`` channel tiles: one
    program per tile, or for the persistent kernels ``programs`` when given (tests), else one per tile up to SMs x
    PROGRAMS_PER_SM (``INTERPRETER_PROGRAMS`` in the interpreter)."""

    def grid(meta: dict) -> tuple[int]:
        tiles = cdiv(m, meta["BLOCK_M"]) * tiles_other
        if not persistent:
            return (tiles,)
        if programs is not None:
            return (programs,)
        if _backend.interpreter_enabled():
            return (min(tiles, INTERPRETER_PROGRAMS),)
        return (min(tiles, _sm_count(like.device) * meta["PROGRAMS_PER_SM"]),)

    return grid


@triton.jit
def _conv_fwd_tile(
    x_ptr, w_ptr, b_ptr, y_ptr, row_ptr, row_cols, pid_m, pid_n,
    B, C, H, W, N, P, Q,
    sxb, sxc, sxh, sxw, swn, swc, swh, sww, syb, syn, syp, syq,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Output tile (pid_m, pid_n) of y: the loop over the CSR row of N-tile pid_n, bias, store (both kernels' body)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < B * P * Q
    n_ok = offs_n < N
    q = offs_m % Q
    p = (offs_m // Q) % P
    b = offs_m // (P * Q)
    ih0 = p * stride_h - pad_h
    iw0 = q * stride_w - pad_w
    # a row's input offset for tap (r, s) is its tap-(0, 0) offset plus a scalar: one vector add per step
    x_base = b.to(tl.int64) * sxb + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    lo = tl.load(row_ptr + pid_n)
    hi = tl.load(row_ptr + pid_n + 1)
    for i in range(lo * (KH * KW), hi * (KH * KW)):
        offs_c = tl.load(row_cols + i // (KH * KW)) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        r = (i % (KH * KW)) // KW
        s = i % KW
        ih = ih0 + r * dil_h
        iw = iw0 + s * dil_w
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_off = x_base + ((r * dil_h).to(tl.int64) * sxh + (s * dil_w).to(tl.int64) * sxw)
        a = tl.load(x_ptr + x_off[:, None] + offs_c[None, :].to(tl.int64) * sxc,
                    mask=pix_ok[:, None] & c_ok[None, :], other=0.0)  # fmt: skip
        wc_ok = c_ok[:, None] & n_ok[None, :]
        w = tl.load(w_ptr + offs_c[:, None] * swc + offs_n[None, :] * swn + r * swh + s * sww, mask=wc_ok, other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_off = b.to(tl.int64) * syb + p.to(tl.int64) * syp + q.to(tl.int64) * syq
    y_ptrs = y_ptr + y_off[:, None] + offs_n[None, :].to(tl.int64) * syn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv_fwd_kernel(
    # pointers: input, W ⊙ M, bias, output; CSR of the tile index (alive C-blocks of each N-tile)
    x_ptr, w_ptr, b_ptr, y_ptr, row_ptr, row_cols,
    # sizes: batch, in channels, input H, W, out channels, output H (P), W (Q)
    B, C, H, W, N, P, Q,
    # strides (elements) of x [B, C, H, W], W ⊙ M [N, C, KH, KW], y [B, N, P, Q]
    sxb, sxc, sxh, sxw, swn, swc, swh, sww, syb, syn, syp, syq,
    # convolution: stride, top/left padding, dilation
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """y[B, N, P, Q] = conv2d(x, W*M) + bias over the alive tiles of each N-tile: one program per output tile."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_n = pid % num_n  # neighbouring programs share an M-tile, so its input slab is reused from L2
    pid_m = pid // num_n
    _conv_fwd_tile(x_ptr, w_ptr, b_ptr, y_ptr, row_ptr, row_cols, pid_m, pid_n, B, C, H, W, N, P, Q,
                   sxb, sxc, sxh, sxw, swn, swc, swh, sww, syb, syn, syp, syq,
                   stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                   KH, KW, HAS_BIAS, INPUT_PRECISION, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_C)  # fmt: skip


@triton.jit
def _conv_fwd_persistent_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, row_ptr, row_cols,
    B, C, H, W, N, P, Q,
    sxb, sxc, sxh, sxw, swn, swc, swh, sww, syb, syn, syp, syq,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr,
):  # fmt: skip
    """``_conv_fwd_kernel``'s output tiles (arguments as there), each program looping over tiles pid, pid + programs,
    ...: N fastest, so the programs in flight cover consecutive N-tiles of one or a few M-tiles and share those input
    slabs in L2. PROGRAMS_PER_SM is the launcher's (it sizes the grid)."""
    num_n = tl.cdiv(N, BLOCK_N)
    for t in range(tl.program_id(0), tl.cdiv(B * P * Q, BLOCK_M) * num_n, tl.num_programs(0)):
        _conv_fwd_tile(x_ptr, w_ptr, b_ptr, y_ptr, row_ptr, row_cols, t // num_n, t % num_n, B, C, H, W, N, P, Q,
                       sxb, sxc, sxh, sxw, swn, swc, swh, sww, syb, syn, syp, syq,
                       stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                       KH, KW, HAS_BIAS, INPUT_PRECISION, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_C)  # fmt: skip


@triton.jit
def _conv_dx_tile(
    dy_ptr, w_ptr, dx_ptr, col_ptr, col_rows, pid_m, pid_c,
    B, C, H, W, N, P, Q,
    sdb, sdn, sdp, sdq, swn, swc, swh, sww, sxb, sxc, sxh, sxw,
    stride_h: tl.constexpr, stride_w: tl.constexpr, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    IDX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Tile (pid_m, pid_c) of dx: the loop over the CSC column of C-block pid_c, store (both kernels' body)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_ok = offs_m < B * H * W
    c_ok = offs_c < C
    iw = offs_m % W
    ih = (offs_m // W) % H
    b = offs_m // (H * W)
    dy_row = b.to(IDX) * sdb
    if stride_h == 1 and stride_w == 1:  # dY's offset for tap (r, s) is the row's tap-(0, 0) offset minus a scalar
        dy_base = dy_row + (ih + pad_h).to(IDX) * sdp + (iw + pad_w).to(IDX) * sdq
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    lo = tl.load(col_ptr + pid_c)
    hi = tl.load(col_ptr + pid_c + 1)
    for i in range(lo * (KH * KW), hi * (KH * KW)):
        offs_n = tl.load(col_rows + i // (KH * KW)) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        r = (i % (KH * KW)) // KW
        s = i % KW
        hp = ih + pad_h - r * dil_h  # = p * stride_h for the output row p that reads input row ih through tap r
        wq = iw + pad_w - s * dil_w
        p = hp // stride_h
        q = wq // stride_w
        pix_ok = m_ok & (hp >= 0) & (wq >= 0) & (p * stride_h == hp) & (q * stride_w == wq) & (p < P) & (q < Q)
        if stride_h == 1 and stride_w == 1:
            dy_off = dy_base - ((r * dil_h).to(IDX) * sdp + (s * dil_w).to(IDX) * sdq)
        else:
            dy_off = dy_row + p.to(IDX) * sdp + q.to(IDX) * sdq
        g = tl.load(dy_ptr + dy_off[:, None] + offs_n[None, :].to(IDX) * sdn,
                    mask=pix_ok[:, None] & n_ok[None, :], other=0.0)  # fmt: skip
        wn_ok = n_ok[:, None] & c_ok[None, :]
        w = tl.load(w_ptr + offs_n[:, None] * swn + offs_c[None, :] * swc + r * swh + s * sww, mask=wn_ok, other=0.0)
        if DOT_FP32:
            g = g.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=INPUT_PRECISION)
    dx_off = b.to(IDX) * sxb + ih.to(IDX) * sxh + iw.to(IDX) * sxw
    dx_ptrs = dx_ptr + dx_off[:, None] + offs_c[None, :].to(IDX) * sxc
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def _conv_dx_kernel(
    # pointers: output gradient, W ⊙ M, input gradient; CSC of the tile index (alive N-tiles of a C-block)
    dy_ptr, w_ptr, dx_ptr, col_ptr, col_rows,
    B, C, H, W, N, P, Q,
    # strides of dy [B, N, P, Q], W ⊙ M, dx [B, C, H, W]
    sdb, sdn, sdp, sdq, swn, swc, swh, sww, sxb, sxc, sxh, sxw,
    # the strides divide every pixel of every step: as constants, a stride of 2 is a shift (compiled offline for
    # sm_90, bf16, 3x3 stride 2: 486 SASS instructions per step, 854 with the strides as runtime values)
    stride_h: tl.constexpr, stride_w: tl.constexpr, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    IDX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dx[B, C, H, W]: each program gathers, for its input pixels and C-block, every (n, tap) that reads them."""
    pid = tl.program_id(0)
    num_c = tl.cdiv(C, BLOCK_C)
    pid_c = pid % num_c
    pid_m = pid // num_c
    _conv_dx_tile(dy_ptr, w_ptr, dx_ptr, col_ptr, col_rows, pid_m, pid_c, B, C, H, W, N, P, Q,
                  sdb, sdn, sdp, sdq, swn, swc, swh, sww, sxb, sxc, sxh, sxw,
                  stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                  KH, KW, INPUT_PRECISION, DOT_FP32, IDX, BLOCK_M, BLOCK_N, BLOCK_C)  # fmt: skip


@triton.jit
def _conv_dx_persistent_kernel(
    dy_ptr, w_ptr, dx_ptr, col_ptr, col_rows,
    B, C, H, W, N, P, Q,
    sdb, sdn, sdp, sdq, swn, swc, swh, sww, sxb, sxc, sxh, sxw,
    stride_h: tl.constexpr, stride_w: tl.constexpr, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    IDX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,
):  # fmt: skip
    """``_conv_dx_kernel``'s tiles (arguments as there), each program looping over tiles pid, pid + programs, ...:
    C-blocks fastest, so the programs in flight share the dY slabs of one or a few pixel tiles in L2."""
    num_c = tl.cdiv(C, BLOCK_C)
    for t in range(tl.program_id(0), tl.cdiv(B * H * W, BLOCK_M) * num_c, tl.num_programs(0)):
        _conv_dx_tile(dy_ptr, w_ptr, dx_ptr, col_ptr, col_rows, t // num_c, t % num_c, B, C, H, W, N, P, Q,
                      sdb, sdn, sdp, sdq, swn, swc, swh, sww, sxb, sxc, sxh, sxw,
                      stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                      KH, KW, INPUT_PRECISION, DOT_FP32, IDX, BLOCK_M, BLOCK_N, BLOCK_C)  # fmt: skip


@triton.jit
def _conv_dw_kernel(
    # pointers: input, output gradient, mask, weight gradient, fp32 workspace of the split partial sums, int32
    # counter per program (both unused when DIRECT); COO list of the alive tiles; the dead tiles (tiles.dead_tiles)
    x_ptr, dy_ptr, m_ptr, dw_ptr, ws_ptr, counters, tile_rows, tile_cols, tile_full, dead_rows, dead_cols,
    # sizes; ALIVE tiles (ALIVE * KH * KW alive programs), DEAD tiles, DEAD_PER zeroed per program
    B, C, H, W, N, P, Q, M_PER_SPLIT, ALIVE, DEAD, DEAD_PER,
    # strides of x, dy, mask, dw
    sxb, sxc, sxh, sxw, sdb, sdn, sdp, sdq, smn, smc, smh, smw, swn, swc, swh, sww,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, DIRECT: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    FLAT_DY: tl.constexpr, IDX: tl.constexpr, FULL_TILES: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dW[tile, tap] = (dY^T Xcol) * M over one M-split; DIRECT stores into dw, else the last split to finish
    sums the splits' fp32 partials and stores (``dw_split.finish_split``). Programs past the alive ones store zeros
    into every tap of DEAD_PER dead tiles each (split 0 only).
    FLAT_DY: dY's pixels (b, p, q) are packed, pixel m at m * sdq (``_flat_pixels``). FULL_TILES: a full tile is
    stored without reading the mask (off inside a CUDA graph capture: ``dw_split.full_tiles``)."""
    pid = tl.program_id(0)  # alive tile * KH*KW + tap
    split = tl.program_id(1)
    if pid >= ALIVE * (KH * KW):
        if split == 0:
            zero_dead(dw_ptr, dead_rows, dead_cols, pid - ALIVE * (KH * KW), DEAD_PER, DEAD, N, C, swn, swc, swh, sww,
                      IDX, KH, KW, BLOCK_N, BLOCK_C)  # fmt: skip
        return
    r, s, offs_n, offs_c = tile_tap(pid, tile_rows, tile_cols, KH, KW, BLOCK_N, BLOCK_C)
    n_ok = offs_n < N
    c_ok = offs_c < C
    m_lo = split * M_PER_SPLIT
    m_hi = tl.minimum(m_lo + M_PER_SPLIT, B * P * Q)
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    # Output pixel m = (b, p, q) of row j of a block starting at m0: m0's (b0, p0, q0) (scalars) plus j's (jb, jp, jq)
    # (loop-invariant vectors), with the carries. Three vector divisions per row and step were most of this loop's
    # instructions (compiled offline for sm_90: 1033 SASS instructions per 8 wgmma).
    j = tl.arange(0, BLOCK_M)
    jq = j % Q
    jp = (j // Q) % P
    jb = j // (P * Q)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + j
        m_ok = offs_m < m_hi
        q = m0 % Q + jq
        p = (m0 // Q) % P + jp + (q >= Q).to(tl.int32)
        q = tl.where(q >= Q, q - Q, q)
        b = (m0 // (P * Q) + jb + (p >= P).to(tl.int32)).to(IDX)
        p = tl.where(p >= P, p - P, p)
        if FLAT_DY:  # pixel m of dY at m * sdq (channels_last, or any layout with b, p, q packed)
            dy_off = offs_m.to(IDX) * sdq
        else:
            dy_off = b * sdb + p.to(IDX) * sdp + q.to(IDX) * sdq
        g = tl.load(dy_ptr + dy_off[None, :] + offs_n[:, None].to(IDX) * sdn,
                    mask=n_ok[:, None] & m_ok[None, :], other=0.0)  # fmt: skip
        ih = p * stride_h - pad_h + r * dil_h
        iw = q * stride_w - pad_w + s * dil_w
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_off = b * sxb + ih.to(IDX) * sxh + iw.to(IDX) * sxw
        a = tl.load(x_ptr + x_off[:, None] + offs_c[None, :].to(IDX) * sxc,
                    mask=pix_ok[:, None] & c_ok[None, :], other=0.0)  # fmt: skip
        if DOT_FP32:
            g = g.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(g, a, acc, input_precision=INPUT_PRECISION)
    m_tap = m_ptr + r * smh + s * smw
    dw_tap = dw_ptr + r * swh + s * sww
    full = tl.load(tile_full + pid // (KH * KW)) != 0
    if DIRECT:
        store_dw(acc, full, m_tap, dw_tap, offs_n, offs_c, n_ok, c_ok, smn, smc, swn, swc, FULL_TILES)
    else:
        finish_split(acc, ws_ptr, counters, pid, split, full, m_tap, dw_tap, offs_n, offs_c, n_ok, c_ok, smn, smc, swn,
                     swc, FULL_TILES, BLOCK_N, BLOCK_C)  # fmt: skip


_fwd = Tuned(_conv_fwd_kernel, CUDA_CONFIGS)
_dx = Tuned(_conv_dx_kernel, CUDA_CONFIGS)
_fwd_persistent = Tuned(_conv_fwd_persistent_kernel, CUDA_PERSISTENT_CONFIGS)
_dx_persistent = Tuned(_conv_dx_persistent_kernel, CUDA_PERSISTENT_CONFIGS)
_dw = Tuned(_conv_dw_kernel, CUDA_CONFIGS)


def _flat_pixels(t: torch.Tensor) -> bool:
    """Whether pixel m = (b, p, q) of ``t`` [B, N, P, Q] sits at offset m * t.stride(3) (channels_last does)."""
    b, _, p, q = t.shape
    sb, _, sp, sq = t.stride()
    return (p == 1 or sp == q * sq) and (b == 1 or sb == p * q * sq)


def _conv_args(stride, padding, dilation) -> tuple[int, ...]:
    return (stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1])


# Forward and dX on CUDA: one program per output tile, or the persistent kernels, whichever ran faster for the key
# (timed once, each after tuning its own configs); LTHFAST_PERSISTENT=0 / 1 forces one (as for the linear kernels).
# The classic kernels without timing in the interpreter and with tuning off.
_VARIANTS = Faster("LTHFAST_PERSISTENT")


def _variant(key: tuple, runs) -> None:
    """Run the launcher ``_VARIANTS`` picks among ``runs`` (classic, persistent) for ``key``."""
    timed = not _backend.interpreter_enabled()
    runs[_VARIANTS.pick(key if timed else None, runs, timed=timed)]()


def _variant_key(kind: str, x: torch.Tensor, weight: torch.Tensor, index: TileIndex, hw: tuple, stride, dilation):
    batch, c = x.shape[:2]
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return (kind, size_class(batch), weight.shape[0], c, *hw, *weight.shape[2:], *stride, *dilation,
            density_class(index.tile_density), x.dtype, channels_last)  # fmt: skip


def conv2d_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    index: TileIndex | None = None,
) -> torch.Tensor:
    """Write conv2d(x, W*M) + bias into ``out`` [B, N, P, Q] (any strides) and return it.

    x [B, C, H, W], weight [N, C, KH, KW], mask bool like weight, bias [N] or None: one dtype of KERNEL_DTYPES, one
    device. padding is (top, bottom, left, right); only top/left enter (the output size already holds the rest).
    ``index`` defaults to ``conv_tile_index(mask)``; a different one is honoured (tests use it to prove skipping).
    One-program-per-tile or persistent kernel: ``_VARIANTS``.
    """
    index = conv_tile_index(mask) if index is None else index
    weight = _masked_channels_last(weight, mask)
    bias = None if bias is None else bias.contiguous()  # the kernel reads it at unit stride (Cout values: no cost)
    args = (x, weight, bias, out, index, stride, padding, dilation)
    key = _variant_key("forward" if bias is None else "forward+bias", x, weight, index, out.shape[2:], stride,
                       dilation)  # fmt: skip
    _variant(key, (lambda: _forward(False, *args), lambda: _forward(True, *args)))
    return out


def persistent_conv2d_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    index: TileIndex | None = None,
    programs: int | None = None,
) -> torch.Tensor:
    """``conv2d_forward`` on the persistent kernel; ``programs``: the grid size (default: one wave, at most one
    program per output tile)."""
    index = conv_tile_index(mask) if index is None else index
    weight = _masked_channels_last(weight, mask)
    bias = None if bias is None else bias.contiguous()
    _forward(True, x, weight, bias, out, index, stride, padding, dilation, programs)
    return out


def _forward(persistent: bool, x, weight, bias, out, index, stride, padding, dilation, programs=None) -> None:
    """Launch the forward kernel (persistent or one program per tile) on W ⊙ M ``weight`` (channels_last)."""
    batch, c, h, w = x.shape
    n, _, kh, kw = weight.shape
    p, q = out.shape[2:]
    block_n, block_c = conv_tiles(x.device)
    _launch(
        _fwd_persistent if persistent else _fwd, x, index,
        (size_class(batch), n, c, p, q, *stride, density_class(index.tile_density)),
        _grid(persistent, x, batch * p * q, cdiv(n, block_n), programs),
        x, weight, bias if bias is not None else weight, out, index.row_ptr, index.row_cols,
        batch, c, h, w, n, p, q,
        *x.stride(), *weight.stride(), *out.stride(),
        *_conv_args(stride, padding, dilation),
        KH=kh, KW=kw, HAS_BIAS=bias is not None, INPUT_PRECISION=_input_precision(x.dtype), DOT_FP32=_dot_fp32(x.dtype),
        BLOCK_N=block_n, BLOCK_C=block_c,
    )  # fmt: skip


def conv2d_grad_input(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    grad_x: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    index: TileIndex | None = None,
) -> torch.Tensor:
    """Write dX = conv2d's input gradient through W*M into ``grad_x`` [B, C, H, W] (any strides); return it.
    One-program-per-tile or persistent kernel: ``_VARIANTS``."""
    index = conv_tile_index(mask) if index is None else index
    weight = _masked_channels_last(weight, mask)
    args = (grad_out, weight, grad_x, index, stride, padding, dilation)
    key = _variant_key("dX", grad_x, weight, index, grad_x.shape[2:], stride, dilation)
    _variant(key, (lambda: _grad_input(False, *args), lambda: _grad_input(True, *args)))
    return grad_x


def persistent_conv2d_grad_input(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    grad_x: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    index: TileIndex | None = None,
    programs: int | None = None,
) -> torch.Tensor:
    """``conv2d_grad_input`` on the persistent kernel; ``programs`` as in ``persistent_conv2d_forward``."""
    index = conv_tile_index(mask) if index is None else index
    weight = _masked_channels_last(weight, mask)
    _grad_input(True, grad_out, weight, grad_x, index, stride, padding, dilation, programs)
    return grad_x


def _grad_input(persistent: bool, grad_out, weight, grad_x, index, stride, padding, dilation, programs=None) -> None:
    """Launch the dX kernel (persistent or one program per tile) on W ⊙ M ``weight`` (channels_last)."""
    batch, c, h, w = grad_x.shape
    n, _, kh, kw = weight.shape
    p, q = grad_out.shape[2:]
    block_n, block_c = conv_tiles(grad_x.device)
    _launch(
        _dx_persistent if persistent else _dx, grad_x, index,
        (size_class(batch), n, c, h, w, *stride, density_class(index.tile_density)),
        _grid(persistent, grad_x, batch * h * w, cdiv(c, block_c), programs),
        grad_out, weight, grad_x, index.col_ptr, index.col_rows,
        batch, c, h, w, n, p, q,
        *grad_out.stride(), *weight.stride(), *grad_x.stride(),
        *_conv_args(stride, padding, dilation),
        KH=kh, KW=kw, INPUT_PRECISION=_input_precision(grad_x.dtype), DOT_FP32=_dot_fp32(grad_x.dtype),
        IDX=offset_type(grad_out, grad_x), BLOCK_N=block_n, BLOCK_C=block_c,
    )  # fmt: skip


def conv2d_grad_weight(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    grad_w: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    index: TileIndex | None = None,
    split: int | None = None,
) -> torch.Tensor:
    """Write dW = (dY^T Xcol) * M into every entry of ``grad_w`` [N, C, KH, KW] (any strides) and return it.

    ``grad_w``'s contents on entry do not matter (e.g. ``torch.empty_like(weight)``): one launch computes the alive
    tiles, exact zeros where the mask is False, and stores zeros into the dead ones (a mask with no alive tile, or
    no output pixels: ``grad_w.zero_()``, no kernel). ``split`` (M-splits, finished inside the launch:
    ``lthfast.kernels.dw_split``) defaults to a device heuristic.
    """
    batch, c, h, w = x.shape
    n, _, kh, kw = grad_w.shape
    p, q = grad_out.shape[2:]
    index = conv_tile_index(mask) if index is None else index
    programs = index.alive_tiles * kh * kw
    m = batch * p * q
    if programs == 0 or m == 0:
        return grad_w.zero_()
    block_n, block_c = conv_tiles(x.device)
    dead_rows, dead_cols = dead_tiles(index)
    dead = dead_rows.numel()
    dead_per = dw_split.dead_per_program(dead, x.device)
    split = dw_split.split_count(m, programs, x.device) if split is None else split
    m_per_split = cdiv(m, split)
    split = cdiv(m, m_per_split)
    direct = split == 1
    ws = grad_w if direct else dw_split.workspace(split, programs, block_n, block_c, x.device)
    counters = index.tile_rows if direct else dw_split.counters(programs, x.device)
    full = full_tiles(x)
    flags = tile_full_flags(index, mask) if full else index.tile_rows
    _launch(
        _dw, x, index, (size_class(batch), n, c, p, q, *stride, m_per_split, density_class(index.tile_density)),
        lambda meta: (programs + cdiv(dead, dead_per), split),
        x, grad_out, mask, grad_w, ws, counters, index.tile_rows, index.tile_cols, flags, dead_rows, dead_cols,
        batch, c, h, w, n, p, q, m_per_split, index.alive_tiles, dead, dead_per,
        *x.stride(), *grad_out.stride(), *mask.stride(), *grad_w.stride(),
        *_conv_args(stride, padding, dilation),
        KH=kh, KW=kw, DIRECT=direct, INPUT_PRECISION=_input_precision(x.dtype), DOT_FP32=_dot_fp32(x.dtype),
        FLAT_DY=_flat_pixels(grad_out), IDX=offset_type(x, grad_out, grad_w), FULL_TILES=full, BLOCK_N=block_n,
        BLOCK_C=block_c,
    )  # fmt: skip
    return grad_w
