"""Indexes derived from a weight mask, built when the mask changes and cached on it (never per step).

``tiles``: which [block_n x block_k] tiles hold an alive weight (the Triton kernels and the CPU block route);
``alive``: the alive entries themselves, CSR over rows and CSC over columns (the CPU unstructured kernels and the
fused masked optimizers). Both are cached by ``tiles.cached_on_mask``, keyed on the mask's version and storage.
"""

from lthfast.indexing.alive import AliveIndex, alive_index
from lthfast.indexing.tiles import TileIndex, cached_on_mask, contents_stamp, tile_index

__all__ = ["AliveIndex", "TileIndex", "alive_index", "cached_on_mask", "contents_stamp", "tile_index"]
