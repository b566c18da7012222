"""One global magnitude prune step over a ResNet-50-shaped model: lthfast vs torch.nn.utils.prune.

A step prunes ``--amount`` of the alive weights of all 54 Conv2d/Linear weights (25.5M, ResNet-50's shapes;
no torchvision, no BatchNorm: only prunable tensors matter here), ``--rounds`` times in a row (IMP rounds):

  torch          ``torch.nn.utils.prune.global_unstructured(params, L1Unstructured, amount)``
  lthfast        ``strategies.magnitude_`` (in place on a ``sparsify``-ed model: score + global threshold via
                 lthfast.threshold, the modules' masks cleared and the pruned weights zeroed in the same pass)
                 -> ``tile_indices(masks, block, block)``: the kernels' tile index of every weight, rebuilt
                 (one lthfast._C call over all masks on torch's threads; cached where the layers look them up)
  lthfast-masks  the functional route: ``strategies.magnitude`` (new Masks) -> ``Masks.apply_`` (mask copy
                 into the modules, every pruned weight zeroed) -> the same tile index rebuild
  lthfast-dropin ``lthfast.prune.global_unstructured`` (the drop-in, torch's layout; no tile index)

Each library runs in its own subprocess (so its RSS is its own), in the order of ``--libraries``, repeated
``--repeats`` times in alternation; a prune step changes the model, so every round is timed once with
``time.perf_counter`` (one call: 0.03 s to seconds) and the reported time is the median over rounds and repeats.
Memory after round 1 and after the last round: tensor bytes held by the model (unique storages reachable from
its parameters, buffers, attributes and pruning hooks) and the process RSS, also after glibc's malloc_trim.
The final masks of every library are compared with torch's (only ties at the threshold may differ).

    .venv/bin/python benchmarks/bench_prune_step.py        # writes benchmarks/results/prune_step-cpu.json
                                                            # (an existing file only with --force)
    .venv/bin/python benchmarks/bench_prune_step.py --threads 1 --out benchmarks/results/prune_step-cpu-1thread.json
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

# torch: torch.nn.utils.prune; lthfast: strategies.magnitude_ in place; lthfast-masks: the functional
# strategies.magnitude -> Masks.apply_; lthfast-dropin: lthfast.prune.global_unstructured
LIBRARIES = ("torch", "lthfast", "lthfast-masks", "lthfast-dropin")
RESNET50_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride)


def resnet50_shaped(seed: int = 0) -> nn.Module:
    """ResNet-50's Conv2d / Linear layers (weights ~ N(0, 2/fan_in)), as a flat container (no forward)."""
    layers = nn.ModuleDict()
    layers["conv1"] = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    cin = 64
    for s, (width, blocks, stride) in enumerate(RESNET50_STAGES):
        for b in range(blocks):
            p = f"layer{s + 1}_{b}_"
            layers[p + "conv1"] = nn.Conv2d(cin, width, 1, bias=False)
            layers[p + "conv2"] = nn.Conv2d(width, width, 3, stride=stride if b == 0 else 1, padding=1, bias=False)
            layers[p + "conv3"] = nn.Conv2d(width, 4 * width, 1, bias=False)
            if b == 0:
                layers[p + "downsample"] = nn.Conv2d(cin, 4 * width, 1, stride=stride, bias=False)
            cin = 4 * width
    layers["fc"] = nn.Linear(2048, 1000)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in layers.values():
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
    return layers


def held_tensor_bytes(model: nn.Module) -> int:
    """Bytes of the unique storages reachable from the model's modules: parameters, buffers, tensor attributes
    (torch's recomputed ``weight``) and pruning hooks (torch's PruningContainer / CustomFromMask masks)."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    def walk_hook(hook):
        for value in vars(hook).values():
            add(value)
            if isinstance(value, tuple):
                for item in value:
                    if hasattr(item, "__dict__"):
                        walk_hook(item)

    for module in model.modules():
        for t in list(module._parameters.values()) + list(module._buffers.values()) + list(vars(module).values()):
            add(t)
        for hook in module._forward_pre_hooks.values():
            if hasattr(hook, "__dict__"):
                walk_hook(hook)
    return sum(seen.values())


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(model: nn.Module) -> dict:
    """Model tensor bytes, RSS, and RSS after ``malloc_trim(0)`` (glibc hands back freed heap pages: without it
    RSS wanders by ~10 MiB between rounds with what the allocator keeps cached, not what is held)."""
    gc.collect()
    out = {"model_tensor_bytes": held_tensor_bytes(model), "rss_bytes": rss_bytes()}
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        out["rss_trimmed_bytes"] = rss_bytes()
    except OSError:
        out["rss_trimmed_bytes"] = None
    return out


def final_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in model.named_children():
        mask = getattr(m, "mask", None)
        if mask is None:
            mask = m.weight_mask != 0
        out[name] = mask.clone()
    return out


def worker(library: str, rounds: int, amount: float, block: int, masks_path: str, threads: int | None) -> dict:
    from torch.nn.utils import prune as torch_prune

    import lthfast
    import lthfast.prune as fast_prune
    from lthfast.indexing.tiles import tile_indices
    from lthfast.pruning import strategies

    if threads:
        torch.set_num_threads(threads)
    model = resnet50_shaped()
    if library in ("lthfast", "lthfast-masks"):
        lthfast.sparsify(model)
        masks = lthfast.Masks.from_model(model)
    params = [(m, "weight") for m in model.values()]
    out = {"library": library, "params": sum(m.weight.numel() for m in model.values()), "round_s": [], "memory": {}}
    out["threads"] = torch.get_num_threads()
    parts = {"magnitude": [], "apply": [], "tile_index": []}  # magnitude_ does both the first two: "apply" 0
    out["memory"]["before"] = memory(model)
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        if library == "torch":
            torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=amount)
        elif library == "lthfast-dropin":
            fast_prune.global_unstructured(params, pruning_method=fast_prune.L1Unstructured, amount=amount)
        else:
            if library == "lthfast":
                strategies.magnitude_(model, amount)
                t1 = t2 = time.perf_counter()
            else:  # lthfast-masks
                masks = strategies.magnitude(model, masks, amount)
                t1 = time.perf_counter()
                masks.apply_(model)
                t2 = time.perf_counter()
            tile_indices([m.mask for m in model.values()], block, block)  # each as [out, in * kh * kw]
            t3 = time.perf_counter()
            for part, dt in zip(parts, (t1 - start, t2 - t1, t3 - t2)):
                parts[part].append(dt)
        out["round_s"].append(time.perf_counter() - start)
        if r in (1, rounds):
            gc.collect()
            out["memory"][f"after_round_{r}"] = memory(model)
    if library in ("lthfast", "lthfast-masks"):
        out["parts_s"] = parts
    final = final_masks(model)
    out["alive"] = sum(int(m.sum()) for m in final.values())
    torch.save(final, masks_path)
    return out


def _run_worker(library: str, args, masks_path: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", library, "--rounds", str(args.rounds), "--amount", str(args.amount)]
    cmd += ["--block", str(args.block), "--masks-path", masks_path]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:  # the worker's own error, not a bare CalledProcessError
        raise SystemExit(f"bench_prune_step.py: the {library} worker failed (exit {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _diff(mem: dict, rounds: int, key: str) -> int | None:
    last, first = mem[f"after_round_{rounds}"][key], mem["after_round_1"][key]
    return None if last is None or first is None else last - first


def _git() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--amount", type=float, default=0.2)
    parser.add_argument("--block", type=int, default=32, help="tile of the tile index rebuilt after each prune")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each library, alternating")
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    parser.add_argument(
        "--out", default="benchmarks/results/prune_step-cpu.json", help="JSON path (default: %(default)s)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--notes", default="")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--masks-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.rounds, args.amount, args.block, args.masks_path, args.threads)))
        return

    from lthfast import _backend

    libraries = [lib.strip() for lib in args.libraries.split(",") if lib.strip()]
    unknown = [lib for lib in libraries if lib not in LIBRARIES]
    if unknown or not libraries:
        parser.error(f"--libraries: unknown {unknown}, expected some of {list(LIBRARIES)}")
    from lthfast.bench.results import OutputError, check_output

    try:  # an existing result is never overwritten silently, and an unwritable path fails before the runs
        check_output([args.out], force=args.force)
    except OutputError as exc:
        parser.error(str(exc))
    runs = {lib: [] for lib in libraries}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for lib in libraries:
                result = _run_worker(lib, args, os.path.join(tmp, f"{lib}-{rep}.pt"))
                runs[lib].append(result)
                print(
                    f"{lib:15s} repeat {rep}: median round {statistics.median(result['round_s']) * 1e3:9.1f} ms",
                    flush=True,
                )
        masks = {lib: torch.load(os.path.join(tmp, f"{lib}-0.pt")) for lib in libraries}
    reference = masks.get("torch")
    summary = {}
    for lib, results in runs.items():
        times = [t for r in results for t in r["round_s"]]
        mem = results[0]["memory"]
        entry = {
            "median_round_ms": statistics.median(times) * 1e3,
            "min_round_ms": min(times) * 1e3,
            "max_round_ms": max(times) * 1e3,
            "first_round_ms": [r["round_s"][0] * 1e3 for r in results],
            "round_ms": [[t * 1e3 for t in r["round_s"]] for r in results],
            "final_alive": results[0]["alive"],
            "threads": results[0]["threads"],
            "memory": mem,
            "model_tensor_growth_bytes": mem[f"after_round_{args.rounds}"]["model_tensor_bytes"]
            - mem["after_round_1"]["model_tensor_bytes"],
            "rss_growth_bytes": mem[f"after_round_{args.rounds}"]["rss_bytes"] - mem["after_round_1"]["rss_bytes"],
            "rss_trimmed_growth_bytes": _diff(mem, args.rounds, "rss_trimmed_bytes"),
        }
        if "parts_s" in results[0]:
            entry["median_part_ms"] = {
                part: statistics.median([t for r in results for t in r["parts_s"][part]]) * 1e3
                for part in results[0]["parts_s"]
            }
        if reference is not None:
            entry["masks_differ_from_torch"] = sum(int((masks[lib][n] != reference[n]).sum()) for n in reference)
        summary[lib] = entry
    if "torch" in summary:
        # Torch's step shrinks with the alive count (its topk runs over the alive entries only: 5.4 s at round 1,
        # 1.3 s at round 10 here); lthfast's passes cover every weight, so the ratio is reported per round too.
        def by_round(lib):
            return [statistics.median(r["round_s"][i] for r in runs[lib]) for i in range(args.rounds)]

        torch_rounds = by_round("torch")
        for lib in summary:
            summary[lib]["speedup_vs_torch"] = summary["torch"]["median_round_ms"] / summary[lib]["median_round_ms"]
            summary[lib]["speedup_vs_torch_by_round"] = [t / o for t, o in zip(torch_rounds, by_round(lib))]
    doc = {
        "schema": "lthfast.bench.prune_step/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "benchmarks/bench_prune_step.py"] + sys.argv[1:]),
        "notes": args.notes,
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count()},
        "versions": _backend.describe(),
        "git": _git(),
        "config": {"model": "resnet50-shaped (53 Conv2d + 1 Linear weights)", "params": runs[libraries[0]][0]["params"],
                   "rounds": args.rounds, "amount": args.amount, "tile": [args.block, args.block],
                   "repeats": args.repeats, "timer": "time.perf_counter, one call per round"},
        "results": summary,
    }  # fmt: skip
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    for lib, e in summary.items():
        mib = 1 << 20
        print(
            f"{lib:15s} median {e['median_round_ms']:9.1f} ms  x{e.get('speedup_vs_torch', float('nan')):6.1f} vs torch"
            f"  model tensors {e['memory']['after_round_1']['model_tensor_bytes'] / mib:7.1f} -> "
            f"{e['memory'][f'after_round_{args.rounds}']['model_tensor_bytes'] / mib:7.1f} MiB"
            f"  RSS (trimmed) {(e['memory']['after_round_1']['rss_trimmed_bytes'] or 0) / mib:7.1f} -> "
            f"{(e['memory'][f'after_round_{args.rounds}']['rss_trimmed_bytes'] or 0) / mib:7.1f} MiB"
            f"  masks != torch: {e.get('masks_differ_from_torch')}"
        )
        if "speedup_vs_torch_by_round" in e:
            print("    speed-up per round: " + " ".join(f"{x:.1f}" for x in e["speedup_vs_torch_by_round"]))
        if "median_part_ms" in e:
            print("    " + ", ".join(f"{k} {v:.1f} ms" for k, v in e["median_part_ms"].items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
