"""The standalone scripts under benchmarks/: bad flags refused before anything is measured, the conv script's JSON
records its command, and its inputs rotate over the same 64 MiB as `lthfast bench`. Tiny settings, no timings."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refused(run, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run()
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--providers", "mask-multiply,lthfast,lthfsat"], "unknown provider(s) ['lthfsat']"),
        (["--sparsity", "0,1.5"], "sparsities must be in [0, 1]"),
        (["--block", "0"], "blocks must be >= 1"),
    ],
)
def test_masked_linear_script_refuses_bad_flags(argv, message, capsys):
    bench = script("bench_masked_linear")
    assert message in refused(lambda: bench._parse(argv), capsys)


def test_masked_linear_script_always_measures_dense():
    bench = script("bench_masked_linear")
    assert bench._parse(["--providers", "mask-multiply,lthfast-block32"]).providers == [
        "dense", "mask-multiply", "lthfast-block32",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--providers", "dense", "torch-bsr"], "invalid choice: 'torch-bsr'"),
        (["--sparsity", "1.5"], "sparsities must be in [0, 1]"),
        (["--sparsity", "-0.5"], "sparsities must be in [0, 1]"),
    ],
)
def test_masked_conv_script_refuses_bad_flags(argv, message, capsys, tmp_path):
    bench = script("bench_masked_conv")
    assert message in refused(lambda: bench.main([*argv, "--out", str(tmp_path / "x.json")]), capsys)
    assert not (tmp_path / "x.json").exists()


def test_masked_conv_script_records_its_command_and_rotates_64_mib(tmp_path, monkeypatch):
    from lthfast.bench import timing

    bench = script("bench_masked_conv")
    counts = []
    real = timing.buffer_count
    monkeypatch.setattr(timing, "buffer_count", lambda nbytes: counts.append((nbytes, real(nbytes))) or real(nbytes))
    monkeypatch.setattr(bench, "time_ms", lambda *a, **k: 1.0)  # this test is about the run's record, not speed
    argv = ["--nets", "resnet18-cifar", "--layers", "layer4", "--batch", "1", "--sparsity", "0", "--modes", "forward"]
    argv += ["--providers", "dense", "lthfast", "--rounds", "1", "--device", "cpu", "--out", str(tmp_path / "c.json")]
    assert bench.main(argv) == 0
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["meta"]["command"].endswith("bench_masked_conv.py " + " ".join(argv))
    assert doc["meta"]["complete"] and len(doc["rows"]) == 1
    ((set_bytes, count),) = counts
    assert count == real(set_bytes) and count > 8  # layer4 at batch 1: a 16 KiB set, so the cap of 64 sets


def test_prune_step_script_refuses_an_unknown_library(monkeypatch, capsys, tmp_path):
    bench = script("bench_prune_step")
    monkeypatch.setattr(sys, "argv", ["bench_prune_step.py", "--libraries", "lthfast,lthfsat", "--out", str(tmp_path)])
    assert "--libraries: unknown ['lthfsat']" in refused(bench.main, capsys)


def test_prune_step_script_shows_a_failed_workers_error(monkeypatch):
    import subprocess

    bench = script("bench_prune_step")
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="Traceback ...\nValueError: the real cause\n")
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: failed)
    args = type("Args", (), {"rounds": 1, "amount": 0.2, "block": 32, "threads": 1})()
    with pytest.raises(SystemExit, match="(?s)the lthfast worker failed .*ValueError: the real cause"):
        bench._run_worker("lthfast", args, "masks.pt")


@pytest.mark.parametrize("name,good", [("host_overhead", "tuner,layers"), ("gpu_profile", "linear,conv")])
def test_profiling_scripts_refuse_an_unknown_what(name, good, monkeypatch, capsys):
    if name == "gpu_profile" and not importlib.util.find_spec("triton"):
        pytest.skip("gpu_profile imports triton")
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as when run: the script's folder is sys.path[0]
    bench = script(name)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--what", good.split(",")[0][:-1]])  # a typo: one letter short
    assert "--what: expected some of " + good in refused(bench.main, capsys)


def test_gpu_prediction_script_writes_the_committed_table(tmp_path):
    """benchmarks/predict_gpu.py regenerates benchmarks/results/gpu-predictions-h200.md (the same text, with its
    own command in it), so the committed predictions are what the model and the launchers' decisions give now."""
    out = tmp_path / "gpu-predictions-h200.md"
    assert script("predict_gpu").main(["--out", str(out)]) == 0
    committed = (BENCHMARKS / "results" / "gpu-predictions-h200.md").read_text()
    assert out.read_text().replace(str(out), "benchmarks/results/gpu-predictions-h200.md") == committed
