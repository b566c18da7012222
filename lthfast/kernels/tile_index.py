"""The compact tile index of a weight mask: which [block_n x block_k] tiles hold an alive weight.

Built once when a mask changes (prune time), cached per mask tensor and keyed on its version counter,
so a training step never rebuilds it and an in-place mask edit can never leave it stale. Pure torch:
built on the mask's own device (one ``nonzero`` host sync, at prune time only).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileIndex:
    """Tiles of an [N, K] mask cut into [block_n, block_k] blocks (edge tiles are partial).

    All index tensors are int32 on the mask's device:
      row_ptr [Tn + 1], row_cols [nnz]: CSR over tile rows, the alive k-tiles of each n-tile (forward).
      col_ptr [Tk + 1], col_rows [nnz]: CSC, the alive n-tiles of each k-tile (dX = dY (W*M)).
      tile_rows [nnz], tile_cols [nnz]: the alive tiles in row-major order (dW, an SDDMM).
    """

    shape: tuple[int, int]
    block_n: int
    block_k: int
    tile_alive: torch.Tensor
    row_ptr: torch.Tensor
    row_cols: torch.Tensor
    col_ptr: torch.Tensor
    col_rows: torch.Tensor
    tile_rows: torch.Tensor
    tile_cols: torch.Tensor
    alive_tiles: int
    max_row_tiles: int
    max_col_tiles: int

    @property
    def tiles_n(self) -> int:
        return self.tile_alive.shape[0]

    @property
    def tiles_k(self) -> int:
        return self.tile_alive.shape[1]

    @property
    def tile_density(self) -> float:
        total = self.tile_alive.numel()
        return self.alive_tiles / total if total else 0.0


def _ptr(counts: torch.Tensor) -> torch.Tensor:
    ptr = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    torch.cumsum(counts, 0, out=ptr[1:])
    return ptr


def build_tile_index(mask: torch.Tensor, block_n: int, block_k: int) -> TileIndex:
    """Build the tile index of a 2-D bool mask [N, K]. Prefer the cached ``tile_index``."""
    if mask.dim() != 2:
        raise ValueError(f"tile index needs a 2-D mask, got shape {tuple(mask.shape)}")
    n, k = mask.shape
    tiles_n, tiles_k = -(-n // block_n), -(-k // block_k)
    padded = torch.zeros(tiles_n * block_n, tiles_k * block_k, dtype=torch.bool, device=mask.device)
    padded[:n, :k] = mask
    alive = padded.view(tiles_n, block_n, tiles_k, block_k).any(dim=3).any(dim=1)
    tile_rows, tile_cols = alive.nonzero(as_tuple=True)
    col_cols, col_rows = alive.t().nonzero(as_tuple=True)
    row_counts = alive.sum(dim=1, dtype=torch.int32)
    col_counts = alive.sum(dim=0, dtype=torch.int32)
    return TileIndex(
        shape=(n, k),
        block_n=block_n,
        block_k=block_k,
        tile_alive=alive,
        row_ptr=_ptr(row_counts),
        row_cols=tile_cols.to(torch.int32),
        col_ptr=_ptr(col_counts),
        col_rows=col_rows.to(torch.int32),
        tile_rows=tile_rows.to(torch.int32),
        tile_cols=tile_cols.to(torch.int32),
        alive_tiles=int(tile_rows.numel()),
        max_row_tiles=int(row_counts.max()) if row_counts.numel() else 0,
        max_col_tiles=int(col_counts.max()) if col_counts.numel() else 0,
    )


# id(mask owner) -> (weakref to owner, owner._version, {(shape, stride, offset, bn, bk): TileIndex})
_cache: dict[int, tuple[weakref.ref, int, dict]] = {}


def _forget(ref: weakref.ref) -> None:
    for owner_id, entry in list(_cache.items()):
        if entry[0] is ref:
            del _cache[owner_id]


def tile_index(mask: torch.Tensor, block_n: int, block_k: int) -> TileIndex:
    """The tile index of ``mask`` (2-D bool), cached on the mask tensor (or the tensor it views).

    The cache entry is dropped when the mask's version counter moves (any in-place write, e.g.
    ``mask.copy_``, ``mask[...] = False``, ``load_state_dict``) and when the mask is freed.
    """
    owner = mask._base if mask._base is not None else mask
    if owner.is_inference() or torch._C._functorch.is_functorch_wrapped_tensor(owner):
        return build_tile_index(mask, block_n, block_k)
    key = (tuple(mask.shape), mask.stride(), mask.storage_offset(), block_n, block_k)
    owner_id = id(owner)
    entry = _cache.get(owner_id)
    if entry is None or entry[0]() is not owner or entry[1] != owner._version:
        entry = (weakref.ref(owner, _forget), owner._version, {})
        _cache[owner_id] = entry
    index = entry[2].get(key)
    if index is None:
        index = build_tile_index(mask, block_n, block_k)
        entry[2][key] = index
    return index
