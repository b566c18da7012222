"""Datasets for the IMP driver: embedded (MNIST-1D, scikit-learn digits, synthetic) and local (MNIST, CIFAR-10).

Every dataset is held in memory as tensors (``Dataset``) with a validation split carved out of the training set,
separate from the test set. Nothing here downloads: embedded sets are generated or bundled, local sets are read
from ``data_dir`` and a missing file is named in the error.
"""

from __future__ import annotations

from lthfast.data.batches import BatchSampler, augment_crop_flip
from lthfast.data.dataset import DataError, Dataset, split_validation
from lthfast.data.registry import DATASETS, load_dataset

__all__ = ["DATASETS", "BatchSampler", "DataError", "Dataset", "augment_crop_flip", "load_dataset", "split_validation"]
