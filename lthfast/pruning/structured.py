"""Structured strategies: block magnitude (whole bh x bw tiles, which the masked kernels skip) and N:M.

Both work on the 2-D view of a weight, [out, in] for Linear and [Cout, Cin * kh * kw] for Conv2d (the view
the kernels and ``lthfast.indexing.tiles`` use), and return new Masks; masks only shrink.

The IMP driver's structured levels (``lthfast imp --block B`` / ``--nm N:M``) prune to a count of weights rather than
a fraction of tiles: ``block_prune`` removes the lowest-scoring kernel tiles (``kernel_block``) until each group of
layers keeps as close to its target as whole tiles allow, ``n_m_prune`` moves towards an N:M mask along the same
schedule, and ``block_random_like`` / ``block_rearrange`` / ``n_m_random_like`` are their random controls.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

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


# ---- structured IMP: prune to a count of weights, and the random controls at the same granularity -------------
def kernel_block(shape: Sequence[int], block: int) -> tuple[int, int]:
    """The tile of a weight's 2-D view that a ``block`` x ``block`` kernel tile covers: (B, B) of a Linear weight
    [out, in]; (B, B * kh * kw) of a Conv2d weight [Cout, Cin/groups, kh, kw], i.e. B output channels by B input
    channels across the whole kh x kw window (the conv kernels index ``mask.view(Cout, -1)`` in tiles of
    (block_n, block_c * kh * kw): ``lthfast.kernels.masked_conv.conv_tile_index``)."""
    return block, block * math.prod(shape[2:])


def _tile_sums(t2: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """[ceil(rows/bh), ceil(cols/bw)] sums of the 2-D tensor ``t2`` over each tile (edge tiles partial), int64."""
    bh, bw = tile
    rows, cols = t2.shape
    padded = F.pad(t2.to(torch.int64), (0, -cols % bw, 0, -rows % bh))
    return padded.view(-(-rows // bh), bh, -(-cols // bw), bw).sum(dim=(1, 3))


def block_scores(weight: torch.Tensor, mask: torch.Tensor, block: int, norm: str = "l1"):
    """(scores, alive) of the kernel tiles (``kernel_block``) of one weight; see ``tile_scores``."""
    return tile_scores(weight, mask, kernel_block(weight.shape, block), norm)


def _check_groups(groups, pairs, what: str) -> list[tuple[list[int], int]]:
    index = {layer.name: i for i, (layer, _) in enumerate(pairs)}
    seen: set[str] = set()
    out = []
    for names, target in groups:
        unknown = [n for n in names if n not in index]
        if unknown:
            raise KeyError(f"{what}: no mask named {unknown[0]!r}; known: {list(index)}")
        if seen & set(names):
            raise ValueError(f"{what}: layer {sorted(seen & set(names))[0]!r} is in two groups")
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise ValueError(f"{what}: the weights to keep must be an int >= 0, got {target!r} for {list(names)}")
        seen |= set(names)
        out.append(([index[n] for n in names], target))
    return out


def block_prune(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    groups: Sequence[tuple[Sequence[str], int]],
    *,
    block: int,
    norm: str = "l1",
) -> Masks:
    """Prune whole kernel tiles so that each group of layers keeps as close to its target count of weights as whole
    tiles allow; returns new Masks (layers in no group keep theirs).

    groups: ``(layer names ranked together, weights to keep)`` pairs: one group of every layer for a global ranking,
    one per layer for layer-wise. Tiles are ``kernel_block(shape, block)`` tiles of the 2-D view, starting at
    (0, 0); a tile is alive when it holds an alive weight. Within a group the alive tiles are ranked by
    ``tile_scores`` (``norm`` "l1": the sum of |w| over the tile divided by its number of elements, "l2": the root
    of the sum of w^2 so divided; an edge tile's own, smaller size, so that partial tiles compete fairly) and
    removed lowest first, ties in layer order then row-major position. The count removed is the one whose weights
    come nearest to ``alive - target`` (the smaller count on a tie); none when the group already keeps no more
    than its target: masks only shrink, and a removed tile loses all its weights for good.
    """
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block_prune: block must be an int >= 1, got {block!r}")
    if norm not in ("l1", "l2"):
        raise ValueError(f"block_prune: norm must be 'l1' or 'l2', got {norm!r}")
    pairs = resolve(model, masks, "block_prune")
    checked = _check_groups(groups, pairs, "block_prune")
    new = [m.clone() for _, m in pairs]
    for ids, target in checked:
        alive = sum(int(pairs[i][1].sum()) for i in ids)
        if alive <= target:
            continue
        for i in ids:
            check_can_prune(pairs[i][0], pairs[i][1], "block_prune", ranked=True)
        tiles, scores, sizes, owners = [], [], [], []
        for i in ids:
            layer, mask = pairs[i]
            tile = kernel_block(mask.shape, block)
            score, alive_tiles = tile_scores(layer.param.detach(), mask, tile, norm)
            where = alive_tiles.reshape(-1).nonzero().squeeze(1)
            tiles.append((tile, alive_tiles.clone()))
            scores.append(score.reshape(-1)[where])
            sizes.append(_tile_sums(two_d(mask), tile).reshape(-1)[where])
            owners.append(torch.stack([torch.full_like(where, len(owners)), where], dim=1))
        order = torch.sort(torch.cat(scores), stable=True).indices
        removed = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cat(sizes)[order].cumsum(0)])
        count = int((removed - (alive - target)).abs().argmin())  # argmin returns the first (smallest) count
        for owner, position in torch.cat(owners)[order[:count]].tolist():
            tiles[owner][1].view(-1)[position] = False
        for i, (tile, keep_tiles) in zip(ids, tiles):
            keep = _expand(keep_tiles, tile, tuple(two_d(new[i]).shape))
            new[i] = (two_d(new[i]) & keep).view(new[i].shape)
    return to_masks(pairs, new)


def _check_generator(generator, what: str) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{what}: generator must be a torch.Generator (for reproducible masks), got {generator!r}")


def _randperm(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randperm(n, generator=generator, device=generator.device).to(device)


def _as_masks(masks: Mapping[str, torch.Tensor]) -> Masks:
    return masks if isinstance(masks, Masks) else Masks(masks)


def block_random_like(reference_masks: Mapping[str, torch.Tensor], *, block: int, generator: torch.Generator) -> Masks:
    """Fresh block masks: each layer keeps as many alive kernel tiles (``kernel_block``) as ``reference_masks``
    holds, at uniformly random tile positions (every tile wholly alive or wholly pruned). The "random pruning"
    control of a block-structured ticket."""
    _check_generator(generator, "block_random_like")
    out = Masks()
    for name, mask in _as_masks(reference_masks).items():
        tile = kernel_block(mask.shape, block)
        alive = _tile_sums(two_d(mask), tile) > 0
        fresh = torch.zeros(alive.numel(), dtype=torch.bool, device=mask.device)
        fresh[_randperm(alive.numel(), generator, mask.device)[: int(alive.sum())]] = True
        out[name] = _expand(fresh.view(alive.shape), tile, tuple(two_d(mask).shape)).reshape(mask.shape).clone()
    return out


def block_rearrange(masks: Mapping[str, torch.Tensor], *, block: int, generator: torch.Generator) -> Masks:
    """Each layer's kernel tiles shuffled (a uniform random permutation of its tiles' alive flags): the block
    structure and the per-layer tile counts kept. For tile-aligned masks the same distribution as
    ``block_random_like``, another draw (as ``rearrange`` is to ``random_like`` for unstructured masks)."""
    _check_generator(generator, "block_rearrange")
    out = Masks()
    for name, mask in _as_masks(masks).items():
        tile = kernel_block(mask.shape, block)
        alive = _tile_sums(two_d(mask), tile) > 0
        shuffled = alive.reshape(-1)[_randperm(alive.numel(), generator, mask.device)].view(alive.shape)
        out[name] = _expand(shuffled, tile, tuple(two_d(mask).shape)).reshape(mask.shape).clone()
    return out


def n_m_prune(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    groups: Sequence[tuple[Sequence[str], int]],
    *,
    n: int,
    m: int,
) -> Masks:
    """Prune towards N:M: each group of layers keeps as close to its target count of weights as the N:M floor
    allows; returns new Masks (layers in no group keep theirs).

    Only the alive weights outside the ``n`` largest-magnitude of their group of ``m`` consecutive inputs (``n_m``'s
    groups) are candidates, pruned smallest magnitude first (over the whole group of layers: global; one layer:
    layer-wise), so no group of ``m`` falls below ``n`` alive. A target at or below that floor gives exactly
    ``n_m(model, masks, n=n, m=m)`` on the group's layers: ``n`` alive in every full group of ``m``.
    """
    pairs = resolve(model, masks, "n_m_prune")
    checked = _check_groups(groups, pairs, "n_m_prune")
    grouped = {i for ids, _ in checked for i in ids}
    names = [layer.name for layer, _ in pairs]
    floor = n_m(model, masks, n=n, m=m, leave_dense=[names[i] for i in range(len(names)) if i not in grouped])
    new = [m_.clone() for _, m_ in pairs]
    for ids, target in checked:
        alive = sum(int(pairs[i][1].sum()) for i in ids)
        candidates = [pairs[i][1] & ~floor[names[i]] for i in ids]
        k = min(max(alive - target, 0), sum(int(c.sum()) for c in candidates))
        if k == 0:
            continue
        with naming_bad_weights([pairs[i] for i in ids]):
            prune_global_([pairs[i][0].param.detach() for i in ids], candidates, k=k)
        for i, kept in zip(ids, candidates):
            new[i] = floor[names[i]] | kept
    return to_masks(pairs, new)


def n_m_random_like(reference_masks: Mapping[str, torch.Tensor], *, m: int, generator: torch.Generator) -> Masks:
    """Fresh masks with, in every group of ``m`` consecutive inputs (``n_m``'s groups), as many alive weights as
    ``reference_masks`` holds there, at uniformly random positions of the group: an N:M mask stays N:M. The random
    controls of an N:M ticket."""
    _check_generator(generator, "n_m_random_like")
    out = Masks()
    for name, mask in _as_masks(reference_masks).items():
        m2 = two_d(mask)
        rows, cols = m2.shape
        padded = F.pad(m2, (0, -cols % m)).view(rows, -1, m)
        draw = torch.rand(padded.shape, generator=generator, device=generator.device).to(mask.device)
        real = F.pad(torch.ones_like(m2), (0, -cols % m)).view(rows, -1, m)
        draw = torch.where(real, draw, -1.0)  # padding never drawn
        rank = torch.argsort(torch.argsort(draw, dim=2, descending=True, stable=True), dim=2, stable=True)
        keep = rank < padded.sum(dim=2, keepdim=True)
        out[name] = keep.view(rows, -1)[:, :cols].reshape(mask.shape).clone()
    return out
