"""Weight gradients over the alive tiles, reduced over M in several splits: the part shared by the linear and conv
dW kernels.

dW is an SDDMM with one program per alive weight tile (per tap for conv; per 1, 2 or 4 tiles of one column for the
linear dW), each reducing over all M rows (tokens or output pixels). With few alive tiles that is too few programs
for the GPU, each a long sequential loop: at 98% in 32x32 blocks a Linear(4096, 4096) has 328 alive tiles for 132
SMs, each looping over 8192 tokens. Splitting M gives ``split`` programs per tile (grid dim 1), finished inside the
same launch as split-K / stream-K GEMMs do: each writes its fp32 partial sum into a workspace and counts itself in
at an int32 arrival counter of its tile; the last to arrive sums the partials in split order (the same bits
whichever program is last), applies the mask, stores dW in its dtype and sets the counter back to 0
(``finish_split``). dW is never zero-filled by a launch of its own either: extra programs after the alive ones
(grid dim 0, split 0 only) store zeros into the dead tiles (``zero_dead``). One launch per dW, whatever the split.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lthfast import _backend
from lthfast.indexing.tiles import keep_if_capturing
from lthfast.kernels.autotune import cdiv

# Each split reduces at least this many rows: below that a program's loop is short enough already.
MIN_ROWS_PER_SPLIT = 2048
# Enough programs to fill the GPU: this many per SM (for the split and for the dead-tile programs).
PROGRAMS_PER_SM = 4
# The interpreter's dead tiles per zeroing program: several, so that CI runs the loop and an uneven last program.
INTERPRETER_DEAD_PER_PROGRAM = 3
# The smallest arrival-counter array made (int32 entries): a cached array is grown to twice its size or more.
MIN_COUNTERS = 1024


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_count(m: int, programs: int, device: torch.device) -> int:
    """M-splits for a dW of ``programs`` tile programs reducing ``m`` rows: enough programs to fill the GPU
    (PROGRAMS_PER_SM per SM), each reducing at least MIN_ROWS_PER_SPLIT rows. 1 off CUDA (the interpreter).

    The same in eager mode and inside a CUDA graph capture, so that a capture meets the kernel variants and tuned
    configs its eager warm-up made. The splits are summed inside the same launch (``finish_split``): a split costs
    no launch (no host time, which bound the H200's eager step: h200-notes.md), only its partial sums' round trip
    through L2.
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
def store_dw(acc, full, m_ptr, dw_ptr, rows, cols, row_ok, col_ok, smr, smc, swr, swc, FULL_TILES: tl.constexpr):
    """``acc`` into the dW tile of ``rows`` x ``cols`` (offsets, bounded by ``row_ok`` / ``col_ok``; the mask and dW
    at ``m_ptr`` / ``dw_ptr`` with these strides): ``store_tile`` with FULL_TILES (``full``: every entry of the tile
    alive), else ``store_masked``."""
    m_ptrs = m_ptr + rows[:, None] * smr + cols[None, :] * smc
    dw_ptrs = dw_ptr + rows[:, None] * swr + cols[None, :] * swc
    ok = row_ok[:, None] & col_ok[None, :]
    if FULL_TILES:
        store_tile(acc, full, m_ptrs, dw_ptrs, ok)
    else:
        store_masked(acc, m_ptrs, dw_ptrs, ok)


@triton.jit
def finish_split(acc, ws_ptr, counters, pid, split, full, m_ptr, dw_ptr, rows, cols, row_ok, col_ok, smr, smc, swr,
                 swc, FULL_TILES: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):  # fmt: skip
    """M-split ``split`` of dW program ``pid`` (of tl.num_programs(1) splits) is done with its [ROWS, COLS] fp32
    partial sum ``acc``: store it into the workspace (program ``pid``'s splits are consecutive blocks) and count it
    in at ``counters[pid]``; the last split to arrive sums all partials in split order, so the bits do not depend
    on which split is last, stores dW as ``store_dw`` and sets the counter back to 0 for the next launch on the
    stream. Its own partial is read back from L2 like the others and the tile's pointers are made after the
    counting: kept in registers across it, they cost the kernel 10-40 more registers per thread (compiled offline
    for sm_90, conv dW: 96 registers this way, 106-150 the others).

    The barrier orders every thread's partial before the counter's release; the acquire orders the last program's
    reads of the others' partials after their releases (the ``.cg`` loads read them from L2, where they were
    written, never a stale L1 line).
    """
    splits = tl.num_programs(1)
    size: tl.constexpr = ROWS * COLS
    block = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    tile_ws = ws_ptr + pid.to(tl.int64) * splits * size
    tl.store(tile_ws + split * size + block, acc)
    tl.debug_barrier()
    if tl.atomic_add(counters + pid, 1, sem="acq_rel") == splits - 1:
        total = tl.zeros((ROWS, COLS), dtype=tl.float32)
        for other in range(0, splits):
            total += tl.load(tile_ws + other * size + block, cache_modifier=".cg")
        store_dw(total, full, m_ptr, dw_ptr, rows, cols, row_ok, col_ok, smr, smc, swr, swc, FULL_TILES)
        tl.store(counters + pid, 0)


@triton.jit
def zero_dead(dw_ptr, dead_rows, dead_cols, job, DEAD_PER, DEAD, N, C, swn, swc, swh, sww, IDX: tl.constexpr,
              KH: tl.constexpr, KW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """Zeros into every tap of dead tiles ``job * DEAD_PER`` to ``job * DEAD_PER + DEAD_PER - 1`` of the ``DEAD``
    listed by ``dead_rows`` / ``dead_cols`` (``tiles.dead_tiles``), bounded by dW's [N, C] edges: what a memset of
    dW did for the tiles no dW program writes."""
    zeros = tl.zeros((BLOCK_N, BLOCK_C), dtype=dw_ptr.dtype.element_ty)
    first = job * DEAD_PER
    last = tl.minimum(first + DEAD_PER, DEAD)
    for unit in range(first * (KH * KW), last * (KH * KW)):  # (dead tile, tap)
        tile = unit // (KH * KW)
        r = (unit % (KH * KW)) // KW
        s = unit % KW
        offs_n = tl.load(dead_rows + tile).to(IDX) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_c = tl.load(dead_cols + tile).to(IDX) * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = (offs_n < N)[:, None] & (offs_c < C)[None, :]
        tl.store(dw_ptr + offs_n[:, None] * swn + offs_c[None, :] * swc + r * swh + s * sww, zeros, mask=ok)


def workspace(split: int, programs: int, block_n: int, block_c: int, device: torch.device) -> torch.Tensor:
    """The fp32 partial sums of ``split`` M-splits of ``programs`` [block_n, block_c] tiles (flat: each dW program
    lays out its splits' blocks one after the other, ``finish_split``)."""
    return torch.empty(split * programs * block_n * block_c, device=device, dtype=torch.float32)


# (device, stream) -> int32 arrival counters, all 0 between launches (``counters``).
_counters: dict[tuple, torch.Tensor] = {}


def counters(programs: int, device: torch.device) -> torch.Tensor:
    """At least ``programs`` int32 arrival counters for a split dW launch on ``device``'s current stream, all 0.

    Cached per (device, stream) and grown when too small (allocated zeroed once, so no launch zero-fills them): each
    launch leaves its counters at 0 again (``finish_split``). That relies on stream order: launches on one stream
    run one after another, so two never count on one array at once; a launch on another stream uses that stream's
    array. A CUDA graph keeps the array it captured (never freed, even when the cache grows past it) and resets
    it as it runs, so its replays stay right (an array first made inside a capture is the graph's memory, zeroed
    by the captured fill at each replay); graphs captured on one stream share that array, so they must be replayed
    on one stream, one after the other (as ``lthfast.imp.graphed`` does).
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (device.type, index, torch.cuda.current_stream(index).cuda_stream)
    else:
        key = (device.type, device.index)
    found = _counters.get(key)
    if found is None or found.numel() < programs:
        size = max(programs, MIN_COUNTERS, 0 if found is None else 2 * found.numel())
        found = _counters[key] = torch.zeros(size, dtype=torch.int32, device=device)
    keep_if_capturing(found, found)
    return found


def dead_per_program(dead: int, device: torch.device) -> int:
    """Dead tiles zeroed per program, out of ``dead``: enough programs to fill the GPU (PROGRAMS_PER_SM per SM) and no
    more, since each program's launch costs more than zeroing one small tile. INTERPRETER_DEAD_PER_PROGRAM off CUDA."""
    if device.type != "cuda" or _backend.interpreter_enabled():
        return INTERPRETER_DEAD_PER_PROGRAM
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(1, cdiv(dead, PROGRAMS_PER_SM * _sm_count(index)))
