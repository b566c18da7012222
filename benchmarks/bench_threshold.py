"""Global magnitude pruning (threshold + mask update) over ~30M weights in 14 ResNet-shaped tensors.

Providers, all timed in one run on the same weights and the same k:
  lthfast-cpp          lthfast.threshold on the C++ extension (CPU only)
  lthfast-torch        lthfast.threshold's pure-torch radix path (the CUDA path; CPU fallback without _C)
  global_unstructured  torch.nn.utils.prune.global_unstructured(L1Unstructured), what PyTorch users run today
  kthvalue_cat         torch.kthvalue on torch.cat of the magnitudes, then mask &= |w| > t per tensor
  floor_sum            torch.sum over the same tensors: one read of every weight, the memory-bound floor

k is the count nearest 20% of the weights whose k-th smallest magnitude is unique, so every provider's exact
k-smallest mask is the same set; each provider's mask is checked against lthfast.reference.threshold_prune
before it is timed. Masks start all-alive and are reset (untimed) before each repetition. lthfast-cpp and
floor_sum take turns, one repetition each per round, so that load from other processes on a shared machine
hits both alike; the other providers run one after the other. Timings are medians of the repetitions (CPU:
time.perf_counter; CUDA: CUDA events after a warm-up). lthfast-cpp's phases (sample, count pass, apply) are
timed inside the extension in a separate loop after the providers. Extra memory: a fresh
subprocess per provider builds the inputs, runs a tiny warm-up, resets the kernel's RSS high-water mark
(/proc/self/clear_refs), runs the provider once and reads VmHWM - VmRSS: this counts C++ and torch
allocations alike (tracemalloc would miss both).

    python benchmarks/bench_threshold.py [--quick] [--device cpu|cuda] [--out PATH] [--force]

An existing result file (the default is benchmarks/results/threshold-<device>.json) is replaced only with --force.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lthfast import _backend, reference, threshold
from lthfast.bench.results import OutputError, check_output

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [  # 29.5M weights: ResNet-like convs (stem, 3x3 stages, 1x1 projections) and a classifier
    (64, 3, 7, 7), (64, 64, 3, 3), (128, 64, 3, 3), (128, 128, 3, 3), (256, 128, 3, 3), (256, 256, 3, 3),
    (512, 256, 3, 3), (512, 512, 3, 3), (512, 512, 3, 3), (1024, 512, 3, 3), (1024, 1024, 3, 3),
    (2048, 1024, 1, 1), (2048, 2048, 1, 1), (1000, 2048),
]  # fmt: skip
PROVIDERS = ["lthfast-cpp", "lthfast-torch", "global_unstructured", "kthvalue_cat", "floor_sum"]


def make_weights(shapes, device, seed=0):
    """Kaiming-normal float32 weights (std sqrt(2 / fan_in)), as a freshly initialized ResNet."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        w = torch.randn(s, generator=gen) * math.sqrt(2.0 / math.prod(s[1:]))
        out.append(w.to(device))
    return out


def unique_k(weights, amount):
    """The count nearest round(amount * n) whose k-th smallest |w| is unique (no tie at the threshold)."""
    n = sum(w.numel() for w in weights)
    k = round(amount * n)
    for _ in range(100):
        t, _ = threshold.global_threshold(weights, k=k)
        equal = sum(int((w.abs() == t).sum()) for w in weights)
        if equal == 1:
            return k
        below = sum(int((w.abs() < t).sum()) for w in weights)
        k = below + equal + 1
    raise RuntimeError("no tie-free k found")


def provider(name, weights, k):
    """(run(masks) -> masks it produced). run updates/produces masks for all-alive inputs."""
    if name == "lthfast-cpp":
        if weights[0].device.type != "cpu" or _backend.ext() is None:
            return None

        def run(masks):
            threshold._select(weights, masks, None, k, None, layerwise=False, write=True, impl="cpp")
            return masks

    elif name == "lthfast-torch":

        def run(masks):
            threshold._select(weights, masks, None, k, None, layerwise=False, write=True, impl="torch")
            return masks

    elif name == "global_unstructured":
        import torch.nn.utils.prune as tprune

        def run(masks):
            modules = []
            for w in weights:  # Parameters share the weights' storage: no copy before the call
                mod = torch.nn.Module()
                mod.weight = torch.nn.Parameter(w, requires_grad=False)
                modules.append(mod)
            tprune.global_unstructured([(m, "weight") for m in modules], tprune.L1Unstructured, amount=k)
            return [m.weight_mask for m in modules]

    elif name == "kthvalue_cat":

        def run(masks):
            t = torch.kthvalue(torch.cat([w.abs().reshape(-1) for w in weights]), k).values
            for m, w in zip(masks, weights):
                m.logical_and_(w.abs() > t)
            return masks

    elif name == "floor_sum":

        def run(masks):
            return [w.sum() for w in weights]

    else:
        raise ValueError(f"unknown provider {name!r}")
    return run


def fresh_masks(weights):
    return [torch.ones(w.shape, dtype=torch.bool, device=w.device) for w in weights]


def time_once(run, masks, cuda):
    """Wall time (ms) of run(masks), masks reset (untimed) first."""
    for m in masks:
        m.fill_(True)
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        run(masks)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    run(masks)
    return (time.perf_counter() - t0) * 1e3


def time_providers(runs, weights, reps):
    """{name: [ms per repetition]}: the providers take turns (round robin, one warm-up each), so that a busy
    spell of a shared machine lands on each of them rather than on whichever ran then. reps: {name: count}."""
    cuda = weights[0].device.type == "cuda"
    masks = {name: fresh_masks(weights) for name in runs}
    for name, run in runs.items():
        run(masks[name])
    times = {name: [] for name in runs}
    for rep in range(max(reps.values())):
        for name, run in runs.items():
            if rep < reps[name]:
                times[name].append(time_once(run, masks[name], cuda))
    return times


def cpp_phases(weights, k, reps):
    """Median wall time (ms) of each phase of lthfast._C.select (sample, count pass, apply), its passes over
    the weights and whether it finished from the candidates of the count pass."""
    ext = _backend.ext()
    masks = fresh_masks(weights)
    phases, res = [], None
    for _ in range(reps):
        for m in masks:
            m.fill_(True)
        res = ext.select(
            [w.data_ptr() for w in weights], [m.data_ptr() for m in masks], [w.numel() for w in weights],
            [threshold._DTYPE_CODES[w.dtype] for w in weights], [], [list(range(len(weights)))], [], [k], True,
            torch.get_num_threads(), 1 << 16,
        )  # fmt: skip
        phases.append(res["ms"])
    out = {key: statistics.median(p[key] for p in phases) for key in phases[0]}
    return {"median_ms": out, "passes": res["passes"][0], "collected": bool(res["collected"][0])}


def _status_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def measure_memory_here(name, shapes, k, device):
    """In this (fresh) process: extra bytes at peak while running provider `name` once."""
    weights = make_weights(shapes, device)
    masks = fresh_masks(weights)
    small = make_weights([(64, 3, 3, 3), (10, 64)], device, seed=1)
    provider(name, small, 100)(fresh_masks(small))  # loads code paths and thread pools, not counted
    run = provider(name, weights, k)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status_kb("VmRSS")
    run(masks)
    return (_status_kb("VmHWM") - base) * 1024


def measure_memory(name, shapes, k, device):
    if device.type != "cpu" or not Path("/proc/self/clear_refs").exists():
        return None
    here = str(Path(__file__).parent)
    code = (
        f"import sys, json; sys.path.insert(0, {here!r}); import bench_threshold as b, torch;"
        f"print(json.dumps(b.measure_memory_here({name!r}, {shapes!r}, {k}, torch.device('cpu'))))"
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "csrc", "lthfast"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_benchmark(device, shapes, amount=0.2, reps=15, slow_reps=3, memory=True, log=print):
    weights = make_weights(shapes, device)
    n = sum(w.numel() for w in weights)
    k = unique_k(weights, amount)
    log(f"{len(shapes)} tensors, {n / 1e6:.1f}M weights, k={k} ({k / n:.4f}), device {device}")
    expected, expected_t, _ = reference.threshold_prune([w.cpu() for w in weights], k=k)
    runs = {}
    for name in PROVIDERS:
        run = provider(name, weights, k)
        if run is None:
            continue
        got = run(fresh_masks(weights))
        if name != "floor_sum" and not all(torch.equal(g.bool().cpu(), e) for g, e in zip(got, expected)):
            raise AssertionError(f"{name}: masks differ from the reference; not timing it")
        runs[name] = run
    # lthfast-cpp and the floor take turns (its ratio to the floor is the tight target); every other provider
    # runs in a block of its own, as the slow ones would otherwise spread over the whole run.
    paired = [name for name in ("lthfast-cpp", "floor_sum") if name in runs]
    times = time_providers({name: runs[name] for name in paired}, weights, dict.fromkeys(paired, reps))
    for name in runs:
        if name not in paired:
            n_reps = slow_reps if name == "global_unstructured" else reps
            times.update(time_providers({name: runs[name]}, weights, {name: n_reps}))
    results = {}
    for name in runs:
        median, best = statistics.median(times[name]), min(times[name])
        extra = measure_memory(name, shapes, k, device) if memory else None
        results[name] = {"median_ms": median, "min_ms": best, "verified": name != "floor_sum" or None,
                         "extra_bytes": extra, "extra_bytes_per_weight": None if extra is None else extra / n,
                         "times_ms": times[name]}  # fmt: skip
        mem = "" if extra is None else f"  extra memory {extra / 2**20:8.1f} MiB ({extra / n:.3f} B/weight)"
        log(f"  {name:20s} median {median:9.2f} ms  min {best:9.2f} ms{mem}")
    if "lthfast-cpp" in results:
        results["lthfast-cpp"]["phases"] = cpp_phases(weights, k, reps)
        log(f"  lthfast-cpp phases: {results['lthfast-cpp']['phases']}")
    ours = "lthfast-cpp" if "lthfast-cpp" in results else "lthfast-torch"
    base = results[ours]["median_ms"]
    ratios = {
        f"global_unstructured/{ours}": results["global_unstructured"]["median_ms"] / base,
        f"kthvalue_cat/{ours}": results["kthvalue_cat"]["median_ms"] / base,
        f"{ours}/floor_sum": base / results["floor_sum"]["median_ms"],
        "kthvalue_cat/lthfast-torch": results["kthvalue_cat"]["median_ms"] / results["lthfast-torch"]["median_ms"],
    }
    for key, value in ratios.items():
        log(f"  {key:40s} {value:8.2f}x")
    return {
        "benchmark": "threshold",
        "device": _backend.describe()["device"] if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "versions": _backend.describe(),
        "git_commit": git_commit(),
        "config": {"shapes": shapes, "n_weights": n, "k": k, "amount_nominal": amount, "reps": reps,
                   "threshold": expected_t[0], "torch_threads": torch.get_num_threads()},
        "results": results,
        "ratios": ratios,
        "targets": {"global_unstructured/lthfast-cpp": ">= 50", "kthvalue_cat/lthfast-cpp": ">= 10",
                    "lthfast-cpp/floor_sum": "<= 4", "extra_bytes_per_weight": "< 1",
                    "kthvalue_cat/lthfast-torch (cuda)": ">= 10"},
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1/16 of the weights, fewer repetitions, no memory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/threshold-<device>.json)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--force", action="store_true", help="overwrite --out (or the default file) if it exists")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    out = Path(
        args.out or ROOT / "benchmarks" / "results" / f"threshold-{device.type}{'-quick' if args.quick else ''}.json"
    )
    try:  # an existing result is never overwritten silently, and an unwritable path fails before the runs
        check_output([out], force=args.force)
    except OutputError as exc:
        parser.error(str(exc))
    shapes = [tuple(max(1, d // 4) if j < 2 else d for j, d in enumerate(s)) for s in SHAPES] if args.quick else SHAPES
    report = run_benchmark(
        device, shapes, reps=5 if args.quick else args.reps, slow_reps=1 if args.quick else 3,
        memory=not (args.quick or args.no_memory),
    )  # fmt: skip
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
