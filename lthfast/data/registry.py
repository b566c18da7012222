"""``load_dataset(name, ...)``: the one entry point the driver uses."""

from __future__ import annotations

from lthfast.data.dataset import DataError, Dataset
from lthfast.data.embedded import load_digits, load_mnist1d, load_synthetic
from lthfast.data.local import load_cifar10, load_mnist

DATASETS = ("mnist1d", "digits", "synthetic", "mnist", "cifar10")
LOCAL = ("mnist", "cifar10")


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    val_size: int | float = 0.1,
    num_samples: int = 10_000,
    input_shape: tuple[int, ...] = (3, 32, 32),
) -> Dataset:
    """Build dataset ``name`` (one of DATASETS) on the CPU.

    num_samples: examples generated for mnist1d (80% train, 20% test) and synthetic; input_shape: synthetic only;
    data_dir: where mnist / cifar10 files live; cache_dir: where generated data is cached (None: no cache).
    Raises DataError naming the dataset or the missing file.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")
    if name in LOCAL and not data_dir:
        raise DataError(f"dataset {name} is read from local files: pass --data-dir (nothing is downloaded)")
    if name == "mnist1d":
        return load_mnist1d(num_samples, val_size, cache_dir)
    if name == "digits":
        return load_digits(val_size)
    if name == "synthetic":
        return load_synthetic(num_samples, val_size, tuple(input_shape))
    if name == "mnist":
        return load_mnist(data_dir, val_size)
    return load_cifar10(data_dir, val_size)
