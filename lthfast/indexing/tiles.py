"""The compact tile index of a weight mask: which [block_n x block_k] tiles hold an alive weight.

Built once when a mask changes (prune time), cached per mask tensor and keyed on its version counter,
so a training step never rebuilds it and an in-place mask edit can never leave it stale. Built on the
mask's own device with torch (one ``nonzero`` host sync, at prune time only); CPU masks are indexed by one
call of lthfast._C when it is built (csrc/tile_index.cpp), else with numpy, which is cheaper per call than
torch on these small arrays.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from lthfast import _backend


@dataclass(frozen=True)
class TileIndex:
    """Tiles of an [N, K] mask cut into [block_n, block_k] blocks (edge tiles are partial).

    All index tensors are contiguous int32 on the mask's device (row_cols and tile_cols are one tensor):
      row_ptr [Tn + 1], row_cols [nnz]: CSR over tile rows, the alive k-tiles of each n-tile (forward).
      col_ptr [Tk + 1], col_rows [nnz]: CSC, the alive n-tiles of each k-tile (dX = dY (W*M)).
      tile_rows [nnz], tile_cols [nnz]: the alive tiles in row-major order (dW, an SDDMM).
    ``derived`` caches what is computed from the index later (``column_groups``), dropped with it.
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
    derived: dict = field(default_factory=dict, compare=False, repr=False)

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


def _whole_tiles(mask: torch.Tensor, block_n: int, block_k: int) -> torch.Tensor:
    """``mask`` as contiguous bytes cut into whole tiles (8-byte aligned): itself when it allows, else a copy
    into a zero-padded buffer."""
    n, k = mask.shape
    if n % block_n or k % block_k or not mask.is_contiguous() or mask.storage_offset() % 8:
        padded = torch.zeros(
            -(-n // block_n) * block_n, -(-k // block_k) * block_k, dtype=torch.bool, device=mask.device
        )
        padded[:n, :k] = mask
        mask = padded
    return mask


# A tile of an unstructured mask nearly always has an alive entry in its first 4 rows (all 128 entries pruned:
# 0.9^128 = 1e-6 at 10% density, IMP round 10 at 20% per round): those rows decide the tiles reading 4/block_n
# of the mask, and the full reduction runs only when a tile is left undecided (one row was not enough: with
# thousands of tiles, 0.9^32 = 3% left some in most layers).
_HEAD_ROWS = 4


def _tile_alive_torch(m: torch.Tensor, tiles_n: int, tiles_k: int, block_n: int, block_k: int) -> torch.Tensor:
    m = m.view(torch.uint8)
    if block_k % 8:
        return m.view(tiles_n, block_n, tiles_k, block_k).amax(dim=1).amax(dim=2) != 0
    # 8 mask bytes as one int64 word, nonzero iff one entry is alive; a tile's rows first (a reduction over a
    # middle dimension, vectorized along the contiguous last one).
    words = m.view(torch.int64).view(tiles_n, block_n, tiles_k * block_k // 8)
    head = words.narrow(1, 0, min(_HEAD_ROWS, block_n)).amax(dim=1)
    alive = head.view(tiles_n, tiles_k, block_k // 8).amax(dim=2) != 0
    if bool(alive.all()):
        return alive
    return words.amax(dim=1).view(tiles_n, tiles_k, block_k // 8).amax(dim=2) != 0


def _tile_alive_numpy(m: torch.Tensor, tiles_n: int, tiles_k: int, block_n: int, block_k: int) -> np.ndarray:
    """CPU: as _tile_alive_torch with numpy, whose per-call overhead (~1-3 us) is a fraction of torch's."""
    m = m.numpy().view(np.uint8)
    if block_k % 8:
        return m.reshape(tiles_n, block_n, tiles_k, block_k).any(axis=(1, 3))
    words = m.view(np.uint64).reshape(tiles_n, block_n, tiles_k * block_k // 8)
    head = np.bitwise_or.reduce(words[:, : min(_HEAD_ROWS, block_n)], axis=1)
    alive = head.reshape(tiles_n, tiles_k, block_k // 8).any(axis=2)
    if alive.all():
        return alive
    return np.bitwise_or.reduce(words, axis=1).reshape(tiles_n, tiles_k, block_k // 8).any(axis=2)


def tile_alive(mask: torch.Tensor, block_n: int, block_k: int) -> torch.Tensor:
    """[ceil(N / block_n), ceil(K / block_k)] bool: which tiles of the 2-D bool mask [N, K] hold an alive entry.

    The mask's bytes are reduced as integers, eight at a time as one 64-bit word when ``block_k`` is a multiple
    of 8; a tile's first rows decide it when one holds an alive entry; numpy on CPU, torch elsewhere. The mask
    is copied (zero-padded) only when the tiles do not divide it or its memory does not allow the views.
    ResNet-50's 54 masks (25.5M entries), 32x32 tiles, 2-core EPYC dev box: 4.8 ms for a full int64 reduction
    over the 52 that divide (2 threads), against 37 ms for pad + ``any`` and 23 ms for ``amax`` over bytes.
    """
    n, k = mask.shape
    tiles_n, tiles_k = -(-n // block_n), -(-k // block_k)
    if mask.numel() == 0:
        return torch.zeros(tiles_n, tiles_k, dtype=torch.bool, device=mask.device)
    m = _whole_tiles(mask, block_n, block_k)
    if m.device.type == "cpu":
        return torch.from_numpy(_tile_alive_numpy(m, tiles_n, tiles_k, block_n, block_k))
    return _tile_alive_torch(m, tiles_n, tiles_k, block_n, block_k)


def _index_arrays_numpy(alive: torch.Tensor) -> tuple:
    """CPU: the index arrays of a tile map with numpy, whose per-call overhead (~1-3 us) is a fraction of
    torch's (~5-10 us): ResNet-50's 54 tile maps take 3.5 ms instead of 6.1 ms on the 2-core EPYC dev box."""
    a = alive.numpy()
    rows, cols = np.nonzero(a)
    col_rows = np.nonzero(a.T)[1]
    row_counts, col_counts = a.sum(axis=1, dtype=np.int32), a.sum(axis=0, dtype=np.int32)
    row_ptr, col_ptr = np.zeros(a.shape[0] + 1, np.int32), np.zeros(a.shape[1] + 1, np.int32)
    np.cumsum(row_counts, out=row_ptr[1:])
    np.cumsum(col_counts, out=col_ptr[1:])
    cols = torch.from_numpy(cols.astype(np.int32))
    return (
        torch.from_numpy(row_ptr), cols, torch.from_numpy(col_ptr), torch.from_numpy(col_rows.astype(np.int32)),
        torch.from_numpy(rows.astype(np.int32)), cols,
        int(row_counts.max()) if row_counts.size else 0, int(col_counts.max()) if col_counts.size else 0,
    )  # fmt: skip


def _index_arrays_torch(alive: torch.Tensor) -> tuple:
    """Any device: the index arrays of a tile map with torch ops on its device."""
    tile_rows, tile_cols = alive.nonzero(as_tuple=True)
    col_rows = alive.t().nonzero(as_tuple=True)[1]
    row_counts = alive.sum(dim=1, dtype=torch.int32)
    col_counts = alive.sum(dim=0, dtype=torch.int32)
    cols = tile_cols.to(torch.int32)
    return (
        _ptr(row_counts), cols, _ptr(col_counts), col_rows.to(torch.int32), tile_rows.to(torch.int32), cols,
        int(row_counts.max()) if row_counts.numel() else 0, int(col_counts.max()) if col_counts.numel() else 0,
    )  # fmt: skip


def _ext_ok(mask: torch.Tensor, stride: tuple, k: int):
    """lthfast._C when it can index ``mask`` as an [N, k] view of that stride (a CPU bool mask with unit column
    stride and rows that do not overlap: not a row broadcast by ``expand``), else None."""
    if not mask.is_cpu or mask.dtype != torch.bool or (stride[1] != 1 and k > 1):
        return None
    if mask.shape[0] > 1 and stride[0] < k:
        return None
    return _backend.ext()


def _row_stride(n: int, k: int, stride: tuple) -> int:
    return stride[0] if n > 1 else k


def _from_arrays(shape, block_n: int, block_k: int, alive, arrays) -> TileIndex:
    row_ptr, row_cols, col_ptr, col_rows, tile_rows, tile_cols, max_row, max_col = arrays
    return TileIndex(
        shape=tuple(shape),
        block_n=block_n,
        block_k=block_k,
        tile_alive=alive,
        row_ptr=row_ptr,
        row_cols=row_cols,
        col_ptr=col_ptr,
        col_rows=col_rows,
        tile_rows=tile_rows,
        tile_cols=tile_cols,
        alive_tiles=int(tile_rows.numel()),
        max_row_tiles=max_row,
        max_col_tiles=max_col,
    )


def _from_ext(shape, block_n: int, block_k: int, out: tuple) -> TileIndex:
    """A TileIndex from the tuple of lthfast._C.tile_index / tile_indices (numpy arrays, no copies)."""
    alive, row_ptr, row_cols, col_ptr, col_rows, tile_rows, max_row, max_col = out
    row_cols = torch.from_numpy(row_cols)
    return TileIndex(
        shape, block_n, block_k, torch.from_numpy(alive), torch.from_numpy(row_ptr), row_cols,
        torch.from_numpy(col_ptr), torch.from_numpy(col_rows), torch.from_numpy(tile_rows), row_cols,
        len(tile_rows), max_row, max_col,
    )  # fmt: skip


def _check_2d(mask: torch.Tensor) -> None:
    if mask.dim() != 2:
        raise ValueError(f"tile index needs a 2-D mask, got shape {tuple(mask.shape)}")


def build_tile_index(mask: torch.Tensor, block_n: int, block_k: int) -> TileIndex:
    """Build the tile index of a 2-D bool mask [N, K]. Prefer the cached ``tile_index``."""
    _check_2d(mask)
    n, k = mask.shape
    ext = _ext_ok(mask, mask.stride(), k)
    if ext is not None:
        # One C++ call (tile_index.cpp): ~25x fewer calls than the numpy path, and the first rows of a tile
        # usually settle it. ResNet-50's 54 masks over 10 IMP rounds, 32x32 tiles: 3-7 ms against 11-18 ms.
        row_stride = _row_stride(n, k, mask.stride())
        return _from_ext((n, k), block_n, block_k, ext.tile_index(mask.data_ptr(), n, k, row_stride, block_n, block_k))
    if mask.is_cuda and torch.cuda.is_current_stream_capturing():  # nonzero() syncs, which a capture forbids
        raise RuntimeError(
            f"lthfast: the tile index of a mask {tuple(mask.shape)} is built at its first use, which cannot happen "
            "inside a CUDA graph capture: run one eager step with this mask before capturing"
        )
    alive = tile_alive(mask, block_n, block_k)
    arrays = _index_arrays_numpy if alive.device.type == "cpu" else _index_arrays_torch
    return _from_arrays((n, k), block_n, block_k, alive, arrays(alive))


def column_groups(index: TileIndex, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols), int32 [L] on the index's device: the alive tiles in column order (the CSC's), each k-tile
    column's run padded with row -1 to a multiple of ``group``; ``cols[i]`` is entry i's k-tile, padding included.
    A dW program over ``group`` consecutive entries (any divisor of ``group``) reads tiles of one column only, so
    one X slab serves them all. Cached on the index; built on the host at first use (one copy from the device).
    """
    key = ("column groups", group)
    if key in index.derived:
        return index.derived[key]
    _host_build_check(index, "dW column groups")
    col_ptr, col_rows = index.col_ptr.cpu().numpy().astype(np.int64), index.col_rows.cpu().numpy()
    counts = np.diff(col_ptr)
    padded = -(-counts // group) * group
    starts = np.cumsum(padded) - padded
    entry_col = np.repeat(np.arange(counts.size), counts)
    rows = np.full(int(padded.sum()), -1, dtype=np.int32)
    rows[starts[entry_col] + np.arange(entry_col.size) - col_ptr[entry_col]] = col_rows
    cols = np.repeat(np.arange(counts.size, dtype=np.int32), padded)
    device = index.col_ptr.device
    index.derived[key] = (torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device))
    return index.derived[key]


def dead_tiles(index: TileIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols), int32 [D] on the index's device: the tiles without an alive entry, in row-major order. No dW
    program computes them, so the dW launches store zeros there themselves (dW needs no zero-fill of its own).
    Cached on the index (a function of its tile map alone); built on the host at first use (one copy from the device).
    """
    key = ("dead tiles",)
    if key in index.derived:
        return index.derived[key]
    _host_build_check(index, "dead-tile lists")
    rows, cols = np.nonzero(~index.tile_alive.cpu().numpy())
    device = index.col_ptr.device
    index.derived[key] = tuple(torch.from_numpy(a.astype(np.int32)).to(device) for a in (rows, cols))
    return index.derived[key]


def _host_build_check(index: TileIndex, what: str) -> None:
    if index.col_ptr.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"lthfast: the {what} of a tile index {index.shape} are built at their first use, which cannot happen "
            "inside a CUDA graph capture: run one eager step with this mask before capturing"
        )


def tile_full(mask: torch.Tensor, block_n: int, block_k: int) -> np.ndarray:
    """[ceil(N / block_n), ceil(K / block_k)] bool on the host: the tiles whose every entry inside the mask is
    alive (an edge tile counts only its entries inside [N, K])."""
    m = mask.detach().cpu().numpy()
    n, k = m.shape
    tiles_n, tiles_k = -(-n // block_n), -(-k // block_k)
    if n % block_n or k % block_k:
        padded = np.ones((tiles_n * block_n, tiles_k * block_k), dtype=bool)
        padded[:n, :k] = m
        m = padded
    return m.reshape(tiles_n, block_n, tiles_k, block_k).all(axis=(1, 3))


@dataclass(frozen=True)
class FullPartial:
    """The alive tiles of a ``TileIndex`` split into full tiles (every entry alive: the kernels skip the mask) and
    partial ones (the mask applied), int32 on the index's device:
      row_cols [nnz], row_mid [Tn]: each tile row's alive k-tiles, the full ones first; row n's full tiles are
        ``row_cols[row_ptr[n]:row_mid[n]]`` and its partial ones ``row_cols[row_mid[n]:row_ptr[n + 1]]``;
      col_rows [nnz], col_mid [Tk]: the same per tile column (dX);
      ``full_tiles`` / ``partial_tiles``: the counts.
    """

    row_cols: torch.Tensor
    row_mid: torch.Tensor
    col_rows: torch.Tensor
    col_mid: torch.Tensor
    full_tiles: int
    partial_tiles: int


def _full_first(ptr: np.ndarray, items: np.ndarray, full: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each run ``items[ptr[i]:ptr[i + 1]]`` reordered full entries first (stable), and the run's full end."""
    run = np.repeat(np.arange(ptr.size - 1), np.diff(ptr))
    order = np.lexsort((~full, run))  # by run, then full before partial, then the original order
    mid = ptr[:-1] + np.bincount(run, weights=full, minlength=ptr.size - 1).astype(np.int64)
    return items[order], mid


def full_partial(index: TileIndex, mask: torch.Tensor) -> FullPartial:
    """The full / partial split of ``index`` (built from ``mask``), cached on the index; built on the host at
    first use (one copy of the mask from the device)."""
    key = ("full partial",)
    if key in index.derived:
        return index.derived[key]
    _host_build_check(index, "full / partial tile lists")
    full = tile_full(mask.reshape(index.shape), index.block_n, index.block_k)
    row_ptr, row_cols = index.row_ptr.cpu().numpy().astype(np.int64), index.row_cols.cpu().numpy()
    col_ptr, col_rows = index.col_ptr.cpu().numpy().astype(np.int64), index.col_rows.cpu().numpy()
    row_run = np.repeat(np.arange(row_ptr.size - 1), np.diff(row_ptr))
    col_run = np.repeat(np.arange(col_ptr.size - 1), np.diff(col_ptr))
    cols, row_mid = _full_first(row_ptr, row_cols, full[row_run, row_cols])
    rows, col_mid = _full_first(col_ptr, col_rows, full[col_rows, col_run])
    count = int(full[row_run, row_cols].sum())
    device = index.row_ptr.device
    out = FullPartial(
        torch.from_numpy(cols.astype(np.int32)).to(device), torch.from_numpy(row_mid.astype(np.int32)).to(device),
        torch.from_numpy(rows.astype(np.int32)).to(device), torch.from_numpy(col_mid.astype(np.int32)).to(device),
        count, index.alive_tiles - count,
    )  # fmt: skip
    index.derived[key] = out
    return out


def tile_full_flags(index: TileIndex, mask: torch.Tensor) -> torch.Tensor:
    """int8 [nnz], aligned with ``index.tile_rows`` / ``tile_cols``: 1 for a full tile. Cached on the index."""
    key = ("tile full",)
    if key in index.derived:
        return index.derived[key]
    _host_build_check(index, "full-tile flags")
    full = tile_full(mask.reshape(index.shape), index.block_n, index.block_k)
    flags = full[index.tile_rows.cpu().numpy(), index.tile_cols.cpu().numpy()]
    index.derived[key] = torch.from_numpy(flags.astype(np.int8)).to(index.row_ptr.device)
    return index.derived[key]


def group_full(index: TileIndex, mask: torch.Tensor, group: int) -> torch.Tensor:
    """int8 [L], aligned with ``column_groups(index, group)``: 1 where the entry is a full tile or padding (the dW
    kernels store a group of full tiles without reading the mask), 0 for a partial tile. Cached on the index."""
    key = ("group full", group)
    if key in index.derived:
        return index.derived[key]
    rows, cols = column_groups(index, group)
    _host_build_check(index, "dW full-tile flags")
    full = tile_full(mask.reshape(index.shape), index.block_n, index.block_k)
    r, c = rows.cpu().numpy(), cols.cpu().numpy()
    flags = np.where(r < 0, True, full[np.maximum(r, 0), c])
    index.derived[key] = torch.from_numpy(flags.astype(np.int8)).to(index.row_ptr.device)
    return index.derived[key]


# id(mask owner) -> (weakref to owner, contents_stamp(owner), {key: value}); keys start with the view's
# (shape, stride, offset)
_cache: dict[int, tuple[weakref.ref, tuple[int, int], dict, weakref.ref]] = {}


# What CUDA graphs captured, kept for the life of the process (id -> object): a tile index is dropped from the cache
# when its mask changes, and a graph replayed after that (one not captured again after a prune) would read freed
# memory. Kept, it reads the old index: a superset of the alive tiles while masks only shrink (IMP), which stays
# exact because the kernels apply the mask itself elementwise. Indices are small (int32 per alive tile).
_graph_kept: dict[int, object] = {}


def keep_if_capturing(t: torch.Tensor, obj) -> None:
    """Keep ``obj`` alive for good when a CUDA graph is being captured on ``t``'s device (``t`` a CUDA tensor)."""
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        _graph_kept[id(obj)] = obj


def _forget(ref: weakref.ref) -> None:
    if _cache is None:  # interpreter shutdown: the module's globals are already cleared
        return
    for owner_id, entry in list(_cache.items()):
        if entry[0] is ref:
            del _cache[owner_id]


def _untracked(owner: torch.Tensor) -> bool:
    """Inference and functorch-wrapped tensors have no usable version counter: never cached."""
    return owner.is_inference() or torch._C._functorch.is_functorch_wrapped_tensor(owner)


def contents_stamp(t: torch.Tensor) -> tuple[int, int]:
    """What the mask caches take as "the contents did not change": the version counter, which any in-place write
    through autograd bumps, and the storage address, which ``t.data = other`` or ``t.set_(...)`` change without
    bumping it. Writes through ``t.data[...]`` or a NumPy view move neither: see MaskedLinear's docstring."""
    return t._version, t.data_ptr()


def _renew(owner: torch.Tensor) -> tuple[dict, dict | None]:
    """The cache dict of ``owner`` at its current version (a fresh one when the version moved, the storage was
    swapped or the id was reused), and the dict of ``owner``'s earlier version that this call dropped, if it did.

    The storage is compared by identity too (a weak reference to torch's storage object): two ``mask.data = new``
    swaps can hand the second new storage the freed address of the first, with the version unchanged."""
    owner_id = id(owner)
    entry = _cache.get(owner_id)
    stamp = contents_stamp(owner)
    storage = owner.untyped_storage()
    if entry is not None and entry[0]() is owner and entry[1] == stamp and entry[3]() is storage:
        return entry[2], None
    dropped = entry[2] if entry is not None and entry[0]() is owner else None
    _cache[owner_id] = (weakref.ref(owner, _forget), stamp, {}, weakref.ref(storage))
    return _cache[owner_id][2], dropped


def _entries(owner: torch.Tensor) -> dict:
    """The cache dict of ``owner`` at its current version (``_renew``)."""
    return _renew(owner)[0]


def _key_of(shape: tuple, stride: tuple, offset: int, what: tuple) -> tuple:
    return (shape, stride, offset, *what)


def _key(mask: torch.Tensor, what: tuple) -> tuple:
    return _key_of(tuple(mask.shape), mask.stride(), mask.storage_offset(), what)


def cached_on_mask(mask: torch.Tensor, what: tuple, build):
    """``build()``, cached on ``mask`` (or the tensor it views) under ``what`` and the view's geometry.

    Every entry of a mask is dropped when its version counter moves (any in-place write, e.g. ``mask.copy_``,
    ``mask[...] = False``, ``load_state_dict``, lthfast.threshold's raw-pointer writes), when its storage is
    swapped (``mask.data = new``: ``contents_stamp``) and when it is freed.
    Inference and functorch-wrapped tensors have no usable version counter: built every time.
    """
    owner = mask._base if mask._base is not None else mask
    if _untracked(owner):
        return build()
    entries = _entries(owner)
    key = _key(mask, what)
    if key not in entries:
        entries[key] = build()
    return entries[key]


def tile_index(mask: torch.Tensor, block_n: int, block_k: int) -> TileIndex:
    """The tile index of ``mask`` (2-D bool), cached on the mask (``cached_on_mask``)."""
    return cached_on_mask(mask, ("tiles", block_n, block_k), lambda: build_tile_index(mask, block_n, block_k))


def tile_indices(masks, block_n: int, block_k: int) -> list[TileIndex]:
    """``[tile_index(m.view(m.shape[0], -1), block_n, block_k) for m in masks]``, cached the same way (a 2-D mask
    is itself; a weight-shaped one, e.g. a conv mask [N, C, KH, KW], is indexed as [N, C * KH * KW]), with the
    CPU masks whose index is not cached built by one lthfast._C call on torch's threads (e.g. every layer after
    a prune step). Contiguous masks are indexed without making the 2-D views (~10 us each after a prune pass).
    """
    masks = list(masks)
    what = ("tiles", block_n, block_k)
    out: list = [None] * len(masks)
    todo = []  # (position, the owner's cache dict, key, (n, k, row stride) of the 2-D view, earlier index or None)
    for i, mask in enumerate(masks):
        shape = mask.shape
        if len(shape) < 2:
            raise ValueError(f"tile index needs a mask of 2 or more dimensions, got shape {tuple(shape)}")
        n = shape[0]
        k = mask.numel() // n if n else math.prod(shape[1:])
        if len(shape) == 2:
            stride = mask.stride()
        elif mask.is_contiguous() and n and k:
            stride = (k, 1)  # indexed as the [n, k] view without making it
        else:  # a view it cannot describe without making it
            masks[i] = mask = mask.view(n, k) if mask.is_contiguous() else mask.reshape(n, k)
            stride = mask.stride()
        if _ext_ok(mask, stride, k) is None:
            continue
        owner = mask._base if mask._base is not None else mask
        if _untracked(owner):
            continue
        (entries, earlier), key = _renew(owner), _key_of((n, k), stride, mask.storage_offset(), what)
        if key in entries:
            out[i] = entries[key]
            continue
        previous = None if earlier is None else earlier.get(key)  # the index of the mask's earlier version
        if previous is not None and not previous.tile_alive.is_contiguous():
            previous = None
        todo.append((i, entries, key, (n, k, _row_stride(n, k, stride)), previous))
    if todo:
        # The index of the mask's earlier version is kept where its tile map has not changed (after a prune step,
        # every layer whose pruned weights left no tile empty): an index is a function of its map alone.
        built = _backend.ext().tile_indices(
            [masks[i].data_ptr() for i, *_ in todo],
            *([geometry[j] for _, _, _, geometry, _ in todo] for j in range(3)),
            block_n,
            block_k,
            torch.get_num_threads(),
            [0 if previous is None else previous.tile_alive.data_ptr() for *_, previous in todo],
        )
        for (i, entries, key, geometry, previous), arrays in zip(todo, built):
            index = previous if arrays is None else _from_ext(geometry[:2], block_n, block_k, arrays)
            out[i] = entries[key] = index
    for i, mask in enumerate(masks):
        if out[i] is None:
            out[i] = tile_index(mask if mask.dim() == 2 else mask.view(mask.shape[0], -1), block_n, block_k)
    return out
