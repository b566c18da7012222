import pytest
import torch

from lthfast.kernels.tile_index import build_tile_index, tile_alive, tile_index


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
