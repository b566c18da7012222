"""Local copies of MNIST (IDX files, optionally gzipped) and CIFAR-10 (python pickle batches). Never downloads."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import torch

from lthfast.data.dataset import DataError, Dataset, split_validation, standardize

MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _find(data_dir: Path, stem: str, subdirs: tuple[str, ...], dataset: str) -> Path:
    for sub in subdirs:
        for suffix in ("", ".gz"):
            path = data_dir / sub / f"{stem}{suffix}"
            if path.is_file():
                return path
    looked = ", ".join(str(data_dir / sub) if sub else str(data_dir) for sub in subdirs)
    raise DataError(f"{dataset}: missing file {stem} (or {stem}.gz) in --data-dir; looked in {looked}")


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format; unsigned bytes), gzipped when the name ends in .gz."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DataError(
            f"{path}: expected {int(np.prod(dims))} bytes of data for shape {dims}, found {len(raw) - offset}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _check_pair(x: np.ndarray, y: np.ndarray, x_path: Path, y_path: Path, image: tuple[int, ...]) -> None:
    """One split's images and labels, checked against each other and the format: DataError naming the file."""
    if x.ndim != 1 + len(image) or x.shape[1:] != image:
        raise DataError(f"{x_path}: images of shape {tuple(x.shape[1:])}, expected {image}")
    if y.ndim != 1:
        raise DataError(f"{y_path}: labels of shape {tuple(y.shape)}, expected one label per image")
    if len(x) != len(y):
        raise DataError(f"{y_path}: {len(y)} labels for the {len(x)} images of {x_path.name}")
    if len(y) and not (0 <= int(y.min()) and int(y.max()) < 10):
        raise DataError(f"{y_path}: labels must be in [0, 10), found {int(y.min())}..{int(y.max())}")


def load_mnist(data_dir: str | Path, val_size: int | float) -> Dataset:
    """MNIST from IDX files in data_dir (or data_dir/MNIST/raw, data_dir/mnist): input shape (1, 28, 28)."""
    root = Path(data_dir)
    subdirs = ("", "MNIST/raw", "mnist", "MNIST")
    paths = {key: _find(root, stem, subdirs, "mnist") for key, stem in MNIST_FILES.items()}
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        x_key, y_key = f"{split}_x", f"{split}_y"
        _check_pair(arrays[x_key], arrays[y_key], paths[x_key], paths[y_key], (28, 28))
    x = torch.from_numpy(arrays["train_x"].copy()).float().unsqueeze(1) / 255
    y = torch.from_numpy(arrays["train_y"].copy()).long()
    x_test = torch.from_numpy(arrays["test_x"].copy()).float().unsqueeze(1) / 255
    y_test = torch.from_numpy(arrays["test_y"].copy()).long()
    x_train, y_train, x_val, y_val = split_validation(x, y, val_size)
    x_train, x_val, x_test = standardize(x_train, x_val, x_test)
    return Dataset("mnist", x_train, y_train, x_val, y_val, x_test, y_test, num_classes=10)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    opener = gzip.open if path.suffix == ".gz" else open  # _find takes name.gz too
    try:
        with opener(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a malformed file, named below
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from exc
    _check_pair(data, labels, path, path, (3, 32, 32))
    return data, labels


def load_cifar10(data_dir: str | Path, val_size: int | float) -> Dataset:
    """CIFAR-10 from the python batches in data_dir (or data_dir/cifar-10-batches-py): input (3, 32, 32)."""
    root = Path(data_dir)
    subdirs = ("", "cifar-10-batches-py")
    paths = {name: _find(root, name, subdirs, "cifar10") for name in CIFAR10_FILES}
    batches = [_read_cifar_batch(paths[name]) for name in CIFAR10_FILES[:5]]
    x = torch.from_numpy(np.concatenate([b[0] for b in batches])).float() / 255
    y = torch.from_numpy(np.concatenate([b[1] for b in batches]))
    test_x, test_y = _read_cifar_batch(paths["test_batch"])
    x_train, y_train, x_val, y_val = split_validation(x, y, val_size)
    x_train, x_val, x_test = standardize(x_train, x_val, torch.from_numpy(test_x).float() / 255, dims=(1,))
    return Dataset("cifar10", x_train, y_train, x_val, y_val, x_test, torch.from_numpy(test_y), num_classes=10)
