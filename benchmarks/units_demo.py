"""Wall time of the demo's IMP run (lthfast/imp/demo.py) one unit at a time against its units trained together.

The demo has one replicate: 12 tickets and 2 controls at 5 levels, so its waves hold 1 or 3 units (a level's
controls beside the next ticket) and 22 trainings take 12 waves. Rounds alternate the two modes after one untimed
run that generates the data; the JSON holds every round's wall time, the medians and their ratio.

    python benchmarks/units_demo.py [--steps 300] [--rounds 3] [--out benchmarks/results/units/demo-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

from lthfast.bench.results import _cpu_name
from lthfast.imp import run
from lthfast.imp.demo import DEMO


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="iterations per unit (the demo trains 1000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp()
    base = {**DEMO, "train_steps": f"{args.steps}it", "eval_every": "100it", "quiet": True, "plots": False,
            "cache_dir": f"{root}/cache"}  # fmt: skip
    run(
        {**base, "out_dir": f"{root}/warm", "levels": 0, "controls": [], "control_levels": []}
    )  # generates the data, untimed
    walls: dict[str, list[float]] = {"sequential": [], "together": []}
    accs: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for mode in walls:
            start = time.perf_counter()
            result = run({**base, "out_dir": f"{root}/{r}-{mode}", "sequential": mode == "sequential"})
            walls[mode].append(time.perf_counter() - start)
            accs[mode] = [row["test_acc"] for row in result.rows]
            print(f"round {r} {mode}: {walls[mode][-1]:.1f} s", flush=True)
    medians = {mode: statistics.median(w) for mode, w in walls.items()}
    doc = {
        "command": "python benchmarks/units_demo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": _cpu_name(), "threads": DEMO["threads"], "torch": torch.__version__, "steps": args.steps,
        "wall_s": walls, "median_s": medians, "speedup": medians["sequential"] / medians["together"],
        "max_test_acc_difference": max(abs(a - b) for a, b in zip(accs["sequential"], accs["together"])),
    }  # fmt: skip
    print(json.dumps({k: doc[k] for k in ("median_s", "speedup", "max_test_acc_difference")}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
