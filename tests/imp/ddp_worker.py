"""One rank of the DDP test (tests/imp/test_ddp.py), started by torchrun with 2 gloo processes on CPU.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/imp/ddp_worker.py OPTIONS.json OUT_DIR

Every rank runs the same steps and writes what it saw to OUT_DIR/rank<r>.json for the test to check:
  1. the CLI (``lthfast imp``, as ``-m lthfast`` would run it) trains run "ddp" to the end;
  2. run "resumed" is interrupted on every rank at iteration 25 of level 2 (after its checkpoint at 20), then run
     again: it must resume from that checkpoint and end bitwise equal to "ddp";
  3. run "compiled" trains with --compile (DDP around the compiled model);
  4. bad input and disagreement raise on every rank: a global batch the ranks cannot split, masks that differ
     across ranks, a model sharded with FSDP2 (fully_shard).
The masks' checksums each rank compared (``World.check_same``), the number of files each rank wrote
(``rundir._atomic``, through which every run-directory file is written) and the first batch each rank trained on
are recorded along the way.
"""

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import torch

from lthfast import distributed
from lthfast.cli import main
from lthfast.imp import levels, run, rundir

RANK = int(os.environ["RANK"])
digests: list[tuple[str, str]] = []
writes: list[str] = []
first_batch: list = []


class Interrupted(Exception):
    pass


def _record_check_same(original):
    def check_same(self, tensors, what):
        digest = original(self, tensors, what)
        digests.append((what, digest))
        return digest

    return check_same


def _record_writes(original):
    def atomic(path, write):
        writes.append(str(path))
        return original(path, write)

    return atomic


def _record_first_batch(original):
    """Replicate._fresh_model, whose models record the first batch this rank trains on."""

    def fresh_model(self, seed):
        model = original(self, seed)

        def hook(module, args):
            if module.training and not first_batch:
                first_batch.extend(args[0].tolist())

        model.register_forward_pre_hook(hook)
        return model

    return fresh_model


def _interrupting(original):
    """train_unit, raising Interrupted on every rank before iteration 25 of level 2 (the checkpoint is at 20)."""

    def train_unit(model, data, cfg, steps, unit, sampler, *, on_iteration=None, **kwargs):
        def hook(it, model, optimizer):
            if on_iteration is not None:
                on_iteration(it, model, optimizer)
            if unit.path.name == "level_2" and it == 25:
                raise Interrupted

        return original(model, data, cfg, steps, unit, sampler, on_iteration=hook, **kwargs)

    return train_unit


def _error_of(fn) -> dict | None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test checks the type and the message
        return {"type": type(exc).__name__, "message": str(exc)}
    return None


def main_() -> None:
    options, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    report: dict = {"rank": RANK}
    distributed.World.check_same = _record_check_same(distributed.World.check_same)
    rundir._atomic = _record_writes(rundir._atomic)
    levels.Replicate._fresh_model = _record_first_batch(levels.Replicate._fresh_model)

    argv = ["imp", "--quiet", "--out-dir", str(out / "runs"), "--name", "ddp"]
    for key, value in options.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            argv += [f"--{flag}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        report["cli_status"] = main(argv)
    report["cli_stdout"] = stdout.getvalue()
    report["digests"], report["writes"], report["first_batch"] = list(digests), len(writes), first_batch

    resumed = {**options, "out_dir": str(out / "runs"), "name": "resumed"}
    real_train_unit = levels.train_unit
    levels.train_unit = _interrupting(real_train_unit)
    report["interrupt"] = _error_of(lambda: run(resumed))
    levels.train_unit = real_train_unit
    level2 = out / "runs" / "resumed" / "replicate_0" / "level_2"
    checkpoint = rundir.load_torch(level2 / "checkpoint.pt")
    report["interrupted_at"] = json.loads(checkpoint["state"])["iteration"]
    report["interrupted_done"] = (level2 / "done.json").exists()
    run(resumed)

    run({**resumed, "name": "compiled", "compile": True})
    report["odd_batch"] = _error_of(lambda: run({**resumed, "name": "odd", "batch_size": 15}))
    world = distributed.setup(torch.device("cpu"))
    report["mismatch"] = _error_of(lambda: world.check_same({"fc.weight": torch.full((3,), RANK > 0)}, "the masks"))
    report["fsdp"] = _error_of(lambda: _fsdp_run(resumed))
    (out / f"rank{RANK}.json").write_text(json.dumps(report))


def _fsdp_run(options: dict) -> None:
    from torch.distributed.fsdp import fully_shard

    from lthfast.models import build_model

    def sharded():
        model = build_model("mlp", (8,), 10, hidden=(16,))
        fully_shard(model)
        return model

    run({**options, "name": "fsdp"}, model_fn=sharded)


if __name__ == "__main__":
    main_()
