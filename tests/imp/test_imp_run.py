"""The IMP loop end to end on a tiny run: layout, masks of every level and control, rewinding, one-shot,
refusal of another config, resume of finished runs, corrupt files, the user-model API and the report."""

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lthfast.cli import main
from lthfast.data import load_dataset
from lthfast.imp import CheckpointError, RunDirError, run
from lthfast.imp.report import report
from lthfast.pruning import Masks, sparsify, strategies

UNIT_FILES = ("mask.safetensors", "model.safetensors", "checkpoint.pt", "metrics.jsonl", "sparsity.json", "done.json")


def _masks(unit):
    return Masks.load(unit / "mask.safetensors")


def _model(unit, tiny):
    """A masked MLP holding the unit's final weights."""
    from lthfast.models import build_model

    model = sparsify(build_model("mlp", (8,), 10, hidden=tuple(tiny["hidden"])))
    model.load_state_dict(load_file(str(unit / "model.safetensors")))
    return model


@pytest.fixture(scope="module")
def controls_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("controls")
    options = {
        "model": "mlp", "hidden": [16], "dataset": "synthetic", "synthetic_shape": [8], "num_samples": 240,
        "val_size": 40, "batch_size": 20, "train_steps": "30it", "eval_every": "10it", "levels": 2,
        "backend": "torch", "threads": 1, "quiet": True, "out_dir": str(tmp / "runs"), "name": "c",
        "controls": "all", "control_levels": [2],
    }  # fmt: skip
    return run(options), options


def test_layout(controls_run):
    result, _ = controls_run
    root = result.path
    assert (root / "config.json").is_file() and (root / "summary.csv").is_file()
    env = json.loads((root / "env.json").read_text())
    assert {"torch", "device", "git_commit", "backend"} <= set(env)
    for level in range(3):
        unit = root / "replicate_0" / f"level_{level}"
        assert all((unit / f).is_file() for f in UNIT_FILES), level
    for control in ("random_reinit", "random_prune", "rearrange"):
        assert all((root / "replicate_0" / "level_2" / control / f).is_file() for f in UNIT_FILES)
        assert not (root / "replicate_0" / "level_1" / control).exists()
    assert sorted(p.name for p in (root / "plots").iterdir()) == ["accuracy.png", "early_stop.png", "throughput.png"]
    with open(root / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["level"], r["branch"]) for r in rows] == [
        ("0", "ticket"), ("1", "ticket"), ("2", "ticket"), ("2", "random_reinit"), ("2", "random_prune"),
        ("2", "rearrange"),
    ]  # fmt: skip
    metrics = [json.loads(line) for line in (root / "replicate_0/level_1/metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 10, 20, 30]
    done = json.loads((root / "replicate_0/level_1/done.json").read_text())
    assert done["samples"] == 30 * 20 and done["samples_per_s"] > 0 and done["peak_mem_mb"] > 0
    assert done["early_stop_iteration"] in (0, 10, 20, 30)


def test_levels_prune_the_previous_level_by_magnitude(controls_run):
    result, options = controls_run
    rep = result.path / "replicate_0"
    assert _masks(rep / "level_0").density() == 1.0
    for level in (1, 2):
        previous = _model(rep / f"level_{level - 1}", options)
        expected = strategies.magnitude(previous, Masks.from_model(previous), 0.2)
        assert _masks(rep / f"level_{level}").equal(expected)
        sparsity = json.loads((rep / f"level_{level}" / "sparsity.json").read_text())
        assert sparsity["density"] == pytest.approx(0.8**level, abs=2e-3)


def test_controls_keep_counts_and_pruned_weights_stay_zero(controls_run):
    result, options = controls_run
    level = result.path / "replicate_0" / "level_2"
    ticket = _masks(level)
    reinit, rprune, rearr = (_masks(level / c) for c in ("random_reinit", "random_prune", "rearrange"))
    assert reinit.equal(ticket)
    for other in (rprune, rearr):
        assert not other.equal(ticket)
        assert {n: int(m.sum()) for n, m in other.items()} == {n: int(m.sum()) for n, m in ticket.items()}
    for unit in (level, *(level / c for c in ("random_reinit", "random_prune", "rearrange"))):
        model = _model(unit, options)
        for module in model.modules():
            if hasattr(module, "mask"):
                assert not module.weight[~module.mask].any()


def test_ticket_and_random_prune_share_the_initialization(controls_run):
    result, options = controls_run
    rewind = torch.load(result.path / "replicate_0" / "rewind.pt", weights_only=True)
    assert rewind["step"] == 0
    # The rewind state is the replicate's initialization: level 0 trained away from it.
    trained = load_file(str(result.path / "replicate_0/level_0/model.safetensors"))
    assert not torch.equal(rewind["model"]["fc1.weight"], trained["fc1.weight"])


def test_rewind_to_iteration_k_is_the_dense_weights_at_k(tiny):
    result = run({**tiny, "rewind": "10it", "levels": 1, "name": "rw"})
    snapshot = torch.load(result.path / "replicate_0" / "rewind.pt", weights_only=True)
    assert snapshot["step"] == 10
    # The same replicate trained for exactly 10 iterations ends where the rewind point was captured.
    short = run({**tiny, "train_steps": "10it", "levels": 0, "name": "short"})
    weights = load_file(str(short.path / "replicate_0/level_0/model.safetensors"))
    for key, value in snapshot["model"].items():
        assert torch.equal(value, weights[key]), key
    level1 = json.loads((result.path / "replicate_0/level_1/done.json").read_text())
    assert level1["start_iteration"] == 10 and level1["samples"] == 20 * 20


def test_one_shot_prunes_the_dense_network_to_each_density(tiny):
    result = run({**tiny, "one_shot": True, "name": "os"})
    rep = result.path / "replicate_0"
    dense = _model(rep / "level_0", tiny)
    for level in (1, 2):
        expected = strategies.one_shot(dense, 0.8**level)
        assert _masks(rep / f"level_{level}").equal(expected)


def test_layerwise_overrides_and_leave_dense(tiny):
    result = run({**tiny, "layerwise": True, "layer_fractions": {"out.weight": "x0.5"}, "leave_dense": ["fc1.*"],
                  "levels": 1, "name": "lw"})  # fmt: skip
    density = json.loads((result.path / "replicate_0/level_1/sparsity.json").read_text())["layers"]
    assert density["fc1.weight"]["density"] == 1.0
    assert density["out.weight"]["density"] == pytest.approx(0.9, abs=0.01)


def test_replicates_use_different_seeds(tiny):
    result = run({**tiny, "replicates": 2, "levels": 1, "name": "reps"})
    a, b = (load_file(str(result.path / f"replicate_{r}/level_0/model.safetensors")) for r in (0, 1))
    assert not torch.equal(a["fc1.weight"], b["fc1.weight"])
    assert "±" in result.table()


def test_rerun_resumes_and_different_config_is_refused(tiny):
    first = run({**tiny, "name": "same"})
    files = {p: p.read_bytes() for p in first.path.glob("replicate_0/**/*") if p.is_file()}
    again = run({**tiny, "name": "same"})
    assert [r["test_acc"] for r in again.rows] == [r["test_acc"] for r in first.rows]
    assert all(p.read_bytes() == data for p, data in files.items())  # finished units untouched
    with pytest.raises(RunDirError, match="different config.*lr"):
        run({**tiny, "name": "same", "lr": 0.01})
    forced = run({**tiny, "name": "same", "lr": 0.01, "force": True, "levels": 0})
    assert not (forced.path / "replicate_0" / "level_1").exists()


def test_a_run_directory_in_use_is_refused(tiny):
    from lthfast.imp.rundir import RunDir

    first = run({**tiny, "name": "busy", "levels": 0})
    with RunDir(first.path).lock():  # as if another process were running it
        with pytest.raises(RunDirError, match="in use by another lthfast process"):
            run({**tiny, "name": "busy", "levels": 0})
    run({**tiny, "name": "busy", "levels": 0})


def test_corrupt_checkpoint_names_the_file(tiny):
    result = run({**tiny, "name": "corrupt"})
    unit = result.path / "replicate_0" / "level_2"
    (unit / "done.json").unlink()  # level 2 unfinished: the next run resumes from its checkpoint
    (unit / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"level_2/checkpoint.pt is corrupt.*delete"):
        run({**tiny, "name": "corrupt"})
    (unit / "checkpoint.pt").unlink()
    (result.path / "replicate_0/level_1/model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match=r"level_1/model.safetensors is corrupt"):
        run({**tiny, "name": "corrupt"})


def test_force_starts_a_corrupt_run_over(tiny):
    """--force is the way out the corrupt-file errors name: it starts the run over, whatever its config.json."""
    result = run({**tiny, "name": "redo"})
    first = [r["test_acc"] for r in result.rows]
    (result.path / "replicate_0/level_2/done.json").unlink()
    (result.path / "replicate_0/level_1/model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="--force"):
        run({**tiny, "name": "redo"})
    assert [r["test_acc"] for r in run({**tiny, "name": "redo", "force": True}).rows] == first
    (result.path / "config.json").write_text('{"identity": ')
    with pytest.raises(CheckpointError, match=r"config.json is corrupt.*--force"):
        run({**tiny, "name": "redo"})
    assert [r["test_acc"] for r in run({**tiny, "name": "redo", "force": True}).rows] == first


def test_a_folder_that_is_not_a_run_directory_is_refused_untouched(tiny):
    folder = Path(tiny["out_dir"]) / "mydata"
    (folder / "sub").mkdir(parents=True)
    for name in (".draft.tmp.txt", "sub/.cache.tmp", "notes.txt"):
        (folder / name).write_text("precious")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    with pytest.raises(RunDirError, match="mydata exists and is not an lthfast run directory"):
        run({**tiny, "name": "mydata"})
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # no temp file removed, no .lock


def test_user_model_and_data(tiny):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))

        def forward(self, x):
            return self.body(x.flatten(1))

    data = load_dataset("digits", val_size=100)
    result = run({**tiny, "levels": 1, "name": "user"}, model_fn=Net, data=data)
    masks = _masks(result.path / "replicate_0" / "level_1")
    assert set(masks) == {"body.0.weight", "body.2.weight"}
    assert masks.density() == pytest.approx(0.8, abs=1e-3)


def test_report_table_and_cli(controls_run, capsys):
    result, _ = controls_run
    text = report(result.path, plots=False)
    head = text.splitlines()[1]
    for column in ("weights %", "ticket acc", "random reinit", "random prune", "rearrange", "ES iter", "samples/s"):
        assert column in head
    assert main(["report", str(result.path)]) == 0
    out = capsys.readouterr().out
    density = json.loads((result.path / "replicate_0/level_2/sparsity.json").read_text())["density"]
    assert f"{100 * density:.2f}" in out and "plots:" in out
    assert (result.path / "plots" / "accuracy.png").stat().st_size > 1000
    assert main(["report", str(result.path / "nope")]) == 2
    assert "not an lthfast run directory" in capsys.readouterr().err


def test_claims_checker_reads_the_run(controls_run):
    from lthfast.imp.claims import check

    result, _ = controls_run
    text = check(result.path, one_shot=result.path)
    dense = result.rows[0]["test_acc"]
    assert f"dense test accuracy {100 * dense:.2f}%" in text
    assert "no level <= 10% with both controls" in text  # the controls ran at 64% weights only
    assert all(f"({claim})" in text for claim in "abcd")
    # levels 0-2 reach 64% weights: claims whose range the run does not reach say so instead of a verdict
    assert text.count("no data: the runs reach no level in this range") == 3  # (a), (c), (d)
    assert "NOT reproduced" not in text


def test_claims_checker_refuses_a_folder_that_is_not_a_run(tmp_path):
    from lthfast.imp.claims import check
    from lthfast.imp.errors import RunDirError

    with pytest.raises(RunDirError, match="not an lthfast run directory"):
        check(tmp_path)


def test_report_of_a_run_with_no_finished_unit_names_no_plots(tmp_path, capsys):
    from lthfast.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"identity": {}, "config": {"model": "mlp"}}))
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(no finished levels yet)" in out and "plots:" not in out and not (tmp_path / "plots").exists()
