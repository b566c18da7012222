"""Benchmark the masked linear layer: the sparsity sweep, the issue's speed targets, and the dispatch crossovers.

Providers (every one checked against the float64 reference before it is timed, see lthfast.bench.layer):
  dense            F.linear on the dense W ⊙ M (cuBLAS / MKL), with autograd in train mode
  mask-multiply    F.linear(x, W * M), the product recomputed every call (what torch.nn.utils.prune does)
  torch-bsr        W ⊙ M as a torch BSR tensor (CSR for block 1), F.linear
  lthfast          lthfast.functional.masked_linear on the "auto" backend (what users get)
  lthfast-triton   the Triton kernels at every density ("triton" backend; CUDA only)
  lthfast-dense    lthfast's torch path forced dense (torch on W ⊙ M inside the custom op)
  lthfast-block32  lthfast's CPU block path forced with 32x32 (64x64) tiles at every density (CPU only)

Sections (each prints its tables; all go into one JSON with the device, versions and git commit):
  sweep      sparsity {0,.5,.8,.9,.95,.98,.99} x block {1,16,32,64} x dtype x {forward, train}
  targets    the issue's targets, measured in one run with interleaved rounds (CPU: Linear(2048, 2048), batch 512,
             fp32; CUDA: Linear(4096, 4096), 8192 tokens, bf16), each with its measured ratio and pass/fail
  crossover  forced sparse vs forced dense over tile densities: the values that lthfast.ops.linear_torch
             .CPU_CROSSOVER (CPU; CPU_CROSSOVER_TORCH when lthfast._C lacks the block kernels) and
             lthfast.ops.linear.CUDA_DENSE_ABOVE (CUDA) should hold

    python benchmarks/bench_masked_linear.py --out benchmarks/results/masked_linear-cpu.json
    python benchmarks/bench_masked_linear.py --sections targets,crossover --repeats 5
    python benchmarks/bench_masked_linear.py --out benchmarks/results/masked_linear-h100.json   # on a GPU

Without --out nothing is written; an existing --out file is replaced only with --force.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shlex
import sys
from pathlib import Path

import torch

import lthfast
from lthfast.bench import layer, providers, results
from lthfast.bench.masks import check_sweep
from lthfast.ops import linear_torch

SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
BLOCKS = (1, 16, 32, 64)
SWEEP_PROVIDERS = ("dense", "mask-multiply", "torch-bsr", "lthfast")
CROSSOVER_DENSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)


# ----------------------------------------------------------------------------------- forced lthfast paths


@contextlib.contextmanager
def _torch_path(crossover: dict[int, float]):
    """lthfast's torch path with ``CPU_CROSSOVER`` (and ``CPU_CROSSOVER_TORCH``) replaced ({} = always dense) and no
    minimum size."""
    saved = linear_torch.CPU_CROSSOVER, linear_torch.CPU_CROSSOVER_TORCH, linear_torch.CPU_MIN_MACS
    linear_torch.CPU_CROSSOVER, linear_torch.CPU_CROSSOVER_TORCH, linear_torch.CPU_MIN_MACS = crossover, crossover, 0
    try:
        with lthfast.backend("torch"):
            yield
    finally:
        linear_torch.CPU_CROSSOVER, linear_torch.CPU_CROSSOVER_TORCH, linear_torch.CPU_MIN_MACS = saved


def _forced(context, detail: str, cuda_only: bool = False, cpu_only: bool = False):
    """A provider: the ``lthfast`` provider's call run inside ``context()``."""

    def prepare(problem: providers.Problem) -> providers.Prepared:
        device = problem.weight.device.type
        if cuda_only and device != "cuda":
            raise providers.Unsupported("Triton kernels are timed on CUDA only (the interpreter is no fast path)")
        if cpu_only and device != "cpu":
            raise providers.Unsupported("the block-sparse torch path runs on CPU only")
        prepared = providers.PREPARE["lthfast"](problem)
        call = prepared.call

        def run(*inputs):
            with context():
                return call(*inputs)

        return dataclasses.replace(prepared, call=run, detail=detail)

    return prepare


EXTRA_PROVIDERS = {
    "lthfast-triton": _forced(lambda: lthfast.backend("triton"), "Triton kernels at every density", cuda_only=True),
    "lthfast-dense": _forced(lambda: _torch_path({}), "torch on W*M inside the op"),
    "lthfast-block32": _forced(lambda: _torch_path({32: math.inf}), "block path, 32x32 tiles", cpu_only=True),
    "lthfast-block64": _forced(lambda: _torch_path({64: math.inf}), "block path, 64x64 tiles", cpu_only=True),
}
providers.PREPARE.update(EXTRA_PROVIDERS)  # this process only: lthfast.bench.layer looks providers up there


# ------------------------------------------------------------------------------------------------ sections


def _config(args, device: str, **overrides) -> layer.LayerConfig:
    base = {"min_run_time": args.min_run_time, "repeats": args.repeats, "seed": args.seed}
    if device == "cuda":
        base |= {"rep_ms": args.rep_ms, "cuda_graph": args.cuda_graph}
    return layer.default_layer_config("linear", device, **(base | overrides))


def _run(cfg: layer.LayerConfig, command: str, notes: str) -> dict:
    body = layer.run_layer(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    doc = results.document("layer", body, torch.device(cfg.device), command, notes, provider="lthfast")
    print(f"\n== {cfg.mode} {cfg.dtype} {cfg.shape[0]}x{cfg.shape[1]}, {cfg.tokens} tokens")
    print(results.format_table(doc), flush=True)
    return doc


def sweep(args, device: str, command: str) -> list[dict]:
    docs = []
    for dtype in args.dtype:
        for mode in args.mode:
            cfg = _config(
                args, device, dtype=dtype, mode=mode, shape=args.shape, tokens=args.tokens,
                sparsities=list(args.sparsity), blocks=list(args.block), providers=list(args.providers),
            )  # fmt: skip
            docs.append(_run(cfg, command, args.notes))
    return docs


def _ratio(row: dict, provider: str, baseline: str) -> float | None:
    by_name = {r["provider"]: r for r in row["results"] if r["status"] == "ok"}
    if provider not in by_name or baseline not in by_name:
        return None
    return by_name[baseline]["median_ms"] / by_name[provider]["median_ms"]


def _row(doc: dict, sparsity: float, block: int) -> dict:
    return next(r for r in doc["rows"] if r["sparsity"] == sparsity and r["block"] == block)


def targets(args, device: str, command: str) -> dict:
    """The issue's targets, as (name, measured ratio, bound) with pass/fail. Ratio = baseline / lthfast time."""
    if device == "cuda":  # issue 22's targets: blocks 32 / 64 / 128 at 90 / 98%, 0%, and unstructured 90%
        shape, tokens, dtype = (4096, 4096), 8192, "bfloat16"
        masks = [(0.0, 1), *((s, b) for b in (32, 64, 128) for s in (0.9, 0.98)), (0.9, 1)]
        names = ["dense", "mask-multiply", "lthfast"]
    else:
        shape, tokens, dtype = (2048, 2048), 512, "float32"
        masks = [(0.0, 32), (0.95, 32)]
        names = ["dense", "mask-multiply", "lthfast"]
    docs = {}
    for sparsity, block in masks:  # one run per mask, so that each row's rounds interleave only its providers
        cfg = _config(args, device, dtype=dtype, mode="train", shape=shape, tokens=tokens, sparsities=[sparsity],
                      blocks=[block], providers=names)  # fmt: skip
        docs[(sparsity, block)] = _run(cfg, command, args.notes)
    checks = []
    if device == "cuda":
        bounds = {(0.9, 32): 2.5, (0.98, 32): 5.0, (0.9, 64): 4.0, (0.98, 64): 6.0, (0.9, 128): 5.0, (0.98, 128): 7.0}
        wanted = [("0% sparsity: >= 0.97x dense cuBLAS", (0.0, 1), "dense", 0.97)]
        wanted += [(f"{s:.0%} in {b}x{b} blocks: >= {x}x dense", (s, b), "dense", x) for (s, b), x in bounds.items()]
        wanted += [("90% unstructured: >= 0.98x mask-multiply", (0.9, 1), "mask-multiply", 0.98)]
    else:
        wanted = [
            ("95% in 32x32 blocks: >= 4x dense F.linear (train step)", (0.95, 32), "dense", 4.0),
            ("0% sparsity: at most 10% slower than F.linear(x, w*m)", (0.0, 32), "mask-multiply", 1 / 1.1),
        ]
    for name, (sparsity, block), baseline, bound in wanted:
        ratio = _ratio(_row(docs[(sparsity, block)], sparsity, block), "lthfast", baseline)
        checks.append({"target": name, "baseline": baseline, "ratio": ratio, "bound": bound,
                       "pass": ratio is not None and ratio >= bound})  # fmt: skip
    graphs = ", every step a CUDA graph replay" if device == "cuda" and args.cuda_graph else ""
    print(f"\n== targets (ratio = baseline median / lthfast median, same run, train step{graphs})")
    for c in checks:
        shown = "n/a" if c["ratio"] is None else f"{c['ratio']:.2f}x"
        print(f"  {'PASS' if c['pass'] else 'FAIL'}  {c['target']:58s} {shown:>8} (bound {c['bound']:.2f}x)")
    return {"shape": list(shape), "tokens": tokens, "dtype": dtype, "cuda_graph": bool(graphs), "checks": checks,
            "runs": list(docs.values())}  # fmt: skip


def crossover(args, device: str, command: str) -> dict:
    """Per tile size: the highest tile density at which the forced sparse path still beats the forced dense path,
    for forward and train; the smaller of the two is what the dispatcher should use."""
    tiles = (32,) if device == "cuda" else (32, 64)
    shape, tokens, dtype = ((4096, 4096), 8192, "bfloat16") if device == "cuda" else ((2048, 2048), 512, "float32")
    out: dict = {"shape": list(shape), "tokens": tokens, "dtype": dtype, "runs": []}
    for tile in tiles:
        sparse = "lthfast-triton" if device == "cuda" else f"lthfast-block{tile}"
        for mode in args.mode:
            cfg = _config(
                args, device, dtype=dtype, mode=mode, shape=shape, tokens=tokens, tile=(tile, tile),
                sparsities=[round(1 - d, 6) for d in CROSSOVER_DENSITIES], blocks=[tile],
                providers=["dense", "lthfast-dense", sparse],
            )  # fmt: skip
            doc = _run(cfg, command, args.notes)
            points = sorted((row["tile_density"], _ratio(row, sparse, "lthfast-dense")) for row in doc["rows"])
            wins = [d for d, r in points if r is not None and r > 1.0]
            losses = [d for d, r in points if r is not None and r <= 1.0]
            below = [d for d in wins if not losses or d < min(losses)]
            found = max(below) if below else None
            out.setdefault(str(tile), {})[mode] = {"sparse_wins_up_to_tile_density": found, "points": points}
            out["runs"].append(doc)
            print(f"  crossover {sparse} {mode}: sparse path faster up to tile density {found} ({points})")
    return out


# --------------------------------------------------------------------------------------------------- main


def _parse(argv=None) -> argparse.Namespace:
    floats = lambda s: [float(v) for v in s.split(",") if v.strip()]
    ints = lambda s: [int(v) for v in s.split(",") if v.strip()]
    words = lambda s: [v.strip() for v in s.split(",") if v.strip()]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--sections", type=words, default=["sweep", "targets"], help="sweep,targets,crossover")
    p.add_argument("--shape", type=lambda s: tuple(ints(s.replace("x", ","))), default=None, help="sweep: NxK")
    p.add_argument("--tokens", type=int, default=None, help="sweep: rows of x (default 256 CPU, 8192 CUDA)")
    p.add_argument("--dtype", type=words, default=None, help="sweep dtypes (default float32 CPU, bfloat16 CUDA)")
    p.add_argument("--mode", type=words, default=["forward", "train"])
    p.add_argument("--sparsity", type=floats, default=list(SPARSITIES))
    p.add_argument("--block", type=ints, default=list(BLOCKS))
    p.add_argument("--providers", type=words, default=list(SWEEP_PROVIDERS))
    p.add_argument("--min-run-time", type=float, default=0.1, help="CPU: seconds per blocked_autorange round")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds per provider (CPU)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="CUDA: do_bench timed milliseconds")
    p.add_argument("--cuda-graph", action="store_true", help="CUDA: time every call captured as CUDA graphs")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--notes", default="", help="free text stored in the JSON (e.g. machine load)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: print only)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = p.parse_args(argv)
    unknown = set(args.sections) - {"sweep", "targets", "crossover"}
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")
    try:  # before any section runs: dense added as in `lthfast bench layer`, unknown names and values refused
        args.providers = providers.parse_providers(",".join(args.providers))
        check_sweep("options", args.sparsity, args.block, args.repeats)
    except ValueError as exc:
        p.error(str(exc))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    try:  # an existing result is never overwritten silently, and an unwritable path fails before the sweep
        if args.out is not None:
            results.check_output([args.out], force=args.force)
    except results.OutputError as exc:
        p.error(str(exc))
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.cuda_graph and device != "cuda":
        raise SystemExit("bench_masked_linear.py: --cuda-graph needs a CUDA device")
    args.dtype = args.dtype or (["bfloat16"] if device == "cuda" else ["float32"])
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["bench_masked_linear.py", *argv])
    out = {"schema": "lthfast.bench.masked_linear/1", "command": command, "notes": args.notes,
           "device": results.device_info(torch.device(device)), "git": results.git_info(),
           "versions": lthfast._backend.describe()}  # fmt: skip

    def save() -> None:  # after every section, so that a run cut short keeps what it measured
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1) + "\n")

    for section, run in (("sweep", sweep), ("targets", targets), ("crossover", crossover)):
        if section in args.sections:
            out[section] = run(args, device, command)
            save()
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
