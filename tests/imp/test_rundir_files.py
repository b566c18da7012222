"""Run-directory files follow the umask (they were 0600, unreadable by others on a shared filesystem), and the same
run writes the same safetensors bytes (safetensors wrote its metadata in hash-map order)."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from lthfast.imp import run, rundir
from lthfast.pruning import Masks


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_run_files_get_the_mode_the_umask_gives(tiny, umask, mask):
    umask(mask)
    result = run({**tiny, "levels": 1, "name": f"m{mask:o}", "plots": True})
    unit = result.path / "replicate_0" / "level_1"
    files = [result.path / "config.json", result.path / "env.json", result.path / "summary.csv"]
    files += [result.path / "replicate_0" / "rewind.pt", result.path / "plots" / "accuracy.png"]
    files += [unit / name for name in ("mask.safetensors", "model.safetensors", "checkpoint.pt", "done.json")]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def _random_masks(seed: int) -> Masks:
    g = torch.Generator().manual_seed(seed)
    names = ["fc2.weight", "Conv.weight", "fc1.weight", "é.weight"]  # unsorted, mixed case, non-ASCII
    return Masks({n: torch.rand(5, 7, generator=g) > 0.5 for n in names})


def test_the_same_masks_give_the_same_bytes_every_time(tmp_path):
    masks = _random_masks(0)
    paths = [tmp_path / f"m{i}.safetensors" for i in range(8)]
    for path in paths:
        rundir.save_masks(path, masks)
    first = paths[0].read_bytes()
    assert all(p.read_bytes() == first for p in paths[1:])
    loaded = Masks.load(paths[0])
    assert list(loaded) == list(masks) and all(torch.equal(loaded[n], masks[n]) for n in masks)


def test_the_header_is_rewritten_sorted_and_the_file_still_loads(tmp_path):
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "A": torch.tensor([True, False, True])}
    header = {
        "__metadata__": {"order": '["b", "A"]', "format": "lthfast.Masks"},
        "b": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "A": {"dtype": "BOOL", "shape": [3], "data_offsets": [24, 27]},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + tensors["b"].numpy().tobytes() + bytes([1, 0, 1]))
    before = path.stat().st_size
    rundir.canonical_safetensors_header(path)
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    rewritten = json.loads(data[8 : 8 + size])
    assert list(rewritten) == sorted(header) and list(rewritten["__metadata__"]) == ["format", "order"]
    assert path.stat().st_size == before and size == len(text)
    loaded = load_file(str(path))
    assert torch.equal(loaded["b"], tensors["b"]) and torch.equal(loaded["A"], tensors["A"])


def test_two_identical_runs_write_identical_mask_and_model_files(tiny):
    a = run({**tiny, "levels": 1, "name": "a"})
    b = run({**tiny, "levels": 1, "name": "b"})
    for name in ("mask.safetensors", "model.safetensors"):
        for level in (0, 1):
            unit = f"replicate_0/level_{level}/{name}"
            assert (a.path / unit).read_bytes() == (b.path / unit).read_bytes(), unit
