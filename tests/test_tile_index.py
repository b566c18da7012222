import itertools
import math

import pytest
import torch

from lthfast.indexing.tiles import build_tile_index, column_groups, tile_alive, tile_index


def _dense_tiles(mask, bn, bk):
    n, k = mask.shape
    out = set()
    for i in range(0, n, bn):
        for j in range(0, k, bk):
            if mask[i : i + bn, j : j + bk].any():
                out.add((i // bn, j // bk))
    return out


def test_index_matches_brute_force_on_odd_shapes():
    mask = torch.rand(37, 53) < 0.05
    idx = build_tile_index(mask, 16, 8)
    expected = _dense_tiles(mask, 16, 8)
    assert set(zip(idx.tile_rows.tolist(), idx.tile_cols.tolist())) == expected
    assert idx.alive_tiles == len(expected)
    for r in range(idx.tiles_n):
        cols = idx.row_cols[idx.row_ptr[r] : idx.row_ptr[r + 1]].tolist()
        assert cols == sorted(c for rr, c in expected if rr == r)
    for c in range(idx.tiles_k):
        rows = idx.col_rows[idx.col_ptr[c] : idx.col_ptr[c + 1]].tolist()
        assert rows == sorted(rr for rr, cc in expected if cc == c)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_column_groups_hold_each_alive_tile_once_with_one_column_per_group(group):
    mask = torch.rand(70, 90) < 0.04
    mask[:, 80:] = False  # empty columns: no entries at all
    idx = build_tile_index(mask, 8, 8)
    rows, cols = column_groups(idx, group)
    assert rows.dtype == cols.dtype == torch.int32 and rows.shape == cols.shape and rows.numel() % group == 0
    alive = [(r, c) for r, c in zip(rows.tolist(), cols.tolist()) if r >= 0]
    assert sorted(alive) == sorted(_dense_tiles(mask, 8, 8))  # every alive tile once, padding aside
    for start in range(0, rows.numel(), group):  # any divisor of ``group`` reads one column per program
        assert len(set(cols[start : start + group].tolist())) == 1
    counts = idx.tile_alive.sum(0)
    assert rows.numel() == int(((counts + group - 1) // group * group).sum())  # padded to whole groups only
    assert column_groups(idx, group)[0] is rows  # cached on the index


def test_cache_is_invalidated_by_in_place_mask_edits():
    mask = torch.ones(32, 32, dtype=torch.bool)
    first = tile_index(mask, 16, 16)
    assert tile_index(mask, 16, 16) is first
    mask[:16, :16] = False
    second = tile_index(mask, 16, 16)
    assert second is not first and second.alive_tiles == 3
    view = mask.view(32, 32)
    assert tile_index(view, 16, 16) is second


def _tiles_by_padding(mask, bn, bk):
    """Independent oracle: pad to whole tiles, then ``any`` over each tile."""
    n, k = mask.shape
    tn, tk = -(-n // bn), -(-k // bk)
    padded = torch.zeros(tn * bn, tk * bk, dtype=torch.bool)
    padded[:n, :k] = mask
    return padded.view(tn, bn, tk, bk).any(dim=3).any(dim=1)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (1, 1), (37, 53), (64, 64), (64, 147), (1000, 2048), (96, 40)])
@pytest.mark.parametrize("blocks", [(16, 8), (32, 32), (16, 16), (8, 3), (1, 8), (7, 5)])
def test_tile_alive_matches_padding_oracle(shape, blocks):
    n, k = shape
    bn, bk = blocks
    for density in (0.0, 0.002, 0.5):
        mask = torch.rand(n, k) < density
        variants = [mask]
        if n > 2 and k > 2:
            variants.append((torch.rand(n + 1, k + 3) < density)[1:, 3:])  # storage offset, strided rows
            variants.append((torch.rand(k, n) < density).t())  # transposed
        for m in variants:
            got = tile_alive(m, bn, bk)
            assert got.dtype == torch.bool and torch.equal(got, _tiles_by_padding(m, bn, bk)), (shape, blocks, density)


def _index_fields(idx):
    return [idx.tile_alive, idx.row_ptr, idx.row_cols, idx.col_ptr, idx.col_rows, idx.tile_rows, idx.tile_cols]


def _by_paths(mask, bn, bk):
    """The index from lthfast._C (when built, via build_tile_index), the numpy path and the torch path."""
    from lthfast.indexing import tiles as ti

    n, k = mask.shape
    tn, tk = -(-n // bn), -(-k // bk)
    out = {"build": build_tile_index(mask, bn, bk)}
    alive_np = ti.tile_alive(mask, bn, bk)
    alive_torch = ti._tile_alive_torch(ti._whole_tiles(mask, bn, bk), tn, tk, bn, bk) if mask.numel() else alive_np
    for name, alive, arrays in (
        ("numpy", alive_np, ti._index_arrays_numpy),
        ("torch", alive_torch, ti._index_arrays_torch),
    ):
        row_ptr, row_cols, col_ptr, col_rows, tile_rows, tile_cols, max_row, max_col = arrays(alive)
        out[name] = ti.TileIndex((n, k), bn, bk, alive, row_ptr, row_cols, col_ptr, col_rows, tile_rows, tile_cols,
                                 int(tile_rows.numel()), max_row, max_col)  # fmt: skip
    return out


@pytest.mark.parametrize("shape", [(0, 4), (5, 0), (1, 1), (1, 40), (37, 53), (64, 128), (130, 200)])
@pytest.mark.parametrize("blocks", [(16, 8), (32, 32), (8, 3), (1, 1), (64, 16)])
@pytest.mark.parametrize("layout", ["contiguous", "row-strided", "column-strided"])
def test_every_build_path_matches_the_oracle(shape, blocks, layout):
    n, k = shape
    bn, bk = blocks
    gen = torch.Generator().manual_seed(n * 1000 + k)
    for density in (0.0, 0.003, 0.01, 0.02, 0.05, 0.9):  # 0.01-0.02: settled by the full-width ORs part way
        if layout == "row-strided":  # rows further apart than k (a column slice of a wider mask)
            mask = (torch.rand(n, k + 5, generator=gen) < density)[:, 2 : 2 + k]
        elif layout == "column-strided":
            mask = (torch.rand(n, 2 * k, generator=gen) < density)[:, ::2]
        else:
            mask = torch.rand(n, k, generator=gen) < density
        expected = {tuple(rc) for rc in _tiles_by_padding(mask, bn, bk).nonzero().tolist()}
        for name, idx in _by_paths(mask, bn, bk).items():
            where = f"{name}, density {density}"
            assert list(zip(idx.tile_rows.tolist(), idx.tile_cols.tolist())) == sorted(expected), where
            assert torch.equal(idx.row_cols, idx.tile_cols), where
            assert idx.alive_tiles == len(expected) and idx.tile_alive.dtype == torch.bool, where
            assert all(t.dtype == torch.int32 and t.is_contiguous() for t in _index_fields(idx)[1:]), where
            per_row = [0] * idx.tiles_n
            per_col = [0] * idx.tiles_k
            for r, c in expected:
                per_row[r] += 1
                per_col[c] += 1
            assert idx.row_ptr.tolist() == [0, *itertools.accumulate(per_row)], where
            assert idx.col_ptr.tolist() == [0, *itertools.accumulate(per_col)], where
            assert idx.col_rows.tolist() == [r for r, _ in sorted(expected, key=lambda rc: (rc[1], rc[0]))], where
            assert idx.max_row_tiles == max(per_row, default=0) and idx.max_col_tiles == max(per_col, default=0), where


def test_tile_indices_match_one_by_one_and_share_the_cache():
    from lthfast.indexing.tiles import tile_indices

    gen = torch.Generator().manual_seed(7)
    masks = [
        torch.rand(130, 200, generator=gen) < 0.003,  # most tiles empty after the first row
        torch.rand(64, 4608, generator=gen) < 0.0008,
        torch.rand(96, 40, generator=gen) < 0.5,
        (torch.rand(40, 90, generator=gen) < 0.05)[:, ::2],  # column-strided: not the C++ path
        torch.zeros(33, 65, dtype=torch.bool),
        torch.rand(1, 1, generator=gen) < 2,
    ]
    cached = tile_index(masks[2], 32, 32)  # already cached: returned as is
    got = tile_indices(masks, 32, 32)
    assert got[2] is cached
    for mask, idx in zip(masks, got):
        want = build_tile_index(mask, 32, 32)
        assert all(torch.equal(a, b) for a, b in zip(_index_fields(idx), _index_fields(want)))
        assert (idx.alive_tiles, idx.max_row_tiles, idx.max_col_tiles) == (
            want.alive_tiles, want.max_row_tiles, want.max_col_tiles,
        )  # fmt: skip
        assert tile_index(mask, 32, 32) is idx  # the layers' lookups hit what tile_indices built
    # An in-place edit drops the cached index. The rebuilt one is the earlier object when the tile map is the
    # same (an index is a function of its map), a new one when it changed; either way it is the mask's index.
    alive = got[0].tile_alive.nonzero()
    r, c = (int(v) * 32 for v in alive[0])
    masks[0][r : r + 32, c : c + 32] = False  # an alive tile emptied: a new map
    masks[2][0, 0] = True  # (0.5 dense: its first tile was alive) the same map
    again = tile_indices(masks, 32, 32)
    assert again[0] is not got[0] and not bool(again[0].tile_alive[r // 32, c // 32])
    assert again[2] is got[2] and again[1] is got[1]
    for mask, idx in zip(masks, again):
        assert all(torch.equal(a, b) for a, b in zip(_index_fields(idx), _index_fields(build_tile_index(mask, 32, 32))))
        assert tile_index(mask, 32, 32) is idx
    with pytest.raises(ValueError, match="2 or more dimensions"):
        tile_indices([torch.ones(4, dtype=torch.bool)], 32, 32)


def test_tile_indices_of_weight_shaped_masks_are_the_2d_views():
    from lthfast.indexing.tiles import tile_indices

    gen = torch.Generator().manual_seed(8)
    conv = torch.rand(40, 24, 3, 3, generator=gen) < 0.02
    single = torch.rand(1, 64, 3, 3, generator=gen) < 0.1
    strided = (torch.rand(30, 16, 3, 3, generator=gen) < 0.1)[:, ::2]  # not contiguous: indexed from a copy
    channels_last = (torch.rand(16, 8, 3, 3, generator=gen) < 0.1).contiguous(memory_format=torch.channels_last)
    empty = torch.zeros(0, 5, 3, 3, dtype=torch.bool)
    masks = [conv, single, strided, channels_last, empty]
    got = tile_indices(masks, 16, 9 * 4)
    for mask, idx in zip(masks, got):
        want = build_tile_index(mask.reshape(mask.shape[0], math.prod(mask.shape[1:])), 16, 36)
        assert all(torch.equal(a, b) for a, b in zip(_index_fields(idx), _index_fields(want)))
    for mask, idx in zip((conv, single), got):  # the layers' lookups (2-D views) find what it built
        assert tile_index(mask.view(mask.shape[0], -1), 16, 36) is idx
    conv[:16, :4] = False  # the first tile (16 x 36 of the [40, 216] view), alive at 2% density, emptied
    assert bool(got[0].tile_alive[0, 0])
    again = tile_indices([conv], 16, 36)[0]
    assert again is not got[0] and not bool(again.tile_alive[0, 0])
    want = build_tile_index(conv.reshape(40, -1), 16, 36)
    assert all(torch.equal(a, b) for a, b in zip(_index_fields(again), _index_fields(want)))


def _full_partial_brute(mask, bn, bk):
    """{(tile row, tile col): full?} over the alive tiles; an edge tile is full when its in-bounds entries are."""
    n, k = mask.shape
    out = {}
    for i in range(0, n, bn):
        for j in range(0, k, bk):
            tile = mask[i : i + bn, j : j + bk]
            if tile.any():
                out[(i // bn, j // bk)] = bool(tile.all())
    return out


def _mixed_tiles_mask(n, k, bn, bk, seed=0):
    from lthfast.bench.masks import mixed_tile_mask

    return mixed_tile_mask((n, k), bn, bk, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape, bn, bk", [((64, 48), 16, 16), ((37, 53), 16, 8), ((5, 70), 32, 16)])
def test_full_partial_lists_put_full_tiles_first(shape, bn, bk):
    from lthfast.indexing.tiles import full_partial, group_full, tile_full_flags

    mask = _mixed_tiles_mask(*shape, bn, bk)
    mask[-1, -1] = True  # the corner edge tile alive; full only if every in-bounds entry is
    idx = build_tile_index(mask, bn, bk)
    lists = full_partial(idx, mask)
    want = _full_partial_brute(mask, bn, bk)
    assert lists.full_tiles == sum(want.values()) and lists.partial_tiles == len(want) - lists.full_tiles
    assert 0 < lists.full_tiles < len(want), "the case must mix full and partial tiles"
    for r in range(idx.tiles_n):
        start, mid, end = int(idx.row_ptr[r]), int(lists.row_mid[r]), int(idx.row_ptr[r + 1])
        cols = lists.row_cols[start:end].tolist()
        assert sorted(cols) == idx.row_cols[start:end].tolist()
        assert [want[(r, c)] for c in cols] == [True] * (mid - start) + [False] * (end - mid)
    for c in range(idx.tiles_k):
        start, mid, end = int(idx.col_ptr[c]), int(lists.col_mid[c]), int(idx.col_ptr[c + 1])
        rows = lists.col_rows[start:end].tolist()
        assert sorted(rows) == idx.col_rows[start:end].tolist()
        assert [want[(r, c)] for r in rows] == [True] * (mid - start) + [False] * (end - mid)
    rows, cols = column_groups(idx, 4)
    flags = group_full(idx, mask, 4)
    for r, c, f in zip(rows.tolist(), cols.tolist(), flags.tolist()):
        assert f == (1 if r < 0 else int(want[(r, c)]))
    assert full_partial(idx, mask) is lists  # cached on the index
    tiles = zip(idx.tile_rows.tolist(), idx.tile_cols.tolist(), tile_full_flags(idx, mask).tolist())
    assert all(f == int(want[(r, c)]) for r, c, f in tiles)


def test_full_partial_follow_a_mask_change():
    from lthfast.indexing.tiles import full_partial

    mask = torch.ones(32, 32, dtype=torch.bool)
    assert full_partial(tile_index(mask, 16, 16), mask).full_tiles == 4
    mask[3, 3] = False  # a new index (the cache follows the version), so new lists
    lists = full_partial(tile_index(mask, 16, 16), mask)
    assert (lists.full_tiles, lists.partial_tiles) == (3, 1)
