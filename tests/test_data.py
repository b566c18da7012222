"""Datasets: embedded sets, local MNIST / CIFAR-10 readers (on small files written here), the validation split,
and the batch order."""

import gzip
import pickle

import numpy as np
import pytest
import torch

from lthfast.data import BatchSampler, DataError, augment_crop_flip, load_dataset, split_validation
from lthfast.data.local import MNIST_FILES


def _write_idx(path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


@pytest.fixture
def mnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.integers(0, 256, (60, 28, 28)), "train_y": rng.integers(0, 10, 60),
        "test_x": rng.integers(0, 256, (20, 28, 28)), "test_y": rng.integers(0, 10, 20),
    }  # fmt: skip
    for i, (key, stem) in enumerate(MNIST_FILES.items()):
        _write_idx(tmp_path / stem, arrays[key], gz=i % 2 == 0)
    return tmp_path, arrays


def test_mnist_idx_plain_and_gzip(mnist_dir):
    folder, arrays = mnist_dir
    data = load_dataset("mnist", data_dir=str(folder), val_size=10)
    assert data.input_shape == (1, 28, 28)
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (50, 10, 20)
    assert torch.equal(data.y_test, torch.from_numpy(arrays["test_y"]).long())
    # Train and validation together are the original training set, each label exactly once.
    labels = torch.cat([data.y_train, data.y_val]).sort().values
    assert torch.equal(labels, torch.from_numpy(arrays["train_y"]).long().sort().values)


def test_mnist_missing_file_is_named(mnist_dir):
    folder, _ = mnist_dir
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", data_dir=str(folder))


def test_mnist_bad_magic_is_named(mnist_dir):
    folder, _ = mnist_dir
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"\x01\x02\x03\x04junk")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*magic"):
        load_dataset("mnist", data_dir=str(folder))


def test_cifar10_batches(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    labels = {}
    for name in names:
        labels[name] = rng.integers(0, 10, 8).tolist()
        batch = {b"data": rng.integers(0, 256, (8, 3072)).astype(np.uint8), b"labels": labels[name]}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    data = load_dataset("cifar10", data_dir=str(tmp_path), val_size=4)
    assert data.input_shape == (3, 32, 32)
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (36, 4, 8)
    assert data.y_test.tolist() == labels["test_batch"]
    # Standardized per channel with the training split's statistics.
    assert torch.allclose(data.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    (root / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", data_dir=str(tmp_path))


@pytest.mark.parametrize(
    "key,array,message",
    [
        ("train_y", np.arange(30) % 10, "train-labels-idx1-ubyte: 30 labels for the 60 images"),
        ("train_y", np.arange(70) % 10, "train-labels-idx1-ubyte: 70 labels for the 60 images"),
        ("test_y", np.full(20, 200), r"t10k-labels-idx1-ubyte: labels must be in \[0, 10\), found 200..200"),
        ("train_x", np.zeros((60, 14, 14)), r"train-images-idx3-ubyte: images of shape \(14, 14\), expected"),
    ],
)
def test_mnist_files_that_disagree_are_named(mnist_dir, key, array, message):
    """Checked file by file at load time (they used to crash training later, or pass with shifted labels)."""
    folder, _ = mnist_dir
    stem = MNIST_FILES[key]
    for old in folder.glob(stem + "*"):
        old.unlink()
    _write_idx(folder / stem, array, gz=False)
    with pytest.raises(DataError, match=message):
        load_dataset("mnist", data_dir=str(folder))


def _cifar_dir(tmp_path, gz: bool = False, labels_of=None):
    rng = np.random.default_rng(1)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir(exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, 8).tolist() if labels_of is None or name not in labels_of else labels_of[name]
        batch = {b"data": rng.integers(0, 256, (8, 3072)).astype(np.uint8), b"labels": labels}
        with gzip.open(root / f"{name}.gz", "wb") if gz else open(root / name, "wb") as f:
            pickle.dump(batch, f)
    return tmp_path


def test_cifar10_gzipped_batches_are_read(tmp_path):
    data = load_dataset("cifar10", data_dir=str(_cifar_dir(tmp_path, gz=True)), val_size=4)
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (36, 4, 8)


@pytest.mark.parametrize(
    "labels,message",
    [([1, 2, 3], "data_batch_2: 3 labels for the 8 images"), ([12] * 8, r"data_batch_2: labels must be in \[0, 10\)")],
)
def test_cifar10_batch_whose_labels_disagree_is_named(tmp_path, labels, message):
    with pytest.raises(DataError, match=message):
        load_dataset("cifar10", data_dir=str(_cifar_dir(tmp_path, labels_of={"data_batch_2": labels})))


def test_local_dataset_needs_data_dir():
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("cifar10")


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")


def test_digits_splits_are_disjoint():
    data = load_dataset("digits", val_size=0.1)
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    rows = lambda x: {tuple(r.tolist()) for r in x.flatten(1)}
    assert not rows(data.x_val) & rows(data.x_test)
    assert len(data.y_train) + len(data.y_val) + len(data.y_test) == 1797


def test_mnist1d_is_generated_and_cached(tmp_path, monkeypatch):
    import mnist1d.data

    def no_download(*args, **kwargs):
        raise AssertionError("the downloading loader must never be called")

    monkeypatch.setattr(mnist1d.data, "get_dataset", no_download)
    state = np.random.get_state()[1].copy()
    a = load_dataset("mnist1d", num_samples=200, cache_dir=str(tmp_path), val_size=20)
    assert np.array_equal(np.random.get_state()[1], state), "the generator's reseeding must not leak"
    assert a.input_shape == (40,) and len(a.y_test) == 40 and len(a.y_val) == 20
    assert list(tmp_path.glob("mnist1d_200_*.npz"))
    b = load_dataset("mnist1d", num_samples=200, cache_dir=str(tmp_path), val_size=20)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


@pytest.mark.parametrize("under", ["c", ""])
def test_mnist1d_unusable_cache_dir_is_named(under, tmp_path, monkeypatch):
    import lthfast.data.embedded

    def no_generation(num_samples):
        raise AssertionError("an unusable cache_dir must fail before the data is generated")

    monkeypatch.setattr(lthfast.data.embedded, "_generate_mnist1d", no_generation)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = blocker / under if under else blocker
    with pytest.raises(DataError, match=f"cannot use cache_dir {cache}: "):
        load_dataset("mnist1d", num_samples=200, cache_dir=str(cache), val_size=20)


def test_synthetic_is_learnable_by_its_teacher_shape():
    data = load_dataset("synthetic", num_samples=300, val_size=30, input_shape=(2, 4, 4))
    assert data.input_shape == (2, 4, 4)
    assert len(set(data.y_train.tolist())) > 3


def test_split_validation_errors_and_determinism():
    x, y = torch.randn(20, 3), torch.randint(0, 3, (20,))
    with pytest.raises(DataError):
        split_validation(x, y, 20)
    a = split_validation(x, y, 0.25, seed=3)
    b = split_validation(x, y, 0.25, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and len(a[3]) == 5


def test_batch_sampler_epochs_and_resume():
    sampler = BatchSampler(10, 3, seed=5)
    assert sampler.steps_per_epoch == 3
    epoch0 = torch.cat([sampler.indices(i) for i in range(3)])
    assert len(set(epoch0.tolist())) == 9  # a permutation, the last incomplete batch dropped
    later = sampler.indices(7)
    fresh = BatchSampler(10, 3, seed=5)
    assert torch.equal(fresh.indices(7), later)  # no dependence on earlier calls
    assert not torch.equal(BatchSampler(10, 3, seed=6).indices(0), sampler.indices(0))


def test_augment_crop_flip_is_a_shifted_copy():
    x = torch.randn(4, 2, 6, 6)
    out = augment_crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(4):
        found = any(
            torch.equal(out[b], img[:, dy : dy + 6, dx : dx + 6])
            for img in (padded[b], padded[b].flip(-1))
            for dy in range(5)
            for dx in range(5)
        )
        assert found
