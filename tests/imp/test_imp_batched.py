"""Batched mode of ``lthfast imp`` (``--no-sequential``; lthfast.imp.batched): the ready units of a wave train
together, stacked, and give what training them one at a time gives.

Measured on the 2-core CPU VM, the tiny MLP (Adam, lr 1e-3, 30 iterations a unit) with 3 replicates and two controls
at both levels: batched weights differ from sequential ones by at most 6.0e-8 (one float32 rounding step of weights
of magnitude ~0.5; the stacked products sum in another order), with the same masks and early-stop iterations; the
tests allow ``TOL`` = 2.5e-7. The tiny conv-net with BatchNorm (ResNet-20) in float64 differs by at most 9.5e-14
(summation order again), allowed 4e-13: there the whole bookkeeping (augmentation, BatchNorm statistics, the rewind
snapshot, the optimizer state of every unit) is checked at a precision where a mix-up could not hide. Float32 conv
nets are left out: the tiny ones amplify rounding chaotically (a 1e-7 relative change of their initial weights
moves trained weights by up to 6e-3), so their float32 comparison would say nothing.
"""

import argparse
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lthfast.data import Dataset, load_dataset
from lthfast.distributed import World
from lthfast.imp import Config, batched, driver, run
from lthfast.imp.cli import config_from_args, register
from lthfast.models import build_model

TOL = 2.5e-7
TIMING = {"wall_s", "train_s", "samples_per_s", "peak_mem_mb", "trained_with"}


def _units(root: Path) -> list[Path]:
    return sorted(done.parent.relative_to(root) for done in root.glob("replicate_*/level_*/**/done.json"))


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.name not in (".lock", "env.json"))


def _compare(a: Path, b: Path, tol: float) -> float:
    """Assert that run directories ``a`` and ``b`` hold the same units with the same masks and early-stop iterations
    and weights within ``tol``; return the largest weight difference."""
    assert _units(a) == _units(b) and _files(a) == _files(b)
    worst = 0.0
    for unit in _units(a):
        mine, theirs = load_file(str(a / unit / "model.safetensors")), load_file(str(b / unit / "model.safetensors"))
        assert mine.keys() == theirs.keys()
        for key, value in mine.items():
            if value.dtype == torch.bool:
                assert torch.equal(value, theirs[key]), (unit, key)
            else:
                worst = max(worst, float((value - theirs[key]).abs().max()))
        done_a, done_b = (json.loads((root / unit / "done.json").read_text()) for root in (a, b))
        assert done_a["early_stop_iteration"] == done_b["early_stop_iteration"], unit
        for key in ("iterations", "start_iteration", "density", "alive", "samples", "replicate", "level", "branch"):
            assert done_a[key] == done_b[key], (unit, key)
    assert worst <= tol, worst
    return worst


def test_batched_equals_sequential(tiny, tmp_path):
    options = {**tiny, "replicates": 3, "controls": ["random_reinit", "random_prune"], "name": "r"}
    one = run({**options, "out_dir": str(tmp_path / "one"), "sequential": True})
    together = run({**options, "out_dir": str(tmp_path / "together"), "sequential": False})
    _compare(one.path, together.path, TOL)
    # Waves: every level 0; every level-1 ticket; the level-1 controls with the level-2 tickets; the level-2 controls.
    trained_with = {}
    for unit in _units(together.path):
        done = json.loads((together.path / unit / "done.json").read_text())
        trained_with[(done["level"], done["branch"])] = done["trained_with"]
        assert json.loads((one.path / unit / "done.json").read_text())["trained_with"] == 1
    assert trained_with == {
        (0, "ticket"): 3, (1, "ticket"): 3, (1, "random_reinit"): 9, (1, "random_prune"): 9, (2, "ticket"): 9,
        (2, "random_reinit"): 6, (2, "random_prune"): 6,
    }  # fmt: skip
    # At most 4 together: the wave of 9 in groups of 3, 3 and 3, the wave of 6 in two groups of 3.
    capped = run({**options, "out_dir": str(tmp_path / "capped"), "sequential": False, "max_parallel": 4})
    _compare(one.path, capped.path, TOL)
    for unit in _units(capped.path):
        assert json.loads((capped.path / unit / "done.json").read_text())["trained_with"] == 3, unit
    # checkpoint.pt as a sequential run writes it: the unit's model, an optimizer state it loads, its RNG states.
    for unit in _units(one.path):
        a, b = (torch.load(root / unit / "checkpoint.pt", weights_only=True) for root in (one.path, together.path))
        assert a.keys() == b.keys() and a["model"].keys() == b["model"].keys()
        assert json.loads(a["state"])["iteration"] == json.loads(b["state"])["iteration"] == 30
        assert a["rng"].keys() == b["rng"].keys() and all(torch.equal(a["rng"][k], b["rng"][k]) for k in a["rng"])
        assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
        for i, state in a["optimizer"]["state"].items():
            assert state.keys() == b["optimizer"]["state"][i].keys()
            for key, value in state.items():
                other = b["optimizer"]["state"][i][key]
                assert value.shape == other.shape and value.dtype == other.dtype, (unit, i, key)
                assert (value - other).abs().max() <= TOL * max(1.0, float(value.abs().max())), (unit, i, key)


def test_max_parallel_1_trains_one_unit_at_a_time(tiny, tmp_path, monkeypatch):
    options = {**tiny, "replicates": 2, "controls": ["random_prune"], "control_levels": [1], "name": "r"}
    one = run({**options, "out_dir": str(tmp_path / "one")})  # the CPU default: sequential
    monkeypatch.setattr(driver, "train_units", lambda *a, **k: pytest.fail("a group of one trained batched"))
    single = run({**options, "out_dir": str(tmp_path / "single"), "sequential": False, "max_parallel": 1})
    assert _compare(one.path, single.path, 0.0) == 0.0


def _float64_data(cache: Path) -> Dataset:
    src = load_dataset("synthetic", cache_dir=str(cache), val_size=40, num_samples=240, input_shape=(3, 8, 8))
    splits = {k: getattr(src, k) for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
    return Dataset("synthetic64", num_classes=src.num_classes, **{k: v.double() if k[0] == "x" else v
                                                                   for k, v in splits.items()})  # fmt: skip


def test_batched_resnet_in_float64_equals_sequential(tiny, tmp_path):
    """Augmentation, BatchNorm statistics, the rewind snapshot at iteration 4 and Adam's state, at float64."""
    data = _float64_data(tmp_path / "cache")
    make = lambda: build_model("resnet20", (3, 8, 8), data.num_classes).double()  # noqa: E731
    options = {**tiny, "replicates": 2, "levels": 1, "controls": ["random_prune"], "augment": True, "rewind": "4it",
               "train_steps": "8it", "eval_every": "4it", "checkpoint_every": "4it", "name": "r"}  # fmt: skip
    one = run({**options, "out_dir": str(tmp_path / "one")}, model_fn=make, data=data)
    together = run({**options, "out_dir": str(tmp_path / "together"), "sequential": False}, model_fn=make, data=data)
    _compare(one.path, together.path, 4e-13)
    for root in (one.path, together.path):
        assert [torch.load(root / f"replicate_{r}" / "rewind.pt", weights_only=True)["step"] for r in (0, 1)] == [4, 4]


def _cut_batched(monkeypatch, error: type[Exception], at: int = 25):
    """Raise from inside the level-1 tickets' group at iteration ``at``."""
    original = driver.train_units

    def interrupted(group, *args, on_iteration=None, **kwargs):
        def hook(it, group):
            if it == at and any(p.unit.path.name == "level_1" for p in group):
                raise error

        return original(group, *args, on_iteration=hook, **kwargs)

    monkeypatch.setattr(driver, "train_units", interrupted)


@pytest.mark.parametrize("cut, resume", [("batched", "batched"), ("batched", "sequential"), ("sequential", "batched")])
def test_an_interrupted_run_resumes_in_either_mode(tiny, tmp_path, monkeypatch, cut_training, cut, resume):
    """Cut at iteration 25 of the level-1 tickets (checkpoints at 20), then resumed: batched after batched is the
    uninterrupted batched run bitwise; across modes, the uninterrupted run of the cut's mode within TOL."""
    options = {**tiny, "replicates": 2, "controls": ["random_prune"], "control_levels": [1], "name": "r",
               "rewind": "5it"}  # fmt: skip
    mode = {"batched": False, "sequential": True}
    reference = run({**options, "out_dir": str(tmp_path / "ref"), "sequential": mode[cut]})
    if cut == "batched":
        _cut_batched(monkeypatch, cut_training.error)
    else:
        cut_training(at=25)
    with pytest.raises(cut_training.error):
        run({**options, "out_dir": str(tmp_path / "cut"), "sequential": mode[cut]})
    monkeypatch.undo()
    root = tmp_path / "cut" / "r"
    for r in range(2 if cut == "batched" else 1):
        ckpt = torch.load(root / f"replicate_{r}" / "level_1" / "checkpoint.pt", weights_only=True)
        assert json.loads(ckpt["state"])["iteration"] == 20
        assert not (root / f"replicate_{r}" / "level_1" / "done.json").exists()
    resumed = run({**options, "out_dir": str(tmp_path / "cut"), "sequential": mode[resume]})
    _compare(reference.path, resumed.path, 0.0 if cut == resume else TOL)


def test_a_kill_between_two_units_checkpoints_resumes(tiny, tmp_path, monkeypatch, cut_training):
    """The group's units write their checkpoints one after the other: cut after the first unit's at iteration 20,
    the two units resume from 20 and from 10, in groups of their own, and end as the uninterrupted run."""
    options = {**tiny, "replicates": 2, "name": "r", "sequential": False}
    reference = run({**options, "out_dir": str(tmp_path / "ref")})
    original, written = batched.write_checkpoint, []

    def write_checkpoint(path, *args, **kwargs):
        if path.parent.name == "level_1" and args[3]["iteration"] == 20:
            written.append(path)
            if len(written) == 2:
                raise cut_training.error
        return original(path, *args, **kwargs)

    monkeypatch.setattr(batched, "write_checkpoint", write_checkpoint)
    with pytest.raises(cut_training.error):
        run({**options, "out_dir": str(tmp_path / "cut")})
    monkeypatch.undo()
    iterations = [json.loads(torch.load(p.parent / "checkpoint.pt", weights_only=True)["state"])["iteration"]
                  for p in written]  # fmt: skip
    assert iterations == [20, 10]
    groups, train_units = [], driver.train_units

    def spy(group, *args, **kwargs):
        groups.append(len(group))
        return train_units(group, *args, **kwargs)

    monkeypatch.setattr(driver, "train_units", spy)
    resumed = run({**options, "out_dir": str(tmp_path / "cut")})
    assert groups == [2], "the two level-1 tickets trained alone; the two level-2 tickets together"
    _compare(reference.path, resumed.path, TOL)


class WithLayerNorm(nn.Module):
    """An MLP with a LayerNorm: lthfast.units cannot stack it (the LayerNorm holds parameters)."""

    def __init__(self, classes: int):
        super().__init__()
        self.fc1, self.norm, self.out = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, classes)

    def forward(self, x):
        return self.out(torch.relu(self.norm(self.fc1(x))))


class Centered(nn.Module):
    """An MLP that centers its hidden features: it stacks, but the stacked forward centers over every unit's."""

    def __init__(self, classes: int):
        super().__init__()
        self.fc1, self.out = nn.Linear(8, 16), nn.Linear(16, classes)

    def forward(self, x):
        h = self.fc1(x)
        return self.out(torch.relu(h - h.mean(1, keepdim=True)))


@pytest.mark.parametrize("model, reason", [(WithLayerNorm, "norm \\(LayerNorm\\) holds weight, bias"),
                                           (Centered, "does not compute each unit's")])  # fmt: skip
def test_a_model_that_cannot_stack_trains_one_unit_at_a_time(tiny, tmp_path, model, reason):
    options = {**tiny, "replicates": 2, "levels": 1, "name": "r"}
    one = run({**options, "out_dir": str(tmp_path / "one")}, model_fn=lambda: model(10))
    with pytest.warns(UserWarning, match=f"units train one at a time: stack: .*{reason}") as caught:
        together = run({**options, "out_dir": str(tmp_path / "together"), "sequential": False},
                       model_fn=lambda: model(10))  # fmt: skip
    assert len([w for w in caught if "one at a time" in str(w.message)]) == 1, "warned once"
    assert _compare(one.path, together.path, 0.0) == 0.0


def test_what_is_batched_and_the_default(tiny, tmp_path):
    single = World(device=torch.device("cpu"))
    assert batched.blocker(Config(), single) is None
    assert "--compile" in batched.blocker(Config(compile=True), single)
    assert "fp16" in batched.blocker(Config(amp="fp16"), single)
    assert batched.blocker(Config(amp="bf16"), single) is None
    assert "dropout" in batched.blocker(Config(dropout=0.1), single)
    assert not batched.wanted(Config(), torch.device("cpu")), "the CPU default: one unit at a time"
    assert batched.wanted(Config(), torch.device("cuda")), "the CUDA default: together"
    assert batched.wanted(Config(sequential=False), torch.device("cpu"))
    assert not batched.wanted(Config(sequential=True), torch.device("cuda"))
    with pytest.warns(UserWarning, match="units train one at a time: dropout > 0"):
        assert not batched.enabled(Config(sequential=False, dropout=0.1), single)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not batched.enabled(Config(dropout=0.1), single), "the CPU default warns nothing"
    assert Config(sequential=False, max_parallel=4).identity() == Config().identity()
    assert batched.group_size(Config(max_parallel=3), torch.device("cpu"), 1) == 3
    assert batched.group_size(Config(), torch.device("cpu"), 2**62) == 1


def test_cli_flags(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    parse = lambda *argv: config_from_args(parser.parse_args(["imp", *argv]))  # noqa: E731
    assert (parse().sequential, parse().max_parallel) == (None, 0)
    assert parse("--sequential").sequential is True
    cfg = parse("--no-sequential", "--max-parallel", "4")
    assert (cfg.sequential, cfg.max_parallel) == (False, 4)
    from lthfast.cli import main

    assert main(["imp", "--max-parallel", "-1", "--out-dir", str(tmp_path)]) == 2
    assert "max_parallel must be >= 0" in capsys.readouterr().err
