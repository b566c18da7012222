"""Structured IMP strategies: kernel-tile scores against float64 loops, block_prune (whole tiles, lowest scores,
the count nearest the target), the block controls, and the N:M schedule (n_m_prune, n_m_random_like)."""

import pytest
import torch
from prune_models import ConvNet, tie_free_

import lthfast
from lthfast import Masks
from lthfast.pruning import strategies as S
from lthfast.pruning.structured import block_scores, kernel_block


def _tile_ranges(shape, block):
    """Yield (rows slice, [Cin or in] slice) of every kernel tile of a Linear [out, in] or Conv2d [Cout, Cin, kh, kw]
    weight, written from the layer's own dimensions (not the 2-D view)."""
    for i in range(0, shape[0], block):
        for j in range(0, shape[1], block):
            yield (i // block, j // block), slice(i, i + block), slice(j, j + block)


def reference_scores(weight, mask, block, norm):
    """float64 loop over (out, in) channel tiles: sum |w| (l1) or sum w^2 then root (l2) over the alive weights,
    divided by the tile's own element count (its whole kh x kw window for a conv)."""
    w, m = weight.detach().double(), mask
    tiles = (-(-w.shape[0] // block), -(-w.shape[1] // block))
    scores = torch.zeros(tiles, dtype=torch.float64)
    alive = torch.zeros(tiles, dtype=torch.bool)
    for (ti, tj), rows, cols in _tile_ranges(w.shape, block):
        tile, keep = w[rows, cols], m[rows, cols]
        values = torch.where(keep, tile, torch.zeros_like(tile))
        size = tile.numel()
        scores[ti, tj] = values.abs().sum() / size if norm == "l1" else (values.square().sum() / size).sqrt()
        alive[ti, tj] = bool(keep.any())
    return scores, alive


def assert_whole_tiles(mask, block):
    """Every kernel tile (B x B for a Linear; B Cout x B Cin x kh x kw for a conv) is all alive or all pruned."""
    for _, rows, cols in _tile_ranges(mask.shape, block):
        tile = mask[rows, cols]
        assert bool(tile.all()) or not bool(tile.any()), (rows, cols)


def tile_counts(masks, block):
    return {n: sum(bool(m[r, c].any()) for _, r, c in _tile_ranges(m.shape, block)) for n, m in masks.items()}


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("block", [3, 4, 16])
def test_block_scores_match_a_float64_loop(convnet, norm, block):
    for name, weight in lthfast.prunable(convnet).items():
        mask = torch.rand(weight.shape) < 0.7
        scores, alive = block_scores(weight.detach(), mask, block, norm)
        want_scores, want_alive = reference_scores(weight, mask, block, norm)
        assert torch.equal(alive, want_alive), name
        torch.testing.assert_close(scores.double(), want_scores, rtol=1e-6, atol=1e-9)


def test_kernel_block_is_the_conv_kernels_tile():
    assert kernel_block((10, 16), 4) == (4, 4)
    assert kernel_block((16, 8, 3, 3), 4) == (4, 36)


@pytest.mark.parametrize("block", [4, 16])
def test_block_prune_removes_whole_lowest_scoring_tiles_nearest_the_target(convnet, block):
    params = lthfast.prunable(convnet)
    old = Masks.ones(convnet)
    names = list(old)
    total = old.total_count()
    target = round(0.45 * total)
    new = S.block_prune(convnet, old, [(names, target)], block=block)
    pruned, kept, sizes = [], [], []
    for name in names:
        assert_whole_tiles(new[name], block)
        assert not (new[name] & ~old[name]).any()
        scores, _ = reference_scores(params[name], old[name], block, "l1")
        for (ti, tj), rows, cols in _tile_ranges(old[name].shape, block):
            (kept if new[name][rows, cols].any() else pruned).append(float(scores[ti, tj]))
            if not new[name][rows, cols].any():
                sizes.append(old[name][rows, cols].numel())
    assert max(pruned) <= min(kept) * (1 + 1e-6)
    # The count nearest the target: removing one tile more or less would land no nearer.
    alive = new.alive_count()
    all_sizes = sorted(
        (float(reference_scores(params[n], old[n], block, "l1")[0][ti, tj]), old[n][r, c].numel())
        for n in names
        for (ti, tj), r, c in _tile_ranges(old[n].shape, block)
    )
    next_size = all_sizes[len(pruned)][1]
    last_size = all_sizes[len(pruned) - 1][1]
    assert abs(alive - target) <= abs(alive - next_size - target)
    assert abs(alive - target) <= abs(alive + last_size - target)
    assert sum(sizes) == total - alive


def test_block_prune_per_layer_groups_and_layers_left_alone(convnet):
    old = Masks.ones(convnet)
    conv1, conv2, body, out = list(old)
    # conv2 [16, 8, 3, 3] in 8x8 channel tiles: two tiles of 8 * 8 * 9 = 576 weights; 600 is nearest one tile.
    # body [32, 144] in 8x8 tiles of 64 weights: 1000 is nearest 16 tiles (1024: 24 off; 15 tiles: 40 off).
    new = S.block_prune(convnet, old, [([conv2], 600), ([body], 1000)], block=8)
    assert int(new[conv2].sum()) == 576 and int(new[body].sum()) == 1024
    assert torch.equal(new[conv1], old[conv1]) and torch.equal(new[out], old[out])
    # masks only shrink: a target above the alive count prunes nothing
    again = S.block_prune(convnet, new, [(list(old), new.total_count())], block=8)
    assert again.equal(new)


def test_block_prune_bad_input(convnet):
    names = list(Masks.ones(convnet))
    with pytest.raises(KeyError, match="nope"):
        S.block_prune(convnet, None, [(["nope"], 1)], block=4)
    with pytest.raises(ValueError, match="two groups"):
        S.block_prune(convnet, None, [(names[:2], 1), (names[1:], 1)], block=4)
    with pytest.raises(ValueError, match="int >= 0"):
        S.block_prune(convnet, None, [(names, -1)], block=4)
    with pytest.raises(ValueError, match="block"):
        S.block_prune(convnet, None, [(names, 1)], block=0)


@pytest.mark.parametrize("control", ["random_like", "rearrange"])
def test_block_controls_keep_per_layer_tile_counts_at_random_positions(convnet, control):
    block = 4
    ticket = S.block_prune(convnet, None, [(list(Masks.ones(convnet)), 3000)], block=block)
    fn = S.block_random_like if control == "random_like" else S.block_rearrange
    draw = lambda seed: fn(ticket, block=block, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    first, second = draw(1), draw(2)
    assert draw(1).equal(first) and not first.equal(second) and not first.equal(ticket)
    assert tile_counts(first, block) == tile_counts(ticket, block)
    for mask in first.values():
        assert_whole_tiles(mask, block)


def _groups_of(mask2d, m):
    rows, cols = mask2d.shape
    return [(r, slice(s, min(s + m, cols))) for r in range(rows) for s in range(0, cols, m)]


def test_n_m_prune_moves_towards_n_m_and_never_below_n_per_group():
    model = tie_free_(ConvNet())
    masks = Masks.ones(model)
    names = list(masks)
    floor = S.n_m(model, masks, n=2, m=4)
    total = masks.total_count()
    half = S.n_m_prune(model, masks, [(names, round(0.7 * total))], n=2, m=4)
    assert half.alive_count() == round(0.7 * total)
    weights = lthfast.prunable(model)
    pruned_mags, kept_candidates = [], []
    for name in names:
        m2, f2, w2 = half[name].reshape(half[name].shape[0], -1), floor[name].reshape(floor[name].shape[0], -1), None
        w2 = weights[name].detach().reshape(m2.shape[0], -1).abs()
        assert not (f2 & ~m2).any()  # the n largest of every group stay
        pruned_mags += w2[~m2].tolist()
        kept_candidates += w2[m2 & ~f2].tolist()
        for r, cols in _groups_of(m2, 4):
            assert int(m2[r, cols].sum()) >= min(2, cols.stop - cols.start)
    assert max(pruned_mags) <= min(kept_candidates)
    # at or below the N:M count: exactly n_m's mask, n alive in every full group of m
    final = S.n_m_prune(model, half, [(names, 0)], n=2, m=4)
    assert final.equal(floor)
    for name in names:
        m2 = final[name].reshape(final[name].shape[0], -1)
        for r, cols in _groups_of(m2, 4):
            assert int(m2[r, cols].sum()) == min(2, cols.stop - cols.start)


def test_n_m_random_like_keeps_every_group_count():
    model = tie_free_(ConvNet())
    ticket = S.n_m_prune(model, None, [(list(Masks.ones(model)), 0)], n=1, m=4)
    fresh = S.n_m_random_like(ticket, m=4, generator=torch.Generator().manual_seed(0))
    assert not fresh.equal(ticket)
    for name in ticket:
        t2, f2 = ticket[name].reshape(ticket[name].shape[0], -1), fresh[name].reshape(fresh[name].shape[0], -1)
        for r, cols in _groups_of(t2, 4):
            assert int(f2[r, cols].sum()) == int(t2[r, cols].sum())
