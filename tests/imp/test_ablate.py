"""lthfast ablate end to end on a tiny MLP: one run per granularity with the same seeds, the table, the JSON and both
plots; a second invocation resumes (no unit retrained); bad granularities refused before anything is written."""

import json
import statistics
from pathlib import Path

import pytest

from lthfast.cli import main
from lthfast.imp import ablate, plots
from lthfast.imp.report import collect

ARGV = [
    "--model", "mlp", "--hidden", "18", "--dataset", "synthetic", "--synthetic-shape", "8", "--num-samples", "240",
    "--val-size", "40", "--batch-size", "20", "--train-steps", "30it", "--eval-every", "10it", "--levels", "2",
    "--replicates", "2", "--controls", "random_prune", "--control-levels", "2", "--backend", "torch",
    "--threads", "1", "--quiet", "--no-plots", "--name", "abl",
]  # fmt: skip
PNG = b"\x89PNG\r\n\x1a\n"


def _done_files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.glob("abl-b*/replicate_*/level_*/**/done.json")}


def test_ablation_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["ablate", "--block", "1,4", "--out-dir", str(out), *ARGV]) == 0
    printed = capsys.readouterr().out
    folder = out / "abl-ablation"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["abl-ablation", "abl-b1", "abl-b4"]
    assert sorted(p.name for p in folder.iterdir()) == ["ablation.json", "ablation.md", "accuracy.png", "speed.png"]
    assert all((folder / name).read_bytes().startswith(PNG) for name in ("accuracy.png", "speed.png"))
    unstructured, blocks = collect(out / "abl-b1"), collect(out / "abl-b4")
    # the same seeds: the dense level 0 of both runs is the same training
    dense = lambda rows: [r["test_acc"] for r in rows if r["level"] == 0]  # noqa: E731
    assert dense(unstructured) == dense(blocks) and len(dense(blocks)) == 2
    document = json.loads((folder / "ablation.json").read_text())
    rows = {(r["granularity"], r["level"]): r for r in document["rows"]}
    assert set(rows) == {(g, lv) for g in ("unstructured", "4x4") for lv in (0, 1, 2)}
    for level in (1, 2):
        ticket = {r["replicate"]: r for r in blocks if r["level"] == level and r["branch"] == "ticket"}
        ref = {r["replicate"]: r for r in unstructured if r["level"] == level and r["branch"] == "ticket"}
        row = rows[("4x4", level)]
        assert row["test_acc"] == pytest.approx(statistics.fmean(r["test_acc"] for r in ticket.values()))
        assert row["acc_lost"]["mean"] == pytest.approx(
            statistics.fmean(ref[r]["test_acc"] - ticket[r]["test_acc"] for r in ticket)
        )
        assert row["acc_lost"]["noise"] is not None and row["acc_lost"]["n"] == 2
        level0 = {r["replicate"]: r["samples_per_s"] for r in blocks if r["level"] == 0}
        speed = [t["samples_per_s"] / level0[r] for r, t in ticket.items()]
        assert row["run_speedup"] == pytest.approx(statistics.fmean(speed))
        assert rows[("unstructured", level)]["acc_lost"] is None
        assert any(rows[(g, level)]["pareto"] for g in ("unstructured", "4x4"))
    assert {(c["granularity"], c["level"], c["branch"]) for c in document["controls"]} == {
        ("unstructured", 2, "random_prune"), ("4x4", 2, "random_prune")
    }  # fmt: skip
    table = (folder / "ablation.md").read_text()
    assert table in printed
    assert "| 2 | 4x4 |" in table and "reference" in table and "random prune" in table
    # again: every unit is finished, nothing is retrained, the table is rewritten
    done = _done_files(out)
    assert len(done) == 2 * 2 * (3 + 1)
    (folder / "ablation.md").unlink()
    assert main(["ablate", "--block", "1,4", "--out-dir", str(out), *ARGV]) == 0
    assert _done_files(out) == done and (folder / "ablation.md").read_text() == table


def test_layer_bench_times_each_level_masks(tmp_path):
    from lthfast.imp.config import Config

    options = {
        "model": "mlp", "hidden": [18], "dataset": "synthetic", "synthetic_shape": [8], "num_samples": 240,
        "val_size": 40, "batch_size": 20, "train_steps": "20it", "eval_every": "10it", "levels": 1,
        "backend": "torch", "threads": 1, "quiet": True, "plots": False, "out_dir": str(tmp_path), "name": "lb",
    }  # fmt: skip
    result = ablate.run_ablation(Config.from_dict(options), ablate.parse_granularities("1,4"), layer_bench=True)
    bench = json.loads((result.path / "layer_bench.json").read_text())
    # level 0 is dense in both runs (one mask file, timed once), level 1 differs: three distinct mask sets
    assert len(bench) == 3
    for entry in bench.values():
        assert set(entry["layers"]) == {"fc1.weight", "out.weight"}
        assert entry["speedup"] == pytest.approx(entry["dense_ms"] / entry["lthfast_ms"])
    assert all(r["layer_speedup"] is not None and r["speed_for_pareto"] == "layer_speedup" for r in result.rows)
    assert "speed-up (layers)" in result.table()


def test_ablation_plots_draw_one_line_per_granularity(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.setdefault(path.name, fig) and path)
    rows = [
        {"granularity": g, "level": lv, "weights_remaining_pct": 100 * 0.8**lv, "test_acc": 0.9 - 0.01 * lv,
         "test_acc_std": 0.01, "n": 3, "run_speedup": 1 + 0.1 * lv, "run_speedup_std": 0.02,
         "layer_speedup": 1 + 0.2 * lv if g == "16x16" else None}
        for g in ("unstructured", "16x16") for lv in range(3)
    ]  # fmt: skip
    controls = [{"granularity": "16x16", "level": 2, "branch": "random_prune", "weights_remaining_pct": 64.0,
                 "test_acc": 0.5, "n": 3}]  # fmt: skip
    plots.ablation_accuracy_plot(tmp_path / "accuracy.png", rows, controls, ["unstructured", "16x16"], "abl")
    plots.ablation_speed_plot(tmp_path / "speed.png", rows, ["unstructured", "16x16"], "abl")
    accuracy = [t.get_text() for t in drawn["accuracy.png"].axes[0].get_legend().get_texts()]
    assert {"unstructured", "16x16", "16x16: random prune", "dense network (level 0)"} <= set(accuracy)
    speed = [t.get_text() for t in drawn["speed.png"].axes[0].get_legend().get_texts()]
    assert {"unstructured: run samples/s", "16x16: run samples/s", "16x16: layer benchmark", "dense = 1"} <= set(speed)
    assert "unstructured: layer benchmark" not in speed
    for fig in drawn.values():
        assert fig.axes[0].get_xscale() == "log"


@pytest.mark.parametrize(
    ("blocks", "message"),
    [("1,3", "block must be one of"), ("1,1", "list each granularity once"), ("1,x", "is not a block size or N:M"),
     ("1,3:2", "need 1 <= N < M")],
)  # fmt: skip
def test_bad_granularities_are_refused_before_anything_is_written(blocks, message, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["ablate", "--block", blocks, "--out-dir", str(out), *ARGV]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lthfast: error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_a_granularity_that_does_not_fit_the_options_is_refused_before_any_run(tmp_path, capsys):
    out = tmp_path / "runs"
    # 2:4 is reached at level 4 of a 20% schedule: 11 levels are refused for it, before the unstructured run starts
    assert main(["ablate", "--block", "1,2:4", "--out-dir", str(out), *ARGV, "--levels", "11"]) == 2
    assert "ask for levels <= 4" in capsys.readouterr().err
    assert not out.exists()
