"""Block magnitude (skippable tiles) and N:M, against direct loops over tiles and groups."""

import pytest
import torch
from prune_models import ConvNet, tie_free_

import lthfast
from lthfast import Masks
from lthfast.indexing.tiles import tile_index
from lthfast.pruning import strategies as S


def two_d(t):
    return t.reshape(t.shape[0], -1)


def tile_score_loop(w, m, bh, bw, norm):
    """Reference: per-tile mean |w| (l1) or RMS (l2) over alive weights, in float64, by loops."""
    w2, m2 = two_d(w).double(), two_d(m)
    rows, cols = w2.shape
    tr, tc = -(-rows // bh), -(-cols // bw)
    scores = torch.zeros(tr, tc, dtype=torch.float64)
    alive = torch.zeros(tr, tc, dtype=torch.bool)
    for i in range(tr):
        for j in range(tc):
            tile, keep = (
                w2[i * bh : (i + 1) * bh, j * bw : (j + 1) * bw],
                m2[i * bh : (i + 1) * bh, j * bw : (j + 1) * bw],
            )
            v = torch.where(keep, tile, 0.0)
            scores[i, j] = v.abs().mean() if norm == "l1" else v.square().mean().sqrt()
            alive[i, j] = keep.any()
    return scores, alive


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("block", [(4, 4), (3, 5)])
def test_block_magnitude_prunes_whole_tiles_by_score(convnet, norm, block):
    old = Masks({n: torch.rand(p.shape) < 0.8 for n, p in lthfast.prunable(convnet).items()})
    new = S.block_magnitude(convnet, old, 0.4, block=block, norm=norm)
    params = lthfast.prunable(convnet)
    pruned_scores, kept_scores, alive_tiles, new_alive_tiles = [], [], 0, 0
    for name in old:
        scores, alive = tile_score_loop(params[name].detach(), old[name], *block, norm)
        _, alive_after = tile_score_loop(params[name].detach(), new[name], *block, norm)
        assert not (alive_after & ~alive).any()
        # A tile is either untouched or emptied.
        changed = two_d(old[name] != new[name])
        for i, j in (alive & ~alive_after).nonzero().tolist():
            assert not two_d(new[name])[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]].any()
        for i, j in alive_after.nonzero().tolist():
            assert not changed[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]].any()
        pruned_scores.append(scores[alive & ~alive_after])
        kept_scores.append(scores[alive_after])
        alive_tiles += int(alive.sum())
        new_alive_tiles += int(alive_after.sum())
    assert new_alive_tiles == alive_tiles - round(0.4 * alive_tiles)
    # float32 scores: compare with a float32-sized margin.
    assert torch.cat(pruned_scores).max() <= torch.cat(kept_scores).min() * (1 + 1e-6)


def test_block_magnitude_gives_skippable_tiles():
    model = tie_free_(ConvNet())
    masks = S.block_magnitude(model, None, 0.75, block=(16, 16), layerwise=True)
    for name, m in masks.items():
        index = tile_index(two_d(m), 16, 16)
        total = index.tile_alive.numel()
        assert index.alive_tiles == total - round(0.75 * total), name


def test_n_m_keeps_top_n_of_each_group():
    model = tie_free_(ConvNet())
    old = Masks({n: torch.rand(p.shape) < 0.8 for n, p in lthfast.prunable(model).items()})
    new = S.n_m(model, old, n=2, m=4)
    for name, p in lthfast.prunable(model).items():
        w2, m_old, m_new = two_d(p.detach()), two_d(old[name]), two_d(new[name])
        for start in range(0, w2.shape[1], 4):
            sl = slice(start, start + 4)
            for r in range(w2.shape[0]):
                alive = m_old[r, sl].nonzero().squeeze(1).tolist()
                best = sorted(alive, key=lambda c: -abs(float(w2[r, sl][c])))[:2]
                assert sorted(m_new[r, sl].nonzero().squeeze(1).tolist()) == sorted(best)


def test_n_m_ties_keep_lower_index_and_leave_dense():
    model = torch.nn.Sequential(torch.nn.Linear(8, 3), torch.nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    masks = S.n_m(model, None, n=1, m=4, leave_dense="1")
    expected = torch.tensor([True, False, False, False] * 2).expand(3, 8)
    assert torch.equal(masks["0.weight"], expected)
    assert masks["1.weight"].all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block": (0, 4)}, "block"),
        ({"block": 4}, "block"),
        ({"norm": "l3"}, "norm"),
    ],
)
def test_block_magnitude_bad_arguments(convnet, kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        S.block_magnitude(convnet, None, 0.5, **kwargs)


def test_n_m_bad_arguments(convnet):
    with pytest.raises(ValueError, match="n <= m"):
        S.n_m(convnet, None, n=5, m=4)
