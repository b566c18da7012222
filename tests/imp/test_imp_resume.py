"""kill -9 at any moment, then the same command again: finished levels are untouched and the results equal those
of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from lthfast.imp import run
from lthfast.imp.report import collect

OPTIONS = {
    "model": "mlp", "hidden": "32", "dataset": "synthetic", "synthetic-shape": "8", "num-samples": "400",
    "val-size": "40", "batch-size": "20", "train-steps": "160it", "eval-every": "10it", "checkpoint-every": "20it",
    "levels": "3", "controls": "random_reinit", "control-levels": "2", "backend": "torch", "threads": "1",
    "dropout": "0.2", "no-plots": None,
}  # fmt: skip
TIMING = {"wall_s", "train_s", "samples_per_s", "peak_mem_mb"}


def _command(out_dir: Path) -> list[str]:
    argv = [sys.executable, "-m", "lthfast", "imp", "--quiet", "--out-dir", str(out_dir), "--name", "k"]
    for key, value in OPTIONS.items():
        argv += [f"--{key}"] + ([value] if value is not None else [])
    return argv


def _finished_files(root: Path) -> dict[Path, bytes]:
    units = [done.parent for done in root.glob("replicate_0/level_*/**/done.json")]
    return {p: p.read_bytes() for unit in units for p in unit.iterdir() if p.is_file()}


def _kill_when(argv, ready, timeout=240.0) -> None:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()


def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    root = tmp_path / "runs" / "k"
    level = lambda k: root / "replicate_0" / f"level_{k}"
    # Kill 1: level 1 finished, level 2 part-way with a checkpoint (resume must continue from it).
    _kill_when(_command(tmp_path / "runs"), lambda: (level(2) / "checkpoint.pt").exists())
    assert (level(1) / "done.json").exists() and not (level(2) / "done.json").exists()
    finished = _finished_files(root)
    # Kill 2: at an arbitrary moment while the resumed run writes the control branch of level 2.
    _kill_when(_command(tmp_path / "runs"), lambda: (level(2) / "random_reinit").exists())
    for path, data in finished.items():
        assert path.read_bytes() == data, f"{path} changed after kill -9"
    done = subprocess.run(_command(tmp_path / "runs"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ticket acc" in done.stdout
    for path, data in finished.items():
        assert path.read_bytes() == data, f"{path} changed on resume"
    assert not list(root.rglob("*.tmp*")), "temporary files left behind"

    options = {k.replace("-", "_"): v for k, v in OPTIONS.items() if v is not None}
    reference = run({**options, "out_dir": str(tmp_path / "ref"), "name": "ref", "quiet": True, "plots": False})
    resumed = collect(root)
    assert len(resumed) == len(reference.rows) == 5
    for a, b in zip(resumed, reference.rows):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
    for unit in ["level_0", "level_1", "level_2", "level_2/random_reinit", "level_3"]:
        mine = load_file(str(root / "replicate_0" / unit / "model.safetensors"))
        theirs = load_file(str(reference.path / "replicate_0" / unit / "model.safetensors"))
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), unit
