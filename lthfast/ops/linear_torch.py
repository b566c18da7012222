"""The torch path of the masked linear op: block-sparse on CPU when few weight tiles are alive, unstructured sparse
(``lthfast.ops.sparse_cpu``) when few weights are, dense otherwise.

Block-sparse (CPU tensors only). The alive [b x b] weight tiles are grouped by tile row (forward, dW) and by tile
column (dX); each group is ONE matrix product whose inner dimension concatenates the group's tiles, with X [M, K]
gathered once per call as its alive column blocks [M, nnz, b] (row-major tile order) and dY [M, N] as
[M, nnz, b] (column-major tile order):
  forward  Y[:, n-tile r]  = bias_r + Xg[:, tiles of r] @ [W_t^T stacked over r's tiles]      ([M, n_r b] @ [n_r b, b])
  dX       dX[:, k-tile c] = dYg[:, tiles of c] @ [W_t stacked over c's tiles]               ([M, n_c b] @ [n_c b, b])
  dW       [dW_t over r's tiles] = dY[:, n-tile r]^T @ Xg[:, tiles of r]   then ⊙ M           ([b, M] @ [M, n_r b])
Products write straight into strided slices of the outputs (BLAS takes the leading dimension), so nothing is
scattered or summed afterwards: each output block is one product, whichever worker computes it.
For fp32 compute (fp16/bf16 included) the same three passes run in C++ when lthfast._C has its block kernels
(csrc/block_matmul.cpp, AVX2 + FMA): X and dY read in place, no per-tile-row products, no scatter for dW.
Dense: torch on W ⊙ M (``torch.where``, so a NaN stored under a pruned entry cannot leak), MKL/cuBLAS GEMMs.

Which one runs is decided per call from the mask's (cached) tile index: see ``plan``.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from lthfast import _backend
from lthfast.indexing.tiles import TileIndex, cached_on_mask, tile_index
from lthfast.ops import sparse_cpu
from lthfast.ops.masking import mask_, masked
from lthfast.reference import SAME_WIDTH_INT, masked_weight

# Tile sizes tried on CPU, and the tile density below which each beats dense MKL: CPU_CROSSOVER for the C++ kernels
# (benchmarks/results/masked_linear-crossover-cpu-ext.json), CPU_CROSSOVER_TORCH for the torch block products
# (float64, or no kernels; masked_linear-crossover-cpu.json), each the last density still clearly faster on the
# 2-core AMD EPYC VM (figures in docs/performance.md). 16x16 tiles were never worth it.
CPU_CROSSOVER = {64: 0.6, 32: 0.5}
CPU_CROSSOVER_TORCH = {64: 0.25, 32: 0.25}
# Below this many dense multiply-adds (M * N * K) the extra small ops of the block path cost more than the GEMM
# they save (about 0.3 ms of overhead against ~60 GFLOP/s dense on this machine).
CPU_MIN_MACS = 2**23
# Python worker threads that split the groups, each on one intra-op thread (ATen releases the GIL in its products),
# at most torch's thread count. Not one loop with every product on all intra-op threads: each small product is an
# OpenMP region that waits for every thread, which on a shared machine made the step 2.4x slower
# (docs/performance.md).
MAX_WORKERS = 8
# The C++ block kernels (csrc/block_matmul.cpp) for fp32 compute when lthfast._C has them and the CPU has AVX2 +
# FMA; tests turn this off to run the torch block path on the same cases.
USE_EXT = True


@dataclass(frozen=True)
class BlockPlan:
    """Gather indices of the alive [block x block] tiles of one mask [N, K] (int64 / bool, the mask's device).

    Row-major tile order (sorted by tile row, then column): ``rows``, ``cols`` [nnz]; ``row_starts`` [Tn + 1] the
    first tile of each tile row; ``elems_f`` [nnz * b * b] flat weight offsets ``r * K + c`` of each tile
    transposed ([b (k), b (n)] per tile) and ``keep_f`` [nnz, b, b] its mask. Column-major order (by tile
    column, then row): ``rows_c``, ``cols_c``, ``col_starts`` [Tk + 1], ``elems_b`` / ``keep_b`` ([b (n), b (k)]
    per tile). Positions past the weight's edge point at offset 0 with keep False: they gather a value that is
    then zeroed, and add an exact zero when dW is scattered.
    For the C++ kernels (int64 / bool, CPU): ``starts_f`` / ``starts_b`` the tile starts as tensors, ``a_cols_f``
    = ``cols * b`` and ``a_cols_b`` = ``rows_c * b`` the first input column each tile reads, ``keep_r``
    [nnz, b (n), b (k)] the mask of each tile in row-major tile order.
    """

    block: int
    shape: tuple[int, int]
    tiles_n: int
    tiles_k: int
    rows: torch.Tensor
    cols: torch.Tensor
    row_starts: list[int]
    elems_f: torch.Tensor
    keep_f: torch.Tensor
    rows_c: torch.Tensor
    cols_c: torch.Tensor
    col_starts: list[int]
    elems_b: torch.Tensor
    keep_b: torch.Tensor
    starts_f: torch.Tensor
    a_cols_f: torch.Tensor
    starts_b: torch.Tensor
    a_cols_b: torch.Tensor
    keep_r: torch.Tensor
    splits: dict = field(default_factory=dict, compare=False, repr=False)  # parts() cache

    @property
    def nnz(self) -> int:
        return self.rows.numel()

    def parts(self, key: str, count: int) -> list[tuple[int, int]]:
        """Split the tile rows ("rows") or columns ("cols") into at most ``count`` ranges [g0, g1) holding about
        equal numbers of tiles: workers then write disjoint output blocks."""
        if (key, count) not in self.splits:
            starts = self.row_starts if key == "rows" else self.col_starts
            groups, nnz, bounds = len(starts) - 1, starts[-1], [0]
            for i in range(1, count):
                g = bounds[-1]
                while g < groups and starts[g] < i * nnz / count:
                    g += 1
                bounds.append(g)
            bounds.append(groups)
            self.splits[(key, count)] = [(s, e) for s, e in zip(bounds, bounds[1:]) if e > s]
        return self.splits[(key, count)]


def _tile_elems(mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, b: int, transpose: bool):
    n, k = mask.shape
    within = torch.arange(b, device=mask.device)
    row_ids = (rows[:, None] * b + within)[:, :, None]  # [nnz, b, 1] weight rows of each tile
    col_ids = (cols[:, None] * b + within)[:, None, :]  # [nnz, 1, b] weight columns
    inside = (row_ids < n) & (col_ids < k)
    elems = torch.where(inside, row_ids * k + col_ids, 0)
    keep = mask.reshape(-1)[elems] & inside
    if transpose:
        elems, keep = elems.transpose(1, 2), keep.transpose(1, 2)
    return elems.reshape(-1).contiguous(), keep.contiguous()


def _build_plan(mask: torch.Tensor, index: TileIndex) -> BlockPlan:
    b = index.block_n
    rows, cols = index.tile_rows.long(), index.tile_cols.long()
    order = torch.argsort(rows * index.tiles_k + cols)
    rows, cols = rows[order], cols[order]
    order_c = torch.argsort(cols * index.tiles_n + rows)
    rows_c, cols_c = rows[order_c], cols[order_c]
    row_starts = torch.searchsorted(rows, torch.arange(index.tiles_n + 1, device=mask.device)).tolist()
    col_starts = torch.searchsorted(cols_c, torch.arange(index.tiles_k + 1, device=mask.device)).tolist()
    elems_f, keep_f = _tile_elems(mask, rows, cols, b, transpose=True)
    elems_b, keep_b = _tile_elems(mask, rows_c, cols_c, b, transpose=False)
    as_tensor = lambda starts: torch.tensor(starts, dtype=torch.int64, device=mask.device)
    return BlockPlan(b, tuple(mask.shape), index.tiles_n, index.tiles_k, rows, cols, row_starts, elems_f, keep_f,
                     rows_c, cols_c, col_starts, elems_b, keep_b, as_tensor(row_starts), cols * b,
                     as_tensor(col_starts), rows_c * b, keep_f.transpose(1, 2).contiguous())  # fmt: skip


def _plan_of(mask: torch.Tensor, index: TileIndex) -> BlockPlan:
    """The block plan of ``index``, cached on the mask beside its tile index: never older than the mask's contents."""
    return cached_on_mask(mask, ("plan", index.block_n, index.block_k), lambda: _build_plan(mask, index))


def plan(mask: torch.Tensor, rows: int, dtype: torch.dtype = torch.float32) -> BlockPlan | None:
    """The block plan to use for ``mask`` [N, K] with ``rows`` input rows of ``dtype``, or None for the dense path.

    Block-sparse only on CPU, for problems of at least ``CPU_MIN_MACS``, and with the tile size whose tile
    density is furthest below its measured crossover (``CPU_CROSSOVER`` where the C++ kernels take the dtype,
    ``CPU_CROSSOVER_TORCH`` otherwise).
    """
    n, k = mask.shape
    if mask.device.type != "cpu" or rows * n * k < CPU_MIN_MACS:
        return None
    crossovers = CPU_CROSSOVER if _block_ext(_compute_dtype(dtype)) is not None else CPU_CROSSOVER_TORCH
    # the choice cached on the mask beside the indices it reads (one lookup per call instead of one per tile size)
    return cached_on_mask(mask, ("plan-of", *crossovers.items()), lambda: _best_plan(mask, crossovers))


def _best_plan(mask: torch.Tensor, crossovers: dict[int, float]) -> BlockPlan | None:
    best, best_ratio = None, 1.0
    for block, crossover in crossovers.items():
        index = tile_index(mask, block, block)
        ratio = index.tile_density / crossover
        if ratio < best_ratio:
            best, best_ratio = index, ratio
    return None if best is None else _plan_of(mask, best)


# ------------------------------------------------------------------------------------------------ helpers


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 tiles are multiplied and summed in fp32 (the kernels' numerics); fp32/fp64 stay as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _padded(t: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """t [M, C] as a contiguous [M, length >= C] in ``dtype``, columns past C zero (t itself when it fits)."""
    m, c = t.shape
    if c == length and t.dtype == dtype and t.is_contiguous():
        return t
    out = t.new_empty(m, length, dtype=dtype)
    out[:, :c] = t
    out[:, c:] = 0
    return out


def _cut(t: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[M, L] -> [M, length] contiguous in ``dtype`` (t itself when nothing is cut or cast)."""
    if t.shape[1] == length and t.dtype == dtype:
        return t
    return t[:, :length].to(dtype, memory_format=torch.contiguous_format)


def _tiles(weight: torch.Tensor, elems: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The alive tiles of W ⊙ M in the plan's layout, [nnz, b, b] in ``dtype``."""
    tiles = weight.reshape(-1).index_select(0, elems).view(keep.shape).to(dtype)  # a fresh tensor
    return mask_(tiles, keep)


_scratch = threading.local()


def _scratch_masked_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """W ⊙ M (``reference.masked_weight``'s bits) in a per-thread buffer reused across calls: only for products
    that do not keep it. A fresh 16 MB temporary per call page-faults on the shared VM: the 2048x2048 dense-route
    training step spent ~20 ms of 150 ms in its three mask products, 2 threads."""
    if weight.device.type != "cpu" or SAME_WIDTH_INT.get(weight.dtype) is None or mask.dtype != torch.bool:
        return masked_weight(weight, mask)
    key = (weight.dtype, tuple(weight.shape))
    buffers = _scratch.__dict__.setdefault("buffers", {})
    out = buffers.get(key)
    if out is None:
        buffers.clear()  # one buffer per thread: the layer being computed
        out = buffers[key] = torch.empty(weight.shape, dtype=weight.dtype)
    return masked(weight, mask, out=out)


_pool: ThreadPoolExecutor | None = None


def _run_parts(work, parts: list[tuple[int, int]]) -> None:
    """``work(g0, g1)`` for every part: one on this thread, the others on the pool's threads, each part on one
    intra-op thread (the workers are the parallelism)."""
    global _pool
    if len(parts) == 1:
        work(*parts[0])
        return
    if _pool is None or _pool._max_workers < len(parts) - 1:
        _pool = ThreadPoolExecutor(len(parts) - 1, "lthfast-block", initializer=torch.set_num_threads, initargs=(1,))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # grad mode is per thread: the products write into out= tensors, which autograd refuses
        futures = [_pool.submit(torch.no_grad()(work), s, e) for s, e in parts[1:]]
        work(*parts[0])
        for f in futures:
            f.result()
    finally:
        torch.set_num_threads(previous)


def _workers() -> int:
    return max(1, min(MAX_WORKERS, torch.get_num_threads()))


def _block_ext(compute_dtype: torch.dtype, block: int = 32):
    """lthfast._C when its block kernels (fp32, tiles a multiple of 16, AVX2 + FMA) serve this call, else None (the
    torch block products)."""
    if not USE_EXT or compute_dtype != torch.float32 or block % 16:
        return None
    ext = _backend.ext()
    if ext is None or not hasattr(ext, "block_rows_product") or not ext.block_kernels_supported():
        return None
    return ext


# ------------------------------------------------------------------------------------------------ the ops


def all_alive(mask: torch.Tensor) -> bool:
    """Whether every entry of ``mask`` is True, cached on the mask's version counter (like its tile index).

    A full mask makes W ⊙ M = W exactly, so the dense route skips its three mask products: IMP's level 0 (and
    any layer left dense) then costs what dense ``F.linear`` costs, ~3 ms less per product than
    ``F.linear(x, w * m)`` (Linear(2048, 2048), batch 512, fp32, 2 threads of the 2-core EPYC VM).
    """
    return cached_on_mask(mask, ("all",), lambda: bool(mask.all()))


def forward(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Y [M, N] = x [M, K] (W ⊙ M)^T + bias, contiguous, x's dtype. Any device; block-sparse on CPU when sparse."""
    p = plan(mask, x.shape[0], x.dtype)
    if p is None and sparse_cpu.use_linear(x, mask):
        return sparse_cpu.linear_forward(x, weight, mask, bias)
    if p is None:
        w = weight if all_alive(mask) else _scratch_masked_weight(weight, mask)
        return torch.nn.functional.linear(x, w, bias).contiguous()
    return _forward_blocks(x, weight, bias, p)


def backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, need_x: bool, need_w: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dX [M, K], dW [N, K]) of ``forward`` for grad [M, N]; None where not needed. dW is zero where M is."""
    p = plan(mask, x.shape[0], x.dtype)
    if p is None and sparse_cpu.use_linear(x, mask):
        return sparse_cpu.linear_backward(grad, x, weight, mask, need_x, need_w)
    if p is None:
        full = all_alive(mask)
        grad_x = grad @ (weight if full else _scratch_masked_weight(weight, mask)) if need_x else None
        grad_w = (grad.t() @ x if full else mask_(grad.t() @ x, mask)) if need_w else None
        return grad_x, grad_w
    grad_x = _grad_input_blocks(grad, weight, p, x.dtype) if need_x else None
    grad_w = _grad_weight_blocks(grad, x, p) if need_w else None
    return grad_x, grad_w


def _gathered(t: torch.Tensor, tiles: int, b: int, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The column blocks ``index`` of t [M, C]: [M, len(index), b] in ``dtype``."""
    return _padded(t, tiles * b, dtype).view(t.shape[0], tiles, b).index_select(1, index)


@torch.no_grad()
def _forward_blocks(x, weight, bias, p: BlockPlan) -> torch.Tensor:
    ct, m, b = _compute_dtype(x.dtype), x.shape[0], p.block
    wf = _tiles(weight, p.elems_f, p.keep_f, ct)  # [nnz, b (k), b (n)]
    y = torch.empty(m, p.tiles_n * b, dtype=ct, device=x.device)
    bias = None if bias is None else _padded(bias[None], p.tiles_n * b, ct)[0]
    ext = _block_ext(ct, b)
    if ext is not None:
        xp = _padded(x, p.tiles_k * b, ct)
        ext.block_rows_product(b, xp.data_ptr(), xp.stride(0), wf.data_ptr(), p.starts_f.data_ptr(),
                               p.a_cols_f.data_ptr(), p.tiles_n, 0 if bias is None else bias.data_ptr(),
                               y.data_ptr(), y.stride(0), m, torch.get_num_threads())  # fmt: skip
        return _cut(y, p.shape[0], x.dtype)
    xg = _gathered(x, p.tiles_k, b, p.cols, ct)  # [M, nnz, b]
    starts = p.row_starts

    def work(g0: int, g1: int) -> None:
        for r in range(g0, g1):
            s, e = starts[r], starts[r + 1]
            out = y[:, r * b : (r + 1) * b]
            if s == e and bias is None:
                out.zero_()
            elif s == e:
                out.copy_(bias[r * b : (r + 1) * b].expand(m, b))
            elif bias is None:
                torch.mm(xg[:, s:e].reshape(m, -1), wf[s:e].view(-1, b), out=out)
            else:
                torch.addmm(bias[r * b : (r + 1) * b], xg[:, s:e].reshape(m, -1), wf[s:e].view(-1, b), out=out)

    _run_parts(work, p.parts("rows", _workers()))
    return _cut(y, p.shape[0], x.dtype)


@torch.no_grad()
def _grad_input_blocks(grad, weight, p: BlockPlan, dtype: torch.dtype) -> torch.Tensor:
    ct, m, b = _compute_dtype(dtype), grad.shape[0], p.block
    wb = _tiles(weight, p.elems_b, p.keep_b, ct)  # [nnz, b (n), b (k)]
    dx = torch.empty(m, p.tiles_k * b, dtype=ct, device=grad.device)
    ext = _block_ext(ct, b)
    if ext is not None:
        gp = _padded(grad, p.tiles_n * b, ct)
        ext.block_rows_product(b, gp.data_ptr(), gp.stride(0), wb.data_ptr(), p.starts_b.data_ptr(),
                               p.a_cols_b.data_ptr(), p.tiles_k, 0, dx.data_ptr(), dx.stride(0), m,
                               torch.get_num_threads())  # fmt: skip
        return _cut(dx, p.shape[1], dtype)
    gg = _gathered(grad, p.tiles_n, b, p.rows_c, ct)  # [M, nnz, b], column-major tiles
    starts = p.col_starts

    def work(g0: int, g1: int) -> None:
        for c in range(g0, g1):
            s, e = starts[c], starts[c + 1]
            out = dx[:, c * b : (c + 1) * b]
            if s == e:
                out.zero_()
            else:
                torch.mm(gg[:, s:e].reshape(m, -1), wb[s:e].view(-1, b), out=out)

    _run_parts(work, p.parts("cols", _workers()))
    return _cut(dx, p.shape[1], dtype)


@torch.no_grad()
def _grad_weight_blocks(grad, x, p: BlockPlan) -> torch.Tensor:
    ct, m, b, nnz = _compute_dtype(x.dtype), x.shape[0], p.block, p.nnz
    g = _padded(grad, p.tiles_n * b, ct)
    ext = _block_ext(ct, b)
    if ext is not None:
        xp = _padded(x, p.tiles_k * b, ct)
        grad_w = torch.zeros(p.shape, dtype=ct, device=x.device)
        ext.block_grad_weight(b, g.data_ptr(), g.stride(0), xp.data_ptr(), xp.stride(0), m, p.rows.data_ptr(),
                              p.cols.data_ptr(), nnz, p.keep_r.data_ptr(), p.shape[0], p.shape[1],
                              grad_w.data_ptr(), torch.get_num_threads())  # fmt: skip
        return grad_w.to(x.dtype)
    xg = _gathered(x, p.tiles_k, b, p.cols, ct)  # [M, nnz, b], row-major tiles (as in the forward)
    products = torch.empty(b, nnz, b, dtype=ct, device=x.device)  # [b (n), tile, b (k)]
    starts = p.row_starts

    def work(g0: int, g1: int) -> None:
        for r in range(g0, g1):
            s, e = starts[r], starts[r + 1]
            if s < e:
                torch.mm(g[:, r * b : (r + 1) * b].t(), xg[:, s:e].reshape(m, -1), out=products[:, s:e].view(b, -1))

    _run_parts(work, p.parts("rows", _workers()))
    # [tile, b (k), b (n)]: the layout of elems_f. index_add_, not index_put_: off-edge positions all point at
    # offset 0 and must add exact zeros rather than race with the real entry there.
    tiles = torch.where(p.keep_f, products.permute(1, 2, 0), torch.zeros((), dtype=ct)).to(x.dtype)
    grad_w = x.new_zeros(p.shape[0] * p.shape[1]).index_add_(0, p.elems_f, tiles.reshape(-1))
    return grad_w.view(p.shape)
