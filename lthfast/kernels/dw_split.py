"""Weight gradients reduced over M in several splits: the part shared by the linear and conv dW kernels.

dW is an SDDMM with one program per alive weight tile (per tap for conv; per 1, 2 or 4 tiles of one column for the
linear dW), each reducing over all M rows (tokens or output pixels). With few alive tiles that is too few programs
for the GPU, each a long sequential loop: at 98% in 32x32 blocks a Linear(4096, 4096) has 328 alive tiles for 132
SMs, each looping over 8192 tokens. Splitting M gives ``split`` programs per tile, each writing its fp32 partial sum
into a workspace [split, programs, BN, BK]; ``reduce`` then sums the splits, applies the mask and writes dW in its
dtype (one more launch, cheap next to the loop it shortens).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lthfast import _backend
from lthfast.kernels.autotune import Tuned, cdiv

# Each split reduces at least this many rows: below that a program's loop is short enough already.
MIN_ROWS_PER_SPLIT = 2048
# Enough programs to fill the GPU: this many per SM.
PROGRAMS_PER_SM = 4


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_count(m: int, programs: int, device: torch.device) -> int:
    """M-splits for a dW of ``programs`` tile programs reducing ``m`` rows: enough programs to fill the GPU
    (PROGRAMS_PER_SM per SM), each reducing at least MIN_ROWS_PER_SPLIT rows. 1 off CUDA (the interpreter).

    The same in eager mode and inside a CUDA graph capture, so that a capture meets the kernel variants and tuned
    configs its eager warm-up made. In an eager step bound by host time (the H200's, h200-notes.md) the reduce is
    one more launch of host time for GPU time nobody waits for; a graph replay gets the shorter dW loop for free.
    """
    if device.type != "cuda" or _backend.interpreter_enabled():
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(1, min(cdiv(PROGRAMS_PER_SM * _sm_count(index), programs), m // MIN_ROWS_PER_SPLIT))


@triton.jit
def tile_tap(pid, tile_rows, tile_cols, KH: tl.constexpr, KW: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_C: tl.constexpr):  # fmt: skip
    """(r, s, offs_n, offs_c) of dW program ``pid`` over (alive tile, tap): the tap's kernel row and column, and the
    tile's output- and input-channel offsets (a linear layer: KH = KW = 1)."""
    tile = pid // (KH * KW)
    r = (pid % (KH * KW)) // KW
    s = pid % KW
    offs_n = tl.load(tile_rows + tile) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.load(tile_cols + tile) * BLOCK_C + tl.arange(0, BLOCK_C)
    return r, s, offs_n, offs_c


@triton.jit
def partial_sum(ws_ptr, split, pid, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pointers to dW program ``pid``'s [BLOCK_N, BLOCK_C] fp32 partial sum of M-split ``split`` in the workspace."""
    block = tl.arange(0, BLOCK_N)[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    return ws_ptr + (split * tl.num_programs(0) + pid).to(tl.int64) * (BLOCK_N * BLOCK_C) + block


@triton.jit
def store_masked(acc, m_ptrs, dw_ptrs, ok):
    """``acc`` into dW at ``dw_ptrs`` in dW's dtype, exact zeros where the mask bytes at ``m_ptrs`` are 0 (so a
    NaN summed under a pruned weight never reaches dW); ``ok`` bounds both."""
    keep = tl.load(m_ptrs, mask=ok, other=0)
    acc = tl.where(keep != 0, acc, tl.zeros_like(acc))
    tl.store(dw_ptrs, acc.to(dw_ptrs.dtype.element_ty), mask=ok)


def full_tiles(t: torch.Tensor) -> bool:
    """Whether the kernels run full tiles without reading the mask: in eager calls; not while a CUDA graph is being
    captured, since a graph replayed after an in-place prune must stay exact (its captured lists go stale: a tile
    full then may be partial now, and only reading the mask keeps a pruned weight out)."""
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


@triton.jit
def store_tile(acc, full, m_ptrs, dw_ptrs, ok):
    """``store_masked``, or a plain store when ``full`` (every entry of the tile alive: the mask is not read)."""
    if full:
        tl.store(dw_ptrs, acc.to(dw_ptrs.dtype.element_ty), mask=ok)
    else:
        store_masked(acc, m_ptrs, dw_ptrs, ok)


@triton.jit
def _reduce_kernel(
    ws_ptr, m_ptr, dw_ptr, tile_rows, tile_cols, tile_full, SPLIT, N, C,
    smn, smc, smh, smw, swn, swc, swh, sww,
    KH: tl.constexpr, KW: tl.constexpr, FULL_TILES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dw[tile, tap] = (sum over splits of the workspace) * M, in dw's dtype. One program per (alive tile, tap);
    with FULL_TILES a full tile (``tile_full`` nonzero) is stored without reading the mask."""
    pid = tl.program_id(0)
    r, s, offs_n, offs_c = tile_tap(pid, tile_rows, tile_cols, KH, KW, BLOCK_N, BLOCK_C)
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for split in range(SPLIT):
        acc += tl.load(partial_sum(ws_ptr, split, pid, BLOCK_N, BLOCK_C))
    nc_ok = ((offs_n >= 0) & (offs_n < N))[:, None] & (offs_c < C)[None, :]  # row -1: padding (linear dW groups)
    m_ptrs = m_ptr + offs_n[:, None] * smn + offs_c[None, :] * smc + r * smh + s * smw
    dw_ptrs = dw_ptr + offs_n[:, None] * swn + offs_c[None, :] * swc + r * swh + s * sww
    if FULL_TILES:
        store_tile(acc, tl.load(tile_full + pid // (KH * KW)) != 0, m_ptrs, dw_ptrs, nc_ok)
    else:
        store_masked(acc, m_ptrs, dw_ptrs, nc_ok)


# One config: the reduce is a short streaming pass. Launched through Tuned like the other kernels (a key with one
# candidate is never timed), so that lthfast.bench.offline compiles it with them.
_reduce = Tuned(_reduce_kernel, [{"num_warps": 4}])


def workspace(split: int, programs: int, block_n: int, block_c: int, device: torch.device) -> torch.Tensor:
    """The fp32 partial sums of ``split`` M-splits of ``programs`` [block_n, block_c] tile programs."""
    return torch.empty((split, programs, block_n, block_c), device=device, dtype=torch.float32)


def reduce(
    ws: torch.Tensor,
    mask: torch.Tensor,
    grad_w: torch.Tensor,
    tile_rows: torch.Tensor,
    tile_cols: torch.Tensor,
    tile_full: torch.Tensor | None,
) -> torch.Tensor:
    """Sum the workspace ``ws`` [split, programs, BN, BC] over its splits into the tiles of ``grad_w`` listed by
    ``tile_rows`` / ``tile_cols`` (int32; row -1: padding, skipped), with exact zeros where ``mask`` is False;
    ``tile_full`` (int8, one per listed tile) marks the full tiles, stored without reading the mask (None: every
    tile reads it, as inside a CUDA graph capture).
    ``mask`` and ``grad_w`` are [N, C, KH, KW] (a linear layer's [N, K] as [N, K, 1, 1]); ``programs`` = listed
    tiles x KH x KW, at tile [BN, BC]."""
    split, programs, block_n, block_c = ws.shape
    n, c, kh, kw = grad_w.shape
    _reduce.launch(
        (), lambda meta: (programs,),
        ws, mask, grad_w, tile_rows, tile_cols, tile_rows if tile_full is None else tile_full, split, n, c,
        *mask.stride(), *grad_w.stride(), KH=kh, KW=kw, FULL_TILES=tile_full is not None, BLOCK_N=block_n,
        BLOCK_C=block_c,
    )  # fmt: skip
    return grad_w
