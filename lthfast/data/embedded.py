"""Datasets that need no download: MNIST-1D (generated), scikit-learn digits (bundled), synthetic."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from lthfast.data.dataset import DataError, Dataset, split_validation, standardize

MNIST1D_SEED = 42  # the mnist1d package's default generation seed: the "official" MNIST-1D distribution


def _generate_mnist1d(num_samples: int) -> dict[str, np.ndarray]:
    # make_dataset builds the data in-process from templates. The package's get_dataset() is never called: it
    # downloads a pickle by default. make_dataset reseeds Python's and NumPy's global RNGs, so restore them.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = MNIST1D_SEED
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


def mnist1d_arrays(num_samples: int, cache_dir: str | os.PathLike | None) -> dict[str, np.ndarray]:
    """MNIST-1D as arrays x [n, 40] float, y [n] int (80/20 train/test split of ``num_samples``).

    Generating 10,000 examples takes about 5 s on one core (2-core x86 VM), so the arrays are cached as
    ``mnist1d_<n>.npz`` in ``cache_dir`` (written to a temporary file, then renamed).
    """
    path = Path(cache_dir) / f"mnist1d_{num_samples}_seed{MNIST1D_SEED}.npz" if cache_dir else None
    if path is not None and path.exists():
        try:
            with np.load(path) as cached:
                return {k: cached[k] for k in ("x", "y", "x_test", "y_test")}
        except Exception:  # noqa: BLE001 - a damaged cache is regenerated, never trusted
            pass
    if path is not None:
        try:  # before generating: an unusable cache_dir fails at once
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"cannot use cache_dir {path.parent}: {exc.strerror or exc}") from None
    arrays = _generate_mnist1d(num_samples)
    if path is not None:
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise DataError(f"cannot write to cache_dir {path.parent}: {exc.strerror or exc}") from None
    return arrays


def load_mnist1d(num_samples: int, val_size: int | float, cache_dir=None) -> Dataset:
    """MNIST-1D: 10 classes of 1-D signals, input shape (40,), already standardized by the generator."""
    if num_samples < 100:
        raise DataError(f"mnist1d needs num_samples >= 100, got {num_samples}")
    a = mnist1d_arrays(num_samples, cache_dir)
    x = torch.from_numpy(a["x"]).float()
    y = torch.from_numpy(a["y"]).long()
    x_train, y_train, x_val, y_val = split_validation(x, y, val_size)
    x_test, y_test = torch.from_numpy(a["x_test"]).float(), torch.from_numpy(a["y_test"]).long()
    return Dataset("mnist1d", x_train, y_train, x_val, y_val, x_test, y_test, num_classes=10)


def load_digits(val_size: int | float, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images bundled with the package): input shape (1, 8, 8)."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.from_numpy(bunch.images).float().unsqueeze(1)
    y = torch.from_numpy(bunch.target).long()
    x_rest, y_rest, x_test, y_test = split_validation(x, y, test_fraction, seed=1)
    x_train, y_train, x_val, y_val = split_validation(x_rest, y_rest, val_size)
    x_train, x_val, x_test = standardize(x_train, x_val, x_test)
    return Dataset("digits", x_train, y_train, x_val, y_val, x_test, y_test, num_classes=10)


def load_synthetic(
    num_samples: int, val_size: int | float, input_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10
) -> Dataset:
    """Gaussian inputs labelled by a random linear teacher (learnable, for throughput runs and tests)."""
    if num_samples < 10:
        raise DataError(f"synthetic data needs num_samples >= 10, got {num_samples}")
    generator = torch.Generator().manual_seed(1234)
    n_test = max(num_samples // 5, 1)
    x = torch.randn(num_samples + n_test, *input_shape, generator=generator)
    teacher = torch.randn(x[0].numel(), num_classes, generator=generator)
    y = (x.flatten(1) @ teacher).argmax(1)
    x_train, y_train, x_val, y_val = split_validation(x[:num_samples], y[:num_samples], val_size)
    return Dataset(
        "synthetic", x_train, y_train, x_val, y_val, x[num_samples:], y[num_samples:], num_classes=num_classes
    )
