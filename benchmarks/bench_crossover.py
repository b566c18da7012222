"""Measure where the CPU unstructured sparse kernels beat the dense route, and write the table that "auto" reads
(``lthfast/ops/crossover_cpu.json``; ``lthfast.ops.crossover`` explains how a call looks it up).

For every grid point (a linear layer's rows x shape, or a conv's batch x channels x image) and thread count, the
public op's training step (forward, dX, dW through ``lthfast.functional``) is timed on the dense route once and
on the sparse route at each density (uniform random masks), interleaved over rounds; a point's limit is the
largest density at which sparse was at least ``--margin`` times faster than dense, at that density and every
smaller one measured. Times are medians of the rounds' medians: with 1 thread the calling thread's CPU time
(``time.thread_time``: every product then runs on it, and the figure holds up when other processes share the
machine), wall-clock time otherwise.

    python benchmarks/bench_crossover.py --threads 1,2 --force      # rewrites lthfast/ops/crossover_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import lthfast
from lthfast.bench.results import _cpu_name
from lthfast.ops import crossover

DENSITIES = (0.5, 0.3, 0.2, 0.12, 0.07, 0.04, 0.02, 0.01)
LINEAR = [(rows, n, k) for n, k in ((10, 100), (100, 300), (300, 784), (1024, 1024)) for rows in (1, 8, 32, 128, 512)]
CONV = [(b, c, hw) for c, hw in ((16, 32), (64, 8), (64, 16), (128, 8)) for b in (8, 32, 64, 128)]


def _step(kind: str, shape: tuple, density: float, gen: torch.Generator):
    """A closure running one training step of the op (forward, dX, dW) with fresh random inputs and mask."""
    if kind == "linear":
        rows, n, k = shape
        x = torch.randn(rows, k, generator=gen).requires_grad_()
        w = torch.randn(n, k, generator=gen).requires_grad_()
        mask = torch.rand(n, k, generator=gen) < density
        grad = torch.randn(rows, n, generator=gen)
        op = lambda: lthfast.functional.masked_linear(x, w, mask)
    else:
        b, c, hw = shape
        x = torch.randn(b, c, hw, hw, generator=gen).requires_grad_()
        w = torch.randn(c, c, 3, 3, generator=gen).requires_grad_()
        mask = torch.rand(c, c, 3, 3, generator=gen) < density
        grad = torch.randn(b, c, hw, hw, generator=gen)
        op = lambda: lthfast.functional.masked_conv2d(x, w, mask, padding=1)

    def step():
        x.grad = w.grad = None
        op().backward(grad)

    return step


def _time(step, route: str, budget_s: float) -> float:
    """Median ms of ``step`` on ``route`` over at least 3 calls and ``budget_s`` seconds."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    with crossover.force(route):
        step()
        times = []
        start = clock()
        while len(times) < 3 or clock() - start < budget_s:
            t0 = clock()
            step()
            times.append(clock() - t0)
    return statistics.median(times) * 1e3


def measure(kind: str, shape: tuple, threads: int, rounds: int, margin: float, budget_s: float) -> dict:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    dense_step = _step(kind, shape, 0.5, gen)
    sparse_steps = {d: _step(kind, shape, d, gen) for d in DENSITIES}
    dense, sparse = [], {d: [] for d in DENSITIES}
    for _ in range(rounds):
        dense.append(_time(dense_step, "dense", budget_s))
        for d, step in sparse_steps.items():
            sparse[d].append(_time(step, "sparse", budget_s))
    dense_ms = statistics.median(dense)
    ratios = {d: dense_ms / statistics.median(ts) for d, ts in sparse.items()}
    limit = 0.0
    for d in sorted(DENSITIES):  # the largest density winning there and at every smaller one
        if ratios[d] < margin:
            break
        limit = d
    keys = ("rows", "n", "k") if kind == "linear" else ("batch", "channels", "image")
    point = dict(zip(keys, shape), threads=threads, limit=limit, dense_ms=round(dense_ms, 4))
    point["speedup"] = {str(d): round(r, 3) for d, r in ratios.items()}
    if kind == "linear":
        point["weights"] = shape[1] * shape[2]
    else:
        point.update(weights=shape[1] * shape[1] * 9, pixels=shape[2] * shape[2])
    return point


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default: 1,2)")
    parser.add_argument("--kinds", default="linear,conv", help="linear, conv or both (default: both)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per point (default: 3)")
    parser.add_argument("--margin", type=float, default=1.1, help="speed-up a density must show (default: 1.1)")
    parser.add_argument("--budget", type=float, default=0.05, help="seconds of timed calls per route and round")
    parser.add_argument("--out", type=Path, default=crossover.TABLE, help="JSON to write (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.force:
        parser.error(f"{args.out} exists: pass --force to overwrite it")
    threads = [int(t) for t in args.threads.split(",")]
    kinds = args.kinds.split(",")
    if any(k not in ("linear", "conv") for k in kinds) or any(t < 1 for t in threads):
        parser.error("--kinds takes linear,conv and --threads positive integers")
    table = {
        "cpu": _cpu_name(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "sparse_isa_lanes": lthfast._backend.ext().sparse_isa(),
        "margin": args.margin,
        "command": "python benchmarks/bench_crossover.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    for kind in kinds:
        points = []
        for t in threads:
            for shape in LINEAR if kind == "linear" else CONV:
                point = measure(kind, shape, t, args.rounds, args.margin, args.budget)
                print(kind, shape, f"threads={t}", f"limit={point['limit']}", f"dense={point['dense_ms']:.3f} ms",
                      " ".join(f"{d}:{r}" for d, r in point["speedup"].items()), flush=True)  # fmt: skip
                points.append(point)
        table[kind] = points
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    crossover.reload()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
