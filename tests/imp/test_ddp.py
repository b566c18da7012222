"""DDP: two gloo processes on CPU (torchrun) against one process with the same global batch.

tests/imp/ddp_worker.py runs on both ranks (the CLI run "ddp", the interrupted and resumed run "resumed", and the
errors every rank must raise) and reports what each rank saw. Tolerances, for this tiny MLP (30 Adam steps per
level, lr 1e-3): DDP averages two half-batch gradients where one process takes one full-batch mean, so the weights
differ by float32 rounding only (measured: at most 6e-8 on the 2-core CI machine); they must agree within 1e-6,
while training moves them by more than 1e-3. The masks and the metrics must then be equal (the pruning threshold
and the argmax of the logits are far from such differences for these seeds); losses within 1e-5 relative.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from lthfast.data import BatchSampler, load_dataset
from lthfast.distributed import checksum
from lthfast.imp import run
from lthfast.imp.levels import derive_seed
from lthfast.imp.report import collect
from lthfast.pruning import Masks

WORKER = Path(__file__).with_name("ddp_worker.py")
UNITS = ("level_0", "level_1", "level_2", "level_2/random_prune")
TIMING = {"wall_s", "train_s", "samples_per_s", "peak_mem_mb", "device"}


def _options(tiny):
    options = {k: v for k, v in tiny.items() if k not in ("out_dir", "cache_dir")}
    return {**options, "controls": "random_prune", "control_levels": [2]}


def _torchrun(options: dict, out: Path) -> list[dict]:
    out.mkdir(parents=True)
    (out / "options.json").write_text(json.dumps(options))
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LTHFAST_BACKEND": "torch"}
    done = subprocess.run(
        [*argv, str(WORKER), str(out / "options.json"), str(out)], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _units(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {u: load_file(str(root / "replicate_0" / u / "model.safetensors")) for u in UNITS}


def _assert_units_close(got: dict, want: dict, atol: float = 1e-6) -> None:
    """Every unit's tensors: masks (bool) equal, weights within ``atol``."""
    for unit in UNITS:
        for name, value in want[unit].items():
            if value.dtype == torch.bool:
                assert torch.equal(got[unit][name], value), (unit, name)
            else:
                assert (got[unit][name] - value).abs().max() <= atol, (unit, name)


def test_two_gloo_processes_match_one_process_resume_and_refuse(tmp_path, tiny):
    options = _options(tiny)
    ranks = _torchrun(options, tmp_path / "ddp")
    single = run({**options, "out_dir": str(tmp_path / "single"), "name": "single"})
    ddp_root = tmp_path / "ddp" / "runs" / "ddp"

    # The CLI ran on both ranks; rank 0 printed the report and wrote every file, rank 1 wrote nothing.
    assert [r["cli_status"] for r in ranks] == [0, 0]
    assert "ticket acc" in ranks[0]["cli_stdout"] and ranks[1]["cli_stdout"] == ""
    assert ranks[0]["writes"] > 0 and ranks[1]["writes"] == 0

    # Each rank trained on its half of the global batch a single process draws at iteration 0.
    data = load_dataset("synthetic", val_size=40, num_samples=240, input_shape=(8,))
    first = data.x_train[BatchSampler(len(data.y_train), 20, derive_seed(0, 0, "data")).indices(0)]
    assert torch.equal(torch.tensor(ranks[0]["first_batch"] + ranks[1]["first_batch"]), first)
    assert len(ranks[0]["first_batch"]) == len(ranks[1]["first_batch"]) == 10

    # Identical masks on both ranks after every prune, and they are the masks rank 0 saved.
    assert ranks[0]["digests"] == ranks[1]["digests"]
    saved = {
        "the masks of replicate 0 level 1": "level_1",
        "the masks of replicate 0 level 2": "level_2",
        "the random_prune masks of replicate 0 level 2": "level_2/random_prune",
    }
    assert [what for what, _ in ranks[0]["digests"]] == list(saved)
    for what, digest in ranks[0]["digests"]:
        assert digest == checksum(Masks.load(ddp_root / "replicate_0" / saved[what] / "mask.safetensors")), what

    # The same level results as one process with the same global batch (tolerances in the module docstring).
    ddp_rows, single_rows = collect(ddp_root), single.rows
    assert len(ddp_rows) == len(single_rows) == len(UNITS)
    for a, b in zip(ddp_rows, single_rows):
        for key in a.keys() - TIMING:
            if key.endswith("loss"):
                assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), (a["level"], a["branch"], key)
            else:
                assert a[key] == b[key], (a["level"], a["branch"], key)
    ddp_units, single_units = _units(ddp_root), _units(single.path)
    init = torch.load(single.path / "replicate_0" / "rewind.pt", weights_only=True)["model"]  # the rewind point: 0it
    trained = single_units["level_0"]
    assert all((trained[k] - init[k]).abs().max() > 1e-3 for k in trained if k.endswith("weight")), "no training?"
    _assert_units_close(ddp_units, single_units)

    # Interrupted on both ranks after level 2's checkpoint at 20, then resumed: bitwise the uninterrupted run.
    for r in ranks:
        assert r["interrupt"]["type"] == "Interrupted" and r["interrupted_at"] == 20 and not r["interrupted_done"]
    resumed_root = tmp_path / "ddp" / "runs" / "resumed"
    resumed = _units(resumed_root)
    for unit in UNITS:
        assert all(torch.equal(resumed[unit][k], v) for k, v in ddp_units[unit].items()), unit
        mine, theirs = (root / "replicate_0" / unit for root in (resumed_root, ddp_root))
        assert (mine / "metrics.jsonl").read_bytes() == (theirs / "metrics.jsonl").read_bytes(), unit
        # (not the mask files' bytes: safetensors writes the metadata entries in no fixed order)
        assert Masks.load(mine / "mask.safetensors").equal(Masks.load(theirs / "mask.safetensors")), unit

    # DDP around the compiled model: within float32 rounding of eager DDP, the same masks (see test_imp_amp_compile).
    _assert_units_close(_units(tmp_path / "ddp" / "runs" / "compiled"), ddp_units)

    # Errors reach every rank.
    for r in ranks:
        assert (
            r["odd_batch"]["type"] == "ConfigError" and "does not split evenly over the 2" in r["odd_batch"]["message"]
        )
        assert r["mismatch"]["type"] == "DistributedError" and "ranks [1]" in r["mismatch"]["message"]
        assert r["fsdp"]["type"] == "DistributedError" and "FSDP2" in r["fsdp"]["message"]
        assert "torchrun --nproc-per-node" in r["fsdp"]["message"]
