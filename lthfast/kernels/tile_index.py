"""Moved to ``lthfast.indexing.tiles`` (every mask-derived index lives in ``lthfast.indexing``); this name is kept
so that code importing it keeps working."""

from lthfast.indexing.tiles import *  # noqa: F403
from lthfast.indexing.tiles import (  # noqa: F401
    TileIndex,
    build_tile_index,
    cached_on_mask,
    column_groups,
    contents_stamp,
    keep_if_capturing,
    tile_alive,
    tile_index,
    tile_indices,
)
