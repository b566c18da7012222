"""Where `lthfast bench` and the benchmark scripts write, and what they refuse before anything is measured: a fresh
folder by default, no silent overwrite, an unwritable --out, bad shapes and dtypes; the noisy flag; the help's
defaults; the CPU thread policy (passive OpenMP wait, load warning)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lthfast import _threads
from lthfast.bench import cli as bench_cli
from lthfast.bench import layer, results, timing, train
from lthfast.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--shape", "32x48", "--tokens", "8", "--sparsity", "0,0.9", "--block", "1,16", "--providers", "dense,lthfast"]
TINY += ["--min-run-time", "0.002", "--repeats", "1", "--buffers", "2", "--device", "cpu"]


def never(*_a, **_k):
    raise AssertionError("measured before the refusal")


# ---- where the CLI writes ----------------------------------------------------------------------------------------
def test_default_output_is_a_fresh_folder_in_the_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "layer", *TINY]) == 0
    assert main(["bench", "layer", *TINY]) == 0  # the same second or not: a second folder, nothing overwritten
    folders = sorted((tmp_path / "lthfast-bench").iterdir())
    assert len(folders) == 2 and all(f.name.startswith("layer-linear-forward-") for f in folders)
    for folder in folders:
        (doc,) = folder.glob("bench_layer-linear-forward-cpu-*.json")
        assert json.loads(doc.read_text())["kind"] == "layer" and doc.with_suffix(".png").is_file()
    assert not (tmp_path / "benchmarks").exists()


def test_an_existing_result_is_refused_before_the_run_and_replaced_with_force(tmp_path, monkeypatch, capsys):
    assert main(["bench", "layer", *TINY, "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("*.json")
    before = json_path.read_text()
    monkeypatch.setattr(layer, "run_layer", never)
    capsys.readouterr()
    assert main(["bench", "layer", *TINY, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lthfast: error: ") and str(json_path) in err and "--force" in err
    assert json_path.read_text() == before
    monkeypatch.undo()
    assert main(["bench", "layer", *TINY, "--out", str(tmp_path), "--force", "--seed", "3"]) == 0
    assert json.loads(json_path.read_text())["config"]["seed"] == 3


def test_an_unwritable_out_is_refused_before_the_run(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(train, "run_train", never)
    argv = ["bench", "train", "--sparsity", "0", "--block", "1", "--device", "cpu", "--out", str(blocker / "sub")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lthfast: error: cannot write to ") and str(blocker / "sub") in err


def test_a_failed_run_leaves_no_empty_default_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def boom(cfg):
        raise RuntimeError("mid-sweep failure")

    monkeypatch.setattr(layer, "run_layer", boom)
    with pytest.raises(RuntimeError, match="mid-sweep"):
        main(["bench", "layer", *TINY])
    assert list((tmp_path / "lthfast-bench").iterdir()) == []


@pytest.mark.parametrize(
    "argv,message",
    [
        (["layer", "--shape", "256"], "--shape 256: a linear layer needs 2 sizes"),
        (["layer", "--kind", "conv", "--shape", "64x64"], "--shape 64x64: a conv layer needs 4 sizes"),
        (["layer", "--kind", "conv", "--image", "8x8x8"], "--image 8x8x8: needs 2 sizes"),
        (["layer", "--dtype", "int8"], "unsupported dtype 'int8'"),
        (["train", "--dtype", "int8"], "unsupported dtype 'int8'"),
    ],
)
def test_bad_shape_and_dtype_are_one_line_errors_before_the_run(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(layer, "run_layer", never)
    monkeypatch.setattr(train, "run_train", never)
    assert main(["bench", *argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lthfast: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "lthfast-bench").exists() or not any((tmp_path / "lthfast-bench").iterdir())


@pytest.mark.parametrize("argv", [["--tokens", "0"], ["--shape", "0x16"], ["--threads", "-1"], ["--min-run-time", "0"]])
def test_bad_numbers_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "layer", *argv, "--no-save"])
    assert exc.value.code == 2 and "error: argument" in capsys.readouterr().err


# ---- noisy measurements ------------------------------------------------------------------------------------------
def _timing(rounds: list[list[float]]) -> timing.Timing:
    return timing.merge([timing.Timing.from_samples(r, len(r), "t") for r in rounds])


def test_rounds_that_disagree_are_flagged_noisy_and_steady_ones_are_not():
    steady = _timing([[1.00, 1.01, 1.02], [1.01, 1.00, 1.02], [1.02, 1.01, 1.00]])
    apart = _timing([[1.0, 1.0, 1.0], [1.6, 1.6, 1.6], [1.0, 1.0, 1.0]])  # one round 1.6x slower
    spread = timing.Timing.from_samples([1.0, 1.0, 1.5, 2.0, 2.0, 0.5], 6, "t")  # a single round, wide p20-p80
    assert not steady.noisy and steady.as_dict()["noisy"] is False
    assert apart.noisy and apart.round_ratio == pytest.approx(1.6)
    assert apart.as_dict()["round_median_ms"] == pytest.approx([1.0, 1.6, 1.0])
    assert spread.noisy and spread.as_dict()["round_median_ms"] == [spread.median_ms]


def _doc(noisy: bool) -> dict:
    def res(name, ms):
        flag = noisy and name == "dense"
        return {"provider": name, "status": "ok", "median_ms": ms, "p20_ms": ms, "p80_ms": ms, "timer": "t",
                "density": 1.0, "max_err": 0.0, "speedup_vs_dense": 2.0 / ms, "noisy": flag}  # fmt: skip

    rows = [{"sparsity": s, "block": 1, "density": 1 - s, "tile_density": 1.0, "tile_index_ms": 0.1, "tile": [64, 64],
             "results": [res("dense", 2.0), res("lthfast", 1.0)]} for s in (0.5, 0.9)]  # fmt: skip
    body = {"config": {}, "shapes": {}, "rows": rows}
    return results.document("layer", body, torch.device("cpu"), "cmd", "", provider="lthfast")


def test_the_table_marks_noisy_cells_and_the_crossover_says_so():
    quiet, loud = results.format_table(_doc(False)), results.format_table(_doc(True))
    assert "noisy" not in quiet and results.NOISY_MARK not in quiet
    assert "2 of 4 measurements spread too far" in loud and "from noisy rows" in loud
    dense_cells = [line for line in loud.splitlines() if line.strip().startswith(("0.5", "0.9"))]
    assert all(f"1.00x{results.NOISY_MARK}" in line for line in dense_cells)


def test_validate_refuses_a_noisy_flag_that_is_not_a_bool():
    doc = _doc(True)
    doc["rows"][0]["results"][0]["noisy"] = "yes"
    with pytest.raises(results.SchemaError, match=r"rows\[0\]\.results\[0\]\.noisy"):
        results.validate(doc)


def test_the_document_records_the_wait_policy(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert _doc(False)["machine"]["omp_wait_policy"] == "PASSIVE"


# ---- help text ---------------------------------------------------------------------------------------------------
def test_the_help_shows_the_sweeps_defaults(capsys):
    cfg, tcfg = layer.LayerConfig(), train.TrainConfig()
    fmt = lambda xs: ",".join(f"{x:g}" for x in xs)
    assert bench_cli.LAYER_DEFAULTS["sparsity"] == fmt(cfg.sparsities)
    assert bench_cli.LAYER_DEFAULTS["block"] == fmt(cfg.blocks)
    assert bench_cli.LAYER_DEFAULTS["min_run_time"] == f"{cfg.min_run_time:g}"
    assert bench_cli.LAYER_DEFAULTS["rep_ms"] == f"{cfg.rep_ms:g}"
    assert bench_cli.LAYER_DEFAULTS["repeats"].startswith(f"{cfg.repeats} on CPU")
    assert bench_cli.TRAIN_DEFAULTS["sparsity"] == fmt(tcfg.sparsities)
    assert bench_cli.TRAIN_DEFAULTS["min_run_time"] == f"{tcfg.min_run_time:g}"
    assert bench_cli.TRAIN_DEFAULTS["rep_ms"] == f"{tcfg.rep_ms:g}"
    assert bench_cli.TRAIN_DEFAULTS["repeats"] == f"{tcfg.repeats}" and tcfg.dtype == bench_cli.TRAIN_DEFAULTS["dtype"]
    default = layer.default_layer_config("linear", "cpu")
    for kind in ("layer", "train"):
        with pytest.raises(SystemExit):
            main(["bench", kind, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: a new folder under ./lthfast-bench/)" in text and "OMP_WAIT_POLICY=PASSIVE" in text
        assert "noisy" in text
    with pytest.raises(SystemExit):
        main(["bench", "layer", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        f"(default: {'x'.join(map(str, default.shape))} on CPU" in text and f"(default: {default.tokens} on CPU" in text
    )


# ---- the benchmark scripts ---------------------------------------------------------------------------------------
def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _refused(run, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run()
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_the_scripts_never_overwrite_a_result_without_force(tmp_path, monkeypatch, capsys):
    existing = tmp_path / "old.json"
    existing.write_text('{"kept": true}\n')
    linear = script("bench_masked_linear")
    assert str(existing) in _refused(lambda: linear._parse(["--out", str(existing)]), capsys)
    assert linear._parse(["--out", str(existing), "--force"]).force
    conv = script("bench_masked_conv")
    monkeypatch.setattr(conv, "bench_layer", never)
    assert str(existing) in _refused(lambda: conv.main(["--out", str(existing), "--device", "cpu"]), capsys)
    threshold = script("bench_threshold")
    monkeypatch.setattr(threshold, "run_benchmark", never)
    assert str(existing) in _refused(lambda: threshold.main(["--out", str(existing), "--device", "cpu"]), capsys)
    prune_step = script("bench_prune_step")
    monkeypatch.setattr(prune_step, "_run_worker", never)
    monkeypatch.setattr(sys, "argv", ["bench_prune_step.py", "--out", str(existing)])
    assert str(existing) in _refused(prune_step.main, capsys)
    assert existing.read_text() == '{"kept": true}\n'


def test_the_scripts_refuse_an_unwritable_out_before_measuring(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    threshold = script("bench_threshold")
    monkeypatch.setattr(threshold, "run_benchmark", never)
    err = _refused(lambda: threshold.main(["--out", str(blocker / "x.json"), "--device", "cpu"]), capsys)
    assert "cannot write to" in err and str(blocker) in err


# ---- CPU threads ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,environ,cores,restart",
    [
        (["imp", "--levels", "2"], {}, 2, True),
        (["bench", "layer"], {}, 8, True),
        (["demo"], {}, 2, True),
        (["imp"], {"OMP_WAIT_POLICY": "ACTIVE"}, 2, False),  # the user's choice stands
        (["report", "runs/x"], {}, 2, False),  # computes nothing on the threads
        (["info"], {}, 2, False),
        (["imp", "--help"], {}, 2, False),
        (["imp"], {}, 1, False),
    ],
)
def test_passive_wait_restart_only_where_it_matters(argv, environ, cores, restart):
    new = _threads.passive_wait_argv(argv, environ=environ, cpu_count=cores)
    assert (new is not None) == restart
    if restart:
        assert new[0] == sys.executable and new[-len(argv) :] == argv


@pytest.mark.parametrize(
    "threads,load,cores,warns",
    [(2, 0.3, 2, False), (2, 0.6, 2, True), (1, 1.4, 2, False), (1, 1.6, 2, True), (4, 3.0, 16, False)],
)
def test_load_warning_when_other_processes_hold_the_cores_this_run_needs(threads, load, cores, warns):
    text = _threads.load_warning(threads, load=load, cores=cores)
    assert (text is not None) == warns
    if warns:
        assert text.startswith("lthfast: warning: ") and "\n" not in text and f"{load:.2f}" in text


@pytest.mark.slow
def test_the_command_runs_under_a_passive_wait(tmp_path):
    """Started as a program, `lthfast bench` restarts itself with OMP_WAIT_POLICY=PASSIVE (recorded in the JSON)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    argv = [sys.executable, "-m", "lthfast", "bench", "layer", *TINY, "--out", str(tmp_path)]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (doc,) = tmp_path.glob("*.json")
    assert json.loads(doc.read_text())["machine"]["omp_wait_policy"] == "PASSIVE"
