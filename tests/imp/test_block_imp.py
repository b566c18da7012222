"""lthfast imp --block B / --nm N:M on a tiny MLP: whole tiles at every level and in every control, masks that only
shrink, the lowest-scoring tiles pruned, weights remaining that follow the schedule as closely as tiles allow, N:M
masks; --block 1 unchanged (bit for bit), old run directories resumed, bad input refused before anything is
written."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lthfast.cli import main
from lthfast.imp import run
from lthfast.imp.config import Config, digest
from lthfast.models import build_model
from lthfast.pruning import Masks, sparsify

BLOCK = 4


def _masks(unit: Path) -> Masks:
    return Masks.load(unit / "mask.safetensors")


def _weights(unit: Path, hidden) -> dict[str, torch.Tensor]:
    model = sparsify(build_model("mlp", (8,), 10, hidden=tuple(hidden)))
    model.load_state_dict(load_file(str(unit / "model.safetensors")))
    return {f"{n}.weight": m.weight.detach().double() for n, m in model.named_modules() if hasattr(m, "mask")}


def _tiles(shape, block=BLOCK):
    for i in range(0, shape[0], block):
        for j in range(0, shape[1], block):
            yield slice(i, i + block), slice(j, j + block)


def _alive_tiles(mask) -> int:
    return sum(bool(mask[r, c].any()) for r, c in _tiles(mask.shape))


def _scheduled(total: int, level: int) -> int:
    for _ in range(level):
        total -= round(0.2 * total)
    return total


@pytest.fixture(scope="module")
def block_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("block")
    options = {
        "model": "mlp", "hidden": [18], "dataset": "synthetic", "synthetic_shape": [8], "num_samples": 240,
        "val_size": 40, "batch_size": 20, "train_steps": "30it", "eval_every": "10it", "levels": 3, "block": BLOCK,
        "backend": "torch", "threads": 1, "quiet": True, "plots": False, "out_dir": str(tmp / "runs"),
        "controls": "all", "control_levels": [2],
    }  # fmt: skip
    return run(options), options


def test_every_level_is_whole_tiles_that_only_shrink(block_run):
    result, _ = block_run
    rep = result.path / "replicate_0"
    previous = _masks(rep / "level_0")
    assert previous.density() == 1.0
    for level in (1, 2, 3):
        masks = _masks(rep / f"level_{level}")
        for name, mask in masks.items():
            assert not (mask & ~previous[name]).any(), (level, name)
            for rows, cols in _tiles(mask.shape):  # [18, 8] and [10, 18]: edge tiles of 2 rows / 2 columns
                assert bool(mask[rows, cols].all()) or not bool(mask[rows, cols].any()), (level, name, rows, cols)
        previous = masks


def test_levels_prune_the_lowest_mean_magnitude_tiles_nearest_the_schedule(block_run):
    result, options = block_run
    rep = result.path / "replicate_0"
    total = _masks(rep / "level_0").total_count()
    for level in (1, 2, 3):
        before, after = _masks(rep / f"level_{level - 1}"), _masks(rep / f"level_{level}")
        weights = _weights(rep / f"level_{level - 1}", options["hidden"])
        pruned, kept, sizes = [], [], []
        for name, w in weights.items():
            for rows, cols in _tiles(w.shape):
                if not before[name][rows, cols].any():
                    continue
                score = float(w[rows, cols].abs().sum()) / w[rows, cols].numel()  # L1 over the tile's own size
                (kept if after[name][rows, cols].any() else pruned).append(score)
                sizes.append(w[rows, cols].numel())
        assert pruned and max(pruned) <= min(kept) * (1 + 1e-6), level
        # whole tiles of at most 16 weights: the nearest count is within half a tile of the schedule
        assert abs(after.alive_count() - _scheduled(total, level)) <= max(sizes) // 2, level


def test_controls_at_block_granularity(block_run):
    result, _ = block_run
    level = result.path / "replicate_0" / "level_2"
    ticket = _masks(level)
    assert _masks(level / "random_reinit").equal(ticket)
    for control in ("random_prune", "rearrange"):
        masks = _masks(level / control)
        assert not masks.equal(ticket), control
        for name, mask in masks.items():
            assert _alive_tiles(mask) == _alive_tiles(ticket[name]), (control, name)
            for rows, cols in _tiles(mask.shape):
                assert bool(mask[rows, cols].all()) or not bool(mask[rows, cols].any()), (control, name)


def test_report_names_the_granularity(block_run, capsys):
    result, _ = block_run
    assert main(["report", str(result.path), "--no-plots"]) == 0
    assert "in 4x4 blocks" in capsys.readouterr().out.splitlines()[0]


def test_nm_run_reaches_exactly_n_per_group(tiny):
    result = run({**tiny, "hidden": [18], "nm": "2:4", "levels": 4, "controls": "random_prune",
                  "control_levels": [4]})  # fmt: skip
    rep = result.path / "replicate_0"
    previous = _masks(rep / "level_0")
    for level in range(1, 5):
        masks = _masks(rep / f"level_{level}")
        for name, mask in masks.items():
            assert not (mask & ~previous[name]).any()
            counts = [int(mask[r, s : s + 4].sum()) for r in range(mask.shape[0]) for s in range(0, mask.shape[1], 4)]
            widths = [min(4, mask.shape[1] - s) for r in range(mask.shape[0]) for s in range(0, mask.shape[1], 4)]
            assert all(c >= min(2, w) for c, w in zip(counts, widths)), (level, name)
            if level == 4:  # 0.8^4 = 41% <= 2/4: the N:M mask, exactly 2 alive in every group of 4
                assert counts == [min(2, w) for w in widths], name
        previous = masks
    control = _masks(rep / "level_4" / "random_prune")
    assert not control.equal(previous)
    for name, mask in control.items():
        assert [int(mask[r, s : s + 4].sum()) for r in range(mask.shape[0]) for s in range(0, mask.shape[1], 4)] == [
            int(previous[name][r, s : s + 4].sum()) for r in range(mask.shape[0]) for s in range(0, mask.shape[1], 4)
        ]


def _unit_files(root: Path) -> dict[str, bytes]:
    names = ("mask.safetensors", "model.safetensors", "metrics.jsonl", "sparsity.json")
    return {str(p.relative_to(root)): p.read_bytes() for name in names for p in sorted(root.rglob(name))}


def test_block_1_is_the_run_without_the_flag(tiny, tmp_path):
    plain = run({**tiny, "out_dir": str(tmp_path / "a")})
    flagged = run({**tiny, "out_dir": str(tmp_path / "b"), "block": 1})
    assert plain.path.name == flagged.path.name  # the same identity, so the same run directory name
    files = _unit_files(plain.path)
    assert len(files) == 3 * 4 and files == _unit_files(flagged.path)


def test_identity_of_runs_made_before_block_and_nm(tiny):
    cfg = Config.from_dict(tiny)
    before = {k: v for k, v in cfg.identity().items() if k not in ("block", "nm")}
    assert "block" not in cfg.identity() and "nm" not in cfg.identity()
    assert cfg.short_hash() == digest(before) == cfg.replace(block=1).short_hash()
    hashes = {cfg.short_hash(), cfg.replace(block=16).short_hash(), cfg.replace(nm="2:4", levels=3).short_hash()}
    assert len(hashes) == 3


def test_an_old_run_directory_resumes(tiny):
    first = run({**tiny, "levels": 1})
    config_file = first.path / "config.json"
    old = json.loads(config_file.read_text())
    for key in ("block", "nm"):  # as written before the options existed
        old["config"].pop(key)
        assert key not in old["identity"]
    config_file.write_text(json.dumps(old))
    before = _unit_files(first.path)
    again = run({**tiny, "levels": 2})
    assert again.path == first.path
    after = _unit_files(first.path)
    assert {k: after[k] for k in before} == before and "replicate_0/level_2/mask.safetensors" in after


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--block", "3"], "block must be one of 1, 4, 8, 16, 32, 64, 128, got 3"),
        (["--block", "x"], "option block='x'"),
        (["--nm", "4:4"], "need 1 <= N < M"),
        (["--nm", "2-4"], "nm must be N:M"),
        (["--nm", "2:4"], "ask for levels <= 4"),
        (["--nm", "2:4", "--levels", "2", "--block", "16"], "choose one"),
    ],
)
def test_bad_granularity_is_one_line_before_anything_is_written(argv, message, capsys, tmp_path):
    out = tmp_path / "runs"
    assert main(["imp", "--out-dir", str(out), "--quiet", "--dataset", "synthetic", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lthfast: error: ") and message in err and "\n" not in err
    assert not out.exists()
