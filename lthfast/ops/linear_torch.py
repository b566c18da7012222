"""The torch path of the masked linear op: block-sparse on CPU when few weight tiles are alive, dense otherwise.

Block-sparse (CPU tensors only): the alive [b x b] weight tiles are gathered, the GEMMs run as one batched
matmul over the tiles, and partial products are summed with ``index_add_``. Working in the transposed space
(X^T [K, B], dY^T [N, B]) makes every gather and scatter act on whole contiguous [b, B] row blocks:
  forward  Y^T[n-tile] += W_t @ X^T[k-tile]          for each alive tile t = (n-tile, k-tile)
  dX       dX^T[k-tile] += W_t^T @ dY^T[n-tile]
  dW       dW_t = (dY^T[n-tile] @ X[k-tile]) ⊙ M_t   (an SDDMM; dead tiles stay zero)
Dense: torch on W ⊙ M (``torch.where``, so a NaN stored under a pruned entry cannot leak), MKL/cuBLAS GEMMs.

Which one runs is decided per call from the mask's (cached) tile index: see ``plan``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from lthfast.kernels.tile_index import TileIndex, tile_index
from lthfast.reference import masked_weight

# Tile sizes tried on CPU, and the tile density below which each beats dense MKL on the training step.
# Measured with benchmarks/bench_masked_linear.py --crossover on the 2-core EPYC (AVX-512) CI machine,
# Linear(2048, 2048), batch 512, fp32: the block path's time grows linearly with the alive tiles and meets the
# dense step at these densities (16x16 tiles run batched GEMMs ~4x slower per flop than 32x32: never worth it).
CPU_CROSSOVER = {64: 0.40, 32: 0.30}
# Below this many dense multiply-adds (M * N * K) the ~20 extra small ops of the block path cost more than
# the GEMM they save (about 0.3 ms of overhead against ~60 GFLOP/s dense on this machine).
CPU_MIN_MACS = 2**23


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


# id(TileIndex) -> (weakref to it, its BlockPlan); a TileIndex lives as long as its mask version (tile_index's
# cache), so a plan can never outlive the mask contents it was built from.
_plans: dict[int, tuple[weakref.ref, BlockPlan]] = {}


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


def _plan_of(mask: torch.Tensor, index: TileIndex) -> BlockPlan:
    entry = _plans.get(id(index))
    if entry is not None and entry[0]() is index:
        return entry[1]
    built = _build_plan(mask, index)
    key = id(index)
    _plans[key] = (weakref.ref(index, lambda _, key=key: _plans.pop(key, None)), built)
    return built


def plan(mask: torch.Tensor, rows: int) -> BlockPlan | None:
    """The block plan to use for ``mask`` [N, K] with ``rows`` input rows, or None for the dense path.

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


def _rows_t(t: torch.Tensor, tiles: int, block: int, dtype: torch.dtype) -> torch.Tensor:
    """t [B, C] -> t^T as [tiles, block, B] in ``dtype`` (rows past C zero): one transposing copy."""
    b, c = t.shape
    out = torch.empty(tiles * block, b, dtype=dtype, device=t.device)
    out[:c].copy_(t.t())
    out[c:].zero_()
    return out.view(tiles, block, b)


def _weight_tiles(weight: torch.Tensor, p: BlockPlan, dtype: torch.dtype) -> torch.Tensor:
    """The alive tiles of W ⊙ M, [nnz, block, block] in ``dtype``."""
    tiles = weight.reshape(-1).index_select(0, p.elems).view(-1, p.block, p.block).to(dtype)
    return torch.where(p.keep, tiles, torch.zeros((), dtype=dtype))


def _unpad_t(t: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[tiles, block, B] (a transposed result) -> [B, length] contiguous in ``dtype``: one transposing copy."""
    flat = t.view(-1, t.shape[-1])[:length]
    return torch.empty(flat.shape[1], length, dtype=dtype, device=t.device).copy_(flat.t())


# ------------------------------------------------------------------------------------------------ the ops


def forward(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Y [M, N] = x [M, K] (W ⊙ M)^T + bias, contiguous, x's dtype. Any device; block-sparse on CPU when sparse."""
    p = plan(mask, x.shape[0])
    if p is None:
        return torch.nn.functional.linear(x, masked_weight(weight, mask), bias).contiguous()
    ct = _compute_dtype(x.dtype)
    xt = _rows_t(x, p.tiles_k, p.block, ct).index_select(0, p.cols)  # [nnz, b, M]
    partial = torch.bmm(_weight_tiles(weight, p, ct), xt)  # [nnz, b, M]
    yt = torch.zeros(p.tiles_n, p.block, x.shape[0], dtype=ct, device=x.device).index_add_(0, p.rows, partial)
    y = _unpad_t(yt, p.shape[0], ct)
    if bias is not None:
        y += bias
    return y.to(x.dtype)


def backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, need_x: bool, need_w: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dX [M, K], dW [N, K]) of ``forward`` for grad [M, N]; None where not needed. dW is zero where M is."""
    p = plan(mask, x.shape[0])
    if p is None:
        grad_x = grad @ masked_weight(weight, mask) if need_x else None
        grad_w = masked_weight(grad.t() @ x, mask) if need_w else None
        return grad_x, grad_w
    ct = _compute_dtype(x.dtype)
    m = x.shape[0]
    gt = _rows_t(grad, p.tiles_n, p.block, ct).index_select(0, p.rows)  # [nnz, b, M]
    grad_x = grad_w = None
    if need_x:
        partial = torch.bmm(_weight_tiles(weight, p, ct).transpose(1, 2), gt)  # [nnz, b, M]
        dxt = torch.zeros(p.tiles_k, p.block, m, dtype=ct, device=x.device).index_add_(0, p.cols, partial)
        grad_x = _unpad_t(dxt, p.shape[1], x.dtype)
    if need_w:
        xt = _rows_t(x, p.tiles_k, p.block, ct).index_select(0, p.cols)  # [nnz, b, M]
        tiles = torch.bmm(gt, xt.transpose(1, 2))  # [nnz, b, b]
        tiles = torch.where(p.keep, tiles, torch.zeros((), dtype=ct)).to(x.dtype)
        # index_add_, not index_copy_: off-edge positions all point at offset 0 and must add exact zeros
        grad_w = x.new_zeros(p.shape).view(-1).index_add_(0, p.elems, tiles.view(-1)).view(p.shape)
    return grad_x, grad_w
