"""The torch path of the masked linear op: block-sparse on CPU when few weight tiles are alive, dense otherwise.

Block-sparse (CPU tensors only), per alive [b x b] weight tile t = (n-tile, k-tile), with X [M, K] viewed as
[M, Tk, b] and dY [M, N] as [M, Tn, b] (never transposed):
  forward  Y[:, n-tile]  += X[:, k-tile] @ W_t^T
  dX       dX[:, k-tile] += dY[:, n-tile] @ W_t
  dW       dW_t = (dY[:, n-tile]^T @ X[:, k-tile]) ⊙ M_t   (an SDDMM; dead tiles stay exactly zero)
The tiles are processed in cache-sized chunks (gather the column blocks with ``index_select``, one batched matmul,
scatter with ``index_add_``), the chunks split over a few threads so that each writes disjoint output blocks.
Dense: torch on W ⊙ M (``torch.where``, so a NaN stored under a pruned entry cannot leak), MKL/cuBLAS GEMMs.

Which one runs is decided per call from the mask's (cached) tile index: see ``plan``. The block path changes
torch's intra-op thread count while it runs (process-wide, restored after): see ``BLOCK_PATH_THREADS``.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from lthfast.kernels.tile_index import TileIndex, tile_index
from lthfast.reference import masked_weight

# Tile sizes tried on CPU, and the tile density below which each beats dense MKL on the training step.
# Measured with benchmarks/bench_masked_linear.py --crossover on the 2-core EPYC (AVX-512) CI machine,
# Linear(2048, 2048), batch 512, fp32: the block path's time grows linearly with the alive tiles and meets the
# dense step at these densities (16x16 tiles run batched GEMMs ~4x slower per flop than 32x32: never worth it).
CPU_CROSSOVER = {64: 0.40, 32: 0.25}
# Below this many dense multiply-adds (M * N * K) the ~20 extra small ops of the block path cost more than
# the GEMM they save (about 0.3 ms of overhead against ~60 GFLOP/s dense on this machine).
CPU_MIN_MACS = 2**23
# The block path works through the alive tiles in chunks whose gathered [rows, chunk, block] operand is about this
# size: it stays in cache between the gather, the batched matmul and the scatter, and no large temporary is
# allocated per call (one-shot 27 MB gathers page-faulted at 0.4 GB/s on the shared VM). Fewer, larger chunks
# also mean fewer OpenMP regions, which matters when the cores are oversubscribed. Measured, 95% sparse training
# step of Linear(2048, 2048) at batch 512, 1 thread: 2^19 and 2^21 B both 5.1x dense, 2^23 B 3.5x, 2^25 B 2.1x.
CHUNK_BYTES = 2**21
# Intra-op threads for the block path (None: torch's setting). Its ~20 + 3 per chunk ops are small (0.1-3 ms), and
# an OpenMP region waits for every thread: on the shared 2-vCPU VM, whenever another process held the second core,
# each region stalled a scheduler slice (a 1M-element add: 8 ms on 2 threads vs 0.09 ms on 1), and MKL's batched
# 32x32 GEMMs gained nothing from the second thread even when it was free. See the report in
# benchmarks/results/masked_linear-cpu.json for the measured step times.
BLOCK_PATH_THREADS = 1
# The chunk loops are split over this many Python threads (at most torch's thread count), each running its share
# of tiles on one intra-op thread: ATen ops release the GIL, so the two cores work without an OpenMP barrier per op.
MAX_WORKERS = 8


@dataclass(frozen=True)
class BlockPlan:
    """Gather/scatter indices of the alive [block x block] tiles of one mask (int64, the mask's device).

    rows, cols [nnz]: tile coordinates. elems [nnz * block^2]: flat offsets ``r * K + c`` of the tiles' weights;
    positions past the weight's edge (partial edge tiles) point at offset 0 and have ``keep`` False, so they
    gather a value that is then zeroed and scatter-add an exact zero. keep [nnz, block, block]: the mask.
    """

    block: int
    shape: tuple[int, int]
    tiles_n: int
    tiles_k: int
    rows: torch.Tensor
    cols: torch.Tensor
    elems: torch.Tensor
    keep: torch.Tensor
    splits: dict = field(default_factory=dict, compare=False, repr=False)  # parts() cache

    def reordered(self, order: torch.Tensor) -> BlockPlan:
        """The same tiles in another order (e.g. column-major for dX)."""
        b2 = self.block * self.block
        elems = self.elems.view(-1, b2).index_select(0, order).reshape(-1)
        return BlockPlan(self.block, self.shape, self.tiles_n, self.tiles_k, self.rows[order], self.cols[order],
                         elems, self.keep[order])  # fmt: skip

    def parts(self, key: str, count: int) -> list[tuple[int, int]]:
        """Split the tiles into ``count`` ranges of about equal size that never split one value of ``key``
        ("rows" or "cols", sorted in this plan), so that workers scatter into disjoint output blocks."""
        if (key, count) not in self.splits:
            values = getattr(self, key).tolist()
            nnz, bounds = len(values), [0]
            for i in range(1, count):
                cut = max(bounds[-1], i * nnz // count)
                while 0 < cut < nnz and values[cut] == values[cut - 1]:
                    cut += 1
                bounds.append(cut)
            bounds.append(nnz)
            self.splits[(key, count)] = [(s, e) for s, e in zip(bounds, bounds[1:]) if e > s]
        return self.splits[(key, count)]


# id(TileIndex) -> (weakref to it, (row-major plan, column-major plan)); a TileIndex lives as long as its mask
# version (tile_index's cache), so a plan can never outlive the mask contents it was built from.
_plans: dict[int, tuple[weakref.ref, tuple[BlockPlan, BlockPlan]]] = {}


def _build_plan(mask: torch.Tensor, index: TileIndex) -> BlockPlan:
    b = index.block_n
    n, k = mask.shape
    rows, cols = index.tile_rows.long(), index.tile_cols.long()
    within = torch.arange(b, device=mask.device)
    row_ids = (rows[:, None] * b + within)[:, :, None]  # [nnz, b, 1] weight rows of each tile
    col_ids = (cols[:, None] * b + within)[:, None, :]  # [nnz, 1, b] weight columns
    inside = (row_ids < n) & (col_ids < k)
    elems = torch.where(inside, row_ids * k + col_ids, 0).reshape(-1)
    keep = mask.reshape(-1).index_select(0, elems).view(-1, b, b) & inside
    return BlockPlan(b, (n, k), index.tiles_n, index.tiles_k, rows, cols, elems, keep)


def _plan_of(mask: torch.Tensor, index: TileIndex) -> tuple[BlockPlan, BlockPlan]:
    entry = _plans.get(id(index))
    if entry is not None and entry[0]() is index:
        return entry[1]
    by_rows = _build_plan(mask, index)
    by_cols = by_rows.reordered(torch.argsort(by_rows.cols * index.tiles_n + by_rows.rows))
    built = (by_rows, by_cols)
    key = id(index)
    _plans[key] = (weakref.ref(index, lambda _, key=key: _plans.pop(key, None)), built)
    return built


def plan(mask: torch.Tensor, rows: int) -> tuple[BlockPlan, BlockPlan] | None:
    """The block plans (tiles row-major, tiles column-major) to use for ``mask`` [N, K] with ``rows`` input rows,
    or None for the dense path.

    Block-sparse only on CPU, for problems of at least ``CPU_MIN_MACS``, and with the tile size whose tile
    density is furthest below its measured crossover.
    """
    n, k = mask.shape
    if mask.device.type != "cpu" or rows * n * k < CPU_MIN_MACS:
        return None
    best, best_ratio = None, 1.0
    for block, crossover in CPU_CROSSOVER.items():
        index = tile_index(mask, block, block)
        ratio = index.tile_density / crossover
        if ratio < best_ratio:
            best, best_ratio = index, ratio
    return None if best is None else _plan_of(mask, best)


# ------------------------------------------------------------------------------------------------ helpers


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 tiles are multiplied and summed in fp32 (the kernels' numerics); fp32/fp64 stay as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _blocks(t: torch.Tensor, tiles: int, block: int, dtype: torch.dtype) -> torch.Tensor:
    """t [M, C] as [M, tiles, block] in ``dtype``, columns past C zero: a view when t already fits, else one copy."""
    m, c = t.shape
    if c == tiles * block and t.dtype == dtype and t.is_contiguous():
        return t.view(m, tiles, block)
    out = t.new_empty(m, tiles * block, dtype=dtype)
    out[:, :c] = t
    out[:, c:] = 0
    return out.view(m, tiles, block)


def _unblocks(t: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[M, tiles, block] -> [M, length] contiguous in ``dtype`` (a view when nothing is cut or cast)."""
    flat = t.view(t.shape[0], -1)
    if flat.shape[1] == length and t.dtype == dtype:
        return flat
    return flat[:, :length].to(dtype, memory_format=torch.contiguous_format)


def _weight_tiles(weight: torch.Tensor, p: BlockPlan, dtype: torch.dtype) -> torch.Tensor:
    """The alive tiles of W ⊙ M, [nnz, block (n), block (k)] in ``dtype``. (One flat gather: 0.8 ms for 205 tiles
    of a 2048x2048 weight, faster than advanced indexing of the [Tn, b, Tk, b] view at 1.1 ms.)"""
    tiles = weight.reshape(-1).index_select(0, p.elems).view(-1, p.block, p.block).to(dtype)
    return torch.where(p.keep, tiles, torch.zeros((), dtype=dtype))


# ------------------------------------------------------------------------------------------------ the ops
# Layout: x [M, K] is viewed as [M, Tk, b] and dY [M, N] as [M, Tn, b], never transposed: a chunk of tiles gathers
# its column blocks (index_select on dim 1), multiplies them as a batch whose operands MKL reads through strides,
# and scatters the partial products back with index_add_. (A variant that first transposed X to [K, M] spent more
# time in the transposing copies than in the matmuls: 28 ms vs 17 ms for the 95%-sparse 2048x2048 forward.)


_scratch = threading.local()


def _scratch_buffer(slot: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread scratch tensor reused across calls (grown when too small), never returned to the caller:
    the chunk buffers then cost no allocation and no page faults per call."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    flat = buffers.get((slot, dtype, device))
    if flat is None or flat.numel() < numel:
        flat = torch.empty(numel, dtype=dtype, device=device)
        buffers[(slot, dtype, device)] = flat
    return flat[:numel].view(shape)


@contextlib.contextmanager
def _block_threads():
    """Run the block path on ``BLOCK_PATH_THREADS`` intra-op threads (process-wide, restored on exit)."""
    previous = torch.get_num_threads()
    if BLOCK_PATH_THREADS is None or previous <= BLOCK_PATH_THREADS:
        yield
        return
    torch.set_num_threads(BLOCK_PATH_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _chunk_tiles(p: BlockPlan, rows: int, dtype: torch.dtype) -> int:
    """Tiles per chunk: the gathered [rows, chunk, block] operand is about ``CHUNK_BYTES``."""
    return max(1, CHUNK_BYTES // (p.block * rows * dtype.itemsize))


_pool: ThreadPoolExecutor | None = None


def _run_parts(work, parts: list[tuple[int, int]]) -> None:
    """``work(start, end)`` for every part: the first on this thread, the others on the pool's threads."""
    global _pool
    if len(parts) > 1 and (_pool is None or _pool._max_workers < len(parts) - 1):
        # one intra-op thread per worker: the workers are the parallelism
        _pool = ThreadPoolExecutor(len(parts) - 1, "lthfast-block", initializer=torch.set_num_threads, initargs=(1,))
    futures = [_pool.submit(work, s, e) for s, e in parts[1:]]
    work(*parts[0])
    for f in futures:
        f.result()


def _workers() -> int:
    return max(1, min(MAX_WORKERS, torch.get_num_threads()))


def forward(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Y [M, N] = x [M, K] (W ⊙ M)^T + bias, contiguous, x's dtype. Any device; block-sparse on CPU when sparse."""
    plans = plan(mask, x.shape[0])
    if plans is None:
        return torch.nn.functional.linear(x, masked_weight(weight, mask), bias).contiguous()
    workers = _workers()
    with _block_threads():
        return _forward_blocks(x, weight, bias, plans[0], workers)


def backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, need_x: bool, need_w: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dX [M, K], dW [N, K]) of ``forward`` for grad [M, N]; None where not needed. dW is zero where M is."""
    plans = plan(mask, x.shape[0])
    if plans is None:
        grad_x = grad @ masked_weight(weight, mask) if need_x else None
        grad_w = masked_weight(grad.t() @ x, mask) if need_w else None
        return grad_x, grad_w
    workers = _workers()
    with _block_threads():
        return _backward_blocks(grad, x, weight, plans[1], need_x, need_w, workers)


def _forward_blocks(x, weight, bias, p: BlockPlan, workers: int) -> torch.Tensor:
    ct, m, b = _compute_dtype(x.dtype), x.shape[0], p.block
    x3 = _blocks(x, p.tiles_k, b, ct)  # [M, Tk, b]
    w_t = _weight_tiles(weight, p, ct).transpose(1, 2)  # [nnz, b (k), b (n)]
    y3 = torch.empty(m, p.tiles_n, b, dtype=ct, device=x.device)  # starts as the bias (saves a pass over Y)
    y3.view(m, -1)[:, : p.shape[0]] = 0 if bias is None else bias
    y3.view(m, -1)[:, p.shape[0] :] = 0
    step = _chunk_tiles(p, m, ct)

    @torch.no_grad()
    def work(start: int, end: int) -> None:  # tiles [start, end) cover whole tile rows: disjoint rows of Y
        gathered = _scratch_buffer(0, (m, step, b), ct, x.device)
        partial = _scratch_buffer(1, (step, m, b), ct, x.device)
        for s in range(start, end, step):
            e = min(s + step, end)
            n = e - s
            torch.index_select(x3, 1, p.cols[s:e], out=gathered[:, :n])
            torch.bmm(gathered[:, :n].transpose(0, 1), w_t[s:e], out=partial[:n])  # [n, M, b]
            y3.index_add_(1, p.rows[s:e], partial[:n].transpose(0, 1))

    _run_parts(work, p.parts("rows", workers))
    return _unblocks(y3, p.shape[0], x.dtype)


def _backward_blocks(grad, x, weight, p: BlockPlan, need_x: bool, need_w: bool, workers: int):
    ct, m, b = _compute_dtype(x.dtype), x.shape[0], p.block
    g3 = _blocks(grad, p.tiles_n, b, ct)  # [M, Tn, b]
    step = _chunk_tiles(p, m, ct)
    w = _weight_tiles(weight, p, ct) if need_x else None  # [nnz, b (n), b (k)]
    dx3 = torch.zeros(m, p.tiles_k, b, dtype=ct, device=x.device) if need_x else None
    x3 = _blocks(x, p.tiles_k, b, ct) if need_w else None  # [M, Tk, b]
    tiles = g3.new_empty(p.rows.numel(), b, b) if need_w else None

    @torch.no_grad()
    def work(start: int, end: int) -> None:  # tiles [start, end) cover whole tile columns: disjoint columns of dX
        g_chunk = _scratch_buffer(0, (m, step, b), ct, x.device)
        partial = _scratch_buffer(1, (step, m, b), ct, x.device)
        x_chunk = _scratch_buffer(2, (m, step, b), ct, x.device)
        for s in range(start, end, step):
            e = min(s + step, end)
            n = e - s
            torch.index_select(g3, 1, p.rows[s:e], out=g_chunk[:, :n])  # one gather serves dX and dW
            if need_x:
                torch.bmm(g_chunk[:, :n].transpose(0, 1), w[s:e], out=partial[:n])  # [n, M, b (k)]
                dx3.index_add_(1, p.cols[s:e], partial[:n].transpose(0, 1))
            if need_w:
                torch.index_select(x3, 1, p.cols[s:e], out=x_chunk[:, :n])
                torch.bmm(g_chunk[:, :n].permute(1, 2, 0), x_chunk[:, :n].transpose(0, 1), out=tiles[s:e])

    _run_parts(work, p.parts("cols", workers))
    grad_x = _unblocks(dx3, p.shape[1], x.dtype) if need_x else None
    grad_w = None
    if need_w:
        tiles = torch.where(p.keep, tiles, torch.zeros((), dtype=ct)).to(x.dtype)
        # index_add_, not index_copy_: off-edge positions all point at offset 0 and must add exact zeros
        grad_w = x.new_zeros(p.shape).view(-1).index_add_(0, p.elems, tiles.view(-1)).view(p.shape)
    return grad_x, grad_w
