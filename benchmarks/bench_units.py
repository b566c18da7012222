"""Throughput of U independent trainings stacked into one model (``lthfast.units``) against one training at a time.

    python benchmarks/bench_units.py --model mlp --hidden 256,256 --batch 100 --optimizer adam --sparsity 0,0.9

Each unit is its own masked copy of the model (own init and random unstructured mask); the sequential baseline
steps one unit with lthfast's fused masked optimizer (the layers' CPU routes included); the stacked model steps U
units with one batched GEMM per layer. Training steps per second summed over the units (units x steps / s), min over
interleaved rounds (thread CPU time), 1 thread unless --threads. Prints a table; nothing is written.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import lthfast
from lthfast import units
from lthfast.bench import train as bench_train
from lthfast.models import build_model

SHAPES = {"mlp": (40,), "lenet": (1, 28, 28), "resnet20": (3, 32, 32)}


def _unit(args, u: int, sparsity: float):
    torch.manual_seed(u)
    base = build_model(args.model, SHAPES[args.model], 10, hidden=args.hidden)
    masks = bench_train.random_masks(base, sparsity, 1, torch.Generator().manual_seed(u))
    with torch.no_grad():
        for name, module in bench_train.prunable(base):
            module.weight.mul_(masks[name])
    return bench_train.build_variant("lthfast", base, masks)


def _optimizer(args, params, **where):
    if args.optimizer == "adam":
        return lthfast.MaskedAdam(params, lr=1e-3, **where)
    return lthfast.MaskedSGD(params, lr=0.01, momentum=0.9, **where)


def _sequential(args, model):
    opt = _optimizer(args, model.parameters(), model=model)
    shape = SHAPES[args.model]

    def step():
        x, y = torch.randn(args.batch, *shape), torch.randint(0, 10, (args.batch,))
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _stacked(args, models):
    stacked = units.stack(models)
    opt = _optimizer(args, stacked.parameters(), masks=units.masks(stacked))
    shape, count = SHAPES[args.model], len(models)

    def step():
        x, y = torch.randn(count, args.batch, *shape), torch.randint(0, 10, (count, args.batch))
        opt.zero_grad(set_to_none=True)
        units.cross_entropy(stacked(units.stack_input(x)), y).backward()
        opt.step()

    return step


def _time(steps: dict, rounds: int, inner: int) -> dict:
    best = {name: float("inf") for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.thread_time()
            for _ in range(inner):
                step()
            best[name] = min(best[name], (time.thread_time() - start) / inner)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mlp", choices=sorted(SHAPES))
    p.add_argument("--hidden", type=lambda s: tuple(int(v) for v in s.split(",")), default=(300, 100))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    p.add_argument("--sparsity", type=lambda s: [float(v) for v in s.split(",")], default=[0.0, 0.9])
    p.add_argument("--units", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--inner", type=int, default=3)
    args = p.parse_args(argv)
    if min(args.units) < 1 or args.batch < 1 or args.threads < 1:
        p.error("--units, --batch and --threads must be positive")
    torch.set_num_threads(args.threads)
    print(f"# {' '.join(sys.argv)}")
    print("sparsity  " + "  ".join(["one by one"] + [f"stacked U={u}" for u in args.units]) + "   (units x steps / s)")
    for sparsity in args.sparsity:
        steps = {"one": _sequential(args, _unit(args, 0, sparsity))}
        for count in args.units:
            steps[count] = _stacked(args, [_unit(args, u, sparsity) for u in range(count)])
        best = _time(steps, args.rounds, args.inner)
        rates = [1 / best["one"]] + [count / best[count] for count in args.units]
        print(f"{sparsity:8.2f}  " + "  ".join(f"{r:10.0f}" for r in rates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
