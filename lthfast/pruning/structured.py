"""Structured strategies: block magnitude (whole bh x bw tiles, which the masked kernels skip) and N:M.

Both work on the 2-D view of a weight, [out, in] for Linear and [Cout, Cin * kh * kw] for Conv2d (the view
the kernels and ``lthfast.indexing.tiles`` use), and return new Masks; masks only shrink.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lthfast.pruning._common import (
    check_can_prune,
    matched,
    naming_bad_weights,
    prune_each_,
    prune_global_,
    resolve,
    to_masks,
    two_d,
)
from lthfast.pruning.layers import check_fraction
from lthfast.pruning.masks import Masks


def _check_block(block, what: str) -> tuple[int, int]:
    if not (isinstance(block, (tuple, list)) and len(block) == 2 and all(isinstance(b, int) for b in block)):
        raise TypeError(f"{what}: block must be a (bh, bw) pair of ints, got {block!r}")
    if block[0] < 1 or block[1] < 1:
        raise ValueError(f"{what}: block sizes must be >= 1, got {tuple(block)}")
    return int(block[0]), int(block[1])


def tile_scores(weight: torch.Tensor, mask: torch.Tensor, block: tuple[int, int], norm: str):
    """(scores, alive) of the [bh x bw] tiles of the 2-D view, both [ceil(out/bh), ceil(in/bw)].

    score: "l1" mean |w| or "l2" root-mean-square of w over the tile's alive weights, divided by the tile's
    real (unpadded) size so partial edge tiles compete fairly; float32. alive: tile holds an alive weight.
    """
    bh, bw = block
    w2, m2 = two_d(weight), two_d(mask)
    rows, cols = w2.shape
    pad = (0, -cols % bw, 0, -rows % bh)
    value = torch.where(m2, w2.float(), 0.0)
    value = value.abs() if norm == "l1" else value.square()
    tr, tc = (rows + pad[3]) // bh, (cols + pad[1]) // bw
    total = F.pad(value, pad).view(tr, bh, tc, bw).sum(dim=(1, 3))
    size = F.pad(torch.ones_like(value), pad).view(tr, bh, tc, bw).sum(dim=(1, 3))
    alive = F.pad(m2, pad).view(tr, bh, tc, bw).any(dim=3).any(dim=1)
    scores = total / size
    return (scores if norm == "l1" else scores.sqrt()), alive


def _expand(tiles: torch.Tensor, block: tuple[int, int], shape2d: tuple[int, int]) -> torch.Tensor:
    bh, bw = block
    return tiles.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[: shape2d[0], : shape2d[1]]


def block_magnitude(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    fraction: float,
    *,
    block: tuple[int, int] = (32, 32),
    norm: str = "l1",
    layerwise: bool = False,
    leave_dense: str | Iterable[str] = (),
) -> Masks:
    """Prune ``fraction`` of the alive tiles (tiles holding an alive weight) with the smallest norm score.

    ``block`` = (bh, bw) tiles of the 2-D view (rows = outputs); use the kernels' (block_n, block_k) so that
    pruned tiles are skipped. Global ranking of tiles over all layers, or per layer. A pruned tile loses all
    its weights; weights already pruned stay pruned. Returns new Masks.
    """
    fraction = check_fraction(fraction, "block_magnitude")
    block = _check_block(block, "block_magnitude")
    if norm not in ("l1", "l2"):
        raise ValueError(f"block_magnitude: norm must be 'l1' or 'l2', got {norm!r}")
    pairs = resolve(model, masks, "block_magnitude")
    names = [layer.name for layer, _ in pairs]
    dense = matched(leave_dense, names, "block_magnitude leave_dense")
    active = [i for i, n in enumerate(names) if n not in dense]
    for i in active if fraction > 0 else []:
        check_can_prune(pairs[i][0], pairs[i][1], "block_magnitude", finite=False, ranked=not layerwise)
    scored = [tile_scores(pairs[i][0].param.detach(), pairs[i][1], block, norm) for i in active]
    scores, tile_masks = [s for s, _ in scored], [a.clone() for _, a in scored]
    with naming_bad_weights(pairs):  # a NaN weight makes its tile's score NaN, which the threshold rejects
        if layerwise:
            prune_each_(scores, tile_masks, amounts=[fraction] * len(scores))
        else:
            prune_global_(scores, tile_masks, amount=fraction)
    new = [m.clone() for _, m in pairs]
    for i, tiles in zip(active, tile_masks):
        keep = _expand(tiles, block, tuple(two_d(new[i]).shape))
        new[i] = (two_d(new[i]) & keep).view(new[i].shape)
    return to_masks(pairs, new)


def n_m(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    *,
    n: int = 2,
    m: int = 4,
    leave_dense: str | Iterable[str] = (),
) -> Masks:
    """N:M sparsity along the input dimension: in every group of ``m`` consecutive inputs of a row keep the
    ``n`` largest-magnitude alive weights (fewer when fewer are alive; ties keep the lower index).

    Groups run along the columns of the 2-D view; a last partial group keeps at most ``n``. Returns new Masks.
    """
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n <= m):
        raise ValueError(f"n_m: need integers 1 <= n <= m, got n={n!r}, m={m!r}")
    pairs = resolve(model, masks, "n_m")
    names = [layer.name for layer, _ in pairs]
    dense = matched(leave_dense, names, "n_m leave_dense")
    new = []
    for layer, mask in pairs:
        if layer.name in dense:
            new.append(mask.clone())
            continue
        check_can_prune(layer, mask, "n_m")
        w2, m2 = two_d(layer.param.detach()), two_d(mask)
        rows, cols = w2.shape
        pad = -cols % m
        # Pruned (and padding) entries score -1 so they are never among the kept unless nothing else is alive;
        # they are then dropped again by ``& m2`` below.
        score = F.pad(torch.where(m2, w2.abs().float(), -1.0), (0, pad), value=-1.0).view(rows, -1, m)
        order = torch.argsort(score, dim=2, descending=True, stable=True)[..., :n]
        keep = torch.zeros_like(score, dtype=torch.bool).scatter_(2, order, True)
        keep = keep.view(rows, -1)[:, :cols]
        new.append((m2 & keep).view(mask.shape))
    return to_masks(pairs, new)
