"""The in-memory ``Dataset`` (train / validation / test tensors) and the validation split."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class DataError(ValueError):
    """A dataset cannot be built or read (unknown name, missing or malformed file); the message names it."""


@dataclass
class Dataset:
    """Train, validation and test splits as tensors on one device.

    x_* float32 [n, *input_shape]; y_* int64 [n] with labels in [0, num_classes). The validation split is
    disjoint from both the training and the test set (it is carved out of the original training set).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.shape[0] != y.shape[0]:
                raise DataError(f"dataset {self.name}: x_{split} has {x.shape[0]} rows but y_{split} {y.shape[0]}")
            if x.shape[1:] != self.x_train.shape[1:]:
                raise DataError(f"dataset {self.name}: x_{split} shape {tuple(x.shape[1:])} differs from x_train's")
            if y.dtype != torch.int64:
                raise DataError(f"dataset {self.name}: y_{split} must be int64 class labels, got {y.dtype}")
        if self.x_train.shape[0] == 0:
            raise DataError(f"dataset {self.name}: the training split is empty")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device | str) -> Dataset:
        """A copy with every tensor on ``device`` (the same object when nothing moves)."""
        device = torch.device(device)
        if self.x_train.device == device:
            return self
        moved = {k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
        return Dataset(self.name, num_classes=self.num_classes, **moved)

    def describe(self) -> str:
        return (
            f"{self.name}: input {self.input_shape}, {self.num_classes} classes, "
            f"{len(self.y_train)} train / {len(self.y_val)} val / {len(self.y_test)} test"
        )


def split_validation(
    x: torch.Tensor, y: torch.Tensor, val_size: int | float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split (x, y) into (x_train, y_train, x_val, y_val) by a seeded permutation.

    ``val_size`` is a count (int >= 1) or a fraction in (0, 1). The same seed gives the same split, so every
    replicate and level of a run validates on the same examples.
    """
    n = x.shape[0]
    count = int(round(val_size * n)) if isinstance(val_size, float) and val_size < 1 else int(val_size)
    if not 0 < count < n:
        raise DataError(f"validation split of {val_size} leaves no training or no validation data out of {n} rows")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = perm[:count], perm[count:]
    return x[train], y[train], x[val], y[val]


def standardize(train: torch.Tensor, *others: torch.Tensor, dims: tuple[int, ...] = ()) -> list[torch.Tensor]:
    """Center and scale every tensor with the training split's mean and std (over ``dims``, default all)."""
    reduce = tuple(d for d in range(train.dim()) if d not in dims)
    mean = train.mean(dim=reduce, keepdim=True)
    std = train.std(dim=reduce, keepdim=True).clamp_min(1e-8)
    return [(t - mean) / std for t in (train, *others)]
