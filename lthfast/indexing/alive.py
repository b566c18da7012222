"""The alive entries of a weight mask as CSR over rows and CSC over columns: what the CPU unstructured kernels
(``lthfast.ops.sparse_cpu``) read the dense weight through, and what the fused masked optimizers step.

A conv mask [Cout, Cin / groups, kh, kw] is indexed as its [Cout, Cin / groups * kh * kw] view. Built on the
host with numpy when the mask changes (prune time), cached on the mask like the tile index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lthfast.indexing.tiles import cached_on_mask


@dataclass(frozen=True)
class AliveIndex:
    """Alive entries of a 2-D [N, K] bool mask (CPU tensors, contiguous).

    ``row_ptr`` int64 [N + 1] and ``cols`` int32 [nnz]: row n's alive columns, ascending, are
    ``cols[row_ptr[n]:row_ptr[n + 1]]`` (the forward and dW read W[n, k] at offset n * K + k).
    ``col_ptr`` int64 [K + 1] and ``col_rows`` int32 [nnz]: column k's alive rows, ascending (dX).
    """

    shape: tuple[int, int]
    row_ptr: torch.Tensor
    cols: torch.Tensor
    col_ptr: torch.Tensor
    col_rows: torch.Tensor

    def __post_init__(self) -> None:
        # The four arrays' addresses, read by every kernel call (the arrays are never written after the build).
        object.__setattr__(
            self, "addresses",
            (self.row_ptr.data_ptr(), self.cols.data_ptr(), self.col_ptr.data_ptr(), self.col_rows.data_ptr()),
        )  # fmt: skip

    @property
    def nnz(self) -> int:
        return int(self.cols.numel())

    @property
    def density(self) -> float:
        total = self.shape[0] * self.shape[1]
        return self.nnz / total if total else 0.0


def _ptr(counts: np.ndarray) -> torch.Tensor:
    ptr = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return torch.from_numpy(ptr)


def build_alive_index(mask: torch.Tensor) -> AliveIndex:
    """The ``AliveIndex`` of a 2-D bool mask on the CPU. Prefer the cached ``alive_index``."""
    if mask.dim() != 2 or mask.dtype != torch.bool or mask.device.type != "cpu":
        raise ValueError(f"alive index needs a 2-D bool CPU mask, got {tuple(mask.shape)} {mask.dtype} {mask.device}")
    n, k = mask.shape
    m = mask.numpy()
    rows, cols = np.nonzero(m)
    col_cols, col_rows = np.nonzero(m.T)
    return AliveIndex(
        shape=(n, k),
        row_ptr=_ptr(np.bincount(rows, minlength=n)),
        cols=torch.from_numpy(cols.astype(np.int32)),
        col_ptr=_ptr(np.bincount(col_cols, minlength=k)),
        col_rows=torch.from_numpy(col_rows.astype(np.int32)),
    )


def alive_index(mask: torch.Tensor) -> AliveIndex:
    """The alive index of ``mask`` (2-D, or a conv mask indexed as [N, -1]), cached on the mask (rebuilt after any
    change to it: ``cached_on_mask``)."""
    if mask.dim() == 2:
        return cached_on_mask(mask, ("alive",), lambda: build_alive_index(mask))
    # cached on the mask itself: a channels_last conv mask has no [N, -1] view, and a reshaped copy would be a new
    # tensor (a new cache) at every call
    return cached_on_mask(mask, ("alive",), lambda: build_alive_index(mask.reshape(mask.shape[0], -1)))
