"""A 2-thread sparse training step with the machine to itself, then with one other busy process (a spinning Python
loop): issue 20's robustness target is that the loaded step stays within 2x of the quiet one. Linear(1024, 1024),
256 rows, 98% unstructured, forward + dX + dW through ``lthfast.functional.masked_linear`` (the "auto" route), and
SparseProp's SparseLinear beside it when the package is installed. Medians of wall-clock times over ``--seconds``.

    python benchmarks/step_under_load.py --out benchmarks/results/unstructured/step_under_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import lthfast
from lthfast.bench.results import _cpu_name


def _steps(threads: int):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1024, generator=gen).requires_grad_()
    w = torch.randn(1024, 1024, generator=gen).requires_grad_()
    mask = torch.rand(1024, 1024, generator=gen) < 0.02
    grad = torch.randn(256, 1024, generator=gen)

    def lthfast_step():
        x.grad = w.grad = None
        lthfast.functional.masked_linear(x, w, mask).backward(grad)

    steps = {"lthfast": lthfast_step}
    try:
        from sparseprop.modules import SparseLinear

        sparse = SparseLinear((w.detach() * mask).clone(), None)
        xs = x.detach().clone().requires_grad_()

        def sparseprop_step():
            xs.grad = None
            sparse(xs).backward(grad)

        steps["sparseprop"] = sparseprop_step
    except ImportError:
        pass
    return steps


def _median_ms(step, seconds: float) -> float:
    step()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per provider and condition")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = parser.parse_args(argv)
    if args.out is not None and args.out.exists() and not args.force:
        parser.error(f"{args.out} exists: pass --force to overwrite it")
    steps = _steps(args.threads)
    quiet = {name: _median_ms(step, args.seconds) for name, step in steps.items()}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        loaded = {name: _median_ms(step, args.seconds) for name, step in steps.items()}
    finally:
        busy.kill()
        busy.wait()
    rows = {name: {"quiet_ms": round(quiet[name], 3), "loaded_ms": round(loaded[name], 3),
                   "slowdown": round(loaded[name] / quiet[name], 2)} for name in steps}  # fmt: skip
    for name, row in rows.items():
        print(f"{name}: quiet {row['quiet_ms']:.2f} ms, one busy process {row['loaded_ms']:.2f} ms "
              f"({row['slowdown']:.2f}x)")  # fmt: skip
    doc = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "case": "Linear(1024, 1024), 256 rows, 98% unstructured, forward + dX + dW",
        "command": "python benchmarks/step_under_load.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "rows": rows,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
