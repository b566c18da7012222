"""Random masks for the benchmarks: block-structured at an exact tile sparsity, and 2:4.

A benchmark mask is random (never a fixed pattern that a kernel could special-case) and drawn from a
``torch.Generator`` so that every provider in one row sees the same mask.
"""

from __future__ import annotations

import torch


def check_sweep(where: str, sparsities: list[float], blocks: list[int], repeats: int) -> None:
    """Refuse a sweep before any row is measured: every sparsity in [0, 1], every block >= 1, repeats >= 1."""
    if not sparsities or not blocks:
        raise ValueError(f"{where}: sparsities and blocks must each list at least one value")
    bad = [s for s in sparsities if not 0.0 <= s <= 1.0]
    if bad:
        raise ValueError(f"{where}: sparsities must be in [0, 1], got {bad}")
    if any(b < 1 for b in blocks):
        raise ValueError(f"{where}: blocks must be >= 1 (1 = unstructured), got {[b for b in blocks if b < 1]}")
    if repeats < 1:
        raise ValueError(f"{where}: repeats must be >= 1, got {repeats}")


def block_mask(
    rows: int, cols: int, sparsity: float, block: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A bool [rows, cols] mask made of [block x block] tiles, each wholly kept or wholly pruned.

    Exactly ``round(sparsity * tiles)`` tiles are pruned, chosen uniformly at random, but at least one tile stays
    alive unless ``sparsity == 1``; edge tiles are partial, so the element density can differ from
    ``1 - sparsity`` (callers report the actual density).
    ``block=1`` is an unstructured mask with exactly ``round(sparsity * rows * cols)`` zeros. CPU tensor.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"block_mask: sparsity must be in [0, 1], got {sparsity}")
    if block < 1:
        raise ValueError(f"block_mask: block must be >= 1, got {block}")
    tiles_r, tiles_c = -(-rows // block), -(-cols // block)
    total = tiles_r * tiles_c
    pruned = total if sparsity >= 1.0 else min(round(sparsity * total), total - 1)
    alive = torch.ones(total, dtype=torch.bool)
    alive[torch.randperm(total, generator=generator)[:pruned]] = False
    tiles = alive.view(tiles_r, tiles_c)
    full = tiles.repeat_interleave(block, dim=0).repeat_interleave(block, dim=1)
    return full[:rows, :cols].contiguous()


def conv_block_mask(
    weight_shape: tuple[int, ...], sparsity: float, block: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A bool conv mask [Cout, Cin/g, kh, kw] pruned in [block Cout x block Cin] channel tiles.

    Each tile spans the whole kh x kw window, so a pruned tile stays a contiguous run of the GEMM's K dimension
    whether the kernel orders K as (Cin, kh, kw) or (kh, kw, Cin). ``block=1`` prunes single weights
    (unstructured), not whole (Cout, Cin) kernels.
    """
    cout, cin, kh, kw = weight_shape
    if block == 1:
        return block_mask(cout, cin * kh * kw, sparsity, 1, generator).view(cout, cin, kh, kw)
    channels = block_mask(cout, cin, sparsity, block, generator)
    return channels[:, :, None, None].expand(cout, cin, kh, kw).contiguous()


def two_four_mask(rows: int, cols: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random 2:4 mask [rows, cols] (cols % 4 == 0): two of every four consecutive weights in a row are kept."""
    if cols % 4:
        raise ValueError(f"two_four_mask: cols must be a multiple of 4, got {cols}")
    scores = torch.rand(rows, cols // 4, 4, generator=generator)
    keep = scores.topk(2, dim=-1).indices
    mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool)
    mask.scatter_(-1, keep, True)
    return mask.view(rows, cols)


def mixed_tile_mask(shape, block_n: int, block_k: int, generator: torch.Generator, density: float = 0.5):
    """A bool mask of ``shape`` (2-D, or a conv weight's [Cout, Cin, kh, kw]) whose [block_n, block_k] tiles over its
    first two dimensions are each empty, full or partial (``density`` of the entries alive) at random; odd shapes
    leave partial-size edge tiles. For tests of kernels that treat full and partial tiles apart."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for i in range(0, shape[0], block_n):
        for j in range(0, shape[1], block_k):
            kind = int(torch.randint(0, 3, (), generator=generator))
            tile = mask[i : i + block_n, j : j + block_k]
            if kind == 1:
                tile.fill_(True)
            elif kind == 2:
                tile.copy_(torch.rand(tile.shape, generator=generator) < density)
    return mask
